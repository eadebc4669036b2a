#!/usr/bin/env bash
# CPU side, from the repo root, right before the device calls of tools/device/README.md:
# builds the atom-core, atom-server and atom-vllm wheels into .carry/atom (ignored by git: /.carry/),
# checks that every dependency they declare is on the GPU machine's image or among the carried vLLM
# dependency wheels, and that each device call's carry fits the 64 MiB limit.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
# ../shared/device/vllm-peer/make_carry.sh cuts vLLM's tarball at 60 MiB; with the working tree (~9.5 MiB) riding
# along, a call carrying that first piece goes over the 64 MiB limit: re-cut it at 50 MiB (checked by its sha256).
if [ -f .carry/vllm/c1/part-00 ] && [ -f .carry/vllm/c2/part-01 ] \
   && [ "$(stat -c %s .carry/vllm/c1/part-00)" -gt $((50 * 1024 * 1024)) ]; then
  t=$(mktemp -d)
  cat .carry/vllm/c1/part-00 .carry/vllm/c2/part-01 > "$t/vllm-trim.tar.xz"
  if [ "$(sha256sum "$t/vllm-trim.tar.xz" | awk '{print $1}')" = "$(cat .carry/vllm/vllm-trim.tar.xz.sha256)" ]; then
    (cd "$t" && split -b 50M -d -a 2 vllm-trim.tar.xz part-)
    mv "$t/part-00" .carry/vllm/c1/part-00 && mv "$t/part-01" .carry/vllm/c2/part-01
    echo "vLLM's tarball re-cut into pieces of <= 50 MiB (c1, c2)"
  else
    echo "build_carry: .carry/vllm's pieces do not match their sha256; run make_carry.sh again" >&2
  fi
  rm -rf "$t"
fi
rm -rf .carry/atom && mkdir -p .carry/atom
for p in atom-core atom-server atom-vllm; do
  "$PY" -m pip wheel -q --no-deps --no-build-isolation "packages/$p" -w .carry/atom
done
{ echo "atom wheels built $(date -u +%FT%TZ) from $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
       "with $(git status --short 2>/dev/null | wc -l) uncommitted paths"; } > .carry/atom/BUILD_INFO
cat .carry/atom/BUILD_INFO
"$PY" - <<'PY'
import glob, os, re, subprocess, zipfile

def norm(n): return re.sub(r"[-_.]+", "-", n).lower()

# The GPU image's packages (KINDS.md, "Python packages already there") plus the carried vLLM deps.
have = set()
kinds = "/work/.library/device/KINDS.md"
if os.path.exists(kinds):
    text = open(kinds).read()
    block = text.split("## Python packages already there", 1)[-1]
    m = re.search(r"Packages: (.*?)\.\s*$", block, re.S | re.M)
    if m:
        have |= {norm(x.strip()) for x in m.group(1).split(",")}
have |= {norm(os.path.basename(w).split("-")[0]) for w in glob.glob(".carry/vllm/deps/*.whl")}
have |= {"vllm", "atom-core"}
missing = {}
for whl in glob.glob(".carry/atom/*.whl"):
    with zipfile.ZipFile(whl) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            name = norm(re.split(r"[ ;<>=!~\[(]", line.split(":", 1)[1].strip())[0])
            if name not in have:
                missing.setdefault(name, []).append(os.path.basename(whl))
print("dependencies missing on the device:", missing or "none")

def size(paths):
    total = 0
    for p in paths:
        for root, _, files in os.walk(p) if os.path.isdir(p) else [(os.path.dirname(p), [], [os.path.basename(p)])]:
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total

tree = subprocess.run("git ls-files -z --cached --others --exclude-standard", shell=True, capture_output=True).stdout
tree_bytes = sum(os.path.getsize(f) for f in tree.decode().split("\0") if f and os.path.isfile(f))
# vLLM's tarball in two pieces of <= 50 MiB (c1, c2): the working tree travels with every call (~9 MiB by stop 63).
calls = {"call 1": [".carry/vllm/c1"],
         "call 2": [".carry/vllm/c2", ".carry/vllm/vllm-trim.tar.xz.sha256", ".carry/atom"],
         "call 3": [".carry/vllm/deps"],
         "call 4 (MoE shapes)": [".carry/vllm/c3"]}
for call, paths in calls.items():
    paths = [p for p in paths if os.path.exists(p)]
    mib = (tree_bytes + size(paths)) / 2**20
    print(f"{call}: working tree {tree_bytes / 2**20:.1f} MiB + carry {size(paths) / 2**20:.1f} MiB = {mib:.1f} MiB"
          + ("  <-- over the 64 MiB limit" if mib > 64 else ""))
PY
