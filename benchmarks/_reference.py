"""Straightforward reference implementations of Wanda and SparseGPT for a BERT encoder, written the way
the papers' code (locuslab/wanda, IST-DASLab/sparsegpt) runs them, to measure masksparse against.

Both catch the first block's inputs with a module that raises, then walk ``model.encoder.layer``: hooks
accumulate each Linear's statistics over the block's calibration inputs (every token, padding included,
as the references feed fixed-length segments), every Linear of the block is pruned, and the block is
run again to give the next block its (pruned) inputs. SparseGPT's ``fasterprune`` is transcribed:
``H = 2/n sum x x^T``, dead columns, 1% dampening, Cholesky of the inverse, 128-column blocks, the
mask chosen per block by ``w^2 / d^2`` with a sorted threshold, N:M chosen every ``m`` columns.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn


class _Catcher(nn.Module):
    def __init__(self, block: nn.Module, store: list[tuple[tuple, dict]]) -> None:
        super().__init__()
        self.block, self.store = block, store

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.store.append((args, kwargs))
        raise ValueError


class _SparseGPT:
    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer
        cols = layer.weight.shape[1]
        self.H = torch.zeros(cols, cols)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        inp = inp.reshape(-1, inp.shape[-1]).t().float()
        tmp = 1  # the reference counts batches, one per call
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp
        self.H += inp.matmul(inp.t())

    def fasterprune(self, sparsity: float, prunen: int = 0, prunem: int = 0, blocksize: int = 128,
                    percdamp: float = 0.01) -> None:  # fmt: skip
        W = self.layer.weight.data.clone().float()
        rows, columns = W.shape
        H = self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        damp = percdamp * torch.mean(torch.diag(H))
        diag = torch.arange(columns)
        H[diag, diag] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        H = torch.linalg.cholesky(H, upper=True)
        Hinv = H
        for i1 in range(0, columns, blocksize):
            i2 = min(i1 + blocksize, columns)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            if prunen == 0:
                tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                mask1 = tmp <= thresh
            else:
                mask1 = torch.zeros_like(W1) == 1
            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]
                if prunen != 0 and i % prunem == 0:
                    tmp = (
                        W1[:, i : (i + prunem)] ** 2
                        / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                    )
                    mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        self.layer.weight.data = W.to(self.layer.weight.dtype)


class _Wanda:
    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer
        self.scaler_row = torch.zeros(layer.weight.shape[1])
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        inp = inp.reshape(-1, inp.shape[-1]).t().float()
        tmp = 1
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples

    def prune(self, sparsity: float, prunen: int = 0, prunem: int = 0) -> None:
        W = self.layer.weight.data
        W_metric = torch.abs(W) * torch.sqrt(self.scaler_row.reshape((1, -1)))
        W_mask = torch.zeros_like(W_metric) == 1
        if prunen != 0:
            for ii in range(W_metric.shape[1]):
                if ii % prunem == 0:
                    tmp = W_metric[:, ii : (ii + prunem)].float()
                    W_mask.scatter_(1, ii + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
        else:
            sort_res = torch.sort(W_metric, dim=-1, stable=True)
            indices = sort_res[1][:, : int(W_metric.shape[1] * sparsity)]
            W_mask.scatter_(1, indices, True)
        W[W_mask] = 0


@torch.no_grad()
def prune_bert(model: nn.Module, batches: list[dict], method: str, sparsity: float, prunen: int = 0,
               prunem: int = 0) -> None:  # fmt: skip
    """Prune every Linear of ``model.encoder.layer`` with the reference ``method`` ('wanda' or
    'sparsegpt'), one block at a time."""
    layers = model.encoder.layer
    store: list[tuple[tuple, dict]] = []
    first = layers[0]
    layers[0] = _Catcher(first, store)
    for batch in batches:
        with contextlib.suppress(ValueError):
            model(**batch)
    layers[0] = first
    inps = [(args, kwargs) for args, kwargs in store]
    for block in layers:
        subset = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        wrapped = {n: (_SparseGPT if method == "sparsegpt" else _Wanda)(m) for n, m in subset.items()}
        handles = [
            m.register_forward_hook(lambda _m, inp, _out, w=wrapped[n]: w.add_batch(inp[0].data))
            for n, m in subset.items()
        ]
        for args, kwargs in inps:
            block(*args, **kwargs)
        for h in handles:
            h.remove()
        for w in wrapped.values():
            if method == "sparsegpt":
                w.fasterprune(sparsity, prunen=prunen, prunem=prunem)
            else:
                w.prune(sparsity, prunen=prunen, prunem=prunem)
        outs = []
        for args, kwargs in inps:
            out = block(*args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            outs.append(((out,) + tuple(args[1:]), kwargs))
        inps = outs
