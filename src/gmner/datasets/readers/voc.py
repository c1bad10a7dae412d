"""Pascal VOC annotations (one xml per image, one <object> per box) and the checks a box must pass."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from gmner.core.errors import DataError

Box = tuple[float, float, float, float]  # xyxy pixels


@dataclass
class VocObject:
    name: str | None  # the entity surface string; None when <name> is absent or empty
    box: Box | None  # None when <bndbox> is absent or not numeric


@dataclass
class Voc:
    width: int | None  # None when <size> is absent or zero
    height: int | None
    objects: list[VocObject]


def read_voc(path: str | Path) -> Voc:
    """Parse one VOC file; raises DataError (file, line and column) when it is not well-formed xml."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        line, col = e.position
        raise DataError(f"{Path(path).as_posix()}:{line}", f"xml not parseable (column {col + 1}): {e.msg}") from None
    objects = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip() or None
        bndbox = obj.find("bndbox")
        box = None if bndbox is None else _numbers(bndbox, ("xmin", "ymin", "xmax", "ymax"))
        objects.append(VocObject(name, box))
    size = root.find("size")
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
