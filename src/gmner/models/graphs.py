"""Graph and fusion pieces of the visual-semantic graph models (gmner.models.vsgn): similarity graphs with top-K
sparsification and GCN layers, masked cross-modal attention, the symmetric KL that aligns two graphs, gates
between two streams, and the fusions of VSGN's two cross-modal branches: deviation-aware channel-wise
inhibitory routing (CIR: squeeze-and-excitation relevance, deviation from a learnable canonical pattern,
routing over channels) and its ablations, concatenation and weighted sum.

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
    """Multi-head attention of queries over keys with a key mask; a query with no valid key gets zeros. The
    output has ``out_dim`` channels (default ``dim``)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, out_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, out_dim or dim)
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


class Gate(nn.Module):
    """``g * a + (1 - g) * b`` with ``g = sigmoid(W [a; b] + c)``: one gate per channel (``per_channel``, VSGN's
    image / region gate) or one per position (its final gate between the two streams, W in R^{2d x 1}).
    ``start``: W starts at zero and c at logit(start), so that g starts at ``start`` everywhere; None: random."""

    def __init__(self, dim: int, per_channel: bool = True, start: float | None = None):
        super().__init__()
        self.linear = nn.Linear(2 * dim, dim if per_channel else 1)
        if start is not None:
            nn.init.zeros_(self.linear.weight)
            nn.init.constant_(self.linear.bias, math.log(start / (1 - start)))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.linear(torch.cat([a, b], dim=-1)))
        return g * a + (1 - g) * b


class SqueezeExcitation(nn.Module):
    """Channel relevance p = sigmoid(W2 relu(W1 z + b1) + b2) of a pooled feature z (..., dim), each entry in
    (0, 1); W1 maps ``dim`` channels to ``dim // reduction``."""

    def __init__(self, dim: int, reduction: int):
        super().__init__()
        squeezed = max(1, dim // reduction)
        self.net = nn.Sequential(nn.Linear(dim, squeezed), nn.ReLU(), nn.Linear(squeezed, dim), nn.Sigmoid())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def channel_deviation(z: torch.Tensor, canonical: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """D_c = (w_c |z_c - v_c|)^2 / ||w * |z - v| ||_2^2: channel c's share of the weighted squared deviation of
    ``z`` (..., d) from the canonical pattern v; non-negative, summing to 1 over the channels, and exactly
    zero everywhere when z = v."""
    squared = (weight * (z - canonical)).square()
    return squared / squared.sum(-1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)


def inhibitory_routing(relevance: torch.Tensor, deviation: torch.Tensor, beta: float | torch.Tensor,
                       gamma: float) -> torch.Tensor:
    """B(c) = softmax over the channels c of (p(c) - beta D_c) / gamma, times the channel count d, so that a
    uniform routing (every B(c) = 1) leaves the routed features as they are."""
    return torch.softmax((relevance - beta * deviation) / gamma, dim=-1) * relevance.size(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, N, d) ``x`` over the True positions of (B, N) ``mask``; zeros where none is."""
    return (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)


class ChannelInhibitoryRouting(nn.Module):
    """CIR: routes the text-vision branch H_IT and the description-vision branch H_IC over channels, then
    H_out = LayerNorm(H_t + CMA(B * H_IT, B * H_IC, B * H_IC)).

    z is the average of the branches over the sequence (every valid row of H_IT and H_IC); its relevance
    p comes from squeeze-and-excitation, its deviation D from the learnable canonical pattern ``canonical``
    with the learnable channel weights ``weight`` (:func:`channel_deviation`); B (:func:`inhibitory_routing`)
    uses the temperature ``gamma`` and the buffer ``beta``, which the trainer warms up (saved with the model,
    so prediction uses the value of the epoch kept). A tweet without a description attends to its own routed
    H_IT rows instead, so its image still counts. The CMA's output projection starts at zero, so H_out starts
    as LayerNorm(H_t).
    """

    def __init__(self, dim: int, heads: int, reduction: int, gamma: float, beta: float, dropout: float = 0.0):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("beta", torch.tensor(float(beta)))
        self.relevance = SqueezeExcitation(dim, reduction)
        self.canonical = nn.Parameter(torch.zeros(dim))
        self.weight = nn.Parameter(torch.ones(dim))
        self.attention = CrossModalAttention(dim, heads, dropout)
        nn.init.zeros_(self.attention.out.weight)
        nn.init.zeros_(self.attention.out.bias)
        self.norm = nn.LayerNorm(dim)

    def routing(self, h_it: torch.Tensor, it_mask: torch.Tensor, h_ic: torch.Tensor,
                ic_mask: torch.Tensor) -> torch.Tensor:
        """(B, d) routing weights B(c) of each item."""
        z = masked_mean(torch.cat([h_it, h_ic], dim=1), torch.cat([it_mask, ic_mask], dim=1))
        deviation = channel_deviation(z, self.canonical, self.weight)
        return inhibitory_routing(self.relevance(z), deviation, self.beta, self.gamma)

    def forward(self, h_t: torch.Tensor, text_mask: torch.Tensor, h_it: torch.Tensor, h_ic: torch.Tensor,
                ic_mask: torch.Tensor) -> torch.Tensor:
        """H_out (B, T, d) from the text states H_t (B, T, d), the branches H_IT (B, T, d) and H_IC (B, C, d)
        and their masks (C may be 0: no descriptions)."""
        b = self.routing(h_it, text_mask, h_ic, ic_mask)[:, None]
        own = text_mask & ~ic_mask.any(1, keepdim=True)  # H_IT's rows are the keys where there is no H_IC
        keys = torch.cat([b * h_ic, b * h_it], dim=1)
        return self.norm(h_t + self.attention(b * h_it, keys, torch.cat([ic_mask, own], dim=1))[0])


class ConcatFusion(nn.Module):
    """The "CIR -> concatenation" ablation: H_out = LayerNorm(H_t + W [H_IT; mean H_IC]), the description branch
    averaged over its rows (zeros without a description); W starts at zero, as CIR's last projection does."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(2 * dim, dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.norm = nn.LayerNorm(dim)

    def forward(self, h_t: torch.Tensor, text_mask: torch.Tensor, h_it: torch.Tensor, h_ic: torch.Tensor,
                ic_mask: torch.Tensor) -> torch.Tensor:
        pooled = masked_mean(h_ic, ic_mask)[:, None].expand_as(h_it)
        return self.norm(h_t + self.linear(torch.cat([h_it, pooled], dim=-1)))


class WeightedSumFusion(nn.Module):
    """The "CIR -> weighted sum" ablation: H_out = LayerNorm(H_t + a H_IT + (1 - a) mean H_IC) with ``a`` a
    learned softmax weight; ``a`` = 1 for a tweet without a description."""

    def __init__(self, dim: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(2))
        self.norm = nn.LayerNorm(dim)

    def forward(self, h_t: torch.Tensor, text_mask: torch.Tensor, h_it: torch.Tensor, h_ic: torch.Tensor,
                ic_mask: torch.Tensor) -> torch.Tensor:
        described = ic_mask.any(1)
        present = torch.stack([torch.ones_like(described), described], dim=1)
        weights = masked_softmax(self.logits.expand(len(h_t), 2), present)
        mixed = weights[:, :1, None] * h_it + weights[:, 1:, None] * masked_mean(h_ic, ic_mask)[:, None]
        return self.norm(h_t + mixed)


FUSIONS = {"cir": ChannelInhibitoryRouting, "concat": ConcatFusion, "sum": WeightedSumFusion}
