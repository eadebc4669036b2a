"""GGUF reader: tiny checkpoints written by transformers, converted to GGUF here, read back by ATOM.

References: the original HF weights (within each type's quantization error), a per-element decoder of
each block format written from llama.cpp's layout (independent of gguf-py), and transformers' own
GGUF loading of the same file (weights and logits).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFReader, GGUFWriter  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from atom.loader import load_model  # noqa: E402
from atom.loader.gguf import gguf_config, gguf_tokenizer, iterate_gguf  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from paged_harness import PagedHarness  # noqa: E402

# ---------------------------------------------------------------- a small HF -> GGUF writer

_HF_TO_GGUF_BLOCK = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_HF_TO_GGUF_BLOCK[module]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter order for Q/K rows: (head, half, i) -> (head, i, half)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_kquant_bytes(rows: int, cols: int, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Valid Q4_K / Q6_K blocks with random payload and small positive scales (gguf-py has no quantizer)."""
    size = {Q.Q4_K: 144, Q.Q6_K: 210}[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    if qtype == Q.Q4_K:
        scales = rng.uniform(1e-5, 4e-5, size=(rows, cols // 256, 2)).astype(np.float16)
        blocks[..., 0:4] = scales.view(np.uint8).reshape(rows, cols // 256, 4)
    else:
        scale = rng.uniform(1e-5, 4e-5, size=(rows, cols // 256, 1)).astype(np.float16)
        blocks[..., 208:210] = scale.view(np.uint8).reshape(rows, cols // 256, 2)
    return blocks.reshape(rows, -1)


def write_gguf(path, config, weights: dict[str, torch.Tensor], qtypes: dict[str, Q], arch: str = "llama",
               skip: tuple[str, ...] = (), reshape: dict[str, tuple] | None = None,
               extra: dict[str, np.ndarray] | None = None, more_metadata=None, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if more_metadata is not None:
        more_metadata(w)
    for hf, tensor in weights.items():
        if hf in skip:
            continue
        name = gguf_name(hf)
        arr = tensor.float().numpy()
        if arch == "llama" and ".q_proj." in hf:
            arr = llama_cpp_permute(arr, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in hf:
            arr = llama_cpp_permute(arr, config.num_key_value_heads)
        if reshape and hf in reshape:
            arr = arr.reshape(reshape[hf])
        qtype = qtypes.get(name, Q.F32)
        if qtype == Q.F32:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        elif qtype in (Q.Q4_K, Q.Q6_K):
            raw = random_kquant_bytes(arr.shape[0], arr.shape[1], qtype, rng)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        else:
            raw = gguf.quants.quantize(arr, qtype)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---------------------------------------------------------------- independent block decoders

def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)[..., 0]


def reference_dequantize(raw: np.ndarray, qtype: Q) -> np.ndarray:
    """Per-block decoding written from llama.cpp's block layouts (ggml-common.h / dequantize_row_*)."""
    if qtype == Q.F32:
        return raw.view(np.float32).astype(np.float32)
    if qtype == Q.F16:
        return raw.view(np.float16).astype(np.float32)
    rows = raw.shape[0]
    if qtype == Q.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    size = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20, Q.Q4_K: 144, Q.Q6_K: 210}[qtype]
    b = raw.reshape(-1, size)
    n = b.shape[0]
    if qtype == Q.Q8_0:
        out = _f16(b[:, 0:2])[:, None] * b[:, 2:].view(np.int8).astype(np.float32)
    elif qtype == Q.Q4_0:
        qs = b[:, 2:].astype(np.int32)
        out = np.concatenate([(qs & 0xF) - 8, (qs >> 4) - 8], axis=1) * _f16(b[:, 0:2])[:, None]
    elif qtype == Q.Q4_1:
        qs = b[:, 4:].astype(np.int32)
        out = np.concatenate([qs & 0xF, qs >> 4], axis=1) * _f16(b[:, 0:2])[:, None] + _f16(b[:, 2:4])[:, None]
    elif qtype == Q.Q4_K:
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, qs = b[:, 4:16].astype(np.int32), b[:, 16:144].astype(np.int32)
        out = np.zeros((n, 256), np.float32)

        def scale_min(j):
            if j < 4:
                return sc[:, j] & 63, sc[:, j + 4] & 63
            return (sc[:, j + 4] & 0xF) | ((sc[:, j - 4] >> 6) << 4), (sc[:, j + 4] >> 4) | ((sc[:, j] >> 6) << 4)

        for chunk in range(4):  # 64 values each: low nibbles with scale 2c, high nibbles with 2c+1
            q = qs[:, 32 * chunk:32 * chunk + 32]
            s1, m1 = scale_min(2 * chunk)
            s2, m2 = scale_min(2 * chunk + 1)
            out[:, 64 * chunk:64 * chunk + 32] = (d * s1)[:, None] * (q & 0xF) - (dmin * m1)[:, None]
            out[:, 64 * chunk + 32:64 * chunk + 64] = (d * s2)[:, None] * (q >> 4) - (dmin * m2)[:, None]
    else:  # Q6_K
        ql, qh = b[:, 0:128].astype(np.int32), b[:, 128:192].astype(np.int32)
        scales, d = b[:, 192:208].view(np.int8).astype(np.float32), _f16(b[:, 208:210])
        out = np.zeros((n, 256), np.float32)
        for half in range(2):
            lo, hi, s = ql[:, 64 * half:64 * half + 64], qh[:, 32 * half:32 * half + 32], scales[:, 8 * half:]
            for l in range(32):
                q1 = ((lo[:, l] & 0xF) | (((hi[:, l] >> 0) & 3) << 4)) - 32
                q2 = ((lo[:, l + 32] & 0xF) | (((hi[:, l] >> 2) & 3) << 4)) - 32
                q3 = ((lo[:, l] >> 4) | (((hi[:, l] >> 4) & 3) << 4)) - 32
                q4 = ((lo[:, l + 32] >> 4) | (((hi[:, l] >> 6) & 3) << 4)) - 32
                base, i = 128 * half + l, l // 16
                out[:, base] = d * s[:, i] * q1
                out[:, base + 32] = d * s[:, i + 2] * q2
                out[:, base + 64] = d * s[:, i + 4] * q3
                out[:, base + 96] = d * s[:, i + 6] * q4
    return out.reshape(rows, -1)


# ---------------------------------------------------------------- fixtures

# GGUF name -> type; every listed type appears on Q/K (permutation) and on another tensor.
MIXED_TYPES = {
    "token_embd.weight": Q.Q8_0, "output.weight": Q.Q6_K, "output_norm.weight": Q.F32,
    "blk.0.attn_q.weight": Q.Q4_0, "blk.0.attn_k.weight": Q.Q4_1, "blk.0.attn_v.weight": Q.Q4_K,
    "blk.0.attn_output.weight": Q.Q6_K, "blk.0.ffn_gate.weight": Q.BF16, "blk.0.ffn_up.weight": Q.F16,
    "blk.0.ffn_down.weight": Q.Q4_0, "blk.0.attn_norm.weight": Q.F16,
    "blk.1.attn_q.weight": Q.Q4_K, "blk.1.attn_k.weight": Q.Q6_K, "blk.1.attn_v.weight": Q.Q8_0,
    "blk.1.attn_output.weight": Q.Q4_1, "blk.1.ffn_gate.weight": Q.Q4_K, "blk.1.ffn_up.weight": Q.F32,
    "blk.1.ffn_down.weight": Q.BF16,
}
QTYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K]


def tiny_hf(tmp_dir, arch: str, tie: bool = False):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    # Row lengths are multiples of 256 so that the K-quants (256-value blocks) fit.
    config = cls(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=128,
                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms away from 1 and biases away from 0, so that a misplaced one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    folder = os.path.join(tmp_dir, f"hf-{arch}{'-tied' if tie else ''}")
    model.save_pretrained(folder)
    return folder, config, load_file(os.path.join(folder, "model.safetensors"))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("gguf"))
    folder, config, weights = tiny_hf(tmp, "llama")
    path = os.path.join(tmp, "mixed.gguf")
    write_gguf(path, config, weights, MIXED_TYPES)
    return path, config, weights


@pytest.fixture(scope="module")
def atom_tensors(tiny_llama):
    return dict(iterate_gguf(tiny_llama[0], progress=False))


def transformers_from_gguf(path: str):
    """transformers' own GGUF reading (config + dequantized tensors) of the file, as a float32 model.

    This is what `from_pretrained(dir, gguf_file=...)` does, minus its hard requirement on `accelerate`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}, result
    return model.eval()


@pytest.fixture(scope="module")
def transformers_model(tiny_llama):
    return transformers_from_gguf(tiny_llama[0])


# ---------------------------------------------------------------- tests

def test_config_from_gguf(tiny_llama):
    path, src, _ = tiny_llama
    cfg = gguf_config(path)
    assert cfg.architectures == ["LlamaForCausalLM"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings"):
        assert getattr(cfg, key) == getattr(src, key), key
    assert cfg.rms_norm_eps == pytest.approx(src.rms_norm_eps)
    assert cfg.rope_parameters["rope_theta"] == pytest.approx(10000.0)
    assert cfg.tie_word_embeddings is False
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_dequantization_matches_block_reference(tiny_llama, atom_tensors, qtype):
    """Each type on a tensor without Q/K permutation, decoded from the raw bytes by the test's own decoder."""
    reader = GGUFReader(tiny_llama[0])
    tensors = [t for t in reader.tensors if t.tensor_type == qtype and ".attn_q." not in t.name
               and ".attn_k." not in t.name and t.data.ndim == 2]
    assert tensors, f"fixture has no 2-D {qtype.name} tensor"
    for t in tensors:
        hf = {v: k for k, v in ((h, gguf_name(h)) for h in tiny_llama[2])}[t.name]
        expected = reference_dequantize(np.array(t.data), qtype)
        np.testing.assert_allclose(atom_tensors[hf].numpy(), expected, rtol=1e-6, atol=1e-9, err_msg=t.name)


# ||dequantized - original|| / ||original|| for the types written from the HF weights
_REL_ERR = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q4_0: 0.15, Q.Q4_1: 0.15}


def test_dequantized_weights_close_to_originals(tiny_llama, atom_tensors):
    """Checks the name mapping and llama.cpp's Q/K permutation against the untouched HF weights."""
    _, _, weights = tiny_llama
    checked = set()
    for hf, original in weights.items():
        qtype = MIXED_TYPES.get(gguf_name(hf), Q.F32)
        if qtype not in _REL_ERR:
            continue
        err = (atom_tensors[hf] - original).norm() / original.norm()
        assert err <= _REL_ERR[qtype] + 1e-7, f"{hf} ({qtype.name}): relative error {err:.3g}"
        checked.add(qtype)
    assert checked == set(_REL_ERR)
    assert set(atom_tensors) == set(weights)


def test_weights_match_transformers_gguf_loading(atom_tensors, transformers_model):
    ref = transformers_model.state_dict()
    assert set(atom_tensors) == set(ref)
    for name, tensor in atom_tensors.items():
        torch.testing.assert_close(tensor, ref[name], rtol=0, atol=0, msg=name)


def _atom_logits(model, prompts: list[list[int]], decode_steps: int = 3) -> list[torch.Tensor]:
    """Prefill all prompts in one batch, then feed greedy tokens; returns logits of every step."""
    h = PagedHarness(model, block_size=4)
    seqs = h.add(len(prompts))
    out = [h.step(prompts, seqs)]
    for _ in range(decode_steps):
        out.append(h.step([[int(t)] for t in out[-1].argmax(-1)], seqs))
    return out


def _hf_logits(model, prompts: list[list[int]], decode_steps: int = 3) -> list[torch.Tensor]:
    seqs = [list(p) for p in prompts]
    out = []
    with torch.no_grad():
        for _ in range(decode_steps + 1):
            step = torch.stack([model(torch.tensor([s])).logits[0, -1] for s in seqs])
            out.append(step)
            for s, t in zip(seqs, step.argmax(-1)):
                s.append(int(t))
    return out


PROMPTS = [[5, 17, 200, 3, 99, 42, 7], [11, 300, 12, 250, 8, 1, 64, 128, 31, 2, 77]]


def test_logits_match_transformers(tiny_llama, transformers_model):
    model, _ = load_model(tiny_llama[0], dtype="float32", progress=False)
    for ours, ref in zip(_atom_logits(model, PROMPTS), _hf_logits(transformers_model, PROMPTS)):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch,tie", [("llama", True), ("qwen2", False), ("qwen3", True)])
def test_float_gguf_matches_original_checkpoint(tmp_path, arch, tie):
    """F32 GGUF of each architecture vs transformers on the original safetensors folder."""
    from transformers import AutoModelForCausalLM

    folder, config, weights = tiny_hf(str(tmp_path), arch, tie=tie)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, config, weights, {}, arch=arch, skip=("lm_head.weight",) if tie else ())
    cfg = gguf_config(str(path))
    assert cfg.architectures == [type(config).__name__.replace("Config", "ForCausalLM")]
    assert cfg.tie_word_embeddings is tie
    model, _ = load_model(str(path), dtype="float32", progress=False)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for ours, theirs in zip(_atom_logits(model, PROMPTS), _hf_logits(ref, PROMPTS)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_llama_f32(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("gguf-errors"))
    return tiny_hf(tmp, "llama")


def test_rope_scaling_from_gguf(tmp_path, tiny_llama_f32):
    _, config, weights = tiny_llama_f32
    path = tmp_path / "yarn.gguf"

    def yarn(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(32)

    write_gguf(path, config, weights, {}, more_metadata=yarn)
    params = gguf_config(str(path)).rope_parameters
    assert params["rope_type"] == "yarn" and params["factor"] == 4.0
    assert params["original_max_position_embeddings"] == 32


# ---------------------------------------------------------------- errors

def test_llama3_rope_freqs_rejected(tmp_path, tiny_llama_f32):
    _, config, weights = tiny_llama_f32
    path = tmp_path / "llama3.gguf"
    write_gguf(path, config, weights, {}, extra={"rope_freqs.weight": np.ones(32, np.float32)})
    with pytest.raises(ValueError, match=r"llama3\.gguf.*rope_freqs"):
        load_model(str(path), dtype="float32", progress=False)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        gguf_config(str(tmp_path / "nope.gguf"))


def test_corrupt_file(tmp_path, tiny_llama):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(ValueError, match="bad.gguf"):
        gguf_config(str(bad))
    truncated = tmp_path / "truncated.gguf"
    data = open(tiny_llama[0], "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.gguf"):
        list(iterate_gguf(str(truncated), progress=False))


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"gpt2\.gguf.*'gpt2'"):
        gguf_config(str(path))


def test_unsupported_tensor_type(tmp_path, tiny_llama_f32):
    _, config, weights = tiny_llama_f32
    path = tmp_path / "q5.gguf"
    write_gguf(path, config, weights, {"blk.1.ffn_up.weight": Q.Q5_0})
    with pytest.raises(ValueError, match=r"q5\.gguf.*'blk\.1\.ffn_up\.weight'.*Q5_0"):
        list(iterate_gguf(str(path), progress=False))


def test_shape_mismatch(tmp_path, tiny_llama_f32):
    _, config, weights = tiny_llama_f32
    path = tmp_path / "shape.gguf"
    w = weights["model.layers.0.mlp.up_proj.weight"]
    write_gguf(path, config, weights, {}, reshape={"model.layers.0.mlp.up_proj.weight": (w.shape[1], w.shape[0])})
    with pytest.raises(ValueError, match=r"shape\.gguf.*'blk\.0\.ffn_up\.weight'.*\(256, 512\)"):
        list(iterate_gguf(str(path), progress=False))


def test_unknown_tensor_name(tmp_path, tiny_llama_f32):
    _, config, weights = tiny_llama_f32
    path = tmp_path / "extra.gguf"
    write_gguf(path, config, weights, {}, extra={"blk.0.mystery.weight": np.zeros(8, np.float32)})
    with pytest.raises(ValueError, match=r"extra\.gguf.*'blk\.0\.mystery\.weight'"):
        list(iterate_gguf(str(path), progress=False))


def test_tokenizer_needs_metadata(tiny_llama):
    with pytest.raises(ValueError, match=r"mixed\.gguf has no tokenizer"):
        gguf_tokenizer(tiny_llama[0])
