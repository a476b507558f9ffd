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


def geglu(gate_up):
    """Gemma's GeGLU: gelu_tanh(gate) * up.  gate_up [N, 2F] = [gate | up] -> [N, F]."""
    F = gate_up.shape[-1] // 2
    g, _ = gelu_tanh(gate_up[..., :F])
    return g * gate_up[..., F:]


def geglu_backward(da, gate_up):
    """da [N, F], gate_up [N, 2F] -> d gate_up [N, 2F]."""
    F = gate_up.shape[-1] // 2
    gate, up = gate_up[..., :F], gate_up[..., F:]
    g, cache = gelu_tanh(gate)
    return np.concatenate([gelu_tanh_backward(da * up, cache), da * g], axis=-1)


def softcap(x, cap):
    """Logit soft-capping in place: x -> cap * tanh(x / cap) (Gemma 2's final_logit_softcapping,
    transformers' Gemma2ForCausalLM). -> tanh(x / cap), the backward's input, or None for cap None
    (x unchanged)."""
    if cap is None:
        return None
    th = np.tanh(x / x.dtype.type(cap))
    np.multiply(th, x.dtype.type(cap), out=x)
    return th


def softcap_backward(dy, th):
    """softcap's backward, in place: dy *= 1 - tanh^2 (nothing for th None). -> dy."""
    if th is not None:
        dy *= 1 - th * th
    return dy


swiglu = ops.swiglu_forward  # gate_up [N, 2F] = [gate | up] -> silu(gate) * up [N, F]
swiglu_backward = ops.swiglu_backward  # da [N, F], gate_up -> d gate_up [N, 2F]


# --------------------------------------------------------------------------- rotary positions
def rope_tables(positions, head_dim, theta, dtype, scaling=None, max_position_embeddings=None):
    """positions [B, T] (int) -> cos, sin [B*T, head_dim/2] for the rotate-half convention, with
    the frequencies of `rope_inv_freq` (scaling: a RopeScaling, None = plain RoPE)."""
    seq_len = int(positions.max()) + 1 if positions.size else 0
    inv_freq, attention_factor = rope_inv_freq(head_dim, theta, scaling, max_position_embeddings, seq_len)
    angles = positions.reshape(-1, 1).astype(np.float64) * inv_freq  # [B*T, D/2]
    cos, sin = np.cos(angles), np.sin(angles)
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.astype(dtype), sin.astype(dtype)


def rope_inv_freq(head_dim, theta, scaling=None, max_position_embeddings=None, seq_len=0):
    """RoPE's inverse frequencies [head_dim/2] (float64) and the factor on cos/sin, per transformers'
    modeling_rope_utils.py (`_compute_*_parameters`):
    - default: theta^(-2i/D); linear: that / factor;
    - dynamic (NTK): theta' = theta * (factor * L / M - (factor - 1))^(D / (D - 2)), L = max(seq_len,
      M), M = max_position_embeddings: it depends on the longest position of the forward (seq_len);
    - llama3: wavelengths 2 pi / f above original/low_freq_factor are divided by factor, below
      original/high_freq_factor kept, and interpolated between;
    - yarn: interpolation (/ factor) and extrapolation blended by a linear ramp over the
      correction range of beta_fast..beta_slow rotations, and cos/sin scaled by attention_factor
      (default 0.1 ln(factor) + 1, or mscale / mscale_all_dim's ratio).
    GGUF's rope_freqs (freq_factors) divide the frequencies, as llama.cpp does."""
    D = head_dim
    kind = "default" if scaling is None else scaling.rope_type
    exponents = np.arange(0, D, 2, dtype=np.float64) / D
    inv_freq = 1.0 / theta**exponents
    attention_factor = 1.0
    if kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif kind == "dynamic":
        M = max_position_embeddings
        L = max(seq_len, M)
        base = theta * ((scaling.factor * L / M) - (scaling.factor - 1)) ** (D / (D - 2))
        inv_freq = 1.0 / base**exponents
    elif kind == "llama3":
        old = scaling.original_max_position_embeddings
        low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    elif kind == "yarn":
        factor, old = scaling.factor, scaling.original_max_position_embeddings

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if scaling.attention_factor is not None:
            attention_factor = scaling.attention_factor
        elif scaling.mscale and scaling.mscale_all_dim:
            attention_factor = mscale(factor, scaling.mscale) / mscale(factor, scaling.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

        def correction_dim(rotations):
            return (D * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(theta))

        low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
        if scaling.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, D - 1)
        if low == high:
            high += 0.001  # transformers' guard against a zero-width ramp
        ramp = np.clip((np.arange(D // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp  # the share of the unscaled frequency
        inv_freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    elif kind != "default":
        raise ValueError(f"rope_type: expected one of {ROPE_TYPES}, got {kind!r}")
    if scaling is not None and scaling.freq_factors is not None:
        inv_freq = inv_freq / np.asarray(scaling.freq_factors, dtype=np.float64)
    return inv_freq, attention_factor


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


rope_split = ops.rope_split  # qkv [N, (H + 2 Hkv) D], cos, sin [N, D/2] -> q [N, H, D], k, v [N, Hkv, D]
rope_merge = ops.rope_merge  # dq, dk, dv, cos, sin -> dqkv [N, (H + 2 Hkv) D]
