import numpy as np
import pytest

from gmner.core.errors import DataError, ModelUnavailable
from gmner.core.hashing import digest
from gmner.core.model_refs import model_fingerprint
from gmner.vision.cache import ItemCache
from gmner.vision.runner import ARRAYS, Item, run_items


class CountingCompute:
    """A fake model: one result per loaded value, counting how many items it saw."""

    def __init__(self):
        self.calls = 0

    def __call__(self, batch):
        self.calls += len(batch)
        return [{"value": x * 2.5, "label": f"n{x}"} for x in batch]


class Bad(DataError):
    def __init__(self, where, kind):
        super().__init__(where, "unusable")
        self.kind = kind


def load(payload):
    if payload < 0:
        raise Bad(f"item{payload}", "broken")
    return payload


def _run(tmp_path, payloads, compute, policy=None, **kw):
    cache = ItemCache(tmp_path / "cache", "test", digest("fake-model", {"p": 1}))
    items = [Item(f"k{p:03d}", p) for p in payloads]
    return run_items(items, cache=cache, compute=compute, load=load, batch_size=3,
                     policy=policy or {"broken": "skip"}, **kw)


def test_rerun_is_all_cache_hits_and_identical(tmp_path):
    first = _run(tmp_path, range(10), CountingCompute())
    again_compute = CountingCompute()
    again = _run(tmp_path, range(10), again_compute)
    assert first.summary["model_calls"] == 10 and first.summary["batches"] == 4
    assert again_compute.calls == 0 and again.summary["cache_hits"] == 10 and again.summary["model_calls"] == 0
    assert again.results == first.results
    assert list(first.results) == sorted(first.results)
    assert first.results["k004"] == {"value": 10.0, "label": "n4"}


def test_new_items_cost_calls_only_for_themselves(tmp_path):
    _run(tmp_path, range(20), CountingCompute())
    compute = CountingCompute()
    run = _run(tmp_path, range(21), compute)
    assert compute.calls == 1 and run.summary["cache_hits"] == 20
    assert run.results == _run(tmp_path / "scratch", range(21), CountingCompute()).results


def test_corrupt_entry_is_recomputed(tmp_path):
    _run(tmp_path, range(5), CountingCompute())
    entry = next((tmp_path / "cache").rglob("k002.bin"))
    entry.write_bytes(entry.read_bytes()[:-3] + b"xyz")
    compute = CountingCompute()
    run = _run(tmp_path, range(5), compute)
    assert compute.calls == 1 and run.summary["corrupt_entries"] == 1
    assert run.results["k002"] == {"value": 5.0, "label": "n2"}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_bad_items_are_counted_skips_and_not_cached(tmp_path, num_workers):
    run = _run(tmp_path, [-1, 1, 2, -2], CountingCompute(), num_workers=num_workers)
    assert sorted(run.results) == ["k001", "k002"]
    assert run.summary["skipped"] == {"skip:broken": 2}
    assert run.skipped == {"k-01": "broken", "k-02": "broken"}
    assert run.summary["skip_examples"]["skip:broken"] == "item-1: unusable"
    assert _run(tmp_path, [-1, 1, 2, -2], CountingCompute()).summary["cache_hits"] == 2


def test_error_policy_stops_with_the_item(tmp_path):
    with pytest.raises(DataError, match="item-3: unusable"):
        _run(tmp_path, [1, -3], CountingCompute(), policy={"broken": "error"})


def test_duplicate_keys_rejected(tmp_path):
    cache = ItemCache(tmp_path, "t", "f" * 64)
    with pytest.raises(ValueError, match="duplicate item keys"):
        run_items([Item("a", 1), Item("a", 2)], cache=cache, compute=CountingCompute(), policy={})


def test_arrays_codec(tmp_path):
    def embed(batch):
        return [{"vec": np.full(3, x, np.float32)} for x in batch]

    cache = ItemCache(tmp_path, "emb", "e" * 64)
    items = [Item("a", 1.5), Item("b", 2.0)]
    fresh = run_items(items, cache=cache, compute=embed, codec=ARRAYS, policy={})
    cached = run_items(items, cache=cache, compute=embed, codec=ARRAYS, policy={})
    assert cached.summary["model_calls"] == 0
    for key in "ab":
        np.testing.assert_array_equal(fresh.results[key]["vec"], cached.results[key]["vec"])
        assert cached.results[key]["vec"].dtype == np.float32


def test_fingerprint_tiny_depends_on_config_and_seed():
    base = model_fingerprint("tiny", config={"hidden": 8}, seed=1)
    assert base == model_fingerprint("tiny", config={"hidden": 8}, seed=1)
    assert base != model_fingerprint("tiny", config={"hidden": 8}, seed=2)
    assert base != model_fingerprint("tiny", config={"hidden": 16}, seed=1)


def test_fingerprint_follows_library_versions(monkeypatch):
    import gmner.core.model_refs as model_refs

    before = model_fingerprint("tiny", config={"hidden": 8}, seed=1)
    upgraded = {**model_refs._library_versions(), "torch": "99.0"}
    monkeypatch.setattr(model_refs, "_library_versions", lambda: upgraded)
    assert model_fingerprint("tiny", config={"hidden": 8}, seed=1) != before


def test_fingerprint_local_folder_follows_file_content(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    (model / "weights.bin").write_bytes(b"\0" * 100)
    memo = tmp_path / "memo"
    before = model_fingerprint(str(model), hash_memo=memo)
    assert len(list(memo.iterdir())) == 2
    assert model_fingerprint(str(model), hash_memo=memo) == before
    (model / "weights.bin").write_bytes(b"\1" * 100)
    assert model_fingerprint(str(model), hash_memo=memo) != before


def test_unreachable_hub_id_fails_naming_it():
    with pytest.raises(ModelUnavailable, match="no-such-org/no-such-model"):
        model_fingerprint("no-such-org/no-such-model")


def test_results_are_read_from_the_cache_not_held(tmp_path):
    run = _run(tmp_path, range(3), CountingCompute())
    assert run.outcome("k001") == ({"value": 2.5, "label": "n1"}, None)
    next((tmp_path / "cache").rglob("k001.bin")).unlink()
    with pytest.raises(RuntimeError, match="cache entry of item k001"):
        run.results["k001"]
    assert "k001" in run.results and len(run.results) == 3  # the keys are known without reading entries


def test_outcome_gives_the_skip_reason(tmp_path):
    run = _run(tmp_path, [-1, 1], CountingCompute())
    assert run.outcome("k-01") == (None, "broken")
    with pytest.raises(KeyError):
        run.outcome("k999")
