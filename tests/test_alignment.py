import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gmner.core.boxes import iou_matrix
from gmner.models.losses import InfoNCE
from gmner.pretrain.objectives import (
    RelevanceGate,
    entity_object_loss,
    entity_object_sets,
    global_local_loss,
    sample_negatives,
)


def _random_boxes(rng, n, size=100.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(1, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


# --- negative sampling ---------------------------------------------------------------------------------


def test_sample_negatives_never_returns_a_region_near_a_gold_box():
    for seed in range(200):
        rng = np.random.default_rng(seed)
        candidates = _random_boxes(rng, 30)
        gold = np.concatenate([candidates[rng.integers(0, 30, 2)] + rng.uniform(-3, 3, (2, 4)), _random_boxes(rng, 1)])
        valid = rng.random(30) < 0.8
        n = int(rng.integers(0, 20))
        picked = sample_negatives(candidates, gold, n, rng, valid)
        assert len(picked) <= n and len(set(picked.tolist())) == len(picked)
        assert valid[picked].all()
        if len(picked):
            assert iou_matrix(candidates[picked], gold).max() < 0.5
        # Every qualifying candidate is taken when n is large enough.
        eligible = np.flatnonzero(valid & (iou_matrix(candidates, gold).max(axis=1) < 0.5))
        all_of_them = sample_negatives(candidates, gold, 100, np.random.default_rng(seed), valid)
        assert all_of_them.tolist() == eligible.tolist()


def test_sample_negatives_is_deterministic_and_handles_edges():
    candidates = _random_boxes(np.random.default_rng(0), 40)
    gold = np.array([[0.0, 0.0, 10.0, 10.0]])
    first = sample_negatives(candidates, gold, 5, np.random.default_rng(7))
    assert first.tolist() == sample_negatives(candidates, gold, 5, np.random.default_rng(7)).tolist()
    assert len(first) == 5
    # IoU exactly 0.5 is excluded (strict), IoU just below is allowed.
    boxes = np.array([[0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 4.9], [0.0, 0.0, 10.0, 10.0]])
    assert sample_negatives(boxes, gold, 10, np.random.default_rng(0)).tolist() == [1]
    # No gold box: every valid candidate qualifies; no candidate or nothing valid: empty.
    assert sample_negatives(boxes, np.zeros((0, 4)), 10, np.random.default_rng(0)).tolist() == [0, 1, 2]
    assert sample_negatives(boxes, gold, 10, np.random.default_rng(0), valid=np.zeros(3, bool)).size == 0
    assert sample_negatives(np.zeros((0, 4)), gold, 3, np.random.default_rng(0)).size == 0
    assert sample_negatives(boxes, gold, 0, np.random.default_rng(0)).size == 0
    with pytest.raises(ValueError, match="valid"):
        sample_negatives(boxes, gold, 2, np.random.default_rng(0), valid=np.ones(2, bool))


# --- relevance gate ------------------------------------------------------------------------------------


def test_gate_is_in_open_unit_interval_and_differentiable():
    torch.manual_seed(0)
    gate = RelevanceGate(visual_dim=6, text_dim=4)
    image = torch.randn(5, 6, requires_grad=True)
    text = torch.randn(5, 4, requires_grad=True)
    alpha = gate(image, text)
    assert alpha.shape == (5,)
    assert ((alpha > 0) & (alpha < 1)).all()
    alpha.sum().backward()
    for grad in (gate.linear.weight.grad, gate.linear.bias.grad, image.grad, text.grad):
        assert grad is not None and grad.abs().sum() > 0


# --- entity-object alignment ---------------------------------------------------------------------------

GOLD = np.array([[0.0, 0.0, 10.0, 10.0]])
# Image 0: candidate 0 is the object (IoU 1), 1 overlaps it (IoU 0.6, neither positive nor negative for the
# best match... but above 0.5 so never a negative), 2 and 3 are far, 4 is far but has no features.
CANDIDATES_0 = np.array(
    [[0, 0, 10, 10], [0, 0, 10, 6], [50, 50, 60, 60], [70, 70, 80, 80], [20, 20, 30, 30]], dtype=np.float64
)
CANDIDATES_1 = np.array([[0, 0, 10, 10], [30, 30, 40, 40], [5, 5, 15, 15]], dtype=np.float64)


def _eoa_batch(d=8):
    torch.manual_seed(0)
    features = torch.randn(2, 5, d)
    mask = torch.tensor([[True, True, True, True, False], [True, True, True, False, False]])
    return features, mask


def test_entity_object_sets_pick_the_gold_object_and_safe_negatives():
    features, mask = _eoa_batch()
    # Entity 0: in image 0 with a gold box; entity 1: absent from image 1, no generated image; entity 2:
    # absent from image 0 with a generated image.
    generated = torch.randn(3, 8)
    sets = entity_object_sets(
        [0, 1, 0],
        [GOLD, np.zeros((0, 4)), np.zeros((0, 4))],
        [CANDIDATES_0, CANDIDATES_1],
        features,
        mask,
        np.random.default_rng(0),
        generated=generated,
        generated_mask=torch.tensor([True, False, True]),
        num_keys=6,
    )
    assert sets.row_mask.tolist() == [True, False, True]
    assert torch.equal(sets.positives[0], features[0, 0])
    assert torch.equal(sets.positives[2], generated[2])
    assert sets.negatives.shape == (3, 5, 8) and sets.negative_mask.shape == (3, 5)
    assert sets.counts == {"entities": 3, "positive_region": 1, "positive_generated": 1, "absent": 2, "left_out": 1}
    # Entity 0: its own image gives only candidates 2 and 3 (0 and 1 overlap the gold box, 4 has no
    # features); the other 3 keys are image 1's valid regions.
    own = [features[0, 2], features[0, 3]]
    others = [features[1, j] for j in range(3)]
    got = list(sets.negatives[0][sets.negative_mask[0]])
    assert len(got) == 5
    assert all(any(torch.equal(g, x) for x in own + others) for g in got)
    assert not any(torch.equal(g, features[0, j]) for g in got for j in (0, 1, 4))
    # Entity 2 has no gold box: any valid region is a negative; 4 own-image + 3 other > 5 keys, so no padding.
    assert sets.negative_mask[2].all()
    # Fewer regions than keys: what exists is used and the rest is masked, counted.
    short = entity_object_sets(
        [0], [GOLD], [CANDIDATES_0, CANDIDATES_1], features, mask, np.random.default_rng(0), num_keys=16
    )
    assert short.negative_mask.sum().item() == 5 and short.counts["short_negatives"] == 1


def test_entity_object_loss_equals_candidates_and_drops_rows_without_positive():
    features, mask = _eoa_batch()
    nce = InfoNCE(temperature=0.1)
    sets = entity_object_sets(
        [0, 1, 1],
        [GOLD, GOLD, np.zeros((0, 4))],
        [CANDIDATES_0, CANDIDATES_1],
        features,
        mask,
        np.random.default_rng(3),
        num_keys=4,
    )
    assert sets.row_mask.tolist() == [True, True, False]  # entity 2: absent, no generated image
    spans = torch.randn(3, 8, requires_grad=True)
    loss = entity_object_loss(nce, spans, sets.positives, sets.negatives, sets.negative_mask, sets.row_mask)
    keys = torch.cat([sets.positives[:, None], sets.negatives], dim=1)
    key_mask = torch.cat([torch.ones(3, 1, dtype=torch.bool), sets.negative_mask], dim=1)
    assert loss.item() == pytest.approx(nce.candidates(spans, keys, key_mask, sets.row_mask).item(), rel=1e-6)
    kept = nce.candidates(spans[:2], keys[:2], key_mask[:2])
    assert loss.item() == pytest.approx(kept.item(), rel=1e-6)
    rows = entity_object_loss(nce, spans, sets.positives, sets.negatives, sets.negative_mask, sets.row_mask, "none")
    assert rows[2].item() == 0.0 and (rows[:2] > 0).all()
    loss.backward()
    assert spans.grad[:2].abs().sum() > 0 and spans.grad[2].abs().sum() == 0
    # Image 1's region 2 (IoU 25/175 with the gold box) may be a negative, region 0 (the object) never.
    image_1_object = features[1, 0]
    assert not any(torch.equal(n, image_1_object) for n in sets.negatives[1][sets.negative_mask[1]])
    with pytest.raises(ValueError, match="num_keys"):
        entity_object_sets(
            [0], [GOLD], [CANDIDATES_0, CANDIDATES_1], features, mask, np.random.default_rng(0), num_keys=1
        )


def test_entity_object_sets_are_deterministic_for_a_seed():
    features, mask = _eoa_batch()
    args = ([0, 1], [GOLD, GOLD], [CANDIDATES_0, CANDIDATES_1], features, mask)
    a = entity_object_sets(*args, np.random.default_rng(5), num_keys=4)
    b = entity_object_sets(*args, np.random.default_rng(5), num_keys=4)
    assert torch.equal(a.negatives, b.negatives) and torch.equal(a.negative_mask, b.negative_mask)
    # A gold box no candidate covers: no region positive; the generated image stands in only when allowed.
    far = [np.array([[60.0, 0.0, 70.0, 10.0]])]
    generated = torch.randn(1, 8)
    for allowed, kept in ((True, True), (False, False)):
        sets = entity_object_sets([1], far, *args[2:], np.random.default_rng(0), generated, use_generated=allowed)
        assert sets.row_mask.tolist() == [kept] and sets.counts["uncovered"] == 1
        assert sets.counts["left_out"] == (not kept)
    assert torch.equal(sets.positives[0], torch.zeros(8))  # masked key of nothing, row left out


# --- text-image reflection (DLRAM Eq. 2) ----------------------------------------------------------------


def _reflection_batch():
    """Three tweets t_i = e_i with images v = (e0, e0, -e2) and one masked image each, m = (e1, e2, -e0); the
    norms differ, so only a cosine gives the values below."""
    eye = torch.eye(3)
    return 3 * eye, torch.stack([2 * eye[0], eye[0], -eye[2]]), torch.stack([eye[1], 0.5 * eye[2], -eye[0]])


def test_reflection_is_eq_2_with_the_positive_outside_the_denominator():
    nce = InfoNCE(temperature=0.5, learnable=False)  # s / tau = 2 s
    text, image, masked = _reflection_batch()
    # L_i = -2 s(t_i, v_i) + log sum_j exp(2 s(t_i, m_j)); s(t, v) = (1, 0, -1), s(t_i, m_j) rows (0, 0, -1),
    # (1, 0, 0), (0, 1, 0).
    expected = [-2 + math.log(2 + math.exp(-2)), math.log(2 + math.exp(2)), 2 + math.log(2 + math.exp(2))]
    rows = nce.against_pool(text, image, masked, reduction="none")
    assert rows.tolist() == pytest.approx(expected, rel=1e-6)
    assert nce.against_pool(text, image, masked).item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    # With the positive among the keys (the candidates form) tweet 0's loss would be larger.
    keys = torch.cat([image[:, None], masked.expand(3, -1, -1)], dim=1)
    with_positive = nce.candidates(text, keys, reduction="none")
    assert with_positive[0].item() == pytest.approx(-2 + math.log(math.exp(2) + 2 + math.exp(-2)), rel=1e-6)
    # Every masked image of the batch is in every denominator, the tweet's own included: without m_0,
    # tweet 0's loss drops to -2 + log(1 + e^-2).
    assert nce.against_pool(text[:1], image[:1], masked[1:]).item() == pytest.approx(
        -2 + math.log(1 + math.exp(-2)), rel=1e-6)


def test_reflection_rows_left_out_and_an_empty_pool_give_zero_and_no_nan():
    nce = InfoNCE(temperature=0.5)
    text, image, masked = _reflection_batch()
    text.requires_grad_(True)
    keep = torch.tensor([True, False, True])
    rows = nce.against_pool(text, image, masked, keep, reduction="none")
    assert rows[1].item() == 0.0
    assert nce.against_pool(text, image, masked, keep).item() == pytest.approx((rows[0] + rows[2]).item() / 2)
    empty = nce.against_pool(text, image, torch.zeros(0, 3))
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert torch.isfinite(text.grad).all() and text.grad.abs().sum() == 0 and nce.log_scale.grad is None
    with pytest.raises(ValueError, match="pool"):
        nce.against_pool(text, image, torch.zeros(2, 4))


# --- VTC global-local alignment ------------------------------------------------------------------------


def _sgla_inputs():
    torch.manual_seed(0)
    eye = torch.eye(4)
    # Pair 0: image anti-aligned with its text and aligned with pair 1's text (and vice versa), so with the
    # temperature at 0.01 its matched-pair probability underflows to exactly 0.
    image = torch.stack([eye[0], -eye[0], eye[1], eye[2]])
    text = torch.stack([-eye[0], eye[0], eye[1], eye[2] + 0.3 * eye[3]])
    entities = torch.randn(4, 3, 4)
    entity_mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True], [True, False, False]])
    objects = torch.randn(4, 5, 4)
    object_mask = torch.ones(4, 5, dtype=torch.bool)
    object_mask[3] = False  # pair 3: no objects, no local term
    # Pairs 0 and 1 share their sets, so their local pairs cannot be told apart: a local loss of at least log 2.
    entities[1], entity_mask[1], objects[1] = entities[0], entity_mask[0], objects[0]
    return image, text, entities, entity_mask, objects, object_mask


