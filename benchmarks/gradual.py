"""Gradual vs one-shot pruning of LeNet on scikit-learn's digits, with the same training budget.

From one dense LeNet (trained ``--dense-epochs``), every weight of the five layers is pruned to
``--target`` by global magnitude, two ways, each followed by the same ``--epochs`` of Adam at the same
learning rate:

- one-shot: prune to the target at once, then train;
- gradual: train while a :class:`masksparse.GradualPruner` (cubic schedule) raises sparsity from 0 to the
  target over the first ``--ramp`` fraction of the steps, pruning every ``--every`` steps.

Prints test accuracy (dense, after pruning, after training) and the seconds, for each seed.

With ``--structured``, ``--target`` is the fraction of channels (of conv1, conv2, fc1, fc2) instead:
one-shot is ``prune_channels`` + ``compact`` then training; gradual is a ``GradualPruner(structured=True,
compact=True, optimizer=...)`` that compacts the model in place at each pruning step while Adam (and its
cosine learning-rate schedule) keeps training it. The table adds the fraction of the dense parameters
left and the seconds of the first and the last epoch (the dense row: the same training of the dense
model, for scale; the gradual run's first epoch includes its pruning and compaction steps).

    python benchmarks/gradual.py                    # 90%, 3 seeds
    python benchmarks/gradual.py --target 0.95 --seeds 0
    python benchmarks/gradual.py --structured --target 0.5
    python benchmarks/gradual.py --structured --target 0.7 --budget params   # remove 70% of the parameters

``--budget params`` / ``macs`` (with ``--structured``): ``--target`` is the fraction of the parameters or
MACs removed instead (one-shot: ``prune_channels(target_params=1 - target)``; gradual:
``GradualPruner(budget=...)``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from tabulate import tabulate

from masksparse import GradualPruner, compact, prune, prune_channels
from masksparse.examples import LeNet, evaluate, load_digits, train

_X = torch.zeros(1, 1, 28, 28)


def _layers(model: LeNet) -> list[torch.nn.Module]:
    return [model.conv1, model.conv2, model.fc1, model.fc2, model.fc3]


def run(seed: int, args: argparse.Namespace) -> list[list[object]]:
    train_set, test_set = load_digits(seed=seed)
    torch.manual_seed(seed)
    dense = LeNet()
    train(dense, train_set, epochs=args.dense_epochs, seed=seed)
    dense_acc = evaluate(dense, test_set)
    steps = args.epochs * -(-len(train_set) // 32)
    rows = [[seed, "dense", "", f"{dense_acc:.2%}", ""]]

    oneshot = copy.deepcopy(dense)
    start = time.perf_counter()
    prune.global_unstructured(
        [(m, "weight") for m in _layers(oneshot)], pruning_method=prune.L1Unstructured, amount=args.target
    )
    pruned_acc = evaluate(oneshot, test_set)
    train(oneshot, train_set, epochs=args.epochs, lr=args.lr, seed=seed + 1)
    rows.append([seed, "one-shot", f"{pruned_acc:.2%}", f"{evaluate(oneshot, test_set):.2%}",
                 f"{time.perf_counter() - start:.1f}"])  # fmt: skip

    gradual = copy.deepcopy(dense)
    start = time.perf_counter()
    pruner = GradualPruner(
        gradual, args.target, begin=0, end=int(args.ramp * steps), every=args.every, modules=_layers(gradual)
    )
    train(gradual, train_set, epochs=args.epochs, lr=args.lr, seed=seed + 1, on_step=pruner.step)
    rows.append([seed, "gradual", f"{pruner.sparsity:.1%} reached", f"{evaluate(gradual, test_set):.2%}",
                 f"{time.perf_counter() - start:.1f}"])  # fmt: skip
    return rows


def _epochs(
    model: torch.nn.Module, train_set, args, seed: int, pruner_args=None
) -> tuple[GradualPruner | None, list[float]]:
    """``args.epochs`` of Adam with a cosine learning rate (as examples.train); with ``pruner_args``, a
    structured GradualPruner compacting in place on the way. Returns the pruner and each epoch's seconds."""
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * len(loader))
    pruner = None
    if pruner_args is not None:
        pruner = GradualPruner(model, args.target, structured=True, example_inputs=_X, compact=True,
                               optimizer=opt, budget=args.budget, **pruner_args)  # fmt: skip
    seconds = []
    torch.set_num_threads(1)
    model.train()
    for _ in range(args.epochs):
        start = time.perf_counter()
        for inputs, labels in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs), labels).backward()
            opt.step()
            sched.step()
            if pruner is not None:
                pruner.step()
        seconds.append(time.perf_counter() - start)
    model.eval()
    return pruner, seconds


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_structured(seed: int, args: argparse.Namespace) -> list[list[object]]:
    train_set, test_set = load_digits(seed=seed)
    torch.manual_seed(seed)
    dense = LeNet()
    train(dense, train_set, epochs=args.dense_epochs, seed=seed)
    total = _params(dense)
    _, secs = _epochs(copy.deepcopy(dense), train_set, args, seed + 1)  # the dense model's epoch time
    rows: list[list[object]] = [[seed, "dense", "", f"{evaluate(dense, test_set):.2%}", "1.000",
                                 f"{secs[0]:.2f}", f"{secs[-1]:.2f}"]]  # fmt: skip

    oneshot = copy.deepcopy(dense)
    if args.budget == "units":
        prune_channels(oneshot, _X, args.target)
    else:
        prune_channels(oneshot, _X, **{f"target_{args.budget}": 1 - args.target})
    oneshot = compact(oneshot, _X)
    pruned_acc = evaluate(oneshot, test_set)
    _, secs = _epochs(oneshot, train_set, args, seed + 1)
    rows.append([seed, "one-shot", f"{pruned_acc:.2%}", f"{evaluate(oneshot, test_set):.2%}",
                 f"{_params(oneshot) / total:.3f}", f"{secs[0]:.2f}", f"{secs[-1]:.2f}"])  # fmt: skip

    gradual = copy.deepcopy(dense)
    steps = args.epochs * -(-len(train_set) // 32)
    pruner, secs = _epochs(
        gradual, train_set, args, seed + 1, {"end": int(args.ramp * steps), "every": args.every}
    )
    assert pruner is not None
    unit = "channels" if args.budget == "units" else args.budget
    rows.append([seed, "gradual", f"{pruner.sparsity:.1%} of {unit}", f"{evaluate(gradual, test_set):.2%}",
                 f"{_params(gradual) / total:.3f}", f"{secs[0]:.2f}", f"{secs[-1]:.2f}"])  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--dense-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10, help="training after/while pruning, both ways")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ramp", type=float, default=0.6, help="fraction of the steps the schedule spans")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--structured", action="store_true", help="channels, compacted in place")
    parser.add_argument("--budget", choices=("units", "params", "macs"), default="units")
    args = parser.parse_args()
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows += (run_structured if args.structured else run)(seed, args)
        for row in rows[-3:]:
            print(*row, flush=True)
    headers = ["seed", "model", "after pruning", "test accuracy"]
    headers += ["params", "first epoch s", "last epoch s"] if args.structured else ["seconds"]
    print(tabulate(rows, headers=headers))
    for name in ("dense", "one-shot", "gradual"):
        accs = [float(str(r[3]).rstrip("%")) for r in rows if r[1] == name]
        print(f"{name}: mean test accuracy {statistics.mean(accs):.2f}% over {len(accs)} seeds")


if __name__ == "__main__":
    main()
