"""Recovering a structured-pruned MiniLM by distillation, without labels.

all-MiniLM-L6-v2 (``benchmarks/_minilm.py``): ``prune_channels(model, batch, 0.25, importance="activation",
data=..., reconstruct=True)`` removes 25% of the heads and FFN units (the LayerNorm'd hidden width stays),
``compact``, then :func:`masksparse.distill` trains the compacted model against the dense one on
unlabelled calibration sentences (AdamW, the learning rate decaying linearly to zero over the steps;
the hidden states of every layer at the real tokens are matched by mean squared error, or with
``--match last`` only the last layer's, or with ``--match pooled`` the mean-pooled embedding).
Quality: cosine of mean-pooled embeddings to dense on 256 held-out sentences (from modules no
calibration sentence came from), before and after.

    python benchmarks/distillation.py                       # 500 steps, lr 4e-5, every layer matched
    python benchmarks/distillation.py --steps 300 --match last
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
from tabulate import tabulate

from masksparse import compact, distill, prune_channels

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _minilm  # noqa: E402


def _every_layer(output, batch):
    real = batch["attention_mask"].bool()
    return torch.stack([h[real] for h in output.hidden_states[1:]])


def _last_layer(output, batch):
    return output.last_hidden_state[batch["attention_mask"].bool()]


def _pooled(output, batch):
    hidden = output.last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


MATCH = {"layers": _every_layer, "last": _last_layer, "pooled": _pooled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=4e-5)
    parser.add_argument("--match", choices=sorted(MATCH), default="layers")
    parser.add_argument("--amount", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense, tok = _minilm.load()
    calib = _minilm.batches(tok, _minilm.sentences("calibration", 1408))  # 88 batches of 16
    evals = _minilm.batches(tok, _minilm.sentences("evaluation", 256))
    reference = _minilm.embed(dense, evals)

    model = copy.deepcopy(dense)
    start = time.perf_counter()
    prune_channels(model, calib[0], args.amount, importance="activation", data=calib[:32], reconstruct=True)
    small = compact(model, calib[0])
    prune_seconds = time.perf_counter() - start
    params = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in dense.parameters())
    before = _minilm.cosine(reference, _minilm.embed(small, evals))
    print(f"pruned and compacted in {prune_seconds:.1f} s: {params:.3f} of the parameters, cosine {before}")

    # the 56 batches no pruning statistic came from; every layer's hidden states asked for when matched
    unlabelled = [dict(b, output_hidden_states=True) if args.match == "layers" else b for b in calib[32:]]
    optimizer = torch.optim.AdamW(small.parameters(), lr=args.lr)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: max(0.0, 1 - i / args.steps))
    start = time.perf_counter()
    losses = distill(
        small, dense, unlabelled, steps=args.steps, optimizer=optimizer, outputs=MATCH[args.match],
        callback=lambda step, loss: decay.step(),
    )  # fmt: skip
    seconds = time.perf_counter() - start
    after = _minilm.cosine(reference, _minilm.embed(small, evals))
    print(
        f"all-MiniLM-L6-v2, {args.amount:.0%} of heads and FFN units (activation + reconstruct), "
        f"{args.steps} distillation steps of 16 unlabelled sentences, lr {args.lr}, match {args.match}"
    )
    print(
        tabulate(
            [
                ["pruned", f"{before[0]:.4f}", f"{before[1]:.4f}", ""],
                ["pruned + distilled", f"{after[0]:.4f}", f"{after[1]:.4f}", f"{seconds:.0f}"],
            ],
            headers=["model", "cosine mean", "cosine min", "distill seconds"],
        )
    )
    print(f"loss {losses[0]:.5f} -> {sum(losses[-20:]) / 20:.5f} (mean of the last 20 steps)")


if __name__ == "__main__":
    main()
