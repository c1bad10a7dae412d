"""Region inputs of grounding models: soft labels from IoU, geometry, padding and masks, missing features."""

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch

from gmner.core.errors import DataError
from gmner.models.losses import grounding_loss, soft_labels
from gmner.models.visual_store import (
    NO_IMAGE,
    NONE,
    ImageVisual,
    VisualStore,
    collate_visual,
    feature_statistics,
    geometry,
)

GOLD = np.array([[0, 0, 10, 10]], np.float32)
# IoU with GOLD: 1.0, 0.64 (8x8 inside it), 0.25 (5x5 inside it), 0 (disjoint)
CANDIDATES = np.array([[0, 0, 10, 10], [0, 0, 8, 8], [0, 0, 5, 5], [20, 20, 30, 30]], np.float32)


def test_soft_labels_are_iou_weighted_above_the_threshold():
    target = soft_labels(CANDIDATES, GOLD, np.ones(4, bool), threshold=0.5)
    assert target.shape == (5,)
    np.testing.assert_allclose(target, [0, 1 / 1.64, 0.64 / 1.64, 0, 0], rtol=1e-6)
    lower = soft_labels(CANDIDATES, GOLD, np.ones(4, bool), threshold=0.2)
    np.testing.assert_allclose(lower, [0, 1 / 1.89, 0.64 / 1.89, 0.25 / 1.89, 0], rtol=1e-6)


