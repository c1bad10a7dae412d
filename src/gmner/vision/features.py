"""The features stage: CLIP / ViT embeddings of original images, detector regions, masked images, generated images
and texts.

One encoder (``features.backend``: open_clip, transformers clip, or transformers vit) embeds everything through
the cached per-item runner. Outputs under data/features/, each sorted by its key (schemas in gmner.core.schema):

- images.parquet     (:func:`~gmner.core.schema.image_features_schema`) one row per distinct image_sha256 of the
                     prepared splits: ``embedding`` and, with ``features.patch_tokens``, the last layer's
                     ``patch_tokens``.
- regions.parquet    (:func:`~gmner.core.schema.region_features_schema`) one row per image of data/regions.parquet:
                     one embedding per box, in the detector's order, of the box cropped from the image.
- masked.parquet     (:func:`~gmner.core.schema.masked_features_schema`) DLRAM's reflection inputs: one row per
                     distinct image of the ``features.masked.splits`` tweets with a gold box; ``boxes``, the
                     distinct gold boxes of its tweets (sorted), and one embedding per box of the whole image with
                     that box filled (``features.masked.fill``: its mean colour, its blur, or CLIP's mean pixel).
- generated.parquet  (:func:`~gmner.core.schema.image_features_schema` without tokens) one row per generated PNG of
                     data/synthesized.parquet.
- text.parquet       (:func:`~gmner.core.schema.text_features_schema`) one row per tweet: the embedding of its words;
                     no rows without ``features.text``.

A missing or undecodable image is a flagged row: null embeddings and its ``skip_reason``, never a zero
vector that would look real. Embeddings are float32 and not normalised. Tables are written in row groups of
about 64 MB, read from the cache as they are written, so memory stays bounded however many images there
are. Summary: data/features_summary.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageFilter, ImageStat

from gmner.core import schema
from gmner.core.atomic import parquet_writer
from gmner.core.errors import DataError
from gmner.core.hashing import digest
from gmner.core.images import LoadedImage
from gmner.core.params import ParamError, check_keys
from gmner.vision.cache import ItemCache
from gmner.vision.detect import gold_boxes
from gmner.vision.inputs import ImageLoad, distinct_images, image_policy, prepared_tables, tweet_text
from gmner.vision.models import ImageEncoder, embed_images, load_image_encoder
from gmner.vision.runner import ARRAYS, Item, StageRun, combined_summary, run_items, stage_device, write_summary

PARAMS = (  # the keys of the `features` params group
    "backend", "model", "pretrained", "tiny", "precision", "batch_size", "num_workers", "patch_tokens", "text",
    "max_pixels", "max_side", "policy", "masked",
)
MASKED_PARAMS = ("splits", "fill", "blur_radius")  # the keys of features.masked
FILLS = ("mean", "blur", "gray")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation mean: a gray box preprocesses to ~0

ROW_GROUP_BYTES = 64 << 20  # embeddings per Parquet row group; real-size patch tokens are ~600 KB an image


@dataclass(frozen=True)
class RegionCrops(ImageLoad):
    """``load`` of a (path, boxes in original pixels) payload: the preprocessed crops [K, 3, H, W]; None for K = 0."""

    def __call__(self, payload):
        path, boxes = payload
        loaded = self.open(path)
        crops = [loaded.image.crop(_pixel_box(loaded, box)) for box in boxes]
        return self.preprocess(crops) if crops else None


@dataclass(frozen=True)
class MaskedCopies(ImageLoad):
    """``load`` of a (path, boxes in original pixels) payload: per box, a copy of the whole image with the box
    filled (``fill``, one of FILLS), preprocessed together [G, 3, H, W]; without ``preprocess`` the PIL copies."""

    fill: str = "mean"
    blur_radius: float = 16.0  # pixels of the loaded image

    def __call__(self, payload):
        path, boxes = payload
        loaded = self.open(path)
        source = self._fill_source(loaded.image)
        copies = []
        for box in boxes:
            region = _pixel_box(loaded, box)
            copy = loaded.image.copy()
            copy.paste(source if isinstance(source, tuple) else source.crop(region), region)
            copies.append(copy)
        return copies if self.preprocess is None else self.preprocess(copies)

    def _fill_source(self, image: Image.Image) -> tuple[int, int, int] | Image.Image:
        """An RGB colour, or an image whose pixels in each box replace the box's (blurred once for all boxes)."""
        if self.fill == "blur":
            return image.filter(ImageFilter.GaussianBlur(self.blur_radius))
        if self.fill == "gray":
            return tuple(round(255 * c) for c in CLIP_MEAN)
        return tuple(round(c) for c in ImageStat.Stat(image).mean)


