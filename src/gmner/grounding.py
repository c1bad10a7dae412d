"""Region inputs of grounding models: detector candidates with their features per image, padded and masked,
and the IoU soft labels they are trained against.

An image's inputs are its first ``top_k`` detector candidates (best first, as data/regions.parquet lists
them) with their embeddings (data/features/regions.parquet), normalised box geometry and rank, plus the
whole-image embedding (data/features/images.parquet). Nothing missing is ever zero-filled as if real: an
image without candidates, or whose features are absent or null (a skipped image), contributes masked slots
only, so a model can answer nothing but "none" for its entities; :class:`VisualStore` counts every such
case by reason.

Choices are indexed with "none" first: option 0 is "none", option ``k + 1`` is candidate ``k``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from gmner.boxes import iou_matrix
from gmner.errors import DataError

NONE = 0  # option index of "no region"
GEOMETRY = ("x1/W", "y1/H", "x2/W", "y2/H", "area")  # per-candidate box features, in this order
# Where the pipeline writes what a VisualStore reads (relative to the working directory of the stages).
DEFAULT_PATHS = {
    "regions": "data/regions.parquet",
    "region_features": "data/features/regions.parquet",
    "image_features": "data/features/images.parquet",
}


def geometry(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """(k, 5) float32: x1/W, y1/H, x2/W, y2/H and the box area as a fraction of the image's."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scaled = boxes / np.array([width, height, width, height])
    area = (scaled[:, 2] - scaled[:, 0]) * (scaled[:, 3] - scaled[:, 1])
    return np.concatenate([scaled, area[:, None]], axis=1).astype(np.float32)


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


@dataclass(frozen=True)
class ImageVisual:
    """One tweet's visual inputs. ``embeddings`` / ``image`` are None when those features are unavailable."""

    boxes: np.ndarray  # (k, 4) float32 xyxy pixels, best first; k may be 0
    embeddings: np.ndarray | None  # (k, d)
    image: np.ndarray | None  # (d,)
    width: float = 1.0
    height: float = 1.0

    @property
    def valid(self) -> np.ndarray:
        """Which candidates are usable: all of them when their features exist, none otherwise."""
        return np.full(len(self.boxes), self.embeddings is not None)


NO_IMAGE = ImageVisual(np.zeros((0, 4), np.float32), None, None)


def collate_visual(items: Sequence[ImageVisual], dim: int, device: torch.device | str = "cpu") -> dict:
    """Pad a batch of ``ImageVisual`` to its largest candidate count K (possibly 0).

    ``region_features`` (B, K, dim), ``region_geometry`` (B, K, 5), ``region_rank`` (B, K) and
    ``image_features`` (B, dim) hold zeros wherever ``region_mask`` (B, K) / ``image_mask`` (B) is False:
    padding, missing features, or no image. Masks are True for real, usable inputs.
    """
    n, k = len(items), max((len(v.boxes) for v in items), default=0)
    features = torch.zeros((n, k, dim))
    geom = torch.zeros((n, k, len(GEOMETRY)))
    mask = torch.zeros((n, k), dtype=torch.bool)
    image = torch.zeros((n, dim))
    image_mask = torch.zeros(n, dtype=torch.bool)
    for b, v in enumerate(items):
        m = len(v.boxes)
        if v.embeddings is not None and m:
            features[b, :m] = torch.from_numpy(np.asarray(v.embeddings, dtype=np.float32))
            geom[b, :m] = torch.from_numpy(geometry(v.boxes, v.width, v.height))
            mask[b, :m] = True
        if v.image is not None:
            image[b] = torch.from_numpy(np.asarray(v.image, dtype=np.float32))
            image_mask[b] = True
    batch = {
        "region_features": features,
        "region_geometry": geom,
        "region_rank": torch.arange(k).expand(n, k),
        "region_mask": mask,
        "image_features": image,
        "image_mask": image_mask,
    }
    return {key: value.to(device) for key, value in batch.items()}


def feature_statistics(items: Sequence[ImageVisual], dim: int) -> dict[str, np.ndarray]:
    """Per-dimension mean and std of the available region and whole-image embeddings of ``items``.

    Models standardise features with these: embeddings of one encoder share a large common direction
    (cosine about 0.94 between any two regions of the sample's tiny CLIP), which per-vector normalisation
    keeps and per-dimension standardisation removes. Missing features are left out, never counted as zeros.
    """
    out = {}
    for name, rows in (
        ("region", [v.embeddings for v in items if v.embeddings is not None and len(v.embeddings)]),
        ("image", [v.image[None] for v in items if v.image is not None]),
    ):
        values = np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)
        out[f"{name}_mean"] = values.mean(axis=0) if len(values) else np.zeros(dim, np.float32)
        out[f"{name}_std"] = np.maximum(values.std(axis=0), 1e-6) if len(values) > 1 else np.ones(dim, np.float32)
    return {key: value.astype(np.float32) for key, value in out.items()}


