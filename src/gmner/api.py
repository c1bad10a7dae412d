"""Predict new tweets and their images with a trained model folder: ``gmner.load(path).predict(texts, images)``.

A visual model's folder records the vision pipeline that made its training inputs (``vision.json``, see
gmner.vision.record); :class:`Predictor` runs that pipeline on the images it is given (detect -> (caption) ->
features, each result cached by content under ``cache``), hands the tables to the model's own predictor as a
VisualStore, and returns typed results. A folder without ``vision.json`` (trained before it existed) reads the
tables its ``visual_paths`` name, relative to the working directory, as the evaluate stage does.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import pyarrow as pa

from gmner.core import schema
from gmner.core.atomic import write_bytes
from gmner.core.errors import DataError
from gmner.core.images import BadImage, read_image_info

log = logging.getLogger(__name__)

Image = Union[str, os.PathLike, bytes, "PIL.Image.Image", None]  # noqa: F821 (PIL is imported when used)
CHUNK = 1024  # tweets per vision + model pass: memory stays bounded, and a progress bar moves


@dataclass(frozen=True)
class Entity:
    text: str  # its words joined by single spaces
    type: str
    start: int  # word offsets, end exclusive
    end: int
    char_start: int  # character offsets in the tweet's text (the words joined by spaces when given as tokens)
    char_end: int
    box: tuple[float, float, float, float] | None = None  # xyxy in the original image's pixels; None: not in it
    score: float | None = None  # the detector's score of that candidate
    region: int | None = None  # its index among the image's candidates, best first


@dataclass(frozen=True)
class Prediction:
    text: str
    tokens: tuple[str, ...]
    entities: tuple[Entity, ...]
    image_sha256: str | None = None  # the image the entities were grounded in; None: predicted text-only


def default_cache() -> Path:
    """The project's ``.cache`` when the working directory has one (the pipeline's results), else the user's."""
    if Path(".cache").is_dir():
        return Path(".cache")
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gmner"


def load(path: str | os.PathLike, device: str = "cpu", cache: str | os.PathLike | None = None,
         precision: str | None = None, batch_size: int = 64) -> Predictor:
    """The :class:`Predictor` of the model folder ``path`` on ``device`` (cpu, cuda, cuda:N, mps, auto)."""
    return Predictor(path, device, cache, precision, batch_size)


