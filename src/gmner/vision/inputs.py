"""What the vision stages read: prepared tweets, their distinct images, and those images for DataLoader workers.

Images go through :func:`gmner.core.images.load_image`, so a missing or undecodable file is a typed
:class:`gmner.core.images.BadImage` that the stage's policy (:func:`image_policy`) turns into an error or a counted
skip; the runner lists the skipped items with their reason in ``StageRun.skipped``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from gmner.core.errors import checked_actions
from gmner.core.images import SKIP_REASONS, LoadedImage, load_image

IMAGE_ACTIONS = ("error", "skip")


def prepared_tables(params: dict, root: str | Path = ".") -> list[pa.Table]:
    """data/prepared/<split>.parquet for every split of ``prepare.files``, in that order."""
    tables = []
    for split in params["prepare"]["files"]:
        path = Path(root) / "data" / "prepared" / f"{split}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no prepared {split} split; run the prepare stage first")
        tables.append(pq.read_table(path))
    return tables


def distinct_images(tables: list[pa.Table], root: str | Path = ".") -> dict[str, str]:
    """image_sha256 -> path under ``root`` of every distinct image, sorted by sha256.

    Copies of one image under several names resolve to the smallest name.
    """
    paths: dict[str, str] = {}
    for table in tables:
        for row in table.select(["image_path", "image_sha256"]).to_pylist():
            sha = row["image_sha256"]
            if sha is not None and (sha not in paths or row["image_path"] < paths[sha]):
                paths[sha] = row["image_path"]
    return {sha: str(Path(root) / paths[sha]) for sha in sorted(paths)}


def tweet_text(tokens: list[str]) -> str:
    return " ".join(tokens)


def image_policy(actions: Mapping[str, str], where: str) -> dict[str, str]:
    """A vision stage's ``policy`` param checked: reasons are :data:`gmner.core.images.SKIP_REASONS` kinds, actions
    ``error`` or ``skip``; a reason left out is ``error``. ``where`` names the param in errors."""
    return checked_actions(actions, {reason: IMAGE_ACTIONS for reason in SKIP_REASONS}, where)


@dataclass(frozen=True)
class ImageLoad:
    """Picklable ``load`` for the runner: a path -> its RGB PIL image, or ``preprocess([image])[0]`` when given.

    Loaders of other payloads (a path and boxes, a path and prompts) extend it and decode through :meth:`open`.
    """

    max_pixels: int
    max_side: int
    preprocess: Callable[[list], Any] | None = None  # PIL images -> one [N, ...] tensor, e.g. a model's input

    def open(self, path: str) -> LoadedImage:
        return load_image(path, self.max_pixels, self.max_side)

    def __call__(self, path: str):
        image = self.open(path).image
        return image if self.preprocess is None else self.preprocess([image])[0]
