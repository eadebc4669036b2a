"""Runs the model for one step: a StepInput (step_input.py) in, one row result per sequence out.

The runner never sees Sequence objects: it keeps its own copy of the block tables (block_tables.py) and
of the seeded generators, both updated from the StepInputs, so a runner on another rank can run the same
steps from the same inputs. Inputs become `AttentionInputs` and then the attention implementation's
metadata through the builder that implementation names (eager steps), or the decode graphs' static
buffers (cuda_graphs.py). The KV cache is sized and allocated from the layers' KV cache specs.

The CPU path is plain PyTorch; a GPU adds faster kernels (chosen by atom's op registry), memory sizing
from free device memory, and CUDA graphs for decode batches (forward, LM head and greedy argmax in one
replay), which can also be launched ahead of reading their tokens (launch_decode / collect: the engine's
async scheduling). ATOM_DECODE_GRAPHS=static runs decode batches through the graphs' buffers without
capturing them, on any device (tests of the graph input plumbing on CPU).

Under tensor parallelism (executor.py, worker.py) every rank runs a runner on its shard of the model, from
the same StepInputs, taking the same path through each step (the collectives inside the model must line
up): forward, LM head (vocab-parallel, all-gathered) and, in the graphs, the greedy argmax on every rank
(a launched step's tokens feed the next one on each rank's device). Only rank 0 samples and returns rows;
the KV cache of every rank holds the smallest block count any rank can afford.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from atom.distributed import get_tp_group
from atom.forward_context import set_forward_context
from atom.layers.attention import AttentionInputs, attention_specs, metadata_builder
from atom.layers.kv_cache import allocate_kv_caches, bind_kv_caches, bytes_per_block, kv_cache_specs
from atom.layers.mla import mla_attention_specs
from atom.loader import load_model
from atom.ops.registry import cuda_graph_blockers, resolve
from atom_server import startup
from atom_server.engine.block_tables import BlockTables, positions_of
from atom_server.engine.cuda_graphs import DecodeGraphs
from atom_server.engine.scheduler import ScheduledBatch
from atom_server.engine.sequence import Sequence
from atom_server.engine.step_input import Penalties, SamplingInputs, StepInput, is_greedy_decode

logger = logging.getLogger(__name__)

GiB = 1 << 30
CPU_SPLIT_SCORES_BYTES = 256 << 20
CPU_KV_HOST_FRACTION = 0.1  # the CPU default KV cache takes at most this share of the host's memory


@dataclass
class TokenLogprobsRaw:
    """Logprobs of one position: the chosen token first, then the top-N (ids, values), its rank."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class RowResult:
    """What one row (sequence) of a step produced."""

    token_id: int | None = None  # None: a prefill chunk that does not reach the end of the prompt
    logprobs: TokenLogprobsRaw | None = None
    prompt_logprobs: list[TokenLogprobsRaw] | None = None


