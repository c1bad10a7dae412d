"""What several test modules share: tiny model configs, tiny tweet and visual tables, the repo's params on the
CPU, the vision stages' tiny prepared data, and whole pipeline runs under a temporary root.

Test modules import from here (``from helpers import ...``), never from one another; conftest.py holds the
fixtures. Everything here is deterministic: the same seeds give the same tables in every module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import signal
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gmner import incremental
from gmner.core import schema
from gmner.core.bio import spans
from gmner.core.params import load_params, seed_everything
from gmner.incremental import SAMPLE_ROOT, Incremental
from gmner.models.tagger import CRFTagger
from gmner.models.visual_store import DEFAULT_PATHS
from gmner.training.tagger import build_crf_tagger

REPO = Path(__file__).resolve().parents[1]

# --- tiny models ------------------------------------------------------------------------------------------

# Random-weight text encoders for load_text_encoder("tiny", ...): the CRF tagger's tests, and the visual
# taggers' (a narrower one, beside DIM-wide visual features).
TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
TINY_NARROW = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
# The `train` params of the visual taggers' tests (grounded, VSGN, BGA, pretrain): no dropout, 2 epochs.
TINY_TRAIN = {
    "encoder": "tiny", "tiny": TINY_NARROW,
    "max_length": 32, "dropout": 0.0, "epochs": 2, "batch_size": 4, "lr": 1e-3, "head_lr": 1e-2,
    "weight_decay": 0.01, "warmup_ratio": 0.1, "max_grad_norm": 1.0,
}


def seeded_tagger(tweets: pa.Table, cls: type[CRFTagger] = CRFTagger, train: dict = TINY_TRAIN, **extra) -> CRFTagger:
    """build_crf_tagger(train, tweets, cls, **extra) right after seed_everything(0): the same weights each call."""
    seed_everything(0)
    return build_crf_tagger(train, tweets, cls, **extra)


# --- tiny tweets and visual tables -------------------------------------------------------------------------

NAMES = {
    "PER": [["Obama"], ["Taylor", "Swift"], ["Messi"], ["Angela", "Merkel"]],
    "LOC": [["Paris"], ["New", "York"], ["Tokyo"], ["Lagos"]],
    "ORG": [["NASA"], ["Red", "Cross"], ["Apple"], ["UNICEF"]],
}
TEMPLATES = [
    ["PER", "visited", "LOC", "with", "ORG", "today"],
    ["great", "news", "from", "ORG", "in", "LOC", "!"],
    ["PER", "says", "hello", "to", "LOC"],
    ["ORG", "and", "PER", "meet", "again"],
]


def synthetic_tweets(n: int, seed: int, split: str) -> pa.Table:
    """Tweets from fixed templates with entity names drawn from small lists: an easy, learnable pattern (of
    varied lengths: 5 to 9 words)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        tokens, tags = [], []
        for slot in rng.choice(TEMPLATES):
            if slot in NAMES:
                name = rng.choice(NAMES[slot])
                tags += [f"B-{slot}"] + [f"I-{slot}"] * (len(name) - 1)
                tokens += name
            else:
                tokens.append(slot)
                tags.append("O")
        entities = [
            {"start": s.start, "end": s.end, "type": s.type, "text": " ".join(tokens[s.start : s.end]), "boxes": []}
            for s in spans(tags)
        ]
        rows.append({"tweet_id": f"{split}{i}", "split": split, "source": "synthetic", "tokens": tokens, "tags": tags,
                     "entities": entities})
    return pa.Table.from_pylist(rows, schema=schema.TWEETS)


DIM, K = 4, 3  # visual feature width; detector candidates per image
BOXES = [[0, 0, 10, 10], [20, 0, 30, 10], [0, 20, 10, 30]]  # every image's K candidates, best first
TOKENS = ["RT", "Ann", "Lee", "visits", "Oslo"]
TAGS = ["O", "B-PER", "I-PER", "O", "B-LOC"]


def entity(start: int, end: int, etype: str, tokens: list[str], boxes=()) -> dict:
    return {"start": start, "end": end, "type": etype, "text": " ".join(tokens[start:end]), "boxes": list(boxes)}


