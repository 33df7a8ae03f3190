"""masksparse.distill: a pruned model trained to match the dense one on unlabelled inputs gets closer to
it on held-out inputs; the teacher is untouched, modes and dropout are put back, and a GradualPruner runs
from the same loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import masksparse
from masksparse import GradualPruner, PruningTypeError, PruningValueError, distill
from masksparse.compact import relative_error
from masksparse.schedule.distillation import distillation_loss


def _teacher() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(10, 48), nn.ReLU(), nn.Dropout(0.3), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 6)
    )  # fmt: skip


def _data(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 10, generator=g) for _ in range(n)]


def _pruned(teacher: nn.Module, amount: float = 0.6) -> nn.Module:
    student = copy.deepcopy(teacher)
    x = torch.randn(4, 10)
    masksparse.prune_channels(student, x, amount)
    return masksparse.compact(student, x)


@pytest.mark.parametrize("loss", ["mse", "cosine", "kl", lambda s, t: (s - t).abs().mean()])
def test_a_pruned_model_gets_closer_to_the_dense_one_on_held_out_inputs(loss):
    teacher = _teacher()
    student = _pruned(teacher)
    held_out = torch.cat(_data(4, seed=99))
    teacher.eval(), student.eval()
    with torch.no_grad():
        before = relative_error(teacher(held_out), student(held_out))
    teacher_state = copy.deepcopy(teacher.state_dict())
    student.train()
    losses = distill(student, teacher, _data(16, seed=1), steps=150, lr=3e-3, loss=loss, temperature=2.0)
    assert len(losses) == 150 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) < sum(losses[:10]) / 2
    student.eval()
    with torch.no_grad():
        after = relative_error(teacher(held_out), student(held_out))
    assert after < before / 2, (before, after)
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert teacher.training is False  # put back as it was (eval, set above)
    student.train()


def test_modes_and_dropout_are_put_back_and_epochs_count_passes():
    teacher, student = _teacher(), _teacher()
    student.eval()
    seen = []
    losses = distill(
        student, teacher, _data(3, seed=2), epochs=2, callback=lambda step, loss: seen.append(
            (step, loss, student.training, student[2].p)
        ),
    )  # fmt: skip
    assert len(losses) == 6 and [s[0] for s in seen] == list(range(1, 7))
    assert [s[1] for s in seen] == losses
    assert all(training and p == 0.0 for _, _, training, p in seen)  # trained with dropout off
    assert student.training is False and teacher.training is True and student[2].p == 0.3
    with_dropout = []
    distill(
        student, teacher, _data(1, seed=2), dropout=True,
        callback=lambda step, loss: with_dropout.append(student[2].p),
    )  # fmt: skip
    assert with_dropout == [0.3]


def test_hugging_face_batches_and_outputs():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    teacher = transformers.BertModel(config, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(8):
        mask = torch.ones(8, 12, dtype=torch.long)
        mask[:, 9:] = 0  # padding the comparison leaves out
        data.append({"input_ids": torch.randint(0, 64, (8, 12), generator=g), "attention_mask": mask})
    student = copy.deepcopy(teacher)
    masksparse.prune_channels(student, data[0], 0.5)
    student = masksparse.compact(student, data[0])

    def tokens(output, batch):
        return output.last_hidden_state[batch["attention_mask"].bool()]

    def gap() -> float:
        with torch.no_grad():
            return sum(
                float(distillation_loss(tokens(student(**b), b), tokens(teacher(**b), b))) for b in data
            )

    before = gap()
    losses = distill(student, teacher, data, steps=40, lr=3e-4, outputs=tokens)
    assert gap() < before / 2 and losses[-1] < losses[0]
    # the default compares last_hidden_state, padded positions included
    assert len(distill(student, teacher, data[:2])) == 2


def test_a_classifier_fed_labels_is_matched_on_its_logits_not_its_loss():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    teacher = transformers.BertForSequenceClassification(config).eval()
    student = copy.deepcopy(teacher)
    batch = {"input_ids": torch.randint(0, 64, (8, 10)), "labels": torch.randint(0, 3, (8,))}
    seen = []

    def loss(s, t):
        seen.append(s.shape)
        return distillation_loss(s, t)

    distill(student, teacher, [batch], loss=loss)
    assert seen == [torch.Size([8, 3])]


def test_pruning_gradually_while_distilling():
    teacher = _teacher()
    student = copy.deepcopy(teacher)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    x = torch.randn(4, 10)
    pruner = GradualPruner(
        student, 0.5, begin=0, end=20, every=5, structured=True, example_inputs=x,
        compact=True, optimizer=optimizer,
    )  # fmt: skip
    losses = distill(
        student, teacher, _data(10, seed=3), steps=40, optimizer=optimizer,
        callback=lambda step, loss: pruner.step(),
    )  # fmt: skip
    assert student[0].out_features == 24 and student[3].out_features == 24
    assert optimizer.state[student[0].weight]["exp_avg"].shape == (24, 10)
    assert all(torch.isfinite(torch.tensor(losses))) and pruner.sparsity == 0.5


def test_bad_settings_are_rejected_before_training():
    teacher = _teacher()
    student = _pruned(teacher)
    state = copy.deepcopy(student.state_dict())
    data = _data(2, seed=0)
    for kwargs, error, match in [
        ({"steps": 0}, PruningValueError, "steps must be an int >= 1, got 0"),
        ({"epochs": 1.5}, PruningValueError, "epochs must be an int >= 1"),
        ({"loss": "l1"}, PruningValueError, "loss must be one of mse, cosine, kl"),
        ({"temperature": 0}, PruningValueError, "temperature must be a positive number"),
        (
            {"optimizer": torch.optim.SGD(teacher.parameters(), lr=0.1)},
            PruningValueError,
            r"holds 6 parameter\(s\) not in the student",
        ),
    ]:
        with pytest.raises(error, match=match):
            distill(student, teacher, data, **kwargs)
    with pytest.raises(PruningValueError, match="the same module"):
        distill(teacher, teacher, data)
    with pytest.raises(PruningTypeError, match=r"wrap a single batch in a list, \[batch\]"):
        distill(student, teacher, data[0])
    with pytest.raises(PruningValueError, match="data gave no batches"):
        distill(student, teacher, [])
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())


def test_mistakes_found_while_running_are_named():
    teacher = _teacher()
    narrower = nn.Sequential(nn.Linear(10, 3))
    with pytest.raises(
        PruningValueError, match=r"student's output has shape \(32, 3\) and the teacher's \(32, 6\)"
    ):
        distill(narrower, teacher, _data(1, seed=0))
    with pytest.raises(PruningValueError, match="data is an iterator, used up after 2 steps"):
        distill(_pruned(teacher), teacher, iter(_data(2, seed=0)), steps=5)
    with pytest.raises(
        PruningValueError, match=r"loss must be a scalar tensor, got Tensor of shape \(32, 6\)"
    ):
        distill(_pruned(teacher), teacher, _data(1, seed=0), loss=lambda s, t: s - t)

    class Counts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return {"count": 3}

    with pytest.raises(PruningTypeError, match="pass outputs=fn"):
        distill(Counts(), teacher, _data(1, seed=0))
    with pytest.raises(PruningValueError, match=r"the student \(ReLU\) has no parameters"):
        distill(nn.ReLU(), teacher, _data(1, seed=0))
