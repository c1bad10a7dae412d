"""prepare on the real Twitter10000 v2 annotations beside the repo (skipped when ../shared is absent)."""

from __future__ import annotations

import pytest

from gmner.datasets.prepare import prepare_configured_split

from helpers import REPO, repo_params

DATA = REPO.parent / "shared" / "data" / "twitter10000_v2"

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not found at {DATA}")


@pytest.mark.parametrize(
    ("split", "tweets", "entities", "groundable"), [("train", 7000, 11779, 4733), ("dev", 1500, 2450, 991)]
)
def test_default_policy_counts(split, tweets, entities, groundable):
    cfg = repo_params()["prepare"]
    table, summary = prepare_configured_split(cfg, DATA, split)
    assert (summary["tweets"], summary["entities"], summary["groundable_entities"]) == (tweets, entities, groundable)
    assert table.num_rows == tweets
    # The images are not distributed with the annotations: every tweet is text-only and counted as such.
    assert summary["text_only_tweets"] == tweets
    assert summary["policy"]["counts"] == {"skip:missing_image": tweets}
