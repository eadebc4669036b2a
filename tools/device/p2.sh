#!/usr/bin/env bash
# Device README item P2 (stop 51): fast accumulation in torch._scaled_mm (the FP8 prefill GEMMs) and the prefill's
# quantization kernels, in two calls.
# Carry .carry/vllm/deps and .carry/atom (rebuilt from HEAD: bash tools/device/build_carry.sh). From the repo root:
#   bash tools/device/p2.sh [tests|sweep|profile|bench|all]   (all = tests, sweep, profile: ~5-6 min; bench in a
#   second call, ~4-5 min; results under $OUT)
# tests:   the rowwise scaled_mm and the large FP8 linears (1,024 rows run scaled_mm) against the reference, with the
#          new default (use_fast_accum) — the GPU check of ATOM_FP8_SCALED_MM_FAST_ACC; and MLA (its latent
#          attention on the (row, query tile) grid, stop 51);
# profile: prefill_profile.py at batch 128 x 128 tokens (one 16,384-token step, every GEMM on scaled_mm), FP8 + FP8 KV,
#          fast accumulation on and off (one process each): the prefill ms (253 ms in the engine on the H100,
#          2026-12-06, without it) and the kernels by GPU time;
# sweep:   scaled_mm_fast_acc.py (the 8b linears' scaled_mm with and without fast accumulation: us, error) and
#          row_quant_sweep.py: the one-program-a-row quantization kernels (o_proj's input, SiLU-and-mul + quant) at
#          128 / 4,096 / 16,384 rows with other (BLOCK, num_warps) launches: 43-45% of the copy rate in that prefill;
# bench:   the engine A/B, on (atom) / off (atom-alt), 3 interleaved rounds: batch 32's and 128's prefill and tok/s;
#          P2_ALT2_ENV adds atom-alt2 with the sweeps' winners (ATOM_FP8_ROW_TILE_LARGE, ATOM_FP8_TILES=@file).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/p2}
mkdir -p "$out"
what=${1:-all}
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "$what" = all ] || [ "$what" = tests ]; then
  ATOM_TEST_DEVICES=cuda ATOM_GPU_TEST_BUDGET_S=${P2_TEST_BUDGET_S:-150} bash tools/device/run_gpu_tests.sh core \
    -k "scaled_mm or fp8_linear_large or mla" > "$out/p2_tests.txt" 2>&1
  tail -2 "$out/p2_tests.txt"
  grep -E "FAILED|refuses" "$out/p2_tests.txt" | head -10
fi
if [ "$what" = all ] || [ "$what" = sweep ]; then
  PYTHONPATH=packages/atom-core/src timeout 200 python3 tools/device/row_quant_sweep.py --out "$out/rowq.json" \
    > "$out/rowq.txt" 2>&1
  grep -E "copy rate|default|BEST|DIFFERS" "$out/rowq.txt" | cut -c1-120
  PYTHONPATH=packages/atom-core/src timeout 120 python3 tools/device/scaled_mm_fast_acc.py \
    --out "$out/scaled_mm_fast_acc.json" 2>&1 | tail -24
fi
if [ "$what" = all ] || [ "$what" = profile ]; then
  for fast in 1 0; do
    ATOM_FP8_SCALED_MM_FAST_ACC=$fast PYTHONPATH=packages/atom-core/src:packages/atom-server/src:${ATOM_SITE:-/tmp/site} \
      timeout 150 python3 tools/device/prefill_profile.py --batch-size 128 --repeats 3 \
      --configs "fast$fast={\"quantization\":\"fp8\",\"kv_cache_dtype\":\"fp8\"}" --out "$out/prefill128_fast$fast.json" \
      2>&1 | grep "^\[" | grep -v " host " | head -20
  done
fi
if [ "$what" = bench ]; then
  # P2_ALT2_ENV (e.g. "ATOM_FP8_ROW_TILE_LARGE=4096:4096:8 ATOM_FP8_TILES=@/tmp/fp8_tiles.json": the sweeps'
  # winners) adds atom-alt2 with that environment
  engines=atom,atom-alt; alt2=()
  if [ -n "${P2_ALT2_ENV:-}" ]; then engines=atom,atom-alt,atom-alt2; alt2=(--alt2-env "$P2_ALT2_ENV"); fi
  bash tools/device/bench_vs_vllm.sh --shapes qwen3-8b --quantization fp8 --kv-cache-dtype fp8 \
    --engines "$engines" --alt-env ATOM_FP8_SCALED_MM_FAST_ACC=0 "${alt2[@]}" --repeats 3 \
    --budget-s "${P2_BENCH_S:-240}" --min-engine-s 30 --crosscheck off --out "$out" 2>&1 | tail -20
fi
