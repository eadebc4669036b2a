"""GPT-OSS's mixture-of-experts block: a biased router, top-k, and experts with biases and a clamped SwiGLU.

Router: logits = x R^T + r; the top-k experts by logit, weighted by a softmax over those k logits (the same
as a softmax over all experts renormalized over the chosen k). Experts: see atom.ops.moe_swigluoai.

The experts' weights come in two formats, each handled by a method of the quantization seam
(atom.quantization.MoEMethod: create_weights / apply / process_weights_after_loading): unquantized by
default, MXFP4 when the model's quant_config is the "mxfp4" scheme (atom.quantization.mxfp4):
  - unquantized (bf16/fp32 checkpoints, as transformers writes them): w13_weight [E, 2*I/tp, H],
    w2_weight [E, H, I/tp];
  - MXFP4 (`quantization_config.quant_method: mxfp4`, the released gpt-oss checkpoints): w13_weight uint8
    [E, 2*I/tp, H/2] + w13_weight_scale uint8 [E, 2*I/tp, H/32], w2_weight uint8 [E, H, I/tp/2] +
    w2_weight_scale uint8 [E, H, I/tp/32], kept packed in memory (4.25 bits per weight).
Both have w13_bias [E, 2*I/tp] and w2_bias [E, H] in the model dtype. Rows of w13 are gate rows then up
rows; checkpoints interleave them (gate = even rows/columns, up = odd), which the loaders undo.

Checkpoint tensors hold all experts of a layer: `mlp.experts.gate_up_proj` [E, H, 2*I] (transposed) /
`gate_up_proj_blocks` [E, 2*I, H/32, 16] + `gate_up_proj_scales` [E, 2*I, H/32], `gate_up_proj_bias`
[E, 2*I], and the same for `down_proj` ([E, I, H] dense, [E, H, I/32, 16] blocks). Each parameter's
`weight_loader(param, tensor)` takes the whole checkpoint tensor and keeps this rank's share.
"""

from __future__ import annotations

import torch
from torch import nn

from atom.distributed import get_ep_group, get_tp_group
from atom.layers.linear import ReplicatedLinear
from atom.ops.mxfp4 import BLOCK as MXFP4_BLOCK
from atom.ops.registry import impl_of, resolve
from atom.quantization import MoEMethod, QuantizationConfig

# checkpoint tensor suffix (after "mlp.experts.") -> parameter name
CHECKPOINT_PARAMS = {
    "gate_up_proj": "w13_weight",
    "gate_up_proj_blocks": "w13_weight",
    "gate_up_proj_scales": "w13_weight_scale",
    "gate_up_proj_bias": "w13_bias",
    "down_proj": "w2_weight",
    "down_proj_blocks": "w2_weight",
    "down_proj_scales": "w2_weight_scale",
    "down_proj_bias": "w2_bias",
}


def _check(loaded: torch.Tensor, expected: tuple[int, ...], name: str) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(loaded.shape)}, expected {tuple(expected)}")


