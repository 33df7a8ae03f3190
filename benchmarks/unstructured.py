"""Unstructured and 2:4 pruning quality on a real pretrained model: masksparse vs the papers' methods.

all-MiniLM-L6-v2 (``benchmarks/_minilm.py``): every Linear of the encoder is pruned, calibrating on
stdlib docstring sentences from modules a-l and measuring on sentences from modules m-z. Quality is
the cosine between pruned and dense mean-pooled embeddings (mean and minimum over the evaluation
sentences). Side by side: masksparse's ``prune_unstructured`` (magnitude, wanda, sparsegpt) and the
straightforward reference implementations of Wanda and SparseGPT (``benchmarks/_reference.py``), on
the same calibration batches. Seconds are wall-clock for the pruning call alone.

    python benchmarks/unstructured.py                   # 30%, 50%, 2:4; 128 calibration sentences
    python benchmarks/unstructured.py --calibration 256 --settings 0.5
    python benchmarks/unstructured.py --scaling        # seconds and peak memory vs width, Linear stacks
    python benchmarks/unstructured.py --lenet          # LeNet on digits, convolutions pruned too
    python benchmarks/unstructured.py --calibration 512 --methods sparsegpt,sparsegpt+distill

A method ``X+distill`` prunes with ``X``, then :func:`masksparse.distill` trains the masked model (its
masks hold: pruned weights stay zero) to reproduce the dense model's hidden states, without labels, on
calibration sentences the pruning never saw (56 batches of 16, cycled for ``--distill-steps`` steps,
the learning rate decaying linearly to zero); its seconds are the pruning and the distillation together.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness  # noqa: E402
import _minilm  # noqa: E402
import _reference  # noqa: E402

from masksparse import distill, prune_unstructured  # noqa: E402

# every layer's hidden states at the real tokens, as benchmarks/distillation.py matches them
_DISTILL_LR = 4e-5


def _hidden_states(output, batch):
    real = batch["attention_mask"].bool()
    return torch.stack([h[real] for h in output.hidden_states[1:]])


def _distilled(model: torch.nn.Module, dense: torch.nn.Module, data: list[dict], steps: int) -> None:
    unlabelled = [dict(b, output_hidden_states=True) for b in data]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=_DISTILL_LR)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: max(0.0, 1 - i / steps))
    distill(
        model, dense, unlabelled, steps=steps, optimizer=optimizer, outputs=_hidden_states,
        callback=lambda step, loss: decay.step(),
    )  # fmt: skip


def _setting(text: str) -> tuple[float, str | None]:
    return (0.5, text) if ":" in text else (float(text), None)


def _stack(width: int, depth: int = 2) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 8))


def _reference_stack(model: torch.nn.Sequential, data: list[torch.Tensor], method: str) -> None:
    """The reference per-layer classes, layer after layer, each fed the pruned layers' outputs."""
    with torch.no_grad():
        xs = list(data)
        for layer in model[:-1]:
            if isinstance(layer, torch.nn.Linear):
                wrapped = (_reference._SparseGPT if method == "sparsegpt" else _reference._Wanda)(layer)
                for x in xs:
                    wrapped.add_batch(x)
                wrapped.fasterprune(0.5) if method == "sparsegpt" else wrapped.prune(0.5)
            xs = [layer(x) for x in xs]


def scaling(widths: list[int], repeats: int) -> None:
    """Seconds (median of ``repeats``) and peak RSS growth for 50% on a stack of two d x d Linears,
    calibrated on 4 batches of 512 rows, masksparse beside the reference, each in a fresh process."""
    rows = []
    for width in widths:
        for method in ("wanda", "sparsegpt"):
            row: list[object] = [width, method]
            for impl in ("masksparse", "reference"):
                out = _harness.run_worker(
                    __file__, {"width": width, "method": method, "impl": impl, "repeats": repeats}
                )
                row += [f"{out['seconds']:.2f}", f"{out['peak_mib']:.0f}"]
            rows.append(row)
            print(*rows[-1], flush=True)
    headers = ["d", "method", "masksparse s", "peak MiB", "reference s", "peak MiB"]
    print(tabulate(rows, headers=headers))


