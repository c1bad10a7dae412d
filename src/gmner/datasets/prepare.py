"""The prepare stage: a dataset folder -> ``data/prepared/<split>.parquet`` (schema.TWEETS) + ``summary.json``.

Formats:
- ``twitter-gmner``: CoNLL splits + one Pascal VOC xml per image (Twitter10000, the embedded sample).
  An xml <object>'s <name> is an entity surface string (words joined by single spaces, exact and
  case-sensitive); every entity of the tweet with that text gets the object's box. An entity without
  a matching object is ungroundable (empty ``boxes``).
- ``conll-mner``: Twitter-2015 / 2017 CoNLL splits and images, no boxes.

Paths are kept as the caller spells them (relative paths from params stay relative) so the output is
byte-identical across clones; rows keep file order. Every file read is a bounded read of a regular file
(:mod:`gmner.core.files`), and an image or xml file must resolve (links followed) inside ``images_dir`` /
``xml_dir``: anything else is ``bad_image`` / ``bad_xml`` with the reason.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Collection, Mapping

import pyarrow as pa

from gmner.core import bio
from gmner.core.atomic import write_json, write_parquet
from gmner.core.errors import DataError, Policy, checked_actions
from gmner.core.images import BadImage, read_image_info
from gmner.core.params import check_keys
from gmner.core.schema import TWEETS
from gmner.datasets.readers import box_problem, clip_box, read_conll, read_voc

PARAMS = (  # the keys of the `prepare` params group
    "format", "files", "images_dir", "xml_dir", "image_ext", "types", "box_tolerance", "policy",
)

FORMATS = ("twitter-gmner", "conll-mner")

# Policy reason -> the actions it allows (see params.yaml `prepare.policy`); a reason the caller leaves out is "error".
REASONS = {
    "empty_file": ("error", "skip"),  # the split's CoNLL file is empty or blank; skip: its table is empty
    "malformed_line": ("error", "skip"),  # skip: drop the line
    "bad_id": ("error", "skip"),  # IMGID that is no plain file name (separator, "..", control character)
    "token_whitespace": ("error", "repair"),  # repair: strip the spaces around a token or tag
    "unknown_tag": ("error", "skip", "repair"),  # skip: drop the token line; repair: tag it O
    "orphan_inside": ("error", "repair"),  # repair: I-X -> B-X
    "empty_tweet": ("error", "skip"),
    "duplicate_id": ("error", "skip"),  # skip: keep the first occurrence
    "bad_encoding": ("error", "skip", "repair"),  # skip: drop the tweet; repair: U+FFFD for the bad bytes
    "bad_xml": ("error", "skip"),  # skip: the tweet's entities become ungroundable
    "name_not_in_tweet": ("error", "skip"),  # skip: drop that xml object
    "ambiguous_object": ("error", "skip"),  # an xml object with two <name> or two <bndbox>; skip: drop it
    "xml_size_mismatch": ("error", "skip", "repair"),  # skip: drop the xml's boxes; repair: scale them
    "bad_box": ("error", "skip"),  # skip: drop that box
    "box_overhang": ("error", "skip", "repair"),  # within box_tolerance px of the image; repair: clip to it
    "missing_image": ("error", "skip"),  # skip: the tweet stays, text-only (null image_sha256)
    "bad_image": ("error", "skip"),  # file present but not a readable image: as missing_image
    "missing_file": ("error", "skip"),  # skip: the split's CoNLL file is absent, its table is empty
}


def make_policy(actions: Mapping[str, str] | None) -> Policy:
    """A Policy over REASONS; unknown reasons or actions a reason does not allow raise ValueError."""
    return Policy(checked_actions(actions, REASONS, "prepare.policy"))


def prepare_split(
    text_path: str | os.PathLike,
    *,
    split: str,
    images_dir: str | os.PathLike,
    image_ext: str = ".jpg",
    xml_dir: str | os.PathLike | None = None,
    types: Collection[str] | None = None,
    policy: Mapping[str, str] | None = None,
    box_tolerance: float = 2.0,
) -> tuple[pa.Table, dict]:
    """Read one split into a TWEETS table and its summary.

    ``xml_dir`` None means no boxes (conll-mner); ``types`` empty or None reads the types from the data;
    ``policy`` maps REASONS to actions; boxes past the image edge by at most ``box_tolerance`` pixels
    are ``box_overhang`` (clipped under ``repair``), further out ``bad_box``.
    """
    text_path = Path(text_path)
    pol = make_policy(policy)
    allowed = set(types) if types else None
    if os.path.lexists(text_path):
        tweets = read_conll(text_path, pol, allowed)
    else:
        pol.handle("missing_file", text_path.as_posix(), f"no {split} file")
        tweets = []
    images_dir = Path(images_dir)
    images = _listing(images_dir)
    xmls = _listing(xml_dir) if xml_dir is not None else set()
    rows = []
    for tweet in tweets:
        image_path = images_dir / f"{tweet.id}{image_ext}"
        sha, width, height = _image_fields(image_path, images_dir, image_path.name in images, tweet.id, pol)
        spans = bio.spans(tweet.tags)
        texts = [" ".join(tweet.tokens[s.start : s.end]) for s in spans]
        boxes: dict[str, list] = {}
        if f"{tweet.id}.xml" in xmls:
            xml_path = Path(xml_dir, f"{tweet.id}.xml")
            boxes, width, height = _voc_boxes(xml_path, xml_dir, set(texts), width, height, pol, box_tolerance)
        rows.append(
            {
                "tweet_id": tweet.id,
                "split": split,
                "source": f"{text_path.as_posix()}:{tweet.header_line}",
                "image_id": tweet.id,
                "image_path": image_path.as_posix(),
                "image_sha256": sha,
                "width": width,
                "height": height,
                "tokens": tweet.tokens,
                "tags": tweet.tags,
                "entities": [
                    {"start": s.start, "end": s.end, "type": s.type, "text": text, "boxes": boxes.get(text, [])}
                    for s, text in zip(spans, texts)
                ],
            }
        )
    return pa.Table.from_pylist(rows, schema=TWEETS), _summary(text_path, rows, pol)


def prepare_configured_split(cfg: Mapping, data_root: Path, split: str) -> tuple[pa.Table, dict]:
    """:func:`prepare_split` of ``split`` as the ``prepare`` params group describes it, under ``data_root``."""
    return prepare_split(
        data_root / cfg["files"][split],
        split=split,
        images_dir=data_root / cfg["images_dir"],
        image_ext=cfg["image_ext"],
        xml_dir=data_root / cfg["xml_dir"] if cfg["format"] == "twitter-gmner" else None,
        types=cfg["types"],
        policy=cfg["policy"],
        box_tolerance=cfg["box_tolerance"],
    )


def run_stage(params: dict, out_dir: str | os.PathLike = "data/prepared") -> None:
    """Prepare every split named in ``params["prepare"]["files"]`` under ``base.data_root``."""
    cfg, root = params["prepare"], Path(params["base"]["data_root"])
    check_keys("prepare", cfg, PARAMS)
    if cfg["format"] not in FORMATS:
        raise ValueError(f"prepare.format: {cfg['format']!r} is not one of {', '.join(FORMATS)}")
    if not root.is_dir():
        raise FileNotFoundError(f"base.data_root: no folder {root.as_posix()}")
    out_dir = Path(out_dir)
    summary = {"format": cfg["format"], "data_root": root.as_posix(), "splits": {}}
    for split in cfg["files"]:
        table, stats = prepare_configured_split(cfg, root, split)
        write_parquet(out_dir / f"{split}.parquet", table)
        summary["splits"][split] = stats
        print(
            f"prepare {split}: {stats['tweets']} tweets, {stats['entities']} entities "
            f"({stats['groundable_entities']} groundable), {stats['text_only_tweets']} text-only"
        )
    write_json(out_dir / "summary.json", summary)


def _listing(folder: str | os.PathLike) -> set[str]:
    # One directory read instead of a stat per tweet; an absent folder has no files.
    try:
        return set(os.listdir(folder))
    except FileNotFoundError:
        return set()


def _image_fields(path: Path, folder: Path, present: bool, tweet_id: str,
                  pol: Policy) -> tuple[str | None, int | None, int | None]:
    """(sha256, width, height) of the tweet's image; all None when it is missing or unreadable."""
    if not present:
        pol.handle("missing_image", path.as_posix(), f"tweet {tweet_id}: no image file")
        return None, None, None
    try:
        return read_image_info(path, root=folder)
    except BadImage as exc:
        reason = "missing_image" if exc.kind == "missing_image" else "bad_image"
        pol.handle(reason, path.as_posix(), f"tweet {tweet_id}: {exc.reason}")
        return None, None, None


