"""ATOM vs transformers on tiny random checkpoints, one per architecture feature.

Each case writes a 2-layer checkpoint with `save_pretrained`, runs transformers' own greedy decoding
(with its KV cache) as the oracle, then drives ATOM through the paged KV path (tests/paged_harness.py,
block size 4 < the prompts): a batch of prompts of different lengths, prefilled in two chunks (the
second on top of a cached prefix), then >= 8 decode steps fed with the oracle's tokens. Logits are
compared at every step.

Relative error = max|atom - hf| / max|hf| over all compared logits of a case. float32 must be < 1e-4;
bfloat16 (ATOM in bf16 vs transformers in float32): a median per-position rel err < 2.5e-2 and the argmax
equal on >= 80% of positions, a miss counted only where the reference is clearly ahead (atom.testing's bf16
bounds, which the engine tests of the other packages share).
Both run on every device under test (conftest.py: CPU, and CUDA on a GPU machine, where float32 meets the
same 1e-4). The measured errors are printed in the session summary (see conftest.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
import transformers
from paged_harness import PagedHarness
from transformers import AutoModelForCausalLM, DynamicCache

from atom.loader import load_model
from atom.models import supported_architectures
from atom.testing import assert_bf16_logits_close, bf16_logits_stats

VOCAB, HIDDEN, LAYERS, HEADS, HEAD_DIM = 320, 64, 2, 4, 16
DECODE_STEPS = 8
PROMPT_LENS = (7, 12, 10, 9, 11)


@dataclass(frozen=True)
class Case:
    config_class: str
    overrides: dict = field(default_factory=dict)
    prompt_lens: tuple[int, ...] = PROMPT_LENS
    chunked_prefill: bool = True


_BASE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
             head_dim=HEAD_DIM, intermediate_size=96, max_position_embeddings=128, rms_norm_eps=1e-6,
             tie_word_embeddings=False)

CASES: dict[str, Case] = {
    "llama_gqa_untied": Case("LlamaConfig", {"num_key_value_heads": 2}),
    "llama_mqa_tied": Case("LlamaConfig", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "llama_bias": Case("LlamaConfig", {"num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True}),
    "llama_rope_linear": Case("LlamaConfig", {"num_key_value_heads": 2,
                                              "rope_parameters": {"rope_type": "linear", "factor": 4.0}}),
    # Dynamic NTK rescales by the longest position in the step, so the prompts (equal length, all past
    # max_position_embeddings=8) are prefilled in one step, as transformers does in a padding-free batch.
    "llama_rope_dynamic": Case("LlamaConfig", {"num_key_value_heads": 2, "max_position_embeddings": 8,
                                               "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
                               prompt_lens=(10, 10, 10), chunked_prefill=False),
    "llama_rope_yarn": Case("LlamaConfig", {"num_key_value_heads": 2, "rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}),
    "llama_rope_llama3": Case("LlamaConfig", {"num_key_value_heads": 2, "rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}),
    "mistral_sliding_window": Case("MistralConfig", {"num_key_value_heads": 2, "sliding_window": 5}),
    "qwen2_qkv_bias": Case("Qwen2Config", {"num_key_value_heads": 2}),
    "qwen3_qk_norm_tied": Case("Qwen3Config", {"num_key_value_heads": 2, "head_dim": 32,
                                               "tie_word_embeddings": True}),
    "qwen3_mqa": Case("Qwen3Config", {"num_key_value_heads": 1}),
    "qwen3_moe_norm_topk": Case("Qwen3MoeConfig", {"num_key_value_heads": 2, "num_experts": 8,
                                                   "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                                                   "norm_topk_prob": True}),
    "qwen3_moe_no_norm_dense_layer": Case("Qwen3MoeConfig", {"num_key_value_heads": 1, "num_experts": 6,
                                                             "num_experts_per_tok": 3, "moe_intermediate_size": 24,
                                                             "norm_topk_prob": False, "mlp_only_layers": [1]}),
    "mixtral": Case("MixtralConfig", {"num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2}),
}


def _randomize_(model: torch.nn.Module) -> None:
    """Weights with some spread (HF init leaves norms at 1 and biases at 0, which would hide bugs)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            elif name.startswith("lm_head"):
                p.copy_(4 * torch.randn_like(p) / math.sqrt(p.shape[-1]))  # clear top-1 margins
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))