def worker(opts: dict) -> dict:
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(512, opts["width"], generator=g) for _ in range(4)]
    times, peak = [], 0
    for _ in range(opts["repeats"]):
        model = _stack(opts["width"])
        _harness.trim_malloc()
        base = _harness.rss_bytes()
        _harness.reset_peak_rss()
        start = time.perf_counter()
        if opts["impl"] == "masksparse":
            prune_unstructured(model, data, 0.5, method=opts["method"], progress=False)
        else:
            _reference_stack(model, data, opts["method"])
        times.append(time.perf_counter() - start)
        peak = max(peak, _harness.peak_rss_bytes() - base)
    return {"seconds": _harness.median(times), "peak_mib": peak / _harness.MIB}


def lenet(amounts: list[float]) -> None:
    """LeNet trained on scikit-learn's digits (masksparse.examples), pruned without fine-tuning: test
    accuracy when every layer but the classifier is pruned (both convolutions on their unfolded
    patches, fc1 and fc2) and when the Linear layers alone are, per method and amount."""
    from masksparse import examples

    train_set, test_set = examples.load_digits()
    dense = examples.LeNet()
    examples.train(dense, train_set)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train_set), generator=g)[:512]
    calib = [train_set[order[i : i + 64]][0] for i in range(0, 512, 64)]
    rows = [["dense", "-", "-", f"{examples.evaluate(dense, test_set):.4f}", "-"]]
    for amount in amounts:
        for layers in ("conv1,conv2,fc1,fc2", "fc1,fc2"):
            for method in ("magnitude", "wanda", "sparsegpt"):
                model = copy.deepcopy(dense)
                start = time.perf_counter()
                prune_unstructured(
                    model, calib, amount, method=method, modules=layers.split(","), progress=False
                )
                seconds = time.perf_counter() - start
                accuracy = examples.evaluate(model, test_set)
                rows.append([f"{amount:.0%}", layers, method, f"{accuracy:.4f}", f"{seconds:.2f}"])
                print(*rows[-1], flush=True)
    print(tabulate(rows, headers=["amount", "layers pruned", "method", "test accuracy", "seconds"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="0.3,0.5,2:4")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt,ref-wanda,ref-sparsegpt")
    parser.add_argument("--calibration", type=int, default=128, help="calibration sentences")
    parser.add_argument("--evaluation", type=int, default=256, help="held-out sentences")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--distill-steps", type=int, default=300, help="for the X+distill methods")
    parser.add_argument("--scaling", action="store_true", help="time vs width on Linear stacks instead")
    parser.add_argument("--widths", default="512,1024,2048,4096")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lenet", action="store_true", help="LeNet on digits, convolutions too")
    parser.add_argument("--lenet-amounts", default="0.5,0.7,0.8,0.9")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lenet:
        lenet([float(a) for a in args.lenet_amounts.split(",")])
        return
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.scaling:
        scaling([int(w) for w in args.widths.split(",")], args.repeats)
        return
    torch.manual_seed(0)
    dense, tok = _minilm.load()
    distilling = any(m.endswith("+distill") for m in args.methods.split(","))
    # the distillation batches come after the calibration sentences, up to the 1,408 the text gives
    texts = _minilm.sentences("calibration", 1408 if distilling else args.calibration)
    calib = _minilm.batches(tok, texts[: args.calibration], args.batch_size)
    unseen = _minilm.batches(tok, texts[args.calibration :], 16) if distilling else []
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
                base = method.removesuffix("+distill")
                prune_unstructured(
                    model, calib, amount, method=base, pattern=pattern, modules=modules, progress=False
                )
                if method != base:
                    _distilled(model, dense, unseen, args.distill_steps)  # distill cycles through them
            seconds = time.perf_counter() - start
            mean, low = _minilm.cosine(reference, _minilm.embed(model, evals))
            rows.append([pattern or f"{amount:.0%}", method, f"{mean:.4f}", f"{low:.4f}", f"{seconds:.1f}"])
            print(*rows[-1], flush=True)
    print(tabulate(rows, headers=["setting", "method", "cosine mean", "cosine min", "seconds"]))


if __name__ == "__main__":
    main()
