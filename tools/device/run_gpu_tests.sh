#!/usr/bin/env bash
# On the lent GPU machine, from the repo root: the test suites of the four packages on the GPU (issue 21),
# then one summary line. Every device-aware test runs on CPU and on CUDA there (atom.testing); float32 parity
# meets the CPU tolerances on CUDA, bf16 variants their atom.testing bounds; CUDA graphs are on where the
# host uses them (atom-server's engine, atom serve).
#
#   bash tools/device/run_gpu_tests.sh [core,server,vllm,sglang] [PYTEST_ARGS...]   (default: all four)
#   e.g. `bash tools/device/run_gpu_tests.sh server -k parity` to re-run a part (the args go to every pass).
#
# - The packages are not installed there: atom-core/-server/-vllm/-sglang come from their source trees.
# - Dependencies: the carried wheels of .carry/vllm/deps (msgspec, pyzmq, fastapi, uvicorn, openai, gguf, ...)
#   are installed into /tmp/site first (once per machine); so carry ".carry/vllm/deps" (21 MB).
# - atom-vllm runs when vLLM is importable (tools/device/setup_device.sh installs it: carry .carry/vllm/c1 in
#   one call, then .carry/vllm/c2 + .carry/vllm/vllm-trim.tar.xz.sha256 + .carry/atom (the plugin's entry point),
#   then .carry/vllm/deps with this script: the working tree travels with each call under a 64 MiB limit);
#   atom-sglang when SGLang is (not carried now). Otherwise their suite is skipped with a line saying why.
# - Each suite: a parallel pass (pytest-xdist, ATOM_TEST_WORKERS processes, default 8; many small CUDA
#   processes share the GPU), then a serial pass of the tests marked `serial` (they size the KV cache from
#   free GPU memory, so nothing else may run beside them).
# - Time: ATOM_GPU_TEST_BUDGET_S (default 480) bounds the whole script; each pass gets what is left, less a
#   reserve for the passes after it, and a test hanging past ATOM_TEST_TIMEOUT_S (default 240) fails alone.
# - ATOM_TEST_DEVICES=cuda leaves the CPU variants to CI (faster); default: cpu and cuda.
# - Logs and JUnit XML land in $OUT (or /tmp/atom-gpu). Exit status 0 only when nothing failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
out=${OUT:-/tmp/atom-gpu}
mkdir -p "$out"
site=${ATOM_SITE:-/tmp/site}
workers=${ATOM_TEST_WORKERS:-8}
budget=${ATOM_GPU_TEST_BUDGET_S:-480}
per_test=${ATOM_TEST_TIMEOUT_S:-240}
packages=${1:-core,server,vllm,sglang}
shift $(( $# > 0 ? 1 : 0 ))
extra=("$@")

mkdir -p "$site"
# A server left by an earlier call (a cut serve_vs_vllm run in stop 39 kept 85% of the memory) makes every test that
# sizes its KV cache from free memory fail: say what holds the GPU and stop the servers this repo's scripts start.
busy=$(nvidia-smi --query-compute-apps=pid,used_memory,name --format=csv,noheader 2>/dev/null)
if [ -n "$busy" ]; then
  echo "run_gpu_tests: the GPU is in use before the tests: $busy"
  pkill -KILL -f "vllm.entrypoints.openai.api_server|atom_server serve|VLLM::EngineCore" && sleep 3 \
    && echo "run_gpu_tests: stopped leftover servers; now: $(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader)"
fi
if [ -d .carry/vllm/deps ] && [ ! -f "$site/.atom-deps-done" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    .carry/vllm/deps/*.whl 2> >(grep -v "Target directory .* already exists" >&2) && touch "$site/.atom-deps-done"
fi
if ls .carry/vllm/c*/part-* >/dev/null 2>&1 || ls .carry/atom/*.whl >/dev/null 2>&1; then
  source tools/device/setup_device.sh || echo "setup_device.sh: exit $? (vLLM not installed; see above)"
fi
# Source trees first (they win over carried atom wheels, whose dist-info only serves the vLLM entry point).
export PYTHONPATH=packages/atom-core/src:packages/atom-server/src:packages/atom-vllm/src:packages/atom-sglang/src:${ATOM_SITE_ATOM:-/tmp/site-atom}:$site
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU')"

left() { echo $(( budget - ($(date +%s) - start) )); }

# run_pass NAME RESERVE_S PYTEST_ARGS...: one pytest run under what is left of the budget minus RESERVE_S.
# The reserves are for the default budget (480 s) and shrink with a smaller one: with ATOM_GPU_TEST_BUDGET_S=260 a
# fixed 240 s reserve left the core pass 20 s, and a -k selection ran nothing (2026-12-05). A reserve never takes
# more than half of what is left: with ATOM_GPU_TEST_BUDGET_S=50 the scaled reserve (25 s) after ~10 s of setup
# left the core pass under 20 s and `-k early` ran nothing (2026-12-07).
run_pass() {
  local name=$1 reserve=$2; shift 2
  (( budget < 480 )) && reserve=$(( reserve * budget / 480 ))
  local now; now=$(left)
  (( reserve > now / 2 )) && reserve=$(( now / 2 ))
  local limit=$(( now - reserve ))
  if [ "$limit" -lt 20 ]; then
    echo "=== $name: not run (out of time budget)"; echo "$name" >> "$out/not_run"; return
  fi
  echo "=== $name (limit ${limit} s)"
  local t0; t0=$(date +%s)
  # --continue-on-collection-errors: a module that cannot import here (a missing package) is one error, not
  # the end of the pass.
  timeout -s INT -k 30 "$limit" python3 -m pytest -q -p no:cacheprovider --timeout "$per_test" \
    --continue-on-collection-errors --junitxml="$out/$name.xml" "$@" ${extra[@]+"${extra[@]}"} > "$out/$name.log" 2>&1
  local rc=$?
  # pytest's short summary (failures, errors, skip reasons) and its last line; the whole log is in $OUT
  if grep -q "short test summary info" "$out/$name.log"; then
    sed -n '/short test summary info/,$p' "$out/$name.log" | tail -n 40
  else
    tail -n 15 "$out/$name.log"
  fi
  echo "=== $name: exit $rc in $(( $(date +%s) - t0 )) s"
  # 5: nothing collected (a serial pass with no serial test); 124: cut by the budget (the XML says what ran)
  if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then echo "$name exit $rc" >> "$out/failed_passes"; fi
}

rm -f "$out"/*.xml "$out/not_run" "$out/failed_passes" "$out/skipped_suites"
skip_suite() { echo "=== $1: skipped ($2)"; echo "$1: $2" >> "$out/skipped_suites"; }
has() { python3 -c "import $1" >/dev/null 2>&1; }

for pkg in ${packages//,/ }; do
  case $pkg in
    core)
      # Triton kernels natively (no TRITON_INTERPRET): the suite's Triton tests run as GPU tests here.
      # -rP keeps the passed tests' prints: the Triton checks' measured errors ('ERR' lines) -> errors.txt.
      run_pass core 240 -n "$workers" --dist load -m "not serial" -rP packages/atom-core/tests
      grep -ho 'ERR .*' "$out/core.log" | sort > "$out/errors.txt" || true
      run_pass core-serial 200 -m serial packages/atom-core/tests ;;
    server)
      if ! has msgspec || ! has fastapi || ! has zmq; then
        skip_suite server "msgspec/fastapi/pyzmq missing: carry .carry/vllm/deps"; continue
      fi
      # loadscope: a module's server / engines / references are built once, on one worker.
      run_pass server 60 -n "$workers" --dist loadscope -m "not serial" packages/atom-server/tests
      run_pass server-serial 30 -m serial packages/atom-server/tests ;;
    vllm)
      if ! has vllm; then skip_suite vllm "vLLM not installed (setup_device.sh with the .carry/vllm pieces)"; continue; fi
      if ! python3 -c "from importlib.metadata import entry_points as e; import sys; \
sys.exit(not [x for x in e(group='vllm.general_plugins') if x.value.startswith('atom_vllm')])"; then
        skip_suite vllm "atom_vllm's vLLM entry point not installed (carry .carry/atom: build_carry.sh)"; continue
      fi
      run_pass vllm 0 packages/atom-vllm/tests ;;
    sglang)
      if ! has sglang; then skip_suite sglang "SGLang not installed (not carried: ../shared/device/sglang-peer)"; continue; fi
      run_pass sglang 0 packages/atom-sglang/tests ;;
    *) echo "unknown package $pkg (core, server, vllm, sglang)"; exit 2 ;;
  esac
done

python3 - "$out" "$(( $(date +%s) - start ))" <<'PY'
import glob, os, sys, xml.etree.ElementTree as ET
out, secs = sys.argv[1], sys.argv[2]
suites, total = {}, [0, 0, 0]
for f in sorted(glob.glob(os.path.join(out, "*.xml"))):
    pkg = os.path.basename(f)[:-4].split("-")[0]
    c = suites.setdefault(pkg, [0, 0, 0])
    for s in ET.parse(f).getroot().iter("testsuite"):
        tests, bad, skipped = (int(s.get(k, 0)) for k in ("tests", "failures", "skipped"))
        bad += int(s.get("errors", 0))
        for i, v in enumerate((tests - bad - skipped, bad, skipped)):
            c[i] += v
            total[i] += v
def read(name):
    p = os.path.join(out, name)
    return [l.strip() for l in open(p)] if os.path.exists(p) else []
parts = [f"{k} {p} passed {f} failed {s} skipped" for k, (p, f, s) in suites.items()]
parts += [f"{line.split(':')[0]} not run ({line.split(': ', 1)[1]})" for line in read("skipped_suites")]
parts += [f"{n} cut (time budget)" for n in read("not_run")]
problems = read("failed_passes")  # exit 1: failed tests (counted above); 124: cut by the budget; 2-4: pytest errors
ok = total[1] == 0 and total[0] > 0 and not read("not_run") and not problems
print(f"GPU TESTS {'OK' if ok else 'FAILED'}: " + "; ".join(parts)
      + f" | overall {total[0]} passed {total[1]} failed {total[2]} skipped in {secs} s"
      + (f" ({', '.join(problems)})" if problems else ""))
sys.exit(0 if ok else 1)
PY
