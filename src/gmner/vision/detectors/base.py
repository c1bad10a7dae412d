"""What every detector backend shares: the per-image record, image loading for workers, top-K selection."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torchvision.ops import nms

from gmner.core.images import LoadedImage
from gmner.vision.inputs import ImageLoad
from gmner.vision.models import torch_dtype


@dataclass(frozen=True)
class ImageRecord:
    """One distinct image over all splits, with what the tweets that show it say about it."""

    sha256: str
    path: str  # resolved image file (the first, sorted, when copies of the image have different names)
    width: int
    height: int
    gold_boxes: tuple = ()  # xyxy boxes of its tweets' entities, distinct, sorted (only the oracle reads these)
    words: tuple = ()  # distinct words of its tweets, in order of first appearance (zero-shot prompts)


class Detector(Protocol):
    """A backend as the detect stage drives it through :func:`gmner.vision.runner.run_items`."""

    fingerprint: str  # model identity plus every backend param that changes results
    load: Callable[[Any], Any] | None  # picklable; runs in DataLoader workers
    ranked_depth: int | None  # how long the lists ``rank`` returns can be: top-K, or None for all candidates

    def item(self, image: ImageRecord) -> tuple[str, Any]:
        """(cache key, payload for ``load``) of one image: the key covers every per-image input."""

    def __call__(self, batch: list) -> list[dict]:
        """One cached result per loaded payload (original pixels)."""

    def rank(self, results: dict[str, dict], images: dict[str, ImageRecord], train_gold: dict[str, np.ndarray]):
        """(sha256 -> {"boxes", "scores", "labels"} best first, a summary of the ranking) from the cached
        results of every image; ``train_gold`` holds the train split's gold boxes per image."""

    def fit_ranking(self, results: dict[str, dict], images: dict[str, ImageRecord],
                    train_gold: dict[str, np.ndarray]) -> dict:
        """What ``rank`` learns from the train split, JSON-ready: a model folder keeps it (vision.json) so that
        :meth:`apply_ranking` ranks new images exactly as the detect stage ranked the pipeline's."""

    def apply_ranking(self, results: dict[str, dict], images: dict[str, ImageRecord], fitted: dict) -> dict:
        """``rank``'s lists, best first, with a state ``fit_ranking`` returned."""


class RankedPerImage:
    """For backends whose cached result of an image is already its top-K list, best first."""

    k: int

    @property
    def ranked_depth(self) -> int:
        return self.k

    def rank(self, results: dict[str, dict], images: dict[str, ImageRecord], train_gold: dict[str, np.ndarray]):
        return results, {}

    def fit_ranking(self, results: dict[str, dict], images: dict[str, ImageRecord],
                    train_gold: dict[str, np.ndarray]) -> dict:
        return {}  # nothing is fitted

    def apply_ranking(self, results: dict[str, dict], images: dict[str, ImageRecord], fitted: dict) -> dict:
        return results


@dataclass(frozen=True)
class DetectorLoad(ImageLoad):
    """``load`` for image backends: payload (path, prompts or None) -> (LoadedImage, prompts); the LoadedImage
    keeps the scale that maps boxes found on a downscaled image back to original pixels."""

    def __call__(self, payload: tuple[str, Any]) -> tuple[LoadedImage, Any]:
        path, prompts = payload
        return self.open(path), prompts


def select_top_k(boxes, scores, labels: list[str], k: int, nms_iou: float) -> dict:
    """Drop empty boxes, suppress overlaps class-agnostically (``nms_iou`` >= 1: off), keep the ``k`` best.

    Returns JSON-ready lists whose floats are exactly float32 values, so Parquet float32 columns store
    them unchanged.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    valid = np.flatnonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
    if nms_iou < 1:
        kept = nms(torch.from_numpy(boxes[valid]), torch.from_numpy(scores[valid]), nms_iou).numpy()
    else:
        kept = np.argsort(-scores[valid], kind="stable")
    order = valid[kept][:k]
    return {
        "boxes": boxes[order].tolist(),
        "scores": scores[order].tolist(),
        "labels": [labels[i] for i in order],
    }


def autocast(device, precision: str):
    """fp32: plain; fp16 / bf16: torch autocast, which runs numerically sensitive ops (NMS, RoIAlign) in fp32."""
    dtype = torch_dtype(precision)
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
