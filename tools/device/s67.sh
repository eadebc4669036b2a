#!/usr/bin/env bash
# The next stop's device calls (tools/device/README.md, "Pending (stop 67)"), from the repo root, carrying
# .carry/atom + .carry/vllm/deps:
#   bash tools/device/s67.sh reads|ab   (results under $OUT)
# reads: why the one-launch layer's weight reads run at half the copy rate at qwen3-0.6b (stop 67, H100: 20.45 us
#        a launch for 31.5 MB, 1.5 of 3.0 TB/s; at qwen3-8b they reach it). First the layer's GPU cases at 16 warps
#        (ATOM_DECODE_LAYER_WARPS=16: 120 registers, no spills in the sm_90 compile here; 8 warps: 243), then
#        decode_layer_bench.py --full-only --reads-sweep at 8 warps (the reads alone over 1, 2 and 4 programs an
#        SM, 4 and 8 warps, chunks of 16K, 32K and 64K elements), then the whole launch at 16 warps, chunks 32K and
#        64K (~4-5 min).
# ab:    qwen3-0.6b batch 1, 3 rounds: the default against ATOM_DECODE_LAYER=1 at 8 warps (atom-alt) and at
#        S67_WARPS warps (atom-alt2, default 16; the reads' winner) (~4 min).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/s67}
mkdir -p "$out"
nvidia-smi --query-gpu=name --format=csv,noheader
case "${1:-reads}" in
  reads)
    source tools/device/setup_device.sh >/dev/null 2>&1
    ATOM_DECODE_LAYER_WARPS=16 ATOM_TEST_DEVICES=cuda ATOM_GPU_TEST_BUDGET_S=100 ATOM_TEST_TIMEOUT_S=90 \
      OUT="$out/warps16" timeout 150 bash tools/device/run_gpu_tests.sh core -k decode_layer > "$out/tests16.txt" 2>&1
    grep -h "passed\|failed" "$out"/warps16/core.log 2>/dev/null | tail -2
    export PYTHONPATH=packages/atom-core/src:${PYTHONPATH:-}
    timeout 200 python3 tools/device/decode_layer_bench.py --preset qwen3-0.6b --full-only --reads-sweep 2>&1 \
      | tail -28 | tee "$out/reads_sweep.txt"
    for chunk in 32768 65536; do
      ATOM_DECODE_LAYER_WARPS=16 ATOM_DECODE_LAYER_CHUNK=$chunk timeout 80 python3 tools/device/decode_layer_bench.py \
        --preset qwen3-0.6b --full-only 2>&1 | tail -8 | head -3 | tee "$out/full16_$chunk.txt"
    done ;;
  ab)
    bash tools/device/bench_vs_vllm.sh --shapes qwen3-0.6b --batch-sizes 1 --engines atom,atom-alt,atom-alt2 \
      --alt-env "ATOM_DECODE_LAYER=1" --alt2-env "ATOM_DECODE_LAYER=1 ATOM_DECODE_LAYER_WARPS=${S67_WARPS:-16}" \
      --repeats 3 --budget-s "${S67_BUDGET_S:-260}" --min-engine-s 15 --crosscheck off ;;
  *) echo "usage: s67.sh reads|ab" >&2; exit 2 ;;
esac
