#!/usr/bin/env bash
# Device README item P1 (stop 50): the prefill graphs on a GPU, in one call (~6 min on an H200).
# Carry .carry/vllm/deps and .carry/atom (rebuilt from HEAD: bash tools/device/build_carry.sh). From the repo root:
#   bash tools/device/p1.sh [tests|profile|bench|all]   (default all; results under $OUT)
# tests:   the captured prefill graphs against eager steps (test_cuda_graphs_match_eager, with logprobs, at the default
#          budget and at 40 tokens a step), the FP8 engine test, and the flat attention grid's large prefill cases;
# profile: prefill_profile.py for FP8 and bf16 qwen3-8b (one process each): the batch-1 prefill with the graphs,
#          against 42.6 / 19.2 ms without them (H200, 2026-12-06);
# bench:   the engine A/B, prefill graphs on (atom) / off (atom-alt) and bf16 (atom-base), 3 interleaved rounds.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/p1}
mkdir -p "$out"
what=${1:-all}
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "$what" = all ] || [ "$what" = tests ]; then
  ATOM_TEST_DEVICES=cuda ATOM_GPU_TEST_BUDGET_S=${P1_TEST_BUDGET_S:-150} bash tools/device/run_gpu_tests.sh core,server \
    -k "paged_attention_large or prefill_graphs_layout or cuda_graphs_match or fp8_checkpoint_with_fp8_kv or greedy_parity" \
    > "$out/p1_tests.txt" 2>&1
  tail -2 "$out/p1_tests.txt"
  grep -E "FAILED|prefill graph" "$out/p1_tests.txt" | head -10
fi
if [ "$what" = all ] || [ "$what" = profile ]; then
  for c in 'fp8={"quantization":"fp8","kv_cache_dtype":"fp8"}' 'bf16={}'; do
    PYTHONPATH=packages/atom-core/src:packages/atom-server/src:${ATOM_SITE:-/tmp/site} timeout 150 \
      python3 tools/device/prefill_profile.py --configs "$c" --out "$out/prefill_${c%%=*}.json" 2>&1 | grep "^\[" | head -6
  done
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  bash tools/device/bench_vs_vllm.sh --shapes qwen3-8b --quantization fp8 --kv-cache-dtype fp8 \
    --engines atom,atom-alt,atom-base --alt-env ATOM_PREFILL_GRAPH_TOKENS=0 --repeats 3 --budget-s "${P1_BENCH_S:-300}" \
    --min-engine-s 30 --crosscheck off --out "$out" 2>&1 | tail -16
fi
