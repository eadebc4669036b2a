"""Safetensors checkpoints: sharded loading, and errors that name the file or tensor at fault."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from paged_harness import PagedHarness
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from atom.loader import load_model


def _tiny_llama(path, max_shard_size=None):
    config = LlamaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    _tiny_llama(path)
    return path


@pytest.fixture
def copy(checkpoint, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoint, dst)
    return dst


def test_sharded_checkpoint_loads_every_tensor(tmp_path):
    hf = _tiny_llama(tmp_path, max_shard_size="40KB")
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(shards) >= 3 and (tmp_path / "model.safetensors.index.json").exists()
    model, _ = load_model(str(tmp_path), dtype="float32", progress=False)
    prompt = torch.randint(0, 256, (9,)).tolist()
    harness = PagedHarness(model, num_blocks=8)
    logits = harness.step([prompt], harness.add(1))
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(logits[0], expected, rtol=1e-4, atol=1e-4)


def test_missing_config_json_is_named(copy):
    os.remove(copy / "config.json")
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        load_model(str(copy), dtype="float32", progress=False)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder nor a .gguf file"):
        load_model(str(tmp_path / "nope"), dtype="float32", progress=False)


def test_missing_shard_named_in_index(tmp_path):
    _tiny_llama(tmp_path, max_shard_size="40KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    victim = sorted(set(weight_map.values()))[1]
    os.remove(tmp_path / victim)
    with pytest.raises(FileNotFoundError, match=f"names shards that are missing: {victim}"):
        load_model(str(tmp_path), dtype="float32", progress=False)


def test_no_safetensors_files(copy):
    os.remove(copy / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors files in"):
        load_model(str(copy), dtype="float32", progress=False)


def test_corrupt_file_is_named(copy):
    target = copy / "model.safetensors"
    data = target.read_bytes()
    target.write_bytes(data[:8] + b"{not json" + data[17:200])
    with pytest.raises(ValueError, match="model.safetensors") as info:
        load_model(str(copy), dtype="float32", progress=False)
    assert str(copy) in str(info.value)


def test_truncated_file_is_named(copy):
    target = copy / "model.safetensors"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(str(copy), dtype="float32", progress=False)


@pytest.mark.parametrize("tensor", ["model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight",
                                    "model.layers.1.post_attention_layernorm.weight", "model.embed_tokens.weight"])
def test_shape_mismatch_names_the_tensor(copy, tensor):
    tensors = load_file(copy / "model.safetensors")
    tensors[tensor] = torch.randn(tensors[tensor].shape[0] + 1, *tensors[tensor].shape[1:])
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{tensor}.*shape mismatch|shape mismatch.*{tensor}") as info:
        load_model(str(copy), dtype="float32", progress=False)
    assert "checkpoint" in str(info.value)


def test_missing_tensor_is_named(copy):
    tensors = load_file(copy / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks tensors for: model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(str(copy), dtype="float32", progress=False)


def test_unexpected_tensor_is_named(copy):
    tensors = load_file(copy / "model.safetensors")
    tensors["model.layers.0.self_attn.rogue.weight"] = torch.randn(3)
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.rogue\.weight"):
        load_model(str(copy), dtype="float32", progress=False)


def test_moe_expert_shape_mismatch_names_the_tensor(tmp_path):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=24, intermediate_size=96)
    Qwen3MoeForCausalLM(config).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = next(n for n in sorted(tensors) if ".experts." in n and ("gate_up" in n or "up_proj" in n))
    t = tensors[name]
    grow = 0 if t.dim() == 2 else 1  # per-expert [I, H] or fused [E, 2I, H]: grow the intermediate dim
    tensors[name] = torch.randn(*t.shape[:grow], t.shape[grow] + 2, *t.shape[grow + 1:])
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name}.*shape mismatch"):
        load_model(str(tmp_path), dtype="float32", progress=False)