@torch.no_grad()
def _hf_greedy(model, prompts: list[list[int]], steps: int, split: int | None,
               forced: list[list[int]] | None = None):
    """transformers greedy decoding with its own cache (or fed `forced` tokens). Returns per sequence the
    tokens and the logits to compare: [after prompt[:split]] (if split) + [after the prompt] + one per step."""
    equal = len({len(p) for p in prompts}) == 1
    groups = [list(range(len(prompts)))] if equal else [[i] for i in range(len(prompts))]
    tokens: list[list[int]] = [[] for _ in prompts]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    for group in groups:
        cache = DynamicCache(config=model.config)
        ids = torch.tensor([prompts[i] for i in group])
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        for row, i in enumerate(group):
            if split is not None:
                logits[i].append(out.logits[row, split - len(prompts[i]) - 1])
            logits[i].append(out.logits[row, -1])
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1)
            if forced is not None:
                nxt = torch.tensor([forced[i][len(tokens[i])] for i in group])
            for row, i in enumerate(group):
                tokens[i].append(int(nxt[row]))
            out = model(input_ids=nxt[:, None], past_key_values=out.past_key_values, use_cache=True)
            for row, i in enumerate(group):
                logits[i].append(out.logits[row, -1])
    return tokens, [torch.stack(x) for x in logits]


@torch.no_grad()
def _atom_logits(model, prompts: list[list[int]], tokens: list[list[int]], split: int | None,
                 device: str = "cpu") -> list[torch.Tensor]:
    harness = PagedHarness(model, num_blocks=64, block_size=4, device=device)
    seqs = harness.add(len(prompts))
    out: list[list[torch.Tensor]] = [[] for _ in prompts]
    chunks = [[p[:split], p[split:]] if split is not None else [p] for p in prompts]
    for part in range(len(chunks[0])):
        logits = harness.step([c[part] for c in chunks], seqs)
        for i in range(len(prompts)):
            out[i].append(logits[i].float().cpu())
    for step in range(len(tokens[0])):
        logits = harness.step([[t[step]] for t in tokens], seqs)
        for i in range(len(prompts)):
            out[i].append(logits[i].float().cpu())
    return [torch.stack(x) for x in out]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@dataclass
class Reference:
    path: str
    prompts: list[list[int]]
    tokens: list[list[int]]
    logits: torch.Tensor  # all compared positions, stacked
    split: int | None
    # the test seed it was drawn under (a failure of a later test that uses it prints this one)
    seed: int = field(default_factory=torch.initial_seed)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    made: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if name not in made:
            case = CASES[name]
            config = getattr(transformers, case.config_class)(**{**_BASE, **case.overrides})
            hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
            _randomize_(hf)
            path = tmp_path_factory.mktemp(name)
            hf.save_pretrained(path)
            prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in case.prompt_lens]
            split = min(case.prompt_lens) - 3 if case.chunked_prefill else None
            tokens, logits = _hf_greedy(hf, prompts, DECODE_STEPS, split)
            made[name] = Reference(str(path), prompts, tokens, torch.cat(logits), split)
        return made[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_float32_logits_match_transformers(name, reference, parity_report, device, request):
    ref = reference(name)
    request.node.user_properties.append(("seed", ref.seed))
    model, config = load_model(ref.path, dtype="float32", device=device, progress=False)
    assert type(model).__name__ == config.architectures[0]
    got = torch.cat(_atom_logits(model, ref.prompts, ref.tokens, ref.split, device))
    err = rel_err(got, ref.logits)
    parity_report.append(f"float32  {device:4s} {name:32s} {config.architectures[0]:22s} rel_err={err:.2e} "
                         f"({got.shape[0]} positions)")
    assert err < 1e-4


@pytest.mark.parametrize("name", list(CASES))
def test_bfloat16_logits_close_to_transformers(name, reference, parity_report, device, request):
    ref = reference(name)
    request.node.user_properties.append(("seed", ref.seed))
    model, config = load_model(ref.path, dtype="bfloat16", device=device, progress=False)
    assert next(model.parameters()).dtype == torch.bfloat16
    got = torch.cat(_atom_logits(model, ref.prompts, ref.tokens, ref.split, device))
    stats = bf16_logits_stats(got, ref.logits)
    parity_report.append(f"bfloat16 {device:4s} {name:32s} {config.architectures[0]:22s} median rel_err "
                         f"{stats['median']:.2e} (worst {stats['worst']:.2e}) top1={stats['top1']:.0%} "
                         f"clear misses {stats['clear_misses']:.0%}")
    # Per position: a bf16 near-tie in an MoE router (or a greedy argmax) changes one position's expert
    # choice, and the KV it writes then moves later positions of that sequence too, so neither the worst
    # position nor a fixed fraction of positions is a stable bound. The median is, over five sequences
    # (with three, two routing flips in 800 draws of qwen3_moe_norm_topk moved two sequences and the
    # median past the bound): flips move a minority, while a systematic bug (wrong rope, bias, routing)
    # moves every position. Measured: medians 5e-3 to 1e-2, MoE cases included.
    assert_bf16_logits_close(stats)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as info:
        load_model(str(tmp_path), dtype="float32", progress=False)
    for arch in supported_architectures():
        assert arch in str(info.value)
    assert len(supported_architectures()) >= 6
