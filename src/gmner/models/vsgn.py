"""VSGN: a CRF tagger whose word states are enriched by visual-semantic graphs and fused image features.

Inputs per tweet: the tweet's subwords with the image's caption appended (``captions``; caption-guided
fusion: the encoder reads both), the image's ViT / CLIP patch tokens (``patch_dim``), the whole-image
embedding and the detector candidates' embeddings (gmner.models.visual_store).

- Patch path (``patch_dim`` set). With ``vsg``: a text graph over all subword states (tweet and caption;
  cosine prior + learned edge scorer, local window, top-K per node, GCN layers) and an image graph over
  the standardised patch tokens (the same, without a window); text nodes then attend to image nodes. The
  structural alignment term is the symmetric KL, per text node, between two distributions over that
  node's candidate text edges: the text graph's own edge distribution, and the image graph carried onto
  the text nodes through the attention (gmner.models.graphs.attended_adjacency). Without ``vsg``: plain
  cross-attention from projected subword states to projected patches, no graphs and no alignment term.
- Global path: the whole-image feature, the candidates' features pooled by learned attention (most
  candidates are background; a plain mean drowns the few that show an entity) and the mean caption
  state, each projected and normalised, fused by ``fusion``: CIR (gmner.models.graphs.ChannelInhibitoryRouting),
  or the ablations concatenation / weighted sum. Absent sources are masked.
- Each word (its first subword) gets a visual vector from its patch context, the fused vector and two
  presence flags; a sigmoid gate over (word state, visual vector) scales what is added to the word state.
  Emissions and CRF are ``CRFTagger``'s. Loss: CRF NLL + ``lambda_align`` x the alignment term.

Graceful degradation: a tweet with no image has no caption, no patches and no image or candidate features,
so nothing visual is present and its word states are the encoder's, unchanged: its emissions are exactly
those ``CRFTagger`` computes with the same encoder, classifier and CRF. Its output never depends on the
other tweets of its batch beyond the encoder's padding. On data without any image, a VSGN built and trained
with the seed and dropout of a ``CRFTagger`` draws the same random numbers and so trains to the same tagger
(up to float rounding: its zero visual gradients enter the gradient-norm clipping).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from gmner.models.graphs import (
    FUSIONS,
    CrossModalAttention,
    SimilarityGraph,
    attended_adjacency,
    masked_softmax,
    symmetric_kl,
)
from gmner.models.tagger import CRFTagger
from gmner.models.visual_model import VisualModel, VisualPredictor, load_visual_predictor
from gmner.models.visual_projection import VisualProjection
from gmner.models.visual_store import ImageVisual, feature_statistics, switched_extras


@dataclass(frozen=True)
class VSGNConfig:
    visual_dim: int  # size of the image and candidate embeddings
    patch_dim: int | None = None  # size of the patch tokens; None: no patch path
    top_k: int = 16  # candidates per image pooled into the region source
    captions: bool = True  # the caption is appended to the text and is a fusion source
    vsg: bool = True  # text and image graphs + structural alignment; False: plain cross-attention
    fusion: str = "cir"  # cir, concat or sum, over the image / region / caption sources
    graph_top_k: int = 5  # edges kept per node
    graph_layers: int = 2  # GCN layers per graph
    local_window: int | None = 8  # text-graph edges join subwords at most this far apart; None: any two
    lambda_align: float = 0.1  # weight of the symmetric KL alignment term
    hidden: int = 64  # width of the visual side
    heads: int = 4  # cross-modal attention heads
    cir_momentum: float = 0.1  # of CIR's running statistics

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {sorted(FUSIONS)}, got {self.fusion!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden size {self.hidden} is not divisible by {self.heads} heads")
        if self.vsg and self.patch_dim is None:
            raise ValueError("vsg builds an image graph over patch tokens: it needs patches")

    @property
    def extras(self) -> tuple[str, ...]:
        return switched_extras(captions=self.captions, patches=self.patch_dim is not None)

    @property
    def sources(self) -> tuple[str, ...]:
        """The fused global sources, in order."""
        return ("image", "regions", "caption") if self.captions else ("image", "regions")


def patch_statistics(visuals: Sequence[ImageVisual], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of all available patch tokens (missing patches left out)."""
    rows = [v.patches for v in visuals if v.patches is not None and len(v.patches)]
    values = np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)
    if len(values) < 2:
        return np.zeros(dim, np.float32), np.ones(dim, np.float32)
    return values.mean(axis=0).astype(np.float32), np.maximum(values.std(axis=0), 1e-6).astype(np.float32)


