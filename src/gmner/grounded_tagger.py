"""The CRF tagger with grounding: for each entity span, a cross-modal head picks one of the image's detector
candidates or "none".

The text side is ``CRFTagger`` unchanged (same encoder, emissions and CRF). The head builds one key per
option of the image: a learned "none" key, the whole-image feature, and per candidate its projected
(standardised) embedding + box geometry + rank embedding (see gmner.grounding). A span's query (its type,
its place among the tweet's spans and, with ``span_words``, its first and last word states) attends over
those keys; the fused query then scores "none" and every candidate. Masked keys (padding, missing features,
switched-off inputs) get no attention and cannot be chosen; "none" is always available.

Training adds the grounding loss on GOLD spans (KL to IoU soft labels or cross-entropy on the best
candidate) to the CRF loss; prediction grounds the spans the CRF predicts.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from gmner import schema
from gmner.bio import spans as bio_spans
from gmner.errors import DataError
from gmner.grounding import (
    DEFAULT_PATHS,
    NONE,
    ImageVisual,
    VisualProjection,
    VisualStore,
    collate_visual,
    grounding_loss,
    soft_labels,
)
from gmner.images import image_info
from gmner.tagger import CRFTagger, EncodedTweet, length_batches

log = logging.getLogger(__name__)

SPAN_FEATURES = 4  # start / words, rank / spans, rank among spans of its type / their count, 1 / that count


@dataclass(frozen=True)
class GroundingConfig:
    visual_dim: int  # size of the region and image embeddings
    top_k: int = 16  # candidates per image, best first
    hidden: int = 64
    heads: int = 4
    regions: bool = True  # False: candidates are masked, so every entity is predicted "none"
    global_feature: bool = True  # False: the whole-image key is masked
    span_words: bool = False  # the span's first / last word states enter its query (else: type and place only)
    loss: str = "kl"  # kl: to IoU soft labels; ce: cross-entropy on the best candidate
    soft_label_threshold: float = 0.5  # candidates with IoU <= this get no target mass
    weight: float = 1.0  # of the grounding loss beside the CRF loss

    def __post_init__(self):
        if self.loss not in ("kl", "ce"):
            raise ValueError(f"grounding loss must be 'kl' or 'ce', got {self.loss!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden size {self.hidden} is not divisible by {self.heads} heads")


def span_features(spans: Sequence[tuple[int, int, str]], n_words: int) -> np.ndarray:
    """(S, SPAN_FEATURES) float32 for a tweet's spans sorted by start: where each sits in the tweet and
    among the spans of its type (drawn objects of one type are told apart by that order)."""
    out = np.zeros((len(spans), SPAN_FEATURES), np.float32)
    of_type = Counter(etype for _, _, etype in spans)
    seen: Counter = Counter()
    for j, (start, _, etype) in enumerate(spans):
        out[j] = (start / max(1, n_words), j / len(spans), seen[etype] / of_type[etype], 1 / of_type[etype])
        seen[etype] += 1
    return out


class GroundingHead(nn.Module):
    """Scores "none" and each candidate for a batch of spans: (S, 1 + K) logits, masked options very negative."""

    def __init__(self, text_dim: int, n_types: int, cfg: GroundingConfig, dropout: float):
        super().__init__()
        h = cfg.hidden
        self.cfg = cfg
        self.span = nn.Linear(2 * text_dim * cfg.span_words + SPAN_FEATURES, h)
        self.span_type = nn.Embedding(n_types, h)
        self.visual = VisualProjection(cfg.visual_dim, cfg.top_k, h)
        self.none = nn.Parameter(torch.randn(h) * 0.02)
        self.key_norm = nn.LayerNorm(h)
        self.attention = nn.MultiheadAttention(h, cfg.heads, dropout=dropout, batch_first=True)
        self.fused_norm = nn.LayerNorm(h)
        self.query = nn.Linear(h, h)

    def keys(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2 + K, h) keys [none, image, candidates...] and their (B, 2 + K) validity (True = usable)."""
        image, regions = self.visual(batch)
        image = image[:, None]
        none = self.none.expand(len(image), 1, -1)
        keys = self.key_norm(torch.cat([none, image, regions], dim=1))
        valid = torch.cat(
            [
                torch.ones_like(batch["image_mask"])[:, None],
                (batch["image_mask"] & self.cfg.global_feature)[:, None],
                batch["region_mask"] & self.cfg.regions,
            ],
            dim=1,
        )
        return keys, valid

    def forward(self, states: torch.Tensor, batch: dict) -> torch.Tensor:
        tweet = batch["span_tweet"]
        parts = [batch["span_features"]]
        if self.cfg.span_words:
            parts += [states[tweet, batch["span_first"]], states[tweet, batch["span_last"]]]
        query = self.span(torch.cat(parts, dim=-1)) + self.span_type(batch["span_type"])
        keys, valid = self.keys(batch)
        keys, valid = keys[tweet], valid[tweet]
        # key_padding_mask marks what to IGNORE, hence the negation of "valid".
        fused, _ = self.attention(query[:, None], keys, keys, key_padding_mask=~valid, need_weights=False)
        query = self.fused_norm(query + fused[:, 0])
        options = torch.cat([keys[:, :1], keys[:, 2:]], dim=1)  # "none" first, then the candidates
        usable = torch.cat([valid[:, :1], valid[:, 2:]], dim=1)
        logits = torch.einsum("sh,soh->so", self.query(query), options) / math.sqrt(self.cfg.hidden)
        return logits.masked_fill(~usable, torch.finfo(logits.dtype).min)


