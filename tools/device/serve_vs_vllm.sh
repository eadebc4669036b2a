#!/usr/bin/env bash
# Issue 16 target 5 on the GPU machine: `atom serve` against vLLM 0.24's own server (from /tmp/site, where atom
# is not installed) on a preset shape with random weights, measured by `atom bench serve` (random token-id
# prompts, greedy, EOS ignored), fresh servers interleaved (atom vllm atom vllm ...), via
# tools/cpu_serving_compare.py (its --runs / --concurrency / --input-len / --output-len / --prompts-per-slot
# flags pass through). The model folder gets a WordLevel tokenizer with one word per id, so both servers can
# detokenize whatever a random model samples. vLLM must be set up first (tools/device/setup_device.sh: the c1
# call, then this script in the call carrying c2 + deps + the sha256 + .carry/vllm/serve: the wheels `vllm serve`
# imports that the peer carry lacks, from tools/device/build_serve_deps.sh). Results: $OUT/serve_<shape>.json,
# server logs and each benchmark's JSON in $OUT/serve_logs_<shape>.tar.gz.
#   bash tools/device/serve_vs_vllm.sh qwen3-8b --runs 3 --concurrency 1,16,64 --input-len 1024 --output-len 1024
cd "$(dirname "$0")/../.."
shape=${1:?usage: serve_vs_vllm.sh SHAPE [cpu_serving_compare.py flags]}
shift
source tools/device/setup_device.sh || exit $?
site=${ATOM_SITE:-/tmp/site}
folder=/tmp/serve_models/$shape
mkdir -p "$folder"
PYTHONPATH=packages/atom-core/src:packages/atom-server/src:$site python3 - "$shape" "$folder" <<'PY' || exit 3
import json, os, sys
sys.path.insert(0, "tools/device")
from atom_server.bench import preset_checkpoint
from bench_vs_vllm import write_tokenizer

shape, folder = sys.argv[1], sys.argv[2]
preset_checkpoint(shape, folder)
with open(os.path.join(folder, "config.json")) as f:
    vocab = json.load(f)["vocab_size"]
write_tokenizer(folder, vocab_size=vocab)
print(f"{folder}: random-weight {shape}, tokenizer over all {vocab} ids", flush=True)
PY
export PYTHONPATH=packages/atom-core/src:packages/atom-server/src:$site
# SERVE_BUDGET_S bounds the comparison (default 540 s: a device call's 600 less the set-up), so the logs are
# packed and the JSON (rewritten after every run) comes back even when the last run is cut; $OUT returns at most
# 8 files, so the server logs and each benchmark's JSON travel as one archive.
logs=/tmp/serve_logs_$shape
rm -rf "$logs"
timeout -s INT -k 20 "${SERVE_BUDGET_S:-540}" python3 tools/cpu_serving_compare.py "$folder" --vllm-python python3 \
  --vllm-pythonpath "$site" --atom-extra "--load-format dummy" \
  --vllm-extra "--load-format dummy --gpu-memory-utilization 0.85" \
  --max-model-len 4096 --json "${OUT:-/tmp}/serve_$shape.json" --log-dir "$logs" "$@"
rc=$?
[ $rc = 124 ] && echo "serve_vs_vllm: cut at SERVE_BUDGET_S=${SERVE_BUDGET_S:-540} s; the JSON holds the runs that finished"
# A server must not outlive the comparison: in stop 39 a vLLM server whose start the budget cut kept 85% of the
# GPU's memory and failed the next call's tests. The driver stops each server's process group; this is the
# fallback when the driver itself was killed (timeout's -k).
if pgrep -f "api_server --model $folder|atom_server serve $folder|VLLM::EngineCore" >/dev/null; then
  echo "serve_vs_vllm: killing servers left behind: $(pgrep -f "api_server --model $folder|atom_server serve $folder|VLLM::EngineCore" | tr '\n' ' ')"
  pkill -KILL -f "api_server --model $folder|atom_server serve $folder|VLLM::EngineCore"
fi
tar -czf "${OUT:-/tmp}/serve_logs_$shape.tar.gz" -C /tmp "serve_logs_$shape" 2>/dev/null
exit $rc
