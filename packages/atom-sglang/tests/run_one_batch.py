"""`python -m sglang.benchmark.one_batch` with ATOM's plugin registered first (one_batch loads no plugins).

With ATOM_SGL_DUMP_LOGITS=FILE, every next-token logits tensor one_batch computes (each extend, then each
decode step, in order) is saved to FILE with torch.save, for a logit comparison against transformers
(tools/device/sglang_gpu.py), with whether that forward replayed a CUDA graph, and with ATOM_SGL_DUMP_KV=1 the
KV pool's state (dtype, layers' KV scales, layer 0's stored keys; small pools only). The wraps only copy what
one_batch's functions return; one_batch runs unchanged.
"""

import os

from atom_sglang.plugin import register


def _kv_state(model_runner) -> dict:
    """The KV pool's dtype, each attention layer's checkpoint KV scales (None: none loaded) and layer 0's keys
    as the pool stores them (float32 of the stored entries: FP8 pools hold k / k_scale)."""
    pool = model_runner.token_to_kv_pool
    scales = {m.layer_id: (m.k_scale_float, m.v_scale_float) for m in model_runner.model.modules()
              if hasattr(m, "k_scale_float") and hasattr(m, "layer_id")}
    return {"dtype": str(pool.dtype), "scales": scales, "k0": pool.get_key_buffer(0).detach().float().cpu()}


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

    def save(kind: str, logits, model_runner) -> None:
        calls.append({"kind": kind, "logits": logits.detach().float().cpu(),
                      "graph": graph_flags[-1] if graph_flags else False,
                      "kv": _kv_state(model_runner) if os.environ.get("ATOM_SGL_DUMP_KV") == "1" else None})
        torch.save(calls, path)

    def extend_and_record(reqs, model_runner):
        watch(model_runner)
        ids, logits, batch = extend(reqs, model_runner)
        save("extend", logits, model_runner)
        return ids, logits, batch

    def decode_and_record(input_token_ids, batch, model_runner):
        watch(model_runner)
        ids, logits = decode(input_token_ids, batch, model_runner)
        save("decode", logits, model_runner)
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
