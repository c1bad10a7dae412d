"""The visual inputs of every visual model, joined from the pipeline's tables: detector candidates with their
features per image (padded and masked into batches) and the optional extras (captions, patch tokens,
generated images, CLIP text embeddings, masked images).

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gmner.core.errors import DataError

NONE = 0  # option index of "no region"
GEOMETRY = ("x1/W", "y1/H", "x2/W", "y2/H", "area")  # per-candidate box features, in this order
# Where the pipeline writes what a VisualStore reads (relative to the working directory of the stages): the
# first three always, the rest only for the EXTRAS a model asks for.
DEFAULT_PATHS = {
    "regions": "data/regions.parquet",
    "region_features": "data/features/regions.parquet",
    "image_features": "data/features/images.parquet",
    "captions": "data/captions.parquet",
    "synthesized": "data/synthesized.parquet",
    "generated_features": "data/features/generated.parquet",
    "text_features": "data/features/text.parquet",
    "masked_features": "data/features/masked.parquet",
}
REQUIRED = ("regions", "region_features", "image_features")
# Optional inputs -> the tables they read: BLIP captions, ViT / CLIP patch tokens of the image, the
# synthesize stage's generated images (tweet and entity images) with its relevance flag, CLIP text embeddings,
# the image re-embedded with one gold box filled (DLRAM's masked images; per tweet, those of its own entities).
EXTRAS = {
    "captions": ("captions",),
    "patches": (),  # a column of image_features
    "generated": ("synthesized", "generated_features"),
    "text": ("text_features",),
    "masked": ("masked_features",),
}


def switched_extras(**switches: bool) -> tuple[str, ...]:
    """The EXTRAS whose switch is on, e.g. ``switched_extras(captions=True, generated=False)``."""
    unknown = set(switches) - set(EXTRAS)
    if unknown:
        raise ValueError(f"unknown visual extras {sorted(unknown)}; known: {sorted(EXTRAS)}")
    return tuple(sorted(name for name, on in switches.items() if on))


def geometry(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """(k, 5) float32: x1/W, y1/H, x2/W, y2/H and the box area as a fraction of the image's."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scaled = boxes / np.array([width, height, width, height])
    area = (scaled[:, 2] - scaled[:, 0]) * (scaled[:, 3] - scaled[:, 1])
    return np.concatenate([scaled, area[:, None]], axis=1).astype(np.float32)


@dataclass(frozen=True)
class ImageVisual:
    """One tweet's visual inputs. Every array is None when unavailable (or not asked for): never zeros."""

    boxes: np.ndarray  # (k, 4) float32 xyxy pixels, best first; k may be 0
    embeddings: np.ndarray | None  # (k, d)
    image: np.ndarray | None  # (d,)
    width: float = 1.0
    height: float = 1.0
    # Extras (see EXTRAS), per tweet:
    caption: tuple[str, ...] | None = None  # the image's caption, split into words
    patches: np.ndarray | None = None  # (p, w) the image's patch tokens
    generated: np.ndarray | None = None  # (d,) the image generated from the tweet
    relevant: bool | None = None  # the synthesize stage's verdict on the original image; None: no verdict
    entity_images: dict | None = None  # (start, end) of an entity -> (d,) the image generated for it
    text: np.ndarray | None = None  # (d,) the CLIP embedding of the tweet's words
    masked: np.ndarray | None = None  # (m, d) the image re-embedded with each of the tweet's gold boxes filled

    @property
    def valid(self) -> np.ndarray:
        """Which candidates are usable: all of them when their features exist, none otherwise."""
        return np.full(len(self.boxes), self.embeddings is not None)


NO_IMAGE = ImageVisual(np.zeros((0, 4), np.float32), None, None)


