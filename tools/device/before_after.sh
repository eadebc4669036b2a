#!/usr/bin/env bash
# Before/after decode figures of atom-server on the GPU machine: the tree at OLD (an earlier commit's
# atom-core/atom-server sources, exported into .carry/old by the caller) against the working tree, on the
# same random-weight presets, interleaved (new, old, new, old, ...), each run a fresh process.
#
#   here:    rm -rf .carry/old && mkdir -p .carry/old && git archive OLD packages/atom-core/src \
#              packages/atom-server/src | tar -x -C .carry/old
#   device:  bash tools/device/before_after.sh "qwen3-0.6b:3 qwen3-8b:2"   (carry .carry/old, .carry/vllm/deps)
# Each run's JSON and log land in $OUT; one line per run is printed: shape, tree, batch, ms/step, tok/s.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/atom-ba}; mkdir -p "$out"
site=/tmp/site; mkdir -p $site
[ -f $site/.atom-deps-done ] || { python3 -m pip install -q --no-index --no-deps --target $site .carry/vllm/deps/*.whl \
  && touch $site/.atom-deps-done; }
new=packages/atom-core/src:packages/atom-server/src:$site
old=.carry/old/packages/atom-core/src:.carry/old/packages/atom-server/src:$site
for spec in ${1:-qwen3-0.6b:3}; do
  shape=${spec%%:*}; reps=${spec##*:}
  for i in $(seq 1 "$reps"); do
    for tree in new old; do
      pp=$new; [ $tree = old ] && pp=$old
      tag=$shape.$tree.$i; t0=$(date +%s)
      PYTHONPATH=$pp timeout 300 python3 -m atom_server.bench_cli throughput --model "$shape" \
        --batch-sizes ${BATCHES:-1,32,128} --num-iters 3 --output-json "$out/$tag.json" > "$out/$tag.log" 2>&1
      rc=$?
      echo "== $tag rc=$rc wall=$(( $(date +%s) - t0 ))s"
      python3 - "$out/$tag.json" <<'PY' || tail -5 "$out/$tag.log"
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["runs"]:
    print("  ", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if not isinstance(v, (list, dict))})
PY
    done
  done
done
