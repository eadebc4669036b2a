"""Sampling defaults from the model's generation_config.json, with vLLM's `--generation-config` semantics.

- `auto` (default): the values the model's generation_config.json sets for repetition_penalty,
  presence_penalty, frequency_penalty, temperature, top_k, top_p, min_p and max_new_tokens (as
  `max_tokens`) are the defaults of every request that does not set them itself.
- `vllm`: the model's file is ignored; requests get vLLM's neutral defaults (temperature 1, ...).
- a folder: its generation_config.json is used instead of the model's; its max_new_tokens also caps
  the max_tokens a request may ask for (vLLM's override_max_tokens).

A GGUF file has no generation_config.json (vLLM finds none either), so the bundled SmolLM2 runs with the
neutral defaults, which is also what its original Hugging Face release sets (no sampling values).
The file is read as JSON (what transformers' GenerationConfig.to_diff_dict() gives vLLM, without the
warnings transformers prints about flags that only act with do_sample).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from atom_server.sampling_params import SamplingParams

SAMPLING_KEYS = ("repetition_penalty", "presence_penalty", "frequency_penalty", "temperature", "top_k", "top_p",
                 "min_p", "max_new_tokens")
FILE = "generation_config.json"


@dataclass(frozen=True)
class GenerationDefaults:
    params: dict = field(default_factory=dict)  # SamplingParams names (max_new_tokens -> max_tokens)
    source: str | None = None  # the file they came from
    max_tokens_cap: int | None = None  # --generation-config PATH: no request gets more than this

    def describe(self) -> str:
        if not self.params:
            return "neutral sampling defaults (temperature 1.0, top_p 1.0, no top_k/min_p, no penalties)"
        return f"sampling defaults from {self.source}: {self.params} (--generation-config vllm ignores them)"


def check_generation_config(value: str) -> None:
    """ValueError naming the flag unless value is auto, vllm or a folder with a generation_config.json."""
    if value in ("auto", "vllm"):
        return
    if not os.path.isdir(value):
        raise ValueError(f"generation_config must be 'auto', 'vllm' or a folder holding {FILE}, got {value!r}")
    if not os.path.isfile(os.path.join(value, FILE)):
        raise ValueError(f"generation_config folder {value!r} has no {FILE}")


def load_generation_defaults(model: str, generation_config: str = "auto") -> GenerationDefaults:
    check_generation_config(generation_config)
    if generation_config == "vllm":
        return GenerationDefaults()
    folder = model if generation_config == "auto" else generation_config
    path = os.path.join(folder, FILE)
    if not os.path.isdir(folder) or not os.path.isfile(path):
        return GenerationDefaults()
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    params = {k: raw[k] for k in SAMPLING_KEYS if raw.get(k) is not None}
    if "max_new_tokens" in params:
        params["max_tokens"] = params.pop("max_new_tokens")
    try:  # a bad value is the file's fault: say so at start-up, not as a 400 on every request
        SamplingParams(**params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: unusable sampling default: {e}") from e
    cap = params.get("max_tokens") if generation_config != "auto" else None
    return GenerationDefaults(params, path if params else None, cap)
