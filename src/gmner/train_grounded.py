"""The ``train_grounded`` stage: the CRF tagger of ``train`` plus a grounding head (gmner.grounded_tagger).

Text model and optimiser settings come from the ``train`` params, the head's from ``train_grounded``. The
head reads the detector candidates (data/regions.parquet) and their features (data/features/); the epoch
is selected on dev GMNER F1 under the candidates protocol. Writes models/grounded/ (with
train_summary.json, which also counts the tweets that could only get "none" and the gold spans left
without a candidate target) and logs to dvclive/grounded, through the same ``fit`` as the text tagger.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from gmner.evaluation import score
from gmner.grounded_tagger import GroundedPredictor, GroundedTagger, GroundingConfig
from gmner.grounding import (
    DEFAULT_PATHS,
    NONE,
    VisualStore,
    collate_visual,
    feature_statistics,
)
from gmner.params import resolve_device, seed_everything
from gmner.train_tagger import (
    DevScore,
    TrainingSet,
    build_crf_tagger,
    read_train_dev,
    train_and_save,
)

log = logging.getLogger(__name__)

HEAD_PARAMS = (
    "top_k", "hidden", "heads", "regions", "global_feature", "span_words", "loss", "soft_label_threshold", "weight"
)


class GroundedTrainingSet(TrainingSet):
    """``TrainingSet`` plus each tweet's visual inputs and its gold spans' grounding targets."""

    def __init__(self, tagger: GroundedTagger, table: pa.Table, store: VisualStore):
        super().__init__(tagger, table)
        self.visuals, self.coverage = store.lookup_table(table)
        self.spans, self.targets, self.target_counts = [], [], Counter()
        for visual, entities in zip(self.visuals, table.column("entities").to_pylist()):
            self.spans.append([(e["start"], e["end"], e["type"]) for e in entities])
            targets = [tagger.target(visual, np.asarray(e["boxes"], np.float32).reshape(-1, 4)) for e in entities]
            self.targets.append(targets)
            for entity, target in zip(entities, targets):
                grounded = bool(target[NONE] < 1)
                self.target_counts["gold_spans"] += 1
                self.target_counts["groundable"] += bool(entity["boxes"])
                self.target_counts["candidate_target"] += grounded
                self.target_counts["groundable_target_none"] += bool(entity["boxes"]) and not grounded

    def batch(self, indices: Sequence[int]) -> dict:
        batch = super().batch(indices)
        tagger = self.tagger
        batch.update(collate_visual([self.visuals[i] for i in indices], tagger.grounding.visual_dim, tagger.device))
        spans, _ = tagger.span_batch(
            [self.encoded[i] for i in indices],
            [self.spans[i] for i in indices],
            [self.targets[i] for i in indices],
            n_options=1 + batch["region_mask"].shape[1],
        )
        batch.update(spans)
        return batch


def grounding_config(cfg: dict, visual_dim: int) -> GroundingConfig:
    """The head's config from the ``train_grounded`` params."""
    unknown = set(cfg) - set(HEAD_PARAMS)
    if unknown:
        raise ValueError(f"train_grounded: unknown params {sorted(unknown)}; known: {list(HEAD_PARAMS)}")
    return GroundingConfig(visual_dim=visual_dim, **cfg)


def gmner_dev_score(predictor: GroundedPredictor, dev: pa.Table, regions: pa.Table) -> DevScore:
    def compute() -> float:
        return score(dev, predictor.predict(dev), regions)["gmner"]["candidates"]["overall"]["f1"]

    return DevScore("gmner_f1", compute)


def run_stage(params: dict, root: str | Path = ".") -> None:
    """Train on data/prepared/{train,dev}.parquet under ``root``; write models/grounded and dvclive/grounded."""
    root = Path(root)
    cfg, seed = params["train"], params["base"]["seed"]
    train, dev = read_train_dev(root)
    paths = {key: root / path for key, path in DEFAULT_PATHS.items()}
    store = VisualStore.read(paths, params["train_grounded"]["top_k"])

    started = time.perf_counter()
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    seed_everything(seed)
    head = grounding_config(params["train_grounded"], store.dim)
    tagger = build_crf_tagger(cfg, train, GroundedTagger, grounding=head)
    tagger = tagger.to(resolve_device(params["base"]["device"]))
    data = GroundedTrainingSet(tagger, train, store)
    tagger.head.visual.set_feature_statistics(feature_statistics(data.visuals, store.dim))
    log.info("train: %s; targets: %s", dict(data.coverage), dict(data.target_counts))
    summary = {
        "train_visual": dict(data.coverage),
        "train_targets": dict(data.target_counts),
        "dev_visual": dict(store.lookup_table(dev)[1]),
    }
    dev_score = gmner_dev_score(GroundedPredictor(tagger, store), dev, store.regions)
    train_and_save(tagger, data, dev, cfg, seed, root, "grounded", started, dev_score, summary)
