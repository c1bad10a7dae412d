"""Pictures of predictions, for reading a model's output by eye (`gmner predict --draw DIR`).

Each grounded entity's box is drawn on its image in its type's colour, labelled "text (TYPE)" in a filled tag
at the box's corner; the entities the model did not place in the image are listed as tags in a strip under
it. Pictures are drawn on the image as :func:`gmner.core.images.load_image` returns it (EXIF rotation applied,
huge images downscaled), so boxes, which are in original pixels, are mapped by its scale. Same input, same
PNG bytes: PIL's bundled font, no PNG metadata.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from gmner.core.atomic import atomic_path
from gmner.core.errors import DataError, Policy
from gmner.core.images import SKIP_REASONS, BadImage, load_image

Colour = tuple[int, int, int]

# Fixed colours for the Twitter-GMNER types; any other type gets one of EXTRA_COLOURS by a stable hash of its name.
TYPE_COLOURS: dict[str, Colour] = {"PER": (228, 26, 28), "LOC": (55, 126, 184), "ORG": (77, 175, 74),
                                   "OTHER": (255, 127, 0)}
EXTRA_COLOURS: tuple[Colour, ...] = ((152, 78, 163), (166, 86, 40), (247, 129, 191), (23, 190, 207),
                                     (188, 189, 34), (102, 102, 102))
STRIP_BACKGROUND: Colour = (245, 245, 245)
STRIP_TEXT: Colour = (40, 40, 40)
_SAFE_NAME = re.compile(r"\w[\w.-]{0,199}")


def type_colour(etype: str) -> Colour:
    """The colour of an entity type, the same in every picture."""
    if etype in TYPE_COLOURS:
        return TYPE_COLOURS[etype]
    return EXTRA_COLOURS[int(hashlib.sha256(etype.encode()).hexdigest(), 16) % len(EXTRA_COLOURS)]


@dataclass(frozen=True)
class _Style:
    """Sizes that grow with the picture, so labels stay legible on small and large images alike."""

    font: ImageFont.FreeTypeFont
    line_width: int
    pad: int
    tag_height: int

    @classmethod
    def for_size(cls, width: int, height: int) -> _Style:
        size = min(24, max(11, round(max(width, height) / 45)))
        font = ImageFont.load_default(size)
        ascent, descent = font.getmetrics()
        pad = max(2, size // 5)
        return cls(font, max(2, round(max(width, height) / 320)), pad, ascent + descent + 2 * pad)

    def text_width(self, text: str) -> int:
        return round(self.font.getlength(text))

    def tag_width(self, text: str) -> int:
        return self.text_width(text) + 2 * self.pad

    def fit(self, text: str, max_width: int) -> str:
        """``text``, cut with an ellipsis so that its tag is at most ``max_width`` wide."""
        if self.tag_width(text) <= max_width:
            return text
        while text and self.tag_width(text + "…") > max_width:
            text = text[:-1]
        return text + "…"


def render(image: Image.Image, entities: Sequence[dict], scale: tuple[float, float] = (1.0, 1.0)) -> Image.Image:
    """``image`` with the boxes of ``entities`` (dicts with ``text``, ``type`` and ``box``: xyxy in original
    pixels or None) drawn on it, and a strip below listing those without a box. ``scale`` is (sx, sy) with
    ``image`` pixels = original pixels * scale (:attr:`gmner.core.images.LoadedImage.scale`)."""
    width, height = image.size
    style = _Style.for_size(width, height)
    grounded = [e for e in entities if e["box"] is not None]
    ungrounded = [e for e in entities if e["box"] is None]
    strip = _strip_layout(style, width, ungrounded, has_entities=bool(entities))
    strip_height = max(y for _, y, _, _ in strip) + style.tag_height + style.pad
    canvas = Image.new("RGB", (width, height + strip_height), STRIP_BACKGROUND)
    canvas.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    boxes = [_pixel_box(e["box"], scale, width, height) for e in grounded]
    for entity, box in zip(grounded, boxes):  # every outline before any tag, so no outline crosses a tag
        draw.rectangle(box, outline=type_colour(entity["type"]), width=style.line_width)
    placed: list[tuple[int, int, int, int]] = []
    for entity, box in zip(grounded, boxes):
        text = style.fit(_label(entity), width)
        x, y = _tag_position(style, box, style.tag_width(text), width, height, placed)
        placed.append((x, y, x + style.tag_width(text), y + style.tag_height))
        _tag(draw, style, x, y, text, type_colour(entity["type"]))
    for x, y, text, colour in strip:
        if colour is None:  # plain text, on the baseline of the tags beside it
            draw.text((x, height + y + style.pad), text, fill=STRIP_TEXT, font=style.font)
        else:
            _tag(draw, style, x, height + y, text, colour)
    return canvas


def _label(entity: dict) -> str:
    return f"{entity['text']} ({entity['type']})"


def _pixel_box(box: Sequence[float], scale: tuple[float, float], width: int, height: int) -> tuple[int, ...]:
    """An original-pixel xyxy box as inclusive pixel corners on the drawn image, inside it."""
    sx, sy = scale
    x0 = min(max(round(box[0] * sx), 0), width - 1)
    y0 = min(max(round(box[1] * sy), 0), height - 1)
    x1 = min(max(round(box[2] * sx) - 1, x0), width - 1)
    y1 = min(max(round(box[3] * sy) - 1, y0), height - 1)
    return x0, y0, x1, y1


def _tag_position(style: _Style, box: tuple[int, ...], tag_width: int, width: int, height: int,
                  placed: list[tuple[int, int, int, int]]) -> tuple[int, int]:
    """Top-left of a box's tag: on its top-left corner, above the box where there is room, else just inside;
    moved down past tags already placed (entities sharing a region), and always inside the image."""
    x = max(0, min(box[0], width - tag_width))
    first = box[1] - style.tag_height if box[1] >= style.tag_height else box[1]
    lowest = max(0, height - style.tag_height)
    for y in range(min(first, lowest), lowest + 1, style.tag_height):
        if not any(x < r[2] and r[0] < x + tag_width and y < r[3] and r[1] < y + style.tag_height for r in placed):
            return x, y
    return x, min(first, lowest)


def _tag(draw: ImageDraw.ImageDraw, style: _Style, x: int, y: int, text: str, colour: Colour) -> None:
    draw.rectangle((x, y, x + style.tag_width(text) - 1, y + style.tag_height - 1), fill=colour)
    light = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 150
    draw.text((x + style.pad, y + style.pad), text, fill=(0, 0, 0) if light else (255, 255, 255), font=style.font)


def _strip_layout(style: _Style, width: int, ungrounded: Sequence[dict],
                  has_entities: bool) -> list[tuple[int, int, str, Colour | None]]:
    """(x, y, text, tag colour or None for plain text) of the strip's items, y being the top of the item's
    line in the strip: a prefix, then a tag per entity, flowed into lines ``width`` wide."""
    if not has_entities:
        return [(style.pad, style.pad, "no entities found", None)]
    prefix = "not in image:" if ungrounded else "not in image: none"
    items: list[tuple[int, int, str, Colour | None]] = [(style.pad, style.pad, prefix, None)]
    end, y = style.pad + style.text_width(prefix), style.pad  # end: right edge of the line's last item
    for entity in ungrounded:
        text = style.fit(_label(entity), width - 2 * style.pad)
        tag_width = style.tag_width(text)
        if end + style.pad + tag_width > width - style.pad:
            end, y = 0, y + style.tag_height + style.pad
        items.append((end + style.pad, y, text, type_colour(entity["type"])))
        end += style.pad + tag_width
    return items


def draw_file(image_path: str | Path, entities: Sequence[dict], out_path: str | Path) -> None:
    """Render ``entities`` on the image at ``image_path`` into the PNG ``out_path`` (atomically); raise
    :class:`gmner.core.images.BadImage` when the image cannot be loaded."""
    loaded = load_image(image_path)
    picture = render(loaded.image, entities, loaded.scale)
    with atomic_path(out_path) as tmp:
        picture.save(tmp, format="PNG")


def png_names(ids: Sequence[str | int], images: Sequence[str | None], where: str) -> list[str | None]:
    """The PNG file name of each line with an image (None for the others); an id that cannot name a file in
    one folder, or names the same file as an earlier line, raises DataError at ``where:line``."""
    names: list[str | None] = []
    first_line: dict[str, int] = {}
    for line, (item_id, image) in enumerate(zip(ids, images), start=1):
        if image is None:
            names.append(None)
            continue
        if not _SAFE_NAME.fullmatch(str(item_id)):
            raise DataError(f"{where}:{line}", f"id {item_id!r} cannot name a picture file: "
                            "use letters, digits, '.', '_' and '-' (at most 200, not starting with '.' or '-')")
        name = f"{item_id}.png"
        if name in first_line:
            raise DataError(f"{where}:{line}", f"id {item_id!r} repeats line {first_line[name]}'s, so its "
                            "picture would overwrite that one")
        first_line[name] = line
        names.append(name)
    return names


@dataclass
class DrawSummary:
    """What :func:`draw_predictions` did: pictures drawn, lines without an image, images it could not load."""

    out_dir: Path
    drawn: int = 0
    no_image: int = 0
    skipped: Policy = field(default_factory=lambda: Policy({reason: "skip" for reason in SKIP_REASONS}))

    def __str__(self) -> str:
        text = f"drew {self.drawn} pictures in {self.out_dir}; lines without an image: {self.no_image}"
        for reason, count in sorted(self.skipped.counts.items()):
            text += f"; {reason}: {count} (first: {self.skipped.examples[reason]})"
        return text


def draw_predictions(ids: Sequence[str | int], images: Sequence[str | None], entities: Sequence[Sequence[dict]],
                     out_dir: str | Path, where: str) -> DrawSummary:
    """Write ``out_dir/<id>.png`` for every line of ``where`` that has an image: ``ids``, ``images`` (paths or
    None) and ``entities`` are per line, in order. An image that cannot be loaded is a counted skip."""
    names = png_names(ids, images, where)
    summary = DrawSummary(Path(out_dir))
    for line, (name, image, found) in enumerate(zip(names, images, entities), start=1):
        if name is None:
            summary.no_image += 1
            continue
        try:
            draw_file(image, found, summary.out_dir / name)
        except BadImage as err:
            summary.skipped.handle(err.kind, f"{where}:{line}", str(err))
            continue
        summary.drawn += 1
    return summary
