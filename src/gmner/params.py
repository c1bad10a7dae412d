"""Reading params.yaml, seeding and device selection: what every stage does first."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import yaml


def load_params(path: str | os.PathLike = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Load params.yaml; ``overrides`` are ``group.key=value`` strings parsed as YAML values (3e-5 included),
    optionally prefixed with Hydra's ``++`` (add or override) as ``dvc exp run -S`` takes them."""
    params = yaml.safe_load(Path(path).read_text())
    for item in overrides or []:
        key, sep, value = item.removeprefix("++").partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _parse_value(value)
    return params


def config_overrides(config: str | os.PathLike, params_path: str | os.PathLike = "params.yaml") -> list[str]:
    """``group.key=value`` strings (for ``dvc exp run -S``) of a config file: a YAML tree of params.yaml keys
    with the values to set. Every key must exist in params.yaml, so a typo fails here, naming it, instead of
    silently adding a param no stage reads. Inside a group, a mapping sets the keys it holds one by one when
    params.yaml has them all; one that brings new keys (e.g. ``train_index.fit: {lr: ...}``) is set whole, with
    Hydra's ``++`` since DVC refuses new keys otherwise."""
    config, params_path = Path(config), Path(params_path)
    tree = yaml.safe_load(config.read_text())
    if not isinstance(tree, dict):
        raise ValueError(f"{config}: expected a mapping of params.yaml groups")
    params = yaml.safe_load(params_path.read_text())
    out = []

    def walk(node: dict, known, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if not isinstance(known, dict) or key not in known:
                raise ValueError(f"{config}: {name} is not a param of {params_path}")
            mapping = isinstance(value, dict) and isinstance(known[key], dict)
            if mapping and (not prefix or value and set(value) <= set(known[key])):  # groups: never replaced whole
                walk(value, known[key], f"{name}.")
            else:
                dumped = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
                force = "++" if mapping and set(value) - set(known[key]) else ""
                out.append(f"{force}{name}={dumped.removesuffix(chr(10) + '...')}")  # a scalar dumps as a document

    walk(tree, params, "")
    return out


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
