"""The models' losses, in one place: the region-grounding losses (IoU soft labels over "none" + K candidates,
KL or cross-entropy) and the one contrastive loss, InfoNCE over cosine similarities with a learnable
temperature.

Every contrastive term (VTC's global image-text and local entity-object terms, DLRAM's text-image reflection
and entity-object alignment, BGA-MNER's matching) goes through :class:`InfoNCE`. Three forms share the same
learned temperature over cosine similarities:

- ``pairwise(a, b)``: the symmetric CLIP form over a batch of N matched pairs (row i of ``a`` with row i
  of ``b``), the mean of the a->b and b->a cross-entropies;
- ``candidates(queries, keys, key_mask)``: each query against its own candidate set, the positive at index 0
  (negatives chosen by the caller, e.g. regions far from every gold box);
- ``against_pool(queries, positives, pool)``: DLRAM's reflection form (its Eq. 2), each query's positive over
  one key pool the batch shares, the positive itself not in the denominator.

``reduction="none"`` returns the loss of each row (pair or query) so callers can weight rows, e.g. by
image-text relevance; a masked-out row (``row_mask``) contributes exactly zero.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gmner.core.boxes import iou_matrix
from gmner.models.visual_store import NONE


def soft_labels(candidates: np.ndarray, gold_boxes: np.ndarray, valid: np.ndarray, threshold: float) -> np.ndarray:
    """Target distribution over ``1 + k`` options (``NONE`` first) for an entity with ``gold_boxes``.

    Each valid candidate whose best IoU with a gold box exceeds ``threshold`` gets mass proportional to that
    IoU; when none does (an ungroundable entity, no candidate covering it, or no valid candidate) all mass
    is on "none". Masked candidates never get mass, so the target is always reachable by a masked model.
    """
    k = len(candidates)
    target = np.zeros(1 + k, dtype=np.float32)
    if k and len(gold_boxes):
        iou = iou_matrix(candidates, gold_boxes).max(axis=1)
        iou = np.where(np.asarray(valid, dtype=bool) & (iou > threshold), iou, 0.0)
        if iou.any():
            target[1:] = iou / iou.sum()
            return target
    target[NONE] = 1.0
    return target


def grounding_loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean over spans of ``kl`` (KL divergence to the soft labels) or ``ce`` (cross-entropy on their best
    option). ``logits`` (S, 1 + K) hold a very negative finite value at masked options: finite, so that a
    zero target there contributes 0 and never 0 * inf."""
    if kind == "kl":
        return F.kl_div(F.log_softmax(logits, dim=-1), target, reduction="batchmean")
    if kind == "ce":
        return F.cross_entropy(logits, target.argmax(dim=-1))
    raise ValueError(f"grounding loss must be 'kl' or 'ce', got {kind!r}")


class InfoNCE(nn.Module):
    """Temperature ``tau`` is learned as ``log(1 / tau)`` (CLIP's parametrisation), clamped to at most
    ``max_scale`` so the logits cannot blow up early in training."""

    def __init__(self, temperature: float = 0.07, learnable: bool = True, max_scale: float = 100.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learnable)
        self.max_scale = max_scale

    @property
    def scale(self) -> torch.Tensor:
        """1 / temperature."""
        return self.log_scale.exp().clamp(max=self.max_scale)

    def pairwise(
        self, a: torch.Tensor, b: torch.Tensor, row_mask: torch.Tensor | None = None, reduction: str = "mean"
    ) -> torch.Tensor:
        """Symmetric InfoNCE of N pairs (``a``, ``b``: (N, d)); rows outside ``row_mask`` (N,) are neither
        anchors nor negatives."""
        if a.shape != b.shape or a.dim() != 2:
            raise ValueError(f"pairwise InfoNCE needs two (N, d) tensors of one shape, got {a.shape} and {b.shape}")
        n = len(a)
        keep = torch.ones(n, dtype=torch.bool, device=a.device) if row_mask is None else row_mask.bool()
        logits = self.scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
        pair_mask = keep[:, None] & keep[None, :]
        target = torch.arange(n, device=a.device)
        per_row = 0.5 * (_masked_ce(logits, pair_mask, target) + _masked_ce(logits.T, pair_mask.T, target))
        return _reduce(per_row, keep, reduction)

    def candidates(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        row_mask: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """InfoNCE of each query (S, d) against its keys (S, N, d), the positive at index 0; ``key_mask``
        (S, N) drops padded keys. A row whose positive is masked is left out like a ``row_mask`` miss."""
        if keys.dim() != 3 or queries.dim() != 2 or keys.shape[0] != queries.shape[0]:
            raise ValueError(f"candidates needs queries (S, d) and keys (S, N, d), got {queries.shape}, {keys.shape}")
        s, n = keys.shape[:2]
        mask = torch.ones((s, n), dtype=torch.bool, device=keys.device) if key_mask is None else key_mask.bool()
        keep = mask[:, 0] if row_mask is None else mask[:, 0] & row_mask.bool()
        logits = self.scale * torch.einsum("sd,snd->sn", F.normalize(queries, dim=-1), F.normalize(keys, dim=-1))
        per_row = _masked_ce(logits, mask, torch.zeros(s, dtype=torch.long, device=keys.device))
        return _reduce(per_row, keep, reduction)

    def against_pool(
        self,
        queries: torch.Tensor,
        positives: torch.Tensor,
        pool: torch.Tensor,
        row_mask: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """``-log(exp(s(q_i, p_i) / tau) / sum_j exp(s(q_i, k_j) / tau))`` of each query (A, d) with its positive
        (A, d), over the ``pool`` of keys (P, d) every query shares (DLRAM's Eq. 2: the positive is not in the
        denominator, so a row can be negative). An empty pool leaves every row out: 0, never -inf."""
        if queries.dim() != 2 or queries.shape != positives.shape or pool.shape[1:] != queries.shape[1:]:
            raise ValueError(f"against_pool needs queries and positives (A, d) and a pool (P, d), got "
                             f"{queries.shape}, {positives.shape}, {pool.shape}")
        queries = F.normalize(queries, dim=-1)
        keep = torch.ones(len(queries), dtype=torch.bool, device=queries.device) if row_mask is None else row_mask
        if not len(pool):  # no term; still in the graph, so that a loss made only of it can backward
            return _reduce(0 * queries.sum(-1), torch.zeros_like(keep, dtype=torch.bool), reduction)
        positive = self.scale * (queries * F.normalize(positives, dim=-1)).sum(-1)
        denominator = torch.logsumexp(self.scale * queries @ F.normalize(pool, dim=-1).T, dim=-1)
        return _reduce(denominator - positive, keep.bool(), reduction)


def _masked_ce(logits: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy with masked logits excluded; rows with a masked target give 0, not inf/nan."""
    logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    picked = mask.gather(1, target[:, None])[:, 0]
    loss = F.cross_entropy(logits, target, reduction="none")
    return torch.where(picked, loss, torch.zeros_like(loss))


def _reduce(per_row: torch.Tensor, keep: torch.Tensor, reduction: str) -> torch.Tensor:
    per_row = torch.where(keep, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    if reduction == "mean":
        return per_row.sum() / keep.sum().clamp(min=1)
    if reduction == "sum":
        return per_row.sum()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
