"""The oracle "detector": the gold boxes of an image's entities hidden among random distractors.

For ablations (grounding with perfect recall) and tests only: it reads the gold annotations, so scores
obtained with it are not detector-based results.
"""

from __future__ import annotations

import logging

import numpy as np

from gmner.core.hashing import digest
from gmner.vision.detectors.base import ImageRecord, RankedPerImage

log = logging.getLogger(__name__)
_RECIPE = 2  # part of the fingerprint: bump when the distractor recipe changes, so cached results are redone


class OracleDetector(RankedPerImage):
    """Gold boxes plus distractors up to ``k``, seeded per image; scores are random so that the rank of a
    candidate says nothing about whether it is gold, and every label is ``object``."""

    load = None  # no pixels needed: the payload is the record itself

    def __init__(self, k: int, seed: int):
        log.warning("detect.backend=oracle reads the GOLD boxes: for ablations and tests, never for reported results")
        self.k, self.seed = k, seed
        self.fingerprint = digest("oracle", _RECIPE, k, seed)

    def item(self, image: ImageRecord):
        return digest(image.sha256, image.gold_boxes, image.width, image.height), image

    def __call__(self, batch: list[ImageRecord]) -> list[dict]:
        return [self._one(image) for image in batch]

    def _one(self, image: ImageRecord) -> dict:
        rng = np.random.default_rng(int(digest(self.seed, image.sha256)[:16], 16))
        w, h = image.width, image.height
        gold = np.asarray(image.gold_boxes[: self.k], dtype=np.float32).reshape(-1, 4)
        n = self.k - len(gold)
        size = rng.uniform(0.1, 0.6, (n, 2)) * (w, h)
        corner = rng.uniform(0, 1, (n, 2)) * ((w, h) - size)
        # Whole pixels, like annotated boxes, so coordinates cannot tell a distractor from a gold box.
        distractors = np.round(np.concatenate([corner, corner + size], axis=1)).astype(np.float32)
        boxes = np.concatenate([gold, distractors])
        scores = rng.uniform(0, 1, len(boxes)).astype(np.float32)
        order = np.argsort(-scores, kind="stable")
        return {"boxes": boxes[order].tolist(), "scores": scores[order].tolist(), "labels": ["object"] * len(boxes)}
