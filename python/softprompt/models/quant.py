"""Frozen weights kept in their file's format (GGUF block quantizations, 16-bit floats) instead of float32.

A Q4_K_M GGUF stores its linear layers as Q4_K (144 bytes per 256 weights, 0.5625 bytes a weight)
and Q6_K; a bf16 folder as 2 bytes a weight. `QuantizedWeight` keeps those bytes; the C++ GEMM
(cpp/linear.cpp) dequantizes them into its packed panels, so the layer is never expanded in memory,
and a gather of rows (the embedding table: `w[ids]`) dequantizes only those rows. The values are
exactly the float32 ones `gguf.quants.dequantize` gives (each product and sum rounded separately),
so a model gives the same numbers either way, up to the summation order of the GEMM.

Formats (cpp/linear.h has every block layout): q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl (32 weights a
block), q2_k, q3_k, q4_k, q5_k, q6_k (256), f16, bf16 (1 weight per 2 bytes).
"""

from __future__ import annotations

import numpy as np

from .. import ops

FORMATS = ops.QUANT_FORMATS  # name -> (code in _core, weights per block, bytes per block)


class QuantizedWeight:
    """A frozen weight W [rows, cols] (out, in) as raw blocks: uint8 [rows, cols / block weights *
    block bytes].

    Row slices (`w[a:b]`) are views, like NumPy's, with `.base` the weight they view, so stacking
    q/k/v keeps one copy. Integer indexing (`w[ids]`, ids of any shape) gathers and dequantizes
    those rows: float32 [*ids.shape, cols]. `dequantize()` gives the whole float array;
    `np.asarray(w)` does too."""

    __slots__ = ("blocks", "format", "shape", "base")
    ndim = 2

    def __init__(self, blocks, format, cols, base=None):
        if format not in FORMATS:
            raise ValueError(f"format: expected one of {sorted(FORMATS)}, got {format!r}")
        _, per_block, block_bytes = FORMATS[format]
        if not isinstance(cols, (int, np.integer)) or cols < per_block or cols % per_block:
            raise ValueError(f"cols: expected a positive multiple of {per_block} for {format}, got {cols!r}")
        blocks = np.asarray(blocks)
        row_bytes = cols // per_block * block_bytes
        if blocks.dtype != np.uint8 or blocks.ndim != 2 or blocks.shape[1] != row_bytes:
            raise ValueError(f"blocks: expected uint8 [rows, {row_bytes}] for {format} with {cols} columns, "
                             f"got {blocks.dtype} {blocks.shape}")
        self.blocks = np.ascontiguousarray(blocks)
        self.format = format
        self.shape = (blocks.shape[0], int(cols))
        self.base = base

    code = property(lambda self: FORMATS[self.format][0])
    dtype = property(lambda self: np.dtype(np.float32))  # the dtype of the values
    size = property(lambda self: self.shape[0] * self.shape[1])
    nbytes = property(lambda self: self.blocks.nbytes)

    def __repr__(self):
        return f"QuantizedWeight({self.format}, shape={self.shape})"

    def __getitem__(self, rows):
        if isinstance(rows, slice):
            if rows.step not in (None, 1):
                raise TypeError(f"rows: a QuantizedWeight takes contiguous row slices, got {rows!r}")
            return QuantizedWeight(self.blocks[rows], self.format, self.shape[1], base=self.base or self)
        ids = np.asarray(rows)
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"rows: expected a slice or integer row ids, got {ids.dtype}")
        flat = ids.reshape(-1)
        if flat.size and (flat.min() < -self.shape[0] or flat.max() >= self.shape[0]):
            raise IndexError(f"rows: ids must be in [0, {self.shape[0]}), got [{flat.min()}, {flat.max()}]")
        values = ops.dequantize(self.blocks[flat], self.format, self.shape[1])  # only these rows
        return values.reshape(*ids.shape, self.shape[1])

    def take_rows(self, order):
        """A new weight with rows reordered: W[order]."""
        return QuantizedWeight(self.blocks[np.asarray(order)], self.format, self.shape[1])

    @staticmethod
    def concatenate(parts):
        """Stacks weights of one format along rows (a new weight)."""
        fmt = parts[0].format
        if any(p.format != fmt or p.shape[1] != parts[0].shape[1] for p in parts):
            raise ValueError("parts: expected one format and one column count, got "
                             + ", ".join(f"{p.format} {p.shape}" for p in parts))
        return QuantizedWeight(np.concatenate([p.blocks for p in parts]), fmt, parts[0].shape[1])

    def dequantize(self, dtype=np.float32):
        """The float values [rows, cols] (a new array each call; `ops.dequantize`). The model's own
        layers never call this on the float32 path: the GEMM dequantizes into its panels; float64
        activations or the "numpy" backend expand the weight at every call."""
        out = ops.dequantize(self.blocks, self.format, self.shape[1])
        return out if np.dtype(dtype) == np.float32 else out.astype(dtype)

    def astype(self, dtype, copy=True):
        """Like ndarray.astype; always a new float array (the values exist only as blocks)."""
        return self.dequantize(dtype)

    def __array__(self, dtype=None, copy=None):
        if copy is False:
            raise ValueError("a QuantizedWeight has no float array to share: dequantizing makes a copy")
        return self.dequantize(np.float32 if dtype is None else dtype)



class StackedWeight:
    """Row-stacked weights kept in their own formats: W [sum of rows, cols] = [parts[0]; parts[1]; ...]
    (a Q4_K_M file has attn_q in Q4_K beside attn_v in Q6_K, so Llama's fused q/k/v cannot be one
    block array). The linear ops run one GEMM per part (ops.linear_forward / linear_backward);
    a row slice that is exactly one part (`w[a:b]`) gives that part."""

    __slots__ = ("parts", "shape")
    ndim = 2

    def __init__(self, parts):
        parts = list(parts)
        if not parts or len({p.shape[1] for p in parts}) != 1:
            raise ValueError("parts: expected weights with one column count, got "
                             + ", ".join(str(p.shape) for p in parts))
        self.parts = parts
        self.shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])

    dtype = property(lambda self: np.dtype(np.float32))
    size = property(lambda self: self.shape[0] * self.shape[1])
    nbytes = property(lambda self: sum(p.nbytes for p in self.parts))

    def __repr__(self):
        return f"StackedWeight({', '.join(repr(p) for p in self.parts)})"

    def __getitem__(self, rows):
        start = 0
        for p in self.parts:
            if isinstance(rows, slice) and rows.step in (None, 1) and (rows.start or 0, rows.stop) == (start, start + p.shape[0]):
                return p
            start += p.shape[0]
        if isinstance(rows, slice):
            raise TypeError(f"rows: a StackedWeight slices into whole parts, got {rows!r}")
        return self.dequantize()[np.asarray(rows)]

    def dequantize(self, dtype=np.float32):
        return np.concatenate([np.asarray(p, dtype=dtype) for p in self.parts])

    def astype(self, dtype, copy=True):
        return self.dequantize(dtype)

    def __array__(self, dtype=None, copy=None):
        if copy is False:
            raise ValueError("a StackedWeight has no float array to share: dequantizing makes a copy")
        return self.dequantize(np.float32 if dtype is None else dtype)
