"""The selective-search detect backend: proposals on any picture, the fitted proposal scorer, coverage figures."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from gmner.core import schema
from gmner.core.boxes import iou_matrix
from gmner.vision.detect import COVERAGE_K, coverage, run_stage
from gmner.vision.detectors.base import ImageRecord
from gmner.vision.detectors.selective_search import FEATURES, ProposalLoad, ProposalScorer, SelectiveSearchDetector

from helpers import repo_params

SS = {"mode": "fast", "base_k": 150, "inc_k": 150, "sigma": 0.8, "max_side": 512, "max_proposals": 500,
      "ranking": "learned", "l2": 0.01}


def _scene(path, size, boxes, seed):
    """A flat background with a few flat-coloured rectangles at ``boxes`` (xyxy)."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 80, 3)))
    draw = ImageDraw.Draw(image)
    for box in boxes:
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=tuple(int(c) for c in rng.integers(150, 256, 3)))
    image.save(path)
    return image


def test_proposals_cover_drawn_objects_in_original_pixels(tmp_path):
    box = [40, 30, 120, 90]
    _scene(tmp_path / "a.png", (160, 120), [box], seed=0)
    # Searched on a 80 x 60 copy, mapped back to the 160 x 120 original.
    proposals = ProposalLoad(50_000_000, 80)((str(tmp_path / "a.png"), None))["boxes"]
    assert proposals.dtype == np.float32 and proposals.shape[1] == 4 and len(proposals) > 1
    assert (proposals[:, 0] >= 0).all() and (proposals[:, 2] <= 160).all() and (proposals[:, 3] <= 120).all()
    assert iou_matrix(np.asarray([box], np.float32), proposals).max() > 0.8


def test_scorer_fit_is_deterministic_and_learns_what_gold_boxes_look_like():
    image = ImageRecord("s", "p", 100, 100)
    rng = np.random.default_rng(0)
    triples = []
    for _ in range(20):
        corner = rng.uniform(0, 60, 2)
        gold = np.asarray([[*corner, *(corner + 30)]], np.float32)  # every gold box is 30 x 30
        small = np.asarray([[*(c := rng.uniform(0, 90, 2)), *(c + 5)] for _ in range(6)], np.float32)
        boxes = np.concatenate([small[:3], gold + rng.uniform(-1, 1, (1, 4)).astype(np.float32), small[3:]])
        triples.append((boxes, image, gold))
    first, second = ProposalScorer.fit(triples, l2=0.01), ProposalScorer.fit(triples, l2=0.01)
    assert np.array_equal(first.weights, second.weights) and first.positives == 20 and first.examples == 140
    assert len(first.weights) == len(FEATURES) + 1
    for boxes, image, _ in triples:  # the gold-like proposal (index 3) ranks first everywhere
        assert int(np.argmax(first.score(boxes, image))) == 3
    unlabelled = ProposalScorer.fit([(boxes, image, np.zeros((0, 4), np.float32)) for boxes, image, _ in triples], 0.01)
    assert not unlabelled.weights.any() and unlabelled.iterations == 0


def test_learned_ranking_puts_covering_proposals_first_and_none_keeps_the_algorithms_order():
    images = {"a": ImageRecord("a", "p", 100, 100), "b": ImageRecord("b", "p", 100, 100)}
    gold = np.asarray([[10, 10, 60, 60]], np.float32)
    tiny = [[c, c, c + 4, c + 4] for c in range(70, 90, 5)]
    results = {sha: {"boxes": [*tiny, [11, 10, 60, 61], [50, 50, 99, 99]]} for sha in images}
    detector = SelectiveSearchDetector(SS, k=3, nms_iou=0.5, max_pixels=50_000_000, max_side=1333)
    ranked, summary = detector.rank(results, images, {"a": gold})
    assert summary["ranking"] == "learned" and summary["scorer"]["positives"] == 1
    assert ranked["b"]["boxes"][0] == [11, 10, 60, 61]  # fitted on a's gold, applied to b
    assert detector.ranked_depth is None and len(ranked["b"]["boxes"]) == 6 and ranked["b"]["labels"] == ["region"] * 6
    unranked, summary = SelectiveSearchDetector(dict(SS, ranking="none"), k=3, nms_iou=0.5, max_pixels=1, max_side=1
                                                ).rank(results, images, {"a": gold})
    assert summary == {"ranking": "none"} and unranked["a"]["boxes"] == results["a"]["boxes"]


