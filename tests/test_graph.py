"""masksparse.graph: the trace records what ran, rules relate dimensions, groups couple the right slices.

The second half walks the rule registry: small models exercising every registered op are pruned by
prune_channels and compacted, and must compute exactly what their masked versions compute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from masksparse._errors import CompactionError
from masksparse.compact import compact, relative_error
from masksparse.graph import Graph, Group, register_rule, trace
from masksparse.graph import rules as rules_module
from masksparse.graph.record import record
from masksparse.graph.rules import registered_ops
from masksparse.structured import prune_channels
from tests import cases_attention, cases_layers
from tests.models import ChannelCumsum


def _group_with(graph: Graph, module: str, tensor: str, dim: int) -> Group:
    found = [
        g
        for g in graph.groups
        if any((m.module, m.tensor, m.dim) == (module, tensor, dim) for m in g.members)
    ]
    assert len(found) == 1, f"{module}.{tensor} dim {dim} is in {len(found)} groups"
    return found[0]


def _members(group: Group) -> set[tuple[str, str, int]]:
    return {(m.module, m.tensor, m.dim) for m in group.members}


class Branchy(nn.Module):
    """Python control flow: only the branch the input selects runs, so only it is traced."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if x.shape[0] > 2 else self.b(x)


def test_trace_records_ops_module_paths_and_parameters() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    t = record(model, torch.randn(1, 1, 4, 4))
    ops = [(str(n.op), n.module) for n in t.nodes]
    assert ("aten.convolution.default", "0") in ops
    assert ("aten.addmm.default", "3") in ops
    conv = next(n for n in t.nodes if n.module == "0")
    assert [v.source for v in conv.inputs[1:]] == [("0", "weight"), ("0", "bias")]
    assert t.module_outputs["3"] is t.outputs[0]
    assert t.inputs[0].shape == (1, 1, 4, 4)


def test_trace_follows_python_control_flow_and_warns_of_parameters_it_never_used() -> None:
    model = Branchy()
    with pytest.warns(UserWarning, match=r"b\.weight, b\.bias take no part in the run"):
        t = record(model, torch.randn(3, 4))
    assert {n.module for n in t.nodes} == {"a"} and t.unused == (("b", "weight"), ("b", "bias"))
    with pytest.warns(UserWarning, match=r"a\.weight, a\.bias take no part"):
        assert {n.module for n in record(model, torch.randn(1, 4)).nodes} == {"b"}


def test_trace_changes_nothing_and_restores_training_mode() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace(model, torch.randn(2, 3, 6, 6))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model[0]._forward_pre_hooks and not model[0]._forward_hooks


def test_conv_bn_relu_chain_is_one_group() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    graph = trace(model, torch.randn(1, 3, 8, 8))
    group = _group_with(graph, "0", "weight", 0)
    assert group.prunable and group.size == 8
    assert _members(group) == {
        ("0", "weight", 0), ("0", "bias", 0), ("1", "weight", 0), ("1", "bias", 0),
        ("1", "running_mean", 0), ("1", "running_var", 0), ("3", "weight", 1),
    }  # fmt: skip
    assert all(m.indices == tuple((i,) for i in range(8)) for m in group.members)
    assert not _group_with(graph, "0", "weight", 1).prunable  # the model input's channels
    assert "model output" in _group_with(graph, "3", "weight", 0).reason


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.branch = nn.Conv2d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = y + self.bn(self.branch(F.relu(y)))
        return self.head(F.relu(y))


def test_residual_add_couples_both_sides() -> None:
    graph = trace(Residual(), torch.randn(1, 3, 5, 5))
    group = _group_with(graph, "stem", "weight", 0)
    assert {
        ("branch", "weight", 0),
        ("branch", "weight", 1),
        ("bn", "weight", 0),
        ("head", "weight", 1),
    } <= _members(group)
    assert group.size == 6 and group.prunable


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Conv2d(3, 4, 1)
        self.right = nn.Conv2d(3, 5, 1)
        self.head = nn.Conv2d(9, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.left(x), self.right(x)], dim=1))


def test_concat_ties_each_input_at_its_offset() -> None:
    graph = trace(Concat(), torch.randn(1, 3, 4, 4))
    left, right = _group_with(graph, "left", "weight", 0), _group_with(graph, "right", "weight", 0)
    head_of = {g: next(m for m in g.members if m.module == "head") for g in (left, right)}
    assert head_of[left].indices == tuple((i,) for i in range(4))
    assert head_of[right].indices == tuple((4 + i,) for i in range(5))


