#!/usr/bin/env bash
# Issue 12 (device README B128): the FP8 GEMMs' tiles on the GPU at hand, then the engine with them.
#   bash tools/device/fp8_tiles.sh sweep    (call 1; needs only atom-core's source) tools/device/fp8_tiles.py on
#       qwen3-8b's four linears, pointer and TMA loads; winners to /tmp/fp8_tiles.json (ATOM_FP8_TILES=@that file
#       in later calls on the same warm machine) and a copy under $OUT.
#   bash tools/device/fp8_tiles.sh profile  (after setup_device.sh's carries: atom's wheels and vLLM's deps) the FP8
#       decode step at batch 128 (decode_profile.py) with the built-in tiles and with the rules.
# Every output is kept whole under $OUT.
set -uo pipefail
out=${OUT:-fp8_tiles_out}
mkdir -p "$out"
case "${1:-sweep}" in
sweep)
  export PYTHONPATH=packages/atom-core/src${PYTHONPATH:+:$PYTHONPATH}
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
  timeout ${TILES_TIMEOUT_S:-530} python3 tools/device/fp8_tiles.py --out-rules /tmp/fp8_tiles.json \
    --out "$out/tiles.json" --dot-rows ${DOT_ROWS:-128} --swap-rows ${SWAP_ROWS:-1,32} --layouts channel \
    --budget-s ${TILES_BUDGET_S:-480} > "$out/tiles.txt" 2>&1
  echo "tiles rc $?"; cp /tmp/fp8_tiles.json "$out/" 2>/dev/null
  sed -n '/the four linears/,$p' "$out/tiles.txt" | cut -c1-150
  ;;
profile)
  source tools/device/setup_device.sh || exit $?
  for rules in "" "@/tmp/fp8_tiles.json"; do
    tag=${rules:+_rules}
    ATOM_FP8_TILES=$rules timeout ${PROFILE_TIMEOUT_S:-170} python3 tools/device/decode_profile.py --presets qwen3-8b \
      --engine-args '{"quantization":"fp8","kv_cache_dtype":"fp8"}' --batch-sizes 128 --kernels 128 \
      --out "$out/profile128$tag.json" > "$out/profile128$tag.txt" 2>&1
    echo "profile$tag rc $?"; grep -v Warn "$out/profile128$tag.txt" | cut -c1-120 | tail -30
  done
  ;;
*) echo "usage: fp8_tiles.sh sweep|profile"; exit 2 ;;
esac
