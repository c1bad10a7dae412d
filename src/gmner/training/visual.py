"""Training any visual model (gmner.models.visual_model): its training set, the dev score that selects the epoch,
and the train stage around ``fit`` that the ``train_*`` stages of the visual models share."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import pyarrow as pa

from gmner.core.params import fit_params
from gmner.evaluation.scoring import score
from gmner.models.visual_model import VisualModel, VisualPredictor
from gmner.models.visual_store import DEFAULT_PATHS, VisualStore
from gmner.training.loop import DevEval, dev_metric, start_run
from gmner.training.tagger import TrainingSet, read_train_dev, train_and_save

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


def train_stage(
    params: dict,
    root: str | Path,
    name: str,
    group: str,
    build: Callable[[pa.Table, VisualStore], VisualModel],
    read_store: Callable[[dict], VisualStore],
    task: str,
    training_set: type[VisualTrainingSet] = VisualTrainingSet,
) -> None:
    """Train a visual model on data/prepared/{train,dev}.parquet under ``root`` with the optimiser params of
    params group ``group``; write models/<name> and dvclive/<name>. ``build(train, store)`` makes the fresh model,
    ``read_store(paths)`` the store it reads; epochs are selected on dev ``task`` F1."""
    root = Path(root)
    cfg, seed = fit_params(params, group), params["base"]["seed"]
    train, dev = read_train_dev(root)
    store = read_store({key: root / path for key, path in DEFAULT_PATHS.items()})
    started = time.perf_counter()
    device = start_run(seed, params["base"]["device"], cfg.get("threads"))
    model = build(train, store).to(device)
    data = training_set(model, train, store)
    model.fit_feature_statistics(data.visuals)
    summary = {"train_visual": dict(data.coverage), "dev_visual": dict(store.lookup_table(dev)[1]), **data.summary}
    log.info("%s: %s", name, summary)
    score_dev = dev_score(VisualPredictor(model, store), dev, task, store.regions if task == "gmner" else None)
    train_and_save(model, data, dev, cfg, seed, root, name, started, score_dev, summary)
