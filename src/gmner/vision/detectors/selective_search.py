"""Selective search (Uijlings et al., the region proposals of the original R-CNN): a detector that needs no
weights and works on any picture, ranked by a small proposal scorer fitted on the training split's gold boxes.

Per image (cached by the runner) the stage keeps the algorithm's first ``max_proposals`` proposals in its own
order, in original pixels. Selective search is a CPU algorithm with no model, so it runs in the runner's
DataLoader workers (``detect.num_workers``) beside the decoding. Ranking is a second, whole-split step: a
logistic regression over box features (log area and aspect, centre, their squares, the algorithm's rank)
predicts whether a proposal covers a train-split gold box at IoU > 0.5; it is fitted by Newton's method in
float64 from zero weights, so the same proposals always give the same weights, and it reads no gold box of
another split. Each image's proposals are then scored, suppressed by NMS and cut to ``top_k``.
``ranking: none`` keeps the algorithm's order (NMS still applies): the unranked baseline.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import numpy as np

from gmner.core.boxes import iou_matrix
from gmner.core.hashing import digest
from gmner.vision.detectors.base import DetectorLoad, ImageRecord, select_top_k

_RECIPE = 2  # part of the fingerprint: bump when the proposal recipe changes
MODES = ("fast", "quality")
RANKINGS = ("learned", "none")
FEATURES = ("log_area", "log_aspect", "log_area^2", "log_aspect^2", "log_area*log_aspect", "cx", "cy",
            "(cx-1/2)^2", "(cy-1/2)^2", "log(1+rank)")
LABEL = "region"


@dataclass(frozen=True)
class ProposalLoad(DetectorLoad):
    """Decode an image (downscaled to ``max_side``) and run selective search on it: payload (path, None) ->
    {"boxes": (n, 4) float32 xyxy original pixels in the algorithm's order}."""

    mode: str = "fast"
    base_k: int = 150
    inc_k: int = 150
    sigma: float = 0.8
    max_proposals: int = 500

    def __call__(self, payload) -> dict:
        import cv2

        cv2.setNumThreads(1)  # one image per worker; OpenCV's own threads would only contend
        loaded, _ = super().__call__(payload)
        bgr = np.ascontiguousarray(np.asarray(loaded.image)[:, :, ::-1])
        search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        search.setBaseImage(bgr)
        if self.mode == "fast":
            search.switchToSelectiveSearchFast(self.base_k, self.inc_k, self.sigma)
        else:
            search.switchToSelectiveSearchQuality(self.base_k, self.inc_k, self.sigma)
        # OpenCV orders the proposals by hierarchy level x std::rand(), the paper's randomised ranking; seeding the
        # C library's generator for each image makes that order (and the first max_proposals) the same in every
        # run, worker and batch, as the cache requires.
        _libc().srand(0)
        rects = np.asarray(search.process(), dtype=np.float64).reshape(-1, 4)[: self.max_proposals]
        boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
        return {"boxes": loaded.to_original(boxes)}


@functools.cache
def _libc():
    return ctypes.CDLL(None)  # this process's C library, whose rand() OpenCV calls


class SelectiveSearchDetector:
    """The ``selective_search`` backend; ``cfg`` is the ``detect.selective_search`` params group."""

    ranked_depth = None  # every proposal is ranked; the stage keeps top_k of them

    def __init__(self, cfg: dict, *, k: int, nms_iou: float, max_pixels: int, max_side: int):
        if cfg["mode"] not in MODES:
            raise ValueError(f"detect.selective_search.mode must be one of {MODES}, not {cfg['mode']!r}")
        if cfg["ranking"] not in RANKINGS:
            raise ValueError(f"detect.selective_search.ranking must be one of {RANKINGS}, not {cfg['ranking']!r}")
        self.k, self.nms_iou, self.ranking, self.l2 = k, nms_iou, cfg["ranking"], float(cfg["l2"])
        self.load = ProposalLoad(max_pixels, min(max_side, cfg["max_side"]), mode=cfg["mode"], base_k=cfg["base_k"],
                                 inc_k=cfg["inc_k"], sigma=cfg["sigma"], max_proposals=cfg["max_proposals"])
        # The cache holds the proposals only: ranking params (and k, nms) change no cached result.
        self.fingerprint = digest("selective_search", _RECIPE, self.load)

    def item(self, image: ImageRecord):
        return image.sha256, (image.path, None)

    def __call__(self, batch: list[dict]) -> list[dict]:
        return [{"boxes": proposals["boxes"].tolist()} for proposals in batch]

    def rank(self, proposals: dict[str, dict], images: dict[str, ImageRecord], train_gold: dict[str, np.ndarray]):
        """Each image's ranked candidate list (all of it, best first) from its cached proposals, and what the
        ranking learned. ``train_gold``: sha256 -> gold boxes of the train split's images (the fit's labels)."""
        fitted = self.fit_ranking(proposals, images, train_gold)
        summary = {"scorer": ProposalScorer.from_state(fitted["scorer"]).summary()} if fitted else {}
        return self.apply_ranking(proposals, images, fitted), {"ranking": self.ranking, **summary}

    def fit_ranking(self, proposals: dict[str, dict], images: dict[str, ImageRecord],
                    train_gold: dict[str, np.ndarray]) -> dict:
        """What ranking learns from the train split, JSON-ready (exact floats): the scorer's state, or {}."""
        if self.ranking != "learned":
            return {}
        scorer = ProposalScorer.fit(
            [(_boxes(proposals[sha]), images[sha], gold) for sha, gold in train_gold.items() if sha in proposals],
            self.l2,
        )
        return {"scorer": scorer.state()}

    def apply_ranking(self, proposals: dict[str, dict], images: dict[str, ImageRecord], fitted: dict) -> dict:
        """Each image's ranked candidate list with the state ``fit_ranking`` returned (also on new images)."""
        scorer = ProposalScorer.from_state(fitted["scorer"]) if fitted else None
        ranked = {}
        for sha, result in proposals.items():
            boxes = _boxes(result)
            if scorer is None:
                scores = -np.log1p(np.arange(len(boxes), dtype=np.float64))  # the algorithm's order
            else:
                scores = scorer.score(boxes, images[sha])
            ranked[sha] = select_top_k(boxes, scores, [LABEL] * len(boxes), len(boxes), self.nms_iou)
        return ranked


def _boxes(result: dict) -> np.ndarray:
    return np.asarray(result["boxes"], dtype=np.float32).reshape(-1, 4)


def proposal_features(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """(n, len(FEATURES)) float64 features of ``boxes`` (xyxy, in the algorithm's order) on a W x H image."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w = np.maximum(boxes[:, 2] - boxes[:, 0], 1.0)
    h = np.maximum(boxes[:, 3] - boxes[:, 1], 1.0)
    area, aspect = np.log(w * h / (width * height)), np.log(w / h)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / (2 * width), (boxes[:, 1] + boxes[:, 3]) / (2 * height)
    rank = np.log1p(np.arange(len(boxes), dtype=np.float64))
    return np.stack([area, aspect, area**2, aspect**2, area * aspect, cx, cy, (cx - 0.5) ** 2, (cy - 0.5) ** 2,
                     rank], axis=1)


@dataclass(frozen=True)
class ProposalScorer:
    """Logistic regression on standardised :func:`proposal_features` (``weights`` end with the bias)."""

    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray
    examples: int
    positives: int
    iterations: int

    @classmethod
    def fit(cls, images: list[tuple[np.ndarray, ImageRecord, np.ndarray]], l2: float, iou: float = 0.5,
            max_iterations: int = 100) -> ProposalScorer:
        """Fit on (proposals, image, gold boxes) triples: a proposal is positive when it covers one of the
        image's gold boxes at IoU > ``iou``. With no positive at all, every weight stays 0 (no preference)."""
        features, labels = [], []
        for boxes, image, gold in images:
            features.append(proposal_features(boxes, image.width, image.height))
            covered = iou_matrix(boxes, gold).max(axis=1) > iou if len(gold) and len(boxes) else np.zeros(len(boxes))
            labels.append(np.asarray(covered, dtype=np.float64))
        x = np.concatenate(features) if features else np.zeros((0, len(FEATURES)))
        y = np.concatenate(labels) if labels else np.zeros(0)
        mean = x.mean(axis=0) if len(x) else np.zeros(len(FEATURES))
        std = x.std(axis=0) + 1e-9 if len(x) else np.ones(len(FEATURES))
        design = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
        weights, iterations = np.zeros(design.shape[1]), 0
        if 0 < y.sum() < len(y):
            for iterations in range(1, max_iterations + 1):  # Newton steps on the L2-penalised log-likelihood
                p = 1.0 / (1.0 + np.exp(-design @ weights))
                gradient = design.T @ (p - y) + l2 * weights
                hessian = (design * (p * (1 - p))[:, None]).T @ design + l2 * np.eye(len(weights))
                step = np.linalg.solve(hessian, gradient)
                weights = weights - step
                if np.abs(step).max() < 1e-10:
                    break
        return cls(mean, std, weights, len(y), int(y.sum()), iterations)

    def score(self, boxes: np.ndarray, image: ImageRecord) -> np.ndarray:
        x = (proposal_features(boxes, image.width, image.height) - self.mean) / self.std
        return x @ self.weights[:-1] + self.weights[-1]

    def state(self) -> dict:
        """Everything ``score`` uses, as lists of exact floats (JSON keeps float64 exactly)."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "weights": self.weights.tolist(),
                "examples": self.examples, "positives": self.positives, "iterations": self.iterations}

    @classmethod
    def from_state(cls, state: dict) -> ProposalScorer:
        arrays = {key: np.asarray(state[key], dtype=np.float64) for key in ("mean", "std", "weights")}
        return cls(**arrays, examples=state["examples"], positives=state["positives"],
                   iterations=state["iterations"])

    def summary(self) -> dict:
        return {
            "examples": self.examples,
            "positives": self.positives,
            "newton_iterations": self.iterations,
            "weights": {name: round(float(w), 6) for name, w in zip([*FEATURES, "bias"], self.weights)},
        }