def tweet_row(i: int, sha: str | None, tokens: list[str], tags: list[str], entities: list[dict],
              split: str = "train") -> dict:
    """Tweet ``i`` of a tiny table: its image (40 x 40 when it has one) is ``sha``."""
    return {
        "tweet_id": str(i), "split": split, "source": "t", "image_id": str(i), "image_path": f"{i}.jpg",
        "image_sha256": sha, "width": 40 if sha else None, "height": 40 if sha else None,
        "tokens": tokens, "tags": tags, "entities": entities,
    }


def image_rows(sha: str, rng: np.random.Generator, missing: bool, dim: int = DIM) -> tuple[dict, dict, dict]:
    """One image's rows of the regions, region-features and image-features tables: the K BOXES and random
    embeddings from ``rng`` (the regions' drawn first), or, when ``missing``, null ones flagged corrupt_image."""
    skip = "corrupt_image" if missing else None
    return (
        {"image_sha256": sha, "boxes": BOXES, "scores": [0.9, 0.5, 0.1], "labels": ["o"] * K},
        {"image_sha256": sha, "embeddings": None if missing else rng.normal(size=(K, dim)).tolist(),
         "skip_reason": skip},
        {"image_sha256": sha, "embedding": None if missing else rng.normal(size=dim).tolist(), "skip_reason": skip},
    )


def visual_tables(rows: Sequence[tuple[dict, dict, dict]], dim: int = DIM,
                  token_shape: tuple[int, int] | None = None) -> tuple[pa.Table, pa.Table, pa.Table]:
    """The regions, region-features and image-features tables of ``image_rows`` (patch tokens: ``token_shape``)."""
    regions, region_features, image_features = (list(column) for column in zip(*rows)) if rows else ([], [], [])
    return (
        pa.Table.from_pylist(regions, schema=schema.REGIONS),
        pa.Table.from_pylist(region_features, schema=schema.region_features_schema(dim)),
        pa.Table.from_pylist(image_features, schema=schema.image_features_schema(dim, token_shape)),
    )


def tiny_dataset(n: int = 8, image_sha: str | None = None):
    """Tweets naming a drawn PER (box = candidate 0 or 1) and an undrawn LOC; tweet 0 has no image and the
    image of tweet 1 has null features; tweet 2's image is ``image_sha`` if given. Returns (tweets, regions,
    region features, image features)."""
    rng = np.random.default_rng(0)
    tweets, images = [], []
    for i in range(n):
        sha = None if i == 0 else (image_sha if i == 2 and image_sha else f"sha{i}")
        gold = [BOXES[i % 2]] if sha else []
        tweets.append(tweet_row(i, sha, TOKENS, TAGS, [entity(1, 3, "PER", TOKENS, gold), entity(4, 5, "LOC", TOKENS)]))
        if sha:
            images.append(image_rows(sha, rng, missing=i == 1))
    return (pa.Table.from_pylist(tweets, schema=schema.TWEETS), *visual_tables(images))


PATCH_DIM, PATCHES = 6, 5  # the VSGN tables' ViT patch tokens


def tiny_vsgn_dataset(n: int = 8, split: str = "train"):
    """Tweets naming a PER and (even tweets) a LOC; tweet 0 has no image, the image of tweet 1 has null features
    (and no caption), tweet 2's image no patch tokens. Returns (tweets, regions, region / image features, captions)."""
    rng = np.random.default_rng(0)
    tweets, images, captions = [], [], []
    for i in range(n):
        sha = None if i == 0 else f"sha{i}"
        tokens, tags = TOKENS[: 5 - i % 2], TAGS[: 5 - i % 2]
        tweets.append(tweet_row(i, sha, tokens, tags, [entity(1, 3, "PER", tokens)]
                                + ([entity(4, 5, "LOC", tokens)] if i % 2 == 0 else []), split))
        if sha is None:
            continue
        null = i == 1
        region, region_features, image_features = image_rows(sha, rng, missing=null)
        image_features["patch_tokens"] = None if null or i == 2 else rng.normal(size=(PATCHES, PATCH_DIM)).tolist()
        images.append((region, region_features, image_features))
        captions.append({"image_sha256": sha, "caption": None if null else f"a man in {'red' if i % 2 else 'the'} city",
                         "skip_reason": "corrupt_image" if null else None})
    return (
        pa.Table.from_pylist(tweets, schema=schema.TWEETS),
        *visual_tables(images, token_shape=(PATCHES, PATCH_DIM)),
        pa.Table.from_pylist(captions, schema=schema.CAPTIONS),
    )


FIRST_NAMES = ["Ann", "Bob", "Cleo", "Dan", "Eve", "Finn"]
PLACES = ["Oslo", "Rome", "Lima", "Kiev"]


