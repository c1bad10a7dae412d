"""The model of the ``pretrain`` stage: DLRAM's dual-level alignment (its Eqs. 1-5), with VTC's connector and
global-local terms as switchable extras, learned before GMNER fine-tuning.

Text side: the ``train`` text encoder (built the same way, so its vocabulary is the fine-tuning's). A tweet is
its first token's state t_CLS ([CLS]: the tiny WordPiece tokenizer and BERT put it first), an entity the mean
of its words' states, a word its first subword's (as in gmner.models.tagger). Visual side: embeddings
standardised per dimension (``visual``, gmner.models.visual_projection.FeatureStandardiser); the whole image
mapped into the text space by g_v (``image``), each candidate region by the object map: ``objects``, a linear
map (DLRAM), or VTC's shared-private ``connector`` (gmner.models.connector, geometry-aware, with a
load-balancing term).

Objectives (gmner.pretrain.objectives), each switched by :class:`PretrainConfig`; the loss is their weighted
sum (Eq. 5 with the extras added):

- ``gate``: DLRAM's relevance gate ``alpha = sigmoid(W [v; t_CLS] + b)`` (Eq. 1), trained by binary
  cross-entropy against the synthesize stage's verdict on the original image; ``alpha.detach()`` weights
  the reflection term only (a loss multiplied by a learned alpha would only teach it to close);
- ``tia``: text-image reflection (Eqs. 2-3): g_t(t_CLS) of each tweet with an image against its image
  g_v(v), over the batch's masked images (the image re-embedded with one of the tweet's gold boxes
  filled, data/features/masked.parquet); with ``t2i`` an image the synthesize stage judged irrelevant is
  replaced by the image generated from the tweet, here, in the gate and in the global term;
- ``eoa``: entity-object alignment (Eq. 4): each entity span against its gold object among ``negatives - 1``
  regions far from every gold box; with ``t2i`` an entity absent from the image aligns with its generated
  entity image, carried in by the same object map;
- ``global`` and ``local`` (``sgla``): VTC's tweet-image (the tweet as the mean of its word states) and
  entity-set / object-set terms, the local term of each pair weighted by the pair's global relevance with
  ``coupling`` (``sigmoid(s * cos)`` of the pair alone, so the weight does not depend on the batch size:
  gmner.pretrain.objectives.pair_relevance);
- ``balance``: the connector's load-balancing term (``objects: connector`` with its MoE branch).

The weights that move during training (alpha while the gate learns, the coupling's relevance while the
global term does) move the weighted losses too, so ``unweighted`` reports tia and local before them.

A tweet without image features contributes no image term at all (its entities included). Every contrastive
term is a :class:`gmner.models.losses.InfoNCE`, one instance per objective (tia, eoa, sgla), so that each
similarity space learns its own temperature.

The checkpoint (models/pretrain): encoder/ (weights and tokenizer), heads.safetensors (every other weight,
by the module prefixes gmner.pretrain.checkpoint lists) and pretrain.json (the config).
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
from gmner.pretrain.objectives import RelevanceGate, entity_object_loss, entity_object_sets, global_local_loss


class AlignmentLosses(NamedTuple):
    components: dict[str, torch.Tensor]  # each enabled component's loss, what ``total`` sums
    counts: Counter  # entities by EOA positive, TIA anchors and masked images, tweets without image, ...
    unweighted: dict[str, float]  # tia before the gate's alpha, local before the coupling (when on)


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, L, H) states averaged over the L positions where ``mask`` (N, L); zeros for an empty row."""
    weight = mask[..., None].to(states.dtype)
    return (states * weight).sum(1) / weight.sum(1).clamp(min=1)


