"""Load any trained model folder as a ``Predictor``: tweets (schema.TWEETS) in, schema.PREDICTIONS out.

Every model folder holds ``model.json`` whose ``kind`` names the class that loads it; evaluation and
JSONL prediction go through ``load`` and never need to know which model they run.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import torch

from gmner.core import schema
from gmner.core.bio import spans
from gmner.core.errors import DataError
from gmner.models.tagger import MODEL_FILE, CRFTagger, WordTagger


class Predictor(Protocol):
    def predict(self, tweets: pa.Table, regions: pa.Table | None = None) -> pa.Table:
        """One schema.PREDICTIONS row per input tweet, in input order."""


class TaggerPredictor:
    """A text-only model: entities from BIO tags, with no region or box."""

    def __init__(self, tagger: WordTagger, batch_size: int = 64):
        self.tagger = tagger
        self.batch_size = batch_size

    def predict(self, tweets: pa.Table, regions: pa.Table | None = None) -> pa.Table:
        tags = self.tagger.predict_tags(tweets.column("tokens").to_pylist(), self.batch_size)
        entities = [
            [{"start": s.start, "end": s.end, "type": s.type, "region": None, "box": None} for s in spans(seq)]
            for seq in tags
        ]
        return pa.table({"tweet_id": tweets.column("tweet_id"), "entities": entities}, schema=schema.PREDICTIONS)


def _load_crf_tagger(model_dir: Path, device: torch.device) -> Predictor:
    return TaggerPredictor(CRFTagger.load(model_dir, device))


LOADERS = {CRFTagger.kind: _load_crf_tagger}
# Kinds whose module (exposing ``load_predictor(model_dir, device, store)``) is imported only when such a model is
# loaded, so stages that never load one do not import, or depend on, its code.
LAZY_LOADERS = {
    "grounded_tagger": "gmner.models.grounded_tagger",
    "index_generation": "gmner.models.index_generation",
    "bga": "gmner.models.bga",
    "vsgn": "gmner.models.vsgn",
}


def model_folder(path: str | Path) -> Path:
    """``path`` if it is a trained model folder (it holds model.json), else a DataError naming it."""
    path = Path(path)
    if not (path / MODEL_FILE).is_file():
        raise DataError(str(path), f"not a trained model folder (no {MODEL_FILE}), e.g. models/tagger")
    return path


def load(model_dir: str | Path, device: str | torch.device = "cpu", store=None) -> Predictor:
    """The predictor for the model saved in ``model_dir``, on ``device``; a model that reads visual inputs reads
    them from ``store`` (a VisualStore; default: the tables its ``visual_paths`` name)."""
    model_dir = Path(model_dir)
    path = model_dir / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model.json; is {model_dir} a trained model folder?")
    kind = json.loads(path.read_text()).get("kind")
    if kind in LAZY_LOADERS:
        return importlib.import_module(LAZY_LOADERS[kind]).load_predictor(model_dir, torch.device(device), store)
    if kind not in LOADERS:
        raise DataError(str(path), f"unknown model kind {kind!r}; known: {sorted([*LOADERS, *LAZY_LOADERS])}")
    return LOADERS[kind](model_dir, torch.device(device))
