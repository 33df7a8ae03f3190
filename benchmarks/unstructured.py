"""Unstructured and 2:4 pruning quality on a real pretrained model: masksparse vs the papers' methods.

all-MiniLM-L6-v2 (``benchmarks/_minilm.py``): every Linear of the encoder is pruned, calibrating on
stdlib docstring sentences from modules a-l and measuring on sentences from modules m-z. Quality is
the cosine between pruned and dense mean-pooled embeddings (mean and minimum over the evaluation
sentences). Side by side: masksparse's ``prune_unstructured`` (magnitude, wanda, sparsegpt) and the
straightforward reference implementations of Wanda and SparseGPT (``benchmarks/_reference.py``), on
the same calibration batches. Seconds are wall-clock for the pruning call alone.

    python benchmarks/unstructured.py                   # 30%, 50%, 2:4; 128 calibration sentences
    python benchmarks/unstructured.py --calibration 256 --settings 0.5
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _minilm  # noqa: E402
import _reference  # noqa: E402

from masksparse import prune_unstructured  # noqa: E402


def _setting(text: str) -> tuple[float, str | None]:
    return (0.5, text) if ":" in text else (float(text), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="0.3,0.5,2:4")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt,ref-wanda,ref-sparsegpt")
    parser.add_argument("--calibration", type=int, default=128, help="calibration sentences")
    parser.add_argument("--evaluation", type=int, default=256, help="held-out sentences")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    dense, tok = _minilm.load()
    calib = _minilm.batches(tok, _minilm.sentences("calibration", args.calibration), args.batch_size)
    evals = _minilm.batches(tok, _minilm.sentences("evaluation", args.evaluation), args.batch_size)
    reference = _minilm.embed(dense, evals)
    modules = _minilm.encoder_linears(dense)
    rows = []
    for text in args.settings.split(","):
        amount, pattern = _setting(text)
        for method in args.methods.split(","):
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            if method.startswith("ref-"):
                n, m = (int(x) for x in pattern.split(":")) if pattern else (0, 0)
                _reference.prune_bert(model, calib, method[4:], amount, n, m)
            else:
                prune_unstructured(
                    model, calib, amount, method=method, pattern=pattern, modules=modules, progress=False
                )
            seconds = time.perf_counter() - start
            mean, low = _minilm.cosine(reference, _minilm.embed(model, evals))
            rows.append([pattern or f"{amount:.0%}", method, f"{mean:.4f}", f"{low:.4f}", f"{seconds:.1f}"])
            print(*rows[-1], flush=True)
    print(tabulate(rows, headers=["setting", "method", "cosine mean", "cosine min", "seconds"]))


if __name__ == "__main__":
    main()
