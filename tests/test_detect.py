import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gmner.core import schema
from gmner.core.atomic import write_parquet
from gmner.core.errors import DataError, ModelUnavailable
from gmner.vision.detect import run_stage
from gmner.vision.detectors import build_detector

from helpers import repo_params

SPLITS = ("train", "dev", "test")


def make_params(backend="oracle", **detect):
    params = repo_params(device="cpu", cache_root=".cache")
    params["prepare"]["files"] = {split: f"{split}.txt" for split in SPLITS}
    params["detect"].update(backend=backend, **detect)
    return params


def _tweet(tweet_id, split, path, sha, size, words, boxes):
    return {
        "tweet_id": tweet_id, "split": split, "source": f"{split}.txt:1", "image_id": tweet_id,
        "image_path": path, "image_sha256": sha, "width": size[0] if sha else None,
        "height": size[1] if sha else None, "tokens": words, "tags": ["O"] * len(words),
        "entities": [{"start": 0, "end": 1, "type": "PER", "text": words[0], "boxes": boxes}],
    }


def make_root(root: Path, n: int = 6, bad: bool = False, size=(48, 36)) -> Path:
    """A repo root with n images over three splits, one image shown by two tweets, one tweet without image."""
    images = root / "data" / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = {split: [] for split in SPLITS}
    for i in range(n):
        path = images / f"{i}.png"
        img = Image.new("RGB", size, (40 * i % 256, 90, 200))
        img.paste((255, 255, 255), (4 + i, 4, 24 + i, 30))
        img.save(path)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        split = SPLITS[i % 3]
        rel = path.relative_to(root).as_posix()
        rows[split].append(_tweet(f"t{i}", split, rel, sha, size, [f"Name{i}", "at", "the", "park"],
                                  [[4.0 + i, 4.0, 24.0 + i, 30.0]]))
        if i == 0:
            rows["test"].append(_tweet("t0b", "test", rel, sha, size, ["Other", "dog"], [[1.0, 1.0, 9.0, 9.0]]))
    rows["dev"].append(_tweet("t-noimg", "dev", None, None, size, ["Nobody"], []))
    if bad:
        (images / "empty.jpg").touch()
        (images / "text.jpg").write_bytes(b"not an image at all")
        for name in ("empty.jpg", "text.jpg", "gone.jpg"):
            rows["train"].append(_tweet(name, "train", f"data/images/{name}", hashlib.sha256(name.encode()).hexdigest(),
                                        size, ["Bad"], []))
    for split, split_rows in rows.items():
        table = pa.Table.from_pylist(split_rows, schema=schema.TWEETS)
        write_parquet(root / "data" / "prepared" / f"{split}.parquet", table)
    return root


def regions(root: Path) -> list[dict]:
    return pq.read_table(root / "data" / "regions.parquet").to_pylist()


def parquet_bytes(root: Path) -> bytes:
    return (root / "data" / "regions.parquet").read_bytes()


def assert_valid_regions(rows, k, size=(48, 36)):
    assert [r["image_sha256"] for r in rows] == sorted(r["image_sha256"] for r in rows)
    for row in rows:
        boxes = np.asarray(row["boxes"], dtype=np.float32).reshape(-1, 4)
        assert len(boxes) == len(row["scores"]) == len(row["labels"]) <= k
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= size[0]).all() and (boxes[:, 3] <= size[1]).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert row["scores"] == sorted(row["scores"], reverse=True)


@pytest.mark.slow
def test_oracle_hides_gold_among_distractors_and_reruns_from_cache(tmp_path):
    root = make_root(tmp_path / "a")
    summary = run_stage(make_params(top_k=5), root)
    rows = regions(root)
    assert len(rows) == 6 and summary["model_calls"] == 6 and summary["rows"] == 6
    assert_valid_regions(rows, 5)
    assert all(len(r["boxes"]) == 5 for r in rows)
    shared = next(r for r in rows if [1.0, 1.0, 9.0, 9.0] in r["boxes"])
    assert [4.0, 4.0, 24.0, 30.0] in shared["boxes"]  # gold of both tweets showing image 0
    first = parquet_bytes(root)
    again = run_stage(make_params(top_k=5), root)
    assert again["cache_hits"] == 6 and again["model_calls"] == 0 and parquet_bytes(root) == first
    saved = json.loads((root / "data" / "regions_summary.json").read_text())
    assert saved["items"] == 6 and saved["cache_hits"] == 6 and "items_per_s" in saved


@pytest.mark.slow
def test_new_images_cost_only_their_calls_and_output_matches_scratch(tmp_path):
    root = make_root(tmp_path / "a", n=5)
    run_stage(make_params(), root)
    make_root(root, n=6)  # one more image; the first five are unchanged
    summary = run_stage(make_params(), root)
    assert summary["model_calls"] == 1 and summary["cache_hits"] == 5
    scratch = make_root(tmp_path / "b", n=6)
    run_stage(make_params(), scratch)
    assert parquet_bytes(root) == parquet_bytes(scratch)


