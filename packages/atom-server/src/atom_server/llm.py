"""Offline batch inference, vLLM's `LLM` API: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import Any

from atom_server.config import EngineArgs
from atom_server.engine.llm_engine import LLMEngine
from atom_server.generation_defaults import load_generation_defaults
from atom_server.outputs import RequestOutput
from atom_server.sampling_params import SamplingParams

PromptType = str | dict[str, Any] | list[int]


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any):
        self.engine_args = EngineArgs(model=model, **{"usage_context": "llm", **engine_args})
        if self.engine_args.cpu_threads is not None:  # in-process: the count only, the caller's process is not pinned
            import torch

            torch.set_num_threads(self.engine_args.cpu_threads)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._counter = itertools.count()
        self._generation_defaults = load_generation_defaults(self.engine_args.model,
                                                             self.engine_args.generation_config)

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: the model's generation_config.json sampling values (--generation-config semantics, see
        atom_server.generation_defaults), else SamplingParams(); used when generate() gets none."""
        return SamplingParams(**self._generation_defaults.params)

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: list[int] | None = None) -> list[RequestOutput]:
        """Prompts: a string, a list of strings, {"prompt": ...} or {"prompt_token_ids": [...]} dicts (or a
        list of them). priority: one per prompt (lower first; needs scheduling_policy="priority").
        Returns one RequestOutput per prompt, in input order."""
        items = self._normalize_prompts(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = self._params_for(sampling_params, len(items))
        if priority is not None and len(priority) != len(items):
            raise ValueError(f"priority: got {len(priority)} for {len(items)} prompts")
        priorities = list(priority) if priority is not None else [0] * len(items)
        tok = self.get_tokenizer()
        requests = []
        for item, p in zip(items, params):
            if "prompt_token_ids" in item:
                ids, text = list(item["prompt_token_ids"]), item.get("prompt")
            else:
                text = item["prompt"]
                if tok is None:
                    raise ValueError("prompts: text prompts need a tokenizer; give prompt_token_ids "
                                     "(the engine runs with skip_tokenizer_init)")
                ids = tok(text)["input_ids"]
            requests.append((ids, p, text))
        return self._run(requests, use_tqdm, priorities)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True, chat_template: str | None = None,
             continue_final_message: bool = False) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.get_tokenizer()
        prompts = []
        for conv in conversations:
            text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           continue_final_message=continue_final_message,
                                           chat_template=chat_template)
            # The template already holds BOS and friends: do not add special tokens twice.
            ids = tok(text, add_special_tokens=False)["input_ids"]
            prompts.append({"prompt_token_ids": ids, "prompt": text})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    @staticmethod
    def _normalize_prompts(prompts) -> list[dict[str, Any]]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        elif prompts and isinstance(prompts, (list, tuple)) and isinstance(prompts[0], int):
            prompts = [{"prompt_token_ids": list(prompts)}]
        out = []
        for p in prompts:
            if isinstance(p, str):
                out.append({"prompt": p})
            elif isinstance(p, dict) and ("prompt" in p or "prompt_token_ids" in p):
                out.append(p)
            elif isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):
                out.append({"prompt_token_ids": list(p)})
            else:
                raise ValueError(f"prompts: cannot use {type(p).__name__} {p!r:.60}; give strings, token id "
                                 "lists or {'prompt': ...} / {'prompt_token_ids': [...]} dicts")
        return out

    @staticmethod
    def _params_for(sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        sampling_params = list(sampling_params)
        if len(sampling_params) != n:
            raise ValueError(f"sampling_params: got {len(sampling_params)} for {n} prompts")
        return sampling_params

    def start_profile(self) -> None:
        """Start the torch profiler in the engine (needs profiler_dir= or $VLLM_TORCH_PROFILER_DIR)."""
        self.llm_engine.start_profile()

    def stop_profile(self) -> str:
        """Stop it and write the trace; returns the trace file's path."""
        return self.llm_engine.stop_profile()

    def _run(self, requests: list[tuple[list[int], SamplingParams, str | None]], use_tqdm: bool,
             priorities: list[int] | None = None) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = []
        priorities = priorities or [0] * len(requests)
        try:
            for (prompt_ids, p, text), priority in zip(requests, priorities):
                rid = str(next(self._counter))
                engine.add_request(rid, prompt_ids, p, prompt=text, final_only=True, priority=priority)
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)
            while engine.has_unfinished_requests():  # drain the abort reports
                engine.step()
            raise
        bar = None
        if use_tqdm and len(requests) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="Processed prompts", dynamic_ncols=True)
        done: dict[str, RequestOutput] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [done[r] for r in ids]
