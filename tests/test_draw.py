"""Prediction pictures: boxes in type colours, the strip of ungrounded entities, bytes, and `predict --draw`."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from gmner.core.errors import DataError
from gmner.draw import STRIP_BACKGROUND, draw_file, draw_predictions, render, type_colour
from gmner.predict import predict_jsonl

ENTITIES = [
    {"text": "Obama", "type": "PER", "box": [20.0, 40.0, 120.0, 180.0]},
    {"text": "Eiffel Tower", "type": "LOC", "box": [150.0, 30.0, 290.0, 190.0]},
    {"text": "Paris", "type": "LOC", "box": None},
]


def grey_image(path, size=(320, 240)):
    Image.new("RGB", size, (128, 128, 128)).save(path)
    return path


def strip_tags(picture: Image.Image, image_height: int, etype: str) -> int:
    """How many tags of ``etype``'s colour the strip holds: top-left corners with background left and above."""
    strip = picture.crop((0, image_height - 1, *picture.size)).load()
    colour, width, height = type_colour(etype), picture.width, picture.height - image_height + 1
    return sum(
        strip[x, y] == colour and strip[x - 1, y] == STRIP_BACKGROUND and strip[x, y - 1] == STRIP_BACKGROUND
        for x in range(1, width) for y in range(1, height)
    )


def test_boxes_in_type_colours_and_a_strip_of_the_ungrounded(tmp_path):
    out = tmp_path / "pics" / "7.png"
    draw_file(grey_image(tmp_path / "in.png"), ENTITIES, out)
    picture = Image.open(out)
    assert picture.width == 320 and picture.height > 240  # the strip lies under the image
    image_part = picture.crop((0, 0, 320, 240))
    on_outlines = [(20, 110, "PER"), (119, 110, "PER"), (70, 179, "PER"), (150, 110, "LOC"), (289, 110, "LOC"),
                   (220, 189, "LOC")]
    for x, y, etype in on_outlines:
        assert image_part.getpixel((x, y)) == type_colour(etype), (x, y)
    assert image_part.getpixel((70, 110)) == (128, 128, 128)  # inside a box: the image, untouched
    assert strip_tags(picture, 240, "LOC") == 1  # Paris
    assert strip_tags(picture, 240, "PER") == 0  # Obama is in the image


def test_labels_stay_inside_the_image_and_boxes_follow_the_scale():
    # A box at the right edge with a long label, drawn on an image loaded at half size.
    entity = {"text": "a very long entity name indeed", "type": "ORG", "box": [500.0, 0.0, 640.0, 100.0]}
    picture = render(Image.new("RGB", (320, 240), (128, 128, 128)), [entity], scale=(0.5, 0.5))
    assert picture.size[0] == 320
    assert picture.getpixel((250, 25)) == type_colour("ORG")  # left edge, at 500 * 0.5
    assert picture.getpixel((319, 0)) == type_colour("ORG")  # the tag is pushed left, not cut off
    assert picture.getpixel((200, 100)) == (128, 128, 128)


def test_a_downscaled_image_gets_its_boxes_mapped(tmp_path):
    big = grey_image(tmp_path / "big.png", (2666, 2000))  # loaded at half size: 1333 x 1000
    draw_file(big, [{"text": "Obama", "type": "PER", "box": [400.0, 600.0, 1000.0, 1800.0]}], tmp_path / "o.png")
    picture = Image.open(tmp_path / "o.png")
    assert picture.width == 1333
    assert picture.getpixel((201, 600)) == type_colour("PER")  # left edge at x = 200
    assert picture.getpixel((400, 600)) == (128, 128, 128)  # where the unmapped edge would be


def test_same_input_same_bytes(tmp_path):
    image = grey_image(tmp_path / "in.png")
    draw_file(image, ENTITIES, tmp_path / "a.png")
    draw_file(image, ENTITIES, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "in.png"]  # no temp file left


def test_exif_rotated_image_is_drawn_upright(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees: 240 x 320
    Image.new("RGB", (320, 240), (128, 128, 128)).save(path, exif=exif)
    draw_file(path, ENTITIES[2:], tmp_path / "r.png")
    assert Image.open(tmp_path / "r.png").width == 240


def test_bad_images_are_counted_and_bad_ids_fail_naming_the_line(tmp_path):
    image = str(grey_image(tmp_path / "in.png"))
    summary = draw_predictions(["a", "b", "c"], [image, None, str(tmp_path / "gone.png")], [ENTITIES] * 3,
                               tmp_path / "out", "in.jsonl")
    assert (summary.drawn, summary.no_image, dict(summary.skipped.counts)) == (1, 1, {"skip:missing_image": 1})
    assert "lines without an image: 1" in str(summary) and "in.jsonl:3" in str(summary)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.png"]
    with pytest.raises(DataError, match="in.jsonl:2: .*cannot name"):
        draw_predictions(["a", "../up"], [image, image], [[], []], tmp_path / "out", "in.jsonl")
    with pytest.raises(DataError, match="in.jsonl:3: .*repeats line 1"):
        draw_predictions([5, 6, 5], [image] * 3, [[]] * 3, tmp_path / "out", "in.jsonl")


def test_predict_jsonl_draws_lines_with_images(every_word_a_person, tmp_path, capsys):
    image = str(grey_image(tmp_path / "in.png"))
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in [
        {"id": "t1", "text": "Obama visits Paris", "image": image},
        {"text": "Obama"},
        {"text": "Paris", "image": image},
    ]))
    assert predict_jsonl(every_word_a_person, src, tmp_path / "out.jsonl", draw_dir=tmp_path / "pics") == 3
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["3.png", "t1.png"]  # line 3 has no id
    picture = Image.open(tmp_path / "pics" / "t1.png")
    assert picture.height > 240
    assert picture.crop((0, 0, 320, 240)).getcolors() == [(320 * 240, (128, 128, 128))]  # no box drawn
    assert strip_tags(picture, 240, "PER") == 3  # every entity is listed as not in the image
    assert strip_tags(Image.open(tmp_path / "pics" / "3.png"), 240, "PER") == 1
    assert "drew 2 pictures" in capsys.readouterr().out
