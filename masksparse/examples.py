"""LeNet on scikit-learn's handwritten digits: the model, data and loop behind the tutorials and the demo.

Everything here runs offline on a laptop CPU in seconds: the digits ship with scikit-learn (install
the ``masksparse[examples]`` extra), and the network is the LeNet of PyTorch's pruning tutorial.

Example:
    >>> from masksparse.examples import LeNet, evaluate, load_digits, train
    >>> train_set, test_set = load_digits()
    >>> model = LeNet()
    >>> losses = train(model, train_set, epochs=1)
    >>> 0.0 <= evaluate(model, test_set) <= 1.0
    True
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TextIO

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from masksparse._errors import CompactionError, StateDictError

__all__ = ["LeNet", "evaluate", "load_digits", "run_demo", "train"]

_IMAGE_SIZE = 28
_LATENCY_BATCH = 256


class LeNet(nn.Module):
    """The LeNet of PyTorch's pruning tutorial, for 1x28x28 images and 10 classes.

    Example:
        >>> model = LeNet()
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
        >>> [name for name, _ in model.named_children()]
        ['conv1', 'conv2', 'fc1', 'fc2', 'fc3']
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.conv2 = nn.Conv2d(6, 16, 3)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a batch of shape ``(N, 1, 28, 28)`` to class logits of shape ``(N, 10)``."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> tuple[TensorDataset, TensorDataset]:
    """Scikit-learn's 1797 handwritten digits as 1x28x28 images, split into train and test sets.

    The 8x8 images are scaled to [0, 1], upscaled bilinearly to 28x28 (LeNet's input size), and
    normalised with the training set's mean and standard deviation. The split is stratified by class
    and depends only on ``seed``.

    Example:
        >>> train_set, test_set = load_digits()
        >>> images, labels = train_set.tensors
        >>> tuple(images.shape), images.dtype, tuple(labels.shape), labels.dtype
        ((1347, 1, 28, 28), torch.float32, (1347,), torch.int64)
        >>> len(test_set)
        450

    Args:
        seed: Seed of the train/test split.
        test_fraction: Fraction of the images in the test set, strictly between 0 and 1.

    Returns:
        ``(train, test)``: datasets of ``(image, label)`` pairs, float32 images and int64 labels 0-9.

    Raises:
        ValueError: ``test_fraction`` is not strictly between 0 and 1.
        ModuleNotFoundError: scikit-learn is not installed.
    """
    # A plain ValueError: this is a data option, not a pruning one, so no masksparse class fits.
    if not isinstance(test_fraction, float | int) or not 0 < test_fraction < 1:
        raise ValueError(
            f"load_digits: test_fraction must be strictly between 0 and 1, got {test_fraction!r}"
        )
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
        from sklearn.model_selection import train_test_split
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "masksparse.examples.load_digits needs scikit-learn; install it with "
            "`pip install masksparse[examples]` (or `pip install scikit-learn`)",
            name=error.name,
        ) from error
    digits = sklearn_load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(_IMAGE_SIZE, _IMAGE_SIZE), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(digits.target).long()
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=test_fraction, random_state=seed, stratify=labels.numpy()
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    # Statistics of the training images only, so nothing about the test set leaks into the inputs.
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return (
        TensorDataset(images[train_idx], labels[train_idx]),
        TensorDataset(images[test_idx], labels[test_idx]),
    )