def collate_visual(
    items: Sequence[ImageVisual], dim: int, device: torch.device | str = "cpu", patch_dim: int | None = None
) -> dict:
    """Pad a batch of ``ImageVisual`` to its largest candidate count K (possibly 0).

    ``region_features`` (B, K, dim), ``region_geometry`` (B, K, 5), ``region_rank`` (B, K) and
    ``image_features`` (B, dim) hold zeros wherever ``region_mask`` (B, K) / ``image_mask`` (B) is False:
    padding, missing features, or no image. Masks are True for real, usable inputs. The extras come the same
    way: ``generated_features`` / ``text_features`` (B, dim) with their masks, ``relevant`` (B) with
    ``relevant_mask`` (a verdict exists), with ``patch_dim``, ``patch_tokens`` (B, P, patch_dim) with
    ``patch_mask`` (B, P), and the batch's masked images flat: ``masked_features`` (M, dim), each of tweet
    ``masked_tweet`` (M,).
    """
    n, k = len(items), max((len(v.boxes) for v in items), default=0)
    features = torch.zeros((n, k, dim))
    geom = torch.zeros((n, k, len(GEOMETRY)))
    mask = torch.zeros((n, k), dtype=torch.bool)
    for b, v in enumerate(items):
        m = len(v.boxes)
        if v.embeddings is not None and m:
            features[b, :m] = torch.from_numpy(np.asarray(v.embeddings, dtype=np.float32))
            geom[b, :m] = torch.from_numpy(geometry(v.boxes, v.width, v.height))
            mask[b, :m] = True
    batch = {
        "region_features": features,
        "region_geometry": geom,
        "region_rank": torch.arange(k).expand(n, k),
        "region_mask": mask,
        "relevant": torch.tensor([bool(v.relevant) for v in items], dtype=torch.bool),
        "relevant_mask": torch.tensor([v.relevant is not None for v in items], dtype=torch.bool),
    }
    for name, field in (("image", "image"), ("generated", "generated"), ("text", "text")):
        batch[f"{name}_features"], batch[f"{name}_mask"] = _stack([getattr(v, field) for v in items], (dim,))
    if patch_dim is not None:
        p = max((len(v.patches) for v in items if v.patches is not None), default=0)
        patches = torch.zeros((n, p, patch_dim))
        patch_mask = torch.zeros((n, p), dtype=torch.bool)
        for b, v in enumerate(items):
            if v.patches is not None:
                patches[b, : len(v.patches)] = torch.from_numpy(np.asarray(v.patches, dtype=np.float32))
                patch_mask[b, : len(v.patches)] = True
        batch["patch_tokens"], batch["patch_mask"] = patches, patch_mask
    masked = [(b, v.masked) for b, v in enumerate(items) if v.masked is not None and len(v.masked)]
    batch["masked_features"] = torch.from_numpy(np.concatenate([m for _, m in masked], dtype=np.float32)
                                                if masked else np.zeros((0, dim), np.float32))
    batch["masked_tweet"] = torch.tensor([b for b, m in masked for _ in m], dtype=torch.long)
    return {key: value.to(device) for key, value in batch.items()}


