"""Memory a pruned model holds at rest: masksparse.prune vs torch.nn.utils.prune, side by side.

A stack of Linear layers (default 24 x Linear(2048, 2048), 384 MiB of float32 weights) is pruned per
tensor with ``l1_unstructured(amount=0.5)`` on every weight, one forward pass runs, and then we count
what the model holds on top of the dense model:

* tensor bytes: parameters, buffers, tensors in ``module.__dict__`` that are neither (torch's stale
  ``weight`` copy) and tensors held by the pruning hooks, every storage counted once;
* the RSS delta at rest (RSS after pruning + forward minus RSS of the dense model after a forward),
  as it is, and after ``malloc_trim(0)`` hands back what glibc keeps cached from freed temporaries
  (that part depends on the allocator, not on what the model holds);
* the peak RSS above the dense model while pruning + the forward ran.

The masksparse worker also saves its ``state_dict`` and loads it with plain ``load_state_dict`` into a
model pruned by torch.nn.utils.prune from other weights, and checks that the outputs match.

Each measurement runs in a fresh subprocess. Run: ``python benchmarks/memory.py [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import gc
import sys
from typing import Any

import torch
from _harness import (
    held_tensors,
    linear_stack,
    linears,
    machine_line,
    measure,
    median,
    mib,
    prune_module,
    ratio,
    rss_bytes,
    run_worker,
    storage_bytes,
    trim_malloc,
    worker_options,
)
from tabulate import tabulate


def worker(opt: dict[str, Any]) -> dict[str, Any]:
    prune = prune_module(opt["lib"])
    model = linear_stack(opt["layers"], opt["width"], seed=0)
    x = torch.randn(opt["batch"], opt["width"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(x)
    prune.l1_unstructured(linear_stack(1, 64)[0], "weight", amount=opt["amount"])  # one-time costs
    gc.collect()
    trim_malloc()
    dense = storage_bytes(held_tensors(model))["params"]
    weights = sum(m.weight.numel() * m.weight.element_size() for m in linears(model))
    rss_dense = rss_bytes()

    with measure() as m:
        for mod in linears(model):
            prune.l1_unstructured(mod, "weight", amount=opt["amount"])
        with torch.no_grad():
            y = model(x)
    gc.collect()
    rss_rest = rss_bytes() - rss_dense
    trim_malloc()
    held = storage_bytes(held_tensors(model))
    out = {
        "lib": opt["lib"],
        "weights": weights,
        "extra_tensors": sum(held.values()) - dense,
        "buffers": held["buffers"],
        "attrs": held["attrs"],
        "hooks": held["hooks"],
        "rss_rest": rss_rest,
        "rss_trimmed": rss_bytes() - rss_dense,
        "peak": m["peak_extra"],
        "mask_dtype": str(linears(model)[0].weight_mask.dtype),
    }
    if opt["lib"] == "masksparse":
        out.update(_interop(model, y, x, opt))
    return out


def _interop(model: torch.nn.Module, y: torch.Tensor, x: torch.Tensor, opt: dict[str, Any]) -> dict[str, Any]:
    """Load the masksparse state_dict into a torch-pruned model of other weights; compare outputs."""
    import torch.nn.utils.prune as tprune

    sd = model.state_dict()
    ref = linear_stack(opt["layers"], opt["width"], seed=1)
    for mod in linears(ref):
        tprune.l1_unstructured(mod, "weight", amount=opt["amount"])
    ref.load_state_dict(sd)  # strict: same keys
    with torch.no_grad():
        y_ref = ref(x)
    return {
        "same_keys": list(sd) == list(ref.state_dict()),
        "outputs_equal": bool(torch.equal(y, y_ref)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--amount", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--libs", default="torch,masksparse", help="comma-separated: torch, masksparse")
    args = parser.parse_args()
    opt = {k: getattr(args, k) for k in ("layers", "width", "amount", "batch")}

    runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in args.libs.split(",")}
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        for lib in runs:
            runs[lib].append(run_worker(__file__, {**opt, "lib": lib}))

    med = {lib: {k: median([r[k] for r in rs]) for k in _NUMERIC} for lib, rs in runs.items()}
    rows = []
    for lib, rs in runs.items():
        m, w = med[lib], rs[0]["weights"]
        interop = "yes" if all(r.get("outputs_equal") and r.get("same_keys") for r in rs) else "no"
        rows.append(
            [
                lib,
                rs[0]["mask_dtype"],
                mib(m["buffers"]),
                mib(m["attrs"]),
                mib(m["hooks"]),
                *(f"{mib(m[k])} ({ratio(m[k], w)})" for k in ("extra_tensors", "rss_trimmed", "rss_rest")),
                mib(m["peak"]),
                "n/a" if lib == "torch" else interop,
            ]
        )
    if len(runs) == 2:
        t, s = med["torch"], med["masksparse"]
        rows.append(
            [
                "masksparse / torch",
                "",
                ratio(s["buffers"], t["buffers"]),
                "",
                "",
                *(ratio(s[k], t[k]) for k in ("extra_tensors", "rss_trimmed", "rss_rest", "peak")),
                "",
            ]
        )
    headers = [
        "library",
        "mask dtype",
        "buffers",
        "attrs",
        "hook tensors",
        "extra tensors (/ weights)",
        "RSS at rest, trimmed (/ weights)",
        "RSS at rest, untrimmed (/ weights)",
        "peak (prune+fwd)",
        "state_dict -> torch",
    ]
    weights = next(iter(runs.values()))[0]["weights"]
    print(
        f"{args.layers} x Linear({args.width}, {args.width}), l1_unstructured(amount={args.amount}) "
        f"per weight, one forward of batch {args.batch}; weights {mib(weights)}; "
        f"medians of {args.repeats} fresh subprocesses each; {machine_line()}"
    )
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))


_NUMERIC = ("buffers", "attrs", "hooks", "extra_tensors", "rss_rest", "rss_trimmed", "peak")

if __name__ == "__main__":
    worker_opt = worker_options(sys.argv)
    if worker_opt is None:
        main()
    else:
        import json

        print(json.dumps(worker(worker_opt)))
