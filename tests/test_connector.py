import pytest
import torch

from gmner.models.connector import ConnectorConfig, SharedPrivateConnector, balance_loss

VISUAL, TEXT = 6, 8


def make(**overrides) -> SharedPrivateConnector:
    torch.manual_seed(0)
    return SharedPrivateConnector(ConnectorConfig(VISUAL, TEXT, dropout=0.0, **overrides)).eval()


def inputs(batch: int = 2, k: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, k, VISUAL, generator=generator)
    corners = torch.rand(batch, k, 2, 2, generator=generator).sort(dim=2).values  # x/y lows then highs
    boxes = torch.cat([corners[:, :, 0], corners[:, :, 1]], dim=-1)
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    mask = torch.ones(batch, k, dtype=torch.bool)
    mask[0, -1] = False
    return features, torch.cat([boxes, area[..., None]], dim=-1), mask


@pytest.mark.parametrize("branches", [{}, {"moe": False}, {"graph": False}])
def test_shape_and_zeros_at_masked_slots(branches):
    features, geometry, mask = inputs()
    out = make(**branches)(features, geometry, mask)
    assert out.regions.shape == (2, 4, TEXT)
    assert torch.all(out.regions[0, -1] == 0)
    assert out.regions[mask].abs().sum(dim=-1).min() > 0
    if branches.get("moe", True):
        assert out.balance > 0
    else:
        assert out.balance.item() == 0 and torch.all(out.routing == 0)


def test_no_nan_without_candidates_or_with_a_fully_masked_row():
    connector = make()
    empty = connector(torch.zeros(3, 0, VISUAL), torch.zeros(3, 0, 5), torch.zeros(3, 0, dtype=torch.bool))
    assert empty.regions.shape == (3, 0, TEXT) and empty.routing.shape == (3, 0, 4)
    assert empty.balance.item() == 0
    features, geometry, mask = inputs()
    mask[1] = False
    features[1] = float("nan")  # garbage in masked slots must stay out
    out = connector(features, geometry, mask)
    for tensor in out:
        assert not torch.isnan(tensor).any()
    assert torch.all(out.regions[1] == 0) and torch.all(out.routing[1] == 0)
    everything_masked = connector(features, geometry, torch.zeros_like(mask))
    assert everything_masked.balance.item() == 0 and torch.all(everything_masked.regions == 0)


def test_each_valid_region_routed_to_top_k_experts():
    features, geometry, mask = inputs(batch=3, k=5)
    out = make(n_experts=5, top_k_experts=2)(features, geometry, mask)
    chosen = (out.routing > 0).sum(dim=-1)
    assert torch.all(chosen[mask] == 2) and torch.all(chosen[~mask] == 0)
    torch.testing.assert_close(out.routing[mask].sum(dim=-1), torch.ones(int(mask.sum())))


def test_balance_zero_for_uniform_router_positive_for_skewed():
    connector = make()
    features, geometry, mask = inputs()
    with torch.no_grad():
        connector.moe.router.weight.zero_()
        connector.moe.router.bias.zero_()
    assert abs(connector(features, geometry, mask).balance.item()) < 1e-7
    with torch.no_grad():
        connector.moe.router.bias.copy_(torch.tensor([3.0, 0.0, 0.0, -1.0]))
    assert connector(features, geometry, mask).balance.item() > 0.1


def test_balance_counts_only_valid_regions():
    probs = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]])
    assert balance_loss(probs, torch.tensor([[True, False]])).item() == 0
    # importance (1.5, 0.5): variance 0.25 over squared mean 1.
    assert balance_loss(probs, torch.tensor([[True, True]])).item() == pytest.approx(0.25)


def test_masked_region_does_not_influence_graph_outputs():
    connector = make(moe=False)
    features, geometry, mask = inputs(batch=1, k=4)
    mask[0, 1] = False
    base = connector(features, geometry, mask).regions
    features[0, 1] = 100 * torch.randn(VISUAL)
    geometry[0, 1] = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
    torch.testing.assert_close(connector(features, geometry, mask).regions, base)
    # Same outputs as if the masked slot were not there at all.
    keep = torch.tensor([0, 2, 3])
    alone = connector(features[:, keep], geometry[:, keep], mask[:, keep]).regions
    torch.testing.assert_close(base[:, keep], alone)


def test_adjacency_rows_of_valid_regions_sum_to_one():
    connector = make()
    features, geometry, mask = inputs(batch=2, k=5)
    mask[1, :2] = False
    adjacency = connector.graph.adjacency(features, geometry, mask)
    torch.testing.assert_close(adjacency.sum(dim=-1)[mask], torch.ones(int(mask.sum())))
    assert torch.all(adjacency.sum(dim=-1)[~mask] == 0)
    assert torch.all(adjacency.transpose(1, 2)[~mask] == 0)  # no edge into a masked region
    assert torch.all(adjacency.diagonal(dim1=1, dim2=2)[mask] > 0)  # self loops


def test_both_branches_off_raises():
    with pytest.raises(ValueError, match="graph and moe"):
        ConnectorConfig(VISUAL, TEXT, graph=False, moe=False)
    with pytest.raises(ValueError, match="top_k_experts"):
        ConnectorConfig(VISUAL, TEXT, n_experts=2, top_k_experts=3)


def test_gradients_reach_router_and_edge_scorer():
    connector = make()
    connector.train()
    features, geometry, mask = inputs()
    out = connector(features, geometry, mask)
    (out.regions.pow(2).sum() + out.balance).backward()
    assert connector.moe.router.weight.grad.abs().sum() > 0
    for parameter in connector.graph.edge_scorer.parameters():
        assert parameter.grad.abs().sum() > 0
