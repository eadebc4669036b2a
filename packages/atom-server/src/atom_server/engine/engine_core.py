"""The engine core: token ids in, token ids out, one model step at a time.

It owns the model runner, the KV-cache block manager and the scheduler. Each step reports only what is
new: the token ids (and logprobs) each sequence produced and whether it finished by an EOS or stop token or
by length (`EngineCoreOutputs`, column-wise). Text, stop strings and accumulation are the output processor's job (in the API
process for the server, in-process for the offline `LLM`); it stops a sequence whose text hit a stop string
with `stop_sequences`.

Isolation: a request whose preparation or sampling raises is failed on its own (an error output) while the
rest of the batch goes on; only an error that leaves the device in an unknown state stops the engine.

Speculative decoding (`speculative_config`, engine/speculative.py): a decoding sequence carries draft tokens
(from the runner's MTP drafter, or the n-gram proposer here); the step that schedules it verifies them, and the
sequence takes the accepted drafts plus one token of its own, one by one through the same stop checks as any
token (EOS, stop tokens, max_tokens, max_model_len): nothing past a stop is reported.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from atom.loader.model_loader import is_gguf, load_config
from atom.platform import default_device, kernel_backend
from atom_server import startup
from atom_server.config import EngineArgs
from atom_server.engine.block_manager import BlockManager
from atom_server.engine.decode_pipeline import DecodePipeline
from atom_server.engine.executor import ExecutorFatalError, build_runner
from atom_server.engine.model_runner import RowResult, TokenLogprobsRaw
from atom_server.engine.profiler import EngineProfiler
from atom_server.engine.scheduler import ScheduledBatch, Scheduler
from atom_server.engine.sequence import Sequence
from atom_server.engine.speculative import NgramProposer, parse_speculative_config
from atom_server.engine.step_input import StepInputBuilder
from atom_server.outputs import EngineCoreOutputs, PositionLogprobs
from atom_server.sampling_params import SamplingParams
from atom_server.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

CPU_MAX_MODEL_LEN = 8192
CPU_MAX_BATCHED_TOKENS = 2048
GPU_MAX_BATCHED_TOKENS = 8192
LARGE_GPU_LLM_MAX_BATCHED_TOKENS = 16384


def default_max_num_batched_tokens(device: torch.device, usage_context: str) -> int:
    """vLLM's default token budget of a step: the offline LLM class gets 16384 on GPUs of >= 70 GiB other than
    the A100 (H100, H200, MI300X; vLLM measured the A100 slower with it), a server 8192 on any GPU; 2048 on
    CPU (ATOM's)."""
    if device.type == "cpu":
        return CPU_MAX_BATCHED_TOKENS
    if usage_context == "llm" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        if props.total_memory >= 70 * 2**30 and "a100" not in props.name.lower():
            return LARGE_GPU_LLM_MAX_BATCHED_TOKENS
    return GPU_MAX_BATCHED_TOKENS

# Errors after which the device (and so every request on it) is in an unknown state.
_DEVICE_FATAL_MARKERS = ("CUDA error", "HIP error", "hipError", "cudaError", "device-side assert",
                         "illegal memory access", "CUBLAS_STATUS", "NCCL error")


def is_device_fatal(e: BaseException) -> bool:
    """An error after which no step can be trusted: the device is poisoned, or (tensor parallel) the ranks are
    out of step — a worker that skipped a step would pair its collectives with the next one."""
    if isinstance(e, ExecutorFatalError):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(e, accelerator_error):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _DEVICE_FATAL_MARKERS)


def eos_token_ids(tokenizer, model: str, config) -> frozenset[int]:
    """The tokenizer's EOS plus every EOS id of the generation config (chat models often add one)."""
    ids: set[int] = set()

    def add(v) -> None:
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)

    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    if os.path.isdir(model) and os.path.exists(os.path.join(model, "generation_config.json")):
        from transformers import GenerationConfig

        add(GenerationConfig.from_pretrained(model).eos_token_id)
    elif is_gguf(model) or tokenizer is None:
        add(getattr(config, "eos_token_id", None))
    return frozenset(ids)


