"""SparseGPT-style reconstruction: prune a weight matrix and update what is kept so that the layer's
outputs on the calibration inputs change as little as possible (Frantar & Alistarh, 2023).

Columns (input features) are visited left to right in blocks; the error of zeroing a weight is spread
over the later columns of its row through the Cholesky factor of the inverse damped ``X^T X``. The
mask is chosen per block by the OBS saliency ``w^2 / [H^-1]_jj^2`` (``amount`` of every block), or per
group of ``m`` columns for an N:M pattern. With a ``bias``, the bias is the last column of the problem
(its input is the constant 1, which ``sums`` and ``rows`` describe): it is never pruned and absorbs
what the pruned weights shifted on average. One function, one layer, no model plumbing.
"""

from __future__ import annotations

import torch

from masksparse._errors import PruningValueError
from masksparse.criteria.calibration import LayerStats

__all__ = ["refit", "sparsegpt"]


def _inverse_factor(h: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The upper Cholesky factor of the damped inverse of ``h`` (which it overwrites: at most two more
    matrices of its size live at once), and the mask of dead columns."""
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    damp = percdamp * diag.mean()
    added = 0.0
    for attempt in range(5):  # near-singular X^T X: grow the damping until the factorisation succeeds
        step = float(damp) * 10.0**attempt
        diag += step - added
        added = step
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(chol)
            del chol
            factor, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return factor, dead
    raise PruningValueError(
        "SparseGPT: X^T X stays singular even with 10000x the dampening; raise percdamp or give more "
        "calibration data"
    )


def sparsegpt(
    weight: torch.Tensor,
    xtx: torch.Tensor,
    amount: float,
    *,
    pruned: torch.Tensor | None = None,
    pattern: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    bias: torch.Tensor | None = None,
    sums: torch.Tensor | None = None,
    rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Prune ``weight`` (``(out, in)``) given its inputs' ``xtx`` (``(in, in)``).

    Args:
        weight: the dense (or already masked) weight; not changed.
        xtx: ``X^T X`` of the layer's calibration inputs.
        amount: fraction of every column block to leave zero (ignored with a ``pattern``).
        pruned: bool ``(out, in)``, entries already pruned; they stay pruned and count toward
            ``amount``.
        pattern: ``(n, m)``: keep ``n`` of every ``m`` consecutive inputs of each row.
        blocksize: columns updated together (the reference uses 128).
        percdamp: dampening, a fraction of the mean diagonal of ``xtx`` added to it.
        bias: the layer's bias, updated too when given (then ``sums``, the column sums of the inputs,
            and ``rows``, how many input rows there were, are needed).

    Returns:
        ``(new_weight, keep, new_bias)``: the reconstructed weight (zero where pruned) in ``weight``'s
        dtype, the bool mask of what is kept, and the updated bias (None without one).

    Example:
        >>> import torch
        >>> from masksparse.criteria import sparsegpt
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> w, x = torch.randn(4, 8), torch.randn(64, 8)
        >>> new, keep, _ = sparsegpt(w, x.T @ x, 0.5)
        >>> int(keep.sum()), bool((new[~keep] == 0).all())
        (16, True)
        >>> naive = ((x @ (w * keep).T - x @ w.T) ** 2).sum()
        >>> bool(((x @ new.T - x @ w.T) ** 2).sum() < naive)  # the update lowers the output error
        True
    """
    out, cols = weight.shape
    if xtx.shape != (cols, cols):
        raise PruningValueError(f"SparseGPT: xtx has shape {tuple(xtx.shape)}, expected {(cols, cols)}")
    dtype = torch.float64 if xtx.dtype == torch.float64 else torch.float32
    if bias is not None and (sums is None or rows <= 0):
        raise PruningValueError("SparseGPT with a bias needs the inputs' column sums and row count")
    width = cols + (bias is not None)
    # The problem in one buffer each (the bias, if any, as a last column whose input is always 1).
    h = torch.empty(width, width, dtype=dtype, device=xtx.device)
    h[:cols, :cols] = xtx
    w = torch.empty(out, width, dtype=dtype, device=weight.device)
    w[:, :cols] = weight.detach()
    forced = torch.zeros(out, width, dtype=torch.bool, device=weight.device)
    if pruned is not None:
        forced[:, :cols] = pruned
    if bias is not None and sums is not None:
        h[:cols, cols] = h[cols, :cols] = sums
        h[cols, cols] = float(rows)
        w[:, cols] = bias.detach()
    hinv, dead = _inverse_factor(h, percdamp)
    del h
    drop = _solve(w, hinv, dead, amount, forced, pattern, blocksize, cols)
    keep = ~drop[:, :cols]
    new_bias = w[:, cols].to(bias.dtype) if bias is not None else None
    return w[:, :cols].mul_(keep).to(weight.dtype), keep, new_bias


def _solve(
    w: torch.Tensor,
    hinv: torch.Tensor,
    dead: torch.Tensor,
    amount: float,
    forced: torch.Tensor,
    pattern: tuple[int, int] | None,
    blocksize: int,
    prunable: int,
) -> torch.Tensor:
    """Prune the first ``prunable`` columns of ``w`` in place, updating every column through ``hinv``
    (the upper Cholesky factor of the damped inverse Hessian); returns what was dropped. Columns
    past ``prunable`` (the bias) are only updated."""
    cols = w.shape[1]
    w[:, dead] = 0
    drop = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        d = torch.diagonal(h1)
        if pattern is None and i1 < prunable:
            p2 = min(i2, prunable)
            score = w1[:, : p2 - i1] ** 2 / d[: p2 - i1].unsqueeze(0) ** 2
            drop[:, i1:p2] = _lowest(score, forced[:, i1:p2], amount)
        for i in range(i2 - i1):
            if pattern is not None and i1 + i < prunable and (i1 + i) % pattern[1] == 0:
                j = slice(i1 + i, i1 + i + pattern[1])
                score = w1[:, i : i + pattern[1]] ** 2 / d[i : i + pattern[1]] ** 2
                drop[:, j] = _lowest_n(score, forced[:, j], pattern)
            col = w1[:, i]
            q = torch.where(drop[:, i1 + i], torch.zeros_like(col), col)
            e = (col - q) / d[i]
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return drop


def _lowest(score: torch.Tensor, forced: torch.Tensor, amount: float) -> torch.Tensor:
    """Drop the ``amount`` fraction of lowest scores of the block, ``forced`` entries first."""
    k = max(int(round(amount * score.numel())), int(forced.sum()))
    flat = score.masked_fill(forced, float("-inf")).flatten()
    drop = torch.zeros_like(flat, dtype=torch.bool)
    if k:
        drop[torch.topk(flat, k, largest=False).indices] = True
    return drop.view(forced.shape)


def _lowest_n(score: torch.Tensor, forced: torch.Tensor, pattern: tuple[int, int]) -> torch.Tensor:
    """Per row, drop the ``m - n`` lowest of ``m`` columns (forced entries first; more if forced)."""
    n, m = pattern
    score = score.masked_fill(forced, float("-inf"))
    drop = torch.zeros_like(score, dtype=torch.bool)
    drop.scatter_(1, torch.topk(score, m - n, dim=1, largest=False).indices, True)
    return drop | forced


def refit(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stats: LayerStats,
    keep: torch.Tensor,
    ridge: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares refit of a Linear that loses the input columns where ``keep`` is False: the kept
    columns (and the bias, whose input is the constant 1) are refit so that the layer's outputs on the
    calibration inputs (``stats``, with ``xtx``) stay as close as possible to what the full layer gave,
    with a ridge term (``ridge`` times the mean diagonal) pulling the refit toward the weights as they
    were, which keeps a small calibration set from being overfit. Removed columns come back zero.

    Example:
        >>> import torch
        >>> from masksparse.criteria import LayerStats
        >>> from masksparse.criteria.reconstruction import refit
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> x = torch.randn(256, 6) + 1.0
        >>> x[:, 5] = x[:, 4] * 0.5 + 0.1 * torch.randn(256)  # column 5 mostly repeats column 4
        >>> w, b = torch.randn(3, 6), torch.zeros(3)
        >>> stats = LayerStats.empty(6, hessian=True)
        >>> stats.add(x)
        >>> keep = torch.tensor([True, True, True, True, True, False])
        >>> new_w, new_b = refit(w, b, stats, keep, ridge=1e-6)
        >>> naive = ((x @ (w * keep).T + b - (x @ w.T + b)) ** 2).mean()
        >>> bool(((x @ new_w.T + new_b - (x @ w.T + b)) ** 2).mean() < 0.05 * naive)
        True
    """
    if stats.xtx is None:
        raise PruningValueError("refit needs X^T X: calibrate with hessian=True")
    dtype = torch.float64
    cols = weight.shape[1]
    h = torch.empty(cols + 1, cols + 1, dtype=dtype)
    h[:cols, :cols] = stats.xtx.cpu()
    h[:cols, cols] = h[cols, :cols] = stats.sums.cpu()
    h[cols, cols] = float(stats.rows)
    b = bias.detach().cpu() if bias is not None else torch.zeros(weight.shape[0])
    w = torch.cat([weight.detach().cpu().to(dtype), b.to(dtype).reshape(-1, 1)], 1)
    k = torch.cat([keep.cpu(), torch.tensor([bias is not None])])
    hk = h[k][:, k]
    lam = ridge * float(hk.diagonal().mean())
    hk.diagonal().add_(lam)
    new = torch.zeros_like(w)
    # argmin ||X W^T - X_k V^T||^2 + lam ||V - W_k||^2: the ridge pulls toward the weights as they were
    new[:, k] = torch.linalg.solve(hk, h[k] @ w.T + lam * w[:, k].T).T
    out_w = new[:, :cols].to(device=weight.device, dtype=weight.dtype)
    out_b = new[:, cols].to(device=bias.device, dtype=bias.dtype) if bias is not None else None
    return out_w, out_b
