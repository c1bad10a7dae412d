"""The ``train_bga`` stage: the CRF tagger of ``train`` with BGA-MNER's training-only generation objectives
(gmner.models.bga).

Text model and optimiser settings come from the ``train`` params, overridden by ``train_bga.fit``; the
generators' and the context sampler's from ``train_bga``. Training reads the detector candidates, the
image features and (with ``text_target``) the CLIP text features; the epoch is selected on dev MNER F1,
which, like every prediction of the model, reads text only. Writes models/bga (train_summary.json holds
the sampler's counts per stage under ``train_sampler``) and logs to dvclive/bga.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from gmner.core.params import check_keys
from gmner.models.bga import BGAConfig, BGATagger
from gmner.models.visual_store import VisualStore
from gmner.training.tagger import build_crf_tagger
from gmner.training.visual import VisualRun, VisualTrainingSet

NAME = "bga"
MODEL_PARAMS = tuple(field for field in BGAConfig.__dataclass_fields__ if field != "visual_dim")


class BGATrainingSet(VisualTrainingSet):
    """``VisualTrainingSet`` that tells the model's context sampler the epoch, so the sampler's stages follow
    the epochs."""

    def __init__(self, model: BGATagger, table: pa.Table, store: VisualStore):
        super().__init__(model, table, store)
        # The sampler updates this dict in place, so the summary written after training holds the final counts.
        self.summary["train_sampler"] = model.sampler.counts

    def start_epoch(self, epoch: int) -> None:
        self.tagger.sampler.epoch = epoch


def bga_config(group: dict, visual_dim: int) -> BGAConfig:
    """The model's config from the ``train_bga`` params (``fit`` is the optimiser override, not a field)."""
    check_keys("train_bga", group, ("fit", *MODEL_PARAMS))
    return BGAConfig(visual_dim=visual_dim, **{k: v for k, v in group.items() if k != "fit"})


def run_stage(params: dict, root: str | Path = ".") -> None:
    """Train on data/prepared/{train,dev}.parquet under ``root``; write models/bga and dvclive/bga."""
    group = params["train_bga"]
    reads = bga_config(group, 1)  # what training reads; the feature size comes from the store
    run = VisualRun.start(params, root, "train_bga", reads.top_k, reads.extras)
    model = build_crf_tagger(run.cfg, run.train, BGATagger, visual=bga_config(group, run.store.dim))
    run.finish(model.to(run.device), NAME, "mner", BGATrainingSet)
