"""The features stage: CLIP / ViT embeddings of original images, detector regions, generated images and texts.

One encoder (``features.backend``: open_clip, transformers clip, or transformers vit) embeds everything through
the cached per-item runner. Outputs under data/features/, each sorted by its key:

- images.parquet     (:func:`images_schema`) one row per distinct image_sha256 of the prepared splits:
                     ``embedding`` and, with ``features.patch_tokens``, the last layer's ``patch_tokens``.
- regions.parquet    (:func:`regions_schema`) one row per image of data/regions.parquet: one embedding per
                     box, in the detector's order, of the box cropped from the image.
- generated.parquet  (:func:`images_schema` without tokens) one row per generated PNG of data/synthesized.parquet.
- text.parquet       (:func:`text_schema`) one row per tweet: the embedding of its words; no rows without
                     ``features.text``.

A missing or undecodable image is a flagged row: null embeddings and its ``skip_reason``, never a zero
vector that would look real. Embeddings are float32 and not normalised. Summary: data/features_summary.json.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gmner.atomic import write_json, write_parquet
from gmner.cache import ItemCache, digest
from gmner.errors import DataError, Policy
from gmner.images import load_image
from gmner.item_stage import ARRAYS, Item, init_distributed, run_items
from gmner.params import resolve_device
from gmner.vision_inputs import ImageLoad, distinct_images, prepared_tables, skip_reason, tweet_text
from gmner.vision_models import ImageEncoder, load_image_encoder

log = logging.getLogger(__name__)


def _vector(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def images_schema(dim: int, token_shape: tuple[int, int] | None = None) -> pa.Schema:
    fields = [("image_sha256", pa.string()), ("embedding", _vector(dim))]
    if token_shape is not None:
        patches, width = token_shape
        fields.append(("patch_tokens", pa.list_(_vector(width), patches)))
    return pa.schema(fields + [("skip_reason", pa.string())])  # skip_reason: a gmner.images.SKIP_REASONS kind


def regions_schema(dim: int) -> pa.Schema:
    fields = [("image_sha256", pa.string()), ("embeddings", pa.list_(_vector(dim))), ("skip_reason", pa.string())]
    return pa.schema(fields)


def text_schema(dim: int) -> pa.Schema:
    return pa.schema([("tweet_id", pa.string()), ("split", pa.string()), ("embedding", _vector(dim))])


@dataclass(frozen=True)
class RegionCrops:
    """Picklable ``load``: (path, boxes in original pixels) -> the transformed crops, stacked [K, 3, H, W]."""

    max_pixels: int
    max_side: int
    transform: Callable

    def __call__(self, payload):
        import torch

        path, boxes = payload
        loaded = load_image(path, self.max_pixels, self.max_side)
        sx, sy = loaded.scale
        w, h = loaded.image.size
        crops = []
        for x0, y0, x1, y1 in boxes:
            # Whole pixels on the loaded image, at least one of them, inside it.
            left, top = min(math.floor(x0 * sx), w - 1), min(math.floor(y0 * sy), h - 1)
            right, bottom = max(math.ceil(x1 * sx), left + 1), max(math.ceil(y1 * sy), top + 1)
            crops.append(self.transform(loaded.image.crop((left, top, min(right, w), min(bottom, h)))))
        return torch.stack(crops) if crops else None


def run_stage(params: dict, root: str | Path = ".") -> dict | None:
    """Embed every input; returns the summary on the main process (None on other ranks)."""
    base, cfg, root = params["base"], params["features"], Path(root)
    device = resolve_device(base["device"])
    state = init_distributed(cpu=device.type == "cpu")
    if state.num_processes > 1:
        device = state.device
    cache_root = root / base["cache_root"]
    encoder = load_image_encoder(cfg, base["seed"], device, where="features.model",
                                 hash_memo=cache_root / "file_hashes")
    if cfg["text"] and not encoder.has_text:
        raise ValueError(f"features.text needs a text tower and backend {encoder.backend} has none: "
                         "set features.text: false or use open_clip / clip")
    tables = prepared_tables(params, root)
    originals = distinct_images(tables, root)
    generated = _generated_images(root)
    regions = pq.read_table(_required(root / "data" / "regions.parquet", "detect")).to_pylist()
    rows = cfg["batch_size"]  # every model call has exactly this many rows (see vision_models.fixed_batches)
    common = dict(policy=Policy(cfg["policy"]), batch_size=rows, num_workers=cfg["num_workers"])
    out, runs = root / "data" / "features", {}

    def embed_images(paths: dict[str, str], tokens: bool, desc: str):
        runs[desc] = run_items(
            [Item(sha, path) for sha, path in paths.items()],
            cache=ItemCache(cache_root, "features-image", digest(encoder.fingerprint, tokens)),
            compute=lambda pixels: _embed(encoder, pixels, tokens, rows),
            load=ImageLoad(cfg["max_pixels"], cfg["max_side"], encoder.transform),
            codec=ARRAYS, desc=desc, **common,
        )
        return runs[desc]

    images = embed_images(originals, cfg["patch_tokens"], "features images")
    gen = embed_images(generated, False, "features generated")
    region_keys = {row["image_sha256"]: digest(row["image_sha256"], row["boxes"]) for row in regions}
    runs["features regions"] = reg = run_items(
        [Item(region_keys[row["image_sha256"]], (_path_of(row["image_sha256"], originals), row["boxes"]))
         for row in regions],
        cache=ItemCache(cache_root, "features-region", encoder.fingerprint),
        compute=lambda crops: _embed_regions(encoder, crops, rows),
        load=RegionCrops(cfg["max_pixels"], cfg["max_side"], encoder.transform),
        codec=ARRAYS, desc="features regions", **common,
    )
    tweets = sorted(((row["tweet_id"], row["split"], tweet_text(row["tokens"]))
                     for table in tables for row in table.select(["tweet_id", "split", "tokens"]).to_pylist()),
                    key=lambda t: t[:2]) if cfg["text"] else []
    text_keys = {text: digest(text) for *_, text in tweets}
    runs["features text"] = texts = run_items(
        [Item(key, text) for text, key in text_keys.items()],
        cache=ItemCache(cache_root, "features-text", encoder.fingerprint),
        compute=lambda batch: [{"embedding": e} for e in encoder.texts(batch, rows).numpy()],
        codec=ARRAYS, desc="features text", **common,
    )
    if not texts.is_main:
        return None

    limits = cfg["max_pixels"], cfg["max_side"]
    tokens_shape = encoder.token_shape if cfg["patch_tokens"] else None
    write_parquet(out / "images.parquet", _images_table(originals, images.results, encoder.dim, tokens_shape, limits))
    write_parquet(out / "generated.parquet", _images_table(generated, gen.results, encoder.dim, None, limits))
    write_parquet(out / "regions.parquet",
                  _regions_table(regions, region_keys, originals, reg.results, encoder.dim, limits))
    text_rows = [texts.results[text_keys[text]]["embedding"] for *_, text in tweets]
    write_parquet(out / "text.parquet", pa.Table.from_arrays(
        [pa.array([t[0] for t in tweets], pa.string()), pa.array([t[1] for t in tweets], pa.string()),
         _tensor_array(text_rows, (encoder.dim,))], schema=text_schema(encoder.dim)))
    summary = {
        "backend": cfg["backend"], "model": cfg["model"], "dim": encoder.dim,
        **{desc.removeprefix("features "): run.summary for desc, run in runs.items()},
        "model_calls": sum(run.summary["model_calls"] for run in runs.values()),
        "cache_hits": sum(run.summary["cache_hits"] for run in runs.values()),
        "wall_s": round(sum(run.summary["wall_s"] for run in runs.values()), 3),
    }
    write_json(root / "data" / "features_summary.json", summary)
    log.info("features: %d model calls, %d cache hits", summary["model_calls"], summary["cache_hits"])
    return summary


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


def _embed(encoder: ImageEncoder, pixels: list, tokens: bool, rows: int) -> list[dict]:
    pooled, patches = encoder.images(pixels, rows)
    pooled = pooled.numpy()
    if not tokens:
        return [{"embedding": e} for e in pooled]
    return [{"embedding": e, "tokens": t} for e, t in zip(pooled, patches.numpy())]


def _embed_regions(encoder: ImageEncoder, crops: list, rows: int) -> list[dict]:
    """One [K, dim] array per image; the crops of the whole batch go through the model ``rows`` at a time."""
    counts = [0 if c is None else len(c) for c in crops]
    flat = [crop for c in crops if c is not None for crop in c]
    pooled = encoder.images(flat, rows)[0].numpy() if flat else np.zeros((0, encoder.dim), np.float32)
    splits = np.split(pooled, np.cumsum(counts)[:-1])
    return [{"embeddings": part.reshape(n, encoder.dim)} for part, n in zip(splits, counts)]


def _images_table(paths: dict, results: dict, dim: int, token_shape, limits) -> pa.Table:
    shas = sorted(paths)
    found = [results.get(sha) for sha in shas]
    columns = {"image_sha256": pa.array(shas, pa.string()),
               "embedding": _tensor_array([r and r["embedding"] for r in found], (dim,))}
    if token_shape is not None:
        columns["patch_tokens"] = _tensor_array([r and r["tokens"] for r in found], token_shape)
    columns["skip_reason"] = pa.array([None if r else skip_reason(paths[s], *limits) for s, r in zip(shas, found)],
                                      pa.string())
    return pa.Table.from_pydict(columns, schema=images_schema(dim, token_shape))


def _regions_table(regions: list[dict], keys: dict, originals: dict, results: dict, dim: int, limits) -> pa.Table:
    rows = sorted(regions, key=lambda row: row["image_sha256"])
    found = [results.get(keys[row["image_sha256"]]) for row in rows]
    lengths = [len(r["embeddings"]) if r else 0 for r in found]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    values = np.concatenate([r["embeddings"] for r in found if r] or [np.zeros((0, dim), np.float32)])
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float32()), dim)
    embeddings = pa.ListArray.from_arrays(offsets, vectors, type=pa.list_(_vector(dim)),
                                          mask=pa.array([r is None for r in found]))
    reasons = [None if r else skip_reason(originals[row["image_sha256"]], *limits) for row, r in zip(rows, found)]
    return pa.Table.from_arrays([pa.array([row["image_sha256"] for row in rows], pa.string()), embeddings,
                                 pa.array(reasons, pa.string())], schema=regions_schema(dim))


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
