"""Alignment objectives of the pre-training stage (DLRAM and VTC), each a plain function or module.

DLRAM (dual-level, relevance-aware alignment):

- the relevance gate ``alpha = sigmoid(W [v; t] + b)`` of its Eq. 1 (:class:`RelevanceGate`), whose detached
  output weights each tweet's text-image reflection term (Eq. 3);
- text-image reflection (TIA, Eq. 2) is :meth:`gmner.models.losses.InfoNCE.against_pool`: the tweet against
  its image over the batch's masked images, put together by gmner.pretrain.model;
- entity-object alignment (EOA, Eq. 4): each entity span against the detector region of its gold object,
  with negatives far from every gold box (IoU < 0.5) of its own image topped up with regions of other
  images; an entity absent from the image may take its generated entity image as positive
  (:func:`entity_object_sets`, :func:`entity_object_loss`).

VTC (synergistic global-local alignment): the global image-text term and the local entity-object term
of each pair, the local one coupled to the pair's global relevance (:func:`global_local_loss`,
:func:`pair_relevance`). The abstract says only that global image-text consistency "adaptively weights"
the local term; the weight here is a function of the pair alone, ``sigmoid(s * cos(image_i, text_i))``
with the global InfoNCE's learned scale ``s``: a softmax over the batch (the weight before) is about 1/B
at the start, so the local term's weight would depend on the batch size.

Every contrastive term goes through :class:`gmner.models.losses.InfoNCE`. Missing features are masked out,
never zero-filled as if real.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gmner.core.boxes import iou_matrix
from gmner.models.losses import InfoNCE


class RelevanceGate(nn.Module):
    """``alpha`` (B,) in (0, 1) from the global image feature (B, visual_dim) and text feature (B, text_dim).

    A loss multiplied by ``alpha`` alone would push ``alpha`` to 0: train the gate against the synthesize
    stage's relevance label (``F.binary_cross_entropy(alpha, relevant)``) or pass ``alpha.detach()``.
    """

    def __init__(self, visual_dim: int, text_dim: int):
        super().__init__()
        self.linear = nn.Linear(visual_dim + text_dim, 1)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(torch.cat([image, text], dim=-1))).squeeze(-1)


def sample_negatives(
    candidates: np.ndarray,
    gold_boxes: np.ndarray,
    n: int,
    rng: np.random.Generator,
    valid: np.ndarray | None = None,
    threshold: float = 0.5,
) -> np.ndarray:
    """Sorted indices of at most ``n`` distinct ``valid`` candidates (K, 4) whose IoU with every gold box
    (G, 4) is strictly below ``threshold``, drawn with ``rng``; empty when none qualifies."""
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    candidates = np.asarray(candidates, dtype=np.float64).reshape(-1, 4)
    gold_boxes = np.asarray(gold_boxes, dtype=np.float64).reshape(-1, 4)
    ok = np.ones(len(candidates), bool) if valid is None else np.asarray(valid, dtype=bool).copy()
    if ok.shape != (len(candidates),):
        raise ValueError(f"valid has shape {ok.shape}, expected ({len(candidates)},)")
    if len(candidates) and len(gold_boxes):
        ok &= iou_matrix(candidates, gold_boxes).max(axis=1) < threshold
    pool = np.flatnonzero(ok)
    return np.sort(rng.choice(pool, size=min(n, len(pool)), replace=False)).astype(np.int64)


@dataclass
class EntityObjectSets:
    """Keys of the EOA loss for S entities: ``positives`` (S, d), ``negatives`` (S, N-1, d) with
    ``negative_mask`` (S, N-1); ``row_mask`` (S,) is False for an entity without a positive. ``counts``:
    entities, positive_region, positive_generated, absent (no gold box), uncovered (gold box, no candidate
    above the threshold), left_out, short_negatives (fewer than N-1 negatives available)."""

    positives: torch.Tensor
    negatives: torch.Tensor
    negative_mask: torch.Tensor
    row_mask: torch.Tensor
    counts: Counter = field(default_factory=Counter)


def entity_object_sets(
    entity_image: Sequence[int],
    entity_boxes: Sequence[np.ndarray],
    candidates: Sequence[np.ndarray],
    region_features: torch.Tensor,
    region_mask: torch.Tensor,
    rng: np.random.Generator,
    generated: torch.Tensor | None = None,
    generated_mask: torch.Tensor | None = None,
    use_generated: bool = True,
    num_keys: int = 16,
    threshold: float = 0.5,
) -> EntityObjectSets:
    """EOA keys of a batch: entity ``s`` belongs to image ``entity_image[s]`` and has gold boxes
    ``entity_boxes[s]`` (G, 4), possibly none; image ``b`` has ``candidates[b]`` (K_b, 4) whose features
    are ``region_features[b, :K_b]`` (B, K, d), usable where ``region_mask`` (B, K).

    The positive is the valid candidate with the best IoU (> ``threshold``) with a gold box; failing that,
    with ``use_generated``, the entity's generated image embedding ``generated[s]`` (S, d) where
    ``generated_mask`` (S,); otherwise the entity is left out. Negatives: own-image candidates from
    :func:`sample_negatives`, topped up to ``num_keys - 1`` with valid regions of the other images.
    """
    if num_keys < 2:
        raise ValueError(f"num_keys must be at least 2 (a positive and a negative), got {num_keys}")
    b, k, d = region_features.shape
    s = len(entity_image)
    if len(entity_boxes) != s or len(candidates) != b:
        raise ValueError(f"{s} entities with {len(entity_boxes)} box sets; {b} images with {len(candidates)}")
    valid = region_mask.bool().cpu().numpy()
    flat_valid = np.flatnonzero(valid.reshape(-1))  # flat index = image * k + candidate
    has_generated = np.zeros(s, bool)
    if generated is not None:
        has_generated[:] = True if generated_mask is None else generated_mask.bool().cpu().numpy()
    none = b * k  # index of a zero row appended below: the key of nothing, always masked
    positive = np.full(s, none, dtype=np.int64)
    negative = np.full((s, num_keys - 1), none, dtype=np.int64)
    from_generated = np.zeros(s, bool)
    counts = Counter(entities=s)
    for i, (image, gold) in enumerate(zip(entity_image, entity_boxes)):
        if not 0 <= image < b:
            raise ValueError(f"entity {i}: image index {image} outside the batch of {b}")
        boxes = np.asarray(candidates[image], dtype=np.float64).reshape(-1, 4)
        gold = np.asarray(gold, dtype=np.float64).reshape(-1, 4)
        if len(boxes) > k:
            raise ValueError(f"image {image}: {len(boxes)} candidates but {k} feature slots")
        ok = valid[image, : len(boxes)]
        if len(boxes) and len(gold):
            iou = np.where(ok, iou_matrix(boxes, gold).max(axis=1), 0.0)
            if iou.max() > threshold:
                positive[i] = image * k + iou.argmax()
        if positive[i] == none:
            counts["uncovered" if len(gold) else "absent"] += 1
            if not (use_generated and has_generated[i]):
                counts["left_out"] += 1
                continue
            from_generated[i] = True
        counts["positive_generated" if from_generated[i] else "positive_region"] += 1
        own = image * k + sample_negatives(boxes, gold, num_keys - 1, rng, ok, threshold)
        others = flat_valid[flat_valid // k != image]
        extra = rng.choice(others, size=min(num_keys - 1 - len(own), len(others)), replace=False)
        chosen = np.concatenate([own, np.sort(extra)])
        negative[i, : len(chosen)] = chosen
        if len(chosen) < num_keys - 1:
            counts["short_negatives"] += 1
    device = region_features.device
    flat = torch.cat([region_features.reshape(b * k, d), region_features.new_zeros(1, d)])
    positives = flat[torch.from_numpy(positive).to(device)]
    use = torch.from_numpy(from_generated).to(device)
    if generated is not None:
        positives = torch.where(use[:, None], generated, positives)
    negative_t = torch.from_numpy(negative).to(device)
    row_mask = torch.from_numpy(positive != none).to(device) | use
    return EntityObjectSets(positives, flat[negative_t], negative_t != none, row_mask, counts)


def entity_object_loss(
    nce: InfoNCE,
    spans: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    negative_mask: torch.Tensor,
    row_mask: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """EOA: each span (S, d) against its positive (S, d) and negatives (S, N-1, d), positive first."""
    keys = torch.cat([positives[:, None], negatives], dim=1)
    key_mask = torch.cat([negative_mask.new_ones(len(spans), 1), negative_mask.bool()], dim=1)
    return nce.candidates(spans, keys, key_mask, row_mask, reduction)


def pair_relevance(nce: InfoNCE, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The detached global relevance (B,) of each pair (image_i, text_i): ``sigmoid(s * cos(image_i, text_i))``
    with ``nce``'s learned scale s = 1 / temperature. It reads the pair only, so its weight is the same in a
    batch of any size; cosine 0 (no alignment) gives 1/2, and as the global term sharpens s, aligned pairs
    tend to 1 and misaligned ones to 0."""
    with torch.no_grad():
        return torch.sigmoid(nce.scale * F.cosine_similarity(image, text, dim=-1))


