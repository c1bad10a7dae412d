"""Reading and checking params.yaml, seeding and device selection: what every stage does first.

One convention for the trainers: the ``train`` group holds the shared text-model and optimiser params
(encoder, epochs, batch size, learning rates, ...) and every other trainer group overrides any of them in
its own ``fit:`` mapping (``fit_params``). A key no stage knows is an error naming it (``check_keys``, and
``load_params`` for overrides); so are the rules that tie groups together (``check_rules``).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import yaml

from gmner.core.errors import DataError

SHARED_FIT_GROUP = "train"
# Trainer groups reading detector candidates: their top_k can be at most detect.top_k (the detector writes no more).
CANDIDATE_READERS = ("train_grounded", "train_index", "train_vsgn", "train_bga", "pretrain")


class ParamError(DataError):
    """A param that does not exist or has a value it cannot take; ``where`` is the key's dotted path."""


def load_params(path: str | os.PathLike = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Load params.yaml; ``overrides`` are ``group.key=value`` strings parsed as YAML values (3e-5 included),
    optionally prefixed with Hydra's ``++`` (add or override) as ``dvc exp run -S`` takes them."""
    params = yaml.safe_load(Path(path).read_text())
    for item in overrides or []:
        key, sep, value = item.removeprefix("++").partition("=")
        if not sep:
            raise ParamError(item, "an override is group.key=value")
        _set(params, key, _parse_value(value), path)
    check_rules(params)
    return params


def _set(params: dict, key: str, value, path) -> None:
    """Set the dotted ``key``, which params.yaml must have; inside a trainer's ``fit`` mapping, any key of
    the shared ``train`` group."""
    node, parts = params, key.split(".")
    for depth, part in enumerate(parts):
        in_fit = depth == 2 and parts[1] == "fit" and parts[0] != SHARED_FIT_GROUP
        known = params.get(SHARED_FIT_GROUP, {}) if in_fit else node
        if not isinstance(node, dict) or part not in known:
            raise ParamError(key, f"no such param in {path}")
        if depth == len(parts) - 1:
            node[part] = value
        else:
            node = node.setdefault(part, {}) if in_fit else node[part]


def check_keys(where: str, group: dict, known) -> None:
    """The one check of a params group (or mapping) against the keys its reader knows."""
    unknown = sorted(set(group) - set(known))
    if unknown:
        raise ParamError(f"{where}.{unknown[0]}", f"unknown param; known: {', '.join(sorted(known))}")


def fit_params(params: dict, group: str) -> dict:
    """The optimiser and text-model params of trainer ``group``: the shared ``train`` group with the
    group's ``fit`` overrides (whose keys must be keys of ``train``)."""
    shared = params[SHARED_FIT_GROUP]
    if group == SHARED_FIT_GROUP:
        return dict(shared)
    overrides = params[group].get("fit") or {}
    check_keys(f"{group}.fit", overrides, shared)
    return {**shared, **overrides}


def check_rules(params: dict) -> None:
    """Rules between groups, checked before any stage works."""
    limit = params.get("detect", {}).get("top_k")
    for group in CANDIDATE_READERS:
        top_k = params.get(group, {}).get("top_k")
        if limit is not None and top_k is not None and top_k > limit:
            raise ParamError(f"{group}.top_k", f"{top_k} candidates asked for, but detect.top_k keeps {limit}")


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