def test_flatten_into_linear_maps_a_channel_to_a_block_of_features() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    graph = trace(model, torch.randn(2, 1, 5, 5))
    group = _group_with(graph, "0", "weight", 0)
    fc = next(m for m in group.members if m.module == "3")
    assert fc.dim == 1 and fc.indices == tuple(tuple(range(9 * c, 9 * c + 9)) for c in range(4))


def test_linear_on_a_sequence_is_traced_through_its_reshapes() -> None:
    model = nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 6))
    graph = trace(model, torch.randn(2, 7, 6))
    group = _group_with(graph, "0", "weight", 0)
    assert group.prunable and _members(group) == {("0", "weight", 0), ("0", "bias", 0), ("2", "weight", 1)}


def test_layer_norm_dims_are_kept_with_the_reason() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    group = _group_with(trace(model, torch.randn(2, 6)), "0", "weight", 0)
    assert not group.prunable and "native_layer_norm" in group.reason


def test_grouped_conv_keeps_outputs_and_depthwise_conv_passes_channels() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 3, groups=2))
    graph = trace(model, torch.randn(1, 4, 9, 9))
    unit = _group_with(graph, "0", "weight", 0)
    assert {("1", "weight", 0), ("2", "weight", 1)} <= _members(unit)
    # The grouped conv (2 groups of 4) reads column j in both groups: channels j and 4 + j go together.
    assert unit.prunable and unit.size == 4
    assert next(m for m in unit.members if m.module == "1").indices == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert "grouped" in _group_with(graph, "2", "weight", 0).reason


def test_slice_along_channels_blocks_them() -> None:
    class Slicer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)[:, :4].sum()

    group = _group_with(trace(Slicer(), torch.randn(1, 3, 2, 2)), "conv", "weight", 0)
    assert not group.prunable and "sliced" in group.reason


def test_an_op_without_a_rule_is_named_on_the_groups_it_touches() -> None:
    graph = trace(ChannelCumsum(), torch.randn(1, 3, 2, 2))
    group = _group_with(graph, "a", "weight", 0)
    assert not group.prunable and "aten.cumsum" in group.reason and "has no rule" in group.reason
    assert "ops without a rule" in repr(graph)


@pytest.fixture
def restore_rules() -> Iterator[None]:
    saved = dict(rules_module._RULES)
    yield
    rules_module._RULES.clear()
    rules_module._RULES.update(saved)


def test_register_rule_teaches_a_new_op(restore_rules: None) -> None:
    @register_rule(torch.ops.aten.cumsum)
    def _cumsum(node, rel):  # type: ignore[no-untyped-def]
        x, out = node.inputs[0], node.outputs[0]
        for d in range(x.ndim):
            rel.tie(x, d, out, d)
        rel.block(x, node.args[1], "a running sum mixes its dimension")

    group = _group_with(trace(ChannelCumsum(), torch.randn(1, 3, 2, 2)), "a", "weight", 0)
    assert not group.prunable and group.reason == "a running sum mixes its dimension"


# ------------------------------------------------ branches that run only in training; restrides


class AuxNet(nn.Module):
    """GoogLeNet-style: an auxiliary classifier that only runs in training reads the trunk's channels.

    ``p`` is its functional dropout (0 makes training mode deterministic); training mode also writes
    the ``calls`` buffer, as BatchNorm writes its statistics.
    """

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.p = p
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.aux = nn.Sequential(
            nn.AdaptiveAvgPool2d(2), nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
            nn.Linear(24, 3),
        )  # fmt: skip
        self.body = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5),
            nn.Linear(8, 3),
        )  # fmt: skip
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        y = self.stem(x)
        out = self.body(y)
        if not self.training:
            return out
        self.calls += 1
        return out, self.aux(F.dropout(y, self.p, training=True))


def test_a_branch_that_runs_only_in_training_joins_the_groups_it_reads() -> None:
    torch.manual_seed(0)
    graph = trace(AuxNet(), torch.randn(2, 3, 8, 8))
    trunk = _group_with(graph, "stem.0", "weight", 0)
    assert trunk.prunable and trunk.size == 8
    assert {("stem.1", "weight", 0), ("aux.1", "weight", 1), ("body.0", "weight", 1)} <= _members(trunk)
    aux = _group_with(graph, "aux.1", "weight", 0)
    assert aux.prunable and {("aux.2", "weight", 0), ("aux.5", "weight", 1)} <= _members(aux)
    assert next(m for m in aux.members if m.module == "aux.5").indices[1] == (4, 5, 6, 7)
    assert "model output" in _group_with(graph, "aux.5", "weight", 0).reason  # the auxiliary logits
    # Only what training mode does differently joins the trace: the trunk is recorded once.
    nodes = graph.trace.nodes
    assert all(n.training for n in nodes if n.module.startswith("aux"))
    assert not any(n.training for n in nodes if n.module.startswith(("stem", "body")))
    assert graph.trace.unused == () and len(graph.trace.output_tensors) == 1