def _voc_boxes(
    path: Path, folder: Path, texts: set[str], width: int | None, height: int | None, pol: Policy, tolerance: float
) -> tuple[dict[str, list], int | None, int | None]:
    """Checked boxes of the xml's objects grouped by entity text, and the image size to use.

    The xml's <size> (the frame its boxes were drawn in) is the image size when the image has none; when both
    are known and differ that is ``xml_size_mismatch`` (repair: boxes scaled to the image). A bad object or
    box is dropped alone; an unreadable file under ``skip`` leaves every entity ungroundable.
    """
    try:
        voc = read_voc(path, root=folder)
    except DataError as e:
        pol.handle("bad_xml", e.where, e.reason)
        return {}, width, height
    scale = (1.0, 1.0)
    if voc.width is not None and width is not None and (voc.width, voc.height) != (width, height):
        msg = f"<size> {voc.width}x{voc.height} but the image is {width}x{height}"
        if pol.handle("xml_size_mismatch", path.as_posix(), msg) == "skip":
            return {}, width, height
        scale = (width / voc.width, height / voc.height)
    elif voc.width is not None:
        width, height = voc.width, voc.height
    out: dict[str, list] = {}
    for k, obj in enumerate(voc.objects, 1):
        at = f"{path.as_posix()}: object {k}"
        if obj.repeated:
            tags = " and ".join(f"<{tag}>" for tag in obj.repeated)
            pol.handle("ambiguous_object", at, f"more than one {tags}: which one is meant is unknown")
            continue
        if obj.name not in texts:
            pol.handle("name_not_in_tweet", at, f"<name> {obj.name!r} is no entity of the tweet")
            continue
        if obj.box is None:
            pol.handle("bad_box", at, f"{obj.name!r}: <bndbox> missing or not numeric")
            continue
        x1, y1, x2, y2 = obj.box
        box = (x1 * scale[0], y1 * scale[1], x2 * scale[0], y2 * scale[1])
        problem = box_problem(box, width, height)
        if problem and problem[0] == "outside" and problem[1] <= tolerance:
            msg = f"{obj.name!r}: box {list(box)} passes the {width}x{height} image by {problem[1]:g} px"
            if pol.handle("box_overhang", at, msg) == "skip":
                continue
            box = clip_box(box, width, height)
            problem = box_problem(box, width, height)
        if problem:
            kind = "degenerate" if problem[0] == "degenerate" else f"outside the {width}x{height} image"
            pol.handle("bad_box", at, f"{obj.name!r}: box {list(box)} is {kind}")
            continue
        out.setdefault(obj.name, []).append(list(box))
    return out, width, height


def _summary(text_path: Path, rows: list[dict], pol: Policy) -> dict:
    entities = [e for row in rows for e in row["entities"]]
    # Every kept box belongs to exactly one entity text; repeated names share it, so count per distinct text.
    boxes = sum(len(bs) for row in rows for bs in {e["text"]: e["boxes"] for e in row["entities"]}.values())
    return {
        "file": text_path.as_posix(),
        "tweets": len(rows),
        "entities": len(entities),
        "groundable_entities": sum(bool(e["boxes"]) for e in entities),
        "boxes": boxes,
        "text_only_tweets": sum(row["image_sha256"] is None for row in rows),
        "entity_types": dict(sorted(Counter(e["type"] for e in entities).items())),
        "policy": pol.report(),
    }
