"""The detect stage: top-K candidate regions for every distinct image of the prepared splits.

Reads data/prepared/<split>.parquet (every split of ``prepare.files``), runs the ``detect.backend`` detector
on each distinct image_sha256 through the cached per-item runner, and writes data/regions.parquet
(schema.REGIONS, one row per usable image, sorted by sha256; boxes xyxy in original pixels after EXIF
rotation, best first) and data/regions_summary.json. An image skipped by ``detect.policy`` has no row,
exactly like a tweet without an image: downstream joins treat both as "no regions".
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pyarrow as pa

from gmner.core import schema
from gmner.core.atomic import write_parquet
from gmner.core.hashing import digest
from gmner.vision.cache import ItemCache
from gmner.vision.detectors import ImageRecord, build_detector
from gmner.vision.inputs import distinct_images, image_policy, prepared_tables
from gmner.vision.runner import Item, StageRun, run_items, stage_device, write_summary


def collect_images(tables: list[pa.Table], root: str | Path = ".") -> list[ImageRecord]:
    """One record per distinct image (sorted by sha256, its file as :func:`distinct_images` picks it), with
    what the tweets showing it say about it, read in tweet_id order."""
    tweets = defaultdict(list)
    for table in tables:
        for row in table.select(["tweet_id", "image_sha256", "width", "height", "tokens", "entities"]).to_pylist():
            if row["image_sha256"] is not None:
                tweets[row["image_sha256"]].append(row)
    records = []
    for sha, path in distinct_images(tables, root).items():
        group = sorted(tweets[sha], key=lambda row: row["tweet_id"])
        words = dict.fromkeys(w for row in group for w in row["tokens"] if _is_prompt_word(w))
        boxes = {tuple(box) for row in group for entity in row["entities"] for box in entity["boxes"]}
        records.append(ImageRecord(sha, path, group[0]["width"], group[0]["height"], tuple(sorted(boxes)),
                                   tuple(words)))
    return records


def _is_prompt_word(word: str) -> bool:
    # Mentions, links and punctuation name nothing visible.
    return any(c.isalpha() for c in word) and not word.startswith(("@", "http", "#")) and word != "RT"


def regions_table(records: list[ImageRecord], keys: dict[str, str], run: StageRun) -> pa.Table:
    """schema.REGIONS rows of the records (sorted by sha256) the policy did not skip, read from the cache."""
    rows = [{"image_sha256": r.sha256, **run.results[keys[r.sha256]]} for r in records if keys[r.sha256] in run.results]
    return pa.Table.from_pylist(rows, schema=schema.REGIONS)


def run_stage(params: dict, root: str | Path = ".") -> dict | None:
    """Detect over every prepared split; returns the summary on the main process (None on other ranks)."""
    base, cfg, root = params["base"], params["detect"], Path(root)
    device = stage_device(base["device"])
    records = collect_images(prepared_tables(params, root), root)
    cache_root = root / base["cache_root"]
    detector = build_detector(cfg, seed=base["seed"], device=device, hash_memo=cache_root / "file_hashes")
    keys, items = {}, []
    for record in records:
        key, payload = detector.item(record)
        keys[record.sha256] = key
        items.append(Item(key, payload))
    run = run_items(
        items,
        cache=ItemCache(cache_root, "detect", digest(detector.fingerprint)),
        compute=detector,
        load=detector.load,
        policy=image_policy(cfg["policy"], "detect.policy"),
        batch_size=cfg["batch_size"],
        num_workers=cfg["num_workers"],
        desc=f"detect ({cfg['backend']})",
    )
    if not run.is_main:
        return None
    table = regions_table(records, keys, run)
    write_parquet(root / "data" / "regions.parquet", table)
    summary = {"backend": cfg["backend"], "top_k": cfg["top_k"], "images": len(records), "rows": table.num_rows,
               **run.summary}
    write_summary(root / "data" / "regions_summary.json", summary, "detect")
    return summary
