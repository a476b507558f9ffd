"""NaN and Inf in the attention inputs stay visible: a NaN or Inf in a query, key or value that a
query sees reaches exactly the outputs and gradients that autograd through PyTorch's
scaled_dot_product_attention makes NaN, on both backends and both C++ kernels, in float32 and
float64. Masked keys (padding, causality) keep softprompt's documented rule, checked between the
backends: a hidden key never counts."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_problem

from softprompt import ops

torch = pytest.importorskip("torch", reason="torch is a test extra: pip install '.[test]'")

SHAPES = [(2, 5, 5, 4, 2, 8, 3), (1, 70, 70, 2, 1, 16, 2)]  # (B, T, S, H, Hkv, D, P); T = 70: 2 query blocks
PLACES = ["q", "k", "v", "prefix_k", "prefix_v"]


def _poke(arrays, name, value, rng):
    a = arrays[name]
    index = tuple(int(rng.integers(0, n)) for n in a.shape)
    a[index] = value


def _torch_reference(q, k, v, pk, pv, dout):
    """out and (dq, dk, dv, dprefix_k, dprefix_v) by autograd through SDPA (math backend), the prefix
    concatenated to the keys, kv heads repeated for grouped-query attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    t = {n: torch.tensor(a, requires_grad=True) for n, a in dict(q=q, k=k, v=v, pk=pk, pv=pv).items()}
    B, H, Hkv = q.shape[0], q.shape[2], k.shape[2]
    kf = torch.cat([t["pk"].expand(B, *pk.shape), t["k"]], 1).repeat_interleave(H // Hkv, 2)
    vf = torch.cat([t["pv"].expand(B, *pv.shape), t["v"]], 1).repeat_interleave(H // Hkv, 2)
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(
            t["q"].transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2)).transpose(1, 2)
    out.backward(torch.tensor(dout))
    return out.detach().numpy(), [t[n].grad.numpy() for n in ("q", "k", "v", "pk", "pv")]


@pytest.fixture(params=["cpp-simd", "cpp-eigen", "numpy"])
def backend(request):
    """Each C++ attention kernel, then the NumPy twin."""
    name, _, kernel = request.param.partition("-")
    if not kernel:
        yield name
        return
    previous = ops.get_attention_kernel()
    ops.set_attention_kernel(kernel)
    yield name
    ops.set_attention_kernel(previous)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("shape", SHAPES)
def test_nan_and_inf_reach_what_autograd_makes_nan(shape, place, value, backend, dtype, rng):
    q, k, v, pk, pv, _ = make_problem(rng, *shape, dtype=dtype)
    arrays = dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv)
    _poke(arrays, place, value, rng)
    dout = rng.standard_normal(q.shape).astype(dtype)
    want_out, want_grads = _torch_reference(q, k, v, pk, pv, dout)
    out, lse = ops.prefix_attention_forward(q, k, v, pk, pv, backend=backend)
    grads = ops.prefix_attention_backward(dout, q, k, v, pk, pv, out, lse, backend=backend)
    assert not np.isfinite(want_out).all()  # the case is one where something must show
    for name, got, want in zip(("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"), (out, *grads),
                               (want_out, *want_grads)):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=name)
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want), err_msg=name)
        finite = np.isfinite(want)
        tol = 1e-4 if dtype == np.float32 else 1e-10
        np.testing.assert_allclose(got[finite], want[finite], rtol=tol, atol=tol, err_msg=name)


def _nan_seen(q, v, pv, lse, causal, keep):
    """[B, T, H, D]: the outputs a NaN must reach by the rule alone, written apart from both
    backends: every column of a query whose lse is NaN (a NaN score it sees), and column d of a query
    that sees a key whose value has a NaN in column d. Query i sits at position P + S - T + i, key y
    (prefix rows first) at y."""
    B, T, H, D = q.shape
    S, Hkv, P = v.shape[1], v.shape[2], pv.shape[-3]
    values = np.concatenate([np.broadcast_to(pv, (B, P, Hkv, D)), v], axis=1)  # [B, P+S, Hkv, D]
    x = P + S - T + np.arange(T)[:, None]
    y = np.arange(P + S)[None, :]
    sees = np.broadcast_to(y <= x if causal else np.ones((T, P + S), bool), (B, T, P + S)).copy()
    if keep is not None:
        sees &= np.concatenate([np.ones((B, P), bool), keep], axis=1)[:, None, :]
    bad = np.isnan(values).repeat(H // Hkv, axis=2)  # [B, P+S, H, D]
    seen = np.einsum("bty,byhd->bthd", sees.astype(np.int64), bad.astype(np.int64)) > 0
    return seen | np.isnan(lse).transpose(0, 2, 1)[..., None]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal, mask", [(True, None), (False, "right"), (True, "left")])
@pytest.mark.parametrize("place", PLACES)
def test_nan_with_masks_follows_the_same_rule_on_both_backends(place, causal, mask, dtype, kernel, rng):
    """Under causality or padding a NaN reaches the outputs of every query that sees it (a hidden
    key's score never counts): the C++ kernels and the NumPy twin agree on every NaN of lse, and
    the outputs of the queries that see a NaN are NaN on both. A NaN *value* may also reach queries
    it is hidden from (0 * NaN in p @ v, as in autograd through a masked softmax): in the NumPy twin
    always, in the C++ kernels only within the keys and query lanes they compute together, so there
    the C++ NaNs are a subset of the twin's. The same holds for the gradients, where a NaN never
    vanishes."""
    q, k, v, pk, pv, m = make_problem(rng, 2, 70, 70, 4, 2, 8, 3, dtype=dtype, mask=mask)
    arrays = dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv)
    _poke(arrays, place, np.nan, rng)
    if m is not None:  # a NaN value at a hidden position would propagate (0 * NaN): keep padding finite
        v[~m] = 0.0
        k[~m] = np.nan  # ...but a hidden key's NaN never counts
    dout = rng.standard_normal(q.shape).astype(dtype)
    results = []
    for backend in ("cpp", "numpy"):
        out, lse = ops.prefix_attention_forward(q, k, v, pk, pv, causal=causal, key_padding_mask=m, backend=backend)
        grads = ops.prefix_attention_backward(dout, q, k, v, pk, pv, out, lse, causal=causal, key_padding_mask=m,
                                              backend=backend)
        results.append((out, lse, *grads))
    np.testing.assert_array_equal(np.isnan(results[0][1]), np.isnan(results[1][1]), err_msg="lse")
    seen = _nan_seen(q, v, pv, results[1][1], causal, m)
    for name, out in zip(("cpp", "numpy"), (results[0][0], results[1][0])):
        assert not (seen & ~np.isnan(out)).any(), f"out ({name}): a query that sees a NaN is not NaN"
    assert not (np.isnan(results[0][0]) & ~np.isnan(results[1][0])).any(), "out"
    for name, a, b in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), results[0][2:], results[1][2:]):
        assert not (np.isnan(a) & ~np.isnan(b)).any(), name
    if np.isnan(results[0][0]).any():  # the NaN reached an output: the gradients show it too
        assert any(np.isnan(g).any() for g in results[0][2:])
