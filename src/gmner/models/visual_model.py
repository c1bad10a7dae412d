"""What every model with visual inputs shares, whatever it predicts: its config in model.json, the tables it
reads (``visual_paths``, ``extras``), captions appended to its text, batches with text and visual inputs,
and the predictor. Training them is gmner.training.visual.

A model family mixes :class:`VisualModel` in before its tagger base and sets ``kind`` and ``visual_config``
(a frozen dataclass with at least ``visual_dim``, ``top_k`` and an ``extras`` property naming the
gmner.models.visual_store EXTRAS it reads; a ``captions`` field switches the caption text on). It implements ``loss``
and ``decode`` (taggers) or overrides ``predict_entities`` (models that also choose a region).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from gmner.core import schema
from gmner.core.bio import spans as bio_spans
from gmner.core.errors import DataError
from gmner.core.images import image_info
from gmner.models.tagger import CRFTagger, EncodedTweet, length_batches, predicting
from gmner.models.visual_store import DEFAULT_PATHS, ImageVisual, VisualStore, collate_visual

log = logging.getLogger(__name__)


class VisualModel:
    """Mixed in before ``CRFTagger`` (or a ``WordTagger`` whose ``__init__`` calls ``init_visual``); the model
    builds its own modules in ``build_visual``."""

    visual_config: type  # the dataclass of the model's visual params

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer,
        labels: Sequence[str],
        max_length: int = 128,
        dropout: float = 0.1,
        *,
        visual,
        visual_paths: dict | None = None,
    ):
        super().__init__(encoder, tokenizer, labels, max_length, dropout)
        self.init_visual(visual, visual_paths)
        # The visual side draws its initial weights from a fork of the random stream, so what follows (the
        # dropout masks of training) is what the text tagger would draw: without images, training is its own.
        with torch.random.fork_rng(devices=[]):
            self.build_visual(encoder.config.hidden_size, dropout)

    def build_visual(self, text_dim: int, dropout: float) -> None:
        """Create the model's visual modules from ``self.visual_cfg``."""
        raise NotImplementedError

    def init_visual(self, cfg, visual_paths: dict | None) -> None:
        self.visual_cfg = cfg
        # Where prediction reads candidates and features (relative to the working directory).
        self.visual_paths = dict(visual_paths or DEFAULT_PATHS)
        self.types = sorted({label[2:] for label in self.labels if label != "O"})
        self.type_index = {t: i for i, t in enumerate(self.types)}

    def fit_feature_statistics(self, visuals: Sequence[ImageVisual]) -> None:
        """Set whatever the model standardises its visual inputs with from the training inputs (none here)."""

    @property
    def extras(self) -> tuple[str, ...]:
        return tuple(self.visual_cfg.extras)

    def config(self) -> dict:
        return {**CRFTagger.config(self), "visual": asdict(self.visual_cfg), "visual_paths": self.visual_paths}

    @classmethod
    def from_config(cls, encoder: nn.Module, tokenizer, config: dict, **parts):
        return cls(
            encoder, tokenizer, config["labels"], config["max_length"], config["dropout"],
            visual=cls.visual_config(**config["visual"]), visual_paths=config["visual_paths"], **parts,
        )

    def read_store(self, paths: dict | None = None) -> VisualStore:
        """The tables this model reads, from ``paths`` (default: its own ``visual_paths``)."""
        return VisualStore.read(paths or self.visual_paths, self.visual_cfg.top_k, self.extras)

    def contexts(self, visuals: Sequence[ImageVisual]) -> list | None:
        """What ``encode`` appends to each tweet: its image's caption when the model reads captions."""
        return [v.caption for v in visuals] if getattr(self.visual_cfg, "captions", False) else None

    def collate_inputs(
        self, encoded: Sequence[EncodedTweet], visuals: Sequence[ImageVisual], label_ids=None
    ) -> dict:
        """Text (``collate``) and visual inputs (``collate_visual``, patch tokens if the model reads them),
        and each tweet's encoded word count."""
        batch = self.collate(encoded, label_ids)
        patch_dim = getattr(self.visual_cfg, "patch_dim", None) if "patches" in self.extras else None
        batch.update(collate_visual(visuals, self.visual_cfg.visual_dim, self.collate_device, patch_dim))
        batch["n_words"] = torch.tensor([len(e.word_pos) for e in encoded], device=self.collate_device)
        return batch

    @predicting
    def predict_entities(
        self, token_lists: Sequence[Sequence[str]], visuals: Sequence[ImageVisual], batch_size: int = 64
    ) -> list[list[dict]]:
        """Per tweet, schema.PREDICTED_ENTITY dicts of the decoded spans, without region (MNER models)."""
        encoded, _ = self.encode(token_lists, self.contexts(visuals))
        out: list[list[dict]] = [[] for _ in encoded]
        for chunk in length_batches(encoded, batch_size):
            decoded = self.decode(self.collate_inputs([encoded[i] for i in chunk], [visuals[i] for i in chunk]))
            for i, ids in zip(chunk, decoded):
                out[i] = [
                    {"start": s.start, "end": s.end, "type": s.type, "region": None, "box": None}
                    for s in bio_spans(self.word_tags(encoded[i], ids))
                ]
        return out


