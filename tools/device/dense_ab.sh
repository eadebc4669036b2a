#!/usr/bin/env bash
# On the GPU machine, from the repo root (stop 62): the bf16 linears on dense_linear (ATOM_DENSE_SWAP_MAX_M) in one
# call: its GPU tests, the kernel bench with a tile sweep (dense_skinny_bench.py), then an engine A/B on SHAPE
# (default qwen3-8b) at batch 1 and 32, 3 interleaved rounds: atom (off), atom-alt (on, built-in tile), atom-alt2
# (on, the sweep's best tile over the 8b shapes at one row, when it differs). Files in $OUT.
#   bash tools/device/dense_ab.sh [SHAPE] [BUDGET_S]
shape=${1:-qwen3-8b}; budget=${2:-330}
source tools/device/setup_device.sh >/dev/null 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
ATOM_TEST_DEVICES=cuda ATOM_GPU_TEST_BUDGET_S=100 bash tools/device/run_gpu_tests.sh core -k dense 2>&1 | tail -2
PYTHONPATH=/tmp/site-atom:/tmp/site${PYTHONPATH:+:$PYTHONPATH} timeout 170 python3 tools/device/dense_skinny_bench.py \
  --sweep --rows 1,4,16,32 --out "$OUT/dense_bench.json" > "$OUT/dense_bench.txt" 2>&1
sed -n '/^summary/,$p' "$OUT/dense_bench.txt"
tile=$(python3 - "$OUT/dense_bench.json" <<'PY'
import json, sys, re
try:
    d = json.load(open(sys.argv[1]))
except Exception:
    sys.exit(0)
# us at one row, parts form, summed over the four 8b shapes, per tile ("swap parts" rows = the built-in tile)
tot = {}
for r in d["rows"]:
    m = re.match(r"\s*(?:sweep )?swap parts 8b \w+ \[\d+, \d+\] M1(?: (\{.*\}))?$", r["name"])
    if m and "us" in r:
        key = m.group(1) or "builtin"
        tot.setdefault(key, []).append(r["us"])
full = {k: sum(v) for k, v in tot.items() if len(v) == 4}
if full:
    best = min(full, key=full.get)
    print(f"# 8b one-row totals: {sorted(full.items(), key=lambda kv: kv[1])[:4]}", file=sys.stderr)
    if best != "builtin":
        print(json.dumps(eval(best)).replace(" ", ""))
PY
)
echo "sweep's best 8b one-row tile: ${tile:-the built-in}"
engines=atom,atom-alt; alt2=()
if [ -n "$tile" ]; then engines=atom,atom-alt,atom-alt2; alt2=(--alt2-env "ATOM_DENSE_SWAP_MAX_M=32 ATOM_DENSE_SWAP_TILE=$tile"); fi
bash tools/device/bench_vs_vllm.sh --shapes "$shape" --batch-sizes 1,32 --engines $engines \
  --alt-env ATOM_DENSE_SWAP_MAX_M=32 "${alt2[@]}" --repeats 3 --budget-s "$budget" --min-engine-s 25 \
  --crosscheck off > "$OUT/ab_$shape.txt" 2>&1
grep -E "^\| qwen|ATOM alt" "$OUT/ab_$shape.txt"
