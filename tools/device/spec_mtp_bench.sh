#!/usr/bin/env bash
# On the GPU machine, from the repo root: issue 15's MTP mechanism benchmark (spec_mtp_bench.py: tok/s at batch
# 1 and 8, K = 0..3, forced acceptance lengths, on deepseek-v2-lite-mtp) from the source trees, with the carried
# dependency wheels (.carry/vllm/deps: msgspec, pyzmq, ...) installed into /tmp/site once. Results land in $OUT:
# spec_mtp_bench.json, spec_mtp_bench.md (the table), spec_mtp_bench.log (everything); stdout shows the
# measurements and the table. Arguments go to spec_mtp_bench.py (e.g. --budget-s 420, --ks 0,3).
#   run kind=nvidia-h200 timeout_s=600 carry=[".carry/vllm/deps"] command="bash tools/device/spec_mtp_bench.sh"
set -uo pipefail
cd "$(dirname "$0")/../.."
site=${ATOM_SITE:-/tmp/site}
out=${OUT:-/tmp/atom-spec}
mkdir -p "$site" "$out"
if [ -d .carry/vllm/deps ] && [ ! -f "$site/.atom-deps-done" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    .carry/vllm/deps/*.whl 2> >(grep -v "Target directory .* already exists" >&2) && touch "$site/.atom-deps-done"
fi
export PYTHONPATH=packages/atom-core/src:packages/atom-server/src:$site
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 tools/device/spec_mtp_bench.py --budget-s 420 --out "$out" "$@" > "$out/spec_mtp_bench.log" 2>&1 &
pid=$!
tail -n +1 -f "$out/spec_mtp_bench.log" --pid=$pid | grep --line-buffered -E "^(K=|skipped|\||Traceback|[A-Za-z]*Error)"
wait $pid
rc=$?
[ "$rc" = 0 ] || tail -n 30 "$out/spec_mtp_bench.log"
exit $rc
