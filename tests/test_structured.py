"""prune_channels: whole groups scored, masks on every member, amounts against original sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from masksparse import PruningTypeError, PruningValueError
from masksparse.graph import Group, trace
from masksparse.importance import tensor_of
from masksparse.structured import _dead_units, _write_masks, prune_channels


def chain(seed: int = 0) -> nn.Sequential:
    """conv(3->8) -> BN -> ReLU -> conv(8->6) -> ReLU -> conv(6->4): two prunable groups (8 and 6)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1),
    )  # fmt: skip


X = torch.randn(2, 3, 6, 6)


def mask(model: nn.Module, path: str, name: str = "weight") -> torch.Tensor:
    m = getattr(model.get_submodule(path), name + "_mask", None)
    t = tensor_of(model.get_submodule(path), name)
    assert t is not None
    return torch.ones(t.shape, dtype=torch.bool) if m is None else m != 0


def dead_out(model: nn.Module, path: str) -> set[int]:
    """Output channels whose whole weight slice is masked."""
    return set(torch.nonzero(~mask(model, path).flatten(1).any(1)).flatten().tolist())


def test_masks_land_on_every_member_of_the_group() -> None:
    model = chain()
    prune_channels(model, X, 0.5)
    gone = dead_out(model, "0")
    assert len(gone) == 4
    for path, name in [("0", "bias"), ("1", "weight"), ("1", "bias")]:
        assert set(torch.nonzero(~mask(model, path, name)).flatten().tolist()) == gone
    consumer = mask(model, "3")
    assert set(torch.nonzero(~consumer.transpose(0, 1).flatten(1).any(1)).flatten().tolist()) >= gone
    assert len(dead_out(model, "3")) == 3
    assert dead_out(model, "5") == set()  # the model output is never pruned


def test_pruned_channels_are_dead_in_the_masked_model() -> None:
    model = chain().eval()
    prune_channels(model, X, 0.5)
    hidden = model[:3](X)
    assert torch.all(hidden[:, sorted(dead_out(model, "0"))] == 0)


def test_repeated_calls_count_against_the_original_size() -> None:
    model = chain()
    prune_channels(model, X, 0.5)
    first = mask(model, "0").clone()
    prune_channels(model, X, 0.5)
    assert torch.equal(mask(model, "0"), first)
    prune_channels(model, X, 0.75)
    assert len(dead_out(model, "0")) == 6 and dead_out(model, "0") >= set(
        torch.nonzero(~first.flatten(1).any(1)).flatten().tolist()
    )


def test_schedule_reaches_the_final_amount() -> None:
    stepped, once = chain(), chain()
    for amount in (0.25, 0.5):
        prune_channels(stepped, X, amount)
    prune_channels(once, X, 0.5)
    assert len(dead_out(stepped, "0")) == len(dead_out(once, "0")) == 4


def test_ignored_layers_keep_their_outputs_and_their_inputs_follow() -> None:
    """As in Torch-Pruning: an ignored layer keeps its outputs; its inputs shrink with their producer."""
    model = chain()
    prune_channels(model, X, 0.5, ignored_layers=[model[3]])
    assert dead_out(model, "3") == set() and len(dead_out(model, "0")) == 4
    assert not mask(model, "3").transpose(0, 1).flatten(1).any(1).all()  # conv 3 loses input columns
    model = chain()
    prune_channels(model, X, 0.5, ignored_layers=["5"])  # the model output: pruned never anyway
    assert len(dead_out(model, "0")) == 4 and len(dead_out(model, "3")) == 3


def test_ignoring_a_container_keeps_the_outputs_of_everything_inside() -> None:
    model = nn.Sequential(chain()[:3], chain()[3:])
    prune_channels(model, X, 0.5, ignored_layers=[model[0]])
    assert dead_out(model, "0.0") == set() and len(dead_out(model, "1.3")) == 3


def test_untouched_layers_keep_inputs_and_outputs() -> None:
    model = chain()
    prune_channels(model, X, 0.5, untouched_layers=[model[3]])
    assert not hasattr(model[3], "weight_mask") and not hasattr(model[0], "weight_mask")
    model = chain()
    prune_channels(model, X, 0.5, untouched_layers=["5"])
    assert len(dead_out(model, "0")) == 4 and dead_out(model, "3") == set()


def test_amounts_override_per_module_by_object_or_path() -> None:
    """A module's amount applies to the groups of its outputs (conv 3 is also conv 0's consumer)."""
    model = chain()
    prune_channels(model, X, 0.5, amounts={model[0]: 0.25, "3": 0.0})
    assert len(dead_out(model, "0")) == 2 and dead_out(model, "3") == set()
    model = chain()
    prune_channels(model, X, 0.0, amounts={"": 0.5})  # a container: everything inside it
    assert len(dead_out(model, "0")) == 4 and len(dead_out(model, "3")) == 3


def test_global_ranking_ranks_across_groups_and_caps_each() -> None:
    """Scores are relative within a member, so one dominant unit makes the rest of its group cheap."""
    for amount, expected in [(0.6, (7, 1)), (1.0, (7, 5))]:
        model = chain()
        with torch.no_grad():
            for t in (model[0].weight, model[0].bias, model[1].weight, model[1].bias):
                t[1:] *= 1e-3
            model[3].weight[:, 1:] *= 1e-3
        prune_channels(model, X, amount, global_ranking=True)
        assert (len(dead_out(model, "0")), len(dead_out(model, "3"))) == expected
        assert 0 not in dead_out(model, "0")


