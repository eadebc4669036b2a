"""The throughput benchmark runs end to end on a config-only checkpoint (random weights, no tokenizer)."""

from __future__ import annotations

import pytest

from atom_server.bench import PRESETS, preset_checkpoint, run_throughput


def test_run_throughput_dummy_weights(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=64,
                architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    rows = run_throughput(str(tmp_path), input_len=8, output_len=4, batch_sizes=[1, 3], load_format="dummy",
                          block_size=4, kv_cache_memory_bytes=1 << 20)
    assert [r["batch_size"] for r in rows] == [1, 3]
    assert [r["output_tokens"] for r in rows] == [4, 12]
    assert all(r["output_tok_s"] > 0 for r in rows)
    assert "out tok/s" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_configs(name, tmp_path):
    from atom.loader import load_config

    cfg = load_config(preset_checkpoint(name, str(tmp_path)))
    # an MLA config's head_dim is its rope width (transformers derives it; the released configs omit it)
    assert cfg.vocab_size == PRESETS[name]["vocab_size"]
    assert cfg.head_dim == PRESETS[name].get("head_dim", getattr(cfg, "qk_rope_head_dim", None))
