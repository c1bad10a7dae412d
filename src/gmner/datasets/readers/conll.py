"""CoNLL tweets: an ``IMGID:<id>`` header line, one ``token<TAB>tag`` line per word, blank lines between tweets.

Used by Twitter-GMNER (Twitter10000) and the Twitter-2015 / 2017 MNER sets alike. Every problem is located
as ``file:line`` and goes through the policy: ``error`` raises a DataError, ``skip`` drops the smallest unit
(a line, or the tweet when the line's meaning is lost), ``repair`` fixes it in place; both are counted.
The id names the tweet's image and xml files, so it must be one plain file name (``bad_id`` otherwise).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection

from gmner.core import bio
from gmner.core.errors import Policy
from gmner.core.files import TEXT_BYTES, read_input

HEADER = "IMGID:"


@dataclass
class Tweet:
    id: str
    header_line: int  # 1-based line number of the IMGID header
    tokens: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # line number of each token
    dropped: bool = False  # a skipped problem made the whole tweet unusable (already counted)


def read_conll(path: str | Path, policy: Policy, types: Collection[str] | None = None) -> list[Tweet]:
    """Tweets of a CoNLL file in file order; ``types`` are the allowed entity types (None: any)."""
    path = Path(path)
    name = path.as_posix()
    tweets: list[Tweet] = []
    seen: dict[str, int] = {}  # kept tweet id -> header line
    cur: Tweet | None = None

    def close() -> None:
        if cur is None or cur.dropped:
            return
        where = f"{name}:{cur.header_line}"
        if not cur.tokens:
            policy.handle("empty_tweet", where, f"tweet {cur.id} has no tokens")
            return
        if cur.id in seen:
            policy.handle("duplicate_id", where, f"duplicate IMGID {cur.id} (first at line {seen[cur.id]})")
            return
        for i in bio.orphan_inside(cur.tags):
            policy.handle("orphan_inside", f"{name}:{cur.lines[i]}", f"{cur.tags[i]} does not continue an entity")
            cur.tags[i] = "B" + cur.tags[i][1:]
        seen[cur.id] = cur.header_line
        tweets.append(cur)

    raw_lines = read_input(path, TEXT_BYTES).split(b"\n")
    if raw_lines[0].startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark is not part of the first line
        raw_lines[0] = raw_lines[0][3:]
    if not any(raw.strip() for raw in raw_lines):
        policy.handle("empty_file", name, "no tweets: the file is empty or blank")
        return []
    for lineno, raw in enumerate(raw_lines, 1):
        where = f"{name}:{lineno}"
        try:
            line = raw.decode("utf-8")
            bad_bytes = False
        except UnicodeDecodeError as e:
            msg = f"not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})"
            act = policy.handle("bad_encoding", where, msg)
            line, bad_bytes = raw.decode("utf-8", errors="replace"), act == "skip"
        line = line.rstrip("\r\n")
        if not line.strip():
            close()
            cur = None
            continue
        if line.startswith(HEADER):
            close()
            cur = Tweet(line[len(HEADER) :].strip(), lineno, dropped=bad_bytes)
            if not cur.id:
                policy.handle("malformed_line", where, "IMGID header without an id")
                cur.dropped = True
            elif problem := id_problem(cur.id):
                policy.handle("bad_id", where, f"IMGID {cur.id!r} {problem}")
                cur.dropped = True
            continue
        if cur is not None and (cur.dropped or bad_bytes):
            cur.dropped = True  # the whole tweet is skipped (and counted): its other lines need no checks
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip() or cur is None:
            if cur is None:
                problem = "token line outside a tweet (no IMGID header above it)"
            elif len(fields) != 2:
                problem = f"expected token<TAB>tag, got {len(fields)} tab-separated fields: {line!r}"
            else:
                problem = f"empty token: {line!r}"
            policy.handle("malformed_line", where, problem)
            continue
        token, tag = fields
        if token != token.strip() or tag != tag.strip():
            policy.handle("token_whitespace", where, f"whitespace around the token or tag: {line!r}")
            token, tag = token.strip(), tag.strip()
        if not _tag_ok(tag, types):
            allowed = "any type" if types is None else ", ".join(sorted(types))
            if policy.handle("unknown_tag", where, f"unknown tag {tag!r} (BIO over {allowed})") == "skip":
                continue
            tag = "O"
        cur.tokens.append(token)
        cur.tags.append(tag)
        cur.lines.append(lineno)
    close()
    return tweets


def id_problem(image_id: str) -> str | None:
    """Why ``image_id`` cannot name a file in the images folder (a path separator, ``..``, a control
    character), or None."""
    if image_id in (".", ".."):
        return "is a relative folder name"
    if "/" in image_id or "\\" in image_id:
        return "contains a path separator"
    if any(unicodedata.category(c).startswith("C") for c in image_id):  # NUL, ESC, bidi overrides, ...
        return "contains a control character"
    return None


def _tag_ok(tag: str, types: Collection[str] | None) -> bool:
    try:
        _, etype = bio.split_tag(tag)
    except ValueError:
        return False
    return etype is None or types is None or etype in types
