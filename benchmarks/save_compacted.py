"""How big is a compacted model's file, how long do save_compacted and load_compacted take, and does the
rebuilt model compute exactly what the compacted one does?

Each model (random weights, nothing downloaded) is pruned with ``prune_channels(amount=0.5)`` and
compacted; the compacted model is saved, a fresh model of another seed is built and rebuilt from the
file, and both run on the same inputs. Times are medians of ``--repeats``; building the fresh model is
not timed. Run from the repository root: ``python benchmarks/save_compacted.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import masksparse  # noqa: E402
from tests import hf_models  # noqa: E402


def _torchvision(name: str) -> Callable[[int], tuple[nn.Module, Any]]:
    def build(seed: int) -> tuple[nn.Module, Any]:
        import torchvision

        torch.manual_seed(seed)
        model = getattr(torchvision.models, name)(weights=None).eval()
        return model, torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    return build


def _timm(name: str) -> Callable[[int], tuple[nn.Module, Any]]:
    def build(seed: int) -> tuple[nn.Module, Any]:
        import timm

        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False).eval()
        return model, torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    return build


def _hf(name: str, base: bool = False) -> Callable[[int], tuple[nn.Module, Any]]:
    def build(seed: int) -> tuple[nn.Module, Any]:
        import transformers

        if not base:
            return hf_models.build(name, seed), hf_models.inputs(name)
        torch.manual_seed(seed)
        model = transformers.BertModel(transformers.BertConfig()).eval()  # bert-base sizes
        return model, hf_models.inputs(name)

    return build


MODELS = {
    "resnet18": _torchvision("resnet18"),
    "vit_b_16": _torchvision("vit_b_16"),
    "timm deit_tiny_patch16_224": _timm("deit_tiny_patch16_224"),
    "bert (hf_models small config)": _hf("bert"),
    "bert-base (BertConfig())": _hf("bert", base=True),
    "llama (hf_models small config)": _hf("llama"),
}


def _out(model: nn.Module, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out if isinstance(out, torch.Tensor) else out[0]


def measure(name: str, build: Callable[[int], tuple[nn.Module, Any]], repeats: int) -> dict[str, Any]:
    model, inputs = build(0)
    masksparse.prune_channels(model, inputs, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = masksparse.compact(model, inputs)
    path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    saves, loads = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        masksparse.save_compacted(small, path)
        saves.append(time.perf_counter() - start)
        fresh, _ = build(1)
        start = time.perf_counter()
        rebuilt = masksparse.load_compacted(fresh, path)
        loads.append(time.perf_counter() - start)
    a, b = _out(small, inputs), _out(rebuilt, inputs)
    kept = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in model.parameters())
    return {
        "model": name,
        "params kept": f"{kept:.2f}",
        "file MB": f"{os.path.getsize(path) / 1e6:.1f}",
        "save s": f"{statistics.median(saves):.3f}",
        "load s": f"{statistics.median(loads):.3f}",
        "max |diff|": f"{(a - b).abs().max().item():.1e}",
        "identical": torch.equal(a, b),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names from the table")
    args = parser.parse_args()
    rows = [measure(name, MODELS[name], args.repeats) for name in args.models.split(",")]
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
