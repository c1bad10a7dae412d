"""Robust image loading for the vision stages: any file a tweet points at becomes an RGB image or a typed skip.

Every failure raises :class:`BadImage`, whose ``kind`` is one of :data:`SKIP_REASONS`; stages pass it to their
``gmner.core.errors.Policy`` so each kind is either an error or a counted skip. What loads is normalised:
EXIF orientation applied, transparency composited on white, CMYK / grayscale / 16-bit converted to 8-bit RGB,
the first frame of an animation. Huge images are decoded downscaled (JPEG DCT scaling through ``draft``, then
a resize), so memory stays bounded by ``max_pixels`` for other formats and far below it for JPEG; the
returned :class:`LoadedImage` maps boxes found on the smaller image back to original pixels.

Files are read once, through :func:`gmner.core.files.read_input`: only regular files of at most
:data:`gmner.core.files.IMAGE_BYTES` (a FIFO, a device or a directory is ``not_an_image``, a bigger file a
``decompression_bomb``), and what is decoded or measured are those bytes, whose sha256 comes with the result.

Original pixels means the image as displayed, i.e. after EXIF rotation: sizes and boxes are in that frame.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from gmner.core.errors import DataError
from gmner.core.files import IMAGE_BYTES, Refused, read_input

SKIP_REASONS = ("missing_image", "empty_image", "not_an_image", "corrupt_image", "decompression_bomb")

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ROTATING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_EXIF_ORIENTATION = 0x0112
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the transpose that displays the image
_REFUSED_KIND = {"missing": "missing_image", "not_regular": "not_an_image", "too_large": "decompression_bomb",
                 "outside": "not_an_image"}  # gmner.core.files refusals as image skip reasons


class BadImage(DataError):
    """An image that cannot be used; ``kind`` (one of SKIP_REASONS) is the policy reason."""

    def __init__(self, path: str | Path, kind: str, message: str):
        super().__init__(str(path), message)
        self.kind = kind


@dataclass(frozen=True)
class LoadedImage:
    """``image`` is RGB, at most ``max_side`` on its long side; ``width``/``height`` are the original size;
    ``sha256`` is that of the bytes decoded."""

    image: Image.Image
    width: int
    height: int
    sha256: str

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
    data = _read(path)
    with _opened(path, data) as img:
        try:
            return _decode(path, img, hashlib.sha256(data).hexdigest(), max_pixels, max_side)
        except BadImage:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            # PIL reports truncated or damaged pixel data through these at decode time.
            raise BadImage(path, "corrupt_image", f"cannot decode image: {exc}") from None


def read_image_info(path: str | Path, root: str | Path | None = None) -> tuple[str, int, int]:
    """(sha256 of the bytes, width, height as displayed) from the header alone, decoding no pixels; with
    ``root``, the file must resolve under it (``not_an_image`` otherwise). Raises :class:`BadImage`."""
    data = _read(path, root)
    with _opened(path, data) as img:
        try:
            return hashlib.sha256(data).hexdigest(), *displayed_size(img)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:  # a damaged EXIF block
            raise BadImage(path, "corrupt_image", f"cannot read image header: {exc}") from None


def image_info(path: str | Path) -> tuple[str, int, int] | None:
    """:func:`read_image_info`, or None when the file is absent or not an image PIL can read."""
    try:
        return read_image_info(path)
    except BadImage:
        return None


def displayed_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after EXIF rotation, from the header alone: the frame boxes live in."""
    width, height = img.size
    if _orientation(img) in _ROTATING_ORIENTATIONS:
        return height, width
    return width, height


def _orientation(img: Image.Image) -> int:
    # PIL's PngImageFile.getexif() decodes the whole image to look for an eXIf chunk after the pixels (a
    # 420 KB PNG cost 584 MB); the header's eXIf chunk, when there is one, is what both readers here use.
    if img.format == "PNG":
        if "exif" not in img.info:
            return 1
        exif = Image.Exif()
        exif.load(img.info["exif"])
    else:
        exif = img.getexif()
    return exif.get(_EXIF_ORIENTATION, 1)


def _read(path: str | Path, root: str | Path | None = None) -> bytes:
    try:
        data = read_input(path, IMAGE_BYTES, root)
    except Refused as exc:
        raise BadImage(path, _REFUSED_KIND[exc.kind], f"image file: {exc.reason}") from None
    if not data:
        raise BadImage(path, "empty_image", "image file is empty (0 bytes)")
    return data


def _opened(path: str | Path, data: bytes) -> Image.Image:
    """``data`` opened lazily by PIL (header parsed, no pixel decoded); PIL's refusals as BadImage kinds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise BadImage(path, "not_an_image", "not a readable image format") from None
        except Image.DecompressionBombError as exc:
            raise BadImage(path, "decompression_bomb", str(exc)) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise BadImage(path, "corrupt_image", f"cannot read image header: {exc}") from None


def _decode(path: str | Path, img: Image.Image, sha256: str, max_pixels: int, max_side: int) -> LoadedImage:
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
    orientation = _orientation(img)
    img.load()
    if orientation in _TRANSPOSE:  # as ImageOps.exif_transpose, from the orientation measured above
        img = img.transpose(_TRANSPOSE[orientation])
    if factor > 1:
        target = (max(1, round(width / factor)), max(1, round(height / factor)))
        if img.size != target:
            img = img.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return LoadedImage(_to_rgb(img), width, height, sha256)  # animations: PIL opens, and so loads, the first frame


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
