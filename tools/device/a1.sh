#!/usr/bin/env bash
# Device README item A1: stop 47's decode-attention changes on the GPU. Every output is kept whole under $OUT.
#   bash tools/device/a1.sh kernels   (call 1, beside .carry/vllm/c1; atom-core's source only) attn_b128.py as is,
#       with ATOM_ATTN_OFF32=0 (the int64 offsets of before) and with ATOM_ATTN_FP8_F16_DOT=1, PDL off; the static
#       counts they follow: tools/device/attn_sass.py (KERNEL_NOTES.md, stop 47).
#       Then stop 48's rowmax path at the kernel level: fp8_skinny_bench.py --rowmax on down_proj (SiLU-and-mul's
#       producer quantizing itself + the swap kernel, against silu_and_mul_rowmax + the swap kernel quantizing).
#   bash tools/device/a1.sh tests     (call 2, with .carry/vllm/deps) the attention / FP8-KV GPU tests as is and with
#       the fp16 dots over FP8 caches; the rowmax path's GPU tests (bit-identical outputs at the 8b down shape).
set -uo pipefail
out=${OUT:-a1_out}
mkdir -p "$out"
case "${1:-kernels}" in
kernels)
  export PYTHONPATH=packages/atom-core/src${PYTHONPATH:+:$PYTHONPATH}
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
  for variant in default ATOM_ATTN_OFF32=0 ATOM_ATTN_FP8_F16_DOT=1; do
    tag=${variant//=/_}
    env ATOM_PDL=0 $([ "$variant" = default ] || echo "$variant") timeout 150 python3 tools/device/attn_b128.py \
      --batches 128,32 --contexts 192,1024 --out "$out/attn_$tag.json" > "$out/attn_$tag.txt" 2>&1
    echo "== $variant rc $?"
    grep -A3 "KV, batch" "$out/attn_$tag.txt" | grep -v "^--" | cut -c1-110
  done
  timeout 200 python3 tools/device/fp8_skinny_bench.py --rowmax --rows 1,8,16,32 --shapes down \
    --out "$out/rowmax.json" > "$out/rowmax.txt" 2>&1
  echo "== rowmax rc $?"
  grep "silu\|swap codes down M[0-9]* channel  " "$out/rowmax.txt" | cut -c1-120
  ;;
tests)
  for f16 in 0 1; do
    ATOM_ATTN_FP8_F16_DOT=$f16 ATOM_TEST_DEVICES=cuda ATOM_GPU_TEST_BUDGET_S=${A1_TEST_BUDGET_S:-200} OUT=$out/tests_f16_$f16 \
      bash tools/device/run_gpu_tests.sh core -k "attention or fp8_kv or paged or prep or kv_cache or large_tma or warp_spec or mla" \
      > "$out/tests_f16_$f16.txt" 2>&1
    echo "== ATOM_ATTN_FP8_F16_DOT=$f16: $(tail -1 "$out/tests_f16_$f16.txt")"
    grep -h "^FAILED\|^ERROR" "$out"/tests_f16_$f16/*.log 2>/dev/null | head -20
  done
  ATOM_TEST_DEVICES=cuda ATOM_GPU_TEST_BUDGET_S=90 OUT=$out/tests_rowmax \
    bash tools/device/run_gpu_tests.sh core -k "rowmax or reciprocal" > "$out/tests_rowmax.txt" 2>&1
  echo "== rowmax tests: $(tail -1 "$out/tests_rowmax.txt")"
  grep -h "^FAILED\|^ERROR" "$out"/tests_rowmax/*.log 2>/dev/null | head -20
  ;;
*) echo "usage: a1.sh kernels|tests"; exit 2 ;;
esac
