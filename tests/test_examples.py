"""masksparse.examples: LeNet, the digits, the training loop, and the demo behind ``masksparse demo``."""

from __future__ import annotations

import importlib
import io
import sys

import pytest
import torch
from torch import nn

from masksparse import CompactionError, prune
from masksparse.examples import LeNet, evaluate, load_digits, run_demo, train

sklearn_datasets = pytest.importorskip("sklearn.datasets")


@pytest.fixture(scope="module")
def digits() -> tuple[torch.utils.data.TensorDataset, torch.utils.data.TensorDataset]:
    return load_digits()


class _Constant(nn.Module):
    """Predicts one class for every input."""

    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(torch.full((len(x),), self.label), 10).float()


def test_lenet_has_the_pytorch_tutorial_layers() -> None:
    """The parameters are those of the LeNet in PyTorch's pruning tutorial, in its order."""
    shapes = {name: tuple(p.shape) for name, p in LeNet().named_parameters()}
    assert shapes == {
        "conv1.weight": (6, 1, 3, 3),
        "conv1.bias": (6,),
        "conv2.weight": (16, 6, 3, 3),
        "conv2.bias": (16,),
        "fc1.weight": (120, 400),
        "fc1.bias": (120,),
        "fc2.weight": (84, 120),
        "fc2.bias": (84,),
        "fc3.weight": (10, 84),
        "fc3.bias": (10,),
    }


def test_lenet_maps_28x28_images_to_10_logits() -> None:
    torch.manual_seed(0)
    model = LeNet()
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_digits_shapes_types_and_split_sizes(digits) -> None:
    train_set, test_set = digits
    (train_x, train_y), (test_x, test_y) = train_set.tensors, test_set.tensors
    assert (train_x.shape, test_x.shape) == ((1347, 1, 28, 28), (450, 1, 28, 28))
    assert (train_x.dtype, train_y.dtype) == (torch.float32, torch.int64)
    assert (train_y.shape, test_y.shape) == ((1347,), (450,))
    assert len(train_set) + len(test_set) == len(sklearn_datasets.load_digits().target)


def test_digits_split_is_stratified(digits) -> None:
    """Every class is split 3:1 up to rounding, and the two sets hold every image once."""
    train_set, test_set = digits
    per_class = torch.bincount(torch.from_numpy(sklearn_datasets.load_digits().target), minlength=10)
    train_counts = torch.bincount(train_set.tensors[1], minlength=10)
    test_counts = torch.bincount(test_set.tensors[1], minlength=10)
    assert torch.equal(train_counts + test_counts, per_class)
    assert (test_counts.float() - 0.25 * per_class).abs().max() <= 1


def test_digits_are_normalised_by_the_training_images(digits) -> None:
    """Training pixels have mean 0 and std 1; the blank background is one value in both sets."""
    train_x, test_x = digits[0].tensors[0], digits[1].tensors[0]
    assert torch.isfinite(train_x).all() and torch.isfinite(test_x).all()
    assert abs(float(train_x.mean())) < 1e-4
    assert float(train_x.std()) == pytest.approx(1.0, abs=1e-4)
    background = float(train_x.min())
    assert float(test_x.min()) == pytest.approx(background, abs=1e-6)
    assert background < 0 < float(train_x.max())
    assert abs(float(test_x.mean())) < 0.1


def test_digits_are_the_upscaled_originals() -> None:
    """Each image is an affine function (the normalisation) of one 8x8 digit upscaled bilinearly to 28x28."""
    raw = torch.from_numpy(sklearn_datasets.load_digits().images).float().unsqueeze(1)
    upscaled = nn.functional.interpolate(raw, size=(28, 28), mode="bilinear", align_corners=False).flatten(1)
    train_set, test_set = load_digits()
    sample = torch.cat([train_set.tensors[0][:25], test_set.tensors[0][:25]]).flatten(1)
    correlation = torch.corrcoef(torch.cat([sample, upscaled]).double())[: len(sample), len(sample) :]
    best = correlation.max(dim=1)
    assert (best.values > 1 - 1e-6).all()
    labels = torch.cat([train_set.tensors[1][:25], test_set.tensors[1][:25]])
    assert torch.equal(torch.from_numpy(sklearn_datasets.load_digits().target)[best.indices], labels)


def test_digits_are_deterministic_and_seeded() -> None:
    first, again, other = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    for a, b in zip(first, again):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))
    assert not torch.equal(first[1].tensors[1], other[1].tensors[1])


def test_digits_test_fraction_sets_the_split() -> None:
    train_set, test_set = load_digits(test_fraction=0.5)
    assert abs(len(train_set) - len(test_set)) <= 1


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1])
def test_digits_reject_a_test_fraction_outside_0_1(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"test_fraction must be strictly between 0 and 1, got"):
        load_digits(test_fraction=fraction)


def test_digits_without_scikit_learn_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ModuleNotFoundError, match=r"masksparse\[examples\]"):
        load_digits()


