"""Read GGUF files (llama.cpp's format): config, dequantized tensors under HF names, tokenizer.

Tensors are dequantized to float32 by the `gguf` package itself (`gguf.quants.dequantize`), so ATOM
carries no dequantizer of its own; the model then casts them to its dtype while loading.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

# GGUF `general.architecture` -> HF architecture; all three share llama.cpp's tensor names.
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# Types checked against an independent reference in tests/test_gguf.py.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
logger = logging.getLogger(__name__)

_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def _open(path: str):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    st = os.stat(path)
    return _read(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _read(path: str, size: int, mtime_ns: int):
    """Parsed once per file version: GGUFReader walks every metadata array (the vocabulary too), which
    takes seconds, and load_model asks for the config and then the tensors."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct/numpy errors... on damaged files
        raise ValueError(f"cannot read GGUF file {path} (corrupt or not GGUF?): {e}") from e


_REQUIRED = object()


def _meta(reader, key: str, path: str, default: Any = _REQUIRED) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"GGUF file {path} lacks the metadata key {key!r}")
        return default
    return field.contents()


def _tensor_names(reader) -> set[str]:
    return {t.name for t in reader.tensors}


def _rope_scaling(reader, arch: str, path: str) -> dict | None:
    kind = _meta(reader, f"{arch}.rope.scaling.type", path, None)
    factor = _meta(reader, f"{arch}.rope.scaling.factor", path, None)
    if kind is None and (linear := _meta(reader, f"{arch}.rope.scale_linear", path, None)):
        kind, factor = "linear", linear
    if kind in (None, "none") or not factor or float(factor) == 1.0:
        return None
    if kind not in ("linear", "yarn"):
        raise ValueError(f"GGUF file {path}: rope scaling {kind!r} is not supported (linear, yarn are)")
    scaling = {"rope_type": kind, "factor": float(factor)}
    original = _meta(reader, f"{arch}.rope.scaling.original_context_length", path, None)
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _config_from_reader(reader, path: str):
    arch = _meta(reader, "general.architecture", path)
    if arch not in _ARCHITECTURES:
        raise ValueError(f"GGUF file {path} holds architecture {arch!r}; ATOM reads GGUF for "
                         f"{', '.join(sorted(_ARCHITECTURES))}")
    names = _tensor_names(reader)
    if "rope_freqs.weight" in names:
        # Llama-3.1 style files store precomputed per-frequency factors, not the HF rope parameters.
        raise ValueError(f"GGUF file {path} has a rope_freqs tensor (llama3 rope scaling), "
                         "which ATOM's GGUF reader does not support yet")
    heads = int(_meta(reader, f"{arch}.attention.head_count", path))
    hidden = int(_meta(reader, f"{arch}.embedding_length", path))
    head_dim = _meta(reader, f"{arch}.attention.key_length", path, None) or hidden // heads
    vocab = _meta(reader, f"{arch}.vocab_size", path, None)
    if vocab is None:
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if embd is None:
            raise ValueError(f"GGUF file {path} has neither {arch}.vocab_size nor a token_embd tensor")
        vocab = int(embd.shape[1])
    kwargs = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_meta(reader, f"{arch}.feed_forward_length", path)),
        num_hidden_layers=int(_meta(reader, f"{arch}.block_count", path)),
        num_attention_heads=heads,
        num_key_value_heads=int(_meta(reader, f"{arch}.attention.head_count_kv", path, heads)),
        head_dim=int(head_dim),
        max_position_embeddings=int(_meta(reader, f"{arch}.context_length", path)),
        rms_norm_eps=float(_meta(reader, f"{arch}.attention.layer_norm_rms_epsilon", path)),
        rope_theta=float(_meta(reader, f"{arch}.rope.freq_base", path, 10000.0)),
        rope_scaling=_rope_scaling(reader, arch, path),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_meta(reader, "tokenizer.ggml.bos_token_id", path, None),
        eos_token_id=_meta(reader, "tokenizer.ggml.eos_token_id", path, None),
        pad_token_id=_meta(reader, "tokenizer.ggml.padding_token_id", path, None),
        architectures=[_ARCHITECTURES[arch]],
    )
    if arch == "llama":
        from transformers import LlamaConfig as cls

        kwargs["attention_bias"] = "blk.0.attn_q.bias" in names
    elif arch == "qwen2":
        from transformers import Qwen2Config as cls
    else:
        from transformers import Qwen3Config as cls
    if kwargs["rope_scaling"] is None:
        del kwargs["rope_scaling"]
    return cls(**kwargs)


def gguf_config(path: str):
    """The transformers config (LlamaConfig / Qwen2Config / Qwen3Config) described by a GGUF file."""
    return _config_from_reader(_open(path), os.fspath(path))


