"""Prune and compact the smallest timm model of each family (``tests/timm_models.py``), side by side
with Torch-Pruning on the same models; print what worked.

For each family: the model with random weights (``pretrained=False``, BatchNorm statistics randomised
as in a trained network), one input of its default size.

- masksparse: ``prune_channels(model, x, 0.5)``, then ``compact(model, x)``; ``exact`` when the
  compacted model computes what the masked one does (largest relative error of the output at most
  1e-4), ``params`` the fraction of parameters left, ``kept`` the first reason the plan gave for units
  it kept.
- Torch-Pruning: ``MetaPruner(model, x, MagnitudeImportance(p=2), pruning_ratio=0.5,
  ignored_layers=[classifier], num_heads=...)``, ``step()``, then each attention module's
  ``num_heads`` and ``head_dim`` set from the pruner, as Torch-Pruning's timm example does; ``ran``
  when the pruned model still runs on the input and returns the output shape it had. (Torch-Pruning
  removes channels by their weights alone; there is no masked model to compare against, so there is
  no exactness column.)

Every model runs in its own process under a time limit, so a crash or a hang in one shows as that row's
result and the rest carry on.

    python benchmarks/timm_zoo.py                       # all families (about an hour on 2 cores)
    python benchmarks/timm_zoo.py --families resnet,vision_transformer -v
    python benchmarks/timm_zoo.py --tools masksparse    # skip Torch-Pruning
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from typing import Any

from tabulate import tabulate

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "tests"))
import timm_models  # noqa: E402

EXACT = 1e-4
BOUND = 0.75


def _output(out: Any) -> Any:
    import torch

    if isinstance(out, (tuple, list)):
        return out[0]
    assert isinstance(out, torch.Tensor)
    return out


def _masksparse(family: str, amount: float, verbose: bool) -> dict[str, object]:
    import torch
    from zoo import randomise_batch_norm

    from masksparse.compact import compact, relative_error
    from masksparse.compact.plan import compaction_plans
    from masksparse.structured import prune_channels

    model, x = timm_models.build(timm_models.FAMILIES[family][0])
    randomise_batch_norm(model)
    before = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    prune_channels(model, x, amount)
    small = compact(model, x)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        err = relative_error(_output(model(x)), _output(small(x)))
    kept = [k for plan in compaction_plans(small) for k in plan.kept]
    if verbose:
        reason = "; ".join(f"{k.module}: {k.units} ({k.reason})" for k in kept)
    else:
        reason = (
            f"{sum(k.units for k in kept)} units: {kept[0].module[:40]}: {kept[0].reason[:60]}"
            if kept
            else "-"
        )
    after = sum(p.numel() for p in small.parameters())
    return {"exact": err <= EXACT, "err": err, "params": after / before, "seconds": seconds, "kept": reason}


def _num_heads(model: Any) -> dict[Any, int]:
    """The qkv Linears of timm's attention modules and their head counts, as Torch-Pruning asks."""
    heads = {}
    for m in model.modules():
        qkv, n = getattr(m, "qkv", None), getattr(m, "num_heads", None)
        if qkv is not None and isinstance(n, int):
            heads[qkv] = n
    return heads


def _torch_pruning(family: str, amount: float, verbose: bool) -> dict[str, object]:
    import torch
    import torch_pruning as tp
    from zoo import randomise_batch_norm

    model, x = timm_models.build(timm_models.FAMILIES[family][0])
    randomise_batch_norm(model)
    with torch.no_grad():
        shape = _output(model(x)).shape
    before = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=amount,
        ignored_layers=[model.get_classifier()],
        num_heads=_num_heads(model),
    )
    pruner.step()
    for m in model.modules():  # what Torch-Pruning's timm example does after step()
        qkv = getattr(m, "qkv", None)
        if qkv in pruner.num_heads:
            m.num_heads = pruner.num_heads[qkv]
            if isinstance(getattr(m, "head_dim", None), int):
                m.head_dim = qkv.out_features // (3 * m.num_heads)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        ran = _output(model(x)).shape == shape
    after = sum(p.numel() for p in model.parameters())
    return {"ran": ran, "params": after / before, "seconds": seconds}


def _child(tool: str, family: str, amount: float, verbose: bool) -> int:
    import torch

    torch.set_num_threads(1)
    try:
        row = (_masksparse if tool == "masksparse" else _torch_pruning)(family, amount, verbose)
    except Exception as exc:  # reported as the row's result
        if verbose:
            traceback.print_exc()
        row = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"}
    print("RESULT " + json.dumps(row))
    return 0


def _run(tool: str, family: str, amount: float, timeout: float, verbose: bool) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--child", tool, "--families", family, "--amount", str(amount)]
    if verbose:
        cmd.append("-v")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if verbose and done.stderr:
        print(done.stderr[-4000:], file=sys.stderr)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    return {"error": f"process ended ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}"}


def _cells(tool: str, r: dict[str, object]) -> list[object]:
    if "error" in r:
        return ["error", "", "", str(r["error"])] if tool == "masksparse" else ["error", "", str(r["error"])]
    params, seconds = f"{r['params']:.3f}", f"{r['seconds']:.1f}"
    if tool == "masksparse":
        ok = "yes" if r["exact"] else f"NO ({r['err']:.1e})"
        return [ok, params, seconds, r["kept"]]
    return ["yes" if r["ran"] else "NO", params, seconds]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="", help="family names of tests/timm_models.py (default: all)")
    parser.add_argument("--tools", default="masksparse,torch_pruning")
    parser.add_argument("--amount", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per model and tool")
    parser.add_argument("--json", default="", help="also write the rows to this file")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("-v", action="store_true", help="tracebacks and every kept-unit reason")
    args = parser.parse_args(argv)
    families = args.families.split(",") if args.families else list(timm_models.FAMILIES)
    if args.child:
        return _child(args.child, families[0], args.amount, args.v)
    tools = args.tools.split(",")
    results: dict[str, dict[str, dict[str, object]]] = {}
    rows = []
    for family in families:
        results[family] = {t: _run(t, family, args.amount, args.timeout, args.v) for t in tools}
        row = [family, timm_models.FAMILIES[family][0]]
        for t in tools:
            row += _cells(t, results[family][t])
        rows.append(row)
        print(" | ".join(str(c) for c in row), file=sys.stderr, flush=True)  # progress
    headers = ["family", "model"]
    if "masksparse" in tools:
        headers += ["exact", "params", "s", "kept"]
    if "torch_pruning" in tools:
        headers += ["TP ran", "TP params", "TP s"]
    print(tabulate(rows, headers=headers))
    n = len(families)
    if "masksparse" in tools:
        ms = [results[f]["masksparse"] for f in families]
        exact = sum(bool(r.get("exact")) for r in ms)
        crashed = sum("error" in r for r in ms)
        small = sum(bool(r.get("exact")) and float(r["params"]) <= BOUND for r in ms)  # type: ignore[arg-type]
        print(
            f"\nmasksparse: {exact} of {n} exact, {crashed} errors, {small} exact at most {BOUND} of params"
        )
    if "torch_pruning" in tools:
        tp = [results[f]["torch_pruning"] for f in families]
        ran = sum(bool(r.get("ran")) for r in tp)
        small = sum(bool(r.get("ran")) and float(r["params"]) <= BOUND for r in tp)  # type: ignore[arg-type]
        print(f"Torch-Pruning: {ran} of {n} run after pruning, {small} of them at most {BOUND} of params")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
