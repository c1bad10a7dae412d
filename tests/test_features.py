"""The features stage with tiny random-weight encoders (open_clip, transformers CLIP and ViT)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gmner.core.params import ParamError
from gmner.core.schema import (
    REGIONS,
    SYNTHESIZED,
    image_features_schema,
    masked_features_schema,
    region_features_schema,
    text_features_schema,
)
from gmner.vision import features
from gmner.vision.features import MaskedCopies, run_stage
from gmner.vision.inputs import ImageLoad

from helpers import REPO, cli_exit_code, vision_params, write_prepared

OUTPUTS = ("images", "regions", "masked", "generated", "text")
MASKED = {"splits": ["train"], "fill": "mean", "blur_radius": 16}  # vision_params prepares the train split only
# Gold boxes of image a (40 x 30), one list per entity of its tweets: two distinct boxes, one of them in both.
GOLD = {"t1": [[[0, 0, 20, 15]], [[20, 15, 40, 30], [0, 0, 20, 15]]], "t4": [[[0, 0, 20, 15]]]}


def params(**values) -> dict:
    """vision_params() with masked images of the train split; ``values`` update the features group."""
    return vision_params(features={"masked": MASKED, **values})


def write_inputs(root: Path) -> dict:
    """Prepared tweets (gold boxes: GOLD, and one on each unreadable image) plus the small regions and
    synthesized tables the features stage reads."""
    shas = write_prepared(root)
    prepared = root / "data" / "prepared" / "train.parquet"
    tweets = pq.read_table(prepared)
    rows = tweets.to_pylist()
    for row in rows:
        for entity, boxes in zip(row["entities"], GOLD.get(row["tweet_id"], ())):
            entity["boxes"] = boxes
        if row["tweet_id"] in ("t5", "t6"):  # the unreadable images get a gold box: flagged rows of masked.parquet
            word = row["tokens"][0]
            row["entities"] = [{"start": 0, "end": 1, "type": "OTHER", "text": word, "boxes": [[1, 1, 5, 5]]}]
    pq.write_table(pa.Table.from_pylist(rows, schema=tweets.schema), prepared)
    regions = [
        # a: the whole image, a box, and a degenerate box, which still gets a (one-pixel) crop.
        {"image_sha256": shas["a"], "boxes": [[0, 0, 40, 30], [5.5, 5, 39.5, 29.9], [3, 3, 3, 3]],
         "scores": [0.9, 0.8, 0.1], "labels": ["x", "y", "z"]},
        {"image_sha256": shas["b"], "boxes": [], "scores": [], "labels": []},
        {"image_sha256": shas["gone"], "boxes": [[0, 0, 5, 5]], "scores": [0.5], "labels": ["x"]},
    ]
    pq.write_table(pa.Table.from_pylist(regions, schema=REGIONS), root / "data" / "regions.parquet")
    generated = root / "gen"
    generated.mkdir()
    shutil.copy(root / "images" / "b.png", generated / "g1.png")
    shutil.copy(root / "images" / "c.png", generated / "g2.png")
    sha = {n: hashlib.sha256((generated / f"{n}.png").read_bytes()).hexdigest() for n in ("g1", "g2")}
    sha["lost"] = "0" * 64
    entity = {"start": 0, "end": 1, "type": "PER", "text": "Obama", "prompt": "a photo of Obama"}
    rows = [
        {"tweet_id": "t1", "split": "train", "prompt": "p1", "image_path": "gen/g1.png", "image_sha256": sha["g1"],
         "seed": 1, "relevance": 0.5, "relevant": False, "skip_reason": None,
         "entities": [{**entity, "image_path": "gen/g2.png", "image_sha256": sha["g2"]}]},
        {"tweet_id": "t2", "split": "train", "prompt": "p2", "image_path": "gen/lost.png", "image_sha256": sha["lost"],
         "seed": 2, "relevance": None, "relevant": None, "skip_reason": "no_image", "entities": []},
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=SYNTHESIZED), root / "data" / "synthesized.parquet")
    return {**shas, **sha}


def _table(root: Path, name: str) -> pa.Table:
    return pq.read_table(root / "data" / "features" / f"{name}.parquet")


@pytest.fixture(scope="module")
def featured(tmp_path_factory):
    """The stage run twice on the tiny inputs: the tests reading it are slow."""
    root = tmp_path_factory.mktemp("features")
    shas = write_inputs(root)
    first = run_stage(params(), root)
    first_bytes = {name: (root / "data" / "features" / f"{name}.parquet").read_bytes() for name in OUTPUTS}
    return root, shas, first, run_stage(params(), root), first_bytes


@pytest.mark.slow
def test_image_embeddings_and_patch_tokens_with_flagged_rows(featured):
    root, shas, first, _, _ = featured
    table = _table(root, "images")
    assert table.schema == image_features_schema(64, (16, 64))  # tiny: 64-d, (64 / 16) ** 2 patches of width 64
    rows = {row["image_sha256"]: row for row in table.to_pylist()}
    assert list(rows) == sorted(shas[n] for n in ("a", "b", "c", "bad", "gone"))
    for name in "abc":
        embedding, tokens = np.array(rows[shas[name]]["embedding"]), np.array(rows[shas[name]]["patch_tokens"])
        assert embedding.shape == (64,) and tokens.shape == (16, 64) and np.abs(embedding).sum() > 0
        assert rows[shas[name]]["skip_reason"] is None
    # Unusable images are null, never a zero vector that looks real.
    assert {k: rows[shas["bad"]][k] for k in ("embedding", "patch_tokens", "skip_reason")} == {
        "embedding": None, "patch_tokens": None, "skip_reason": "not_an_image"}
    assert rows[shas["gone"]]["embedding"] is None and rows[shas["gone"]]["skip_reason"] == "missing_image"
    assert first["images"]["model_calls"] == 3 and first["images"]["skipped"] == {
        "skip:missing_image": 1, "skip:not_an_image": 1}


@pytest.mark.slow
def test_region_embeddings_follow_the_boxes(featured):
    root, shas, *_ = featured
    table = _table(root, "regions")
    assert table.schema == region_features_schema(64)
    rows = {row["image_sha256"]: row for row in table.to_pylist()}
    assert list(rows) == sorted(shas[n] for n in ("a", "b", "gone"))
    a = np.array(rows[shas["a"]]["embeddings"], dtype=np.float32)
    assert a.shape == (3, 64) and rows[shas["b"]]["embeddings"] == []
    assert rows[shas["gone"]] == {"image_sha256": shas["gone"], "embeddings": None, "skip_reason": "missing_image"}
    # The whole-image box is the whole image: the same embedding as in images.parquet.
    whole = next(r for r in _table(root, "images").to_pylist() if r["image_sha256"] == shas["a"])["embedding"]
    np.testing.assert_allclose(a[0], whole, rtol=1e-5, atol=1e-6)
    assert not np.allclose(a[1], a[0])


@pytest.mark.slow
def test_masked_images_one_row_per_image_with_gold_boxes(featured):
    root, shas, first, *_ = featured
    table = _table(root, "masked")
    assert table.schema == masked_features_schema(64)
    rows = {row["image_sha256"]: row for row in table.to_pylist()}
    assert list(rows) == sorted(shas[n] for n in ("a", "bad", "gone"))  # b and c have no gold box
    a = rows[shas["a"]]
    assert a["boxes"] == [[0, 0, 20, 15], [20, 15, 40, 30]] and a["skip_reason"] is None  # distinct, sorted
    assert np.array(a["embeddings"], dtype=np.float32).shape == (2, 64)
    assert rows[shas["bad"]] == {"image_sha256": shas["bad"], "boxes": [[1, 1, 5, 5]], "embeddings": None,
                                 "skip_reason": "not_an_image"}
    assert rows[shas["gone"]]["embeddings"] is None and rows[shas["gone"]]["skip_reason"] == "missing_image"
    assert first["masked"]["model_calls"] == 1 and first["masked"]["skipped"] == {
        "skip:missing_image": 1, "skip:not_an_image": 1}


@pytest.mark.slow
def test_masking_a_box_changes_the_image_embedding(featured):
    root, shas, *_ = featured
    masked = next(r for r in _table(root, "masked").to_pylist() if r["image_sha256"] == shas["a"])["embeddings"]
    whole = next(r for r in _table(root, "images").to_pylist() if r["image_sha256"] == shas["a"])["embedding"]
    first, second = np.array(masked, dtype=np.float32)
    assert not np.allclose(first, whole, atol=1e-3) and not np.allclose(second, whole, atol=1e-3)
    assert not np.allclose(first, second, atol=1e-3)


@pytest.mark.slow
def test_only_the_fill_settings_that_matter_recompute_the_masked_images(featured, tmp_path):
    root, shas, *_ = featured
    shutil.copytree(root, tmp_path / "copy")
    assert run_stage(params(masked={**MASKED, "blur_radius": 3}), tmp_path / "copy")["model_calls"] == 0
    gray = run_stage(params(masked={**MASKED, "fill": "gray"}), tmp_path / "copy")
    assert gray["model_calls"] == gray["masked"]["model_calls"] == 1
    mean, other = (np.array(next(r for r in _table(r, "masked").to_pylist() if r["image_sha256"] == shas["a"])
                            ["embeddings"]) for r in (root, tmp_path / "copy"))
    assert not np.allclose(mean, other, atol=1e-3)


@pytest.mark.slow
def test_no_masked_splits_write_an_empty_table(tmp_path):
    write_inputs(tmp_path)
    summary = run_stage(params(masked={**MASKED, "splits": []}), tmp_path)
    table = _table(tmp_path, "masked")
    assert table.schema == masked_features_schema(64) and table.num_rows == 0
    assert summary["masked"]["items"] == 0 and summary["images"]["model_calls"] == 3


def _rgb(path: Path, size=(40, 30)) -> np.ndarray:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


@pytest.mark.parametrize("fill", ["mean", "blur", "gray"])
def test_each_fill_changes_only_the_pixels_inside_the_box(tmp_path, fill):
    original = _rgb(tmp_path / "x.png")
    boxes = [[5, 4, 25, 20], [0, 0, 40, 30]]  # a box, and the whole image
    copies = MaskedCopies(10**6, 1333, fill=fill, blur_radius=4)((str(tmp_path / "x.png"), boxes))
    (box, whole) = (np.asarray(copy) for copy in copies)
    inside = np.zeros(original.shape[:2], bool)
    inside[4:20, 5:25] = True
    np.testing.assert_array_equal(box[~inside], original[~inside])
    assert (box[inside] != original[inside]).any(axis=1).mean() > 0.9
    expected = {"mean": np.round(original.reshape(-1, 3).mean(axis=0)), "gray": [123, 117, 104]}.get(fill)
    if expected is None:  # blur: smooth where the noise was
        assert box[inside].std(axis=0).max() < original[inside].std(axis=0).min() / 3
    else:
        assert (box[inside] == expected).all() and (whole == expected).all()


def test_a_downscaled_image_masks_the_mapped_box(tmp_path):
    _rgb(tmp_path / "x.png")
    path = str(tmp_path / "x.png")
    # max_side 20 halves the 40 x 30 image; a degenerate box still masks one pixel.
    boxes = [[10, 6, 21, 15], [3, 3, 3, 3]]
    loaded = np.asarray(ImageLoad(10**6, 20)(path))
    copies = [np.asarray(c) for c in MaskedCopies(10**6, 20, fill="gray")((path, boxes))]
    assert loaded.shape == copies[0].shape == (15, 20, 3)
    for copy, (left, top, right, bottom) in zip(copies, [(5, 3, 11, 8), (1, 1, 2, 2)]):
        expected = np.zeros(loaded.shape[:2], bool)
        expected[top:bottom, left:right] = True
        np.testing.assert_array_equal((copy != loaded).any(axis=2), expected)


@pytest.mark.parametrize("key, value, message", [
    ("fill", "paint", "'paint' is not one of mean, blur, gray"),
    ("splits", ["train", "dev"], r"\['train', 'dev'\] is not a list of prepare.files splits \(train\)"),
    ("blur_radius", 0, "0 is not a number of pixels > 0"),
    ("typo", 1, "unknown param; known: blur_radius, fill, splits"),
])
def test_bad_masked_params_are_one_line_errors_naming_them(tmp_path, key, value, message):
    with pytest.raises(ParamError, match=f"^features.masked.{key}: {message}$"):
        run_stage(params(masked={**MASKED, key: value}), tmp_path)


def test_a_bad_fill_through_the_pipeline_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["features", "--params", str(REPO / "params.yaml"), "--set", "features.masked.fill=paint"]
    assert cli_exit_code(monkeypatch, *args) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: features.masked.fill: 'paint' is not one of mean, blur, gray"]


@pytest.mark.slow
def test_generated_and_text_embeddings(featured):
    root, shas, first, *_ = featured
    generated = _table(root, "generated")
    assert generated.schema == image_features_schema(64)
    assert generated.column("image_sha256").to_pylist() == sorted([shas["g1"], shas["g2"], shas["lost"]])
    assert {r["image_sha256"]: r["skip_reason"] for r in generated.to_pylist()}[shas["lost"]] == "missing_image"
    # g1 is a copy of image b: the same pixels, the same embedding.
    image_b = next(r for r in _table(root, "images").to_pylist() if r["image_sha256"] == shas["b"])
    g1 = next(r for r in generated.to_pylist() if r["image_sha256"] == shas["g1"])
    assert g1["embedding"] == image_b["embedding"]
    text = _table(root, "text")
    assert text.schema == text_features_schema(64)
    assert text.column("tweet_id").to_pylist() == [f"t{i}" for i in range(1, 8)]
    assert text.column("embedding").null_count == 0
    assert first["text"]["model_calls"] == 7


@pytest.mark.slow
def test_rerun_reuses_the_cache_and_writes_identical_bytes(featured):
    root, _, first, second, first_bytes = featured
    assert second["model_calls"] == 0 and second["cache_hits"] == first["model_calls"]
    assert second["masked"]["cache_hits"] == first["masked"]["model_calls"] == 1
    for name in OUTPUTS:
        assert (root / "data" / "features" / f"{name}.parquet").read_bytes() == first_bytes[name], name


@pytest.mark.slow
def test_adding_images_ends_equal_to_a_scratch_run(featured, tmp_path):
    *_, first_bytes = featured
    write_inputs(tmp_path)
    prepared = tmp_path / "data" / "prepared" / "train.parquet"
    full = pq.read_table(prepared)
    # Without t1 (image a, also shown by t4) and t3 (image c): two texts and one image are new later.
    pq.write_table(full.filter(~pc.field("tweet_id").isin(["t1", "t3"])), prepared)
    run_stage(params(), tmp_path)
    pq.write_table(full, prepared)
    again = run_stage(params(), tmp_path)
    assert again["images"]["model_calls"] == 1 and again["text"]["model_calls"] == 2
    for name in OUTPUTS:
        assert (tmp_path / "data" / "features" / f"{name}.parquet").read_bytes() == first_bytes[name], name


@pytest.mark.slow
def test_small_row_groups_stream_the_same_rows(featured, tmp_path, monkeypatch):
    root, *_ = featured
    shutil.copytree(root, tmp_path / "copy")
    monkeypatch.setattr(features, "ROW_GROUP_BYTES", 1)  # one row per group: results read one at a time
    assert run_stage(params(), tmp_path / "copy")["model_calls"] == 0
    for name in OUTPUTS:
        streamed = pq.ParquetFile(tmp_path / "copy" / "data" / "features" / f"{name}.parquet")
        assert streamed.metadata.num_row_groups == streamed.metadata.num_rows, name
        assert streamed.read().equals(_table(root, name)), name


def test_batched_preprocessing_equals_the_per_image_transform():
    import open_clip
    import torch
    from PIL import Image

    from gmner.vision.models import BatchedCompose

    transform = open_clip.image_transform(64, is_train=False)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(5, 9), (80, 30), (64, 64)]]
    assert torch.equal(BatchedCompose.split(transform)(images), torch.stack([transform(im) for im in images]))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["clip", "vit"])
def test_transformers_backends(tmp_path, backend):
    write_inputs(tmp_path)
    summary = run_stage(params(backend=backend, text=backend == "clip", precision="bf16"), tmp_path)
    assert summary["dim"] == 64
    images = _table(tmp_path, "images")
    assert images.schema == image_features_schema(64, (16, 64))
    assert images.column("embedding").null_count == 2
    assert _table(tmp_path, "text").num_rows == (7 if backend == "clip" else 0)


def test_text_without_a_text_tower_is_refused(tmp_path):
    write_inputs(tmp_path)
    with pytest.raises(ValueError, match="features.text needs a text tower"):
        run_stage(params(backend="vit"), tmp_path)


def test_missing_regions_table_names_the_stage_to_run(tmp_path):
    write_inputs(tmp_path)
    (tmp_path / "data" / "regions.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="run the detect stage first"):
        run_stage(params(), tmp_path)