def test_round_to_keeps_a_multiple() -> None:
    model = chain()
    prune_channels(model, X, 0.5, round_to=4)  # 8 -> keep 4; 6 -> keep 3, rounded up to 4
    assert len(dead_out(model, "0")) == 4 and len(dead_out(model, "3")) == 2


def test_bn_scale_prunes_the_smallest_gammas() -> None:
    model = chain()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([5.0, 0.1, 4.0, 0.2, 3.0, 0.3, 2.0, 0.4]))
    prune_channels(model, X, 0.5, importance="bn_scale")
    assert dead_out(model, "0") == {1, 3, 5, 7}
    assert dead_out(model, "3") == set()  # no BatchNorm in that group: left alone


def test_random_importance_is_seeded_by_torch() -> None:
    a, b = chain(), chain()
    torch.manual_seed(3)
    prune_channels(a, X, 0.5, importance="random")
    torch.manual_seed(3)
    prune_channels(b, X, 0.5, importance="random")
    assert torch.equal(mask(a, "0"), mask(b, "0"))


def test_l2_and_l1_agree_with_torch_ln_structured_on_a_lone_layer() -> None:
    """With one member carrying all the weight, group L_n ranking is torch's ln_structured."""
    for n, name in [(1, "l1"), (2, "l2")]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 10, bias=False), nn.ReLU(), nn.Linear(10, 3))
        with torch.no_grad():
            model[2].weight.fill_(1.0)  # equal columns: ranking decided by layer 0's rows
        oracle = nn.Linear(5, 10, bias=False)
        oracle.weight.data.copy_(model[0].weight.data)
        torch_prune.ln_structured(oracle, "weight", amount=0.4, n=n, dim=0)
        prune_channels(model, torch.randn(4, 5), 0.4, importance=name)
        assert torch.equal(mask(model, "0"), oracle.weight_mask != 0)


def test_callable_importance_decides() -> None:
    model = chain()

    def prefer_last(group: Group, m: nn.Module) -> torch.Tensor:
        return -torch.arange(group.size, dtype=torch.float64)

    prune_channels(model, X, 0.5, importance=prefer_last)
    assert dead_out(model, "0") == {4, 5, 6, 7} and dead_out(model, "3") == {3, 4, 5}
    with pytest.raises(PruningValueError, match="one score per unit"):
        prune_channels(chain(), X, 0.5, importance=lambda g, m: torch.zeros(g.size + 1))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"amount": 1.5}, PruningValueError),
        ({"amount": -1}, PruningValueError),
        ({"amount": "half"}, PruningTypeError),
        ({"amount": 0.5, "importance": "l3"}, PruningValueError),
        ({"amount": 0.5, "importance": 3}, PruningTypeError),
        ({"amount": 0.5, "round_to": 0}, PruningValueError),
        ({"amount": 0.5, "ignored_layers": [nn.Linear(1, 1)]}, PruningValueError),
        ({"amount": 0.5, "amounts": {"nope": 0.1}}, PruningValueError),
    ],
)
def test_bad_arguments_raise_before_touching_the_model(kwargs: dict, error: type) -> None:
    model = chain()
    with pytest.raises(error):
        prune_channels(model, X, **kwargs)
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())


def test_conflicting_amounts_in_one_group_raise() -> None:
    model = chain()
    with pytest.raises(PruningValueError, match="prune together"):
        prune_channels(model, X, 0.5, amounts={"0": 0.25, "1": 0.5})


def test_masks_are_bool_buffers_with_torch_keys() -> None:
    model = chain()
    prune_channels(model, X, 0.5)
    keys = set(model.state_dict())
    assert {"0.weight_orig", "0.weight_mask", "1.bias_orig", "3.weight_mask"} <= keys
    assert torch_prune.is_pruned(model)


def test_dead_units_and_masks_cover_every_index_of_a_unit() -> None:
    """A unit owning nine Linear columns behind a flatten: dead only when every entry of every member
    is zero (a NaN keeps it alive, as a count of non-zeros would), and masked on all nine columns."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 2))
    with torch.no_grad():
        for unit in (1, 2):
            model[0].weight[unit], model[0].bias[unit] = 0.0, 0.0
            model[3].weight[:, 9 * unit : 9 * unit + 9] = 0.0
        model[0].weight[2, 0, 0, 0] = float("nan")
    graph = trace(model, torch.randn(2, 3, 5, 5))
    group = next(g for g in graph.groups if g.prunable)
    columns = next(m for m in group.members if m.module == "3")
    assert group.size == 4 and columns.indices[2] == tuple(range(18, 27))
    assert _dead_units(model, graph, group).tolist() == [False, True, False, False]
    # the same from the tensors themselves, as for a tensor the trace did not keep
    graph.leaves.clear()
    assert _dead_units(model, graph, group).tolist() == [False, True, False, False]
    _write_masks(model, [(group, torch.tensor([0, 3]))])
    gone = torch.tensor([u in (0, 3) for u in range(4)])
    assert torch.equal(model[3].weight_mask, ~gone.repeat_interleave(9)[None, :].expand(2, 36))
    assert torch.equal(model[0].weight_mask, ~gone[:, None, None, None].expand(4, 3, 3, 3))
    assert torch.equal(model[0].bias_mask, ~gone)
