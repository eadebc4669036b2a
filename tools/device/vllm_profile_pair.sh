#!/usr/bin/env bash
# Issue 16 target 1 on the GPU machine: the decode-step kernel table of vLLM's built-in model and of ATOM's model
# through atom-vllm (tools/device/vllm_decode_profile.py), one fresh process each, on one preset shape with random
# weights. vLLM runs from /tmp/site alone (atom not importable), vLLM+ATOM from /tmp/site-atom:/tmp/site. vLLM must
# be set up first (tools/device/setup_device.sh). Results: $OUT/vprof_<label>_<shape>.json and the printed tables.
#   bash tools/device/vllm_profile_pair.sh qwen3-8b --batch-sizes 1,32,128 --steps 32
cd "$(dirname "$0")/../.."
shape=${1:?usage: vllm_profile_pair.sh SHAPE [vllm_decode_profile.py flags]}
shift
source tools/device/setup_device.sh || exit $?
site=${ATOM_SITE:-/tmp/site}
site_atom=${ATOM_SITE_ATOM:-/tmp/site-atom}
out=${OUT:-/tmp/vprof-out}
mkdir -p "$out"
folder=/tmp/bench_models/$shape
mkdir -p "$folder"
PYTHONPATH=$site_atom:$site python3 -c "
import sys; sys.path.insert(0, 'tools/device')
from bench_vs_vllm import make_checkpoint
print(make_checkpoint('$shape', '/tmp/bench_models')[1])" || exit 3
for label in ${VPROF_ENGINES:-vllm atom-vllm}; do
  if [ "$label" = vllm ]; then pp=$site; export ATOM_DISABLE_VLLM_PLUGIN=1; else pp=$site_atom:$site; unset ATOM_DISABLE_VLLM_PLUGIN; fi
  PYTHONPATH=$pp timeout -k 10 "${VPROF_TIMEOUT_S:-280}" python3 tools/device/vllm_decode_profile.py --model "$folder" \
    --label "$label" --out "$out/vprof_${label}_${shape}.json" "$@" 2>&1 \
    | grep -v "^\[rank0\]:\|USDT\|Warning: \|^$" | grep -E "^==|^   |Error|error|ATOM built|Traceback" | head -150
done
unset ATOM_DISABLE_VLLM_PLUGIN
