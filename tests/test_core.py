"""The small shared pieces: atomic writes, the skip policy, params overrides, the per-item cache."""

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from gmner.atomic import atomic_path, write_json, write_parquet
from gmner.cache import ItemCache, digest
from gmner.errors import DataError, Policy
from gmner.params import config_overrides, load_params

ROOT = Path(__file__).resolve().parents[1]


def test_failed_atomic_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert os.listdir(tmp_path) == ["out.json"]


def test_parquet_bytes_are_reproducible(tmp_path):
    table = pa.table({"x": [1, 2, 3], "y": ["a", "b", None]})
    write_parquet(tmp_path / "a.parquet", table)
    write_parquet(tmp_path / "b.parquet", table)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_policy_errors_or_counts():
    policy = Policy({"bad_box": "skip", "bad_xml": "error"})
    assert policy.handle("bad_box", "x.xml", "degenerate") == "skip"
    assert policy.handle("bad_box", "y.xml", "outside") == "skip"
    with pytest.raises(DataError, match=r"^z\.xml: not xml$"):
        policy.handle("bad_xml", "z.xml", "not xml")
    assert policy.report() == {"counts": {"skip:bad_box": 2}, "first_example": {"skip:bad_box": "x.xml: degenerate"}}
    with pytest.raises(KeyError, match="no policy for 'other'"):
        policy.handle("other", "w", "m")


def test_params_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 0.1\n  epochs: 2\n")
    params = load_params(path, ["train.lr=3e-5", "train.new.flag=true"])
    assert params["train"] == {"lr": 3e-5, "epochs": 2, "new": {"flag": True}}
    with pytest.raises(ValueError, match="not key=value"):
        load_params(path, ["train.lr"])


def test_config_files_become_checked_overrides_that_load_params_reads_back(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("prepare:\n  files: {train: train.txt}\n  types: [PER]\ntrain:\n  lr: 0.1\n  encoder: tiny\n"
                      "  tiny: {hidden_size: 8}\n  fit: {}\n")
    config = tmp_path / "twitter2015.yaml"
    config.write_text("prepare:\n  files: {train: train.txt, dev: valid.txt}\n  types: []\n"
                      "train: {lr: 3.0e-5, encoder: bert-base-cased, tiny: {hidden_size: 16}, fit: {epochs: 2}}\n")
    overrides = config_overrides(config, params)
    assert overrides == ["++prepare.files={train: train.txt, dev: valid.txt}", "prepare.types=[]", "train.lr=3.0e-05",
                         "train.encoder=bert-base-cased", "train.tiny.hidden_size=16", "++train.fit={epochs: 2}"]
    loaded = load_params(params, overrides)
    assert loaded["prepare"] == {"files": {"train": "train.txt", "dev": "valid.txt"}, "types": []}
    assert loaded["train"] == {"lr": 3e-5, "encoder": "bert-base-cased", "tiny": {"hidden_size": 16}, "fit": {"epochs": 2}}
    config.write_text("train:\n  lr_typo: 1\n")
    with pytest.raises(ValueError, match="twitter2015.yaml: train.lr_typo is not a param of"):
        config_overrides(config, params)


def test_shipped_dataset_configs_name_only_existing_params():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert {c.stem for c in configs} >= {"twitter2015", "twitter2017", "twitter-gmner"}
    for config in configs:
        assert config_overrides(config, ROOT / "params.yaml")


def test_cache_round_trip_and_corruption(tmp_path):
    cache = ItemCache(tmp_path, "detect", digest("model", {"k": 16}))
    key = digest("image-sha")
    assert cache.get_arrays(key) is None
    cache.put_arrays(key, boxes=np.ones((2, 4), np.float32))
    np.testing.assert_array_equal(cache.get_arrays(key)["boxes"], np.ones((2, 4), np.float32))
    entry = next(cache.dir.rglob("*.bin"))
    entry.write_bytes(entry.read_bytes()[:-3] + b"xyz")  # bit rot / torn write
    assert cache.get(key) is None and not entry.exists()
    assert cache.stats() == {"cache_hits": 1, "cache_misses": 2, "corrupt_entries": 1}


def test_cache_is_partitioned_by_fingerprint(tmp_path):
    a = ItemCache(tmp_path, "caption", digest("blip", 1))
    b = ItemCache(tmp_path, "caption", digest("blip", 2))
    a.put_json("k" * 64, {"caption": "a dog"})
    assert b.get_json("k" * 64) is None
    assert a.get_json("k" * 64) == {"caption": "a dog"}