def test_bad_mode_or_ranking_names_the_param():
    with pytest.raises(ValueError, match="detect.selective_search.mode"):
        SelectiveSearchDetector(dict(SS, mode="slow"), k=3, nms_iou=0.5, max_pixels=1, max_side=1)
    with pytest.raises(ValueError, match="detect.selective_search.ranking"):
        SelectiveSearchDetector(dict(SS, ranking="oracle"), k=3, nms_iou=0.5, max_pixels=1, max_side=1)


def test_coverage_counts_gold_boxes_within_the_first_k_candidates():
    gold = {"a": np.asarray([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32),
            "b": np.asarray([[0, 0, 10, 10]], np.float32)}
    ranked = {"a": {"boxes": [[50, 50, 60, 60], [0, 0, 10, 11], [20, 20, 30, 30]]}}  # b has no candidates
    got = coverage(ranked, gold, depth=None)
    assert set(got) == {f"at_{k:02d}" for k in COVERAGE_K}
    assert got["at_01"] == 0.0 and got["at_04"] == pytest.approx(100 * 2 / 3, abs=0.01)
    assert coverage(ranked, gold, depth=2)["at_04"] is None


@pytest.mark.slow
def test_detect_stage_ranks_top_k_writes_coverage_and_caches_proposals(tmp_path):
    rows, rng = [], np.random.default_rng(1)
    (tmp_path / "images").mkdir()
    for split, count in (("train", 6), ("dev", 3)):
        for i in range(count):
            name = f"{split}{i}"
            corner = rng.integers(5, 50, 2)
            box = [int(corner[0]), int(corner[1]), int(corner[0]) + 40, int(corner[1]) + 30]
            _scene(tmp_path / "images" / f"{name}.png", (120, 90), [box], seed=i + 10 * (split == "dev"))
            sha = __import__("hashlib").sha256((tmp_path / "images" / f"{name}.png").read_bytes()).hexdigest()
            rows.append({"tweet_id": name, "split": split, "source": f"{split}.txt:{i}", "image_id": name,
                         "image_path": f"images/{name}.png", "image_sha256": sha, "width": 120, "height": 90,
                         "tokens": ["Ann", "here"], "tags": ["B-PER", "O"],
                         "entities": [{"start": 0, "end": 1, "type": "PER", "text": "Ann", "boxes": [box]}]})
    prepared = tmp_path / "data" / "prepared"
    prepared.mkdir(parents=True)
    for split in ("train", "dev"):
        table = pa.Table.from_pylist([r for r in rows if r["split"] == split], schema=schema.TWEETS)
        pq.write_table(table, prepared / f"{split}.parquet")
    params = repo_params("detect.backend=selective_search", "prepare.files={train: train.txt, dev: dev.txt}",
                         cache_root=".cache")

    summary = run_stage(params, tmp_path)
    regions = pq.read_table(tmp_path / "data" / "regions.parquet")
    assert regions.num_rows == 9 and all(len(b) <= 16 for b in regions.column("boxes").to_pylist())
    assert summary["ranking"] == "learned" and summary["scorer"]["positives"] > 0
    metrics = json.loads((tmp_path / "metrics" / "detect.json").read_text())
    dev = metrics["dev"]["box_coverage"]
    assert set(metrics) == {"train", "dev"} and dev["at_16"] >= dev["at_01"]
    assert metrics["train"]["box_coverage"]["at_04"] > 50  # flat rectangles on flat ground are easy to propose
    plot = json.loads((tmp_path / "metrics" / "detect_coverage.json").read_text())
    assert [row["k"] for row in plot] == list(COVERAGE_K) and set(plot[0]) == {"k", "train", "dev"}
    before = (tmp_path / "data" / "regions.parquet").read_bytes()

    again = run_stage(params, tmp_path)  # proposals from the cache, ranking recomputed: the same bytes
    assert again["model_calls"] == 0 and (tmp_path / "data" / "regions.parquet").read_bytes() == before


def test_proposals_come_in_the_same_order_every_time(tmp_path):
    """OpenCV ranks by level x rand(): without seeding, two runs on one image order (and cut) differently."""
    _scene(tmp_path / "a.png", (160, 120), [[10, 10, 60, 50], [70, 40, 150, 110], [20, 70, 60, 115]], seed=3)
    load = ProposalLoad(50_000_000, 512, max_proposals=20)
    first = load((str(tmp_path / "a.png"), None))["boxes"]
    for _ in range(3):
        assert np.array_equal(load((str(tmp_path / "a.png"), None))["boxes"], first)
