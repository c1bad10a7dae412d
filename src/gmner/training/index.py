"""The ``train_index`` stage: the index-generation model (gmner.models.index_generation): H-Index, or with
``init: pretrain`` H-Index + DLRAM.

Optimiser settings come from the ``train`` params, overridden by ``train_index.fit``; the model's from
``train_index``. ``init`` names where the encoder inputs start: ``none`` (BART's own embeddings and fresh
visual projections, H-Index), ``pretrain`` (models/pretrain) or another pretrain checkpoint folder (DLRAM:
the pre-trained text encoder, image map and object map, gmner.models.visual_projection.AlignedProjection).
Like ``train_grounded`` it reads the detector candidates and their features, selects the epoch on dev GMNER
F1 (candidates protocol) and trains through the same ``fit``; writes models/index (with train_summary.json)
and logs to dvclive/index.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from gmner.core.params import ParamError, check_keys
from gmner.models.index_generation import IndexConfig, IndexGenerator, build_bart
from gmner.models.tagger import build_labels
from gmner.models.text_encoder import TINY, load_text_encoder
from gmner.models.visual_projection import AlignedProjection
from gmner.models.visual_store import VisualStore
from gmner.pretrain.checkpoint import PretrainCheckpoint, encoder_spec, init_checkpoint
from gmner.training.grounded import GroundedTrainingSet
from gmner.training.visual import VisualRun

log = logging.getLogger(__name__)

MODEL_PARAMS = ("model", "tiny", "fit", "init")  # the rest of the group are IndexConfig fields
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


def build_model(cfg: dict, group: dict, train: pa.Table, visual_dim: int, visual_paths: dict | None = None,
                checkpoint: PretrainCheckpoint | None = None) -> IndexGenerator:
    """A fresh ``IndexGenerator``: ``cfg`` holds max_length / dropout, ``group`` the ``train_index`` params;
    types and (for the tiny BART) the vocabulary come from the training split. From a pretrain
    ``checkpoint``, its text encoder (and tokenizer), image map and object map start the encoder inputs."""
    words = (w for tokens in train.column("tokens").to_pylist() for w in tokens)
    bart, tokenizer = build_bart(group["model"], group.get("tiny", {}), words, cfg["dropout"])
    labels = build_labels(train.column("tags").to_pylist())
    visual, text_encoder = index_config(group, visual_dim), None
    if checkpoint is not None:
        text_encoder, tokenizer = load_text_encoder(str(checkpoint.encoder_dir), tiny={})
        visual = replace(visual, aligned=AlignedProjection.shape_of(checkpoint))
    model = IndexGenerator(bart, tokenizer, labels, cfg["max_length"], cfg["dropout"], visual=visual,
                           visual_paths=visual_paths, text_encoder=text_encoder)
    if checkpoint is None and group["model"] != TINY and visual.head == "hierarchical":
        model.init_symbols_from_names()  # a pre-trained BART: its embeddings of the symbols' names
    if checkpoint is not None:
        lacking = model.visual_projection.load_pretrained(checkpoint)
        if lacking:
            log.warning("train_index: %s has no %s (switched off in pre-training); they start fresh",
                        checkpoint.path, ", ".join(lacking))
    return model


def index_config(group: dict, visual_dim: int) -> IndexConfig:
    check_keys("train_index", group, (*MODEL_PARAMS, *IndexConfig.__dataclass_fields__))
    try:
        return IndexConfig(visual_dim=visual_dim, **{k: v for k, v in group.items() if k not in MODEL_PARAMS})
    except ValueError as err:  # a value the model cannot take: the param's one-line error
        raise ParamError("train_index", str(err)) from None


def run_stage(params: dict, root: str | Path = ".") -> None:
    """Train on data/prepared/{train,dev}.parquet under ``root``; write models/index and dvclive/index."""
    group = params["train_index"]
    run = VisualRun.start(params, root, "train_index", group["top_k"], index_config(group, 1).extras)
    checkpoint = init_checkpoint(group["init"], run.root, "train_index.init", run.store.dim, encoder_spec(run.cfg))
    model = build_model(run.cfg, group, run.train, run.store.dim, checkpoint=checkpoint).to(run.device)
    run.finish(model, NAME, "gmner", IndexTrainingSet)
