"""The ``train_bga`` stage: the CRF tagger of ``train`` with BGA-MNER's generation objectives and (``inference:
generated``) its cross-modal interaction over real image features in training, generated ones at inference
(gmner.models.bga).

Text model and optimiser settings come from the ``train`` params, overridden by ``train_bga.fit``; the
generators', the interaction's and the context sampler's from ``train_bga``. Training reads the detector
candidates, the image features and (with ``text_target``) the CLIP text features; the epoch is selected on
dev MNER F1, which, like every prediction of the model, reads text only. ``shuffle_images`` is a control:
each training tweet with an image gets the image inputs of another (a permutation drawn from ``base.seed``),
its own CLIP text embedding kept. Writes models/bga (train_summary.json holds the sampler's counts per stage
under ``train_sampler``) and logs to dvclive/bga.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from gmner.core.params import ParamError, check_keys
from gmner.models.bga import BGAConfig, BGATagger
from gmner.models.visual_store import ImageVisual, VisualStore
from gmner.training.tagger import build_crf_tagger
from gmner.training.visual import VisualRun, VisualTrainingSet

NAME = "bga"
MODEL_PARAMS = tuple(field for field in BGAConfig.__dataclass_fields__ if field != "visual_dim")
STAGE_PARAMS = ("fit", "shuffle_images")  # optimiser overrides, the shuffled-image control


def shuffled_images(visuals: Sequence[ImageVisual], seed: int) -> list[ImageVisual]:
    """``visuals`` with the image inputs (candidates, their features, the image) of the tweets that have any
    permuted among them by a draw from ``seed``; each keeps its own CLIP text embedding."""
    rows = [i for i, v in enumerate(visuals) if v.image is not None or v.embeddings is not None]
    out = list(visuals)
    for row, source in zip(rows, np.random.default_rng(seed).permutation(rows)):
        out[row] = replace(visuals[source], text=visuals[row].text)
    return out


class BGATrainingSet(VisualTrainingSet):
    """``VisualTrainingSet`` that tells the model's context sampler the epoch, so the sampler's stages follow
    the epochs; with ``shuffle_seed``, the images are shuffled among the tweets (``shuffled_images``)."""

    def __init__(self, model: BGATagger, table: pa.Table, store: VisualStore, shuffle_seed: int | None = None):
        super().__init__(model, table, store)
        if shuffle_seed is not None:
            self.visuals = shuffled_images(self.visuals, shuffle_seed)
            self.summary["shuffled_images"] = True
        # The sampler updates this dict in place, so the summary written after training holds the final counts.
        self.summary["train_sampler"] = model.sampler.counts

    def start_epoch(self, epoch: int) -> None:
        self.tagger.sampler.epoch = epoch

    def state_dict(self) -> dict:
        return self.tagger.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.tagger.sampler.load_state_dict(state)


def bga_config(group: dict, visual_dim: int) -> BGAConfig:
    """The model's config from the ``train_bga`` params (the STAGE_PARAMS set aside)."""
    check_keys("train_bga", group, (*STAGE_PARAMS, *MODEL_PARAMS))
    try:
        return BGAConfig(visual_dim=visual_dim, **{k: v for k, v in group.items() if k not in STAGE_PARAMS})
    except ValueError as err:  # a value the model cannot take: the param's one-line error
        raise ParamError("train_bga", str(err)) from None


def run_stage(params: dict, root: str | Path = ".") -> None:
    """Train on data/prepared/{train,dev}.parquet under ``root``; write models/bga and dvclive/bga."""
    group = params["train_bga"]
    reads = bga_config(group, 1)  # what training reads; the feature size comes from the store
    run = VisualRun.start(params, root, "train_bga", reads.top_k, reads.extras)
    model = build_crf_tagger(run.cfg, run.train, BGATagger, visual=bga_config(group, run.store.dim))
    shuffle = params["base"]["seed"] if group.get("shuffle_images") else None
    run.finish(model.to(run.device), NAME, "mner", partial(BGATrainingSet, shuffle_seed=shuffle))
