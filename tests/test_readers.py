"""The prepare readers: happy paths of both formats and one test per kind of bad input."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from gmner.core.errors import DataError
from gmner.core.schema import TWEETS
from gmner.datasets.prepare import prepare_split, run_stage

TWEET_12 = "IMGID:12\nJohn\tB-PER\nSmith\tI-PER\nin\tO\nParis\tB-LOC\nwith\tO\nJohn\tB-PER\nSmith\tI-PER\n"
TWEET_13 = "IMGID:13\nApple\tB-ORG\nrocks\tO\n"


def voc(*objects: tuple[str, tuple[float, float, float, float]], size: tuple[int, int] | None = (100, 80)) -> str:
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    objs = "".join(
        f"<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax>"
        "</bndbox></object>"
        for name, (x1, y1, x2, y2) in objects
    )
    return f"<annotation><filename>x.jpg</filename>{size_xml}{objs}</annotation>"


def make_gmner(
    root: Path, text: str | bytes, xmls: dict[str, str] | None = None, images: dict[str, tuple[int, int]] | None = None
) -> Path:
    """A twitter-gmner folder: train.txt, xml/<id>.xml, images/<id>.jpg (PIL-written, size w x h)."""
    (root / "xml").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "train.txt").write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    for image_id, xml in (xmls or {}).items():
        (root / "xml" / f"{image_id}.xml").write_text(xml)
    for image_id, (w, h) in (images or {}).items():
        Image.new("RGB", (w, h), (200, 30, 30)).save(root / "images" / f"{image_id}.jpg")
    return root


def prep(root: Path, policy: dict | None = None, **kw):
    """prepare_split on make_gmner's train.txt; reasons the policy leaves out are errors."""
    types = ["PER", "LOC", "ORG", "OTHER"]
    return prepare_split(root / "train.txt", split="train", images_dir=root / "images", xml_dir=root / "xml",
                         types=types, policy=policy, **kw)


def counts(summary: dict) -> dict:
    return summary["policy"]["counts"]


# --- happy paths -------------------------------------------------------------------------------


def test_gmner_happy_path_multiple_boxes_and_shared_names(tmp_path):
    xml = voc(("John Smith", (1, 2, 30, 40)), ("John Smith", (50, 10, 90, 70)), ("Paris", (0, 0, 100, 80)))
    root = make_gmner(tmp_path, TWEET_12 + "\n" + TWEET_13, {"12": xml}, {"12": (100, 80), "13": (64, 48)})
    table, summary = prep(root)
    assert table.schema == TWEETS
    rows = table.to_pylist()
    assert [r["tweet_id"] for r in rows] == ["12", "13"]
    first = rows[0]
    assert first["source"] == f"{(root / 'train.txt').as_posix()}:1"
    assert first["image_path"] == (root / "images" / "12.jpg").as_posix()
    assert first["image_sha256"] == hashlib.sha256((root / "images" / "12.jpg").read_bytes()).hexdigest()
    assert (first["width"], first["height"]) == (100, 80)
    ents = [(e["start"], e["end"], e["type"], e["text"], e["boxes"]) for e in first["entities"]]
    two = [[1.0, 2.0, 30.0, 40.0], [50.0, 10.0, 90.0, 70.0]]
    assert ents == [
        (0, 2, "PER", "John Smith", two),  # one entity, two boxes
        (3, 4, "LOC", "Paris", [[0.0, 0.0, 100.0, 80.0]]),
        (5, 7, "PER", "John Smith", two),  # the same name elsewhere shares the boxes
    ]
    # No xml: ungroundable; size read from the image header.
    assert (rows[1]["width"], rows[1]["height"]) == (64, 48)
    assert rows[1]["entities"][0]["boxes"] == []
    assert summary["tweets"] == 2 and summary["entities"] == 4
    assert summary["groundable_entities"] == 3 and summary["boxes"] == 3
    assert summary["text_only_tweets"] == 0
    assert summary["entity_types"] == {"LOC": 1, "ORG": 1, "PER": 2}
    assert counts(summary) == {}


