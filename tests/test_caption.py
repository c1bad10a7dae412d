"""The caption stage on a handful of tiny images, with a random-weight BLIP."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gmner.core.errors import DataError, ModelUnavailable
from gmner.core.schema import CAPTIONS
from gmner.vision.caption import run_stage

from helpers import run_twice, vision_params, write_prepared


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """The stage run twice on the tiny prepared data: the tests reading it are slow."""
    root = tmp_path_factory.mktemp("caption")
    shas = write_prepared(root)
    first, second, first_bytes = run_twice(run_stage, root, ["captions.parquet"])
    return root, shas, first, second, first_bytes["captions.parquet"]


@pytest.mark.slow
def test_one_row_per_distinct_image_with_flagged_failures(captioned):
    root, shas, first, _, _ = captioned
    table = pq.read_table(root / "data" / "captions.parquet")
    assert table.schema == CAPTIONS
    rows = {row["image_sha256"]: row for row in table.to_pylist()}
    assert table.column("image_sha256").to_pylist() == sorted(shas.values())
    for name in "abc":
        assert isinstance(rows[shas[name]]["caption"], str) and rows[shas[name]]["skip_reason"] is None
    assert rows[shas["bad"]] == {"image_sha256": shas["bad"], "caption": None, "skip_reason": "not_an_image"}
    assert rows[shas["gone"]] == {"image_sha256": shas["gone"], "caption": None, "skip_reason": "missing_image"}
    assert first["images"] == 5 and first["model_calls"] == 3 and first["flagged"] == 2
    assert first["skipped"] == {"skip:missing_image": 1, "skip:not_an_image": 1}
    summary = json.loads((root / "data" / "caption_summary.json").read_text())
    assert summary["model_calls"] == 0 and summary["cache_hits"] == 3  # the second run wrote it


@pytest.mark.slow
def test_rerun_reuses_the_cache_and_writes_identical_bytes(captioned):
    root, _, _, second, first_bytes = captioned
    assert second["model_calls"] == 0 and second["cache_hits"] == 3
    assert (root / "data" / "captions.parquet").read_bytes() == first_bytes


@pytest.mark.slow
def test_generation_params_change_the_cache_key(captioned, tmp_path):
    root, *_ = captioned
    shutil.copytree(root, tmp_path / "copy")
    params = vision_params(caption={"generate": {"max_new_tokens": 3, "num_beams": 1, "do_sample": False}})
    assert run_stage(params, tmp_path / "copy")["model_calls"] == 3
    assert run_stage(vision_params(), tmp_path / "copy")["model_calls"] == 0


def test_policy_error_stops_with_the_image_path(tmp_path):
    write_prepared(tmp_path)
    params = vision_params()
    params["caption"]["policy"]["not_an_image"] = "error"
    with pytest.raises(DataError, match=r"images/bad\.png"):
        run_stage(params, tmp_path)


@pytest.mark.parametrize("policy, message", [
    ({"not_an_image": "skp"}, r"caption\.policy\.not_an_image: 'skp' is not one of error, skip"),
    ({"unreadable": "skip"}, r"caption\.policy: unknown reasons \['unreadable'\]"),
])
def test_policy_param_is_checked(tmp_path, policy, message):
    write_prepared(tmp_path)
    with pytest.raises(ValueError, match=message):
        run_stage(vision_params(caption={"policy": policy}), tmp_path)


def test_unreachable_model_id_is_named(tmp_path):
    write_prepared(tmp_path)
    with pytest.raises(ModelUnavailable, match=r"caption\.model: 'no-such-org/blip-nowhere'"):
        run_stage(vision_params(caption={"model": "no-such-org/blip-nowhere"}), tmp_path)


@pytest.mark.slow
def test_a_saved_tiny_model_loads_from_its_folder(captioned, tmp_path):
    import torch

    from gmner.vision.models import Captioner

    *_, first_bytes = captioned
    params = vision_params()
    model, processor = Captioner(params["caption"], params["base"]["seed"], torch.device("cpu")).parts
    model.save_pretrained(tmp_path / "blip")
    processor.save_pretrained(tmp_path / "blip")
    write_prepared(tmp_path / "data_root")
    run_stage(vision_params(caption={"model": str(tmp_path / "blip")}), tmp_path / "data_root")
    expected = pq.read_table(pa.BufferReader(first_bytes)).column("caption").to_pylist()
    assert pq.read_table(tmp_path / "data_root" / "data" / "captions.parquet").column("caption").to_pylist() == expected
