"""Robust image loading for the vision stages: any file a tweet points at becomes an RGB image or a typed skip.

Every failure raises :class:`BadImage`, whose ``kind`` is one of :data:`SKIP_REASONS`; stages pass it to their
``gmner.core.errors.Policy`` so each kind is either an error or a counted skip. What loads is normalised:
EXIF orientation applied, transparency composited on white, CMYK / grayscale / 16-bit converted to 8-bit RGB,
the first frame of an animation. Huge images are decoded downscaled (JPEG DCT scaling through ``draft``, then
a resize), so memory stays bounded by ``max_pixels`` for other formats and far below it for JPEG; the
returned :class:`LoadedImage` maps boxes found on the smaller image back to original pixels.

Original pixels means the image as displayed, i.e. after EXIF rotation: sizes and boxes are in that frame.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gmner.core.errors import DataError

SKIP_REASONS = ("missing_image", "empty_image", "not_an_image", "corrupt_image", "decompression_bomb")

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ROTATING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_EXIF_ORIENTATION = 0x0112


class BadImage(DataError):
    """An image that cannot be used; ``kind`` (one of SKIP_REASONS) is the policy reason."""

    def __init__(self, path: str | Path, kind: str, message: str):
        super().__init__(str(path), message)
        self.kind = kind


@dataclass(frozen=True)
class LoadedImage:
    """``image`` is RGB, at most ``max_side`` on its long side; ``width``/``height`` are the original size."""

    image: Image.Image
    width: int
    height: int

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy) with loaded pixels = original pixels * scale."""
        return self.image.width / self.width, self.image.height / self.height

    def to_original(self, boxes) -> np.ndarray:
        """xyxy boxes on ``image`` -> float32 xyxy boxes in original pixels, clipped to the image."""
        sx, sy = self.scale
        out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / np.array([sx, sy, sx, sy])
        out = np.clip(out, 0, [self.width, self.height, self.width, self.height])
        return out.astype(np.float32)


def load_image(path: str | Path, max_pixels: int = 50_000_000, max_side: int = 1333) -> LoadedImage:
    """Decode ``path`` into a :class:`LoadedImage`; raise :class:`BadImage` for anything unusable.

    ``max_pixels`` bounds width * height read from the header, before any pixel is decoded (decompression
    bombs). PIL's own bomb warning is silenced because this check replaces it; PIL's hard limit
    (2 * Image.MAX_IMAGE_PIXELS) still applies and is reported as the same skip.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadImage(path, "missing_image", "image file not found") from None
    if size == 0:
        raise BadImage(path, "empty_image", "image file is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                return _decode(path, img, max_pixels, max_side)
        except BadImage:
            raise
        except UnidentifiedImageError:
            raise BadImage(path, "not_an_image", "not a readable image format") from None
        except Image.DecompressionBombError as exc:
            raise BadImage(path, "decompression_bomb", str(exc)) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            # PIL reports truncated or damaged pixel data through these at decode time.
            raise BadImage(path, "corrupt_image", f"cannot decode image: {exc}") from None


def image_info(path: str | Path) -> tuple[str, int, int] | None:
    """(sha256 of the bytes, width, height as displayed) from the header alone, decoding no pixels; None when
    the file is absent or not an image PIL can read."""
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            width, height = displayed_size(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return hashlib.sha256(data).hexdigest(), width, height


def displayed_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after EXIF rotation, from the header alone: the frame boxes live in."""
    width, height = img.size
    if img.getexif().get(_EXIF_ORIENTATION, 1) in _ROTATING_ORIENTATIONS:
        return height, width
    return width, height


def _decode(path: Path, img: Image.Image, max_pixels: int, max_side: int) -> LoadedImage:
    width, height = img.size
    if width * height > max_pixels:
        raise BadImage(
            path, "decompression_bomb", f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}"
        )
    width, height = displayed_size(img)
    factor = max(width, height) / max_side
    if factor > 1:
        # Both axes shrink by the same factor, so the target is valid before and after rotation.
        img.draft(None, (max(1, int(img.width / factor)), max(1, int(img.height / factor))))
    img.load()
    img = ImageOps.exif_transpose(img)
    if factor > 1:
        target = (max(1, round(width / factor)), max(1, round(height / factor)))
        if img.size != target:
            img = img.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return LoadedImage(_to_rgb(img), width, height)  # animations: PIL opens, and so loads, the first frame


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _SIXTEEN_BIT:
        # Keep the 16-bit range instead of PIL's clip at 255 (which turns most 16-bit images white).
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(wide / 257.0, 0, 255).round().astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).round().astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")