class VisualPredictor:
    """Tweets in, entities (with regions, for grounding models) out; inputs come from a ``VisualStore``.

    ``counts`` (after ``predict``) says how many tweets lacked which input and why (no image, image not in
    the regions or features tables, no candidates, no caption). Tweets given without ``image_sha256`` (new
    tweets from `gmner predict`) are identified by hashing their ``image_path``.
    """

    def __init__(self, model: VisualModel, store: VisualStore, batch_size: int = 64):
        if store.dim != model.visual_cfg.visual_dim:
            raise DataError(
                str(model.visual_paths["region_features"]),
                f"features of size {store.dim}, but the model was trained on size {model.visual_cfg.visual_dim}",
            )
        self.model = model
        self.store = store
        self.batch_size = batch_size
        self.counts: Counter = Counter()

    def predict(self, tweets: pa.Table, regions: pa.Table | None = None) -> pa.Table:
        if regions is not None:
            self._check_candidates(regions)
        visuals, self.counts = self.store.lookup_table(_with_image_identity(tweets))
        unusable = self.counts["only_none"] - self.counts["no_image"]
        if unusable:  # images that exist but have no usable candidates: a pipeline gap, not text-only tweets
            log.warning("%d of %d tweets have an image but no usable candidates: %s",
                        unusable, len(visuals), dict(self.counts))
        entities = self.model.predict_entities(tweets.column("tokens").to_pylist(), visuals, self.batch_size)
        return pa.table({"tweet_id": tweets.column("tweet_id"), "entities": entities}, schema=schema.PREDICTIONS)

    def _check_candidates(self, regions: pa.Table) -> None:
        """Region indices point into the store's candidates: the evaluator's regions must be the same."""
        for sha, boxes in zip(regions.column("image_sha256").to_pylist(), regions.column("boxes").to_pylist()):
            mine, theirs = self.store.boxes.get(sha), np.asarray(boxes, np.float32).reshape(-1, 4)
            if mine is None or mine.shape != theirs.shape or not np.allclose(theirs, mine):
                raise DataError(
                    f"regions image {sha}",
                    f"candidates differ from those of {self.model.visual_paths['regions']}, "
                    "which the model's features describe",
                )


def _with_image_identity(tweets: pa.Table) -> pa.Table:
    """``tweets`` with image_sha256 / width / height, read from ``image_path`` when the table lacks them."""
    if {"image_sha256", "width", "height"} <= set(tweets.column_names):
        return tweets
    infos = [None if path is None else image_info(path) for path in tweets.column("image_path").to_pylist()]
    columns = {"image_sha256": pa.string(), "width": pa.int32(), "height": pa.int32()}
    for i, (name, kind) in enumerate(columns.items()):
        tweets = tweets.append_column(name, pa.array([info and info[i] for info in infos], kind))
    return tweets


def load_visual_predictor(cls: type, model_dir: str | Path, device: torch.device,
                          store: VisualStore | None = None) -> VisualPredictor:
    """The predictor of a saved ``cls`` model, reading ``store``, or else the tables its ``visual_paths`` name."""
    model = cls.load(model_dir, device)
    return VisualPredictor(model, model.read_store() if store is None else store)
