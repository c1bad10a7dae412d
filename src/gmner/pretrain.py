"""The ``pretrain`` stage: vision-to-text alignment (gmner.pretrain_model) before GMNER fine-tuning.

Reads data/prepared/{train,dev}.parquet, the detector candidates and their features, and the synthesize
stage's verdicts and generated images (gmner.grounding.VisualStore with the "generated" extra). Trains on
the train split's gold entities with AdamW (encoder at ``lr``, everything else at ``head_lr``, linear warmup
and decay), logs each component's per-epoch mean on train and, held out, on dev (negatives drawn with the
same seed every epoch, so dev curves compare) to dvclive/pretrain, and writes the last epoch's checkpoint
atomically to models/pretrain with pretrain_summary.json (what each objective had to work with).
``train_grounded.init: pretrain`` starts fine-tuning from it.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import fields
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from gmner.atomic import atomic_dir, write_json
from gmner.grounding import DEFAULT_PATHS, VisualStore, collate_visual, feature_statistics, switched_extras
from gmner.params import resolve_device, seed_everything
from gmner.pretrain_checkpoint import PretrainConfig, encoder_spec
from gmner.pretrain_model import AlignmentModel
from gmner.tagger import evaluating
from gmner.text_encoder import load_text_encoder
from gmner.train_tagger import param_groups, read_train_dev

log = logging.getLogger(__name__)

NAME = "pretrain"
SUMMARY_FILE = "pretrain_summary.json"
MODEL_PARAMS = tuple(f.name for f in fields(PretrainConfig) if f.name != "visual_dim")
FIT_PARAMS = ("epochs", "batch_size", "lr", "head_lr", "weight_decay", "warmup_ratio", "max_grad_norm", "threads")


class AlignmentSet:
    """A split's tweets encoded once, with their visual inputs and gold entities; ``batch`` collates any
    subset for ``AlignmentModel.losses``. ``unencoded`` counts the gold entities left out because none of
    their words kept a subword (truncation)."""

    def __init__(self, model: AlignmentModel, table: pa.Table, store: VisualStore):
        self.model = model
        self.visuals, self.coverage = store.lookup_table(table)
        self.encoded, self.alignment = model.encode(table.column("tokens").to_pylist())
        self.gold, self.spans, self.unencoded = [], [], 0
        for e, visual, entities in zip(self.encoded, self.visuals, table.column("entities").to_pylist()):
            position = {word: slot for slot, word in enumerate(e.word_idx)}
            boxes = [np.asarray(x["boxes"], np.float32).reshape(-1, 4) for x in entities]
            self.gold.append(np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32))
            spans = []  # (word slots, gold boxes, generated entity image or None)
            for x, gold in zip(entities, boxes):
                slots = [position[w] for w in range(x["start"], x["end"]) if w in position]
                self.unencoded += not slots
                if slots:
                    spans.append((slots, gold, (visual.entity_images or {}).get((x["start"], x["end"]))))
            self.spans.append(spans)

    def __len__(self) -> int:
        return len(self.encoded)

    def batch(self, indices: Sequence[int]) -> dict:
        """Text and visual inputs; per entity (S rows) its tweet, its place among the tweet's entities, its
        word slots, gold boxes and generated image; per tweet its candidate boxes and all its gold boxes."""
        model, dim = self.model, self.model.cfg.visual_dim
        batch = model.collate([self.encoded[i] for i in indices])
        batch.update(collate_visual([self.visuals[i] for i in indices], dim, model.device))
        rows = [(b, slot, *span) for b, i in enumerate(indices) for slot, span in enumerate(self.spans[i])]
        width = max((len(r[2]) for r in rows), default=1)
        span_words = torch.zeros((len(rows), width), dtype=torch.long)
        span_word_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        entity_images = torch.zeros((len(rows), dim))
        for s, (_, _, slots, _, image) in enumerate(rows):
            span_words[s, : len(slots)] = torch.tensor(slots)
            span_word_mask[s, : len(slots)] = True
            if image is not None:
                entity_images[s] = torch.from_numpy(np.asarray(image, np.float32))
        spans = {
            "span_tweet": torch.tensor([r[0] for r in rows], dtype=torch.long),
            "span_slot": torch.tensor([r[1] for r in rows], dtype=torch.long),
            "span_words": span_words,
            "span_word_mask": span_word_mask,
            "entity_image_features": entity_images,
            "entity_image_mask": torch.tensor([r[4] is not None for r in rows], dtype=torch.bool),
        }
        batch.update({k: v.to(model.device) for k, v in spans.items()})
        batch["span_boxes"] = [r[3] for r in rows]
        batch["candidates"] = [self.visuals[i].boxes for i in indices]
        batch["image_gold"] = [self.gold[i] for i in indices]
        return batch


def model_config(group: dict, visual_dim: int) -> PretrainConfig:
    """The model's config from the ``pretrain`` params (the optimiser params set aside)."""
    unknown = set(group) - set(MODEL_PARAMS) - set(FIT_PARAMS)
    if unknown:
        raise ValueError(f"pretrain: unknown params {sorted(unknown)}; known: {[*MODEL_PARAMS, *FIT_PARAMS]}")
    return PretrainConfig(visual_dim=visual_dim, **{k: v for k, v in group.items() if k in MODEL_PARAMS})


def build_model(params: dict, train: pa.Table, store: VisualStore) -> AlignmentModel:
    """A fresh model on the ``train`` text encoder (tiny: vocabulary from the train split, as fine-tuning)."""
    cfg = params["train"]
    words = (w for tokens in train.column("tokens").to_pylist() for w in tokens)
    encoder, tokenizer = load_text_encoder(cfg["encoder"], cfg["tiny"], words)
    return AlignmentModel(encoder, tokenizer, model_config(params[NAME], store.dim), cfg["max_length"],
                          encoder_spec(cfg))


