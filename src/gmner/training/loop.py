"""The one training loop: every train stage (tagger, grounded tagger, index generation, VSGN, BGA-MNER and
pretrain) runs ``fit``, supplying its batches, its loss and what it measures on dev.

A stage's prologue is ``start_run`` (CPU threads, seed, device; under ``torchrun`` or ``accelerate launch``
the process group and this process's device), then it builds its model and calls ``fit`` with the optimiser
params of its group (``core.params.fit_params``): AdamW with the encoder at ``lr`` and everything else at
``head_lr``, linear warmup and decay, gradient clipping. Through accelerate the same loop trains in
``precision`` fp32, bf16 or fp16 (autocast; fp16 with loss scaling), on one device or data-parallel
(DistributedDataParallel, every process a contiguous shard of each global batch: ``batch_size`` sentences per
process), with ``grad_accum`` batches per optimiser step, batches length-grouped (``group_by_length``) and
collated by ``loader_workers`` processes (gmner.training.batching). Each epoch logs the sample-weighted mean
of the loss and of every term the step reports (``train/<name>``), the learning rates, and the dev figures
(``dev/<name>``), to the log, the history and DVCLive, with a progress bar within the epoch. The epoch kept
is the best on the ``select`` dev figure (ties keep the earlier epoch), or the last one when nothing is
selected; ``patience`` epochs without a better one stop the run. Dev evaluation, selection, logging and
checkpoints are the main process's; with a ``run_dir`` every epoch ends in a checkpoint there
(gmner.training.resume) and a killed run continues from its last one, ending byte-identical on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from gmner.core.params import resolve_device, seed_everything
from gmner.training import resume
from gmner.training.batching import epoch_batches, loader, shard, to_device

log = logging.getLogger(__name__)

class Batches(Protocol):
    """A training split encoded once: ``batch`` collates any subset of it into a model's input dict (on the
    model's ``collate_device``, so that loader workers collate on the CPU). A split, and a ``Step``, whose
    state changes over the epochs (counts, a sampler) also has ``state_dict`` / ``load_state_dict``, which
    checkpoints hold."""

    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int]) -> dict: ...

    def start_epoch(self, epoch: int) -> None:
        """Called before the first batch of each epoch (1-based), for data whose batches change with it."""

    def lengths(self) -> Sequence[int]:
        """Each sentence's subword length, for length-grouped batches."""


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
    sentences_per_s: float  # over all processes
    dev_metric: str | None = None  # the figure that selected the epoch
    stopped_early: bool = False  # ``patience`` epochs passed without a better dev figure


PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # precision param -> accelerate's mixed_precision


def processes() -> int:
    """How many processes train together: WORLD_SIZE, as torchrun and accelerate launch set it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """The process that evaluates, selects, logs and writes (rank 0; the only one outside a launcher)."""
    return int(os.environ.get("RANK", "0")) == 0


def start_run(seed: int, device: str, threads: int | None = None) -> torch.device:
    """The prologue of every train stage, right before it builds its model: CPU intra-op threads (small models
    run faster on one than on two busy cores; 0 or None keeps torch's default), the seed (the same in every
    process, so all build the same model), the device: ``device`` itself, or under a launcher this process's
    (gloo on CPU, NCCL on CUDA)."""
    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed)
    if processes() > 1:
        from accelerate import PartialState

        return PartialState(cpu=resolve_device(device).type == "cpu").device
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


class Progress:
    """Progress within an epoch, on the main process only: a bar (batches, running loss, sentences/s, ETA) on a
    terminal; in a log file (nohup, a batch scheduler), where a bar would be one endless line, a log line every
    ``LOG_EVERY_S`` seconds of a long epoch."""

    LOG_EVERY_S = 60.0

    def __init__(self, title: str, batches: int, processes: int, show: bool):
        from tqdm.auto import tqdm

        self.title, self.batches, self.processes = title, batches, processes
        self.done, self.started = 0, time.perf_counter()
        terminal = show and sys.stderr.isatty()
        self.bar = tqdm(total=batches, desc=title, unit="batch", leave=False, file=sys.stderr, disable=not terminal)
        self.next_log = self.started + self.LOG_EVERY_S if show and not terminal else math.inf

    def update(self, sentences: int, loss: float) -> None:
        """One more batch done; ``sentences`` this process trained on so far, at running mean ``loss``."""
        self.done += 1
        now = time.perf_counter()
        rate = sentences * self.processes / (now - self.started)
        self.bar.update()
        self.bar.set_postfix(loss=f"{loss:.4f}", sent_s=f"{rate:.0f}", refresh=False)
        if now >= self.next_log and self.done < self.batches:
            self.next_log = now + self.LOG_EVERY_S
            eta = (now - self.started) * (self.batches - self.done) / self.done
            log.info("%s: %d/%d batches, loss %.4f, %.0f sentences/s, %.0f s left", self.title, self.done,
                     self.batches, loss, rate, eta)

    def close(self) -> None:
        self.bar.close()


class _Step(nn.Module):
    """The step as a module: DistributedDataParallel synchronises gradients of what runs through a module's
    forward, and accelerate's autocast wraps a forward too, while models train through ``loss`` methods."""

    def __init__(self, model: nn.Module, step: Step):
        super().__init__()
        self.model, self.step = model, step

    def forward(self, batch: dict):
        return self.step(batch)


