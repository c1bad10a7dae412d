"""BGA-MNER: the CRF tagger with bidirectional generative alignment in CLIP feature space, and a cross-modal
interaction that reads real image features in training and features generated from the text at inference.

Two generation objectives over the matched ("entity-salient") parts of each tweet-image pair train the
generators:

- text2image: every word state ``h_w`` generates an object feature ``o_w`` in the (per-dimension
  standardised) CLIP image space; pooled over the kept words, with attention tilted by ``salience`` toward
  the gold entity words, they generate the mean of the kept region embeddings and (through one more linear
  map) the whole-image embedding;
- image2text: the whole image and every kept region generate a text-space vector; their mean generates the
  pooled text representation (the same pooling of ``h_w``) and, through one more linear map, the CLIP text
  embedding of the tweet (extras "text", with ``text_target``);
- cycle consistency between the two generators (``cycle``): text -> image -> text maps each word state
  through ``o_w`` back to the word-state space, image -> text -> image each region through the text space
  back to the region space; each is ``1 - cos`` to where it started (the word state a fixed target).

Each generation term is InfoNCE over the batch (gmner.models.losses), a cosine regression, or both
(``loss``); with the regression alone the image2text text target is a stop-gradient, since a trainable target
could collapse.

Inference (``inference: generated``, :class:`CrossModalInteraction`): the word states attend to visual
slots, and a per-channel gate adds what they read before the emissions and the CRF. In training a tweet
with an image reads its real slots (the whole image and its regions), except a ``generated_share`` of them
drawn per step; a tweet without one, and every tweet at inference, reads the slots text2image generates from
its own words (the imagined image and each word's object ``o_w``), so the image is never read at inference
and what the generators learned is used. The entity salience of that pooling comes from the model's own
spans: those of a first, text-only CRF pass (the same classifier and CRF on the unfused states), which its
own CRF loss trains beside the fused pass's. ``inference: text_only`` (the ablation) has no interaction:
the tagger is the text CRF trained with the generation terms as a regulariser.

What the abstract leaves open, and the choice here: where the generated features enter (word states attend to
them before the CRF, a gated residual); real or generated features in training (real where the image exists,
``generated_share`` of those generated); which generated features (the pooled imagined image and every word's
object); whether the interaction trains the generators (no: generated slots enter detached, so they stay
stand-ins for the real features, shaped by the generation and cycle terms only); the salience at inference
(a first text-only CRF pass); the cycle's form (cosine, both directions, through the existing generators).

The context sampler keeps only the matched parts of a pair. A word and a region match by the mean of the
two directions' cosines, ``(cos(o_w, r_k) + cos(h_w, g(r_k))) / 2``; a word is kept when its best region
passes the stage's threshold, a region when its best word does (the best-matching word and region of a pair
are always kept, so an image with regions is never dropped whole). Thresholds are scheduled over training
stages that start at given epochs: stage 1 typically keeps everything (-1), while the generators are still
random, and later stages keep less. ``ContextSampler.counts`` counts, per stage, the pairs, the words and
regions seen and kept, and the tweets left out for lack of an image.

Missing inputs are left out of the generation terms, never zero-filled: a tweet without image features is in
no generation term (as anchor or negative), one without candidates in no region term, one without a CLIP text
embedding in no text-feature term. A batch without any image adds no generation term and draws no random
numbers, and the heads are initialised from a fork of the random state, so with ``inference: text_only`` on
data without images training is step for step the text tagger's (same seed: same weights, same predictions).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gmner.core.bio import spans as bio_spans
from gmner.models.losses import InfoNCE
from gmner.models.predictor import TaggerPredictor
from gmner.models.tagger import CRFTagger
from gmner.models.visual_model import VisualModel
from gmner.models.visual_projection import FeatureStandardiser
from gmner.models.visual_store import ImageVisual, feature_statistics, switched_extras

log = logging.getLogger(__name__)

LOSSES = ("infonce", "cosine", "both")
INFERENCE = ("generated", "text_only")
KEEP_ALL = -1.0  # a threshold at or below the least cosine keeps every word and region
# text2image: image, regions; image2text: text, clip_text; cycle: both generators, each way round.
TERMS = ("image", "regions", "text", "clip_text", "cycle")


@dataclass(frozen=True)
class BGAConfig:
    visual_dim: int  # size of the CLIP image, region and text embeddings
    top_k: int = 16  # candidate regions per image, best first
    hidden: int = 128  # width of the generators' hidden layer
    loss: str = "infonce"  # infonce, cosine, or both
    temperature: float = 0.07  # InfoNCE's initial temperature (learned)
    t2i_weight: float = 0.1  # of the text2image terms beside the CRF loss
    i2t_weight: float = 0.1  # of the image2text terms
    salience: float = 2.0  # attention-logit bonus of gold entity words in the text pooling
    text_target: bool = True  # the tweet's CLIP text embedding is an image2text target
    stage_epochs: tuple[int, ...] = (1, 5, 9)  # first epoch of each sampler stage
    thresholds: tuple[float, ...] = (KEEP_ALL, 0.0, 0.2)  # per stage: least similarity kept
    cycle_weight: float = 0.1  # of the cycle-consistency term
    inference: str = "generated"  # generated: the interaction reads generated features; text_only: no interaction
    generated_share: float = 0.5  # of the training tweets with an image, read generated features (per step)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"bga loss must be one of {LOSSES}, got {self.loss!r}")
        if self.inference not in INFERENCE:
            raise ValueError(f"bga inference must be one of {INFERENCE}, got {self.inference!r}")
        if not 0 <= self.generated_share <= 1:
            raise ValueError(f"generated_share must be in [0, 1], got {self.generated_share}")
        # YAML and model.json give lists; the config is frozen and hashable.
        object.__setattr__(self, "stage_epochs", tuple(int(e) for e in self.stage_epochs))
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        check_schedule(self.stage_epochs, self.thresholds)

    @property
    def extras(self) -> tuple[str, ...]:
        """What TRAINING reads besides regions and images; prediction reads nothing visual."""
        return switched_extras(text=self.text_target)


def check_schedule(stage_epochs: Sequence[int], thresholds: Sequence[float]) -> None:
    if len(stage_epochs) != len(thresholds) or not stage_epochs:
        raise ValueError(f"sampler stages: {len(stage_epochs)} start epochs for {len(thresholds)} thresholds")
    if stage_epochs[0] != 1 or any(b <= a for a, b in zip(stage_epochs, stage_epochs[1:])):
        raise ValueError(f"sampler stage_epochs must start at 1 and increase, got {list(stage_epochs)}")


def matched(
    similarity: torch.Tensor, word_mask: torch.Tensor, region_mask: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which words (B, W) and regions (B, K) of each pair to keep, given their similarity (B, W, K).

    A word's score is its best similarity over the valid regions, a region's over the valid words; items
    scoring at least ``threshold`` are kept, and so is the best-scoring one of a pair with any valid item.
    A pair without valid regions keeps all its words (nothing to match them against).
    """
    pair = word_mask[:, :, None] & region_mask[:, None, :]
    scores = similarity.masked_fill(~pair, float("-inf"))
    word_score, region_score = scores.amax(dim=2), scores.amax(dim=1)
    if threshold <= KEEP_ALL:
        words, regions = word_mask.clone(), region_mask.clone()
    else:
        words, regions = word_mask & (word_score >= threshold), region_mask & (region_score >= threshold)
        words |= F.one_hot(word_score.argmax(dim=1), word_mask.shape[1]).bool() & word_mask
        regions |= F.one_hot(region_score.argmax(dim=1), region_mask.shape[1]).bool() & region_mask
    has_regions = region_mask.any(dim=1, keepdim=True)
    return torch.where(has_regions, words, word_mask), regions