def test_the_training_mode_run_leaves_the_model_as_it_was() -> None:
    torch.manual_seed(0)
    model = AuxNet().train()
    model.stem[1].eval()  # mixed modes come back exactly
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    rng = torch.get_rng_state()
    trace(model, x)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # calls, BN statistics
    assert torch.equal(torch.get_rng_state(), rng)  # the dropout's noise drew nothing for good


def test_compaction_shrinks_the_training_branch_and_matches_in_both_modes() -> None:
    torch.manual_seed(0)
    model, x = AuxNet(), torch.randn(4, 3, 8, 8)
    prune_channels(model, x, 0.5)
    small = compact(model, x)
    assert small.aux[1].in_channels == small.stem[0].out_channels == small.body[0].in_channels == 4
    assert small.aux[1].out_channels == 3 and small.aux[5].in_features == 12
    assert isinstance(small, AuxNet)
    with torch.no_grad():
        assert relative_error(model.eval()(x), small.eval()(x)) <= 1e-5
        # Training mode, dropout off (the two models' noise differs in shape); BatchNorm on batch
        # statistics: the removed channels are zero in the masked model whatever the mode.
        for m in (model, small):
            m.p, m.body[4].p = 0.0, 0.0
        for a, b in zip(model.train()(x), small.train()(x)):
            assert relative_error(a, b) <= 1e-5


def test_a_failing_training_mode_run_is_named_and_changes_nothing() -> None:
    class NeedsTargets(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.aux = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                raise ValueError("targets are required in training mode")
            return self.fc(x)

    model = NeedsTargets().train()
    with pytest.raises(CompactionError, match=r"aux\.weight, aux\.bias take no part.*targets are required"):
        trace(model, torch.randn(2, 4))
    assert model.training and not model.fc._forward_hooks


class PooledTokens(nn.Module):
    """Swin's head: channels-last tokens permuted to (N, C, H, W) and pooled to 1x1, which restrides the
    fresh (N, C, 1, 1) result to channels-last in place (``as_strided_``)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.proj(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.head(torch.flatten(self.pool(y), 1))


class Restrided(nn.Module):
    """``as_strided`` with the tensor's own layout (a no-op), or reading it as channels-last (moves data)."""

    def __init__(self, moves: bool = False) -> None:
        super().__init__()
        self.moves = moves
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        n, c, h, w = y.shape
        stride = (c * h * w, 1, w * c, c) if self.moves else y.stride()
        return self.head(y.as_strided(y.shape, stride))


def test_a_restride_that_keeps_every_element_in_place_passes_channels() -> None:
    graph = trace(PooledTokens(), torch.randn(2, 3, 4, 4))
    assert "aten.as_strided_.default" in {str(n.op) for n in graph.trace.nodes}
    group = _group_with(graph, "proj", "weight", 0)
    assert group.prunable and _members(group) == {
        ("proj", "weight", 0),
        ("proj", "bias", 0),
        ("head", "weight", 1),
    }
    assert _group_with(trace(Restrided(), torch.randn(1, 3, 4, 4)), "conv", "weight", 0).prunable


def test_a_restride_that_moves_elements_keeps_the_channels() -> None:
    torch.manual_seed(0)
    model, x = Restrided(moves=True), torch.randn(1, 3, 4, 4)
    group = _group_with(trace(model, x), "conv", "weight", 0)
    assert not group.prunable and "restrided" in group.reason and "moves elements" in group.reason
    prune_channels(model, x, 0.5)  # nothing prunable: the masks stay full
    small = compact(model, x)
    assert small.conv.out_channels == 8
    with torch.no_grad():
        assert relative_error(model(x), small(x)) <= 1e-6


# ----------------------------------------------------------------------------- every rule, exercised


def _seq(*mid: nn.Module, c_in: int = 3, c: int = 8, c_out: int = 4) -> nn.Sequential:
    """conv 1x1 (c_in -> c) -> mid -> conv 1x1 (c -> c_out): the middle decides what is exact."""
    return nn.Sequential(nn.Conv2d(c_in, c, 1), *mid, nn.Conv2d(c, c_out, 1))


class Lambda(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)
        self.head = nn.Linear(c, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))
        y = y * torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class Tokens(nn.Module):
    """Linear layers on (batch, tokens, features) and an attention-like bmm over the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 12)
        self.down = nn.Linear(12, 6, bias=False)
        self.q, self.k = nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(F.gelu(self.up(x)))
        scores = torch.softmax(torch.bmm(self.q(h), self.k(h).transpose(1, 2)), dim=-1)
        return torch.bmm(scores, h)


class Permuted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).permute(0, 2, 3, 1).contiguous()
        y = y.view(-1, y.shape[-1])  # sizes read off the tensor, so they follow the compaction
        return self.fc(F.relu(y)).unsqueeze(0).squeeze(0)


class Pieces(nn.Module):
    """Slicing, splitting, selecting and padding along channels: all keep the channels whole."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        a, b = torch.split(y, 4, dim=1)
        c = F.pad(y[:, 2:6], (1, 1)) [..., 1:-1] + a + b.select(1, 0).unsqueeze(1)  # fmt: skip
        return self.head(c) + torch.cat(list(torch.chunk(y, 2, 1)), 1).sum(1, keepdim=True)


