"""The in-process engine (vLLM's LLMEngine): the engine core plus the output processor in one process.

Requests in (token ids + SamplingParams), RequestOutputs out, one model step per `step()`. The offline `LLM`
drives it; the HTTP server runs the same two parts in two processes (serving/engine_proc.py runs the core,
serving/engine_client.py the output processor).
"""

from __future__ import annotations

from atom_server.config import EngineArgs
from atom_server.engine.engine_core import (  # noqa: F401 (re-exported: the engine's helpers lived here)
    CPU_MAX_BATCHED_TOKENS,
    CPU_MAX_MODEL_LEN,
    GPU_MAX_BATCHED_TOKENS,
    EngineCore,
    eos_token_ids,
)
from atom_server.output_processor import OutputKind, OutputProcessor
from atom_server.outputs import RequestOutput
from atom_server.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, args: EngineArgs):
        self.core = EngineCore(args)
        self.tokenizer = self.core.tokenizer
        self.processor = OutputProcessor(self.tokenizer)
        self._aborted: list[RequestOutput] = []  # reported by the next step()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    def __getattr__(self, name: str):
        # The core's state (runner, scheduler, block_manager, device, max_model_len, served_model_name, ...)
        # reads through the engine, as it did before the split.
        if name == "core":
            raise AttributeError(name)
        return getattr(self.core, name)

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, final_only: bool = False) -> None:
        """final_only: step() reports this request once, when it finishes (no output built for every token
        of every request when nobody streams them); otherwise every step that gives it a token reports its
        cumulative output."""
        if request_id in self.processor.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.processor.check(params)
        self.core.add_request(request_id, prompt_token_ids, params)
        kind = OutputKind.FINAL_ONLY if final_only else OutputKind.CUMULATIVE
        self.processor.add_request(request_id, prompt, prompt_token_ids, params, kind)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (also done at interpreter exit)."""
        shutdown = getattr(self.core.runner, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def abort_request(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self.core.abort_requests(ids)
        for rid in ids:
            out = self.processor.abort(rid)
            if out is not None:
                self._aborted.append(out)

    def has_unfinished_requests(self) -> bool:
        return bool(self.core.has_unfinished_requests() or self.processor.has_unfinished() or self._aborted)

    def get_num_unfinished_requests(self) -> int:
        return len(self.processor.requests)

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._aborted = self._aborted, []
        processed = self.processor.process(self.core.step())
        for rid, indices in processed.stop.items():  # stop strings: free those sequences before the next step
            self.core.stop_sequences(rid, indices)
        outputs.extend(processed.outputs)
        return outputs

    def stats(self) -> dict:
        return self.core.stats()
