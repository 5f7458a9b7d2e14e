"""BlockManager: the pool of fixed-size KV blocks.

- Ref counts let sequences share blocks (prefix-cache hits, the samples of one request, beams).
- Full blocks get a chained hash (parent hash + the block's token ids) so a later prompt that
  starts with the same tokens reuses them (prefix caching).
- Free blocks wait in LRU order in an OrderedDict (a doubly linked list: O(1) removal from the
  middle when a cached block is hit, O(1) eviction from the front). A freed block that still
  holds a cached prefix goes to the back, so it is evicted last; one with nothing worth keeping
  goes to the front.
- A shared, partially filled block is copied on write: the writer gets a private copy, and the
  copy is queued for the model runner to perform before the step's forward pass.
"""
from collections import OrderedDict

from backend.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_key: list[tuple | None] = [None] * num_blocks
        self.cached: dict[tuple, int] = {}       # (parent hash, token ids) -> block id
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.pending_copies: list[tuple[int, int]] = []   # (src, dst) copy-on-write, for the runner
        self.num_prefix_queries = 0              # prompt tokens looked up / found (vLLM's metrics)
        self.num_prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def free_block_ids(self) -> list[int]:
        return list(self.free_blocks)

    # ---- allocation -----------------------------------------------------------------------------
    def _take_free(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)
        key = self.block_key[block_id]
        if key is not None:   # evicting a cached block: forget its hash
            if self.cached.get(key) == block_id:
                del self.cached[key]
            self.block_key[block_id] = self.block_hash[block_id] = None
        return block_id

    def _needs_copy(self, seq: Sequence) -> bool:
        """Will the next write into seq land in a shared block that is not a full cached one?"""
        c = seq.num_computed_tokens
        i = c // self.block_size
        if c % self.block_size == 0 or i >= len(seq.block_table):
            return False
        b = seq.block_table[i]
        return self.ref_counts[b] > 1 and self.block_hash[b] is None

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's block table to hold num_tokens tokens; False (and no change) if the pool is short."""
        grow = cdiv(num_tokens, self.block_size) - len(seq.block_table)
        copy = self._needs_copy(seq)
        if grow <= 0 and not copy:   # the common decode step: the last block has room
            return True
        if max(grow, 0) + copy > len(self.free_blocks):
            return False
        if copy:
            i = seq.num_computed_tokens // self.block_size
            src, dst = seq.block_table[i], self._take_free()
            self.ref_counts[src] -= 1
            self.ref_counts[dst] = 1
            # A new list, not an in-place change: staged block tables are reused while the list is the same.
            seq.block_table = seq.block_table[:i] + [dst] + seq.block_table[i + 1:]
            self.pending_copies.append((src, dst))
        for _ in range(grow):
            block_id = self._take_free()
            self.ref_counts[block_id] = 1
            seq.block_table.append(block_id)
        return True

    def free(self, seq: Sequence):
        # Tail first: a request's head is likelier to be shared by later requests than its tail.
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_blocks[block_id] = None
                if self.block_hash[block_id] is None:
                    self.free_blocks.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.block_hashes = []

    def fork(self, parent: Sequence, child: Sequence):
        """child shares all of parent's blocks (copy on write later)."""
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        for block_id in parent.block_table:
            self.ref_counts[block_id] += 1

    # ---- prefix caching -------------------------------------------------------------------------
    def _key(self, seq: Sequence, i: int, parent_hash: int | None) -> tuple:
        bs = self.block_size
        return parent_hash, tuple(seq.token_ids[i * bs:(i + 1) * bs])

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding seq's leading full blocks (looked up, not yet taken)."""
        if not self.enable_prefix_caching:
            return []
        hits, parent = [], None
        for i in range(len(seq.token_ids) // self.block_size):
            block_id = self.cached.get(self._key(seq, i, parent))
            if block_id is None:
                break
            hits.append(block_id)
            parent = self.block_hash[block_id]
        return hits

    def take_prefix(self, seq: Sequence, hits: list[int]) -> int:
        """Put the hit blocks in seq's (empty) block table; returns the tokens now computed."""
        for block_id in hits:
            if self.ref_counts[block_id] == 0:
                del self.free_blocks[block_id]
            self.ref_counts[block_id] += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(self.block_hash[block_id])
        self.num_prefix_queries += seq.num_tokens
        self.num_prefix_hits += len(hits) * self.block_size
        # A full hit still recomputes the last token: its logits are needed.
        return min(len(hits) * self.block_size, seq.num_tokens - 1)

    def cache_full_blocks(self, seq: Sequence):
        """Hash the blocks that the last step filled, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        # A token still in flight (async scheduling) is not known yet: its block waits.
        full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        if full <= len(seq.block_hashes):
            return
        for i in range(len(seq.block_hashes), full):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            key = self._key(seq, i, parent)
            h = hash(key)
            block_id = seq.block_table[i]
            if self.block_key[block_id] is None:
                self.block_key[block_id], self.block_hash[block_id] = key, h
                self.cached.setdefault(key, block_id)
            seq.block_hashes.append(h)

    def forget_cached_blocks(self):
        """Drop every prefix hash (after a failed step: a block it hashed may hold unwritten KV).
        Call with every sequence's blocks freed."""
        self.cached.clear()
        self.block_key = [None] * self.num_blocks
        self.block_hash = [None] * self.num_blocks

    # ---- accounting -----------------------------------------------------------------------------
    def memory_stats(self, seqs: list[Sequence]) -> dict:
        """KV waste (allocated slots holding no token / allocated slots) and blocks saved by sharing."""
        filled, logical = {}, 0
        for seq in seqs:
            for i, block_id in enumerate(seq.block_table):
                n = max(0, min(self.block_size, seq.num_computed_tokens - i * self.block_size))
                filled[block_id] = max(filled.get(block_id, 0), n)
                logical += 1
        allocated = len(filled) * self.block_size
        return {"allocated_slots": allocated, "used_slots": sum(filled.values()),
                "waste": 1 - sum(filled.values()) / allocated if allocated else 0.0,
                "blocks": len(filled), "blocks_saved_by_sharing": logical - len(filled)}
