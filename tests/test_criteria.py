"""Data-driven structured criteria (activation, APoZ, Taylor, Hessian): the scores are the papers' definitions
computed by hand, every group member contributes, the model and its gradients are left as they were,
and the result still compacts exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import masksparse
from masksparse import PruningValueError, prune_channels


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(3)]


def _kept(model: nn.Sequential) -> torch.Tensor:
    return model[0].weight_mask.any(1)


def _expected(scores: torch.Tensor, n: int) -> torch.Tensor:
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[scores.argsort()[:n]] = False
    return keep


def test_activation_is_consumer_weight_times_input_norm():
    model, data = _mlp(), _batches()
    h = torch.cat([torch.relu(model[0](x)) for x, _ in data])
    scores = model[2].weight.detach().abs().sum(0) * h.norm(dim=0)
    prune_channels(model, data[0][0], 0.5, importance="activation", data=[x for x, _ in data])
    assert torch.equal(_kept(model), _expected(scores, 4))
    assert torch.equal(model[2].weight_mask.any(0), _kept(model))  # the consumer's columns follow


def test_apoz_prunes_the_units_most_often_zero():
    model, data = _mlp(), _batches()
    with torch.no_grad():  # make two hidden units mostly dead
        model[0].bias[[1, 5]] -= 3.0
    h = torch.cat([torch.relu(model[0](x)) for x, _ in data])
    nonzero = (h != 0).double().mean(0)
    prune_channels(model, data[0][0], 2, importance="apoz", data=[x for x, _ in data])
    assert torch.equal(_kept(model), _expected(nonzero, 2))
    assert not _kept(model)[[1, 5]].any()


def test_taylor_is_weight_times_gradient_over_every_member():
    model, data = _mlp(), _batches()
    model.zero_grad()
    for x, y in data:
        nn.functional.cross_entropy(model(x), y).backward()
    parts = [
        (model[0].weight * model[0].weight.grad).abs().sum(1),
        (model[0].bias * model[0].bias.grad).abs(),
        (model[2].weight * model[2].weight.grad).abs().sum(0),
    ]
    scores = torch.stack([p.detach().double() / p.detach().double().mean() for p in parts]).mean(0)
    sentinel = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, s in zip(model.parameters(), sentinel, strict=True):
        p.grad = s.clone()
    prune_channels(
        model, data[0][0], 0.5, importance="taylor", data=data, loss_fn=nn.functional.cross_entropy
    )
    assert torch.equal(_kept(model), _expected(scores, 4))
    for p, _s in zip(
        (model[0].weight_orig, model[0].bias_orig, model[2].weight_orig, model[2].bias),
        sentinel,
        strict=False,
    ):
        assert p.grad is not None and torch.all(p.grad == 7.0)  # the user's gradients are put back


def test_a_callable_receives_the_attribution():
    model, data = _mlp(), _batches()
    seen = {}

    def widest_input(group, model, att):
        seen.update(att.inputs)
        return att.inputs["2"].sq_norms

    prune_channels(model, data[0][0], 0.25, importance=widest_input, data=[x for x, _ in data])
    assert set(seen) == {"2"} and int(_kept(model).sum()) == 6


def test_global_ranking_and_exact_compaction_on_a_convnet():
    from masksparse.examples import LeNet

    torch.manual_seed(0)
    model = LeNet()
    x = torch.randn(64, 1, 28, 28)
    prune_channels(model, x[:2], 0.5, importance="activation", data=[x[:32], x[32:]], global_ranking=True)
    small = masksparse.compact(model, x[:4])
    assert torch.allclose(small(x), model(x), atol=1e-5)
    assert small.conv1.out_channels + small.conv2.out_channels < 6 + 16


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"importance": "taylor"}, "computed from data: pass data"),
        ({"importance": "activation"}, "computed from data: pass data"),
        ({"importance": "l1", "data": [torch.randn(4, 6)]}, "reads weights only and ignores data"),
        ({"importance": "taylor", "data": [torch.randn(4, 6)]}, "this criterion needs a loss"),
        ({"importance": "activation", "data": []}, "gave no batches"),
        ({"importance": "activation", "data": [torch.randn(4, 5)]}, "batch 0 could not be fed"),
    ],
)
def test_bad_input_raises_and_leaves_the_model_alone(kwargs, match):
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningValueError, match=match):
        prune_channels(model, torch.randn(2, 6), 0.5, **kwargs)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_reconstruct_refits_the_consumers_and_still_compacts_exactly():
    """Same masks as without reconstruction; the consumer's kept columns and bias take over, so the
    outputs on the calibration data move less; the compacted model computes the masked one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(512, 6)
    dense_out = model(x).detach()
    plain = copy.deepcopy(model)
    prune_channels(plain, x[:2], 0.5, importance="activation", data=[x])
    prune_channels(model, x[:2], 0.5, importance="activation", data=[x], reconstruct=True)
    for i in (0, 2):
        assert torch.equal(model[i].weight_mask, plain[i].weight_mask)
    assert not torch.equal(model[4].weight_orig, plain[4].weight_orig)
    assert ((model(x) - dense_out) ** 2).mean() < 0.5 * ((plain(x) - dense_out) ** 2).mean()
    small = masksparse.compact(model, x[:4])
    assert torch.allclose(small(x), model(x), atol=1e-5)


