"""What the vision stages read: prepared tweets, their distinct images, and those images for DataLoader workers.

Images go through :func:`gmner.core.images.load_image`, so a missing or undecodable file is a typed
:class:`gmner.core.images.BadImage` that the stage's policy (:func:`image_policy`) turns into an error or a counted
skip; the runner lists the skipped items with their reason in ``StageRun.skipped``.

Results are cached under the image's sha256 as prepare recorded it, so the bytes decoded must be those bytes:
:func:`distinct_images` hands out :class:`PreparedImage` paths, and :class:`ImageLoad` hashes the bytes it decodes
and stops the stage (run prepare again) when they differ, rather than cache one image's result under another's
key. Stopping, not using the new bytes under their own hash, because every prepared field of that image (its
size, its boxes) describes the old bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from gmner.core.errors import DataError, checked_actions
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


class PreparedImage(str):
    """An image path as a prepared table names it, with the ``sha256`` prepare recorded for its bytes."""

    sha256: str

    def __new__(cls, path: str, sha256: str):
        self = super().__new__(cls, path)
        self.sha256 = sha256
        return self

    def __reduce__(self):  # to DataLoader workers: str's own pickling would drop sha256
        return PreparedImage, (str(self), self.sha256)


def distinct_images(tables: list[pa.Table], root: str | Path = ".") -> dict[str, PreparedImage]:
    """image_sha256 -> path under ``root`` of every distinct image, sorted by sha256.

    Copies of one image under several names resolve to the smallest name.
    """
    paths: dict[str, str] = {}
    for table in tables:
        for row in table.select(["image_path", "image_sha256"]).to_pylist():
            sha = row["image_sha256"]
            if sha is not None and (sha not in paths or row["image_path"] < paths[sha]):
                paths[sha] = row["image_path"]
    return {sha: PreparedImage(str(Path(root) / paths[sha]), sha) for sha in sorted(paths)}


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
        """The decoded image; a :class:`PreparedImage` whose bytes no longer hash to its ``sha256`` is a
        DataError with no policy reason, which stops the stage."""
        loaded = load_image(path, self.max_pixels, self.max_side)
        expected = getattr(path, "sha256", None)
        if expected is not None and loaded.sha256 != expected:
            raise DataError(str(path), f"changed since prepare (sha256 {expected[:12]}... recorded, "
                            f"{loaded.sha256[:12]}... now): run prepare again")
        return loaded

    def __call__(self, path: str):
        image = self.open(path).image
        return image if self.preprocess is None else self.preprocess([image])[0]
