"""Detector backends for the detect stage, chosen by ``detect.backend``."""

from __future__ import annotations

from pathlib import Path

from gmner.vision.detectors.base import Detector, DetectorLoad, ImageRecord, select_top_k

BACKENDS = ("selective_search", "oracle", "torchvision", "zero_shot")

__all__ = ["BACKENDS", "Detector", "DetectorLoad", "ImageRecord", "build_detector", "select_top_k"]


def build_detector(cfg: dict, *, seed: int, device, hash_memo: Path | None = None) -> Detector:
    """The backend ``cfg["backend"]`` configured from the ``detect`` params group."""
    backend = cfg["backend"]
    if backend == "oracle":
        from gmner.vision.detectors.oracle import OracleDetector

        return OracleDetector(cfg["top_k"], seed)
    if backend == "selective_search":
        from gmner.vision.detectors.selective_search import SelectiveSearchDetector

        return SelectiveSearchDetector(cfg["selective_search"], k=cfg["top_k"], nms_iou=cfg["nms_iou"],
                                       max_pixels=cfg["max_pixels"], max_side=cfg["max_side"])
    common = dict(k=cfg["top_k"], nms_iou=cfg["nms_iou"], precision=cfg["precision"], device=device, seed=seed,
                  loader=DetectorLoad(cfg["max_pixels"], cfg["max_side"]), hash_memo=hash_memo)
    if backend == "torchvision":
        from gmner.vision.detectors.rcnn import TorchvisionDetector

        return TorchvisionDetector(cfg["torchvision"], **common)
    if backend == "zero_shot":
        from gmner.vision.detectors.zero_shot import ZeroShotDetector

        return ZeroShotDetector(cfg["zero_shot"], **common)
    raise ValueError(f"detect.backend must be one of {BACKENDS}, not {backend!r}")
