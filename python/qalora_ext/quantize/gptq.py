"""GPTQ (Frantar et al., 2022) into this project's float-zero format.

``gptq_quantize_weight`` quantizes one weight column by column, each
column's rounding error spread over the columns not yet quantized in
proportion to the inverse Hessian of the layer's inputs, so the error of the
layer's OUTPUT on the calibration data shrinks, not the weight error. The
result is SPEC's format as is: contiguous groups of G along in_features (no
act-order), ``W~ = scale * q + zero``, each group's scale and zero from SPEC's
min-max recipe applied to the group's weights as GPTQ has updated them when
it reaches the group.

``quantize_model_gptq`` does this for a whole model, one decoder block at a
time: each block sees inputs that went through the already quantized blocks
before it, as in the paper.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from .. import ops
from ..format import check_bits, check_group_size, check_in_features, check_store_dtypes
from ..model import TargetModules, quantization_targets, set_module, warn_unquantized
from ..nn import QuantLinear

__all__ = ["gptq_quantize_weight", "HessianAccumulator", "quantize_model_gptq", "find_blocks"]

def _check_damp_block(damp, block_size) -> None:
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp must be a finite number >= 0 (a fraction of the mean Hessian diagonal); got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1; got {block_size!r}")


def _upper_inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Hessian, float64.

    Row i of this factor, divided by its diagonal, is how GPTQ spreads
    column i's error over the later columns.
    """
    h = hessian.diagonal()
    h.add_(damp * h.mean())
    chol, info = torch.linalg.cholesky_ex(hessian)
    if info.item() != 0:
        raise ValueError(
            f"hessian is not positive definite even after damping (damp={damp}); it must be a sum of x x^T over "
            "calibration inputs: increase damp or use more calibration data"
        )
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


