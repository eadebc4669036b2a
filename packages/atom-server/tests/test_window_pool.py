"""The window pool (sliding-window layers keep only the window): blocks given back as the window slides,
prefix-cache hits that need the window before them, sizing, and the table deltas a runner receives.
No model here: block manager, step-input builder and BlockTables, as the engine drives them."""

from __future__ import annotations

import numpy as np

from atom_server.engine.block_manager import WINDOW_POOL_CACHE_FACTOR, BlockManager, window_pool_blocks
from atom_server.engine.block_tables import BlockTables
from atom_server.engine.model_runner import kv_blocks_needed, split_kv_budget
from atom_server.engine.scheduler import Scheduler
from atom_server.engine.sequence import Sequence
from atom_server.engine.step_input import StepInputBuilder
from atom_server.sampling_params import SamplingParams

BS, WINDOW = 4, 6

_ids = iter(range(10**6))


def _seq(tokens: list[int]) -> Sequence:
    return Sequence(next(_ids), "r", 0, tokens, SamplingParams(temperature=0.0, max_tokens=4), frozenset(), 1000)


def _held(seq: Sequence) -> list[int]:
    return seq.window_table[seq.window_start:]


def _run_prefill(bm: BlockManager, seq: Sequence, chunk: int) -> list[int]:
    """Admit seq and compute its prompt in chunks, as the scheduler does; returns the window blocks held
    after each chunk."""
    hit = bm.lookup(seq)
    bm.admit(seq, hit)
    held = []
    while seq.num_computed_tokens < seq.num_tokens:
        n = min(chunk, seq.num_tokens - seq.num_computed_tokens)
        assert bm.ensure_slots(seq, seq.num_computed_tokens + n)
        # what this step's queries read is held: from the first query's window start to its last token
        first_read = max(0, seq.num_computed_tokens - WINDOW + 1) // BS
        assert seq.window_start <= first_read and len(seq.window_table) * BS >= seq.num_computed_tokens + n
        seq.num_computed_tokens += n
        bm.register_computed(seq)
        held.append(len(_held(seq)))
    return held


def test_the_window_pool_keeps_only_the_window():
    bm = BlockManager(64, BS, window=WINDOW, num_window_blocks=16)
    seq = _seq(list(range(100, 141)))  # 41 tokens, 11 blocks
    held = _run_prefill(bm, seq, chunk=7)
    most = -(-(WINDOW - 1) // BS) + 1  # the last window - 1 tokens span at most this many blocks
    assert max(held) <= most and len(seq.block_table) == 11
    assert len(bm.window_pool.free) == 16 - len(_held(seq)) and bm.num_free_blocks == 64 - 11
    bm.free_seq(seq)
    assert len(bm.window_pool.free) == 16 and bm.num_free_blocks == 64


def test_a_prefix_hit_needs_the_window_before_it():
    bm = BlockManager(64, BS, window=WINDOW, num_window_blocks=12)
    prompt = list(range(200, 229))  # 29 tokens: 7 full blocks
    first = _seq(prompt)
    _run_prefill(bm, first, chunk=29)
    bm.free_seq(first)
    # every full block is cached in the main pool; the window pool kept its blocks cached too (LRU)
    again = _seq(prompt + [1, 2])
    hit = bm.lookup(again)
    assert len(hit) == 7 and hit.window_start == (7 * BS - WINDOW + 1) // BS
    assert len(hit.window_blocks) == 7 - hit.window_start
    # Recycle the window pool's cached blocks (other prompts): the window before block 7 is gone, so the
    # hit shrinks to nothing although the main pool still has all 7 blocks.
    for i in range(3):
        other = _seq([5000 + 40 * i + j for j in range(20)])
        _run_prefill(bm, other, chunk=20)
        bm.free_seq(other)
    assert bm.window_pool.cached_block(again.block_hashes[6], prompt[24:28]) is None
    main_hits = [bm.pool.cached_block(h, prompt[i * BS:(i + 1) * BS]) for i, h in enumerate(again.block_hashes[:7])]
    assert None not in main_hits
    assert len(bm.lookup(again)) == 0


def test_a_prefix_hit_with_the_window_cached_shortens_to_it():
    bm = BlockManager(64, BS, window=WINDOW, num_window_blocks=32)
    prompt = list(range(300, 329))
    first = _seq(prompt)
    _run_prefill(bm, first, chunk=29)
    bm.free_seq(first)
    # drop the window pool's copy of block 6 only: the longest hit with its window is 5 blocks... or fewer
    h6 = first.block_hashes[6]
    bm.window_pool.cached.pop(h6)
    again = _seq(prompt + [9])
    hit = bm.lookup(again)
    k = len(hit)
    assert 0 < k < 7 and hit.window_start == max(0, k * BS - WINDOW + 1) // BS
    held = _run_prefill(bm, again, chunk=8)
    assert again.num_cached_tokens == k * BS and held


def test_window_tables_reach_the_runner_as_deltas():
    """The builder sends the window pool's tables like the main ones (whole when new, tails as they grow);
    the runner's BlockTables gives every token a slot in both pools."""
    bm = BlockManager(64, BS, window=WINDOW, num_window_blocks=16)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8)
    builder = StepInputBuilder(sched)
    tables = BlockTables(width=16, block_size=BS, windowed=True)
    seq = _seq(list(range(400, 430)))
    sched.add(seq)
    updates = 0
    while seq.num_computed_tokens < seq.num_tokens:
        batch = sched.schedule()
        step = builder.build(batch)
        updates += len(step.window_block_updates)
        tables.apply(step)
        row = tables.rows([seq.seq_id])
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + batch.num_new_tokens[0]
        positions = np.arange(start, end)
        want = [seq.window_table[p // BS] * BS + p % BS for p in positions]
        assert tables.slots(np.repeat(row, len(positions)), positions, window=True).tolist() == want
        readable = np.arange(max(0, start - WINDOW + 1) // BS, -(-end // BS))
        assert tables.window[row[0], readable].tolist() == [seq.window_table[i] for i in readable]
        sched.commit(batch)
    assert updates >= 3  # the first table, then tails


def test_sizing_gives_the_window_pool_what_it_can_use():
    w_bytes, m_bytes, bs, max_len, seqs, batched = 1000, 1000, 16, 4096, 8, 512
    running = window_pool_blocks(128, bs, seqs, batched)
    assert running == seqs * (-(-127 // bs) + 2) + batched // bs
    worst = WINDOW_POOL_CACHE_FACTOR * running
    # a large budget: the window pool's worst case, the main pool everything else (capped at what it can use)
    main, window = split_kv_budget(10**9, m_bytes, w_bytes, 128, bs, max_len, seqs, batched)
    assert window == worst and main == kv_blocks_needed(bs, max_len, seqs)
    budget = 400 * (m_bytes + w_bytes)  # full-length caches would give both layers 400 blocks
    main, window = split_kv_budget(budget, m_bytes, w_bytes, 128, bs, max_len, seqs, batched)
    assert window == worst < 400 and main == (budget - worst * w_bytes) // m_bytes > 400
    # a small budget: never fewer main blocks than full-length caches would give
    small = 100 * (m_bytes + w_bytes)
    main, window = split_kv_budget(small, m_bytes, w_bytes, 128, bs, max_len, seqs, batched)
    assert main >= 100 and window >= window_pool_blocks(128, bs, 1, batched)
