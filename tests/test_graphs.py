"""Graph and fusion pieces of VSGN: top-K sparsification, local mask, symmetric KL, masked attention, CIR."""

import math

import pytest
import torch
import torch.nn.functional as F

from gmner.models.graphs import (
    ChannelInhibitoryRouting,
    ConcatFusion,
    CrossModalAttention,
    SimilarityGraph,
    WeightedSumFusion,
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


def _cir(rho: float = -2.0) -> ChannelInhibitoryRouting:
    torch.manual_seed(0)
    cir = ChannelInhibitoryRouting(sources=3, dim=4).eval()
    with torch.no_grad():
        cir.weight.zero_()  # equal importance logits for every source and channel
        cir.rho.fill_(rho)
    return cir


def test_cir_with_all_channels_equal_is_the_identity_up_to_its_scale():
    """Equal importance logits and the same deviation d in every channel: CIR(x, x, x) = exp(-softplus(rho) d) x."""
    cir = _cir(rho=0.5)
    x = torch.randn(2, 4)
    shift = 0.7
    with torch.no_grad():
        cir.running_mean.copy_(x[0] - shift)  # item 0 deviates by `shift` in every channel
    scale = math.exp(-F.softplus(torch.tensor(0.5)).item() * shift / math.sqrt(1 + cir.eps))
    out = cir(x[:1, None].expand(1, 3, 4), torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(out, scale * x[:1])
    # One present source: the same, whatever the absent ones hold.
    sources = torch.stack([x[0], torch.full((4,), 1e3), torch.full((4,), -1e3)])[None]
    torch.testing.assert_close(cir(sources, torch.tensor([[True, False, False]])), scale * x[:1])
    # No inhibition (softplus(rho) -> 0): the plain mean of the present sources.
    cir = _cir(rho=-30.0)
    sources = torch.randn(1, 3, 4)
    torch.testing.assert_close(cir(sources, torch.tensor([[True, True, False]])), sources[:, :2].mean(1))


def test_cir_inhibits_deviant_channels_and_updates_statistics_in_training_only():
    cir = _cir(rho=1.0)
    sources = torch.zeros(1, 3, 4)
    sources[0, :, 0] = 5.0  # channel 0 far from the running mean 0, the others on it
    out = cir(sources, torch.ones(1, 3, dtype=torch.bool))
    assert out[0, 0] < 5.0 * 0.01  # inhibited
    batch = torch.randn(6, 3, 4) + 2.0
    present = torch.ones(6, 3, dtype=torch.bool)
    present[:, 2] = False  # source 2 absent: its statistics stay
    cir(batch, present)
    assert torch.equal(cir.running_mean, torch.zeros(3, 4))  # eval: untouched
    cir.train()
    first = cir(batch, present)
    torch.testing.assert_close(cir.running_mean[:2], 0.1 * batch[:, :2].mean(0))
    assert torch.equal(cir.running_mean[2], torch.zeros(4)) and torch.equal(cir.running_var[2], torch.ones(4))
    cir.eval()
    assert not torch.equal(cir(batch, present), first)  # the new statistics are used from the next call on
    assert torch.equal(cir(batch, torch.zeros(6, 3, dtype=torch.bool)), torch.zeros(6, 4))


@pytest.mark.parametrize("fusion", [ConcatFusion, WeightedSumFusion])
def test_fusion_ablations_are_zero_without_sources_and_ignore_absent_ones(fusion):
    torch.manual_seed(0)
    fuse = fusion(3, 4)
    sources = torch.randn(2, 3, 4)
    present = torch.tensor([[True, False, True], [False, False, False]])
    out = fuse(sources, present)
    assert torch.equal(out[1], torch.zeros(4))
    noisy = sources.clone()
    noisy[0, 1] = 1e3
    assert torch.equal(fuse(noisy, present)[0], out[0])