class GroundedModel:
    """What every grounded model family shares (mixed in before its tagger base): the grounding params and
    where prediction reads candidates and features, the entity types, the region target, and model.json."""

    grounding_config: type  # the dataclass of the model's grounding params

    def init_grounding(self, grounding, visual_paths: dict | None) -> None:
        self.grounding = grounding
        # Where prediction reads candidates and features (relative to the working directory).
        self.visual_paths = dict(visual_paths or DEFAULT_PATHS)
        self.types = sorted({label[2:] for label in self.labels if label != "O"})
        self.type_index = {t: i for i, t in enumerate(self.types)}

    def target(self, visual: ImageVisual, gold_boxes: np.ndarray) -> np.ndarray:
        """The training target over "none" + the image's candidates, for this model's switches."""
        valid = visual.valid & self.grounding.regions
        return soft_labels(visual.boxes, gold_boxes, valid, self.grounding.soft_label_threshold)

    def config(self) -> dict:
        return {**CRFTagger.config(self), "grounding": asdict(self.grounding), "visual_paths": self.visual_paths}

    @classmethod
    def from_config(cls, encoder: nn.Module, tokenizer, config: dict):
        return cls(
            encoder, tokenizer, config["labels"], config["max_length"], config["dropout"],
            grounding=cls.grounding_config(**config["grounding"]), visual_paths=config["visual_paths"],
        )


class GroundedTagger(GroundedModel, CRFTagger):
    """``CRFTagger`` + ``GroundingHead``; saved and loaded like it, with the head's config in model.json."""

    kind = "grounded_tagger"
    grounding_config = GroundingConfig

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer,
        labels: Sequence[str],
        max_length: int = 128,
        dropout: float = 0.1,
        *,
        grounding: GroundingConfig,
        visual_paths: dict | None = None,
    ):
        super().__init__(encoder, tokenizer, labels, max_length, dropout)
        self.init_grounding(grounding, visual_paths)
        self.head = GroundingHead(encoder.config.hidden_size, len(self.types), grounding, dropout)

    def span_batch(
        self,
        encoded: Sequence[EncodedTweet],
        spans: Sequence[Sequence[tuple[int, int, str]]],
        targets: Sequence[Sequence[np.ndarray]] | None = None,
        n_options: int = 1,
    ) -> tuple[dict, list[tuple[int, int]]]:
        """Span tensors for the head, and which (tweet, span) each row is.

        A span is located by its first and last words that have a first subword; a (gold) span with none
        is left out. ``targets`` (one per span, ``1 + k`` long) are padded to ``n_options``.
        """
        rows, kept = [], []
        for b, (e, tweet_spans) in enumerate(zip(encoded, spans)):
            position = {word: p for p, word in enumerate(e.word_idx)}
            ordered = sorted(range(len(tweet_spans)), key=lambda j: tweet_spans[j][:2])
            features = span_features([tweet_spans[j] for j in ordered], e.n_words)
            for j, feat in zip(ordered, features):
                start, end, etype = tweet_spans[j]
                inside = [position[w] for w in range(start, end) if w in position]
                if inside:
                    rows.append((b, inside[0], inside[-1], self.type_index[etype], feat))
                    kept.append((b, j))
        batch = {
            "span_tweet": torch.tensor([r[0] for r in rows], dtype=torch.long),
            "span_first": torch.tensor([r[1] for r in rows], dtype=torch.long),
            "span_last": torch.tensor([r[2] for r in rows], dtype=torch.long),
            "span_type": torch.tensor([r[3] for r in rows], dtype=torch.long),
            "span_features": torch.from_numpy(np.stack([r[4] for r in rows])) if rows
            else torch.zeros((0, SPAN_FEATURES)),
        }
        if targets is not None:
            padded = torch.zeros((len(kept), n_options))
            for row, (b, j) in enumerate(kept):
                padded[row, : len(targets[b][j])] = torch.from_numpy(targets[b][j])
            batch["span_target"] = padded
        return {k: v.to(self.device) for k, v in batch.items()}, kept

    def loss(self, batch: dict, states: torch.Tensor | None = None) -> torch.Tensor:
        """CRF loss + ``weight`` x grounding loss of the batch's gold spans (see gmner.grounding)."""
        states = self.word_states(batch) if states is None else states
        loss = super().loss(batch, states)
        if len(batch["span_tweet"]):
            logits = self.head(self.dropout(states), batch)
            loss = loss + self.grounding.weight * grounding_loss(logits, batch["span_target"], self.grounding.loss)
        return loss

    @torch.no_grad()
    def predict_entities(
        self, token_lists: Sequence[Sequence[str]], visuals: Sequence[ImageVisual], batch_size: int = 64
    ) -> list[list[dict]]:
        """Per tweet, schema.PREDICTED_ENTITY dicts: the CRF's spans, each with its chosen candidate
        (``region`` index and ``box``) or none."""
        was_training = self.training
        self.eval()
        encoded, _ = self.encode(token_lists)
        out: list[list[dict]] = [[] for _ in encoded]
        for chunk in length_batches(encoded, batch_size):
            batch = self.collate([encoded[i] for i in chunk])
            states = self.word_states(batch)
            spans = [
                [tuple(s) for s in bio_spans(self.word_tags(encoded[i], ids))]
                for i, ids in zip(chunk, self.decode(batch, states))
            ]
            batch.update(collate_visual([visuals[i] for i in chunk], self.grounding.visual_dim, self.device))
            span_inputs, kept = self.span_batch([encoded[i] for i in chunk], spans)
            batch.update(span_inputs)
            choices = self.head(states, batch).argmax(dim=-1).tolist() if kept else []
            chosen = {key: choice for key, choice in zip(kept, choices)}
            for b, i in enumerate(chunk):
                for j, (start, end, etype) in enumerate(spans[b]):
                    choice = chosen.get((b, j), NONE)
                    region = None if choice == NONE else choice - 1
                    box = None if region is None else visuals[i].boxes[region].tolist()
                    out[i].append({"start": start, "end": end, "type": etype, "region": region, "box": box})
        self.train(was_training)
        return out


