"""Seeded random byte mutations of a small valid dataset (CoNLL, xml, images) and of a predict JSONL: each case
ends in a result, a counted skip or a one-line DataError, never another exception, a hang, or a write outside
the work folder (issue 15). A failure names the seed and case, so ``CASE=<n>`` reproduces it alone."""

from __future__ import annotations

import io
import json
import os
import random
import sys

import pytest
from PIL import Image

from gmner.core.errors import DataError
from gmner.datasets.prepare import REASONS, prepare_split
from gmner.predict import predict_jsonl, read_jsonl

from helpers import fails_after

SEED = 15
TEXT = ("IMGID:1\nRT\tO\n@nba\tO\nLeBron\tB-PER\nJames\tI-PER\nin\tO\nCleveland\tB-LOC\n\n"
        "IMGID:2\nApple\tB-ORG\nevent\tO\nin\tO\nParis\tB-LOC\n\nIMGID:3\nnice\tO\nday\tO\n")
XML = ("<annotation><size><width>24</width><height>16</height><depth>3</depth></size>"
       "<object><name>{}</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>12</xmax><ymax>14</ymax></bndbox></object>"
       "</annotation>")
JSONL = (b'{"id": "a", "text": "LeBron James visits Cleveland", "image": "images/1.jpg"}\n'
         b'{"tokens": ["Apple", "event"], "image": "images/2.jpg"}\n{"id": 3, "text": "nice day"}\n')


def _image(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


FILES = {"train.txt": TEXT.encode(), "xml/1.xml": XML.format("LeBron James").encode(),
         "xml/2.xml": XML.format("Apple").encode(), "images/1.jpg": _image("JPEG"), "images/2.jpg": _image("PNG"),
         "images/3.jpg": _image("GIF")}  # images are sniffed by content, whatever their name


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random edits: flip, insert, delete, repeat a chunk, or truncate."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data) + 1)
        op = rng.choice(("flip", "insert", "delete", "repeat", "truncate", "special"))
        if op == "flip" and at < len(data):
            data[at] ^= 1 << rng.randrange(8)
        elif op == "insert":
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == "delete":
            del data[at : at + rng.randint(1, 16)]
        elif op == "repeat":
            data[at:at] = data[at : at + rng.randint(1, 64)] * rng.randint(2, 50)
        elif op == "truncate":
            del data[at:]
        else:  # the bytes the readers treat specially
            data[at:at] = rng.choice((b"\t", b"\n", b"\r\n", b"\x00", b"IMGID:", b"../", b"<", b"&", b"\xef\xbb\xbf",
                                      b'"', b"{", b"[", b"\\u0000", b" ", b"\xff\xfe", b"/dev/zero", b"images"))
    return bytes(data)


@pytest.fixture
def writes_outside(tmp_path):
    """Files opened for writing, renamed or made outside ``tmp_path`` while the test runs (an audit hook)."""
    found, active = [], [True]
    root = os.path.realpath(tmp_path)

    def hook(event, args):
        if not active[0] or event not in ("open", "os.rename", "os.replace", "os.mkdir", "os.remove"):
            return
        if event == "open":
            path, mode, flags = args
            writing = (mode and any(c in mode for c in "wax+")) or (
                flags and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            paths = [path] if writing else []
        else:
            paths = list(args[:2]) if event in ("os.rename", "os.replace") else [args[0]]
        for path in paths:
            if isinstance(path, (str, bytes, os.PathLike)) and not isinstance(path, int):
                real = os.path.realpath(os.fsdecode(path))
                if os.path.commonpath([root, real]) != root:
                    found.append((event, real))

    sys.addaudithook(hook)  # hooks cannot be removed: this one goes quiet after the test
    yield found
    active[0] = False


@pytest.fixture(autouse=True)
def no_hang():
    with fails_after(120):
        yield


def _cases(n: int, names):
    only = os.environ.get("CASE")
    for case in range(n):
        if only is None or int(only) == case:
            yield case, random.Random(f"{SEED}:{case}"), names[case % len(names)]


@pytest.mark.slow
def test_prepare_survives_mutated_datasets(tmp_path, writes_outside):
    lenient = {reason: "skip" if "skip" in actions else "repair" for reason, actions in REASONS.items()}
    outcomes = {"ok": 0, "skips": 0, "errors": 0}
    for case, rng, name in _cases(300, sorted(FILES)):
        data = tmp_path / f"case{case}"
        for rel, content in FILES.items():
            (data / rel).parent.mkdir(parents=True, exist_ok=True)
            (data / rel).write_bytes(mutate(content, rng) if rel == name else content)
        policy = lenient if case % 2 else {**lenient, **{r: "error" for r in rng.sample(sorted(REASONS), 6)}}
        try:
            table, summary = prepare_split(data / "train.txt", split="train", images_dir=data / "images",
                                           xml_dir=data / "xml", image_ext=".jpg", types=["PER", "LOC", "ORG", "OTHER"],
                                           policy=policy)
        except DataError as err:
            assert "\n" not in str(err) and err.where, f"seed {SEED} case {case} ({name}): {err!r}"
            outcomes["errors"] += 1
            continue
        except Exception as err:  # the point: anything but a DataError is a bug
            pytest.fail(f"seed {SEED} case {case} ({name}): {type(err).__name__}: {err}")
        assert table.num_rows == summary["tweets"] <= 3 + TEXT.count("\n")
        outcomes["skips" if summary["policy"]["counts"] else "ok"] += 1
    if "CASE" not in os.environ:
        assert min(outcomes.values()) > 10, outcomes  # the mutations reach every kind of ending
    assert writes_outside == []


@pytest.mark.slow
def test_predict_survives_mutated_jsonl(every_word_a_person, tmp_path, writes_outside, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for rel in ("images/1.jpg", "images/2.jpg"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(FILES[rel])
    predicted = errors = 0
    for case, rng, _ in _cases(300, ["in.jsonl"]):
        src = tmp_path / f"in{case}.jsonl"
        src.write_bytes(mutate(JSONL, rng))
        try:
            rows = read_jsonl(src)
            if predicted < 25:  # the whole path, model included, for the first inputs that parse
                assert predict_jsonl(every_word_a_person, src, tmp_path / "out.jsonl") == len(rows)
                out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
                assert [row["id"] for row in out] == [row["id"] for row in rows]
                predicted += 1
        except DataError as err:
            assert "\n" not in str(err) and str(src) in str(err), f"seed {SEED} case {case}: {err!r}"
            errors += 1
        except Exception as err:  # the point: anything but a DataError is a bug
            pytest.fail(f"seed {SEED} case {case}: {type(err).__name__}: {err}")
    if "CASE" not in os.environ:
        assert predicted >= 10 and errors > 50, (predicted, errors)
    assert writes_outside == []
