"""Runs the model for one scheduled batch: inputs + paged-attention metadata, one forward, sampling.

The CPU path is plain PyTorch; a GPU adds faster kernels (chosen by atom's op registry), memory sizing
from free device memory, and CUDA graphs for decode batches (forward, LM head and greedy argmax in one
replay; see cuda_graphs.py), which can also be launched ahead of reading their tokens (launch_decode /
collect: the engine's async scheduling).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from atom.forward_context import set_forward_context
from atom.layers.attention import PagedAttentionMetadata, attention_specs, bind_kv_caches
from atom.layers.mla import mla_attention_specs
from atom.loader import load_model
from atom.ops.registry import backend_for, resolve
from atom_server.engine.cuda_graphs import DecodeGraphs
from atom_server.engine.scheduler import ScheduledBatch
from atom_server.engine.sequence import Sequence

logger = logging.getLogger(__name__)

GiB = 1 << 30
CPU_SPLIT_SCORES_BYTES = 256 << 20


@dataclass
class TokenLogprobsRaw:
    """Logprobs of one position: the chosen token first, then the top-N (ids, values), its rank."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class SeqStepResult:
    seq: Sequence
    token_id: int | None = None  # None: a prefill chunk that does not reach the end of the prompt
    logprobs: TokenLogprobsRaw | None = None
    prompt_logprobs: list[TokenLogprobsRaw] | None = None


@dataclass
class DecodeLaunch:
    seqs: list[Sequence]
    rows: dict[int, int]  # seq id -> row of the replay (where the next step finds its token)
    ticket: int