class VisualProjection(nn.Module):
    """Region and whole-image inputs of a grounded model, projected to its width ``dim``.

    Embeddings are standardised per dimension with the training statistics (:func:`feature_statistics`,
    kept as buffers so they are saved with the model); a candidate adds its box geometry and its rank.
    """

    def __init__(self, visual_dim: int, top_k: int, dim: int):
        super().__init__()
        for name in ("region", "image"):
            self.register_buffer(f"{name}_mean", torch.zeros(visual_dim))
            self.register_buffer(f"{name}_std", torch.ones(visual_dim))
        self.region = nn.Linear(visual_dim, dim)
        self.geometry = nn.Linear(len(GEOMETRY), dim)
        self.rank = nn.Embedding(top_k, dim)
        self.image = nn.Linear(visual_dim, dim)

    def set_feature_statistics(self, stats: dict[str, np.ndarray]) -> None:
        for name, value in stats.items():
            getattr(self, name).copy_(torch.from_numpy(value))

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, dim) image inputs and (B, K, dim) candidate inputs of a :func:`collate_visual` batch."""
        regions = self.region((batch["region_features"] - self.region_mean) / self.region_std)
        regions = regions + self.geometry(batch["region_geometry"]) + self.rank(batch["region_rank"])
        image = self.image((batch["image_features"] - self.image_mean) / self.image_std)
        return image, regions


class VisualStore:
    """Candidates and features by image_sha256, from the regions and features tables, cut to ``top_k``."""

    def __init__(self, regions: pa.Table, region_features: pa.Table, image_features: pa.Table, top_k: int):
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        self.top_k = top_k
        self.regions = regions  # what predicted region indices point into, for the evaluator
        self.boxes = {
            sha: np.zeros((0, 4), np.float32) if boxes is None else boxes
            for sha, boxes in _unique_rows(regions, "boxes", "regions").items()
        }
        self.region_features = _unique_rows(region_features, "embeddings", "region features")
        self.image_features = _unique_rows(image_features, "embedding", "image features")
        self.dim = _dimension(image_features, "embedding") or _dimension(region_features, "embeddings")
        if self.dim is None:
            raise DataError("image features", "no embedding column type gives the feature size")

    @classmethod
    def read(cls, paths: Mapping[str, str | Path], top_k: int) -> "VisualStore":
        """Read the tables named in ``paths`` (keys as in ``DEFAULT_PATHS``)."""
        tables = {}
        for key in DEFAULT_PATHS:
            path = Path(paths[key])
            if not path.is_file():
                raise FileNotFoundError(f"{path}: {key} table not found; run the detect and features stages")
            tables[key] = pq.read_table(path)
        return cls(tables["regions"], tables["region_features"], tables["image_features"], top_k)

    def candidates(self, sha: str) -> np.ndarray:
        """The image's first ``top_k`` candidate boxes: what a predicted region index points into."""
        return self.boxes[sha][: self.top_k]

    def lookup(self, sha: str | None, width, height, counts: Counter) -> ImageVisual:
        """One tweet's inputs; every input found missing is counted in ``counts`` by reason."""
        counts["tweets"] += 1
        if sha is None:
            counts["no_image"] += 1
            counts["only_none"] += 1
            return NO_IMAGE
        image = self.image_features.get(sha)
        if image is None:
            counts["image_feature_missing"] += 1
        if sha not in self.boxes:
            counts["not_in_regions"] += 1
            counts["only_none"] += 1
            return ImageVisual(NO_IMAGE.boxes, None, image, width, height)
        boxes = self.boxes[sha]
        embeddings = self.region_features.get(sha)
        if not len(boxes):
            counts["no_candidates"] += 1
        elif embeddings is None:
            counts["region_features_missing"] += 1
        elif len(embeddings) != len(boxes):
            raise DataError(
                f"region features of image {sha}",
                f"{len(embeddings)} embeddings for {len(boxes)} candidates; rerun the features stage",
            )
        if not len(boxes) or embeddings is None:
            counts["only_none"] += 1
            embeddings = None
        else:
            embeddings = embeddings[: self.top_k]
        return ImageVisual(boxes[: self.top_k], embeddings, image, width, height)

    def lookup_table(self, tweets: pa.Table) -> tuple[list[ImageVisual], Counter]:
        """``lookup`` for every row of a prepared table (image_sha256, width, height), with the counts."""
        counts: Counter = Counter()
        rows = tweets.select(["image_sha256", "width", "height"]).to_pylist()
        return [self.lookup(r["image_sha256"], r["width"], r["height"], counts) for r in rows], counts


def _unique_rows(table: pa.Table, column: str, what: str) -> dict[str, np.ndarray | None]:
    """image_sha256 -> the row's ``column`` as a float32 array (a vector, or one row per candidate), None where
    null (a skipped image); duplicates are refused. Read through Arrow buffers, not Python lists."""
    shas = table.column("image_sha256").to_pylist()
    if len(set(shas)) != len(shas):
        dup = next(sha for sha, n in Counter(shas).items() if n > 1)
        raise DataError(f"{what} image {dup}", "appears twice")
    array = table.column(column).combine_chunks()
    nulls = array.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(array.type):  # one vector per image
        values = _rows(array)
        return {sha: None if null else values[i] for i, (sha, null) in enumerate(zip(shas, nulls))}
    # A list of fixed-size vectors per image; offsets index the whole child array.
    offsets, vectors = array.offsets.to_numpy(), _rows(array.values)
    return {
        sha: None if null else vectors[offsets[i] : offsets[i + 1]]
        for i, (sha, null) in enumerate(zip(shas, nulls))
    }


def _rows(array: pa.FixedSizeListArray) -> np.ndarray:
    """(len, size) float32 of a fixed-size list array, null rows included (``flatten`` would drop them)."""
    size = array.type.list_size
    values = array.values.slice(array.offset * size, len(array) * size)
    return values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(array), size)


def _dimension(table: pa.Table, column: str) -> int | None:
    kind = table.schema.field(column).type
    while pa.types.is_list(kind) or pa.types.is_large_list(kind):
        kind = kind.value_type
    return kind.list_size if pa.types.is_fixed_size_list(kind) else None
