"""Projection of a batch's visual inputs (gmner.models.visual_store) into a model's width: per-dimension
standardisation with the training statistics, box geometry and rank, optionally VTC's connector."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from gmner.models.connector import ConnectorConfig, SharedPrivateConnector
from gmner.models.visual_store import GEOMETRY


class FeatureStandardiser(nn.Module):
    """Per-dimension standardisation of region and whole-image embeddings with the training statistics
    (:func:`feature_statistics`), kept as buffers so they are saved with the model. A generated image is
    embedded by the same encoder as the original, so it shares the image statistics."""

    def __init__(self, visual_dim: int):
        super().__init__()
        for name in ("region", "image"):
            self.register_buffer(f"{name}_mean", torch.zeros(visual_dim))
            self.register_buffer(f"{name}_std", torch.ones(visual_dim))

    def set_feature_statistics(self, stats: dict[str, np.ndarray]) -> None:
        for name, value in stats.items():
            getattr(self, name).copy_(torch.from_numpy(value))

    def standardise(self, features: torch.Tensor, kind: str) -> torch.Tensor:
        """``features`` (..., visual_dim) of ``kind`` "region" or "image" (original or generated)."""
        return (features - getattr(self, f"{kind}_mean")) / getattr(self, f"{kind}_std")


class VisualInputs(NamedTuple):
    image: torch.Tensor  # (B, dim)
    generated: torch.Tensor  # (B, dim)
    regions: torch.Tensor  # (B, K, dim)
    balance: torch.Tensor  # the connector's load-balancing term; 0 without connector (or without its MoE)


class VisualProjection(FeatureStandardiser):
    """Region and whole-image inputs of a grounded model, projected to its width ``dim``.

    Embeddings are standardised per dimension (:class:`FeatureStandardiser`); a candidate adds its box
    geometry and its rank. With ``connector`` (gmner.models.connector, e.g. pre-trained by the pretrain stage) the
    standardised candidates first pass through VTC's shared-private connector into its text space.
    """

    def __init__(self, visual_dim: int, top_k: int, dim: int, connector: ConnectorConfig | None = None):
        super().__init__(visual_dim)
        if connector is not None and connector.visual_dim != visual_dim:
            raise ValueError(f"connector reads features of size {connector.visual_dim}, not {visual_dim}")
        self.connector = None if connector is None else SharedPrivateConnector(connector)
        self.region = nn.Linear(visual_dim if connector is None else connector.text_dim, dim)
        self.geometry = nn.Linear(len(GEOMETRY), dim)
        self.rank = nn.Embedding(top_k, dim)
        self.image = nn.Linear(visual_dim, dim)
        self.generated = nn.Linear(visual_dim, dim)

    def project(self, batch: dict) -> VisualInputs:
        """The image, generated-image and candidate inputs of a :func:`collate_visual` batch, and the
        connector's balance term. The generated image's own projection tells it apart from the original."""
        regions = self.standardise(batch["region_features"], "region")
        balance = regions.new_zeros(())
        if self.connector is not None:
            regions, balance, _ = self.connector(regions, batch["region_geometry"], batch["region_mask"])
        regions = self.region(regions) + self.geometry(batch["region_geometry"]) + self.rank(batch["region_rank"])
        image = self.image(self.standardise(batch["image_features"], "image"))
        generated = self.generated(self.standardise(batch["generated_features"], "image"))
        return VisualInputs(image, generated, regions, balance)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, dim) image inputs, (B, dim) generated-image inputs and (B, K, dim) candidate inputs."""
        return self.project(batch)[:3]


class AlignedProjection(FeatureStandardiser):
    """DLRAM's fine-tuning inputs V and O (its Eq. 6), as pre-training aligned them with the text T.

    The image map g_v (``image``) and the object map (``objects``, linear; or VTC's ``connector``) carry the
    standardised embeddings into the pre-trained text space, and one ``adapter`` maps that space into the
    model's width, the text states included (the model's ``text_inputs``): what pre-training aligned stays
    aligned. A candidate adds its box geometry and rank, a generated image a learned marker. Every weight
    but the adapter, geometry, rank and marker comes from the checkpoint (:meth:`load_pretrained`), the
    standardisation statistics included.
    """

    def __init__(self, visual_dim: int, top_k: int, dim: int, text_dim: int, objects: str = "linear",
                 connector: dict | None = None):
        super().__init__(visual_dim)
        if objects not in ("linear", "connector"):
            raise ValueError(f"objects must be 'linear' or 'connector', got {objects!r}")
        self.objects_module = "connector" if objects == "connector" else "objects"  # as the checkpoint names it
        self.image = nn.Linear(visual_dim, text_dim)
        if objects == "connector":
            self.connector = SharedPrivateConnector(ConnectorConfig(visual_dim, text_dim, **(connector or {})))
        else:
            self.objects = nn.Linear(visual_dim, text_dim)
        self.adapter = nn.Linear(text_dim, dim)
        self.geometry = nn.Linear(len(GEOMETRY), dim)
        self.rank = nn.Embedding(top_k, dim)
        self.generated_marker = nn.Parameter(torch.zeros(dim))

    @staticmethod
    def shape_of(checkpoint) -> dict:
        """The constructor arguments (besides the feature, candidate and model sizes) a pretrain checkpoint
        (gmner.pretrain.checkpoint.PretrainCheckpoint) fixes."""
        cfg = checkpoint.config
        return {"text_dim": checkpoint.text_dim, "objects": cfg.objects,
                "connector": cfg.connector if cfg.objects == "connector" else None}

    def load_pretrained(self, checkpoint) -> list[str]:
        """Copy the checkpoint's statistics, image map and object map; returns the modules it lacks (an
        objective switched off in pre-training never trained them), which keep their fresh weights."""
        lacking = []
        modules = {"visual": self, "image": self.image}
        modules[self.objects_module] = getattr(self, self.objects_module)
        for prefix, module in modules.items():
            state = checkpoint.module_state(prefix)
            if not state:
                lacking.append(prefix)
            elif prefix == "visual":
                self.set_feature_statistics({name: value.numpy() for name, value in state.items()})
            else:
                module.load_state_dict(state)
        return lacking

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, dim) image inputs, (B, dim) generated-image inputs and (B, K, dim) candidate inputs."""
        regions = self.standardise(batch["region_features"], "region")
        if self.objects_module == "connector":
            regions = self.connector(regions, batch["region_geometry"], batch["region_mask"]).regions
        else:
            regions = self.objects(regions)
        regions = self.adapter(regions) + self.geometry(batch["region_geometry"]) + self.rank(batch["region_rank"])
        image = self.adapter(self.image(self.standardise(batch["image_features"], "image")))
        generated = self.adapter(self.image(self.standardise(batch["generated_features"], "image")))
        return image, generated + self.generated_marker, regions