def _pixel_box(loaded: LoadedImage, box) -> tuple[int, int, int, int]:
    """An xyxy box in original pixels as whole pixels of the loaded (maybe downscaled) image: at least one of
    them, inside it."""
    sx, sy = loaded.scale
    w, h = loaded.image.size
    x0, y0, x1, y1 = box
    left, top = min(math.floor(x0 * sx), w - 1), min(math.floor(y0 * sy), h - 1)
    right, bottom = max(math.ceil(x1 * sx), left + 1), max(math.ceil(y1 * sy), top + 1)
    return left, top, min(right, w), min(bottom, h)


def run_stage(params: dict, root: str | Path = ".") -> dict | None:
    """Embed every input; returns the summary on the main process (None on other ranks)."""
    base, cfg, root = params["base"], params["features"], Path(root)
    check_keys("features", cfg, PARAMS)
    fill = _fill_settings(cfg["masked"], params["prepare"]["files"])
    device = stage_device(base["device"])
    cache_root = root / base["cache_root"]
    encoder = load_image_encoder(cfg, base["seed"], device, where="features.model",
                                 hash_memo=cache_root / "file_hashes")
    if cfg["text"] and not encoder.has_text:
        raise ValueError(f"features.text needs a text tower and backend {encoder.backend} has none: "
                         "set features.text: false or use open_clip / clip")
    tables = prepared_tables(params, root)
    originals = distinct_images(tables, root)
    generated = _generated_images(root)
    regions = pq.read_table(_required(root / "data" / "regions.parquet", "detect"), columns=["image_sha256", "boxes"])
    regions = sorted(regions.to_pylist(), key=lambda row: row["image_sha256"])
    rows, common = cfg["batch_size"], _run_options(cfg)
    runs = {"images": embed_originals(encoder, cfg, cache_root, originals, cfg["patch_tokens"], "features images"),
            "generated": embed_originals(encoder, cfg, cache_root, generated, False, "features generated")}
    runs["regions"], region_keys = embed_regions(encoder, cfg, cache_root, regions, originals, "features regions")
    by_split = dict(zip(params["prepare"]["files"], tables))
    masked = _masked_images([by_split[split] for split in cfg["masked"]["splits"]])
    masked_keys = {row["image_sha256"]: digest(row["image_sha256"], row["boxes"], fill) for row in masked}
    runs["masked"] = run_items(
        [Item(masked_keys[row["image_sha256"]], (originals[row["image_sha256"]], row["boxes"])) for row in masked],
        cache=ItemCache(cache_root, "features-masked", encoder.fingerprint),
        compute=lambda copies: _embed_stacks(encoder, copies, rows),
        load=MaskedCopies(cfg["max_pixels"], cfg["max_side"], encoder.preprocess, **fill),
        desc="features masked", **common,
    )
    tweets = sorted(((row["tweet_id"], row["split"], tweet_text(row["tokens"]))
                     for table in tables for row in table.select(["tweet_id", "split", "tokens"]).to_pylist()),
                    key=lambda t: t[:2]) if cfg["text"] else []
    text_keys = {text: digest(text) for *_, text in tweets}
    runs["text"] = run_items(
        [Item(key, text) for text, key in text_keys.items()],
        cache=ItemCache(cache_root, "features-text", encoder.fingerprint),
        compute=lambda batch: [{"embedding": e} for e in encoder.texts(batch, rows).numpy()],
        desc="features text", **common,
    )
    if not runs["text"].is_main:
        return None

    out, dim = root / "data" / "features", encoder.dim
    token_shape = encoder.token_shape if cfg["patch_tokens"] else None
    _write_images(out / "images.parquet", runs["images"], dim, token_shape)
    _write_images(out / "generated.parquet", runs["generated"], dim, None)
    _write_stacks(out / "regions.parquet", schema.region_features_schema(dim), regions, region_keys,
                  runs["regions"], dim)
    _write_stacks(out / "masked.parquet", schema.masked_features_schema(dim), masked, masked_keys, runs["masked"], dim)
    _write_text(out / "text.parquet", tweets, text_keys, runs["text"], dim)
    summary = {"backend": cfg["backend"], "model": cfg["model"], "dim": dim, **combined_summary(runs)}
    write_summary(root / "data" / "features_summary.json", summary, "features")
    return summary


def _run_options(cfg: dict) -> dict:
    """The runner options every pass shares; every model call has exactly ``batch_size`` rows (see
    gmner.vision.models.fixed_batches)."""
    return dict(policy=image_policy(cfg["policy"], "features.policy"), codec=ARRAYS, batch_size=cfg["batch_size"],
                num_workers=cfg["num_workers"])


