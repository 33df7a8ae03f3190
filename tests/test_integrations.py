"""The Hugging Face Trainer and Lightning callbacks: the pruner steps once per optimizer step (gradient
accumulation counted in cycles), the trainer's own optimizer is attached and sliced as the model shrinks
in place, and a pruner on another model is refused before training."""

from __future__ import annotations

import tempfile

import pytest
import torch
from torch import nn

from masksparse import GradualPruner, PruningValueError


def _bert_classifier(transformers):
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def _hf_args(transformers, **kwargs):
    return transformers.TrainingArguments(
        tempfile.mkdtemp(), per_device_train_batch_size=4, report_to=[], use_cpu=True, save_strategy="no",
        logging_strategy="no", disable_tqdm=True, **kwargs,
    )  # fmt: skip


def test_hugging_face_trainer_prunes_and_compacts_with_its_own_optimizer():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from masksparse.schedule.integrations.huggingface import PruningCallback

    model = _bert_classifier(transformers)
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(0, 64, (10,), generator=g), "labels": torch.tensor(i % 3)}
        for i in range(64)
    ]
    example = {"input_ids": torch.randint(0, 64, (2, 10), generator=g)}
    pruner = GradualPruner(
        model, 0.5, begin=0, end=4, every=2, structured=True, example_inputs=example, compact=True,
        ignored_layers=[model.classifier],
    )  # fmt: skip
    ffn = model.bert.encoder.layer[0].intermediate.dense
    weight = ffn.weight
    trainer = transformers.Trainer(
        model=model, args=_hf_args(transformers, max_steps=6, gradient_accumulation_steps=2),
        train_dataset=data, callbacks=[PruningCallback(pruner)],
    )  # fmt: skip
    trainer.train()
    assert pruner.steps_taken == 6  # optimizer steps, not the 12 batches
    assert [h.step for h in pruner.history] == [2, 4]
    assert ffn.out_features == 32 and ffn.weight is weight and pruner.sparsity == 0.5
    assert pruner.optimizer is trainer.optimizer.optimizer  # Accelerate's wrapper unwrapped
    moments = trainer.optimizer.optimizer.state[weight]["exp_avg"]
    assert moments.shape == weight.shape == (32, 32)
    with torch.no_grad():
        logits = model(**example).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_hugging_face_callback_refuses_a_pruner_on_another_model():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from masksparse.schedule.integrations.huggingface import PruningCallback

    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    pruner = GradualPruner(other, 0.5, end=2)
    data = [{"input_ids": torch.randint(0, 64, (10,)), "labels": torch.tensor(0)} for _ in range(8)]
    trainer = transformers.Trainer(
        model=_bert_classifier(transformers), args=_hf_args(transformers, max_steps=1), train_dataset=data,
        callbacks=[PruningCallback(pruner)],
    )  # fmt: skip
    with pytest.raises(PruningValueError, match="neither is nor holds the pruner's model"):
        trainer.train()
    with pytest.raises(TypeError, match="takes a masksparse.GradualPruner"):
        PruningCallback(other)


def _lightning_module(lightning, optimizers: int = 1):
    class Classifier(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(
                nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3)
            )
            self.automatic_optimization = optimizers == 1

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            if optimizers > 1:
                for opt in self.optimizers():
                    opt.zero_grad()
                self.manual_backward(loss)
                for opt in self.optimizers():
                    opt.step()
            return loss

        def configure_optimizers(self):
            if optimizers == 1:
                return torch.optim.AdamW(self.parameters(), lr=1e-2)
            return [
                torch.optim.SGD(self.net[0].parameters(), lr=0.1),
                torch.optim.SGD(self.net[2].parameters(), lr=0.1),
            ]

    return Classifier()


def _loader():
    g = torch.Generator().manual_seed(0)
    dataset = torch.utils.data.TensorDataset(
        torch.randn(96, 8, generator=g), torch.randint(0, 3, (96,), generator=g)
    )
    return torch.utils.data.DataLoader(dataset, batch_size=8)


def _lightning_trainer(lightning, callback, **kwargs):
    return lightning.Trainer(
        callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", default_root_dir=tempfile.mkdtemp(), **kwargs,
    )  # fmt: skip


def test_lightning_prunes_and_compacts_with_its_own_optimizer_and_checkpoints_the_pruner():
    lightning = pytest.importorskip("lightning")
    from masksparse.schedule.integrations.lightning import PruningCallback

    module = _lightning_module(lightning)
    pruner = GradualPruner(
        module, 0.5, begin=0, end=4, every=2, structured=True, compact=True, example_inputs=torch.randn(2, 8)
    )
    callback = PruningCallback(pruner)
    first = module.net[0].weight
    trainer = _lightning_trainer(lightning, callback, max_steps=6, accumulate_grad_batches=2)
    trainer.fit(module, _loader())
    assert trainer.global_step == 6 and pruner.steps_taken == 6  # 12 batches, 6 optimizer steps
    assert [h.step for h in pruner.history] == [2, 4]
    assert (module.net[0].out_features, module.net[2].out_features) == (16, 8) and module.net[
        0
    ].weight is first
    optimizer = trainer.optimizers[0]
    assert pruner.optimizer is optimizer and optimizer.state[first]["exp_avg"].shape == (16, 8)
    state = callback.state_dict()
    resumed = PruningCallback(
        GradualPruner(module, 0.5, begin=0, end=4, every=2, structured=True, example_inputs=torch.randn(2, 8))
    )
    resumed.load_state_dict(state)
    assert resumed.pruner.steps_taken == 6 and resumed.pruner.history == pruner.history
    assert resumed.pruner.units == pruner.units


def test_lightning_callback_refuses_two_optimizers_when_compacting():
    lightning = pytest.importorskip("lightning")
    from masksparse.schedule.integrations.lightning import PruningCallback

    module = _lightning_module(lightning, optimizers=2)
    pruner = GradualPruner(
        module, 0.5, end=2, structured=True, compact=True, example_inputs=torch.randn(2, 8)
    )
    trainer = _lightning_trainer(lightning, PruningCallback(pruner), max_steps=2)
    with pytest.raises(PruningValueError, match="made 2 optimizers"):
        trainer.fit(module, _loader())
    assert module.net[0].out_features == 32  # nothing pruned
