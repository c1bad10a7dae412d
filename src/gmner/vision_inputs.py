"""What the caption, synthesize and features stages read: prepared tweets, and their images for DataLoader workers.

Images go through :func:`gmner.images.load_image`, so a missing or undecodable file is a typed
:class:`gmner.images.BadImage` that the stage's policy turns into an error or a counted skip. The per-item
runner does not return which items it skipped, so a stage that writes flagged rows asks
:func:`skip_reason` again for those few items.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from gmner.images import BadImage, load_image


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

    Copies of one image under several names resolve to the smallest name, as in the detect stage.
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


@dataclass(frozen=True)
class ImageLoad:
    """Picklable ``load`` for the runner: a path to an RGB PIL image, or to ``transform(image)`` when given."""

    max_pixels: int
    max_side: int
    transform: Callable | None = None

    def __call__(self, path: str):
        image = load_image(path, self.max_pixels, self.max_side).image
        return image if self.transform is None else self.transform(image)


def skip_reason(path: str, max_pixels: int, max_side: int) -> str:
    """Why ``path`` could not be used (a :data:`gmner.images.SKIP_REASONS` kind)."""
    try:
        load_image(path, max_pixels, max_side)
    except BadImage as exc:
        return exc.kind
    return "unavailable"  # readable now: it changed while the stage ran
