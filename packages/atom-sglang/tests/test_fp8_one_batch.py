"""FP8 checkpoints and SGLang's FP8 KV cache on ATOM's models: `sglang.benchmark.one_batch` (SGLang's real
ModelRunner, loader, pools and sampler) on checkpoints written by tools/quantize_fp8.py, ATOM's "atom"
attention backend, bfloat16 (SGLang's FP8 refuses float32 activations). Every logits row one_batch computes
(prefill, extend over the cached prefix, 15 decode steps) is compared with a reference teacher-forced on
one_batch's own greedy tokens:
- qwen3_block (Qwen3, 32x32 block FP8, bf16 KV): transformers on the dequantized weights with ATOM's activation
  quantization inserted (atom-core tests/fp8_oracle.py; float32; exact to ATOM's float32 FP8 path);
- qwen3_kv (Qwen3, compressed-tensors FP8 with calibrated KV-cache scales, --kv-cache-dtype fp8_e4m3): ATOM's
  reference path outside SGLang (atom-core's load_model in bf16 with ATOM's own FP8 paged cache and the same
  scales); SGLang's dumped pool must hold fp8(k / k_scale) with the checkpoint's scales;
- qwen3_moe_block (Qwen3-MoE, block FP8, --kv-cache-dtype fp8_e4m3 without scales): the same ATOM reference;
- deepseek_v3_kv (DeepSeek-V3, float weights, --kv-cache-dtype fp8_e4m3: SGLang's MLA pool in e4m3, float32,
  SGLang's torch_native backend, the CPU one for MLA): ATOM's reference path with its FP8 latent cache (float32,
  load_model(kv_cache_dtype="fp8")). Both store fp8(row) (no checkpoint scale: 1.0) of the same float32 rows and
  compute in float32, so they agree to float32 rounding (measured 1e-6; an e4m3 rounding flipped by a 1-ulp
  difference would show as ~1e-2): asserted < MLA_BOUND = 1e-3, while a float latent differs from the FP8 one
  by several percent on these rows (measured 6-100%: MoE routing flips), so a cache that were not FP8, or
  dequantized wrongly, fails.
Bound. In bf16 an activation's own rounding (2^-9) can move it across an e4m3 rounding boundary, so two bf16
runs (or bf16 against float32) differ by up to a full e4m3 step (2^-3 relative) in such elements, compounding
over the 8 quantized linears: measured 6-20% max relative error per logits row for the dense runs. Asserted
< DENSE_BOUND = 0.3; a scale left out or applied twice, or unquantized weights, gives errors > 1. MoE routing
flips on such differences (measured rows up to 90% apart), so the MoE run is held to its greedy tokens:
SGLang's token is the reference's argmax on at least MOE_AGREE of the steps (measured 48/48; random tokens: 1/256).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from one_batch_logits import logit_errors
from tiny_models import write_checkpoint, write_tokenizer

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent.parent / "atom-core" / "tests"))
sys.path.insert(0, str(HERE.parent.parent.parent / "tools"))
import quantize_fp8  # noqa: E402
from fp8_oracle import quantized_linear_inputs, quantized_params  # noqa: E402

WRAPPER = HERE / "run_one_batch.py"
DENSE_BOUND = 0.3
MOE_AGREE = 0.8
FP8_KV = ["--kv-cache-dtype", "fp8_e4m3"]
MLA_BOUND = 1e-3
ATOM_BF16 = ["--attention-backend", "atom", "--dtype", "bfloat16"]
RUNS = {  # name -> (architecture, format (None: the float checkpoint), block size, KV-cache scales in the
    #                 checkpoint, one_batch flags)
    "qwen3_block": ("Qwen3ForCausalLM", "fp8-block", (32, 32), False, ATOM_BF16),
    "qwen3_kv": ("Qwen3ForCausalLM", "compressed-tensors", None, True, ATOM_BF16 + FP8_KV),
    "qwen3_moe_block": ("Qwen3MoeForCausalLM", "fp8-block", (32, 32), False, ATOM_BF16 + FP8_KV),
    "deepseek_v3_kv": ("DeepseekV3ForCausalLM", None, None, False,
                       ["--attention-backend", "torch_native", "--dtype", "float32"] + FP8_KV),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    started = {}
    for name, (arch, fmt, block, kv_scales, flags) in RUNS.items():
        path = tmp_path_factory.mktemp(name)
        hf = write_checkpoint(arch, path / "float")
        tokenizer = write_tokenizer(path / "tokenizer", hf.config.vocab_size)
        if fmt is not None:
            quantize_fp8.quantize_checkpoint(str(path / "float"), str(path / "fp8"), fmt, block or (128, 128),
                                             kv_cache_scales=kv_scales)
            quantize_fp8.dequantize_checkpoint(str(path / "fp8"), str(path / "dequantized"))
        env = {**os.environ, "SGLANG_EXTERNAL_MODEL_PACKAGE": "atom_sglang.models", "OMP_NUM_THREADS": "1",
               "ATOM_SGL_DUMP_LOGITS": str(path / "logits.pt"), "ATOM_SGL_DUMP_KV": "1"}
        cmd = [sys.executable, str(WRAPPER), "--model-path", str(path / ("fp8" if fmt else "float")),
               "--tokenizer-path", str(path / "tokenizer"), "--device", "cpu", "--sampling-backend", "pytorch",
               "--disable-cuda-graph", "--correctness-test", "--max-total-tokens", "4096", *flags]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started[name] = (proc, path, tokenizer)
    results = {}
    for name, (proc, path, tokenizer) in started.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-4000:]
        input_ids = ast.literal_eval(re.search(r"input_ids=(\[\[.*?\]\])", out).group(1))
        texts = re.findall(r"========== Prompt \d+ ==========\n(.*?) \n", out)
        assert len(texts) == len(input_ids) == 3, out[-4000:]
        # one_batch's own greedy sequences (word-level tokenizer: the text maps back to the ids)
        greedy = [tokenizer(t)["input_ids"] for t in texts]
        assert all(g[: len(i)] == i for g, i in zip(greedy, input_ids))
        results[name] = dict(out=out, path=path, input_ids=input_ids, greedy=greedy,
                             calls=torch.load(path / "logits.pt", weights_only=False))
    return results


class _Oracle:
    """hf(ids).logits of transformers on the dequantized weights with ATOM's activation quantization."""

    def __init__(self, path: Path, block_size):
        import transformers

        self.hf = transformers.AutoModelForCausalLM.from_pretrained(path / "dequantized", dtype=torch.float32,
                                                                    experts_implementation="eager")
        self.quantized, self.block_size = quantized_params(path / "fp8"), block_size

    def __call__(self, ids):
        with quantized_linear_inputs(self.hf, self.quantized, self.block_size):
            return self.hf(ids)


