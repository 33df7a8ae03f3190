"""Example inputs in every form (tensor, tuple, keyword mapping) and outputs of every shape (tuples,
dicts, dataclasses) through trace, prune_channels, compact and the report."""

from __future__ import annotations

from collections import UserDict
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from masksparse import (
    CompactionError,
    PruningTypeError,
    compact,
    plan_compaction,
    prune_channels,
    sparsity_report,
    trace,
)
from masksparse._inputs import model_inputs, output_tensors
from masksparse.compact import apply as compact_module
from tests.models import params

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Output:
    logits: torch.Tensor
    hidden: torch.Tensor | None = None


class KeywordModel(nn.Module):
    """Called as ``model(input_ids=..., scale=...)``, as Hugging Face models are; returns a dataclass."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 8)
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(
        self, input_ids: torch.Tensor, scale: float = 1.0, mask: torch.Tensor | None = None
    ) -> Output:
        h = self.embed(input_ids)
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        h = h + self.down(torch.relu(self.up(h))) * scale
        return Output(self.head(h), h)


def _inputs() -> dict[str, object]:
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    return {"input_ids": ids, "scale": 0.5, "mask": torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]])}


class BatchEncodingLike(UserDict):  # type: ignore[type-arg]
    """Hugging Face's BatchEncoding is a UserDict: a Mapping, not a dict."""


def test_model_inputs_forms() -> None:
    x = torch.randn(2)
    assert model_inputs(x) == ((x,), {})
    assert model_inputs([x, 3]) == ((x, 3), {})
    assert model_inputs(BatchEncodingLike(a=x)).kwargs == {"a": x}
    with pytest.raises(PruningTypeError, match="got str"):
        model_inputs("input_ids")
    with pytest.raises(PruningTypeError, match="keys must be str; got the key 0"):
        model_inputs({0: x})


def test_output_tensors_flattens_dataclasses_dicts_and_sequences() -> None:
    a, b, c = torch.zeros(1), torch.ones(2), torch.ones(3)
    got = output_tensors((Output(a, None), {"k": [b, "text", None]}, 4, c))
    assert [t.shape[0] for t in got] == [1, 2, 3]


@pytest.mark.parametrize("wrap", [dict, BatchEncodingLike])
def test_keyword_inputs_prune_and_compact(wrap: type) -> None:
    """prune_channels and compact take the inputs as ``model(**inputs)``; the dataclass output's fields
    are the model's outputs, never pruned, and both are compared."""
    model, inputs = KeywordModel(), wrap(_inputs())
    prune_channels(model, inputs, 0.5)
    assert int(model.up.weight_mask.any(1).sum()) == 8  # the hidden 16 units lose half
    small = compact(model, inputs)
    assert small.up.out_features == 8 and params(small) < params(model)
    ref, got = model(**inputs), small(**inputs)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.hidden, ref.hidden, rtol=1e-5, atol=1e-6)


def test_dataclass_outputs_are_model_outputs() -> None:
    """Every field of a dataclass output is a model output: its width stays (the residual stream
    ``hidden`` is returned, so the embedding's 8 features are never pruned)."""
    graph = trace(KeywordModel(), _inputs())
    assert len(graph.trace.outputs) == 2
    embed = [g for g in graph.groups if any(m.module == "embed" for m in g.members)]
    assert embed and all(not g.prunable and "output" in g.reason for g in embed)


def test_verification_compares_every_output_leaf(monkeypatch: pytest.MonkeyPatch) -> None:
    """A change in the second field of a dataclass output is caught, and the model left as it was."""
    model, inputs = KeywordModel(), _inputs()
    prune_channels(model, inputs, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply = compact_module._apply

    def broken(m: nn.Module, plan: object, optimizer: object, **kwargs: object) -> None:
        apply(m, plan, optimizer, **kwargs)  # type: ignore[arg-type]
        m.forward = lambda **kw: Output(KeywordModel.forward(m, **kw).logits, torch.zeros(2, 4, 8))  # type: ignore[method-assign]

    monkeypatch.setattr(compact_module, "_apply", broken)
    with pytest.raises(CompactionError, match="changed the model's output"):
        compact(model, inputs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plan_and_report_take_keyword_inputs() -> None:
    model, inputs = KeywordModel(), _inputs()
    prune_channels(model, inputs, 0.5)
    plan = plan_compaction(model, inputs)
    assert any(c.module == "up" and len(c.keep) == 8 for c in plan.cuts)
    report = sparsity_report(model, inputs)
    up = next(r for r in report.rows if r.name == "up.weight")
    assert up.macs == 2 * 4 * 16 * 8  # 2 x 4 tokens, every entry of the dense weight used once each
