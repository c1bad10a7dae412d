"""Fixtures shared by the test modules; plain helpers (tiny configs and tables, pipeline runs) are in helpers.py."""

import pytest
import torch

from gmner.models.tagger import CRFTagger
from gmner.models.text_encoder import load_text_encoder

from helpers import TINY

# Tiny models gain nothing from intra-op threads; with pytest -n 2 on two cores, more threads only oversubscribe.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def every_word_a_person(tmp_path_factory):
    """A saved tagger rigged to tag every word B-PER, so the expected output is known exactly."""
    torch.manual_seed(0)
    encoder, tokenizer = load_text_encoder("tiny", TINY, "Obama visits Paris today Obama Paris".split())
    tagger = CRFTagger(encoder, tokenizer, ["O", "B-PER", "I-PER"])
    with torch.no_grad():
        tagger.classifier.weight.zero_()
        tagger.classifier.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))
        tagger.crf.transitions.zero_()
    model_dir = tmp_path_factory.mktemp("model")
    tagger.save(model_dir)
    return model_dir
