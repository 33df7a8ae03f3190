"""Prune and compact torchvision classification models; print what worked.

For each model (weights=None, eval mode, BatchNorm statistics and affine parameters randomised as in
a trained network): ``prune_channels(amount=0.5)``, then ``compact``. The classifier's outputs are the
model's outputs, which ``prune_channels`` never prunes; its inputs shrink with the layers that feed
them, as with Torch-Pruning's ``ignored_layers=[classifier]``. ``--ignore-classifier`` passes
``ignored_layers=[classifier]`` explicitly (the same meaning: its outputs are kept, its inputs follow their
producers); ``--keep-classifier-inputs`` lists the classifier in ``untouched_layers`` instead, which keeps
its inputs (and so the last feature width) too.
With ``--method ln_structured`` the masks come from plain ``torch.nn.utils.prune.ln_structured`` on
every conv weight instead (so masked channels still emit their BatchNorm shift). The table shows
whether it worked, the largest relative error between the masked and the compacted model's outputs,
the fraction of parameters left, and the seconds masking and compaction took.

    python benchmarks/zoo.py --models resnet18,mobilenet_v2
    python benchmarks/zoo.py --method ln_structured
    python benchmarks/zoo.py              # every classification model in torchvision
    python benchmarks/zoo.py --max-params 150   # skip models over 150M parameters
    python benchmarks/zoo.py --models vit_b_16,swin_t --allow-inexact

``--allow-inexact`` passes ``allow_inexact=True`` to ``prune_channels`` and ``compact``, so the widths a
LayerNorm normalises over (a transformer's hidden width) are pruned and removed too. That is not exact
by nature: ``max_rel_err`` is then the change compaction states (``deviation``, measured on the example
input), and ``top1_agree`` the fraction of 32 random inputs on which the masked and the compacted model
pick the same class.

The ``peak RSS MiB`` column is the process's resident-set high-water mark during that model's row
(building the dense model included); it also counts memory that earlier rows freed but the allocator
kept, so it bounds what the run needs rather than what one model needs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings

import torch
import torch.nn.utils.prune as torch_prune
import torchvision
from tabulate import tabulate
from torch import nn

from masksparse import InexactCompactionWarning
from masksparse.compact import compact, relative_error
from masksparse.structured import prune_channels

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import MIB, peak_rss_bytes, reset_peak_rss  # noqa: E402

# Smallest input each family accepts comfortably (the rest take 64x64 to stay quick).
_SIZES = {"inception_v3": 299, "vit": 224, "swin": 224, "maxvit": 224, "googlenet": 64}


def randomise_batch_norm(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm statistics and affine parameters like a trained network's, and every
    weight initialised to zero (ViT's head, say) small random values, so outputs are not all zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.2)


def classifier(model: nn.Module) -> nn.Module:
    """The last Linear (or 1x1 conv, for squeezenet) of the model: its outputs are the classes."""
    last = None
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last = m
    assert last is not None
    return last


def input_size(name: str) -> int:
    return next((s for prefix, s in _SIZES.items() if name.startswith(prefix)), 64)


def mask(
    model: nn.Module,
    x: torch.Tensor,
    method: str,
    amount: float,
    keep_inputs: bool = False,
    allow_inexact: bool = False,
    ignore_classifier: bool = False,
) -> None:
    """Mask ``model`` with masksparse's prune_channels or with torch's ln_structured on conv weights."""
    if method == "prune_channels":
        untouched = [classifier(model)] if keep_inputs else []
        ignored = [classifier(model)] if ignore_classifier else []
        prune_channels(
            model, x, amount, ignored_layers=ignored, untouched_layers=untouched, allow_inexact=allow_inexact
        )
        return
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            torch_prune.ln_structured(m, "weight", amount=amount, n=1, dim=0)


def num_params(name: str) -> int:
    """Parameter count from torchvision's weights metadata (nothing is built or downloaded)."""
    return int(next(iter(torchvision.models.get_model_weights(name))).meta["num_params"])


def top1_agreement(masked: nn.Module, small: nn.Module, size: int, n: int = 32, seed: int = 1) -> float:
    """Fraction of ``n`` random inputs on which both models pick the same class (batches of 8)."""
    g = torch.Generator().manual_seed(seed)
    same = 0
    with torch.no_grad():
        for start in range(0, n, 8):
            batch = torch.randn(min(8, n - start), 3, size, size, generator=g)
            same += int((masked(batch).argmax(1) == small(batch).argmax(1)).sum())
    return same / n


