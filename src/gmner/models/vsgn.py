"""VSGN: a CRF tagger whose word states come from two streams, a visual-semantic graph stream and a
channel-wise inhibitory routing (CIR) fusion stream, mixed by a gate before the CRF.

Inputs per tweet: the tweet's subwords (with the image's description appended when ``captions``: the text
graph's sequence is tweet + description), the description again as its own sequence C of at most
``caption_length`` subwords, read by the same encoder; the image's ViT / CLIP patch tokens (``patch_dim``),
the whole-image embedding and the detector candidates' embeddings (gmner.models.visual_store). H_t are the
encoder's states of the (tweet + description) subwords.

The paper's equations and where they are (section and symbols as the VSGN paper writes them):

- 3.3, graph stream H_g (:class:`PatchPath`). With ``vsg``: a text graph over H_t and an image graph over
  the standardised patch tokens (cosine prior + learned edge scorer, local window on the text graph, top-K
  per node, GCN layers: gmner.models.graphs.SimilarityGraph), then H_g = CMA(H_t, H_i, H_i) from text nodes to
  image nodes; the alignment term is the symmetric KL, per text node, between the text graph's edge
  distribution and the image graph carried onto the text nodes by that attention. Without ``vsg``:
  H_g = CMA(H_t, H_i, H_i) over projected states, no graphs and no alignment term.
- 3.4, fusion stream H_out (:class:`FusionStream`). H_i is the image's token set: its whole-image embedding
  and its patch tokens, each projected to the text width. gate = sigmoid(W_theta [H_i; V_R]),
  H_i <- gate * H_i + (1 - gate) * V_R (graphs.Gate, per channel and per visual token); then
  H_IT = CMA(H_t, H_i, H_i) and H_IC = CMA(C, H_i, H_i); then ``fusion``: ``cir``
  (graphs.ChannelInhibitoryRouting: z = GAP, p = sigmoid(W2 relu(W1 z + b1) + b2) with reduction ``reduction``,
  D_c against the learnable v_c, B(c) = softmax_c((p(c) - beta D_c) / ``gamma``),
  H_out = LayerNorm(H_t + CMA(B * H_IT, B * H_IC, B * H_IC))), or the ablations ``concat`` / ``sum``
  (H_out = LayerNorm(H_t + W [H_IT; mean H_IC]) / LayerNorm(H_t + a H_IT + (1 - a) mean H_IC)).
- 3.5: H_fused = g H_out + (1 - g) H_g, g = sigmoid(W_g [H_out; H_g]) per subword (graphs.Gate with one gate
  per position); the emissions and CRF of ``CRFTagger`` read H_fused at each word's first subword. Loss: CRF
  NLL + ``lambda_align`` x the alignment term.

What the paper leaves open, and the choice made here:

- V_R against H_i: the K candidates are pooled into one vector per image by learned attention (most
  candidates are background; a plain mean drowns the few that show an entity), gated against every
  visual token; an image without candidates keeps its tokens ungated.
- H_i also holds the whole-image embedding as a token beside the 49 patches, so an image whose patch
  tokens are missing (or ``patches: false``) still reaches the fusion stream.
- GAP pools the routed features themselves: every valid row of H_IT and of H_IC together, per tweet.
- D_c = (w_c |z_c - v_c|)^2 / ||w * |z - v| ||_2^2 (graphs.channel_deviation: each channel's share of the
  weighted squared deviation; zero when z = v); w starts at ones, v at zeros.
- B is the channel softmax times the channel count d, so that a uniform routing leaves H_IT and H_IC as
  they are (a softmax summing to 1 over 768 channels would shrink them 768-fold before a CMA whose
  attention logits are bilinear in them).
- beta warms up by epoch: linear from ``beta_start`` (epoch 1) to ``beta_end`` (epoch ``beta_warmup`` + 1),
  constant after (:meth:`VSGNConfig.beta`, set by gmner.training.vsgn before each epoch; a buffer, so the
  saved model predicts with the beta of the epoch kept). Nor are r, gamma or beta's range given: the
  defaults are r = 16 (squeeze-and-excitation's usual), gamma = 1, beta 0.1 -> 1 over 5 epochs.
- "w/o VSG & CIR" is ``vsg: false`` with ``fusion: concat`` (the paper names no replacement fusion).
- A tweet without a description attends, in CIR's last CMA, to its own routed H_IT rows; the ablations
  use zeros for its mean H_IC (``sum``: all weight on H_IT). ``captions: false`` (w/o description) drops
  the description from the text graph's sequence and C from the fusion stream alike.
- Where a tweet has no patch tokens there is no graph stream: H_fused = H_out.
- Initialisation starts VSGN near the text: H_out starts as LayerNorm(H_t) (the last projection of its
  residual branch, CIR's last CMA or ``concat``'s linear map, is zero) and the final gate at
  g = ``GRAPH_GATE_START`` = 0.95 (W_g zero), so the graph stream comes in as it is learnt. On the sample,
  2 of 18 runs from random inits, and 1 of 13 with only the residual branch zeroed, never fitted the
  training set (train loss 2.5 to 3.2 after 12 epochs, against 0.5): a branch the same for every subword
  of a tweet drowned H_t in H_out (their spread across a tweet's subwords 0.005 against 1 for H_g), or a
  gate near 1/2 mixed that much H_g into every word state.

Graceful degradation: a tweet with no image has no description, no patches and no image or candidate
features, so nothing visual is present and its word states are the encoder's, unchanged: its emissions are
exactly those ``CRFTagger`` computes with the same encoder, classifier and CRF. Its output never depends on
the other tweets of its batch beyond the encoder's padding. On data without any image, a VSGN built and
trained with the seed and dropout of a ``CRFTagger`` draws the same random numbers and so trains to the
same tagger (up to float rounding: its zero visual gradients enter the gradient-norm clipping).
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
    ChannelInhibitoryRouting,
    CrossModalAttention,
    Gate,
    SimilarityGraph,
    attended_adjacency,
    masked_softmax,
    symmetric_kl,
)
from gmner.models.tagger import CRFTagger, EncodedTweet
from gmner.models.visual_model import VisualModel, VisualPredictor, load_visual_predictor
from gmner.models.visual_projection import FeatureStandardiser
from gmner.models.visual_store import ImageVisual, feature_statistics, switched_extras

GRAPH_GATE_START = 0.95  # g at initialisation: H_fused starts as (nearly) H_out (see the module docstring)


@dataclass(frozen=True)
class VSGNConfig:
    visual_dim: int  # size of the image and candidate embeddings
    patch_dim: int | None = None  # size of the patch tokens; None: no patch path (no graph stream)
    top_k: int = 16  # candidates per image pooled into V_R
    captions: bool = True  # the description: appended to the text graph's sequence and encoded as C
    caption_length: int = 20  # subwords of C, [CLS] and [SEP] included
    vsg: bool = True  # text and image graphs + structural alignment; False: plain cross-attention
    fusion: str = "cir"  # cir, or the ablations concat / sum, of the H_IT and H_IC branches
    graph_top_k: int = 5  # edges kept per node
    graph_layers: int = 2  # GCN layers per graph
    local_window: int | None = 8  # text-graph edges join subwords at most this far apart; None: any two
    lambda_align: float = 0.1  # weight of the symmetric KL alignment term
    hidden: int = 64  # width of the graphs
    heads: int = 4  # heads of every cross-modal attention
    reduction: int = 16  # CIR's squeeze-and-excitation reduction ratio r
    gamma: float = 1.0  # CIR's routing temperature
    beta_start: float = 0.1  # CIR's deviation weight at epoch 1...
    beta_end: float = 1.0  # ...rising linearly to this (the maximum suppression strength)...
    beta_warmup: int = 5  # ...over this many epochs; 0: beta_end from the start

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {sorted(FUSIONS)}, got {self.fusion!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden size {self.hidden} is not divisible by {self.heads} heads")
        if self.vsg and self.patch_dim is None:
            raise ValueError("vsg builds an image graph over patch tokens: it needs patches")
        if self.caption_length < 3:
            raise ValueError(f"caption_length {self.caption_length} leaves no room for words beside [CLS] [SEP]")

    @property
    def extras(self) -> tuple[str, ...]:
        return switched_extras(captions=self.captions, patches=self.patch_dim is not None)

    def beta(self, epoch: int) -> float:
        """CIR's beta in 1-based ``epoch``: ``beta_start`` at epoch 1, linear to ``beta_end`` at epoch
        ``beta_warmup`` + 1, constant after."""
        if self.beta_warmup <= 0:
            return self.beta_end
        progress = min(1.0, max(0, epoch - 1) / self.beta_warmup)
        return self.beta_start + progress * (self.beta_end - self.beta_start)


def patch_statistics(visuals: Sequence[ImageVisual], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of all available patch tokens (missing patches left out)."""
    rows = [v.patches for v in visuals if v.patches is not None and len(v.patches)]
    values = np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)
    if len(values) < 2:
        return np.zeros(dim, np.float32), np.ones(dim, np.float32)
    return values.mean(axis=0).astype(np.float32), np.maximum(values.std(axis=0), 1e-6).astype(np.float32)