class AlignmentModel(WordTagger):
    """The pre-training model. A ``WordTagger`` for its word alignment and batching (``encode``,
    ``collate``); it tags nothing, its label set is just "O". Only the modules its switches use exist."""

    def __init__(self, encoder: nn.Module, tokenizer, cfg: PretrainConfig, max_length: int = 128,
                 encoder_spec: dict | None = None):
        super().__init__(encoder, tokenizer, ["O"], max_length)
        self.cfg = cfg
        self.encoder_spec = dict(encoder_spec or {})  # the `train` encoder params it was built from
        text_dim = encoder.config.hidden_size
        self.visual = FeatureStandardiser(cfg.visual_dim)
        if cfg.uses_objects and cfg.objects == "connector":
            self.connector = SharedPrivateConnector(cfg.connector_config(text_dim))
        elif cfg.uses_objects:
            self.objects = nn.Linear(cfg.visual_dim, text_dim)
        if cfg.tia or cfg.sgla:
            self.image = nn.Linear(cfg.visual_dim, text_dim)  # g_v
        if cfg.tia:
            self.text_projection = nn.Linear(text_dim, text_dim)  # g_t
        self.gate = RelevanceGate(cfg.visual_dim, text_dim) if cfg.gate else None
        terms = {"tia": cfg.tia, "eoa": cfg.eoa, "sgla": cfg.sgla}
        self.nce = nn.ModuleDict({name: InfoNCE(cfg.temperature) for name, on in terms.items() if on})

    # --- objectives ----------------------------------------------------------------------------------------

    def losses(self, batch: dict, rng: np.random.Generator) -> AlignmentLosses:
        """The losses of a batch of gmner.training.pretrain.AlignmentSet; ``rng`` draws the EOA negatives."""
        cfg = self.cfg
        hidden = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        tweet_cls = hidden[:, 0]
        rows = torch.arange(len(hidden), device=hidden.device)[:, None]
        words = hidden[rows, batch["word_pos"]]
        spans = masked_mean(words[batch["span_tweet"][:, None], batch["span_words"]], batch["span_word_mask"])

        has_image = batch["image_mask"]
        verdict = batch["relevant_mask"] & has_image
        substitute = cfg.t2i & verdict & ~batch["relevant"] & batch["generated_mask"]
        image = torch.where(
            substitute[:, None],
            self.visual.standardise(batch["generated_features"], "image"),
            self.visual.standardise(batch["image_features"], "image"),
        )
        out: dict[str, torch.Tensor] = {}
        unweighted: dict[str, torch.Tensor] = {}
        counts = Counter(tweets=len(hidden), no_image=int((~has_image).sum()),
                         images_generated=int(substitute.sum()))
        alpha = torch.ones(len(hidden), device=hidden.device)
        if self.gate is not None:
            gate = self.gate(image, tweet_cls)
            labelled = verdict & ~substitute  # the verdict is on the original image
            out["gate"] = (F.binary_cross_entropy(gate[labelled], batch["relevant"][labelled].float())
                           if labelled.any() else gate.sum() * 0)
            alpha = gate.detach()
        if cfg.uses_objects:
            regions = self.visual.standardise(batch["region_features"], "region")
            objects, balance = self.object_map(regions, batch["region_geometry"], batch["region_mask"])
            if "balance" in cfg.components:
                out["balance"] = balance
        if cfg.tia:
            reflection, anchors = self._reflection(batch, tweet_cls, image, counts), has_image.sum().clamp(min=1)
            out["tia"] = (alpha * reflection).sum() / anchors  # Eq. 3, averaged over the anchors
            if self.gate is not None:
                unweighted["tia"] = reflection.sum() / anchors
        if cfg.eoa:
            out["eoa"] = self._entity_object(batch, spans, objects, rng, counts)
        if cfg.sgla:
            text = masked_mean(words, batch["word_mask"])
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
        return AlignmentLosses(out, counts, {name: value.item() for name, value in unweighted.items()})

    def object_map(self, features: torch.Tensor, geometry: torch.Tensor,
                   mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Standardised regions (B, K, visual_dim) with their geometry (B, K, 5) as objects in the text space
        (B, K, text_dim), zeros where ``mask`` (B, K) is False; and the connector's balance term (None for
        the linear map, which reads no geometry)."""
        if self.cfg.objects == "connector":
            out = self.connector(features, geometry, mask)
            return out.regions, out.balance
        return torch.where(mask[..., None], self.objects(features), 0.0), None

    def _reflection(self, batch: dict, tweet_cls: torch.Tensor, image: torch.Tensor,
                    counts: Counter) -> torch.Tensor:
        """Eq. 2 of each tweet (B,): g_t(t_CLS) against g_v of its image (the generated one when substituted)
        over the g_v of the batch's masked images; 0 for a tweet without image, and for all when the batch
        has no masked image."""
        pool = self.image(self.visual.standardise(batch["masked_features"], "image"))
        counts["tia_anchors"] += int(batch["image_mask"].sum())
        counts["tia_masked_images"] += len(pool)
        counts["tia_empty_pool_batches"] += not len(pool)
        return self.nce["tia"].against_pool(self.text_projection(tweet_cls), self.image(image), pool,
                                            batch["image_mask"], reduction="none")

    def _entity_object(self, batch: dict, spans: torch.Tensor, objects: torch.Tensor, rng: np.random.Generator,
                       counts: Counter) -> torch.Tensor:
        """The mean EOA loss of the entities whose tweet has an image and who have a positive."""
        keep = batch["image_mask"][batch["span_tweet"]]
        counts["entities_without_image"] += int((~keep).sum())
        index = keep.nonzero()[:, 0]
        generated = generated_mask = None
        if self.cfg.t2i:
            # A generated entity image is an object covering its whole image.
            features = self.visual.standardise(batch["entity_image_features"][index], "image")[:, None]
            whole = features.new_tensor([0.0, 0.0, 1.0, 1.0, 1.0]).expand(len(index), 1, len(GEOMETRY))
            generated_mask = batch["entity_image_mask"][index]
            generated = self.object_map(features, whole, generated_mask[:, None])[0][:, 0]
        sets = entity_object_sets(
            batch["span_tweet"][index].tolist(), [batch["span_boxes"][i] for i in index.tolist()],
            batch["candidates"], objects, batch["region_mask"], rng, generated, generated_mask, self.cfg.t2i,
            self.cfg.negatives,
        )
        counts.update(sets.counts)
        return entity_object_loss(self.nce["eoa"], spans[index], sets.positives, sets.negatives,
                                  sets.negative_mask, sets.row_mask)

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
