"""Frozen transformer layers in NumPy, each forward beside its backward.

Only input gradients are computed: the weights are frozen and never get (or store) gradients.
A forward returns (output, cache); the backward takes (d_output, cache) and returns d_input.
Weights follow the PyTorch layout: a linear weight is [out, in] and y = x @ w.T + b.
"""

from __future__ import annotations

import math

import numpy as np


# --------------------------------------------------------------------------- linear
def linear(x, w, b=None):
    """x [..., in], w [out, in], b [out] -> [..., out]."""
    # One 2-D GEMM: NumPy runs [B, T, in] @ [in, out] as B small GEMMs, up to 10x slower here.
    y = x.reshape(-1, x.shape[-1]) @ w.T
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], w.shape[0])


def linear_backward(dy, w):
    """dy [..., out] -> dx [..., in]  (no weight gradient: the model is frozen)."""
    return (dy.reshape(-1, dy.shape[-1]) @ w).reshape(*dy.shape[:-1], w.shape[1])


# --------------------------------------------------------------------------- norms
def rmsnorm(x, w, eps):
    """y = x / rms(x) * w.  x [..., C] -> y, cache."""
    rstd = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    xhat = x * rstd
    return xhat * w, (xhat, rstd)


def rmsnorm_backward(dy, cache, w):
    # dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w
    xhat, rstd = cache
    g = dy * w
    return rstd * (g - xhat * np.mean(g * xhat, axis=-1, keepdims=True))


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


def swiglu(gate, up):
    """silu(gate) * up, the Llama MLP's gate."""
    sig = 1.0 / (1.0 + np.exp(-gate))
    return gate * sig * up, (gate, up, sig)


def swiglu_backward(dy, cache):
    # d silu(g)/dg = sig * (1 + g * (1 - sig))
    gate, up, sig = cache
    silu = gate * sig
    return dy * up * sig * (1.0 + gate * (1.0 - sig)), dy * silu


# --------------------------------------------------------------------------- rotary positions
def rope_tables(positions, head_dim, theta, dtype):
    """positions [B, T] (int) -> cos, sin [B, T, 1, head_dim/2] for the rotate-half convention."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = positions[..., None].astype(np.float64) * inv_freq  # [B, T, D/2]
    return np.cos(angles)[:, :, None, :].astype(dtype), np.sin(angles)[:, :, None, :].astype(dtype)


def rope(x, cos, sin):
    """Rotate pairs (i, i + D/2) by the position's angle.  x [B, T, H, D]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rope_backward(dy, cos, sin):
    # The rotation is orthogonal: its backward rotates by the negative angle.
    return rope(dy, cos, -sin)
