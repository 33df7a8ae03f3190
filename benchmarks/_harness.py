"""Shared pieces of the benchmarks: fresh-subprocess workers, peak RSS, and tensor bytes held by a model.

Every measurement runs in a fresh interpreter (``run_worker``) so that one library's peak or cached
allocations never leak into the other's numbers. A worker is the same script started with
``--worker '<json options>'``; it prints one JSON line as its last line of output.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch
from torch import nn

MIB = 2**20
GIB = 2**30


# ---------------------------------------------------------------- process memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> None:
    """Reset the RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """RSS high-water mark since the last ``reset_peak_rss``."""
    return _status_kib("VmHWM") * 1024


def trim_malloc() -> None:
    """Return the free memory glibc keeps cached in its heaps to the system (``malloc_trim(0)``).

    Freed tensors below glibc's mmap threshold (which rises to 32 MiB as large blocks are freed) stay
    resident in the heap; after trimming, RSS counts what is actually held.
    """
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def mem_available_bytes() -> int:
    """MemAvailable of the whole machine, as ``free`` reports it."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


@contextmanager
def measure() -> Iterator[dict[str, float]]:
    """Time a block and measure its peak RSS above the RSS just before it.

    Yields a dict filled on exit with ``seconds`` (wall), ``cpu_user`` and ``cpu_sys`` (CPU seconds of
    all threads), ``page_faults`` (minor faults: first touches of fresh pages), ``rss_before``,
    ``peak_abs`` (the high-water mark), ``peak_extra`` (high-water mark minus the RSS before) and
    ``rss_after_extra`` (RSS after minus RSS before).
    """
    out: dict[str, float] = {}
    before = rss_bytes()
    reset_peak_rss()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    yield out
    out["seconds"] = time.perf_counter() - t0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_user"] = usage1.ru_utime - usage0.ru_utime
    out["cpu_sys"] = usage1.ru_stime - usage0.ru_stime
    out["page_faults"] = usage1.ru_minflt - usage0.ru_minflt
    out["rss_before"] = before
    out["peak_abs"] = peak_rss_bytes()
    out["peak_extra"] = out["peak_abs"] - before
    out["rss_after_extra"] = rss_bytes() - before


# ---------------------------------------------------------------- models and libraries


def prune_module(lib: str) -> ModuleType:
    """``torch.nn.utils.prune`` or ``masksparse.prune``; both expose the same functions."""
    if lib == "torch":
        import torch.nn.utils.prune as prune
    elif lib == "masksparse":
        from masksparse import prune  # type: ignore[no-redef]
    else:
        raise ValueError(f"lib must be 'torch' or 'masksparse', got {lib!r}")
    return prune


def linear_stack(layers: int, width: int, seed: int = 0, cheap_init: bool = False) -> nn.Sequential:
    """``layers`` x ``Linear(width, width)`` with ReLU between them.

    ``cheap_init`` builds on the meta device, materialises with ``to_empty`` and fills with
    ``normal_`` in place: the default Kaiming init of billions of weights takes minutes.
    """
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i in range(layers):
        if cheap_init:
            mods.append(nn.Linear(width, width, device="meta"))
        else:
            mods.append(nn.Linear(width, width))
        if i < layers - 1:
            mods.append(nn.ReLU())
    model = nn.Sequential(*mods)
    if cheap_init:
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, width**-0.5)
    return model


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


# ---------------------------------------------------------------- tensor bytes held


def _tensors_in(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors reachable from a hook object: its attributes, lists/tuples/dicts, nested methods."""
    if depth > 4:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple, set)):
        for x in obj:
            yield from _tensors_in(x, depth + 1)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors_in(x, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type, ModuleType)):
        yield from _tensors_in(vars(obj), depth + 1)


def held_tensors(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Tensors a model holds, by where they hang.

    ``module.__dict__`` is read directly (never ``getattr``), so a property that computes
    ``weight = weight_orig * weight_mask`` on read is not triggered and counts nothing.
    """
    out: dict[str, list[torch.Tensor]] = {"params": [], "buffers": [], "attrs": [], "hooks": []}
    for mod in model.modules():
        out["params"] += [p for p in mod._parameters.values() if p is not None]
        out["buffers"] += [b for b in mod._buffers.values() if b is not None]
        out["attrs"] += [v for v in mod.__dict__.values() if isinstance(v, torch.Tensor)]
        for hooks in (mod._forward_pre_hooks, mod._forward_hooks):
            for hook in hooks.values():
                out["hooks"] += list(_tensors_in(hook))
    return out


def storage_bytes(groups: dict[str, list[torch.Tensor]]) -> dict[str, int]:
    """Bytes per group, each storage counted once over all groups (views of one mask count once).

    A storage is charged to the first group that reaches it, in the order params, buffers, attrs,
    hooks, so a buffer that a hook also references is charged to buffers.
    """
    seen: set[int] = set()
    out: dict[str, int] = {}
    for name, tensors in groups.items():
        total = 0
        for t in tensors:
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
        out[name] = total
    return out


# ---------------------------------------------------------------- workers and tables


def run_worker(script: str, options: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``script --worker <options>`` in a fresh interpreter and return the JSON it prints last."""
    cmd = [sys.executable, script, "--worker", json.dumps(options)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"worker {options} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker_options(argv: list[str]) -> dict[str, Any] | None:
    """The options of a worker invocation, or None when the script was started by a user."""
    if len(argv) >= 3 and argv[1] == "--worker":
        return json.loads(argv[2])
    return None


def median(values: list[float]) -> float:
    return statistics.median(values)


def mib(n: float) -> str:
    return f"{n / MIB:,.0f} MiB"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}x" if b else "n/a"


def machine_line() -> str:
    return (
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"MemTotal {_meminfo_total() / GIB:.1f} GiB, Python {sys.version.split()[0]}"
    )


def _meminfo_total() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024
