"""Frozen transformer layers in NumPy, each forward beside its backward.

Only input gradients are computed: the weights are frozen and never get (or store) gradients.
A forward returns (output, cache); the backward takes (d_output, cache) and returns d_input.
Weights follow the PyTorch layout: a linear weight is [out, in] and y = x @ w.T + b.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import numpy as np

from .. import _core, ops
from .quant import QuantizedWeight


# --------------------------------------------------------------------------- linear
def linear(x, w, b=None):
    """x [..., in], w [out, in] (an array or a QuantizedWeight), b [out] -> [..., out]."""
    # One 2-D GEMM: NumPy runs [B, T, in] @ [in, out] as B small GEMMs, up to 10x slower here.
    x2 = x.reshape(-1, x.shape[-1])
    if _core_gemm(x2, w):
        y = _core.linear_forward(np.ascontiguousarray(x2), *_weight_args(w),
                                 None if b is None else np.ascontiguousarray(b, dtype=np.float32),
                                 few_rows=_decoding.get() and x2.shape[0] <= FEW_ROWS)
    else:
        y = x2 @ _values(w, x.dtype).T
        if b is not None:
            y += b
    return y.reshape(*x.shape[:-1], w.shape[0])


# Generation decodes one token per sequence: a GEMM of B rows, where packing the weight costs more
# than the products. Under decoding(), up to FEW_ROWS rows run as dot products that read the weight
# once; their sums run in another order, so only generation, whose results need not match a
# training batch's bits, opts in.
FEW_ROWS = 8
_decoding = contextvars.ContextVar("softprompt_decoding", default=False)


@contextlib.contextmanager
def decoding():
    token = _decoding.set(True)
    try:
        yield
    finally:
        _decoding.reset(token)


def linear_backward(dy, w):
    """dy [..., out] -> dx [..., in]  (no weight gradient: the model is frozen)."""
    dy2 = dy.reshape(-1, dy.shape[-1])
    if _core_gemm(dy2, w):
        dx = _core.linear_backward(np.ascontiguousarray(dy2), *_weight_args(w))
    else:
        dx = dy2 @ _values(w, dy.dtype)
    return dx.reshape(*dy.shape[:-1], w.shape[1])


# Float32 goes through the C++ GEMM (cpp/linear.cpp) on softprompt's OpenMP threads, so a step's
# GEMMs and its other kernels share one thread pool: alternating between OpenMP's and NumPy's BLAS
# threads made each pool's threads wait on the other's for a core (up to 2x slower GEMMs here).
# float64 (gradient checks) and the "numpy" backend use NumPy.
def _core_gemm(x2, w):
    if x2.dtype != np.float32 or not _cpp() or not hasattr(_core, "linear_forward"):
        return False
    return isinstance(w, QuantizedWeight) or (w.dtype == np.float32 and w.flags.c_contiguous)


def _weight_args(w):
    if isinstance(w, QuantizedWeight):
        return w.blocks, w.code, w.shape[1]
    return w, 0, w.shape[1]


def _values(w, dtype):
    return w.dequantize(dtype) if isinstance(w, QuantizedWeight) else w


# --------------------------------------------------------------------------- norms
# RMSNorm, SwiGLU and RoPE run in the C++ core (cpp/layers.cpp) unless ops' backend is "numpy";
# each NumPy twin below computes the same thing and is what the C++ kernels are tested against.
def _cpp():
    return ops.get_backend() == "cpp"


def rmsnorm(x, w, eps):
    """y = x / rms(x) * w.  x [N, C] -> y [N, C], rstd [N] (the backward's cache, with x)."""
    if _cpp():
        return _core.rmsnorm_forward(x, w, eps)
    rstd = 1.0 / np.sqrt(np.mean(x * x, axis=-1) + eps)
    return x * rstd[:, None] * w, rstd.astype(x.dtype)


def rmsnorm_backward(dy, x, rstd, w, residual=None):
    """dy, x [N, C], rstd [N] -> dx [N, C], plus residual when given (the skip connection's
    gradient, added in the same pass)."""
    if _cpp():
        return _core.rmsnorm_backward(dy, x, rstd, w, residual)
    # dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w, xhat = x * rstd
    xhat, g = x * rstd[:, None], dy * w
    dx = rstd[:, None] * (g - xhat * np.mean(g * xhat, axis=-1, keepdims=True))
    return dx if residual is None else dx + residual


def layernorm(x, w, b, eps):
    """y = (x - mean) / std * w + b.  x [..., C] -> y, cache."""
    mu = np.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    rstd = 1.0 / np.sqrt(np.mean(xc * xc, axis=-1, keepdims=True) + eps)
    xhat = xc * rstd
    return xhat * w + b, (xhat, rstd)


def layernorm_backward(dy, cache, w):
    # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w
    xhat, rstd = cache
    g = dy * w
    return rstd * (g - np.mean(g, axis=-1, keepdims=True) - xhat * np.mean(g * xhat, axis=-1, keepdims=True))


# --------------------------------------------------------------------------- activations
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_tanh(x):
    """GPT-2's GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    t = np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_tanh_backward(dy, cache):
    x, t = cache
    dt = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dt)


def erf(x):
    """Error function, |error| < 1.2e-7 (Numerical Recipes' erfc Chebyshev fit); NumPy has none."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    erfc = t * np.exp(poly)
    return np.where(x >= 0, 1.0 - erfc, erfc - 1.0).astype(x.dtype, copy=False)


def gelu_erf(x):
    """BERT's GELU: x Phi(x) = 0.5 x (1 + erf(x / sqrt 2))."""
    cdf = 0.5 * (1.0 + erf(x / math.sqrt(2.0)))
    return x * cdf, (x, cdf)


def gelu_erf_backward(dy, cache):
    x, cdf = cache
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return dy * (cdf + x * pdf)


def _sigmoid(x):
    e = np.exp(-np.abs(x))  # never overflows
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def swiglu(gate_up):
    """silu(gate) * up, the Llama MLP's gate.  gate_up [N, 2F] = [gate | up] -> [N, F]."""
    if _cpp():
        return _core.swiglu_forward(gate_up)
    gate, up = np.split(gate_up, 2, axis=-1)
    return gate * _sigmoid(gate) * up


def swiglu_backward(da, gate_up):
    """da [N, F] -> d gate_up [N, 2F]."""
    if _cpp():
        return _core.swiglu_backward(da, gate_up)
    # d silu(g)/dg = sig * (1 + g * (1 - sig))
    gate, up = np.split(gate_up, 2, axis=-1)
    sig = _sigmoid(gate)
    return np.concatenate([da * up * sig * (1.0 + gate * (1.0 - sig)), da * gate * sig], axis=-1)


# --------------------------------------------------------------------------- rotary positions
def rope_tables(positions, head_dim, theta, dtype):
    """positions [B, T] (int) -> cos, sin [B*T, head_dim/2] for the rotate-half convention."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = positions.reshape(-1, 1).astype(np.float64) * inv_freq  # [B*T, D/2]
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def rope_split(qkv, cos, sin, num_heads, num_kv_heads, head_dim):
    """The fused q/k/v projection's output qkv [N, (H + 2 Hkv) D] -> q [N, H, D], k [N, Hkv, D]
    rotated (pairs i, i + D/2) by each row's angle (cos, sin [N, D/2]), and v [N, Hkv, D]."""
    if _cpp():
        return _core.rope_split(qkv, cos, sin, num_heads, num_kv_heads, head_dim)
    N, H, D = qkv.shape[0], num_heads, head_dim
    q, k, v = np.split(qkv.reshape(N, -1, D), [H, H + num_kv_heads], axis=1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v.copy()


def rope_merge(dq, dk, dv, cos, sin):
    """rope_split's backward: dq [N, H, D], dk, dv [N, Hkv, D] -> dqkv [N, (H + 2 Hkv) D]."""
    if _cpp():
        return _core.rope_merge(dq, dk, dv, cos, sin)
    # The rotation is orthogonal: its backward rotates by the negative angle.
    d = np.concatenate([_rotate(dq, cos, -sin), _rotate(dk, cos, -sin), dv], axis=1)
    return d.reshape(dq.shape[0], -1)


def _rotate(x, cos, sin):  # x [N, heads, D], cos/sin [N, D/2]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None], sin[:, None]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
