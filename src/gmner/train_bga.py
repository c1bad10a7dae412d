"""The ``train_bga`` stage: the CRF tagger of ``train`` with BGA-MNER's training-only generation objectives
(gmner.bga).

Text model and optimiser settings come from the ``train`` params, overridden by ``train_bga.fit``; the
generators' and the context sampler's from ``train_bga``. Training reads the detector candidates, the
image features and (with ``text_target``) the CLIP text features; the epoch is selected on dev MNER F1,
which, like every prediction of the model, reads text only. Writes models/bga (train_summary.json holds
the sampler's counts per stage under ``train_sampler``) and logs to dvclive/bga.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from gmner.bga import BGAConfig, BGATagger
from gmner.grounding import VisualStore
from gmner.train_tagger import build_crf_tagger
from gmner.train_visual import VisualTrainingSet, train_stage

NAME = "bga"
MODEL_PARAMS = tuple(field for field in BGAConfig.__dataclass_fields__ if field != "visual_dim")


class BGATrainingSet(VisualTrainingSet):
    """``VisualTrainingSet`` that tells the model's context sampler the epoch of each batch it serves (fit
    asks for ``ceil(n / batch_size)`` batches an epoch), so the sampler's stages follow the epochs."""

    def __init__(self, model: BGATagger, table: pa.Table, store: VisualStore, batch_size: int):
        super().__init__(model, table, store)
        self.steps_per_epoch = math.ceil(len(self) / batch_size)
        self.served = 0
        # The sampler updates this dict in place, so the summary written after training holds the final counts.
        self.summary["train_sampler"] = model.sampler.counts

    def batch(self, indices: Sequence[int]) -> dict:
        self.tagger.sampler.epoch = self.served // self.steps_per_epoch + 1
        self.served += 1
        return super().batch(indices)


def bga_config(group: dict, visual_dim: int) -> BGAConfig:
    """The model's config from the ``train_bga`` params (``fit`` is the optimiser override, not a field)."""
    unknown = set(group) - set(MODEL_PARAMS) - {"fit"}
    if unknown:
        raise ValueError(f"train_bga: unknown params {sorted(unknown)}; known: {['fit', *MODEL_PARAMS]}")
    return BGAConfig(visual_dim=visual_dim, **{k: v for k, v in group.items() if k != "fit"})


def run_stage(params: dict, root: str | Path = ".") -> None:
    """Train on data/prepared/{train,dev}.parquet under ``root``; write models/bga and dvclive/bga."""
    group = params["train_bga"]
    cfg = {**params["train"], **group.get("fit", {})}
    reads = bga_config(group, 1)  # what training reads; the feature size comes from the store

    def build(train: pa.Table, store: VisualStore) -> BGATagger:
        return build_crf_tagger(cfg, train, BGATagger, visual=bga_config(group, store.dim))

    train_stage(params, root, NAME, cfg, build, lambda paths: VisualStore.read(paths, reads.top_k, reads.extras),
                "mner", partial(BGATrainingSet, batch_size=cfg["batch_size"]))