def test_coupling_scales_local_terms_and_zero_relevance_contributes_zero():
    nce = InfoNCE(temperature=0.01)
    image, text, entities, entity_mask, objects, object_mask = _sgla_inputs()
    entities.requires_grad_(True)
    coupled = global_local_loss(nce, image, text, entities, entity_mask, objects, object_mask, coupling=True)
    plain = global_local_loss(nce, image, text, entities, entity_mask, objects, object_mask, coupling=False)
    r = coupled["relevance"]
    assert r[0].item() == 0.0 and r[1].item() == 0.0 and 0.9 < r[2].item() <= 1.0
    assert coupled["local_pairs"][0].item() == 0.0 and plain["local_pairs"][0].item() >= np.log(2) - 1e-4
    assert torch.allclose(coupled["local_pairs"], plain["local_pairs"] * r)
    assert plain["local_pairs"][3].item() == 0.0  # no objects
    assert coupled["local"].item() == pytest.approx(coupled["local_pairs"].sum().item() / 3, rel=1e-6)
    assert coupled["local"].item() != pytest.approx(plain["local"].item())
    assert coupled["global"].item() == pytest.approx(nce.pairwise(image, text).item(), rel=1e-6)
    assert not r.requires_grad  # detached: the coupling weight is not itself trained by the local loss
    coupled["local"].backward()
    assert torch.isfinite(entities.grad).all() and entities.grad[2].abs().sum() > 0


