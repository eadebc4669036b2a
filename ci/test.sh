#!/usr/bin/env bash
# The test command (README): sets up both environments, runs every suite, builds the four wheels.
# Exits non-zero on any failure, or when a suite ran no test.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
# Bytecode is compiled on first import and kept: ci/setup.sh does not compile the environments ahead (most
# of their modules are never imported here), so a PYTHONDONTWRITEBYTECODE from outside would make every
# process compile torch, transformers and vLLM again.
unset PYTHONDONTWRITEBYTECODE
bash ci/setup.sh all || { echo "ci: environment setup failed"; exit 1; }

results=$(mktemp -d)
status=0
run_suite() {  # name, python, pytest args...
  local name=$1 py=$2; shift 2
  echo "=== suite: $name"
  local t0; t0=$(date +%s)
  "$py" -m pytest -q -p no:cacheprovider --junitxml="$results/$name.xml" "$@"
  local rc=$?
  echo "=== suite $name: exit $rc in $(( $(date +%s) - t0 )) s"
  if [ $rc -ne 0 ]; then status=1; fi  # includes 5 = no tests collected
}

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# atom-core, atom-server, atom-vllm on torch 2.13 CPU (Triton kernel tests run in their own process
# because TRITON_INTERPRET must be set before triton is imported).
run_suite core .venv/bin/python packages/atom-core/tests --ignore-glob='*test_triton_*'
TRITON_INTERPRET=1 run_suite triton-interpret .venv/bin/python packages/atom-core/tests/test_triton_*.py
run_suite server .venv/bin/python packages/atom-server/tests
run_suite vllm .venv/bin/python packages/atom-vllm/tests
run_suite sglang .venv-sglang/bin/python packages/atom-sglang/tests
# The README's quick start in a fresh virtual environment (pip cache and the on-disk torch wheel reused),
# answering one chat request with the bundled SmolLM2 through the official openai client.
run_suite quickstart .venv/bin/python ci/test_quickstart.py -s

echo "=== wheels"
rm -rf dist && mkdir -p dist
for p in atom-core atom-server atom-vllm atom-sglang; do
  .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation "packages/$p" -w dist >/dev/null \
    || { echo "wheel build failed: $p"; status=1; }
done
ls dist

echo "ci: total $(( $(date +%s) - start )) s"
.venv/bin/python - "$results" <<'PY' || status=1
import sys, glob, xml.etree.ElementTree as ET
tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
for f in sorted(glob.glob(sys.argv[1] + "/*.xml")):
    for s in ET.parse(f).getroot().iter("testsuite"):
        for k in tot:
            tot[k] += int(s.get(k, 0))
failed = tot["failures"] + tot["errors"]
passed = tot["tests"] - failed - tot["skipped"]
print(f"ci: {passed} passed, {failed} failed, {tot['skipped']} skipped")
sys.exit(1 if failed or passed == 0 else 0)
PY
exit $status
