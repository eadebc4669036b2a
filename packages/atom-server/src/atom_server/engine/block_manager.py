"""Paged KV block pools with prefix caching.

A full block is identified by a chained hash: xxh64(parent block's hash, its token ids), so equal hashes
mean equal prefixes. Blocks that hold computed tokens are registered under their hash; when their last
user frees them they stay in the cache and go to the back of an LRU free list, so a later request with
the same prefix can take them back until they are recycled for new tokens.

Windowed KV (models with sliding-window layers, e.g. GPT-OSS): the sliding-window layers get a pool of
their own, the *window pool*, and each sequence a second block table over it (`Sequence.window_table`,
indexed by the same logical block numbers as `block_table`). After each step the blocks that slid out of
the window of every later query are returned to the window pool (`window_start` is the first one still
held; the table keeps stale ids before it, which the kernels never read). The window pool is sized from
its worst case (`window_pool_blocks`: every running sequence holding a window, plus one step's tokens)
times WINDOW_POOL_CACHE_FACTOR: the running windows never fill it, and the rest keeps recently freed
window blocks for prefix-cache hits (the same LRU as the main pool). The main pool (`blocks`,
full-attention layers) sets the capacity; if the window pool runs short anyway (a small budget), the
scheduler preempts as for the main pool. A prefix-cache hit of k blocks needs the full-attention blocks
0..k-1 and, in the window pool, the blocks covering the window before position k * block_size; the
longest k with both is taken.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import xxhash

from atom_server.engine.sequence import Sequence


def block_hash(parent: int | None, token_ids: list[int]) -> int:
    h = xxhash.xxh64()
    h.update((parent if parent is not None else 0).to_bytes(8, "little", signed=False))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


# Window pool size / what running sequences can hold at most: the rest caches freed window blocks.
WINDOW_POOL_CACHE_FACTOR = 2


def window_pool_blocks(window: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """Blocks the running sequences can hold in the window pool at most. Between steps a sequence holds
    the blocks of its last `window - 1` tokens (at most ceil((window - 1) / block_size) + 1); a step
    computing q tokens adds at most ceil(q / block_size) + 1, and a step's q sum to at most
    max_num_batched_tokens."""
    held = -(-(window - 1) // block_size) + 1
    return max_num_seqs * (held + 1) + -(-max_num_batched_tokens // block_size)


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None  # kept to rule out hash collisions


class BlockPool:
    """Block ids of one cache group: reference counts, an LRU free list, and the prefix cache (hash -> id)."""

    def __init__(self, num_blocks: int):
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks, least recently freed first; cached ones keep their hash until recycled.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id

    def cached_block(self, h: int, token_ids: list[int]) -> int | None:
        block_id = self.cached.get(h)
        if block_id is None or self.blocks[block_id].token_ids != tuple(token_ids):
            return None
        return block_id

    def num_reclaimed(self, block_ids) -> int:
        """How many of these (cached) blocks taking them would remove from the free list."""
        return sum(1 for b in block_ids if self.blocks[b].ref_count == 0)

    def take_cached(self, block_ids) -> None:
        for b in block_ids:
            block = self.blocks[b]
            if block.ref_count == 0:
                del self.free[b]
            block.ref_count += 1

    def take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.token_ids = None, None
        block.ref_count = 1
        return block_id

    def register(self, block_id: int, h: int, token_ids: list[int]) -> None:
        block = self.blocks[block_id]
        if block.hash is None and h not in self.cached:
            block.hash, block.token_ids = h, tuple(token_ids)
            self.cached[h] = block_id

    def release(self, block_ids) -> None:
        """Drop one reference of each; a block nobody holds goes to the free list (uncached ones first in
        line for recycling). Pass tail blocks first, so they are recycled before the head of a prefix."""
        for b in block_ids:
            block = self.blocks[b]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[b] = None
                if block.hash is None:  # nothing to reuse: recycle it first
                    self.free.move_to_end(b, last=False)


@dataclass
class PrefixHit:
    """Cached blocks a sequence can start from: `blocks` for logical blocks 0..len-1 (main pool) and, with
    a window pool, `window_blocks` for logical blocks window_start..len-1."""

    blocks: list[int] = field(default_factory=list)
    window_start: int = 0
    window_blocks: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.blocks)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 window: int | None = None, num_window_blocks: int = 0):
        """window / num_window_blocks: the sliding window of the layers in the window pool and its size
        (None: no window pool, every layer's cache in the main pool)."""
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.blocks, self.free, self.cached = self.pool.blocks, self.pool.free, self.pool.cached
        self.window = window
        self.window_pool = BlockPool(num_window_blocks) if window is not None else None
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

    def _first_in_window(self, num_tokens: int) -> int:
        """The first logical block a query at position num_tokens (or later) can see."""
        return max(0, num_tokens - self.window + 1) // self.block_size

    def _full_block_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        hashes = seq.block_hashes
        bs = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else None, seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes[:num_blocks]

    def _tokens_of(self, seq: Sequence, i: int) -> list[int]:
        return seq.token_ids[i * self.block_size:(i + 1) * self.block_size]

    def lookup(self, seq: Sequence) -> PrefixHit:
        """Cached blocks holding the longest prefix of seq (always leaving one token to compute)."""
        if not self.enable_prefix_caching:
            return PrefixHit()
        hits: list[int] = []
        hashes = self._full_block_hashes(seq, (seq.num_tokens - 1) // self.block_size)
        for i, h in enumerate(hashes):
            block_id = self.pool.cached_block(h, self._tokens_of(seq, i))
            if block_id is None:
                break
            hits.append(block_id)
        if self.window_pool is None or not hits:
            return PrefixHit(hits)
        # The window pool must hold the window before the hit's end; shorten the hit until it does.
        for k in range(len(hits), 0, -1):
            first = self._first_in_window(k * self.block_size)
            window_hits = []
            for i in range(first, k):
                block_id = self.window_pool.cached_block(hashes[i], self._tokens_of(seq, i))
                if block_id is None:
                    break
                window_hits.append(block_id)
            else:
                return PrefixHit(hits[:k], first, window_hits)
        return PrefixHit()

    def can_admit(self, hit: PrefixHit, num_tokens: int) -> bool:
        if self.pool.num_reclaimed(hit.blocks) + self.blocks_for(num_tokens) - len(hit) > self.num_free_blocks:
            return False
        if self.window_pool is None:
            return True
        wp = self.window_pool
        need = self.blocks_for(num_tokens) - hit.window_start - len(hit.window_blocks)
        return wp.num_reclaimed(hit.window_blocks) + need <= len(wp.free)

    def admit(self, seq: Sequence, hit: PrefixHit) -> None:
        """Give seq its cached prefix blocks; counts the lookup in the hit statistics."""
        self.pool.take_cached(hit.blocks)
        seq.block_table = list(hit.blocks)
        if self.window_pool is not None:
            self.window_pool.take_cached(hit.window_blocks)
            seq.window_table = [0] * hit.window_start + list(hit.window_blocks)  # stale entries: never read
            seq.window_start = hit.window_start
        seq.table_gen += 1
        self._changed[seq.seq_id] = seq
        seq.num_computed_tokens = len(hit) * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens
        seq.num_registered_blocks = len(hit)
        if self.enable_prefix_caching:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += seq.num_computed_tokens

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's block tables to hold num_tokens tokens; False (and no change) if a pool is short."""
        target = self.blocks_for(num_tokens)
        need = target - len(seq.block_table)
        window_need = target - len(seq.window_table) if self.window_pool is not None else 0
        if need > self.num_free_blocks or (window_need > 0 and window_need > len(self.window_pool.free)):
            return False
        for _ in range(need):
            seq.block_table.append(self.pool.take_free())
        for _ in range(window_need):
            seq.window_table.append(self.window_pool.take_free())
        if need > 0 or window_need > 0:
            self._changed[seq.seq_id] = seq
        return True

    def take_changed(self) -> list[Sequence]:
        """The sequences whose block table was set (admission) or grew since the last call."""
        changed = list(self._changed.values())
        self._changed.clear()
        return changed

    def register_computed(self, seq: Sequence) -> None:
        """Put seq's newly completed full blocks into the prefix cache, then give the window pool back the
        blocks that no later query of seq can see."""
        num_full = seq.num_computed_tokens // self.block_size
        if self.enable_prefix_caching and num_full > seq.num_registered_blocks:
            hashes = self._full_block_hashes(seq, num_full)
            for i in range(seq.num_registered_blocks, num_full):
                tokens = self._tokens_of(seq, i)
                self.pool.register(seq.block_table[i], hashes[i], tokens)
                if self.window_pool is not None and i >= seq.window_start:
                    self.window_pool.register(seq.window_table[i], hashes[i], tokens)
            seq.num_registered_blocks = num_full
        if self.window_pool is not None:
            first = min(self._first_in_window(seq.num_computed_tokens), len(seq.window_table))
            if first > seq.window_start:
                self.window_pool.release(reversed(seq.window_table[seq.window_start:first]))
                seq.window_start = first

    def free_seq(self, seq: Sequence) -> None:
        # Tail blocks first, so they are recycled before the (more shareable) head of the prefix.
        self.pool.release(reversed(seq.block_table))
        if self.window_pool is not None:
            self.window_pool.release(reversed(seq.window_table[seq.window_start:]))
        seq.block_table = []
        seq.window_table = []
        seq.window_start = 0
        seq.table_gen += 1
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
