"""The ``train_grounded`` stage: the CRF tagger of ``train`` plus a grounding head (gmner.models.grounded_tagger).

Text model and optimiser settings come from the ``train`` params with ``train_grounded.fit`` overrides, the
head's from ``train_grounded``. The
head reads the detector candidates (data/regions.parquet) and their features (data/features/), plus the
captions and generated images when switched on; the epoch is selected on dev GMNER F1 under the candidates
protocol. Writes models/grounded/ (with train_summary.json, which also counts the tweets that could only get
"none" and the gold spans left without a candidate target) and logs to dvclive/grounded.

``connector: true`` passes the candidates through VTC's shared-private connector, shaped by the ``pretrain``
params (with ``visual_tokens``, its outputs are also prefix tokens of the text encoder, so they reach the CRF);
``init: pretrain`` (or a checkpoint folder) starts the text encoder from the pretrain stage's
checkpoint (models/pretrain), and the connector too when the checkpoint has one (``objects: connector``),
in the checkpoint's shape. A checkpoint with DLRAM's linear object map has no connector to give: then
``connector`` decides as from scratch (a fresh one, or none). So from scratch and pre-trained runs of one
architecture differ only in ``init``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from gmner.core.params import ParamError, check_keys, fit_params
from gmner.models.grounded_tagger import GroundedModel, GroundedTagger, GroundingConfig
from gmner.models.visual_store import NONE, VisualStore
from gmner.pretrain.checkpoint import connector_settings, encoder_spec, init_checkpoint
from gmner.training.tagger import build_crf_tagger
from gmner.training.visual import VisualRun, VisualTrainingSet

HEAD_PARAMS = tuple(field for field in GroundingConfig.__dataclass_fields__ if field not in ("visual_dim", "connector"))
STAGE_PARAMS = ("fit", "init", "connector")  # optimiser overrides, where the model starts, the connector switch


class GroundedTrainingSet(VisualTrainingSet):
    """``VisualTrainingSet`` plus each tweet's gold spans and their grounding targets."""

    def __init__(self, model: GroundedModel, table: pa.Table, store: VisualStore):
        super().__init__(model, table, store)
        self.spans, self.targets, self.target_counts = [], [], Counter()
        for visual, entities in zip(self.visuals, table.column("entities").to_pylist()):
            self.spans.append([(e["start"], e["end"], e["type"]) for e in entities])
            targets = [model.target(visual, np.asarray(e["boxes"], np.float32).reshape(-1, 4)) for e in entities]
            self.targets.append(targets)
            for entity, target in zip(entities, targets):
                grounded = bool(target[NONE] < 1)
                self.target_counts["gold_spans"] += 1
                self.target_counts["groundable"] += bool(entity["boxes"])
                self.target_counts["candidate_target"] += grounded
                self.target_counts["groundable_target_none"] += bool(entity["boxes"]) and not grounded
        self.summary["train_targets"] = dict(self.target_counts)

    def batch(self, indices) -> dict:
        batch = super().batch(indices)
        spans, _ = self.tagger.span_batch(
            [self.encoded[i] for i in indices],
            [self.spans[i] for i in indices],
            [self.targets[i] for i in indices],
            n_options=1 + batch["region_mask"].shape[1],
        )
        batch.update(spans)
        return batch


def grounding_config(cfg: dict, visual_dim: int, connector: dict | None = None) -> GroundingConfig:
    """The head's config from the ``train_grounded`` params (``fit``, ``init`` and the ``connector`` switch
    set aside) and the connector settings, if any."""
    check_keys("train_grounded", cfg, (*HEAD_PARAMS, *STAGE_PARAMS))
    head = {key: value for key, value in cfg.items() if key in HEAD_PARAMS}
    try:
        return GroundingConfig(visual_dim=visual_dim, connector=connector, **head)
    except ValueError as err:  # a value the model cannot take: the param's one-line error
        raise ParamError("train_grounded", str(err)) from None


def build_grounded(params: dict, root: Path, train: pa.Table, store: VisualStore) -> GroundedTagger:
    """A fresh grounded tagger for ``params``: from the ``init`` checkpoint's encoder, and its connector if it
    has one."""
    group, fit = params["train_grounded"], fit_params(params, "train_grounded")
    checkpoint = init_checkpoint(group.get("init"), root, "train_grounded.init", store.dim, encoder_spec(fit))
    connector, pretrained = None, {}
    if checkpoint is not None:
        pretrained = checkpoint.module_state("connector")
        fit = dict(fit, encoder=str(checkpoint.encoder_dir))  # its tokenizer too: the same vocabulary
    if pretrained:
        connector = checkpoint.config.connector
    elif group.get("connector"):
        connector = connector_settings(params.get("pretrain", {}).get("connector", {}))
    model = build_crf_tagger(fit, train, GroundedTagger, visual=grounding_config(group, store.dim, connector))
    if pretrained:
        model.head.visual.connector.load_state_dict(pretrained)
    return model


def run_stage(params: dict, root: str | Path = ".", name: str = "grounded") -> None:
    """Train on data/prepared/{train,dev}.parquet under ``root``; write models/<name> and dvclive/<name>."""
    group = params["train_grounded"]
    run = VisualRun.start(params, root, "train_grounded", group["top_k"], grounding_config(group, 1).extras)
    model = build_grounded(params, run.root, run.train, run.store).to(run.device)
    run.finish(model, name, "gmner", GroundedTrainingSet)
