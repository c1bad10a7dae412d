"""Per-epoch checkpoints of the one training loop, so a killed train stage continues where it stopped.

A run folder (``<cache_root>/runs/<stage>-<key>``, outside DVC's outputs) is keyed by what decides the run:
the params, the bytes of the files the stage read and the number of processes. A checkpoint there is resumed
only by a run starting from the same weights, so a new init checkpoint or model shape starts afresh (a code
change that alters neither is not seen: delete the run folder then). After each epoch the main process writes
``epoch-<n>.pt`` atomically: model, optimiser, scheduler and loss-scaler states, every process's RNG states,
the loop's shuffle generator, the state of the data and of the step (BGA's sampler counts, pre-training's
negative sampler), the best epoch so far with its weights, and the history. A resumed run ends exactly as an
uninterrupted one (same batches, same random draws). Checkpoints hold tensors and plain values only: they
load with ``torch.load(weights_only=True)``, never unpickling code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from gmner.core.hashing import digest, file_sha256

log = logging.getLogger(__name__)

PATTERN = "epoch-*.pt"


def run_folder(root: Path, params: dict, stage: str, inputs: Iterable[Path], processes: int = 1) -> Path | None:
    """The run folder of train stage ``stage`` under ``root`` (the project) for these ``params`` and inputs
    (files, or folders whose files all count; absent ones count as absent); None for params without a
    ``base.cache_root`` (built in code), which keep no checkpoints."""
    if params["base"].get("cache_root") is None:
        return None
    files = []
    for path in sorted(set(inputs)):
        found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] * path.is_file()
        files += [(str(p.relative_to(root)), file_sha256(p)) for p in found] or [(str(path), None)]
    key = digest(stage, params, files, processes)
    return root / params["base"]["cache_root"] / "runs" / f"{stage}-{key[:20]}"


def rng_state() -> dict:
    """This process's random states: torch (CPU and CUDA), NumPy's global and Python's."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def state_digest(model: torch.nn.Module) -> str:
    """A digest of the weights a run starts from: a checkpoint of another start is not this run's."""
    sha = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def latest(folder: Path, start: str) -> dict | None:
    """The newest readable checkpoint in ``folder`` of the run starting from weights ``start``; unreadable
    ones (a kill while the file system had not flushed) are logged and skipped."""
    for path in sorted(folder.glob(PATTERN), reverse=True):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # any damage means: not a checkpoint to resume from
            log.warning("%s: unreadable checkpoint (%s), ignored", path, err)
            continue
        if checkpoint.get("start") == start:
            log.info("resuming from %s (epoch %d done)", path, checkpoint["epoch"])
            return checkpoint
        log.warning("%s: written by a run from other starting weights, ignored", path)
    return None


def save(folder: Path, checkpoint: dict, keep: int) -> None:
    """Write ``epoch-<n>.pt`` atomically, then drop all but the newest ``keep`` (at least this one)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"epoch-{checkpoint['epoch']:04d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
    prune(folder, max(1, keep))


def prune(folder: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints; with none kept the run folder goes."""
    if keep == 0:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for old in sorted(folder.glob(PATTERN))[:-keep]:
        old.unlink()
