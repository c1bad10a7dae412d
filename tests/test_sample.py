"""The embedded sample dataset: deterministic, well-formed, and posing the task its docstring promises."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from gmner.core.bio import spans
from gmner.datasets import sample
from gmner.datasets.sample import AMBIGUOUS, TYPES, generate, run_stage

SIZES = {"train": 70, "dev": 25, "test": 25}


def read_conll(path: Path) -> list[tuple[str, list[str], list[str]]]:
    """(image id, tokens, tags) per tweet."""
    tweets = []
    for block in path.read_text(encoding="utf-8").split("\n\n"):
        if not block.strip():
            continue
        head, *rows = block.strip("\n").split("\n")
        assert head.startswith("IMGID:"), head
        tokens, tags = zip(*(row.split("\t") for row in rows))
        tweets.append((head[len("IMGID:") :], list(tokens), list(tags)))
    return tweets


def read_xml(path: Path) -> tuple[tuple[int, int], list[tuple[str, tuple[int, int, int, int]]]]:
    root = ET.parse(path).getroot()
    size = (int(root.findtext("size/width")), int(root.findtext("size/height")))
    assert root.findtext("size/depth") == "3"
    objects = [
        (o.findtext("name"), tuple(int(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")))
        for o in root.iter("object")
    ]
    return size, objects


def entities(tokens: list[str], tags: list[str]) -> list[tuple[int, str, str]]:
    """(start, type, text) per entity span, in mention order."""
    return [(s.start, s.type, " ".join(tokens[s.start : s.end])) for s in spans(tags)]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gen") / "sample"
    return out, generate(out, seed=3, sizes=SIZES, image_size=64)


@pytest.fixture(scope="module")
def tweets(data) -> list[tuple[str, list[str], list[str]]]:
    out, _ = data
    return [t for split in SIZES for t in read_conll(out / f"{split}.txt")]


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    small = {"train": 12, "dev": 4, "test": 4}
    a, b, c = (tmp_path / name / "sample" for name in "abc")
    generate(a, seed=5, sizes=small, image_size=64)
    generate(b, seed=5, sizes=small, image_size=64)
    generate(c, seed=6, sizes=small, image_size=64)
    files_a = tree_bytes(a)
    assert len(files_a) > 20 and files_a == tree_bytes(b)
    files_c = tree_bytes(c)
    assert files_c.keys() != files_a.keys()
    assert (a / "train.txt").read_bytes() != (c / "train.txt").read_bytes()


def test_summary_counts_match_the_files(data, tweets):
    out, summary = data
    assert set(summary) == set(SIZES)
    assert all(summary[split]["tweets"] == n for split, n in SIZES.items())
    total = {key: sum(s[key] for s in summary.values()) for key in summary["train"]}
    assert total["images"] == len(list((out / "images").glob("*.jpg")))
    assert total["xml"] == len(list((out / "xml").glob("*.xml")))
    assert total["entities"] == sum(len(entities(tok, tag)) for _, tok, tag in tweets)
    assert total["images"] + total["no_image"] == len(tweets)
    assert total["no_image"] > 0 and total["irrelevant"] > 0
    assert total["boxes"] == sum(len(read_xml(p)[1]) for p in (out / "xml").glob("*.xml"))


def test_ids_are_unique_numeric_and_conll_matches_the_real_layout(data, tweets):
    out, _ = data
    ids = [image_id for image_id, _, _ in tweets]
    assert len(set(ids)) == len(ids) == sum(SIZES.values())
    assert all(i.isdigit() for i in ids)
    text = (out / "train.txt").read_text()
    assert text.startswith("IMGID:") and text.endswith("\n\n")
    for _, tokens, tags in tweets:
        assert all(tok and not any(ch.isspace() for ch in tok) for tok in tokens)
        assert {t.split("-")[-1] for t in tags} <= {"O", *TYPES}
        assert 1 <= len(entities(tokens, tags)) <= 4  # up to three names and a hashtag repeating one


def test_xml_names_are_entity_spans_and_boxes_lie_inside_the_jpeg(data, tweets):
    out, _ = data
    by_id = {image_id: (tokens, tags) for image_id, tokens, tags in tweets}
    xmls = sorted((out / "xml").glob("*.xml"))
    assert xmls
    for path in xmls:
        image_id = path.stem
        texts = {text for _, _, text in entities(*by_id[image_id])}
        (width, height), objects = read_xml(path)
        assert objects
        with Image.open(out / "images" / f"{image_id}.jpg") as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (width, height)
        for name, (x0, y0, x1, y1) in objects:
            assert name in texts, (path.name, name, texts)
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, (path.name, name)
            assert x1 - x0 >= 4 and y1 - y0 >= 4


def test_groundable_fraction_types_and_ambiguous_names(data, tweets):
    out, summary = data
    groundable = total = 0
    types_of = defaultdict(set)
    for image_id, tokens, tags in tweets:
        xml = out / "xml" / f"{image_id}.xml"
        names = {name for name, _ in read_xml(xml)[1]} if xml.exists() else set()
        for _, etype, text in entities(tokens, tags):
            total += 1
            groundable += text in names
            types_of[text].add(etype)
    assert groundable == sum(s["groundable"] for s in summary.values())
    assert 0.4 <= groundable / total <= 0.6
    assert set().union(*types_of.values()) == set(TYPES)
    several = [name for name in AMBIGUOUS if len(types_of.get(name, ())) > 1]
    assert len(several) >= 3, dict(types_of)
    # Pool names keep one type: only the ambiguous names are ambiguous.
    assert all(len(t) == 1 for name, t in types_of.items() if name not in AMBIGUOUS)


def test_drawn_entities_follow_the_documented_rules(data, tweets):
    out, _ = data
    no_xml_images = 0
    for image_id, tokens, tags in tweets:
        xml = out / "xml" / f"{image_id}.xml"
        has_image = (out / "images" / f"{image_id}.jpg").exists()
        if not xml.exists():
            no_xml_images += has_image
            continue
        assert has_image
        boxes = defaultdict(list)
        for name, box in read_xml(xml)[1]:
            boxes[name].append(box)
        mentioned = list(dict.fromkeys((text, etype) for _, etype, text in entities(tokens, tags)))
        drawn = [text for text, _ in mentioned if text in boxes]
        # Left to right in mention order: each drawn entity lies right of the ones named before it.
        for left, right in zip(drawn, drawn[1:]):
            assert max(b[2] for b in boxes[left]) <= min(b[0] for b in boxes[right]), (image_id, left, right)
        # Entities of one type are drawn together (all of them, when an ambiguous name is present).
        groups = defaultdict(set)
        ambiguous = any(text in AMBIGUOUS for text, _ in mentioned)
        for text, etype in mentioned:
            groups["all" if ambiguous else etype].add(text in boxes)
        assert all(len(states) == 1 for states in groups.values()), image_id
    assert no_xml_images > 0  # irrelevant images and scenes with only distractors


def test_replaces_the_folder_as_a_whole_and_a_failed_run_keeps_the_old_one(tmp_path, monkeypatch):
    out = tmp_path / "sample"
    small = {"train": 3, "dev": 1, "test": 1}
    generate(out, seed=1, sizes=small, image_size=64)
    (out / "stray.txt").write_text("from an older run")
    generate(out, seed=1, sizes=small, image_size=64)
    assert not (out / "stray.txt").exists()
    before = tree_bytes(out)

    def boom(image):
        raise RuntimeError("killed")

    monkeypatch.setattr(sample, "_jpeg", boom)
    with pytest.raises(RuntimeError, match="killed"):
        generate(out, seed=2, sizes=small, image_size=64)
    assert tree_bytes(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["sample"]


@pytest.mark.parametrize(
    "kwargs, message",
    [({"image_size": 40}, "at least 64"), ({"sizes": {"train": -1}}, "non-negative")],
)
def test_bad_arguments_fail_clearly(tmp_path, kwargs, message):
    args = {"seed": 0, "sizes": {"train": 2}, "image_size": 64} | kwargs
    with pytest.raises(ValueError, match=message):
        generate(tmp_path / "sample", **args)


@pytest.mark.slow
def test_run_stage_writes_data_sample_and_prints_the_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_stage({"sample": {"seed": 7, "train": 4, "dev": 2, "test": 2, "image_size": 64}})
    printed = json.loads(capsys.readouterr().out)
    assert {split: s["tweets"] for split, s in printed.items()} == {"train": 4, "dev": 2, "test": 2}
    assert len(read_conll(tmp_path / "data" / "sample" / "dev.txt")) == 2
