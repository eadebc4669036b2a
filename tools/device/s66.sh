#!/usr/bin/env bash
# The next stop's first device call (tools/device/README.md, "Pending (stop 65)"), from the repo root, carrying
# .carry/atom + .carry/vllm/deps:
#   bash tools/device/s66.sh phases|test|ab|ab8   (results under $OUT)
# phases: where the one-launch layer's time goes (decode_layer_bench.py: the launch cut after each phase, without and
#         with the early stream at 256 KB a program and the K loops' L2 requests a chunk ahead, the weight reads alone
#         (the stream's floor) and the four barriers alone in both forms), qwen3-0.6b and qwen3-8b, then the cuts with ATOM_DECODE_LAYER_BARRIER=2 (~5-8 min: a
#         compile a cut; a call of its own).
# test:   the one-launch layer's GPU cases (test_triton_decode_layer.py on CUDA, incl. qwen3-0.6b's and qwen3-8b's
#         shapes against the float64 reference), in both barrier forms, and the
#         engine's one-row CUDA graphs with it against the modules (test_engine_gpu.py -k one_launch), the early
#         stream off and on.
# ab:     qwen3-0.6b batch 1, 3 rounds: the default (fused prep at groups of 2 since stop 65) against ATOM_DECODE_LAYER=1
#         (atom-alt) and ATOM_DECODE_LAYER=1 ATOM_DECODE_LAYER_STREAM=262144 (atom-alt2) (~4 min). S66_ENV: more
#         settings for both (the barrier form the phases named: ATOM_DECODE_LAYER_BARRIER=2).
# ab8:    qwen3-8b batch 1, 3 rounds: the default against ATOM_DECODE_LAYER=1 (atom-alt) and the same with the early
#         stream and the loops' requests a chunk ahead (atom-alt2) (~5 min; S66_ENV as in ab).
# fp8tiles: issue 12, on an H200 only: the FP8 swap-AB tiles at one row, per-channel weights (fp8_tiles.py; the
#         winner to /tmp/fp8_tiles.json on this machine) (~6 min). KERNEL_NOTES stop 66: the FP8 tile keeps 2/3 of
#         the bf16 tile's weight bytes in flight.
# fp8:    then, on the same warm machine: qwen3-8b batch 1, 3 rounds: FP8 + FP8 KV (atom) against the same with the
#         swept tile (atom-alt) and bf16 (atom-base) (~5 min).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/s66}
mkdir -p "$out"
nvidia-smi --query-gpu=name --format=csv,noheader
case "${1:-phases}" in
  phases)
    source tools/device/setup_device.sh >/dev/null 2>&1
    export PYTHONPATH=packages/atom-core/src:${PYTHONPATH:-}
    for preset in qwen3-0.6b qwen3-8b; do
      timeout 240 python3 tools/device/decode_layer_bench.py --preset "$preset" --stream 262144 --loop-ahead 1 2>&1 \
        | tail -20 \
        | tee "$out/phases_$preset.txt"
      ATOM_DECODE_LAYER_BARRIER=2 timeout 100 python3 tools/device/decode_layer_bench.py --preset "$preset" 2>&1 \
        | tail -10 | head -6 | tee "$out/phases_${preset}_flag.txt"
    done ;;
  test)
    source tools/device/setup_device.sh >/dev/null 2>&1
    for form in 1 2; do  # both barrier forms
      ATOM_DECODE_LAYER_BARRIER=$form ATOM_TEST_DEVICES=cuda ATOM_GPU_TEST_BUDGET_S=${S66_TEST_BUDGET_S:-150} \
        ATOM_TEST_TIMEOUT_S=90 OUT="$out/form$form" bash tools/device/run_gpu_tests.sh core \
        -k "decode_layer or fused_decode_prep" > "$out/s66_tests_$form.txt" 2>&1
      tail -1 "$out/s66_tests_$form.txt"
      grep -hE "^E  " "$out/form$form"/core*.log 2>/dev/null | sort | uniq -c | head -6
    done
    # the engine: one-row decode graphs with the one-launch layers against the modules (greedy, logprobs)
    for stream in 0 262144; do
      ATOM_DECODE_LAYER_STREAM=$stream ATOM_TEST_DEVICES=cuda ATOM_GPU_TEST_BUDGET_S=90 ATOM_TEST_TIMEOUT_S=80 \
        OUT="$out/server$stream" bash tools/device/run_gpu_tests.sh server -k one_launch > "$out/s66_server$stream.txt" 2>&1
      tail -1 "$out/s66_server$stream.txt"
    done ;;
  ab)
    bash tools/device/bench_vs_vllm.sh --shapes qwen3-0.6b --batch-sizes 1 --engines atom,atom-alt,atom-alt2 \
      --alt-env "ATOM_DECODE_LAYER=1 ${S66_ENV:-}" --alt2-env "ATOM_DECODE_LAYER=1 ATOM_DECODE_LAYER_STREAM=262144 ${S66_ENV:-}" \
      --repeats 3 --budget-s "${S66_BUDGET_S:-260}" --min-engine-s 15 --crosscheck off ;;
  ab8)
    bash tools/device/bench_vs_vllm.sh --shapes qwen3-8b --batch-sizes 1 --engines atom,atom-alt,atom-alt2 \
      --alt-env "ATOM_DECODE_LAYER=1 ${S66_ENV:-}" \
      --alt2-env "ATOM_DECODE_LAYER=1 ATOM_DECODE_LAYER_STREAM=262144 ATOM_DECODE_LAYER_LOOP_AHEAD=1 ${S66_ENV:-}" \
      --repeats 3 --budget-s "${S66_BUDGET_S:-330}" --min-engine-s 20 --crosscheck off ;;
  fp8tiles)
    DOT_ROWS=, SWAP_ROWS=1 TILES_BUDGET_S=${S66_TILES_S:-330} TILES_TIMEOUT_S=400 OUT="$out/tiles" \
      bash tools/device/fp8_tiles.sh sweep ;;
  fp8)
    alt="ATOM_FP8_TILES=@/tmp/fp8_tiles.json"
    [ -f /tmp/fp8_tiles.json ] || { echo "no /tmp/fp8_tiles.json (run fp8tiles first on this machine)"; alt=ATOM_FP8_TILES=; }
    cat /tmp/fp8_tiles.json 2>/dev/null; echo
    bash tools/device/bench_vs_vllm.sh --shapes qwen3-8b --quantization fp8 --kv-cache-dtype fp8 --batch-sizes 1 \
      --engines atom,atom-alt,atom-base --alt-env "$alt" --repeats 3 \
      --budget-s "${S66_BUDGET_S:-330}" --min-engine-s 25 --crosscheck off ;;
  *) echo "usage: s66.sh phases|test|ab|ab8|fp8tiles|fp8" >&2; exit 2 ;;
esac
