"""VTC's shared-private connector: detector-region features projected into the text encoder's space.

Two branches read the same projected regions of one image and a learned per-channel gate merges them:

- :class:`RegionGraph` (shared context between objects): a graph over the image's K regions whose edge
  weights a small learned scorer derives from the cosine similarity of the region embeddings, the IoU of
  their boxes and the distance of their centres; the row-normalised adjacency (self loops included) drives
  ``graph_layers`` GCN layers with residual + LayerNorm;
- :class:`MixtureOfExperts` (private per-object cues): a router sends each region to its ``top_k_experts``
  best experts (gate renormalised over the chosen ones) and returns the load-balancing term of Shazeer et
  al. (2017): the squared coefficient of variation of expert importance, exactly zero for a uniform router.

Masked regions (padding, or candidates without features) are never treated as real: their inputs are
zeroed, they have no edges, they do not count in the balance term and their outputs are zeros. ``graph``
and ``moe`` switch the branches off for ablations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-12


@dataclass(frozen=True)
class ConnectorConfig:
    visual_dim: int
    text_dim: int
    graph: bool = True
    moe: bool = True
    graph_layers: int = 2
    n_experts: int = 4
    top_k_experts: int = 2
    dropout: float = 0.1

    def __post_init__(self):
        if not (self.graph or self.moe):
            raise ValueError("connector needs at least one branch: graph and moe are both off")
        if self.graph_layers < 1:
            raise ValueError(f"graph_layers must be >= 1, got {self.graph_layers}")
        if not 1 <= self.top_k_experts <= self.n_experts:
            raise ValueError(f"top_k_experts must be in [1, n_experts={self.n_experts}], got {self.top_k_experts}")


class ConnectorOutput(NamedTuple):
    regions: torch.Tensor  # (B, K, text_dim), zeros at masked slots
    balance: torch.Tensor  # scalar load-balancing term, 0 when moe is off
    routing: torch.Tensor  # (B, K, n_experts) gate weights, zeros for unchosen experts and masked slots


def edge_features(features: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
    """(B, K, K, 3): cosine of the region embeddings, IoU of the boxes and their centre distance scaled to
    [0, 1], from ``geometry`` = (x1/W, y1/H, x2/W, y2/H, area) as gmner.models.visual_store.geometry computes it."""
    unit = F.normalize(features, dim=-1, eps=EPS)
    cosine = unit @ unit.transpose(1, 2)
    lo = torch.maximum(geometry[:, :, None, :2], geometry[:, None, :, :2])
    hi = torch.minimum(geometry[:, :, None, 2:4], geometry[:, None, :, 2:4])
    inter = (hi - lo).clamp_min(0).prod(dim=-1)
    union = geometry[:, :, None, 4] + geometry[:, None, :, 4] - inter
    iou = inter / union.clamp_min(EPS)
    centre = (geometry[..., :2] + geometry[..., 2:4]) / 2
    distance = (centre[:, :, None] - centre[:, None, :]).norm(dim=-1) / math.sqrt(2)
    return torch.stack([cosine, iou, distance], dim=-1)


class RegionGraph(nn.Module):
    """GCN over the regions of each image with learned, geometry- and similarity-aware edge weights."""

    def __init__(self, dim: int, layers: int, dropout: float, scorer_hidden: int = 16):
        super().__init__()
        self.edge_scorer = nn.Sequential(nn.Linear(3, scorer_hidden), nn.GELU(), nn.Linear(scorer_hidden, 1))
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.dropout = nn.Dropout(dropout)

    def adjacency(self, features: torch.Tensor, geometry: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, K, K) row-normalised adjacency: rows of valid regions sum to 1, masked rows/columns are 0.
        The diagonal of a valid region is always an edge, so its row never sums to 0."""
        weights = torch.sigmoid(self.edge_scorer(edge_features(features, geometry)).squeeze(-1))
        weights = weights * (mask[:, :, None] & mask[:, None, :])
        return weights / weights.sum(dim=-1, keepdim=True).clamp_min(EPS)

    def forward(self, hidden: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        for layer, norm in zip(self.layers, self.norms):
            hidden = norm(hidden + self.dropout(F.gelu(layer(adjacency @ hidden))))
        return hidden


class MixtureOfExperts(nn.Module):
    """Top-k routed expert MLPs. Experts are evaluated densely (an image has a few dozen regions at most)
    and combined with gates that are zero for unchosen experts, which is the sparse computation's result."""

    def __init__(self, dim: int, n_experts: int, top_k: int, dropout: float):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, n_experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
            for _ in range(n_experts)
        )
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(outputs (B, K, dim), gates (B, K, n_experts), balance term) for regions ``hidden``."""
        probs = torch.softmax(self.router(hidden), dim=-1)
        chosen, index = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, index, chosen / chosen.sum(dim=-1, keepdim=True))
        gates = gates * mask[..., None]
        mixed = torch.einsum("bke,bked->bkd", gates, torch.stack([expert(hidden) for expert in self.experts], 2))
        return self.norm(hidden + self.dropout(mixed)), gates, balance_loss(probs, mask)


def balance_loss(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation of expert importance (router probability summed over valid regions).
    Zero for a uniform router and when there is no valid region."""
    importance = (probs * mask[..., None]).sum(dim=(0, 1))
    return importance.var(correction=0) / (importance.mean() ** 2 + EPS)


class SharedPrivateConnector(nn.Module):
    def __init__(self, cfg: ConnectorConfig):
        super().__init__()
        self.cfg = cfg
        self.project = nn.Sequential(nn.Linear(cfg.visual_dim, cfg.text_dim), nn.LayerNorm(cfg.text_dim))
        self.graph = RegionGraph(cfg.text_dim, cfg.graph_layers, cfg.dropout) if cfg.graph else None
        self.moe = MixtureOfExperts(cfg.text_dim, cfg.n_experts, cfg.top_k_experts, cfg.dropout) if cfg.moe else None
        self.gate = nn.Linear(2 * cfg.text_dim, cfg.text_dim) if cfg.graph and cfg.moe else None

    def forward(self, features: torch.Tensor, geometry: torch.Tensor, mask: torch.Tensor) -> ConnectorOutput:
        """``features`` (B, K, visual_dim), ``geometry`` (B, K, 5), ``mask`` (B, K) bool, True = real region."""
        if geometry.shape[-1] != 5 or features.shape[:2] != geometry.shape[:2] or features.shape[:2] != mask.shape:
            raise ValueError(f"shape mismatch: features {features.shape}, geometry {geometry.shape}, mask {mask.shape}")
        valid = mask.bool()[..., None]
        # torch.where rather than multiplication: a nan in a masked slot must not leak through 0 * nan.
        features = torch.where(valid, features, 0.0)
        geometry = torch.where(valid, geometry, 0.0)
        hidden = self.project(features)
        batch, k = mask.shape
        shared = private = None
        balance = hidden.new_zeros(())
        routing = hidden.new_zeros(batch, k, self.cfg.n_experts)
        if self.graph is not None:
            shared = self.graph(hidden, self.graph.adjacency(features, geometry, mask.bool()))
        if self.moe is not None:
            private, routing, balance = self.moe(hidden, mask.bool())
        if shared is not None and private is not None:
            gate = torch.sigmoid(self.gate(torch.cat([shared, private], dim=-1)))
            regions = gate * shared + (1 - gate) * private
        else:
            regions = shared if shared is not None else private
        return ConnectorOutput(torch.where(valid, regions, 0.0), balance, routing)
