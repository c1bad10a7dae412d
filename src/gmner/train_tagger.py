"""The ``train`` stage: fit the CRF text tagger on data/prepared/train, select the epoch on dev MNER F1.

Writes models/tagger/ (the checkpoint of the best dev epoch, plus train_summary.json) atomically, and logs
loss, learning rates and dev F1 per epoch with DVCLive under dvclive/tagger. ``fit`` trains any
``WordTagger`` and is shared with benchmarks/bench_tagger.py and gmner.train_grounded, which gives it its
own ``TrainingSet`` (more inputs per batch) and ``DevScore`` (another selection metric).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from gmner.atomic import atomic_dir, write_json
from gmner.errors import DataError
from gmner.evaluation import score
from gmner.params import resolve_device, seed_everything
from gmner.predictor import TaggerPredictor
from gmner.tagger import CRFTagger, WordTagger, build_labels
from gmner.text_encoder import load_text_encoder

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


def param_groups(model: nn.Module, encoder: nn.Module, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
    """Encoder at ``lr``, everything else (classifier, CRF) at ``head_lr``; as in nanoGPT, only matrices
    decay, so biases, LayerNorm weights and the CRF start/end scores do not."""
    encoder_ids = {id(p) for p in encoder.parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in encoder_ids, p.ndim >= 2), []).append(p)
    return [
        {
            "name": "encoder" if in_encoder else "head",
            "params": ps,
            "lr": lr if in_encoder else head_lr,
            "weight_decay": weight_decay if decay else 0.0,
        }
        for (in_encoder, decay), ps in sorted(groups.items())
    ]


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


@dataclass(frozen=True)
class DevScore:
    """The dev metric that picks the best epoch, logged as ``dev/<name>``."""

    name: str
    compute: Callable[[], float]


@dataclass
class FitResult:
    best_epoch: int
    best_dev_f1: float
    history: list[dict]
    train_seconds: float
    sentences_per_s: float
    alignment: dict = field(default_factory=dict)
    dev_metric: str = "mner_f1"  # the DevScore that selected the epoch


def dev_f1(tagger: WordTagger, dev: pa.Table) -> float:
    predictions = TaggerPredictor(tagger).predict(dev)
    return score(dev, predictions)["mner"]["overall"]["f1"]


def fit(
    tagger: WordTagger,
    train: pa.Table | TrainingSet,
    dev: pa.Table,
    cfg: dict,
    seed: int,
    live=None,
    dev_score: DevScore | None = None,
) -> FitResult:
    """Train ``tagger`` in place with the ``train`` params ``cfg``; leaves it holding its best dev epoch.

    ``train`` is a prepared split or a ``TrainingSet`` built from one; epochs are selected on ``dev_score``
    (default: dev MNER F1).
    """
    from transformers import get_linear_schedule_with_warmup

    data = train if isinstance(train, TrainingSet) else TrainingSet(tagger, train)
    _, dev_align = tagger.encode(dev.column("tokens").to_pylist())
    if dev_score is None:
        dev_score = DevScore("mner_f1", lambda: dev_f1(tagger, dev))

    batch_size, epochs = cfg["batch_size"], cfg["epochs"]
    steps = epochs * math.ceil(len(data) / batch_size)
    optimizer = torch.optim.AdamW(
        param_groups(tagger, tagger.encoder, cfg["lr"], cfg["head_lr"], cfg["weight_decay"])
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, round(cfg["warmup_ratio"] * steps), steps)
    shuffle = torch.Generator().manual_seed(seed)

    best_f1, best_epoch, best_state, history, train_seconds = -1.0, 0, None, [], 0.0
    for epoch in range(1, epochs + 1):
        tagger.train()
        start, total_loss = time.perf_counter(), 0.0
        for idx in torch.randperm(len(data), generator=shuffle).split(batch_size):
            loss = tagger.loss(data.batch(idx.tolist()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(tagger.parameters(), cfg["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(idx)
        train_seconds += time.perf_counter() - start

        f1 = dev_score.compute()
        row = {"epoch": epoch, "loss": total_loss / len(data), "dev_f1": f1}
        row.update({f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups})
        history.append(row)
        log.info("epoch %d  loss %.4f  dev %s %.2f", epoch, row["loss"], dev_score.name, f1)
        if live is not None:
            live.log_metric(f"dev/{dev_score.name}", f1)
            for key, value in row.items():
                if key not in ("epoch", "dev_f1"):
                    live.log_metric(f"train/{key}", value)
            live.next_step()
        if f1 > best_f1:  # strict: ties keep the earlier epoch
            best_f1, best_epoch = f1, epoch
            best_state = {k: v.detach().clone() for k, v in tagger.state_dict().items()}

    tagger.load_state_dict(best_state)
    return FitResult(
        best_epoch=best_epoch,
        best_dev_f1=best_f1,
        history=history,
        train_seconds=train_seconds,
        sentences_per_s=epochs * len(data) / train_seconds,
        alignment={"train": data.alignment.as_dict(), "dev": dev_align.as_dict()},
        dev_metric=dev_score.name,
    )


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
    dev_score: DevScore | None = None,
    summary: dict | None = None,
) -> FitResult:
    """``fit`` logging to dvclive/<name>, then write models/<name> (the best epoch, and train_summary.json
    with ``summary`` merged in) under ``root``; ``started`` is when the run began (perf_counter)."""
    from dvclive import Live

    # No dvc.yaml edits and no experiment commits: the pipeline's dvc.yaml declares these files, and
    # experiments are made by `dvc exp run`, not by the logger.
    with Live(dir=str(root / "dvclive" / name), save_dvc_exp=False, dvcyaml=False) as live:
        result = fit(tagger, train, dev, cfg, seed, live, dev_score)
        live.summary.update({"best_epoch": result.best_epoch, f"best_dev_{result.dev_metric}": result.best_dev_f1})

    summary = {
        "best_epoch": result.best_epoch,
        f"best_dev_{result.dev_metric}": result.best_dev_f1,
        "epochs": cfg["epochs"],
        "train_tweets": len(train) if isinstance(train, TrainingSet) else train.num_rows,
        "wall_seconds": round(time.perf_counter() - started, 2),
        "train_seconds": round(result.train_seconds, 2),
        "train_sentences_per_s": round(result.sentences_per_s, 1),
        "torch_threads": torch.get_num_threads(),
        "alignment": result.alignment,
        "history": result.history,
        **(summary or {}),
    }
    with atomic_dir(root / "models" / name) as tmp:
        tagger.save(tmp)
        write_json(tmp / SUMMARY_FILE, summary)
    log.info("best epoch %d, dev %s %.2f", result.best_epoch, result.dev_metric, result.best_dev_f1)
    return result


def run_stage(params: dict, root: str | Path = ".") -> None:
    """Train on data/prepared/{train,dev}.parquet under ``root``; write models/tagger and dvclive/tagger."""
    root = Path(root)
    cfg, seed = params["train"], params["base"]["seed"]
    train, dev = read_train_dev(root)
    started = time.perf_counter()
    if cfg.get("threads"):  # CPU intra-op threads; small models run faster on one than on two busy cores
        torch.set_num_threads(cfg["threads"])
    seed_everything(seed)
    tagger = build_crf_tagger(cfg, train).to(resolve_device(params["base"]["device"]))
    train_and_save(tagger, train, dev, cfg, seed, root, "tagger", started)
