"""The engine: requests in, RequestOutputs out, one model step at a time."""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from atom.loader.model_loader import is_gguf, load_config
from atom.platform import default_device, kernel_backend
from atom_server.config import EngineArgs
from atom_server.engine.block_manager import BlockManager
from atom_server.engine.detokenizer import IncrementalDetokenizer
from atom_server.engine.model_runner import DecodeLaunch, ModelRunner, TokenLogprobsRaw
from atom_server.engine.scheduler import ScheduledBatch, Scheduler
from atom_server.engine.sequence import Sequence
from atom_server.engine.step_input import StepInputBuilder
from atom_server.outputs import CompletionOutput, Logprob, RequestOutput, TokenLogprobs
from atom_server.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

CPU_MAX_MODEL_LEN = 8192
CPU_MAX_BATCHED_TOKENS = 2048
GPU_MAX_BATCHED_TOKENS = 8192


def load_tokenizer(model: str, tokenizer: str | None = None, trust_remote_code: bool = False):
    source = tokenizer or model
    if is_gguf(source):
        from atom.loader.gguf import gguf_tokenizer

        return gguf_tokenizer(source)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)


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
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer]
    arrival_time: float = field(default_factory=time.time)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    final_only: bool = False  # report only the finished output (offline generate), not every step

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, args: EngineArgs):
        if args.model is None:
            from atom_server.default_model import SERVED_NAME, resolve_model_path

            args.model = resolve_model_path()
            args.served_model_name = args.served_model_name or SERVED_NAME
        self.args = args
        self.model_path = args.model
        self.device = torch.device(args.device) if args.device else default_device()
        config = load_config(args.model, args.trust_remote_code)
        self.max_model_len = self._max_model_len(args, config)
        max_batched = args.max_num_batched_tokens or (
            CPU_MAX_BATCHED_TOKENS if self.device.type == "cpu" else GPU_MAX_BATCHED_TOKENS)
        self.tokenizer = None if args.skip_tokenizer_init else load_tokenizer(args.model, args.tokenizer,
                                                                              args.trust_remote_code)
        self.runner = ModelRunner(
            args.model, dtype=args.dtype, device=self.device, block_size=args.block_size,
            max_model_len=self.max_model_len, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=max_batched,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes, gpu_memory_utilization=args.gpu_memory_utilization,
            load_format=args.load_format, config=config, trust_remote_code=args.trust_remote_code, seed=args.seed,
            enforce_eager=args.enforce_eager, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
        self.config = self.runner.config
        self.dtype = self.runner.dtype
        self.kernel_backend = kernel_backend()
        self.served_model_name = args.served_model_name or _default_served_name(args.model)
        self.eos_ids = eos_token_ids(self.tokenizer, args.model, self.config)
        self.block_manager = BlockManager(self.runner.num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, max_batched)
        self.step_inputs = StepInputBuilder(self.scheduler)
        self.kv_capacity_tokens = self.runner.num_blocks * args.block_size
        self.requests: dict[str, RequestState] = {}
        self._pending: list[RequestOutput] = []  # aborted requests, reported at the next step
        self._inflight: DecodeLaunch | None = None  # a launched decode step not read yet
        # Async scheduling needs the decode graphs (their sampled tokens feed the next step on the device).
        self.async_scheduling = (self.runner.graphs is not None
                                 and os.environ.get("ATOM_ASYNC_SCHEDULING", "1") != "0")
        self._seq_ids = itertools.count()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

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
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, final_only: bool = False) -> None:
        """final_only: step() reports this request once, when it finishes (saves building an output for
        every token of every request when nobody streams them)."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt ({len(prompt_token_ids)} tokens) is too long: max_model_len is "
                             f"{self.max_model_len} and at least one token must be generated")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer (the engine runs with skip_tokenizer_init)")
        vocab = self.runner.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        seqs = [Sequence(next(self._seq_ids), request_id, i, prompt_token_ids, params, self.eos_ids,
                         self.max_model_len) for i in range(params.n)]
        detoks = [IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params) for _ in seqs]
        state = RequestState(request_id, prompt, list(prompt_token_ids), params, seqs, detoks,
                             final_only=final_only)
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]
        self.requests[request_id] = state
        for seq in seqs:
            self.scheduler.add(seq)

    def abort_request(self, request_id: str | list[str]) -> None:
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            state = self.requests.pop(rid, None)
            if state is None:
                continue
            for seq in state.seqs:
                if not seq.is_finished:
                    self.scheduler.finish(seq)
                    seq.finish_reason = "abort"
            self._pending.append(self._output(state))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests or self._pending)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One model step. With async scheduling a greedy decode step is launched on the GPU and read at
        the next call, after that call has launched its own step: its outputs come one call later."""
        outputs, self._pending = self._pending, []
        prev, self._inflight = self._inflight, None
        batch = self.scheduler.schedule()
        launched = None
        if prev is not None and batch.seqs and self.runner.can_launch_async(batch):
            launched = self._launch(batch, prev)
        if prev is not None:
            self._resolve(prev, outputs)
        if launched is not None:
            self._start_inflight(batch, launched)
            return outputs
        if prev is not None and any(s.is_finished for s in batch.seqs):
            keep = [i for i, s in enumerate(batch.seqs) if not s.is_finished]
            batch = ScheduledBatch([batch.seqs[i] for i in keep], [batch.num_new_tokens[i] for i in keep])
        if not batch.seqs:
            return outputs
        if self.async_scheduling and self.runner.can_launch_async(batch):
            self._start_inflight(batch, self._launch(batch, None))
            return outputs
        results = self.runner.execute(self.step_inputs.build(batch))
        self.scheduler.commit(batch)
        touched: dict[str, RequestState] = {}
        requests = self.requests
        for seq, res in zip(batch.seqs, results):
            state = requests[seq.request_id]
            if res.prompt_logprobs:
                state.prompt_logprobs.extend(self._logprob_dict(e) for e in res.prompt_logprobs)
                seq.prompt_logprobs.extend([None] * len(res.prompt_logprobs))  # progress marker
            if res.token_id is not None:
                self._append(state, seq, res.token_id, res.logprobs)
                touched[state.request_id] = state
        self._report(touched, outputs)
        return outputs

    def _launch(self, batch: ScheduledBatch, prev: DecodeLaunch | None) -> DecodeLaunch:
        step = self.step_inputs.build(batch, prev.rows if prev is not None else None)
        return DecodeLaunch(batch.seqs, dict(zip(step.seq_ids, range(step.num_rows))), self.runner.launch_decode(step))

    def _start_inflight(self, batch: ScheduledBatch, launch: DecodeLaunch) -> None:
        self.scheduler.commit(batch)  # skips sequences that finished while this step was being launched
        max_len = self.max_model_len
        for seq in batch.seqs:
            if seq.is_finished:
                continue
            seq.append_placeholder()
            if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= max_len:
                seq.final_pending = True
        self._inflight = launch

    def _resolve(self, launch: DecodeLaunch, outputs: list[RequestOutput]) -> None:
        """Read a launched step's tokens into its sequences (those finished meanwhile drop theirs)."""
        touched: dict[str, RequestState] = {}
        requests = self.requests
        for seq, token in zip(launch.seqs, self.runner.collect(launch.ticket, len(launch.seqs))):
            if seq.is_finished or not seq.pending:
                continue
            state = requests[seq.request_id]
            seq.resolve_placeholder(token)
            self._append(state, seq, token, None, appended=True)
            touched[state.request_id] = state
        self._report(touched, outputs)

    def _report(self, touched: dict[str, RequestState], outputs: list[RequestOutput]) -> None:
        requests = self.requests
        for state in touched.values():
            finished = state.finished
            if finished or not state.final_only:
                outputs.append(self._output(state))
            if finished:
                del requests[state.request_id]

    def _append(self, state: RequestState, seq: Sequence, token: int, logprobs: TokenLogprobsRaw | None,
                appended: bool = False) -> None:
        if not appended:
            seq.append_token(token)
        if logprobs is not None:
            seq.logprobs.append(self._logprob_dict(logprobs))
            seq.cumulative_logprob += logprobs.logprob
        p = seq.params
        reason = None
        stopped_by_token = False
        num_out = seq.num_output_tokens
        if num_out > p.min_tokens - 1:
            if token in seq.eos_ids:
                reason, stopped_by_token = "stop", True
            elif token in p.stop_token_ids:
                reason, stopped_by_token, seq.stop_reason = "stop", True, token
        if reason is None and (num_out >= seq.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if self.tokenizer is None:  # no text to build, hence no stop strings either
            if reason is not None:
                seq.finish_reason = reason
                self.scheduler.finish(seq)
            return
        detok = state.detoks[seq.index]
        # The stop token's text is left out unless asked for (as vLLM).
        stop_str = detok.add_token(token, detokenize=not stopped_by_token or p.include_stop_str_in_output)
        if stop_str is None and reason is not None:
            stop_str = detok.flush()
        if stop_str is not None:
            reason, seq.stop_reason = "stop", stop_str
        if reason is not None:
            seq.finish_reason = reason
            self.scheduler.finish(seq)

    def _logprob_dict(self, raw: TokenLogprobsRaw) -> TokenLogprobs:
        tok = self.tokenizer

        def decode(ids: list[int]) -> str | None:
            return tok.decode(ids) if tok is not None else None

        out = {raw.token_id: Logprob(raw.logprob, raw.rank, decode([raw.token_id]))}
        for rank, (tid, lp) in enumerate(zip(raw.top_ids, raw.top_logprobs), start=1):
            if tid not in out:
                out[tid] = Logprob(lp, rank, decode([tid]))
        return out

    def _output(self, state: RequestState) -> RequestOutput:
        completions = []
        for seq, detok in zip(state.seqs, state.detoks):
            done = seq.is_finished
            completions.append(CompletionOutput(
                index=seq.index,
                text=detok.output_text(done),
                token_ids=list(seq.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            ))
        first = [s.first_token_time for s in state.seqs if s.first_token_time is not None]
        metrics = {"arrival_time": state.arrival_time,
                   "num_cached_tokens": float(state.seqs[0].num_cached_tokens)}
        if first:
            metrics["time_to_first_token"] = min(first) - state.seqs[0].arrival_time
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=list(state.prompt_logprobs) if state.prompt_logprobs is not None else None,
            outputs=completions,
            finished=state.finished,
            metrics=metrics,
        )

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
        }


def _default_served_name(model: str) -> str:
    name = os.path.basename(os.path.normpath(model))
    return name[:-5] if name.endswith(".gguf") else name
