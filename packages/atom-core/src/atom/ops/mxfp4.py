"""MXFP4 (OCP Microscaling, FP4 E2M1 elements): the format, its dequantization (the oracle) and a quantizer.

A row of K values is stored as K/32 blocks; each block holds 32 4-bit E2M1 codes and one E8M0 scale:
  - codes are packed two per byte, element 2j in the low nibble of byte j, element 2j+1 in the high one;
  - an E2M1 code is sign (bit 3), exponent (bits 2-1, bias 1) and one mantissa bit (bit 0), so the 16 codes
    are +-{0, 0.5, 1, 1.5, 2, 3, 4, 6} (`E2M1_VALUES`, indexed by code);
  - an E8M0 scale byte s stands for 2^(s - 127) (s = 255 is NaN in the OCP spec; here it decodes to inf).
Value = E2M1_VALUES[code] * 2^(s - 127). This is the layout of the released gpt-oss checkpoints
(`*_blocks` uint8 [..., K/32, 16], `*_scales` uint8 [..., K/32]) and of transformers' MXFP4 integration.
"""

from __future__ import annotations

import torch

BLOCK = 32  # elements per scale
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_MAX = 6.0
E8M0_BIAS = 127


def e8m0_to_float(scales: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 scales -> float32 2^(s - 127), exact (2^-127 is a float32 subnormal)."""
    exponent = scales.to(torch.int32) - E8M0_BIAS
    return torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] (two codes per byte) -> float32 [..., K] E2M1 values, element 2j from the low nibble."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)
    low = table[(packed & 0x0F).long()]
    high = table[(packed >> 4).long()]
    return torch.stack((low, high), dim=-1).flatten(-2)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """MXFP4 -> dense [..., K]. blocks: uint8 [..., K/2] or the checkpoint's [..., K/32, 16];
    scales: uint8 [..., K/32]. Exact in float32 and bfloat16 (an E2M1 value times a power of two)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() == scales.dim() + 1:  # checkpoint layout [..., K/32, 16]
        if blocks.shape[-1] != BLOCK // 2:
            raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)}: the last dim must be {BLOCK // 2} bytes")
        blocks = blocks.flatten(-2)
    groups = scales.shape[-1]
    if blocks.shape[:-1] != scales.shape[:-1] or blocks.shape[-1] != groups * BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)} "
                         f"({BLOCK // 2} bytes per scale)")
    values = unpack_e2m1(blocks).unflatten(-1, (groups, BLOCK))
    return (values * e8m0_to_float(scales)[..., None]).flatten(-2).to(dtype)


