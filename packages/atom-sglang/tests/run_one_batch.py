"""`python -m sglang.benchmark.one_batch` with ATOM's plugin registered first (one_batch loads no plugins).

With ATOM_SGL_DUMP_LOGITS=FILE, every next-token logits tensor one_batch computes (each extend, then each
decode step, in order) is saved to FILE with torch.save, for a logit comparison against transformers
(tools/device/sglang_gpu.py), with whether that forward replayed a CUDA graph. The wraps only copy what
one_batch's functions return; one_batch runs unchanged.
"""

import os

from atom_sglang.plugin import register


def _record_logits(path: str) -> None:
    import torch
    from sglang.benchmark import one_batch

    calls: list[dict] = []
    extend, decode = one_batch.extend, one_batch.decode

    graph_flags: list[bool] = []

    def watch(model_runner) -> None:
        """Note whether each forward replayed a CUDA graph (ModelRunnerOutput.can_run_graph)."""
        if getattr(model_runner, "_atom_watched", False):
            return
        forward = model_runner.forward

        def forward_and_note(*args, **kwargs):
            out = forward(*args, **kwargs)
            graph_flags.append(bool(getattr(out, "can_run_graph", False)))
            return out

        model_runner.forward, model_runner._atom_watched = forward_and_note, True

    def save(kind: str, logits) -> None:
        calls.append({"kind": kind, "logits": logits.detach().float().cpu(),
                      "graph": graph_flags[-1] if graph_flags else False})
        torch.save(calls, path)

    def extend_and_record(reqs, model_runner):
        watch(model_runner)
        ids, logits, batch = extend(reqs, model_runner)
        save("extend", logits)
        return ids, logits, batch

    def decode_and_record(input_token_ids, batch, model_runner):
        watch(model_runner)
        ids, logits = decode(input_token_ids, batch, model_runner)
        save("decode", logits)
        return ids, logits

    one_batch.extend, one_batch.decode = extend_and_record, decode_and_record


if __name__ == "__main__":
    if not register():
        raise SystemExit("atom-sglang is not active on this sglang")
    from sglang.srt.models.registry import ModelRegistry

    for arch, cls in sorted(ModelRegistry.models.items()):
        if cls.__module__.startswith("atom_sglang."):
            print(f"atom-sglang serves {arch} with {cls.__module__}.{cls.__qualname__}", flush=True)
    if os.environ.get("ATOM_SGL_DUMP_LOGITS"):
        _record_logits(os.environ["ATOM_SGL_DUMP_LOGITS"])
    from sglang.benchmark.one_batch import cli_main

    cli_main()
