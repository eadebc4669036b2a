#!/usr/bin/env bash
# Stop 65's device work (tools/device/README.md, "Pending"). From the repo root:
#   bash tools/device/s65.sh test|ab|ab8|profile|all   (results under $OUT)
# test:    the one-launch decode layer's GPU cases (test_triton_decode_layer.py on CUDA: the grid barriers for real).
# ab:      carry .carry/atom + .carry/vllm/deps. qwen3-0.6b bf16, batch 1 / 32, 3 interleaved rounds: the default
#          against the layer as one launch at one-row steps (atom-alt: ATOM_DECODE_LAYER=1) and against the decode
#          prep inside the attention kernel at groups of 2 (atom-alt2: ATOM_ATTN_FUSED_DECODE_PREP=1, stop 64's
#          pending A/B).
# ab8:     qwen3-8b bf16 batch 1, 3 rounds: the default against ATOM_DECODE_LAYER=1 (issue 16's 90%).
# profile: qwen3-0.6b batch 1 with ATOM_DECODE_LAYER=1, PDL on: the step's kernels.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/s65}
mkdir -p "$out"
nvidia-smi --query-gpu=name --format=csv,noheader
mode=${1:-all}
if [[ $mode == test || $mode == all ]]; then
  source tools/device/setup_device.sh >/dev/null 2>&1
  ATOM_TEST_DEVICES=cuda ATOM_GPU_TEST_BUDGET_S=${S65_TEST_BUDGET_S:-200} ATOM_TEST_TIMEOUT_S=150 \
    bash tools/device/run_gpu_tests.sh core -k "decode_layer" > "$out/s65_tests.txt" 2>&1
  rc=$?
  tail -3 "$out/s65_tests.txt"
  grep -E "FAILED|Error|Timeout" "$out/s65_tests.txt" | head -10
  if [[ $mode == all && $rc != 0 ]]; then echo "tests failed: no A/B"; exit 1; fi
fi
if [[ $mode == ab || $mode == all ]]; then
  bash tools/device/bench_vs_vllm.sh --shapes qwen3-0.6b --batch-sizes 1,32 --engines atom,atom-alt,atom-alt2 \
    --alt-env ATOM_DECODE_LAYER=1 --alt2-env ATOM_ATTN_FUSED_DECODE_PREP=1 \
    --repeats 3 --budget-s "${S65_BUDGET_S:-300}" --min-engine-s 15 --crosscheck off
fi
if [[ $mode == ab8 ]]; then
  bash tools/device/bench_vs_vllm.sh --shapes qwen3-8b --batch-sizes 1 --engines atom,atom-alt \
    --alt-env ATOM_DECODE_LAYER=1 --repeats 3 --budget-s "${S65_BUDGET_S:-330}" --min-engine-s 20 --crosscheck off
fi
if [[ $mode == profile ]]; then
  source tools/device/setup_device.sh >/dev/null 2>&1
  ATOM_DECODE_LAYER=1 timeout 150 python3 tools/device/decode_profile.py --presets qwen3-0.6b --batch-sizes 1 \
    --kernels 1 --label one-launch --out "$out/prof_06b_one.json" > "$out/prof_06b_one.txt" 2>&1
  tail -30 "$out/prof_06b_one.txt" | cut -c1-160
fi