def test_training_reaches_95_percent_in_four_epochs(digits) -> None:
    """Four epochs (about half a second on one core) reach 95% test accuracy; measured 96.2%."""
    train_set, test_set = digits
    torch.manual_seed(0)
    model = LeNet()
    losses = train(model, train_set, epochs=4)
    assert len(losses) == 4
    assert losses[-1] < losses[0] / 4
    assert evaluate(model, test_set) >= 0.95


def test_training_is_deterministic_given_the_seed(digits) -> None:
    def run(seed: int) -> list[float]:
        torch.manual_seed(0)
        return train(LeNet(), digits[0], epochs=1, seed=seed)

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_train_and_evaluate_restore_mode_threads_and_random_state(digits) -> None:
    model = LeNet().eval()
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    train(model, digits[0], epochs=1, threads=1)
    assert not model.training
    model.train()
    evaluate(model, digits[1])
    assert model.training
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng)


def test_training_keeps_pruned_weights_zero(digits) -> None:
    """Masked entries get no gradient, and the Parameter the optimizer updates stays weight_orig."""
    torch.manual_seed(0)
    model = LeNet()
    prune.l1_unstructured(model.fc1, "weight", amount=0.7)
    orig, mask = model.fc1.weight_orig, model.fc1.weight_mask.clone()
    train(model, digits[0], epochs=1)
    assert model.fc1.weight_orig is orig
    assert torch.equal(model.fc1.weight_mask, mask)
    assert (model.fc1.weight[~mask.bool()] == 0).all()
    assert torch.equal(model.fc1.weight, orig * mask)


def test_evaluate_counts_correct_predictions(digits) -> None:
    """A model that always answers 3 is right exactly on the test set's threes."""
    test_set = digits[1]
    expected = float((test_set.tensors[1] == 3).float().mean())
    assert evaluate(_Constant(3), test_set) == pytest.approx(expected)
    assert evaluate(_Constant(3), test_set, batch_size=7) == pytest.approx(expected)


def test_evaluate_rejects_an_empty_dataset() -> None:
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="the dataset is empty"):
        evaluate(LeNet(), empty)


@pytest.mark.timeout(180)
def test_run_demo_trains_prunes_reloads_and_compacts() -> None:
    """The demo's numbers: accurate before and after, 90% sparse, reloaded model identical, lean masks,
    and a compacted model with far fewer parameters that computes what the masked one computes."""
    out = io.StringIO()
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    results = run_demo(out=out)
    assert results["dense_accuracy"] >= 0.96
    assert results["pruned_accuracy"] < results["finetuned_accuracy"]
    assert results["finetuned_accuracy"] >= 0.95
    assert results["reloaded_accuracy"] == results["finetuned_accuracy"]
    assert 0.9 <= results["sparsity"] <= 0.96  # measured 94.8%
    # Dense weights < weights + bool masks (1/4 of the weight bytes) < weights + float masks.
    assert results["dense_bytes"] < results["pruned_bytes"] < results["float_masks_bytes"]
    assert results["pruned_bytes"] < 1.35 * results["dense_bytes"]
    assert 0 < results["train_seconds"] < results["total_seconds"] < 60
    assert 0 < results["finetune_seconds"] < results["total_seconds"]
    # Compaction: every layer smaller (measured 60,074 -> 8,943 parameters), the same outputs.
    assert results["masked_params"] == 60_074  # LeNet's parameters: masks keep every layer full size
    assert results["compacted_params"] < 0.25 * results["masked_params"]
    assert results["compaction_error"] <= 1e-5
    assert results["compacted_accuracy"] == results["finetuned_accuracy"]
    assert min(results["compacted_latency_seconds"], results["masked_latency_seconds"]) > 0
    text = out.getvalue()
    assert "fc1.weight" in text and "same outputs" in text
    assert f"{results['reloaded_accuracy']:.2%}" in text
    assert "Compaction plan: 60,074 -> " in text and "set: fc1.out_features = " in text
    assert f"{results['masked_params']:,.0f} -> {results['compacted_params']:,.0f}" in text
    assert 0 < results["compacted_macs"] < 0.6 * results["masked_macs"]  # measured 0.42x
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng)


def test_run_demo_rejects_a_compaction_that_changes_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo checks the compacted model on the whole test set, not only on compact's example batch."""
    package = importlib.import_module("masksparse.compact")  # the package, not the function
    original = package.compact

    def perturbed(model: nn.Module, inputs: torch.Tensor) -> nn.Module:
        result = original(model, inputs)
        with torch.no_grad():
            result.fc3.bias.add_(1.0)
        return result

    monkeypatch.setattr(package, "compact", perturbed)
    with pytest.raises(CompactionError, match="must agree within 1e-5"):
        run_demo(out=io.StringIO(), epochs=1, finetune_epochs=0, repeats=1)
