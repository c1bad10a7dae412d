import math

import pytest
import torch

from gmner.models.losses import InfoNCE


def _ce(row, target):
    return -row[target] + math.log(sum(math.exp(v) for v in row))


def test_pairwise_matches_a_hand_computed_3x3_example():
    # Unit vectors, so the cosine matrix is a @ b.T; temperature 0.5 doubles it.
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    b = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    cos = [[1.0, 0.6, 0.0], [0.0, 0.8, 1.0], [0.6, 1.0, 0.8]]
    logits = [[2 * v for v in row] for row in cos]
    columns = [[logits[r][c] for r in range(3)] for c in range(3)]
    expected = sum(0.5 * (_ce(logits[i], i) + _ce(columns[i], i)) for i in range(3)) / 3
    loss = InfoNCE(temperature=0.5).pairwise(a, b)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    per_row = InfoNCE(temperature=0.5).pairwise(a, b, reduction="none")
    assert per_row.shape == (3,)
    assert per_row[0].item() == pytest.approx(0.5 * (_ce(logits[0], 0) + _ce(columns[0], 0)), rel=1e-5)


def test_pairwise_row_mask_drops_rows_as_anchors_and_as_negatives():
    torch.manual_seed(0)
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    loss = InfoNCE().pairwise(a, b, row_mask=torch.tensor([True, True, False, True]), reduction="none")
    assert loss[2].item() == 0.0
    alone = InfoNCE().pairwise(a[[0, 1, 3]], b[[0, 1, 3]], reduction="none")
    assert torch.allclose(loss[[0, 1, 3]], alone, atol=1e-6)


def test_candidates_puts_the_positive_first_and_ignores_masked_keys():
    nce = InfoNCE(temperature=1.0)
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    expected = _ce([1.0, 0.0, -1.0], 0)
    assert nce.candidates(q, keys).item() == pytest.approx(expected, rel=1e-6)
    masked = nce.candidates(q, keys, key_mask=torch.tensor([[True, True, False]]))
    assert masked.item() == pytest.approx(_ce([1.0, 0.0], 0), rel=1e-6)
    # A query whose positive is missing contributes nothing (and no nan).
    none = nce.candidates(q, keys, key_mask=torch.tensor([[False, True, True]]), reduction="sum")
    assert none.item() == 0.0


def test_temperature_is_learned_and_gradients_flow():
    nce = InfoNCE(temperature=0.07)
    a = torch.randn(5, 4, requires_grad=True)
    nce.pairwise(a, torch.randn(5, 4)).backward()
    assert nce.log_scale.grad is not None and a.grad.abs().sum() > 0
    assert nce.scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        InfoNCE(temperature=0.0)
