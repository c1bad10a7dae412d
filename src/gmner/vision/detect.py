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

import numpy as np
import pyarrow as pa

from gmner.core import schema
from gmner.core.atomic import write_json, write_parquet
from gmner.core.boxes import iou_matrix
from gmner.core.hashing import digest
from gmner.core.params import check_keys
from gmner.vision.cache import ItemCache
from gmner.vision.detectors import ImageRecord, build_detector
from gmner.vision.inputs import distinct_images, image_policy, prepared_tables
from gmner.vision.runner import Item, run_items, stage_device, write_summary

PARAMS = (  # the keys of the `detect` params group
    "backend", "top_k", "nms_iou", "precision", "batch_size", "num_workers", "max_pixels", "max_side", "policy",
    "torchvision", "zero_shot", "selective_search",
)
COVERAGE_K = (1, 4, 8, 16, 32)  # candidate list lengths at which coverage is reported


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


def gold_boxes(table: pa.Table) -> dict[str, np.ndarray]:
    """sha256 -> the distinct gold boxes of the split's tweets showing that image."""
    boxes = defaultdict(set)
    for row in table.select(["image_sha256", "entities"]).to_pylist():
        if row["image_sha256"] is not None:
            boxes[row["image_sha256"]].update(tuple(box) for entity in row["entities"] for box in entity["boxes"])
    return {sha: np.asarray(sorted(b), dtype=np.float32).reshape(-1, 4) for sha, b in boxes.items()}


def coverage(ranked: dict[str, dict], gold: dict[str, np.ndarray], depth: int | None) -> dict[str, float | None]:
    """Percentage of the gold boxes that one of the first K candidates of their image covers at IoU > 0.5, for
    each K of COVERAGE_K; null past ``depth`` (the length of the lists a backend ranks; None: all of them)."""
    total = sum(len(boxes) for boxes in gold.values())
    out = {}
    for k in COVERAGE_K:
        if depth is not None and k > depth:
            out[f"at_{k:02d}"] = None
            continue
        covered = 0
        for sha, boxes in gold.items():
            candidates = np.asarray(ranked.get(sha, {}).get("boxes", []), dtype=np.float32).reshape(-1, 4)[:k]
            if len(boxes) and len(candidates):
                covered += int((iou_matrix(boxes, candidates).max(axis=1) > 0.5).sum())
        out[f"at_{k:02d}"] = round(100 * covered / total, 2) if total else None
    return out


def run_stage(params: dict, root: str | Path = ".") -> dict | None:
    """Detect over every prepared split; returns the summary on the main process (None on other ranks)."""
    base, cfg, root = params["base"], params["detect"], Path(root)
    check_keys("detect", cfg, PARAMS)
    device = stage_device(base["device"])
    tables = prepared_tables(params, root)
    records = collect_images(tables, root)
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
    by_sha = {r.sha256: r for r in records}
    results = {sha: run.results[keys[sha]] for sha in by_sha if keys[sha] in run.results}
    gold = {split: gold_boxes(table) for split, table in zip(params["prepare"]["files"], tables) if table.num_rows}
    ranked, ranking = detector.rank(results, by_sha, gold.get("train", {}))
    rows = [{"image_sha256": sha, **{f: v[: cfg["top_k"]] for f, v in ranked[sha].items()}} for sha in sorted(ranked)]
    table = pa.Table.from_pylist(rows, schema=schema.REGIONS)
    write_parquet(root / "data" / "regions.parquet", table)
    depth = detector.ranked_depth
    covered = {split: coverage(ranked, boxes, depth) for split, boxes in gold.items()}
    write_json(root / "metrics" / "detect.json", {split: {"box_coverage": c} for split, c in covered.items()})
    write_json(root / "metrics" / "detect_coverage.json",
               [{"k": k, **{split: c[f"at_{k:02d}"] for split, c in covered.items()}} for k in COVERAGE_K
                if any(c[f"at_{k:02d}"] is not None for c in covered.values())])
    summary = {"backend": cfg["backend"], "top_k": cfg["top_k"], "images": len(records), "rows": table.num_rows,
               "box_coverage": covered, **ranking, **run.summary}
    write_summary(root / "data" / "regions_summary.json", summary, "detect")
    return summary
