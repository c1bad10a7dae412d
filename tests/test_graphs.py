"""Graph pieces of VSGN: top-K sparsification, local mask, symmetric KL, masked attention (CIR: test_vsgn.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from gmner.models.graphs import (
    CrossModalAttention,
    SimilarityGraph,
    attended_adjacency,
    masked_softmax,
    symmetric_kl,
    topk_mask,
)


def test_topk_keeps_exactly_k_best_allowed_neighbours():
    torch.manual_seed(0)
    scores = torch.randn(2, 6, 6)
    allowed = torch.ones(2, 6, 6, dtype=torch.bool)
    allowed[1, :, 3:] = False  # tweet 1: only 3 valid neighbours per node
    allowed[1, 0] = False  # and node 0 none at all
    keep = topk_mask(scores, allowed, 4)
    assert keep.sum(-1).tolist() == [[4] * 6, [0, 3, 3, 3, 3, 3]]
    assert not (keep & ~allowed).any()
    # The kept ones are the best: each kept score beats every dropped allowed score of its row.
    for row, mask in zip(scores[0], keep[0]):
        assert row[mask].min() > row[~mask].max()
    assert topk_mask(scores, allowed, 10).sum(-1).tolist() == [[6] * 6, [0, 3, 3, 3, 3, 3]]


def test_graph_edges_join_valid_nodes_inside_the_window_only():
    graph = SimilarityGraph(dim=8, top_k=2, layers=1, window=1)
    mask = torch.tensor([[True, True, True, True, False]])
    allowed = graph.candidates(mask)
    assert allowed[0, 1].tolist() == [True, False, True, False, False]  # neighbours 0 and 2, not itself
    assert allowed[0, 3].tolist() == [False, False, True, False, False]  # node 4 is padding
    assert not allowed[0, 4].any()
    states, dense, _ = graph(torch.randn(1, 5, 8), mask)
    assert states.shape == (1, 5, 8)
    torch.testing.assert_close(dense.sum(-1), torch.tensor([[1.0, 1, 1, 1, 0]]))
    assert (dense[~allowed] == 0).all()


def test_symmetric_kl_is_zero_for_equal_distributions_positive_and_symmetric_otherwise():
    p = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.5, 0.0]])
    assert symmetric_kl(p, p).tolist() == [0.0, 0.0]
    kl = symmetric_kl(p, q)
    assert (kl > 0).all() and torch.equal(kl, symmetric_kl(q, p))
    expected = sum((a - b) * math.log(a / b) for a, b in zip(p[0].tolist(), q[0].tolist()))
    assert kl[0].item() == pytest.approx(expected, rel=1e-5)
    # = KL(p||q) + KL(q||p) for full-support distributions
    both = F.kl_div(q[0].log(), p[0], reduction="sum") + F.kl_div(p[0].log(), q[0], reduction="sum")
    assert kl[0].item() == pytest.approx(both.item(), rel=1e-5)


def test_masked_softmax_gives_zeros_without_any_valid_entry():
    scores = torch.randn(2, 3)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    weights = masked_softmax(scores, mask)
    assert weights[0, 1] == 0 and weights[0].sum().item() == pytest.approx(1.0)
    assert torch.equal(weights[1], torch.zeros(3))


def test_cross_attention_ignores_masked_keys_and_is_zero_without_keys():
    torch.manual_seed(0)
    attention = CrossModalAttention(dim=8, heads=2).eval()
    queries, keys = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    key_mask = torch.tensor([[True, True, False, False], [False] * 4])
    context, weights = attention(queries, keys, key_mask)
    assert torch.equal(context[1], torch.zeros(3, 8)) and torch.equal(weights[1], torch.zeros(3, 4))
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(3))
    noisy = keys.clone()
    noisy[0, 2:] = 1e3
    noisy[1] = -1e3
    assert torch.equal(attention(queries, noisy, key_mask)[0], context)


def test_attended_adjacency_is_a_distribution_over_the_candidate_edges():
    torch.manual_seed(0)
    attention = torch.softmax(torch.randn(1, 4, 3), -1)
    image = torch.softmax(torch.randn(1, 3, 3), -1)
    allowed = torch.tensor([[[0, 1, 1, 0], [1, 0, 1, 1], [1, 1, 0, 1], [0, 0, 0, 0]]], dtype=torch.bool)
    q = attended_adjacency(attention, image, allowed)
    torch.testing.assert_close(q.sum(-1), torch.tensor([[1.0, 1, 1, 0]]))
    assert (q[~allowed] == 0).all() and (q[allowed] > 0).all()
