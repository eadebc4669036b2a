#!/usr/bin/env bash
# Stop 53's MoE changes on the GPU before the qwen3-30b-a3b FP8 ratio against vLLM (tools/device/README.md, M2).
#   bash tools/device/m2.sh sweep   # atom-core from source only (rides with .carry/vllm/c1): the top-k sum and the
#                                   # chunk scan old against new, then the FP8 expert GEMM's tiles at the prefill's
#                                   # 16,384 tokens (per-channel experts, PDL off), and the split decode's merge on
#                                   # 4 warps against 1
#   bash tools/device/m2.sh tests   # the MoE kernels' GPU tests (carry .carry/vllm/deps: pytest's plugins)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/m2}
mkdir -p "$out"
export ATOM_PDL=0
case "${1:-sweep}" in
  sweep)
    PYTHONPATH=packages/atom-core/src:tools/device timeout 120 python3 tools/device/moe_prep_bench.py \
      --tokens 128,16384 --out "$out/moe_prep.json" 2>&1 | tail -16
    # the shipped prefill tile (64 x 128, 8 warps, 3 stages, K steps of 128) against larger row tiles, 4 stages,
    # K steps of 256 / 64, the 1-D launch order, and a down projection of its own
    tiles='[null,
      {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3},
      {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 4},
      {"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 4},
      {"block_m": 64, "block_n": 128, "num_warps": 8, "num_stages": 3, "n_major": true},
      {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3, "n_major": true},
      {"block_m": 64, "block_n": 128, "num_warps": 8, "num_stages": 2, "block_k": 256},
      {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 4},
      {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 5, "block_k": 64},
      {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3, "down": {"block_n": 256, "num_stages": 3}}]'
    ATOM_GEMM_SWEEP="$tiles" PYTHONPATH=packages/atom-core/src timeout 300 python3 tools/device/moe_kernels_profile.py \
      --fp8 channel --tokens 16384,4096 2>&1 | grep -E "^==|gate\|up" | tee "$out/moe_gemm_sweep.txt"
    # the split decode's merge on 4 warps (today) and on 1 (ATOM_ATTN_MERGE_WARPS): batches 1 / 8 / 32 split
    for w in 4 1; do
      ATOM_ATTN_MERGE_WARPS=$w PYTHONPATH=packages/atom-core/src timeout 90 python3 tools/device/attn_b128.py \
        --batches 1,8,32 --contexts 192,1024 --block-n 64,128 --warps 4 --stages 2,3 --out "$out/attn_merge$w.json" \
        2>&1 | grep "default" | sed "s/^/merge warps $w: /"
    done
    ;;
  tests)
    ATOM_TEST_DEVICES=cuda ATOM_GPU_TEST_BUDGET_S=300 bash tools/device/run_gpu_tests.sh core \
      -k "moe or experts or topk or align or swiglu" 2>&1 | tail -15
    ;;
  *) echo "usage: m2.sh sweep|tests" >&2; exit 2 ;;
esac
