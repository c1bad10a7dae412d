"""The model of the ``pretrain`` stage: vision-to-text alignment learned before GMNER fine-tuning.

Text side: the ``train`` text encoder (built the same way, so its vocabulary is the fine-tuning's), words
represented by their first subword as in gmner.models.tagger; a tweet is the mean of its word states, an entity
the mean of its words' states. Visual side: embeddings standardised per dimension (gmner.models.visual_store), the
candidate regions carried into the text space by VTC's shared-private connector (gmner.models.connector) - the
*objects* - and the whole image by a linear projection.

Objectives (gmner.pretrain.objectives), each switched by :class:`PretrainConfig`; the loss is their weighted sum:

- ``gate``: DLRAM's relevance gate ``alpha = sigmoid(W [v; t] + b)``, trained by binary cross-entropy
  against the synthesize stage's verdict on the original image. ``alpha.detach()`` weights ``tia`` and
  ``eoa`` per image (multiplying a loss by a learned alpha would only teach it to close);
- ``tia``: gold-object regions masked and recovered from the text; with ``t2i`` an image the synthesize
  stage judged irrelevant is replaced by the image generated from the tweet, as target and as the global
  image everywhere;
- ``eoa``: each entity span against its gold object among ``negatives - 1`` far regions; with ``t2i`` an
  entity absent from the image aligns with its generated entity image (carried in by the connector as an
  object covering its whole image);
- ``global`` and ``local`` (``sgla``): VTC's tweet-image and entity-set / object-set terms, the local term
  of each pair weighted by the pair's global relevance with ``coupling``;
- ``balance``: the connector's load-balancing term (when its MoE branch is on).

The weights that move during training (alpha while the gate learns, the coupling's relevance while the
global term does) move the weighted losses too, so ``unweighted`` reports tia, eoa and local before them.

A tweet without image features contributes no image term at all (its entities included). Every contrastive
term is a :class:`gmner.models.losses.InfoNCE`, one instance per objective: TIA compares predicted with true
region features, EOA spans with objects, SGLA tweets with images, and each of these similarity spaces learns
its own temperature.

The checkpoint (models/pretrain): encoder/ (weights and tokenizer), heads.safetensors (every other weight)
and pretrain.json (see gmner.pretrain.checkpoint, which also holds the config).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gmner.models.connector import SharedPrivateConnector
from gmner.models.losses import InfoNCE
from gmner.models.tagger import WordTagger, load_non_encoder_weights, save_with_encoder
from gmner.models.text_encoder import load_text_encoder
from gmner.models.visual_projection import FeatureStandardiser
from gmner.models.visual_store import GEOMETRY
from gmner.pretrain.checkpoint import CONFIG_FILE, HEADS_FILE, KIND, PretrainConfig, read_checkpoint
from gmner.pretrain.objectives import (
    RelevanceGate,
    TextImageReflection,
    entity_object_loss,
    entity_object_sets,
    global_local_loss,
    reflection_mask,
)


class AlignmentLosses(NamedTuple):
    components: dict[str, torch.Tensor]  # each enabled component's loss, what ``total`` sums
    counts: Counter  # entities by EOA positive, images with a TIA target, tweets without image, ...
    unweighted: dict[str, float]  # tia / eoa before the gate's alpha, local before the coupling (when on)


def alpha_mean(rows: torch.Tensor, alpha: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The sum of ``rows`` weighted by ``alpha``, over the number of rows kept (0 when none is)."""
    return (rows * alpha).sum() / keep.sum().clamp(min=1)


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, L, H) states averaged over the L positions where ``mask`` (N, L); zeros for an empty row."""
    weight = mask[..., None].to(states.dtype)
    return (states * weight).sum(1) / weight.sum(1).clamp(min=1)


class AlignmentModel(WordTagger):
    """The pre-training model. A ``WordTagger`` for its word alignment and batching (``encode``,
    ``collate``); it tags nothing, its label set is just "O"."""

    def __init__(self, encoder: nn.Module, tokenizer, cfg: PretrainConfig, max_length: int = 128,
                 encoder_spec: dict | None = None):
        super().__init__(encoder, tokenizer, ["O"], max_length)
        self.cfg = cfg
        self.encoder_spec = dict(encoder_spec or {})  # the `train` encoder params it was built from
        text_dim = encoder.config.hidden_size
        self.visual = FeatureStandardiser(cfg.visual_dim)
        self.connector = SharedPrivateConnector(cfg.connector_config(text_dim))
        self.image = nn.Linear(cfg.visual_dim, text_dim) if cfg.sgla else None  # the global image, in text space
        self.gate = RelevanceGate(cfg.visual_dim, text_dim) if cfg.gate else None
        self.reflection = (
            TextImageReflection(text_dim, cfg.visual_dim, cfg.reflection_hidden, cfg.reflection_heads)
            if cfg.tia else None
        )
        terms = {"tia": cfg.tia, "eoa": cfg.eoa, "sgla": cfg.sgla}
        self.nce = nn.ModuleDict({name: InfoNCE(cfg.temperature) for name, on in terms.items() if on})

    # --- objectives ----------------------------------------------------------------------------------------

    def losses(self, batch: dict, rng: np.random.Generator) -> AlignmentLosses:
        """The losses of a batch of gmner.training.pretrain.AlignmentSet; ``rng`` draws the EOA negatives."""
        cfg = self.cfg
        hidden = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        rows = torch.arange(len(hidden), device=hidden.device)[:, None]
        words = hidden[rows, batch["word_pos"]]
        text = masked_mean(words, batch["word_mask"])
        spans = masked_mean(words[batch["span_tweet"][:, None], batch["span_words"]], batch["span_word_mask"])

        has_image = batch["image_mask"]
        verdict = batch["relevant_mask"] & has_image
        substitute = cfg.t2i & verdict & ~batch["relevant"] & batch["generated_mask"]
        image = torch.where(
            substitute[:, None],
            self.visual.standardise(batch["generated_features"], "image"),
            self.visual.standardise(batch["image_features"], "image"),
        )
        regions = self.visual.standardise(batch["region_features"], "region")
        out: dict[str, torch.Tensor] = {}
        unweighted: dict[str, float] = {}
        counts = Counter(tweets=len(hidden), no_image=int((~has_image).sum()),
                         images_generated=int(substitute.sum()))
        alpha = torch.ones(len(hidden), device=hidden.device)
        if self.gate is not None:
            gate = self.gate(image, text)
            labelled = verdict & ~substitute  # the verdict is on the original image
            out["gate"] = (F.binary_cross_entropy(gate[labelled], batch["relevant"][labelled].float())
                           if labelled.any() else gate.sum() * 0)
            alpha = gate.detach()
        if cfg.uses_objects:
            objects, balance, _ = self.connector(regions, batch["region_geometry"], batch["region_mask"])
            if cfg.connector["moe"]:
                out["balance"] = balance
        if self.reflection is not None:
            masked = reflection_mask(batch["candidates"], batch["image_gold"], batch["region_mask"])
            target = masked.any(dim=1) | substitute
            counts["tia_masked_regions"] += int(masked.sum())
            counts["tia_images"] += int(target.sum())
            per_image, unweighted["tia"] = self.reflection(
                self.nce["tia"], hidden, batch["attention_mask"].bool(), regions, batch["region_geometry"],
                batch["region_mask"], masked, torch.ones_like(alpha),
                self.visual.standardise(batch["generated_features"], "image"), batch["generated_mask"], substitute,
            )
            out["tia"] = alpha_mean(per_image, alpha, target)
        if cfg.eoa:
            rows, row_alpha, row_mask = self._entity_object(batch, spans, objects, alpha, rng, counts)
            out["eoa"] = alpha_mean(rows, row_alpha, row_mask)
            unweighted["eoa"] = alpha_mean(rows, 1.0, row_mask)
        if cfg.sgla:
            entities = spans.new_zeros(len(hidden), int(batch["span_slot"].max()) + 1 if len(spans) else 0,
                                       spans.shape[-1])
            entity_mask = torch.zeros(entities.shape[:2], dtype=torch.bool, device=spans.device)
            entities[batch["span_tweet"], batch["span_slot"]] = spans
            entity_mask[batch["span_tweet"], batch["span_slot"]] = True
            args = (self.nce["sgla"], self.image(image), text, entities, entity_mask, objects, batch["region_mask"])
            terms = global_local_loss(*args, cfg.coupling, pair_mask=has_image)
            out["global"], out["local"] = terms["global"], terms["local"]
            if cfg.coupling:
                with torch.no_grad():
                    unweighted["local"] = global_local_loss(*args, False, pair_mask=has_image)["local"]
        if self.gate is None:
            unweighted = {name: value for name, value in unweighted.items() if name not in ("tia", "eoa")}
        return AlignmentLosses(out, counts, {name: value.item() for name, value in unweighted.items()})

    def _entity_object(self, batch: dict, spans: torch.Tensor, objects: torch.Tensor, alpha: torch.Tensor,
                       rng: np.random.Generator, counts: Counter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """EOA loss of each entity whose tweet has an image, its tweet's alpha and whether it has a positive."""
        keep = batch["image_mask"][batch["span_tweet"]]
        counts["entities_without_image"] += int((~keep).sum())
        index = keep.nonzero()[:, 0]
        tweet = batch["span_tweet"][index]
        generated = generated_mask = None
        if self.cfg.t2i:
            # A generated entity image is an object covering its whole image.
            features = self.visual.standardise(batch["entity_image_features"][index], "image")[:, None]
            whole = features.new_tensor([0.0, 0.0, 1.0, 1.0, 1.0]).expand(len(index), 1, len(GEOMETRY))
            generated_mask = batch["entity_image_mask"][index]
            generated = self.connector(features, whole, generated_mask[:, None]).regions[:, 0]
        sets = entity_object_sets(
            tweet.tolist(), [batch["span_boxes"][i] for i in index.tolist()], batch["candidates"], objects,
            batch["region_mask"], rng, generated, generated_mask, self.cfg.t2i, self.cfg.negatives,
        )
        counts.update(sets.counts)
        rows = entity_object_loss(self.nce["eoa"], spans[index], sets.positives, sets.negatives,
                                  sets.negative_mask, sets.row_mask, reduction="none")
        return rows, alpha[tweet], sets.row_mask

    def total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of the components."""
        return sum(self.cfg.weights[name] * value for name, value in losses.items())

    def set_feature_statistics(self, stats: dict[str, np.ndarray]) -> None:
        self.visual.set_feature_statistics(stats)

    # --- checkpoint ----------------------------------------------------------------------------------------

    def config(self) -> dict:
        """What pretrain.json holds."""
        return {"kind": KIND, "config": asdict(self.cfg), "max_length": self.max_length,
                "text_dim": self.encoder.config.hidden_size, "encoder": self.encoder_spec}

    def save(self, model_dir: str | Path) -> None:
        """encoder/ (weights and tokenizer), heads.safetensors (everything else) and pretrain.json."""
        save_with_encoder(self, model_dir, HEADS_FILE, CONFIG_FILE, self.config())

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device = "cpu") -> "AlignmentModel":

        checkpoint = read_checkpoint(model_dir)
        encoder, tokenizer = load_text_encoder(str(checkpoint.encoder_dir), tiny={})
        model = cls(encoder, tokenizer, checkpoint.config, checkpoint.max_length, checkpoint.encoder)
        load_non_encoder_weights(model, checkpoint.path / HEADS_FILE)
        return model.to(device).eval()
