"""Predict entities for new tweets given as JSONL, with any trained model folder.

Input, one JSON object per line: ``{"id": optional str or int, "text": str | "tokens": [str], "image":
optional path}``. ``text`` is split on whitespace. Output, one line per input line, in order:
``{"id", "entities": [{"text", "type", "start", "end", "region", "box"}]}`` with word offsets (``end``
exclusive); ``id`` is the input's, or the 1-based line number when it is absent or null. Every line is checked
before the model runs, so a bad file fails fast, naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from gmner.core.atomic import atomic_path
from gmner.core.errors import DataError
from gmner.draw import draw_predictions, png_names
from gmner.models.predictor import load


def read_jsonl(path: str | Path) -> list[dict]:
    """Validated input rows ``{"id", "tokens", "image"}``; a bad line raises DataError at ``path:line``."""
    rows = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            rows.append(_parse_line(line, f"{path}:{number}", number))
    if not rows:
        raise DataError(str(path), "no input lines")
    return rows


def _parse_line(line: str, where: str, number: int) -> dict:
    if not line.strip():
        raise DataError(where, "empty line")
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(where, f"not JSON: {err.msg}") from None
    if not isinstance(item, dict):
        raise DataError(where, f"expected a JSON object, got {type(item).__name__}")
    if ("text" in item) == ("tokens" in item):
        raise DataError(where, 'give exactly one of "text" and "tokens"')
    if "text" in item:
        if not isinstance(item["text"], str):
            raise DataError(where, '"text" must be a string')
        tokens = item["text"].split()
    else:
        tokens = item["tokens"]
        if not isinstance(tokens, list) or not all(isinstance(t, str) and t.strip() for t in tokens):
            raise DataError(where, '"tokens" must be a list of non-blank strings')
    if not tokens:
        raise DataError(where, "no words to tag")
    item_id = number if item.get("id") is None else item["id"]
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
        raise DataError(where, '"id" must be a string or an integer')
    image = item.get("image")
    if image is not None and not isinstance(image, str):
        raise DataError(where, '"image" must be a path string')
    return {"id": item_id, "tokens": tokens, "image": image}


def predict_jsonl(model_dir: str | Path, input_path: str | Path, output_path: str | Path, device: str = "cpu",
                  draw_dir: str | Path | None = None) -> int:
    """Write predictions for every line of ``input_path`` to ``output_path`` (atomically); returns the count.

    With ``draw_dir``, also draw each line that has an image into ``draw_dir/<id>.png`` (gmner.draw) and print
    what was drawn; ids are checked as file names before the model runs.
    """
    from gmner.core.params import resolve_device

    rows = read_jsonl(input_path)
    ids, images = [row["id"] for row in rows], [row["image"] for row in rows]
    if draw_dir is not None:
        png_names(ids, images, str(input_path))
    tweets = pa.table({
        "tweet_id": [str(i) for i in range(len(rows))],  # positions: input ids need not be unique
        "tokens": [row["tokens"] for row in rows],
        "image_path": images,
    })
    predictions = load(model_dir, resolve_device(device)).predict(tweets).column("entities").to_pylist()
    entities = [[_entity(row["tokens"], e) for e in found] for row, found in zip(rows, predictions)]
    with atomic_path(output_path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for item_id, found in zip(ids, entities):
            out.write(json.dumps({"id": item_id, "entities": found}, ensure_ascii=False) + "\n")
    if draw_dir is not None:
        print(draw_predictions(ids, images, entities, draw_dir, str(input_path)))
    return len(rows)


def _entity(tokens: list[str], entity: dict) -> dict:
    return {
        "text": " ".join(tokens[entity["start"] : entity["end"]]),
        "type": entity["type"],
        "start": entity["start"],
        "end": entity["end"],
        "region": entity["region"],
        "box": entity["box"],
    }
