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

from .. import ops


# --------------------------------------------------------------------------- linear
# Float32 goes through the C++ GEMM (cpp/linear.cpp) on softprompt's OpenMP threads, so a step's
# GEMMs and its other kernels share one thread pool: alternating between OpenMP's and NumPy's BLAS
# threads made each pool's threads wait on the other's for a core (up to 2x slower GEMMs, measured).
# float64 (gradient checks) and the "numpy" backend use NumPy.
def linear(x, w, b=None):
    """x [..., in], w [out, in] (an array or a QuantizedWeight), b [out] -> [..., out]."""
    # One 2-D GEMM: NumPy runs [B, T, in] @ [in, out] as B small GEMMs, up to 10x slower here.
    x2 = x.reshape(-1, x.shape[-1])
    y = ops.linear_forward(x2, w, b, few_rows=_decoding.get() and x2.shape[0] <= FEW_ROWS)
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
    dx = ops.linear_backward(dy.reshape(-1, dy.shape[-1]), w)
    return dx.reshape(*dy.shape[:-1], w.shape[1])


# --------------------------------------------------------------------------- norms
# RMSNorm, SwiGLU and RoPE run in the C++ core (cpp/layers.cpp) unless ops' backend is "numpy";
# their NumPy twins are in softprompt.reference.
rmsnorm = ops.rmsnorm_forward  # x [N, C], w [C], eps -> y [N, C], rstd [N]
rmsnorm_backward = ops.rmsnorm_backward  # dy, x [N, C], rstd [N], w (, residual) -> dx [N, C]


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


swiglu = ops.swiglu_forward  # gate_up [N, 2F] = [gate | up] -> silu(gate) * up [N, F]
swiglu_backward = ops.swiglu_backward  # da [N, F], gate_up -> d gate_up [N, 2F]


# --------------------------------------------------------------------------- rotary positions
def rope_tables(positions, head_dim, theta, dtype):
    """positions [B, T] (int) -> cos, sin [B*T, head_dim/2] for the rotate-half convention."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = positions.reshape(-1, 1).astype(np.float64) * inv_freq  # [B*T, D/2]
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


rope_split = ops.rope_split  # qkv [N, (H + 2 Hkv) D], cos, sin [N, D/2] -> q [N, H, D], k, v [N, Hkv, D]
rope_merge = ops.rope_merge  # dq, dk, dv, cos, sin -> dqkv [N, (H + 2 Hkv) D]
