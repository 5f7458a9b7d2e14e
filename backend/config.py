"""EngineConfig: the engine's settings, with vLLM's names, parsed and validated from strings."""
import json
import os
from dataclasses import dataclass, field, fields

import torch


@dataclass
class EngineConfig:
    model: str = ""
    tokenizer: str = ""                    # default: the model directory
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    max_model_len: int = 0                 # 0: the model's max_position_embeddings
    dtype: str = "auto"                    # auto: bf16 on CUDA (fp16 if unsupported), fp32 on CPU
    cpu_kvcache_space_gb: float = 1.0      # KV pool size on CPU (vLLM's VLLM_CPU_KVCACHE_SPACE)
    num_gpu_blocks_override: int = 0       # fixed KV pool size in blocks, on any device; 0: sized from memory
    device: str = "auto"                   # auto: cuda when available, else cpu
    seed: int = 0
    load_format: str = "auto"              # auto: safetensors; dummy: random weights for config.json
    enable_prefix_caching: bool = True
    enforce_eager: bool = False            # True: no CUDA graphs
    tensor_parallel_size: int = 1          # ranks (processes) one model is split across
    async_scheduling: str = "auto"         # overlap host work with the GPU step; auto: on CUDA
    scheduling_policy: str = "fcfs"        # fcfs, or priority (lower value first, then arrival)
    max_queue_size: int = 0                # requests waiting to start beyond which new ones are refused; 0: no limit
    queue_timeout_s: float = 0.0           # a request not started after this long fails (overload); 0: no limit
    target_itl_ms: float = 0.0             # step time to hold (prompt chunks sized by a fitted cost model); 0: off
    max_prefill_bypass: int = 8            # later, shorter prompts that may go before a prompt; 0: arrival order
    # Filled by resolve() from the fields above and the checkpoint, once for every part and rank.
    hf: dict = field(default=None, init=False, repr=False)                     # the model's config.json
    torch_device: torch.device = field(default=None, init=False, repr=False)
    torch_dtype: torch.dtype = field(default=None, init=False, repr=False)

    DTYPES = ("auto", "float32", "float16", "bfloat16")

    @classmethod
    def from_parameters(cls, params: dict, model_dir_base: str = "") -> "EngineConfig":
        """Build from Triton's string parameters; unknown keys are an error (a typo must not pass)."""
        known = {f.name: f for f in fields(cls) if f.init}
        kwargs = {}
        for key, raw in params.items():
            if key not in known:
                raise ValueError(f"unknown parameter '{key}' (known: {', '.join(sorted(known))})")
            value = raw.get("string_value", "") if isinstance(raw, dict) else raw
            if isinstance(value, str):
                value = value.strip()
                if value == "":
                    continue
            kwargs[key] = _convert(key, value, known[key].type)
        config = cls(**kwargs)
        for key in ("model", "tokenizer"):
            path = getattr(config, key)
            if path and model_dir_base and not os.path.isabs(path):
                setattr(config, key, os.path.join(model_dir_base, path))
        config.validate()
        return config

    def validate(self):
        def check(ok, name, what):
            if not ok:
                raise ValueError(f"parameter '{name}' {what}, got {getattr(self, name)!r}")
        check(bool(self.model), "model", "must name a model directory")
        if self.load_format != "dummy":
            check(os.path.isfile(os.path.join(self.model, "config.json")), "model",
                  "must be a directory holding config.json")
        check(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        check(self.max_num_batched_tokens >= self.max_num_seqs, "max_num_batched_tokens",
              f"must be >= max_num_seqs ({self.max_num_seqs}), so that every running request can decode each step")
        check(self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0, "block_size",
              "must be a power of two")
        check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")
        check(self.max_model_len >= 0, "max_model_len", "must be >= 0")
        check(self.dtype in self.DTYPES, "dtype", f"must be one of {self.DTYPES}")
        check(self.cpu_kvcache_space_gb > 0, "cpu_kvcache_space_gb", "must be > 0")
        check(self.num_gpu_blocks_override >= 0, "num_gpu_blocks_override", "must be >= 0")
        check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device",
              "must be auto, cpu or cuda[:N]")
        check(self.load_format in ("auto", "dummy"), "load_format", "must be auto or dummy")
        check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        check(self.async_scheduling in ("auto", "true", "false"), "async_scheduling", "must be auto, true or false")
        check(self.scheduling_policy in ("fcfs", "priority"), "scheduling_policy", "must be fcfs or priority")
        check(self.max_queue_size >= 0, "max_queue_size", "must be >= 0 (0: no limit)")
        check(0 <= self.queue_timeout_s < float("inf"), "queue_timeout_s", "must be >= 0 seconds (0: no limit)")
        check(0 <= self.target_itl_ms < float("inf"), "target_itl_ms", "must be >= 0 milliseconds (0: off)")
        check(self.max_prefill_bypass >= 0, "max_prefill_bypass", "must be >= 0 (0: prompts in arrival order)")

    def resolve(self) -> "EngineConfig":
        """Settle what "auto" and 0 stand for: the device, the dtype, max_model_len and the model's
        config.json. Idempotent; the result pickles, so tensor-parallel ranks get the same values."""
        if self.hf is not None:
            return self
        with open(os.path.join(self.model, "config.json")) as f:
            self.hf = json.load(f)
        if self.device == "auto":
            self.torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.torch_device = torch.device(self.device)
        self.torch_dtype = self._pick_dtype()
        self.max_model_len = self.max_model_len or self.hf.get("max_position_embeddings", 4096)
        return self

    def _pick_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        if self.torch_device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32


def _convert(key, value, typ):
    typ = {"int": int, "float": float, "str": str}.get(typ, typ) if isinstance(typ, str) else typ
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return str(value).lower() in ("true", "1")
        if typ is int:
            as_float = float(value)
            if as_float != int(as_float):
                raise ValueError
            return int(as_float)
        return typ(value)
    except (TypeError, ValueError):
        raise ValueError(f"parameter '{key}' must be {typ.__name__}, got {value!r}") from None