@dataclass
class DecodeLaunch:
    """A decode step launched and not read yet (engine side)."""

    seqs: list[Sequence]
    rows: dict[int, int]  # seq id -> row of the replay (where the next step finds its token)
    ticket: int


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_blocks_needed(block_size: int, max_model_len: int, max_num_seqs: int) -> int:
    """Blocks that max_num_seqs sequences of max_model_len tokens could ever use."""
    return max_num_seqs * -(-max_model_len // block_size)


def kv_blocks_for_budget(block_bytes: int, budget: int, block_size: int, max_model_len: int,
                         max_num_seqs: int) -> int:
    """Blocks a KV budget buys (block_bytes: one block of every layer), capped at what can be used."""
    return min(budget // block_bytes, kv_blocks_needed(block_size, max_model_len, max_num_seqs))


def cpu_kv_budget(block_bytes: int, block_size: int, max_model_len: int, max_num_seqs: int,
                  host_bytes: int) -> int:
    """Default KV budget on CPU: what max_num_seqs full-length sequences need, capped at
    CPU_KV_HOST_FRACTION of the host's memory but never below one full-length sequence."""
    one_seq = block_bytes * kv_blocks_needed(block_size, max_model_len, 1)
    need = block_bytes * kv_blocks_needed(block_size, max_model_len, max_num_seqs)
    return min(need, max(int(CPU_KV_HOST_FRACTION * host_bytes), one_seq))


class ModelRunner:
    def __init__(self, model_path: str, *, dtype: str, device: torch.device, block_size: int,
                 max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int,
                 kv_cache_memory_bytes: int | None, gpu_memory_utilization: float, load_format: str,
                 config=None, trust_remote_code: bool = False, seed: int = 0, enforce_eager: bool = False):
        torch.manual_seed(seed)
        self.device = device
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        laps: dict[str, float] = {}
        self.model, self.config = load_model(model_path, dtype=dtype, device=device, load_format=load_format,
                                             max_positions=max_model_len, config=config,
                                             trust_remote_code=trust_remote_code, timings=laps)
        startup.phase_done("weights", f"{load_format}: " + ", ".join(f"{k} {v:.1f} s" for k, v in laps.items()))
        self.dtype = next(self.model.parameters()).dtype
        self.vocab_size = int(self.config.vocab_size)
        tp = get_tp_group()
        self.tp_size = tp.world_size
        self.samples = tp.rank == 0  # only rank 0 turns logits into tokens
        # every attention layer's spec, multi-head and latent (MLA) alike: the CPU path sizes its scores by heads
        self.specs = attention_specs(self.model) + mla_attention_specs(self.model)
        self.kv_specs = kv_cache_specs(self.model)
        self.attn_builder = metadata_builder(self.model)
        self._sample = resolve("sample")
        self.block_bytes = bytes_per_block(self.kv_specs, block_size)
        budget = self._kv_budget(kv_cache_memory_bytes, gpu_memory_utilization)
        self.num_blocks = kv_blocks_for_budget(self.block_bytes, budget, block_size, max_model_len, max_num_seqs)
        if self.tp_size > 1:  # one block table for every rank: the rank with the least memory decides
            own, self.num_blocks = self.num_blocks, tp.all_reduce_min(self.num_blocks)
            if own != self.num_blocks:
                logger.info("KV cache: %d blocks here, %d on the smallest rank", own, self.num_blocks)
        if self.num_blocks * block_size < max_model_len:
            raise ValueError(
                f"kv_cache_memory_bytes: the KV cache holds {self.num_blocks * block_size} tokens "
                f"({self.num_blocks} blocks of {block_size}), fewer than max_model_len={max_model_len}; "
                "give the KV cache more memory or lower max_model_len")
        self.kv_caches = allocate_kv_caches(self.kv_specs, self.num_blocks, block_size, device)
        bind_kv_caches(self.model, self.kv_caches)
        logger.info("KV cache: %d blocks x %d tokens (%.2f GiB)", self.num_blocks, block_size,
                    self.num_blocks * self.block_bytes / GiB)
        startup.phase_done("KV cache")
        width = -(-max_model_len // block_size)
        self.tables = BlockTables(width, block_size, capacity=max(16, max_num_seqs))
        self._generators: dict[int, torch.Generator] = {}  # seq id -> its seeded generator
        self.graphs = None
        mode = os.environ.get("ATOM_DECODE_GRAPHS", "auto")
        if mode not in ("auto", "off", "static"):
            raise ValueError(f"ATOM_DECODE_GRAPHS must be auto, off or static, got {mode!r}")
        if mode == "static":  # the graphs' input plumbing without capture (any device; tests)
            self.graphs = DecodeGraphs(self.model, self.attn_builder, device, max_num_seqs, max_model_len,
                                       block_size, capture=False)
        elif device.type == "cuda" and not enforce_eager and mode != "off":
            if blockers := cuda_graph_blockers(self.model):
                logger.info("CUDA graphs off: %s cannot be captured", ", ".join(blockers))
            else:
                try:
                    self.graphs = DecodeGraphs(self.model, self.attn_builder, device, max_num_seqs, max_model_len,
                                               block_size)
                except RuntimeError as e:  # an op that cannot be captured: stay eager rather than fail
                    if self.tp_size > 1:  # every rank must take the same path through a step
                        raise RuntimeError(f"CUDA graph capture failed on a tensor-parallel rank ({e}); "
                                           "run with --enforce-eager") from e
                    logger.warning("CUDA graph capture failed, running eager: %s", e)
                    torch.cuda.synchronize()
        startup.phase_done("CUDA graphs", "captured" if self.graphs is not None else "none")

    # ---- memory sizing -------------------------------------------------------------------------
    def _kv_budget(self, kv_cache_memory_bytes: int | None, gpu_memory_utilization: float) -> int:
        if kv_cache_memory_bytes is not None:
            return kv_cache_memory_bytes
        if self.device.type == "cpu":
            host = _host_memory_bytes()
            budget = cpu_kv_budget(self.block_bytes, self.block_size, self.max_model_len, self.max_num_seqs, host)
            logger.info("KV cache on CPU: %.2f GiB, the smaller of max_num_seqs (%d) x max_model_len (%d) tokens "
                        "at %d bytes per token (%s) and %d%% of the host's %.1f GiB (at least one full-length "
                        "sequence); --kv-cache-memory-bytes sets it", budget / GiB, self.max_num_seqs,
                        self.max_model_len, bytes_per_block(self.kv_specs, 1),
                        ", ".join(sorted({str(s.dtype).removeprefix("torch.") for s in self.kv_specs})),
                        round(100 * CPU_KV_HOST_FRACTION), host / GiB)
            return budget
        return self._profile_gpu_budget(gpu_memory_utilization)

    @torch.inference_mode()
    def _profile_gpu_budget(self, utilization: float) -> int:  # pragma: no cover - needs a GPU
        """Run the largest batch once on a throwaway cache; what is left of utilization * total is KV."""
        tokens = min(self.max_num_batched_tokens, self.max_model_len)
        num_blocks = -(-tokens // self.block_size)
        scratch = allocate_kv_caches(self.kv_specs, num_blocks, self.block_size, self.device)
        bind_kv_caches(self.model, scratch)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        inputs = AttentionInputs(
            slot_mapping=torch.arange(tokens, device=self.device),
            block_tables=torch.arange(num_blocks, dtype=torch.int32, device=self.device)[None],
            query_start_loc=torch.tensor([0, tokens], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([tokens], dtype=torch.int32, device=self.device),
            max_query_len=tokens, max_seq_len=tokens)
        ids = torch.randint(0, self.vocab_size, (tokens,), device=self.device)
        with set_forward_context(self.attn_builder.build(inputs)):
            hidden = self.model(ids, torch.arange(tokens, device=self.device))
        self.model.compute_logits(hidden[-min(tokens, 256):]).float()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del scratch, hidden
        bind_kv_caches(self.model, None)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        other = total - free - torch.cuda.memory_reserved()  # other processes, NCCL, CUDA context
        budget = int(total * utilization) - peak - max(other, 0)
        if budget <= 0:
            raise ValueError(f"gpu_memory_utilization={utilization}: no memory left for the KV cache "
                             f"(peak activations {peak / GiB:.2f} GiB of {total / GiB:.2f} GiB)")
        return budget

    # ---- one step ------------------------------------------------------------------------------
    def _begin(self, step: StepInput) -> np.ndarray:
        """Apply the step's table deltas and forget finished sequences; returns each row's table row."""
        self.tables.apply(step)
        for sid in step.finished_seq_ids:
            self._generators.pop(sid, None)
        return self.tables.rows(step.seq_ids)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> list[RowResult]:
        if step.prev_rows is not None:
            raise ValueError("a step whose tokens come from an unread replay must be launched (launch_decode)")
        rows = self._begin(step)
        if not step.seq_ids:  # nothing to run: the step only releases finished sequences (flush)
            return []
        if self.graphs is not None and step.is_decode and self.graphs.can_run(step.num_rows):
            return self._execute_decode_graph(step, rows)
        return self._execute_eager(step, rows)

    def _execute_decode_graph(self, step: StepInput, rows: np.ndarray) -> list[RowResult]:
        g = self.graphs
        n = step.num_rows
        logits, greedy = g.replay(g.prepare(step, self.tables, rows), n)
        if not self.samples:
            return []
        if step.sampling is None:
            ticket = g.fetch_tokens(greedy, n)
            return [RowResult(t) for t in g.tokens_list(ticket, n)]
        tokens, lps = self._sample_rows(logits[:n].float(), step.sampling, step.seq_ids)
        return [RowResult(t, lp) for t, lp in zip(tokens, lps)]

    # ---- async decode: launch now, read the tokens one step later ---------------------------------
    def can_launch_async(self, batch: ScheduledBatch) -> bool:
        """(Engine side) a decode batch whose next tokens the graph alone picks (greedy argmax)."""
        return self.graphs is not None and self.graphs.can_run(len(batch.seqs)) and is_greedy_decode(batch)

    def launch_decode(self, step: StepInput) -> int:
        """Start a greedy decode step (rows with prev_rows >= 0 take their token from the previous replay);
        returns a ticket for collect()."""
        if self.graphs is None or not step.is_decode or step.sampling is not None:
            raise ValueError("only greedy decode steps on the decode graphs can be launched ahead of reading "
                             "their tokens")
        with torch.inference_mode():
            rows = self._begin(step)
            g = self.graphs
            n = step.num_rows
            _, greedy = g.replay(g.prepare(step, self.tables, rows), n)
            return g.fetch_tokens(greedy, n) if self.samples else -1

    def collect(self, ticket: int, num_rows: int) -> list[int]:
        """Wait for a launched step and return its tokens (one per row)."""
        return self.graphs.tokens_list(ticket, num_rows)

    def rank_state(self) -> tuple[dict[int, list[int]], list[int]]:
        """(each live sequence's block table, the sequences with a seeded generator): what this runner keeps
        between steps, for checking that every rank holds the same (and nothing once all is released)."""
        tables = {sid: self.tables.table[row, :self.tables.num_blocks[row]].tolist()
                  for sid, row in self.tables.row_of.items()}
        return tables, sorted(self._generators)

    def _execute_eager(self, step: StepInput, rows: np.ndarray) -> list[RowResult]:
        qsl, seq_lens, positions = positions_of(step)
        token_rows = rows if step.num_tokens == step.num_rows else np.repeat(rows, np.diff(qsl))
        slots = self.tables.slots(token_rows, positions)
        hidden = self._forward_batch(np.asarray(step.token_ids, dtype=np.int64), positions, slots, qsl, seq_lens,
                                     rows)
        results = [RowResult() for _ in range(step.num_rows)]
        sample_rows = step.sampled_rows()
        last = qsl[1:] - 1  # each row's last new token
        flat = (last if step.sample_rows is None else last[sample_rows]).tolist()
        for req in step.prompt_logprobs:
            flat.extend(range(req.first, req.first + len(req.targets)))
        if not flat:
            return results
        logits = self.model.compute_logits(hidden[torch.tensor(flat, device=self.device)]).float()
        if not self.samples:  # the LM head's gather is a collective: every rank runs it, rank 0 samples
            return results
        if sample_rows:
            sampled_ids = [step.seq_ids[i] for i in sample_rows]
            tokens, lps = self._sample_rows(logits[:len(sample_rows)], step.sampling, sampled_ids)
            for j, i in enumerate(sample_rows):
                results[i].token_id = tokens[j]
                results[i].logprobs = lps[j]
        if step.prompt_logprobs:
            self._prompt_logprobs(logits[len(sample_rows):], step, results)
        return results

    def _forward_batch(self, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, qsl: np.ndarray,
                       seq_lens: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        q_lens = np.diff(qsl)
        # The torch reference attention pads every query to the longest one: a long prefill chunk next to
        # many decodes would cost batch x chunk x context scores. Run decodes and prefills apart then.
        if self.device.type == "cpu" and len(q_lens) > 1 and q_lens.min() == 1 and q_lens.max() > 1:
            padded = len(q_lens) * int(q_lens.max()) * int(seq_lens.max()) * max(s.num_heads for s in self.specs) * 4
            if padded > CPU_SPLIT_SCORES_BYTES:
                hidden = torch.empty(len(ids), self.model.config.hidden_size, dtype=self.dtype, device=self.device)
                token_row = np.repeat(np.arange(len(q_lens)), q_lens)
                for decode in (True, False):
                    group = np.flatnonzero((q_lens == 1) == decode)
                    tok = np.flatnonzero((q_lens[token_row] == 1) == decode)
                    sub_qsl = np.concatenate([[0], np.cumsum(q_lens[group])])
                    hidden[torch.from_numpy(tok)] = self._forward(ids[tok], positions[tok], slots[tok], sub_qsl,
                                                                  seq_lens[group], rows[group])
                return hidden
        return self._forward(ids, positions, slots, qsl, seq_lens, rows)

    def _forward(self, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, qsl: np.ndarray,
                 seq_lens: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        dev = self.device
        width = int(self.tables.num_blocks[rows].max())
        inputs = AttentionInputs(
            slot_mapping=torch.from_numpy(slots).to(dev),
            block_tables=torch.from_numpy(self.tables.table[rows, :width]).to(dev),
            query_start_loc=torch.from_numpy(qsl.astype(np.int32)).to(dev),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(dev),
            max_query_len=int(np.diff(qsl).max()),
            max_seq_len=int(seq_lens.max()),
        )
        with set_forward_context(self.attn_builder.build(inputs)):
            return self.model(torch.from_numpy(ids).to(dev), torch.from_numpy(positions).to(dev))

    # ---- sampling ------------------------------------------------------------------------------
    def _sample_rows(self, logits: torch.Tensor, sampling: SamplingInputs | None,
                     seq_ids: list[int]) -> tuple[list[int], list[TokenLogprobsRaw | None]]:
        """Sample one token per row of logits (rows: the sequences seq_ids, inputs: sampling)."""
        n = logits.shape[0]
        if sampling is None:  # greedy argmax for every row
            return logits.argmax(dim=-1).tolist(), [None] * n
        dev = logits.device
        want_lp = sampling.logprobs
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_lp is not None else None
        if sampling.penalties is not None:
            logits = apply_penalties(logits, sampling.penalties)
        if sampling.banned_token_ids is not None:
            for j, banned in enumerate(sampling.banned_token_ids):
                banned = [t for t in banned if t < logits.shape[-1]]
                if banned:
                    logits[j, banned] = float("-inf")
        temperature = torch.tensor(sampling.temperature, dtype=torch.float32, device=dev)
        top_k = torch.tensor(sampling.top_k, dtype=torch.int64, device=dev) if sampling.top_k is not None else None
        top_p = torch.tensor(sampling.top_p, dtype=torch.float32, device=dev) if sampling.top_p is not None else None
        min_p = torch.tensor(sampling.min_p, dtype=torch.float32, device=dev) if sampling.min_p is not None else None
        generators = None
        if sampling.seeds is not None:
            generators = [self._generator(sid, seed) for sid, seed in zip(seq_ids, sampling.seeds)]
        tokens = self._sample(logits, temperature, top_k, top_p, min_p, generators).tolist()
        lps: list[TokenLogprobsRaw | None] = [None] * n
        if want_lp is not None:
            for j, num in enumerate(want_lp):
                if num is not None:
                    lps[j] = gather_logprobs(raw_logprobs[j], tokens[j], num)
        return tokens, lps

    def _generator(self, seq_id: int, seed: int | None) -> torch.Generator | None:
        """The sequence's own generator, seeded on first use and advanced by every draw after."""
        if seed is None:
            return None
        gen = self._generators.get(seq_id)
        if gen is None:
            gen = self._generators[seq_id] = torch.Generator(device=self.device).manual_seed(seed)
        return gen

    def _prompt_logprobs(self, logits: torch.Tensor, step: StepInput, results: list[RowResult]) -> None:
        logprobs = torch.log_softmax(logits, dim=-1)
        k = 0
        for req in step.prompt_logprobs:
            entries = results[req.row].prompt_logprobs = []
            for target in req.targets:
                entries.append(gather_logprobs(logprobs[k], target, req.num))
                k += 1


def gather_logprobs(logprobs: torch.Tensor, token_id: int, num: int) -> TokenLogprobsRaw:
    """One row of log-probabilities -> the token's logprob and rank plus the top `num` (-1: all)."""
    num = logprobs.shape[-1] if num == -1 else num
    value = logprobs[token_id]
    rank = int((logprobs >= value).sum())
    top_ids: list[int] = []
    top_vals: list[float] = []
    if num > 0:
        vals, idx = torch.topk(logprobs, num)
        top_ids, top_vals = idx.tolist(), vals.tolist()
    return TokenLogprobsRaw(token_id, float(value), rank, top_ids, top_vals)


def apply_penalties(logits: torch.Tensor, penalties: list[Penalties | None]) -> torch.Tensor:
    """vLLM/OpenAI semantics: repetition over prompt and output tokens; presence/frequency over output.
    penalties: one entry per row (None: no penalty on that row)."""
    batch, width = logits.shape
    dev = logits.device
    counts = torch.zeros(batch, width, dtype=torch.float32, device=dev)
    seen = torch.zeros(batch, width, dtype=torch.bool, device=dev)
    rep, freq, pres = [1.0] * batch, [0.0] * batch, [0.0] * batch
    for j, p in enumerate(penalties):
        if p is None:
            continue
        rep[j], freq[j], pres[j] = p.repetition, p.frequency, p.presence
        out = [t for t in p.output_token_ids if t < width]
        if out:
            counts[j].index_add_(0, torch.tensor(out, device=dev), torch.ones(len(out), device=dev))
        prompt = [t for t in p.prompt_token_ids if t < width]
        if prompt:
            seen[j, prompt] = True
    out_mask = counts > 0
    rep_t = torch.tensor(rep, dtype=torch.float32, device=dev)[:, None]
    penalized = torch.where(logits > 0, logits / rep_t, logits * rep_t)
    logits = torch.where(seen | out_mask, penalized, logits)
    freq_t = torch.tensor(freq, dtype=torch.float32, device=dev)[:, None]
    pres_t = torch.tensor(pres, dtype=torch.float32, device=dev)[:, None]
    return logits - freq_t * counts - pres_t * out_mask.float()
