"""Paged KV block pool with prefix caching.

A full block is identified by a chained hash: xxh64(parent block's hash, its token ids), so equal hashes
mean equal prefixes. Blocks that hold computed tokens are registered under their hash; when their last
user frees them they stay in the cache and go to the back of an LRU free list, so a later request with
the same prefix can take them back until they are recycled for new tokens.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import xxhash

from atom_server.engine.sequence import Sequence


def block_hash(parent: int | None, token_ids: list[int]) -> int:
    h = xxhash.xxh64()
    h.update((parent if parent is not None else 0).to_bytes(8, "little", signed=False))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None  # kept to rule out hash collisions


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks, least recently freed first; cached ones keep their hash until recycled.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found
        self._changed: dict[int, Sequence] = {}  # sequences whose block table was set or grew since take_changed()

    @property
    def num_total_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _full_block_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        hashes = seq.block_hashes
        bs = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else None, seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes[:num_blocks]

    def lookup(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of seq (always leaving one token to compute)."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        bs = self.block_size
        for i, h in enumerate(self._full_block_hashes(seq, (seq.num_tokens - 1) // bs)):
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
                break
            hits.append(block_id)
        return hits

    def can_admit(self, hits: list[int], num_tokens: int) -> bool:
        reclaimed = sum(1 for b in hits if self.blocks[b].ref_count == 0)  # taken out of the free list
        return self.num_free_blocks - reclaimed >= self.blocks_for(num_tokens) - len(hits)

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Give seq its cached prefix blocks; counts the lookup in the hit statistics."""
        for b in hits:
            block = self.blocks[b]
            if block.ref_count == 0:
                del self.free[b]
            block.ref_count += 1
        seq.block_table = list(hits)
        seq.table_gen += 1
        self._changed[seq.seq_id] = seq
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens
        seq.num_registered_blocks = len(hits)
        if self.enable_prefix_caching:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += seq.num_computed_tokens

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's block table to hold num_tokens tokens; False (and no change) if the pool is short."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            seq.block_table.append(self._take_free())
        self._changed[seq.seq_id] = seq
        return True

    def take_changed(self) -> list[Sequence]:
        """The sequences whose block table was set (admission) or grew since the last call."""
        changed = list(self._changed.values())
        self._changed.clear()
        return changed

    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.token_ids = None, None
        block.ref_count = 1
        return block_id

    def register_computed(self, seq: Sequence) -> None:
        """Put seq's newly completed full blocks into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_registered_blocks:
            return
        bs = self.block_size
        hashes = self._full_block_hashes(seq, num_full)
        for i in range(seq.num_registered_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and hashes[i] not in self.cached:
                block.hash, block.token_ids = hashes[i], tuple(seq.token_ids[i * bs:(i + 1) * bs])
                self.cached[hashes[i]] = block.block_id
        seq.num_registered_blocks = num_full

    def free_seq(self, seq: Sequence) -> None:
        # Tail blocks first, so they are recycled before the (more shareable) head of the prefix.
        for b in reversed(seq.block_table):
            block = self.blocks[b]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[b] = None
                if block.hash is None:  # nothing to reuse: recycle it first
                    self.free.move_to_end(b, last=False)
        seq.block_table = []
        seq.table_gen += 1
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
