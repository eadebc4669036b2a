#!/usr/bin/env bash
# On the GPU machine, from the repo root; idempotent. Sourced by bench_vs_vllm.sh, or run by itself.
# - .carry/atom/*.whl (when carried): atom-core, atom-server, atom-vllm wheels -> /tmp/site-atom (their own
#   site, so the vLLM plugin is found through its entry points when it is on PYTHONPATH, and vLLM's baseline
#   runs from /tmp/site alone, where atom is not installed at all: issue 16's method).
# - vLLM 0.24.0 (carry recipe: /work/shared/device/vllm-peer): each call copies the tarball's pieces it
#   carries (.carry/vllm/c*/part-*, any number of calls: c1, then c2 + the sha256 + .carry/atom, then deps, then
#   c3 for the MoE shapes; tools/device/build_carry.sh prints each call's size) to /tmp/chunks, installs the dependency wheels when carried, and joins the pieces into /tmp/site once
#   the checksum says all are here; a call carrying .carry/vllm/c3 adds vLLM's MoE kernels. Without the vLLM
#   pieces only the ATOM engine can run (NEED_VLLM=0).
set -uo pipefail
S=${ATOM_SITE:-/tmp/site}
SA=${ATOM_SITE_ATOM:-/tmp/site-atom}
mkdir -p $S $SA /tmp/chunks
rm -rf $S/atom $S/atom_server $S/atom_vllm $S/atom_core-*.dist-info $S/atom_server-*.dist-info \
  $S/atom_vllm-*.dist-info  # an older setup installed them beside vLLM
if [ ! -f $S/vllm/__init__.py ]; then  # every carried piece of vLLM's tarball, whichever call carried it
  for f in .carry/vllm/c*/part-*; do [ -f "$f" ] && [ ! -f "/tmp/chunks/${f##*/}" ] && cp "$f" /tmp/chunks/; done
  [ -f .carry/vllm/vllm-trim.tar.xz.sha256 ] && cp .carry/vllm/vllm-trim.tar.xz.sha256 /tmp/chunks/SHA256
fi
if ls .carry/atom/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SA .carry/atom/*.whl \
    2> >(grep -v "Target directory .* already exists" >&2) || { echo "setup: atom wheel install failed"; return 5 2>/dev/null || exit 5; }
  cat .carry/atom/BUILD_INFO 2>/dev/null
fi
if [ -d .carry/vllm/deps ] && [ ! -f $S/.atom-deps-done ]; then
  # vLLM's dependency wheels (also what the ATOM engines import: msgspec, fastapi, ...), once a machine
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $S .carry/vllm/deps/*.whl \
    2> >(grep -v "Target directory .* already exists" >&2) && touch $S/.atom-deps-done
fi
if [ ! -f $S/vllm/__init__.py ] && [ -f /tmp/chunks/SHA256 ] && ls /tmp/chunks/part-* >/dev/null 2>&1; then
  # join when every piece is here (the checksum says so); until then say which pieces came
  if [ "$(cat /tmp/chunks/part-* | sha256sum | awk '{print $1}')" = "$(cat /tmp/chunks/SHA256)" ]; then
    [ -f $S/.atom-deps-done ] || echo "setup: vLLM's dependency wheels were not carried (.carry/vllm/deps)"
    cat /tmp/chunks/part-* | python3 -c "import sys,tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('$S', filter='fully_trusted')"
    rm -f /tmp/chunks/part-*  # 99 MB of disk back; /tmp/site/vllm marks the install as done
  else
    echo "setup: vLLM not complete yet; pieces here: $(cd /tmp/chunks && ls part-* | tr '\n' ' ')" \
      "(carry the rest: .carry/vllm/c*)"
  fi
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
