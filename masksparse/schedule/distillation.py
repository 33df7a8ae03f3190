"""Recovering a pruned model by distillation: train it to match the dense model on unlabelled data.

A structured-pruned encoder rarely has its training labels at hand, but the dense model it came from
is still there: :func:`masksparse.distill` trains the pruned (student) model to reproduce the dense (teacher)
model's outputs on whatever inputs are available, one optimizer step per batch. It runs alongside a
:class:`masksparse.GradualPruner` through ``callback`` (the pruner's ``step()`` after each optimizer
step), so a model can be pruned and recovered in the same loop without labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from typing import Any

import torch
from torch import nn

from masksparse._errors import PruningTypeError, PruningValueError
from masksparse._feed import Forward, batches, run_batch
from masksparse.criteria.calibration import _progress_bar
from masksparse.schedule.gradual import _check_optimizer

__all__ = ["distill", "distillation_loss"]

LOSSES = ("mse", "cosine", "kl")


def _first_tensor(output: Any) -> torch.Tensor:
    """The tensor a model's output is compared on: the output itself, the first value of a mapping or
    Hugging Face ``ModelOutput`` other than ``loss`` (``last_hidden_state``, ``logits``), or the first
    item of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        # a Hugging Face output fed labels opens with its .loss: the logits are what the teacher gives
        values = [v for k, v in output.items() if isinstance(v, torch.Tensor) and k != "loss"]
        if values:
            return values[0]
    elif isinstance(output, Sequence) and not isinstance(output, (str, bytes)):
        values = [v for v in output if isinstance(v, torch.Tensor)]
        if values:
            return values[0]
    raise PruningTypeError(
        f"distill compares tensors, and the model returned a {type(output).__name__} with none in it: "
        "pass outputs=fn(output, batch) -> tensor"
    )


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, loss: str = "mse", temperature: float = 1.0
) -> torch.Tensor:
    """How far the student's output is from the teacher's: ``"mse"`` (mean squared error),
    ``"cosine"`` (one minus the cosine along the last dimension, averaged) or ``"kl"`` (the
    Kullback-Leibler divergence of the temperature-softened distributions over the last dimension,
    times ``temperature**2``, as Hinton et al. scale it).

    Example:
        >>> import torch
        >>> from masksparse.schedule.distillation import distillation_loss
        >>> t = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> float(distillation_loss(t, t)), float(distillation_loss(2 * t, t, "cosine"))
        (0.0, 0.0)
    """
    if student.shape != teacher.shape:
        raise PruningValueError(
            f"distill: the student's output has shape {tuple(student.shape)} and the teacher's "
            f"{tuple(teacher.shape)}; they must match (a pruned model keeps its output width: prune with "
            "ignored_layers= on the output layer, or pass outputs= to compare something else)"
        )
    if loss == "mse":
        return nn.functional.mse_loss(student, teacher)
    if loss == "cosine":
        return (1 - nn.functional.cosine_similarity(student, teacher, dim=-1)).mean()
    if loss == "kl":
        log_p = nn.functional.log_softmax(student / temperature, dim=-1)
        q = nn.functional.log_softmax(teacher / temperature, dim=-1)
        kl = nn.functional.kl_div(
            log_p.flatten(0, -2), q.flatten(0, -2), log_target=True, reduction="batchmean"
        )
        return kl * temperature**2
    raise PruningValueError(
        f"distill: loss must be one of {', '.join(LOSSES)} or fn(student, teacher); got {loss!r}"
    )


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable[Any],
    *,
    steps: int | None = None,
    epochs: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-4,
    loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "mse",
    temperature: float = 1.0,
    outputs: Callable[[Any, Any], torch.Tensor] | None = None,
    forward: Forward | None = None,
    callback: Callable[[int, float], Any] | None = None,
    dropout: bool = False,
    progress: bool = False,
) -> list[float]:
    """Train ``student`` to reproduce ``teacher``'s outputs on ``data``; returns the loss of each step.

    The teacher runs in eval mode without gradients; the student in training mode (BatchNorm statistics
    follow the data) with its dropout off unless ``dropout=True``, one optimizer step per batch: matching
    a teacher is a regression, and dropout's noise only slows it. Both models are put back in the mode
    they were in, dropout probabilities included.

    Args:
        student: the model trained (a pruned, compacted or masked copy of the teacher).
        teacher: the model matched (the dense one); left unchanged.
        data: batches of inputs, no labels needed (a DataLoader, a list): a mapping is called
            ``model(**batch)``, a tuple positionally, a tensor as ``model(batch)`` (as calibration feeds
            them); ``forward`` overrides that (``forward=lambda m, b: m(b[0])`` for ``(inputs, labels)``
            batches).
        steps: stop after this many optimizer steps, going over ``data`` again as often as needed;
            without it, ``epochs`` passes over ``data``.
        epochs: passes over ``data`` when ``steps`` is not given.
        optimizer: the optimizer to step (one that trains the student's parameters: the one a
            :class:`masksparse.GradualPruner` slices, when pruning in the same loop); by default
            ``torch.optim.AdamW(student.parameters(), lr=lr)``.
        lr: the default optimizer's learning rate.
        loss: ``"mse"``, ``"cosine"``, ``"kl"`` (see :func:`distillation_loss`) or
            ``fn(student_output, teacher_output) -> scalar``.
        temperature: the softening of ``"kl"``.
        outputs: ``fn(output, batch) -> tensor``: what is compared (mean-pooled sentence embeddings,
            say); by default the output tensor, the first tensor of a mapping or Hugging Face output
            (``last_hidden_state``, ``logits``) or of a tuple.
        forward: ``forward(model, batch) -> output``, to feed batches another way.
        callback: ``fn(step, loss)`` after each optimizer step (``lambda step, loss: pruner.step()``).
        dropout: keep the student's dropout on while it trains (every ``nn.Dropout``-like module's
            probability is otherwise set to 0 for the run, which also silences attention dropout that
            reads ``self.dropout.p``).
        progress: a tqdm bar over the steps (when tqdm is installed).

    Returns:
        The loss of every step, in order.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from masksparse import distill
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> student = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> data = [torch.randn(32, 8) for _ in range(8)]
        >>> losses = distill(student, teacher, data, steps=200, lr=1e-2)
        >>> len(losses), losses[-1] < losses[0] / 5
        (200, True)
    """
    if student is teacher:
        raise PruningValueError(
            "distill: student and teacher are the same module; distil a copy of the teacher"
        )
    for name, value, low in (("steps", steps, 1), ("epochs", epochs, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise PruningValueError(f"distill: {name} must be an int >= {low}, got {value!r}")
    if not callable(loss) and loss not in LOSSES:
        raise PruningValueError(
            f"distill: loss must be one of {', '.join(LOSSES)} or fn(student, teacher); got {loss!r}"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
        raise PruningValueError(f"distill: temperature must be a positive number, got {temperature!r}")
    if not any(p.requires_grad for p in student.parameters()):
        raise PruningValueError(
            f"distill: the student ({type(student).__name__}) has no parameters that require grad to train"
        )
    if optimizer is None:
        optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
    else:
        _check_optimizer(student, optimizer, "distill", "student")
    if isinstance(data, (torch.Tensor, str, bytes, Mapping)) or not isinstance(data, Iterable):
        list(batches(data, "distill: data"))  # raises the library's message for a single batch
    pick = outputs or (lambda output, batch: _first_tensor(output))
    measure = loss if callable(loss) else lambda s, t: distillation_loss(s, t, loss, temperature)
    total = steps if steps is not None else epochs * len(data) if isinstance(data, Sized) else None
    bar = _progress_bar(progress, total, unit="step")
    modes = (student.training, teacher.training)
    teacher.eval()
    student.train()
    silenced = (
        [] if dropout else [m for m in student.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    )
    probabilities = [m.p for m in silenced]
    for m in silenced:
        m.p = 0.0
    losses: list[float] = []
    try:
        passes = 0
        while (steps is None and passes < epochs) or (steps is not None and len(losses) < steps):
            if passes > 0 and iter(data) is data:
                raise PruningValueError(
                    f"distill: data is an iterator, used up after {len(losses)} steps, and cannot be gone "
                    "over again; pass a list or a DataLoader, or fewer steps"
                )
            passes += 1
            for batch in batches(data, "distill: data"):
                with torch.no_grad():
                    target = pick(run_batch(teacher, batch, forward=forward), batch)
                step_loss = measure(pick(run_batch(student, batch, forward=forward), batch), target.detach())
                if not isinstance(step_loss, torch.Tensor) or step_loss.numel() != 1:
                    raise PruningValueError(
                        f"distill: the loss must be a scalar tensor, got {type(step_loss).__name__}"
                        + (
                            f" of shape {tuple(step_loss.shape)}"
                            if isinstance(step_loss, torch.Tensor)
                            else ""
                        )
                    )
                optimizer.zero_grad(set_to_none=True)
                step_loss.backward()
                optimizer.step()
                losses.append(float(step_loss.detach()))
                if bar is not None:
                    bar.update(1)
                if callback is not None:
                    callback(len(losses), losses[-1])
                if steps is not None and len(losses) == steps:
                    break
    finally:
        for m, p in zip(silenced, probabilities):
            m.p = p
        student.train(modes[0])
        teacher.train(modes[1])
        if bar is not None:
            bar.close()
    return losses
