"""GradualPruner: follows its schedule exactly, counts against original sizes, keeps one mask per
tensor, trains with masks held, resumes exactly from state_dicts, and rejects bad settings up front."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import masksparse
from masksparse import GradualPruner, PruningTypeError, PruningValueError
from masksparse.compact import relative_error
from masksparse.schedule import curves


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


_X = torch.randn(4, 12)


def _train(
    model: nn.Module, pruner: GradualPruner, steps: int, seed: int = 0, opt=None
) -> torch.optim.Optimizer:
    g = torch.Generator().manual_seed(seed)
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step()
    return opt


def test_global_magnitude_follows_the_cubic_schedule_exactly():
    model = _mlp()
    pruner = GradualPruner(model, 0.8, begin=2, end=12, every=3)
    _train(model, pruner, 15)
    total = 12 * 32 + 32 * 16
    steps = [h.step for h in pruner.history]
    assert steps == [2, 5, 8, 11, 12]
    for h in pruner.history:
        assert h.target == pytest.approx(curves.cubic(h.step, 0.8, 2, 12))
        assert h.reached == round(h.target * total) / total
    assert pruner.sparsity == pytest.approx(0.8, abs=1 / total)
    assert not hasattr(model[4], "weight_mask")  # the output layer is left alone by default


def test_masks_only_grow_and_masked_weights_stay_zero_while_training():
    model = _mlp()
    pruner = GradualPruner(model, 0.7, begin=0, end=10, every=2, schedule="linear")
    seen = None
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(12):
        opt.zero_grad()
        model(torch.randn(8, 12, generator=g)).square().mean().backward()
        opt.step()
        pruner.step()
        mask = getattr(model[0], "weight_mask", None)
        if mask is not None:
            assert seen is None or not (mask & ~seen).any()
            assert torch.all(model[0].weight[~mask] == 0)
            seen = mask.clone()
    for layer in (model[0], model[2]):
        (hook,) = layer._forward_pre_hooks.values()
        assert getattr(hook, "mask", layer.weight_mask) is layer.weight_mask  # one mask, no containers
        assert [n for n, _ in layer.named_buffers()] == ["weight_mask"]
        assert layer.weight_mask.dtype == torch.bool
    # and the pruner itself keeps no tensors: its history is (step, target, reached) numbers
    assert not [k for k, v in vars(pruner).items() if isinstance(v, torch.Tensor)]
    assert all(isinstance(x, (int, float)) for h in pruner.history for x in h)


def test_layer_scope_prunes_every_layer_to_the_fraction():
    model = _mlp()
    pruner = GradualPruner(model, 0.5, begin=0, end=4, scope="layer", schedule="constant")
    _train(model, pruner, 4)
    assert [float((~m.weight_mask).float().mean()) for m in (model[0], model[2])] == [0.5, 0.5]


def test_a_callable_schedule_and_data_driven_methods():
    model = _mlp()
    data = [torch.randn(32, 12) for _ in range(2)]
    pruner = GradualPruner(
        model,
        0.6,
        end=4,
        every=2,
        schedule=lambda step: 0.15 * step,
        method="wanda",
        scope="layer",
        data=data,
    )
    _train(model, pruner, 4)
    assert [h.target for h in pruner.history] == pytest.approx([0.3, 0.6])  # steps 2 and 4
    assert float((~model[0].weight_mask).float().mean()) == pytest.approx(0.6, abs=1 / 12)


def test_resuming_from_state_dicts_continues_exactly():
    """Ten steps, save, rebuild from a fresh model, ten more: the same masks and history as twenty."""
    straight = _mlp()
    p = GradualPruner(straight, 0.9, begin=0, end=16, every=4)
    opt = _train(straight, p, 10)
    _train(straight, p, 10, seed=1, opt=opt)

    first = _mlp()
    p1 = GradualPruner(first, 0.9, begin=0, end=16, every=4)
    opt1 = _train(first, p1, 10)
    saved = (copy.deepcopy(first.state_dict()), copy.deepcopy(opt1.state_dict()), p1.state_dict())

    resumed = _mlp(seed=7)
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)  # before the masks: same order
    masksparse.load_state_dict(resumed, saved[0])
    opt2.load_state_dict(saved[1])
    p2 = GradualPruner(resumed, 0.9, begin=0, end=16, every=4)
    p2.load_state_dict(saved[2])
    _train(resumed, p2, 10, seed=1, opt=opt2)
    assert p2.history == p.history
    for a, b in ((straight[0], resumed[0]), (straight[2], resumed[2])):
        assert torch.equal(a.weight_mask, b.weight_mask)
        assert torch.allclose(a.weight, b.weight, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"begin": 5, "end": 2}, PruningValueError, "begin=5 is after end=2"),
        ({"every": 0}, PruningValueError, "every must be an int >= 1"),
        ({"target": 1.0}, PruningValueError, "target must be a fraction"),
        ({"schedule": "exponential"}, PruningValueError, "schedule must be one of"),
        ({"method": "wanda"}, PruningValueError, "ranks within each layer"),
        ({"method": "wanda", "scope": "layer"}, PruningValueError, "needs calibration data"),
        ({"modules": ["1"]}, PruningTypeError, "'1' is a ReLU"),
        ({"modules": ["nope"]}, PruningValueError, "no submodule 'nope'"),
        ({"scope": "row"}, PruningValueError, "scope must be"),
        ({"compact": True}, PruningValueError, "compact=True needs structured=True"),
        ({"structured": True}, PruningValueError, "pass example_inputs"),
        ({"structured": True, "example_inputs": _X, "modules": ["0"]}, PruningValueError, "ignored_layers"),
        ({"structured": True, "example_inputs": _X, "method": "wanda"}, PruningValueError, "importance="),
        ({"budget": "params"}, PruningValueError, "budget='params' counts what removing channels"),
        ({"structured": True, "example_inputs": _X, "budget": "flops"}, PruningValueError, "budget must be"),
        (
            {"structured": True, "example_inputs": _X, "global_ranking": True},
            PruningValueError,
            "global_ranking cannot be passed on.*scope=",
        ),
        ({"structured": True, "example_inputs": _X, "target_params": 0.5}, PruningValueError, "budget="),
        (
            {
                "structured": True,
                "example_inputs": _X,
                "optimizer": torch.optim.SGD(_mlp(1).parameters(), 0.1),
            },
            PruningValueError,
            "only with compact=True",
        ),
        (
            {
                "structured": True,
                "example_inputs": _X,
                "compact": True,
                "optimizer": torch.optim.SGD(_mlp(1).parameters(), 0.1),
            },
            PruningValueError,
            r"holds 6 parameter\(s\) not in the model",
        ),
    ],
)
def test_bad_settings_are_rejected_before_anything_changes(kwargs, error, match):
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    args = {"target": 0.5, "end": 10} | kwargs
    with pytest.raises(error, match=match):
        GradualPruner(model, args.pop("target"), **args)
    assert model.state_dict().keys() == before.keys()


def test_a_schedule_that_leaves_the_unit_interval_is_reported():
    model = _mlp()
    pruner = GradualPruner(model, 0.5, end=3, schedule=lambda step: 2.0)
    with pytest.raises(PruningValueError, match=r"schedule\(1\) gave 2.0"):
        pruner.step()


def _channels_alive(model: nn.Sequential) -> list[int]:
    """Output units of each hidden Linear that are not masked away."""
    alive = []
    for layer in (model[0], model[2]):
        mask = getattr(layer, "weight_mask", None)
        alive.append(layer.out_features if mask is None else int(mask.any(1).sum()))
    return alive


@pytest.mark.parametrize("make_optimizer", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    lambda ps: torch.optim.AdamW(ps, lr=0.01),
])  # fmt: skip
def test_structured_compaction_in_place_keeps_the_optimizer_and_the_scheduler(make_optimizer):
    """With compact=True the same model and Parameter objects shrink at each pruning step; the optimizer
    state is sliced with them and the same optimizer and learning-rate scheduler keep training. Masked
    (compact=False) and compacted runs reach the same widths and compute the same thing at the end."""
    masked, small = _mlp(), _mlp()
    opt_masked, opt_small = make_optimizer(masked.parameters()), make_optimizer(small.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt_small, step_size=5, gamma=0.5)
    first = small[0].weight
    common = {"begin": 2, "end": 10, "every": 4, "structured": True, "example_inputs": _X}
    p_masked = GradualPruner(masked, 0.75, **common)
    p_small = GradualPruner(small, 0.75, compact=True, optimizer=opt_small, **common)
    g = torch.Generator().manual_seed(0)
    widths = []
    for _ in range(12):
        x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)
        for model, opt in ((masked, opt_masked), (small, opt_small)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        sched.step()
        for group in opt_masked.param_groups:  # the same learning rate on both sides
            group["lr"] = opt_small.param_groups[0]["lr"]
        p_masked.step(), p_small.step()
        widths.append((small[0].out_features, small[2].out_features))
    assert [h.step for h in p_small.history] == [2, 6, 10]
    assert widths == [(32, 16)] * 5 + [(11, 6)] * 4 + [(8, 4)] * 3  # cubic: most of it at step 6
    assert _channels_alive(masked) == [8, 4]
    with torch.no_grad():  # the kept weights trained identically on both sides
        assert relative_error(masked(_X), small(_X)) <= 1e-4
    assert small[0].weight is first and "weight_mask" not in dict(small[0].named_buffers())
    assert p_small.sparsity == p_masked.sparsity == 0.75
    assert [round(h.reached, 4) for h in p_small.history] == [round(h.reached, 4) for h in p_masked.history]
    state = opt_small.state[small[0].weight]
    moment = state["momentum_buffer"] if "momentum_buffer" in state else state["exp_avg"]
    assert moment.shape == small[0].weight.shape == (8, 12)
    assert opt_small.param_groups[0]["lr"] < opt_masked.defaults["lr"]  # the scheduler kept stepping
    assert sum(p.numel() for p in small.parameters()) < 0.3 * sum(p.numel() for p in _mlp().parameters())


def test_structured_masks_match_prune_channels_and_dropout_is_scaled():
    """Without compaction, each pruning step is prune_channels at the schedule's fraction; with
    adjust_dropout every Dropout's p is multiplied by the fraction of units the step kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.4), nn.Linear(32, 3))
    reference = copy.deepcopy(model)
    pruner = GradualPruner(
        model, 0.5, end=2, every=1, schedule="linear", structured=True, example_inputs=_X, adjust_dropout=True
    )
    pruner.step()  # step 1 of a linear 0 -> 0.5 over steps 0..2: 0.25
    masksparse.prune_channels(reference, _X, 0.25)
    assert torch.equal(model[0].weight_mask, reference[0].weight_mask)
    assert model[2].p == pytest.approx(0.4 * 24 / 32)
    assert model.training  # put back in the mode it was in
    pruner.step()
    assert int(model[0].weight_mask.any(1).sum()) == 16 and pruner.sparsity == 0.5
    assert model[2].p == pytest.approx(0.4 * 16 / 32)
    assert pruner.state_dict()["units"] == 32


