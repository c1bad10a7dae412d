"""The ``train`` stage: fit the CRF text tagger on data/prepared/train, select the epoch on dev MNER F1.

Writes models/tagger/ (the checkpoint of the best dev epoch, plus train_summary.json) atomically, and logs
loss, learning rates and dev F1 per epoch with DVCLive under dvclive/tagger. It also holds what every
tagger-based stage shares: the prepared splits, ``TrainingSet`` (a split encoded once), ``fit_tagger`` (the
loop of gmner.training.loop with dev MNER F1 by default) and ``train_and_save`` (fit with DVCLive, then the
model folder).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gmner.core.atomic import atomic_dir, write_json
from gmner.core.errors import DataError
from gmner.core.params import fit_params
from gmner.evaluation.scoring import score
from gmner.models.card import write_card
from gmner.models.predictor import TaggerPredictor
from gmner.models.tagger import CRFTagger, WordTagger, build_labels
from gmner.models.text_encoder import load_text_encoder
from gmner.training.loop import DevEval, FitResult, dev_metric, fit, is_main_process, processes, start_run
from gmner.training.resume import run_folder

log = logging.getLogger(__name__)

SUMMARY_FILE = "train_summary.json"


def read_split(path: str | Path) -> pa.Table:
    """A prepared split (schema.TWEETS), checked for what training needs: one tag per token."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prepared split not found; run the prepare stage first")
    table = pq.read_table(path)
    missing = {"tweet_id", "tokens", "tags", "entities", "image_sha256"} - set(table.column_names)
    if missing:
        raise DataError(str(path), f"missing columns {sorted(missing)}")
    for tweet_id, tokens, tags in zip(*(table.column(c).to_pylist() for c in ("tweet_id", "tokens", "tags"))):
        if len(tokens) != len(tags):
            raise DataError(f"{path}: tweet {tweet_id}", f"{len(tokens)} tokens but {len(tags)} tags")
    return table


class TrainingSet:
    """A split encoded once, with its label ids; ``batch`` collates any subset of it for ``tagger.loss``."""

    def __init__(self, tagger: WordTagger, table: pa.Table, contexts: Sequence | None = None):
        self.tagger = tagger
        self.encoded, self.alignment = tagger.encode(table.column("tokens").to_pylist(), contexts)
        self.labels = [tagger.label_ids(tags) for tags in table.column("tags").to_pylist()]

    def __len__(self) -> int:
        return len(self.encoded)

    def batch(self, indices: Sequence[int]) -> dict:
        return self.tagger.collate([self.encoded[i] for i in indices], [self.labels[i] for i in indices])

    def start_epoch(self, epoch: int) -> None:
        """Batches do not change with the epoch."""

    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.encoded]


def dev_f1(tagger: WordTagger, dev: pa.Table) -> float:
    predictions = TaggerPredictor(tagger).predict(dev)
    return score(dev, predictions)["mner"]["overall"]["f1"]


def fit_tagger(
    tagger: WordTagger,
    train: pa.Table | TrainingSet,
    dev: pa.Table,
    cfg: dict,
    seed: int,
    live=None,
    dev_eval: DevEval | None = None,
    run_dir: Path | None = None,
) -> FitResult:
    """``fit`` a tagger on a prepared split (or a ``TrainingSet`` built from one) with the optimiser params
    ``cfg``; epochs are selected on ``dev_eval`` (default: dev MNER F1), and ``tagger`` keeps the best one.
    ``run_dir`` holds the run's checkpoints (gmner.training.resume)."""
    data = train if isinstance(train, TrainingSet) else TrainingSet(tagger, train)
    dev_eval = dev_eval or dev_metric("mner_f1", lambda: dev_f1(tagger, dev))
    return fit(tagger, data, cfg, seed, dev=dev_eval, live=live, run_dir=run_dir)


def build_crf_tagger(cfg: dict, train: pa.Table, cls: type[CRFTagger] = CRFTagger, **extra) -> CRFTagger:
    """A fresh CRF tagger (or subclass ``cls``, given its ``extra`` arguments): labels and (for the tiny
    encoder) the vocabulary come from the training split."""
    token_lists = train.column("tokens").to_pylist()
    encoder, tokenizer = load_text_encoder(cfg["encoder"], cfg["tiny"], (w for tokens in token_lists for w in tokens))
    labels = build_labels(train.column("tags").to_pylist())
    return cls(encoder, tokenizer, labels, cfg["max_length"], cfg["dropout"], **extra)


