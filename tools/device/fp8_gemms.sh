#!/usr/bin/env bash
# B128 + the FP8 GEMMs at decode sizes (tools/device/README.md): one device call under 10 min, every output kept under
# $OUT (or ./fp8_gemms_out), whole, not only its tail. Needs only atom-core's source (no carry).
#   1. fp8_skinny_bench.py at M = 1 / 32 with the swap-AB tile sweep (issue 12's batch-1 target: the swap-AB kernel
#      streams 55-75% of the copy rate there);
#   2. the tl.dot GEMM's tiles at M = 128 on qwen3-8b's four linears, both layouts (issue 12's batch 128; its unswept
#      rows give torch._scaled_mm and the default tile);
#   3. a decode profile of the FP8 qwen3-8b engine at batch 128 (what else its step holds).
set -uo pipefail
out=${OUT:-fp8_gemms_out}
mkdir -p "$out"
export PYTHONPATH=packages/atom-core/src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
timeout 200 python3 tools/device/fp8_skinny_bench.py --rows 1,32 --sweep --out "$out/skinny.json" > "$out/skinny.txt" 2>&1
echo "skinny rc $?"; grep -v Warn "$out/skinny.txt" | cut -c1-120 | tail -60
ATOM_FP8_SWEEP_M=128 ATOM_FP8_SWEEP_PROJ=qkv,o,gate_up,down ATOM_FP8_SWEEP_LAYOUT=block,channel \
ATOM_FP8_GEMM_SWEEP='[{"block_m":128,"block_n":128,"num_warps":8,"num_stages":3,"split_k":1},
{"block_m":128,"block_n":128,"num_warps":8,"num_stages":4,"split_k":2},{"block_m":128,"block_n":256,"num_warps":8,
"num_stages":3,"split_k":1},{"block_m":64,"block_n":128,"num_warps":4,"num_stages":4,"split_k":1},{"block_m":64,
"block_n":256,"num_warps":8,"num_stages":3,"split_k":1},{"block_m":128,"block_n":64,"num_warps":4,"num_stages":5,
"split_k":2},{"block_m":64,"block_n":64,"num_warps":4,"num_stages":5,"split_k":4}]' \
  timeout 200 python3 tools/device/kernel_bench.py --fp8-only --no-ref --out "$out/b128.json" > "$out/b128.txt" 2>&1
echo "b128 rc $?"; grep -v Warn "$out/b128.txt" | cut -c1-120 | tail -60
timeout 150 python3 tools/device/decode_profile.py --presets qwen3-8b \
  --engine-args '{"quantization":"fp8","kv_cache_dtype":"fp8"}' --batch-sizes 128 --kernels 128 \
  --out "$out/profile128.json" > "$out/profile128.txt" 2>&1
echo "profile rc $?"; grep -v Warn "$out/profile128.txt" | cut -c1-120 | tail -40