def _hf_name(gguf_name: str) -> tuple[str, int | None, str | None] | None:
    """GGUF tensor name -> (HF name, layer index, GGUF block piece); None when unknown."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name], None, None
    m = _BLOCK.match(gguf_name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        return None
    layer, piece, kind = int(m.group(1)), m.group(2), m.group(3)
    return f"model.layers.{layer}.{_BLOCK_NAMES[piece]}.{kind}", layer, piece


def _expected_shape(config, piece: str | None, hf_name: str) -> tuple[int, ...]:
    hidden, hd = config.hidden_size, config.head_dim
    q, kv, inter = config.num_attention_heads * hd, config.num_key_value_heads * hd, config.intermediate_size
    if piece is None:
        return (hidden,) if hf_name == "model.norm.weight" else (config.vocab_size, hidden)
    weight = {"attn_norm": (hidden,), "ffn_norm": (hidden,), "attn_q": (q, hidden), "attn_k": (kv, hidden),
              "attn_v": (kv, hidden), "attn_output": (hidden, q), "attn_q_norm": (hd,), "attn_k_norm": (hd,),
              "ffn_gate": (inter, hidden), "ffn_up": (inter, hidden), "ffn_down": (hidden, inter)}[piece]
    return weight if hf_name.endswith(".weight") else weight[:1]


def _unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order (it interleaves the two rotary halves of each head)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _dequantize(tensor, path: str) -> np.ndarray:
    from gguf.quants import dequantize

    qtype = tensor.tensor_type.name
    if qtype not in SUPPORTED_TYPES:
        raise ValueError(f"GGUF file {path}: tensor {tensor.name!r} has type {qtype}, which ATOM does not "
                         f"read; supported: {', '.join(SUPPORTED_TYPES)}")
    try:
        return dequantize(tensor.data, tensor.tensor_type)
    except Exception as e:
        raise ValueError(f"GGUF file {path}: cannot dequantize tensor {tensor.name!r} ({qtype}): {e}") from e


def iterate_gguf(path: str, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, float32 tensor) for every tensor of a GGUF file, in the file's order."""
    path = os.fspath(path)
    reader = _open(path)
    config = _config_from_reader(reader, path)
    permute = _meta(reader, "general.architecture", path) == "llama"
    for tensor in tqdm(reader.tensors, desc="Loading GGUF tensors", unit="tensor", disable=not progress):
        mapped = _hf_name(tensor.name)
        if mapped is None:
            raise ValueError(f"GGUF file {path}: tensor {tensor.name!r} has no Hugging Face counterpart "
                             "known to ATOM")
        hf_name, _, piece = mapped
        values = _dequantize(tensor, path)
        expected = _expected_shape(config, piece, hf_name)
        # GGUF lists dimensions fastest-first: the reverse of torch's order.
        stored = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if stored != expected or values.size != int(np.prod(expected)):
            raise ValueError(f"GGUF file {path}: tensor {tensor.name!r} has shape {stored} "
                             f"({values.size} values), expected {expected} for {hf_name}")
        values = np.asarray(values, dtype=np.float32)
        if not values.flags.writeable:  # F32 tensors are views of the read-only memory map
            values = values.copy()
        out = torch.from_numpy(values.reshape(expected))
        if permute and piece == "attn_q":
            out = _unpermute_rows(out, config.num_attention_heads)
        elif permute and piece == "attn_k":
            out = _unpermute_rows(out, config.num_key_value_heads)
        yield hf_name, out


def gguf_tokenizer(path: str):
    """The HF tokenizer stored in a GGUF file's metadata, chat template included.

    Converting a GGUF vocabulary takes tens of seconds, so the result is cached (~/.cache/atom, or
    $ATOM_CACHE_DIR) and converted once: processes that start together (the server's API and engine
    processes) take a file lock, the first converts, the others read its result."""
    path = os.fspath(path)
    cache = _tokenizer_cache_dir(path)
    if cache is None:
        return _convert_tokenizer(path)
    tok = _load_cached_tokenizer(cache)  # the common case: no lock needed to read a finished entry
    if tok is not None:
        return tok
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with _exclusive_lock(cache + ".lock"):
        tok = _load_cached_tokenizer(cache)  # converted by another process while this one waited
        if tok is not None:
            return tok
        _remove_leftovers(cache)
        logger.info("converting the tokenizer of %s (once; cached in %s)", os.path.basename(path), cache)
        tok = _convert_tokenizer(path)
        _store_tokenizer(tok, cache)
    return tok


def _convert_tokenizer(path: str):
    from transformers import AutoTokenizer

    reader = _open(path)
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise ValueError(f"GGUF file {path} has no tokenizer (no tokenizer.ggml.tokens metadata)")
    template = _meta(reader, "tokenizer.chat_template", path, None)
    try:
        tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                            gguf_file=os.path.basename(path))
    except Exception as e:
        raise ValueError(f"cannot build a tokenizer from GGUF file {path}: {e}") from e
    if template and not tok.chat_template:
        tok.chat_template = template
    return tok


def _load_cached_tokenizer(cache: str):
    if not os.path.exists(os.path.join(cache, "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(cache)
    except Exception:  # a damaged entry: the caller converts again and replaces it
        return None


@contextlib.contextmanager
def _exclusive_lock(lock_path: str):
    import fcntl

    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_leftovers(cache: str) -> None:
    """Under the lock nobody else writes this entry: temp folders of killed writers and a damaged entry go."""
    import glob
    import shutil

    for stale in glob.glob(glob.escape(cache) + ".tmp*"):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)


def _store_tokenizer(tok, cache: str) -> None:
    """Written to a temp folder then renamed: readers never see a torn entry, and no temp folder stays."""
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix=os.path.basename(cache) + ".tmp", dir=os.path.dirname(cache))
    try:
        tok.save_pretrained(tmp)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only or full cache: the tokenizer is still returned, only not cached
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tokenizer_cache_dir(path: str) -> str | None:
    """Cache folder for the tokenizer converted from one GGUF file (keyed on path, size, mtime)."""
    if os.environ.get("ATOM_DISABLE_TOKENIZER_CACHE") == "1":
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    import hashlib

    key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
    root = os.environ.get("ATOM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "atom")
    return os.path.join(root, "gguf-tokenizers", key)
