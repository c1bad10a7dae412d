"""Graph and fusion pieces of the visual-semantic graph models (gmner.models.vsgn): similarity graphs with top-K
sparsification and GCN layers, masked cross-modal attention, the symmetric KL that aligns two graphs, and
the fusions of a few visual feature vectors (deviation-aware channel-wise inhibitory routing, concatenation,
weighted sum).

Masks are True for real nodes / sources. A masked node is never a neighbour or a key, and a row (query)
with nothing valid to attend to gets exactly zero weight everywhere, never a uniform spread over padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over the True entries of ``mask`` (broadcast to ``scores``); all-masked slices give zeros."""
    mask = mask.expand_as(scores)
    weights = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), dim=dim)
    return weights * mask


def topk_mask(scores: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of (..., N, N) ``scores``, the ``k`` best-scoring ``allowed`` neighbours: exactly
    ``min(k, allowed in the row)`` True entries per row."""
    k = min(k, scores.size(-1))
    best = scores.masked_fill(~allowed, float("-inf")).topk(k, dim=-1).indices
    return torch.zeros_like(allowed).scatter(-1, best, True) & allowed


def local_mask(n: int, window: int | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, n) True where two positions are at most ``window`` apart (everywhere when ``window`` is None)."""
    if window is None:
        return torch.ones((n, n), dtype=torch.bool, device=device)
    pos = torch.arange(n, device=device)
    return (pos[:, None] - pos[None, :]).abs() <= window


def symmetric_kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KL(p || q) + KL(q || p) over the last dimension of two distributions: (...) values, zero exactly when
    p = q, symmetric in p and q. Probabilities are clamped at ``eps`` so zeros stay finite."""
    log_p, log_q = p.clamp_min(eps).log(), q.clamp_min(eps).log()
    return ((p - q) * (log_p - log_q)).sum(-1)


class SimilarityGraph(nn.Module):
    """A graph over node states and ``layers`` GCN layers on it.

    Edge scores are a learned-weight cosine similarity of the states (the prior) plus a learned bilinear
    scorer. A node's candidate neighbours are the other valid nodes (within ``window`` positions when given:
    the local mask); its edges are its ``top_k`` best candidates, weighted by the softmax of their scores.
    """

    def __init__(self, dim: int, top_k: int, layers: int, window: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.top_k = top_k
        self.window = window
        self.prior = nn.Parameter(torch.tensor(1.0))
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.dropout = nn.Dropout(dropout)

    def candidates(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, N, N) the possible edges: both ends valid, not a self loop, inside the local window."""
        n = mask.size(1)
        eye = torch.eye(n, dtype=torch.bool, device=mask.device)
        return mask[:, :, None] & mask[:, None, :] & ~eye & local_mask(n, self.window, mask.device)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(x, dim=-1)
        learned = self.query(x) @ self.key(x).transpose(1, 2) / math.sqrt(x.size(-1))
        return self.prior * unit @ unit.transpose(1, 2) + learned

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Node states after the GCN layers (B, N, dim); the dense edge distribution (B, N, N): each row's
        softmax over all its candidates, which top-K sparsifies; and the candidate mask."""
        allowed = self.candidates(mask)
        scores = self.scores(x)
        adjacency = masked_softmax(scores, topk_mask(scores, allowed, self.top_k))
        for layer, norm in zip(self.layers, self.norms):
            x = norm(x + self.dropout(F.gelu(layer(adjacency @ x))))
        return x, masked_softmax(scores, allowed), allowed


class CrossModalAttention(nn.Module):
    """Multi-head attention of queries over keys with a key mask; a query with no valid key gets zeros."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Q, dim) context and (B, Q, K) attention averaged over heads (rows sum to 1, or 0 without keys).
        The context is exactly zero for an item without any valid key."""
        q, k, v = self._split(self.query(queries)), self._split(self.key(keys)), self._split(self.value(keys))
        weights = masked_softmax(q @ k.transpose(-1, -2) / math.sqrt(q.size(-1)), key_mask[:, None, None, :])
        context = (self.dropout(weights) @ v).transpose(1, 2).flatten(2)
        return self.out(context) * key_mask.any(-1)[:, None, None], weights.mean(1)


def attended_adjacency(attention: torch.Tensor, image_edges: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The image graph seen from the text nodes: (B, T, T) row distributions over each text node's candidate
    edges ``allowed``. Entry (i, k) is the chance that a walk from text node i to a patch it attends to,
    then along one image edge, ends on a patch that text node k attends to, renormalised over i's candidates.
    ``attention`` (B, T, P) text-to-patch weights, ``image_edges`` (B, P, P) the image graph's distribution."""
    walk = (attention @ image_edges @ attention.transpose(1, 2)) * allowed
    return walk / walk.sum(-1, keepdim=True).clamp_min(1e-12)


