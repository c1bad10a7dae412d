"""Hostile inputs (issue 15), one test per class of defect: reads that must be bounded and contained, a cache
that must not be poisoned, and repairs / skips that must be counted. Each asserts what happens, not only that
nothing crashed; tests/test_fuzz.py throws random bytes at the same readers."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from gmner.core import schema
from gmner.core.atomic import write_parquet
from gmner.core.errors import DataError
from gmner.core.files import IMAGE_BYTES
from gmner.core.images import BadImage, load_image, read_image_info
from gmner.datasets.prepare import prepare_split
from gmner.predict import LINE_BYTES, predict_jsonl
from gmner.vision.cache import ItemCache
from gmner.vision.detect import run_stage as detect
from gmner.vision.runner import JSON, Item, run_items

from helpers import REPO, fails_after

TWEETS = "IMGID:1\nJohn\tB-PER\nin\tO\nParis\tB-LOC\n\nIMGID:2\nApple\tB-ORG\nrocks\tO\n"
# The defaults params.yaml gives the reasons these tests meet (a reason left out is an error).
POLICY = {"missing_image": "skip", "bad_image": "skip", "bad_xml": "error", "bad_id": "error",
          "token_whitespace": "repair", "ambiguous_object": "skip", "xml_size_mismatch": "skip",
          "name_not_in_tweet": "skip", "bad_box": "skip", "empty_file": "skip"}


def voc(*objects: str, size=(40, 30)) -> str:
    return (f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height></size>{''.join(objects)}"
            "</annotation>")


def obj(name="John", box=(1, 1, 20, 20), extra="") -> str:
    x1, y1, x2, y2 = box
    return (f"<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax>"
            f"<ymax>{y2}</ymax></bndbox>{extra}</object>")


def dataset(root: Path, text: str = TWEETS, xml: str | None = None) -> Path:
    """root/data: train.txt, images/1.jpg and 2.jpg (40 x 30), xml/1.xml boxing John."""
    data = root / "data"
    (data / "images").mkdir(parents=True)
    (data / "xml").mkdir()
    (data / "train.txt").write_text(text)
    for i in ("1", "2"):
        Image.new("RGB", (40, 30), (200, 30, 30)).save(data / "images" / f"{i}.jpg")
    (data / "xml" / "1.xml").write_text(voc(obj()) if xml is None else xml)
    return data


def prep(data: Path, **policy):
    return prepare_split(data / "train.txt", split="train", images_dir=data / "images", xml_dir=data / "xml",
                         types=["PER", "LOC", "ORG", "OTHER"], policy={**POLICY, **policy})


def counts(summary: dict) -> dict:
    return summary["policy"]["counts"]


def replace(path: Path, how: str, target: Path | str | None = None) -> None:
    path.unlink()
    if how == "fifo":
        os.mkfifo(path)
    elif how == "dir":
        path.mkdir()
    else:
        path.symlink_to(target)


@pytest.fixture(autouse=True)
def no_hang():
    """A read that blocks (a FIFO) fails the test instead of hanging the suite."""
    with fails_after(20):
        yield


# --- class 1: reads bounded and contained ----------------------------------------------------------------


SPECIAL = [("fifo", None, "not a regular file (a FIFO)"), ("dir", None, "not a regular file (a directory)"),
           ("link", "/dev/zero", "outside"), ("link", "/dev/null", "outside")]


@pytest.mark.parametrize("how, target, why", SPECIAL)
def test_special_files_as_images_are_counted_bad_images(tmp_path, how, target, why):
    data = dataset(tmp_path)
    replace(data / "images" / "1.jpg", how, target)
    table, summary = prep(data)
    assert counts(summary) == {"skip:bad_image": 1} and why in summary["policy"]["first_example"]["skip:bad_image"]
    row = table.to_pylist()[0]
    assert row["image_sha256"] is None  # text-only; the xml still gives the size and John's box
    assert (row["width"], row["height"]) == (40, 30) and row["entities"][0]["boxes"] == [[1.0, 1.0, 20.0, 20.0]]


@pytest.mark.parametrize("how, target, why", SPECIAL)
def test_special_files_as_xml_are_bad_xml(tmp_path, how, target, why):
    data = dataset(tmp_path)
    replace(data / "xml" / "1.xml", how, target)
    with pytest.raises(DataError, match=rf"xml/1\.xml: .*{re.escape(why)}"):
        prep(data)
    table, summary = prep(data, bad_xml="skip")
    assert counts(summary) == {"skip:bad_xml": 1} and table.num_rows == 2


@pytest.mark.parametrize("how, target", [("fifo", None), ("dir", None), ("link", "/dev/zero")])
def test_special_files_as_images_in_the_vision_loader(tmp_path, how, target):
    path = tmp_path / "x.jpg"
    Image.new("RGB", (4, 4)).save(path)
    replace(path, how, target)
    with pytest.raises(BadImage) as info:
        load_image(path)
    assert info.value.kind == "not_an_image" and "not a regular file" in str(info.value)


def test_oversized_image_file_is_refused_unread(tmp_path):
    data = dataset(tmp_path)
    with open(data / "images" / "1.jpg", "r+b") as fh:
        fh.truncate(IMAGE_BYTES + 1)  # sparse: no disk, and no memory unless someone reads it
    _, summary = prep(data)
    assert counts(summary) == {"skip:bad_image": 1}
    assert f"more than the {IMAGE_BYTES} allowed" in summary["policy"]["first_example"]["skip:bad_image"]
    with pytest.raises(BadImage) as info:
        load_image(data / "images" / "1.jpg")
    assert info.value.kind == "decompression_bomb"


@pytest.mark.parametrize("image_id, why", [
    ("../../outside/secret", "path separator"), ("/etc/passwd", "path separator"), ("a\\b", "path separator"),
    ("..", "relative folder"), ("2\x00x", "control character"), ("2\x1b[31m", "control character"),
])
def test_ids_that_are_no_plain_file_name_are_refused(tmp_path, image_id, why):
    data = dataset(tmp_path, TWEETS.replace("IMGID:2", f"IMGID:{image_id}"))
    (tmp_path / "outside").mkdir()
    Image.new("RGB", (9, 9)).save(tmp_path / "outside" / "secret.jpg")
    Image.new("RGB", (9, 9)).save(data / "images" / "secret.jpg")  # where a basename check would look
    with pytest.raises(DataError, match=rf"train\.txt:6: IMGID .*{why}"):
        prep(data)
    table, summary = prep(data, bad_id="skip")
    assert table.column("tweet_id").to_pylist() == ["1"] and counts(summary) == {"skip:bad_id": 1}


def test_links_out_of_the_folder_are_refused_links_inside_are_followed(tmp_path):
    data = dataset(tmp_path)
    Image.new("RGB", (9, 9)).save(tmp_path / "outside.jpg")
    replace(data / "images" / "1.jpg", "link", tmp_path / "outside.jpg")
    replace(data / "images" / "2.jpg", "link", "1.jpg")  # a chain that leaves the folder at its end
    table, summary = prep(data)
    assert counts(summary) == {"skip:bad_image": 2}
    assert "resolves to" in summary["policy"]["first_example"]["skip:bad_image"]
    assert table.column("image_sha256").to_pylist() == [None, None]

    other = dataset(tmp_path / "b")
    replace(other / "images" / "2.jpg", "link", "1.jpg")  # inside: a copy of image 1
    (tmp_path / "b" / "pictures").mkdir()
    os.rename(other / "images", tmp_path / "b" / "pictures" / "images")
    (other / "images").symlink_to(tmp_path / "b" / "pictures" / "images")  # the folder itself may be a link
    table, summary = prep(other)
    assert counts(summary) == {} and len(set(table.column("image_sha256").to_pylist())) == 1


def test_huge_png_size_is_read_from_the_header_without_decoding(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("L", (12000, 12000)).save(path)  # ~140 KB on disk, 144 MB decoded
    tracemalloc.start()
    sha, width, height = read_image_info(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (width, height) == (12000, 12000) and sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert peak < 8 << 20, f"{peak} bytes for a header read"
    with pytest.raises(BadImage) as info:
        load_image(path)  # 144 M pixels > max_pixels: refused from the header too
    assert info.value.kind == "decompression_bomb"


def test_png_exif_orientation_in_the_header_is_applied_by_both_readers(tmp_path):
    path = tmp_path / "rotated.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 30)).save(path, exif=exif)
    assert read_image_info(path)[1:] == (30, 40)
    loaded = load_image(path)
    assert (loaded.width, loaded.height) == (30, 40) == loaded.image.size


def test_conll_file_that_is_not_a_regular_file_is_one_error(tmp_path):
    data = dataset(tmp_path)
    replace(data / "train.txt", "fifo")
    with pytest.raises(DataError, match=r"train\.txt: not a regular file \(a FIFO\)"):
        prep(data)


def _jsonl(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def test_predict_warns_once_per_unusable_image_and_predicts_it_text_only(every_word_a_person, tmp_path, caplog):
    os.mkfifo(tmp_path / "fifo.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "fine.png")
    images = ["/dev/zero", str(tmp_path / "fifo.jpg"), str(tmp_path), str(tmp_path / "nope.jpg"),
              str(tmp_path / "fine.png")]
    src = _jsonl(tmp_path / "in.jsonl", *(json.dumps({"text": "Obama visits", "image": image}).encode()
                                         for image in images))
    with caplog.at_level(logging.WARNING, logger="gmner.predict"):
        assert predict_jsonl(every_word_a_person, src, tmp_path / "out.jsonl") == 5
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 5  # four images, then the count
    for line, warning in enumerate(warnings[:4], start=1):
        assert warning.startswith(f"{src}:{line}: ") and warning.endswith("predicted text-only")
    assert "4 of 5 images unusable" in warnings[4] and "missing_image 1, not_an_image 3" in warnings[4]
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [len(row["entities"]) for row in out] == [2] * 5


@pytest.mark.parametrize("line, reason", [
    (json.dumps({"text": "a " * LINE_BYTES}).encode(), f"line longer than {LINE_BYTES} bytes"),
    (b'{"text": "caf\xe9"}', r"not valid UTF-8 \(byte 0xe9 at column 14\)"),
    (b'{"text": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not JSON .*nested too deeply"),
])
def test_predict_input_lines_are_bounded_and_located(every_word_a_person, tmp_path, line, reason):
    src = _jsonl(tmp_path / "in.jsonl", b'{"text": "fine"}', line)
    with pytest.raises(DataError, match=f"in.jsonl:2: {reason}"):
        predict_jsonl(every_word_a_person, src, tmp_path / "out.jsonl")


@pytest.mark.parametrize("how, target", [("fifo", None), ("dir", None), ("link", "/dev/zero")])
def test_predict_input_that_is_not_a_regular_file_is_one_error(every_word_a_person, tmp_path, how, target):
    src = _jsonl(tmp_path / "in.jsonl", b'{"text": "fine"}')
    replace(src, how, target)
    with pytest.raises(DataError, match="in.jsonl: not a regular file"):
        predict_jsonl(every_word_a_person, src, tmp_path / "out.jsonl")


# --- class 2: a cache that cannot be poisoned ------------------------------------------------------------


def _picture(path: Path, seed: int) -> str:
    rgb = np.random.default_rng(seed).integers(0, 256, (36, 48, 3), dtype=np.uint8)
    rgb[8:28, 10:30] = 255  # one bright object, somewhere else for each seed
    Image.fromarray(rgb).save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _detect_root(root: Path, seed: int) -> Path:
    """A repo root whose prepared train split is one tweet showing data/images/0.png, drawn from ``seed``."""
    (root / "data" / "images").mkdir(parents=True, exist_ok=True)
    sha = _picture(root / "data" / "images" / "0.png", seed)
    row = {"tweet_id": "t0", "split": "train", "source": "train.txt:1", "image_id": "t0",
           "image_path": "data/images/0.png", "image_sha256": sha, "width": 48, "height": 36,
           "tokens": ["Obama"], "tags": ["B-PER"], "entities": [{"start": 0, "end": 1, "type": "PER",
                                                                  "text": "Obama", "boxes": [[10, 8, 30, 28]]}]}
    write_parquet(root / "data" / "prepared" / "train.parquet", pa.Table.from_pylist([row], schema=schema.TWEETS))
    return root


def _detect_params() -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base"].update(device="cpu", cache_root=".cache")
    params["prepare"]["files"] = {"train": "train.txt"}
    params["detect"].update(backend="selective_search", num_workers=0, top_k=4)
    return params


@pytest.mark.slow
def test_changed_image_cannot_poison_the_detect_cache(tmp_path):
    root = _detect_root(tmp_path / "a", seed=1)  # prepare recorded image A
    image = root / "data" / "images" / "0.png"
    original = image.read_bytes()
    _picture(image, seed=2)  # then the file changes to B
    with pytest.raises(DataError, match="0.png: changed since prepare .*run prepare again"):
        detect(_detect_params(), root)
    assert not list((root / ".cache" / "detect").rglob("*.bin"))  # nothing cached under A's key
    image.write_bytes(original)  # restored: the same run now computes A's boxes, not B's from the cache
    summary = detect(_detect_params(), root)
    clean = _detect_root(tmp_path / "clean", seed=1)
    detect(_detect_params(), clean)
    assert summary["model_calls"] == 1
    assert (root / "data" / "regions.parquet").read_bytes() == (clean / "data" / "regions.parquet").read_bytes()


def _cached_run(tmp_path, compute_calls: list):
    def compute(batch):
        compute_calls.extend(batch)
        return [{"value": x} for x in batch]
    cache = ItemCache(tmp_path / "cache", "test", "f" * 64)
    return run_items([Item(f"k{i}", i) for i in range(3)], cache=cache, compute=compute, policy={}, codec=JSON)


@pytest.mark.parametrize("damage", ["directory", "fifo", "dangling link", "undecodable", "shard is a file"])
def test_anything_unreadable_in_the_cache_is_a_counted_corrupt_entry(tmp_path, damage):
    _cached_run(tmp_path, [])
    entry = next((tmp_path / "cache").rglob("k1.bin"))
    if damage == "directory":
        entry.unlink()
        (entry / "sub").mkdir(parents=True)
    elif damage == "fifo":
        entry.unlink()
        os.mkfifo(entry)
    elif damage == "dangling link":
        entry.unlink()
        entry.symlink_to(tmp_path / "nothing")
    elif damage == "undecodable":  # checksummed, so only the codec can tell
        payload = b"{not json"
        entry.write_bytes(b"GMNC1" + hashlib.sha256(payload).digest() + payload)
    else:
        shard = entry.parent
        for child in shard.iterdir():
            child.unlink()
        shard.rmdir()
        shard.write_bytes(b"x")
    calls = []
    run = _cached_run(tmp_path, calls)
    assert calls == [1] and run.results["k1"] == {"value": 1}
    assert run.summary["corrupt_entries"] == (0 if damage == "shard is a file" else 1)
    assert _cached_run(tmp_path, []).summary["cache_hits"] == 3  # repaired on disk


# --- class 5: every repair and skip counted -------------------------------------------------------------


@pytest.mark.parametrize("text", [TWEETS.replace("John\t", "John \t"), TWEETS.replace("John\t", " John\t"),
                                  TWEETS.replace("B-PER", "B-PER ")])
def test_whitespace_around_a_token_is_a_counted_repair_and_keeps_the_box(tmp_path, text):
    table, summary = prep(dataset(tmp_path, text))
    assert counts(summary) == {"repair:token_whitespace": 1}
    assert summary["policy"]["first_example"]["repair:token_whitespace"].startswith(f"{tmp_path}/data/train.txt:2:")
    john = table.to_pylist()[0]["entities"][0]
    assert (john["text"], john["type"], john["boxes"]) == ("John", "PER", [[1.0, 1.0, 20.0, 20.0]])
    with pytest.raises(DataError, match=r"train\.txt:2: whitespace around"):
        prep(dataset(tmp_path / "b", text), token_whitespace="error")


@pytest.mark.parametrize("extra, what", [("<name>Paris</name>", "<name>"),
                                         ("<bndbox><xmin>5</xmin><ymin>5</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>",
                                          "<bndbox>")])
def test_object_with_two_names_or_boxes_is_dropped_and_counted(tmp_path, extra, what):
    xml = voc(obj(extra=extra), obj("Paris", (2, 2, 30, 25)))
    table, summary = prep(dataset(tmp_path, xml=xml))
    assert counts(summary) == {"skip:ambiguous_object": 1}
    assert f"object 1: more than one {what}" in summary["policy"]["first_example"]["skip:ambiguous_object"]
    assert [e["boxes"] for e in table.to_pylist()[0]["entities"]] == [[], [[2.0, 2.0, 30.0, 25.0]]]


def test_xml_size_disagreeing_with_the_image_is_counted(tmp_path):
    data = dataset(tmp_path, xml=voc(obj(box=(2, 2, 40, 40)), size=(80, 60)))  # the image is 40 x 30
    table, summary = prep(data)
    assert counts(summary) == {"skip:xml_size_mismatch": 1}
    assert "<size> 80x60 but the image is 40x30" in summary["policy"]["first_example"]["skip:xml_size_mismatch"]
    row = table.to_pylist()[0]
    assert (row["width"], row["height"]) == (40, 30) and row["entities"][0]["boxes"] == []
    table, summary = prep(data, xml_size_mismatch="repair")  # boxes scaled into the image's frame
    row = table.to_pylist()[0]
    assert (row["width"], row["height"]) == (40, 30) and row["entities"][0]["boxes"] == [[1.0, 1.0, 20.0, 20.0]]
    with pytest.raises(DataError, match="xml/1.xml: <size> 80x60"):
        prep(data, xml_size_mismatch="error")


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_split_file_is_reported_with_its_reason(tmp_path, text):
    table, summary = prep(dataset(tmp_path, text))
    assert table.num_rows == 0 and counts(summary) == {"skip:empty_file": 1}
    assert summary["policy"]["first_example"]["skip:empty_file"].endswith("train.txt: no tweets: the file is empty "
                                                                          "or blank")
    with pytest.raises(DataError, match="train.txt: no tweets"):
        prep(dataset(tmp_path / "b", text), empty_file="error")


def test_prepared_parquet_keeps_its_schema_after_every_skip(tmp_path):
    data = dataset(tmp_path, TWEETS.replace("John\t", "John \t"), voc(obj(extra="<name>x</name>"), size=(9, 9)))
    replace(data / "images" / "2.jpg", "fifo")
    table, summary = prep(data)
    assert table.schema == schema.TWEETS and table.num_rows == 2
    pq.write_table(table, tmp_path / "t.parquet")
    assert set(counts(summary)) == {"repair:token_whitespace", "skip:xml_size_mismatch", "skip:bad_image"}
