#!/usr/bin/env bash
# Stop 64's device work in pieces (tools/device/README.md, "Pending (stop 64)"). From the repo root:
#   bash tools/device/s64.sh ab|fp8|tests|profile   (results under $OUT)
# ab:      carry .carry/atom + .carry/vllm/deps. qwen3-0.6b bf16, batch 1 / 32 / 128, 3 interleaved rounds: the default
#          against the decode prep inside the attention kernel at every decode step (atom-alt:
#          ATOM_ATTN_FUSED_DECODE_PREP=1; the rule leaves 0.6b's groups of 2 out since 2026-12-04, before the qkv
#          partials' hand-off and dense_linear: the unfused step now runs qk_norm_rope_cache and a sum kernel a layer)
#          and the sum kernel back after gate_up (atom-alt2: ATOM_FP8_ACT_SUMS_SPLITS=0). Stop 64 ran this with
#          atom-alt = ATOM_SWAP_PRELOAD=2 ATOM_SWAP_PRELOAD_PROGRAMS_PER_SM=3 (the weights loaded before the PDL
#          wait; no effect, removed) and batch sizes 1,32.
# fp8:     carry .carry/atom + .carry/vllm/deps; for an H200 (issue 12's card). qwen3-8b FP8 + FP8 KV at batch 1, 3
#          interleaved rounds: the default, down_proj / o_proj fed quantized codes by their producers instead of
#          quantizing their rows in the GEMM (atom-alt: ATOM_FP8_ROWMAX_MAX_M=0; the QUANT_A K step is ~2.5x the
#          instructions of the codes one, and the rule was measured on the H100 only), and bf16 (atom-base): FP8 / bf16
#          in the same call (~5 min).
# tests:   the GPU cases of this stop's code: the activation hand-off cases on CUDA, the PDL decode chains.
# profile: where qwen3-8b's FP8 batch-1 decode step goes on this card, PDL off (issue 12), and qwen3-0.6b bf16's.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/s64}
mkdir -p "$out"
nvidia-smi --query-gpu=name --format=csv,noheader
case "${1:-ab}" in
  ab)
    bash tools/device/bench_vs_vllm.sh --shapes qwen3-0.6b --batch-sizes 1,32,128 --engines atom,atom-alt,atom-alt2 \
      --alt-env ATOM_ATTN_FUSED_DECODE_PREP=1 --alt2-env ATOM_FP8_ACT_SUMS_SPLITS=0 \
      --repeats 3 --budget-s "${S64_BUDGET_S:-300}" --min-engine-s 15 --crosscheck off ;;
  fp8)
    bash tools/device/bench_vs_vllm.sh --shapes qwen3-8b --quantization fp8 --kv-cache-dtype fp8 --batch-sizes 1 \
      --engines atom,atom-alt,atom-base --alt-env ATOM_FP8_ROWMAX_MAX_M=0 --repeats 3 \
      --budget-s "${S64_BUDGET_S:-330}" --min-engine-s 25 --crosscheck off ;;
  tests)
    source tools/device/setup_device.sh >/dev/null 2>&1
    ATOM_TEST_DEVICES=cuda ATOM_GPU_TEST_BUDGET_S=${S64_TEST_BUDGET_S:-150} bash tools/device/run_gpu_tests.sh core \
      -k "activation_adding or gated_activation_adds or decode_chain" > "$out/s64_tests.txt" 2>&1
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
  *) echo "usage: s64.sh ab|fp8|tests|profile" >&2; exit 2 ;;
esac
