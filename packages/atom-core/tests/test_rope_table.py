"""One RoPE table per model config, head dim, positions, dtype and device, shared by every layer.

Exactness against transformers for every rope type (dynamic NTK included) is test_models_parity.py's.
"""

from __future__ import annotations

import torch
import transformers

from atom.layers.rotary import RotaryEmbedding
from atom.loader import load_model


def _ropes(model) -> list[RotaryEmbedding]:
    return [m for m in model.modules() if isinstance(m, RotaryEmbedding)]


def _write(path, **extra):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128, **extra)
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def test_every_layer_shares_one_table_sized_to_max_model_len(tmp_path):
    _write(tmp_path)
    model, _ = load_model(str(tmp_path), dtype="float32", max_positions=48, progress=False)
    ropes = _ropes(model)
    assert len(ropes) == 3 and len({id(r.table) for r in ropes}) == 1
    table = ropes[0].cos_sin
    assert table.shape == (48, 16) and table.dtype == torch.float32  # head_dim 16: cos|sin over 8 frequencies
    # counted once in the model's buffers (and never saved: it is not a checkpoint tensor)
    tables = [n for n, _ in model.named_buffers() if n.endswith("cos_sin")]
    assert len(tables) == 1 and not any("cos_sin" in k for k in model.state_dict())
    # without a host limit, the config's max_position_embeddings
    default, _ = load_model(str(tmp_path), dtype="float32", progress=False)
    assert _ropes(default)[0].cos_sin.shape[0] == 128


def test_the_shared_table_moves_once_with_the_model(tmp_path):
    _write(tmp_path)
    model, _ = load_model(str(tmp_path), dtype="float32", max_positions=48, progress=False)
    before = _ropes(model)[0].cos_sin
    model.to(torch.float64)
    after = {id(r.cos_sin) for r in _ropes(model)}
    assert len(after) == 1 and _ropes(model)[0].cos_sin.dtype == torch.float64
    torch.testing.assert_close(_ropes(model)[0].cos_sin, before.double())


def test_models_with_other_configs_get_their_own_tables(tmp_path):
    _write(tmp_path / "a")
    _write(tmp_path / "b", rope_parameters={"rope_type": "linear", "factor": 2.0})
    a, _ = load_model(str(tmp_path / "a"), dtype="float32", max_positions=48, progress=False)
    b, _ = load_model(str(tmp_path / "b"), dtype="float32", max_positions=48, progress=False)
    ta, tb = _ropes(a)[0].cos_sin, _ropes(b)[0].cos_sin
    assert ta is not tb and not torch.allclose(ta, tb)
    # linear scaling: position p of b is position p / 2 of a
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    angles = torch.arange(48).float()[:, None] / 2 * inv_freq[None, :]
    torch.testing.assert_close(tb, torch.cat((angles.cos(), angles.sin()), dim=-1))


def test_qwen3_8b_shape_holds_one_20_mib_table_at_40960_positions():
    """The measurement behind the KV-cache tokens gained (tools/rope_table_memory.py): built on the meta
    device, the 36-layer qwen3-8b shape keeps one float32 [40960, 128] table (20 MiB) instead of 36."""
    config = transformers.Qwen3Config(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                                      num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936,
                                      max_position_embeddings=40960, rope_theta=1000000.0)
    from atom.models.qwen3 import Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(config, max_positions=40960)
    tables = [b for n, b in model.named_buffers() if n.endswith("cos_sin")]
    assert len(tables) == 1 and tables[0].numel() * tables[0].element_size() == 40960 * 128 * 4
