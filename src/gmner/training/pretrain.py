"""The ``pretrain`` stage: vision-to-text alignment (gmner.pretrain.model) before GMNER fine-tuning.

Reads data/prepared/{train,dev}.parquet, the detector candidates and their features, the synthesize stage's
verdicts and generated images (the "generated" extra of gmner.models.visual_store.VisualStore, for gate or
t2i) and the masked images of the gold boxes (the "masked" extra, data/features/masked.parquet, for tia).
Trains on the train split's gold entities with AdamW (encoder at ``lr``, everything else at ``head_lr``,
linear warmup and decay), logs each component's per-epoch mean on train and, held out, on dev (negatives
drawn with the same seed every epoch, so dev curves compare) to dvclive/pretrain, and writes the last epoch's
checkpoint atomically to models/pretrain with pretrain_summary.json (what each objective had to work with).
``train_grounded.init: pretrain`` and ``train_index.init: pretrain`` start fine-tuning from it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import fields
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from gmner.core.atomic import atomic_dir, write_json
from gmner.core.params import ParamError, check_keys, fit_params
from gmner.models.tagger import evaluating
from gmner.models.text_encoder import load_text_encoder
from gmner.models.visual_store import DEFAULT_PATHS, VisualStore, collate_visual, feature_statistics, switched_extras
from gmner.pretrain.checkpoint import PretrainConfig, encoder_spec
from gmner.pretrain.model import AlignmentModel
from gmner.training.loop import DevEval, fit, is_main_process, processes, start_run
from gmner.training.resume import run_folder
from gmner.training.tagger import live_log, prepared_inputs, read_train_dev

log = logging.getLogger(__name__)

NAME = "pretrain"
SUMMARY_FILE = "pretrain_summary.json"
MODEL_PARAMS = tuple(f.name for f in fields(PretrainConfig) if f.name != "visual_dim")


def visual_extras(cfg: PretrainConfig) -> tuple[str, ...]:
    """The VisualStore extras the switches read: the synthesize stage's verdicts (gate, t2i) and generated
    images (t2i) come with "generated", TIA's masked images with "masked"."""
    return switched_extras(generated=cfg.gate or cfg.t2i, masked=cfg.tia)


class AlignmentSet:
    """A split's tweets encoded once, with their visual inputs and gold entities; ``batch`` collates any
    subset for ``AlignmentModel.losses``. ``unencoded`` counts the gold entities left out because none of
    their words kept a subword (truncation)."""

    def __init__(self, model: AlignmentModel, table: pa.Table, store: VisualStore):
        missing = set(visual_extras(model.cfg)) - set(store.extras)
        if missing:  # the objectives would see no verdicts, generated or masked images: terms of 0, not errors
            raise ValueError(f"pretrain {model.cfg.components} needs the visual extras {sorted(missing)}")
        self.model, self.epoch = model, 0
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

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.encoded]

    def batch(self, indices: Sequence[int]) -> dict:
        """Text and visual inputs; per entity (S rows) its tweet, its place among the tweet's entities, its
        word slots, gold boxes and generated image; per tweet its candidate boxes and all its gold boxes."""
        model, dim = self.model, self.model.cfg.visual_dim
        batch = model.collate([self.encoded[i] for i in indices])
        batch.update(collate_visual([self.visuals[i] for i in indices], dim, model.collate_device))
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
        batch.update({k: v.to(model.collate_device) for k, v in spans.items()})
        batch["span_boxes"] = [r[3] for r in rows]
        batch["candidates"] = [self.visuals[i].boxes for i in indices]
        batch["image_gold"] = [self.gold[i] for i in indices]
        return batch


def model_config(group: dict, visual_dim: int) -> PretrainConfig:
    """The model's config from the ``pretrain`` params (the ``fit`` overrides set aside)."""
    check_keys(NAME, group, ("fit", *MODEL_PARAMS))
    try:
        return PretrainConfig(visual_dim=visual_dim, **{k: v for k, v in group.items() if k in MODEL_PARAMS})
    except ValueError as err:  # a value the model cannot take: the param's one-line error
        raise ParamError(NAME, str(err)) from None