@pytest.mark.slow
def test_corrupt_cache_entry_is_recomputed(tmp_path):
    root = make_root(tmp_path / "a")
    run_stage(make_params(), root)
    before = parquet_bytes(root)
    entry = next((root / ".cache" / "detect").rglob("*.bin"))
    entry.write_bytes(b"garbage")
    summary = run_stage(make_params(), root)
    assert summary["corrupt_entries"] == 1 and summary["model_calls"] == 1
    assert parquet_bytes(root) == before


@pytest.mark.slow
def test_torchvision_backend_and_bad_images_per_policy(tmp_path):
    root = make_root(tmp_path / "a", n=3, bad=True)
    params = make_params("torchvision", top_k=4, num_workers=1)
    summary = run_stage(params, root)
    rows = regions(root)
    assert len(rows) == 3 and summary["items"] == 6
    assert summary["skipped"] == {"skip:empty_image": 1, "skip:missing_image": 1, "skip:not_an_image": 1}
    assert_valid_regions(rows, 4)
    assert sum(len(r["boxes"]) for r in rows) > 0
    assert all(label.startswith("class_") for r in rows for label in r["labels"])
    params["detect"]["policy"]["not_an_image"] = "error"
    with pytest.raises(DataError, match="text.jpg: not a readable image format"):
        run_stage(params, root)


def test_torchvision_weights_offline_fail_naming_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = make_params("torchvision")["detect"]
    cfg["torchvision"]["weights"] = "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1"
    with pytest.raises(ModelUnavailable, match="FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1"):
        build_detector(cfg, seed=0, device="cpu")
    cfg["torchvision"]["weights"] = "no/such/checkpoint.pt"
    with pytest.raises(ValueError, match="neither a file nor a torchvision weights name"):
        build_detector(cfg, seed=0, device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-owlv2", "tiny-grounding-dino"])
@pytest.mark.parametrize("prompt", ["labels", "tweet"])
def test_zero_shot_backends(tmp_path, model, prompt):
    root = make_root(tmp_path / "a", n=3)
    params = make_params("zero_shot", top_k=6, batch_size=2)
    params["detect"]["zero_shot"].update(model=model, prompt=prompt)
    summary = run_stage(params, root)
    rows = regions(root)
    assert summary["model_calls"] == 3 and len(rows) == 3
    assert_valid_regions(rows, 6)
    words = {"Name0", "Name1", "Name2", "at", "the", "park", "Other", "dog"}
    allowed = words if prompt == "tweet" else set(params["detect"]["zero_shot"]["labels"])
    assert {label for r in rows for label in r["labels"]} <= allowed


_SLOW_RUN = """
import json, sys, time
from gmner.vision.detectors.oracle import OracleDetector
from gmner.vision.detect import run_stage

fast = OracleDetector.__call__
def slow(self, batch):
    time.sleep(0.15)
    return fast(self, batch)
OracleDetector.__call__ = slow
run_stage(json.loads(sys.argv[1]), sys.argv[2])
"""


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_matches_uninterrupted(tmp_path):
    params = make_params(batch_size=2)
    root = make_root(tmp_path / "killed", n=36)
    cache = root / ".cache" / "detect"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, json.dumps(params), str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(cache.rglob("*.bin"))) < 6 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(cache.rglob("*.bin")))
    assert 6 <= done < 36, "the run was not killed mid-way"
    summary = run_stage(params, root)
    assert summary["cache_hits"] == done and summary["model_calls"] == 36 - done
    scratch = make_root(tmp_path / "scratch", n=36)
    run_stage(params, scratch)
    assert parquet_bytes(root) == parquet_bytes(scratch)
    assert sorted(p.name for p in (root / "data").iterdir()) == ["images", "prepared", "regions.parquet",
                                                                 "regions_summary.json"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, params: dict, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    summary = run_stage(params, root)
    assert (summary is not None) == (rank == 0)
    if rank == 0:
        (Path(root) / "rank0_summary.json").write_text(json.dumps(summary))


@pytest.mark.slow
def test_two_gloo_processes_merge_to_the_one_process_output(tmp_path):
    import torch.multiprocessing as mp

    params = make_params()
    sharded = make_root(tmp_path / "sharded", n=9)
    mp.spawn(_rank_main, args=(2, _free_port(), params, str(sharded)), nprocs=2)
    single = make_root(tmp_path / "single", n=9)
    run_stage(params, single)
    assert parquet_bytes(sharded) == parquet_bytes(single)
    summary = json.loads((sharded / "rank0_summary.json").read_text())
    assert summary["processes"] == 2 and summary["model_calls"] == 9 and summary["items"] == 9