class _AtomReference:
    """hf(ids).logits of ATOM outside SGLang: load_model (bf16 by default) with ATOM's FP8 paged KV cache (the
    checkpoint's scales), one token per step so every position is a logits row."""

    def __init__(self, path: Path, dtype: str = "bfloat16", kv_cache_dtype: str | None = "fp8"):
        from paged_harness import PagedHarness

        from atom.loader import load_model

        self.model, _ = load_model(str(path), dtype=dtype, kv_cache_dtype=kv_cache_dtype, progress=False)
        self.harness = PagedHarness(self.model, num_blocks=64, block_size=4)

    def __call__(self, ids):
        from types import SimpleNamespace

        seq = self.harness.add(1)
        rows = [self.harness.step([[int(t)]], seq) for t in ids[0]]
        return SimpleNamespace(logits=torch.cat(rows).float()[None])


def test_block_fp8_logits_match_transformers_with_atoms_activation_quantization(runs):
    run = runs["qwen3_block"]
    assert "ATOM attention backend: paged_attention from atom.ops." in run["out"]
    assert run["calls"][-1]["kv"]["dtype"] == "torch.bfloat16"
    with torch.no_grad():
        errors = logit_errors(_Oracle(run["path"], (32, 32)), run["input_ids"], run["greedy"], run["calls"])
    print(f"SGLang one_batch, Qwen3 block FP8 (bf16) vs transformers + activation quantization (float32): "
          f"max rel logit error per row {max(errors):.3f}")
    assert len(errors) == 2 + 15 and max(errors) < DENSE_BOUND, errors


