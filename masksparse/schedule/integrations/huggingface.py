"""A Hugging Face ``TrainerCallback`` that steps a :class:`masksparse.GradualPruner` with ``Trainer``.

``Trainer`` makes its own optimizer; the callback hands it to the pruner when training begins, so a
structured pruner with ``compact=True`` slices its state (Adam moments) as the model shrinks in place.
The pruner steps at every optimizer step (``on_step_end``: after the optimizer and the learning-rate
scheduler, once per gradient-accumulation cycle). To resume a run, save ``pruner.state_dict()``
beside the checkpoint and load it into the new pruner (a compacted model is saved with
:func:`masksparse.save_compacted`).

Example:
    >>> import tempfile, torch, transformers
    >>> from masksparse import GradualPruner
    >>> from masksparse.schedule.integrations.huggingface import PruningCallback
    >>> config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
    ...                                  num_attention_heads=4, intermediate_size=64, num_labels=2)
    >>> model = transformers.BertForSequenceClassification(config)
    >>> data = [{"input_ids": torch.randint(0, 64, (12,)), "labels": torch.tensor(i % 2)} for i in range(32)]
    >>> pruner = GradualPruner(model, 0.5, end=4, every=2, structured=True, compact=True,
    ...                        example_inputs={"input_ids": torch.randint(0, 64, (2, 12))})
    >>> args = transformers.TrainingArguments(tempfile.mkdtemp(), per_device_train_batch_size=8,
    ...     max_steps=4, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
    ...     disable_tqdm=True)
    >>> trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
    ...                                callbacks=[PruningCallback(pruner)])
    >>> _ = trainer.train()  # Trainer prints its metrics
    {'train_runtime': ...}
    >>> model.bert.encoder.layer[0].intermediate.dense.out_features, round(pruner.sparsity, 2)
    (32, 0.5)
"""

from __future__ import annotations

from typing import Any

from masksparse._errors import MissingDependencyError
from masksparse.schedule.gradual import GradualPruner
from masksparse.schedule.integrations import attach, check_model

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - the extra is installed where this is tested
    raise MissingDependencyError(
        "masksparse.schedule.integrations.huggingface needs transformers: "
        'pip install "masksparse[huggingface]"'
    ) from exc

__all__ = ["PruningCallback"]


class PruningCallback(TrainerCallback):
    """Call ``pruner.step()`` after every optimizer step of a ``transformers.Trainer``.

    Args:
        pruner: a :class:`masksparse.GradualPruner` on the model the Trainer trains (built without an
            optimizer: the Trainer's own is attached when training begins).
    """

    def __init__(self, pruner: GradualPruner) -> None:
        if not isinstance(pruner, GradualPruner):
            raise TypeError(f"PruningCallback takes a masksparse.GradualPruner, got {type(pruner).__name__}")
        self.pruner = pruner

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        check_model(self.pruner, kwargs.get("model"), "PruningCallback", "Trainer")
        attach(self.pruner, kwargs.get("optimizer"), "PruningCallback")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.pruner.step()
