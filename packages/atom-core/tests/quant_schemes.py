"""Test-only quantization schemes that exercise the seam (registered on import, under names no real
checkpoint uses), and the tools to write checkpoints in their formats.

- atom_test_transposed: stores every linear and expert weight transposed (after loading, in
  process_weights_after_loading) and transposes it back in apply (a contiguous copy, so the GEMM runs on
  the same memory layout as the unquantized model and rounds the same way); the logits must be
  bit-identical to the unquantized model's.
- atom_test_scaled: a checkpoint whose weights are stored divided by a per-output-channel scale
  (`weight_scale` [out, 1]) and a per-tensor scale (`tensor_scale` []), as FP8 checkpoints store scales.
  Merged layers hold one tensor_scale per shard (per_shard parameters) and the per-channel scales of every
  shard stacked; process_weights_after_loading folds them back into one weight. Exercises the loaders'
  sharding of scale parameters (output_dim narrowing across TP ranks, merged-shard offsets, per-shard
  entries, experts).
"""

from __future__ import annotations

import collections
import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from atom.ops.moe import fused_experts as reference_fused_experts
from atom.quantization import LinearMethod, MoEMethod, QuantizationConfig, new_param, register_quantization

# layer prefix -> how many times its post-load step ran
PROCESSED: collections.Counter = collections.Counter()


class TransposedLinear(LinearMethod):
    def create_weights(self, layer, input_size, output_sizes, params_dtype):
        new_param(layer, "weight", (sum(output_sizes), input_size), params_dtype, output_dim=0, input_dim=1)

    def process_weights_after_loading(self, layer):
        PROCESSED[layer.prefix] += 1
        layer.weight = nn.Parameter(layer.weight.data.t().contiguous(), requires_grad=False)  # [in, out]

    def apply(self, layer, x, bias=None):
        return torch.nn.functional.linear(x, layer.weight.t().contiguous(), bias)


class TransposedMoE(MoEMethod):
    def create_weights(self, layer, num_experts, hidden_size, intermediate_size, params_dtype):
        new_param(layer, "w13", (num_experts, 2 * intermediate_size, hidden_size), params_dtype, output_dim=0)
        new_param(layer, "w2", (num_experts, hidden_size, intermediate_size), params_dtype, input_dim=1)

    def process_weights_after_loading(self, layer):
        PROCESSED[layer.prefix] += 1
        layer.w13 = nn.Parameter(layer.w13.data.transpose(1, 2).contiguous(), requires_grad=False)  # [E, H, 2I]
        layer.w2 = nn.Parameter(layer.w2.data.transpose(1, 2).contiguous(), requires_grad=False)  # [E, I, H]

    def apply(self, layer, x, topk_weights, topk_ids):
        return reference_fused_experts(x, layer.w13.transpose(1, 2).contiguous(), layer.w2.transpose(1, 2).contiguous(),
                                       topk_weights, topk_ids, layer.activation)


@register_quantization("atom_test_transposed")
class TransposedConfig(QuantizationConfig):
    def linear_method(self, layer, prefix):
        return TransposedLinear()

    def moe_method(self, layer, prefix):
        return TransposedMoE()


class ScaledLinear(LinearMethod):
    def create_weights(self, layer, input_size, output_sizes, params_dtype):
        self.output_sizes = output_sizes
        new_param(layer, "weight", (sum(output_sizes), input_size), params_dtype, output_dim=0, input_dim=1)
        new_param(layer, "weight_scale", (sum(output_sizes), 1), torch.float32, output_dim=0)
        new_param(layer, "tensor_scale", (len(output_sizes),), torch.float32, per_shard=True)

    def process_weights_after_loading(self, layer):
        PROCESSED[layer.prefix] += 1
        per_row = torch.repeat_interleave(layer.tensor_scale.data, torch.tensor(self.output_sizes))[:, None]
        weight = layer.weight.data.float() * layer.weight_scale.data * per_row
        layer.weight = nn.Parameter(weight.to(layer.weight.dtype), requires_grad=False)
        del layer.weight_scale, layer.tensor_scale

    def apply(self, layer, x, bias=None):
        return torch.nn.functional.linear(x, layer.weight, bias)