def test_fp8_kv_cache_holds_scaled_entries_and_matches_atom_reference(runs):
    from safetensors.torch import load_file

    run = runs["qwen3_kv"]
    kv = run["calls"][-1]["kv"]
    assert kv["dtype"] == "torch.float8_e4m3fn"
    tensors = load_file(str(run["path"] / "fp8" / "model.safetensors"))
    assert sorted(kv["scales"]) == [0, 1]
    for layer, (k, v) in kv["scales"].items():
        assert (k, v) == pytest.approx((float(tensors[f"model.layers.{layer}.self_attn.k_scale"]),
                                        float(tensors[f"model.layers.{layer}.self_attn.v_scale"])))
    # entries are k / k_scale, scaled up to e4m3's range (calibrated amax / k_scale = 448), not k's own size
    k_scale = kv["scales"][0][0]
    assert 100 < float(kv["k0"].abs().max()) <= 448 and float(kv["k0"].abs().max()) * k_scale < 50
    with torch.no_grad():
        errors = logit_errors(_AtomReference(run["path"] / "fp8"), run["input_ids"], run["greedy"], run["calls"])
    print(f"SGLang one_batch, Qwen3 FP8 + FP8 KV with checkpoint scales (bf16) vs ATOM's reference path: max rel "
          f"logit error per row {max(errors):.3f}")
    assert len(errors) == 2 + 15 and max(errors) < DENSE_BOUND, errors


def test_block_fp8_moe_with_fp8_kv_cache_follows_atom_reference(runs):
    run = runs["qwen3_moe_block"]
    kv = run["calls"][-1]["kv"]
    assert kv["dtype"] == "torch.float8_e4m3fn" and all(s == (None, None) for s in kv["scales"].values())
    ref = _AtomReference(run["path"] / "fp8")
    with torch.no_grad():
        rows = [ref(torch.tensor([g])).logits[0] for g in run["greedy"]]
    agree = total = 0
    for seq, full, prompt in zip(run["greedy"], rows, run["input_ids"]):
        for pos in range(len(prompt) - 1, len(seq) - 1):  # each generated token against the reference's choice
            agree += int(full[pos].argmax()) == seq[pos + 1]
            total += 1
    print(f"SGLang one_batch, Qwen3-MoE block FP8 + FP8 KV (bf16): greedy token = ATOM reference's argmax on "
          f"{agree}/{total} steps")
    assert agree >= MOE_AGREE * total, (agree, total)


def test_fp8_mla_pool_matches_atoms_fp8_latent_cache(runs):
    """SGLang's MLA pool in e4m3 under ATOM's DeepSeek-V3 (absorbed attention through RadixAttention): every
    logits row equals ATOM's own FP8-latent path to float32 rounding (module docstring)."""
    run = runs["deepseek_v3_kv"]
    assert "type=DeepseekV3ForCausalLM" in run["out"] and "atom-sglang serves DeepseekV3ForCausalLM" in run["out"]
    kv = run["calls"][-1]["kv"]
    assert kv["dtype"] == "torch.float8_e4m3fn" and all(s == (None, None) for s in kv["scales"].values())
    with torch.no_grad():
        errors = logit_errors(_AtomReference(run["path"] / "float", "float32"), run["input_ids"], run["greedy"],
                              run["calls"])
        float_latent = logit_errors(_AtomReference(run["path"] / "float", "float32", None), run["input_ids"],
                                    run["greedy"], run["calls"])
    print(f"SGLang one_batch, DeepSeek-V3 + FP8 MLA pool (float32, torch_native) vs ATOM's FP8 latent cache: max rel "
          f"logit error per row {max(errors):.1e} (vs a float latent cache: {max(float_latent):.2f})")
    assert len(errors) == 2 + 15 and max(errors) < MLA_BOUND, errors
    assert max(float_latent) > 10 * MLA_BOUND  # the comparison sees the FP8 rounding
