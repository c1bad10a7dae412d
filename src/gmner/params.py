"""Reading params.yaml, seeding and device selection: what every stage does first."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import yaml


def load_params(path: str | os.PathLike = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Load params.yaml; ``overrides`` are ``group.key=value`` strings parsed as YAML values (3e-5 included)."""
    params = yaml.safe_load(Path(path).read_text())
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _parse_value(value)
    return params


def _parse_value(text: str):
    # YAML 1.1 reads "3e-5" as a string; users writing learning rates mean a number.
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str):
    """``auto`` picks CUDA when present; anything else is passed to torch as is."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)
