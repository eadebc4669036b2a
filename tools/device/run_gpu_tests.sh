#!/usr/bin/env bash
# On the lent GPU machine, from the repo root: every GPU test (atom-core, atom-server), then the Triton
# kernel micro-benchmark.
# The packages are not installed there, so atom-core is taken from its source tree.
#   bash tools/device/run_gpu_tests.sh            (logs and bench.json land in $OUT, or /tmp/atom-gpu)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=packages/atom-core/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/atom-gpu}
mkdir -p "$out"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

# Triton kernels: tiny and realistic cases (the 'ERR' lines are the measured errors).
python3 -m pytest -q -s -p no:cacheprovider packages/atom-core/tests/test_triton_*.py 2>&1 | tee "$out/tests.log"
status=${PIPESTATUS[0]}
grep -o 'ERR .*' "$out/tests.log" > "$out/errors.txt" || true

# Any other test marked gpu in atom-core (exit code 5 = none collected, not a failure).
python3 -m pytest -q -p no:cacheprovider -m gpu packages/atom-core/tests \
  --ignore-glob='*test_triton_*' 2>&1 | tee "$out/other_gpu_tests.log"
other=${PIPESTATUS[0]}
[ "$other" = 5 ] && other=0

# atom-server's GPU tests: CUDA graphs vs eager, async scheduling, profiled KV sizing, FP8 checkpoints with an
# FP8 KV cache on CUDA graphs vs the CPU reference. The engine needs
# msgspec, which the image lacks: setup_device.sh puts it in /tmp/site with the carried vLLM dependencies
# (last on the path, so the source trees win over installed atom wheels).
PYTHONPATH=packages/atom-server/src:$PYTHONPATH:${ATOM_SITE:-/tmp/site} python3 -m pytest -q -p no:cacheprovider \
  packages/atom-server/tests/test_engine_gpu.py packages/atom-server/tests/test_engine_async.py \
  packages/atom-server/tests/test_engine_fp8_gpu.py 2>&1 | tee "$out/server_gpu_tests.log"
server=${PIPESTATUS[0]}
[ "$server" = 5 ] && server=0

bench=0
if [ "${ATOM_SKIP_BENCH:-0}" != 1 ]; then  # ATOM_SKIP_BENCH=1: tests only
  python3 tools/device/kernel_bench.py --out "$out/bench.json" 2>&1 | tee "$out/bench.log"
  bench=${PIPESTATUS[0]}
fi
echo "tests: $status  other gpu tests: $other  server gpu tests: $server  bench: $bench"
[ "$status" = 0 ] && [ "$other" = 0 ] && [ "$server" = 0 ] && [ "$bench" = 0 ]
