"""Pascal VOC annotations (one xml per image, one <object> per box) and the checks a box must pass."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from gmner.core.errors import DataError
from gmner.core.files import XML_BYTES, read_input

Box = tuple[float, float, float, float]  # xyxy pixels


@dataclass
class VocObject:
    name: str | None  # the entity surface string (the first <name>); None when absent or empty
    box: Box | None  # the first <bndbox>; None when absent or not numeric
    repeated: tuple[str, ...] = ()  # the tags it has more than once ("name", "bndbox"): which one is meant?


@dataclass
class Voc:
    width: int | None  # None when <size> is absent or zero
    height: int | None
    objects: list[VocObject]


def read_voc(path: str | Path, root: str | Path | None = None) -> Voc:
    """Parse one VOC file (a regular file of at most XML_BYTES, under ``root`` when given); raises DataError
    (file, line and column) when it cannot be read or is not well-formed xml."""
    data = read_input(path, XML_BYTES, root)
    try:
        doc = ET.fromstring(data)
    except ET.ParseError as e:
        line, col = e.position
        raise DataError(f"{Path(path).as_posix()}:{line}", f"xml not parseable (column {col + 1}): {e.msg}") from None
    objects = []
    for obj in doc.iter("object"):
        name = (obj.findtext("name") or "").strip() or None
        bndbox = obj.find("bndbox")
        box = None if bndbox is None else _numbers(bndbox, ("xmin", "ymin", "xmax", "ymax"))
        repeated = tuple(tag for tag in ("name", "bndbox") if len(obj.findall(tag)) > 1)
        objects.append(VocObject(name, box, repeated))
    size = doc.find("size")
    wh = None if size is None else _numbers(size, ("width", "height"))
    width, height = (int(wh[0]), int(wh[1])) if wh and wh[0] > 0 and wh[1] > 0 else (None, None)
    return Voc(width, height, objects)


def _numbers(node: ET.Element, keys: tuple[str, ...]) -> tuple[float, ...] | None:
    try:
        values = tuple(float(node.findtext(k)) for k in keys)
    except (TypeError, ValueError):  # missing child or not a number
        return None
    return values if all(math.isfinite(v) for v in values) else None


def box_problem(box: Box, width: int | None, height: int | None) -> tuple[str, float] | None:
    """What is wrong with ``box`` in an image of that size: ("degenerate", 0) or ("outside", overhang px)."""
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        return "degenerate", 0.0
    over = max(-x1, -y1, x2 - width if width else 0.0, y2 - height if height else 0.0)
    return ("outside", over) if over > 0 else None


def clip_box(box: Box, width: int | None, height: int | None) -> Box:
    x1, y1, x2, y2 = box
    return (max(x1, 0.0), max(y1, 0.0), min(x2, width or math.inf), min(y2, height or math.inf))
