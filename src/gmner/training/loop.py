"""The one training loop: every train stage (tagger, grounded tagger, index generation, VSGN, BGA-MNER and
pretrain) runs ``fit``, supplying its batches, its loss and what it measures on dev.

A stage's prologue is ``start_run`` (CPU threads, seed, device), then it builds its model and calls ``fit``
with the optimiser params of its group (``core.params.fit_params``): AdamW with the encoder at ``lr`` and
everything else at ``head_lr``, linear warmup and decay, gradient clipping. Each epoch logs the sample-weighted
mean of the loss and of every term the step reports (``train/<name>``), the learning rates, and the dev
figures (``dev/<name>``), to the log, the history and DVCLive. The epoch kept is the best on the ``select``
dev figure (ties keep the earlier epoch), or the last one when nothing is selected.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from gmner.core.params import resolve_device, seed_everything

log = logging.getLogger(__name__)

class Batches(Protocol):
    """A training split encoded once: ``batch`` collates any subset of it into a model's input dict."""

    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int]) -> dict: ...

    def start_epoch(self, epoch: int) -> None:
        """Called before the first batch of each epoch (1-based), for data whose batches change with it."""


Step = Callable[[dict], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass(frozen=True)
class DevEval:
    """What the loop measures on dev after each epoch: ``compute`` returns named figures, logged as
    ``dev/<name>``; ``select`` names the one (higher is better) whose best epoch is kept, None keeps the last."""

    compute: Callable[[], dict[str, float]]
    select: str | None = None


def dev_metric(name: str, compute: Callable[[], float]) -> DevEval:
    """A single dev figure that also selects the epoch, e.g. ``dev_metric("mner_f1", ...)``."""
    return DevEval(lambda: {name: compute()}, select=name)


@dataclass
class FitResult:
    best_epoch: int
    best_dev: float | None  # the selected figure at the best epoch; None without selection
    history: list[dict]
    train_seconds: float
    sentences_per_s: float
    dev_metric: str | None = None  # the figure that selected the epoch


def start_run(seed: int, device: str, threads: int | None = None) -> torch.device:
    """The prologue of every train stage, right before it builds its model: CPU intra-op threads (small models
    run faster on one than on two busy cores; 0 or None keeps torch's default), the seed, the device."""
    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed)
    return resolve_device(device)


def param_groups(model: nn.Module, encoders: Sequence[nn.Module], lr: float, head_lr: float,
                 weight_decay: float) -> list[dict]:
    """The ``encoders`` (pre-trained modules) at ``lr``, everything else (classifier, CRF, heads) at
    ``head_lr``; as in nanoGPT, only matrices decay, so biases, LayerNorm weights and the CRF start/end
    scores do not."""
    encoder_ids = {id(p) for encoder in encoders for p in encoder.parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in encoder_ids, p.ndim >= 2), []).append(p)
    return [
        {
            "name": "encoder" if in_encoder else "head",
            "params": ps,
            "lr": lr if in_encoder else head_lr,
            "weight_decay": weight_decay if decay else 0.0,
        }
        for (in_encoder, decay), ps in sorted(groups.items())
    ]


def fit(
    model: nn.Module,
    data: Batches,
    cfg: dict,
    seed: int,
    *,
    step: Step | None = None,
    dev: DevEval | None = None,
    live=None,
) -> FitResult:
    """Train ``model`` (which has an ``encoder``) in place on ``data`` with the optimiser params ``cfg``.

    ``step(batch)`` returns the loss to minimise and named per-batch terms to log; the default is
    ``model.loss(batch)`` alone. Batches are drawn by a permutation seeded from ``seed`` each epoch.
    """
    from transformers import get_linear_schedule_with_warmup

    step = step or (lambda batch: (model.loss(batch), {}))
    batch_size, epochs = cfg["batch_size"], cfg["epochs"]
    steps = epochs * math.ceil(len(data) / batch_size)
    optimizer = torch.optim.AdamW(param_groups(model, model.pretrained, cfg["lr"], cfg["head_lr"], cfg["weight_decay"]))
    scheduler = get_linear_schedule_with_warmup(optimizer, round(cfg["warmup_ratio"] * steps), steps)
    shuffle = torch.Generator().manual_seed(seed)

    best, best_epoch, best_state, history, train_seconds = None, 0, None, [], 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        data.start_epoch(epoch)
        started, sums = time.perf_counter(), {"loss": 0.0}
        for idx in torch.randperm(len(data), generator=shuffle).split(batch_size):
            loss, terms = step(data.batch(idx.tolist()))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"epoch {epoch}: non-finite loss {loss.item()}, terms {terms}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            sums["loss"] += loss.item() * len(idx)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value * len(idx)
        seconds = time.perf_counter() - started
        train_seconds += seconds

        row = {"epoch": epoch, "seconds": round(seconds, 2)}
        row.update({f"train/{name}": total / len(data) for name, total in sums.items()})
        row.update({f"train/lr_{g['name']}": g["lr"] for g in optimizer.param_groups})
        if dev is not None:
            row.update({f"dev/{name}": value for name, value in dev.compute().items()})
        history.append(row)
        log.info("epoch %d/%d  %s  (%.1f s)", epoch, epochs,
                 "  ".join(f"{k} {v:.4f}" for k, v in row.items() if "/" in k and "/lr_" not in k), seconds)
        if live is not None:
            for key, value in row.items():
                if "/" in key:
                    live.log_metric(key, value)
            live.next_step()
        if dev is not None and dev.select is not None:
            figure = row[f"dev/{dev.select}"]
            if best is None or figure > best:  # strict: ties keep the earlier epoch
                best, best_epoch = figure, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            best_epoch = epoch

    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(
        best_epoch=best_epoch,
        best_dev=best,
        history=history,
        train_seconds=train_seconds,
        sentences_per_s=epochs * len(data) / train_seconds,
        dev_metric=dev.select if dev is not None else None,
    )