def embed_originals(encoder: ImageEncoder, cfg: dict, cache_root: Path, paths: dict[str, str], tokens: bool,
                    desc: str) -> StageRun:
    """The embedding (and with ``tokens`` the patch tokens) of each image, ``paths``: sha256 -> file."""
    return run_items(
        [Item(sha, path) for sha, path in paths.items()],
        cache=ItemCache(cache_root, "features-image", digest(encoder.fingerprint, tokens)),
        compute=lambda pixels: embed_images(encoder, pixels, cfg["batch_size"], tokens),
        load=ImageLoad(cfg["max_pixels"], cfg["max_side"], encoder.preprocess),
        desc=desc, **_run_options(cfg),
    )


def embed_regions(encoder: ImageEncoder, cfg: dict, cache_root: Path, regions: list[dict], originals: dict[str, str],
                  desc: str) -> tuple[StageRun, dict[str, str]]:
    """The embeddings of each image's candidate crops (``regions``: {image_sha256, boxes} sorted by sha256,
    ``originals``: sha256 -> file), and image_sha256 -> item key."""
    keys = {row["image_sha256"]: digest(row["image_sha256"], row["boxes"]) for row in regions}
    run = run_items(
        [Item(keys[row["image_sha256"]], (_path_of(row["image_sha256"], originals), row["boxes"])) for row in regions],
        cache=ItemCache(cache_root, "features-region", encoder.fingerprint),
        compute=lambda crops: _embed_stacks(encoder, crops, cfg["batch_size"]),
        load=RegionCrops(cfg["max_pixels"], cfg["max_side"], encoder.preprocess),
        desc=desc, **_run_options(cfg),
    )
    return run, keys


def _fill_settings(cfg: dict, splits: Collection[str]) -> dict:
    """``features.masked`` checked against the splits of ``prepare.files``: the MaskedCopies settings the masked
    images depend on (part of their item keys; blur_radius only for fill: blur)."""
    check_keys("features.masked", cfg, MASKED_PARAMS)
    chosen, fill, radius = cfg["splits"], cfg["fill"], cfg["blur_radius"]
    if not isinstance(chosen, list) or not all(isinstance(s, str) and s in splits for s in chosen):
        raise ParamError("features.masked.splits", f"{chosen!r} is not a list of prepare.files splits "
                                                   f"({', '.join(splits)})")
    if fill not in FILLS:
        raise ParamError("features.masked.fill", f"{fill!r} is not one of {', '.join(FILLS)}")
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius > 0:
        raise ParamError("features.masked.blur_radius", f"{radius!r} is not a number of pixels > 0")
    return {"fill": fill, "blur_radius": float(radius)} if fill == "blur" else {"fill": fill}


def _masked_images(tables: list[pa.Table]) -> list[dict]:
    """{image_sha256, boxes}, sorted by image_sha256, of every image with a gold box in ``tables``: the distinct
    gold boxes of all its tweets, sorted."""
    boxes: dict[str, set] = {}
    for table in tables:
        for sha, found in gold_boxes(table).items():
            boxes.setdefault(sha, set()).update(map(tuple, found.tolist()))
    return [{"image_sha256": sha, "boxes": [list(box) for box in sorted(boxes[sha])]}
            for sha in sorted(boxes) if boxes[sha]]


