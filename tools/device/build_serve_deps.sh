#!/usr/bin/env bash
# Wheels `vllm serve` (vLLM 0.24's OpenAI server) imports at start-up that the vllm-peer carry
# (../shared/device/vllm-peer, built for offline throughput) leaves out and the device image lacks:
# model-hosting-container-standards (imported by vllm.entrypoints.openai.api_server) and its jmespath.
# -> .carry/vllm/serve/*.whl; tools/device/setup_device.sh installs them into /tmp/site beside vLLM.
# Carry ".carry/vllm/serve" (~0.2 MB) with the call that runs serve_vs_vllm.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .carry/vllm/serve
python3 -m pip download -q --no-deps --only-binary :all: --python-version 3.12 -d .carry/vllm/serve \
  "model-hosting-container-standards>=0.1.14,<1.0.0" "jmespath"
ls -la .carry/vllm/serve
