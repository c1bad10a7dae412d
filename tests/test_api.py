"""The Python API: gmner.load(path).predict(texts_or_tokens, images) and its typed results."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys

import pytest
from PIL import Image

import gmner
from gmner.api import Entity, Prediction

from helpers import REPO


def test_import_gmner_stays_cheap():
    code = "import sys, gmner; assert 'torch' not in sys.modules; gmner.load; assert 'gmner.api' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_predicts_typed_entities_with_word_and_character_spans(every_word_a_person, tmp_path):
    model = gmner.load(every_word_a_person, cache=tmp_path / "cache")
    [tweet] = model.predict("Obama  visits Paris")
    assert isinstance(tweet, Prediction) and tweet.tokens == ("Obama", "visits", "Paris")
    assert tweet.entities[2] == Entity("Paris", "PER", 2, 3, 13, 18)
    assert [tweet.text[e.char_start : e.char_end] for e in tweet.entities] == ["Obama", "visits", "Paris"]
    assert tweet.image_sha256 is None and all(e.box is None and e.score is None for e in tweet.entities)


def test_predict_takes_texts_tokens_and_images_as_paths_bytes_or_pil(every_word_a_person, tmp_path):
    picture = Image.new("RGB", (12, 8), (200, 10, 10))
    picture.save(tmp_path / "p.png")
    model = gmner.load(every_word_a_person, cache=tmp_path / "cache")
    out = model.predict(["Obama visits", ["Paris"], ["Obama", "Paris"]],
                        images=[str(tmp_path / "p.png"), (tmp_path / "p.png").read_bytes(), picture])
    assert [[e.text for e in t.entities] for t in out] == [["Obama", "visits"], ["Paris"], ["Obama", "Paris"]]
    assert len(list((tmp_path / "cache" / "inputs").iterdir())) == 1  # bytes and the PIL image: one PNG, stored once
    with pytest.raises(ValueError, match="2 images for 1 tweets"):
        model.predict(["Obama"], images=[None, None])


def test_an_unusable_image_is_a_warning_and_its_tweet_is_text_only(every_word_a_person, tmp_path, caplog):
    [tweet] = gmner.load(every_word_a_person, cache=tmp_path / "cache").predict(["Obama"], [b"not an image"])
    assert [e.text for e in tweet.entities] == ["Obama"]
    assert any("predicted text-only" in r.getMessage() for r in caplog.records)


def test_the_readme_example_prints_what_the_readme_says():
    """The README's Python API block, run in the repository on the pipeline's model (dvc repro's)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    expected = re.search(r"prints:\n\n```\n(.*?)```", section, re.S).group(1)
    if not (REPO / "models" / "grounded" / "model.json").is_file():
        pytest.skip("models/grounded not trained here (dvc repro)")
    out = io.StringIO()
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert out.getvalue() == expected
