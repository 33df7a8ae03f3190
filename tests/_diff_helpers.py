"""Shared machinery of the differential tests: toy layers, snapshots and module-vs-module comparisons.

The helpers take the two pruning namespaces as arguments, so the same comparison runs for any pair of
implementations; the tests pass ``torch.nn.utils.prune`` (the oracle) and ``masksparse.prune``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

# masksparse stores binary masks as torch.bool; a check that should hold for any drop-in turns this off.
BOOL_MASKS = True
# torch.nn.utils.prune itself can leave a model half-changed after an error; off only to try the
# harness against torch on both sides.
CHECK_UNCHANGED = True

LAYER_KINDS = (
    "Linear",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
)


def seed_cpu(seed: int) -> None:
    """``torch.manual_seed`` for the CPU generator alone (it skips CUDA's slow lazy-seeding bookkeeping)."""
    torch.default_generator.manual_seed(seed)


@dataclass(frozen=True)
class LayerSpec:
    """A small layer, fully determined by its fields (``seed`` fixes the initial weights)."""

    kind: str
    in_ch: int
    out_ch: int
    kernel: int = 1
    groups: int = 1
    bias: bool = True
    seed: int = 0
    dtype: str = "float32"

    @property
    def spatial(self) -> int:
        """Number of spatial dimensions (0 for Linear)."""
        return 0 if self.kind == "Linear" else int(self.kind[-2])

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the layer's tensors, computed without building it."""
        if self.kind == "Linear":
            weight: tuple[int, ...] = (self.out_ch, self.in_ch)
        elif self.kind.startswith("ConvTranspose"):
            weight = (self.in_ch, self.out_ch // self.groups) + (self.kernel,) * self.spatial
        else:
            weight = (self.out_ch, self.in_ch // self.groups) + (self.kernel,) * self.spatial
        shapes = {"weight": weight}
        if self.bias:
            shapes["bias"] = (self.out_ch,)
        return shapes

    def build(self) -> nn.Module:
        """Construct the layer with weights drawn from ``seed``."""
        seed_cpu(self.seed)
        dtype = getattr(torch, self.dtype)
        if self.kind == "Linear":
            return nn.Linear(self.in_ch, self.out_ch, bias=self.bias, dtype=dtype)
        cls = getattr(nn, self.kind)
        return cls(self.in_ch, self.out_ch, self.kernel, groups=self.groups, bias=self.bias, dtype=dtype)

    def example_input(self) -> torch.Tensor:
        """A fixed input batch of two samples."""
        gen = torch.Generator().manual_seed(self.seed + 1)
        shape = (2, self.in_ch) + (self.kernel + 1,) * self.spatial
        return torch.randn(shape, generator=gen, dtype=getattr(torch, self.dtype))


def binary(mask: torch.Tensor) -> bool:
    """Whether every entry of ``mask`` is 0 or 1."""
    return bool(((mask == 0) | (mask == 1)).all())


def is_container(hook: Any, ms: ModuleType) -> bool:
    """Whether ``hook`` is a PruningContainer of either implementation."""
    return isinstance(hook, (torch_prune.PruningContainer, ms.PruningContainer))


def hook_signature(module: nn.Module, ms: ModuleType) -> list[tuple[Any, ...]]:
    """Class names and tensor names of the pruning hooks, in registration order."""
    sig: list[tuple[Any, ...]] = []
    for hook in module._forward_pre_hooks.values():
        if not isinstance(hook, torch_prune.BasePruningMethod):
            sig.append(("not a BasePruningMethod", type(hook).__name__))
            continue
        children = tuple(type(c).__name__ for c in hook) if is_container(hook, ms) else None
        sig.append((type(hook).__name__, hook._tensor_name, children))
    return sig


def tensor_names(module: nn.Module) -> list[str]:
    """Names the user reads as ``module.<name>``: weight/bias, pruned or not."""
    names = [n for n in ("weight", "bias") if n in module._parameters or n + "_orig" in module._parameters]
    return [n for n in names if module._parameters.get(n, 0) is not None]


# --------------------------------------------------------------------------------------------------------
# Snapshots: "a call that fails leaves the model exactly as it was"


@dataclass
class ModuleSnapshot:
    """Everything observable about one module that a failed call must not touch."""

    cls: type
    params: list[tuple[str, int]]
    buffers: list[tuple[str, int]]
    state: list[tuple[str, torch.Tensor]]
    hooks: list[tuple[int, int, tuple[int, ...] | None]]
    effective: dict[str, torch.Tensor] = field(default_factory=dict)


def snapshot(model: nn.Module) -> dict[str, ModuleSnapshot]:
    """Record every submodule of ``model`` (identities, values, hooks)."""
    snaps = {}
    for path, mod in model.named_modules():
        hooks = []
        for key, hook in mod._forward_pre_hooks.items():
            children = tuple(id(c) for c in hook) if hasattr(hook, "_pruning_methods") else None
            hooks.append((key, id(hook), children))
        snaps[path] = ModuleSnapshot(
            cls=type(mod),
            params=[(n, id(p)) for n, p in mod._parameters.items()],
            buffers=[(n, id(b)) for n, b in mod._buffers.items()],
            state=[(k, v.detach().clone()) for k, v in mod.state_dict().items()],
            hooks=hooks,
            effective={n: getattr(mod, n).detach().clone() for n in tensor_names(mod)},
        )
    return snaps


def assert_unchanged(model: nn.Module, before: dict[str, ModuleSnapshot], what: str) -> None:
    """Fail if ``model`` differs from the snapshot ``before`` in any recorded way."""
    if not CHECK_UNCHANGED:
        return
    after = snapshot(model)
    assert list(after) == list(before), f"{what}: submodules changed"
    for path, old in before.items():
        new = after[path]
        where = f"{what}: module {path or '<root>'!r}"
        assert new.cls is old.cls, f"{where}: class changed from {old.cls} to {new.cls}"
        assert new.params == old.params, f"{where}: parameters changed {old.params} -> {new.params}"
        assert new.buffers == old.buffers, f"{where}: buffers changed {old.buffers} -> {new.buffers}"
        assert [k for k, _ in new.state] == [k for k, _ in old.state], f"{where}: state_dict keys changed"
        for (key, v_old), (_, v_new) in zip(old.state, new.state):
            assert v_new.dtype == v_old.dtype and torch.equal(v_new, v_old), f"{where}: {key} changed"
        assert new.hooks == old.hooks, f"{where}: forward pre-hooks changed {old.hooks} -> {new.hooks}"
        assert list(new.effective) == list(old.effective), f"{where}: readable tensors changed"
        for name, value in old.effective.items():
            assert torch.equal(new.effective[name], value), f"{where}: {name} changed value"


# --------------------------------------------------------------------------------------------------------
# Comparing a torch-pruned module with a masksparse-pruned one


def assert_masks_match(
    t_mask: torch.Tensor, m_mask: torch.Tensor, where: str, torch_made: bool = False
) -> None:
    """Masks equal by value; masksparse keeps binary masks as bool, others in torch's dtype.

    ``torch_made``: the mask was written by torch.nn.utils.prune and masksparse has not touched it since,
    so torch's dtype is fine too.
    """
    expected = torch.bool if binary(t_mask) and BOOL_MASKS else t_mask.dtype
    allowed = {expected, t_mask.dtype} if torch_made else {expected}
    assert m_mask.dtype in allowed, f"{where}: mask dtype {m_mask.dtype}, expected {expected}"
    assert m_mask.shape == t_mask.shape, f"{where}: mask shape {m_mask.shape} vs torch {t_mask.shape}"
    assert torch.equal(m_mask.to(t_mask.dtype), t_mask), (
        f"{where}: masks differ at {(m_mask.to(t_mask.dtype) != t_mask).nonzero().tolist()}"
    )


def assert_same_structure(tm: nn.Module, mm: nn.Module, ms: ModuleType, where: str) -> None:
    """Same class name, parameter/buffer/state_dict names in the same order, same hooks, same is_pruned."""
    assert type(mm).__name__ == type(tm).__name__, f"{where}: class name {type(mm).__name__}"
    assert isinstance(mm, type(tm)) or isinstance(tm, type(mm)), f"{where}: {type(mm)} vs {type(tm)}"
    t_params = [n for n, _ in tm.named_parameters()]
    m_params = [n for n, _ in mm.named_parameters()]
    assert m_params == t_params, f"{where}: parameters {m_params} vs torch {t_params}"
    t_bufs = [n for n, _ in tm.named_buffers()]
    m_bufs = [n for n, _ in mm.named_buffers()]
    assert m_bufs == t_bufs, f"{where}: buffers {m_bufs} vs torch {t_bufs}"
    t_keys, m_keys = list(tm.state_dict()), list(mm.state_dict())
    assert m_keys == t_keys, f"{where}: state_dict keys {m_keys} vs torch {t_keys}"
    t_hooks, m_hooks = hook_signature(tm, ms), hook_signature(mm, ms)
    assert m_hooks == t_hooks, f"{where}: pruning hooks {m_hooks} vs torch {t_hooks}"
    assert ms.is_pruned(mm) == torch_prune.is_pruned(tm), f"{where}: is_pruned differs"
    assert torch_prune.is_pruned(mm) == torch_prune.is_pruned(tm), f"{where}: torch is_pruned differs"


def assert_self_consistent(mm: nn.Module, where: str) -> None:
    """Every pruned tensor reads as ``<name>_orig * <name>_mask``."""
    for name in tensor_names(mm):
        if name + "_orig" in mm._parameters:
            orig, mask = mm._parameters[name + "_orig"], mm._buffers[name + "_mask"]
            expected = orig * mask.to(orig.dtype)
            assert torch.equal(getattr(mm, name), expected), f"{where}: {name} != {name}_orig * {name}_mask"


def forward_backward(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Output on ``x`` and the gradients of every parameter after a fixed linear loss."""
    for p in module.parameters():
        p.grad = None
    out = module(x)
    weights = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
    (out * weights).sum().backward()
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = None
    return out.detach(), grads


def assert_same_values(
    tm: nn.Module, mm: nn.Module, x: torch.Tensor | None, where: str, torch_made: frozenset[str] = frozenset()
) -> None:
    """Same state_dict values (masks by value), tensors, forward outputs and parameter gradients.

    ``torch_made``: names of tensors of ``mm`` last pruned by torch.nn.utils.prune (float masks allowed).
    """
    t_state, m_state = tm.state_dict(), mm.state_dict()
    for key, t_val in t_state.items():
        m_val = m_state[key]
        if key.endswith("_mask"):
            assert_masks_match(t_val, m_val, f"{where}: {key}", key.rsplit(".", 1)[-1][:-5] in torch_made)
        else:
            assert m_val.dtype == t_val.dtype and torch.equal(m_val, t_val), f"{where}: {key} differs"
    for name in tensor_names(tm):
        assert torch.equal(getattr(mm, name), getattr(tm, name)), f"{where}: module.{name} differs"
    if x is None:
        return
    t_out, t_grads = forward_backward(tm, x)
    m_out, m_grads = forward_backward(mm, x)
    assert torch.equal(m_out, t_out), f"{where}: forward outputs differ"
    assert list(m_grads) == list(t_grads)
    for name, t_grad in t_grads.items():
        m_grad = m_grads[name]
        assert (m_grad is None) == (t_grad is None), f"{where}: gradient of {name} present on one side only"
        if t_grad is not None:
            assert torch.equal(m_grad, t_grad), f"{where}: gradient of {name} differs"


def assert_params_kept(mm: nn.Module, originals: dict[str, nn.Parameter], where: str) -> None:
    """The Parameter objects of the unpruned layer are still the ones the module holds."""
    for name, param in originals.items():
        held = mm._parameters.get(name + "_orig", mm._parameters.get(name))
        assert held is param, f"{where}: {name} is no longer the original Parameter object"


# --------------------------------------------------------------------------------------------------------
# Running the same call on both sides


@dataclass
class Outcome:
    """What one side did: its exception (or None) and a few random numbers drawn after the call."""

    error: BaseException | None
    rng_after: torch.Tensor


def run_seeded(call: Any, seed: int) -> Outcome:
    """Run ``call()`` right after ``torch.manual_seed(seed)``; record its error and the RNG state after."""
    seed_cpu(seed)
    try:
        call()
    except Exception as exc:  # the error itself is what is compared
        return Outcome(exc, torch.rand(3))
    return Outcome(None, torch.rand(3))


def assert_error_parity(t_out: Outcome, m_out: Outcome, where: str) -> None:
    """masksparse raises exactly when torch raises, an instance of torch's exception type."""
    if t_out.error is None:
        assert m_out.error is None, f"{where}: masksparse raised {m_out.error!r}, torch did not"
        return
    t_type = type(t_out.error)
    assert m_out.error is not None, f"{where}: torch raised {t_out.error!r}, masksparse did not"
    assert isinstance(m_out.error, t_type), (
        f"{where}: masksparse raised {type(m_out.error).__name__}({m_out.error}), "
        f"torch raised {t_type.__name__}({t_out.error})"
    )


def twin(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Two independent deep copies: one for torch, one for masksparse."""
    return copy.deepcopy(model), copy.deepcopy(model)