def _ceil_log2(x: torch.Tensor) -> torch.Tensor:
    """Exact ceil(log2(x)) for positive finite float32 x (frexp: x = m * 2^e with m in [0.5, 1))."""
    mantissa, exponent = torch.frexp(x)
    return torch.where(mantissa == 0.5, exponent - 1, exponent)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [..., K] (K a multiple of 32) -> (blocks uint8 [..., K/2], scales uint8 [..., K/32]).

    Each block's scale is the smallest power of two that brings its largest magnitude within E2M1's
    range (2^ceil(log2(amax / 6)), as the round-up mode of OpenAI's triton_kernels): nothing saturates.
    Elements then round to the nearest E2M1 value, ties to the even code."""
    if w.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 needs rows of a multiple of {BLOCK} values, got {w.shape[-1]}")
    x = w.float().unflatten(-1, (w.shape[-1] // BLOCK, BLOCK))
    amax = x.abs().amax(dim=-1)
    exponent = torch.zeros_like(amax, dtype=torch.int32)
    nonzero = amax > 0
    exponent[nonzero] = _ceil_log2(amax[nonzero] / E2M1_MAX).to(torch.int32)
    exponent = exponent.clamp(-E8M0_BIAS, E8M0_BIAS)
    scaled = torch.ldexp(x, -exponent[..., None])  # |scaled| <= 6, exact (power-of-two scaling)
    grid = torch.tensor(E2M1_VALUES[:8], dtype=torch.float32, device=w.device)
    distance = (scaled.abs()[..., None] - grid).abs()
    code = distance.argmin(dim=-1)  # the lower code on a tie
    upper = (code + 1).clamp(max=7)
    tie_to_even = (code % 2 == 1) & (distance.gather(-1, upper[..., None])[..., 0] == distance.gather(
        -1, code[..., None])[..., 0])
    code = torch.where(tie_to_even, upper, code)
    code = code | ((scaled < 0).long() << 3)
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return packed.flatten(-2), (exponent + E8M0_BIAS).to(torch.uint8)


# ---------------------------------------------------------------- fragment order (for Hopper's wgmma)
# A copy of an expert matrix laid out for one warpgroup's matrix instruction with its weights as the register
# operand (wgmma m64nNk16, bf16 A from registers): tiles of 64 rows x 128 columns, one "step" each, 4,352 bytes:
#   - 4,096 bytes of codes: thread t's 32 bytes, eight 32-bit words, word j = the k16 slice j; words 0-3 at 16 t,
#     words 4-7 at 2,048 + 16 t, so that each of a warp's two 16-byte copies reads 512 contiguous bytes, whole
#     32-byte sectors (with a thread's 32 bytes together, each copy used half of every sector it fetched and the
#     second fetched the same sectors again: twice the L2-to-SM traffic of the codes). Thread
#     t = 32 w + 4 g + c holds rows r0 = 16 w + g and r1 = r0 + 8; word j holds its fragment's 8 codes, the
#     columns 16 j + 2 c + (0, 1) and 16 j + 2 c + (8, 9) of both rows, in the order of the fragment's four bf16x2
#     registers: (r0, lo cols), (r1, lo cols), (r0, hi cols), (r1, hi cols); value v = 4 h + 2 e1 + e0 of the word
#     is row r0 + 8 e1, column 16 j + 8 h + 2 c + e0.
#   - 256 bytes of scales: for each row pair (8 w + g = t // 4, shared by the four threads of a quad), 8 bytes,
#     (block b, row r) at 2 b + r: the E8M0 byte s of row r0 + 8 r, columns 32 b .. 32 b + 31, stored as s + 126
#     (the bf16 exponent field of 2^(s - 1)); hence s <= 128 (every real checkpoint's scales are far below).
# Inside a word, each code's bits sit where a few instructions turn the word into the four bf16x2 registers of
# 2^-126 times the codes' values (magnitude at bf16 bits 6-8, sign at 15, two values a register): register 0 is
# w & M, register 1 rotl(w, 10) & M, register 2 rotl(w, 13) & M, register 3 ((w & K3) * MUL3) & M (the three
# shifted copies of the multiply never carry into M's bits); one bf16x2 multiply by (2^(s - 1), 2^(s - 1)) then
# gives the exact value times 2^(s - 127). atom.ops.triton_kernels.moe_swigluoai decodes it.
# Rows pad to a multiple of 64 and columns to one of 128 with code 0 (scale byte 126).
FRAG_ROWS, FRAG_COLS = 64, 128
FRAG_CODE_BYTES = FRAG_ROWS * FRAG_COLS // 2
FRAG_HALF_BYTES = FRAG_CODE_BYTES // 2  # where a tile's words 4-7 begin
FRAG_SCALE_BYTES = FRAG_ROWS // 2 * FRAG_COLS // BLOCK * 2
FRAG_STEP_BYTES = FRAG_CODE_BYTES + FRAG_SCALE_BYTES
FRAG_MAX_SCALE = 128  # 2^(s - 1) must be a normal bf16
FRAG_SCALE_BIAS = 126
FRAG_MASK, FRAG_K3, FRAG_MUL3 = 0x81C081C0, 0x001B001B, 0x1084
# value v of a word: the bits of its magnitude's bits 0, 1, 2 and of its sign
FRAG_BITS = ((6, 7, 8, 15), (22, 23, 24, 31), (28, 29, 30, 5), (12, 13, 14, 21),
             (25, 26, 27, 2), (9, 10, 11, 18), (4, 0, 1, 3), (20, 16, 17, 19))


def _frag_grid(rows: int, cols: int) -> tuple[int, int]:
    return -(-rows // FRAG_ROWS), -(-cols // FRAG_COLS)


def pack_fragments(blocks: torch.Tensor, scales: torch.Tensor, halves: int = 1,
                   split_words: bool = True) -> torch.Tensor:
    """MXFP4 experts (blocks uint8 [E, R, K/2], scales uint8 [E, R, K/32]) -> fragment order, uint8
    [E, halves * ceil(N / 64), ceil(K / 128), FRAG_STEP_BYTES] with N = R / halves: each half of the rows (a fused
    gate / up matrix: halves=2) padded and tiled on its own, so that tile i of the second half is tile i of the
    first's partner. split_words=False: each thread's 32 code bytes together at 32 t (stop 41-43's layout, kept
    for A/B timings: the kernels read it with MX_FRAG_WORDS_SPLIT off). A few experts at a time (the intermediate
    is 8 bytes a weight: ~1 GB at most); a byte-order view of int32 words, so little-endian hosts only (every GPU host ATOM runs on)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.dim() != 3:
        raise ValueError(f"pack_fragments: uint8 [E, R, K/2] blocks and [E, R, K/32] scales, got {blocks.dtype} "
                         f"{tuple(blocks.shape)} and {scales.dtype} {tuple(scales.shape)}")
    experts, rows, half_k = blocks.shape
    if tuple(scales.shape) != (experts, rows, 2 * half_k // BLOCK) or rows % halves:
        raise ValueError(f"pack_fragments: scales {tuple(scales.shape)} do not match blocks {tuple(blocks.shape)} "
                         f"in {halves} halves")
    if experts and int(scales.max()) > FRAG_MAX_SCALE:
        raise ValueError(f"pack_fragments: E8M0 scales above {FRAG_MAX_SCALE} (2^1) do not fit the fragment "
                         "order's single bf16 multiply")
    n, k = rows // halves, 2 * half_k
    tiles, steps = _frag_grid(n, k)
    out = torch.empty(experts, halves * tiles, steps, FRAG_STEP_BYTES, dtype=torch.uint8, device=blocks.device)
    # bits[v, code]: the word bits code `code` sets in value slot v (disjoint, so a sum is their OR)
    table = torch.tensor([[sum(((code >> i) & 1) << bit for i, bit in enumerate(FRAG_BITS[v])) for code in range(16)]
                          for v in range(8)], dtype=torch.int64).to(torch.int32).to(blocks.device).flatten()
    slot = torch.arange(8, device=blocks.device, dtype=torch.int32) * 16
    chunk = max(1, min(experts, (1 << 27) // max(1, rows * k)))  # ~1 GB of intermediates at most
    for e0 in range(0, experts, chunk):
        e1 = min(experts, e0 + chunk)
        b = blocks[e0:e1]
        codes = torch.stack((b & 15, b >> 4), dim=-1).reshape(e1 - e0, halves, n, k)
        codes = torch.nn.functional.pad(codes, (0, steps * FRAG_COLS - k, 0, tiles * FRAG_ROWS - n))
        # row = 64 T + 16 w + 8 e1 + g, column = 128 S + 16 j + 8 h + 2 c + e0; value slot v = 4 h + 2 e1 + e0
        codes = codes.reshape(e1 - e0, halves, tiles, 4, 2, 8, steps, 8, 2, 4, 2)
        codes = codes.permute(0, 1, 2, 6, 3, 5, 9, 7, 8, 4, 10).reshape(e1 - e0, halves * tiles, steps, 128, 8, 8)
        word = table[codes.to(torch.int32) + slot].sum(dim=-1, dtype=torch.int32)  # two's complement: the bits
        # [thread, word, byte] -> [words 0-3 | 4-7, thread, 16 bytes]
        word = word.view(torch.uint8).reshape(e1 - e0, halves * tiles, steps, 128, 2, 16)
        word = word.transpose(3, 4) if split_words else word
        out[e0:e1, :, :, :FRAG_CODE_BYTES] = word.reshape(e1 - e0, halves * tiles, steps, FRAG_CODE_BYTES)
    s = scales.reshape(experts, halves, n, k // BLOCK).to(torch.int16) + FRAG_SCALE_BIAS
    s = torch.nn.functional.pad(s, (0, steps * FRAG_COLS // BLOCK - k // BLOCK, 0, tiles * FRAG_ROWS - n),
                                value=FRAG_SCALE_BIAS)
    s = s.reshape(experts, halves, tiles, 4, 2, 8, steps, FRAG_COLS // BLOCK).permute(0, 1, 2, 6, 3, 5, 7, 4)
    out[..., FRAG_CODE_BYTES:] = s.reshape(experts, halves * tiles, steps, FRAG_SCALE_BYTES).to(torch.uint8)
    return out


def unpack_fragments(frag: torch.Tensor, rows: int, cols: int, halves: int = 1,
                     split_words: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """pack_fragments' inverse: (blocks uint8 [E, halves * rows, cols / 2], scales uint8 [E, halves * rows,
    cols / 32]) for halves of `rows` rows and `cols` columns each."""
    tiles, steps = _frag_grid(rows, cols)
    experts = frag.shape[0]
    if tuple(frag.shape) != (experts, halves * tiles, steps, FRAG_STEP_BYTES):
        raise ValueError(f"unpack_fragments: {tuple(frag.shape)} is not the fragment order of {halves} x "
                         f"[{rows}, {cols}]")
    raw = frag[..., :FRAG_CODE_BYTES].reshape(experts, halves * tiles, steps, 2, 128, 16)
    raw = (raw.transpose(3, 4) if split_words else raw).reshape(experts, halves * tiles, steps, 128, 8, 4).long()
    word = sum(raw[..., i] << (8 * i) for i in range(4))
    codes = torch.zeros(*word.shape, 8, dtype=torch.long, device=frag.device)
    for v, bits in enumerate(FRAG_BITS):
        for i, bit in enumerate(bits):
            codes[..., v] |= ((word >> bit) & 1) << i
    codes = codes.reshape(experts, halves, tiles, steps, 4, 8, 4, 8, 2, 2, 2)  # hv T S w g c j h e1 e0
    codes = codes.permute(0, 1, 2, 4, 9, 5, 3, 7, 8, 6, 10)  # hv T w e1 g S j h c e0
    codes = codes.reshape(experts, halves, tiles * FRAG_ROWS, steps * FRAG_COLS)[:, :, :rows, :cols]
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8).reshape(experts, halves * rows, cols // 2)
    s = frag[..., FRAG_CODE_BYTES:].reshape(experts, halves, tiles, steps, 4, 8, FRAG_COLS // BLOCK, 2)
    s = s.permute(0, 1, 2, 4, 7, 5, 3, 6).reshape(experts, halves, tiles * FRAG_ROWS, steps * FRAG_COLS // BLOCK)
    scales = (s[:, :, :rows, : cols // BLOCK].to(torch.int16) - FRAG_SCALE_BIAS).to(torch.uint8)
    return blocks, scales.reshape(experts, halves * rows, cols // BLOCK)
