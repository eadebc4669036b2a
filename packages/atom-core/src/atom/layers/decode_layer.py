"""A dense decoder layer's one-row decode steps as one persistent kernel (atom.ops.triton_kernels.decode_layer).

`OneLaunchDecode(layer)` stands beside a DecoderLayer (atom.models.decoder) and, on the steps it can run, does
that layer's whole forward in one launch instead of 8-10 kernels; elsewhere (prefill, more than one row, torch
.compile, traceable CPU steps) the layer runs its modules as always. It takes the layer as it is built: bf16 /
fp16 / float32 unquantized linears on one rank, ATOM's paged attention over a cache in the model dtype without
sliding window, softcap or sinks, a gated SiLU MLP without biases (qkv may have one), qk-norm or not, any
non-dynamic rope. ATOM_DECODE_LAYER=1 turns it on (off by default until it is measured on the GPU); the Triton
kernel backend is required (the CPU's torch backend never takes it, except under Triton's interpreter, where the
tests run it).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from atom.envs import env_flag

ENABLED = env_flag("ATOM_DECODE_LAYER", False)
logger = logging.getLogger(__name__)
_SAID: set[str] = set()  # what was logged (once a process, not once a layer)


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        logger.info(message)


def _why_not(layer: nn.Module) -> str | None:
    """Why this layer's decode steps cannot run as one launch (None: they can)."""
    from atom.layers.attention import PagedAttention
    from atom.models.decoder import DenseMLP
    from atom.quantization.unquantized import UnquantizedLinearMethod

    attn = layer.self_attn
    impl = getattr(getattr(attn, "attn", None), "impl", None)  # a host's own attention (vLLM, SGLang) has none
    if not isinstance(impl, PagedAttention) or impl._rowmax_attend is None:
        return "not ATOM's Triton paged attention"
    s = impl.spec
    if s.sliding_window or s.logit_softcap or impl.sinks is not None:
        return "sliding window, softcap or sinks"
    if attn._fused_prep is None:
        return "a dynamic rope"
    if not isinstance(layer.mlp, DenseMLP) or layer.mlp.act._name != "silu_and_mul":
        return "not a dense SiLU MLP"
    linears = (attn.qkv_proj, attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
    if any(not isinstance(m.quant_method, UnquantizedLinearMethod) or m.tp_size != 1 for m in linears):
        return "quantized or tensor-parallel linears"
    if any(m.bias is not None for m in linears[1:]):
        return "o_proj or MLP biases"
    if s.head_dim & (s.head_dim - 1):
        return "head_dim not a power of two"
    if layer.input_layernorm.eps != layer.post_attention_layernorm.eps:
        return "two norm epsilons"
    return None


class OneLaunchDecode:
    """Runs `layer`'s one-row decode steps as one launch (see the module docstring). Not a module: it holds no
    parameters, only references to the layer's."""

    def __init__(self, layer: nn.Module):
        from atom.ops.triton_kernels import decode_layer as kernel
        from atom.ops.triton_kernels.activation import _ACT_CODES
        from atom.ops.triton_kernels.common import interpreting

        object.__setattr__(self, "layer", layer)
        self._kernel = kernel  # the module (its launcher looked up at each call)
        self._act = _ACT_CODES[layer.mlp.act._name]
        self._interpreting = interpreting()  # the CPU runs it under Triton's interpreter only (the tests)
        self._barriers: torch.Tensor | None = None
        # the next decoder layer where it runs one launch too (DecoderModel sets it): its qkv weight is the early
        # stream's last part (decode_layer's next_qkv_w)
        self.next_layer: nn.Module | None = None

    @staticmethod
    def for_layer(layer: nn.Module) -> OneLaunchDecode | None:
        if not ENABLED:
            return None
        try:
            import atom.ops.triton_kernels.decode_layer  # noqa: F401 - Triton importable
        except ImportError:
            return None
        why = _why_not(layer)
        if why is not None:  # asked for and not taken: say why (the user set ATOM_DECODE_LAYER=1)
            _say_once(f"ATOM_DECODE_LAYER: decoder layers keep their modules at decode ({why})")
            return None
        _say_once("ATOM_DECODE_LAYER: one-row decode steps run each decoder layer as one launch")
        return OneLaunchDecode(layer)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(the MLP's output, the new residual) as DecoderLayer.forward returns them, or None where this step is
        not one it runs (the caller runs the modules)."""
        kernel = self._kernel
        layer = self.layer
        attn = layer.self_attn
        impl = attn.attn.impl
        if (type(hidden) is not torch.Tensor or hidden.shape[0] != 1 or (residual is not None
                                                                          and type(residual) is not torch.Tensor)
                or torch.compiler.is_compiling() or not (hidden.is_cuda or self._interpreting)):
            return None
        md = impl._context()
        cache = impl.kv_cache
        if (md.traceable or md.max_query_len != 1 or md.seq_lens.shape[0] != 1 or cache.k.dtype != hidden.dtype
                or cache.k_scale is not None):
            return None
        if self._barriers is None or self._barriers.device != hidden.device:
            self._barriers = kernel.counters(impl.spec.num_kv_heads, hidden.device)
        slots, tables = impl._slots_and_tables(md)
        mlp, s = layer.mlp, impl.spec
        qn, kn = (attn.q_norm, attn.k_norm) if attn.qk_norm else (None, None)
        return kernel.decode_layer(
            hidden, residual, input_norm_w=layer.input_layernorm.weight,
            post_norm_w=layer.post_attention_layernorm.weight, eps=layer.input_layernorm.eps,
            qkv_w=attn.qkv_proj.weight, qkv_b=attn.qkv_proj.bias, q_norm_w=qn.weight if qn else None,
            k_norm_w=kn.weight if kn else None, qk_eps=qn.eps if qn else 0.0, cos_sin=attn.rotary_emb.cos_sin,
            is_neox=attn.rotary_emb.is_neox, positions=positions, seq_lens=md.seq_lens, slot_mapping=slots,
            block_tables=tables, k_cache=cache.k, v_cache=cache.v, scale=s.scale, num_heads=s.num_heads,
            num_kv_heads=s.num_kv_heads, o_w=attn.o_proj.weight, gate_up_w=mlp.gate_up_proj.weight,
            down_w=mlp.down_proj.weight, act=self._act, barriers=self._barriers, max_seq_len=md.max_seq_len,
            next_qkv_w=self.next_layer.self_attn.qkv_proj.weight if self.next_layer is not None else None)
