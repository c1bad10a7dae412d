"""Reading and checking params.yaml, seeding and device selection: what every stage does first.

One convention for the trainers: the ``train`` group holds the shared text-model and optimiser params
(encoder, epochs, batch size, learning rates, ...) and every other trainer group overrides any of them in
its own ``fit:`` mapping (``fit_params``). Every param's type and allowed values are declared once, in
``gmner.core.param_spec``: ``load_params`` checks the params against it (after overrides), then the rules that
tie groups together (``check_rules``), before any stage works.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import yaml

from gmner.core.param_spec import SPEC, Device, ParamError, show

SHARED_FIT_GROUP = "train"
# Trainer groups reading detector candidates: their top_k can be at most detect.top_k (the detector writes no more).
CANDIDATE_READERS = ("train_grounded", "train_index", "train_vsgn", "train_bga", "pretrain")


def load_params(path: str | os.PathLike = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Load params.yaml; ``overrides`` are ``group.key=value`` strings parsed as YAML values (3e-5 included),
    optionally prefixed with Hydra's ``++`` (add or override) as ``dvc exp run -S`` takes them. The result
    is checked against the spec and the rules between groups."""
    params = read_yaml(path)
    for item in overrides or []:
        key, sep, value = item.removeprefix("++").partition("=")
        if not (sep and key):
            raise ParamError(item, "an override is group.key=value")
        _set(params, key, _parse_value(key, value))
    SPEC.check(params, "")
    check_rules(params)
    return params


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a params file saying a thing twice is a mistake."""

    def construct_mapping(self, node, deep=False):
        seen = []  # keys may be unhashable (YAML allows lists as keys)
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # << merges; its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {show(key)}", key_node.start_mark)
            seen.append(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | os.PathLike) -> dict:
    """A params file (params.yaml or a config of overrides): a YAML mapping of groups. A syntax error is a
    ParamError at ``file:line:column``; an unreadable file is the OSError naming it."""
    try:
        tree = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as err:
        raise ParamError(str(path), f"not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ParamError(where, f"not valid YAML: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(tree, dict):
        raise ParamError(str(path), f"a params file is a mapping of param groups, not {show(tree)[:40]}")
    return tree


def _set(params: dict, key: str, value) -> None:
    """Set the dotted ``key``, which the spec must know (inside a trainer's ``fit``, any key of ``train``),
    creating the groups on its way that a partial params file lacks."""
    node, spec, parts = params, SPEC, key.split(".")
    for depth, part in enumerate(parts):
        spec = spec.child(".".join(parts[:depth]), part)
        if depth == len(parts) - 1:
            node[part] = value
        else:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]


def check_keys(where: str, group: dict, known) -> None:
    """A reader's check of a params group (or mapping) against the keys it knows: params from load_params
    passed the spec already, this holds for params a caller builds (tests, benchmarks)."""
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
    """``group.key=value`` strings (for ``dvc exp run -S``) of a config file: a YAML tree of params keys with
    the values to set. The tree is checked against the spec, so a typo or a bad value fails here naming the
    config file, not in the experiment; then params.yaml with the overrides, as the experiment will read it.
    Inside a group, a mapping sets the keys it holds one by one when params.yaml has them all; one that brings
    new keys (e.g. ``train_index.fit: {lr: ...}``), like a param params.yaml lacks, is set whole, with Hydra's
    ``++`` since DVC refuses new keys otherwise."""
    config = Path(config)
    tree = read_yaml(config)
    try:
        SPEC.check(tree, "")
    except ParamError as err:
        raise ParamError(f"{config}: {err.where}", err.reason) from None
    out = []

    def walk(node: dict, known, prefix: str) -> None:
        for key, value in node.items():
            name, present = f"{prefix}{key}", isinstance(known, dict) and key in known
            mapping = present and isinstance(value, dict) and isinstance(known[key], dict)
            if mapping and (not prefix or value and set(value) <= set(known[key])):  # groups: never replaced whole
                walk(value, known[key], f"{name}.")
            else:
                dumped = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
                force = "++" if not present or mapping and set(value) - set(known[key]) else ""
                out.append(f"{force}{name}={dumped.removesuffix(chr(10) + '...')}")  # a scalar dumps as a document

    walk(tree, read_yaml(params_path), "")
    load_params(params_path, out)
    return out


def _parse_value(key: str, text: str):
    try:
        value = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ParamError(key, f"{text!r} is not a YAML value: {getattr(err, 'problem', None) or err}") from None
    # YAML 1.1 reads "3e-5" as a string; users writing learning rates mean a number.
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


def resolve_device(name: str, where: str = "base.device"):
    """The torch device ``name`` (``auto``: CUDA when present); a name torch does not know, or a device this
    machine lacks, is a ParamError at ``where`` before any work."""
    import torch

    Device().check(name, where)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ParamError(where, f"{show(name)} is not on this machine ({torch.cuda.device_count()} CUDA devices)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ParamError(where, f"{show(name)} is not on this machine")
    return device
