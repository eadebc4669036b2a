"""The README's quick start, word for word, as a new user runs it: a fresh virtual environment, the
install commands of its first `bash` block (run by a shell in a copy of the checkout), `atom serve`
(on a free port), then its Python snippet with the official openai client from that environment,
which must answer the capital question with Berlin at temperature 0.

Cheap as it can be: the torch wheel on disk is reused. Where PyTorch's index cannot be reached (this CI:
only PyPI is), pip would retry it five times per package before it uses the wheel on disk; PIP_RETRIES=0
skips the retries and changes nothing else (the README says so). PIP_COMPILE=false skips pip's byte-compiling
of every installed module (most of torch and transformers is never imported here; `atom serve` compiles what
it imports), the same packages are installed. Runs once per CI as its own suite (ci/test.sh).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
INSTALL_TIMEOUT_S = 1200
START_TIMEOUT_S = 900


def quickstart_blocks(readme: str) -> tuple[list[str], str]:
    """(the commands of the first bash block, the first python block) of the Quick start section."""
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    bash = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in bash.splitlines() if line.strip()], python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except OSError:
        return 0, b""


def test_readme_quickstart(tmp_path):
    with open(os.path.join(REPO, "README.md")) as f:
        commands, snippet = quickstart_blocks(f.read())
    *install, serve = commands
    assert serve == ".venv/bin/atom serve", serve
    work = tmp_path / "atom"  # a copy of the checkout: the repo's own .venv stays untouched
    shutil.copytree(os.path.join(REPO, "packages"), work / "packages",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "tests"))
    shutil.copy(os.path.join(REPO, "README.md"), work)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PIP_RETRIES="0", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_COMPILE="false")
    # the compiled CPU forward costs ~30 s of cold compile on the CI machine; test_cpu_compile.py checks it
    env["ATOM_CPU_COMPILE"] = "0"
    for cmd in install:
        t0 = time.monotonic()
        out = subprocess.run(cmd, shell=True, cwd=work, env=env, capture_output=True, text=True,
                             timeout=INSTALL_TIMEOUT_S)
        print(f"[{time.monotonic() - t0:.0f} s] {cmd}")
        assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"

    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*shlex.split(serve), "--host", "127.0.0.1", "--port", str(port)], cwd=work,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while get(base + "/health")[0] != 200:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() - t0 < START_TIMEOUT_S, log_path.read_text()
            time.sleep(1)
        print(f"[{time.monotonic() - t0:.0f} s] {serve} (until /health answers)")
        models = json.loads(get(base + "/v1/models")[1])["data"]
        assert [m["id"] for m in models] == ["SmolLM2-135M-Instruct"]
        assert "localhost:8000" in snippet
        answer = subprocess.run([str(work / ".venv" / "bin" / "python"), "-c",
                                 snippet.replace("localhost:8000", f"127.0.0.1:{port}")],
                                env=env, capture_output=True, text=True, timeout=600)
        print("the model says:", answer.stdout.strip())
        assert answer.returncode == 0, answer.stderr
        assert "Berlin" in answer.stdout
    finally:
        proc.send_signal(signal.SIGTERM)  # atom serve drains, stops its engine, exits 0
        code = proc.wait(120)
    log = log_path.read_text()
    print(log[-4000:])
    assert code == 0, log
    for phase in ("config in", "tokenizer in", "weights in", "KV cache in", "compile in", "ready in"):
        assert f"start-up: {phase}" in log, phase
    assert "Traceback" not in log and "deprecated" not in log.lower()
