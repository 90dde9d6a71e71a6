"""Bit packing of integer codes at any width 1..32, exactly (no byte alignment per value).

Values are laid out little-endian bit by bit: value i occupies bits [i*b, (i+1)*b) of the
stream, each value's least significant bit first. `pack(unpack(x)) == x` for every width.
"""
from __future__ import annotations

import math

import numpy as np
import torch

_CHUNK = 1 << 22  # values per chunk: bounds the temporary bit matrix to ~100 MB at 24 bits


def packed_nbytes(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers < 2**bits into a flat uint8 tensor of ceil(n*bits/8) bytes."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    v = values.detach().reshape(-1).to(torch.int64).cpu().numpy()
    if v.size and (v.min() < 0 or v.max() >= (1 << bits)):
        raise ValueError(f"values out of range for {bits} bits: [{v.min()}, {v.max()}]")
    shifts = np.arange(bits, dtype=np.int64)
    out = np.zeros(packed_nbytes(v.size, bits), dtype=np.uint8)
    # Chunks hold a multiple of 8 values, so each chunk starts on a byte boundary.
    step = _CHUNK - _CHUNK % 8
    for start in range(0, v.size, step):
        chunk = v[start : start + step]
        bitmat = ((chunk[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
        packed = np.packbits(bitmat, bitorder="little")
        o = start * bits // 8
        out[o : o + packed.size] = packed
    return torch.from_numpy(out)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: the first n values as int64."""
    p = packed.detach().reshape(-1).cpu().numpy()
    if p.size < packed_nbytes(n, bits):
        raise ValueError(f"{p.size} bytes cannot hold {n} values of {bits} bits")
    weights = (1 << np.arange(bits, dtype=np.int64))
    out = np.empty(n, dtype=np.int64)
    step = _CHUNK - _CHUNK % 8
    for start in range(0, n, step):
        m = min(step, n - start)
        o = start * bits // 8
        bitvec = np.unpackbits(p[o : o + packed_nbytes(m, bits)], bitorder="little")[: m * bits]
        out[start : start + m] = bitvec.reshape(m, bits).astype(np.int64) @ weights
    return torch.from_numpy(out)
