"""Iterate (name, tensor) over an HF folder's safetensors files (single or sharded with an index)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm


def safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"corrupt safetensors index {index}: {e}") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(folder, f))]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {', '.join(missing)}")
        return [os.path.join(folder, f) for f in files]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    return [os.path.join(folder, f) for f in files]


def iterate_safetensors(folder: str, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    files = safetensors_files(folder)
    for path in tqdm(files, desc="Loading safetensors shards", unit="shard", disable=not progress or len(files) < 2):
        try:
            handle = safe_open(path, framework="pt")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read safetensors file {path}: {e}") from e
        with handle as f:
            for name in f.keys():
                try:
                    tensor = f.get_tensor(name)
                except Exception as e:
                    raise ValueError(f"cannot read tensor {name!r} from {path}: {e}") from e
                yield name, tensor
