#!/usr/bin/env bash
# G4 (tools/device/README.md), the first call: the fragment kernel's K split at spread and concentrated routing
# (1-256 tokens, two tiles, splits 1-3), against which MX_FRAG_SPLIT_K_RULE (moe_swigluoai.py) was set, and the
# fragment tests on the GPU under the new rule. Results under $OUT (or ./g4_out). Carry .carry/vllm/c1 to stage
# vLLM for the vs-vLLM calls after it.
set -uo pipefail
out=${OUT:-g4_out}
mkdir -p "$out"
export PYTHONPATH=packages/atom-core/src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
ATOM_TEST_DEVICES=cuda ATOM_GPU_TEST_BUDGET_S=80 bash tools/device/run_gpu_tests.sh core -k "fragments" \
  2>&1 | grep -E "passed|failed|GPU TESTS|ERR|Error" | tail -6
timeout 240 python3 tools/device/mx_paths_bench.py --routing random --tokens 1,8,16,32,64,128,256 --paths regdot_frag \
  --sweep --sweep-tokens 1,8,16,32,64,128,256 --sweep-kernels frag_split --frag-tiles 16x3,32x3 --frag-splits 1,2,3 \
  --out "$out/split_random.json" 2>&1 | grep -v Warn | cut -c1-160
timeout 90 python3 tools/device/mx_paths_bench.py --routing concentrated --tokens 32,128 --paths regdot_frag \
  --sweep --sweep-tokens 32,128 --sweep-kernels frag_split --frag-tiles 16x3,32x3 --frag-splits 1,3 \
  --out "$out/split_conc.json" 2>&1 | grep -v Warn | cut -c1-160
