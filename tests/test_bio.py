import pytest

from gmner.core.bio import Span, orphan_inside, spans, split_tag, tags_from_spans


def test_spans_of_a_bio_sequence():
    tags = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "O", "B-ORG"]
    assert spans(tags) == [Span(0, 2, "PER"), Span(3, 4, "LOC"), Span(4, 6, "LOC"), Span(7, 8, "ORG")]


def test_orphan_inside_opens_a_span_and_is_reported():
    tags = ["I-PER", "I-PER", "O", "B-LOC", "I-ORG"]
    assert orphan_inside(tags) == [0, 4]
    assert spans(tags) == [Span(0, 2, "PER"), Span(3, 4, "LOC"), Span(4, 5, "ORG")]


def test_round_trip_through_tags():
    entity_spans = [(1, 3, "OTHER"), (4, 5, "PER")]
    tags = tags_from_spans(6, entity_spans)
    assert tags == ["O", "B-OTHER", "I-OTHER", "O", "B-PER", "O"]
    assert [tuple(s) for s in spans(tags)] == entity_spans


@pytest.mark.parametrize("bad", ["B", "B-", "X-PER", "per", "", "I_PER"])
def test_split_tag_rejects_non_bio(bad):
    with pytest.raises(ValueError, match="not a BIO tag"):
        split_tag(bad)