class ContextSampler:
    """The stage schedule of ``matched`` thresholds and what each stage kept.

    ``epoch`` is set by the trainer (gmner.training.bga); ``counts`` maps ``stage_<n>`` to that stage's counts,
    updated in place: pairs (with regions), words and regions seen (``words`` / ``regions``) and kept
    (``words_kept`` / ``regions_kept``), ``no_image`` (tweets left out of every generation term), ``no_regions``
    (in the image terms only), and the mean generation loss of each term.
    """

    def __init__(self, stage_epochs: Sequence[int], thresholds: Sequence[float]):
        check_schedule(stage_epochs, thresholds)
        self.stage_epochs, self.thresholds = tuple(stage_epochs), tuple(thresholds)
        self.epoch = 1
        self.counts: dict[str, dict] = {}
        self._loss_sums: dict[tuple[str, str], list[float]] = {}

    @property
    def stage(self) -> int:
        return sum(start <= self.epoch for start in self.stage_epochs)

    @property
    def threshold(self) -> float:
        return self.thresholds[self.stage - 1]

    def stage_counts(self) -> dict:
        key = f"stage_{self.stage}"
        if key not in self.counts:
            if self.counts:
                log.info("context sampler, %s", ", ".join(f"{k}: {v}" for k, v in self.counts.items()))
            self.counts[key] = {"from_epoch": self.stage_epochs[self.stage - 1], "threshold": self.threshold,
                                "pairs": 0, "words": 0, "words_kept": 0, "regions": 0, "regions_kept": 0,
                                "no_image": 0, "no_regions": 0}
        return self.counts[key]

    def __call__(
        self, similarity: torch.Tensor, word_mask: torch.Tensor, region_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``matched`` at the current stage's threshold, counted over the pairs with regions."""
        words, regions = matched(similarity, word_mask, region_mask, self.threshold)
        counts, rows = self.stage_counts(), region_mask.any(dim=1)
        counts["pairs"] += int(rows.sum())
        counts["words"] += int(word_mask[rows].sum())
        counts["words_kept"] += int(words[rows].sum())
        counts["regions"] += int(region_mask.sum())
        counts["regions_kept"] += int(regions.sum())
        return words, regions

    def state_dict(self) -> dict:
        """What a resumed training run restores (the epoch is set again by the trainer)."""
        return {"counts": self.counts, "loss_sums": [[*key, *total] for key, total in self._loss_sums.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.counts.clear()  # in place: the trainer's summary holds this dict
        self.counts.update(state["counts"])
        self._loss_sums = {(stage, term): [total, n] for stage, term, total, n in state["loss_sums"]}

    def record_losses(self, losses: dict[str, torch.Tensor]) -> None:
        counts = self.stage_counts()
        for term, value in losses.items():
            total = self._loss_sums.setdefault((f"stage_{self.stage}", term), [0.0, 0])
            total[0] += float(value.detach())
            total[1] += 1
            counts[f"{term}_loss"] = round(total[0] / total[1], 4)


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, n_out))


def _reconstruction(generated: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cos`` of ``generated`` against ``target`` (..., D) where ``mask`` (...); 0 where none."""
    if not mask.any():
        return generated.new_zeros(())
    return (1 - F.cosine_similarity(generated[mask], target[mask], dim=-1)).mean()


class CrossModalInteraction(nn.Module):
    """Word states (B, W, H) attend to visual slots (B, S, d, standardised CLIP space; masked slots ignored,
    each tweet needs one); a per-channel gate of the state and what it read decides how much is added:
    ``LayerNorm(h + g * attend(h, V))``."""

    def __init__(self, visual_dim: int, text_dim: int, dropout: float):
        super().__init__()
        self.visual = nn.Sequential(nn.Linear(visual_dim, text_dim), nn.LayerNorm(text_dim))
        self.attention = nn.MultiheadAttention(text_dim, 1, dropout=dropout, batch_first=True)
        self.gate = nn.Linear(2 * text_dim, text_dim)
        self.norm = nn.LayerNorm(text_dim)

    def forward(self, states: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keys = self.visual(slots)
        # key_padding_mask marks what to IGNORE, hence the negation.
        read, _ = self.attention(states, keys, keys, key_padding_mask=~mask, need_weights=False)
        gate = torch.sigmoid(self.gate(torch.cat([states, read], dim=-1)))
        return self.norm(states + gate * read)


class GenerationHeads(FeatureStandardiser):
    """The generators and the text pooling they share; standardises the CLIP region, image and (its own
    addition) text embeddings. ``forward`` gives the training losses, ``generated_slots`` the inference
    path's visual inputs."""

    def __init__(self, text_dim: int, cfg: BGAConfig):
        super().__init__(cfg.visual_dim)
        d = cfg.visual_dim
        self.cfg = cfg
        self.register_buffer("text_mean", torch.zeros(d))
        self.register_buffer("text_std", torch.ones(d))
        self.pool = nn.Linear(text_dim, 1)
        self.text_to_object = _mlp(text_dim, cfg.hidden, d)  # per word, in region-embedding space
        self.object_to_image = nn.Linear(d, d)
        self.visual_to_text = _mlp(d, cfg.hidden, text_dim)  # per region or image, in word-state space
        self.text_to_clip = nn.Linear(text_dim, d)
        self.t2i_nce = InfoNCE(cfg.temperature)
        self.i2t_nce = InfoNCE(cfg.temperature)

    def forward(self, states: torch.Tensor, batch: dict, sampler: ContextSampler) -> dict[str, torch.Tensor]:
        """The generation losses (one scalar per TERMS) of the batch's pairs with an image (B, W, H states)."""
        has_image = batch["image_mask"] | batch["region_mask"].any(dim=1)
        counts = sampler.stage_counts()
        counts["no_image"] += int((~has_image).sum())
        counts["no_regions"] += int((has_image & ~batch["region_mask"].any(dim=1)).sum())
        zero = states.new_zeros(())
        if not has_image.any():
            return {term: zero for term in TERMS}
        rows = has_image.nonzero()[:, 0]
        h, word_mask = states[rows], batch["word_mask"][rows]
        entity = (batch["labels"][rows] > 0) & word_mask
        image = self.standardise(batch["image_features"][rows], "image")
        image_mask = batch["image_mask"][rows]
        regions = self.standardise(batch["region_features"][rows], "region")
        region_mask = batch["region_mask"][rows]

        objects = self.text_to_object(h)  # (n, W, d)
        region_text = self.visual_to_text(regions)  # (n, K, H)
        with torch.no_grad():
            similarity = 0.5 * (
                F.cosine_similarity(objects[:, :, None], regions[:, None], dim=-1)
                + F.cosine_similarity(h[:, :, None], region_text[:, None], dim=-1)
            )
        words, kept = sampler(similarity, word_mask, region_mask)

        attention = self.pooling(h, words, entity)
        text = (attention * h).sum(dim=1)  # (n, H)
        imagined = (attention * objects).sum(dim=1)  # (n, d)
        slots = torch.cat([self.visual_to_text(image)[:, None], region_text], dim=1)
        slot_mask = torch.cat([image_mask[:, None], kept], dim=1)
        generated_text = (slots * slot_mask[..., None]).sum(dim=1) / slot_mask.sum(dim=1, keepdim=True).clamp(min=1)
        kept_regions = (regions * kept[..., None]).sum(dim=1) / kept.sum(dim=1, keepdim=True).clamp(min=1)
        clip_text = self.standardise(batch["text_features"][rows], "text")
        text_mask = batch["text_mask"][rows] & self.cfg.text_target

        losses = {
            "image": self._term(self.t2i_nce, self.object_to_image(imagined), image, image_mask),
            "regions": self._term(self.t2i_nce, imagined, kept_regions, kept.any(dim=1)),
            "text": self._term(self.i2t_nce, generated_text, text, torch.ones_like(image_mask), detach=True),
            "clip_text": self._term(self.i2t_nce, self.text_to_clip(generated_text), clip_text, text_mask),
            "cycle": 0.5 * (_reconstruction(self.visual_to_text(objects), h.detach(), word_mask)
                            + _reconstruction(self.text_to_object(region_text), regions, region_mask)),
        }
        sampler.record_losses(losses)
        return losses

    def pooling(self, states: torch.Tensor, words: torch.Tensor, entity: torch.Tensor) -> torch.Tensor:
        """(B, W, 1) attention over the ``words`` (B, W) of ``states`` (B, W, H), tilted toward ``entity``."""
        logits = self.pool(states)[..., 0] + self.cfg.salience * entity
        return logits.masked_fill(~words, float("-inf")).softmax(dim=1)[..., None]

    def generated_slots(
        self, states: torch.Tensor, word_mask: torch.Tensor, entity: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """text2image's pseudo-visual slots of each tweet: (B, 1 + W, d) [the imagined image, each word's
        object] in the standardised CLIP space, salience toward ``entity`` (B, W), and their (B, 1 + W) mask."""
        objects = self.text_to_object(states)
        image = self.object_to_image((self.pooling(states, word_mask, entity) * objects).sum(dim=1))
        return torch.cat([image[:, None], objects], dim=1), torch.cat([word_mask[:, :1], word_mask], dim=1)

    def real_slots(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The real counterpart of ``generated_slots``: (B, 1 + K, d) [the image, its regions] and their mask."""
        image = self.standardise(batch["image_features"], "image")
        regions = self.standardise(batch["region_features"], "region")
        return (torch.cat([image[:, None], regions], dim=1),
                torch.cat([batch["image_mask"][:, None], batch["region_mask"]], dim=1))

    def _term(
        self, nce: InfoNCE, generated: torch.Tensor, target: torch.Tensor, rows: torch.Tensor, detach: bool = False
    ) -> torch.Tensor:
        """The loss of ``generated`` against ``target`` over ``rows``; ``detach``: a trainable target is fixed
        in the cosine regression (InfoNCE's negatives keep it from collapsing, the regression's do not)."""
        if not rows.any():
            return generated.new_zeros(())
        generated, target = generated[rows], target[rows]
        loss = generated.new_zeros(())
        if self.cfg.loss in ("infonce", "both"):
            loss = loss + nce.pairwise(generated, target)
        if self.cfg.loss in ("cosine", "both"):
            fixed = target.detach() if detach else target
            loss = loss + (1 - F.cosine_similarity(generated, fixed, dim=-1)).mean()
        return loss


class BGATagger(VisualModel, CRFTagger):
    """``CRFTagger`` + ``GenerationHeads`` + (``inference: generated``) ``CrossModalInteraction`` before the
    emissions; decoding never reads an image."""

    kind = "bga"
    visual_config = BGAConfig

    def build_visual(self, text_dim: int, dropout: float) -> None:
        cfg = self.visual_cfg
        self.generation = GenerationHeads(text_dim, cfg)
        self.sampler = ContextSampler(cfg.stage_epochs, cfg.thresholds)
        generated = cfg.inference == "generated"
        self.interaction = CrossModalInteraction(cfg.visual_dim, text_dim, dropout) if generated else None

    def fit_feature_statistics(self, visuals: Sequence[ImageVisual]) -> None:
        """Region and image statistics as gmner.models.visual_store computes them; the CLIP text embeddings alike."""
        dim = self.visual_cfg.visual_dim
        stats = feature_statistics(visuals, dim)
        texts = np.asarray([v.text for v in visuals if v.text is not None], np.float32).reshape(-1, dim)
        stats["text_mean"] = texts.mean(axis=0) if len(texts) else np.zeros(dim, np.float32)
        stats["text_std"] = np.maximum(texts.std(axis=0), 1e-6) if len(texts) > 1 else np.ones(dim, np.float32)
        self.generation.set_feature_statistics({k: v.astype(np.float32) for k, v in stats.items()})

    def generation_losses(self, batch: dict, states: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each generation term of a training batch (labelled, with visual inputs), unweighted."""
        return self.generation(self.word_states(batch) if states is None else states, batch, self.sampler)

    def predicted_entities(self, emissions: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """(B, W) bool: the words inside a span the CRF decodes from ``emissions``."""
        entity = torch.zeros_like(word_mask)
        for b, ids in enumerate(self.crf.decode(emissions.detach(), mask=word_mask)):
            entity[b, : len(ids)] = torch.tensor(ids, device=entity.device) > 0
        return entity

    def fused_states(self, batch: dict, states: torch.Tensor, text_emissions: torch.Tensor) -> torch.Tensor:
        """The word states after the interaction: with generated slots (salience from the spans of
        ``text_emissions``, the first pass), in training real ones for the tweets with an image that draw so."""
        word_mask = batch["word_mask"]
        generated, generated_mask = self.generation.generated_slots(
            states, word_mask, self.predicted_entities(text_emissions, word_mask))
        slots, mask = generated.detach(), generated_mask
        if self.training:  # only here does the model read the batch's image features
            real, real_mask = self.generation.real_slots(batch)
            use_real = real_mask.any(dim=1)
            if use_real.any():
                use_real &= torch.rand(len(use_real), device=use_real.device) >= self.visual_cfg.generated_share
            slots = torch.cat([real, slots], dim=1)
            mask = torch.cat([real_mask & use_real[:, None], generated_mask & ~use_real[:, None]], dim=1)
        return self.interaction(states, slots, mask)

    def emissions(self, batch: dict, states: torch.Tensor | None = None) -> torch.Tensor:
        """The fused states' emissions (the text tagger's with ``inference: text_only``)."""
        states = self.word_states(batch) if states is None else states
        text = super().emissions(batch, states)
        if self.interaction is None:
            return text
        return self.classifier(self.dropout(self.fused_states(batch, states, text)))

    def loss(self, batch: dict, states: torch.Tensor | None = None) -> torch.Tensor:
        """CRF loss of the text-only pass (+ of the fused pass) + the weighted generation and cycle terms (no
        generation term without images)."""
        states = self.word_states(batch) if states is None else states

        def crf_loss(emissions: torch.Tensor) -> torch.Tensor:
            return -self.crf(emissions, batch["labels"], mask=batch["word_mask"], reduction="mean")

        text = super().emissions(batch, states)
        loss = crf_loss(text)
        if self.interaction is not None:
            loss = loss + crf_loss(self.classifier(self.dropout(self.fused_states(batch, states, text))))
        terms = self.generation_losses(batch, states)
        cfg = self.visual_cfg
        return (loss + cfg.t2i_weight * (terms["image"] + terms["regions"])
                + cfg.i2t_weight * (terms["text"] + terms["clip_text"]) + cfg.cycle_weight * terms["cycle"])

    def predict_entities(
        self, token_lists: Sequence[Sequence[str]], visuals: Sequence[ImageVisual] | None = None,
        batch_size: int = 64,
    ) -> list[list[dict]]:
        """Per tweet, schema.PREDICTED_ENTITY dicts without region; ``visuals`` are accepted and ignored."""
        return [
            [{"start": s.start, "end": s.end, "type": s.type, "region": None, "box": None} for s in bio_spans(tags)]
            for tags in self.predict_tags(token_lists, batch_size)
        ]


def load_predictor(model_dir: str | Path, device: torch.device, store=None) -> TaggerPredictor:
    """A text-only predictor: BGA decodes without the image (from generated features, or from text alone),
    so no visual table (nor ``store``) is read."""
    return TaggerPredictor(BGATagger.load(model_dir, device))
