"""FP8 (e4m3) quantization: dynamic activation scales, weight quantization, and the FP8 linear / MoE
references. These torch functions are the oracle of the Triton kernels and the CPU path.

Formats
-------
`torch.float8_e4m3fn` (OCP e4m3, NVIDIA Hopper+, AMD MI350) has a 4-bit exponent (bias 7), 3 mantissa
bits, no infinities, max 448, smallest normal 2^-6, subnormal step 2^-9. `torch.float8_e4m3fnuz` (AMD
MI300) has bias 8 (the same bit pattern is worth half as much), max 240, smallest normal 2^-7, subnormal
step 2^-10, a single zero, and the bit pattern of e4m3fn's -0 (0x80) is its NaN. Quantization clamps to
`fp8_max(dtype)`: 448 for e4m3fn, 224 for e4m3fnuz (vLLM's choice on ROCm: 240 costs accuracy with
dynamic scales). Checkpoints are e4m3fn; `e4m3fn_to_e4m3fnuz` converts a weight + scale exactly.

Convention (vLLM's native quantization and its online per-channel weight quantization; DeepSeek-V3's
`act_quant` is the same up to its floor): for each quantization group g (a 1 x group_size slice of a row
for per-token-group, a whole row for per-token, a row of the weight for per-channel, a block of the weight)

    scale_g = max(amax_g / fp8_max, 1 / (fp8_max * 512))         float32, IEEE division
    q       = fp8(clamp(x / scale_g, -fp8_max, fp8_max))          float32 division, round to nearest even
    x ~ q * scale_g                                               (dequantized)

Every step is exact IEEE float32 arithmetic plus one round-to-nearest-even to e4m3, so a kernel doing the
same operations produces bit-identical q and scales (the Triton kernels do; tests check equality).

Layouts
-------
- per-token-group activations (block checkpoints): q [M, K], scales [M, ceil(K / group)] float32; the last
  group of a row may be partial (K not a multiple of the group).
- per-token activations (per-tensor / per-channel checkpoints): scales [M, 1].
- block weights (DeepSeek-V3, Qwen3-FP8: `weight_scale_inv`): w [N, K] fp8, scale [ceil(N/bn), ceil(K/bk)]
  for block_size [bn, bk] (partial edge blocks allowed, as in DeepSeek-V3's kv_a_proj [576, 7168]).
  bn = 1 is the row-expanded form of the same scales (one row of K-block scales per output row), which
  lets merged layers stack shards whose sizes are not multiples of bn.
- per-channel weights (compressed-tensors `float-quantized`, strategy channel): scale [N, 1] (or [N]).
- per-tensor weights (`quant_method: fp8` without `weight_block_size`): scale [] or [1].

Reference semantics of `fp8_linear`: quantize the activations exactly as the kernels do, dequantize
activations and weights to float32, matmul in float32, add the bias, cast to the activation dtype. So an
FP8 model differs from its dequantized-weight float model by activation quantization only:

Error bound of activation quantization
--------------------------------------
Let y = x / s with |y| <= fp8_max. Round to nearest e4m3 has a half-ulp error: for |y| >= 2^-6 (normal)
the ulp is 2^(e-3) <= 2^-3 |y|, so |q - y| <= 2^-4 |y|; below 2^-6 (subnormal) |q - y| <= 2^-10. e4m3fnuz
is finer at the bottom (2^-11), so the e4m3fn bound covers both. Dequantized, per element:

    |x_hat - x| <= 2^-4 |x| + 2^-10 s        (s = the element's group scale, ~ amax_g / fp8_max)

and for a linear layer with dequantized weight W_hat (treated as exact: it is what the reference model
runs), since y_hat - y = (x_hat - x) W_hat^T, elementwise:

    |y_hat - y| <= 2^-4 (|x| @ |W_hat|^T) + 2^-10 (s_row @ |W_hat|^T)     (hard bound)

The second term is ~2^-10 / 448 of amax-scale and negligible. Typically (rounding errors independent,
uniform in +-ulp/2) the error is ~2.5% RMS per element (sqrt(E[delta^2]) with delta uniform in +-2^-4/m for
a mantissa m in [1, 2)), so the relative-norm error of y is about 0.025 * ||(|x| |W|)||/||y||, about 2-3%
for random unit-scale inputs. Add the output's own rounding (2^-9 relative for bfloat16) and float32
accumulation (~K 2^-24 relative, also for Hopper's FP8 tensor cores, whose partial sums are promoted to
float32 every K step of the kernels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from atom.ops.registry import define_op, register

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e4m3fnuz: 224.0}
# Rows of a weight quantized at once: bounds the float32 temporaries of load-time quantization.
_CHUNK_ELEMS = 1 << 24


def fp8_max(dtype: torch.dtype) -> float:
    """The clamp bound of quantization: 448 (e4m3fn), 224 (e4m3fnuz, as vLLM on ROCm)."""
    if dtype not in _FP8_MAX:
        raise ValueError(f"{dtype} is not an FP8 e4m3 dtype (float8_e4m3fn or float8_e4m3fnuz)")
    return _FP8_MAX[dtype]


def fp8_min_scale(dtype: torch.dtype) -> float:
    """The scale floor, 1 / (fp8_max * 512): an all-zero group still gets a finite, nonzero scale."""
    return 1.0 / (fp8_max(dtype) * 512.0)


def default_fp8_dtype() -> torch.dtype:
    """e4m3fnuz on MI300-class GPUs (gfx94x), e4m3fn everywhere else (NVIDIA, MI350, CPU)."""
    if torch.cuda.is_available() and torch.version.hip:
        arch = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "gcnArchName", "")
        if "gfx94" in arch:
            return torch.float8_e4m3fnuz
    return torch.float8_e4m3fn


def _scale_of(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A tensor divisor keeps the true IEEE division (a Python float divisor may become a multiply by the
    # reciprocal on CUDA), which is what the kernels compute.
    fmax = torch.tensor(fp8_max(dtype), dtype=torch.float32, device=amax.device)
    return (amax.float() / fmax).clamp_min(fp8_min_scale(dtype))


def _to_fp8(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fmax = fp8_max(dtype)
    return y.clamp(-fmax, fmax).to(dtype)


def _check_fp8(t: torch.Tensor, what: str) -> None:
    if t.dtype not in FP8_DTYPES:
        raise ValueError(f"{what} must be float8_e4m3fn or float8_e4m3fnuz, got {t.dtype}")


# ---------------------------------------------------------------- op declarations (custom ops, self-checks)


def _fp8_of(static) -> torch.dtype:
    return static.get("fp8_dtype", torch.float8_e4m3fn)


def _block_of(static):
    block = static.get("block_size")
    return None if block is None else [int(b) for b in block]


def _linear_example(t, static):
    """A decode-sized and a prefill-sized call on a weight quantized in the layer's layout."""
    n, k = int(static.get("output_size", 192)), int(static.get("input_size", 256))
    block = _block_of(static)
    scheme = "block" if block is not None else static.get("weight_layout", "channel")
    q, scale = quantize_weight_fp8(t.randn(n, k, dtype=torch.float32, scale=k**-0.5), scheme, block or (128, 128),
                                   _fp8_of(static))
    scale = scale.float()
    return [(t.randn(m, k), q, scale, None, block) for m in (1, 7)]