class GroundedPredictor:
    """Tweets in, entities with regions out; candidates and features come from a ``VisualStore``.

    ``counts`` (after ``predict``) says how many tweets could only get "none" and why (no image, image not
    in the regions or features tables, no candidates). Tweets given without ``image_sha256`` (new tweets
    from `gmner predict`) are identified by hashing their ``image_path``.
    """

    def __init__(self, tagger: GroundedTagger, store: VisualStore, batch_size: int = 64):
        if store.dim != tagger.grounding.visual_dim:
            raise DataError(
                str(tagger.visual_paths["region_features"]),
                f"features of size {store.dim}, but the model was trained on size {tagger.grounding.visual_dim}",
            )
        self.tagger = tagger
        self.store = store
        self.batch_size = batch_size
        self.counts: Counter = Counter()

    def predict(self, tweets: pa.Table, regions: pa.Table | None = None) -> pa.Table:
        if regions is not None:
            self._check_candidates(regions)
        visuals, self.counts = self.store.lookup_table(_with_image_identity(tweets))
        unusable = self.counts["only_none"] - self.counts["no_image"]
        if unusable:  # images that exist but have no usable candidates: a pipeline gap, not text-only tweets
            log.warning("%d of %d tweets have an image but no usable candidates, so no region: %s",
                        unusable, len(visuals), dict(self.counts))
        entities = self.tagger.predict_entities(tweets.column("tokens").to_pylist(), visuals, self.batch_size)
        return pa.table({"tweet_id": tweets.column("tweet_id"), "entities": entities}, schema=schema.PREDICTIONS)

    def _check_candidates(self, regions: pa.Table) -> None:
        """Region indices point into the store's candidates: the evaluator's regions must be the same."""
        for sha, boxes in zip(regions.column("image_sha256").to_pylist(), regions.column("boxes").to_pylist()):
            mine, theirs = self.store.boxes.get(sha), np.asarray(boxes, np.float32).reshape(-1, 4)
            if mine is None or mine.shape != theirs.shape or not np.allclose(theirs, mine):
                raise DataError(
                    f"regions image {sha}",
                    f"candidates differ from those of {self.tagger.visual_paths['regions']}, "
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


def load_predictor(model_dir: str | Path, device: torch.device) -> GroundedPredictor:
    """The predictor of a saved grounded tagger, reading the tables its ``visual_paths`` name."""
    tagger = GroundedTagger.load(model_dir, device)
    return GroundedPredictor(tagger, VisualStore.read(tagger.visual_paths, tagger.grounding.top_k))
