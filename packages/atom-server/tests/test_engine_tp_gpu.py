"""Tensor and expert parallelism on two GPUs (NCCL): CUDA graphs captured on every rank with the collectives
inside, async scheduling on every rank, the same greedy tokens as TP=1 and transformers (float32); a worker
killed mid-generation ends the offline engine with an error naming the rank (a collective with a dead peer
never completes on NCCL: the executor aborts it or exits), never a hang. Skipped with fewer than 2 GPUs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from tp_checkpoints import hf_greedy, write_checkpoint

pytestmark = pytest.mark.gpu
if torch.cuda.device_count() < 2:
    pytest.skip("needs 2 GPUs", allow_module_level=True)

from atom_server import LLM, SamplingParams  # noqa: E402

PROMPTS = [[5 + (i * 7) % 150 for i in range(n)] for n in (3, 40, 17, 29, 5, 11)]
MAX_NEW = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


def _tokens(path: str, **kwargs) -> tuple[list[list[int]], LLM]:
    llm = LLM(path, dtype="float32", block_size=16, max_model_len=64, max_num_seqs=8, gpu_memory_utilization=0.3,
              skip_tokenizer_init=True, **kwargs)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    except BaseException:
        llm.llm_engine.shutdown()  # the next case starts its own workers
        raise
    return [o.outputs[0].token_ids for o in outs], llm


@pytest.mark.parametrize("name,ep", [("llama", False), ("qwen3_moe", False), ("qwen3_moe", True)])
def test_tp2_nccl_graphs_match_tp1(tmp_path, name, ep):
    path = write_checkpoint(name, tmp_path / name)
    want = hf_greedy(path, PROMPTS, MAX_NEW, device="cuda")
    tp1, _ = _tokens(path)
    assert tp1 == want
    got, llm = _tokens(path, tensor_parallel_size=2, enable_expert_parallel=ep)
    engine = llm.llm_engine
    try:
        assert engine.runner.graphs is not None and engine.async_scheduling  # captured on both ranks
        assert got == want
        stats = engine.stats()
        assert stats["num_free_blocks"] == stats["num_total_blocks"]
        engine.runner.execute(engine.step_inputs.flush())
        assert all(not s.tables for s in engine.runner.rank_states())
    finally:
        engine.shutdown()


def test_killed_worker_ends_the_offline_engine_naming_the_rank(tmp_path):
    path = write_checkpoint("llama", tmp_path / "llama")
    script = textwrap.dedent(f"""
        import sys
        from atom_server import LLM, SamplingParams
        llm = LLM({path!r}, dtype="float32", max_model_len=64, gpu_memory_utilization=0.3, skip_tokenizer_init=True,
                  tensor_parallel_size=2)
        print("PIDS", *llm.llm_engine.runner.worker_pids, flush=True)
        params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
        while True:
            llm.generate([{{"prompt_token_ids": [3, 4]}}] * 8, params, use_tqdm=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "ATOM_TP_HANG_GRACE_S": "5"})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("PIDS"):
            worker = int(line.split()[1])
            break
    else:
        pytest.fail("".join(lines))
    time.sleep(2)  # generating
    os.kill(worker, signal.SIGKILL)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the engine hung after its worker died:\n" + "".join(lines))
    log = "".join(lines) + out
    assert proc.returncode != 0
    assert "tensor-parallel worker rank 1" in log and "killed by SIGKILL" in log, log