class SwigluOaiExperts(nn.Module):
    """The experts of one layer; its quantization method owns the weight format.
    forward(x, topk_weights, topk_ids)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, alpha: float, limit: float,
                 reduce_results: bool = True, params_dtype: torch.dtype | None = None, *,
                 quant_config: QuantizationConfig | None = None, prefix: str = ""):
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.world_size
        if intermediate_size % self.tp_size:
            raise ValueError(f"moe intermediate size {intermediate_size} is not divisible by TP {self.tp_size}")
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.inter = intermediate_size // self.tp_size
        self.alpha, self.limit, self.reduce_results = float(alpha), float(limit), reduce_results
        self.prefix = prefix
        self.quant_method = swigluoai_method_for(quant_config, self, prefix)
        if get_ep_group() is not None and not self.quant_method.supports_expert_parallel:
            raise ValueError(f"{prefix or 'GPT-OSS experts'}: expert parallelism is not supported by the "
                             f"{type(self.quant_method).__name__} experts yet (their kernels do not skip other "
                             "ranks' experts); run without --enable-expert-parallel (tensor parallelism slices "
                             "every expert instead)")
        self.quant_method.create_weights(self, num_experts, hidden_size, self.inter,
                                         params_dtype or torch.get_default_dtype())

    # -- loading: each takes the checkpoint's whole tensor (all experts) ---------------------------------
    def _gate_up_rows(self, loaded: torch.Tensor, dim: int) -> torch.Tensor:
        """Interleaved gate/up rows (checkpoint: gate j at 2j, up j at 2j+1) -> this rank's gate rows, then its
        up rows."""
        mine = torch.arange(self.tp_rank * self.inter, (self.tp_rank + 1) * self.inter, device=loaded.device)
        return loaded.index_select(dim, torch.cat((2 * mine, 2 * mine + 1)))

    def _down_cols(self, loaded: torch.Tensor, per_rank: int) -> torch.Tensor:
        return loaded.narrow(-1, self.tp_rank * per_rank, per_rank)

    def load_w13(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        e, h, two_i = self.num_experts, self.hidden_size, 2 * self.inter * self.tp_size
        if param.dtype == torch.uint8:  # MXFP4 blocks [E, 2I, H/32, 16]
            _check(loaded, (e, two_i, h // MXFP4_BLOCK, MXFP4_BLOCK // 2), "experts.gate_up_proj_blocks")
            loaded = loaded.flatten(-2)
        else:  # dense [E, H, 2I]
            _check(loaded, (e, h, two_i), "experts.gate_up_proj")
            loaded = loaded.transpose(1, 2)
        param.data.copy_(self._gate_up_rows(loaded, 1))

    def load_w13_scale(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        _check(loaded, (self.num_experts, 2 * self.inter * self.tp_size, self.hidden_size // MXFP4_BLOCK),
               "experts.gate_up_proj_scales")
        param.data.copy_(self._gate_up_rows(loaded, 1))

    def load_w13_bias(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        _check(loaded, (self.num_experts, 2 * self.inter * self.tp_size), "experts.gate_up_proj_bias")
        param.data.copy_(self._gate_up_rows(loaded, 1))

    def load_w2(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        e, h, i = self.num_experts, self.hidden_size, self.inter * self.tp_size
        if param.dtype == torch.uint8:  # MXFP4 blocks [E, H, I/32, 16]
            _check(loaded, (e, h, i // MXFP4_BLOCK, MXFP4_BLOCK // 2), "experts.down_proj_blocks")
            param.data.copy_(self._down_cols(loaded.flatten(-2), self.inter // 2))
        else:  # dense [E, I, H]
            _check(loaded, (e, i, h), "experts.down_proj")
            param.data.copy_(self._down_cols(loaded.transpose(1, 2), self.inter))

    def load_w2_scale(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        _check(loaded, (self.num_experts, self.hidden_size, self.inter * self.tp_size // MXFP4_BLOCK),
               "experts.down_proj_scales")
        param.data.copy_(self._down_cols(loaded, self.inter // MXFP4_BLOCK))

    def load_w2_bias(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        _check(loaded, (self.num_experts, self.hidden_size), "experts.down_proj_bias")
        # the partial sums of all ranks are added up: only one of them adds the bias
        param.data.copy_(loaded if self.tp_rank == 0 else torch.zeros_like(loaded))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        out = self.quant_method.apply(self, x, topk_weights, topk_ids)
        if self.tp_size > 1 and self.reduce_results:
            out = get_tp_group().all_reduce(out)
        return out


def _param(layer: SwigluOaiExperts, name: str, shape: tuple[int, ...], dtype: torch.dtype, loader,
           dummy_range: tuple[int, int] | None = None) -> None:
    p = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    p.weight_loader = loader
    if dummy_range is not None:  # integer data: the values random (dummy) weights draw from
        p.dummy_range = dummy_range
    layer.register_parameter(name, p)


class SwigluOaiMethod(MoEMethod):
    """Base of the GPT-OSS experts' methods: the biases (model dtype, whatever the weight format) and the
    forward through the fused_experts_swigluoai op; subclasses say how the weights are stored."""

    mxfp4 = False
    # The experts are always sliced along I over the TP ranks: fused_experts_swigluoai (torch, Triton) takes
    # every id as a local expert, so expert parallelism (ids of -1) is refused by SwigluOaiExperts.
    supports_expert_parallel = False

    def create_weights(self, layer: SwigluOaiExperts, num_experts: int, hidden_size: int, intermediate_size: int,
                       params_dtype: torch.dtype) -> None:
        _param(layer, "w13_bias", (num_experts, 2 * intermediate_size), params_dtype, layer.load_w13_bias)
        _param(layer, "w2_bias", (num_experts, hidden_size), params_dtype, layer.load_w2_bias)
        # alpha / limit: a binding may compute SwiGLU with fixed ones (aiter's); its guard and self-check see them
        self.experts = resolve("fused_experts_swigluoai",
                               static={"mxfp4": self.mxfp4, "alpha": layer.alpha, "limit": layer.limit})

    def scales(self, layer: SwigluOaiExperts) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return None, None

    def apply(self, layer: SwigluOaiExperts, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        w13_scale, w2_scale = self.scales(layer)
        return self.experts(x, layer.w13_weight, layer.w2_weight, layer.w13_bias, layer.w2_bias, topk_weights,
                            topk_ids, layer.alpha, layer.limit, w13_scale, w2_scale,
                            getattr(layer, "w13_frag", None), getattr(layer, "w2_frag", None))

    # the op's weight arguments (OpDef.weight_args), as the layer holds them
    WEIGHT_PARAMS = ("w13_weight", "w2_weight", "w13_bias", "w2_bias", "w13_weight_scale", "w2_weight_scale")

    def process_weights_after_loading(self, layer: SwigluOaiExperts) -> None:
        """An implementation with its own layout (Impl.prepare_weights: aiter pads and shuffles MXFP4 experts) gets
        the weights once here, in place of the loaded ones (one copy); the Triton kernels and the torch reference
        read the loaded layout."""
        impl = impl_of(self.experts)
        if impl is None or impl.prepare_weights is None:
            return
        params = [getattr(layer, name, None) for name in self.WEIGHT_PARAMS]
        for param, data in zip(params, impl.prepare_weights(*(p.data if p is not None else None for p in params)),
                               strict=True):
            if param is not None:
                param.data = data


class UnquantizedSwigluOaiMethod(SwigluOaiMethod):
    """Dense experts in the model dtype (a bf16 or fp32 GPT-OSS checkpoint)."""

    def create_weights(self, layer: SwigluOaiExperts, num_experts: int, hidden_size: int, intermediate_size: int,
                       params_dtype: torch.dtype) -> None:
        _param(layer, "w13_weight", (num_experts, 2 * intermediate_size, hidden_size), params_dtype, layer.load_w13)
        _param(layer, "w2_weight", (num_experts, hidden_size, intermediate_size), params_dtype, layer.load_w2)
        super().create_weights(layer, num_experts, hidden_size, intermediate_size, params_dtype)


class Mxfp4SwigluOaiMethod(SwigluOaiMethod):
    """MXFP4 experts, kept packed; the kernels dequantize in registers (the "mxfp4" scheme's MoE method)."""

    mxfp4 = True
    # Random (dummy) weights: any E2M1 codes, scales 2^-8..2^-7 (weights of about +-0.05, like a trained model's)
    DUMMY_SCALES = (119, 121)

    def create_weights(self, layer: SwigluOaiExperts, num_experts: int, hidden_size: int, intermediate_size: int,
                       params_dtype: torch.dtype) -> None:
        for what, size in (("hidden size", hidden_size), ("moe intermediate size per TP rank", intermediate_size)):
            if size % MXFP4_BLOCK:
                raise ValueError(f"MXFP4 experts need a {what} that is a multiple of {MXFP4_BLOCK}, got {size}")
        u8 = torch.uint8
        _param(layer, "w13_weight", (num_experts, 2 * intermediate_size, hidden_size // 2), u8, layer.load_w13,
               (0, 256))
        _param(layer, "w13_weight_scale", (num_experts, 2 * intermediate_size, hidden_size // MXFP4_BLOCK), u8,
               layer.load_w13_scale, self.DUMMY_SCALES)
        _param(layer, "w2_weight", (num_experts, hidden_size, intermediate_size // 2), u8, layer.load_w2, (0, 256))
        _param(layer, "w2_weight_scale", (num_experts, hidden_size, intermediate_size // MXFP4_BLOCK), u8,
               layer.load_w2_scale, self.DUMMY_SCALES)
        super().create_weights(layer, num_experts, hidden_size, intermediate_size, params_dtype)

    def scales(self, layer: SwigluOaiExperts) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return layer.w13_weight_scale, layer.w2_weight_scale

    def process_weights_after_loading(self, layer: SwigluOaiExperts) -> None:
        """With the Triton kernels, a bf16 model and ATOM_MX_FRAG=1: the experts repacked in fragment order
        (atom.ops.mxfp4.pack_fragments; plain attributes, not in the state dict), which every Triton path then
        reads; the checkpoint-layout tensors are emptied (the same memory, one copy). Another implementation's
        own layout: SwigluOaiMethod's."""
        layer.w13_frag = layer.w2_frag = None
        impl = impl_of(self.experts)
        if impl is None or impl.backend != "triton":
            super().process_weights_after_loading(layer)
        else:
            from atom.ops.triton_kernels.moe_swigluoai import fragments_for

            layer.w13_frag, layer.w2_frag = fragments_for(layer.w13_weight, layer.w13_weight_scale,
                                                          layer.w2_weight, layer.w2_weight_scale,
                                                          layer.w13_bias.dtype)  # the model's dtype
            if layer.w13_frag is not None:
                for name in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"):
                    param = getattr(layer, name)
                    param.data = param.data.new_empty(0)


def swigluoai_method_for(quant_config: QuantizationConfig | None, layer: SwigluOaiExperts,
                         prefix: str) -> SwigluOaiMethod:
    """The experts' method: the scheme's (it must know GPT-OSS's experts), else unquantized."""
    method = quant_config.moe_method(layer, prefix) if quant_config is not None else None
    if method is None:
        return UnquantizedSwigluOaiMethod()
    if not isinstance(method, SwigluOaiMethod):
        raise ValueError(f"GPT-OSS experts ({prefix or 'experts'}) with quant_method={quant_config.name!r}: that "
                         f"scheme gives {type(method).__name__}, which does not implement GPT-OSS's biased, clamped "
                         "SwiGLU experts; ATOM runs them unquantized or MXFP4 (quant_method mxfp4)")
    return method


class GptOssMoE(nn.Module):
    """router -> top-k (softmax over the chosen logits) -> experts."""

    def __init__(self, config, *, quant_config: QuantizationConfig | None = None, prefix: str = ""):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        num_experts = config.num_local_experts
        # The router stays unquantized (the released checkpoints list it in modules_to_not_convert).
        self.router = ReplicatedLinear(config.hidden_size, num_experts, bias=True, prefix=f"{prefix}.router")
        self.experts = SwigluOaiExperts(num_experts, config.hidden_size, config.intermediate_size,
                                        getattr(config, "swiglu_alpha", 1.702), getattr(config, "swiglu_limit", 7.0),
                                        quant_config=quant_config, prefix=f"{prefix}.experts")
        self._topk = resolve("moe_topk_softmax")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self._topk(self.router(x), self.top_k, True)
        return self.experts(x, weights, ids)