@dataclass
class SpecDecodingStats:
    """Cumulative speculative-decoding counters (vLLM's spec_decode metrics): verify rows with drafts, drafts,
    accepted drafts, and accepted drafts by position (the acceptance rate is accepted / drafts, the mean
    acceptance length 1 + accepted / drafts rows)."""

    k: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.accepted_per_pos = [0] * self.k

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        for i in range(num_accepted):
            self.accepted_per_pos[i] += 1

    def as_stats(self) -> dict[str, int]:
        out = {"spec_decode_num_drafts": self.num_drafts, "spec_decode_num_draft_tokens": self.num_draft_tokens,
               "spec_decode_num_accepted_tokens": self.num_accepted_tokens}
        for i, n in enumerate(self.accepted_per_pos):
            out[f"spec_decode_num_accepted_tokens_per_pos.{i}"] = n
        return out


@dataclass
class CoreRequest:
    request_id: str
    params: SamplingParams
    seqs: list[Sequence]
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


def _position_logprobs(raw: TokenLogprobsRaw) -> PositionLogprobs:
    return PositionLogprobs(raw.token_id, raw.logprob, raw.rank, raw.top_ids, raw.top_logprobs)


class EngineCore:
    def __init__(self, args: EngineArgs):
        if args.model is None:
            from atom_server.default_model import SERVED_NAME, resolve_model_path

            args.model = resolve_model_path()
            args.served_model_name = args.served_model_name or SERVED_NAME
        if args.startup_profile or startup.wanted():
            startup.enable_profile()
        startup.begin()
        self.args = args
        self.model_path = args.model
        began = time.perf_counter()
        self.device = torch.device(args.device) if args.device else default_device()
        device_s = time.perf_counter() - began
        config = load_config(args.model, args.trust_remote_code)
        # the phase's two parts: the device's runtime (CUDA initialises here) and the config (its first read
        # imports transformers' config classes); 7-10 s on the H200 together, not yet split there
        config_s = time.perf_counter() - began - device_s
        startup.phase_done("config", f"device {device_s:.1f} s, config.json {config_s:.1f} s")
        self.max_model_len = self._max_model_len(args, config)
        max_batched = args.max_num_batched_tokens or default_max_num_batched_tokens(self.device, args.usage_context)
        self.tokenizer = None if args.skip_tokenizer_init else load_tokenizer(args.model, args.tokenizer,
                                                                              args.trust_remote_code)
        startup.phase_done("tokenizer", "skipped" if args.skip_tokenizer_init else "")
        self.speculative = spec = parse_speculative_config(
            args.speculative_config, int(getattr(config, "num_nextn_predict_layers", 0) or 0))
        if spec is not None:
            logger.info("speculative decoding: %s", spec.describe())
            if spec.synthetic:
                logger.warning("speculative_config: rejection_sample_method 'synthetic' forces the acceptance of "
                               "drafts for benchmarks: the outputs are NOT the model's")
        # rank 0's ModelRunner; under tensor parallelism a TPExecutor around it (same interface)
        self.runner = build_runner(
            tensor_parallel_size=args.tensor_parallel_size, enable_expert_parallel=args.enable_expert_parallel,
            model_path=args.model, dtype=args.dtype, device=self.device, block_size=args.block_size,
            max_model_len=self.max_model_len, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=max_batched,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes, gpu_memory_utilization=args.gpu_memory_utilization,
            load_format=args.load_format, config=config, trust_remote_code=args.trust_remote_code, seed=args.seed,
            enforce_eager=args.enforce_eager, windowed_kv=not args.disable_hybrid_kv_cache_manager,
            speculative=spec, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
        self.config = self.runner.config
        self.dtype = self.runner.dtype
        self.vocab_size = self.runner.vocab_size
        self.kernel_backend = kernel_backend()
        self.served_model_name = (args.served_model_names() or [args.model])[0]
        self.eos_ids = eos_token_ids(self.tokenizer, args.model, self.config)
        self.block_manager = BlockManager(self.runner.num_blocks, args.block_size, args.enable_prefix_caching,
                                          window=self.runner.kv_window, num_window_blocks=self.runner.num_window_blocks)
        if spec is not None and self.runner.kv_window is not None:
            # the window pool gives back blocks behind each sequence's window after every step; lookahead
            # slots and rolled-back drafts are not wired into it
            raise ValueError("speculative_config: not with the sliding-window KV pool of this model yet; "
                             "pass --disable-hybrid-kv-cache-manager (full-length caches) to speculate")
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, max_batched, args.scheduling_policy,
                                   lookahead=spec.lookahead_slots if spec is not None else 0,
                                   max_model_len=self.max_model_len)
        self.step_inputs = StepInputBuilder(self.scheduler, mtp=spec is not None and spec.is_mtp,
                                            can_draft=self._can_draft)
        self.ngram = NgramProposer(spec) if spec is not None and spec.method == "ngram" else None
        self.spec_stats = SpecDecodingStats(spec.k if spec is not None else 0)
        self.kv_capacity_tokens = self.runner.num_blocks * args.block_size
        self.requests: dict[str, CoreRequest] = {}
        # Async scheduling needs the decode graphs (their sampled tokens feed the next step on the device).
        # Speculative steps are synchronous: how far a sequence got is known only after verification.
        self.async_scheduling = (self.runner.graphs is not None and spec is None
                                 and os.environ.get("ATOM_ASYNC_SCHEDULING", "1") != "0")
        self.pipeline = DecodePipeline(self.runner, self.scheduler, self.step_inputs, self.max_model_len,
                                       self.async_scheduling)
        self.profiler = EngineProfiler(args.profiler_dir)
        self._grammars = None  # GrammarCompiler, built when the first request with a grammar arrives
        self._seq_ids = itertools.count()
        self.num_steps = 0
        self.num_failed_requests = 0
        startup.phase_done("ready", f"engine built in {startup.total():.1f} s")
        if startup.profiling():
            logger.info("%s", startup.format_profile())

    @staticmethod
    def _max_model_len(args: EngineArgs, config) -> int:
        limit = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        if args.max_model_len is not None:
            if limit is not None and args.max_model_len > limit:
                raise ValueError(f"max_model_len={args.max_model_len} exceeds the model's "
                                 f"max_position_embeddings={limit}")
            return args.max_model_len
        limit = limit or CPU_MAX_MODEL_LEN
        is_cpu = (args.device or default_device().type) == "cpu"
        return min(limit, CPU_MAX_MODEL_LEN) if is_cpu else limit

    # ---- requests ------------------------------------------------------------------------------
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
        """ValueError naming what is wrong, or the params as the engine runs them. Everything that reaches a
        tensor is bounded here (the API server checks the same before it sends, with the field names)."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt ({len(prompt_token_ids)} tokens) is too long: max_model_len is "
                             f"{self.max_model_len} and at least one token must be generated")
        vocab = self.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        cap = self.args.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(params, name)
            if v is not None and cap != -1 and (v == -1 or v > cap):
                raise ValueError(f"{name}={v} exceeds the server's max_logprobs ({cap})")
        for name in ("allowed_token_ids", "logit_bias"):
            ids = getattr(params, name)
            if ids and any(t >= vocab for t in ids):
                raise ValueError(f"{name}: token ids must be in [0, {vocab})")
        if params.bad_words and params.bad_words_token_ids is None:
            if self.tokenizer is None:
                raise ValueError("bad_words: the engine has no tokenizer (skip_tokenizer_init)")
            params = params.clone()
            params.update_from_tokenizer(self.tokenizer)
        if params.bad_words_token_ids and any(t >= vocab for w in params.bad_words_token_ids for t in w):
            raise ValueError(f"bad_words: token ids must be in [0, {vocab})")
        changes = {}
        if params.top_k >= vocab:
            changes["top_k"] = 0  # the same distribution: every token is in the top vocab
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(params, name)
            if v is not None and v > vocab:
                changes[name] = vocab
        return params.clone(**changes) if changes else params

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    priority: int = 0) -> None:
        """priority: lower runs first under --scheduling-policy priority (vLLM's); refused otherwise."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if priority != 0 and self.scheduler.policy != "priority":
            raise ValueError(f"priority {priority} needs priority scheduling (--scheduling-policy priority); "
                             "the server schedules first come, first served")
        params = self.check_request(prompt_token_ids, params)
        grammars = None
        if params.structured_outputs is not None:
            grammars = self.grammar_compiler.matchers(params.structured_outputs, params.n)
        seqs = [Sequence(next(self._seq_ids), request_id, i, prompt_token_ids, params, self.eos_ids,
                         self.max_model_len) for i in range(params.n)]
        if grammars is not None:
            for seq, grammar in zip(seqs, grammars):
                seq.grammar = grammar
        for seq in seqs:
            seq.priority = priority
        self.requests[request_id] = CoreRequest(request_id, params, seqs, frozenset(params.stop_token_ids))
        for seq in seqs:
            self.scheduler.add(seq)

    @property
    def grammar_compiler(self):
        """The structured-output compiler (xgrammar over the tokenizer's vocabulary), built on first use."""
        if self._grammars is None:
            from atom_server.engine.structured_output import GrammarCompiler

            self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_ids)
            self.step_inputs.grammars = self._grammars
        return self._grammars

    def abort_requests(self, request_ids: list[str]) -> None:
        """Drop requests (the caller already knows they are over: nothing is reported)."""
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is not None:
                self._finish_all(req, "abort")

    def stop_sequences(self, request_id: str, indices: list[int]) -> None:
        """The output processor found a stop string in these sequences: free them now (nothing is reported;
        a token of theirs still in flight is dropped)."""
        req = self.requests.get(request_id)
        if req is None:
            return
        for i in indices:
            if 0 <= i < len(req.seqs) and not req.seqs[i].is_finished:
                seq = req.seqs[i]
                seq.finish_reason = "stop"
                self.scheduler.finish(seq)
        if req.finished:
            del self.requests[request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def _finish_all(self, req: CoreRequest, reason: str) -> None:
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = reason

    def _fail(self, req: CoreRequest, error: BaseException, report: EngineCoreOutputs) -> None:
        logger.error("request %s failed and was aborted (the engine goes on): %s: %s", req.request_id,
                     type(error).__name__, error, exc_info=error)
        self.num_failed_requests += 1
        self._finish_all(req, "abort")
        self.requests.pop(req.request_id, None)
        report.errors[req.request_id] = f"{type(error).__name__}: {error}"

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        """One model step; returns what is new (every token any sequence took). With async scheduling a greedy
        decode step is launched here and its tokens are reported by the next call (see DecodePipeline)."""
        report = EngineCoreOutputs()
        batch = self.scheduler.schedule()
        prev = self.pipeline.take_inflight()
        launched = None
        if prev is not None and self.pipeline.can_launch(batch):
            launched = self.pipeline.launch(batch, prev)  # the device runs it while the host reads prev
        if prev is not None:
            for seq, token in self.pipeline.resolve(prev):
                self._append(seq, token, None, report)
        if launched is None:
            batch = _without_finished(batch)  # prev's tokens may have finished some of them
            if self.pipeline.can_launch(batch):
                launched = self.pipeline.launch(batch, None)
        if launched is not None:
            self.pipeline.start(batch, launched)
        elif batch.seqs:
            self._run_sync(batch, report)
        self.num_steps += 1
        return report

    def _run_sync(self, batch: ScheduledBatch, report: EngineCoreOutputs) -> None:
        results = self._execute_isolated(batch, report)
        if self.speculative is not None:
            self._take_speculative(batch, results, report)
            return
        self.scheduler.commit(batch)
        requests = self.requests
        for seq, res in results:
            if seq.is_finished:  # its request failed in this step
                continue
            req = requests[seq.request_id]
            if res.prompt_logprobs:
                report.prompt_logprobs.setdefault(req.request_id, []).extend(
                    _position_logprobs(e) for e in res.prompt_logprobs)
                seq.prompt_logprobs.extend([None] * len(res.prompt_logprobs))  # progress marker
            if res.token_id is not None:
                seq.append_token(res.token_id)
                self._append(seq, res.token_id, res.logprobs, report)

    # ---- speculative decoding ------------------------------------------------------------------
    def _can_draft(self, seq: Sequence) -> bool:
        """Whether seq takes drafts: not with penalties, nor while min_tokens bans EOS / stop tokens, nor with
        a grammar, allowed_token_ids, logit_bias or bad_words (the verification applies none of these; such a
        row decodes one token a step, in the same batch)."""
        p = seq.params
        if seq.grammar is not None or p.allowed_token_ids or p.logit_bias or p.bad_words_token_ids:
            return False
        return not p.has_penalties and (p.min_tokens == 0 or seq.num_output_tokens >= p.min_tokens)

    def _draft_limit(self, seq: Sequence) -> int:
        """Drafts worth verifying next: the step also takes one token of its own, and stays in max_model_len."""
        return min(self.speculative.k, seq.max_tokens - seq.num_output_tokens - 1,
                   self.max_model_len - seq.num_tokens)

    def _take_speculative(self, batch: ScheduledBatch, results: list[tuple[Sequence, RowResult]],
                          report: EngineCoreOutputs) -> None:
        """A synchronous step with speculative decoding: each sequence takes its accepted drafts and its own
        token, one at a time (a stop or length limit inside the run ends it there); only what was accepted is
        committed; then its drafts for the next step."""
        requests = self.requests
        drafts_of = {s.seq_id: (batch.num_drafts[i] if batch.num_drafts is not None else 0, n)
                     for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))}
        computed = {}
        for seq, res in results:
            k, n = drafts_of[seq.seq_id]
            accepted = res.spec_token_ids or []
            computed[seq.seq_id] = n - k + len(accepted)
            if seq.is_finished:  # its request failed in this step
                continue
            if res.prompt_logprobs:
                req = requests[seq.request_id]
                report.prompt_logprobs.setdefault(req.request_id, []).extend(
                    _position_logprobs(e) for e in res.prompt_logprobs)
                seq.prompt_logprobs.extend([None] * len(res.prompt_logprobs))  # progress marker
            if res.token_id is None:
                continue
            if k:
                self.spec_stats.observe(k, len(accepted))
            lps = res.spec_logprobs or [None] * len(accepted)
            for token, lp in zip([*accepted, res.token_id], [*lps, res.logprobs]):
                seq.append_token(token)
                self._append(seq, token, lp, report)
                if seq.is_finished:
                    break
        self.scheduler.commit(batch, [computed.get(s.seq_id, 0) for s in batch.seqs])
        for seq, res in results:
            if seq.is_finished or res.token_id is None:
                continue
            limit = self._draft_limit(seq) if self._can_draft(seq) else 0
            if self.ngram is not None:
                seq.draft_token_ids = self.ngram.propose(seq.token_ids, limit) if limit > 0 else []
            else:
                seq.draft_token_ids = (res.draft_token_ids or [])[:max(limit, 0)]

    # The two places that touch the runner for a synchronous step: running a batch, and the seeded generators'
    # state (a failed attempt may have drawn from them).
    def _execute(self, batch: ScheduledBatch) -> list[tuple[Sequence, RowResult]]:
        return list(zip(batch.seqs, self.runner.execute(self.step_inputs.build(batch))))  # rows in batch order

    def _generator_states(self, batch: ScheduledBatch):
        """A function that puts the runner's seeded generators of some of batch's sequences back as they are
        now (one made by a failed attempt is dropped, so the retry seeds it afresh)."""
        generators = self.runner._generators
        saved = {s.seq_id: (generators[s.seq_id], generators[s.seq_id].get_state())
                 for s in batch.seqs if s.seq_id in generators}

        def restore(seqs: list[Sequence]) -> None:
            for seq in seqs:
                if seq.seq_id in saved:
                    generator, state = saved[seq.seq_id]
                    generator.set_state(state)
                    generators[seq.seq_id] = generator
                else:
                    generators.pop(seq.seq_id, None)

        return restore

    def _execute_isolated(self, batch: ScheduledBatch, report: EngineCoreOutputs) -> list[tuple[Sequence, RowResult]]:
        """Run the batch; when that raises (and the device is fine), run it again in halves until the failing
        requests are found: they are failed, the others' results come back as usual. Seeded draws come out
        as if the failed attempts never happened."""
        restore = self._generator_states(batch)
        try:
            return self._execute(batch)
        except Exception as e:
            if is_device_fatal(e):
                raise
            logger.warning("a step of %d sequences failed (%s: %s); finding the request that caused it",
                           len(batch.seqs), type(e).__name__, e)
        results: list[tuple[Sequence, RowResult]] = []
        groups = [list(range(len(batch.seqs)))]
        while groups:
            rows = [i for i in groups.pop() if not batch.seqs[i].is_finished]
            if not rows:
                continue
            sub = batch.subset(rows)
            restore(sub.seqs)
            try:
                results.extend(self._execute(sub))
            except Exception as e:
                if is_device_fatal(e):
                    raise
                if len(rows) == 1:
                    self._fail(self.requests[sub.seqs[0].request_id], e, report)
                else:
                    half = len(rows) // 2
                    groups += [rows[half:], rows[:half]]
        return results

    def _append(self, seq: Sequence, token: int, logprobs: TokenLogprobsRaw | None,
                report: EngineCoreOutputs) -> None:
        """Report a token the sequence just took (already in seq.token_ids) and finish it on an EOS or stop
        token (from min_tokens on) or at its length limit. (The hot path of a decode step: kept lean.)"""
        rid = seq.request_id
        report.request_ids.append(rid)
        report.seq_indices.append(seq.index)
        tokens = report.token_ids
        tokens.append(token)
        row = len(tokens) - 1
        if logprobs is not None:
            report.logprobs[row] = _position_logprobs(logprobs)
        num_out = len(seq.token_ids) - seq.prompt_len
        if num_out == 1:
            report.num_cached_tokens[rid] = seq.num_cached_tokens
        reason = stop_token = None
        params = seq.params
        if seq.grammar is not None and not self._advance_grammar(seq, [token], report):
            return
        if num_out >= params.min_tokens:
            if token in seq.eos_ids:
                reason = "stop"
            elif params.stop_token_ids and token in self.requests[rid].stop_token_ids:
                reason, stop_token = "stop", token
        if reason is None and seq.grammar is not None and seq.grammar.terminated:
            reason = "stop"  # the grammar took its stop token (ignore_eos, or min_tokens held EOS back)
        if reason is None and (num_out >= seq.max_tokens or len(seq.token_ids) >= self.max_model_len):
            reason = "length"
        if reason is None:
            return
        seq.finish_reason, seq.stop_reason = reason, stop_token
        self.scheduler.finish(seq)
        report.finish(row, reason, stop_token)
        req = self.requests[rid]
        if req.finished:
            del self.requests[rid]

    def _advance_grammar(self, seq: Sequence, tokens: list[int], report: EngineCoreOutputs) -> bool:
        """Advance the sequence's grammar by the tokens it committed (one call per commit, however many tokens:
        the grammar's own per-token loop). A token the grammar refuses means the mask was not applied: the
        request fails (its client gets an error), the engine goes on. False when it failed."""
        if seq.grammar.accept(tokens):
            return True
        req = self.requests.get(seq.request_id)
        if req is not None:
            self._fail(req, RuntimeError(f"token(s) {tokens} of sequence {seq.index} are not allowed by the "
                                         "request's grammar"), report)
        return False

    # ---- introspection -------------------------------------------------------------------------
    def stats(self) -> dict:
        bm = self.block_manager
        sch = self.scheduler
        return {
            "num_running": len(sch.running),
            "num_waiting": len(sch.waiting),
            "kv_cache_usage": bm.usage(),
            "prefix_cache_queries": bm.prefix_cache_queries,
            "prefix_cache_hits": bm.prefix_cache_hits,
            "num_free_blocks": bm.num_free_blocks,
            "num_total_blocks": bm.num_total_blocks,
            "num_preemptions": sch.num_preemptions,
            "num_steps": self.num_steps,
            "num_failed_requests": self.num_failed_requests,
            **(self.spec_stats.as_stats() if self.speculative is not None else {}),
        }


def _without_finished(batch: ScheduledBatch) -> ScheduledBatch:
    if not any(s.is_finished for s in batch.seqs):
        return batch
    return batch.subset([i for i, s in enumerate(batch.seqs) if not s.is_finished])