@contextlib.contextmanager
def _running(model: nn.Module, training: bool, threads: int | None) -> Iterator[None]:
    """Put ``model`` in train or eval mode with ``threads`` intra-op threads; restore both after."""
    was_training, previous_threads = model.training, torch.get_num_threads()
    model.train(training)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        model.train(was_training)
        if threads is not None:
            torch.set_num_threads(previous_threads)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator inside the block and restore the caller's random state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def train(
    model: nn.Module,
    dataset: Dataset,
    epochs: int = 10,
    lr: float = 4e-3,
    batch_size: int = 32,
    seed: int = 0,
    threads: int | None = 1,
    on_step: Callable[[], object] | None = None,
) -> list[float]:
    """Train a classifier with Adam and cross-entropy; pruned models train as they are.

    The learning rate decays from ``lr`` to zero on a cosine over the run. With the defaults, LeNet
    reaches about 98% test accuracy on :func:`load_digits` in a few seconds on one CPU core. Only the
    batch order is seeded (by a private generator), so the global random state is untouched. Masked
    weights stay masked: their gradient is zero because the forward pass multiplies by the mask.

    Example:
        >>> train_set, _ = load_digits()
        >>> losses = train(LeNet(), train_set, epochs=2)
        >>> len(losses), losses[1] < losses[0]
        (2, True)

    Args:
        model: The network to train, in place.
        dataset: ``(input, label)`` pairs, e.g. the first result of :func:`load_digits`.
        epochs: Passes over the dataset.
        lr: Adam's learning rate.
        batch_size: Examples per optimizer step.
        seed: Seed of the batch order.
        threads: Intra-op threads while training, restored after; ``None`` keeps torch's setting. One by
            default: LeNet's layers are too small to gain from more, and on a busy machine extra threads
            that wait on each other make training many times slower.
        on_step: Called after every optimizer step, e.g. a :class:`masksparse.GradualPruner`'s ``step``.

    Returns:
        The mean training loss of each epoch.
    """
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    # Cosine decay to zero over the run: a steady final accuracy instead of Adam's last-step jitter.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * len(loader)))
    losses = []
    with _running(model, training=True, threads=threads):
        for _ in range(epochs):
            total, count = 0.0, 0
            for inputs, labels in loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(inputs), labels)
                loss.backward()
                optimizer.step()
                schedule.step()
                if on_step is not None:
                    on_step()
                total += loss.item() * len(labels)
                count += len(labels)
            losses.append(total / count)
    return losses


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 512, threads: int | None = 1) -> float:
    """Fraction of ``dataset`` that ``model`` classifies correctly, in [0, 1].

    Example:
        >>> _, test_set = load_digits()
        >>> 0.0 <= evaluate(LeNet(), test_set) <= 1.0
        True

    Args:
        model: A classifier returning logits; it runs in eval mode, and its mode is restored after.
        dataset: ``(input, label)`` pairs.
        batch_size: Examples per forward pass.
        threads: Intra-op threads, as in :func:`train`.

    Returns:
        The accuracy.

    Raises:
        ValueError: ``dataset`` is empty.
    """
    correct, count = 0, 0
    with _running(model, training=False, threads=threads), torch.no_grad():
        # A private generator: even an unshuffled DataLoader draws a seed from the global one.
        for inputs, labels in DataLoader(dataset, batch_size=batch_size, generator=torch.Generator()):
            correct += int((model(inputs).argmax(dim=1) == labels).sum())
            count += len(labels)
    if count == 0:
        raise ValueError("evaluate: the dataset is empty, so there is no accuracy to compute")
    return correct / count


