"""The fake (meta) kernels refuse exactly what the real kernels refuse, with the same error.

Each case builds valid CPU arguments, breaks one, and runs the op twice: on
CPU tensors (the C++ kernel) and on the same tensors moved to the meta device
(the fake kernel in ops.py). Both must raise the same exception type with the
same message.
"""

from __future__ import annotations

import pytest
import torch

from qalora_ext import ops  # noqa: F401  (registers the fake kernels)
from qalora_ext.format import packed_row_words

_ops = torch.ops.qalora


def _valid(bits=3, group_size=32, n=24, k=128, m=5, rank=4):
    g = torch.Generator().manual_seed(bits * 100 + group_size + n + k + m)
    words = packed_row_words(k, bits)
    return dict(
        x=torch.randn(2, m, k, generator=g),
        gy=torch.randn(2, m, n, generator=g),
        packed=torch.randint(-2**31, 2**31 - 1, (n, words), generator=g, dtype=torch.int64).to(torch.int32),
        scale=(torch.rand(n, k // group_size, generator=g) + 0.1).half(),
        zero=torch.randn(n, k // group_size, generator=g),
        bias=torch.randn(n, generator=g),
        lora_A=torch.randn(rank, k // group_size, generator=g),
        lora_B=torch.randn(n, rank, generator=g),
        pool_mask=(torch.rand(2, m, k // group_size, generator=g) > 0.2).float() / 0.8,
        scaling=0.5, bits=bits, group_size=group_size, layout=1,
    )


def _qlinear(a, op="qlinear"):
    return getattr(_ops, op)(a["x"], a["packed"], a["scale"], a["zero"], a["bias"], a["lora_A"], a["lora_B"],
                             a["pool_mask"], a["scaling"], a["bits"], a["group_size"], a["layout"])


def _grad_input(a):
    return _ops.qlinear_grad_input(a["gy"], a["packed"], a["scale"], a["zero"], a["lora_A"], a["lora_B"], a["pool_mask"],
                                   a["scaling"], a["bits"], a["group_size"], a["layout"])


def _to_meta(a):
    return {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in a.items()}


BREAKS = {
    "bits": lambda a: a.update(bits=5),
    "group_size": lambda a: a.update(group_size=48),
    "layout": lambda a: a.update(layout=2),
    "packed_dtype": lambda a: a.update(packed=a["packed"].long()),
    "packed_float": lambda a: a.update(packed=a["packed"].float()),
    "packed_words": lambda a: a.update(packed=a["packed"][:, :-1]),
    "packed_rows": lambda a: a.update(packed=a["packed"][:-1]),
    "scale_1d": lambda a: a.update(scale=a["scale"][:, 0]),
    "zero_shape": lambda a: a.update(zero=a["zero"][:, :-1]),
    "scale_int": lambda a: a.update(scale=a["scale"].int()),
    "zero_float64": lambda a: a.update(zero=a["zero"].double()),
    "x_features": lambda a: a.update(x=a["x"][..., :-32], gy=a["gy"][..., :-1]),
    "x_int": lambda a: a.update(x=a["x"].long(), gy=a["gy"].long()),
    "x_float64": lambda a: a.update(x=a["x"].double(), gy=a["gy"].double()),
    "lora_A_alone": lambda a: a.update(lora_B=None),
    "lora_A_groups": lambda a: a.update(lora_A=a["lora_A"][:, :-1]),
    "lora_B_rank": lambda a: a.update(lora_B=a["lora_B"][:, :-1]),
    "lora_B_int": lambda a: a.update(lora_B=a["lora_B"].int()),
    "bias_shape": lambda a: a.update(bias=a["bias"][:-1]),
    "bias_int": lambda a: a.update(bias=a["bias"].int()),
    "mask_without_adapter": lambda a: a.update(lora_A=None, lora_B=None),
    "mask_shape": lambda a: a.update(pool_mask=a["pool_mask"][:, :-1]),
}


def _outcome(fn):
    """(exception type, the argument its message names first), or None when nothing was refused.

    The C++ and Python messages say the same thing but print dtypes and shapes
    in their own ways (``Long`` / ``torch.int64``, ``[24, 3]`` / ``(24, 3)``).
    """
    try:
        fn()
    except (ValueError, TypeError, RuntimeError) as e:  # RuntimeError: a check the fake kernel misses
        msg = str(e).split("\n")[0]
        return type(e), msg.split(":")[0].split()[0] if ":" in msg.split()[0] else msg.split()[0]
    return None


@pytest.mark.parametrize("op", ["qlinear", "qlinear_int8", "qlinear_grad_input"])
@pytest.mark.parametrize("brk", sorted(BREAKS))
def test_fake_kernel_refuses_what_the_kernel_refuses(op, brk):
    if op == "qlinear_grad_input" and brk.startswith("bias"):
        pytest.skip("qlinear_grad_input takes no bias")
    a = _valid()
    BREAKS[brk](a)
    run = (lambda b: _grad_input(b)) if op == "qlinear_grad_input" else (lambda b: _qlinear(b, op))
    real = _outcome(lambda: run(a))
    fake = _outcome(lambda: run(_to_meta(a)))
    assert real is not None, f"the CPU kernel accepted {brk}"
    assert real[0] in (ValueError, TypeError), real
    assert fake == real


@pytest.mark.parametrize("brk", ["bits", "group_size", "weight_1d", "weight_int", "k_not_multiple"])
def test_fake_quantize_rtn_refuses_what_the_kernel_refuses(brk):
    w = torch.randn(8, 64)
    bits, g = 3, 32
    if brk == "bits":
        bits = 1
    elif brk == "group_size":
        g = 16
    elif brk == "weight_1d":
        w = w[0]
    elif brk == "weight_int":
        w = w.long()
    else:
        w = w[:, :48]

    def run(t):
        return _ops.quantize_rtn(t, bits, g, torch.float16, torch.float32)

    real, fake = _outcome(lambda: run(w)), _outcome(lambda: run(w.to("meta")))
    assert real is not None and fake == real


@pytest.mark.parametrize("brk", ["bits", "codes_int32", "codes_k", "codes_1d"])
def test_fake_pack_and_unpack_refuse_what_the_kernels_refuse(brk):
    codes = torch.randint(0, 8, (8, 64), dtype=torch.uint8)
    bits = 3
    if brk == "bits":
        bits = 7
    elif brk == "codes_int32":
        codes = codes.int()
    elif brk == "codes_k":
        codes = codes[:, :40]
    else:
        codes = codes[0]
    real, fake = _outcome(lambda: _ops.pack(codes, bits)), _outcome(lambda: _ops.pack(codes.to("meta"), bits))
    assert real is not None and fake == real
    packed = _ops.pack(torch.randint(0, 8, (8, 64), dtype=torch.uint8), 3)
    for args in ((packed, 3, 96, 1), (packed, 3, 64, 9), (packed.long(), 3, 64, 1), (packed, 3, 40, 1)):
        real = _outcome(lambda: _ops.unpack(*args))
        fake = _outcome(lambda: _ops.unpack(args[0].to("meta"), *args[1:]))
        assert real is not None and fake == real, args


def test_fake_kernels_accept_what_the_kernels_accept():
    a = _valid()
    y = _qlinear(a)
    ym = _qlinear(_to_meta(a))
    assert ym.shape == y.shape and ym.dtype == y.dtype and ym.device.type == "meta"
    gx, gxm = _grad_input(a), _grad_input(_to_meta(a))
    assert gxm.shape == gx.shape and gxm.dtype == gx.dtype


def test_fake_kernel_follows_the_devices_activation_dtypes():
    """float16 x: refused by the CPU kernel; a meta tensor stands for any device, and CUDA takes float16."""
    a = _valid()
    a["x"] = a["x"].half()
    assert _outcome(lambda: _qlinear(a)) == (TypeError, "x")
    y = _qlinear(_to_meta(a))
    assert y.dtype == torch.float16 and y.device.type == "meta"