@pytest.mark.parametrize("budget", ["params", "macs"])
@pytest.mark.parametrize("compact", [False, True])
def test_structured_budgets_count_parameters_or_macs_against_the_start(budget, compact):
    """budget='params'/'macs': each pruning step leaves at most 1 - fraction of the starting model's
    parameters or MACs (as the compacted model counts them), within a unit; masked and compacted
    runs prune alike."""
    model = _mlp()
    dense_params = sum(p.numel() for p in model.parameters())
    dense_macs = masksparse.sparsity_report(model, _X).total.macs
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = GradualPruner(
        model, 0.6, begin=2, end=10, every=4, structured=True, example_inputs=_X, budget=budget,
        compact=compact, optimizer=opt if compact else None,
    )  # fmt: skip
    _train(model, pruner, 12, opt=opt)
    assert [h.step for h in pruner.history] == [2, 6, 10]
    for h in pruner.history:
        assert h.reached >= h.target - 1e-9 and h.reached < h.target + 0.06, h
    small = model if compact else masksparse.compact(model, _X)
    params = sum(p.numel() for p in small.parameters()) / dense_params
    macs = masksparse.sparsity_report(small, _X).total.macs / dense_macs
    left = params if budget == "params" else macs
    assert left == pytest.approx(1 - pruner.sparsity) and left <= 0.4
    assert pruner.state_dict()["original"] == (dense_params if budget == "params" else dense_macs)


def test_a_budget_the_model_cannot_meet_names_the_step():
    model = nn.Sequential(nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 200))  # the classifier dominates
    pruner = GradualPruner(model, 0.9, end=1, structured=True, example_inputs=_X, budget="params")
    with pytest.raises(PruningValueError, match="at step 1 the schedule asks for 0.900 of the params"):
        pruner.step()


def test_compacting_in_place_while_the_last_graph_is_still_alive():
    """A training loop keeps ``loss`` (and with it the last autograd graph) alive while pruner.step()
    compacts: the next backward must see the new shapes, not the old graph's gradient accumulators."""
    model = _mlp()
    model[0].weight.tag = "first"  # attributes and the Parameter object survive compaction
    first = model[0].weight
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = GradualPruner(
        model, 0.5, end=4, every=2, structured=True, example_inputs=_X, compact=True, optimizer=opt
    )
    g = torch.Generator().manual_seed(0)
    kept = []
    for _ in range(6):
        x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        pruner.step()
        kept.append(loss)  # every graph stays alive
    assert model[0].out_features == 16 and model[0].weight is first and first.tag == "first"
    assert type(first) is nn.Parameter and first.grad is None or first.grad.shape == first.shape
