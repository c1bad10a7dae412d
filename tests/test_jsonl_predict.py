"""JSONL prediction: input validation by line number, output format, atomic output."""

from __future__ import annotations

import json

import pytest

from gmner.core.errors import DataError
from gmner.predict import predict_jsonl


def write_lines(path, *lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_predicts_every_line_in_order(every_word_a_person, tmp_path):
    src = write_lines(
        tmp_path / "in.jsonl",
        json.dumps({"id": "a", "text": "Obama  visits\tParis"}),
        json.dumps({"tokens": ["Zürich"], "image": "img/1.jpg"}),
    )
    assert predict_jsonl(every_word_a_person, src, tmp_path / "out.jsonl") == 2
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["id"] for row in out] == ["a", 2]  # no id: the line number
    assert out[0]["entities"] == [
        {"text": w, "type": "PER", "start": i, "end": i + 1, "region": None, "box": None}
        for i, w in enumerate(["Obama", "visits", "Paris"])
    ]
    assert out[1]["entities"][0]["text"] == "Zürich"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no temp file left


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"id": 3}', "exactly one of"),
        ('{"text": "a", "tokens": ["a"]}', "exactly one of"),
        ('{"text": 5}', '"text" must be a string'),
        ('{"tokens": ["a", 1]}', '"tokens" must be a list'),
        ('{"tokens": ["a", " "]}', '"tokens" must be a list'),
        ('{"text": "   "}', "no words"),
        ('{"text": "a", "id": [1]}', '"id" must be'),
        ('{"text": "a", "image": 7}', '"image" must be'),
        ("", "empty line"),
    ],
)
def test_bad_line_names_file_and_line(every_word_a_person, tmp_path, bad, reason):
    src = write_lines(tmp_path / "in.jsonl", '{"text": "fine"}', '{"text": "fine too"}', bad)
    with pytest.raises(DataError, match=f"in.jsonl:3: .*{reason}"):
        predict_jsonl(every_word_a_person, src, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_empty_input_file_is_an_error(every_word_a_person, tmp_path):
    with pytest.raises(DataError, match="no input lines"):
        predict_jsonl(every_word_a_person, write_lines(tmp_path / "in.jsonl"), tmp_path / "out.jsonl")
