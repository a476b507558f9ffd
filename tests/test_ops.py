"""The C++ core against the NumPy reference, and the reference against a loop-by-loop oracle."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_problem, tolerance

from softprompt import ops

# (B, T, S, H, Hkv, D, P): B=1, T=1, P=0, S>T, S<T, D not a multiple of 8/16, GQA, several query
# blocks (T > 64) and several key chunks (S > 1024).
SHAPES = [
    (1, 1, 1, 1, 1, 1, 0),
    (1, 1, 9, 2, 1, 8, 3),
    (2, 5, 5, 4, 4, 7, 2),
    (3, 6, 11, 6, 2, 13, 0),
    (2, 17, 17, 3, 1, 24, 5),
    (1, 70, 90, 2, 2, 33, 4),
    (2, 129, 129, 2, 1, 16, 10),
    (1, 9, 4, 2, 2, 8, 3),
    (1, 40, 1100, 2, 1, 9, 6),
    (1, 300, 300, 4, 1, 20, 5),  # one kv head: the backward splits its 20 (head, block) pairs 5 ways
]


def naive_attention(q, k, v, pk, pv, causal, mask, scale):
    """Loop over every (b, h, i): an oracle written independently of reference.py."""
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    out = np.zeros((B, T, H, D))
    lse = np.full((B, H, T), -np.inf)
    for b in range(B):
        prefix_k = pk if pk.ndim == 3 else pk[b]
        prefix_v = pv if pv.ndim == 3 else pv[b]
        for h in range(H):
            hk = h // (H // Hkv)
            for i in range(T):
                keys, vals = list(prefix_k[:, hk]), list(prefix_v[:, hk])
                for j in range(S):
                    if causal and j > i + S - T:
                        continue
                    if mask is not None and not mask[b, j]:
                        continue
                    keys.append(k[b, j, hk])
                    vals.append(v[b, j, hk])
                if not keys:
                    continue
                s = scale * np.array(keys, dtype=np.float64) @ q[b, i, h].astype(np.float64)
                w = np.exp(s - s.max())
                out[b, i, h] = w @ np.array(vals, dtype=np.float64) / w.sum()
                lse[b, h, i] = s.max() + np.log(w.sum())
    return out, lse


@pytest.mark.parametrize("shape", SHAPES[:7])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [None, "left", "empty"])
def test_reference_matches_naive_loops(rng, shape, causal, mask):
    q, k, v, pk, pv, m = make_problem(rng, *shape, per_row=shape[0] > 1, mask=mask)
    scale = 0.7
    out, lse = ops.prefix_attention_forward(q, k, v, pk, pv, causal=causal, key_padding_mask=m, scale=scale, backend="numpy")
    want_out, want_lse = naive_attention(q, k, v, pk, pv, causal, m, scale)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-12)


def both_backends(q, k, v, pk, pv, m, causal, dout=None):
    results = {}
    for backend in ("cpp", "numpy"):
        out, lse = ops.prefix_attention_forward(q, k, v, pk, pv, causal=causal, key_padding_mask=m, backend=backend)
        grads = ops.prefix_attention_backward(
            dout, q, k, v, pk, pv, out, lse, causal=causal, key_padding_mask=m, backend=backend
        )
        results[backend] = (out, lse, *grads)
    return results["cpp"], results["numpy"]


NAMES = ("out", "lse", "dq", "dk", "dv", "dprefix_k", "dprefix_v")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("mask", [None, "right", "left", "empty", "random"])
def test_core_matches_reference(rng, kernel, dtype, shape, causal, per_row, mask):
    q, k, v, pk, pv, m = make_problem(rng, *shape, dtype=dtype, per_row=per_row, mask=mask)
    dout = rng.standard_normal(q.shape).astype(dtype)
    got, want = both_backends(q, k, v, pk, pv, m, causal, dout)
    if dtype == np.float32:  # judge float32 against the float64 reference on the same inputs
        f64 = [a.astype(np.float64) for a in (q, k, v, pk, pv)]
        _, want = both_backends(*f64, m, causal, dout.astype(np.float64))
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == dtype, name
        assert g.shape == w.shape, name
        assert np.array_equal(np.isneginf(g), np.isneginf(w)), name
        finite = np.isfinite(w)
        np.testing.assert_allclose(g[finite], w[finite], **tolerance(dtype), err_msg=name)


def test_query_without_visible_key_gets_zeros_not_nan(rng, kernel):
    # Row 0 fully padded, no prefix: its queries see nothing.
    q, k, v, pk, pv, m = make_problem(rng, 2, 4, 6, 2, 2, 8, 0, mask="empty")
    out, lse = ops.prefix_attention_forward(q, k, v, pk, pv, key_padding_mask=m)
    assert np.all(out[0] == 0) and np.all(np.isneginf(lse[0]))
    grads = ops.prefix_attention_backward(np.ones_like(out), q, k, v, pk, pv, out, lse, key_padding_mask=m)
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert np.all(grads[0][0] == 0)  # no gradient flows to the hidden queries


def test_prefix_stays_visible_under_full_padding(rng):
    # With a prefix, a fully padded row attends to the prefix alone.
    q, k, v, pk, pv, m = make_problem(rng, 2, 3, 5, 2, 1, 8, 4, mask="empty")
    out, _ = ops.prefix_attention_forward(q, k, v, pk, pv, key_padding_mask=m, causal=True)
    alone, _ = ops.prefix_attention_forward(q[:1], k[:1, :1], v[:1, :1], pk, pv, key_padding_mask=np.zeros((1, 1), bool))
    np.testing.assert_allclose(out[:1], alone, rtol=1e-12)


def test_causal_decoding_with_cache_matches_full(rng):
    # The last query of a full causal pass equals a T=1 query against the whole cache (S > T).
    q, k, v, pk, pv, _ = make_problem(rng, 2, 9, 9, 4, 2, 16, 3)
    full, _ = ops.prefix_attention_forward(q, k, v, pk, pv, causal=True)
    step, _ = ops.prefix_attention_forward(q[:, -1:], k, v, pk, pv, causal=True)
    np.testing.assert_allclose(step[:, 0], full[:, -1], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", ["cpp", "numpy"])
def test_hidden_keys_never_count(rng, kernel, backend):
    # NaN or Inf in a hidden key, or any finite value in its value row, leaves the output unchanged
    # (documented; a NaN/Inf *value* at a hidden position does propagate, as 0 * Inf = NaN).
    q, k, v, pk, pv, m = make_problem(rng, 2, 4, 6, 2, 2, 8, 2, mask="right")
    k2, v2 = k.copy(), v.copy()
    k2[~m] = np.nan
    k2[~m & (np.arange(6) % 2 == 0)] = np.inf
    v2[~m] = 1e30
    a, _ = ops.prefix_attention_forward(q, k, v, pk, pv, key_padding_mask=m, backend=backend)
    b, _ = ops.prefix_attention_forward(q, k2, v2, pk, pv, key_padding_mask=m, backend=backend)
    np.testing.assert_array_equal(a, b)


def test_nan_input_propagates_to_its_rows_only(rng, kernel):
    q, k, v, pk, pv, _ = make_problem(rng, 2, 4, 6, 2, 2, 8, 2)
    q[1, 2, 0, 3] = np.nan
    out, _ = ops.prefix_attention_forward(q, k, v, pk, pv)
    assert np.all(np.isnan(out[1, 2, 0]))
    assert np.isfinite(out[0]).all() and np.isfinite(np.delete(out[1].reshape(-1, 8), 2 * 2, axis=0)).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_a_rows_gradients_do_not_depend_on_the_other_rows(rng, kernel, dtype, causal):
    # One kv head and many (head, block) pairs: the backward splits a head's pairs over several
    # items. Data-parallel ranks take different rows of a batch and must get each row's bits.
    q, k, v, pk, pv, m = make_problem(rng, 3, 300, 300, 4, 1, 20, 5, dtype=dtype, per_row=True, mask="random")
    dout = rng.standard_normal(q.shape).astype(dtype)
    kw = {"causal": causal}
    out, lse = ops.prefix_attention_forward(q, k, v, pk, pv, key_padding_mask=m, **kw)
    whole = ops.prefix_attention_backward(dout, q, k, v, pk, pv, out, lse, key_padding_mask=m, **kw)
    for b in range(3):
        q1, k1, v1, pk1, pv1, m1, dout1 = (np.ascontiguousarray(a[b:b + 1]) for a in (q, k, v, pk, pv, m, dout))
        o1, l1 = ops.prefix_attention_forward(q1, k1, v1, pk1, pv1, key_padding_mask=m1, **kw)
        np.testing.assert_array_equal(o1, out[b:b + 1])
        alone = ops.prefix_attention_backward(dout1, q1, k1, v1, pk1, pv1, o1, l1, key_padding_mask=m1, **kw)
        for a, w in zip(alone, whole):
            np.testing.assert_array_equal(a, w[b:b + 1])


def test_a_nan_query_leaves_the_other_queries_bits():
    # Every query's scores: 100 for key 0 (value 0), 0 for the others (value 1), a gap beyond the
    # 87 where float32's exp clamps, so each output is the sum of those clamped weights, ~1e-38.
    # A NaN in one query sends its block's softmax down exp's checked path; the block's other
    # queries must keep their bits (the lean exp gives the same bits as exp).
    T, S = 20, 12
    q = np.zeros((1, T, 1, 4), np.float32)
    q[..., 0] = 10.0
    k = np.zeros((1, S, 1, 4), np.float32)
    k[0, 0, 0, 0] = 10.0
    v = np.ones((1, S, 1, 4), np.float32)
    v[0, 0] = 0.0
    none = np.zeros((0, 1, 4), np.float32)
    out, lse = ops.prefix_attention_forward(q, k, v, none, none, scale=1.0)
    assert (out > 0).all() and (out < 1e-36).all()  # the clamped weights, not zeros
    q[0, 7, 0, 1] = np.nan
    out2, lse2 = ops.prefix_attention_forward(q, k, v, none, none, scale=1.0)
    assert np.isnan(out2[0, 7]).all() and np.isnan(lse2[0, 0, 7])
    others = np.arange(T) != 7
    np.testing.assert_array_equal(out2[0, others], out[0, others])
    np.testing.assert_array_equal(lse2[0, 0, others], lse[0, 0, others])


def test_views_are_copied_and_give_the_same_result(rng):
    q, k, v, pk, pv, m = make_problem(rng, 2, 6, 8, 4, 2, 8, 3, mask="left")
    want, _ = ops.prefix_attention_forward(q, k, v, pk, pv, key_padding_mask=m)
    # Negative strides and a transposed layout hold the same values.
    qr = np.ascontiguousarray(q[:, ::-1])[:, ::-1]
    kt = np.ascontiguousarray(k.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    mf = np.asfortranarray(m)
    assert not qr.flags.c_contiguous and not kt.flags.c_contiguous
    got, _ = ops.prefix_attention_forward(qr, kt, v, pk, pv, key_padding_mask=mf)
    # Equal up to rounding: the copies sit at other addresses, and Eigen's vector loops peel
    # differently for another alignment.
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


def test_default_scale_and_seed_function(rng):
    from softprompt import reference

    q, k, v, pk, pv, _ = make_problem(rng, 2, 5, 6, 2, 2, 16, 3)
    out, _ = ops.prefix_attention_forward(q, k, v, pk, pv, scale=0.25)  # 1/sqrt(16)
    np.testing.assert_allclose(reference.attention_with_prefix(q, k, v, pk, pv), out, rtol=1e-12)
    np.testing.assert_allclose(ops.prefix_attention_forward(q, k, v, pk, pv)[0], out, rtol=1e-12)


# --------------------------------------------------------------------------- prepend
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B,P,T,D", [(1, 0, 1, 1), (3, 5, 7, 9), (2, 20, 64, 576), (5, 1, 3, 4)])
@pytest.mark.parametrize("per_row", [False, True])
def test_prepend_matches_reference(rng, dtype, B, P, T, D, per_row):
    prompt = rng.standard_normal((B, P, D) if per_row else (P, D)).astype(dtype)
    x = rng.standard_normal((B, T, D)).astype(dtype)
    y = ops.prepend_forward(prompt, x)
    assert y.dtype == dtype and y.shape == (B, P + T, D)
    np.testing.assert_array_equal(y, ops.prepend_forward(prompt, x, backend="numpy"))
    np.testing.assert_array_equal(y[:, P:], x)
    np.testing.assert_array_equal(y[:, :P], np.broadcast_to(prompt, (B, P, D)))
    dy = rng.standard_normal(y.shape).astype(dtype)
    dprompt, dx = ops.prepend_backward(dy, P, shared=not per_row)
    want_dprompt, want_dx = ops.prepend_backward(dy, P, shared=not per_row, backend="numpy")
    np.testing.assert_array_equal(dx, want_dx)
    np.testing.assert_allclose(dprompt, want_dprompt, **tolerance(dtype))
    assert dprompt.shape == prompt.shape and dprompt.dtype == dtype


def test_seed_prompt_tuning_class(rng):
    from softprompt import reference

    pt = reference.PromptTuning(d_model=6, prompt_length=3, rng=rng)
    assert pt.d_model == 6 and pt.prompt.shape == (3, 6)
    x = rng.standard_normal((2, 4, 6))
    y = pt.forward(x)
    np.testing.assert_array_equal(y, ops.prepend_forward(pt.prompt, x))
    dy = rng.standard_normal(y.shape)
    dx = pt.backward(dy)
    np.testing.assert_array_equal(dx, dy[:, 3:])
    np.testing.assert_allclose(pt.prompt_grad, dy[:, :3].sum(0))


def test_seed_prefix_tuning_class(rng):
    from softprompt import reference

    pt = reference.PrefixTuning(num_layers=3, num_heads=2, d_head=4, prefix_length=5, rng=rng)
    assert pt.prefix.shape == (3, 2, 5, 2, 4)
    pk, pv = pt.get_prefix(1)
    np.testing.assert_array_equal(pk, pt.prefix[1, 0])
    np.testing.assert_array_equal(pv, pt.prefix[1, 1])
