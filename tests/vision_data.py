"""Tiny prepared data and params shared by the caption, synthesize and features tests."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from gmner.params import load_params
from gmner.schema import TWEETS

REPO = Path(__file__).resolve().parents[1]


def vision_params(**groups) -> dict:
    """The repo's params.yaml on the CPU, only the train split, tiny batches; ``groups`` update groups."""
    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    params["base"].update(device="cpu", cache_root=".cache")
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
    for tweet_id, name, tokens, spans in tweets:
        rows.append({
            "tweet_id": tweet_id, "split": "train", "source": f"train.txt:{len(rows) + 1}", "image_id": tweet_id,
            "image_path": f"images/{name or tweet_id}.png", "image_sha256": shas.get(name),
            "width": 40 if name else None, "height": 30 if name else None,
            "tokens": tokens, "tags": ["O"] * len(tokens),
            "entities": [{"start": s, "end": e, "type": t, "text": " ".join(tokens[s:e]), "boxes": []}
                         for s, e, t in spans],
        })
    out = root / "data" / "prepared" / "train.parquet"
    out.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=TWEETS), out)
    return shas
