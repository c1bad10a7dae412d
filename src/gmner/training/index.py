"""The ``train_index`` stage: the index-generation model (gmner.models.index_generation), the H-Index baseline.

Optimiser settings come from the ``train`` params, overridden by ``train_index.fit``; the model's from
``train_index``. Like ``train_grounded`` it reads the detector candidates and their features, selects the
epoch on dev GMNER F1 (candidates protocol) and trains through the same ``fit``; writes models/index (with
train_summary.json) and logs to dvclive/index.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from gmner.core.params import check_keys
from gmner.models.index_generation import IndexConfig, IndexGenerator, build_bart
from gmner.models.tagger import build_labels
from gmner.models.visual_store import VisualStore
from gmner.training.grounded import GroundedTrainingSet
from gmner.training.visual import VisualRun

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
        self.summary["train_sequences"] = dict(self.sequence_counts)

    def batch(self, indices: Sequence[int]) -> dict:
        batch = self.tagger.collate_inputs([self.encoded[i] for i in indices], [self.visuals[i] for i in indices])
        batch["entities"] = [self.entities[i] for i in indices]
        batch["region_targets"] = [self.region_targets[i] for i in indices]
        return batch


def build_model(cfg: dict, group: dict, train: pa.Table, visual_dim: int, visual_paths: dict | None = None):
    """A fresh ``IndexGenerator``: ``cfg`` holds max_length / dropout, ``group`` the ``train_index`` params;
    types and (for the tiny BART) the vocabulary come from the training split."""
    words = (w for tokens in train.column("tokens").to_pylist() for w in tokens)
    bart, tokenizer = build_bart(group["model"], group.get("tiny", {}), words, cfg["dropout"])
    labels = build_labels(train.column("tags").to_pylist())
    return IndexGenerator(bart, tokenizer, labels, cfg["max_length"], cfg["dropout"],
                          visual=index_config(group, visual_dim), visual_paths=visual_paths)


def index_config(group: dict, visual_dim: int) -> IndexConfig:
    check_keys("train_index", group, (*MODEL_PARAMS, *IndexConfig.__dataclass_fields__))
    return IndexConfig(visual_dim=visual_dim, **{k: v for k, v in group.items() if k not in MODEL_PARAMS})


def run_stage(params: dict, root: str | Path = ".") -> None:
    """Train on data/prepared/{train,dev}.parquet under ``root``; write models/index and dvclive/index."""
    group = params["train_index"]
    run = VisualRun.start(params, root, "train_index", group["top_k"], index_config(group, 1).extras)
    model = build_model(run.cfg, group, run.train, run.store.dim).to(run.device)
    run.finish(model, NAME, "gmner", IndexTrainingSet)