def test_reconstruct_needs_data():
    model = _mlp()
    with pytest.raises(PruningValueError, match="reconstruct=True refits layers on calibration data"):
        prune_channels(model, torch.randn(2, 6), 0.5, reconstruct=True)
    assert not hasattr(model[0], "weight_mask")


def test_hessian_is_the_obs_saliency_of_each_consumer_column():
    model, data = _mlp(), _batches()
    h = torch.cat([torch.relu(model[0](x)) for x, _ in data]).double()
    xtx = h.T @ h
    xtx += 0.01 * xtx.diagonal().mean() * torch.eye(8, dtype=torch.float64)
    scores = model[2].weight.detach().double().pow(2).sum(0) / torch.linalg.inv(xtx).diagonal()
    prune_channels(model, data[0][0], 0.5, importance="hessian", data=[x for x, _ in data])
    assert torch.equal(_kept(model), _expected(scores, 4))


def test_hessian_finds_the_unit_others_can_stand_in_for():
    """A hidden unit that duplicates another can go at no cost once the other takes over its share: the
    Hessian criterion prunes one of the pair, and with reconstruct=True the outputs do not move, while
    activation + reconstruct, which ranks by weight times input size, prunes another and pays for it."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight[7] = model[0].weight[0]
        model[0].bias[7] = model[0].bias[0]
    x = torch.randn(512, 6)
    dense_out = model(x).detach()
    by_activation, by_hessian = copy.deepcopy(model), copy.deepcopy(model)
    prune_channels(by_activation, x[:2], 1, importance="activation", data=[x], reconstruct=True)
    prune_channels(by_hessian, x[:2], 1, importance="hessian", data=[x], reconstruct=True)
    pruned = torch.nonzero(~_kept(by_hessian)).flatten().tolist()
    assert pruned in ([0], [7]) and torch.nonzero(~_kept(by_activation)).flatten().tolist() not in ([0], [7])
    hessian_error = ((by_hessian(x) - dense_out) ** 2).mean()
    activation_error = ((by_activation(x) - dense_out) ** 2).mean()
    assert hessian_error < 1e-2 * (dense_out**2).mean() and hessian_error < 0.25 * activation_error
    small = masksparse.compact(by_hessian, x[:4])
    assert torch.allclose(small(x), by_hessian(x), atol=1e-5)


def _loss(model: nn.Module, data) -> float:
    with torch.no_grad():
        return sum(float(nn.functional.cross_entropy(model(x), y)) for x, y in data)


def test_sensitivity_is_the_loss_rise_when_a_unit_alone_goes():
    model, data = _mlp(), _batches()
    base = _loss(model, data)
    rises = []
    for u in range(8):
        trial = copy.deepcopy(model)
        with torch.no_grad():
            trial[0].weight[u] = 0
            trial[0].bias[u] = 0
            trial[2].weight[:, u] = 0
        rises.append(_loss(trial, data) - base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_channels(
        model, data[0][0], 3, importance="sensitivity", data=data, loss_fn=nn.functional.cross_entropy
    )
    assert torch.equal(_kept(model), _expected(torch.tensor(rises), 3))
    assert torch.equal(model[0].weight_orig, before["0.weight"])  # every trial was put back


def test_shapley_values_add_up_to_removing_the_whole_group():
    """Efficiency: in every sampled order the marginal rises add up to the loss of the model without
    the group, so the averaged values do too; a unit that does nothing gets 0."""
    from masksparse.criteria.attribution import Attribution, Shapley

    model, data = _mlp(), _batches()
    with torch.no_grad():
        model[2].weight[:, 3] = 0  # unit 3 reaches nothing
    graph = masksparse.trace(model, data[0][0])
    (group,) = [g for g in graph.groups if g.size == 8]
    att = Attribution({}, {}, lambda: _loss(model, data))
    values = Shapley(samples=3)(group, model, att)
    empty = copy.deepcopy(model)
    with torch.no_grad():
        empty[0].weight.zero_(), empty[0].bias.zero_(), empty[2].weight.zero_()
    assert float(values.sum()) == pytest.approx(_loss(empty, data) - _loss(model, data), rel=1e-9)
    assert float(values[3]) == pytest.approx(0.0, abs=1e-9)
    assert torch.equal(values, Shapley(samples=3)(group, model, att))  # seeded
    with pytest.raises(PruningValueError, match="samples must be an int >= 1"):
        Shapley(samples=0)
    masksparse.prune_channels(
        model, data[0][0], 2, importance=Shapley(samples=3), data=data, loss_fn=nn.functional.cross_entropy
    )
    assert torch.equal(_kept(model), _expected(values, 2))


def test_loss_criteria_say_when_there_is_no_loss():
    model = _mlp()
    for importance in ("sensitivity", "shapley"):
        with pytest.raises(PruningValueError, match="needs a loss"):
            prune_channels(model, torch.randn(2, 6), 0.5, importance=importance, data=[torch.randn(4, 6)])
        assert not hasattr(model[0], "weight_mask")
