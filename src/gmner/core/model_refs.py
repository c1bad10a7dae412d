"""Model references, resolved one way for every model the pipeline loads (text encoders, BLIP, Stable
Diffusion, CLIP / ViT, zero-shot detectors).

A reference is ``"tiny"`` (random weights built in code from a small config, seeded, for the embedded sample
and the tests), a local folder, or a hub id already in the local Hugging Face cache. Nothing touches the
network: an id that is not cached fails at once with :class:`gmner.core.errors.ModelUnavailable` naming the
param and the id. :func:`model_fingerprint` gives a digest that changes exactly when a model's results may
change, so per-item caches are keyed by what the model is.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gmner.core.errors import ModelUnavailable
from gmner.core.hashing import digest, file_sha256

TINY = "tiny"


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from: ``folder`` (None for tiny) and the ``fingerprint`` of its files or config."""

    folder: str | None
    fingerprint: str


def resolve_model(ref: str, where: str, *, tiny: dict | None = None, seed: int | None = None,
                  revision: str | None = None, hash_memo: str | Path | None = None) -> ModelRef:
    """Map a model reference to a local folder and a fingerprint, without touching the network.

    ``where`` names the param (``caption.model``) in the error for a reference that cannot be resolved.
    """
    if ref == TINY:
        return ModelRef(None, model_fingerprint(ref, config=tiny, seed=seed))
    folder = Path(ref).expanduser()
    if not folder.exists():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(ref, revision=revision, local_files_only=True))
        except Exception as err:  # hub ids that are malformed, not cached, or partly cached
            raise ModelUnavailable(
                f"{where}: {ref!r} is neither a local folder nor a hub id in the local Hugging Face cache, "
                f"and no model hub is reachable from here ({type(err).__name__}); download it on a connected "
                f"machine and pass its folder, or set {where}: {TINY}"
            ) from None
    return ModelRef(str(folder), model_fingerprint(str(folder), hash_memo=hash_memo))


def load_from_folder(where: str, ref: ModelRef, loader: Callable, **kwargs):
    """``loader(folder, ...)`` with load failures reported as ModelUnavailable naming ``where``."""
    try:
        return loader(ref.folder, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelUnavailable(f"{where}: cannot load the model in {ref.folder!r}: {err}") from err


def check_tokenizer(where: str, folder: str, tokenizer, minimum: int = 10) -> None:
    # Some tokenizer classes given an unusable folder return a near-empty tokenizer instead of failing.
    if len(tokenizer) < minimum:
        raise ModelUnavailable(f"{where}: the tokenizer in {folder!r} has only {len(tokenizer)} tokens")


def model_fingerprint(ref: str, *, config: dict | None = None, seed: int | None = None,
                      revision: str | None = None, hash_memo: str | Path | None = None) -> str:
    """A digest that changes exactly when the model's results may change.

    - ``ref == "tiny"`` or starting with ``"tiny"``: random weights built from ``config`` with ``seed``.
    - an existing local file or folder: every file's relative path and content sha256 (config, weights,
      tokenizer). Hashes are memoised per (path, size, mtime) in ``hash_memo`` (a folder) when given, so
      multi-GB weights are read once, not on every run.
    - otherwise a hub id, which must already be in the local Hugging Face cache (no hub is reachable):
      the id plus the cached commit of ``revision``.
    """
    return digest(_library_versions(), _weights_fingerprint(ref, config, seed, revision, hash_memo))


@functools.cache
def _library_versions() -> dict[str, str]:
    """Versions of the libraries that run the models: an upgrade may change results, so it re-keys caches
    (tiny models are also built by these libraries, so the same config and seed need not give the same weights)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("torch", "torchvision", "transformers", "diffusers", "open-clip-torch"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def _weights_fingerprint(ref: str, config, seed, revision, hash_memo) -> str:
    if ref.startswith("tiny"):
        return digest("tiny", ref, config, seed)
    path = Path(ref).expanduser()
    if path.is_file():
        return digest("local", [(path.name, file_sha256(path, hash_memo))])
    if path.is_dir():
        files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
        files = [f for f in files if not any(part.startswith(".") for part in Path(f).parts)]  # .git, .cache
        if not files:
            raise ModelUnavailable(f"model folder {ref!r} holds no files")
        return digest("local", [(f, file_sha256(path / f, hash_memo)) for f in files])
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ref, "config.json", revision=revision)
    if not isinstance(cached, str):
        raise ModelUnavailable(
            f"model {ref!r}{'@' + revision if revision else ''} is not a local path and not in the Hugging Face "
            "cache, and no model hub is reachable from here: download it on a connected machine and pass its "
            "folder, or use a tiny random-weight model"
        )
    commit = Path(cached).parent.name  # .../snapshots/<commit>/config.json
    return digest("hub", ref, commit)
