"""BIO tags <-> entity spans. Spans are word-level, ``end`` exclusive."""

from __future__ import annotations

from typing import NamedTuple, Sequence


class Span(NamedTuple):
    start: int
    end: int
    type: str


def split_tag(tag: str) -> tuple[str, str | None]:
    """``"B-PER"`` -> ``("B", "PER")``, ``"O"`` -> ``("O", None)``; raises ValueError for anything else."""
    if tag == "O":
        return "O", None
    prefix, sep, etype = tag.partition("-")
    if not sep or prefix not in ("B", "I") or not etype:
        raise ValueError(f"not a BIO tag: {tag!r}")
    return prefix, etype


def orphan_inside(tags: Sequence[str]) -> list[int]:
    """Indices of ``I-X`` tags that do not continue an entity of type X."""
    bad, prev = [], None
    for i, tag in enumerate(tags):
        prefix, etype = split_tag(tag)
        if prefix == "I" and prev != etype:
            bad.append(i)
        prev = etype
    return bad


def spans(tags: Sequence[str]) -> list[Span]:
    """Entity spans of a BIO sequence; an orphan ``I-X`` opens a new span, as conlleval does."""
    out: list[Span] = []
    start, cur = None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, etype = split_tag(tag)
        if cur is not None and (prefix != "I" or etype != cur):
            out.append(Span(start, i, cur))
            cur = None
        if prefix == "B" or (prefix == "I" and cur is None):
            start, cur = i, etype
    return out


def tags_from_spans(n: int, entity_spans: Sequence[tuple[int, int, str]]) -> list[str]:
    tags = ["O"] * n
    for start, end, etype in entity_spans:
        tags[start] = f"B-{etype}"
        for i in range(start + 1, end):
            tags[i] = f"I-{etype}"
    return tags
