"""The caption stage: a BLIP caption for every distinct image of the prepared splits.

Reads data/prepared/<split>.parquet (every split of ``prepare.files``), captions each distinct image_sha256
through the cached per-item runner, and writes data/captions.parquet (:data:`gmner.core.schema.CAPTIONS`, one row
per distinct image, sorted by sha256) and data/caption_summary.json. An image the ``caption.policy`` skips
(missing or undecodable file) keeps its row, flagged: null caption and its ``skip_reason``.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from gmner.core import schema
from gmner.core.atomic import write_parquet
from gmner.core.hashing import digest
from gmner.core.params import check_keys
from gmner.vision.cache import ItemCache
from gmner.vision.inputs import ImageLoad, distinct_images, image_policy, prepared_tables
from gmner.vision.models import Captioner
from gmner.vision.runner import JSON, Item, StageRun, run_items, stage_device, write_summary

PARAMS = (  # the keys of the `caption` params group
    "model", "tiny", "precision", "batch_size", "num_workers", "generate", "max_pixels", "max_side", "policy",
)


def run_stage(params: dict, root: str | Path = ".") -> dict | None:
    """Caption every prepared image; returns the summary on the main process (None on other ranks)."""
    base, cfg, root = params["base"], params["caption"], Path(root)
    check_keys("caption", cfg, PARAMS)
    device = stage_device(base["device"])
    images = distinct_images(prepared_tables(params, root), root)
    cache_root = root / base["cache_root"]
    captioner = Captioner(cfg, base["seed"], device, hash_memo=cache_root / "file_hashes")
    run = caption_images(captioner, cfg, cache_root, images)
    if not run.is_main:
        return None
    rows = []
    for sha in images:  # sorted by sha256
        caption, reason = run.outcome(sha)
        rows.append({"image_sha256": sha, "caption": caption, "skip_reason": reason})
    write_parquet(root / "data" / "captions.parquet", pa.Table.from_pylist(rows, schema=schema.CAPTIONS))
    summary = {"model": cfg["model"], "images": len(images), **run.summary,
               "flagged": sum(row["caption"] is None for row in rows)}
    write_summary(root / "data" / "caption_summary.json", summary, "caption")
    return summary


def caption_images(captioner: Captioner, cfg: dict, cache_root: Path, images: dict[str, str]) -> StageRun:
    """The caption of each image (``images``: sha256 -> file) through the cache, ``cfg`` the caption params."""
    generate = dict(cfg["generate"])
    return run_items(
        [Item(sha, path) for sha, path in images.items()],
        cache=ItemCache(cache_root, "caption", digest(captioner.fingerprint, generate)),
        compute=lambda batch: captioner(batch, rows=cfg["batch_size"], **generate),
        load=ImageLoad(cfg["max_pixels"], cfg["max_side"]),
        codec=JSON,
        policy=image_policy(cfg["policy"], "caption.policy"),
        batch_size=cfg["batch_size"],
        num_workers=cfg["num_workers"],
        desc="caption",
    )
