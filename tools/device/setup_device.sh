#!/usr/bin/env bash
# On the GPU machine, from the repo root; idempotent. Sourced by bench_vs_vllm.sh, or run by itself.
# - .carry/atom/*.whl (when carried): atom-core, atom-server, atom-vllm wheels -> /tmp/site-atom (their own
#   site, so the vLLM plugin is found through its entry points when it is on PYTHONPATH, and vLLM's baseline
#   runs from /tmp/site alone, where atom is not installed at all: issue 16's method).
# - vLLM 0.24.0 (carry recipe: /work/shared/device/vllm-peer): part-00 was copied to /tmp/chunks by the
#   call that carried .carry/vllm/c1; the call carrying .carry/vllm/c2 + deps + the sha256 joins the
#   parts and installs vLLM and its dependency wheels into /tmp/site; a call carrying .carry/vllm/c3
#   adds vLLM's MoE kernels. Without the vLLM pieces only the ATOM engine can run (NEED_VLLM=0).
set -uo pipefail
S=${ATOM_SITE:-/tmp/site}
SA=${ATOM_SITE_ATOM:-/tmp/site-atom}
mkdir -p $S $SA /tmp/chunks
rm -rf $S/atom $S/atom_server $S/atom_vllm $S/atom_core-*.dist-info $S/atom_server-*.dist-info \
  $S/atom_vllm-*.dist-info  # an older setup installed them beside vLLM
if [ ! -f $S/vllm/__init__.py ]; then
  [ -f .carry/vllm/c1/part-00 ] && cp -n .carry/vllm/c1/part-00 /tmp/chunks/
  [ -f .carry/vllm/c2/part-01 ] && cp -n .carry/vllm/c2/part-01 /tmp/chunks/
fi
if ls .carry/atom/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SA .carry/atom/*.whl \
    2> >(grep -v "Target directory .* already exists" >&2) || { echo "setup: atom wheel install failed"; return 5 2>/dev/null || exit 5; }
  cat .carry/atom/BUILD_INFO 2>/dev/null
fi
if [ ! -f $S/vllm/__init__.py ] && [ -d .carry/vllm/deps ] && [ ! -f .carry/vllm/vllm-trim.tar.xz.sha256 ]; then
  # vLLM's dependency wheels without vLLM (no checksum carried: a session that runs ATOM alone, as
  # run_gpu_tests.sh does); the engines' imports (msgspec, fastapi, ...) come from them
  [ -f $S/.atom-deps-done ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target $S .carry/vllm/deps/*.whl 2> >(grep -v "Target directory .* already exists" >&2) && touch $S/.atom-deps-done; }
elif [ ! -f $S/vllm/__init__.py ] && [ -d .carry/vllm/deps ]; then
  for p in part-00 part-01; do
    [ -f /tmp/chunks/$p ] || { echo "setup: missing /tmp/chunks/$p (the machine went cold: start again with call 1)"; return 3 2>/dev/null || exit 3; }
  done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $S .carry/vllm/deps/*.whl \
    2> >(grep -v "Target directory .* already exists" >&2)
  [ "$(cat /tmp/chunks/part-* | sha256sum | awk '{print $1}')" = "$(cat .carry/vllm/vllm-trim.tar.xz.sha256)" ] \
    || { echo "setup: vLLM checksum mismatch"; return 4 2>/dev/null || exit 4; }
  cat /tmp/chunks/part-* | python3 -c "import sys,tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('$S', filter='fully_trusted')"
  rm -f /tmp/chunks/part-*  # 99 MB of disk back; /tmp/site/vllm marks the install as done
fi
if ls .carry/vllm/serve/*.whl >/dev/null 2>&1 && [ -f $S/vllm/__init__.py ]; then  # `vllm serve`'s extra imports
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $S .carry/vllm/serve/*.whl \
    2> >(grep -v "Target directory .* already exists" >&2)
fi
if [ -f .carry/vllm/c3/moe.tar.xz ] && [ -f $S/vllm/__init__.py ] && [ ! -f $S/vllm/_moe_C_stable_libtorch.abi3.so ]; then
  tar -xJf .carry/vllm/c3/moe.tar.xz -C $S
fi
export PYTHONPATH=$SA:$S${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_CACHE_ROOT=/tmp/vllm_cache
python3 - <<'PY'
from importlib import metadata
have = {}
for dist in ("atom-core", "atom-server", "atom-vllm", "vllm", "torch", "triton", "transformers"):
    try:
        have[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        have[dist] = None
print("setup:", have, "vllm.general_plugins:", [e.value for e in metadata.entry_points(group="vllm.general_plugins")])
PY