@torch.no_grad()
def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    scale_dtype: torch.dtype = torch.float16,
    zero_dtype: torch.dtype = torch.float32,
    damp: float = 0.01,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of ``weight`` (N, K) given the Hessian (K, K) of its inputs, ``2/n sum x x^T``.

    Returns ``(packed, scale, zero)`` as ``ops.quantize_rtn`` does: ``packed``
    int32 (N, S) in layout 1, ``scale`` (N, K/G) in ``scale_dtype``, ``zero``
    (N, K/G) in ``zero_dtype``, on ``weight``'s device. ``damp`` times the
    mean of the Hessian's diagonal is added to its diagonal; inputs that were
    always zero (``hessian[i, i] == 0``) get weight 0. Columns are updated
    lazily in blocks of ``block_size`` rounded down to a multiple of
    ``group_size`` (at least one group), so every group lies in one block and
    its scale and zero see all the updates made before it. The result does
    not depend on ``block_size`` beyond float32 rounding.
    """
    check_bits(bits)
    check_group_size(group_size)
    check_store_dtypes(scale_dtype, zero_dtype)
    _check_damp_block(damp, block_size)
    for name, t in (("weight", weight), ("hessian", hessian)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features); got shape {tuple(weight.shape)}")
    n, k = weight.shape
    check_in_features(k, group_size, "weight")
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian must have shape ({k}, {k}) for a weight with in_features={k}; "
                         f"got {tuple(hessian.shape)}")
    w = weight.detach().to(torch.float32).clone()
    if not torch.isfinite(w).all():
        raise ValueError("weight has NaN or infinite values; quantization needs finite weights")
    h = hessian.detach().to(device=w.device, dtype=torch.float64).clone()
    if not torch.isfinite(h).all():
        raise ValueError("hessian has NaN or infinite values")

    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    u = _upper_inverse_cholesky(h, float(damp)).to(torch.float32)
    del h

    qmax = 2**bits - 1
    groups = k // group_size
    # Transposed, so that a column and the rows of every update are contiguous.
    wt = w.t().contiguous()
    del w
    codes = torch.empty(k, n, dtype=torch.uint8, device=wt.device)
    scale = torch.empty(groups, n, dtype=scale_dtype, device=wt.device)
    zero = torch.empty(groups, n, dtype=zero_dtype, device=wt.device)
    # A full tensor, not a Python scalar: some backends turn division by a
    # scalar into multiplication by its reciprocal, which is not SPEC's float32 division.
    qmax_t = torch.full((n,), float(qmax), dtype=torch.float32, device=wt.device)
    block = max(group_size, block_size // group_size * group_size)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = wt[b0:b1]  # a view: the in-block updates land in wt
        ub = u[b0:b1, b0:b1]
        err = torch.empty(b1 - b0, n, dtype=torch.float32, device=wt.device)
        for i in range(b1 - b0):
            if i % group_size == 0:
                grp = wb[i:i + group_size]
                lo, hi = grp.amin(0), grp.amax(0)
                g = (b0 + i) // group_size
                scale[g] = ((hi - lo) / qmax_t).to(scale_dtype)
                zero[g] = lo.to(zero_dtype)
                s, z = scale[g].float(), zero[g].float()
                # Dividing by +inf where scale_s == 0 gives q = 0, as SPEC asks.
                s_div = s.masked_fill(s == 0, float("inf"))
            col = wb[i]
            q = torch.round((col - z) / s_div).clamp_(0, qmax)
            codes[b0 + i] = q.to(torch.uint8)
            e = (col - (s * q + z)) / ub[i, i]
            wb[i + 1:].addr_(ub[i, i + 1:], e, alpha=-1.0)
            err[i] = e
        wt[b1:].addmm_(u[b0:b1, b1:].t(), err, alpha=-1.0)
    scale, zero = scale.t().contiguous(), zero.t().contiguous()
    if not torch.isfinite(scale).all():
        raise ValueError(f"a group's scale (max - min) / {qmax} overflows {scale_dtype}; "
                         "store scales as float32 (scale_dtype=torch.float32)")
    if not torch.isfinite(zero).all():
        raise ValueError(f"a group's zero (its minimum) overflows {zero_dtype}; "
                         "store zeros as float32 (zero_dtype=torch.float32)")
    packed = ops.pack(codes.t().contiguous().cpu(), bits).to(wt.device)
    return packed, scale, zero


class HessianAccumulator:
    """Running ``H = 2/n sum x x^T`` over the rows of inputs ``x`` of shape (..., K).

    Kept as a running mean (``H <- H * n/(n+m) + 2/(n+m) * X^T X``), as GPTQ
    does, so its magnitude does not grow with the amount of calibration data.
    The matrix lives on the device of the first input unless ``device`` is given.
    """

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device=None) -> None:
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be an integer >= 1; got {in_features!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
        self.in_features = in_features
        self.dtype = dtype
        self.device = device
        self.samples = 0
        self._h: Optional[torch.Tensor] = None

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"input must be a tensor of shape (..., {self.in_features}); got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        rows = x.detach().reshape(-1, self.in_features)
        m = rows.shape[0]
        if m == 0:
            return
        if self._h is None:
            self._h = torch.zeros(self.in_features, self.in_features, dtype=self.dtype,
                                  device=self.device if self.device is not None else rows.device)
        rows = rows.to(device=self._h.device, dtype=self.dtype)
        total = self.samples + m
        self._h.mul_(self.samples / total).addmm_(rows.t(), rows, alpha=2.0 / total)
        self.samples = total

    @property
    def hessian(self) -> torch.Tensor:
        """``2/n sum x x^T`` (K, K); all zeros before any input."""
        if self._h is None:
            return torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=self.device)
        return self._h


class _Captured(Exception):
    """Raised by the hook on the first block: the model's forward ends there."""


def _select_targets(model: nn.Module, group_size: int, target_modules: TargetModules) -> list[str]:
    # The same selection as model.quantize_model, so both methods quantize the same layers.
    todo, skipped = quantization_targets(model, group_size, target_modules)
    warn_unquantized("quantize_model_gptq", skipped, group_size, stacklevel=3)
    return todo


def find_blocks(model: nn.Module, targets: list[str]) -> tuple[str, Optional[nn.ModuleList]]:
    """``(name, list)`` of the ModuleList of callable blocks holding the most of
    ``targets`` (layer names), ``("", None)`` if there is none.

    Counting targets rather than children keeps a per-block list (MoE experts)
    from winning over the list of decoder blocks; ties go to the outermost list.
    """
    best_name, best, best_count = "", None, 0
    for name, m in model.named_modules():
        if not name or not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        if any(type(c).forward is nn.Module.forward for c in m):
            continue
        count = sum(1 for t in targets if t.startswith(name + "."))
        if count > best_count:
            best_name, best, best_count = name, m, count
    return best_name, best


