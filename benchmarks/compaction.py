"""Channel pruning and compaction of resnet50 and vit_b_16: masksparse next to Torch-Pruning 1.6.1.

Both libraries remove 50% of the channels of torchvision's resnet50 and vit_b_16 (weights=None, eval
mode, BatchNorm statistics and affine parameters randomised as in a trained network; the classifier's
outputs kept), in one run, side by side:

* **time** to get the smaller model, in fresh subprocesses that alternate between the libraries
  (medians of ``--repeats``). masksparse: ``prune_channels(model, x, 0.5)`` (the model's outputs are never
  pruned, so the classifier keeps its classes and loses inputs, as with Torch-Pruning's
  ``ignored_layers=[head]``) then
  ``compact(model, x)``, which traces again, plans, applies the plan to a copy and verifies it against
  the masked model; the split comes from timing masksparse's own stages in the same call (trace in
  prune_channels, scoring and masks, trace in compact, plan, copy, apply, verify). Torch-Pruning:
  ``tp.pruner.MetaPruner(...)`` (it builds the dependency graph) then ``pruner.step()``; for vit_b_16 as
  in Torch-Pruning's torchvision example: each ``nn.MultiheadAttention`` in ``num_heads`` and
  ``model.hidden_dim`` set by hand after the step. Each worker first does the same on a small model of
  the same family, so one-time costs (lazy imports, kernel set-up) are not timed. ``--parts cold``
  times the first call instead: a fresh process with both libraries imported and the dense model run
  once (to count its MACs), but neither library called before.
* **latency** on CPU (2 threads, ``torch.inference_mode``) of the dense model and both smaller ones at
  batch 16 and batch 1, measured in one process, interleaved (dense, masksparse, Torch-Pruning, dense,
  ...) so all three see the same machine load; medians of ``--latency-repeats`` after a warm-up pass.
* **MACs** and **parameters** of each model, counted by Torch-Pruning's ``tp.utils.count_ops_and_params``
  at batch 1 (it counts convolutions, linear layers and nn.MultiheadAttention, projections and the
  attention products included; masksparse's ``CompactMultiheadAttention`` is counted with the same
  formula over its inner width), and their ratios to the dense model.
* masksparse's **max relative error** (``max |masked - compacted| / max |masked|``) on a fresh batch of
  4 inputs that compaction never saw. Torch-Pruning's pruned model computes something else by design
  (it removes channels that still carry signal), so it has no such column.

    python benchmarks/compaction.py                          # --repeats 3 --latency-repeats 5
    python benchmarks/compaction.py --models resnet50 --repeats 1 --latency-repeats 2   # a quick try
    python benchmarks/compaction.py --parts latency          # only the latency table
    python benchmarks/compaction.py --parts time,cold        # warm and first-call times
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from _harness import machine_line, median, run_worker, worker_options
from tabulate import tabulate
from torch import nn
from zoo import randomise_batch_norm

import masksparse
from masksparse import structured
from masksparse.compact import apply as compaction
from masksparse.compact import relative_error

_MODELS = ("resnet50", "vit_b_16")
_LIBS = ("Torch-Pruning", "masksparse")
# masksparse stages timed inside one prune_channels + compact call: (module, function name, label).
_STAGES = (
    (structured, "trace", "trace"),
    (compaction, "trace", "trace"),
    (compaction, "_plan", "plan"),
    (compaction, "_copy", "copy"),
    (compaction, "_apply", "apply"),
    (compaction, "verify", "verify"),
)


def build(name: str, small: bool = False) -> nn.Module:
    """The benchmark model (or a small one of the same family for the warm-up), randomised, eval."""
    torch.manual_seed(0)
    if not small:
        model = torchvision.models.get_model(name, weights=None)
    elif name.startswith("vit"):
        model = torchvision.models.VisionTransformer(
            224, 16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16
        )
    else:
        model = torchvision.models.resnet18(weights=None)
    randomise_batch_norm(model.eval())
    return model


def head(model: nn.Module) -> nn.Module:
    """The classifier, the layer both libraries leave alone."""
    return model.heads.head if isinstance(model, torchvision.models.VisionTransformer) else model.fc


def with_masksparse(model: nn.Module, x: torch.Tensor) -> nn.Module:
    masksparse.prune_channels(model, x, 0.5)
    return masksparse.compact(model, x)


def with_torch_pruning(
    model: nn.Module, x: torch.Tensor, log: list[tuple[str, float, float]] | None = None
) -> nn.Module:
    """Torch-Pruning's MetaPruner at 50%, set up for torchvision ViTs as its own example does."""
    import torch_pruning as tp

    vit = isinstance(model, torchvision.models.VisionTransformer)
    heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)} if vit else {}
    t0, c0 = time.perf_counter(), _cpu_seconds()
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs=x,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=[head(model)],
        num_heads=heads,
    )
    t1, c1 = time.perf_counter(), _cpu_seconds()
    pruner.step()
    if vit:  # torchvision's forward reads hidden_dim; Torch-Pruning leaves it at the old width
        model.hidden_dim = model.conv_proj.out_channels
    if log is not None:
        log += [("graph", t1 - t0, c1 - c0), ("step", time.perf_counter() - t1, _cpu_seconds() - c1)]
    return model