def test_soft_labels_put_everything_on_none_when_nothing_usable_covers_the_entity():
    valid = np.ones(4, bool)
    np.testing.assert_array_equal(soft_labels(CANDIDATES, np.zeros((0, 4)), valid, 0.5), [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(soft_labels(CANDIDATES[1:], GOLD, valid[1:], 0.7), [1, 0, 0, 0])  # best 0.64
    # Masked candidates get no mass, even the perfect one.
    masked = soft_labels(CANDIDATES, GOLD, np.array([False, True, True, True]), 0.5)
    np.testing.assert_array_equal(masked, [0, 0, 1, 0, 0])
    np.testing.assert_array_equal(soft_labels(CANDIDATES, GOLD, np.zeros(4, bool), 0.5), [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(soft_labels(np.zeros((0, 4)), GOLD, np.zeros(0, bool), 0.5), [1])


def test_soft_labels_take_the_best_of_several_gold_boxes():
    gold = np.array([[20, 20, 30, 30], [0, 0, 8, 8]], np.float32)
    target = soft_labels(CANDIDATES, gold, np.ones(4, bool), 0.5)
    np.testing.assert_allclose(target, [0, 0.64 / 2.64, 1 / 2.64, 0, 1 / 2.64], rtol=1e-6)


def test_geometry_is_normalised_by_the_image_size():
    np.testing.assert_allclose(geometry([[10, 20, 30, 60]], 100, 200), [[0.1, 0.1, 0.3, 0.3, 0.04]], rtol=1e-6)
    assert geometry(np.zeros((0, 4)), 10, 10).shape == (0, 5)


def _visual(k: int, dim: int = 3, features: bool = True, image: bool = True) -> ImageVisual:
    boxes = np.tile(np.array([[0, 0, 5, 5]], np.float32), (k, 1))
    return ImageVisual(
        boxes,
        np.full((k, dim), 2.0, np.float32) if features else None,
        np.full(dim, 3.0, np.float32) if image else None,
        10,
        10,
    )


def test_collate_pads_and_masks_missing_features_instead_of_zero_filling_them():
    items = [_visual(3), NO_IMAGE, _visual(2, features=False), _visual(1, image=False)]
    batch = collate_visual(items, dim=3)
    assert batch["region_features"].shape == (4, 3, 3)
    assert batch["region_geometry"].shape == (4, 3, 5)
    assert batch["region_rank"].tolist() == [[0, 1, 2]] * 4
    assert batch["region_mask"].tolist() == [
        [True, True, True],
        [False, False, False],  # no image
        [False, False, False],  # candidates whose features are missing: masked, not zeros taken as real
        [True, False, False],  # padding
    ]
    assert batch["image_mask"].tolist() == [True, False, True, False]
    assert torch.equal(batch["region_features"][0], torch.full((3, 3), 2.0))
    np.testing.assert_allclose(batch["region_geometry"][0, 0].numpy(), [0, 0, 0.5, 0.5, 0.25])


def test_collate_of_images_without_any_candidate_has_zero_slots():
    batch = collate_visual([NO_IMAGE, _visual(0)], dim=3)
    assert batch["region_features"].shape == (2, 0, 3)
    assert batch["region_mask"].shape == (2, 0)
    assert batch["image_mask"].tolist() == [False, True]


def _tables(dim: int = 2):
    vec = pa.list_(pa.float32(), dim)
    regions = pa.table({
        "image_sha256": ["a", "b", "c", "d"],
        "boxes": pa.array([[[0, 0, 4, 4], [1, 1, 3, 3], [0, 0, 2, 2]], [[0, 0, 1, 1]], [], [[0, 0, 1, 1]]],
                          pa.list_(pa.list_(pa.float32(), 4))),
    })
    region_features = pa.table({
        "image_sha256": ["a", "b", "c", "d"],
        "embeddings": pa.array([[[1, 2], [3, 4], [5, 6]], None, [], [[7, 8]]], pa.list_(vec)),
        "skip_reason": [None, "corrupt_image", None, None],
    })
    image_features = pa.table({
        "image_sha256": ["a", "b", "c"],
        "embedding": pa.array([[1, 1], None, [2, 2]], vec),
        "skip_reason": [None, "corrupt_image", None],
    })
    return regions, region_features, image_features


def test_store_masks_and_counts_what_is_missing():
    store = VisualStore(*_tables(), top_k=2)
    counts = Counter()
    a = store.lookup("a", 8, 8, counts)
    assert a.boxes.shape == (2, 4) and a.embeddings.tolist() == [[1, 2], [3, 4]]  # cut to top_k
    assert a.image.tolist() == [1, 1] and a.valid.tolist() == [True, True]
    b = store.lookup("b", 8, 8, counts)  # skipped image: null features
    assert b.embeddings is None and b.image is None and b.valid.tolist() == [False]
    c = store.lookup("c", 8, 8, counts)  # no candidates
    assert len(c.boxes) == 0 and c.image.tolist() == [2, 2]
    assert store.lookup(None, None, None, counts) is NO_IMAGE
    unknown = store.lookup("z", 8, 8, counts)
    assert len(unknown.boxes) == 0 and unknown.image is None
    assert counts == Counter(tweets=5, only_none=4, region_features_missing=1, image_feature_missing=2,
                             no_candidates=1, no_image=1, not_in_regions=1)
    assert store.dim == 2
    np.testing.assert_array_equal(store.candidates("a"), [[0, 0, 4, 4], [1, 1, 3, 3]])


def test_store_refuses_features_that_do_not_match_the_candidates():
    regions, region_features, image_features = _tables()
    stale = region_features.set_column(
        1, "embeddings", pa.array([[[1, 2]], None, [], [[7, 8]]], pa.list_(pa.list_(pa.float32(), 2)))
    )
    store = VisualStore(regions, stale, image_features, top_k=4)
    with pytest.raises(DataError, match="image a.*1 embeddings for 3 candidates"):
        store.lookup("a", 8, 8, Counter())
    with pytest.raises(DataError, match="image a: appears twice"):
        VisualStore(pa.concat_tables([regions, regions.slice(0, 1)]), region_features, image_features, 4)


def test_feature_statistics_leave_missing_features_out():
    stats = feature_statistics([_visual(2), NO_IMAGE, _visual(3, features=False, image=False)], dim=3)
    np.testing.assert_array_equal(stats["region_mean"], [2, 2, 2])
    np.testing.assert_array_equal(stats["image_std"], [1, 1, 1])  # a single image: no spread to estimate
    assert stats["region_std"].min() > 0


def test_grounding_losses_stay_finite_with_masked_options():
    very_negative = torch.finfo(torch.float32).min
    logits = torch.tensor([[0.0, 2.0, very_negative], [1.0, very_negative, very_negative]], requires_grad=True)
    target = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    kl = grounding_loss(logits, target, "kl")
    expected = -torch.log_softmax(torch.tensor([0.0, 2.0]), 0)[1] / 2  # the second span's loss is 0
    assert torch.isclose(kl, expected)
    kl.backward()
    assert torch.isfinite(logits.grad).all()
    ce = grounding_loss(logits.detach(), target, "ce")
    assert torch.isclose(ce, expected)  # one-hot targets: CE equals KL
    assert NONE == 0
    with pytest.raises(ValueError, match="'kl' or 'ce'"):
        grounding_loss(logits, target, "mse")


def _extra_tables() -> dict:
    vec = pa.list_(pa.float32(), 2)
    generated = {"image_sha256": "g1", "prompt": "p", "start": 0, "end": 1, "type": "PER", "text": "Ann"}
    return {
        "captions": pa.table({"image_sha256": ["a", "b"], "caption": ["a red car", None],
                              "skip_reason": [None, "corrupt_image"]}),
        "synthesized": pa.table({
            "tweet_id": ["1", "2"], "split": ["train", "train"], "image_sha256": ["g0", "gx"],
            "relevant": [False, None], "entities": [[{**generated, "image_path": "g1.png"}], []],
        }),
        "generated_features": pa.table({"image_sha256": ["g0", "g1"], "embedding": pa.array([[5, 5], [6, 6]], vec),
                                        "skip_reason": [None, None]}),
        "text_features": pa.table({"tweet_id": ["1"], "split": ["train"], "embedding": pa.array([[9, 9]], vec)}),
    }


def test_store_extras_come_per_image_and_per_tweet_and_missing_ones_are_counted():
    regions, region_features, image_features = _tables()
    patch_type = pa.list_(pa.list_(pa.float32(), 2), 3)
    patches = pa.array([[[1, 0], [0, 1], [1, 1]], None, [[2, 2], [2, 2], [2, 2]]], patch_type)
    image_features = image_features.add_column(2, "patch_tokens", patches)
    extras = ("captions", "generated", "patches", "text")
    store = VisualStore(regions, region_features, image_features, 2, extras=extras, extra_tables=_extra_tables())
    tweets = pa.table({"tweet_id": ["1", "2", "3"], "split": ["train"] * 3, "image_sha256": ["a", "b", None],
                       "width": [8, 8, None], "height": [8, 8, None]})
    (one, two, three), counts = store.lookup_table(tweets)
    assert one.caption == ("a", "red", "car") and one.patches.shape == (3, 2) and one.relevant is False
    assert one.generated.tolist() == [5, 5] and one.text.tolist() == [9, 9]
    assert list(one.entity_images) == [(0, 1)] and one.entity_images[(0, 1)].tolist() == [6, 6]
    assert two.caption is None and two.patches is None and two.generated is None and two.relevant is None
    assert three.caption is None and three.generated is None and three.text is None
    assert (counts["caption_missing"], counts["patches_missing"]) == (1, 1)  # tweet 3 has no image to miss
    assert (counts["generated_missing"], counts["text_feature_missing"]) == (2, 2)
    batch = collate_visual([one, two, three], dim=2, patch_dim=store.patch_dim)
    assert batch["patch_tokens"].shape == (3, 3, 2) and batch["patch_mask"].tolist() == [[True] * 3] + [[False] * 3] * 2
    assert batch["generated_mask"].tolist() == [True, False, False]
    assert batch["text_mask"].tolist() == [True, False, False]
    assert batch["relevant_mask"].tolist() == [True, False, False] and not batch["relevant"].any()
    assert batch["generated_features"][1:].abs().sum() == 0  # absent: masked zeros, never read as real
    with pytest.raises(ValueError, match="need the tables"):
        VisualStore(*_tables(), 2, extras=("captions",))
    with pytest.raises(ValueError, match="unknown visual extras"):
        VisualStore(*_tables(), 2, extras=("audio",))