class Summed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).sum(1) + self.conv(x).amax((2, 3), keepdim=True).mean(1, keepdim=True)


class Expanded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head(y * self.scale.expand(y.shape[0], -1, -1, -1) - torch.zeros_like(y))


class Filled(nn.Module):
    """Tensors holding one value, made in forward at the width of what they meet (T5's zero position
    bias): they shrink with it. ``literal`` writes the width as a number instead: verification then
    fails and the channels are kept, exactly."""

    def __init__(self, literal: bool = False) -> None:
        super().__init__()
        self.literal = literal
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        shape = (1, 8 if self.literal else y.shape[1], 1, 1)
        return self.head(y * torch.ones(shape) + torch.zeros(shape) + torch.full(shape, 0.5))


class FusedGateUp(nn.Module):
    """Phi-3's MLP: one projection makes gate and up, ``chunk(2)`` parts them, ``up * act(gate)``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up = nn.Linear(6, 2 * 10)
        self.down = nn.Linear(10, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return x + self.down(up * nn.functional.silu(gate))


def test_chunked_parts_lose_the_same_units() -> None:
    """Invariant: unit j of a chunked fused projection is row j of every part; compaction keeps the
    parts equal, so chunk(2) still parts gate from up."""
    torch.manual_seed(0)
    model = FusedGateUp().eval()
    x = torch.randn(3, 4, 6)
    prune_channels(model, x, 0.5)
    rows = model.gate_up.weight_mask.any(1)
    assert int(rows.sum()) == 10 and torch.equal(rows[:10], rows[10:])
    small = compact(model, x)
    assert (small.gate_up.out_features, small.down.in_features) == (10, 5)
    with torch.no_grad():
        assert relative_error(model(x), small(x)) <= 1e-6


class Shifted(nn.Module):
    """Swin-style pieces: a roll over space, a bias table indexed by a buffer, a tensor made in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.table = nn.Parameter(torch.randn(5, 8))
        self.register_buffer("idx", torch.tensor([0, 4, 2, 1, 3, 0, 1, 2]))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.roll(self.conv(x), 1, dims=(2,))
        y = y + self.table[self.idx].t()[None, :, None, :]
        return self.head(y * y.new_zeros(1).fill_(2.0))


class Embedded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.embed(x))).sum(1)