class ChannelInhibitoryRouting(nn.Module):
    """Deviation-aware channel-wise inhibitory routing (CIR) of J source vectors into one.

    For source j and channel c: importance ``a[j, c]`` = softmax over the present sources of a per-source
    linear map of the source; deviation ``d[j, c] = |s[j, c] - mean[j, c]| / sqrt(var[j, c] + eps)`` against
    running statistics (buffers, updated from the present sources in training only, after use, so a batch
    never changes its own outputs); inhibition ``exp(-softplus(rho[j, c]) * d[j, c])``. The output is
    ``sum_j a[j, c] * inhibition[j, c] * s[j, c]``, and zero for an item with no present source.

    Identity up to scale: when the importance logits are equal across sources and every channel gets the
    same inhibition ``r`` (equal ``rho`` and equal deviation), the output is ``r`` times the mean of the
    present sources; so with one present source, or all sources equal to ``x``, it is ``r * x``.
    """

    def __init__(self, sources: int, dim: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        bound = 1 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(sources, dim, dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(sources, dim))
        self.rho = nn.Parameter(torch.full((sources, dim), -2.0))  # softplus(-2) = 0.13: mild inhibition at start
        self.register_buffer("running_mean", torch.zeros(sources, dim))
        self.register_buffer("running_var", torch.ones(sources, dim))

    def forward(self, sources: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(B, J, dim) sources and their (B, J) presence -> (B, dim)."""
        logits = torch.einsum("bjd,jdc->bjc", sources, self.weight) + self.bias
        importance = masked_softmax(logits, present[..., None], dim=1)
        deviation = (sources - self.running_mean).abs() / (self.running_var + self.eps).sqrt()
        inhibition = torch.exp(-F.softplus(self.rho) * deviation)
        if self.training:
            self._update_statistics(sources.detach(), present)
        return (importance * inhibition * sources).sum(1)

    @torch.no_grad()
    def _update_statistics(self, sources: torch.Tensor, present: torch.Tensor) -> None:
        weight = present.to(sources.dtype)[..., None]  # (B, J, 1)
        count = weight.sum(0)  # (J, 1)
        mean = (weight * sources).sum(0) / count.clamp_min(1)
        var = (weight * (sources - mean) ** 2).sum(0) / (count - 1).clamp_min(1)
        seen = count > 1  # a variance needs two samples; sources absent from the batch keep their statistics
        m = self.momentum
        self.running_mean.copy_(torch.where(seen, (1 - m) * self.running_mean + m * mean, self.running_mean))
        self.running_var.copy_(torch.where(seen, (1 - m) * self.running_var + m * var, self.running_var))


class ConcatFusion(nn.Module):
    """The concatenation ablation: a linear map of the sources (absent ones zeroed) and their presence flags;
    zero for an item with no present source."""

    def __init__(self, sources: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(sources * (dim + 1), dim)

    def forward(self, sources: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        flags = present.to(sources.dtype)
        fused = self.linear(torch.cat([(sources * flags[..., None]).flatten(1), flags], dim=-1))
        return fused * present.any(-1, keepdim=True)


class WeightedSumFusion(nn.Module):
    """The weighted-sum ablation: one learned weight per source, softmax over the present ones."""

    def __init__(self, sources: int, dim: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(sources))

    def forward(self, sources: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        weights = masked_softmax(self.logits.expand_as(present), present)
        return (weights[..., None] * sources).sum(1)


FUSIONS = {"cir": ChannelInhibitoryRouting, "concat": ConcatFusion, "sum": WeightedSumFusion}