def read_train_dev(root: Path) -> tuple[pa.Table, pa.Table]:
    """data/prepared/{train,dev}.parquet under ``root``, both required non-empty."""
    train = read_split(root / "data" / "prepared" / "train.parquet")
    dev = read_split(root / "data" / "prepared" / "dev.parquet")
    if not train.num_rows or not dev.num_rows:
        raise DataError(str(root / "data" / "prepared"), "training needs non-empty train and dev splits")
    return train, dev


def train_and_save(
    tagger: CRFTagger,
    train: pa.Table | TrainingSet,
    dev: pa.Table,
    cfg: dict,
    seed: int,
    root: Path,
    name: str,
    started: float,
    dev_eval: DevEval | None = None,
    summary: dict | None = None,
    run_dir: Path | None = None,
    files: dict[str, dict] | None = None,
) -> FitResult:
    """``fit_tagger`` logging to dvclive/<name>, then write models/<name> (the best epoch, train_summary.json
    with ``summary`` merged in, the JSON ``files`` by name, e.g. vision.json, and the model card, README.md)
    under ``root``; ``started`` is when the run began (perf_counter), ``run_dir`` holds its checkpoints. Only
    the main process logs and writes."""
    data = train if isinstance(train, TrainingSet) else TrainingSet(tagger, train)
    with live_log(root, name) as live:
        result = fit_tagger(tagger, data, dev, cfg, seed, live, dev_eval, run_dir)
        if live is not None:
            live.summary.update({"best_epoch": result.best_epoch, f"best_dev_{result.dev_metric}": result.best_dev})
    if not is_main_process():
        return result

    summary = {
        "best_epoch": result.best_epoch,
        f"best_dev_{result.dev_metric}": result.best_dev,
        "epochs": cfg["epochs"],
        "train_tweets": len(data),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "train_seconds": round(result.train_seconds, 2),
        "stopped_early": result.stopped_early,
        "processes": processes(),
        "train_sentences_per_s": round(result.sentences_per_s, 1),
        "torch_threads": torch.get_num_threads(),
        "alignment": {"train": data.alignment.as_dict(),
                      "dev": tagger.encode(dev.column("tokens").to_pylist())[1].as_dict()},
        "history": result.history,
        **(summary or {}),
    }
    with atomic_dir(root / "models" / name) as tmp:
        tagger.save(tmp)
        write_json(tmp / SUMMARY_FILE, summary)
        for file, content in (files or {}).items():
            write_json(tmp / file, content)
        write_card(tmp, name, {"seed": seed, **cfg})
    log.info("best epoch %d, dev %s %.2f", result.best_epoch, result.dev_metric, result.best_dev)
    return result


def live_log(root: Path, name: str):
    """DVCLive under dvclive/<name> on the main process (a context yielding None elsewhere). No dvc.yaml
    edits and no experiment commits: the pipeline's dvc.yaml declares these files, and experiments are made
    by `dvc exp run`, not by the logger."""
    from dvclive import Live

    if not is_main_process():
        return contextlib.nullcontext()
    return Live(dir=str(root / "dvclive" / name), save_dvc_exp=False, dvcyaml=False)


def prepared_inputs(root: Path) -> list[Path]:
    """The prepared splits every train stage reads (for its run folder's key)."""
    return [root / "data" / "prepared" / f"{split}.parquet" for split in ("train", "dev")]


def run_stage(params: dict, root: str | Path = ".") -> None:
    """Train on data/prepared/{train,dev}.parquet under ``root``; write models/tagger and dvclive/tagger."""
    root = Path(root)
    cfg, seed = fit_params(params, "train"), params["base"]["seed"]
    train, dev = read_train_dev(root)
    started = time.perf_counter()
    device = start_run(seed, params["base"]["device"], cfg.get("threads"))
    tagger = build_crf_tagger(cfg, train).to(device)
    run_dir = run_folder(root, params, "train", prepared_inputs(root), processes())
    train_and_save(tagger, train, dev, cfg, seed, root, "tagger", started, run_dir=run_dir)
