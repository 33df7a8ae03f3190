"""Gradual vs one-shot pruning of LeNet on scikit-learn's digits, with the same training budget.

From one dense LeNet (trained ``--dense-epochs``), every weight of the five layers is pruned to
``--target`` by global magnitude, two ways, each followed by the same ``--epochs`` of Adam at the same
learning rate:

- one-shot: prune to the target at once, then train;
- gradual: train while a :class:`masksparse.GradualPruner` (cubic schedule) raises sparsity from 0 to the
  target over the first ``--ramp`` fraction of the steps, pruning every ``--every`` steps.

Prints test accuracy (dense, after pruning, after training) and the seconds, for each seed.

    python benchmarks/gradual.py                    # 90%, 3 seeds
    python benchmarks/gradual.py --target 0.95 --seeds 0
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from tabulate import tabulate

from masksparse import GradualPruner, prune
from masksparse.examples import LeNet, evaluate, load_digits, train


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--dense-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10, help="training after/while pruning, both ways")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ramp", type=float, default=0.6, help="fraction of the steps the schedule spans")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows += run(seed, args)
        for row in rows[-3:]:
            print(*row, flush=True)
    print(tabulate(rows, headers=["seed", "model", "after pruning", "test accuracy", "seconds"]))
    for name in ("dense", "one-shot", "gradual"):
        accs = [float(str(r[3]).rstrip("%")) for r in rows if r[1] == name]
        print(f"{name}: mean test accuracy {statistics.mean(accs):.2f}% over {len(accs)} seeds")


if __name__ == "__main__":
    main()