def test_name_match_is_exact_and_case_sensitive(tmp_path):
    xml = voc(("john smith", (1, 1, 9, 9)), ("John", (1, 1, 9, 9)))
    root = make_gmner(tmp_path, TWEET_12, {"12": xml}, {"12": (100, 80)})
    table, summary = prep(root, {"name_not_in_tweet": "skip"})
    assert summary["groundable_entities"] == 0
    assert counts(summary) == {"skip:name_not_in_tweet": 2}


@pytest.mark.slow
def test_conll_mner_types_from_data(tmp_path):
    root = tmp_path / "twitter2017"
    (root / "images").mkdir(parents=True)
    (root / "valid.txt").write_text("IMGID:O_1\nRT\tO\nObama\tB-PER\nvisits\tO\nNew\tB-MISC\nYork\tI-MISC\n")
    Image.new("RGB", (20, 10)).save(root / "images" / "O_1.jpg")
    params = {
        "base": {"data_root": root.as_posix()},
        "prepare": {
            "format": "conll-mner", "files": {"dev": "valid.txt"}, "images_dir": "images", "xml_dir": "xml",
            "image_ext": ".jpg", "types": [], "box_tolerance": 2, "policy": {},
        },
    }
    run_stage(params, out_dir=tmp_path / "prepared")
    row = pq.read_table(tmp_path / "prepared" / "dev.parquet").to_pylist()[0]
    assert row["split"] == "dev" and (row["width"], row["height"]) == (20, 10)
    entities = [(e["text"], e["type"], e["boxes"]) for e in row["entities"]]
    assert entities == [("Obama", "PER", []), ("New York", "MISC", [])]
    assert (tmp_path / "prepared" / "summary.json").is_file()


@pytest.mark.slow
def test_deterministic_bytes(tmp_path):
    xml = voc(("John Smith", (1, 2, 30, 40)), ("Paris", (5, 5, 50, 50)))
    make_gmner(tmp_path / "data", TWEET_12 + "\n" + TWEET_13, {"12": xml}, {"12": (100, 80)})
    params = {
        "base": {"data_root": (tmp_path / "data").as_posix()},
        "prepare": {
            "format": "twitter-gmner", "files": {"train": "train.txt"}, "images_dir": "images", "xml_dir": "xml",
            "image_ext": ".jpg", "types": ["PER", "LOC", "ORG", "OTHER"], "box_tolerance": 2,
            "policy": {"missing_image": "skip"},
        },
    }
    run_stage(params, out_dir=tmp_path / "a")
    run_stage(params, out_dir=tmp_path / "b")
    for name in ("train.parquet", "summary.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert pq.read_table(tmp_path / "a" / "train.parquet").schema.equals(TWEETS)


# --- bad CoNLL input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "what"),
    [("John", "1 tab-separated"), ("John\tB-PER\tx", "3 tab-separated"), ("\tB-PER", "empty token")],
)
def test_malformed_line(tmp_path, line, what):
    root = make_gmner(tmp_path, f"IMGID:1\nhi\tO\n{line}\nyo\tO\n")
    with pytest.raises(DataError, match=rf"train\.txt:3: .*{what}"):
        prep(root, {"missing_image": "skip"})
    table, summary = prep(root, {"missing_image": "skip", "malformed_line": "skip"})
    assert table.column("tokens").to_pylist() == [["hi", "yo"]]
    assert counts(summary)["skip:malformed_line"] == 1


@pytest.mark.parametrize("tag", ["B-MISC", "X-PER", "b-per"])
def test_unknown_tag(tmp_path, tag):
    root = make_gmner(tmp_path, f"IMGID:1\nhi\tO\nBob\t{tag}\n")
    with pytest.raises(DataError, match=r"train\.txt:3: unknown tag"):
        prep(root, {"missing_image": "skip"})
    table, summary = prep(root, {"missing_image": "skip", "unknown_tag": "repair"})
    assert table.column("tags").to_pylist() == [["O", "O"]]
    assert counts(summary)["repair:unknown_tag"] == 1
    table, summary = prep(root, {"missing_image": "skip", "unknown_tag": "skip"})
    assert table.column("tokens").to_pylist() == [["hi"]]


