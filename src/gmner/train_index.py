"""The ``train_index`` stage: the index-generation model (gmner.index_generation), the H-Index baseline.

Optimiser settings come from the ``train`` params, overridden by ``train_index.fit``; the model's from
``train_index``. Like ``train_grounded`` it reads the detector candidates and their features, selects the
epoch on dev GMNER F1 (candidates protocol) and trains through the same ``fit``; writes models/index (with
train_summary.json) and logs to dvclive/index.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import torch

from gmner.grounded_tagger import GroundedPredictor
from gmner.grounding import DEFAULT_PATHS, VisualStore, feature_statistics
from gmner.index_generation import IndexConfig, IndexGenerator, build_bart
from gmner.params import resolve_device, seed_everything
from gmner.tagger import build_labels
from gmner.train_grounded import GroundedTrainingSet, gmner_dev_score
from gmner.train_tagger import read_train_dev, train_and_save

log = logging.getLogger(__name__)

MODEL_PARAMS = ("model", "tiny", "fit")  # the rest of the group are IndexConfig fields
NAME = "index"


class IndexTrainingSet(GroundedTrainingSet):
    """``GroundedTrainingSet`` plus each tweet's gold entities in encoded-word indices (its target sequence)."""

    def __init__(self, model: IndexGenerator, table: pa.Table, store: VisualStore):
        super().__init__(model, table, store)
        self.entities, self.region_targets, self.sequence_counts = [], [], Counter()
        for encoded, spans, targets in zip(self.encoded, self.spans, self.targets):
            entities, kept_targets = model.gold_entities(encoded, spans, targets, self.sequence_counts)
            self.entities.append(entities)
            self.region_targets.append(kept_targets)

    def batch(self, indices: Sequence[int]) -> dict:
        batch = self.tagger.collate_inputs([self.encoded[i] for i in indices], [self.visuals[i] for i in indices])
        batch["entities"] = [self.entities[i] for i in indices]
        batch["region_targets"] = [self.region_targets[i] for i in indices]
        return batch


def build_model(cfg: dict, group: dict, train: pa.Table, visual_dim: int, visual_paths: dict | None = None):
    """A fresh ``IndexGenerator``: ``cfg`` holds max_length / dropout, ``group`` the ``train_index`` params;
    types and (for the tiny BART) the vocabulary come from the training split."""
    unknown = set(group) - set(MODEL_PARAMS) - set(IndexConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"train_index: unknown params {sorted(unknown)}")
    words = (w for tokens in train.column("tokens").to_pylist() for w in tokens)
    bart, tokenizer = build_bart(group["model"], group.get("tiny", {}), words, cfg["dropout"])
    grounding = IndexConfig(visual_dim=visual_dim, **{k: v for k, v in group.items() if k not in MODEL_PARAMS})
    labels = build_labels(train.column("tags").to_pylist())
    return IndexGenerator(bart, tokenizer, labels, cfg["max_length"], cfg["dropout"],
                          grounding=grounding, visual_paths=visual_paths)


def run_stage(params: dict, root: str | Path = ".") -> None:
    """Train on data/prepared/{train,dev}.parquet under ``root``; write models/index and dvclive/index."""
    root = Path(root)
    group, seed = params["train_index"], params["base"]["seed"]
    cfg = {**params["train"], **group.get("fit", {})}
    train, dev = read_train_dev(root)
    store = VisualStore.read({key: root / path for key, path in DEFAULT_PATHS.items()}, group["top_k"])

    started = time.perf_counter()
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    seed_everything(seed)
    model = build_model(cfg, group, train, store.dim).to(resolve_device(params["base"]["device"]))
    data = IndexTrainingSet(model, train, store)
    model.visual.set_feature_statistics(feature_statistics(data.visuals, store.dim))
    log.info("train: %s; targets: %s; sequences: %s", dict(data.coverage), dict(data.target_counts),
             dict(data.sequence_counts))
    summary = {
        "train_visual": dict(data.coverage),
        "train_targets": dict(data.target_counts),
        "train_sequences": dict(data.sequence_counts),
        "dev_visual": dict(store.lookup_table(dev)[1]),
    }
    dev_score = gmner_dev_score(GroundedPredictor(model, store), dev, store.regions)
    train_and_save(model, data, dev, cfg, seed, root, NAME, started, dev_score, summary)
