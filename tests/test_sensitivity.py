"""sensitivity(): each layer alone, at each amount, scored by the user's function, and the model put
back exactly; amounts_from_sensitivity() reads the table."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from masksparse import PruningTypeError, PruningValueError, amounts_from_sensitivity, prune, sensitivity


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))


@pytest.mark.parametrize("structured", [False, True])
def test_each_layer_alone_and_the_model_restored(structured):
    model, x = _model(), torch.randn(64, 6)
    prune.l1_unstructured(model[2], "weight", amount=0.25)  # one layer pruned already: kept as it is
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y = model(x).detach()
    seen = []

    def evaluate(m: nn.Module) -> float:
        zero = {
            n: float((mod.weight == 0).float().mean())
            for n, mod in m.named_modules()
            if isinstance(mod, nn.Linear)
        }
        seen.append(zero)
        return -float((m(x) - y).pow(2).mean())

    table = sensitivity(model, evaluate, amounts=(0.0, 0.5), structured=structured)
    assert table.baseline == 0.0 and table.scores["0"][0] == 0.0
    assert all(table.scores[n][1] < 0 for n in ("0", "2", "4"))
    # the call for layer "0" at 50% saw only layer "0" pruned (and "2" at its own 25%)
    assert seen[2] == {"0": 0.5, "2": 0.25, "4": 0.0}
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not hasattr(model[0], "weight_mask") and torch.equal(model(x), y)
    assert "baseline" in str(table) and "50%" in str(table)


def test_amounts_from_the_table_and_bad_input():
    model, x = _model(), torch.randn(64, 6)
    y = model(x).detach()
    table = sensitivity(
        model, lambda m: -float((m(x) - y).pow(2).mean()), amounts=(0.1, 0.3, 0.6), layers=["4"]
    )
    amounts = amounts_from_sensitivity(table, tolerance=1e9)
    assert amounts == {"4": 0.6} and amounts_from_sensitivity(table, tolerance=0.0)["4"] <= 0.1
    with pytest.raises(PruningValueError, match="amounts must be fractions"):
        sensitivity(model, lambda m: 0.0, amounts=(1.0,))
    with pytest.raises(PruningTypeError, match="not a Linear or Conv"):
        sensitivity(model, lambda m: 0.0, layers=["1"])
