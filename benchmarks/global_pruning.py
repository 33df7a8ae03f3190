"""Global L1 pruning of ~100M weights: masksparse.prune vs torch.nn.utils.prune, side by side.

``global_unstructured(params, pruning_method=L1Unstructured, amount=0.8)`` over every weight of a stack
of Linear layers (default 24 x Linear(2048, 2048) = 100.7M weights). Each run is a fresh subprocess;
the libraries alternate, and the table shows medians of the repeats. Each worker first prunes a toy
model once, so one-time costs (lazy imports, kernel set-up) are not timed. Columns:

* time of the call (wall, and CPU seconds user + system over both threads);
* extra peak: RSS high-water mark during the call minus the RSS just before it;
* bytes left: tensors the call left on the model beyond its parameters (mask buffers, torch's
  ``weight`` copies in ``module.__dict__``, ``CustomFromMask`` masks in the hooks; one storage counted
  once, so views of one concatenated mask count once);
* the number of pruned entries, and whether both libraries cut at the same score.

``--big`` prunes 32 x Linear(8192, 8192) (2.1 billion float32 weights, 8 GiB) with masksparse only
(torch would need over 20 GiB); it refuses to start with less than 16 GiB available.

Run: ``python benchmarks/global_pruning.py [--repeats 3]`` and ``python benchmarks/global_pruning.py --big``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import subprocess
import sys
import time
from typing import Any

import torch
from _harness import (
    GIB,
    held_tensors,
    linear_stack,
    linears,
    machine_line,
    measure,
    median,
    mem_available_bytes,
    mib,
    prune_module,
    ratio,
    run_worker,
    storage_bytes,
    worker_options,
)
from tabulate import tabulate

BIG_NEEDS = 16 * GIB
_MEDIANS = ("seconds", "cpu_user", "cpu_sys", "peak", "left", "buffers", "attrs", "hooks")


def _time_phases(names: tuple[str, ...]) -> list[list[Any]]:
    """Record (function, seconds) for each call of these masksparse.prune.select helpers, if present.

    Diagnostic for the one --big run: it shows which selection passes ran (a sampled bracket, and the
    radix fallback when the bracket is too wide) without a second 8 GiB run under a profiler.
    """
    from masksparse.prune import select

    calls: list[list[Any]] = []

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                calls.append([name, round(time.perf_counter() - t0, 2)])

        return wrapper

    for name in names:
        if hasattr(select, name):
            setattr(select, name, timed(name, getattr(select, name)))
    return calls


def worker(opt: dict[str, Any]) -> dict[str, Any]:
    prune = prune_module(opt["lib"])
    phases = _time_phases(("_sample_bracket", "_narrow", "_select_in_bracket")) if opt["big"] else []
    model = linear_stack(opt["layers"], opt["width"], seed=0, cheap_init=opt["big"])
    params = [(m, "weight") for m in linears(model)]
    # One call on a toy model first, so one-time costs (imports, kernel set-up) stay out of the numbers.
    toy = [(m, "weight") for m in linears(linear_stack(2, 64))]
    prune.global_unstructured(toy, pruning_method=prune.L1Unstructured, amount=opt["amount"])
    del toy
    phases.clear()
    gc.collect()
    with measure() as m:
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=opt["amount"])
    gc.collect()
    held = storage_bytes(held_tensors(model))
    out = {
        "lib": opt["lib"],
        "weights": sum(mod.weight_orig.numel() for mod in linears(model)),
        "left": held["buffers"] + held["attrs"] + held["hooks"],
        **{k: held[k] for k in ("buffers", "attrs", "hooks")},
        **m,
        "peak": m["peak_extra"],
        "mask_dtype": str(linears(model)[0].weight_mask.dtype),
        "phases": phases,
    }
    out.update(_selection(model, digest=not opt["big"]))
    return out


@torch.no_grad()
def _selection(model: Any, digest: bool) -> dict[str, Any]:
    """How many entries were pruned, the cut, and (small models) a digest of the masks."""
    mods = linears(model)
    out: dict[str, Any] = {
        "pruned": sum(int((mod.weight_mask == 0).sum()) for mod in mods),
        # A valid L1 selection prunes no score above one it keeps; ties at the cut may go either way.
        "max_pruned": max(float(mod.weight_orig[mod.weight_mask == 0].abs().max()) for mod in mods),
        "min_kept": min(float(mod.weight_orig[mod.weight_mask != 0].abs().min()) for mod in mods),
    }
    if digest:
        h = hashlib.sha1()
        for mod in mods:
            h.update(mod.weight_mask.bool().numpy().tobytes())
        out["digest"] = h.hexdigest()
    return out


def compare(args: argparse.Namespace) -> None:
    opt = {"layers": args.layers, "width": args.width, "amount": args.amount, "big": False}
    runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in args.libs.split(",")}
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        for lib in runs:
            runs[lib].append(run_worker(__file__, {**opt, "lib": lib}))
    weights = next(iter(runs.values()))[0]["weights"]
    print(
        f"global_unstructured(L1Unstructured, amount={args.amount}) over {args.layers} x "
        f"Linear({args.width}, {args.width}) = {weights:,} weights ({mib(4 * weights)}); "
        f"medians of {args.repeats} fresh subprocesses each; {machine_line()}"
    )
    print(_results_table(runs))
    if len(runs) == 2:
        print()
        print(_checks_table(runs))


def _results_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    med = {lib: {k: median([r[k] for r in rs]) for k in _MEDIANS} for lib, rs in runs.items()}
    rows = []
    for lib, rs in runs.items():
        m = med[lib]
        rows.append(
            [
                lib,
                rs[0]["mask_dtype"],
                f"{m['seconds']:.2f} s",
                ", ".join(f"{r['seconds']:.2f}" for r in rs),
                f"{m['cpu_user']:.1f} + {m['cpu_sys']:.1f} s",
                mib(m["peak"]),
                mib(m["left"]),
                f"{mib(m['buffers'])} / {mib(m['attrs'])} / {mib(m['hooks'])}",
                f"{rs[0]['pruned']:,}",
            ]
        )
    if len(runs) == 2:
        t, s = med["torch"], med["masksparse"]
        rows.append(
            [
                "masksparse / torch",
                "",
                ratio(s["seconds"], t["seconds"]),
                "",
                ratio(s["cpu_user"] + s["cpu_sys"], t["cpu_user"] + t["cpu_sys"]),
                ratio(s["peak"], t["peak"]),
                ratio(s["left"], t["left"]),
                "",
                "",
            ]
        )
    headers = [
        "library",
        "mask dtype",
        "time",
        "runs (s)",
        "CPU user + sys",
        "extra peak RSS",
        "bytes left",
        "buffers / attrs / hooks",
        "pruned entries",
    ]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _checks_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    every = [r for rs in runs.values() for r in rs]

    def same(key: str) -> str:
        return _yn(len({r[key] for r in every}) == 1)

    checks = [
        ["both prune the same number of entries", same("pruned")],
        ["both cut at the same score (largest pruned abs(w))", same("max_pruned")],
        [
            "every run: largest pruned abs(w) <= smallest kept abs(w)",
            _yn(all(r["max_pruned"] <= r["min_kept"] for r in every)),
        ],
        ["identical masks (ties at the cut may legitimately differ)", same("digest")],
    ]
    return tabulate(checks, headers=["check", ""], tablefmt="github")


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"


def big(args: argparse.Namespace) -> None:
    free = subprocess.run(["free", "-g"], capture_output=True, text=True).stdout
    print("free -g before the run:\n" + free)
    if mem_available_bytes() < BIG_NEEDS:
        sys.exit(
            f"--big needs {BIG_NEEDS / GIB:.0f} GiB available, the machine has "
            f"{mem_available_bytes() / GIB:.1f} GiB; not started"
        )
    opt = {"layers": 32, "width": 8192, "amount": args.amount, "big": True, "lib": "masksparse"}
    r = run_worker(__file__, opt)
    rows = [
        [
            "masksparse",
            f"{r['weights']:,} ({4 * r['weights'] / GIB:.1f} GiB)",
            f"{r['seconds']:.1f} s",
            f"{r['cpu_user']:.1f} + {r['cpu_sys']:.1f} s",
            f"{r['peak'] / GIB:.2f} GiB",
            f"{r['peak_abs'] / GIB:.2f} GiB",
            f"{r['left'] / GIB:.2f} GiB",
            f"{r['pruned']:,}",
            f"{round(args.amount * r['weights']):,}",
            _yn(r["max_pruned"] <= r["min_kept"]),
        ]
    ]
    headers = [
        "library",
        "weights",
        "time",
        "CPU user + sys",
        "extra peak RSS",
        "peak RSS (process)",
        "bytes left",
        "pruned entries",
        "expected",
        "pruned abs(w) <= kept abs(w)",
    ]
    print(
        f"global_unstructured(L1Unstructured, amount={args.amount}) over 32 x Linear(8192, 8192), "
        f"one fresh subprocess; {machine_line()}"
    )
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    print("\nselection phases (function, seconds), in call order:", r["phases"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--amount", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--libs", default="torch,masksparse", help="comma-separated: torch, masksparse")
    parser.add_argument("--big", action="store_true", help="2.1B weights, masksparse only")
    args = parser.parse_args()
    if args.big:
        big(args)
    else:
        compare(args)


if __name__ == "__main__":
    worker_opt = worker_options(sys.argv)
    if worker_opt is None:
        main()
    else:
        import json

        print(json.dumps(worker(worker_opt)))