def evaluate(model: AlignmentModel, data: AlignmentSet, batch_size: int, seed: int) -> dict[str, float]:
    """Each component's mean over ``data`` in eval mode (and their weighted sum's, and tia / eoa before the
    gate's weighting), negatives drawn from ``seed``."""
    rng, sums = np.random.default_rng(seed), Counter()
    with evaluating(model):
        for start in range(0, len(data), batch_size):
            indices = list(range(start, min(start + batch_size, len(data))))
            parts, _, unweighted = model.losses(data.batch(indices), rng)
            sums.update({name: value.item() * len(indices) for name, value in parts.items()})
            sums.update({f"{name}_unweighted": value * len(indices) for name, value in unweighted.items()})
            sums["total"] += model.total(parts).item() * len(indices)
    return {name: total / len(data) for name, total in sums.items()}


def fit(model: AlignmentModel, train: AlignmentSet, dev: AlignmentSet | None, cfg: dict, seed: int,
        live=None) -> dict:
    """Pre-train ``model`` in place with the optimiser params ``cfg``; returns the per-epoch history of each
    component (train and dev means) and what the first epoch counted."""
    from transformers import get_linear_schedule_with_warmup

    batch_size, epochs = cfg["batch_size"], cfg["epochs"]
    steps = epochs * math.ceil(len(train) / batch_size)
    optimizer = torch.optim.AdamW(param_groups(model, model.encoder, cfg["lr"], cfg["head_lr"], cfg["weight_decay"]))
    scheduler = get_linear_schedule_with_warmup(optimizer, round(cfg["warmup_ratio"] * steps), steps)
    shuffle, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    history, counts = [], Counter()
    for epoch in range(1, epochs + 1):
        model.train()
        sums, started = Counter(), time.perf_counter()
        for idx in torch.randperm(len(train), generator=shuffle).split(batch_size):
            parts, batch_counts, unweighted = model.losses(train.batch(idx.tolist()), rng)
            loss = model.total(parts)
            if not torch.isfinite(loss):
                values = {name: value.item() for name, value in parts.items()}
                raise FloatingPointError(f"pretrain epoch {epoch}: non-finite loss, components {values}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            sums.update({name: value.item() * len(idx) for name, value in parts.items()})
            sums.update({f"{name}_unweighted": value * len(idx) for name, value in unweighted.items()})
            sums["total"] += loss.item() * len(idx)
            if epoch == 1:
                counts.update(batch_counts)
        row = {"epoch": epoch, "seconds": round(time.perf_counter() - started, 2),
               **{f"train/{name}": total / len(train) for name, total in sums.items()}}
        if dev is not None and len(dev):
            row.update({f"dev/{name}": value for name, value in evaluate(model, dev, batch_size, seed).items()})
        history.append(row)
        log.info("epoch %d  %s", epoch, "  ".join(f"{k} {v:.4f}" for k, v in row.items() if "/" in k))
        if live is not None:
            for key, value in row.items():
                if "/" in key:
                    live.log_metric(key, value)
            live.next_step()
    return {"history": history, "counts": dict(counts)}


def run_stage(params: dict, root: str | Path = ".") -> None:
    """Pre-train on data/prepared/train.parquet under ``root`` (dev held out); write models/pretrain and
    dvclive/pretrain."""
    from dvclive import Live

    root = Path(root)
    group, seed = params[NAME], params["base"]["seed"]
    fit_cfg = {key: group[key] for key in FIT_PARAMS if key in group}
    started = time.perf_counter()
    if fit_cfg.get("threads"):  # CPU intra-op threads; small models run faster on one than on two busy cores
        torch.set_num_threads(fit_cfg["threads"])
    train, dev = read_train_dev(root)
    cfg = model_config(group, 1)
    # The synthesize stage's verdicts (gate, t2i) and generated images (t2i) come with the "generated" extra.
    store = VisualStore.read({key: root / path for key, path in DEFAULT_PATHS.items()}, cfg.top_k,
                             switched_extras(generated=cfg.gate or cfg.t2i))
    seed_everything(seed)
    model = build_model(params, train, store).to(resolve_device(params["base"]["device"]))
    train_set, dev_set = AlignmentSet(model, train, store), AlignmentSet(model, dev, store)
    model.set_feature_statistics(feature_statistics(train_set.visuals, store.dim))
    with Live(dir=str(root / "dvclive" / NAME), save_dvc_exp=False, dvcyaml=False) as live:
        result = fit(model, train_set, dev_set, fit_cfg, seed, live)
    summary = {
        "components": list(model.cfg.components),
        "epochs": fit_cfg["epochs"],
        "train_tweets": len(train_set),
        "counts": {**result["counts"], "unencoded_entities": train_set.unencoded},
        "train_visual": dict(train_set.coverage),
        "dev_visual": dict(dev_set.coverage),
        "first": {k: v for k, v in result["history"][0].items() if "/" in k},
        "last": {k: v for k, v in result["history"][-1].items() if "/" in k},
        "history": result["history"],
        "wall_seconds": round(time.perf_counter() - started, 2),
        "torch_threads": torch.get_num_threads(),
    }
    with atomic_dir(root / "models" / NAME) as tmp:
        model.save(tmp)
        write_json(tmp / SUMMARY_FILE, summary)
    log.info("pretrain: %s", {k: summary[k] for k in ("components", "counts", "last")})