def tiny_bga_dataset(n: int = 8, split: str = "train", images: bool = True) -> tuple[pa.Table, dict[str, pa.Table]]:
    """Tweets naming a PER (drawn in candidate 0) and a LOC, names varying; tweet 0 has no image, the image of
    tweet 1 has null features, tweet 3 no CLIP text embedding. Returns the tweets and the feature tables by
    DEFAULT_PATHS key."""
    rng = np.random.default_rng(0 if split == "train" else 1)
    tweets, image_tables, text = [], [], []
    for i in range(n):
        sha = f"{split}{i}" if images and i else None
        tokens = ["RT", FIRST_NAMES[i % 6], "Lee", "visits", PLACES[i % 4]]
        tweets.append(tweet_row(i, sha, tokens, TAGS, [entity(1, 3, "PER", tokens, [BOXES[0]]),
                                                       entity(4, 5, "LOC", tokens)], split))
        if i != 3:
            text.append({"tweet_id": str(i), "split": split, "embedding": rng.normal(size=DIM).tolist()})
        if sha:
            image_tables.append(image_rows(sha, rng, missing=i == 1))
    regions, region_features, image_features = visual_tables(image_tables)
    tables = {
        "regions": regions, "region_features": region_features, "image_features": image_features,
        "text_features": pa.Table.from_pylist(text, schema=schema.text_features_schema(DIM)),
    }
    return pa.Table.from_pylist(tweets, schema=schema.TWEETS), tables


def write_tables(root: Path, tables: Mapping[str, pa.Table] | Sequence[pa.Table]) -> Path:
    """Each table at its DEFAULT_PATHS place under ``root``: ``tables`` by key, or a sequence in that order
    (regions, region features, image features, captions, ...)."""
    if not isinstance(tables, Mapping):
        tables = dict(zip(DEFAULT_PATHS, tables))
    for key, table in tables.items():
        path = Path(root) / DEFAULT_PATHS[key]
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    return root


def write_splits(root: Path, splits: Mapping[str, pa.Table]) -> Path:
    """data/prepared/<split>.parquet under ``root``, as the prepare stage leaves them."""
    prepared = Path(root) / "data" / "prepared"
    prepared.mkdir(parents=True, exist_ok=True)
    for split, table in splits.items():
        pq.write_table(table, prepared / f"{split}.parquet")
    return root


# --- params and the command line --------------------------------------------------------------------------


def repo_params(*overrides: str, **base) -> dict:
    """The repo's params.yaml (read and checked afresh, with ``group.key=value`` overrides); ``base`` updates
    its base group."""
    params = load_params(REPO / "params.yaml", list(overrides))
    params["base"].update(base)
    return params


