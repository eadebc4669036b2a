"""The exact reference of ATOM's FP8 path on transformers: a float model on the dequantized weights with every
quantized linear's input quantized as ATOM's FP8 GEMMs do (shared by test_fp8_models.py and atom-server's
SmolLM2 FP8 test)."""

from __future__ import annotations

import contextlib
import os
import re

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from atom.ops.quant_fp8 import FP8_DTYPES, fake_quantize_activations


_EXPERT = re.compile(r"^(.*)\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")


def quantized_params(fp8_checkpoint) -> set[str]:
    """transformers parameter names of the weights the checkpoint stores in FP8 (experts: the fused tensors)."""
    names = set()
    for name, t in load_file(os.path.join(fp8_checkpoint, "model.safetensors")).items():
        if t.dtype not in FP8_DTYPES:
            continue
        if m := _EXPERT.match(name):
            fused = "down_proj" if m.group(2) in ("down_proj", "w2") else "gate_up_proj"
            names.add(f"{m.group(1).replace('.block_sparse_moe', '.mlp')}.experts.{fused}")
        else:
            names.add(name)
    return names


@contextlib.contextmanager
def quantized_linear_inputs(model, names: set[str], block_size):
    """F.linear with its input quantized and dequantized (ATOM's activation quantization) whenever the weight
    is one of `names` (an expert's slice of a fused tensor included)."""
    params = dict(model.named_parameters())
    missing = names - set(params)
    assert not missing, f"no transformers parameter for {sorted(missing)}"
    quantized = {id(params[n]) for n in names}
    linear = F.linear

    def quantizing(x, weight, bias=None):
        if id(weight) in quantized or (weight._base is not None and id(weight._base) in quantized):
            x = fake_quantize_activations(x, block_size, torch.float8_e4m3fn).to(x.dtype)
        return linear(x, weight, bias)

    F.linear = quantizing
    try:
        yield
    finally:
        F.linear = linear
