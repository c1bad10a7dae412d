"""The vision pipeline behind a trained model: written into its folder (``vision.json``) and run on new images.

A visual model reads the detect -> (caption) -> features tables. To ground a picture the pipeline never saw it
needs that same detector, ranking and feature extractor, so training records them (:func:`vision_record`): the
params groups that change their results, the fingerprints their item caches are keyed by, and what the detector
fitted on the train split (selective search's proposal scorer). :class:`VisionPipeline` rebuilds them from the
record and computes, through the per-item runner and its content-addressed cache, the tables a
:class:`gmner.models.visual_store.VisualStore` takes: an image the pipeline already processed gets exactly its
regions and features (same fingerprint, same image sha256), and a repeated image costs no model call.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gmner.core import schema
from gmner.core.errors import DataError
from gmner.core.hashing import digest
from gmner.vision.cache import ItemCache
from gmner.vision.caption import caption_images
from gmner.vision.detect import collect_images, gold_boxes
from gmner.vision.detectors import ImageRecord, build_detector
from gmner.vision.features import embed_originals, embed_regions, images_table, stacks_table
from gmner.vision.inputs import PreparedImage, image_policy
from gmner.vision.models import Captioner, load_image_encoder
from gmner.vision.runner import Item, run_items

log = logging.getLogger(__name__)

RECORD_FILE = "vision.json"
FORMAT = 1


def vision_record(params: dict, root: str | Path, extras: Sequence[str]) -> dict | None:
    """What made a model's visual inputs, for its folder: per vision stage its params group and fingerprint,
    the detector's ranking fitted on the train split, and the seed tiny models are built from. Checks that
    data/regions.parquet is what the recorded detector gives, so the record describes the training inputs.
    Building the (tiny) models draws no number from the global random streams a training run goes on with.
    None when ``params`` have no detect and features groups (a trainer run on hand-made tables)."""
    if not {"detect", "features"} <= set(params):
        log.warning("no detect / features params: the model folder records no vision pipeline, so it cannot "
                    "predict new images")
        return None
    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            return _record(params, Path(root), extras)
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])


def _record(params: dict, root: Path, extras: Sequence[str]) -> dict:
    seed = params["base"]["seed"]
    cache_root = root / params["base"]["cache_root"]
    cpu = torch.device("cpu")
    detector = build_detector(params["detect"], seed=seed, device=cpu, hash_memo=cache_root / "file_hashes")
    encoder = load_image_encoder(params["features"], seed, cpu, where="features.model",
                                 hash_memo=cache_root / "file_hashes")
    record = {
        "format": FORMAT,
        "seed": seed,
        "detect": {"params": params["detect"], "fingerprint": detector.fingerprint,
                   "fitted": _fitted_ranking(detector, params, root, cache_root)},
        "features": {"params": params["features"], "fingerprint": encoder.fingerprint, "dim": encoder.dim,
                     "token_shape": list(encoder.token_shape) if params["features"]["patch_tokens"] else None},
    }
    if "captions" in extras:
        captioner = Captioner(params["caption"], seed, cpu, hash_memo=cache_root / "file_hashes")
        record["caption"] = {"params": params["caption"], "fingerprint": captioner.fingerprint}
    if "generated" in extras:
        record["synthesize"] = {"params": params["synthesize"]}
    return record


def _fitted_ranking(detector, params: dict, root: Path, cache_root: Path) -> dict:
    """The detector's ranking fitted on the train split's proposals (cached by the detect stage), checked against
    data/regions.parquet on those images."""
    train = pq.read_table(root / "data" / "prepared" / "train.parquet")
    gold = gold_boxes(train)
    images = {r.sha256: r for r in collect_images([train], root) if r.sha256 in gold}
    results, _ = _detect(detector, params["detect"], cache_root, list(images.values()))
    fitted = detector.fit_ranking(results, images, gold)
    ranked = detector.apply_ranking(results, images, fitted)
    regions = pq.read_table(root / "data" / "regions.parquet", columns=["image_sha256", "boxes"]).to_pylist()
    top_k = params["detect"]["top_k"]
    for row in regions:
        if row["image_sha256"] in ranked and ranked[row["image_sha256"]]["boxes"][:top_k] != row["boxes"]:
            raise DataError("data/regions.parquet", f"the candidates of image {row['image_sha256']} are not what "
                            "the detect params give now; run the detect stage again")
    return fitted


def _detect(detector, cfg: dict, cache_root: Path, images: list[ImageRecord]):
    """(sha256 -> cached detector result, sha256 -> skip reason) of ``images``, as the detect stage runs them."""
    keys, items = {}, []
    for image in images:
        key, payload = detector.item(image)
        keys[image.sha256] = key
        items.append(Item(key, payload))
    run = run_items(items, cache=ItemCache(cache_root, "detect", digest(detector.fingerprint)), compute=detector,
                    load=detector.load, policy=image_policy(cfg["policy"], "detect.policy"),
                    batch_size=cfg["batch_size"], num_workers=cfg["num_workers"], desc=f"detect ({cfg['backend']})")
    results = {sha: run.results[key] for sha, key in keys.items() if key in run.results}
    return results, {sha: run.skipped[key] for sha, key in keys.items() if key in run.skipped}


class VisionPipeline:
    """The recorded vision models, rebuilt on ``device`` (``precision`` overrides the recorded ones), computing
    the visual tables of new images with their results cached under ``cache_root``."""

    def __init__(self, record: dict, device: torch.device, cache_root: str | Path, precision: str | None = None,
                 where: str = RECORD_FILE):
        if record.get("format") != FORMAT:
            raise DataError(where, f"vision record format {record.get('format')!r}, this code reads {FORMAT}")
        self.record, self.cache_root, seed = record, Path(cache_root), record["seed"]
        memo = self.cache_root / "file_hashes"
        self.params = {stage: _with_precision(record[stage]["params"], precision)
                       for stage in ("detect", "features", "caption") if stage in record}
        if self.cannot_ground:
            return  # nothing to build
        self.detector = build_detector(self.params["detect"], seed=seed, device=device, hash_memo=memo)
        self.encoder = load_image_encoder(self.params["features"], seed, device, where="features.model",
                                          hash_memo=memo)
        self.captioner = (Captioner(self.params["caption"], seed, device, hash_memo=memo)
                          if "caption" in self.params else None)
        for stage, model in (("detect", self.detector), ("features", self.encoder), ("caption", self.captioner)):
            if model is not None and model.fingerprint != record[stage]["fingerprint"]:
                log.warning("%s: the %s model is not the one the model was trained with (fingerprint %s..., "
                            "recorded %s...: another precision or library version); predictions may differ",
                            where, stage, model.fingerprint[:12], record[stage]["fingerprint"][:12])

    @property
    def cannot_ground(self) -> str | None:
        """Why no new image can be grounded (then no model is built), or None."""
        if self.params["detect"]["backend"] == "oracle":
            return ("the model was trained on oracle candidates (detect.backend: oracle reads the gold boxes), "
                    "which a new image has none of")
        return None

    def tables(self, images: list[ImageRecord]) -> dict[str, pa.Table]:
        """The regions, region / image features (and captions) tables of the distinct ``images``, by
        ``VisualStore`` key; an image a stage's policy skips has no regions row (a flagged features row)."""
        images = sorted({image.sha256: image for image in images}.values(), key=lambda image: image.sha256)
        by_sha = {image.sha256: image for image in images}
        detect, features = self.params["detect"], self.params["features"]
        results, _ = _detect(self.detector, detect, self.cache_root, images)
        ranked = self.detector.apply_ranking(results, by_sha, self.record["detect"]["fitted"])
        rows = [{"image_sha256": sha, **{f: v[: detect["top_k"]] for f, v in ranked[sha].items()}}
                for sha in sorted(ranked)]
        originals = {image.sha256: PreparedImage(image.path, image.sha256) for image in images}
        image_run = embed_originals(self.encoder, features, self.cache_root, originals, features["patch_tokens"],
                                    "features images")
        region_run, keys = embed_regions(self.encoder, features, self.cache_root, rows, originals,
                                         "features regions")
        dim = self.encoder.dim
        token_shape = self.encoder.token_shape if features["patch_tokens"] else None
        out = {
            "regions": pa.Table.from_pylist(rows, schema=schema.REGIONS),
            "region_features": stacks_table(schema.region_features_schema(dim), rows, keys, region_run, dim),
            "image_features": images_table(image_run, sorted([*image_run.results, *image_run.skipped]), dim,
                                           token_shape),
        }
        if self.captioner is not None:
            run = caption_images(self.captioner, self.params["caption"], self.cache_root, originals)
            found = [(sha, *run.outcome(sha)) for sha in originals]
            out["captions"] = pa.Table.from_pylist(
                [{"image_sha256": sha, "caption": caption, "skip_reason": reason} for sha, caption, reason in found],
                schema=schema.CAPTIONS)
        return out


def _with_precision(params: dict, precision: str | None) -> dict:
    return params if precision is None else {**params, "precision": precision}

