"""The CRF tagger with grounding: for each entity span, a cross-modal head picks one of the image's detector
candidates or "none".

The text side is ``CRFTagger`` unchanged (same encoder, emissions and CRF). The head builds one key per
option of the image: a learned "none" key, the whole-image feature, the feature of the image generated from
the tweet (``generated_image``), and per candidate its projected (standardised) embedding + box geometry +
rank embedding (see gmner.models.visual_store). With ``captions`` the image's caption is appended to the tweet's text.
A span's query (its type, its place among the tweet's spans and, with ``span_words``, its first and last
word states) attends over those keys; the fused query then scores "none" and every candidate. Masked keys
(padding, missing features, switched-off inputs) get no attention and cannot be chosen; "none" is always
available. With ``connector`` the candidates first pass through VTC's shared-private connector (the one the
pretrain stage trains, gmner.models.connector), whose load-balancing term joins the training loss.

VTC projects visual features "into the text feature space" for recognition as well as grounding: with
``connector`` and ``visual_tokens`` (:class:`VisualTokens`) the connector's region outputs are also prefix
tokens of the text encoder, ``[CLS] v_1 .. v_top_k w_1 .. w_n [SEP]`` as ``inputs_embeds``, so every encoder
layer lets the words attend to them and the CRF's emissions come from words that saw the image. Prefix tokens
rather than cross-attention because they add no layer inside the encoder: any hub encoder (and the pretrain
stage's) takes them unchanged, and the attention mask drops masked candidates exactly. There are always
``top_k`` slots (padding masked), so a tweet's word positions, shifted by ``top_k``, do not depend on its
batch. Without ``visual_tokens`` (the ablation) the connector feeds the grounding head only.

Training adds the grounding loss on GOLD spans (KL to IoU soft labels or cross-entropy on the best
candidate) to the CRF loss; prediction grounds the spans the CRF predicts.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from gmner.core.bio import spans as bio_spans
from gmner.models.connector import ConnectorConfig
from gmner.models.losses import grounding_loss, soft_labels
from gmner.models.tagger import CRFTagger, EncodedTweet, length_batches, predicting
from gmner.models.visual_model import VisualModel, VisualPredictor, load_visual_predictor
from gmner.models.visual_projection import VisualProjection
from gmner.models.visual_store import NONE, ImageVisual, feature_statistics, switched_extras

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
    captions: bool = False  # the image's caption is appended to the text input
    generated_image: bool = False  # the image generated from the tweet is a key
    # The connector's settings (gmner.models.connector.ConnectorConfig fields besides its two sizes, e.g. a pretrain
    # checkpoint's); None: candidates are projected linearly.
    connector: dict | None = field(default=None, hash=False)
    balance_weight: float = 0.01  # of the connector's load-balancing term beside the grounding loss
    visual_tokens: bool = False  # with a connector, its outputs are also prefix tokens of the text encoder

    def __post_init__(self):
        if self.loss not in ("kl", "ce"):
            raise ValueError(f"grounding loss must be 'kl' or 'ce', got {self.loss!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden size {self.hidden} is not divisible by {self.heads} heads")
        if self.connector is not None:
            self.connector_config(1)  # unknown or inconsistent settings fail here, not at the first batch

    def connector_config(self, text_dim: int) -> ConnectorConfig | None:
        """The connector from these visual features into a text space of ``text_dim``, if any."""
        if self.connector is None:
            return None
        return ConnectorConfig(visual_dim=self.visual_dim, text_dim=text_dim, **self.connector)

    @property
    def extras(self) -> tuple[str, ...]:
        return switched_extras(captions=self.captions, generated=self.generated_image)

    @property
    def reads_tokens(self) -> bool:
        """Whether the text encoder reads the connector's outputs (it needs a connector to have any)."""
        return self.visual_tokens and self.connector is not None


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
        self.visual = VisualProjection(cfg.visual_dim, cfg.top_k, h, cfg.connector_config(text_dim))
        self.none = nn.Parameter(torch.randn(h) * 0.02)
        self.key_norm = nn.LayerNorm(h)
        self.attention = nn.MultiheadAttention(h, cfg.heads, dropout=dropout, batch_first=True)
        self.fused_norm = nn.LayerNorm(h)
        self.query = nn.Linear(h, h)

    def keys(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3 + K, h) keys [none, image, generated image, candidates...] and their (B, 3 + K) validity
        (True = usable)."""
        return self._keys(batch)[:2]

    def _keys(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``keys``, and the connector's balance term."""
        image, generated, regions, balance = self.visual.project(batch)
        none = self.none.expand(len(image), 1, -1)
        keys = self.key_norm(torch.cat([none, image[:, None], generated[:, None], regions], dim=1))
        valid = torch.cat(
            [
                torch.ones_like(batch["image_mask"])[:, None],
                (batch["image_mask"] & self.cfg.global_feature)[:, None],
                (batch["generated_mask"] & self.cfg.generated_image)[:, None],
                batch["region_mask"] & self.cfg.regions,
            ],
            dim=1,
        )
        return keys, valid, balance

    def forward(self, states: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.scores(states, batch)[0]

    def scores(self, states: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The (S, 1 + K) logits of the batch's spans, and the connector's balance term."""
        tweet = batch["span_tweet"]
        parts = [batch["span_features"]]
        if self.cfg.span_words:
            parts += [states[tweet, batch["span_first"]], states[tweet, batch["span_last"]]]
        query = self.span(torch.cat(parts, dim=-1)) + self.span_type(batch["span_type"])
        keys, valid, balance = self._keys(batch)
        keys, valid = keys[tweet], valid[tweet]
        # key_padding_mask marks what to IGNORE, hence the negation of "valid".
        fused, _ = self.attention(query[:, None], keys, keys, key_padding_mask=~valid, need_weights=False)
        query = self.fused_norm(query + fused[:, 0])
        options = torch.cat([keys[:, :1], keys[:, 3:]], dim=1)  # "none" first, then the candidates
        usable = torch.cat([valid[:, :1], valid[:, 3:]], dim=1)
        logits = torch.einsum("sh,soh->so", self.query(query), options) / math.sqrt(self.cfg.hidden)
        return logits.masked_fill(~usable, torch.finfo(logits.dtype).min), balance


class VisualTokens(nn.Module):
    """The connector's region outputs (B, K, text_dim) as ``top_k`` prefix tokens in the encoder's input space.

    The connector is aligned with the encoder's OUTPUT states (pre-training compares it with word states), so
    a learned linear map carries it to the input embeddings; a slot embedding (the candidate's rank) tells
    the tokens apart, as position embeddings do the words. Slots past K are padding, masked.
    """

    def __init__(self, text_dim: int, top_k: int):
        super().__init__()
        self.project = nn.Linear(text_dim, text_dim)
        self.slot = nn.Embedding(top_k, text_dim)

    def forward(self, regions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, top_k, text_dim) tokens and their (B, top_k) mask (True = a real candidate)."""
        top_k = self.slot.num_embeddings
        regions, mask = regions[:, :top_k], mask[:, :top_k]
        tokens = self.project(regions) + self.slot.weight[: regions.shape[1]]
        pad = top_k - regions.shape[1]
        tokens = torch.cat([tokens, tokens.new_zeros(len(tokens), pad, tokens.shape[-1])], dim=1)
        return tokens, torch.cat([mask, mask.new_zeros(len(mask), pad)], dim=1)


class GroundedModel(VisualModel):
    """A visual model that also chooses a region per entity: its training target over the candidates."""

    def target(self, visual: ImageVisual, gold_boxes: np.ndarray) -> np.ndarray:
        """The training target over "none" + the image's candidates, for this model's switches."""
        valid = visual.valid & self.visual_cfg.regions
        return soft_labels(visual.boxes, gold_boxes, valid, self.visual_cfg.soft_label_threshold)

    def fit_feature_statistics(self, visuals: Sequence[ImageVisual]) -> None:
        self.visual_projection.set_feature_statistics(feature_statistics(visuals, self.visual_cfg.visual_dim))


class GroundedTagger(GroundedModel, CRFTagger):
    """``CRFTagger`` + ``GroundingHead``; saved and loaded like it, with the head's config in model.json."""

    kind = "grounded_tagger"
    visual_config = GroundingConfig

    def build_visual(self, text_dim: int, dropout: float) -> None:
        cfg = self.visual_cfg
        self.head = GroundingHead(text_dim, len(self.types), cfg, dropout)
        self.visual_tokens = VisualTokens(text_dim, cfg.top_k) if cfg.reads_tokens else None
        limit = getattr(self.encoder.config, "max_position_embeddings", None)
        if self.visual_tokens is not None and limit is not None and self.max_length + cfg.top_k > limit:
            raise ValueError(f"max_length {self.max_length} + {cfg.top_k} visual tokens exceed the encoder's "
                             f"{limit} positions")

    @property
    def visual_projection(self) -> VisualProjection:
        return self.head.visual

    def word_states(self, batch: dict) -> torch.Tensor:
        """Encoder states of each word's first subword (B, W, H); with visual tokens, the encoder reads
        ``[CLS]``, the tokens, then the text (see the module docstring)."""
        if self.visual_tokens is None:
            return super().word_states(batch)
        visual = self.head.visual
        regions = visual.connector(visual.standardise(batch["region_features"], "region"),
                                   batch["region_geometry"], batch["region_mask"]).regions
        tokens, token_mask = self.visual_tokens(regions, batch["region_mask"])
        text = self.encoder.get_input_embeddings()(batch["input_ids"])
        mask = batch["attention_mask"]
        hidden = self.encoder(
            inputs_embeds=torch.cat([text[:, :1], tokens, text[:, 1:]], dim=1),
            attention_mask=torch.cat([mask[:, :1], token_mask.to(mask.dtype), mask[:, 1:]], dim=1),
        ).last_hidden_state
        # Every position after [CLS] moves by the token count; a word-less tweet's dummy step stays on [CLS].
        positions = torch.where(batch["word_pos"] > 0, batch["word_pos"] + tokens.shape[1], 0)
        return hidden[torch.arange(len(hidden), device=hidden.device)[:, None], positions]

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
        return {k: v.to(self.collate_device) for k, v in batch.items()}, kept

    def loss(self, batch: dict, states: torch.Tensor | None = None) -> torch.Tensor:
        """CRF loss + ``weight`` x grounding loss of the batch's gold spans (see gmner.models.visual_store), + with a
        connector ``balance_weight`` x its load-balancing term."""
        cfg = self.visual_cfg
        states = self.word_states(batch) if states is None else states
        loss = super().loss(batch, states)
        if len(batch["span_tweet"]):
            logits, balance = self.head.scores(self.dropout(states), batch)
            loss = loss + cfg.weight * grounding_loss(logits, batch["span_target"], cfg.loss)
            loss = loss + cfg.balance_weight * balance
        return loss

    @predicting
    def predict_entities(
        self, token_lists: Sequence[Sequence[str]], visuals: Sequence[ImageVisual], batch_size: int = 64
    ) -> list[list[dict]]:
        """Per tweet, schema.PREDICTED_ENTITY dicts: the CRF's spans, each with its chosen candidate
        (``region`` index and ``box``) or none."""
        encoded, _ = self.encode(token_lists, self.contexts(visuals))
        out: list[list[dict]] = [[] for _ in encoded]
        for chunk in length_batches(encoded, batch_size):
            batch = self.collate_inputs([encoded[i] for i in chunk], [visuals[i] for i in chunk])
            states = self.word_states(batch)
            spans = [
                [tuple(s) for s in bio_spans(self.word_tags(encoded[i], ids))]
                for i, ids in zip(chunk, self.decode(batch, states))
            ]
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
        return out


def load_predictor(model_dir: str | Path, device: torch.device, store=None) -> VisualPredictor:
    return load_visual_predictor(GroundedTagger, model_dir, device, store)
