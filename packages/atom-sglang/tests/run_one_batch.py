"""`python -m sglang.benchmark.one_batch` with ATOM's plugin registered first (one_batch loads no plugins)."""

from atom_sglang.plugin import register

if __name__ == "__main__":
    if not register():
        raise SystemExit("atom-sglang is not active on this sglang")
    from sglang.srt.models.registry import ModelRegistry

    for arch, cls in sorted(ModelRegistry.models.items()):
        if cls.__module__.startswith("atom_sglang."):
            print(f"atom-sglang serves {arch} with {cls.__module__}.{cls.__qualname__}", flush=True)
    from sglang.benchmark.one_batch import cli_main

    cli_main()