def _accelerator(precision: str, device: torch.device):
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    # accelerate holds one precision per process: a stage runs one fit, but tests and benchmarks run several.
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=PRECISIONS[precision], cpu=device.type == "cpu", device_placement=False,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def _stateful(*objects) -> list:
    return [o for o in objects if hasattr(o, "state_dict") and not isinstance(o, nn.Module)]


def fit(
    model: nn.Module,
    data: Batches,
    cfg: dict,
    seed: int,
    *,
    step: Step | None = None,
    dev: DevEval | None = None,
    live=None,
    run_dir: Path | None = None,
) -> FitResult:
    """Train ``model`` (which has an ``encoder``) in place on ``data`` with the optimiser params ``cfg``.

    ``step(batch)`` returns the loss to minimise and named per-batch terms to log; the default is
    ``model.loss(batch)`` alone. Batches are drawn by a permutation seeded from ``seed`` each epoch.
    ``run_dir`` (resume.run_folder) holds the per-epoch checkpoints to resume from; None keeps none.
    """
    from accelerate.utils import gather_object
    from transformers import get_linear_schedule_with_warmup

    step = step or (lambda batch: (model.loss(batch), {}))
    accelerator = _accelerator(cfg.get("precision", "fp32"), model.device)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    batch_size, epochs, accum = cfg["batch_size"], cfg["epochs"], cfg.get("grad_accum", 1)
    workers, patience = cfg.get("loader_workers", 0), cfg.get("patience", 0)
    lengths = data.lengths() if cfg.get("group_by_length") else None
    steps = epochs * math.ceil(math.ceil(len(data) / (batch_size * world)) / accum)
    optimizer = torch.optim.AdamW(param_groups(model, model.pretrained, cfg["lr"], cfg["head_lr"], cfg["weight_decay"]))
    scheduler = get_linear_schedule_with_warmup(optimizer, round(cfg["warmup_ratio"] * steps), steps)
    start = resume.state_digest(model) if run_dir is not None else None
    wrapped, optimizer = accelerator.prepare(_Step(model, step), optimizer)
    shuffle = torch.Generator().manual_seed(seed)
    stateful = _stateful(data, step)

    best, best_epoch, best_state, history, train_seconds, first, stopped = None, 0, None, [], 0.0, 1, False
    checkpoint = resume.latest(run_dir, start) if run_dir is not None else None
    if run_dir is not None and checkpoint is None and main:
        resume.prune(run_dir, 0)  # another run's checkpoints: never to be mistaken for this one's
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(checkpoint["scaler"])
        resume.set_rng_state(checkpoint["rng"][rank])
        shuffle.set_state(checkpoint["shuffle"])
        for obj, state in zip(stateful, checkpoint["stateful"]):
            obj.load_state_dict(state)
        best, best_epoch, best_state = checkpoint["best"], checkpoint["best_epoch"], checkpoint["best_state"]
        history, train_seconds, stopped = checkpoint["history"], checkpoint["train_seconds"], checkpoint["stopped"]
        first = checkpoint["epoch"] + 1
        if live is not None:  # DVCLive's files as an uninterrupted run writes them
            for row in history:
                _log_live(live, row)

    for epoch in range(first, 1 if stopped else epochs + 1):
        model.train()
        data.start_epoch(epoch)
        started, sums, seen = time.perf_counter(), {"loss": 0.0}, 0
        batches = shard(epoch_batches(len(data), batch_size * world, shuffle, lengths, cfg.get("length_chunk", 50)),
                        rank, world)
        collated = iter(loader(data, batches, workers, pin_memory=model.device.type == "cuda"))
        progress = Progress(f"epoch {epoch}/{epochs}", len(batches), world, main)
        for group in (batches[i: i + accum] for i in range(0, len(batches), accum)):
            in_group = sum(len(idx) for idx in group)
            for j, idx in enumerate(group):
                batch = next(collated)
                batch = data.batch(batch) if workers == 0 else to_device(batch, model.device)
                # gradients are summed over the group's batches, each weighted by its share of the group
                sync = contextlib.nullcontext() if j == len(group) - 1 else accelerator.no_sync(wrapped)
                with sync:
                    loss, terms = wrapped(batch)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"epoch {epoch}: non-finite loss {loss.item()}, terms {terms}")
                    accelerator.backward(loss if len(group) == 1 else loss * (len(idx) / in_group))
                sums["loss"] += loss.item() * len(idx)
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + value * len(idx)
                seen += len(idx)
                progress.update(seen, sums["loss"] / seen)
            accelerator.clip_grad_norm_(model.parameters(), cfg["max_grad_norm"])
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:  # fp16: a step whose gradients overflowed
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        progress.close()
        seconds = time.perf_counter() - started
        train_seconds += seconds
        if world > 1:
            totals = accelerator.reduce(torch.tensor([seen, *sums.values()], dtype=torch.float64,
                                                     device=accelerator.device), "sum").tolist()
            seen, sums = totals[0], dict(zip(sums, totals[1:]))

        row = {"epoch": epoch, "seconds": round(seconds, 2)}
        row.update({f"train/{name}": total / seen for name, total in sums.items()})
        row.update({f"train/lr_{g['name']}": g["lr"] for g in optimizer.param_groups})
        if dev is not None and main:
            row.update({f"dev/{name}": value for name, value in dev.compute().items()})
        row = _from_main(row, world)
        history.append(row)
        if main:
            log.info("epoch %d/%d  %s  (%.1f s)", epoch, epochs,
                     "  ".join(f"{k} {v:.4f}" for k, v in row.items() if "/" in k and "/lr_" not in k), seconds)
            if live is not None:
                _log_live(live, row)
        if dev is not None and dev.select is not None:
            figure = row[f"dev/{dev.select}"]
            if best is None or figure > best:  # strict: ties keep the earlier epoch
                best, best_epoch = figure, epoch
                if main:
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            stopped = bool(patience) and epoch - best_epoch >= patience
        else:
            best_epoch = epoch
        if run_dir is not None:
            rng = gather_object([resume.rng_state()]) if world > 1 else [resume.rng_state()]
            if main:
                resume.save(run_dir, {
                    "epoch": epoch, "start": start, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                    "rng": rng, "shuffle": shuffle.get_state(), "stateful": [o.state_dict() for o in stateful],
                    "best": best, "best_epoch": best_epoch, "best_state": best_state, "history": history,
                    "train_seconds": train_seconds, "stopped": stopped,
                }, cfg.get("keep_last", 0))
            accelerator.wait_for_everyone()
        if stopped:
            log.info("no better dev %s for %d epochs: stopped after epoch %d", dev.select, patience, epoch)
            break

    if run_dir is not None and main:
        resume.prune(run_dir, cfg.get("keep_last", 0))
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(
        best_epoch=best_epoch,
        best_dev=best,
        history=history,
        train_seconds=train_seconds,
        sentences_per_s=len(history) * len(data) / train_seconds if train_seconds else 0.0,
        dev_metric=dev.select if dev is not None else None,
        stopped_early=stopped,
    )


def _from_main(obj, world: int):
    """``obj`` as the main process has it, in every process (the dev figures only it computes)."""
    if world == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj])[0]


def _log_live(live, row: dict) -> None:
    for key, value in row.items():
        if "/" in key:
            live.log_metric(key, value)
    live.next_step()