class ScaledMoE(MoEMethod):
    def create_weights(self, layer, num_experts, hidden_size, intermediate_size, params_dtype):
        new_param(layer, "w13", (num_experts, 2 * intermediate_size, hidden_size), params_dtype, output_dim=0)
        new_param(layer, "w2", (num_experts, hidden_size, intermediate_size), params_dtype, input_dim=1)
        new_param(layer, "w13_weight_scale", (num_experts, 2 * intermediate_size, 1), torch.float32, output_dim=0)
        new_param(layer, "w2_weight_scale", (num_experts, hidden_size, 1), torch.float32)
        new_param(layer, "w13_tensor_scale", (num_experts, 2), torch.float32, per_shard=True)
        new_param(layer, "w2_tensor_scale", (num_experts,), torch.float32)

    def process_weights_after_loading(self, layer):
        PROCESSED[layer.prefix] += 1
        inter = layer.w2.shape[-1]
        per_row = torch.repeat_interleave(layer.w13_tensor_scale.data, inter, dim=1)[..., None]
        w13 = layer.w13.data.float() * layer.w13_weight_scale.data * per_row
        w2 = layer.w2.data.float() * layer.w2_weight_scale.data * layer.w2_tensor_scale.data[:, None, None]
        layer.w13 = nn.Parameter(w13.to(layer.w13.dtype), requires_grad=False)
        layer.w2 = nn.Parameter(w2.to(layer.w2.dtype), requires_grad=False)
        for name in ("w13_weight_scale", "w2_weight_scale", "w13_tensor_scale", "w2_tensor_scale"):
            delattr(layer, name)

    def apply(self, layer, x, topk_weights, topk_ids):
        return reference_fused_experts(x, layer.w13, layer.w2, topk_weights, topk_ids, layer.activation)


@register_quantization("atom_test_scaled")
class ScaledConfig(QuantizationConfig):
    @classmethod
    def from_config(cls, config):
        if "scale_dtype" not in config:  # a scheme reads its own fields; a missing one is named
            raise ValueError("quantization_config of atom_test_scaled lacks scale_dtype")
        return cls()

    def linear_method(self, layer, prefix):
        return ScaledLinear()

    def moe_method(self, layer, prefix):
        return ScaledMoE()


def _is_scaled(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and name.endswith("proj.weight")


def set_quantization(path, config: dict) -> None:
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = config
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


def write_scaled_checkpoint(src, dst) -> None:
    """Copy the HF checkpoint at `src` to `dst` in atom_test_scaled's format (single safetensors file)."""
    os.makedirs(dst, exist_ok=True)
    out = {}
    for file in sorted(f for f in os.listdir(src) if f.endswith(".safetensors")):
        for name, t in sorted(load_file(os.path.join(src, file)).items()):
            if not _is_scaled(name, t):
                out[name] = t
                continue
            row = t.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-6)  # [out, 1]
            # a different one for each tensor of a layer (k, o, q, v, ... in name order): shard order matters
            tensor_scale = torch.tensor(0.5 + 0.15 * (len(out) % 7))
            base = name[: -len("weight")]
            out[name] = (t.float() / (row * tensor_scale)).to(t.dtype)
            out[base + "weight_scale"] = row
            out[base + "tensor_scale"] = tensor_scale
    save_file(out, os.path.join(dst, "model.safetensors"))
    for file in os.listdir(src):
        if file.endswith(".json") and file != "model.safetensors.index.json":
            with open(os.path.join(src, file)) as f, open(os.path.join(dst, file), "w") as g:
                g.write(f.read())
    set_quantization(dst, {"quant_method": "atom_test_scaled", "scale_dtype": "float32"})