class PatchPath(nn.Module):
    """Patch context per subword: (optionally graph-refined) text states attending to patch states."""

    def __init__(self, text_dim: int, cfg: VSGNConfig, dropout: float):
        super().__init__()
        h = cfg.hidden
        self.register_buffer("patch_mean", torch.zeros(cfg.patch_dim))
        self.register_buffer("patch_std", torch.ones(cfg.patch_dim))
        self.patch = nn.Sequential(nn.Linear(cfg.patch_dim, h), nn.LayerNorm(h))
        self.text = nn.Sequential(nn.Linear(text_dim, h), nn.LayerNorm(h))
        if cfg.vsg:
            self.text_graph = SimilarityGraph(h, cfg.graph_top_k, cfg.graph_layers, cfg.local_window, dropout)
            self.image_graph = SimilarityGraph(h, cfg.graph_top_k, cfg.graph_layers, None, dropout)
        self.attention = CrossModalAttention(h, cfg.heads, dropout)
        self.vsg = cfg.vsg

    def forward(self, hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, h) context per subword (zero without patches) and the alignment term (a scalar: the mean
        symmetric KL over the text nodes that have candidate edges, in tweets with patches)."""
        patch_mask, text_mask = batch["patch_mask"], batch["attention_mask"].bool()
        patches = self.patch((batch["patch_tokens"] - self.patch_mean) / self.patch_std)
        text = self.text(hidden)
        if not self.vsg:
            return self.attention(text, patches, patch_mask)[0], hidden.new_zeros(())
        text, text_edges, allowed = self.text_graph(text, text_mask)
        patches, image_edges, _ = self.image_graph(patches, patch_mask)
        context, attention = self.attention(text, patches, patch_mask)
        kl = symmetric_kl(text_edges, attended_adjacency(attention, image_edges, allowed))
        rows = allowed.any(-1) & patch_mask.any(-1, keepdim=True)
        return context, (kl * rows).sum() / rows.sum().clamp_min(1)


class VSGNTagger(VisualModel, CRFTagger):
    """``CRFTagger`` with VSGN's visual word enrichment; saved and loaded like it (config in model.json)."""

    kind = "vsgn"
    visual_config = VSGNConfig

    def build_visual(self, text_dim: int, dropout: float) -> None:
        visual = self.visual_cfg
        h = visual.hidden
        self.projection = VisualProjection(visual.visual_dim, visual.top_k, h)
        self.region_mlp = nn.Sequential(nn.Linear(h, h), nn.GELU())
        self.region_score = nn.Linear(h, 1)
        if visual.captions:
            self.caption = nn.Linear(text_dim, h)
        self.source_norms = nn.ModuleList(nn.LayerNorm(h) for _ in visual.sources)
        fusion = FUSIONS[visual.fusion]
        n = len(visual.sources)
        self.fusion = fusion(n, h, visual.cir_momentum) if visual.fusion == "cir" else fusion(n, h)
        self.patch_path = PatchPath(text_dim, visual, dropout) if visual.patch_dim is not None else None
        self.visual_out = nn.Linear(2 * h + 2, text_dim)  # patch context, fused vector, their presence flags
        self.gate = nn.Linear(2 * text_dim, text_dim)

    def fit_feature_statistics(self, visuals: Sequence[ImageVisual]) -> None:
        self.projection.set_feature_statistics(feature_statistics(visuals, self.visual_cfg.visual_dim))
        if self.patch_path is not None:
            mean, std = patch_statistics(visuals, self.visual_cfg.patch_dim)
            self.patch_path.patch_mean.copy_(torch.from_numpy(mean))
            self.patch_path.patch_std.copy_(torch.from_numpy(std))

    def fused_sources(self, hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, h) the fused global vector (zero when no source is present) and its (B,) presence."""
        image, _, regions = self.projection(batch)
        region_mask = batch["region_mask"]
        regions = self.region_mlp(regions)
        pooled = (masked_softmax(self.region_score(regions)[..., 0], region_mask)[..., None] * regions).sum(1)
        sources, present = [image, pooled], [batch["image_mask"], region_mask.any(1)]
        if self.visual_cfg.captions:
            caption_mask = batch["context_mask"]
            mean = (hidden * caption_mask[..., None]).sum(1) / caption_mask.sum(1, keepdim=True).clamp_min(1)
            sources.append(self.caption(mean))
            present.append(caption_mask.any(1))
        sources = torch.stack([norm(s) for norm, s in zip(self.source_norms, sources)], dim=1)
        present = torch.stack(present, dim=1)
        return self.fusion(sources, present), present.any(1)

    def visual_states(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Word states (B, W, hidden) with the gated visual vector added where visual input exists, and the
        alignment term."""
        hidden = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        rows = torch.arange(hidden.size(0), device=hidden.device)[:, None]
        words = hidden[rows, batch["word_pos"]]
        fused, fused_present = self.fused_sources(hidden, batch)
        patch_present = batch["patch_mask"].any(1) if self.patch_path is not None else torch.zeros_like(fused_present)
        if patch_present.any():
            context, align = self.patch_path(hidden, batch)
            context = context[rows, batch["word_pos"]]
        else:  # skipped, so that a text-only batch draws no dropout masks: training is the text tagger's
            context = words.new_zeros((*words.shape[:2], self.visual_cfg.hidden))
            align = hidden.new_zeros(())
        flags = torch.stack([patch_present, fused_present], dim=1).to(words.dtype)
        n_words = words.size(1)
        visual = self.visual_out(torch.cat(
            [context, fused[:, None].expand(-1, n_words, -1), flags[:, None].expand(-1, n_words, -1)], dim=-1))
        enriched = words + torch.sigmoid(self.gate(torch.cat([words, visual], dim=-1))) * visual
        # Exactly the encoder's word states where nothing visual is present: the text tagger's path.
        return torch.where((patch_present | fused_present)[:, None, None], enriched, words), align

    def loss(self, batch: dict) -> torch.Tensor:
        """CRF negative log-likelihood + ``lambda_align`` x the graphs' symmetric KL."""
        states, align = self.visual_states(batch)
        return super().loss(batch, states) + self.visual_cfg.lambda_align * align

    def decode(self, batch: dict) -> list[list[int]]:
        return super().decode(batch, self.visual_states(batch)[0])


def load_predictor(model_dir: str | Path, device: torch.device) -> VisualPredictor:
    return load_visual_predictor(VSGNTagger, model_dir, device)
