"""MNER, EEG and GMNER precision / recall / F1 of predictions against gold tweets: pure functions, no I/O.

Micro-averaged over a split, as in the H-Index reference (NUSTM/GMNER): ``tp`` = correct predictions,
``fp`` = predictions - tp, ``fn`` = gold - tp; P, R and F1 are percentages and 0/0 counts as 0.

- MNER: span and type match.  EEG: span and region match (type ignored).  GMNER: span, type and region.
- Duplicate predictions count once: per tweet, the first prediction of each (start, end, type) is kept for
  MNER / GMNER and the first of each (start, end) for EEG, so a later duplicate with another region is
  ignored.  One span predicted with two types is two distinct MNER / GMNER predictions.
- A prediction's region is ``region`` (an index into the tweet image's detector candidates) and / or
  ``box`` (xyxy pixels); both null means "no region", the right answer only for an ungroundable entity.
  Two protocols decide whether a region matches a groundable entity (strictly IoU > threshold with any of
  its gold boxes):

  * ``candidates`` (H-Index): the candidate ``region`` points at.  A box without a region index is not a
    candidate and never matches, and an entity no candidate covers can never be matched, so this score
    depends on the detector (``coverage`` reports how much).
  * ``boxes`` (detector independent): ``box``, or the candidate's box when only ``region`` is given.

Without a regions table (a text-only pipeline) every image has zero candidates.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from gmner.core.boxes import iou_matrix
from gmner.core.errors import DataError

PROTOCOLS = ("candidates", "boxes")
_NO_BOXES = np.zeros((0, 4))


def prf(tp: int, predicted: int, gold: int) -> dict:
    """Precision, recall and F1 (percentages, 0/0 = 0) with the counts they come from."""
    precision = 100.0 * tp / predicted if predicted else 0.0
    recall = 100.0 * tp / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "tp": tp,
        "fp": predicted - tp,
        "fn": gold - tp,
    }


class _Tally:
    """Correct, predicted and gold counts per entity type (predictions by predicted type, gold by gold type)."""

    def __init__(self):
        self.tp, self.pred, self.gold = Counter(), Counter(), Counter()

    def add_prediction(self, etype: str, correct: bool) -> None:
        self.pred[etype] += 1
        self.tp[etype] += correct

    def overall(self) -> dict:
        return prf(sum(self.tp.values()), sum(self.pred.values()), sum(self.gold.values()))

    def report(self) -> dict:
        types = sorted(set(self.pred) | set(self.gold))
        return {
            "overall": self.overall(),
            "per_type": {t: prf(self.tp[t], self.pred[t], self.gold[t]) for t in types},
        }


def _boxes(value) -> np.ndarray:
    return np.asarray(value, dtype=np.float64).reshape(-1, 4) if value else _NO_BOXES


def _candidates_by_image(regions: pa.Table | None) -> dict[str, np.ndarray] | None:
    if regions is None:
        return None
    out = {}
    for row in regions.select(["image_sha256", "boxes"]).to_pylist():
        if row["image_sha256"] in out:
            raise DataError(f"regions image {row['image_sha256']}", "appears twice in the regions table")
        out[row["image_sha256"]] = _boxes(row["boxes"])
    return out


def _predictions_by_tweet(pred: pa.Table, gold_ids: set[str]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in pred.select(["tweet_id", "entities"]).to_pylist():
        tweet_id = row["tweet_id"]
        where = f"predictions for tweet {tweet_id}"
        if tweet_id not in gold_ids:
            raise DataError(where, "tweet id is not in the gold table")
        if tweet_id in out:
            raise DataError(where, "tweet id appears twice in the predictions")
        entities = row["entities"] or []
        for entity in entities:
            if entity["start"] is None or entity["end"] is None or entity["type"] is None:
                raise DataError(where, f"entity without start, end or type: {entity}")
        out[tweet_id] = entities
    return out


def _first_per_key(entities: list[dict], fields: tuple[str, ...]) -> list[dict]:
    seen: dict[tuple, dict] = {}
    for entity in entities:
        seen.setdefault(tuple(entity[f] for f in fields), entity)
    return list(seen.values())


class _GoldEntity:
    """A gold entity's boxes, plus which of the image's candidates cover it (IoU > threshold with any box)."""

    def __init__(self, etype: str, boxes: np.ndarray, candidates: np.ndarray, threshold: float):
        self.type = etype
        self.boxes = boxes
        if len(boxes) and len(candidates):
            self.covering = iou_matrix(candidates, boxes).max(axis=1) > threshold
        else:
            self.covering = np.zeros(len(candidates), dtype=bool)


def _region_matches(
    entity: dict, gold: _GoldEntity, candidates: np.ndarray, protocol: str, threshold: float
) -> bool:
    region, box = entity["region"], entity["box"]
    if region is None and box is None:
        return len(gold.boxes) == 0
    if len(gold.boxes) == 0:
        return False
    if protocol == "candidates":
        return region is not None and bool(gold.covering[region])
    predicted = box if box is not None else candidates[region]
    return bool(iou_matrix(predicted, gold.boxes).max() > threshold)


class _Scores:
    """The MNER, GMNER and EEG tallies of a split, fed one tweet at a time."""

    def __init__(self, iou_threshold: float):
        self.threshold = iou_threshold
        self.mner = _Tally()
        self.gmner = {p: _Tally() for p in PROTOCOLS}
        self.eeg = {p: _Tally() for p in PROTOCOLS}  # type ignored: everything under one key
        self.groundable = self.covered = 0

    def add_gold(self, entity: _GoldEntity) -> None:
        for tally in (self.mner, *self.gmner.values()):
            tally.gold[entity.type] += 1
        for tally in self.eeg.values():
            tally.gold["*"] += 1
        if len(entity.boxes):
            self.groundable += 1
            self.covered += bool(entity.covering.any())

    def add_predictions(
        self, entities: list[dict], gold: dict[tuple[int, int], _GoldEntity], candidates: np.ndarray
    ) -> None:
        def region_ok(entity: dict, match: _GoldEntity, protocol: str) -> bool:
            return _region_matches(entity, match, candidates, protocol, self.threshold)

        for entity in _first_per_key(entities, ("start", "end", "type")):
            match = gold.get((entity["start"], entity["end"]))
            typed = match is not None and match.type == entity["type"]
            self.mner.add_prediction(entity["type"], typed)
            for protocol, tally in self.gmner.items():
                tally.add_prediction(entity["type"], typed and region_ok(entity, match, protocol))
        for entity in _first_per_key(entities, ("start", "end")):
            match = gold.get((entity["start"], entity["end"]))
            for protocol, tally in self.eeg.items():
                tally.add_prediction("*", match is not None and region_ok(entity, match, protocol))

    def report(self, tweets: int) -> dict:
        return {
            "mner": self.mner.report(),
            "eeg": {p: tally.overall() for p, tally in self.eeg.items()},
            "gmner": {p: tally.report() for p, tally in self.gmner.items()},
            "coverage": {
                "groundable": self.groundable,
                "covered": self.covered,
                "coverage": round(100.0 * self.covered / self.groundable, 4) if self.groundable else 0.0,
            },
            "tweets": tweets,
        }


def score(gold: pa.Table, pred: pa.Table, regions: pa.Table | None = None, iou_threshold: float = 0.5) -> dict:
    """Score ``pred`` (schema.PREDICTIONS) against ``gold`` (schema.TWEETS) with ``regions`` (schema.REGIONS).

    Returns ``{"mner": {"overall", "per_type"}, "eeg": {protocol: overall}, "gmner": {protocol: {"overall",
    "per_type"}}, "coverage": {"groundable", "covered", "coverage"}, "tweets": n}``; each P/R/F1 entry also
    holds tp, fp and fn.  A gold tweet without predictions predicted nothing.
    """
    candidates_of = _candidates_by_image(regions)
    gold_rows = gold.select(["tweet_id", "image_sha256", "entities"]).to_pylist()
    gold_ids = {row["tweet_id"] for row in gold_rows}
    if len(gold_ids) != len(gold_rows):
        raise DataError("gold tweets", "a tweet id appears more than once")
    predictions = _predictions_by_tweet(pred, gold_ids)

    scores = _Scores(iou_threshold)
    for row in gold_rows:
        tweet_id, sha = row["tweet_id"], row["image_sha256"]
        if candidates_of is None or sha is None:
            candidates = _NO_BOXES
        elif sha in candidates_of:
            candidates = candidates_of[sha]
        else:
            raise DataError(f"tweet {tweet_id}", f"image {sha} has no row in the regions table")

        gold_spans: dict[tuple[int, int], _GoldEntity] = {}
        for entity in row["entities"] or []:
            span = (entity["start"], entity["end"])
            if span in gold_spans:
                raise DataError(f"tweet {tweet_id}", f"gold span {span} appears twice")
            gold_spans[span] = _GoldEntity(entity["type"], _boxes(entity["boxes"]), candidates, iou_threshold)
            scores.add_gold(gold_spans[span])

        entities = predictions.get(tweet_id, [])
        for entity in entities:
            if entity["region"] is not None and not 0 <= entity["region"] < len(candidates):
                raise DataError(
                    f"predictions for tweet {tweet_id}",
                    f"region {entity['region']} out of range: the image has {len(candidates)} detector candidates",
                )
        scores.add_predictions(entities, gold_spans, candidates)
    return scores.report(len(gold_rows))


def headline(scores: dict) -> dict:
    """The overall P / R / F1 of a score dict, without counts or per-type rows: what `dvc metrics diff` shows."""

    def prf_only(entry: dict) -> dict:
        return {k: entry[k] for k in ("precision", "recall", "f1")}

    return {
        "mner": prf_only(scores["mner"]["overall"]),
        "gmner": {p: prf_only(scores["gmner"][p]["overall"]) for p in PROTOCOLS},
        "eeg": {p: prf_only(scores["eeg"][p]) for p in PROTOCOLS},
        "candidate_coverage": scores["coverage"]["coverage"],
    }
