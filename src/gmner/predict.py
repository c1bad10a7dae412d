"""Predict entities for new tweets given as JSONL, with any trained model folder.

Input, one JSON object per line: ``{"id": optional str or int, "text": str | "tokens": [str], "image":
optional path}``. ``text`` is split on whitespace. Output, one line per input line, in order:
``{"id", "entities": [{"text", "type", "start", "end", "region", "box"}]}`` with word offsets (``end``
exclusive); ``id`` is the input's, or the 1-based line number when it is absent or null. Every line is checked
before the model runs, so a bad file fails fast, naming the file and line; the input must be a regular file of
at most :data:`gmner.core.files.TEXT_BYTES`, each line at most :data:`LINE_BYTES`.

Each image is read (bounded, regular files only, header only) before the model runs too: one that is missing
or unusable (a directory, a FIFO, a device, too big, not an image) is a warning naming the line, its tweet is
predicted text-only, and a last warning counts them by reason.
"""

from __future__ import annotations

import json
from pathlib import Path

from gmner.core.atomic import atomic_path
from gmner.core.errors import DataError
from gmner.core.files import TEXT_BYTES, MiB, open_input
from gmner.draw import draw_predictions, png_names

LINE_BYTES = MiB  # one input line: a tweet is at most a few KB


def read_jsonl(path: str | Path) -> list[dict]:
    """Validated input rows ``{"id", "tokens", "image"}``; a bad line raises DataError at ``path:line``."""
    rows = []
    with open_input(path, TEXT_BYTES) as lines:
        for number, raw in enumerate(iter(lambda: lines.readline(LINE_BYTES + 1), b""), start=1):
            where = f"{path}:{number}"
            if len(raw) > LINE_BYTES:
                raise DataError(where, f"line longer than {LINE_BYTES} bytes")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                at = f"byte {raw[err.start]:#04x} at column {err.start + 1}"
                raise DataError(where, f"not valid UTF-8 ({at})") from None
            rows.append(_parse_line(line, where, number))
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
    except RecursionError:
        raise DataError(where, "not JSON this reader takes: nested too deeply") from None
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
                  draw_dir: str | Path | None = None, cache: str | Path | None = None, precision: str | None = None,
                  batch_size: int = 64) -> int:
    """Write predictions for every line of ``input_path`` to ``output_path`` (atomically); returns the count.

    A visual model runs its recorded vision pipeline on the lines' images (gmner.api), its results cached
    under ``cache``. With ``draw_dir``, also draw each line that has an image into ``draw_dir/<id>.png``
    (gmner.draw) and print what was drawn; ids are checked as file names before the model runs.
    """
    from gmner.api import Predictor, image_identities, tweets_table

    rows = read_jsonl(input_path)
    ids, images = [row["id"] for row in rows], [row["image"] for row in rows]
    if draw_dir is not None:
        png_names(ids, images, str(input_path))
    tokens = [row["tokens"] for row in rows]
    # Each image's identity is read here once, so that a bad one is named by its line before the model runs.
    tweets = tweets_table(tokens, images, image_identities(images, str(input_path)))
    predictor = Predictor(model_dir, device, cache, precision, batch_size)
    predictions = predictor.predict_table(tweets).column("entities").to_pylist()
    entities = [[_entity(words, e) for e in found] for words, found in zip(tokens, predictions)]
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
