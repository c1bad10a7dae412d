"""The small shared pieces: atomic writes, the skip policy, params overrides, the per-item cache."""

import os

import numpy as np
import pyarrow as pa
import pytest

from gmner.core.atomic import atomic_path, write_json, write_parquet
from gmner.core.errors import DataError, Policy
from gmner.core.hashing import digest
from gmner.core.params import ParamError, config_overrides, fit_params, load_params
from gmner.vision.cache import ItemCache

from helpers import REPO


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


def test_params_overrides_parse_yaml_values_and_refuse_unknown_keys(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 0.1\n  epochs: 2\ntrain_index:\n  fit: {}\n")
    params = load_params(path, ["train.lr=3e-5", "train_index.fit.epochs=5"])
    assert params["train"] == {"lr": 3e-5, "epochs": 2}
    assert params["train_index"]["fit"] == {"epochs": 5}  # a trainer's fit takes any key of train
    with pytest.raises(ParamError, match="^train.new: unknown param; known: batch_size, dropout, "):
        load_params(path, ["train.new.flag=true"])
    with pytest.raises(ParamError, match="^train_index.fit.lrr: unknown param; known: batch_size, "):
        load_params(path, ["train_index.fit.lrr=1"])
    assert load_params(path, ["train_vsgn.hidden=8"])["train_vsgn"] == {"hidden": 8}  # a param the file lacks
    with pytest.raises(ParamError, match="an override is group.key=value"):
        load_params(path, ["train.lr"])


def test_fit_params_are_the_shared_train_group_with_the_trainers_overrides():
    params = {"train": {"lr": 0.1, "epochs": 2}, "train_vsgn": {"fit": {"epochs": 5}}, "pretrain": {}}
    assert fit_params(params, "train_vsgn") == {"lr": 0.1, "epochs": 5}
    assert fit_params(params, "pretrain") == {"lr": 0.1, "epochs": 2}
    params["train_vsgn"]["fit"]["epoch"] = 1
    with pytest.raises(ParamError, match="^train_vsgn.fit.epoch: unknown param; known: epochs, lr$"):
        fit_params(params, "train_vsgn")


def test_a_trainer_cannot_read_more_candidates_than_detect_keeps(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("detect: {top_k: 8}\ntrain_grounded: {top_k: 8}\n")
    assert load_params(path)["train_grounded"]["top_k"] == 8
    with pytest.raises(ParamError, match="^train_grounded.top_k: 16 candidates asked for, but detect.top_k keeps 8"):
        load_params(path, ["train_grounded.top_k=16"])


def test_config_files_become_checked_overrides_that_load_params_reads_back(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("prepare:\n  files: {train: train.txt}\n  types: [PER]\ntrain:\n  lr: 0.1\n  encoder: tiny\n"
                      "  tiny: {hidden_size: 8}\ntrain_vsgn:\n  fit: {}\n")
    config = tmp_path / "twitter2015.yaml"
    config.write_text("prepare:\n  files: {train: train.txt, dev: valid.txt}\n  types: []\n"
                      "train: {lr: 3.0e-5, encoder: bert-base-cased, tiny: {hidden_size: 16}, patience: 2}\n"
                      "train_vsgn: {fit: {epochs: 2}}\n")
    overrides = config_overrides(config, params)
    assert overrides == ["++prepare.files={train: train.txt, dev: valid.txt}", "prepare.types=[]", "train.lr=3.0e-05",
                         "train.encoder=bert-base-cased", "train.tiny.hidden_size=16", "++train.patience=2",
                         "++train_vsgn.fit={epochs: 2}"]
    loaded = load_params(params, overrides)
    assert loaded["prepare"] == {"files": {"train": "train.txt", "dev": "valid.txt"}, "types": []}
    assert loaded["train"] == {"lr": 3e-5, "encoder": "bert-base-cased", "tiny": {"hidden_size": 16}, "patience": 2}
    assert loaded["train_vsgn"] == {"fit": {"epochs": 2}}
    config.write_text("train:\n  lr_typo: 1\n")
    with pytest.raises(ParamError, match="twitter2015.yaml: train.lr_typo: unknown param; known: "):
        config_overrides(config, params)
    config.write_text("train:\n  lr: -1\n")
    with pytest.raises(ParamError, match=r"twitter2015.yaml: train.lr: -1 is not a number > 0$"):
        config_overrides(config, params)


def test_shipped_dataset_configs_name_only_existing_params():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert {c.stem for c in configs} >= {"twitter2015", "twitter2017", "twitter-gmner"}
    for config in configs:
        assert config_overrides(config, REPO / "params.yaml")


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