class Attention(nn.Module):
    """Self-attention with a fused qkv projection reshaped to (B, N, 3, heads, head_dim)."""

    def __init__(self, dim: int = 12, num_heads: int = 2, head_dim: int = 3) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class SelfAttention(nn.Module):
    """Linear -> nn.MultiheadAttention (fused kernel, 4 heads) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(8, 16), nn.Linear(16, 3)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(self.attn(h, h, h, need_weights=False)[0])


def test_a_fused_qkv_attention_groups_whole_heads() -> None:
    """One unit is one head: its q, k and v rows of the qkv projection and its columns of the output
    projection; the head size and the 3 of (q, k, v) are kept whole."""
    graph = trace(Attention(num_heads=4), torch.randn(2, 5, 12))
    group = _group_with(graph, "qkv", "weight", 0)
    assert group.prunable and group.size == 4
    assert _members(group) == {("qkv", "weight", 0), ("qkv", "bias", 0), ("proj", "weight", 1)}
    qkv = next(m for m in group.members if m.tensor == "weight" and m.module == "qkv")
    assert qkv.indices[1] == (3, 4, 5, 15, 16, 17, 27, 28, 29)  # head 1 of q, of k and of v
    proj = next(m for m in group.members if m.module == "proj")
    assert proj.indices[1] == (3, 4, 5)


def test_a_reshape_follows_the_part_nothing_else_fixes() -> None:
    """(B, C) merged into B*C for instance norm: the batch is fixed by the input, the channels follow."""
    graph = trace(_seq(nn.InstanceNorm2d(8, affine=True)), torch.randn(2, 3, 5, 5))
    group = _group_with(graph, "0", "weight", 0)
    assert group.prunable and ("1", "weight", 0) in _members(group)


def _layer_norm_channels(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.transpose(1, 3), (x.shape[1],)).transpose(1, 3)


def _tiny_swin() -> nn.Module:
    return torchvision.models.swin_transformer.SwinTransformer([4, 4], 8, [2], [2], [4, 4], num_classes=3)


def _tiny_maxvit() -> nn.Module:
    return torchvision.models.maxvit.MaxVit(
        (16, 16), 8, 2, [8], [1], head_dim=4, stochastic_depth_prob=0.0, num_classes=3
    )


def _cases() -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], bool]]:
    """name -> (model factory, input shape, whether compaction must shrink it)."""
    acts = {
        "relu": nn.ReLU(), "relu6": nn.ReLU6(inplace=True), "silu": nn.SiLU(), "gelu": nn.GELU(),
        "hardswish": nn.Hardswish(inplace=True), "hardsigmoid": nn.Hardsigmoid(), "sigmoid": nn.Sigmoid(),
        "tanh": nn.Tanh(), "leaky_relu": nn.LeakyReLU(0.1), "elu": nn.ELU(), "prelu": nn.PReLU(8),
        "mish": nn.Mish(), "dropout": nn.Dropout(0.3), "identity": nn.Identity(),
    }  # fmt: skip
    cases: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], bool]] = {
        f"act_{k}": (lambda a=a: _seq(a), (2, 3, 5, 5), True) for k, a in acts.items()
    }
    img = (2, 3, 8, 8)
    cases.update(
        maxpool=(lambda: _seq(nn.MaxPool2d(3, 2, 1)), img, True),
        avgpool_padded=(lambda: _seq(nn.AvgPool2d(3, 1, 1)), img, True),
        adaptive=(lambda: _seq(nn.AdaptiveAvgPool2d(2), nn.AdaptiveMaxPool2d(1)), img, True),
        upsample=(lambda: _seq(nn.Upsample(scale_factor=2), nn.Upsample(scale_factor=2, mode="bilinear")),
                  img, True),
        batchnorm=(lambda: _seq(nn.BatchNorm2d(8), nn.ReLU()), img, True),
        groupnorm=(lambda: _seq(nn.GroupNorm(2, 8)), img, False),
        instancenorm=(lambda: _seq(nn.InstanceNorm2d(8, affine=True)), img, True),
        layernorm_channels=(lambda: _seq(Lambda(_layer_norm_channels)), img, False),
        softmax_channels=(lambda: _seq(nn.Softmax(dim=1)), img, False),
        conv_grouped=(lambda: _seq(nn.Conv2d(8, 8, 3, padding=1, groups=2)), img, True),
        conv_depthwise_x2=(lambda: nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 16, 3, groups=8), nn.ReLU(),
                                                 nn.Conv2d(16, 4, 1)), img, True),
        conv_transposed=(lambda: nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.ConvTranspose2d(8, 6, 2, 2),
                                               nn.ReLU(), nn.Conv2d(6, 2, 1)), img, True),
        conv1d=(lambda: nn.Sequential(nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(2),
                                      nn.Conv1d(8, 2, 1)), (2, 3, 9), True),
        conv3d=(lambda: nn.Sequential(nn.Conv3d(3, 8, 1), nn.ReLU(), nn.AvgPool3d(2), nn.Conv3d(8, 2, 1)),
                (1, 3, 4, 4, 4), True),
        squeeze_excite=(SqueezeExcite, img, True),
        tokens=(Tokens, (2, 5, 6), True),
        permuted=(Permuted, (1, 3, 4, 4), True),
        pieces=(Pieces, img, False),
        summed=(Summed, img, False),
        expanded=(Expanded, img, True),
        filled=(Filled, img, True),
        fused_gate_up=(FusedGateUp, (2, 5, 6), True),
        filled_literal=(lambda: Filled(literal=True), img, False),
        shifted=(Shifted, img, True),
        embedding=(Embedded, (2, 5), True),
        attention=(Attention, (2, 5, 12), True),
        multihead_attention=(SelfAttention, (2, 5, 8), True),
        batchnorm1d_linear=(lambda: nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(),
                                                  nn.Linear(10, 3, bias=False)), (4, 6), True),
        aux_head=(AuxNet, img, True),
        pooled_tokens=(PooledTokens, img, True),
        restrided=(Restrided, img, True),
        swin_attention=(_tiny_swin, (1, 3, 16, 16), True),
        maxvit_attention=(_tiny_maxvit, (1, 3, 16, 16), True),
    )  # fmt: skip
    return cases


# the cases of the layer and attention rules live in files of their own
CASES = {**_cases(), **cases_layers.CASES, **cases_attention.CASES}
# Registered ops that the cases above do not reach, and why that is acceptable.
NOT_EXERCISED = {
    # aliases the dispatcher rewrites or only other call paths produce (training mode, other dtypes,
    # composite ops that reach the dispatcher already decomposed)
    "reshape", "flatten", "lift_fresh", "_to_copy", "contiguous", "numpy_T",
    "dropout", "feature_dropout", "alpha_dropout", "chunk", "unsafe_split", "split_with_sizes",
    "_native_batch_norm_legit", "_native_batch_norm_legit_no_training", "_log_softmax", "where",
    "masked_fill", "rsub", "gelu_", "mish_", "threshold_", "ones_like", "full_like",
    "rand_like",
    "amin", "max", "min", "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "avg_pool1d",
    "adaptive_avg_pool1d", "adaptive_max_pool1d", "adaptive_avg_pool2d", "_adaptive_avg_pool3d",
    "adaptive_max_pool3d", "max_pool3d_with_indices", "upsample_nearest1d", "upsample_nearest3d",
    "_upsample_nearest_exact2d", "upsample_linear1d", "upsample_bicubic2d", "upsample_trilinear3d",
    "hardswish", "fill", "new_empty", "new_full", "new_ones",
    # random fills other than dropout's bernoulli_ (noise layers in training mode)
    "bernoulli", "uniform_", "normal_", "exponential_",
}  # fmt: skip


def _name(op: object) -> str:
    return str(op).split(".")[1] if str(op).startswith("aten.") else str(op)


@pytest.mark.parametrize("name", sorted(CASES))
def test_prune_and_compact_is_exact(name: str) -> None:
    factory, shape, shrinks = CASES[name]
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randint(0, 10, shape) if name == "embedding" else torch.randn(*shape)
    prune_channels(model, x, 0.5)
    small = compact(model, x)
    with torch.no_grad():
        assert relative_error(model(x), small(x)) <= 1e-5
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in small.parameters())
    assert (after < before) == shrinks, f"{name}: {before} -> {after} parameters"


def test_every_registered_rule_is_exercised() -> None:
    seen = set()
    for factory, shape, _ in CASES.values():
        torch.manual_seed(0)
        x = torch.randint(0, 10, shape) if factory is Embedded else torch.randn(*shape)
        seen |= {_name(n.op.overloadpacket) for n in record(factory().eval(), x).nodes}
    registered = {
        _name(getattr(op, "overloadpacket", op))
        for op, rule in registered_ops().items()
        if rule.relate.__module__
        in ("masksparse.graph.layout", "masksparse.graph.layers")  # not users' rules
    }
    missing = registered - seen - NOT_EXERCISED
    assert not missing, f"registered rules no test case reaches: {sorted(missing)}"
    stale = NOT_EXERCISED & seen
    assert not stale, f"listed as not exercised but reached: {sorted(stale)}"


def test_every_registered_slicer_is_exercised() -> None:
    from masksparse.compact.slicers import _SLICERS

    modules = [m for factory, _, _ in CASES.values() for m in factory().modules()]
    # timm's EvaAttention (registered once timm's eva module is in use) has its own tests:
    # tests/test_timm_attention.py
    missing = [
        t.__name__
        for t in _SLICERS
        if not t.__module__.startswith("timm.") and not any(isinstance(m, t) for m in modules)
    ]
    assert not missing, f"slicers no test case reaches: {missing}"
