"""Shared helpers: random attention problems and tolerances."""

from __future__ import annotations

import numpy as np
import pytest


def make_problem(rng, B, T, S, H, Hkv, D, P, *, dtype=np.float64, per_row=False, mask=None):
    """Random q [B,T,H,D], k/v [B,S,Hkv,D], prefix [P,Hkv,D] or [B,P,Hkv,D], mask [B,S] or None.

    mask: None, "right" (trailing padding), "left" (leading padding), "empty" (row 0 fully padded)
    or "random".
    """
    q = rng.standard_normal((B, T, H, D)).astype(dtype)
    k = rng.standard_normal((B, S, Hkv, D)).astype(dtype)
    v = rng.standard_normal((B, S, Hkv, D)).astype(dtype)
    pshape = (B, P, Hkv, D) if per_row else (P, Hkv, D)
    pk = rng.standard_normal(pshape).astype(dtype)
    pv = rng.standard_normal(pshape).astype(dtype)
    m = None
    if mask is not None:
        lengths = rng.integers(1, S + 1, size=B)
        pos = np.arange(S)[None, :]
        if mask == "right":
            m = pos < lengths[:, None]
        elif mask == "left":
            m = pos >= (S - lengths)[:, None]
        elif mask == "empty":
            m = pos < lengths[:, None]
            m[0] = False
        elif mask == "random":
            m = rng.random((B, S)) < 0.6
        else:
            raise ValueError(mask)
    return q, k, v, pk, pv, m


def tolerance(dtype):
    return dict(rtol=1e-9, atol=1e-11) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-5)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


KERNELS = ["simd", "eigen"]


@pytest.fixture(params=KERNELS)
def kernel(request):
    """Runs a test once per C++ attention implementation (the fast SIMD one and the Eigen one)."""
    from softprompt import _core

    if request.param == "simd" and not _core.get_attention_kernel() == "simd":
        try:
            _core.set_attention_kernel("simd")
        except ValueError:
            pytest.skip("this build has no SIMD kernels (compiler without vector extensions)")
    previous = _core.get_attention_kernel()
    _core.set_attention_kernel(request.param)
    yield request.param
    _core.set_attention_kernel(previous)