def gmner_predict(model_dir: Path, lines: Sequence[dict]) -> tuple[int, list[dict]]:
    """`gmner predict` of ``lines`` in the working directory (in.jsonl to out.jsonl): how many lines it
    predicted, and the output rows."""
    from gmner.predict import predict_jsonl

    Path("in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    predicted = predict_jsonl(model_dir, "in.jsonl", "out.jsonl")
    return predicted, [json.loads(line) for line in Path("out.jsonl").read_text().splitlines()]


def cli_exit_code(monkeypatch, *args: str) -> int:
    """The exit status of ``gmner args...`` run through gmner.cli.main, as the console script runs it."""
    from gmner.cli import main

    monkeypatch.setattr(sys, "argv", ["gmner", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


# --- tiny prepared data of the vision stages (caption, synthesize, features) ------------------------------


def vision_params(**groups) -> dict:
    """The repo's params.yaml on the CPU, only the train split, tiny batches; ``groups`` update groups."""
    params = repo_params(device="cpu", cache_root=".cache")
    params["prepare"]["files"] = {"train": "train.txt"}
    for stage in ("caption", "synthesize", "features"):
        params[stage]["batch_size"] = 2
    params["synthesize"]["steps"] = 2
    for name, values in groups.items():
        params[name].update(values)
    return params


def _image(path: Path, seed: int, size=(40, 30)) -> str:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_prepared(root: Path) -> dict:
    """data/prepared/train.parquet under ``root``: 6 tweets over 3 good images (one shown twice), one
    corrupt file, one file deleted after prepare, and one tweet without an image. Returns name -> sha256."""
    images = root / "images"
    images.mkdir(parents=True)
    shas = {name: _image(images / f"{name}.png", seed) for seed, name in enumerate(["a", "b", "c", "gone"])}
    (images / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    shas["bad"] = hashlib.sha256((images / "bad.png").read_bytes()).hexdigest()
    (images / "gone.png").unlink()
    tweets = [
        ("t1", "a", ["Obama", "visits", "Paris"], [(0, 1, "PER"), (2, 3, "LOC")]),
        ("t2", "b", ["RT", "@", "user", ":", "Apple", "event"], [(4, 5, "ORG")]),
        ("t3", "c", ["nice", "day"], []),
        ("t4", "a", ["Obama", "again"], [(0, 1, "PER")]),
        ("t5", "bad", ["broken", "image"], []),
        ("t6", "gone", ["deleted", "image"], []),
        ("t7", None, ["no", "image", "Berlin"], [(2, 3, "LOC")]),
    ]
    rows = []
    for tweet_id, name, tokens, named in tweets:
        rows.append({
            "tweet_id": tweet_id, "split": "train", "source": f"train.txt:{len(rows) + 1}", "image_id": tweet_id,
            "image_path": f"images/{name or tweet_id}.png", "image_sha256": shas.get(name),
            "width": 40 if name else None, "height": 30 if name else None,
            "tokens": tokens, "tags": ["O"] * len(tokens),
            "entities": [{"start": s, "end": e, "type": t, "text": " ".join(tokens[s:e]), "boxes": []}
                         for s, e, t in named],
        })
    out = root / "data" / "prepared" / "train.parquet"
    out.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.TWEETS), out)
    return shas


def run_twice(run_stage: Callable[[dict, Path], dict], root: Path, outputs: Sequence[str]):
    """A vision stage on ``root`` with vision_params(), then again (from its cache). Returns the two summaries
    and the bytes of ``outputs`` (paths under root/data) as the first run left them."""
    first = run_stage(vision_params(), root)
    first_bytes = {name: (root / "data" / name).read_bytes() for name in outputs}
    second = run_stage(vision_params(), root)
    return first, second, first_bytes


# --- whole pipeline runs under a temporary root -----------------------------------------------------------


def generate_sample(params: dict, root: Path) -> None:
    """The sample stage under ``root``: data/sample/ from the ``sample`` params."""
    from gmner.datasets import sample

    with contextlib.chdir(root):
        sample.run_stage(params)


def run_incremental(work: Path, sizes: dict[str, int], every: int) -> Incremental:
    """gmner.incremental's protocol under the empty ``work`` with the repo's params."""
    return incremental.run_incremental(repo_params(data_root=SAMPLE_ROOT, cache_root=".cache"), work, sizes, every)


# --- killed and resumed training runs -----------------------------------------------------------------------


class Killed(Exception):
    """Stands for a SIGKILL in the middle of a training run."""


def kill_after_checkpoint(monkeypatch, epoch: int) -> None:
    """Make the training loop die right after writing the checkpoint of ``epoch``."""
    from gmner.training import resume

    save = resume.save

    def save_then_die(folder, checkpoint, keep):
        save(folder, checkpoint, keep)
        if checkpoint["epoch"] == epoch:
            raise Killed

    monkeypatch.setattr(resume, "save", save_then_die)


def same_run(whole: Path, resumed: Path, model: str, weights: Sequence[str], summary: str) -> None:
    """Assert that models/<model> under ``resumed`` holds the bytes of ``weights`` as under ``whole``, and the
    same ``summary`` JSON but for timings."""
    for name in weights:
        assert (resumed / "models" / model / name).read_bytes() == (whole / "models" / model / name).read_bytes()
    timings = ("seconds", "wall_seconds", "train_seconds", "train_sentences_per_s")

    def untimed(obj):
        if isinstance(obj, dict):
            return {k: untimed(v) for k, v in obj.items() if k not in timings}
        return [untimed(v) for v in obj] if isinstance(obj, list) else obj

    assert untimed(json.loads((resumed / "models" / model / summary).read_text())) == \
        untimed(json.loads((whole / "models" / model / summary).read_text()))


@contextlib.contextmanager
def fails_after(seconds: int):
    """A block that blocks (a read of a FIFO, a hang) raises TimeoutError after ``seconds`` instead of hanging
    the suite (SIGALRM: the main thread only)."""
    def stop(*_):
        raise TimeoutError(f"did not finish in {seconds} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)

