"""The quantization seam: schemes chosen from quantization_config, per-layer methods, the post-load hook.

Test-only schemes (tests/quant_schemes.py) run tiny transformers checkpoints through the paged KV path
(prefill + decode, as test_models_parity.py): a scheme that only stores weights transposed must give the
unquantized model's logits exactly; a checkpoint stored with per-channel and per-shard scales must give
them after its scales are folded back (float32 rounding of the division only).
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import transformers
from paged_harness import PagedHarness
from quant_schemes import PROCESSED, set_quantization, write_scaled_checkpoint  # registers the test schemes

from atom.loader import load_model
from atom.ops import registry
from atom.quantization import (
    LinearMethod,
    QuantizationConfig,
    new_param,
    process_weights_after_loading,
    supported_quantizations,
    weights_reloading,
)
from atom.quantization.unquantized import UnquantizedLinearMethod, UnquantizedMoEMethod

VOCAB = 128
CONFIGS = {
    # MoE layer + dense layer (gate_up), qk-norm, GQA: every merged layer and the experts
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=24, norm_topk_prob=True, mlp_only_layers=[1])),
    # biases on q/k/v (merged, column-parallel) and o (row-parallel, added after the reduction)
    "llama_bias": ("LlamaConfig", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
}


def _write(name: str, path) -> None:
    cls, extra = CONFIGS[name]
    config = getattr(transformers, cls)(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=96, max_position_embeddings=64, **extra)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():  # spread (HF init leaves biases at 0 and norms at 1)
            p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]) if p.dim() > 1 else 1 + 0.2 * torch.randn_like(p))
    hf.save_pretrained(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name in CONFIGS:
        out[name] = tmp_path_factory.mktemp(name)
        _write(name, out[name])
    return out


def _logits(path, prompts=((5, 9, 2, 77, 3, 14, 8), (4, 4, 60, 1, 2)), steps=4) -> torch.Tensor:
    model, _ = load_model(str(path), dtype="float32", progress=False)
    harness = PagedHarness(model, num_blocks=32, block_size=4)
    seqs = harness.add(len(prompts))
    out = [harness.step([list(p) for p in prompts], seqs)]
    for _ in range(steps):
        out.append(harness.step([[int(t)] for t in out[-1].argmax(-1)], seqs))
    return torch.cat(out)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transposed_scheme_gives_identical_logits(name, checkpoints, tmp_path):
    shutil.copytree(checkpoints[name], tmp_path / "q", dirs_exist_ok=True)
    set_quantization(tmp_path / "q", {"quant_method": "atom_test_transposed"})
    model, config = load_model(str(tmp_path / "q"), dtype="float32", progress=False)
    assert config.quantization_config["quant_method"] == "atom_test_transposed"
    linears = [m for m in model.modules() if hasattr(m, "quant_method")]
    assert {type(m.quant_method).__name__ for m in linears} >= {"TransposedLinear"}
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.shape == (qkv.input_size, qkv.output_size)  # stored transposed
    # the router stays unquantized, as in vLLM and real FP8 checkpoints
    if name == "qwen3_moe":
        assert isinstance(model.model.layers[0].mlp.gate.quant_method, UnquantizedLinearMethod)
        assert type(model.model.layers[0].mlp.experts.quant_method).__name__ == "TransposedMoE"
    torch.testing.assert_close(_logits(tmp_path / "q"), _logits(checkpoints[name]), rtol=0, atol=0)


def test_post_load_hook_runs_once_per_layer_and_again_after_a_reload(checkpoints, tmp_path):
    shutil.copytree(checkpoints["qwen3_moe"], tmp_path / "q", dirs_exist_ok=True)
    set_quantization(tmp_path / "q", {"quant_method": "atom_test_transposed"})
    PROCESSED.clear()
    model, _ = load_model(str(tmp_path / "q"), dtype="float32", progress=False)
    quantized = [m.prefix for m in model.modules() if type(getattr(m, "quant_method", None)).__name__.startswith("Tr")]
    assert dict(PROCESSED) == {p: 1 for p in quantized}
    assert "model.layers.0.mlp.experts" in quantized and "model.layers.1.mlp.down_proj" in quantized
    # Hosts may call it again (SGLang's loader calls each module's method itself): nothing runs twice.
    process_weights_after_loading(model)
    for m in model.modules():
        if getattr(m, "prefix", None) in quantized:
            m.quant_method.process_weights_after_loading(m)
    assert dict(PROCESSED) == {p: 1 for p in quantized}
    # Loading weights again (load_weights marks the layers unprocessed) processes them again.
    weights_reloading(model)
    process_weights_after_loading(model)
    assert dict(PROCESSED) == {p: 2 for p in quantized}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scaled_checkpoint_loads_per_channel_and_per_shard_scales(name, checkpoints, tmp_path):
    write_scaled_checkpoint(checkpoints[name], tmp_path / "s")
    model, _ = load_model(str(tmp_path / "s"), dtype="float32", progress=False)
    assert not any("scale" in n for n, _ in model.named_parameters())  # folded after loading
    torch.testing.assert_close(_logits(tmp_path / "s"), _logits(checkpoints[name]), rtol=1e-5, atol=1e-5)


def test_scaled_checkpoint_with_a_swapped_shard_scale_is_wrong(checkpoints, tmp_path):
    """The per-shard scales really land on their own shard: swapping q's and k's is visible."""
    from safetensors.torch import load_file, save_file

    write_scaled_checkpoint(checkpoints["llama_bias"], tmp_path / "s")
    tensors = load_file(tmp_path / "s" / "model.safetensors")
    q, k = "model.layers.0.self_attn.q_proj.tensor_scale", "model.layers.0.self_attn.k_proj.tensor_scale"
    tensors[q], tensors[k] = tensors[k] * 1.0, tensors[q] * 1.0
    save_file(tensors, tmp_path / "s" / "model.safetensors")
    assert not torch.allclose(_logits(tmp_path / "s"), _logits(checkpoints["llama_bias"]), rtol=1e-3, atol=1e-3)


def test_unknown_quant_method_names_the_field_and_the_supported_ones(checkpoints, tmp_path):
    shutil.copytree(checkpoints["llama_bias"], tmp_path / "q", dirs_exist_ok=True)
    set_quantization(tmp_path / "q", {"quant_method": "gptq", "bits": 4})
    with pytest.raises(ValueError, match=r"quantization_config\.quant_method='gptq' is not supported by ATOM; "
                                         r"supported: .*atom_test_scaled.*atom_test_transposed") as info:
        load_model(str(tmp_path / "q"), dtype="float32", progress=False)
    assert set(supported_quantizations()) <= set(str(info.value).split(": ")[-1].split(", "))


def test_quantization_config_without_method_or_with_bad_fields_is_named(checkpoints, tmp_path):
    shutil.copytree(checkpoints["llama_bias"], tmp_path / "q", dirs_exist_ok=True)
    set_quantization(tmp_path / "q", {"bits": 4})
    with pytest.raises(ValueError, match="quantization_config has no quant_method field"):
        load_model(str(tmp_path / "q"), dtype="float32", progress=False)
    set_quantization(tmp_path / "q", {"quant_method": "atom_test_scaled"})
    with pytest.raises(ValueError, match="lacks scale_dtype"):
        load_model(str(tmp_path / "q"), dtype="float32", progress=False)


def test_forced_quantization_overrides_the_checkpoint(checkpoints):
    model, _ = load_model(str(checkpoints["llama_bias"]), dtype="float32", progress=False,
                          quantization="atom_test_transposed")
    assert type(model.model.layers[0].mlp.down_proj.quant_method).__name__ == "TransposedLinear"


def test_unquantized_moe_applies_the_kernels_weight_layout_once(checkpoints, planted_backend):
    """An experts implementation that wants its own weight layout (as AITER's shuffled tiles) gets the
    weights converted once after loading, in place: no second copy, same logits."""
    reference = _logits(checkpoints["qwen3_moe"])
    calls = []

    def prepare(w13, w2):  # a layout only this implementation reads: reversed expert order, negated
        calls.append(1)
        return -w13.flip(0), -w2.flip(0)

    def experts(x, w13, w2, topk_weights, topk_ids, activation="silu"):
        return reference_fused(x, -w13.flip(0), -w2.flip(0), topk_weights, topk_ids, activation)

    from atom.ops.moe import fused_experts as reference_fused

    planted_backend("fused_experts", experts, verified=False, prepare_weights=prepare)
    model, _ = load_model(str(checkpoints["qwen3_moe"]), dtype="float32", progress=False)
    moe = model.model.layers[0].mlp.experts
    assert isinstance(moe.quant_method, UnquantizedMoEMethod)
    assert registry.impl_of(moe.quant_method.experts).backend == "aiter"
    assert len(calls) == 2  # the self-check's call, then the one layer's
    torch.testing.assert_close(_logits(checkpoints["qwen3_moe"]), reference, rtol=0, atol=0)



class _BlockScaled(LinearMethod):
    """A scale per block x block tile of the weight (the layout of 128x128 FP8 block scales)."""

    def __init__(self, block: int):
        self.block = block

    def create_weights(self, layer, input_size, output_sizes, params_dtype):
        b = self.block
        new_param(layer, "weight_scale_inv", (-(-sum(output_sizes) // b), -(-input_size // b)), torch.float32,
                  output_dim=0, input_dim=1, output_block=b, input_block=b)


class _Scheme(QuantizationConfig):
    def __init__(self, block: int):
        self.block = block

    def linear_method(self, layer, prefix):
        return _BlockScaled(self.block)


def test_block_scales_shard_by_whole_blocks(monkeypatch):
    """Rank 1 of 2 takes its blocks of each merged shard and of the row-parallel input (the arithmetic only:
    the ranks' group is a stand-in that is never asked to communicate)."""
    from types import SimpleNamespace

    from atom.layers.linear import MergedColumnParallelLinear, RowParallelLinear

    monkeypatch.setattr("atom.layers.linear.get_tp_group", lambda: SimpleNamespace(rank=1, world_size=2))
    merged = MergedColumnParallelLinear(16, [16, 8], quant_config=_Scheme(4))
    gate, up = torch.arange(16.0).view(4, 4), 100 + torch.arange(8.0).view(2, 4)  # [out/4, in/4] per shard
    merged.weight_loader(merged.weight_scale_inv, gate, 0)
    merged.weight_loader(merged.weight_scale_inv, up, 1)
    assert torch.equal(merged.weight_scale_inv.data, torch.cat((gate[2:4], up[1:2])))  # rows of rank 1
    row = RowParallelLinear(16, 8, quant_config=_Scheme(4))
    full = torch.arange(8.0).view(2, 4)  # [out/4, in/4]
    row.weight_loader(row.weight_scale_inv, full)
    assert torch.equal(row.weight_scale_inv.data, full[:, 2:4])
    # a shard whose rank slice (4 features) is not a whole number of blocks (8) is refused by name
    bad = MergedColumnParallelLinear(16, [16, 8], quant_config=_Scheme(8))
    with pytest.raises(ValueError, match=r"MergedColumnParallelLinear\[1\].*does not fall on the quantization block of 8"):
        bad.weight_loader(bad.weight_scale_inv, torch.ones(1, 2), 1)
