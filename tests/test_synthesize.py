"""The synthesize stage with a tiny random-weight Stable Diffusion pipeline and a tiny open_clip model."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from gmner.core.schema import SYNTHESIZED
from gmner.vision.synthesize import item_seed, run_stage

from helpers import run_twice, vision_params, write_prepared


def _rows(root: Path) -> dict:
    return {row["tweet_id"]: row for row in pq.read_table(root / "data" / "synthesized.parquet").to_pylist()}


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory):
    """The stage run twice on the tiny prepared data: the tests reading it are slow."""
    root = tmp_path_factory.mktemp("synth")
    write_prepared(root)
    first, second, first_bytes = run_twice(run_stage, root, ["synthesized.parquet"])
    return root, first, second, first_bytes["synthesized.parquet"]


@pytest.mark.slow
def test_one_row_per_tweet_with_generated_pngs(synthesized):
    root, first, _, _ = synthesized
    table = pq.read_table(root / "data" / "synthesized.parquet")
    assert table.schema == SYNTHESIZED
    assert table.column("tweet_id").to_pylist() == ["t1", "t2", "t3", "t4", "t5", "t6", "t7"]
    rows = _rows(root)
    assert rows["t1"]["prompt"] == "Obama visits Paris"
    assert [e["prompt"] for e in rows["t1"]["entities"]] == ["a photo of Obama", "a photo of Paris"]
    # The same prompt is one item: both tweets mentioning Obama share its image.
    assert rows["t1"]["entities"][0]["image_sha256"] == rows["t4"]["entities"][0]["image_sha256"]
    for row in rows.values():
        for image in (row, *row["entities"]):
            png = (root / image["image_path"]).read_bytes()
            assert png.startswith(b"\x89PNG") and hashlib.sha256(png).hexdigest() == image["image_sha256"]
    assert rows["t1"]["seed"] == item_seed(13, hashlib.sha256(b'["Obama visits Paris"]').hexdigest())
    assert first["prompts"] == 11 and first["generate"]["model_calls"] == 11


@pytest.mark.slow
def test_relevance_is_null_exactly_where_the_original_is_unusable(synthesized):
    root, first, _, _ = synthesized
    rows = _rows(root)
    assert {t: rows[t]["skip_reason"] for t in ("t5", "t6", "t7")} == {
        "t5": "not_an_image", "t6": "missing_image", "t7": "no_image"}
    for tweet_id, row in rows.items():
        scored = tweet_id not in ("t5", "t6", "t7")
        assert (row["relevance"] is not None) == scored and (row["relevant"] is not None) == scored
        if scored:
            assert -1.0 <= row["relevance"] <= 1.0 and row["relevant"] == (row["relevance"] > 0.6)
    assert first["unscored"] == 3 and first["relevant"] + first["irrelevant"] == 4


@pytest.mark.slow
def test_rerun_makes_no_model_calls_and_identical_bytes(synthesized):
    root, _, second, first_bytes = synthesized
    assert second["model_calls"] == 0 and second["generate"]["cache_hits"] == 11
    assert (root / "data" / "synthesized.parquet").read_bytes() == first_bytes


@pytest.mark.slow
def test_adding_tweets_costs_their_prompts_and_ends_equal_to_a_scratch_run(synthesized, tmp_path):
    root, _, _, first_bytes = synthesized
    write_prepared(tmp_path)
    prepared = tmp_path / "data" / "prepared" / "train.parquet"
    full = pq.read_table(prepared)
    pq.write_table(full.filter(pc.field("tweet_id") != "t2"), prepared)
    assert run_stage(vision_params(), tmp_path)["generate"]["model_calls"] == 9
    pq.write_table(full, prepared)
    again = run_stage(vision_params(), tmp_path)
    # t2: its tweet prompt and "a photo of Apple"; relevance: its original and its generated image.
    assert again["generate"]["model_calls"] == 2 and again["relevance"]["model_calls"] == 2
    # Other batches than in the scratch run, the same bytes: PNGs and Parquet.
    assert (tmp_path / "data" / "synthesized.parquet").read_bytes() == first_bytes
    for row in _rows(tmp_path).values():
        assert (tmp_path / row["image_path"]).read_bytes() == (root / row["image_path"]).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("theta, expected", [(-1.0, True), (1.1, False)])
def test_relevance_flag_follows_theta_without_model_calls(synthesized, tmp_path, theta, expected):
    root, *_ = synthesized
    shutil.copytree(root, tmp_path / "copy")
    summary = run_stage(vision_params(synthesize={"theta": theta}), tmp_path / "copy")
    assert summary["model_calls"] == 0
    flags = [row["relevant"] for row in _rows(tmp_path / "copy").values() if row["relevance"] is not None]
    assert flags == [expected] * 4


@pytest.mark.slow
def test_deleted_png_is_restored_from_the_cache(synthesized, tmp_path):
    root, *_ = synthesized
    shutil.copytree(root, tmp_path / "copy")
    png = tmp_path / "copy" / _rows(root)["t3"]["image_path"]
    original = png.read_bytes()
    png.unlink()
    assert run_stage(vision_params(), tmp_path / "copy")["model_calls"] == 0
    assert png.read_bytes() == original


@pytest.mark.slow
def test_seed_and_entity_param_change_the_work(synthesized, tmp_path):
    root, *_ = synthesized
    shutil.copytree(root, tmp_path / "copy")
    params = vision_params(synthesize={"entity_images": False})
    params["base"]["seed"] = 14
    summary = run_stage(params, tmp_path / "copy")
    assert summary["prompts"] == 7 and summary["generate"]["model_calls"] == 7
    rows, before = _rows(tmp_path / "copy"), _rows(root)
    assert all(row["entities"] == [] for row in rows.values())
    assert all(rows[t]["image_sha256"] != before[t]["image_sha256"] for t in rows)


def test_unknown_prompt_placeholder_is_named(tmp_path):
    write_prepared(tmp_path)
    with pytest.raises(ValueError, match="unknown placeholder 'user'"):
        run_stage(vision_params(synthesize={"tweet_prompt": "{user} says {text}"}), tmp_path)


_SHARDED = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from helpers import vision_params
from gmner.vision.synthesize import run_stage
run_stage(vision_params(), Path(sys.argv[1]))
"""


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(synthesized, tmp_path):
    # Rank 1 reads rank 0's generated images back from the shared cache for the relevance pass.
    root, *_ = synthesized
    write_prepared(tmp_path / "two")
    script = tmp_path / "sharded.py"
    script.write_text(_SHARDED.format(tests=str(Path(__file__).parent)))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), str(tmp_path / "two")], check=True, capture_output=True, timeout=300)
    two = tmp_path / "two" / "data"
    assert (two / "synthesized.parquet").read_bytes() == (root / "data" / "synthesized.parquet").read_bytes()
    assert sum(1 for _ in (tmp_path / "two" / ".cache" / "synthesize" / "png").rglob("*.png")) == 11
