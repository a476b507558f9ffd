"""Attention-logit soft-capping (Gemma 2): the ops' `softcap` in both C++ kernels and the NumPy
twin, forward and backward, against loops written apart from reference.py and torch autograd,
float64 finite differences, and bitwise equality on 1 and 2 threads."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_problem, tolerance
from test_gradcheck import numeric_grad

import softprompt
from softprompt import ops

SHAPES = [  # (B, T, S, H, Hkv, D, P): decoding (S > T), several query blocks, several key chunks
    (2, 5, 5, 4, 2, 8, 3),
    (1, 1, 9, 2, 1, 8, 3),
    (2, 70, 90, 2, 2, 16, 4),
    (1, 40, 1100, 2, 1, 9, 6),
]
CAPS = [0.5, 3.0, 50.0]


def capped_loops(q, k, v, pk, pv, mask, causal, scale, softcap, window=None):
    """Every (b, h, i) by loops: softmax over cap(scale q.k) of the visible keys (an oracle apart from
    reference.py)."""
    B, T, H, D = q.shape
    S, Hkv, P = k.shape[1], k.shape[2], pk.shape[-3]
    out = np.zeros((B, T, H, D))
    for b in range(B):
        prefix_k = pk if pk.ndim == 3 else pk[b]
        prefix_v = pv if pv.ndim == 3 else pv[b]
        for h in range(H):
            hk = h // (H // Hkv)
            for i in range(T):
                x = P + i + S - T
                keys = [(prefix_k[p, hk], prefix_v[p, hk]) for p in range(P) if window is None or x - p < window]
                keys += [(k[b, j, hk], v[b, j, hk]) for j in range(S)
                         if (not causal or P + j <= x) and (window is None or x - (P + j) < window)
                         and (mask is None or mask[b, j])]
                if keys:
                    s = scale * np.array([kk for kk, _ in keys]) @ q[b, i, h]
                    s = softcap * np.tanh(s / softcap)
                    w = np.exp(s - s.max())
                    out[b, i, h] = w @ np.array([vv for _, vv in keys]) / w.sum()
    return out


@pytest.mark.parametrize("softcap", CAPS)
@pytest.mark.parametrize("causal, window", [(False, None), (True, None), (True, 4)])
@pytest.mark.parametrize("mask", [None, "left"])
def test_reference_softcap_matches_loops(rng, softcap, causal, window, mask):
    q, k, v, pk, pv, m = make_problem(rng, 2, 6, 7, 4, 2, 8, 3, per_row=True, mask=mask)
    q *= 4  # scores of several units, so every cap bends some of them
    out, _ = ops.prefix_attention_forward(q, k, v, pk, pv, causal=causal, key_padding_mask=m, scale=0.7, window=window,
                                          softcap=softcap, backend="numpy")
    want = capped_loops(q, k, v, pk, pv, m, causal, 0.7, softcap, window)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("softcap", CAPS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal, window, per_row, mask", [(False, None, False, None), (True, None, True, "left"),
                                                           (True, 8, False, "random")])
def test_core_softcap_matches_reference(rng, kernel, dtype, softcap, shape, causal, window, per_row, mask):
    q, k, v, pk, pv, m = make_problem(rng, *shape, dtype=dtype, per_row=per_row, mask=mask)
    q *= 3
    dout = rng.standard_normal(q.shape).astype(dtype)
    results = []
    for backend, args in (("cpp", (q, k, v, pk, pv)), ("numpy", [a.astype(np.float64) for a in (q, k, v, pk, pv)])):
        kw = dict(causal=causal, key_padding_mask=m, window=window, softcap=softcap, backend=backend)
        out, lse = ops.prefix_attention_forward(*args, **kw)
        results.append((out, lse, *ops.prefix_attention_backward(dout.astype(args[0].dtype), *args, out, lse, **kw)))
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv", "dprefix_k", "dprefix_v"), *results):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert np.array_equal(np.isneginf(g), np.isneginf(w)), name
        finite = np.isfinite(w)
        np.testing.assert_allclose(g[finite], w[finite], **tolerance(dtype), err_msg=name)


def test_softcap_bounds_the_scores(rng, kernel):
    """Huge scores: without the cap the softmax is one-hot; with cap c every weight is at least
    exp(-2c) / n of the largest, as the cap promises."""
    q, k, v, pk, pv, _ = make_problem(rng, 1, 3, 5, 2, 2, 4, 2, dtype=np.float32)
    q *= 1e4
    for backend in ("cpp", "numpy"):
        out, lse = ops.prefix_attention_forward(q, k, v, pk, pv, softcap=1.0, backend=backend)
        assert np.isfinite(out).all() and np.isfinite(lse).all()
        assert (lse <= 1.0 + np.log(7) + 1e-5).all() and (lse >= -1.0 + np.log(7) - 1e-5).all()


@pytest.mark.parametrize("backend", ["cpp", "numpy"])
@pytest.mark.parametrize("softcap", [0.7, 5.0])
@pytest.mark.parametrize("shape, causal, window, per_row, mask", [
    ((2, 3, 4, 2, 1, 3, 2), False, None, False, None),
    ((2, 3, 4, 2, 1, 3, 2), True, None, False, "left"),
    ((2, 4, 3, 4, 2, 5, 3), True, 2, True, "right"),
    ((2, 3, 3, 2, 2, 2, 1), False, None, False, "empty"),
])
def test_softcap_gradients(rng, kernel, backend, softcap, shape, causal, window, per_row, mask):
    q, k, v, pk, pv, m = make_problem(rng, *shape, per_row=per_row, mask=mask)
    q *= 2
    w = rng.standard_normal(q.shape)
    kw = dict(causal=causal, key_padding_mask=m, scale=0.8, window=window, softcap=softcap, backend=backend)

    def loss():
        return float(np.sum(w * ops.prefix_attention_forward(q, k, v, pk, pv, **kw)[0]))

    out, lse = ops.prefix_attention_forward(q, k, v, pk, pv, **kw)
    grads = ops.prefix_attention_backward(w, q, k, v, pk, pv, out, lse, **kw)
    for name, x, g in zip(("q", "k", "v", "prefix_k", "prefix_v"), (q, k, v, pk, pv), grads):
        np.testing.assert_allclose(g, numeric_grad(loss, x), rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal, window, per_row, mask", [(False, None, False, None), (True, None, True, "left"),
                                                           (True, 40, False, "random")])
def test_softcap_bitwise_identical_on_1_and_2_threads(rng, kernel, dtype, causal, window, per_row, mask):
    q, k, v, pk, pv, m = make_problem(rng, 4, 150, 150, 8, 2, 32, 10, dtype=dtype, per_row=per_row, mask=mask)
    q *= 3
    dout = rng.standard_normal(q.shape).astype(dtype)
    kw = dict(causal=causal, key_padding_mask=m, window=window, softcap=2.5)
    threads = softprompt.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            softprompt.set_num_threads(n)
            out, lse = ops.prefix_attention_forward(q, k, v, pk, pv, **kw)
            runs.append((out, lse, *ops.prefix_attention_backward(dout, q, k, v, pk, pv, out, lse, **kw)))
    finally:
        softprompt.set_num_threads(threads)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_softcap_matches_torch_autograd(rng, kernel):
    torch = pytest.importorskip("torch", reason="torch is a test extra: pip install '.[test]'")
    q, k, v, pk, pv, m = make_problem(rng, 2, 9, 9, 4, 2, 8, 3, dtype=np.float64, mask="left")
    q *= 3
    dout = rng.standard_normal(q.shape)
    out, lse = ops.prefix_attention_forward(q, k, v, pk, pv, causal=True, key_padding_mask=m, softcap=2.0)
    grads = ops.prefix_attention_backward(dout, q, k, v, pk, pv, out, lse, causal=True, key_padding_mask=m, softcap=2.0)
    tq, tk, tv, tpk, tpv = (torch.tensor(a, requires_grad=True) for a in (q, k, v, pk, pv))
    kf = torch.cat([tpk.expand(2, -1, -1, -1), tk], 1).repeat_interleave(2, dim=2).transpose(1, 2)  # [B, H, P+S, D]
    vf = torch.cat([tpv.expand(2, -1, -1, -1), tv], 1).repeat_interleave(2, dim=2).transpose(1, 2)
    s = tq.transpose(1, 2) @ kf.transpose(-1, -2) / np.sqrt(8)
    s = torch.tanh(s / 2.0) * 2.0  # transformers' Gemma 2 eager attention
    vis = np.ones((2, 9, 12), dtype=bool)
    vis[:, :, 3:] = np.tril(np.ones((9, 9), dtype=bool)) & m[:, None, :]
    s = s.masked_fill(~torch.tensor(vis)[:, None], float("-inf"))
    t_out = (torch.softmax(s, -1) @ vf).transpose(1, 2)
    (t_out * torch.tensor(dout)).sum().backward()
    np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=1e-10, atol=1e-12)
    for name, g, t in zip(("q", "k", "v", "prefix_k", "prefix_v"), grads, (tq, tk, tv, tpk, tpv)):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-9, atol=1e-11, err_msg=name)


def test_softcap_input_is_checked(rng):
    q, k, v, pk, pv, _ = make_problem(rng, 1, 2, 2, 1, 1, 4, 1)
    for bad, err, msg in [(0.0, ValueError, "softcap: expected a positive finite number"),
                          (-1.0, ValueError, "softcap: expected a positive"), (float("inf"), ValueError, "softcap"),
                          (float("nan"), ValueError, "softcap"), ("3", TypeError, "softcap: expected a real number"),
                          (True, TypeError, "softcap: expected a real number")]:
        with pytest.raises(err, match=msg):
            ops.prefix_attention_forward(q, k, v, pk, pv, softcap=bad)
