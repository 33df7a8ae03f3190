"""Structured criteria side by side: LeNet on scikit-learn's digits, 50% of the channels and units.

One dense LeNet per seed (10 epochs). For every criterion: ``prune_channels(model, x, 0.5, importance=...)``
(the data-driven ones calibrated on 512 training images, Taylor with cross-entropy; ``+reconstruct``
with ``reconstruct=True``), ``compact``, then
test accuracy straight away and after a short fine-tune (``--epochs`` of Adam). Pruned: the groups of
conv1, conv2, fc1 and fc2 (the classes stay).

    python benchmarks/criteria.py                   # 3 seeds, 2 fine-tune epochs
    python benchmarks/criteria.py --minilm          # the pretrained MiniLM: 25% of heads and FFN units
    python benchmarks/criteria.py --torchpruner DIR  # also TorchPruner's own attributions (DIR: a checkout)

``--torchpruner DIR``: TorchPruner (github.com/marcoancona/TorchPruner, not on PyPI: the ``torchpruner`` there
is another project) imported from a checkout at DIR. Its attribution metrics score the output units of
conv1, conv2, fc1 and fc2 on the same calibration batches and cross-entropy; masksparse then prunes the
lowest half of each layer by those scores (``importance=`` a callable) and compacts, so the rows
``tp-*`` differ from masksparse's only in the scores.

``--minilm``: all-MiniLM-L6-v2 (``benchmarks/_minilm.py``), ``prune_channels(model, batch, 0.25)`` (the
heads and FFN units; the LayerNorm'd hidden width stays), each criterion with and without
``reconstruct=True``, compacted; cosine of mean-pooled embeddings to dense on 256 held-out sentences,
no fine-tuning.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
from tabulate import tabulate
from torch import nn

from masksparse import compact, prune_channels
from masksparse.examples import LeNet, evaluate, load_digits, train

CRITERIA = (
    "random", "l1", "l2", "activation", "apoz", "taylor", "hessian", "sensitivity", "shapley",
    "l1+reconstruct", "activation+reconstruct", "hessian+reconstruct",
)  # fmt: skip


# TorchPruner's metric classes, by the name of the masksparse criterion each matches
TORCHPRUNER = {
    "tp-random": "RandomAttributionMetric",
    "tp-weight_norm": "WeightNormAttributionMetric",
    "tp-apoz": "APoZAttributionMetric",
    "tp-sensitivity": "SensitivityAttributionMetric",
    "tp-taylor": "TaylorAttributionMetric",
    "tp-shapley": "ShapleyAttributionMetric",
}
_LAYERS = ("conv1", "conv2", "fc1", "fc2")


def _torchpruner_importance(checkout: str, name: str, model: nn.Module, data: list) -> Callable:
    """Score every pruned layer's output units with TorchPruner's metric ``name``; the importance
    callable that hands each group the scores of the layer producing it."""
    if checkout not in sys.path:
        sys.path.insert(0, checkout)
    import torchpruner.attributions as attributions

    options = {"sv_samples": 4} if name == "tp-shapley" else {}
    metric = getattr(attributions, TORCHPRUNER[name])(
        model, data, nn.functional.cross_entropy, torch.device("cpu"), **options
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # register_backward_hook is deprecated
        scores = {layer: torch.as_tensor(metric.run(getattr(model, layer))) for layer in _LAYERS}

    def importance(group, model):
        producer = next(m.module for m in group.members if m.dim == 0 and m.module in scores)
        return scores[producer]

    return importance


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(seed: int, epochs: int, torchpruner: str = "") -> dict[str, tuple[float, float, float, float]]:
    train_set, test_set = load_digits(seed=seed)
    torch.manual_seed(seed)
    dense = LeNet()
    train(dense, train_set, epochs=10, seed=seed)
    images, labels = train_set.tensors
    data = [(images[i : i + 128], labels[i : i + 128]) for i in range(0, 512, 128)]
    out = {"dense": (evaluate(dense, test_set), evaluate(dense, test_set), 1.0, 0.0)}
    for name in CRITERIA + (tuple(TORCHPRUNER) if torchpruner else ()):
        model = copy.deepcopy(dense)
        torch.manual_seed(seed)  # "random" draws from the global generator
        importance, _, rebuild = name.partition("+")
        kw = {} if name in ("random", "l1", "l2") else {"data": data, "loss_fn": nn.functional.cross_entropy}
        start = time.perf_counter()
        if name in TORCHPRUNER:
            importance, kw = _torchpruner_importance(torchpruner, name, model, data), {}
        prune_channels(model, images[:2], 0.5, importance=importance, reconstruct=bool(rebuild), **kw)
        seconds = time.perf_counter() - start
        small = compact(model, images[:8])
        before = evaluate(small, test_set)
        train(small, train_set, epochs=epochs, seed=seed + 1)
        out[name] = (before, evaluate(small, test_set), _params(small) / _params(dense), seconds)
    return out


def minilm(calibration: int) -> None:
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _minilm

    dense, tok = _minilm.load()
    calib = _minilm.batches(tok, _minilm.sentences("calibration", calibration))
    evals = _minilm.batches(tok, _minilm.sentences("evaluation", 256))
    reference = _minilm.embed(dense, evals)
    rows = []
    for name in ("random", "l1", "activation", "apoz", "hessian"):
        for rebuild in (False, True):
            model = copy.deepcopy(dense)
            torch.manual_seed(0)
            data = calib if rebuild or name in ("activation", "apoz", "hessian") else None
            start = time.perf_counter()
            prune_channels(model, calib[0], 0.25, importance=name, data=data, reconstruct=rebuild)
            small = compact(model, calib[0])
            seconds = time.perf_counter() - start
            mean, low = _minilm.cosine(reference, _minilm.embed(small, evals))
            rows.append([name, rebuild, f"{mean:.4f}", f"{low:.4f}", f"{_params(small) / _params(dense):.3f}",
                         f"{seconds:.1f}"])  # fmt: skip
            print(*rows[-1], flush=True)
    print(f"all-MiniLM-L6-v2, 25% of heads and FFN units, {calibration} calibration sentences")
    print(
        tabulate(
            rows, headers=["importance", "reconstruct", "cosine mean", "cosine min", "params", "seconds"]
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--minilm", action="store_true")
    parser.add_argument("--calibration", type=int, default=128, help="MiniLM calibration sentences")
    parser.add_argument("--torchpruner", default="", help="a checkout of TorchPruner, run beside")
    args = parser.parse_args()
    if args.minilm:
        minilm(args.calibration)
        return
    results = [run(int(s), args.epochs, args.torchpruner) for s in args.seeds.split(",")]
    rows = []
    for name in ("dense", *CRITERIA, *(TORCHPRUNER if args.torchpruner else ())):
        before = statistics.mean(r[name][0] for r in results)
        after = statistics.mean(r[name][1] for r in results)
        rows.append(
            [
                name,
                f"{before:.2%}",
                f"{after:.2%}",
                f"{results[0][name][2]:.3f}",
                f"{results[0][name][3]:.2f}",
            ]
        )
    print(f"mean over seeds {args.seeds}, fine-tune {args.epochs} epochs")
    print(tabulate(rows, headers=["importance", "compacted", "fine-tuned", "params left", "seconds"]))


if __name__ == "__main__":
    main()
