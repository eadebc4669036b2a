#!/usr/bin/env bash
# On the GPU machine, from the repo root: set up /tmp/site (tools/device/setup_device.sh), then run
# tools/device/bench_vs_vllm.py with the given flags. Results land in $OUT (bench_<shape>.json/.log).
cd "$(dirname "$0")/../.."
source tools/device/setup_device.sh || exit $?
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec python3 tools/device/bench_vs_vllm.py "$@"
