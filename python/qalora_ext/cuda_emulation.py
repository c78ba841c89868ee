"""The CUDA kernels emulated on the CPU (issue 14): ``torch.ops.qalora_emu.*``.

The emulation build (``cmake -DQALORA_CUDA_EMULATION=ON``; ``bash scripts/ci_cuda_emulation.sh``
builds it in ``build/emulation`` and runs ``tests/test_cuda.py`` against it) compiles every kernel of
``csrc/cuda/`` and the CUDA binding as host C++: the same sources, launches, path choices, splits and
workspaces as on a GPU, with CPU tensors in and out. Its ops have qalora's schemas in their own
namespace, never mixed with the CPU kernels of ``torch.ops.qalora``.

``load()`` loads the library (from ``QALORA_CUDA_EMULATION_LIB`` or the default build folder) and
registers shape-only fake kernels, so ``torch.library.opcheck`` runs on the emulated ops.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

_LIB_NAME = "libqalora_cuda_emulated.so"
_loaded: Optional[str] = None


def default_path() -> Path:
    """Where ``scripts/ci_cuda_emulation.sh`` builds the library (``build/emulation`` of the source tree)."""
    env = os.environ.get("QALORA_CUDA_EMULATION_LIB")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "build" / "emulation" / _LIB_NAME


def load(path: Optional[os.PathLike] = None) -> str:
    """Load the emulated CUDA ops (once per process) and return the library's path."""
    global _loaded
    if _loaded is not None:
        return _loaded
    lib = Path(path) if path is not None else default_path()
    if not lib.is_file():
        raise FileNotFoundError(
            f"no CUDA emulation library at {lib}; build it with `bash scripts/ci_cuda_emulation.sh --build-only`")
    torch.ops.load_library(str(lib))
    _register_fakes()
    _loaded = str(lib)
    return _loaded


def _register_fakes() -> None:
    def fake_linear(x, packed, scale, zero, bias, lora_A, lora_B, pool_mask, scaling, bits, group_size, layout):
        return x.new_empty((*x.shape[:-1], packed.shape[0]))

    def fake_grad(grad_out, packed, scale, zero, lora_A, lora_B, pool_mask, scaling, bits, group_size, layout):
        return grad_out.new_empty((*grad_out.shape[:-1], scale.shape[1] * group_size))

    def fake_rtn(weight, bits, group_size, scale_dtype, zero_dtype):
        n, k = weight.shape
        words = (k // 32 * bits + 3) // 4 * 4
        L = k // group_size
        return (weight.new_empty((n, words), dtype=torch.int32), weight.new_empty((n, L), dtype=scale_dtype),
                weight.new_empty((n, L), dtype=zero_dtype))

    def fake_pack(codes, bits):
        n, k = codes.shape
        return codes.new_empty((n, (k // 32 * bits + 3) // 4 * 4), dtype=torch.int32)

    def fake_unpack(packed, bits, in_features, layout):
        return packed.new_empty((packed.shape[0], in_features), dtype=torch.uint8)

    def fake_dequantize(packed, scale, zero, bits, group_size, layout):
        return packed.new_empty((packed.shape[0], scale.shape[1] * group_size), dtype=torch.float32)

    for name, fn in (("qlinear", fake_linear), ("qlinear_int8", fake_linear), ("qlinear_grad_input", fake_grad),
                     ("quantize_rtn", fake_rtn), ("pack", fake_pack), ("unpack", fake_unpack),
                     ("dequantize", fake_dequantize)):
        torch.library.register_fake(f"qalora_emu::{name}")(fn)


def set_option(name: str, value) -> None:
    """Emulation options: ``order`` (adversarial / reverse / shuffle / forward), ``seed``, ``skip_barrier``
    ("file:line" of a ``__syncthreads()`` to remove, for tests of the tests)."""
    torch.ops.qalora_emu.set_option(name, str(value))


def get_option(name: str) -> str:
    return torch.ops.qalora_emu.get_option(name)
