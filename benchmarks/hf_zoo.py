"""Prune and compact the small Hugging Face models of ``tests/hf_models.py``; print what worked.

For each architecture (``AutoModel`` from a small config, random weights, eval mode):
``prune_channels(model, inputs, 0.5)`` with the model's keyword inputs, then ``compact(model, inputs)``.
The table shows whether the compacted model computes what the masked one does (the largest error of
any output leaf, relative to that leaf's scale), the fraction of parameters left, the seconds masking
and compaction took, and the dead units the plan kept and why (the first reason, and how many
modules gave one).

    python benchmarks/hf_zoo.py                      # all 31 architectures
    python benchmarks/hf_zoo.py --models gpt2,t5 -v  # -v: tracebacks, and every kept-unit reason
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Any

import torch
from tabulate import tabulate

from masksparse.compact import compact, relative_error
from masksparse.compact.plan import compaction_plans
from masksparse.structured import prune_channels

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "tests"))
import hf_models  # noqa: E402

EXACT = 1e-4  # the largest relative error counted as exact (float32 rounding in reordered sums)
BOUND = 0.75  # the parameter fraction the summary counts against


def leaves(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model output (ModelOutput, tuple, dict, nested caches), in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):  # ModelOutput is an OrderedDict
        return [t for v in out.values() for t in leaves(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in leaves(v)]
    if hasattr(out, "to_legacy_cache"):  # a transformers Cache
        return leaves(out.to_legacy_cache())
    return []


def output_error(ref: Any, got: Any) -> float:
    """The largest relative error over the output leaves (inf when their number or shapes differ)."""
    a, b = leaves(ref), leaves(got)
    if len(a) != len(b):
        return float("inf")
    return max((relative_error(x, y) for x, y in zip(a, b) if x.is_floating_point()), default=0.0)


def kept_summary(small: torch.nn.Module, verbose: bool = False) -> str:
    """What the plan kept: ``"-"``, or how many units and the first reason."""
    kept = [k for plan in compaction_plans(small) for k in plan.kept]
    if not kept:
        return "-"
    if verbose:
        return "; ".join(f"{k.module}: {k.units} ({k.reason})" for k in kept)
    units = sum(k.units for k in kept)
    reason = kept[0].reason
    if "fails in module" in reason:  # the error the compacted model raised says most
        reason = "fails: " + reason.split("': ", 1)[-1].rstrip(")")
    return f"{units} units: {kept[0].module.split(' and ')[0]}: {reason[:70]}"


def run_one(name: str, amount: float = 0.5, verbose: bool = False) -> dict[str, object]:
    """Mask and compact one architecture; the row of the table."""
    model = hf_models.build(name)
    x = hf_models.inputs(name)
    before = sum(p.numel() for p in model.parameters())
    row: dict[str, object] = {"model": name, "k params": f"{before / 1e3:.0f}"}
    start = time.perf_counter()
    try:
        prune_channels(model, x, amount)
        small = compact(model, x)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            err = output_error(model(**x), small(**x))
        after = sum(p.numel() for p in small.parameters())
        row.update(exact="yes" if err <= EXACT else "NO", max_rel_err=f"{err:.1e}")
        row["params"] = f"{after / before:.3f}"
        row.update(seconds=f"{seconds:.1f}", kept=kept_summary(small, verbose))
    except Exception as exc:  # a benchmark reports failures instead of stopping
        row.update(exact="error", max_rel_err="", params="", seconds=f"{time.perf_counter() - start:.1f}")
        row["kept"] = f"{type(exc).__name__}: {str(exc)[:90]}"
        if verbose:
            traceback.print_exc()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="names from tests/hf_models.py (default: all)")
    parser.add_argument("--amount", type=float, default=0.5)
    parser.add_argument("-v", action="store_true", help="print tracebacks and every kept-unit reason")
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else list(hf_models.NAMES)
    torch.set_num_threads(2)
    rows = []
    for name in names:
        rows.append(run_one(name, args.amount, args.v))
        print(" | ".join(str(v) for v in rows[-1].values()), file=sys.stderr, flush=True)  # progress
    print(tabulate(rows, headers="keys"))
    exact = sum(r["exact"] == "yes" for r in rows)
    small = sum(r["exact"] == "yes" and float(str(r["params"])) <= BOUND for r in rows)
    print(f"\n{exact} of {len(rows)} exact, {small} at most {BOUND} of their parameters")
    return 0 if exact == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
