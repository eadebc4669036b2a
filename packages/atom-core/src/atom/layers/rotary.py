"""Rotary embedding module: builds the cos/sin table for the config's rope type once.

Frequencies for the scaled variants (linear, dynamic NTK, YaRN, Llama-3, longrope) come from
transformers' own `ROPE_INIT_FUNCTIONS`, so ATOM's positions match transformers' by construction.
Dynamic NTK depends on the longest position seen: past the original context it is recomputed for the
current length, as transformers does.

The float32 cos|sin table is built once per (model config, head dim, rotary dims, positions, dtype,
device) and shared by every layer that uses it: a `RopeTable` submodule registered under each layer, so
`model.to()` moves it once. It is sized to the host's max_model_len (`max_positions`) when given, else to
the config's max_position_embeddings. (Per-layer tables cost 36 x 20 MiB on the qwen3-8b shape at 40960
positions, taken from the KV cache.)
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from atom.ops.registry import resolve


class RopeTable(nn.Module):
    """cos_sin [num_positions, rot_dim] float32 = cat(cos, sin), a non-persistent buffer (not in checkpoints)."""

    def __init__(self, cos_sin: torch.Tensor):
        super().__init__()
        self.register_buffer("cos_sin", cos_sin, persistent=False)


# Tables alive in this process. Keyed on the config object's identity (every layer of a model shares its
# config; the model keeps it alive, so the id is not reused while the table is) plus what shapes the table.
_TABLES: weakref.WeakValueDictionary[tuple, RopeTable] = weakref.WeakValueDictionary()


def rope_parameters(config) -> dict:
    if hasattr(config, "standardize_rope_params"):
        config.standardize_rope_params()
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:  # older-style configs
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class RotaryEmbedding(nn.Module):
    def __init__(self, config, head_dim: int, is_neox: bool = True, max_positions: int | None = None):
        super().__init__()
        self.config = config
        self.head_dim = head_dim
        self.is_neox = is_neox
        params = rope_parameters(config)
        self.rope_type = params["rope_type"]
        self.original_max = int(
            params.get("original_max_position_embeddings") or config.max_position_embeddings
        )
        self.num_positions = int(max_positions or config.max_position_embeddings)
        self.table = self._shared_table()
        self._op = resolve("rotary_embedding", static={"head_dim": head_dim, "rotary_dim": self.rotary_dim,
                                                       "is_neox": is_neox})

    @property
    def cos_sin(self) -> torch.Tensor:
        return self.table.cos_sin

    @property
    def rotary_dim(self) -> int:
        return self.table.cos_sin.shape[-1]

    def _shared_table(self) -> RopeTable:
        device = torch.get_default_device()
        key = (id(self.config), self.head_dim, self.num_positions, torch.float32, str(device))
        table = _TABLES.get(key)
        if table is None or not _same_device(table.cos_sin.device, device):  # absent, or moved by a model.to()
            inv_freq, scale = self._inv_freq(seq_len=None)
            table = RopeTable(self._table(inv_freq, scale, self.num_positions))
            _TABLES[key] = table
        return table

    def _inv_freq(self, seq_len: int | None) -> tuple[torch.Tensor, float]:
        if self.rope_type == "default":
            params = rope_parameters(self.config)
            rot = int(self.head_dim * params.get("partial_rotary_factor",
                                                 getattr(self.config, "partial_rotary_factor", 1.0)))
            exponent = torch.arange(0, rot, 2, dtype=torch.int64, device="cpu").float() / rot
            return 1.0 / (params["rope_theta"] ** exponent), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if self.rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"unsupported rope type {self.rope_type!r}; "
                             f"supported: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
        kwargs = {"seq_len": seq_len} if seq_len is not None else {}
        with torch.device("cpu"):  # its helpers make tensors on the default device (meta, when a host sizes a model)
            return ROPE_INIT_FUNCTIONS[self.rope_type](self.config, torch.device("cpu"), **kwargs)

    @staticmethod
    def _table(inv_freq: torch.Tensor, scale: float, n: int) -> torch.Tensor:
        # Built on the CPU (hosts may construct models under a CUDA device context, and the frequency
        # helpers return CPU tensors), then placed on the default device like every other buffer.
        cpu = torch.device("cpu")
        freqs = torch.arange(n, dtype=torch.float32, device=cpu)[:, None] * inv_freq.to(cpu).float()[None, :]
        table = torch.cat((freqs.cos() * scale, freqs.sin() * scale), dim=-1)
        return table.to(torch.get_default_device())

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos_sin = self.cos_sin
        if self.rope_type == "dynamic":
            seq_len = int(positions.max()) + 1
            if seq_len > self.original_max:
                inv_freq, scale = self._inv_freq(seq_len=seq_len)
                cos_sin = self._table(inv_freq, scale, seq_len).to(cos_sin.device)
        # The bounds check reads a tensor value: eager CPU only (a graph under torch.compile cannot branch on it).
        elif (positions.numel() and positions.device.type == "cpu" and not torch.compiler.is_compiling()
              and int(positions.max()) >= cos_sin.shape[0]):
            raise ValueError(f"position {int(positions.max())} is beyond the rope table ({cos_sin.shape[0]})")
        return self._op(positions, q, k, self.head_dim, cos_sin, self.is_neox)
