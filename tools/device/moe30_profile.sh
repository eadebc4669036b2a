#!/usr/bin/env bash
# Where qwen3-30b-a3b FP8's batch-32/128 decode step and batch-128 prefill go in atom-server, kernel by kernel,
# on the materialized random checkpoint (routers as in bench_vs_vllm.py --materialize). PDL off by default
# (MOE30_PDL=1 keeps it): with PDL a kernel's profiled time includes waiting for the previous kernel's last
# wave, which misattributes the step. Carry .carry/vllm/deps + .carry/atom; `source tools/device/setup_device.sh`
# first. Writes $OUT/decode30*.json and $OUT/prefill30*.json.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
export PYTHONPATH=$root/packages/atom-core/src:$root/packages/atom-server/src:$root/tools/device:${ATOM_SITE:-/tmp/site}
export ATOM_PDL=${MOE30_PDL:-0}
cfg=/tmp/bench_models/qwen3-30b-a3b
w=$cfg-weights
out=${OUT:-/tmp}
tag=${MOE30_TAG:-}
if [ ! -f "$w/model.safetensors.index.json" ]; then
  python3 -c "import sys; sys.path.insert(0, '$root/tools/device'); from bench_vs_vllm import make_checkpoint; make_checkpoint('qwen3-30b-a3b', '/tmp/bench_models')"
  python3 "$root/tools/device/materialize_checkpoint.py" "$cfg" "$w"
fi
fp8='{"quantization":"fp8","kv_cache_dtype":"fp8"}'
timeout 300 python3 "$root/tools/device/decode_profile.py" --presets "$w" --batch-sizes "${MOE30_BATCHES:-32,128}" \
  --kernels "${MOE30_BATCHES:-32,128}" --engine-args "$fp8" --out "$out/decode30$tag.json" 2>&1 \
  | grep -v "it/s\|run/s\|s/run" | grep -A 30 "decode step alone\|ms/step" || true
timeout 200 python3 "$root/tools/device/prefill_profile.py" --preset "$w" --configs "fp8=$fp8" --batch-size 128 \
  --repeats 3 --out "$out/prefill30$tag.json" 2>&1 | grep "^\[" | grep -v " host " || true
