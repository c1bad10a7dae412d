"""Training any visual model (gmner.models.visual_model): its training set, the dev score that selects the epoch,
and ``VisualRun``, the start and finish that the ``train_*`` stages of the visual models share; a model folder
also records the vision pipeline that made its inputs (gmner.vision.record), so it predicts new images."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import torch

from gmner.core.params import fit_params
from gmner.evaluation.scoring import score
from gmner.models.visual_model import VisualModel, VisualPredictor
from gmner.models.visual_store import DEFAULT_PATHS, VisualStore
from gmner.training.loop import DevEval, dev_metric, processes, start_run
from gmner.training.resume import run_folder
from gmner.training.tagger import TrainingSet, prepared_inputs, read_train_dev, train_and_save
from gmner.vision.record import RECORD_FILE, vision_record

log = logging.getLogger(__name__)


class VisualTrainingSet(TrainingSet):
    """``TrainingSet`` plus each tweet's visual inputs (``coverage`` counts the missing ones by reason);
    ``summary`` holds what a model family adds to train_summary.json."""

    def __init__(self, model: VisualModel, table: pa.Table, store: VisualStore):
        self.visuals, self.coverage = store.lookup_table(table)
        self.summary: dict = {}
        super().__init__(model, table, model.contexts(self.visuals))

    def batch(self, indices: Sequence[int]) -> dict:
        return self.tagger.collate_inputs(
            [self.encoded[i] for i in indices], [self.visuals[i] for i in indices], [self.labels[i] for i in indices]
        )


def dev_score(predictor: VisualPredictor, dev: pa.Table, task: str, regions: pa.Table | None = None) -> DevEval:
    """Dev F1 of ``task``: "mner", or "gmner" under the candidates protocol (needs ``regions``)."""

    def compute() -> float:
        metrics = score(dev, predictor.predict(dev), regions)[task]
        return (metrics["candidates"] if task == "gmner" else metrics)["overall"]["f1"]

    return dev_metric(f"{task}_f1", compute)


@dataclass
class VisualRun:
    """A visual model's train stage: ``start`` reads the prepared splits and the visual store, then runs the
    loop's prologue (threads, seed, device); the stage builds its model on ``device`` and hands it to
    ``finish``, which trains it and writes models/<name> and dvclive/<name>."""

    params: dict
    root: Path
    group: str  # the params group, whose ``fit`` overrides the shared optimiser params
    cfg: dict
    train: pa.Table
    dev: pa.Table
    store: VisualStore
    device: torch.device
    started: float

    @classmethod
    def start(cls, params: dict, root: str | Path, group: str, top_k: int, extras: Sequence[str]) -> VisualRun:
        root = Path(root)
        cfg = fit_params(params, group)
        train, dev = read_train_dev(root)
        store = VisualStore.read({key: root / path for key, path in DEFAULT_PATHS.items()}, top_k, extras)
        started = time.perf_counter()
        device = start_run(params["base"]["seed"], params["base"]["device"], cfg.get("threads"))
        return cls(params, root, group, cfg, train, dev, store, device, started)

    def finish(self, model: VisualModel, name: str, task: str,
               training_set: type[VisualTrainingSet] = VisualTrainingSet) -> None:
        """Train ``model`` (on ``device``) with epochs selected on dev ``task`` F1 ("mner", or "gmner" under
        the candidates protocol), and save it."""
        vision = vision_record(self.params, self.root, model.extras)  # fails before training, not after
        data = training_set(model, self.train, self.store)
        model.fit_feature_statistics(data.visuals)
        summary = {"train_visual": dict(data.coverage), "dev_visual": dict(self.store.lookup_table(self.dev)[1]),
                   **data.summary}
        log.info("%s: %s", name, summary)
        regions = self.store.regions if task == "gmner" else None
        score_dev = dev_score(VisualPredictor(model, self.store), self.dev, task, regions)
        inputs = [*prepared_inputs(self.root), *self.store.sources]
        run_dir = run_folder(self.root, self.params, self.group, inputs, processes())
        train_and_save(model, data, self.dev, self.cfg, self.params["base"]["seed"], self.root, name, self.started,
                       score_dev, summary, run_dir, files={RECORD_FILE: vision} if vision else None)
