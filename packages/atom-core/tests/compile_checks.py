"""Shared checks of ATOM's custom ops under torch.compile (CPU torch, Triton interpreter, GPU inductor)."""

from __future__ import annotations

import torch
import transformers
from paged_harness import PagedHarness

from atom.loader import load_model
from atom.ops import registry
from atom.ops.custom_ops import custom_op_for
from atom.ops.self_check import CheckInputs, compare_outputs

PROMPTS = [[5, 9, 2, 77, 3, 14, 8, 40, 41], [4, 4, 60, 1, 2]]
# Smaller than the self-check defaults: opcheck runs each op several times (slow under the interpreter).
SMALL = {"hidden_size": 64, "intermediate_size": 32, "head_dim": 32}


def opaque_ops(backend: str) -> list[str]:
    """Ops whose `backend` implementation is a custom op under torch.compile."""
    out = []
    for op in registry._OP_FAMILY:
        impl = registry.implementation(op, backend)
        if impl is not None and not impl.traceable and registry.op_def(op).custom_op:
            out.append(op)
    return out


def _clone(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


# Layer properties whose example inputs take another path through an op (optional arguments set); the
# last one: sinks over an FP8 KV cache (k_scale, v_scale and sinks all given).
VARIANTS = [("paged_attention", {"has_sinks": True}), ("fused_experts_swigluoai", {"mxfp4": True}),
            ("paged_attention", {"has_sinks": True, "kv_cache_dtype": torch.float8_e4m3fn})]


def _has_fp8(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz) for a in args)


def check_custom_op(op: str, backend: str, device: str, dtype=torch.float32, compile_backend="aot_eager",
                    static: dict | None = None) -> None:
    """opcheck (schema with its mutations, fake vs real shapes/dtypes/strides, AOT dispatch with dynamic
    shapes) on the op's example inputs (for a layer with `static` properties, e.g. sinks or an FP8 KV
    cache), then resolve(op, backend) compiled with fullgraph=True must equal eager, outputs and in-place
    writes alike."""
    impl = registry.implementation(op, backend)
    opdef = registry.op_def(op)
    calls = opdef.example(CheckInputs(dtype, torch.device(device)), {**SMALL, **(static or {})})
    calls = calls if isinstance(calls, list) else [calls]
    custom = custom_op_for(impl, opdef)
    for args in calls:
        # opcheck's schema test compares arguments with torch.allclose, which has no FP8 kernel (CPU: no
        # allclose; CUDA, torch 2.11: no mul, seen on the H200); the in-place writes of FP8 arguments are
        # compared below (eager vs compiled) instead.
        schema = () if _has_fp8(args) else ("test_schema",)
        torch.library.opcheck(custom, _clone(args),
                              test_utils=(*schema, "test_faketensor", "test_aot_dispatch_dynamic"))
    fn = registry.resolve(op, backend)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend)
    eager_args, compiled_args = _clone(calls[-1]), _clone(calls[-1])
    assert compare_outputs(fn(*eager_args), compiled(*compiled_args)) is None, op
    for a, b in zip(eager_args, compiled_args):
        if isinstance(a, torch.Tensor):
            assert compare_outputs(a, b) is None, f"{op}: an argument written in place differs"


def write_tiny_qwen3_moe(path) -> None:
    """2 layers: qk-norm attention (the fused qk_norm_rope_cache path), one MoE and one dense MLP."""
    config = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[1], max_position_embeddings=64)
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(path)


def write_tiny_deepseek_v3(path) -> None:
    """2 layers of MLA (q_lora on) with one dense and one DeepSeekMoE layer (grouped sigmoid routing)."""
    config = transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=96, moe_intermediate_size=24, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1,
        max_position_embeddings=64)
    transformers.DeepseekV3ForCausalLM(config).save_pretrained(path)


class _Compiled:
    """What PagedHarness drives: the model's forward compiled with fullgraph=True (no graph breaks)."""

    def __init__(self, model, backend: str):
        self.model = model
        self.forward = torch.compile(model.forward, fullgraph=True, backend=backend)

    def __call__(self, ids, positions):
        return self.forward(ids, positions)

    def compute_logits(self, hidden):
        return self.model.compute_logits(hidden)


def compiled_model_logits(path, device: str, compile_backend: str, dtype: str = "float32", decode_steps: int = 1):
    """(eager logits, compiled logits, model) over a prefill of two prompts and `decode_steps` decode steps
    through the paged KV cache (block size 4 < the prompts), greedy tokens from the eager run."""
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        model, _ = load_model(str(path), dtype=dtype, device=device, progress=False)
        harness = PagedHarness(model, num_blocks=16, block_size=4, device=device)
        if compiled:
            harness.model = _Compiled(model, compile_backend)
        seqs = harness.add(len(PROMPTS))
        steps = [harness.step(PROMPTS, seqs)]
        for i in range(decode_steps):
            tokens = results[0][i].argmax(-1) if compiled else steps[-1].argmax(-1)
            steps.append(harness.step([[int(t)] for t in tokens], seqs))
        results.append(steps)
    return torch.cat(results[0]), torch.cat(results[1]), model