def _stack(vectors: Sequence[np.ndarray | None], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, *shape) with zeros where a vector is None, and the (B,) mask of the present ones."""
    out = torch.zeros((len(vectors), *shape))
    mask = torch.zeros(len(vectors), dtype=torch.bool)
    for b, vector in enumerate(vectors):
        if vector is not None:
            out[b] = torch.from_numpy(np.asarray(vector, dtype=np.float32))
            mask[b] = True
    return out, mask


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


class VisualStore:
    """Candidates and features by image_sha256, from the regions and features tables, cut to ``top_k``; and
    the ``extras`` asked for (see ``EXTRAS``), from the tables ``extra_tables`` holds by DEFAULT_PATHS key."""

    def __init__(
        self,
        regions: pa.Table,
        region_features: pa.Table,
        image_features: pa.Table,
        top_k: int,
        extras: Sequence[str] = (),
        extra_tables: Mapping[str, pa.Table] | None = None,
    ):
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        self.sources: tuple[Path, ...] = ()  # the files ``read`` read the tables from
        unknown = set(extras) - set(EXTRAS)
        if unknown:
            raise ValueError(f"unknown visual extras {sorted(unknown)}; known: {sorted(EXTRAS)}")
        self.extras = tuple(sorted(extras))
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
        self._read_extras(image_features, dict(extra_tables or {}))

    def _read_extras(self, image_features: pa.Table, tables: dict[str, pa.Table]) -> None:
        missing = {key for extra in self.extras for key in EXTRAS[extra]} - set(tables)
        if missing:
            raise ValueError(f"visual extras {list(self.extras)} need the tables {sorted(missing)}")
        self.patch_dim = None
        if "patches" in self.extras:
            if "patch_tokens" not in image_features.column_names:
                raise DataError("image features", "no patch_tokens column; run the features stage with patch_tokens")
            self.patches = _unique_rows(image_features, "patch_tokens", "image features")
            self.patch_dim = image_features.schema.field("patch_tokens").type.value_type.list_size
        if "captions" in self.extras:
            captions = tables["captions"]
            self.captions = {
                sha: None if text is None else tuple(text.split())
                for sha, text in zip(*(captions.column(c).to_pylist() for c in ("image_sha256", "caption")))
            }
        if "generated" in self.extras:
            generated = _unique_rows(tables["generated_features"], "embedding", "generated image features")
            self.generated = {}
            for row in tables["synthesized"].select(["tweet_id", "split", "image_sha256", "relevant", "entities"]
                                                   ).to_pylist():
                entities = {(e["start"], e["end"]): generated.get(e["image_sha256"]) for e in row["entities"]}
                self.generated[(row["tweet_id"], row["split"])] = (
                    generated.get(row["image_sha256"]), row["relevant"],
                    {span: emb for span, emb in entities.items() if emb is not None},
                )
        if "masked" in self.extras:
            masked = tables["masked_features"]
            boxes = _unique_rows(masked, "boxes", "masked images")
            self.masked = {sha: (boxes[sha], embeddings)
                           for sha, embeddings in _unique_rows(masked, "embeddings", "masked images").items()}
        if "text" in self.extras:
            text = tables["text_features"]
            keys = zip(text.column("tweet_id").to_pylist(), text.column("split").to_pylist())
            vectors = _rows(text.column("embedding").combine_chunks())
            self.text = {key: vectors[i] for i, key in enumerate(keys)}

    @classmethod
    def read(cls, paths: Mapping[str, str | Path], top_k: int, extras: Sequence[str] = ()) -> "VisualStore":
        """Read the tables named in ``paths`` (keys as in ``DEFAULT_PATHS``) that ``extras`` need."""
        needed = [*REQUIRED, *(key for extra in extras for key in EXTRAS.get(extra, ()))]
        tables, sources = {}, []
        for key in needed:
            path = Path(paths.get(key, DEFAULT_PATHS[key]))
            if not path.is_file():
                raise FileNotFoundError(f"{path}: {key} table not found; run the stage that writes it")
            tables[key] = pq.read_table(path)
            sources.append(path)
        required = [tables.pop(key) for key in REQUIRED]
        store = cls(*required, top_k, extras=extras, extra_tables=tables)
        store.sources = tuple(sources)
        return store

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
        """``lookup`` (plus the extras) for every row of a prepared table, with the counts."""
        counts: Counter = Counter()
        wanted = ["tweet_id", "split"] + ["entities"] * ("masked" in self.extras)
        columns = ["image_sha256", "width", "height"] + [c for c in wanted if c in tweets.column_names]
        out = []
        for r in tweets.select(columns).to_pylist():
            visual = self.lookup(r["image_sha256"], r["width"], r["height"], counts)
            gold = [box for e in r.get("entities") or () for box in e["boxes"]]
            out.append(self.with_extras(visual, r["image_sha256"], (r.get("tweet_id"), r.get("split")), counts,
                                        np.asarray(gold, np.float32).reshape(-1, 4)))
        return out, counts

    def with_extras(self, visual: ImageVisual, sha: str | None, tweet: tuple, counts: Counter,
                    gold: np.ndarray | None = None) -> ImageVisual:
        """``visual`` with the extras of image ``sha`` and tweet (tweet_id, split) whose entities have the
        ``gold`` boxes (G, 4); missing ones counted."""
        found = {}
        if "captions" in self.extras and sha is not None:
            found["caption"] = self.captions.get(sha)
            counts["caption_missing"] += found["caption"] is None
        if "patches" in self.extras and sha is not None:
            found["patches"] = self.patches.get(sha)
            counts["patches_missing"] += found["patches"] is None
        if "generated" in self.extras:
            generated, relevant, entities = self.generated.get(tweet, (None, None, {}))
            found.update(generated=generated, relevant=relevant, entity_images=entities)
            counts["generated_missing"] += generated is None
        if "text" in self.extras:
            found["text"] = self.text.get(tweet)
            counts["text_feature_missing"] += found["text"] is None
        if "masked" in self.extras and sha is not None:
            found["masked"] = self.masked_images(sha, gold, counts)
        return replace(visual, **found) if found else visual

    def masked_images(self, sha: str, gold: np.ndarray | None, counts: Counter) -> np.ndarray | None:
        """The embeddings of image ``sha`` re-embedded with one of the ``gold`` boxes (G, 4) filled, found by
        exact box values, each once. None without gold boxes, and (counted as masked_missing) when the image
        has no masked row or a skipped one; a gold box without its embedding is counted as masked_box_missing."""
        if gold is None or not len(gold):
            return None
        boxes, embeddings = self.masked.get(sha, (None, None))
        if embeddings is None:
            counts["masked_missing"] += 1
            return None
        if boxes is None or len(boxes) != len(embeddings):
            raise DataError(f"masked images of image {sha}", f"{len(embeddings)} embeddings for "
                            f"{0 if boxes is None else len(boxes)} boxes; rerun the features stage")
        match = (boxes[:, None] == np.unique(gold, axis=0)[None]).all(axis=-1)  # (rows, distinct gold boxes)
        counts["masked_box_missing"] += int((~match.any(axis=0)).sum())
        return embeddings[match.any(axis=1)]


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
    """(len, size[, size2 ...]) float32 of a (nested) fixed-size list array, null rows included (``flatten``
    would drop them)."""
    shape, values, start, count = [len(array)], array, array.offset, len(array)
    while pa.types.is_fixed_size_list(values.type):
        size = values.type.list_size
        shape.append(size)
        values, start, count = values.values, (values.offset + start) * size, count * size
    return values.slice(start, count).to_numpy(zero_copy_only=False).astype(np.float32).reshape(shape)


def _dimension(table: pa.Table, column: str) -> int | None:
    kind = table.schema.field(column).type
    while pa.types.is_list(kind) or pa.types.is_large_list(kind):
        kind = kind.value_type
    return kind.list_size if pa.types.is_fixed_size_list(kind) else None