def _required(path: Path, stage: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the {stage} stage first")
    return path


def _generated_images(root: Path) -> dict[str, str]:
    """sha256 -> path of every generated PNG (tweets' and entities'), sorted by sha256."""
    table = pq.read_table(_required(root / "data" / "synthesized.parquet", "synthesize"))
    found = {}
    for row in table.select(["image_sha256", "image_path", "entities"]).to_pylist():
        for image in (row, *row["entities"]):
            found[image["image_sha256"]] = str(root / image["image_path"])
    return dict(sorted(found.items()))


def _path_of(sha: str, originals: dict[str, str]) -> str:
    try:
        return originals[sha]
    except KeyError:
        raise DataError("data/regions.parquet", f"image {sha} is in no prepared split; rerun detect") from None


def _embed_stacks(encoder: ImageEncoder, stacks: list[torch.Tensor | None], rows: int) -> list[dict]:
    """One [K, dim] array per stack of K preprocessed images (an image's region crops or masked copies; None:
    K = 0); the images of the whole batch go through the model ``rows`` at a time."""
    counts = [0 if s is None else len(s) for s in stacks]
    flat = [s for s in stacks if s is not None]
    if not flat:
        return [{"embeddings": np.zeros((0, encoder.dim), np.float32)} for _ in stacks]
    pooled = encoder.images(torch.cat(flat), rows, tokens=False)[0].numpy()
    splits = np.split(pooled, np.cumsum(counts)[:-1])
    return [{"embeddings": part.reshape(n, encoder.dim)} for part, n in zip(splits, counts)]


def _write_groups(path: Path, table_schema: pa.Schema, keys: Sequence, table_of: Callable[[Sequence], pa.Table],
                  row_bytes: int) -> None:
    """``table_of(chunk)`` for consecutive chunks of ``keys``, each one row group of about ROW_GROUP_BYTES."""
    step = max(1, ROW_GROUP_BYTES // max(1, row_bytes))
    with parquet_writer(path, table_schema) as writer:
        for start in range(0, len(keys), step):
            writer.write_table(table_of(keys[start : start + step]))


def _write_images(path: Path, run: StageRun, dim: int, token_shape: tuple[int, int] | None) -> None:
    shas = sorted([*run.results, *run.skipped])  # every item: a result or a skip
    _write_groups(path, schema.image_features_schema(dim, token_shape), shas,
                  lambda chunk: images_table(run, chunk, dim, token_shape), 4 * (dim + math.prod(token_shape or (0,))))


def images_table(run: StageRun, shas: Sequence[str], dim: int, token_shape: tuple[int, int] | None) -> pa.Table:
    """The images.parquet rows of ``shas`` (each a result or a skip of ``run``)."""
    found = [run.outcome(sha) for sha in shas]
    columns = {"image_sha256": pa.array(shas, pa.string()),
               "embedding": _tensor_array([r and r["embedding"] for r, _ in found], (dim,))}
    if token_shape is not None:
        columns["patch_tokens"] = _tensor_array([r and r["tokens"] for r, _ in found], token_shape)
    columns["skip_reason"] = pa.array([reason for _, reason in found], pa.string())
    return pa.Table.from_pydict(columns, schema=schema.image_features_schema(dim, token_shape))


def _write_stacks(path: Path, table_schema: pa.Schema, images: list[dict], keys: dict[str, str], run: StageRun,
                  dim: int) -> None:
    most = max((len(row["boxes"]) for row in images), default=1)
    _write_groups(path, table_schema, images, lambda rows: stacks_table(table_schema, rows, keys, run, dim),
                  4 * dim * most)


def stacks_table(table_schema: pa.Schema, rows: Sequence[dict], keys: dict[str, str], run: StageRun,
                 dim: int) -> pa.Table:
    """One row per image of ``rows`` (image_sha256 and boxes, sorted by image_sha256; ``keys``: image_sha256 ->
    item key): its [K, dim] embeddings, and its boxes where ``table_schema`` has them (masked, not regions)."""
    found = [run.outcome(keys[row["image_sha256"]]) for row in rows]
    lengths = [len(r["embeddings"]) if r else 0 for r, _ in found]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    values = np.concatenate([r["embeddings"] for r, _ in found if r] or [np.zeros((0, dim), np.float32)])
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float32()), dim)
    columns = {"image_sha256": pa.array([row["image_sha256"] for row in rows], pa.string()),
               "embeddings": pa.ListArray.from_arrays(offsets, vectors, type=pa.list_(schema.vector(dim)),
                                                      mask=pa.array([r is None for r, _ in found])),
               "skip_reason": pa.array([reason for _, reason in found], pa.string())}
    if "boxes" in table_schema.names:
        columns["boxes"] = pa.array([row["boxes"] for row in rows], table_schema.field("boxes").type)
    return pa.Table.from_pydict(columns, schema=table_schema)


def _write_text(path: Path, tweets: list[tuple[str, str, str]], keys: dict[str, str], run: StageRun,
                dim: int) -> None:
    """``tweets``: (tweet_id, split, text) sorted by tweet_id and split; ``keys``: text -> item key."""
    table_schema = schema.text_features_schema(dim)

    def table_of(chunk: Sequence[tuple[str, str, str]]) -> pa.Table:
        vectors = [run.results[keys[text]]["embedding"] for *_, text in chunk]
        return pa.Table.from_arrays([pa.array([t[0] for t in chunk], pa.string()),
                                     pa.array([t[1] for t in chunk], pa.string()),
                                     _tensor_array(vectors, (dim,))], schema=table_schema)

    _write_groups(path, table_schema, tweets, table_of, 4 * dim)


def _tensor_array(values: list[np.ndarray | None], shape: tuple[int, ...]) -> pa.Array:
    """Nested fixed_size_list<float32> rows of ``shape``; a None row is null (its slot holds no real vector)."""
    flat = np.zeros((len(values), *shape), np.float32)
    for i, value in enumerate(values):
        if value is not None:
            flat[i] = value
    array = pa.array(flat.reshape(-1))
    for size in reversed(shape[1:]):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    return pa.FixedSizeListArray.from_arrays(array, shape[0], mask=pa.array([v is None for v in values], pa.bool_()))