def _experts_example(t, static):
    hidden, inter = int(static.get("hidden_size", 256)), int(static.get("intermediate_size", 128))
    block, fp8 = _block_of(static), _fp8_of(static)
    experts, tokens, top_k = 4, 5, 2

    def quantized(rows: int, cols: int, half: bool):
        ws, ss = [], []
        for _ in range(experts):
            parts = [t.randn(rows // 2 if half else rows, cols, dtype=torch.float32, scale=cols**-0.5)
                     for _ in range(2 if half else 1)]
            qs = [quantize_weight_fp8(p, "block" if block else "channel", block or (128, 128), fp8) for p in parts]
            ws.append(torch.cat([q for q, _ in qs]))
            ss.append(torch.cat([s.float() for _, s in qs]))
        return torch.stack(ws), torch.stack(ss)

    w13, s13 = quantized(2 * inter, hidden, True)
    w2, s2 = quantized(hidden, inter, False)
    ids = torch.stack([t.randperm(experts)[:top_k] for _ in range(tokens)])
    weights = torch.softmax(t.randn(tokens, top_k, dtype=torch.float32), dim=-1)
    return (t.randn(tokens, hidden), w13, w2, s13, s2, weights, ids, static.get("activation", "silu"), block)


def _group_quant_fake(x, group_size=128, fp8_dtype=torch.float8_e4m3fn):
    return (x.new_empty(x.shape, dtype=fp8_dtype),
            x.new_empty(*x.shape[:-1], -(-x.shape[-1] // group_size), dtype=torch.float32))


def _token_quant_fake(x, fp8_dtype=torch.float8_e4m3fn):
    return x.new_empty(x.shape, dtype=fp8_dtype), x.new_empty(*x.shape[:-1], 1, dtype=torch.float32)


define_op("fp8_quant_group", fake=_group_quant_fake,
          example=lambda t, static: (t.randn(6, 320), int(static.get("group_size", 128)), _fp8_of(static)))
define_op("fp8_quant_token", fake=_token_quant_fake, example=lambda t, static: (t.randn(6, 320), _fp8_of(static)))
# Load-time only (never inside a compiled or captured forward): plain torch, not a custom op.
define_op("fp8_quantize_weight", custom_op=False,
          example=lambda t, static: [(t.randn(48, 160), scheme, [32, 64], _fp8_of(static))
                                     for scheme in ("block", "channel", "tensor")])
define_op("fp8_linear", example=_linear_example,
          fake=lambda x, weight, *args, **kwargs: x.new_empty(*x.shape[:-1], weight.shape[0]))
define_op("fp8_fused_experts", example=_experts_example, weight_args=("w13", "w2"),
          fake=lambda x, w13, w2, *args, **kwargs: x.new_empty(x.shape[0], w2.shape[1]))


# ---------------------------------------------------------------- activations


def _group_of_column(k: int, group_size: int, device) -> torch.Tensor:
    """The group index of each of k columns. Per-column scales are gathered with it, not repeat_interleave'd
    and sliced to k: Inductor miscompiled that slice (and the slice of padded fp8 codes back to k columns) under
    size-oblivious dynamic shapes, atom-server's compiled CPU forward (torch 2.13: garbage when k is not a
    multiple of the group size)."""
    return torch.arange(k, device=device) // group_size


# _scale_of copies its divisor from the host: not capturable (the Triton kernels are).
@register("fp8_quant_group", "torch", cuda_graph=False)
def per_token_group_quant_fp8(
    x: torch.Tensor, group_size: int = 128, fp8_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q [..., K] fp8, scales [..., ceil(K / group_size)] float32): one scale per 1 x group
    slice of each row (the last slice may be partial)."""
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    k = x.shape[-1]
    groups = -(-k // group_size)
    rows = x.reshape(-1, k).float()
    padded = F.pad(rows, (0, groups * group_size - k)).view(rows.shape[0], groups, group_size)
    scales = _scale_of(padded.abs().amax(-1), fp8_dtype)
    # each element over its group's scale, on the unpadded rows (_group_of_column says why)
    q = _to_fp8(rows / scales.index_select(-1, _group_of_column(k, group_size, x.device)), fp8_dtype)
    return q.reshape(x.shape), scales.reshape(*x.shape[:-1], groups)


@register("fp8_quant_token", "torch", cuda_graph=False)
def per_token_quant_fp8(
    x: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q [..., K] fp8, scales [..., 1] float32): one scale per row (token)."""
    xf = x.float()
    scales = _scale_of(xf.abs().amax(-1, keepdim=True), fp8_dtype)
    return _to_fp8(xf / scales, fp8_dtype), scales


def dequantize_activations(q: torch.Tensor, scales: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """float32 x_hat of per-token (scales [..., 1], group_size None) or per-token-group quantization
    (scales [..., ceil(K / group_size)])."""
    k = q.shape[-1]
    if group_size is None:
        if scales.shape[-1] != 1:
            raise ValueError(f"per-token scales must have a last dim of 1, got {tuple(scales.shape)}")
        return q.float() * scales
    if scales.shape[-1] != -(-k // group_size):
        raise ValueError(f"{scales.shape[-1]} group scales for {k} features in groups of {group_size}")
    return q.float() * scales.index_select(-1, _group_of_column(k, group_size, q.device))


# ---------------------------------------------------------------- weights


def weight_scale_shape(weight_shape: tuple[int, ...], block_size: list[int] | tuple[int, int] | None,
                       per_tensor: bool = False) -> tuple[int, ...]:
    """The scale shape a weight [N, K] must come with: block [ceil(N/bn), ceil(K/bk)], per-channel [N, 1],
    per-tensor []."""
    n, k = weight_shape[-2:]
    if block_size is not None:
        bn, bk = _block(block_size)
        return (-(-n // bn), -(-k // bk))
    return () if per_tensor else (n, 1)


def _block(block_size) -> tuple[int, int]:
    if len(block_size) != 2 or any(int(b) <= 0 for b in block_size):
        raise ValueError(f"block_size must be two positive ints [block_n, block_k], got {list(block_size)}")
    return int(block_size[0]), int(block_size[1])


def check_weight_scale(scale: torch.Tensor, n: int, k: int, block_size=None, what: str = "weight") -> None:
    """Raise a ValueError naming the shapes when `scale` does not fit a [N, K] weight in its layout."""
    if block_size is not None:
        bn, bk = _block(block_size)
        want = (-(-n // bn), -(-k // bk))
        if tuple(scale.shape) != want:
            raise ValueError(f"{what} block scale has shape {tuple(scale.shape)}; a weight [{n}, {k}] with "
                             f"block_size [{bn}, {bk}] needs [{want[0]}, {want[1]}]")
    elif not (scale.numel() == 1 and scale.dim() <= 1) and tuple(scale.shape) not in ((n,), (n, 1)):
        raise ValueError(f"{what} scale has shape {tuple(scale.shape)}; a weight [{n}, {k}] without block_size "
                         f"needs a per-tensor scale ([] or [1]) or a per-channel scale ([{n}] or [{n}, 1])")


def expand_weight_scale(scale: torch.Tensor, n: int, k: int, block_size=None) -> torch.Tensor:
    """A weight scale of any layout as a float32 [N, K] tensor (one scale per element)."""
    check_weight_scale(scale, n, k, block_size)
    scale = scale.float()
    if block_size is not None:
        bn, bk = _block(block_size)
        return scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return scale.reshape(-1, 1).expand(n, k)


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, block_size=None) -> torch.Tensor:
    """float32 W_hat = q * scale for a [N, K] FP8 weight in any of the three layouts."""
    _check_fp8(weight, "weight")
    n, k = weight.shape
    return weight.float() * expand_weight_scale(scale, n, k, block_size)


@register("fp8_quantize_weight", "torch")
def quantize_weight_fp8(
    weight: torch.Tensor,
    scheme: str = "channel",
    block_size: list[int] | tuple[int, int] = (128, 128),
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load-time (or checkpoint-writing) quantization of a float weight [N, K].

    scheme "channel": scale [N, 1] per output row (vLLM's `--quantization fp8` on a float checkpoint);
    "tensor": one scale, shape []; "block": scale [ceil(N/bn), ceil(K/bk)] (DeepSeek/Qwen3-FP8's
    weight_scale_inv). The scale is rounded to `scale_dtype` first (compressed-tensors stores it in the
    weight's dtype) and the weight is quantized with the rounded scale, so q * stored_scale is the
    dequantized weight. Returns (q fp8 [N, K], scale)."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight_fp8 takes a 2-D weight, got shape {tuple(weight.shape)}")
    if weight.dtype in FP8_DTYPES:
        raise ValueError("the weight is already FP8")
    n, k = weight.shape
    w = weight.float()
    if scheme == "tensor":
        scale = _scale_of(w.abs().amax(), fp8_dtype).to(scale_dtype)
        full = scale.float().reshape(1, 1)
    elif scheme == "channel":
        scale = _scale_of(w.abs().amax(-1, keepdim=True), fp8_dtype).to(scale_dtype)
        full = scale.float()
    elif scheme == "block":
        bn, bk = _block(block_size)
        nb, kb = -(-n // bn), -(-k // bk)
        blocks = F.pad(w.abs(), (0, kb * bk - k, 0, nb * bn - n)).view(nb, bn, kb, bk)
        scale = _scale_of(blocks.amax(dim=(1, 3)), fp8_dtype).to(scale_dtype)
        full = expand_weight_scale(scale, n, k, (bn, bk))
    else:
        raise ValueError(f"unknown FP8 weight scheme {scheme!r}; choose channel, tensor or block")
    return quantize_with_scale(w, full, fp8_dtype), scale


def channel_scale(row_amax: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """Per-channel weight scales [N, 1] float32 from each output row's amax (quantize_weight_fp8's rule):
    for rows whose amax is taken over more than one tensor (the input slices of tensor-parallel ranks)."""
    return _scale_of(row_amax.reshape(-1, 1), fp8_dtype)


def quantize_with_scale(weight: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """fp8(clamp(weight / scale)) for a float [N, K] weight and a scale broadcastable to it ([N, K], [N, 1]
    or []), a few rows at a time (bounds the float32 temporaries of load-time quantization)."""
    n, k = weight.shape
    full = scale.float().expand(n, k) if scale.dim() else scale.float().reshape(1, 1).expand(n, k)
    q = torch.empty(n, k, dtype=fp8_dtype, device=weight.device)
    step = max(1, _CHUNK_ELEMS // max(k, 1))
    for r in range(0, n, step):
        rows = slice(r, r + step)
        q[rows] = _to_fp8(weight[rows].float() / full[rows], fp8_dtype)
    return q


def e4m3fn_to_e4m3fnuz(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An e4m3fn checkpoint weight for MI300 (e4m3fnuz): the same bits read as fnuz are worth half, so the
    scale doubles; e4m3fn's -0 (0x80) is fnuz's NaN and becomes 0. Dequantized values are unchanged."""
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"expected a float8_e4m3fn weight, got {weight.dtype}")
    bits = weight.view(torch.int8).clone()
    bits[bits == -128] = 0
    return bits.view(torch.float8_e4m3fnuz), scale * 2.0


# ---------------------------------------------------------------- linear


def quantize_activations(x: torch.Tensor, block_size, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation quantization that goes with a weight layout: 1 x block_k groups for block weights,
    per token otherwise."""
    if block_size is not None:
        return per_token_group_quant_fp8(x, _block(block_size)[1], fp8_dtype)
    return per_token_quant_fp8(x, fp8_dtype)


def fake_quantize_activations(x: torch.Tensor, block_size, fp8_dtype: torch.dtype) -> torch.Tensor:
    """float32 x_hat: x quantized as for a weight layout and dequantized."""
    q, s = quantize_activations(x, block_size, fp8_dtype)
    return dequantize_activations(q, s, None if block_size is None else _block(block_size)[1])


def check_linear_args(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias, block_size) -> None:
    """Shape and dtype checks shared by every fp8_linear implementation (clear errors, no kernel faults)."""
    _check_fp8(weight, "fp8_linear weight")
    if weight.dim() != 2:
        raise ValueError(f"fp8_linear weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"fp8_linear: input has {x.shape[-1]} features, the weight [{n}, {k}] expects {k}")
    if x.dtype in FP8_DTYPES or not x.dtype.is_floating_point:
        raise ValueError(f"fp8_linear takes float activations (quantized inside), got {x.dtype}")
    if weight_scale.dtype != torch.float32:
        raise ValueError(f"fp8_linear weight scale must be float32, got {weight_scale.dtype}")
    check_weight_scale(weight_scale, n, k, block_size, "fp8_linear weight")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"fp8_linear bias has shape {tuple(bias.shape)}, expected ({n},)")


@register("fp8_linear", "torch", cuda_graph=False)
def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_size: list[int] | None = None,
) -> torch.Tensor:
    """y = x W^T + b with an FP8 weight [N, K] and dynamically quantized activations; y in x's dtype.

    block_size [bn, bk]: block weight scales [ceil(N/bn), ceil(K/bk)] and 1 x bk activation groups;
    None: per-tensor ([] / [1]) or per-channel ([N] / [N, 1]) weight scales and per-token activations.
    The activations are quantized to the weight's FP8 dtype."""
    check_linear_args(x, weight, weight_scale, bias, block_size)
    return linear_on_dequantized(x, dequantize_weight(weight, weight_scale, block_size), bias, block_size,
                                 weight.dtype)


def linear_on_dequantized(x: torch.Tensor, w_hat: torch.Tensor, bias: torch.Tensor | None, block_size,
                          fp8_dtype: torch.dtype) -> torch.Tensor:
    """fp8_linear's arithmetic with the weight already dequantized (float32 W_hat [N, K]): the CPU path
    keeps W_hat after loading instead of dequantizing it on every call (bit-identical results)."""
    y = F.linear(fake_quantize_activations(x, block_size, fp8_dtype), w_hat)  # 3x faster than @ w.t() on CPU
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---------------------------------------------------------------- MoE


def expert_scale_rows(scale: torch.Tensor, n_half: int, block_size) -> torch.Tensor:
    """One expert's fused gate|up weight scale as [2 * n_half, K_blocks] rows (block) or [2 * n_half, 1].

    Block layout: [2 * ceil(n_half / bn), ceil(K / bk)] = the gate's block rows then the up's, as the two
    checkpoint tensors' scales stack (so n_half need not be a multiple of bn)."""
    if block_size is None:
        return scale.float().reshape(-1, 1)
    bn = _block(block_size)[0]
    per_half = -(-n_half // bn)
    if scale.shape[0] != 2 * per_half:
        raise ValueError(f"w13 block scale has {scale.shape[0]} block rows; gate and up of {n_half} rows each "
                         f"with block_n {bn} need 2 x {per_half}")
    gate, up = scale.float()[:per_half], scale.float()[per_half:]
    return torch.cat([gate.repeat_interleave(bn, 0)[:n_half], up.repeat_interleave(bn, 0)[:n_half]])


def dequantize_expert_w13(w13: torch.Tensor, scale: torch.Tensor, block_size) -> torch.Tensor:
    """float32 [2I, H] of one expert's fused gate|up FP8 weight (see expert_scale_rows for the layout)."""
    _check_fp8(w13, "w13")
    two_i, h = w13.shape
    rows = expert_scale_rows(scale, two_i // 2, block_size)
    if block_size is None:
        return w13.float() * rows
    bk = _block(block_size)[1]
    if rows.shape[1] != -(-h // bk):
        raise ValueError(f"w13 block scale has {rows.shape[1]} K blocks; {h} inputs with block_k {bk} need "
                         f"{-(-h // bk)}")
    return w13.float() * rows.repeat_interleave(bk, 1)[:, :h]


def check_experts_args(x, w13, w2, w13_scale, w2_scale, block_size) -> None:
    _check_fp8(w13, "fp8_fused_experts w13")
    _check_fp8(w2, "fp8_fused_experts w2")
    if w13.dtype != w2.dtype:
        raise ValueError(f"w13 ({w13.dtype}) and w2 ({w2.dtype}) must share one FP8 dtype")
    e, two_i, h = w13.shape
    if tuple(w2.shape) != (e, h, two_i // 2):
        raise ValueError(f"w2 has shape {tuple(w2.shape)}, expected {(e, h, two_i // 2)} for w13 {tuple(w13.shape)}")
    if x.shape[-1] != h:
        raise ValueError(f"fp8_fused_experts: input has {x.shape[-1]} features, experts expect {h}")
    for name, s, n, k, half in (("w13", w13_scale, two_i, h, True), ("w2", w2_scale, h, two_i // 2, False)):
        if s.dtype != torch.float32:
            raise ValueError(f"{name} scale must be float32, got {s.dtype}")
        if block_size is not None:
            bn, bk = _block(block_size)
            rows = 2 * -(-(n // 2) // bn) if half else -(-n // bn)
            want = (e, rows, -(-k // bk))
            if tuple(s.shape) != want:
                raise ValueError(f"{name} block scale has shape {tuple(s.shape)}, expected {want} "
                                 f"(block_size [{bn}, {bk}])")
        elif tuple(s.shape) not in ((e, n), (e, n, 1)):
            raise ValueError(f"{name} per-channel scale has shape {tuple(s.shape)}, expected ({e}, {n}) or "
                             f"({e}, {n}, 1)")


# Per-expert token counts are read on the host (.tolist()): no capture, a custom op under compile.
@register("fp8_fused_experts", "torch", cuda_graph=False, traceable=False)
def fp8_fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    block_size: list[int] | None = None,
) -> torch.Tensor:
    """`fused_experts` with FP8 experts: w13 [E, 2I, H], w2 [E, H, I] fp8; scales per expert in the block
    layout ([E, 2 ceil(I/bn), ceil(H/bk)] and [E, ceil(H/bn), ceil(I/bk)], block_size [bn, bk]) or per
    channel ([E, 2I(, 1)] and [E, H(, 1)], block_size None). x and the intermediate activation h are
    quantized dynamically (1 x bk groups or per token) exactly as in fp8_linear; the rounding points of
    the float path are kept (projections to x's dtype, act(gate) * up in x's dtype, each expert's output
    to x's dtype, weighted sum in float32). Pairs of expert id -1 (another rank's, under expert
    parallelism) contribute nothing."""
    from atom.ops.activation import gelu_tanh_and_mul, silu_and_mul

    check_experts_args(x, w13, w2, w13_scale, w2_scale, block_size)
    act = silu_and_mul if activation == "silu" else gelu_tanh_and_mul
    fp8 = w13.dtype
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    skipped = int((flat_ids < 0).sum())  # sorted first: start after them
    counts = torch.bincount(flat_ids[flat_ids >= 0], minlength=w13.shape[0]).tolist()
    token_of = order // topk_ids.shape[1]
    weight_of = topk_weights.reshape(-1)[order]
    xq = fake_quantize_activations(x, block_size, fp8)
    start = skipped
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok = token_of[start : start + n]
        gate_up = (xq[tok] @ dequantize_expert_w13(w13[e], w13_scale[e], block_size).t()).to(x.dtype)
        h = act(gate_up)
        hq = fake_quantize_activations(h, block_size, fp8)
        w2_hat = dequantize_weight(w2[e], w2_scale[e], block_size)
        y = (hq @ w2_hat.t()).to(x.dtype).float() * weight_of[start : start + n, None]
        out.index_add_(0, tok, y)
        start += n
    return out.to(x.dtype)


def activation_error_bound(x: torch.Tensor, w_hat: torch.Tensor, block_size, fp8_dtype: torch.dtype) -> torch.Tensor:
    """The hard elementwise bound (module docstring) on |fp8_linear(x) - x @ W_hat^T| before output
    rounding: 2^-4 (|x| @ |W_hat|^T) + 2^-10 (s @ |W_hat|^T), with s each element's activation scale."""
    _, s = quantize_activations(x, block_size, fp8_dtype)
    s_full = dequantize_activations(torch.ones(x.shape, device=x.device), s,
                                    None if block_size is None else _block(block_size)[1])
    wa = w_hat.abs().t()
    return math.ldexp(1.0, -4) * (x.float().abs() @ wa) + math.ldexp(1.0, -10) * (s_full @ wa)