def test_local_term_matches_each_entity_to_its_best_object():
    nce = InfoNCE(temperature=0.5)
    eye = torch.eye(3)
    image, text = torch.randn(2, 3), torch.randn(2, 3)
    entities = torch.stack([eye[[0, 1]], eye[[2, 2]]])  # (2, 2, 3)
    objects = torch.stack([torch.stack([eye[1], eye[0] * 2, -eye[2]]), torch.stack([eye[2], eye[0], eye[1]])])
    ones2, ones3 = torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)
    got = global_local_loss(nce, image, text, entities, ones2, objects, ones3, coupling=False)
    # Best matches are the entities themselves (unit objects), so the pooled pairs are identical.
    pooled = torch.stack([(eye[0] + eye[1]) / 2, eye[2]])
    assert torch.allclose(got["local_pairs"], nce.pairwise(pooled, pooled, reduction="none"), atol=1e-6)
    # A masked pair is neither in the global nor the local term and has zero relevance.
    masked = global_local_loss(nce, image, text, entities, ones2, objects, ones3, pair_mask=torch.tensor([True, False]))
    lone = torch.sigmoid(2.0 * F.cosine_similarity(image[0], text[0], dim=0))  # the pair alone, scale 1 / 0.5
    assert masked["relevance"][0].item() == pytest.approx(lone.item()) and masked["relevance"][1].item() == 0.0
    assert masked["local_pairs"][1].item() == 0.0
    assert masked["global"].item() == pytest.approx(0.0, abs=1e-6)  # one pair: nothing to contrast
