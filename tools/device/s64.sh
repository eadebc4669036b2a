#!/usr/bin/env bash
# Stop 64's device work in pieces (tools/device/README.md, "Pending (stop 64)"). From the repo root:
#   bash tools/device/s64.sh ab|tests|profile   (results under $OUT)
# ab:      carry .carry/atom + .carry/vllm/deps. qwen3-0.6b bf16, batch 1 and 32, 3 interleaved rounds: the default
#          (gate_up's split-K partials added by the activation: ATOM_FP8_ACT_SUMS_SPLITS=1) against the weights
#          preloaded before the PDL wait (atom-alt: ATOM_SWAP_PRELOAD=2, 3 programs an SM) and the sum kernel back
#          (atom-alt2: ATOM_FP8_ACT_SUMS_SPLITS=0).
# tests:   the GPU cases of this stop's code: the PDL chain with preloaded weights (graph replays, same bits), the
#          dense / FP8 preload and activation hand-off cases on CUDA.
# profile: where qwen3-8b's FP8 batch-1 decode step goes on this card, PDL off (issue 12), and qwen3-0.6b bf16's.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/s64}
mkdir -p "$out"
nvidia-smi --query-gpu=name --format=csv,noheader
case "${1:-ab}" in
  ab)
    bash tools/device/bench_vs_vllm.sh --shapes qwen3-0.6b --batch-sizes 1,32 --engines atom,atom-alt,atom-alt2 \
      --alt-env "ATOM_SWAP_PRELOAD=2 ATOM_SWAP_PRELOAD_PROGRAMS_PER_SM=3" --alt2-env ATOM_FP8_ACT_SUMS_SPLITS=0 \
      --repeats 3 --budget-s "${S64_BUDGET_S:-300}" --min-engine-s 15 --crosscheck off ;;
  tests)
    source tools/device/setup_device.sh >/dev/null 2>&1
    ATOM_TEST_DEVICES=cuda ATOM_GPU_TEST_BUDGET_S=${S64_TEST_BUDGET_S:-150} bash tools/device/run_gpu_tests.sh core \
      -k "preload or preloaded or activation_adding or gated_activation_adds or decode_chain" > "$out/s64_tests.txt" 2>&1
    tail -2 "$out/s64_tests.txt"
    grep -E "FAILED|Error" "$out/s64_tests.txt" | head -10 ;;
  profile)
    source tools/device/setup_device.sh >/dev/null 2>&1
    ATOM_PDL=0 timeout 200 python3 tools/device/decode_profile.py --presets qwen3-8b --batch-sizes 1 --kernels 1 \
      --engine-args '{"quantization":"fp8","kv_cache_dtype":"fp8"}' --label fp8 --out "$out/prof_8b_fp8.json" \
      > "$out/prof_8b_fp8.txt" 2>&1
    ATOM_PDL=0 timeout 120 python3 tools/device/decode_profile.py --presets qwen3-0.6b --batch-sizes 1 --kernels 1 \
      --label bf16 --out "$out/prof_06b.json" > "$out/prof_06b.txt" 2>&1
    tail -40 "$out/prof_8b_fp8.txt" | cut -c1-160; tail -30 "$out/prof_06b.txt" | cut -c1-160 ;;
  *) echo "usage: s64.sh ab|tests|profile" >&2; exit 2 ;;
esac