class Predictor:
    """A loaded model folder; ``cache`` holds the vision results (default :func:`default_cache`) and
    ``precision`` (fp32, fp16, bf16) overrides the recorded vision models' (and autocasts the model)."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", cache: str | os.PathLike | None = None,
                 precision: str | None = None, batch_size: int = 64):
        from gmner.core.params import resolve_device
        from gmner.models.predictor import load as load_model
        from gmner.models.predictor import model_folder
        from gmner.vision.record import RECORD_FILE

        self.path, self.device, self.precision = model_folder(path), resolve_device(device), precision
        self.cache = Path(cache) if cache is not None else default_cache()
        record_path = self.path / RECORD_FILE
        self.record = json.loads(record_path.read_text()) if record_path.is_file() else None
        self._vision = None  # built on the first image
        store = _empty_store(self.record) if self.record else None
        self.model = load_model(self.path, self.device, store)
        self.model.batch_size = batch_size
        self.reads_images = hasattr(self.model, "store")  # a VisualPredictor (text-only models have none)
        if self.record and self.reads_images and {"generated", "text", "masked"} & set(self.model.model.extras):
            raise DataError(str(self.path), f"the model reads {sorted(self.model.model.extras)}: generated images, "
                            "CLIP text or masked images are not computed for new tweets (captions and patches are)")

    @property
    def vision(self):
        """The recorded vision pipeline, built once."""
        if self._vision is None:
            from gmner.vision.record import RECORD_FILE, VisionPipeline

            self._vision = VisionPipeline(self.record, self.device, self.cache, self.precision,
                                          where=str(self.path / RECORD_FILE))
        return self._vision

    def predict(self, texts_or_tokens: str | Sequence[str | Sequence[str]],
                images: Image | Sequence[Image] = None) -> list[Prediction]:
        """One :class:`Prediction` per tweet, in order. ``texts_or_tokens``: one tweet's text, or a list of
        tweets, each a text (split on whitespace) or its list of words; ``images``: one per tweet (a path, the
        file's bytes, a PIL image, or None), a single one for a single text. An unusable image is a warning,
        and its tweet is predicted text-only."""
        if isinstance(texts_or_tokens, str):
            texts_or_tokens, images = [texts_or_tokens], [images]
        tokens = [t.split() if isinstance(t, str) else list(t) for t in texts_or_tokens]
        images = [None] * len(tokens) if images is None else list(images)
        if len(images) != len(tokens):
            raise ValueError(f"{len(images)} images for {len(tokens)} tweets")
        paths = [self.image_path(image) for image in images]
        table = self.predict_table(tweets_table(tokens, paths, image_identities(paths, "predict")))
        return [_prediction(words, row) for words, row in zip(tokens, table.to_pylist())]

    def predict_table(self, tweets: pa.Table) -> pa.Table:
        """Per row of a tweets table (:func:`tweets_table`): ``tweet_id``, the ``image_sha256`` the entities were
        grounded in, and ``entities`` (schema.PREDICTED_ENTITY fields plus ``score``, the detector's score of the
        region)."""
        from tqdm import tqdm

        chunks = [tweets.slice(start, CHUNK) for start in range(0, tweets.num_rows, CHUNK)]
        out = [self._predict_chunk(chunk) for chunk in tqdm(chunks, desc="predict", unit="chunk",
                                                             disable=True if len(chunks) < 2 else None)]
        return pa.concat_tables(out)

    @property
    def grounds(self) -> bool:
        """Whether the model can ground the entities of a new image in it."""
        return self.reads_images and not (self.record and self.vision.cannot_ground)

    def _predict_chunk(self, tweets: pa.Table) -> pa.Table:
        if self.reads_images and self.record:
            tweets = self._with_visual_store(tweets)
        with _autocast(self.device, self.precision):
            entities = self.model.predict(tweets).column("entities").to_pylist()
        scores = {}
        if self.reads_images:  # the candidates' detector scores, from the regions the model read
            regions = self.model.store.regions
            scores = dict(zip(regions.column("image_sha256").to_pylist(), regions.column("scores").to_pylist()))
        for sha, found in zip(tweets.column("image_sha256").to_pylist(), entities):
            for entity in found:
                region = entity["region"]
                entity["score"] = None if region is None or sha not in scores else scores[sha][region]
        used = tweets.column("image_sha256") if self.reads_images else pa.nulls(tweets.num_rows, pa.string())
        return pa.table({"tweet_id": tweets.column("tweet_id"), "image_sha256": used, "entities": entities})

    def _with_visual_store(self, tweets: pa.Table) -> pa.Table:
        """``tweets``, with the model reading a VisualStore of their images made by the recorded vision
        pipeline; for a model that cannot ground new images, ``tweets`` without them and a one-line warning."""
        from gmner.models.visual_store import VisualStore
        from gmner.vision.detect import collect_images

        shas = tweets.column("image_sha256").to_pylist()
        if not any(shas):
            return tweets
        if self.vision.cannot_ground:
            log.warning("%s: %s; its %d tweets with an image are predicted text-only", self.path,
                        self.vision.cannot_ground, sum(sha is not None for sha in shas))
            index = tweets.column_names.index("image_sha256")
            return tweets.set_column(index, "image_sha256", pa.nulls(tweets.num_rows, pa.string()))
        # The detect stage's image records (size, the words of the tweets showing it: zero-shot prompts).
        no_entities = pa.array([[]] * tweets.num_rows, schema.TWEETS.field("entities").type)
        tables = self.vision.tables(collect_images([tweets.append_column("entities", no_entities)], ""))
        model = self.model.model
        self.model.store = VisualStore(tables.pop("regions"), tables.pop("region_features"),
                                       tables.pop("image_features"), model.visual_cfg.top_k, model.extras, tables)
        return tweets

    def image_path(self, image: Image) -> str | None:
        """A path for ``image``: bytes and PIL images are stored once, by content, under the cache."""
        if image is None or isinstance(image, (str, os.PathLike)):
            return None if image is None else str(image)
        if not isinstance(image, bytes):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")  # lossless: the pixels given
            image = buffer.getvalue()
        path = self.cache / "inputs" / f"{hashlib.sha256(image).hexdigest()}.img"
        if not path.is_file():
            write_bytes(path, image)
        return str(path)


def tweets_table(tokens: list[list[str]], images: list[str | None],
                 infos: list[tuple[str, int, int] | None]) -> pa.Table:
    """The tweets table a predictor reads: positions as tweet ids (input ids need not be unique), and each
    image's identity as :func:`image_identities` read it (None: text-only)."""
    return pa.table({
        "tweet_id": [str(i) for i in range(len(tokens))],
        "tokens": tokens,
        "image_path": [image if info else None for image, info in zip(images, infos)],
        "image_sha256": pa.array([info and info[0] for info in infos], pa.string()),
        "width": pa.array([info and info[1] for info in infos], pa.int32()),
        "height": pa.array([info and info[2] for info in infos], pa.int32()),
    })


def image_identities(images: list[str | None], where: str) -> list[tuple[str, int, int] | None]:
    """(sha256, width, height) of each image from its header (bounded, regular files only), None without one;
    an unusable image is None too, with a warning naming its line, and a last warning counting them by reason."""
    infos, bad = [], Counter()
    for line, image in enumerate(images, start=1):
        info = None
        if image is not None:
            try:
                info = read_image_info(image)
            except BadImage as exc:
                bad[exc.kind] += 1
                log.warning("%s:%d: %s; this tweet is predicted text-only", where, line, exc)
        infos.append(info)
    if bad:
        log.warning("%s: %d of %d images unusable, their tweets predicted text-only: %s", where, sum(bad.values()),
                    sum(image is not None for image in images), ", ".join(f"{k} {n}" for k, n in sorted(bad.items())))
    return infos


def _prediction(tokens: list[str], row: dict) -> Prediction:
    text, starts, position = " ".join(tokens), [], 0
    for word in tokens:
        starts.append(position)
        position += len(word) + 1
    entities = tuple(
        Entity(" ".join(tokens[e["start"]:e["end"]]), e["type"], e["start"], e["end"], starts[e["start"]],
               starts[e["end"] - 1] + len(tokens[e["end"] - 1]), e["box"] and tuple(e["box"]), e["score"],
               e["region"])
        for e in row["entities"]
    )
    return Prediction(text, tuple(tokens), entities, row["image_sha256"])


def _empty_store(record: dict):
    """A VisualStore of no image with the recorded feature size: what the model's predictor checks at load."""
    from gmner.models.visual_store import VisualStore

    dim, shape = record["features"]["dim"], record["features"]["token_shape"]
    tables = {"regions": schema.REGIONS, "region_features": schema.region_features_schema(dim),
              "image_features": schema.image_features_schema(dim, tuple(shape) if shape else None),
              "captions": schema.CAPTIONS}
    empty = {key: kind.empty_table() for key, kind in tables.items()}
    return VisualStore(empty.pop("regions"), empty.pop("region_features"), empty.pop("image_features"), 1,
                       extra_tables=empty)


def _autocast(device, precision: str | None):
    import contextlib

    import torch

    if precision in (None, "fp32"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[precision])
