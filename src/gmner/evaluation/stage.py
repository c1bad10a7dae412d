"""The ``evaluate`` stage: predict each prepared split with a trained model and score it (gmner.evaluation.scoring)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gmner.core import schema
from gmner.core.atomic import write_json, write_parquet, write_text
from gmner.core.errors import DataError
from gmner.core.params import check_keys, resolve_device, seed_everything
from gmner.evaluation.reports import metrics_markdown
from gmner.evaluation.scoring import headline, score
from gmner.models.predictor import load

PARAMS = ("splits", "iou_threshold", "regions")  # the keys of the `evaluate` params group


def _checked_predictions(predictions: pa.Table, tweets: pa.Table, model: str, split: str) -> pa.Table:
    """The predictor's output cast to schema.PREDICTIONS, after checking it has one row per tweet in order."""
    where = f"predictions of model {model} on split {split}"
    if predictions.num_rows != tweets.num_rows:
        raise DataError(where, f"{predictions.num_rows} rows for {tweets.num_rows} tweets")
    if not predictions.column("tweet_id").equals(tweets.column("tweet_id")):
        raise DataError(where, "tweet ids are not the input tweet ids in input order")
    return predictions.select(schema.PREDICTIONS.names).cast(schema.PREDICTIONS)


def run_stage(params: dict, model: str = "tagger", root: str | Path = ".") -> None:
    """Predict every split of ``params["evaluate"]["splits"]`` found in data/prepared/ with models/<model>.

    Writes data/predictions/<model>/<split>.parquet, metrics/<model>.json (``{split: headline(score)}``, the
    DVC metric), metrics/<model>_detail.json (``{split: score}`` with counts and per-type rows) and
    metrics/<model>_per_type.md, all relative to ``root``.  Absent or empty splits (prepare writes an empty
    table for a missing CoNLL file) are left out.
    """
    root = Path(root)
    cfg = params["evaluate"]
    check_keys("evaluate", cfg, PARAMS)
    seed_everything(params["base"]["seed"])
    predictor = load(root / "models" / model, resolve_device(params["base"]["device"]))  # a missing model fails first
    prepared = root / "data" / "prepared"
    splits = {}
    for split in cfg["splits"]:
        path = prepared / f"{split}.parquet"
        if path.exists() and (tweets := pq.read_table(path)).num_rows:
            splits[split] = tweets
    if not splits:
        raise DataError(str(prepared), f"none of the splits {cfg['splits']} has a non-empty prepared .parquet file")
    regions = pq.read_table(root / cfg["regions"]) if cfg.get("regions") else None
    scores = {}
    for split, tweets in splits.items():
        predictions = _checked_predictions(predictor.predict(tweets, regions), tweets, model, split)
        write_parquet(root / "data" / "predictions" / model / f"{split}.parquet", predictions)
        scores[split] = score(tweets, predictions, regions, cfg["iou_threshold"])
    write_json(root / "metrics" / f"{model}.json", {split: headline(s) for split, s in scores.items()})
    write_json(root / "metrics" / f"{model}_detail.json", scores)
    write_text(root / "metrics" / f"{model}_per_type.md", metrics_markdown(scores, model))