def compact_inexact(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, float]:
    """``compact(..., allow_inexact=True)``, and the deviation it states (0.0: it stated none)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InexactCompactionWarning)
        small = compact(model, x, allow_inexact=True)
    stated = [w.message for w in caught if isinstance(w.message, InexactCompactionWarning)]
    return small, stated[0].deviation if stated else 0.0


def run_one(
    name: str,
    amount: float = 0.5,
    method: str = "prune_channels",
    keep_inputs: bool = False,
    allow_inexact: bool = False,
    ignore_classifier: bool = False,
) -> dict[str, object]:
    """Mask and compact one model; the row of the table."""
    reset_peak_rss()
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    randomise_batch_norm(model)
    size = input_size(name)
    x = torch.randn(1, 3, size, size)
    row: dict[str, object] = {"model": name, "M params": f"{num_params(name) / 1e6:.1f}"}
    start = time.perf_counter()
    small = None
    try:
        mask(model, x, method, amount, keep_inputs, allow_inexact, ignore_classifier)
        small, deviation = compact_inexact(model, x) if allow_inexact else (compact(model, x), 0.0)
        with torch.no_grad():
            err = relative_error(model(x), small(x))
        before = sum(p.numel() for p in model.parameters())  # *_orig stand for the dense tensors
        after = sum(p.numel() for p in small.parameters())
        row.update(status="ok", max_rel_err=f"{err:.1e}", params=f"{after / before:.2f}")
        if allow_inexact:
            row["deviation"] = f"{deviation:.2g}"
    except Exception as exc:  # a benchmark reports failures instead of stopping
        row.update(status=f"error: {type(exc).__name__}: {str(exc)[:90]}", max_rel_err="", params="")
        small = None
        if allow_inexact:
            row["deviation"] = ""
        if "-v" in sys.argv:
            traceback.print_exc()
    row["seconds"] = f"{time.perf_counter() - start:.1f}"
    if allow_inexact:  # not timed: 64 forward passes
        row["top1_agree"] = f"{top1_agreement(model, small, size):.2f}" if small is not None else ""
    row["peak RSS MiB"] = f"{peak_rss_bytes() / MIB:,.0f}"
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated torchvision model names (default: all)")
    parser.add_argument("--amount", type=float, default=0.5)
    parser.add_argument("--method", choices=["prune_channels", "ln_structured"], default="prune_channels")
    parser.add_argument(
        "--max-params", type=float, default=0.0, help="skip models over this many million parameters (0: all)"
    )
    parser.add_argument(
        "--keep-classifier-inputs", action="store_true", help="list the classifier in untouched_layers"
    )
    parser.add_argument(
        "--ignore-classifier", action="store_true", help="list the classifier in ignored_layers"
    )
    parser.add_argument(
        "--allow-inexact",
        action="store_true",
        help="also prune and remove units a LayerNorm/GroupNorm/RMSNorm normalises over; the table then "
        "shows the deviation compact states and the top-1 agreement of masked and compacted on 32 inputs",
    )
    parser.add_argument("-v", action="store_true", help="print tracebacks of failures")
    args = parser.parse_args(argv)
    names = (
        args.models.split(",") if args.models else torchvision.models.list_models(module=torchvision.models)
    )
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    rows, skipped = [], []
    for name in names:
        if args.max_params and num_params(name) > args.max_params * 1e6:
            skipped.append(f"{name} ({num_params(name) / 1e6:.0f}M)")
            continue
        rows.append(
            run_one(
                name,
                args.amount,
                args.method,
                args.keep_classifier_inputs,
                args.allow_inexact,
                args.ignore_classifier,
            )
        )
        print(" | ".join(str(v) for v in rows[-1].values()), file=sys.stderr, flush=True)  # progress
    print(tabulate(rows, headers="keys"))
    ok = sum(r["status"] == "ok" for r in rows)
    skip = ", ".join(skipped) or "none"
    print(f"\n{ok} of {len(rows)} ok; skipped (over {args.max_params:g}M parameters): {skip}")
    return 0 if ok == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