def _timed_stages(log: list[tuple[str, float, float]]) -> Callable[[], None]:
    """Wrap masksparse's stage functions so each call appends (label, wall s, CPU s); returns an undo."""
    saved = []
    for module, fn_name, label in _STAGES:
        fn = getattr(module, fn_name, None)
        if fn is None:
            continue

        def wrapper(*args: Any, _fn: Any = fn, _label: str = label, **kwargs: Any) -> Any:
            t0, c0 = time.perf_counter(), _cpu_seconds()
            try:
                return _fn(*args, **kwargs)
            finally:
                log.append((_label, time.perf_counter() - t0, _cpu_seconds() - c0))

        saved.append((module, fn_name, fn))
        setattr(module, fn_name, wrapper)

    def undo() -> None:
        for module, fn_name, fn in saved:
            setattr(module, fn_name, fn)

    return undo


def widths(model: nn.Module) -> str:
    """The widths a reader wants to compare: ViT's residual, MLP and heads; ResNet's first block."""
    if isinstance(model, torchvision.models.VisionTransformer):
        block = model.encoder.layers[0]
        attn = block.self_attention
        return (
            f"hidden {model.conv_proj.out_channels}, mlp {block.mlp[0].out_features}, "
            f"heads {attn.num_heads} x {attn.head_dim}"
        )
    block = model.layer1[0]
    return (
        f"stem {model.conv1.out_channels}, layer1[0] {block.conv1.out_channels}->{block.conv3.out_channels}"
    )