def test_orphan_inside_repaired_or_error(tmp_path):
    root = make_gmner(tmp_path, "IMGID:1\nhi\tO\nNew\tI-LOC\nYork\tI-LOC\nBob\tI-PER\n")
    table, summary = prep(root, {"missing_image": "skip", "orphan_inside": "repair"})
    assert table.column("tags").to_pylist() == [["O", "B-LOC", "I-LOC", "B-PER"]]
    entities = table.column("entities").to_pylist()[0]
    assert [(e["text"], e["type"]) for e in entities] == [("New York", "LOC"), ("Bob", "PER")]
    assert counts(summary)["repair:orphan_inside"] == 2
    first = summary["policy"]["first_example"]["repair:orphan_inside"]
    assert first.endswith("train.txt:3: I-LOC does not continue an entity")
    with pytest.raises(DataError, match=r"train\.txt:3: I-LOC"):
        prep(root, {"missing_image": "skip"})


def test_empty_tweet(tmp_path):
    root = make_gmner(tmp_path, "IMGID:1\n\nIMGID:2\nhi\tO\n")
    with pytest.raises(DataError, match=r"train\.txt:1: tweet 1 has no tokens"):
        prep(root, {"missing_image": "skip"})
    table, summary = prep(root, {"missing_image": "skip", "empty_tweet": "skip"})
    assert table.column("tweet_id").to_pylist() == ["2"]
    assert counts(summary)["skip:empty_tweet"] == 1


def test_duplicate_id(tmp_path):
    root = make_gmner(tmp_path, "IMGID:7\nhi\tO\n\nIMGID:7\nyo\tO\n")
    with pytest.raises(DataError, match=r"train\.txt:4: duplicate IMGID 7 \(first at line 1\)"):
        prep(root, {"missing_image": "skip"})
    table, summary = prep(root, {"missing_image": "skip", "duplicate_id": "skip"})
    assert table.column("tokens").to_pylist() == [["hi"]]
    assert counts(summary)["skip:duplicate_id"] == 1


def test_bad_encoding_names_the_line(tmp_path):
    root = make_gmner(tmp_path, b"IMGID:1\nhi\tO\ncaf\xe9\tO\n\nIMGID:2\nyo\tO\n")
    with pytest.raises(DataError, match=r"train\.txt:3: not valid UTF-8 \(byte 0xe9 at column 4\)"):
        prep(root, {"missing_image": "skip"})
    table, summary = prep(root, {"missing_image": "skip", "bad_encoding": "skip"})
    assert table.column("tweet_id").to_pylist() == ["2"]
    assert counts(summary)["skip:bad_encoding"] == 1
    table, _ = prep(root, {"missing_image": "skip", "bad_encoding": "repair"})
    assert table.column("tokens").to_pylist()[0] == ["hi", "caf\ufffd"]


def test_missing_split_file(tmp_path):
    root = make_gmner(tmp_path, "")
    (root / "train.txt").unlink()
    with pytest.raises(DataError, match=r"train\.txt: no train file"):
        prep(root)
    table, summary = prep(root, {"missing_file": "skip"})
    assert table.num_rows == 0 and table.schema == TWEETS
    assert counts(summary) == {"skip:missing_file": 1}


def test_policy_rejects_unknown_reason_and_disallowed_action(tmp_path):
    root = make_gmner(tmp_path, TWEET_13)
    with pytest.raises(ValueError, match="unknown reasons"):
        prep(root, {"typo": "skip"})
    with pytest.raises(ValueError, match="orphan_inside: 'skip' is not one of error, repair"):
        prep(root, {"orphan_inside": "skip"})


# --- bad xml, boxes and images -----------------------------------------------------------------


def test_bad_xml(tmp_path):
    root = make_gmner(tmp_path, TWEET_13, {"13": "<annotation><object>"}, {"13": (10, 10)})
    with pytest.raises(DataError, match=r"xml/13\.xml:1: xml not parseable"):
        prep(root)
    table, summary = prep(root, {"bad_xml": "skip"})
    assert summary["entities"] == 1 and summary["groundable_entities"] == 0
    assert counts(summary) == {"skip:bad_xml": 1}


def test_name_not_in_tweet_drops_only_that_object(tmp_path):
    xml = voc(("Banana", (1, 1, 5, 5)), ("Apple", (2, 2, 8, 8)))
    root = make_gmner(tmp_path, TWEET_13, {"13": xml}, {"13": (100, 80)})
    with pytest.raises(DataError, match=r"xml/13\.xml: object 1: <name> 'Banana' is no entity"):
        prep(root)
    table, summary = prep(root, {"name_not_in_tweet": "skip"})
    assert table.column("entities").to_pylist()[0][0]["boxes"] == [[2.0, 2.0, 8.0, 8.0]]
    assert counts(summary) == {"skip:name_not_in_tweet": 1}


