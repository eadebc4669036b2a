"""Runs the model for one step: a StepInput (step_input.py) in, one row result per sequence out.

The runner never sees Sequence objects: it keeps its own copy of the block tables (block_tables.py) and
of the seeded generators, both updated from the StepInputs, so a runner on another rank can run the same
steps from the same inputs. Inputs become `AttentionInputs` and then the attention implementation's
metadata through the builder that implementation names (eager steps), or the decode graphs' static
buffers (cuda_graphs.py). The KV cache is sized and allocated from the layers' KV cache specs; with
sliding-window layers (and windowed_kv) those layers get a pool of their own that keeps only the window
of each running sequence (block_manager.py's window pool; split_kv_budget sizes both pools).

The CPU path is PyTorch, its forward compiled (cpu_compile.py) unless enforce_eager; a GPU adds faster
kernels (chosen by atom's op registry), memory sizing
from free device memory, and CUDA graphs for decode batches (forward, LM head and greedy argmax in one
replay), which can also be launched ahead of reading their tokens (launch_decode / collect: the engine's
async scheduling). With speculative decoding, verify batches (K + 1 tokens a row) replay graphs too, and so
does the MTP drafter (mtp_graphs.py); `_graph_q` picks the path of each step. ATOM_DECODE_GRAPHS=static runs
those batches through the graphs' buffers without capturing them, on any device (tests of the graph input
plumbing on CPU).

Under tensor parallelism (executor.py, worker.py) every rank runs a runner on its shard of the model, from
the same StepInputs, taking the same path through each step (the collectives inside the model must line
up): forward, LM head (vocab-parallel, all-gathered) and, in the graphs, the greedy argmax on every rank
(a launched step's tokens feed the next one on each rank's device). Only rank 0 samples and returns rows;
the KV cache of every rank holds the smallest block count any rank can afford.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from atom.distributed import get_tp_group
from atom.forward_context import set_forward_context
from atom.layers.attention import AttentionInputs, PagedAttention, attention_specs, metadata_builder
from atom.layers.kv_cache import allocate_kv_caches, bind_kv_caches, bytes_per_block, kv_cache_specs
from atom.layers.mla import mla_attention_specs
from atom.loader import load_model
from atom.ops.registry import cuda_graph_blockers, impl_of, resolve
from atom.ops.sampling import apply_token_bitmask
from atom_server import startup
from atom_server.engine.block_manager import WINDOW_POOL_CACHE_FACTOR, window_pool_blocks
from atom_server.engine import cpu_compile
from atom_server.engine.block_tables import BlockTables, positions_of
from atom_server.engine.cpu_compile import CompiledForward
from atom_server.engine.cuda_graphs import DecodeGraphs, verify_capture_sizes
from atom_server.engine.mtp_drafter import MTPDrafter
from atom_server.engine.mtp_graphs import MTPGraphs
from atom_server.engine.prefill_graphs import PrefillGraphs, max_graph_tokens
from atom_server.engine.scheduler import ScheduledBatch
from atom_server.engine.sequence import Sequence
from atom_server.engine.rejection_sampler import (accept_greedy, draw, synthetic_accepted, target_probs,
                                                  verify_greedy, verify_sampled)
from atom_server.engine.speculative import SpeculativeConfig
from atom_server.engine.step_input import Penalties, SamplingInputs, StepInput, is_greedy_decode, subset_sampling

logger = logging.getLogger(__name__)

ForwardFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

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
    # speculative decoding: the drafts verification accepted (the row takes them, then token_id) and their
    # logprobs; the MTP drafter's drafts for the row's next step
    spec_token_ids: list[int] | None = None
    spec_logprobs: list[TokenLogprobsRaw] | None = None
    draft_token_ids: list[int] | None = None


@dataclass
class DecodeLaunch:
    """A decode step launched and not read yet (engine side)."""

    seqs: list[Sequence]
    rows: dict[int, int]  # seq id -> row of the replay (where the next step finds its token)
    ticket: int


# The prefill graphs' startup self-check: largest |graph - eager| / largest |eager| allowed per model dtype (the
# graph's GEMMs run more rows than the eager forward's, so 16-bit sums may round apart; a broken graph is off by O(1)).
PREFILL_CHECK_TOL = {torch.float32: 1e-3}


def _graph_mode() -> str:
    """ATOM_DECODE_GRAPHS: auto (capture on CUDA), off, or static (the graphs' buffers without capture; tests)."""
    mode = os.environ.get("ATOM_DECODE_GRAPHS", "auto")
    if mode not in ("auto", "off", "static"):
        raise ValueError(f"ATOM_DECODE_GRAPHS must be auto, off or static, got {mode!r}")
    return mode


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_blocks_needed(block_size: int, max_model_len: int, max_num_seqs: int) -> int:
    """Blocks that max_num_seqs sequences of max_model_len tokens could ever use."""
    return max_num_seqs * -(-max_model_len // block_size)


def kv_blocks_for_budget(block_bytes: int, budget: int, block_size: int, max_model_len: int,
                         max_num_seqs: int) -> int:
    """Blocks a KV budget buys (block_bytes: one block of every layer), capped at what can be used."""
    return min(budget // block_bytes, kv_blocks_needed(block_size, max_model_len, max_num_seqs))


def split_kv_budget(budget: int, block_bytes: int, window_block_bytes: int, window: int, block_size: int,
                    max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int) -> tuple[int, int]:
    """(main pool blocks, window pool blocks) for a KV budget. The window pool gets what the running
    windows can ever hold (window_pool_blocks) times WINDOW_POOL_CACHE_FACTOR (the rest caches freed
    window blocks for prefix hits), but no more than the sliding-window layers would get as full-length
    caches of the same budget, and never less than one sequence's worst step (so a sequence running alone
    always fits); the main pool gets the rest. When the window pool is short, the scheduler preempts as
    for the main pool. block_bytes 0 (every layer windowed): the main pool only counts blocks."""
    worst = WINDOW_POOL_CACHE_FACTOR * window_pool_blocks(window, block_size, max_num_seqs, max_num_batched_tokens)
    lone = window_pool_blocks(window, block_size, 1, min(max_num_batched_tokens, max_model_len))
    full_length = budget // (block_bytes + window_block_bytes)
    window_blocks = min(worst, max(full_length, lone))
    rest = budget - window_blocks * window_block_bytes
    cap = kv_blocks_needed(block_size, max_model_len, max_num_seqs)
    main_blocks = min(rest // block_bytes, cap) if block_bytes else cap
    return max(main_blocks, 0), window_blocks


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
                 config=None, trust_remote_code: bool = False, seed: int = 0, enforce_eager: bool = False,
                 windowed_kv: bool = True, speculative: SpeculativeConfig | dict | None = None,
                 quantization: str | None = None, kv_cache_dtype: str = "auto"):
        """windowed_kv: give sliding-window layers a window pool (False: full-length caches for every layer,
        vLLM's --disable-hybrid-kv-cache-manager). speculative: speculative decoding (engine/speculative.py).
        quantization / kv_cache_dtype: as load_model takes them (an FP8 KV cache is in the layers' KV cache
        specs, so both pools get it)."""
        torch.manual_seed(seed)
        if isinstance(speculative, dict):  # a tensor-parallel worker's copy (runner kwargs travel as JSON)
            speculative = SpeculativeConfig.from_fields(speculative)
        self.speculative = speculative
        mtp = speculative is not None and speculative.is_mtp
        self.device = device
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enforce_eager = enforce_eager
        laps: dict[str, float] = {}
        self.model, self.config = load_model(model_path, dtype=dtype, device=device, load_format=load_format,
                                             max_positions=max_model_len, config=config,
                                             trust_remote_code=trust_remote_code, run_mtp=mtp,
                                             quantization=quantization, kv_cache_dtype=kv_cache_dtype,
                                             timings=laps)
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
        self._sample = resolve("sample", device=device)
        # The window pool: None, or the (largest) window of the sliding-window layers it holds.
        self.kv_window = self._kv_window() if windowed_kv else None
        self.block_bytes = bytes_per_block([s for s in self.kv_specs if not self._in_window_pool(s)], block_size)
        self.window_block_bytes = bytes_per_block([s for s in self.kv_specs if self._in_window_pool(s)], block_size)
        budget = self._kv_budget(kv_cache_memory_bytes, gpu_memory_utilization)
        if self.kv_window is None:
            self.num_blocks = kv_blocks_for_budget(self.block_bytes, budget, block_size, max_model_len, max_num_seqs)
            self.num_window_blocks = 0
        else:
            self.num_blocks, self.num_window_blocks = split_kv_budget(
                budget, self.block_bytes, self.window_block_bytes, self.kv_window, block_size, max_model_len,
                max_num_seqs, max_num_batched_tokens)
        if self.tp_size > 1:  # one block table for every rank: the rank with the least memory decides
            own, self.num_blocks = self.num_blocks, tp.all_reduce_min(self.num_blocks)
            if own != self.num_blocks:
                logger.info("KV cache: %d blocks here, %d on the smallest rank", own, self.num_blocks)
            if self.kv_window is not None:  # the window pool's tables are shared by the ranks too
                own, self.num_window_blocks = self.num_window_blocks, tp.all_reduce_min(self.num_window_blocks)
                if own != self.num_window_blocks:
                    logger.info("Window pool: %d blocks here, %d on the smallest rank", own,
                                self.num_window_blocks)
        self.window_pool_bytes = self.num_window_blocks * self.window_block_bytes
        if self.num_blocks * block_size < max_model_len:
            window = (f" after the sliding-window layers' pool ({self.window_pool_bytes} bytes)"
                      if self.window_pool_bytes else "")
            raise ValueError(
                f"kv_cache_memory_bytes: the KV cache holds {max(self.num_blocks, 0) * block_size} tokens "
                f"({max(self.num_blocks, 0)} blocks of {block_size}){window}, fewer than "
                f"max_model_len={max_model_len}; give the KV cache more memory or lower max_model_len")
        self.kv_caches = [s.allocate(self.num_window_blocks if self._in_window_pool(s) else self.num_blocks,
                                     block_size, device) for s in self.kv_specs]
        bind_kv_caches(self.model, self.kv_caches)
        logger.info("KV cache: %d blocks x %d tokens (%.2f GiB, %s)", self.num_blocks, block_size,
                    self.num_blocks * self.block_bytes / GiB,
                    ", ".join(sorted({str(s.dtype).removeprefix("torch.") for s in self.kv_specs})))
        if self.kv_window is not None:
            logger.info("KV cache of the sliding-window layers (window %d): %d blocks (%.2f GiB), only the window "
                        "of each running sequence", self.kv_window, self.num_window_blocks,
                        self.window_pool_bytes / GiB)
        startup.phase_done("KV cache")
        width = -(-max_model_len // block_size)
        self.tables = BlockTables(width, block_size, capacity=max(16, max_num_seqs),
                                  windowed=self.kv_window is not None)
        self._generators: dict[int, torch.Generator] = {}  # seq id -> its seeded generator
        self.drafter = MTPDrafter(self, speculative.k) if mtp else None
        # benchmarks (forced acceptance): its own stream, so request draws are untouched
        self._synthetic_generator = torch.Generator().manual_seed(seed)
        self.graphs: DecodeGraphs | None = None
        self.mtp_graphs: MTPGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self.eager_steps = 0  # steps run eager (the graphs count their replays: graphs.replays)
        mode = _graph_mode()
        if mode == "static":  # the graphs' input plumbing without capture (any device; tests)
            self._build_graphs(capture=False)
        elif self._captures_graphs():
            if blockers := cuda_graph_blockers(self.model):
                logger.info("CUDA graphs off: %s cannot be captured", ", ".join(blockers))
            else:
                try:
                    self._build_graphs(capture=True)
                except RuntimeError as e:  # an op that cannot be captured: stay eager rather than fail
                    if self.tp_size > 1:  # every rank must take the same path through a step
                        raise RuntimeError(f"CUDA graph capture failed on a tensor-parallel rank ({e}); "
                                           "run with --enforce-eager") from e
                    logger.warning("CUDA graph capture failed, running eager: %s", e)
                    self.graphs = self.mtp_graphs = self.prefill_graphs = None
                    torch.cuda.synchronize()
        if device.type != "cpu":
            startup.phase_done("CUDA graphs", "captured" if self.graphs is not None else "none")
        self.compiled: CompiledForward | None = None
        if device.type == "cpu":
            startup.phase_done("compile", self._compile_cpu(enforce_eager, mtp))

    def _compile_cpu(self, enforce_eager: bool, mtp: bool) -> str:
        """Compile the CPU forward (cpu_compile.py) unless something rules it out; says what happened."""
        if enforce_eager:
            return "off (--enforce-eager)"
        if not cpu_compile.enabled_by_env():
            return "off (ATOM_CPU_COMPILE=0)"
        if self.graphs is not None:
            return "off (decode graphs in use)"
        if mtp or self.tp_size > 1:
            return "off (" + ("MTP drafter" if mtp else "tensor parallelism") + ")"
        if (reason := cpu_compile.unsupported_reason(self.model)) is not None:
            logger.info("CPU forward not compiled: %s", reason)
            return f"off ({reason})"
        compiled = CompiledForward(self.model)
        try:
            seconds = compiled.warm_up(windowed=self.tables.windowed)
        except Exception as e:  # no C++ compiler, an op Inductor cannot lower: eager steps still work
            reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            logger.warning("compiling the CPU forward failed, steps run eagerly (ATOM_CPU_COMPILE=0 or "
                           "--enforce-eager skips the attempt): %s: %s", type(e).__name__, reason[:300])
            return "failed (eager)"
        self.compiled = compiled
        logger.info("CPU forward compiled in %.1f s (torch.compile, Inductor C++; --enforce-eager turns it off)",
                    seconds)
        return f"forward in {seconds:.1f} s"

    def _captures_graphs(self) -> bool:
        return self.device.type == "cuda" and not self.enforce_eager and _graph_mode() == "auto"

    def _build_graphs(self, capture: bool) -> None:
        """Decode graphs; with speculation also verify graphs (K + 1 tokens a row); with the MTP drafter the target
        graphs keep their hidden states and the drafter gets graphs of its own (mtp_graphs.py). Under MTP the decode
        graphs take the verify graphs' coarser batch sizes (the drafter's first pass follows either kind at the same
        size; decode steps are rare there: only when no row of the batch has drafts)."""
        spec = self.speculative
        self.graphs = DecodeGraphs(
            self.model, self.attn_builder, self.device, self.max_num_seqs, self.max_model_len, self.block_size,
            capture=capture, windowed=self.kv_window is not None, verify_q=spec.k + 1 if spec is not None else None,
            keep_hidden=self.drafter is not None,
            sizes=verify_capture_sizes(self.max_num_seqs) if self.drafter is not None else None)
        if self.drafter is not None:
            self.mtp_graphs = MTPGraphs(self.model, self.graphs, spec.k)
        self._build_prefill_graphs(capture)

    def _prefill_graphs_off(self) -> str | None:
        """Why eager steps keep running eager (no prefill graphs), or None."""
        tokens = max_graph_tokens(self.max_num_batched_tokens)
        if tokens <= 0:
            return "ATOM_PREFILL_GRAPH_TOKENS=0"
        if self.drafter is not None:
            return "the MTP drafter reads the eager forward's hidden states"
        if mla_attention_specs(self.model):
            return "MLA attention (its prefill grid is rows x longest row)"
        backends = {getattr(impl_of(m._attend), "backend", None) for m in self.model.modules()
                    if isinstance(m, PagedAttention)}
        if not backends or not backends <= {"triton", "torch"}:
            return f"attention implementations {sorted(map(str, backends))} (the Triton or torch one reads them)"
        return None

    def _build_prefill_graphs(self, capture: bool) -> None:
        """Graphs of the eager forward up to ATOM_PREFILL_GRAPH_TOKENS tokens (prefill_graphs.py). A capture that
        fails leaves the decode graphs in place and eager steps eager (every tensor-parallel rank fails alike: the
        same model, shapes and code)."""
        self.prefill_graphs = None
        if (reason := self._prefill_graphs_off()) is not None:
            logger.info("prefill graphs off: %s", reason)
            return
        try:
            self.prefill_graphs = PrefillGraphs(
                self.model, self.attn_builder, self.device, self.max_num_seqs, self.max_model_len, self.block_size,
                max_graph_tokens(self.max_num_batched_tokens), windowed=self.kv_window is not None,
                capture_graph=self.graphs.capture_graph if capture else None)
        except Exception as e:  # an op that cannot be captured at these sizes: eager steps stay eager
            logger.warning("prefill graph capture failed, eager steps stay eager: %s: %s", type(e).__name__, e)
            self.prefill_graphs = None
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            return
        err = self._check_prefill_graphs()
        tol = PREFILL_CHECK_TOL.get(self.dtype, 0.1)
        ok = int(math.isfinite(err) and err <= tol)
        if self.tp_size > 1:  # every rank takes the same path
            ok = get_tp_group().all_reduce_min(ok)
        if not ok:
            logger.warning("prefill graphs off: a two-row step through them differs from the eager forward by %.3g "
                           "of its largest hidden state (allowed %.3g)", err, tol)
            self.prefill_graphs = None
        else:
            logger.info("prefill graphs kept: a two-row step through them is within %.3g of the eager forward "
                        "(allowed %.3g)", err, tol)

    @torch.inference_mode()
    def _check_prefill_graphs(self) -> float:
        """max |graph - eager| / max |eager| of the hidden states of a two-row step (about 5 and 9 tokens) through the
        prefill graphs and through the eager forward: nothing written to the KV cache (slot -1), each row's keys its
        own queries over a zeroed block table (block 0's stale values, the same both ways). A self-check at startup,
        as the AITER bindings have: a graph that went wrong turns itself off instead of serving wrong tokens."""
        g = self.prefill_graphs
        total = min(14, g.sizes[0])
        n = 2 if total >= 2 and g.rows[g.sizes[0]] > 2 else 1
        q_lens = [total // 3, total - total // 3] if n == 2 else [total]
        qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int64)
        positions = np.concatenate([np.arange(q) for q in q_lens]).astype(np.int64)
        ids = (7 * np.arange(total) + 3) % self.vocab_size
        slots = np.full(total, -1, dtype=np.int64)
        seq_lens = np.asarray(q_lens, dtype=np.int64)
        table = np.zeros((n, -(-max(q_lens) // self.block_size)), dtype=np.int32)
        dev = self.device
        windowed = (slots, table) if g.windowed else (None, None)
        inputs = self._inputs_of(slots, windowed[0], qsl, seq_lens, table, windowed[1])
        with set_forward_context(self.attn_builder.build(inputs)):
            eager = self.model(torch.from_numpy(ids).to(dev), torch.from_numpy(positions).to(dev)).float()
        graph = g.run(ids, positions, slots, windowed[0], qsl, seq_lens, table, windowed[1], g.bucket(total, n)).float()
        g.replays.clear()  # the counts are the engine's steps
        return float((graph - eager).abs().max() / eager.abs().max().clamp_min(1e-30))

    def spec_graph_bytes(self) -> int:
        """Device memory the speculative graphs hold beyond the decode graphs': the verify logits (the shared
        output buffer and the captured LM head's own, at the largest verify size) and the hidden states the MTP
        graphs keep (target, first pass, the captured forward's)."""
        spec = self.speculative
        if spec is None:
            return 0
        entries = verify_capture_sizes(self.max_num_seqs)[-1] * (spec.k + 1)
        hidden = 3 * int(self.config.hidden_size) if spec.is_mtp else 0
        return entries * (2 * self.vocab_size + hidden) * max(self.dtype.itemsize, 2)  # (8-bit weights: bf16 out)

    # ---- memory sizing -------------------------------------------------------------------------
    def _kv_window(self) -> int | None:
        """The window pool's window: the largest window of the sliding-window layers, when the attention
        implementation reads a window pool and the pool would be smaller than full-length caches."""
        windows = [s.sliding_window for s in self.kv_specs if s.kind == "sliding_window"]
        if not windows or not getattr(self.attn_builder, "supports_window_pool", False):
            return None
        window = max(windows)
        pool = WINDOW_POOL_CACHE_FACTOR * window_pool_blocks(window, self.block_size, self.max_num_seqs,
                                                             self.max_num_batched_tokens)
        return window if pool < kv_blocks_needed(self.block_size, self.max_model_len, self.max_num_seqs) else None

    def _in_window_pool(self, spec) -> bool:
        return self.kv_window is not None and spec.kind == "sliding_window"

    def _kv_budget(self, kv_cache_memory_bytes: int | None, gpu_memory_utilization: float) -> int:
        if kv_cache_memory_bytes is not None:
            return kv_cache_memory_bytes
        if self.device.type == "cpu":
            host = _host_memory_bytes()
            budget = cpu_kv_budget(self.block_bytes, self.block_size, self.max_model_len, self.max_num_seqs, host)
            logger.info("KV cache on CPU: %.2f GiB, the smaller of max_num_seqs (%d) x max_model_len (%d) tokens "
                        "at %d bytes per token (%s) and %d%% of the host's %.1f GiB (at least one full-length "
                        "sequence); --kv-cache-memory-bytes sets it", budget / GiB, self.max_num_seqs,
                        self.max_model_len, self.block_bytes // self.block_size,
                        ", ".join(sorted({str(s.dtype).removeprefix("torch.") for s in self.kv_specs})),
                        round(100 * CPU_KV_HOST_FRACTION), host / GiB)
            if self.kv_window is not None:  # plus the window pool
                budget += self.window_block_bytes * WINDOW_POOL_CACHE_FACTOR * window_pool_blocks(
                    self.kv_window, self.block_size, self.max_num_seqs, self.max_num_batched_tokens)
            return budget
        return self._profile_gpu_budget(gpu_memory_utilization)

    @torch.inference_mode()
    def _profile_gpu_budget(self, utilization: float) -> int:  # pragma: no cover - needs a GPU
        """Run the largest step once on a throwaway cache: the whole token budget (max_num_batched_tokens), as
        prompts of at most max_model_len tokens (a step of many short prompts holds as many activations as one
        long one: the MoE's per-pair buffers, MLA's expansion). What is left of utilization * total is KV."""
        tokens = min(self.max_num_batched_tokens, self.max_num_seqs * self.max_model_len)
        per_seq = min(tokens, self.max_model_len)
        lens = [per_seq] * (tokens // per_seq) + ([tokens % per_seq] if tokens % per_seq else [])
        per_blocks = -(-per_seq // self.block_size)
        num_blocks = per_blocks * len(lens)
        scratch = allocate_kv_caches(self.kv_specs, num_blocks, self.block_size, self.device)
        bind_kv_caches(self.model, scratch)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        dev = self.device
        tables = torch.arange(num_blocks, dtype=torch.int32, device=dev).view(len(lens), per_blocks)
        token = torch.arange(tokens, device=dev)
        positions = token % per_seq  # prompt r holds tokens r * per_seq .. and blocks r * per_blocks ..
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
        inputs = AttentionInputs(
            slot_mapping=(token // per_seq) * per_blocks * self.block_size + positions,
            block_tables=tables,
            query_start_loc=torch.nn.functional.pad(seq_lens.cumsum(0, dtype=torch.int32), (1, 0)),
            seq_lens=seq_lens, max_query_len=per_seq, max_seq_len=per_seq)
        if self.kv_window is not None:  # the scratch cache has num_blocks blocks in every layer
            inputs.window_slot_mapping, inputs.window_block_tables = inputs.slot_mapping, inputs.block_tables
        ids = torch.randint(0, self.vocab_size, (tokens,), device=dev)
        with set_forward_context(self.attn_builder.build(inputs)):
            hidden = self.model(ids, positions)
        self.model.compute_logits(hidden[-min(tokens, 256):]).float()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del scratch, hidden
        bind_kv_caches(self.model, None)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        other = total - free - torch.cuda.memory_reserved()  # other processes, NCCL, CUDA context
        graphs = self.spec_graph_bytes() if self._captures_graphs() else 0
        if graphs:
            logger.info("KV cache budget: %.2f GiB held back for the speculative CUDA graphs' logits and hidden "
                        "states", graphs / GiB)
        budget = int(total * utilization) - peak - max(other, 0) - graphs
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
        if self.drafter is not None:
            self.drafter.forget(step.finished_seq_ids)
        return self.tables.rows(step.seq_ids)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> list[RowResult]:
        if step.prev_rows is not None:
            raise ValueError("a step whose tokens come from an unread replay must be launched (launch_decode)")
        rows = self._begin(step)
        if not step.seq_ids:  # nothing to run: the step only releases finished sequences (flush)
            return []
        q = self._graph_q(step)
        if q == 1:
            return self._execute_decode_graph(step, rows)
        if q is not None:
            return self._execute_verify_graph(step, rows)
        if self.compiled is not None and step.is_decode:
            return self._execute_compiled_decode(step, rows)
        return self._execute_eager(step, rows)

    def _execute_compiled_decode(self, step: StepInput, rows: np.ndarray) -> list[RowResult]:
        """A decode step through the compiled forward, LM head and greedy argmax (cpu_compile.py)."""
        qsl, seq_lens, positions = positions_of(step)
        slots = self.tables.slots(rows, positions)
        window_slots = self.tables.slots(rows, positions, window=True) if self.tables.windowed else None
        md = self.compiled.metadata(self._attention_inputs(slots, window_slots, qsl, seq_lens, rows))
        logits, greedy = self.compiled.decode(torch.tensor(step.token_ids), torch.from_numpy(positions), md)
        if not self.samples:
            return []
        if step.sampling is None:
            return [RowResult(t) for t in greedy.tolist()]
        results = [RowResult() for _ in range(step.num_rows)]
        self._sample_plain(logits, step, list(range(step.num_rows)), results)
        return results

    def _graph_q(self, step: StepInput) -> int | None:
        """Which graph runs a step: 1 (a decode graph: every row computes one token and samples), the verify graphs'
        q = K + 1 (every row samples and computes its last token plus d <= K drafts, padded in front to q, which
        needs seq_len >= q), or None (eager: prefill chunks, prompt logprobs, a batch over the largest size)."""
        g = self.graphs
        if g is None:
            return None
        n = step.num_rows
        if step.is_decode:
            return 1 if g.can_run(n) else None
        q = g.verify_q
        if not q or step.num_drafts is None or step.sample_rows is not None or step.prompt_logprobs \
                or n > g.max_verify_bs or min(step.seq_lens) < q:
            return None
        q_lens = np.diff(step.query_start_loc)
        return q if np.array_equal(q_lens, np.asarray(step.num_drafts) + 1) else None

    def _execute_decode_graph(self, step: StepInput, rows: np.ndarray) -> list[RowResult]:
        g = self.graphs
        n = step.num_rows
        bs = g.prepare(step, self.tables, rows)
        logits, greedy = g.replay(bs, n)
        if not self.samples:
            return []
        if step.sampling is None:
            ticket = g.fetch_tokens(greedy, n)
            results = [RowResult(t) for t in g.tokens_list(ticket, n)]
        else:
            tokens, lps = self._sample_rows(logits[:n].float(), step.sampling, step.seq_ids)
            results = [RowResult(t, lp) for t, lp in zip(tokens, lps)]
        if self.drafter is not None:
            self._draft_after_graph(step, rows, bs, 1, np.arange(n), {i: i for i in range(n)}, results)
        return results

    def _execute_verify_graph(self, step: StepInput, rows: np.ndarray) -> list[RowResult]:
        """A step with drafts on the verify graphs: the logits (or, all rows plain greedy, the argmax) of every
        row's k + 1 positions, verified as in an eager step."""
        g = self.graphs
        n = step.num_rows
        bs, entries = g.prepare_verify(step, self.tables, rows)
        logits, best = g.replay_verify(bs, n)
        if not self.samples:
            return []
        results = [RowResult() for _ in range(n)]
        ids = np.asarray(step.token_ids, dtype=np.int64)
        last = np.asarray(step.query_start_loc[1:], dtype=np.int64) - 1
        index = torch.from_numpy(entries).to(self.device)
        every_row = list(range(n))
        if step.sampling is None:
            self._sample_speculative(None, step, every_row, ids, last, results, best=best[index].tolist())
        else:
            self._sample_speculative(logits[index].float(), step, every_row, ids, last, results)
        if self.drafter is not None:
            stops = {i: int(last[i]) - step.drafts_of(i) + len(results[i].spec_token_ids or ()) for i in every_row}
            self._draft_after_graph(step, rows, bs, g.verify_q, entries, stops, results)
        return results

    def _draft_after_graph(self, step: StepInput, rows: np.ndarray, bs: int, q: int, entries: np.ndarray,
                           stops: dict[int, int], results: list[RowResult]) -> None:
        """The MTP drafter after a step on the target's graphs: on its own graphs when every drafting row is
        greedy, else eager over the graph's hidden states (entries: the graph entry of each of the step's tokens)."""
        if self.drafter.greedy_drafts(step):
            self.drafter.propose_on_graphs(self.mtp_graphs, step, rows, bs, q, entries, stops, results)
            return
        qsl, seq_lens, positions = positions_of(step)
        token_rows = rows if step.num_tokens == step.num_rows else np.repeat(rows, np.diff(qsl))
        slots = self.tables.slots(token_rows, positions)
        hidden = self.graphs.hidden_out[torch.from_numpy(entries).to(self.device)]
        self.drafter.propose(step, np.asarray(step.token_ids, dtype=np.int64), positions, slots, qsl, seq_lens, rows,
                             hidden, stops, results)

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

    def rank_state(self) -> tuple[dict[int, list[int]], list[int], dict[int, list[int]]]:
        """(each live sequence's block table, the sequences with a seeded generator, each live sequence's
        window-pool table or nothing without a pool): what this runner keeps between steps, for checking that
        every rank holds the same (and nothing once all is released)."""
        t = self.tables
        tables = {sid: t.table[row, :t.num_blocks[row]].tolist() for sid, row in t.row_of.items()}
        window = ({sid: t.window[row, :t.window_num_blocks[row]].tolist() for sid, row in t.row_of.items()}
                  if t.windowed else {})
        return tables, sorted(self._generators), window

    def _execute_eager(self, step: StepInput, rows: np.ndarray) -> list[RowResult]:
        self.eager_steps += 1
        qsl, seq_lens, positions = positions_of(step)
        token_rows = rows if step.num_tokens == step.num_rows else np.repeat(rows, np.diff(qsl))
        slots = self.tables.slots(token_rows, positions)
        window_slots = self.tables.slots(token_rows, positions, window=True) if self.tables.windowed else None
        ids = np.asarray(step.token_ids, dtype=np.int64)
        hidden = self._forward_batch(ids, positions, slots, window_slots, qsl, seq_lens, rows)
        results = [RowResult() for _ in range(step.num_rows)]
        sample_rows = step.sampled_rows()
        last = qsl[1:] - 1  # each row's last new token
        if step.num_drafts is None:
            flat = (last if step.sample_rows is None else last[sample_rows]).tolist()
        else:  # a verify row's logits: its last committed token and each draft
            flat = [t for i in sample_rows for t in range(last[i] - step.num_drafts[i], last[i] + 1)]
        num_sampled = len(flat)
        for req in step.prompt_logprobs:
            flat.extend(range(req.first, req.first + len(req.targets)))
        stops: dict[int, int] = {}  # sampled row -> flat index of the last token whose KV is now valid
        if flat:
            logits = self.model.compute_logits(hidden[torch.tensor(flat, device=self.device)]).float()
            # the LM head's gather is a collective: every rank runs it, rank 0 samples and verifies
            if sample_rows and self.samples:
                if step.num_drafts is None:
                    self._sample_plain(logits[:num_sampled], step, sample_rows, results)
                else:
                    self._sample_speculative(logits[:num_sampled], step, sample_rows, ids, last, results)
                for i in sample_rows:
                    stops[i] = int(last[i]) - step.drafts_of(i) + len(results[i].spec_token_ids or ())
            if step.prompt_logprobs and self.samples:
                self._prompt_logprobs(logits[num_sampled:], step, results)
        if self.drafter is not None:
            self.drafter.propose(step, ids, positions, slots, qsl, seq_lens, rows, hidden, stops, results)
        return results

    def _sample_plain(self, logits: torch.Tensor, step: StepInput, sample_rows: list[int],
                      results: list[RowResult]) -> None:
        tokens, lps = self._sample_rows(logits, step.sampling, [step.seq_ids[i] for i in sample_rows])
        for j, i in enumerate(sample_rows):
            results[i].token_id = tokens[j]
            results[i].logprobs = lps[j]

    def _sample_speculative(self, logits: torch.Tensor | None, step: StepInput, sample_rows: list[int],
                            ids: np.ndarray, last: np.ndarray, results: list[RowResult],
                            best: list[int] | None = None) -> None:
        """Sampled rows of a step with drafts: logits hold each row's k + 1 positions, row after row. Rows
        without drafts sample as usual (penalties, bans: such rows never get drafts); the others keep what
        verification accepts (rejection_sampler.py) plus one token of their own. best: the argmax of each of
        those positions instead of the logits, when every row is plain greedy (step.sampling is None)."""
        sampling = step.sampling
        counts = [step.num_drafts[i] for i in sample_rows]
        starts = np.concatenate([[0], np.cumsum(np.asarray(counts) + 1)])
        plain = [j for j, k in enumerate(counts) if k == 0]
        if plain and best is not None:
            for j in plain:
                results[sample_rows[j]].token_id = best[starts[j]]
        elif plain:
            index = torch.tensor(starts[plain], device=logits.device)
            sub = subset_sampling(sampling, plain)
            tokens, lps = self._sample_rows(logits[index], sub, [step.seq_ids[sample_rows[j]] for j in plain])
            for m, j in enumerate(plain):
                results[sample_rows[j]].token_id = tokens[m]
                results[sample_rows[j]].logprobs = lps[m]
        spec = [j for j, k in enumerate(counts) if k > 0]
        if not spec:
            return
        drafts = [ids[last[sample_rows[j]] - counts[j] + 1:last[sample_rows[j]] + 1].tolist() for j in spec]
        pos = [int(starts[j]) + m for j in spec for m in range(counts[j] + 1)]  # rows of logits, row after row
        row_logits = row_best = None
        if best is None:
            row_logits = logits[torch.tensor(pos, device=logits.device)]
        else:
            row_best = [best[p] for p in pos]
        greedy = [sampling is None or sampling.temperature[j] <= 1e-5 for j in spec]
        emitted: list[list[int]] = [[] for _ in spec]
        synthetic = self.speculative is not None and self.speculative.synthetic
        offs = np.concatenate([[0], np.cumsum([len(d) + 1 for d in drafts])])
        if synthetic:
            accepted = synthetic_accepted(self.speculative.synthetic_acceptance_rates, [len(d) for d in drafts],
                                          self._synthetic_generator)
            stop_pos = [sum(len(d) + 1 for d in drafts[:m]) + a for m, a in enumerate(accepted)]
            if row_best is not None:
                own = [row_best[p] for p in stop_pos]
            else:
                own = self._own_tokens(row_logits[torch.tensor(stop_pos, device=logits.device)], step, sample_rows,
                                       spec, greedy)
            emitted = [d[:a] + [t] for d, a, t in zip(drafts, accepted, own)]
        else:
            for flag in (True, False):
                group = [m for m, g in enumerate(greedy) if g == flag]
                if not group:
                    continue
                sub_drafts = [drafts[m] for m in group]
                if flag and row_best is not None:
                    verdict = accept_greedy([row_best[offs[m]:offs[m + 1]] for m in group], sub_drafts)
                    for m, toks in zip(group, verdict.tokens):
                        emitted[m] = toks
                    continue
                index = torch.tensor([t for m in group for t in range(offs[m], offs[m + 1])], device=logits.device)
                if flag:
                    verdict = verify_greedy(row_logits[index], sub_drafts)
                else:
                    rows_j = [spec[m] for m in group]
                    per_pos = [j for j in rows_j for _ in range(counts[j] + 1)]
                    probs = target_probs(row_logits[index], subset_sampling(sampling, per_pos))
                    seq_ids = [step.seq_ids[sample_rows[j]] for j in rows_j]
                    q = [self.drafter.draft_probs(sid, d) if self.drafter is not None else None
                         for sid, d in zip(seq_ids, sub_drafts)]
                    verdict = verify_sampled(probs, sub_drafts, q, self._generators_of(sampling, rows_j, seq_ids))
                for m, toks in zip(group, verdict.tokens):
                    emitted[m] = toks
        want_lp = sampling.logprobs if sampling is not None else None
        for m, j in enumerate(spec):
            res = results[sample_rows[j]]
            toks = emitted[m]
            res.token_id, res.spec_token_ids = toks[-1], toks[:-1]
            if want_lp is not None and want_lp[j] is not None:
                lp = torch.log_softmax(row_logits[int(offs[m]):int(offs[m]) + len(toks)], dim=-1)
                entries = [gather_logprobs(lp[t], tok, want_lp[j]) for t, tok in enumerate(toks)]
                res.logprobs, res.spec_logprobs = entries[-1], entries[:-1]

    def _own_tokens(self, logits: torch.Tensor, step: StepInput, sample_rows: list[int], rows_j: list[int],
                    greedy: list[bool]) -> list[int]:
        """Synthetic acceptance: the target's own token at each row's stop position (argmax, or a draw)."""
        out = logits.argmax(dim=-1).tolist()
        sampled = [m for m, g in enumerate(greedy) if not g]
        if sampled:
            sub = subset_sampling(step.sampling, [rows_j[m] for m in sampled])
            probs = target_probs(logits[torch.tensor(sampled, device=logits.device)], sub)
            seq_ids = [step.seq_ids[sample_rows[rows_j[m]]] for m in sampled]
            drawn = draw(probs, self._generators_of(step.sampling, [rows_j[m] for m in sampled], seq_ids)).tolist()
            for m, t in zip(sampled, drawn):
                out[m] = t
        return out

    def _generators_of(self, sampling: SamplingInputs | None, sample_js: list[int],
                       seq_ids: list[int]) -> list[torch.Generator | None] | None:
        if sampling is None or sampling.seeds is None:
            return None
        return [self._generator(sid, sampling.seeds[j]) for j, sid in zip(sample_js, seq_ids)]

    def _forward_batch(self, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray,
                       window_slots: np.ndarray | None, qsl: np.ndarray, seq_lens: np.ndarray,
                       rows: np.ndarray, fn: ForwardFn | None = None, extra: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Hidden states of a step's tokens: fn(ids, positions, extra) under the step's attention metadata (fn:
        the model itself by default; the MTP drafter passes its layer, extra [T, H] the hidden states it reads)."""
        fn = fn or self._target
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
                    index = torch.from_numpy(tok).to(self.device)
                    hidden[index] = self._forward(
                        ids[tok], positions[tok], slots[tok], window_slots[tok] if window_slots is not None else None,
                        sub_qsl, seq_lens[group], rows[group], fn, None if extra is None else extra[index])
                return hidden
        return self._forward(ids, positions, slots, window_slots, qsl, seq_lens, rows, fn, extra)

    def _target(self, ids: torch.Tensor, positions: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        return self.model(ids, positions)

    def _forward(self, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, window_slots: np.ndarray | None,
                 qsl: np.ndarray, seq_lens: np.ndarray, rows: np.ndarray, fn: ForwardFn | None = None,
                 extra: torch.Tensor | None = None) -> torch.Tensor:
        fn = fn or self._target
        dev = self.device
        if self.prefill_graphs is not None and fn == self._target and extra is None and self.compiled is None:
            t = self.prefill_graphs.bucket(len(ids), len(seq_lens))
            if t is not None:
                return self.prefill_graphs.run_step(ids, positions, slots, window_slots, qsl, seq_lens, self.tables,
                                                    rows, t)
        inputs = self._attention_inputs(slots, window_slots, qsl, seq_lens, rows)
        ids_t, positions_t = torch.from_numpy(ids).to(dev), torch.from_numpy(positions).to(dev)
        if self.compiled is not None and fn == self._target:
            return self.compiled.forward(ids_t, positions_t, self.compiled.metadata(inputs))
        with set_forward_context(self.attn_builder.build(inputs)):
            return fn(ids_t, positions_t, extra)

    def _attention_inputs(self, slots: np.ndarray, window_slots: np.ndarray | None, qsl: np.ndarray,
                          seq_lens: np.ndarray, rows: np.ndarray) -> AttentionInputs:
        tables = self.tables
        table = tables.table[rows, :int(tables.num_blocks[rows].max())]
        window = (tables.window[rows, :int(tables.window_num_blocks[rows].max())] if window_slots is not None
                  else None)
        return self._inputs_of(slots, window_slots, qsl, seq_lens, table, window)

    def _inputs_of(self, slots: np.ndarray, window_slots: np.ndarray | None, qsl: np.ndarray, seq_lens: np.ndarray,
                   table: np.ndarray, window_table: np.ndarray | None) -> AttentionInputs:
        """A step's attention inputs on the device from host arrays (table: each row's block table)."""
        dev = self.device
        inputs = AttentionInputs(
            slot_mapping=torch.from_numpy(slots).to(dev),
            block_tables=torch.from_numpy(table).to(dev),
            query_start_loc=torch.from_numpy(qsl.astype(np.int32)).to(dev),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(dev),
            max_query_len=int(np.diff(qsl).max()),
            max_seq_len=int(seq_lens.max()),
        )
        if window_slots is not None:
            inputs.window_slot_mapping = torch.from_numpy(window_slots).to(dev)
            inputs.window_block_tables = torch.from_numpy(window_table).to(dev)
        return inputs

    # ---- sampling ------------------------------------------------------------------------------
    def _sample_rows(self, logits: torch.Tensor, sampling: SamplingInputs | None,
                     seq_ids: list[int]) -> tuple[list[int], list[TokenLogprobsRaw | None]]:
        """Sample one token per row of logits (rows: the sequences seq_ids, inputs: sampling)."""
        n = logits.shape[0]
        if sampling is None:  # greedy argmax for every row
            return logits.argmax(dim=-1).tolist(), [None] * n
        dev = logits.device
        if sampling.grammar_rows is not None:  # first, so logprobs see the grammar (as vLLM)
            rows = sampling.grammar_rows
            words = np.frombuffer(sampling.grammar_bitmask, dtype=np.int32).reshape(len(rows), -1)
            apply_token_bitmask(logits, torch.from_numpy(words.copy()).to(dev, non_blocking=True),
                                None if rows == list(range(len(rows))) else torch.tensor(rows, device=dev))
        want_lp = sampling.logprobs
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_lp is not None else None
        if sampling.allowed_token_ids is not None or sampling.logit_bias is not None:
            logits = apply_logits_processors(logits, sampling.allowed_token_ids, sampling.logit_bias)
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


def apply_logits_processors(logits: torch.Tensor, allowed: list[list[int] | None] | None,
                            bias: list[dict[int, float] | None] | None) -> torch.Tensor:
    """vLLM's allowed_token_ids (every other id masked out) and logit_bias (added), one entry per row."""
    width = logits.shape[-1]
    dev = logits.device
    if allowed is not None:
        keep = torch.ones_like(logits, dtype=torch.bool)
        for j, ids in enumerate(allowed):
            if ids:
                keep[j] = False
                keep[j, torch.tensor([t for t in ids if t < width], dtype=torch.long, device=dev)] = True
        logits = logits.masked_fill(~keep, float("-inf"))
    if bias is not None:
        logits = logits.clone() if allowed is None else logits
        for j, b in enumerate(bias):
            if b:
                ids = [t for t in b if t < width]
                logits[j, ids] += torch.tensor([b[t] for t in ids], dtype=logits.dtype, device=dev)
    return logits


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
