"""A Lightning ``Callback`` that steps a :class:`masksparse.GradualPruner` with ``lightning.Trainer``.

Lightning makes the optimizer in ``configure_optimizers``; the callback hands it to the pruner when
training starts, so a structured pruner with ``compact=True`` slices its state as the model shrinks in
place. The pruner steps once per optimizer step (``trainer.global_step``, so gradient accumulation
counts cycles, not batches), and the pruner's state goes into Lightning's checkpoints with the
callback's ``state_dict``. Works with ``lightning`` (``lightning.pytorch``) or ``pytorch_lightning``.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> import lightning
    >>> from masksparse import GradualPruner
    >>> from masksparse.schedule.integrations.lightning import PruningCallback
    >>> class Classifier(lightning.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    ...     def forward(self, x):
    ...         return self.net(x)
    ...     def training_step(self, batch, batch_idx):
    ...         x, y = batch
    ...         return nn.functional.cross_entropy(self(x), y)
    ...     def configure_optimizers(self):
    ...         return torch.optim.Adam(self.parameters(), lr=1e-2)
    >>> module = Classifier()
    >>> pruner = GradualPruner(module, 0.5, end=6, every=3, structured=True, compact=True,
    ...                        example_inputs=torch.randn(2, 8))
    >>> data = torch.utils.data.DataLoader(
    ...     torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,))), batch_size=8)
    >>> trainer = lightning.Trainer(max_steps=8, callbacks=[PruningCallback(pruner)], logger=False,
    ...     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    ...     accelerator="cpu", default_root_dir=tempfile.mkdtemp())
    >>> trainer.fit(module, data)
    >>> module.net[0].out_features, pruner.sparsity
    (16, 0.5)
"""

from __future__ import annotations

from typing import Any

from masksparse._errors import MissingDependencyError, PruningValueError
from masksparse.schedule.gradual import GradualPruner
from masksparse.schedule.integrations import attach, check_model

try:
    from lightning.pytorch import Callback
except ImportError:
    try:
        from pytorch_lightning import Callback  # type: ignore[assignment]
    except ImportError as exc:  # pragma: no cover - the extra is installed where this is tested
        raise MissingDependencyError(
            'masksparse.schedule.integrations.lightning needs Lightning: pip install "masksparse[lightning]"'
        ) from exc

__all__ = ["PruningCallback"]


class PruningCallback(Callback):
    """Call ``pruner.step()`` after every optimizer step of a Lightning ``Trainer``.

    Args:
        pruner: a :class:`masksparse.GradualPruner` on the LightningModule (or a module inside it),
            built without an optimizer: the one ``configure_optimizers`` makes is attached when training
            starts.
    """

    def __init__(self, pruner: GradualPruner) -> None:
        if not isinstance(pruner, GradualPruner):
            raise TypeError(f"PruningCallback takes a masksparse.GradualPruner, got {type(pruner).__name__}")
        self.pruner = pruner
        self._seen: int | None = None  # the trainer's global step when the pruner last stepped

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        check_model(self.pruner, pl_module, "PruningCallback", "Lightning Trainer")
        optimizers = list(trainer.optimizers)
        if self.pruner.structured and self.pruner.compact and len(optimizers) != 1:
            raise PruningValueError(
                f"PruningCallback: configure_optimizers made {len(optimizers)} optimizers; a pruner that "
                "compacts in place slices the state of exactly one"
            )
        attach(self.pruner, optimizers[0] if optimizers else None, "PruningCallback")
        if self._seen is None:
            self._seen = trainer.global_step

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        seen = trainer.global_step if self._seen is None else self._seen
        for _ in range(trainer.global_step - seen):  # one pruner step per optimizer step
            self.pruner.step()
        self._seen = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        """The pruner's ``state_dict()``, saved in Lightning's checkpoints."""
        return {"pruner": self.pruner.state_dict(), "seen": self._seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a checkpoint's :meth:`state_dict`."""
        self.pruner.load_state_dict(state_dict["pruner"])
        self._seen = state_dict.get("seen")
