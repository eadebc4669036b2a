#!/usr/bin/env bash
# MF3 (tools/device/README.md): one device call, under 10 min (its parts time out at 120 + 220 + 45 + 2 x 75 s): the
# fragment order's new code layout on the GPU (its tests), the one-session A/B against the old layout and the plain
# gate / up matrix, the tile sweep at 32 and 128 spread tokens, and an Nsight Compute profile of the two GEMMs at 32
# tokens on both layouts. Results under $OUT (or ./mf3_out).
#     bash tools/device/mf3.sh            (carry .carry/vllm/c1 to stage vLLM for the vs-vLLM calls after it)
set -uo pipefail
out=${OUT:-mf3_out}
mkdir -p "$out"
export PYTHONPATH=packages/atom-core/src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
ATOM_TEST_DEVICES=cuda ATOM_GPU_TEST_BUDGET_S=120 bash tools/device/run_gpu_tests.sh core -k "fragments or gpt_oss" \
  2>&1 | grep -E "passed|failed|GPU TESTS|ERR|Error" | tail -8
timeout 220 python3 tools/device/mx_paths_bench.py --routing random --tokens 1,8,32,128,512 \
  --paths regdot_frag,regdot_frag_contig,regdot_frag_ungated --sweep --sweep-tokens 32,128 \
  --sweep-kernels frag_split,frag_ungated --frag-tiles 16x3,16x4,32x3 --frag-splits 1,2,3,4 \
  --out "$out/frag_ab.json" 2>&1 | grep -v Warn | cut -c1-200
# PDL off (ATOM_PDL is read at import): whether kernels launched early and parked in gdc_wait take slots from the GEMMs
ATOM_PDL=0 timeout 45 python3 tools/device/mx_paths_bench.py --routing random --tokens 32,128 --paths regdot_frag \
  --out "$out/frag_nopdl.json" 2>&1 | grep -v Warn | cut -c1-200
for layout in split contig; do
  path=regdot_frag; [ "$layout" = contig ] && path=regdot_frag_contig
  timeout 75 ncu --clock-control none --kernel-name regex:_expert_gemm_mxf --launch-skip 4 --launch-count 2 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
    --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section ComputeWorkloadAnalysis \
    python3 tools/device/mx_paths_bench.py --routing random --tokens 32 --paths $path --once > "$out/ncu32_$layout.txt" 2>&1
  echo "ncu $layout rc $?"
  grep -E "Duration|DRAM Throughput|L2 Cache Throughput|Memory Throughput|Compute \(SM\)|Achieved Occupancy|Issue Slots Busy|No Eligible|Eligible Warps|Registers Per|Waves Per" \
    "$out/ncu32_$layout.txt" | head -24
done
