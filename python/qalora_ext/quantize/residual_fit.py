"""Better starts: initialise what a layer trains so that it cancels the base's quantization error.

SPEC's default start adds nothing (``B = 0``, ``dscale = dzero = 0``): training
begins at the quantized model. But the error of the quantized weight,
``E = W - W~`` (W the float source weight), is known before training, and part
of it is exactly what the trainable quantities can express:

* ``dzero`` (and the adapter, through the zeros): a constant per group,
  ``D[n, k] = Z[n, g(k)]``;
* ``dscale``: a multiple of the codes per group, ``D[n, k] = S[n, g(k)] q[n, k]``.

:func:`fit_quantization_residual` picks them to minimise the layer's output
error on calibration inputs, ``||(E - D) X^T||^2 = tr((E - D) H (E - D)^T)``
with ``H = X^T X`` (GPTQ's Hessian), or the plain ``||E - D||^2`` without
calibration (``H = I``):

* zeros only: ``Z = E H P (P^T H P)^-1`` exactly (``P`` the K x L group
  indicator; one L x L system shared by all rows);
* the adapter (rank r): the best rank-r fit of that ``Z`` in the metric
  ``P^T H P`` (an SVD), written into ``A``, ``B`` so that ``s B A / G`` is it;
* scales and zeros: per group, the 2 x 2 least-squares fit on the group's own
  block of ``H`` (cross-group terms dropped), then the zeros refit exactly
  given the scales; kept only where it beats the zeros alone (scales without
  zeros: the best step along that fit).

A small ridge (``damp`` times the mean diagonal, as GPTQ damps) keeps the
systems well posed. The fitted start never increases the (damped) calibration
loss of the layer's output (each candidate includes the zero start), but a
model-level gain is what the measurements decide (``bench/reproduce_paper.py``);
SPEC's zero start stays the default everywhere.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import nn

from ..nn import QALoRALinear
from .gptq import HessianAccumulator, _run_model

__all__ = ["collect_input_hessians", "fit_layer_residual", "fit_quantization_residual"]


@torch.no_grad()
def collect_input_hessians(model: nn.Module, calibration: Iterable, names: list[str]) -> dict[str, torch.Tensor]:
    """``{name: 2/n X^T X}`` (K x K, float32) of the inputs of the named layers over the calibration batches."""
    accs: dict[str, HessianAccumulator] = {}
    handles = []
    for name in names:
        layer = model.get_submodule(name)
        acc = accs[name] = HessianAccumulator(layer.in_features)
        handles.append(layer.register_forward_hook(lambda mod, args, out, acc=acc: acc.add(args[0])))
    was_training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), None)
        for batch in calibration:
            _run_model(model, batch, device)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: a.hessian for n, a in accs.items()}


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    diag_mean = h.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    return h + damp * diag_mean[..., None, None] * eye


def _group_sums(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sum over each group of the last dim: (..., K) -> (..., L)."""
    return t.unflatten(-1, (t.shape[-1] // group_size, group_size)).sum(-1)


def _fit_zeros(e: torch.Tensor, h: Optional[torch.Tensor], group_size: int, damp: float) -> tuple:
    """Exact ``Z = E H P (P^T H P)^-1`` and the metric ``C = P^T H P`` (both float64)."""
    if h is None:
        L = e.shape[1] // group_size
        return _group_sums(e, group_size) / group_size, torch.eye(L, dtype=e.dtype) * group_size
    ehp = _group_sums(e @ h, group_size)  # (N, L)
    c = _group_sums(_group_sums(h, group_size).t(), group_size)  # P^T H P (L, L), symmetric
    c = _damped(c, damp)
    return torch.linalg.solve(c, ehp.t()).t(), c


@torch.no_grad()
def fit_layer_residual(layer: QALoRALinear, weight: torch.Tensor, hessian: Optional[torch.Tensor] = None,
                       damp: float = 0.01) -> dict[str, float]:
    """Set ``layer``'s trainable quantities (those present) to the least-squares fit of ``weight - W~``.

    ``weight``: the float source weight (N, K). ``hessian``: ``X^T X`` of the
    layer's calibration inputs (K, K), or None for the unweighted fit. Returns
    ``{"before": e, "after": e'}``, the relative error ``||(W - W~') X^T|| / ||W X^T||``
    (unweighted without a Hessian) before and after.
    """
    if not isinstance(layer, QALoRALinear):
        raise TypeError(f"fit_layer_residual takes a QALoRALinear; got {type(layer).__name__}")
    base = layer.base
    G = base.group_size
    if tuple(weight.shape) != (base.out_features, base.in_features):
        raise ValueError(f"weight has shape {tuple(weight.shape)}; the layer is "
                         f"{(base.out_features, base.in_features)} (out, in)")
    w_q = base.dequantize().double()
    e = weight.detach().double().to(w_q.device) - w_q
    h = None if hessian is None else _damped(hessian.double().to(w_q.device), damp)
    q = base.codes().double()

    def err(d):
        r = e - d
        if h is None:
            return (r.norm() / weight.double().norm()).item()
        w = weight.double().to(w_q.device)
        return math.sqrt(max((r @ h * r).sum().item(), 0.0) / max((w @ h * w).sum().item(), 1e-300))

    before = err(torch.zeros_like(e))
    has_zero = layer.dzero is not None or layer.lora_A is not None

    def with_zeros(ds):
        """(total D, what to write) for scales ``ds``: the zeros' part refit exactly on what is left."""
        d_scale = ds.repeat_interleave(G, dim=1) * q
        if not has_zero:
            return d_scale, (ds, None, None)
        z, c = _fit_zeros(e - d_scale, h, G, damp)
        if layer.dzero is not None:
            return d_scale + z.repeat_interleave(G, dim=1), (ds, z, None)
        b, a, z_r = _low_rank(layer, z, c)
        return d_scale + z_r.repeat_interleave(G, dim=1), (ds, None, (b, a))

    # Candidates: the zeros alone (exact), and the scales' blockwise fit (which ignores
    # cross-group terms of H, so it is kept only where it does better; without zeros
    # it is first scaled by the best step along it, which never increases the error).
    zeros_shape = (base.out_features, base.in_features // G)
    candidates = [with_zeros(torch.zeros(zeros_shape, dtype=torch.float64, device=e.device))]
    if layer.dscale is not None:
        ds = _fit_scales_blockwise(e, q, h, G, with_zeros=has_zero)
        if not has_zero:
            dq = ds.repeat_interleave(G, dim=1) * q
            hd = dq if h is None else dq @ h
            denom = (dq * hd).sum().item()
            ds = ds * (max((e * hd).sum().item() / denom, 0.0) if denom > 0 else 0.0)
        candidates.append(with_zeros(ds))
    errors = [err(d) for d, _ in candidates]
    best = min(range(len(candidates)), key=errors.__getitem__)
    ds, z, ab = candidates[best][1]
    if layer.dscale is not None:
        layer.dscale.copy_(ds.to(layer.dscale))
    if z is not None:
        layer.dzero.copy_(z.to(layer.dzero))
    if ab is not None:
        b, a = ab
        layer.lora_A.zero_()
        layer.lora_A[:a.shape[0]].copy_(a.to(layer.lora_A))
        layer.lora_B.zero_()
        layer.lora_B[:, :b.shape[1]].copy_(b.to(layer.lora_B))
    return {"before": before, "after": errors[best]}


def _low_rank(layer: QALoRALinear, z: torch.Tensor, c: torch.Tensor) -> tuple:
    """Best rank-r fit ``Z_r`` of Z in the metric C (``min ||(Z - Z_r) C^1/2||``), as (B, A, Z_r) with
    ``s B A / G = Z_r``."""
    r, s, G = layer.rank, layer.scaling, layer.group_size
    evals, evecs = torch.linalg.eigh(c)
    evals = evals.clamp_min(evals.max() * 1e-12)
    c_half = evecs @ torch.diag(evals.sqrt()) @ evecs.t()
    c_inv_half = evecs @ torch.diag(evals.rsqrt()) @ evecs.t()
    u, sv, vh = torch.linalg.svd(z @ c_half, full_matrices=False)
    r = min(r, sv.numel())
    root = sv[:r].sqrt()
    b = u[:, :r] * root  # (N, r)
    a = (root[:, None] * vh[:r]) @ c_inv_half  # (r, L)
    # s B A / G = Z_r  ->  B = b * G / s (A keeps its scale, so its gradient scale stays PEFT-like).
    return b * G / s, a, b @ a


def _fit_scales_blockwise(e, q, h, G, with_zeros: bool):
    """Per (row, group): least squares of e_g on [q_g, 1] (or q_g alone) in the metric H_g (the group's
    diagonal block of H); returns the scales' part."""
    N, K = e.shape
    L = K // G
    eg, qg = e.reshape(N, L, G), q.reshape(N, L, G)
    if h is None:
        hq, he, h1 = qg, eg, torch.ones_like(qg)
    else:
        blocks = torch.stack([h[i * G:(i + 1) * G, i * G:(i + 1) * G] for i in range(L)])  # (L, G, G)
        hq = torch.einsum("lij,nlj->nli", blocks, qg)
        he = torch.einsum("lij,nlj->nli", blocks, eg)
        h1 = blocks.sum(-1).expand(N, L, G)
    a11 = (qg * hq).sum(-1)
    a12 = (qg * h1).sum(-1)
    a22 = h1.sum(-1) if h is not None else torch.full_like(a11, float(G))
    b1 = (qg * he).sum(-1)
    b2 = (torch.ones_like(qg) * he).sum(-1) if h is not None else eg.sum(-1)
    ridge = 1e-6 * (a11 + a22) + 1e-30
    if not with_zeros:
        return b1 / (a11 + ridge)
    det = (a11 + ridge) * (a22 + ridge) - a12 * a12
    return ((a22 + ridge) * b1 - a12 * b2) / det


@torch.no_grad()
def fit_quantization_residual(model: nn.Module, source: nn.Module, calibration: Optional[Iterable] = None,
                              damp: float = 0.01, progress: bool = True) -> dict[str, dict[str, float]]:
    """Fit every ``QALoRALinear`` of ``model`` to its float weight in ``source`` (same module names).

    ``calibration``: batches of input ids (as GPTQ takes); with them the fit
    is weighted by each layer's input Hessian, computed on ``model`` itself.
    Returns ``{layer: {"before", "after"}}`` (relative output error on the
    calibration inputs, or relative weight error without them).
    """
    from tqdm.auto import tqdm

    names = [n for n, m in model.named_modules() if isinstance(m, QALoRALinear)]
    if not names:
        raise ValueError("fit_quantization_residual: the model has no QALoRALinear layers; call add_adapters first")
    weights = {}
    for name in names:
        try:
            src = source.get_submodule(name)
        except AttributeError:
            raise ValueError(f"fit_quantization_residual: the source model has no module {name!r}") from None
        if not isinstance(getattr(src, "weight", None), torch.Tensor):
            raise ValueError(f"fit_quantization_residual: source module {name!r} has no weight "
                             f"({type(src).__name__})")
        weights[name] = src.weight
    hessians = collect_input_hessians(model, calibration, names) if calibration is not None else {}
    report = {}
    for name in tqdm(names, desc="fit residual", disable=not progress or None, leave=False):
        report[name] = fit_layer_residual(model.get_submodule(name), weights[name], hessians.pop(name, None), damp)
    return report