def global_local_loss(
    nce: InfoNCE,
    image: torch.Tensor,
    text: torch.Tensor,
    entities: torch.Tensor,
    entity_mask: torch.Tensor,
    objects: torch.Tensor,
    object_mask: torch.Tensor,
    coupling: bool = True,
    pair_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """VTC SGLA over B pairs; ``pair_mask`` (B,) drops pairs (e.g. without an image feature).

    global: symmetric ``nce.pairwise(image, text)``. local: each entity of tweet i (entities (B, E, d),
    entity_mask) picks its most similar object of image i (objects (B, K, d), object_mask); the mean of
    the unit entity vectors and the mean of their matched objects form pair i's local pair, contrasted by
    ``nce.pairwise`` against the other pairs' (pairs without entities or objects are left out).
    relevance r_i: :func:`pair_relevance` (0 for a dropped pair). With ``coupling`` pair i's local loss is
    multiplied by r_i, so r_i = 0 contributes exactly zero; ``local`` is the sum over pairs divided by the
    number of pairs with a local term. ``local_pairs`` (B,) holds each pair's (weighted) local loss.
    """
    n = len(image)
    keep = torch.ones(n, dtype=torch.bool, device=image.device) if pair_mask is None else pair_mask.bool()
    relevance = torch.where(keep, pair_relevance(nce, image, text), 0.0)
    entity_mask, object_mask = entity_mask.bool(), object_mask.bool()
    has_local = keep & entity_mask.any(dim=1) & object_mask.any(dim=1)
    local_pairs = image.new_zeros(n)
    if has_local.any():
        ents, objs = F.normalize(entities, dim=-1), F.normalize(objects, dim=-1)
        sim = torch.einsum("bed,bkd->bek", ents, objs).masked_fill(~object_mask[:, None, :], -2.0)
        best = sim.argmax(dim=-1)
        matched = objs.gather(1, best[..., None].expand(-1, -1, objs.shape[-1]))
        weight = entity_mask[..., None].float()
        count = weight.sum(dim=1).clamp(min=1)
        local_pairs = nce.pairwise(
            (ents * weight).sum(1) / count, (matched * weight).sum(1) / count, has_local, reduction="none"
        )
    if coupling:
        local_pairs = local_pairs * relevance
    return {
        "global": nce.pairwise(image, text, keep),
        "local": local_pairs.sum() / has_local.sum().clamp(min=1),
        "local_pairs": local_pairs,
        "relevance": relevance,
    }
