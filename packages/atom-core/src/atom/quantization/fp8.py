"""FP8 (e4m3) weights with dynamically quantized activations: the `fp8` and `compressed-tensors` schemes.

Formats (read by atom.loader.fp8_format, auto-detected from config.json's quantization_config):
- fp8 + weight_block_size [bn, bk] (DeepSeek-V3, Qwen3-*-FP8): `weight` fp8 [N, K] and `weight_scale_inv`
  float32 [ceil(N/bn), ceil(K/bk)]; activations in 1 x bk groups.
- fp8 without a block size: `weight` fp8 and a per-tensor `weight_scale`; activations per token.
- compressed-tensors float-quantized (llm-compressor FP8_DYNAMIC): `weight` fp8 and a per-channel
  `weight_scale` [N, 1]; activations per token.
- `--quantization fp8` on a float checkpoint ("fp8-online"): float weights are loaded, then quantized per
  output channel (vLLM's online FP8).

Where the scales live (per layer, after loading):
- dense linears: `weight` fp8 [sum N_i, K] and one scale parameter. Block scales are stored per merged
  shard (shard i at block row sum_{j<i} ceil(N_i/bn), as the checkpoint's tensors stack); when a shard is
  not a multiple of bn they are expanded after loading to one row per output channel ([N, KB], block
  [1, bk]). Per-tensor scales (one entry per merged shard) become a per-channel vector (exact);
  per-channel scales stay [N, 1]. All scales are float32.
- MoE experts: w13 [E, 2I, H] and w2 [E, H, I] fp8 with w13_<suffix> / w2_<suffix> scales: block
  [E, 2 ceil(I/bn), ceil(H/bk)] (gate's block rows, then up's) and [E, ceil(H/bn), ceil(I/bk)], or per
  channel [E, 2I, 1] / [E, H, 1] (per-tensor and online experts are stored in the channel form). An
  fp8_fused_experts implementation that reads its own weight layout (AITER's (16, 16)-shuffled tiles:
  Impl.prepare_weights) gets w13 / w2 converted once after loading, in place of the checkpoint layout.
Modules the checkpoint keeps in float (`ignored_layers`, `modules_to_not_convert`, compressed-tensors
`ignore`; lm_head, embeddings, norms and MoE routers are never built with a scheme) get the unquantized
methods. On AMD MI300 (e4m3fnuz) e4m3fn checkpoint weights are converted (scales doubled, exact), for
every backend (the kernels read the GPU's own FP8 type); layers resolve their kernels with that type in
`static["fp8_dtype"]`, so self-checks quantize their inputs the same way and guards can refuse it.

The forward is the op registry's `fp8_linear` / `fp8_fused_experts` (Triton on GPUs, the torch reference
on CPU). On CPU the reference dequantizes the whole weight on every call; the linear method keeps the
dequantized float32 weight after loading instead (bit-identical; ATOM_FP8_CPU_DEQUANT_CACHE=0 turns it off).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from atom.distributed import get_tp_group
from atom.layers.fp8_input import Fp8Activation, Fp8InputFormat, Fp8RowMaxActivation
from atom.loader.fp8_format import Fp8Format, check_block_partition, parse_quantization_config
from atom.ops.quant_fp8 import (
    FP8_DTYPES,
    channel_scale,
    default_fp8_dtype,
    dequantize_weight,
    e4m3fn_to_e4m3fnuz,
    linear_on_dequantized,
    quantize_weight_fp8,
    quantize_with_scale,
)
from atom.ops.registry import impl_of, resolve
from atom.quantization.base import LinearMethod, MoEMethod, QuantizationConfig, dense_weight_read, new_param
from atom.quantization.registry import register_quantization

# ATOM's merged modules -> the checkpoint modules they hold (to test a module against `ignore` lists)
_MERGED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_SHARD_NAMES = {"qkv_proj": {"q": "q_proj", "k": "k_proj", "v": "v_proj"},
                "gate_up_proj": {0: "gate_proj", 1: "up_proj"}}
_EXPERT_SHARDS = {"w1": "gate_proj (w1)", "w3": "up_proj (w3)", "w2": "down_proj (w2)"}


def _fp8_dtype() -> torch.dtype:
    """The FP8 type weights are kept in on the device being built on (e4m3fnuz on MI300, else e4m3fn)."""
    return default_fp8_dtype() if torch.get_default_device().type == "cuda" else torch.float8_e4m3fn


def _dequant_cache_enabled() -> bool:
    return os.environ.get("ATOM_FP8_CPU_DEQUANT_CACHE", "1").strip() not in ("0", "false", "False", "")


def checkpoint_modules(prefix: str) -> list[str]:
    """The checkpoint module names behind an ATOM layer prefix (a merged layer holds several)."""
    base, _, last = prefix.rpartition(".")
    if last in _MERGED:
        return [f"{base}.{m}" for m in _MERGED[last]]
    if last == "experts":  # expert 0's projections stand for all of them (lists name modules, not experts)
        names = [f"{prefix}.0.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
        if ".mlp." in f".{base}.":  # Mixtral checkpoints: block_sparse_moe.experts.<e>.w1/w3/w2
            moe = prefix.replace(".mlp.", ".block_sparse_moe.")
            names += [f"{moe}.0.{p}" for p in ("w1", "w3", "w2")]
        return names
    return [prefix]


class _ScaleLoader:
    """Wraps a layer's weight_loader for the FP8 parameters: checkpoint scales in any of their accepted
    shapes ([] or [1] per tensor, [N] or [N, 1] per channel), FP8 weights checked to be FP8, and the
    shards loaded recorded (a merged layer missing some shard's scale is an error after loading)."""

    def __init__(self, layer: nn.Module, method, what: str):
        self.layer, self.method, self.what = layer, method, what

    def __call__(self, param: nn.Parameter, loaded: torch.Tensor, *shard) -> None:
        if self.what == "weight" and loaded.dtype not in FP8_DTYPES:
            raise ValueError(f"{self.layer.prefix}: the checkpoint's weight has dtype {loaded.dtype}, but its "
                             f"quantization_config ({self.method.format.method}) says the module is FP8 (list "
                             f"float modules in the config's ignored_layers / ignore)")
        if self.what == "tensor_scale" and loaded.numel() == 1:
            loaded = loaded.reshape(())
        elif self.what == "channel_scale" and loaded.dim() == 1:
            loaded = loaded.unsqueeze(-1)  # [N] -> [N, 1]
        self.layer.weight_loader(param, loaded, *shard)
        self.method.loaded.add((param_name(self.layer, param), *shard[:2]))


def param_name(layer: nn.Module, param: nn.Parameter) -> str:
    for name, p in layer.named_parameters(recurse=False):
        if p is param:
            return name
    return "?"


def _row_parallel(layer: nn.Module) -> bool:
    """A row-parallel layer split over more than one rank (each rank holds a slice of every row)."""
    from atom.layers.linear import RowParallelLinear  # the layers import this package

    return isinstance(layer, RowParallelLinear) and layer.tp_size > 1


class Fp8LinearMethod(LinearMethod):
    def __init__(self, fmt: Fp8Format):
        self.format = fmt
        self.online = fmt.method == "fp8-online"
        self.block_size = list(fmt.block_size) if fmt.layout == "block" else None
        self.loaded: set[tuple] = set()
        self.w_hat: torch.Tensor | None = None
        self.dense: torch.Tensor | None = None  # for a layer whose weight another op reads (MLA's kv_b_proj)

    @property
    def scale_name(self) -> str:
        return "weight_scale" if self.online else self.format.scale_suffix

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        self.output_sizes = list(output_sizes)
        self.fp8_dtype = _fp8_dtype()
        self.out_dtype = params_dtype
        n = sum(output_sizes)
        if self.online:  # float weights in, quantized after loading
            new_param(layer, "weight", (n, input_size), params_dtype, output_dim=0, input_dim=1)
        else:
            w = new_param(layer, "weight", (n, input_size), torch.float8_e4m3fn, output_dim=0, input_dim=1)
            w.weight_loader = _ScaleLoader(layer, self, "weight")
        if self.format.layout == "block" and not self.online:
            bn, bk = self.format.block_size
            if _row_parallel(layer):
                check_block_partition(self.format, layer.prefix, input_size, layer.tp_size)
            rows = sum(-(-s // bn) for s in output_sizes)
            s = new_param(layer, self.scale_name, (rows, -(-input_size // bk)), torch.float32, output_dim=0,
                          input_dim=1, output_block=bn, input_block=bk)
            s.weight_loader = _ScaleLoader(layer, self, "block_scale")
        elif self.format.layout == "tensor":
            s = new_param(layer, self.scale_name, (len(output_sizes),), torch.float32, per_shard=True)
            s.weight_loader = _ScaleLoader(layer, self, "tensor_scale")
        elif not self.online:  # channel
            s = new_param(layer, self.scale_name, (n, 1), torch.float32, output_dim=0)
            s.weight_loader = _ScaleLoader(layer, self, "channel_scale")
        self._resolve_linear(n, input_size)

    def _resolve_linear(self, n: int, k: int) -> None:
        self.linear = resolve("fp8_linear", static={
            "block_size": tuple(self.block_size) if self.block_size else None, "output_size": n, "input_size": k,
            "fp8_dtype": self.fp8_dtype})
        # activations quantized by their producer (atom.layers.fp8_input) meet the same Triton GEMM
        impl = impl_of(self.linear)
        triton_gemm = impl is not None and impl.backend == "triton"
        self.linear_quantized = resolve("fp8_linear_quantized", "triton") if triton_gemm else None
        # float activations with their rows' partial maxima (per-token layouts: the GEMM quantizes them)
        self.linear_rowmax = resolve("fp8_linear_rowmax", "triton") if triton_gemm and not self.block_size else None

    def _check_shards_loaded(self, layer: nn.Module) -> None:
        if not self.loaded or len(self.output_sizes) == 1:
            return  # nothing came through the loader (dummy weights), or a single tensor (load_model checks it)
        last = layer.prefix.rpartition(".")[2]
        shards = list(_SHARD_NAMES.get(last, {i: str(i) for i in range(len(self.output_sizes))}).items())
        for pname in ("weight", self.scale_name):
            have = {k[1] for k in self.loaded if k[0] == pname and len(k) > 1}
            for shard, module in shards:
                if shard not in have:
                    raise ValueError(f"{layer.prefix}: the checkpoint has no {pname} for its shard {module} "
                                     f"({layer.prefix.rpartition('.')[0]}.{module}.{pname})")

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self._check_shards_loaded(layer)
        self.loaded = set()
        if self.online:
            q, scale = self._quantize_online(layer)
        else:
            q, scale = layer.weight.data, getattr(layer, self.scale_name).data.float()
            if self.format.layout == "tensor":  # one scale per merged shard -> one per output row (exact)
                sizes = torch.tensor(self.output_sizes, device=scale.device)
                scale = torch.repeat_interleave(scale, sizes)[:, None].contiguous()
            elif self.format.layout == "block" and any(s % self.block_size[0] for s in self.output_sizes[:-1]):
                scale = self._row_expanded(scale)
                self.block_size = [1, self.block_size[1]]
                self._resolve_linear(q.shape[0], q.shape[1])
            if self.fp8_dtype == torch.float8_e4m3fnuz:
                q, scale = e4m3fn_to_e4m3fnuz(q, scale)
        for name in ("weight", self.scale_name):
            if hasattr(layer, name):
                delattr(layer, name)
        layer.register_parameter("weight", nn.Parameter(q, requires_grad=False))
        layer.register_parameter("weight_scale", nn.Parameter(scale.contiguous(), requires_grad=False))
        impl = impl_of(self.linear)
        if impl is not None and impl.backend == "torch" and q.device.type == "cpu" and _dequant_cache_enabled():
            self.w_hat = dequantize_weight(q, layer.weight_scale.data, self.block_size)
        self.dense = self.dequantized_weight(layer) if dense_weight_read(layer) else None

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        """W_hat (the oracle's weight: fp8 entries times their scales) in the compute dtype. MLA's absorbed
        attention multiplies the latent cache by it: that product is not an FP8 GEMM, so it runs in float."""
        if self.dense is not None:
            return self.dense
        return dequantize_weight(layer.weight, layer.weight_scale, self.block_size).to(self.out_dtype)

    def _row_expanded(self, scale: torch.Tensor) -> torch.Tensor:
        """Per-shard block rows -> one row of K-block scales per output channel ([N, KB], block [1, bk])."""
        bn = self.block_size[0]
        rows, start = [], 0
        for size in self.output_sizes:
            nb = -(-size // bn)
            rows.append(scale[start:start + nb].repeat_interleave(bn, 0)[:size])
            start += nb
        return torch.cat(rows)

    def _quantize_online(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        w = layer.weight.data
        if _row_parallel(layer):
            # each rank holds a slice of every row: the scale comes from the whole row's amax (as vLLM)
            amax = get_tp_group().all_gather(w.float().abs().amax(-1, keepdim=True), dim=-1).amax(-1)
            scale = channel_scale(amax, self.fp8_dtype)
            return quantize_with_scale(w, scale, self.fp8_dtype), scale
        q, scale = quantize_weight_fp8(w, "channel", fp8_dtype=self.fp8_dtype)
        return q, scale.float()

    def fused_input_format(self) -> Fp8InputFormat | None:
        """The layout in which this layer takes pre-quantized activations (an Fp8Activation: its Triton GEMM
        without the quantization kernel), or None when it does not (the CPU torch path)."""
        if self.linear_quantized is None or self.w_hat is not None:
            return None
        return Fp8InputFormat(int(self.block_size[1]) if self.block_size else None, self.fp8_dtype)

    def defers_split(self, consumer: str) -> bool:
        """Whether apply can leave a split-K GEMM's partials to a consumer of this kind (split_parts;
        LinearBase.leave_splits): the Triton GEMM, with the consumer's switch on (ATOM_FP8_NORM_SUMS_SPLITS for
        "norm", ATOM_FP8_ATTN_SUMS_SPLITS for "attention", ATOM_FP8_ACT_SUMS_SPLITS for "activation")."""
        if self.linear_quantized is None:
            return False
        from atom.ops.triton_kernels import quant_fp8  # the Triton GEMM runs: importable

        return quant_fp8.consumer_sums_splits(consumer)

    def apply(self, layer: nn.Module, x: torch.Tensor | Fp8Activation,
              bias: torch.Tensor | None = None, split_parts: list | None = None) -> torch.Tensor:
        """split_parts (a list; only where defers_split): a GEMM that splits over K appends its float32 partials
        [splits, M, N] to it and leaves the returned tensor unwritten (the caller hands the partials on)."""
        extra = {} if split_parts is None else {"parts": split_parts}
        if isinstance(x, Fp8Activation):  # quantized by its producer in fused_input_format's layout
            return self.linear_quantized(x.q, x.scale, layer.weight, layer.weight_scale, bias, self.block_size,
                                         x.dtype, **extra)
        if isinstance(x, Fp8RowMaxActivation):  # per token: the GEMM quantizes x from the producer's row maxima
            return self.linear_rowmax(x.x, x.parts, layer.weight, layer.weight_scale, bias, x.x.dtype,
                                      **({} if split_parts is None else {"split_parts": split_parts}))
        if self.w_hat is not None:
            return linear_on_dequantized(x, self.w_hat, bias, self.block_size, layer.weight.dtype)
        return self.linear(x, layer.weight, layer.weight_scale, bias, self.block_size, **extra)


class Fp8MoEMethod(MoEMethod):
    # both fp8_fused_experts implementations (torch reference, Triton) skip pairs of id -1
    supports_expert_parallel = True

    def __init__(self, fmt: Fp8Format):
        self.format = fmt
        self.online = fmt.method == "fp8-online"
        self.block_size = list(fmt.block_size) if fmt.layout == "block" else None
        self.loaded: set[tuple] = set()

    @property
    def suffix(self) -> str:
        return "weight_scale" if self.online else self.format.scale_suffix

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int, intermediate_size: int,
                       params_dtype: torch.dtype) -> None:
        self.fp8_dtype = _fp8_dtype()
        e, h, i = num_experts, hidden_size, intermediate_size
        wdtype = params_dtype if self.online else torch.float8_e4m3fn
        w13 = new_param(layer, "w13", (e, 2 * i, h), wdtype, output_dim=0)
        w2 = new_param(layer, "w2", (e, h, i), wdtype, input_dim=1)
        if not self.online:
            w13.weight_loader = w2.weight_loader = _ScaleLoader(layer, self, "weight")
        s13, s2 = f"w13_{self.suffix}", f"w2_{self.suffix}"
        if self.online:
            pass
        elif self.format.layout == "block":
            bn, bk = self.format.block_size
            if layer.tp_size > 1 and i % bk:
                raise ValueError(f"{layer.prefix}: the experts' intermediate size per rank {i} (tensor parallel "
                                 f"{layer.tp_size}) is not a multiple of the weight block's K size {bk}")
            a = new_param(layer, s13, (e, 2 * -(-i // bn), -(-h // bk)), torch.float32, output_dim=0,
                          output_block=bn)
            b = new_param(layer, s2, (e, -(-h // bn), -(-i // bk)), torch.float32, input_dim=1, input_block=bk)
            a.weight_loader = b.weight_loader = _ScaleLoader(layer, self, "block_scale")
        elif self.format.layout == "tensor":
            a = new_param(layer, s13, (e, 2), torch.float32, per_shard=True)
            b = new_param(layer, s2, (e,), torch.float32)
            a.weight_loader = b.weight_loader = _ScaleLoader(layer, self, "tensor_scale")
        else:  # channel
            a = new_param(layer, s13, (e, 2 * i, 1), torch.float32, output_dim=0)
            b = new_param(layer, s2, (e, h, 1), torch.float32)
            a.weight_loader = b.weight_loader = _ScaleLoader(layer, self, "channel_scale")
        static = {"activation": layer.activation, "hidden_size": h, "intermediate_size": i,
                  "block_size": tuple(self.block_size) if self.block_size else None, "fp8_dtype": self.fp8_dtype}
        if getattr(layer, "ep_size", 1) > 1:  # an implementation that cannot skip id -1 refuses it (atom.ops.moe)
            static["expert_parallel"] = True
        self.experts = resolve("fp8_fused_experts", static=static)

    def _check_experts_loaded(self, layer: nn.Module) -> None:
        if not self.loaded:
            return
        for pname, shards in (("w13", ("w1", "w3")), ("w2", ("w2",)), (f"w13_{self.suffix}", ("w1", "w3")),
                              (f"w2_{self.suffix}", ("w2",))):
            have = {(k[1], k[2]) for k in self.loaded if k[0] == pname and len(k) > 2}
            for expert in range(layer.num_experts):
                for shard in shards:
                    if (shard, expert) not in have and ("w13", expert) not in have:
                        what = "weight" if pname in ("w13", "w2") else self.suffix
                        raise ValueError(f"{layer.prefix}: the checkpoint has no {what} for expert {expert}'s "
                                         f"{_EXPERT_SHARDS[shard]}")

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self._check_experts_loaded(layer)
        self.loaded = set()
        inter = layer.w2.shape[-1]
        if self.online:
            w13, s13 = self._quantize_experts(layer.w13.data)
            w2, s2 = self._quantize_experts(layer.w2.data, row_parallel=layer.tp_size > 1)
        else:
            w13, w2 = layer.w13.data, layer.w2.data
            s13 = getattr(layer, f"w13_{self.suffix}").data.float()
            s2 = getattr(layer, f"w2_{self.suffix}").data.float()
            if self.format.layout == "tensor":  # per (expert, shard) -> per output row, exact
                s13 = s13.repeat_interleave(inter, dim=1)[..., None].contiguous()
                s2 = s2[:, None, None].expand(-1, w2.shape[1], 1).contiguous()
            if self.fp8_dtype == torch.float8_e4m3fnuz:
                w13, s13 = e4m3fn_to_e4m3fnuz(w13, s13)
                w2, s2 = e4m3fn_to_e4m3fnuz(w2, s2)
        prepare = impl_of(self.experts).prepare_weights
        if prepare is not None:  # the kernel's own layout (AITER's shuffled tiles), instead of the checkpoint's
            w13, w2 = prepare(w13, w2)
        for name in ("w13", "w2", f"w13_{self.suffix}", f"w2_{self.suffix}"):
            if hasattr(layer, name):
                delattr(layer, name)
        for name, t in (("w13", w13), ("w2", w2), ("w13_scale", s13), ("w2_scale", s2)):
            layer.register_parameter(name, nn.Parameter(t.contiguous(), requires_grad=False))

    def _quantize_experts(self, w: torch.Tensor, row_parallel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        qs, ss = [], []
        for e in range(w.shape[0]):
            if row_parallel:
                amax = get_tp_group().all_gather(w[e].float().abs().amax(-1, keepdim=True), dim=-1).amax(-1)
                s = channel_scale(amax, self.fp8_dtype)
                q = quantize_with_scale(w[e], s, self.fp8_dtype)
            else:
                q, s = quantize_weight_fp8(w[e], "channel", fp8_dtype=self.fp8_dtype)
            qs.append(q)
            ss.append(s.float())
        return torch.stack(qs), torch.stack(ss)

    def apply(self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        return self.experts(x, layer.w13, layer.w2, layer.w13_scale, layer.w2_scale, topk_weights, topk_ids,
                            layer.activation, self.block_size)


class _Fp8Scheme(QuantizationConfig):
    """Shared by both registered names: one parsed checkpoint format, methods for the modules it quantizes."""

    def __init__(self, fmt: Fp8Format):
        self.format = fmt

    @property
    def kv_cache_scheme(self) -> dict | None:
        return self.format.kv_cache_scheme

    def _quantized(self, prefix: str) -> bool:
        names = checkpoint_modules(prefix)
        flags = {self.format.is_quantized(n) for n in names}
        if len(flags) > 1:
            raise ValueError(f"quantization_config: {', '.join(names)} are merged into one layer ({prefix}) but "
                             "only some of them are listed as not quantized; all shards of a merged layer need "
                             "the same precision")
        return flags.pop()

    def linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        return Fp8LinearMethod(self.format) if self._quantized(prefix) else None

    def moe_method(self, layer: nn.Module, prefix: str) -> MoEMethod | None:
        return Fp8MoEMethod(self.format) if self._quantized(prefix) else None


@register_quantization("fp8")
class Fp8Config(_Fp8Scheme):
    """quant_method fp8 (block or per-tensor), or `--quantization fp8` on a float checkpoint (online)."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Fp8Config:
        return cls(parse_quantization_config(dict(config) if config else None, "fp8"))


@register_quantization("compressed-tensors")
class CompressedTensorsFp8Config(_Fp8Scheme):
    """compressed-tensors float-quantized checkpoints (FP8 weights, dynamic FP8 activations)."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CompressedTensorsFp8Config:
        if not config:
            raise ValueError("--quantization compressed-tensors needs the checkpoint's quantization_config "
                             "(config.json has none); use --quantization fp8 to quantize a float checkpoint")
        return cls(parse_quantization_config(dict(config)))