def kv_bytes_per_block(specs, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return sum(2 * block_size * s.num_kv_heads * s.head_dim * elem for s in specs)


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class ModelRunner:
    def __init__(self, model_path: str, *, dtype: str, device: torch.device, block_size: int,
                 max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int,
                 kv_cache_memory_bytes: int | None, gpu_memory_utilization: float, load_format: str,
                 config=None, trust_remote_code: bool = False, seed: int = 0, enforce_eager: bool = False):
        torch.manual_seed(seed)
        self.device = device
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.model, self.config = load_model(model_path, dtype=dtype, device=device, load_format=load_format,
                                             max_positions=max_model_len, config=config,
                                             trust_remote_code=trust_remote_code)
        self.dtype = next(self.model.parameters()).dtype
        self.vocab_size = int(self.config.vocab_size)
        self.specs = attention_specs(self.model)
        if mla_attention_specs(self.model):  # their one-tensor latent caches need the spec-owned cache layout
            raise ValueError(f"{type(self.model).__name__} uses multi-head latent attention (MLA), which atom-server "
                             "does not serve yet (atom-core runs it: atom.layers.mla)")
        self._sample = resolve("sample")
        self.block_bytes = kv_bytes_per_block(self.specs, block_size, self.dtype)
        needed = max_num_seqs * -(-max_model_len // block_size)  # more would never be used
        self.num_blocks = min(self._kv_budget(kv_cache_memory_bytes, gpu_memory_utilization) // self.block_bytes,
                              needed)
        if self.num_blocks * block_size < max_model_len:
            raise ValueError(
                f"kv_cache_memory_bytes: the KV cache holds {self.num_blocks * block_size} tokens "
                f"({self.num_blocks} blocks of {block_size}), fewer than max_model_len={max_model_len}; "
                "give the KV cache more memory or lower max_model_len")
        self.kv_caches = [
            (torch.zeros(self.num_blocks, block_size, s.num_kv_heads, s.head_dim, dtype=self.dtype, device=device),
             torch.zeros(self.num_blocks, block_size, s.num_kv_heads, s.head_dim, dtype=self.dtype, device=device))
            for s in self.specs
        ]
        bind_kv_caches(self.model, self.kv_caches)
        logger.info("KV cache: %d blocks x %d tokens (%.2f GiB)", self.num_blocks, block_size,
                    self.num_blocks * self.block_bytes / GiB)
        self.graphs = None
        if device.type == "cuda" and not enforce_eager:
            if backend_for("paged_attention") == "torch":
                logger.info("CUDA graphs off: the torch reference attention syncs with the host")
            else:
                try:
                    self.graphs = DecodeGraphs(self.model, device, max_num_seqs, max_model_len, block_size)
                except RuntimeError as e:  # an op that cannot be captured: stay eager rather than fail
                    logger.warning("CUDA graph capture failed, running eager: %s", e)
                    torch.cuda.synchronize()

    # ---- memory sizing -------------------------------------------------------------------------
    def _kv_budget(self, kv_cache_memory_bytes: int | None, gpu_memory_utilization: float) -> int:
        if kv_cache_memory_bytes is not None:
            return kv_cache_memory_bytes
        if self.device.type == "cpu":
            return min(4 * GiB, int(0.2 * _host_memory_bytes()))
        return self._profile_gpu_budget(gpu_memory_utilization)

    @torch.inference_mode()
    def _profile_gpu_budget(self, utilization: float) -> int:  # pragma: no cover - needs a GPU
        """Run the largest batch once on a throwaway cache; what is left of utilization * total is KV."""
        tokens = min(self.max_num_batched_tokens, self.max_model_len)
        nb = -(-tokens // self.block_size)
        scratch = [(torch.zeros(nb, self.block_size, s.num_kv_heads, s.head_dim, dtype=self.dtype, device=self.device),
                    torch.zeros(nb, self.block_size, s.num_kv_heads, s.head_dim, dtype=self.dtype, device=self.device))
                   for s in self.specs]
        bind_kv_caches(self.model, scratch)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        md = PagedAttentionMetadata(
            slot_mapping=torch.arange(tokens, device=self.device),
            block_tables=torch.arange(nb, dtype=torch.int32, device=self.device)[None],
            query_start_loc=torch.tensor([0, tokens], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([tokens], dtype=torch.int32, device=self.device),
            max_query_len=tokens, max_seq_len=tokens)
        ids = torch.randint(0, self.vocab_size, (tokens,), device=self.device)
        with set_forward_context(md):
            hidden = self.model(ids, torch.arange(tokens, device=self.device))
        self.model.compute_logits(hidden[-min(tokens, 256):]).float()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del scratch, hidden
        bind_kv_caches(self.model, [None] * len(self.specs))
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        other = total - free - torch.cuda.memory_reserved()  # other processes, NCCL, CUDA context
        budget = int(total * utilization) - peak - max(other, 0)
        if budget <= 0:
            raise ValueError(f"gpu_memory_utilization={utilization}: no memory left for the KV cache "
                             f"(peak activations {peak / GiB:.2f} GiB of {total / GiB:.2f} GiB)")
        return budget

    # ---- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[SeqStepResult]:
        if self.graphs is not None and self._is_graph_decode(batch):
            return self._execute_decode_graph(batch.seqs)
        return self._execute_eager(batch)

    def _is_graph_decode(self, batch: ScheduledBatch) -> bool:
        # A scheduled decode (one new token) is always the sequence's last token; a prompt of one token
        # still scoring its prompt logprobs is the only one-token step that needs more than the graph gives.
        return (self.graphs.can_run(len(batch.seqs)) and max(batch.num_new_tokens) == 1
                and not any(s.wants_prompt_logprobs for s in batch.seqs))

    def _execute_decode_graph(self, seqs: list[Sequence]) -> list[SeqStepResult]:  # pragma: no cover - GPU
        g = self.graphs
        n = len(seqs)
        bs = g.prepare(seqs)
        logits, greedy = g.replay(bs)
        if all(s.argmax_ok for s in seqs):
            ticket = g.fetch_tokens(greedy, n)
            return [SeqStepResult(s, t) for s, t in zip(seqs, g.tokens_list(ticket, n))]
        tokens, lps = self._sample_rows(logits[:n].float(), seqs)
        return [SeqStepResult(s, t, lp) for s, t, lp in zip(seqs, tokens, lps)]

    # ---- async decode: launch now, read the tokens one step later ---------------------------------
    def can_launch_async(self, batch: ScheduledBatch) -> bool:
        """A decode batch whose next tokens the graph alone picks (greedy argmax)."""
        return (self.graphs is not None and self._is_graph_decode(batch)
                and all(s.argmax_ok for s in batch.seqs))

    def launch_decode(self, seqs: list[Sequence], prev: DecodeLaunch | None) -> DecodeLaunch:  # pragma: no cover
        """Start a greedy decode step; sequences whose last token is pending take it from prev's replay."""
        with torch.inference_mode():
            g = self.graphs
            n = len(seqs)
            bs = g.prepare(seqs, prev.rows if prev is not None else None)
            _, greedy = g.replay(bs)
            ticket = g.fetch_tokens(greedy, n)
        return DecodeLaunch(seqs, {s.seq_id: i for i, s in enumerate(seqs)}, ticket)

    def collect(self, launch: DecodeLaunch) -> list[int]:  # pragma: no cover - needs a GPU
        """Wait for a launched step and return its tokens (one per sequence, in launch order)."""
        return self.graphs.tokens_list(launch.ticket, len(launch.seqs))

    def _execute_eager(self, batch: ScheduledBatch) -> list[SeqStepResult]:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []  # row (in the flat token batch) whose logits pick the next token
        prompt_rows: list[tuple[int, int, int]] = []  # (result idx, row, position whose next token is scored)
        results: list[SeqStepResult] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            end = start + n
            base = len(ids)
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            qsl.append(qsl[-1] + n)
            seq_lens.append(end)
            res = SeqStepResult(seq)
            if seq.wants_prompt_logprobs:
                first = max(start, len(seq.prompt_logprobs) - 1)  # positions already scored are skipped
                last = min(end, seq.prompt_len - 1)
                for p in range(first, last):
                    prompt_rows.append((len(results), base + p - start, p))
            if end == seq.num_tokens:
                sample_rows.append(len(results))
                res.token_id = base + n - 1  # row for now; replaced by the sampled id below
            results.append(res)
        hidden = self._forward_batch(ids, positions, slots, qsl, seq_lens, [s.block_table for s in batch.seqs])
        rows = [results[i].token_id for i in sample_rows] + [r for _, r, _ in prompt_rows]
        if not rows:
            return results
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)]).float()
        if sample_rows:
            seqs = [results[i].seq for i in sample_rows]
            tokens, lps = self._sample_rows(logits[:len(sample_rows)], seqs)
            for j, i in enumerate(sample_rows):
                results[i].token_id = tokens[j]
                results[i].logprobs = lps[j]
        if prompt_rows:
            self._prompt_logprobs(logits[len(sample_rows):], prompt_rows, results)
        return results

    def _forward_batch(self, ids, positions, slots, qsl, seq_lens, tables) -> torch.Tensor:
        q_lens = [b - a for a, b in zip(qsl, qsl[1:])]
        # The torch reference attention pads every query to the longest one: a long prefill chunk next to
        # many decodes would cost batch x chunk x context scores. Run decodes and prefills apart then.
        if self.device.type == "cpu" and len(q_lens) > 1 and 1 in q_lens and max(q_lens) > 1:
            padded = len(q_lens) * max(q_lens) * max(seq_lens) * max(s.num_heads for s in self.specs) * 4
            if padded > CPU_SPLIT_SCORES_BYTES:
                hidden = torch.empty(len(ids), self.model.config.hidden_size, dtype=self.dtype, device=self.device)
                for group in ([i for i, n in enumerate(q_lens) if n == 1], [i for i, n in enumerate(q_lens) if n > 1]):
                    rows = [r for i in group for r in range(qsl[i], qsl[i + 1])]
                    sub_qsl = [0]
                    for i in group:
                        sub_qsl.append(sub_qsl[-1] + q_lens[i])
                    hidden[torch.tensor(rows)] = self._forward(
                        [ids[r] for r in rows], [positions[r] for r in rows], [slots[r] for r in rows],
                        sub_qsl, [seq_lens[i] for i in group], [tables[i] for i in group])
                return hidden
        return self._forward(ids, positions, slots, qsl, seq_lens, tables)

    def _forward(self, ids, positions, slots, qsl, seq_lens, tables) -> torch.Tensor:
        width = max(len(t) for t in tables)
        dev = self.device
        md = PagedAttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])),
            max_seq_len=max(seq_lens),
        )
        with set_forward_context(md):
            return self.model(torch.tensor(ids, dtype=torch.int64, device=dev),
                              torch.tensor(positions, dtype=torch.int64, device=dev))

    # ---- sampling ------------------------------------------------------------------------------
    def _sample_rows(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprobsRaw | None]]:
        dev = logits.device
        want_lp = [s.params.logprobs is not None for s in seqs]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
        if any(s.params.has_penalties for s in seqs):
            logits = apply_penalties(logits, seqs, self.vocab_size)
        for j, s in enumerate(seqs):
            if s.num_output_tokens < s.params.min_tokens:
                banned = [t for t in (*s.eos_ids, *s.params.stop_token_ids) if t < logits.shape[-1]]
                if banned:
                    logits[j, banned] = float("-inf")
        temperature = torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32, device=dev)
        top_k = top_p = min_p = None
        if any(s.params.top_k > 0 for s in seqs):
            top_k = torch.tensor([s.params.top_k for s in seqs], dtype=torch.int64, device=dev)
        if any(s.params.top_p < 1.0 for s in seqs):
            top_p = torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32, device=dev)
        if any(s.params.min_p > 0.0 for s in seqs):
            min_p = torch.tensor([s.params.min_p for s in seqs], dtype=torch.float32, device=dev)
        generators = [s.generator for s in seqs] if any(s.generator is not None for s in seqs) else None
        if generators is not None and dev.type != "cpu":  # pragma: no cover - needs a GPU
            generators = [self._device_generator(s) for s in seqs]
        tokens = self._sample(logits, temperature, top_k, top_p, min_p, generators).tolist()
        lps: list[TokenLogprobsRaw | None] = [None] * len(seqs)
        for j, s in enumerate(seqs):
            if want_lp[j]:
                lps[j] = gather_logprobs(raw_logprobs[j], tokens[j], s.params.logprobs)
        return tokens, lps

    def _device_generator(self, seq: Sequence) -> torch.Generator | None:  # pragma: no cover - needs a GPU
        if seq.generator is None:
            return None
        if seq.generator.device != self.device:
            seed = seq.params.seed + seq.index
            seq.generator = torch.Generator(device=self.device).manual_seed(seed)
        return seq.generator

    def _prompt_logprobs(self, logits: torch.Tensor, prompt_rows, results: list[SeqStepResult]) -> None:
        logprobs = torch.log_softmax(logits, dim=-1)
        for k, (i, _, p) in enumerate(prompt_rows):
            res = results[i]
            seq = res.seq
            entry = gather_logprobs(logprobs[k], seq.token_ids[p + 1], seq.params.prompt_logprobs)
            if res.prompt_logprobs is None:
                res.prompt_logprobs = []
            res.prompt_logprobs.append(entry)


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


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence], vocab_size: int) -> torch.Tensor:
    """vLLM/OpenAI semantics: repetition over prompt and output tokens; presence/frequency over output."""
    batch, width = logits.shape
    dev = logits.device
    counts = torch.zeros(batch, width, dtype=torch.float32, device=dev)
    seen = torch.zeros(batch, width, dtype=torch.bool, device=dev)
    for j, s in enumerate(seqs):
        out = [t for t in s.output_token_ids if t < width]
        if out:
            counts[j].index_add_(0, torch.tensor(out, device=dev), torch.ones(len(out), device=dev))
        prompt = [t for t in s.token_ids[:s.prompt_len] if t < width]
        if prompt:
            seen[j, prompt] = True
    out_mask = counts > 0
    rep = torch.tensor([s.params.repetition_penalty for s in seqs], dtype=torch.float32, device=dev)[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen | out_mask, penalized, logits)
    freq = torch.tensor([s.params.frequency_penalty for s in seqs], dtype=torch.float32, device=dev)[:, None]
    pres = torch.tensor([s.params.presence_penalty for s in seqs], dtype=torch.float32, device=dev)[:, None]
    return logits - freq * counts - pres * out_mask.float()