def _weight_sparsity(model: nn.Module) -> float:
    """Fraction of zero entries over the weights of every Conv2d and Linear layer."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def _train_dense(
    train_set: TensorDataset, test_set: TensorDataset, epochs: int, seed: int, stream: TextIO
) -> tuple[LeNet, dict[str, float]]:
    """Stage 1: a freshly initialised LeNet trained on the digits."""
    print(
        f"LeNet on scikit-learn's digits: {len(train_set)} training, {len(test_set)} test images", file=stream
    )
    with _seeded(seed):
        model = LeNet()
    tic = time.perf_counter()
    train(model, train_set, epochs=epochs, seed=seed)
    numbers = {"train_seconds": time.perf_counter() - tic, "dense_accuracy": evaluate(model, test_set)}
    print(f"dense LeNet: test accuracy {numbers['dense_accuracy']:.2%} after {epochs} epochs", file=stream)
    return model, numbers


def _prune_and_finetune(
    model: LeNet,
    data: tuple[TensorDataset, TensorDataset],
    *,
    amount: float,
    rows: float,
    channels: float,
    epochs: int,
    seed: int,
    stream: TextIO,
) -> dict[str, float]:
    """Stage 2: global L1 pruning of every weight, whole rows and channels, then fine-tuning."""
    from masksparse import prune
    from masksparse.report import sparsity_report
    from masksparse.structured import prune_channels

    train_set, test_set = data
    layers = [model.conv1, model.conv2, model.fc1, model.fc2, model.fc3]
    prune.global_unstructured(
        [(layer, "weight") for layer in layers],
        pruning_method=prune.L1Unstructured,
        amount=amount,
    )
    # Whole rows (output neurons) and channels are what compaction can remove to make layers smaller.
    prune.ln_structured(model.fc1, "weight", amount=rows, n=2, dim=0)
    prune.ln_structured(model.fc2, "weight", amount=rows, n=2, dim=0)
    # A conv channel also feeds the next layer's input and owns a bias: prune_channels masks them together.
    # Amount 0 for the groups of fc1 and fc2, whose rows are pruned above already.
    conv_amounts: dict[nn.Module | str, float | int] = {"conv1": channels, "conv2": channels}
    prune_channels(model, test_set.tensors[0][:2], 0.0, amounts=conv_amounts)
    numbers = {"sparsity": _weight_sparsity(model), "pruned_accuracy": evaluate(model, test_set)}
    print(f"\npruned: {numbers['sparsity']:.1%} of the conv and linear weights are zero", file=stream)
    print(sparsity_report(model), file=stream)
    print(f"pruned LeNet: test accuracy {numbers['pruned_accuracy']:.2%} before fine-tuning", file=stream)
    tic = time.perf_counter()
    train(model, train_set, epochs=epochs, seed=seed + 1)
    numbers["finetune_seconds"] = time.perf_counter() - tic
    numbers["finetuned_accuracy"] = evaluate(model, test_set)
    print(f"fine-tuned: test accuracy {numbers['finetuned_accuracy']:.2%} after {epochs} epochs", file=stream)
    return numbers


def _save_and_reload(
    model: LeNet, dense_state: dict[str, torch.Tensor], test_set: TensorDataset, stream: TextIO
) -> dict[str, float]:
    """Stage 3: save the pruned state_dict, reload it into a fresh LeNet, check the outputs are equal."""
    from masksparse.serialization import load_state_dict, save_state_dict

    with _seeded(0):  # its initial weights are overwritten; only the caller's random state matters
        fresh = LeNet()
    with tempfile.TemporaryDirectory() as directory:
        paths = {
            name: os.path.join(directory, f"lenet_{name}.pt") for name in ("dense", "pruned", "float_masks")
        }
        torch.save(dense_state, paths["dense"])
        save_state_dict(model, paths["pruned"])
        # The same file with float masks, as torch.nn.utils.prune stores them, to show what bool masks save.
        float_masks = {k: v.float() if k.endswith("_mask") else v for k, v in model.state_dict().items()}
        torch.save(float_masks, paths["float_masks"])
        load_state_dict(fresh, paths["pruned"])
        numbers = {f"{name}_bytes": float(os.path.getsize(path)) for name, path in paths.items()}
    inputs = test_set.tensors[0]
    with torch.no_grad(), _running(model, False, threads=1), _running(fresh, False, threads=1):
        expected, actual = model(inputs), fresh(inputs)
    if not torch.equal(expected, actual):
        raise StateDictError(
            "run_demo: the LeNet reloaded from the saved state_dict computes different outputs than the "
            f"pruned LeNet (max abs difference {float((expected - actual).abs().max()):.3g}); "
            "they must be equal"
        )
    numbers["reloaded_accuracy"] = evaluate(fresh, test_set)
    print(
        f"\nsaved and reloaded into a fresh LeNet: same outputs, test accuracy "
        f"{numbers['reloaded_accuracy']:.2%}",
        file=stream,
    )
    kib = {name: numbers[f"{name}_bytes"] / 1024 for name in paths}
    print(
        f"file sizes: dense {kib['dense']:.0f} KiB; pruned {kib['pruned']:.0f} KiB "
        f"(with torch.nn.utils.prune's float masks it would be {kib['float_masks']:.0f} KiB)",
        file=stream,
    )
    return numbers


def _latencies(models: Sequence[nn.Module], inputs: torch.Tensor, repeats: int) -> list[float]:
    """Median seconds of one forward pass of each model on one thread, without gradients."""
    times: list[list[float]] = [[] for _ in models]
    with contextlib.ExitStack() as stack, torch.no_grad():
        for model in models:
            stack.enter_context(_running(model, training=False, threads=1))
            model(inputs)  # warm-up: the first pass allocates
        # Interleaved, so that a busy moment of a shared machine slows every model alike.
        for _ in range(repeats):
            for model, seconds in zip(models, times):
                tic = time.perf_counter()
                model(inputs)
                seconds.append(time.perf_counter() - tic)
    return [statistics.median(seconds) for seconds in times]


def _compact(model: LeNet, test_set: TensorDataset, repeats: int, stream: TextIO) -> dict[str, float]:
    """Stage 4: cut the dead rows and channels out of the layers; check the outputs stay the same."""
    from masksparse.compact import compact, plan_compaction, relative_error
    from masksparse.comparison import compare_reports
    from masksparse.report import sparsity_report

    inputs = test_set.tensors[0]
    example = inputs[:_LATENCY_BATCH]
    plan = plan_compaction(model, example)
    print(f"\ncompaction: removing what the masks make dead\n{plan}", file=stream)
    compacted = compact(model, example)
    with torch.no_grad(), _running(model, False, threads=1), _running(compacted, False, threads=1):
        error = relative_error(model(inputs), compacted(inputs))
    # compact checked its example inputs at 1e-4; the demo holds the whole test set to 1e-5.
    if error > 1e-5:
        raise CompactionError(
            f"run_demo: the compacted LeNet's outputs on the test set differ from the masked LeNet's by a "
            f"relative {error:.3g}; they must agree within 1e-5"
        )
    masked_seconds, compacted_seconds = _latencies([model, compacted], example, repeats)
    comparison = compare_reports(sparsity_report(model, example), sparsity_report(compacted, example))
    print(f"parameters and MACs at batch {len(example)}, masked -> compacted:\n{comparison}", file=stream)
    numbers = {
        "masked_params": float(sum(p.numel() for p in model.parameters())),
        "compacted_params": float(sum(p.numel() for p in compacted.parameters())),
        "masked_macs": float(comparison.total.macs_before or 0),
        "compacted_macs": float(comparison.total.macs_after or 0),
        "compaction_error": error,
        "masked_latency_seconds": masked_seconds,
        "compacted_latency_seconds": compacted_seconds,
        "compacted_accuracy": evaluate(compacted, test_set),
    }
    print(
        f"CPU latency at batch {len(example)}, one thread (median of {repeats}): "
        f"{1e3 * masked_seconds:.2f} ms masked -> {1e3 * compacted_seconds:.2f} ms compacted "
        f"(speed-up {masked_seconds / compacted_seconds:.2f}x)",
        file=stream,
    )
    print(
        f"compacted LeNet: test accuracy {numbers['compacted_accuracy']:.2%}, outputs equal to the masked "
        f"model's (max relative difference {error:.1e})",
        file=stream,
    )
    return numbers


def run_demo(
    out: TextIO | None = None,
    epochs: int = 10,
    finetune_epochs: int = 3,
    amount: float = 0.9,
    rows: float = 0.5,
    channels: float = 0.5,
    seed: int = 0,
    repeats: int = 20,
) -> dict[str, float]:
    """Train, prune, fine-tune, save, reload and compact LeNet on the digits, printing each step's result.

    This is ``python -m masksparse demo``. It prunes ``amount`` of all conv and linear weights by global
    L1 magnitude, a fraction ``rows`` of fc1's and fc2's rows by L2 norm (``prune.ln_structured``) and a
    fraction ``channels`` of conv1's and conv2's channels by L1 norm (``prune_channels``), prints the
    sparsity report, fine-tunes, saves the state_dict, reloads it into a fresh LeNet and checks that the
    outputs are equal. Finally it compacts the pruned LeNet (``compact``), prints the plan, the parameters,
    the MACs and the CPU latency at batch 256 before and after, and checks that the compacted model
    computes what the masked one computes. The caller's random state and thread settings are left as
    they were.

    Example:
        >>> import io
        >>> results = run_demo(out=io.StringIO(), epochs=1, finetune_epochs=1, repeats=3)
        >>> results["reloaded_accuracy"] == results["finetuned_accuracy"], results["sparsity"] >= 0.9
        (True, True)
        >>> results["compacted_accuracy"] == results["finetuned_accuracy"]
        True
        >>> results["compacted_params"] < results["masked_params"]
        True

    Args:
        out: Where to print; ``None`` means ``sys.stdout``.
        epochs: Training epochs of the dense model.
        finetune_epochs: Training epochs after pruning.
        amount: Fraction of all conv and linear weights to prune by global magnitude.
        rows: Fraction of fc1's and of fc2's rows to prune on top, by L2 norm.
        channels: Fraction of conv1's and of conv2's output channels to prune on top, by L1 norm.
        seed: Seed of the initial weights, the train/test split and the batch order.
        repeats: Timed forward passes of each model for the latency medians.

    Returns:
        Accuracies on the test set (``dense_accuracy``; ``pruned_accuracy`` and ``finetuned_accuracy``,
        before and after fine-tuning; ``reloaded_accuracy``), the fraction of zero weights
        (``sparsity``), file sizes (``dense_bytes``, ``pruned_bytes``, and ``float_masks_bytes`` for the
        same state_dict with float masks), timings (``train_seconds``, ``finetune_seconds``,
        ``total_seconds``, the last including loading the data), and the compaction's results: parameters
        of the masked and compacted models (``masked_params``, ``compacted_params``), their median
        latencies at batch 256 (``masked_latency_seconds``, ``compacted_latency_seconds``), their
        multiply-accumulates at batch 256 (``masked_macs``, ``compacted_macs``), the compacted
        model's ``compacted_accuracy`` and the largest relative difference between the two models' outputs
        on the test set (``compaction_error``).

    Raises:
        StateDictError: The reloaded model does not compute what the pruned model computes.
        CompactionError: The compacted model does not compute what the pruned model computes.
    """
    stream = sys.stdout if out is None else out
    start = time.perf_counter()
    train_set, test_set = load_digits(seed=seed)
    model, results = _train_dense(train_set, test_set, epochs, seed, stream)
    dense_state = {key: value.clone() for key, value in model.state_dict().items()}
    results.update(
        _prune_and_finetune(
            model,
            (train_set, test_set),
            amount=amount,
            rows=rows,
            channels=channels,
            epochs=finetune_epochs,
            seed=seed,
            stream=stream,
        )
    )
    results.update(_save_and_reload(model, dense_state, test_set, stream))
    results.update(_compact(model, test_set, repeats, stream))
    results["total_seconds"] = time.perf_counter() - start
    print(f"\ntotal time {results['total_seconds']:.1f} s", file=stream)
    return results