def _compact_attention_ops(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
    """Torch-Pruning's count for nn.MultiheadAttention, for masksparse's compact attention: the same
    terms, with the inner width ``num_heads * head_dim`` where Torch-Pruning assumes ``embed_dim``
    (it counts a module by its exact type, so the subclass would otherwise count nothing)."""
    q, k, v = inputs[:3]
    batch, length = (0, 1) if module.batch_first else (1, 0)
    n, s = q.shape[length], k.shape[length]
    heads, hd = module.num_heads, module.head_dim
    inner = heads * hd
    ops = n * inner + (n * q.shape[2] + s * k.shape[2] + s * v.shape[2]) * inner  # q scaling, projections
    if module.in_proj_bias is not None:
        ops += (n + 2 * s) * inner
    ops += heads * (2 * n * s * hd + n * s)  # QK^T, softmax, AV
    ops += n * q.shape[2] * (inner + 1)  # output projection and its bias
    module.__flops__ += int(ops * q.shape[batch])


def _ops(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    import torch_pruning as tp
    from torch_pruning.utils import op_counter

    op_counter.MODULES_MAPPING.setdefault(masksparse.CompactMultiheadAttention, _compact_attention_ops)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        macs, params = tp.utils.count_ops_and_params(model, x)
    return int(macs), int(params)


def time_worker(opt: dict[str, Any]) -> dict[str, Any]:
    """One library on one model in a fresh process: the time to the smaller model and what it is."""
    torch.set_num_threads(2)
    name, lib = opt["model"], opt["lib"]
    x = torch.randn(1, 3, 224, 224)
    run = with_masksparse if lib == "masksparse" else with_torch_pruning
    if not opt.get("cold"):
        run(build(name, small=True), x)  # warm-up, untimed
    model = build(name)
    dense_macs, dense_params = _ops(model, x)
    out: dict[str, Any] = {"lib": lib, "model": name, "dense_macs": dense_macs, "dense_params": dense_params}
    log: list[tuple[str, float, float]] = []
    undo = _timed_stages(log) if lib == "masksparse" else (lambda: None)
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    try:
        small = with_masksparse(model, x) if lib == "masksparse" else with_torch_pruning(model, x, log)
    except Exception as exc:  # a benchmark reports failures instead of stopping
        return {**out, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    finally:
        undo()
    out["seconds"] = time.perf_counter() - t0
    out["cpu"] = _cpu_seconds() - cpu0
    out["stages"] = log
    out["widths"] = widths(small)
    try:
        with torch.no_grad():
            small(torch.randn(2, 3, 224, 224))
        out["macs"], out["params"] = _ops(small, x)
    except Exception as exc:
        out["error"] = f"pruned, but its forward fails: {type(exc).__name__}: {str(exc)[:200]}"
    return out


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _latency(model: nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(x)
        return time.perf_counter() - t0


def latency_worker(opt: dict[str, Any]) -> dict[str, Any]:
    """Dense, masksparse's and Torch-Pruning's model in one process, timed interleaved."""
    torch.set_num_threads(2)
    x = torch.randn(1, 3, 224, 224)
    dense = build(opt["model"])
    models: dict[str, nn.Module] = {"dense": dense}
    out: dict[str, Any] = {"model": opt["model"], "errors": {}, "latency": {}}
    for lib, fn in (("masksparse", with_masksparse), ("Torch-Pruning", with_torch_pruning)):
        try:
            models[lib] = fn(copy.deepcopy(dense), x)
        except Exception as exc:
            out["errors"][lib] = f"{type(exc).__name__}: {str(exc)[:200]}"
    masked = copy.deepcopy(dense)
    masksparse.prune_channels(masked, x, 0.5)
    fresh = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out["max_rel_err"] = relative_error(masked(fresh), models["masksparse"](fresh))
    del masked
    out["macs"] = {name: _ops(m, x)[0] for name, m in models.items()}
    for batch in (16, 1):
        xb = torch.randn(batch, 3, 224, 224)
        for name, m in list(models.items()):
            try:
                _latency(m, xb)  # warm-up
            except Exception as exc:
                out["errors"][name] = f"forward fails: {type(exc).__name__}: {str(exc)[:200]}"
                del models[name]
        runs: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(opt["repeats"] if batch == 16 else 4 * opt["repeats"]):
            for name, m in models.items():
                runs[name].append(_latency(m, xb))
        out["latency"][str(batch)] = {name: median(r) for name, r in runs.items()}
    return out


def _stage_split(r: dict[str, Any]) -> str:
    """Stages in call order as 'label wall/CPU'; masksparse's first trace is prune_channels' own, and
    the rest of prune_channels (scores, selection, masks) is what its total leaves over."""
    parts, seen_trace = [], False
    for label, wall, cpu in r["stages"]:
        if label == "trace":
            label = "trace (compact)" if seen_trace else "trace (prune)"
            seen_trace = True
        parts.append(f"{label} {wall:.2f}/{cpu:.2f}")
    if r["lib"] == "masksparse":
        wall = r["seconds"] - sum(w for _, w, _ in r["stages"])
        cpu = r["cpu"] - sum(c for _, _, c in r["stages"])
        parts.insert(1, f"score+mask {wall:.2f}/{cpu:.2f}")
    return ", ".join(parts)


def time_table(runs: dict[tuple[str, str], list[dict[str, Any]]]) -> str:
    rows = []
    for (name, lib), rs in runs.items():
        ok = [r for r in rs if "seconds" in r]
        if not ok:
            rows.append([name, lib, "failed", "", "", "", "", "", "", rs[0].get("error", "")])
            continue
        best = sorted(ok, key=lambda r: r["seconds"])[len(ok) // 2]  # the median run, for its split
        split = _stage_split(best)
        rows.append(
            [
                name,
                lib,
                f"{median([r['seconds'] for r in ok]):.2f} s",
                ", ".join(f"{r['seconds']:.2f}" for r in ok),
                f"{median([r['cpu'] for r in ok]):.2f} s",
                f"{best['macs'] / best['dense_macs']:.3f}x" if "macs" in best else "",
                f"{best['params'] / best['dense_params']:.3f}x" if "params" in best else "",
                best.get("widths", ""),
                split,
                best.get("error", ""),
            ]
        )
    for name in dict.fromkeys(n for n, _ in runs):
        wall, cpu = (
            {lib: median([r[k] for r in runs[(name, lib)] if k in r] or [0.0]) for lib in _LIBS}
            for k in ("seconds", "cpu")
        )
        if all(wall.values()):
            ratios = [f"{d['masksparse'] / d['Torch-Pruning']:.2f}x" for d in (wall, cpu)]
            rows.append([name, "masksparse / TP", ratios[0], "", ratios[1]] + [""] * 5)
    headers = [
        "model",
        "library",
        "time",
        "runs (s)",
        "CPU user+sys",
        "MACs",
        "params",
        "widths after",
        "split of the median run (wall/CPU s)",
        "error",
    ]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def latency_table(lat: list[dict[str, Any]]) -> str:
    rows = []
    for r in lat:
        name = r["model"]
        for lib in ("dense", *_LIBS):
            if lib not in r["latency"]["16"]:
                rows.append([name, lib, "", "", "", "", "", r["errors"].get(lib, "")])
                continue
            t16, t1 = r["latency"]["16"][lib], r["latency"]["1"].get(lib, float("nan"))
            d16, d1 = r["latency"]["16"]["dense"], r["latency"]["1"]["dense"]
            macs = r["macs"][lib] / r["macs"]["dense"]
            err = f"{r['max_rel_err']:.1e}" if lib == "masksparse" else ""
            rows.append(
                [
                    name,
                    lib,
                    f"{macs:.3f}x",
                    f"{t16 * 1e3:,.0f} ms ({t16 / d16:.3f}x)",
                    f"{t16 / d16 / macs:.2f}" if lib != "dense" else "",
                    f"{t1 * 1e3:,.1f} ms ({t1 / d1:.3f}x)",
                    err,
                    r["errors"].get(lib, ""),
                ]
            )
    headers = [
        "model",
        "model from",
        "MACs",
        "latency, batch 16",
        "latency / MACs ratio",
        "latency, batch 1",
        "max rel err vs masked",
        "error",
    ]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(_MODELS))
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per library and model")
    parser.add_argument("--latency-repeats", type=int, default=5, help="passes at batch 16 (4x at batch 1)")
    parser.add_argument(
        "--parts",
        default="time,latency",
        help="comma-separated: time (warm), cold (the first call in a fresh process), latency",
    )
    args = parser.parse_args()
    names = args.models.split(",")
    print(f"50% channels, classifier outputs kept; {machine_line()}; load average {_load()} at the start\n")
    for part in ("time", "cold"):
        if part not in args.parts.split(","):
            continue
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {(n, lib): [] for n in names for lib in _LIBS}
        for _ in range(args.repeats):  # alternating, so both libraries see the same machine load
            for key in runs:
                opt = {"kind": "time", "model": key[0], "lib": key[1], "cold": part == "cold"}
                runs[key].append(run_worker(__file__, opt))
                print(f"{part} {key}: {runs[key][-1].get('seconds', 'failed')}", file=sys.stderr, flush=True)
        title = "warm (after a call on a small model of the same family)" if part == "time" else "cold"
        print(f"Time, {title}:\n\n{time_table(runs)}", end="\n\n", flush=True)
    if "latency" in args.parts:
        opt = {"kind": "latency", "repeats": args.latency_repeats}
        lat = [run_worker(__file__, {**opt, "model": n}) for n in names]
        print(latency_table(lat))
    print(f"\nload average {_load()} at the end")


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


if __name__ == "__main__":
    worker_opt = worker_options(sys.argv)
    if worker_opt is None:
        main()
    else:
        import json

        work = time_worker if worker_opt["kind"] == "time" else latency_worker
        print(json.dumps(work(worker_opt)))
