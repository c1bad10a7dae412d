"""A trained model folder predicts new images end to end: train_grounded writes vision.json and the model card,
and `gmner predict` on the test images re-encoded as PNG (same pixels, new bytes), with a fresh cache, gives exactly
the evaluate stage's entities and boxes; a moved folder, with data/ removed, predicts the same; a model trained
on oracle candidates says in one line why it cannot ground a new image."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil

import pyarrow.parquet as pq
import pytest
from PIL import Image

from gmner.incremental import run_pipeline
from gmner.models.card import write_card

from helpers import generate_sample, repo_params


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small sample through detect (selective search), synthesize, features, train_grounded (2 epochs, from
    scratch) and evaluate on test, under a temporary root."""
    from gmner.evaluation import stage as evaluation
    from gmner.training import grounded as train_grounded

    root = tmp_path_factory.mktemp("root")
    params = repo_params("sample.train=24", "sample.dev=8", "sample.test=8", "train.epochs=2",
                         "train_grounded.init=none", "evaluate.splits=[test]", "detect.num_workers=0",
                         cache_root=".cache")
    generate_sample(params, root)
    run_pipeline(params, root, ("detect", "synthesize", "features"))
    with contextlib.chdir(root):  # the evaluate stage's predictor reads data/ relative to the working directory
        train_grounded.run_stage(params, root)
        evaluation.run_stage(params, "grounded", root)
    return root


def png_copies(root, out):
    """in.jsonl of the test tweets with their images re-encoded losslessly as PNG under ``out``."""
    out.mkdir()
    lines = []
    for row in pq.read_table(root / "data" / "prepared" / "test.parquet").to_pylist():
        image = None
        if row["image_sha256"]:
            image = str(out / f"{row['tweet_id']}.png")
            Image.open(root / row["image_path"]).convert("RGB").save(image)
        lines.append({"id": row["tweet_id"], "tokens": row["tokens"], "image": image})
    (out / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return out / "in.jsonl"


def predicted(model_dir, src, out, cache):
    from gmner.predict import predict_jsonl

    predict_jsonl(model_dir, src, out, cache=cache)
    return {row["id"]: [(e["start"], e["end"], e["type"], e["region"], e["box"]) for e in row["entities"]]
            for row in map(json.loads, out.read_text().splitlines())}


def same_visual_inputs(root, src, cache):
    """The copies' regions and features, computed through the model folder's vision pipeline (from ``cache``),
    are the pipeline's tables of the originals, value for value: so the model sees what evaluate saw."""
    from gmner.api import Predictor
    from gmner.core.images import read_image_info
    from gmner.vision.detectors import ImageRecord

    originals = {row["tweet_id"]: row["image_sha256"]
                 for row in pq.read_table(root / "data" / "prepared" / "test.parquet").to_pylist()}
    copies = {}
    for line in map(json.loads, src.read_text().splitlines()):
        if line["image"]:
            sha, width, height = read_image_info(line["image"])
            copies[sha] = (originals[line["id"]], ImageRecord(sha, line["image"], width, height))
    tables = Predictor(root / "models" / "grounded", cache=cache).vision.tables([r for _, r in copies.values()])
    for name, path, columns in (("regions", "regions.parquet", ["boxes", "scores"]),
                                ("region_features", "features/regions.parquet", ["embeddings"]),
                                ("image_features", "features/images.parquet", ["embedding", "patch_tokens"])):
        pipeline = {row.pop("image_sha256"): row for row in pq.read_table(root / "data" / path, columns=[
            "image_sha256", *columns]).to_pylist()}
        mine = {row.pop("image_sha256"): row for row in tables[name].select(["image_sha256", *columns]).to_pylist()}
        assert {copies[sha][0]: row for sha, row in mine.items()} == {copies[sha][0]: pipeline[copies[sha][0]]
                                                                     for sha in mine}, name
        assert len(mine) == len(copies)


@pytest.mark.slow
def test_the_folder_records_its_vision_pipeline_and_card(trained, tmp_path):
    folder = trained / "models" / "grounded"
    record = json.loads((folder / "vision.json").read_text())
    assert record["detect"]["params"]["backend"] == "selective_search" and record["features"]["dim"] == 64
    scorer = record["detect"]["fitted"]["scorer"]
    assert len(scorer["weights"]) == len(scorer["mean"]) + 1  # the learned ranking, exact, for new images
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: gmner\n") and "## Vision models" in card and "selective_search" in card
    assert "visual_paths" not in (folder / "vision.json").read_text()
    refreshed = tmp_path / "grounded"
    shutil.copytree(folder, refreshed)
    metrics = json.loads((trained / "metrics" / "grounded.json").read_text())
    write_card(refreshed, metrics=metrics)  # `gmner card`: the evaluate stage's figures, the training params kept
    card = (refreshed / "README.md").read_text()
    assert "| gmner candidates f1 | " in card and '"epochs": 2' in card and "# grounded: grounded_tagger" in card


@pytest.mark.slow
def test_png_copies_predict_exactly_what_evaluate_predicted_and_so_does_a_moved_folder(trained, tmp_path):
    evaluated = {row["tweet_id"]: [(e["start"], e["end"], e["type"], e["region"], e["box"]) for e in row["entities"]]
                 for row in pq.read_table(trained / "data/predictions/grounded/test.parquet").to_pylist()}
    src = png_copies(trained, tmp_path / "png")
    fresh = predicted(trained / "models" / "grounded", src, tmp_path / "a.jsonl", tmp_path / "cache")
    assert fresh == evaluated
    same_visual_inputs(trained, src, tmp_path / "cache")

    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(trained / "models" / "grounded", moved)
    shutil.copytree(trained / "data", tmp_path / "data-backup")
    shutil.rmtree(trained / "data")
    try:
        with contextlib.chdir(tmp_path / "elsewhere"):
            assert predicted(moved, src, tmp_path / "b.jsonl", tmp_path / "cache-2") == evaluated
    finally:
        shutil.move(tmp_path / "data-backup", trained / "data")


@pytest.mark.slow
def test_an_oracle_model_says_in_one_line_why_it_cannot_ground_a_new_image(trained, tmp_path, caplog):
    oracle = tmp_path / "oracle"
    shutil.copytree(trained / "models" / "grounded", oracle)
    record = json.loads((oracle / "vision.json").read_text())
    record["detect"]["params"]["backend"] = "oracle"  # as train_grounded records it after detect.backend=oracle
    (oracle / "vision.json").write_text(json.dumps(record))
    src = png_copies(trained, tmp_path / "png")
    with caplog.at_level(logging.WARNING):
        found = predicted(oracle, src, tmp_path / "out.jsonl", tmp_path / "cache")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "oracle" in warnings[0] and "predicted text-only" in warnings[0]
    assert all(region is None for entities in found.values() for *_, region, _ in entities)