@pytest.mark.parametrize(
    ("box", "what"),
    [((5, 5, 5, 9), "degenerate"), ((9, 5, 2, 9), "degenerate"), ((10, 10, 150, 20), "outside the 100x80 image")],
)
def test_bad_box_drops_only_that_box(tmp_path, box, what):
    xml = voc(("Apple", box), ("Apple", (2, 2, 8, 8)))
    root = make_gmner(tmp_path, TWEET_13, {"13": xml}, {"13": (100, 80)})
    with pytest.raises(DataError, match=rf"xml/13\.xml: object 1: 'Apple': box .* is {what}"):
        prep(root)
    table, summary = prep(root, {"bad_box": "skip"})
    assert table.column("entities").to_pylist()[0][0]["boxes"] == [[2.0, 2.0, 8.0, 8.0]]
    assert summary["tweets"] == 1 and counts(summary) == {"skip:bad_box": 1}


def test_box_overhang_within_tolerance_is_clipped(tmp_path):
    xml = voc(("Apple", (-1, 3, 101, 80.5)))
    root = make_gmner(tmp_path, TWEET_13, {"13": xml}, {"13": (100, 80)})
    table, summary = prep(root, {"box_overhang": "repair"})
    assert table.column("entities").to_pylist()[0][0]["boxes"] == [[0.0, 3.0, 100.0, 80.0]]
    assert counts(summary) == {"repair:box_overhang": 1}
    with pytest.raises(DataError, match=r"object 1: 'Apple': box .* passes the 100x80 image by 1 px"):
        prep(root)
    table, summary = prep(root, {"box_overhang": "repair", "bad_box": "skip"}, box_tolerance=0.5)
    assert summary["groundable_entities"] == 0 and counts(summary) == {"skip:bad_box": 1}


def test_missing_image_keeps_tweet_text_only(tmp_path):
    xml = voc(("Apple", (2, 2, 8, 8)), size=(640, 480))
    root = make_gmner(tmp_path, TWEET_13, {"13": xml})
    with pytest.raises(DataError, match=r"images/13\.jpg: tweet 13: no image file"):
        prep(root)
    table, summary = prep(root, {"missing_image": "skip"})
    row = table.to_pylist()[0]
    assert row["image_sha256"] is None and row["image_path"].endswith("images/13.jpg")
    assert (row["width"], row["height"]) == (640, 480)  # from the xml
    assert row["entities"][0]["boxes"] == [[2.0, 2.0, 8.0, 8.0]]
    assert summary["text_only_tweets"] == 1 and counts(summary) == {"skip:missing_image": 1}


def test_unreadable_image_is_text_only(tmp_path):
    root = make_gmner(tmp_path, TWEET_13)
    (root / "images" / "13.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"images/13\.jpg: tweet 13: not a readable image"):
        prep(root)
    table, summary = prep(root, {"bad_image": "skip"})
    assert table.column("image_sha256").to_pylist() == [None]
    assert (table.column("width").to_pylist(), summary["text_only_tweets"]) == ([None], 1)


def test_token_line_outside_a_tweet(tmp_path):
    root = make_gmner(tmp_path, "hi\tO\n\nIMGID:2\nyo\tO\n")
    with pytest.raises(DataError, match=r"train\.txt:1: token line outside a tweet"):
        prep(root, {"missing_image": "skip"})
    table, summary = prep(root, {"missing_image": "skip", "malformed_line": "skip"})
    assert table.column("tweet_id").to_pylist() == ["2"] and counts(summary)["skip:malformed_line"] == 1


def test_size_from_header_follows_exif_rotation(tmp_path):
    root = make_gmner(tmp_path, TWEET_13)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed as 20 x 40
    Image.new("RGB", (40, 20)).save(root / "images" / "13.jpg", exif=exif)
    table, _ = prep(root)
    assert (table.column("width").to_pylist(), table.column("height").to_pylist()) == ([20], [40])
