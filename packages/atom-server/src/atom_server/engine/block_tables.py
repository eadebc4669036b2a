"""Runner side: the block table of every live sequence, rebuilt from the StepInputs' deltas.

One numpy row per sequence (width max_model_len / block_size), so a step's tables, positions and cache
slots are gathered with array indexing rather than built per token in Python. A row's `state` is a
number never reused: it changes whenever the row's table changes (replaced or grown), so a copy made
elsewhere (the decode graphs' device rows) knows whether it is stale by comparing one number.
With a window pool (block_manager.py) a second array, `window`, holds the sliding-window layers' tables
in the same rows (one row per sequence for both; `state` covers both).
"""

from __future__ import annotations

import numpy as np

from atom_server.engine.step_input import StepInput


class BlockTables:
    def __init__(self, width: int, block_size: int, capacity: int = 64, windowed: bool = False):
        self.width = width
        self.block_size = block_size
        self.windowed = windowed
        self.table = np.zeros((capacity, width), dtype=np.int32)
        self.num_blocks = np.zeros(capacity, dtype=np.int64)
        self.window = np.zeros((capacity, width), dtype=np.int32) if windowed else None
        self.window_num_blocks = np.zeros(capacity, dtype=np.int64) if windowed else None
        self.state = np.zeros(capacity, dtype=np.int64)
        self.row_of: dict[int, int] = {}  # seq id -> row
        self._free_rows = list(range(capacity - 1, -1, -1))
        self._next_state = 1

    def __len__(self) -> int:
        return len(self.row_of)

    def apply(self, step: StepInput) -> None:
        """Drop the finished sequences' tables, then apply the step's updates."""
        for sid in step.finished_seq_ids:
            row = self.row_of.pop(sid, None)
            if row is not None:
                self.table[row, :self.num_blocks[row]] = 0
                self.num_blocks[row] = 0
                if self.windowed:
                    self.window[row, :self.window_num_blocks[row]] = 0
                    self.window_num_blocks[row] = 0
                self._free_rows.append(row)
        self._update(step.block_updates, window=False)
        if step.window_block_updates:
            if not self.windowed:
                raise ValueError("window-pool block table updates for a runner without a window pool")
            self._update(step.window_block_updates, window=True)

    def _update(self, updates, window: bool) -> None:
        for u in updates:
            row = self.row_of.get(u.seq_id)
            if row is None:
                row = self.row_of[u.seq_id] = self._take_row()
            # after _take_row, which may have grown the arrays
            table, num_blocks = (self.window, self.window_num_blocks) if window else (self.table, self.num_blocks)
            have = int(num_blocks[row])
            end = u.start + len(u.block_ids)
            if end > self.width:
                raise ValueError(f"sequence {u.seq_id}: a block table of {end} blocks exceeds the "
                                 f"{self.width} that max_model_len allows")
            if u.start > have:
                raise ValueError(f"sequence {u.seq_id}: update from block {u.start} but the table holds {have}")
            table[row, u.start:end] = u.block_ids
            if end < have:
                table[row, end:have] = 0
            self.state[row] = self._next_state  # copies elsewhere are stale
            self._next_state += 1
            num_blocks[row] = end

    def rows(self, seq_ids: list[int]) -> np.ndarray:
        return np.array(list(map(self.row_of.__getitem__, seq_ids)), dtype=np.int64)

    def slots(self, rows: np.ndarray, positions: np.ndarray, window: bool = False) -> np.ndarray:
        """Cache slot of each position (rows[i] is the table row of positions[i]); window: in the window pool."""
        size = self.block_size
        table = self.window if window else self.table
        return table[rows, positions // size].astype(np.int64) * size + positions % size

    def _take_row(self) -> int:
        if not self._free_rows:
            old = len(self.table)
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self.num_blocks = np.concatenate([self.num_blocks, np.zeros_like(self.num_blocks)])
            if self.windowed:
                self.window = np.concatenate([self.window, np.zeros_like(self.window)])
                self.window_num_blocks = np.concatenate([self.window_num_blocks,
                                                         np.zeros_like(self.window_num_blocks)])
            self.state = np.concatenate([self.state, np.zeros_like(self.state)])
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        return self._free_rows.pop()


def positions_of(step: StepInput) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query_start_loc, seq_lens, position of every new token) of a step, as numpy arrays."""
    qsl = np.asarray(step.query_start_loc, dtype=np.int64)
    seq_lens = np.asarray(step.seq_lens, dtype=np.int64)
    if step.num_tokens == step.num_rows:
        return qsl, seq_lens, seq_lens - 1
    q_lens = np.diff(qsl)
    token_row = np.repeat(np.arange(len(seq_lens)), q_lens)
    positions = np.arange(step.num_tokens) - qsl[token_row] + (seq_lens - q_lens)[token_row]
    return qsl, seq_lens, positions