def _input_device(model: nn.Module) -> Optional[torch.device]:
    """Where the batches go: the input embedding's device (else the first parameter's), unless on meta."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    weight = getattr(emb, "weight", None)
    if not isinstance(weight, torch.Tensor):
        weight = next(model.parameters(), None)
    return weight.device if weight is not None and weight.device.type != "meta" else None


def _run_model(model: nn.Module, batch, device: Optional[torch.device]) -> None:
    def move(v):
        return v.to(device) if device is not None and isinstance(v, torch.Tensor) else v

    if isinstance(batch, Mapping):
        model(**{k: move(v) for k, v in batch.items()})
    elif isinstance(batch, torch.Tensor):
        model(move(batch))
    else:
        raise TypeError(f"calibration must yield input_ids tensors or dicts of model arguments; got "
                        f"{type(batch).__name__}")


def _hook_hessians(model: nn.Module, names: list[str]) -> tuple[dict[str, HessianAccumulator], list]:
    accs, handles = {}, []
    for name in names:
        layer = model.get_submodule(name)
        acc = accs[name] = HessianAccumulator(layer.in_features)
        handles.append(layer.register_forward_hook(lambda mod, args, out, acc=acc: acc.add(args[0])))
    return accs, handles


def _swap_in_gptq(model: nn.Module, name: str, acc: HessianAccumulator, qargs: tuple, unseen: list[str]) -> None:
    bits, group_size, scale_dtype, zero_dtype = qargs[:4]
    layer = model.get_submodule(name)
    if acc.samples == 0:
        # No input reached it: GPTQ would see an all-zero Hessian and zero every weight.
        unseen.append(name)
        new = QuantLinear.from_linear(layer, bits, group_size, scale_dtype, zero_dtype)
    else:
        packed, scale, zero = gptq_quantize_weight(layer.weight, acc.hessian, *qargs)
        new = QuantLinear(layer.in_features, layer.out_features, bits, group_size, layer.bias is not None,
                          scale_dtype, zero_dtype, device="meta")
        new.load_packed(packed, scale, zero, layer.bias.detach() if layer.bias is not None else None)
        new = new.to(layer.weight.device)
    set_module(model, name, new)


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The next block's inputs: the same arguments with the hidden states replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def quantize_model_gptq(
    model: nn.Module,
    calibration: Iterable[Union[torch.Tensor, Mapping]],
    bits: int = 4,
    group_size: int = 32,
    scale_dtype: torch.dtype = torch.float16,
    zero_dtype: torch.dtype = torch.float32,
    target_modules: TargetModules = None,
    damp: float = 0.01,
    block_size: int = 128,
    progress: bool = True,
    before_block: Optional[Callable[[int, nn.Module], None]] = None,
    after_block: Optional[Callable[[int, nn.Module], None]] = None,
) -> nn.Module:
    """Replace ``nn.Linear`` layers by GPTQ-quantized ``QuantLinear`` layers, in place.

    Layers are chosen as ``quantize_model`` chooses them. ``calibration``
    yields input_ids tensors (batch, seq), passed as the model's first
    argument, or dicts of model keyword arguments. The decoder blocks (the
    ``nn.ModuleList`` holding the most target layers, e.g.
    ``model.model.layers``) are quantized one after another, each from the
    inputs produced by the blocks already quantized; ``before_block(i, block)``
    and ``after_block(i, block)`` are called around block ``i`` (a streaming
    loader may load and free weights there). Target layers outside the blocks
    get round-to-nearest. A model without such a list is quantized in one
    pass: every layer's Hessian comes from the float model.
    """
    check_bits(bits)
    check_group_size(group_size)
    check_store_dtypes(scale_dtype, zero_dtype)
    _check_damp_block(damp, block_size)
    if isinstance(calibration, (torch.Tensor, Mapping)):
        raise TypeError("calibration must be an iterable of batches (a list of input_ids tensors or of dicts); "
                        "got a single batch: wrap it in a list")
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration is empty; GPTQ needs at least one batch of inputs")
    targets = _select_targets(model, group_size, target_modules)
    if not targets:
        return model
    qargs = (bits, group_size, scale_dtype, zero_dtype, damp, block_size)
    config = getattr(model, "config", None)
    saved_cache = getattr(config, "use_cache", None)
    if saved_cache is not None:
        config.use_cache = False
    was_training = model.training
    model.eval()
    unseen: list[str] = []
    try:
        with torch.no_grad():
            list_name, blocks = find_blocks(model, targets)
            captured = _capture_block_inputs(model, blocks, batches) if blocks is not None else None
            if blocks is not None and captured is None:
                warnings.warn(f"quantize_model_gptq: the model's forward does not call '{list_name}.0'; quantizing "
                              "in one pass, every layer from the float model's inputs", stacklevel=2)
            if captured is None:
                _quantize_one_pass(model, batches, targets, qargs, progress, unseen)
            else:
                _quantize_by_block(model, list_name, blocks, captured, targets, qargs, progress, unseen,
                                   before_block, after_block)
    finally:
        model.train(was_training)
        if saved_cache is not None:
            config.use_cache = saved_cache
    if unseen:
        warnings.warn(
            f"quantize_model_gptq: {len(unseen)} layer(s) received no calibration input and were quantized with "
            "round-to-nearest: " + ", ".join(unseen),
            stacklevel=2,
        )
    return model


def _capture_block_inputs(model, blocks, batches) -> Optional[list[list]]:
    """The (args, kwargs) that reach ``blocks[0]`` for each batch; None if the model never calls it."""
    captured: list[list] = []

    def grab(module, args, kwargs):
        if not args and "hidden_states" not in kwargs:
            raise TypeError("quantize_model_gptq: the first block was called without positional arguments or a "
                            "'hidden_states' keyword; cannot tell which argument carries the hidden states")
        captured.append([args, kwargs])
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    device = _input_device(model)
    try:
        for batch in batches:
            try:
                _run_model(model, batch, device)
            except _Captured:
                continue
            return None
    finally:
        handle.remove()
    return captured


def _quantize_by_block(model, list_name, blocks, captured, targets, qargs, progress, unseen, before_block,
                       after_block) -> None:
    from tqdm.auto import tqdm

    bits, group_size = qargs[:2]
    inside = {i: [t for t in targets if t.startswith(f"{list_name}.{i}.")] for i in range(len(blocks))}
    outside = sorted(set(targets) - {t for names in inside.values() for t in names})
    if outside:
        warnings.warn(
            f"quantize_model_gptq: {len(outside)} layer(s) outside the blocks of '{list_name}' are quantized with "
            "round-to-nearest: " + ", ".join(outside),
            stacklevel=3,
        )
        for name in outside:
            set_module(model, name, QuantLinear.from_linear(model.get_submodule(name), *qargs[:4]))
    for i in tqdm(range(len(blocks)), desc=f"GPTQ INT{bits} G{group_size}", disable=not progress or None,
                  leave=False):
        block = blocks[i]
        if before_block is not None:
            before_block(i, block)
        accs, handles = _hook_hessians(model, inside[i])
        try:
            for args, kwargs in captured:
                block(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        for name in inside[i]:
            _swap_in_gptq(model, name, accs.pop(name), qargs, unseen)
        for item in captured:
            hidden = _first_output(block(*item[0], **item[1]))
            item[0], item[1] = _replace_hidden(item[0], item[1], hidden)
        if after_block is not None:
            after_block(i, block)


def _quantize_one_pass(model, batches, targets, qargs, progress, unseen) -> None:
    from tqdm.auto import tqdm

    accs, handles = _hook_hessians(model, targets)
    device = _input_device(model)
    try:
        for batch in batches:
            _run_model(model, batch, device)
    finally:
        for h in handles:
            h.remove()
    for name in tqdm(targets, desc=f"GPTQ INT{qargs[0]} G{qargs[1]}", disable=not progress or None, leave=False):
        _swap_in_gptq(model, name, accs.pop(name), qargs, unseen)