class PatchPath(nn.Module):
    """The graph stream H_g (B, T, text_dim) per subword: (optionally graph-refined) text states attending to
    patch states."""

    def __init__(self, text_dim: int, cfg: VSGNConfig, dropout: float):
        super().__init__()
        h = cfg.hidden
        self.patch = nn.Sequential(nn.Linear(cfg.patch_dim, h), nn.LayerNorm(h))
        self.text = nn.Sequential(nn.Linear(text_dim, h), nn.LayerNorm(h))
        if cfg.vsg:
            self.text_graph = SimilarityGraph(h, cfg.graph_top_k, cfg.graph_layers, cfg.local_window, dropout)
            self.image_graph = SimilarityGraph(h, cfg.graph_top_k, cfg.graph_layers, None, dropout)
        self.attention = CrossModalAttention(h, cfg.heads, dropout, out_dim=text_dim)
        self.vsg = cfg.vsg

    def forward(self, hidden: torch.Tensor, patches: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """H_g (zero without patches) from the subword states and the standardised patch tokens, and the
        alignment term (a scalar: the mean symmetric KL over the text nodes that have candidate edges, in
        tweets with patches)."""
        patch_mask, text_mask = batch["patch_mask"], batch["attention_mask"].bool()
        patches, text = self.patch(patches), self.text(hidden)
        if not self.vsg:
            return self.attention(text, patches, patch_mask)[0], hidden.new_zeros(())
        text, text_edges, allowed = self.text_graph(text, text_mask)
        patches, image_edges, _ = self.image_graph(patches, patch_mask)
        context, attention = self.attention(text, patches, patch_mask)
        kl = symmetric_kl(text_edges, attended_adjacency(attention, image_edges, allowed))
        rows = allowed.any(-1) & patch_mask.any(-1, keepdim=True)
        return context, (kl * rows).sum() / rows.sum().clamp_min(1)


class FusionStream(FeatureStandardiser):
    """The fusion stream H_out (B, T, text_dim) per subword (section 3.4); standardises the image and
    candidate embeddings with the training statistics."""

    def __init__(self, text_dim: int, cfg: VSGNConfig, dropout: float):
        super().__init__(cfg.visual_dim)
        d = text_dim
        self.image = nn.Sequential(nn.Linear(cfg.visual_dim, d), nn.LayerNorm(d))
        self.patch = None if cfg.patch_dim is None else nn.Sequential(nn.Linear(cfg.patch_dim, d), nn.LayerNorm(d))
        self.region = nn.Sequential(nn.Linear(cfg.visual_dim, d), nn.LayerNorm(d))
        self.region_score = nn.Linear(d, 1)
        self.region_gate = Gate(d)
        self.text_image = CrossModalAttention(d, cfg.heads, dropout)
        self.caption_image = CrossModalAttention(d, cfg.heads, dropout) if cfg.captions else None
        if cfg.fusion == "cir":
            self.combine = ChannelInhibitoryRouting(d, cfg.heads, cfg.reduction, cfg.gamma, cfg.beta(1), dropout)
        else:
            self.combine = FUSIONS[cfg.fusion](d)

    def visual_tokens(self, batch: dict, patches: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """H_i gated with V_R: (B, 1 + P, d) the whole-image token and the patch tokens, and their mask."""
        tokens = self.image(self.standardise(batch["image_features"], "image"))[:, None]
        mask = batch["image_mask"][:, None]
        if self.patch is not None:
            tokens = torch.cat([tokens, self.patch(patches)], dim=1)
            mask = torch.cat([mask, batch["patch_mask"]], dim=1)
        regions = self.region(self.standardise(batch["region_features"], "region"))
        region_mask = batch["region_mask"]
        pooled = (masked_softmax(self.region_score(regions)[..., 0], region_mask)[..., None] * regions).sum(1)
        gated = self.region_gate(tokens, pooled[:, None].expand_as(tokens))
        return torch.where(region_mask.any(1)[:, None, None], gated, tokens), mask

    def forward(self, hidden: torch.Tensor, batch: dict, patches: torch.Tensor | None,
                captions: torch.Tensor, caption_mask: torch.Tensor) -> torch.Tensor:
        """H_out from H_t ``hidden`` (B, T, d), the standardised patch tokens and C ``captions`` (B, C, d)
        with its mask (C = 0 without descriptions)."""
        text_mask = batch["attention_mask"].bool()
        tokens, token_mask = self.visual_tokens(batch, patches)
        h_it = self.text_image(hidden, tokens, token_mask)[0]
        if self.caption_image is not None:
            h_ic = self.caption_image(captions, tokens, token_mask)[0]
            caption_mask = caption_mask & token_mask.any(1, keepdim=True)
        else:
            h_ic = captions
        return self.combine(hidden, text_mask, h_it, h_ic, caption_mask)


class VSGNTagger(VisualModel, CRFTagger):
    """``CRFTagger`` with VSGN's two streams; saved and loaded like it (config in model.json)."""

    kind = "vsgn"
    visual_config = VSGNConfig

    def build_visual(self, text_dim: int, dropout: float) -> None:
        visual = self.visual_cfg
        self.fusion = FusionStream(text_dim, visual, dropout)
        self.patch_path = None
        if visual.patch_dim is not None:
            self.register_buffer("patch_mean", torch.zeros(visual.patch_dim))
            self.register_buffer("patch_std", torch.ones(visual.patch_dim))
            self.patch_path = PatchPath(text_dim, visual, dropout)
            self.stream_gate = Gate(text_dim, per_channel=False, start=GRAPH_GATE_START)

    def fit_feature_statistics(self, visuals: Sequence[ImageVisual]) -> None:
        self.fusion.set_feature_statistics(feature_statistics(visuals, self.visual_cfg.visual_dim))
        if self.patch_path is not None:
            mean, std = patch_statistics(visuals, self.visual_cfg.patch_dim)
            self.patch_mean.copy_(torch.from_numpy(mean))
            self.patch_std.copy_(torch.from_numpy(std))

    def start_epoch(self, epoch: int) -> None:
        """Set CIR's beta for 1-based ``epoch`` (the warm-up of :meth:`VSGNConfig.beta`)."""
        if isinstance(self.fusion.combine, ChannelInhibitoryRouting):
            self.fusion.combine.beta.fill_(self.visual_cfg.beta(epoch))

    def collate_inputs(self, encoded: Sequence[EncodedTweet], visuals: Sequence[ImageVisual], label_ids=None) -> dict:
        """``VisualModel``'s batch plus, with ``captions``, each description as its own sequence:
        ``caption_ids`` (B, L) and ``caption_mask`` (B, L), [CLS] words [SEP] in at most ``caption_length``
        subwords, rows without a description all padding."""
        batch = super().collate_inputs(encoded, visuals, label_ids)
        if not self.visual_cfg.captions:
            return batch
        length = self.visual_cfg.caption_length
        ids = [self.tokenizer(list(v.caption), is_split_into_words=True, truncation=True, max_length=length)
               ["input_ids"] if v.caption else [] for v in visuals]
        width = max(map(len, ids), default=0)
        caption_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        caption_mask = torch.zeros((len(ids), width), dtype=torch.bool)
        for b, row in enumerate(ids):
            caption_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            caption_mask[b, : len(row)] = True
        batch["caption_ids"] = caption_ids.to(self.collate_device)
        batch["caption_mask"] = caption_mask.to(self.collate_device)
        return batch

    def caption_states(self, batch: dict, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """C (B, L, text_dim): the encoder's states of each description, encoded apart from its tweet (only the
        rows that have one); (B, 0, text_dim) without ``captions``."""
        if not self.visual_cfg.captions:
            return hidden[:, :0], batch["attention_mask"][:, :0].bool()
        ids, mask = batch["caption_ids"], batch["caption_mask"]
        states = hidden.new_zeros((*ids.shape, hidden.size(-1)))
        rows = mask.any(1).nonzero()[:, 0]
        if len(rows):
            encoded = self.encoder(input_ids=ids[rows], attention_mask=mask[rows].long()).last_hidden_state
            states = states.index_put((rows,), encoded)
        return states, mask

    def visual_states(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """H_fused at each word's first subword (B, W, text_dim) where visual input exists, the encoder's word
        states elsewhere; and the alignment term."""
        hidden = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        rows = torch.arange(hidden.size(0), device=hidden.device)[:, None]
        words = hidden[rows, batch["word_pos"]]
        visual = batch["image_mask"] | batch["region_mask"].any(1)
        patches = None
        if self.patch_path is not None:
            patch_present = batch["patch_mask"].any(1)
            visual = visual | patch_present
            patches = (batch["patch_tokens"] - self.patch_mean) / self.patch_std
        align = hidden.new_zeros(())
        if not visual.any():  # skipped, so that a text-only batch draws no dropout masks: the text tagger's path
            return words, align
        fused = self.fusion(hidden, batch, patches, *self.caption_states(batch, hidden))
        if self.patch_path is not None and patch_present.any():
            graph, align = self.patch_path(hidden, patches, batch)
            fused = torch.where(patch_present[:, None, None], self.stream_gate(fused, graph), fused)
        # Exactly the encoder's word states where nothing visual is present: the text tagger's path.
        return torch.where(visual[:, None, None], fused[rows, batch["word_pos"]], words), align

    def loss(self, batch: dict) -> torch.Tensor:
        """CRF negative log-likelihood + ``lambda_align`` x the graphs' symmetric KL."""
        states, align = self.visual_states(batch)
        return super().loss(batch, states) + self.visual_cfg.lambda_align * align

    def decode(self, batch: dict) -> list[list[int]]:
        return super().decode(batch, self.visual_states(batch)[0])


def load_predictor(model_dir: str | Path, device: torch.device, store=None) -> VisualPredictor:
    return load_visual_predictor(VSGNTagger, model_dir, device, store)
