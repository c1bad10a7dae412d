"""Scores checked against hand-computed numbers (the arithmetic is in the comments)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from gmner.core import schema
from gmner.core.errors import DataError
from gmner.evaluation.reports import per_type_table
from gmner.evaluation.scoring import score

from helpers import REPO, write_splits


def ent(start, end, etype, boxes=()):
    return {"start": start, "end": end, "type": etype, "text": "x", "boxes": [list(b) for b in boxes]}


def tweet(tweet_id, entities, sha="auto"):
    return {
        "tweet_id": tweet_id,
        "split": "dev",
        "source": "test",
        "image_id": tweet_id,
        "image_path": None,
        "image_sha256": f"sha-{tweet_id}" if sha == "auto" else sha,
        "width": 200,
        "height": 200,
        "tokens": ["w"] * 8,
        "tags": ["O"] * 8,
        "entities": entities,
    }


def pent(start, end, etype, region=None, box=None):
    return {"start": start, "end": end, "type": etype, "region": region, "box": box}


def gold_table(*tweets):
    return pa.Table.from_pylist(list(tweets), schema=schema.TWEETS)


def pred_table(by_tweet: dict):
    rows = [{"tweet_id": t, "entities": e} for t, e in by_tweet.items()]
    return pa.Table.from_pylist(rows, schema=schema.PREDICTIONS)


def regions_table(by_sha: dict):
    rows = [
        {"image_sha256": sha, "boxes": boxes, "scores": [1.0] * len(boxes), "labels": ["o"] * len(boxes)}
        for sha, boxes in by_sha.items()
    ]
    return pa.Table.from_pylist(rows, schema=schema.REGIONS)


def metrics(p, r, f1, tp, fp, fn):
    return {"precision": pytest.approx(p, abs=1e-3), "recall": pytest.approx(r, abs=1e-3),
            "f1": pytest.approx(f1, abs=1e-3), "tp": tp, "fp": fp, "fn": fn}


PERFECT_1 = metrics(100, 100, 100, 1, 0, 0)
ZERO_1 = metrics(0, 0, 0, 0, 1, 1)  # one prediction, one gold entity, nothing correct

BOX = (0, 0, 10, 10)
FAR = (50, 50, 60, 60)


def test_duplicates_count_once_and_the_first_region_wins():
    gold = gold_table(tweet("t1", [ent(0, 1, "PER"), ent(3, 5, "LOC")]), tweet("t2", [ent(0, 2, "ORG")]))
    regions = regions_table({"sha-t1": [FAR], "sha-t2": [FAR]})
    pred = pred_table({
        "t1": [pent(0, 1, "PER"), pent(0, 1, "PER"), pent(0, 1, "PER", region=0), pent(3, 5, "LOC")],
        "t2": [pent(0, 2, "ORG", region=0), pent(0, 2, "ORG")],  # the kept first one has a region: wrong
    })
    s = score(gold, pred, regions)
    # MNER: 3 distinct (span, type) predictions, all right: 3/3, 3/3.
    assert s["mner"]["overall"] == metrics(100, 100, 100, 3, 0, 0)
    # GMNER / EEG: t1 PER (None) and LOC (None) right, t2 ORG (region 0, ungroundable) wrong: P = R = 2/3.
    for protocol in ("candidates", "boxes"):
        assert s["gmner"][protocol]["overall"] == metrics(66.6667, 66.6667, 66.6667, 2, 1, 1)
        assert s["eeg"][protocol] == metrics(66.6667, 66.6667, 66.6667, 2, 1, 1)


def test_one_span_with_two_types_is_two_mner_predictions_but_one_eeg_prediction():
    gold = gold_table(tweet("t1", [ent(0, 1, "PER")]))
    s = score(gold, pred_table({"t1": [pent(0, 1, "PER"), pent(0, 1, "LOC")]}))
    # MNER: 2 predicted, 1 right, 1 gold: P = 50, R = 100, F1 = 2*50*100/150 = 66.6667.
    assert s["mner"]["overall"] == metrics(50, 100, 66.6667, 1, 1, 0)
    assert s["mner"]["per_type"] == {"LOC": metrics(0, 0, 0, 0, 1, 0), "PER": PERFECT_1}
    # EEG keeps the first prediction of the span (PER, None), right for the ungroundable entity: 1/1.
    assert s["eeg"]["candidates"] == PERFECT_1


def test_wrong_type_fails_mner_and_gmner_but_not_eeg():
    gold = gold_table(tweet("t1", [ent(0, 1, "PER", [BOX])]))
    s = score(gold, pred_table({"t1": [pent(0, 1, "ORG", region=0)]}), regions_table({"sha-t1": [BOX]}))
    assert s["mner"]["overall"] == ZERO_1
    assert s["gmner"]["candidates"]["overall"] == ZERO_1
    # EEG ignores the type; the candidate is the gold box (IoU 1), and the boxes protocol uses the candidate's box.
    assert s["eeg"]["candidates"] == PERFECT_1
    assert s["eeg"]["boxes"] == PERFECT_1


def test_right_span_with_wrong_or_missing_region():
    gold = gold_table(tweet("t1", [ent(0, 1, "PER", [BOX])]), tweet("t2", [ent(0, 1, "PER", [BOX])]))
    regions = regions_table({"sha-t1": [BOX, FAR], "sha-t2": [BOX, FAR]})
    # t1 points at the far candidate (IoU 0); t2 says "no region" for a groundable entity.
    pred = pred_table({"t1": [pent(0, 1, "PER", region=1, box=list(FAR))], "t2": [pent(0, 1, "PER")]})
    s = score(gold, pred, regions)
    assert s["mner"]["overall"] == metrics(100, 100, 100, 2, 0, 0)
    for protocol in ("candidates", "boxes"):
        assert s["gmner"][protocol]["overall"] == metrics(0, 0, 0, 0, 2, 2)
        assert s["eeg"][protocol] == metrics(0, 0, 0, 0, 2, 2)
    assert s["coverage"] == {"groundable": 2, "covered": 2, "coverage": 100.0}


def test_ungroundable_entity_predicted_with_a_region():
    gold = gold_table(tweet("t1", [ent(2, 3, "LOC")]))
    s = score(gold, pred_table({"t1": [pent(2, 3, "LOC", region=0)]}), regions_table({"sha-t1": [BOX]}))
    assert s["mner"]["overall"] == PERFECT_1
    assert s["gmner"]["candidates"]["overall"] == ZERO_1
    assert s["gmner"]["boxes"]["overall"] == ZERO_1
    assert s["coverage"] == {"groundable": 0, "covered": 0, "coverage": 0.0}


def test_entity_no_candidate_covers_is_never_right_under_candidates_but_can_be_under_boxes():
    gold = gold_table(tweet("t1", [ent(0, 1, "PER", [BOX])]))
    # The only candidate overlaps the gold box by 5 x 10 = 50 of a 150 union: IoU 1/3 <= 0.5.
    regions = regions_table({"sha-t1": [(5, 0, 15, 10)]})
    s = score(gold, pred_table({"t1": [pent(0, 1, "PER", region=0, box=list(BOX))]}), regions)
    assert s["gmner"]["candidates"]["overall"] == ZERO_1
    assert s["gmner"]["boxes"]["overall"] == PERFECT_1  # the predicted box itself is exact
    assert s["coverage"] == {"groundable": 1, "covered": 0, "coverage": 0.0}


def test_a_box_without_a_candidate_index_is_not_a_candidate():
    gold = gold_table(tweet("t1", [ent(0, 1, "PER", [BOX])]))
    s = score(gold, pred_table({"t1": [pent(0, 1, "PER", box=list(BOX))]}), regions_table({"sha-t1": [BOX]}))
    assert s["gmner"]["candidates"]["overall"] == ZERO_1
    assert s["gmner"]["boxes"]["overall"] == PERFECT_1


def test_matching_the_second_of_several_gold_boxes_counts():
    gold = gold_table(tweet("t1", [ent(0, 1, "PER", [BOX, (100, 100, 120, 120)])]))
    regions = regions_table({"sha-t1": [(0, 0, 1, 1), (100, 100, 120, 120)]})
    # Candidate 1 is the second gold box (IoU 1); the predicted box has IoU 19*20 / 20*20 = 0.95 with it.
    pred = pred_table({"t1": [pent(0, 1, "PER", region=1, box=[101, 100, 120, 120])]})
    s = score(gold, pred, regions)
    assert s["gmner"]["candidates"]["overall"] == PERFECT_1
    assert s["gmner"]["boxes"]["overall"] == PERFECT_1
    assert s["coverage"] == {"groundable": 1, "covered": 1, "coverage": 100.0}


def test_text_only_predictions_are_right_only_for_ungroundable_entities():
    gold = gold_table(
        tweet("t1", [ent(0, 1, "PER", [BOX]), ent(2, 3, "LOC")]),
        tweet("t2", [ent(0, 2, "ORG"), ent(3, 4, "OTHER", [BOX])]),
    )
    pred = pred_table({"t1": [pent(0, 1, "PER"), pent(2, 3, "LOC")], "t2": [pent(0, 2, "ORG"), pent(3, 4, "OTHER")]})
    s = score(gold, pred, regions=None)
    assert s["mner"]["overall"] == metrics(100, 100, 100, 4, 0, 0)
    # LOC and ORG are ungroundable and rightly None; PER and OTHER are groundable: 2/4 right.
    for protocol in ("candidates", "boxes"):
        assert s["gmner"][protocol]["overall"] == metrics(50, 50, 50, 2, 2, 2)
        assert s["eeg"][protocol] == metrics(50, 50, 50, 2, 2, 2)
        per_type = s["gmner"][protocol]["per_type"]
        assert per_type["LOC"] == per_type["ORG"] == PERFECT_1
        assert per_type["PER"] == per_type["OTHER"] == ZERO_1
    # No regions table: zero candidates, so neither groundable entity is covered.
    assert s["coverage"] == {"groundable": 2, "covered": 0, "coverage": 0.0}
    assert s["tweets"] == 2


def test_per_type_counts_use_predicted_type_for_predictions_and_gold_type_for_gold():
    gold = gold_table(tweet("t1", [ent(0, 1, "PER"), ent(2, 4, "LOC")]), tweet("t2", [ent(0, 1, "PER")]))
    pred = pred_table({"t1": [pent(0, 1, "PER"), pent(5, 6, "ORG")], "t2": [pent(0, 1, "LOC")]})
    s = score(gold, pred)
    expected = {
        "PER": metrics(100, 50, 66.6667, 1, 0, 1),  # 1 predicted (t1), right; 2 gold: F1 = 2*100*50/150
        "LOC": metrics(0, 0, 0, 0, 1, 1),  # t2's LOC is a gold PER; t1's gold LOC is missed
        "ORG": metrics(0, 0, 0, 0, 1, 0),  # spurious span
    }
    assert s["mner"]["per_type"] == expected
    assert s["mner"]["overall"] == metrics(33.3333, 33.3333, 33.3333, 1, 2, 2)  # 1 of 3 predicted, 1 of 3 gold
    assert s["gmner"]["candidates"]["per_type"] == expected  # all ungroundable and predicted None
    # EEG spans: t1 (0,1) right, (5,6) wrong, t2 (0,1) right whatever its type: 2 of 3, 2 of 3.
    assert s["eeg"]["boxes"] == metrics(66.6667, 66.6667, 66.6667, 2, 1, 1)


@pytest.mark.parametrize("pred", [pred_table({}), pred_table({"t1": []})], ids=["no rows", "empty list"])
def test_no_predictions_score_zero(pred):
    gold = gold_table(tweet("t1", [ent(0, 1, "PER"), ent(2, 3, "LOC", [BOX])]))
    s = score(gold, pred)
    # 0 predicted: P = 0/0 = 0 by definition; R = 0/2.
    assert s["mner"]["overall"] == metrics(0, 0, 0, 0, 0, 2)
    assert s["gmner"]["boxes"]["overall"] == metrics(0, 0, 0, 0, 0, 2)
    assert s["eeg"]["candidates"] == metrics(0, 0, 0, 0, 0, 2)


def test_iou_exactly_at_the_threshold_is_not_a_match():
    gold = gold_table(tweet("t1", [ent(0, 1, "PER", [BOX])]))
    half = (0, 0, 20, 10)  # intersection 100, union 200: IoU exactly 0.5
    pred = pred_table({"t1": [pent(0, 1, "PER", region=0, box=list(half))]})
    regions = regions_table({"sha-t1": [half]})
    s = score(gold, pred, regions)
    assert s["gmner"]["candidates"]["overall"] == ZERO_1
    assert s["gmner"]["boxes"]["overall"] == ZERO_1
    assert s["coverage"]["covered"] == 0
    s = score(gold, pred, regions, iou_threshold=0.49)
    assert s["gmner"]["candidates"]["overall"] == s["gmner"]["boxes"]["overall"] == PERFECT_1
    assert s["coverage"]["covered"] == 1


def test_a_tweet_without_an_image_has_no_candidates():
    gold = gold_table(tweet("t1", [ent(0, 1, "PER")], sha=None))
    with pytest.raises(DataError, match="tweet t1.*region 0 out of range: the image has 0 detector candidates"):
        score(gold, pred_table({"t1": [pent(0, 1, "PER", region=0)]}), regions_table({}))
    s = score(gold, pred_table({"t1": [pent(0, 1, "PER")]}), regions_table({}))
    assert s["gmner"]["boxes"]["overall"] == PERFECT_1


@pytest.mark.parametrize(
    ("pred", "regions", "message"),
    [
        (pred_table({"ghost": []}), None, "ghost: tweet id is not in the gold table"),
        (pa.concat_tables([pred_table({"t1": []})] * 2), None, "t1: tweet id appears twice"),
        (pred_table({"t1": [pent(0, 1, "PER", region=0)]}), None, "region 0 out of range: the image has 0"),
        (pred_table({"t1": [pent(0, 1, "PER", region=-1)]}), {"sha-t1": [BOX]}, "region -1 out of range"),
        (pred_table({"t1": []}), {"sha-other": [BOX]}, "tweet t1: image sha-t1 has no row in the regions table"),
        (pred_table({"t1": [pent(0, 1, None)]}), None, "t1: entity without start, end or type"),
    ],
    ids=["unknown tweet", "tweet twice", "region without regions", "negative region", "image not detected", "no type"],
)
def test_bad_input_is_an_error_naming_the_tweet(pred, regions, message):
    gold = gold_table(tweet("t1", [ent(0, 1, "PER")]))
    with pytest.raises(DataError, match=message):
        score(gold, pred, None if regions is None else regions_table(regions))


def test_per_type_table_has_a_row_per_type_and_overall():
    gold = gold_table(tweet("t1", [ent(0, 1, "PER"), ent(2, 4, "LOC")]), tweet("t2", [ent(0, 1, "PER")]))
    pred = pred_table({"t1": [pent(0, 1, "PER"), pent(5, 6, "ORG")], "t2": [pent(0, 1, "LOC")]})
    lines = per_type_table(score(gold, pred)).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| LOC", "| ORG", "| PER", "| overall"]
    assert lines[0].count("|") == 14  # 13 columns
    # Gold PER = 2; MNER and both GMNER protocols 100 / 50 / 66.67; EEG only in the overall row.
    assert lines[4] == "| PER | 2 | " + " | ".join(["100.00 | 50.00 | 66.67"] * 3) + " | - | - |"
    assert lines[5].endswith("| 66.67 | 66.67 |")


class FakePredictor:
    """Predicts every gold entity with its type, pointing at candidate 0 when the entity and the image exist."""

    loaded: list = []

    def __init__(self, model_dir, device):
        FakePredictor.loaded.append((Path(model_dir), str(device)))

    def predict(self, tweets: pa.Table, regions: pa.Table | None = None) -> pa.Table:
        assert regions is not None and regions.num_rows == 1
        rows = [
            {
                "tweet_id": row["tweet_id"],
                "entities": [
                    pent(e["start"], e["end"], e["type"], region=0 if e["boxes"] and row["image_sha256"] else None)
                    for e in row["entities"]
                ],
            }
            for row in tweets.to_pylist()
        ]
        return pa.Table.from_pylist(rows, schema=schema.PREDICTIONS)


@pytest.mark.slow
def test_stage_writes_predictions_metrics_and_markdown(tmp_path, monkeypatch):
    # dev: t1 PER groundable (candidate 0 is its box) + LOC ungroundable; t2 has no image: its groundable ORG
    # can only be predicted None, so GMNER is 2/3 right and MNER 3/3. "train" is empty and "test" absent: skipped.
    dev = gold_table(
        tweet("t1", [ent(0, 1, "PER", [BOX]), ent(2, 3, "LOC")]), tweet("t2", [ent(0, 2, "ORG", [BOX])], sha=None)
    )
    write_splits(tmp_path, {"dev": dev, "train": dev.slice(0, 0)})
    pq.write_table(regions_table({"sha-t1": [BOX]}), tmp_path / "data" / "regions.parquet")
    params = {
        "base": {"seed": 13, "device": "cpu"},
        "evaluate": {"splits": ["train", "dev", "test"], "iou_threshold": 0.5, "regions": "data/regions.parquet"},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setattr("gmner.evaluation.stage.load", FakePredictor)
    monkeypatch.chdir(tmp_path)
    FakePredictor.loaded.clear()

    monkeypatch.setattr(sys, "argv", ["stages/evaluate.py", "--model", "fake"])
    runpy.run_path(str(REPO / "stages" / "evaluate.py"), run_name="__main__")

    assert FakePredictor.loaded == [(Path("models/fake"), "cpu")]
    predictions = pq.read_table(tmp_path / "data" / "predictions" / "fake" / "dev.parquet")
    assert predictions.schema == schema.PREDICTIONS
    assert predictions.column("tweet_id").to_pylist() == ["t1", "t2"]
    text = (tmp_path / "metrics" / "fake_detail.json").read_text()
    scores = json.loads(text)
    assert list(scores) == ["dev"]
    assert scores["dev"]["mner"]["overall"] == metrics(100, 100, 100, 3, 0, 0)
    assert scores["dev"]["gmner"]["candidates"]["overall"] == metrics(66.6667, 66.6667, 66.6667, 2, 1, 1)
    assert scores["dev"]["coverage"] == {"groundable": 2, "covered": 1, "coverage": 50.0}
    assert text == json.dumps(scores, indent=2, sort_keys=True) + "\n"
    headline = json.loads((tmp_path / "metrics" / "fake.json").read_text())  # the DVC metric: overall P / R / F1
    assert headline["dev"]["mner"] == {"precision": 100.0, "recall": 100.0, "f1": 100.0}
    assert headline["dev"]["gmner"]["candidates"] == {"precision": 66.6667, "recall": 66.6667, "f1": 66.6667}
    assert headline["dev"]["eeg"]["boxes"]["f1"] == scores["dev"]["eeg"]["boxes"]["f1"]
    assert headline["dev"]["candidate_coverage"] == 50.0
    markdown = (tmp_path / "metrics" / "fake_per_type.md").read_text()
    assert markdown.startswith("# Scores of model `fake`\n\n## dev\n\n2 tweets; detector candidates cover 1 of 2")
    assert "| overall | 3 | 100.00 | 100.00 | 100.00 | 66.67 | 66.67 | 66.67 |" in markdown


def test_stage_without_any_prepared_split_is_an_error(tmp_path, monkeypatch):
    from gmner.evaluation.stage import run_stage

    monkeypatch.setattr("gmner.evaluation.stage.load", FakePredictor)
    params = {"base": {"seed": 13, "device": "cpu"}, "evaluate": {"splits": ["dev"], "iou_threshold": 0.5}}
    with pytest.raises(DataError, match="none of the splits \\['dev'\\] has a non-empty"):
        run_stage(params, "fake", root=tmp_path)