def build_model(params: dict, train: pa.Table, store: VisualStore) -> AlignmentModel:
    """A fresh model on the ``train`` text encoder (tiny: vocabulary from the train split, as fine-tuning)."""
    cfg = fit_params(params, NAME)
    words = (w for tokens in train.column("tokens").to_pylist() for w in tokens)
    encoder, tokenizer = load_text_encoder(cfg["encoder"], cfg["tiny"], words)
    return AlignmentModel(encoder, tokenizer, model_config(params[NAME], store.dim), cfg["max_length"],
                          encoder_spec(cfg))


def evaluate(model: AlignmentModel, data: AlignmentSet, batch_size: int, seed: int) -> dict[str, float]:
    """Each component's mean over ``data`` in eval mode (and their weighted sum's, and tia and local before
    the gate's and the coupling's weighting), negatives drawn from ``seed``."""
    rng, sums = np.random.default_rng(seed), Counter()
    with evaluating(model):
        for start in range(0, len(data), batch_size):
            indices = list(range(start, min(start + batch_size, len(data))))
            parts, _, unweighted = model.losses(data.batch(indices), rng)
            sums.update({name: value.item() * len(indices) for name, value in parts.items()})
            sums.update({f"{name}_unweighted": value * len(indices) for name, value in unweighted.items()})
            sums["loss"] += model.total(parts).item() * len(indices)
    return {name: total / len(data) for name, total in sums.items()}


class AlignmentStep:
    """The loop's step: the weighted sum of the objectives, each logged, with negatives drawn from one
    seeded generator over the run; ``counts`` is what the first epoch's batches had to work with. Both are
    state a resumed run restores."""

    def __init__(self, model: AlignmentModel, train: AlignmentSet, seed: int):
        self.model, self.train = model, train
        self.rng, self.counts = np.random.default_rng(seed), Counter()

    def __call__(self, batch: dict):
        parts, batch_counts, unweighted = self.model.losses(batch, self.rng)
        if self.train.epoch == 1:
            self.counts.update(batch_counts)
        terms = {name: value.item() for name, value in parts.items()}
        terms.update({f"{name}_unweighted": value for name, value in unweighted.items()})
        return self.model.total(parts), terms

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.counts = Counter(state["counts"])


def fit_alignment(model: AlignmentModel, train: AlignmentSet, dev: AlignmentSet | None, cfg: dict, seed: int,
                  live=None, run_dir: Path | None = None) -> dict:
    """Pre-train ``model`` in place with the optimiser params ``cfg`` through the one training loop, keeping
    the last epoch; returns the per-epoch history of each component (train and dev means) and what the
    first epoch counted. ``run_dir`` holds the run's checkpoints."""
    step = AlignmentStep(model, train, seed)
    held_out = DevEval(lambda: evaluate(model, dev, cfg["batch_size"], seed)) if dev is not None and len(dev) else None
    result = fit(model, train, cfg, seed, step=step, dev=held_out, live=live, run_dir=run_dir)
    return {"history": result.history, "counts": dict(step.counts)}


def run_stage(params: dict, root: str | Path = ".") -> None:
    """Pre-train on data/prepared/train.parquet under ``root`` (dev held out); write models/pretrain and
    dvclive/pretrain."""
    root = Path(root)
    fit_cfg, seed = fit_params(params, NAME), params["base"]["seed"]
    started = time.perf_counter()
    train, dev = read_train_dev(root)
    cfg = model_config(params[NAME], 1)
    store = VisualStore.read({key: root / path for key, path in DEFAULT_PATHS.items()}, cfg.top_k,
                             visual_extras(cfg))
    device = start_run(seed, params["base"]["device"], fit_cfg.get("threads"))
    model = build_model(params, train, store).to(device)
    train_set, dev_set = AlignmentSet(model, train, store), AlignmentSet(model, dev, store)
    model.set_feature_statistics(feature_statistics(train_set.visuals, store.dim))
    run_dir = run_folder(root, params, NAME, [*prepared_inputs(root), *store.sources], processes())
    with live_log(root, NAME) as live:
        result = fit_alignment(model, train_set, dev_set, fit_cfg, seed, live, run_dir)
    if not is_main_process():
        return
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
