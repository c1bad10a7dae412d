"""Adding tweets re-runs the per-item vision stages on the new items only, with outputs identical to scratch.

The protocol is gmner.incremental's (benchmarks/bench_incremental.py reports it on the sample), at 24 sample
tweets with 3 of them added.
"""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest

from gmner.incremental import ALL_OUTPUTS, parquet_outputs, thin_dataset

from helpers import run_incremental


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    work = tmp_path_factory.mktemp("incremental")
    # Every 8th tweet of each split: 2 of train, 1 of dev; the empty test split stays empty.
    exp = run_incremental(work, {"train": 16, "dev": 8, "test": 0}, every=8)
    return exp, parquet_outputs(work / "scratch", ALL_OUTPUTS)


def _items(outputs: dict[str, bytes]) -> dict[tuple[str, str], set]:
    """(stage, runner pass) -> the distinct items that pass computes, read from a run's Parquet outputs."""
    tables = {name: pq.read_table(io.BytesIO(blob)).to_pylist() for name, blob in outputs.items()}
    tweets = [row for name, rows in tables.items() if name.startswith("prepared/") for row in rows]
    originals = {t["image_sha256"] for t in tweets if t["image_sha256"] is not None}
    synthesized = tables["synthesized.parquet"]
    tweet_images = {row["image_sha256"] for row in synthesized}
    entities = [e for row in synthesized for e in row["entities"]]
    return {
        ("detect", ""): originals,
        ("caption", ""): originals,
        ("synthesize", "generate"): {row["prompt"] for row in synthesized} | {e["prompt"] for e in entities},
        ("synthesize", "relevance"): originals | tweet_images,
        ("features", "images"): originals,
        ("features", "regions"): {(r["image_sha256"], str(r["boxes"])) for r in tables["regions.parquet"]},
        ("features", "generated"): tweet_images | {e["image_sha256"] for e in entities},
        ("features", "text"): {tuple(t["tokens"]) for t in tweets},
    }


def _summary(run: dict, stage: str, part: str) -> dict:
    summary = run[stage].summary
    return summary[part] if part else summary


@pytest.mark.slow
def test_incremental_outputs_equal_a_scratch_run_byte_for_byte(experiment):
    exp, scratch = experiment
    assert exp.identical == {"prepare": True, "detect": True, "caption": True, "synthesize": True, "features": True}
    assert (exp.dropped, exp.tweets) == (3, 24)
    base_tweets = sum(pq.read_table(io.BytesIO(blob)).num_rows
                      for name, blob in exp.base_outputs.items() if name.startswith("prepared/"))
    assert base_tweets == 21
    assert sorted(scratch) == sorted(exp.base_outputs)  # same files, every one compared


@pytest.mark.slow
def test_incremental_model_calls_are_exactly_the_new_items(experiment):
    exp, scratch = experiment
    base, full = _items(exp.base_outputs), _items(scratch)
    for (stage, part), items in full.items():
        new = items - base[(stage, part)]
        assert base[(stage, part)] <= items, (stage, part)
        assert new, f"{stage} {part}: the added tweets bring no new item, so the test shows nothing"
        incremental, cold = _summary(exp.incremental, stage, part), _summary(exp.base, stage, part)
        assert incremental["model_calls"] == len(new), (stage, part)
        assert incremental["cache_hits"] == cold["model_calls"] == len(base[(stage, part)]), (stage, part)
        assert _summary(exp.scratch, stage, part)["model_calls"] == len(items), (stage, part)


def test_thin_dataset_drops_every_nth_tweet_of_each_split(tmp_path):
    def conll(ids):
        return "".join(f"IMGID:{i}\nword\tO\n\n" for i in ids)

    (tmp_path / "a.txt").write_text(conll(range(1, 8)))
    (tmp_path / "b.txt").write_text(conll(range(10, 13)))
    (tmp_path / "c.txt").write_text("")
    dropped = thin_dataset(tmp_path, {"train": "a.txt", "dev": "b.txt", "test": "c.txt"}, every=3)
    assert dropped == 3
    assert (tmp_path / "a.txt").read_text() == conll([1, 2, 4, 5, 7])
    assert (tmp_path / "b.txt").read_text() == conll([10, 11])
    assert (tmp_path / "c.txt").read_text() == ""
