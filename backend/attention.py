"""AttentionMetadata: where a step's new tokens go in the paged KV cache and what each query reads.

Shared by the model runner (eager steps), the CUDA graphs (static copies) and the models."""
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor      # [T] flat cache slot of each new token (-1: padding)
    block_tables: torch.Tensor      # [S, max_blocks] int32
    seq_lens: torch.Tensor          # [S] int32: context length after this step
    query_start_loc: torch.Tensor   # [S+1] int32: cuts of the packed new tokens
    max_query_len: int = 0          # the longest query (with split_decodes: an upper bound)
    # A padded CUDA-graph batch whose mix of decodes and prompt chunks is unknown at capture: attention
    # runs the one-token queries and the longer ones as two launches, each with its own tile size.
    split_decodes: bool = False
