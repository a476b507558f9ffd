"""The fused C++ layer kernels (cpp/layers.cpp) against their NumPy twins, and the model-level
fast paths against the plain ones: the NumPy backend, stacked weights, and the shared prompt rows
of prompt tuning. Runs without torch: the model here is a tiny random Llama built from arrays."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_llama
from softprompt import PrefixTuning, PromptTuning, _core, ops
from softprompt.models import layers as nn
from softprompt.models.llama import Llama

DTYPES = [np.float32, np.float64]


def _tol(dtype):
    return dict(rtol=2e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)


def _both(fn, *args, **kw):
    """fn on the C++ core and on the NumPy twin."""
    with ops.use_backend("cpp"):
        fast = fn(*args, **kw)
    with ops.use_backend("numpy"):
        ref = fn(*args, **kw)
    return fast, ref


def _close(a, b, dtype):
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert x.dtype == y.dtype == dtype and x.shape == y.shape
        np.testing.assert_allclose(x, y, **_tol(dtype))


# --------------------------------------------------------------------------- kernels vs twins
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C", [(1, 1), (5, 17), (33, 576)])
def test_rmsnorm_matches_numpy(dtype, N, C, rng):
    x = rng.standard_normal((N, C)).astype(dtype)
    w = rng.standard_normal(C).astype(dtype)
    dy, res = rng.standard_normal((2, N, C)).astype(dtype)
    fast, ref = _both(nn.rmsnorm, x, w, 1e-5)
    _close(fast, ref, dtype)
    for residual in (None, res):
        _close(*_both(nn.rmsnorm_backward, dy, x, ref[1], w, residual), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,F", [(1, 1), (7, 19), (40, 1536)])
def test_swiglu_matches_numpy(dtype, N, F, rng):
    gu = (3 * rng.standard_normal((N, 2 * F))).astype(dtype)
    gu[0, 0] = -100.0  # far tails: sigmoid 0 and 1 without overflow warnings or NaN
    gu[-1, F - 1] = 100.0
    da = rng.standard_normal((N, F)).astype(dtype)
    _close(*_both(nn.swiglu, gu), dtype)
    _close(*_both(nn.swiglu_backward, da, gu), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv,D", [(1, 1, 2), (9, 3, 64), (4, 2, 6)])
def test_rope_split_and_merge_match_numpy(dtype, H, Hkv, D, rng):
    N = 11
    qkv = rng.standard_normal((N, (H + 2 * Hkv) * D)).astype(dtype)
    cos, sin = nn.rope_tables(rng.integers(0, 50, (1, N)), D, 10000.0, dtype)
    fast, ref = _both(nn.rope_split, qkv, cos, sin, H, Hkv, D)
    _close(fast, ref, dtype)
    dq, dk, dv = (rng.standard_normal(a.shape).astype(dtype) for a in ref)
    back, back_ref = _both(nn.rope_merge, dq, dk, dv, cos, sin)
    _close(back, back_ref, dtype)
    # a rotation: merge(split(x)) = x
    np.testing.assert_allclose(nn.rope_merge(*fast, cos, sin), qkv, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V", [(1, 3), (6, 1000), (3, 49152)])
def test_softmax_cross_entropy_matches_numpy(dtype, N, V, rng):
    logits = (4 * rng.standard_normal((N, V))).astype(dtype)
    labels = rng.integers(0, V, N)
    fast, ref = logits.copy(), logits.copy()
    with ops.use_backend("cpp"):
        loss_fast = ops.softmax_cross_entropy(fast, labels, 0.25)
    with ops.use_backend("numpy"):
        loss_ref = ops.softmax_cross_entropy(ref, labels, 0.25)
    np.testing.assert_allclose(loss_fast, loss_ref, rtol=1e-6 if dtype == np.float32 else 1e-12)
    np.testing.assert_allclose(fast, ref, **_tol(dtype))
    np.testing.assert_allclose(fast.sum(1), 0, atol=1e-6)  # softmax - onehot sums to 0


def test_kernels_reject_bad_shapes():
    x = np.zeros((4, 8), np.float32)
    with pytest.raises(ValueError, match=r"weight: expected shape \(8,\), got \(7,\)"):
        _core.rmsnorm_forward(x, np.zeros(7, np.float32), 1e-5)
    with pytest.raises(ValueError, match=r"gate_up: expected an even width"):
        _core.swiglu_forward(np.zeros((4, 7), np.float32))
    with pytest.raises(ValueError, match=r"qkv: expected shape \(4, 48\)"):
        _core.rope_split(x, np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32), 4, 1, 8)
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 8\), got 8"):
        _core.softmax_cross_entropy(x, np.array([0, 1, 2, 8]), 1.0)
    with pytest.raises(TypeError):  # no silent casts
        _core.rmsnorm_forward(x.astype(np.float64), np.zeros(8, np.float32), 1e-5)


# --------------------------------------------------------------------------- model-level paths
def test_stacked_weights_are_views_not_copies(rng):
    model = tiny_llama(rng, bias=True)
    for w in model.layers:
        for part in ("q", "k", "v"):
            assert w[part].base is w["qkv"]
        for part in ("q_bias", "k_bias", "v_bias"):
            assert w[part].base is w["qkv_bias"]
        assert w["gate"].base is w["gate_up"] and w["up"].base is w["gate_up"]
    # counted once: embed + per layer (2 norms + q,k,v,o + biases + gate,up,down) + final norm
    per_layer = 2 * 32 + 32 * 32 + 2 * 16 * 32 + 32 * 32 + 32 + 2 * 16 + 3 * 48 * 32
    assert model.num_parameters() == 50 * 32 + 3 * per_layer + 32
    m64 = model.astype(np.float64)
    assert m64.layers[0]["q"].base is m64.layers[0]["qkv"] and m64.layers[0]["qkv"].dtype == np.float64


def _step(model, adapter, ids, mask, w):
    hidden, cache = model.forward(ids, mask, adapter=adapter, keep_cache=True)
    return hidden, model.backward(w, cache)


@pytest.mark.parametrize("kind", [None, "prompt", "prefix"])
def test_cpp_and_numpy_backends_agree_through_the_model(kind, rng):
    model = tiny_llama(rng, np.float64, bias=True)
    adapter = {None: None, "prompt": PromptTuning(rng.standard_normal((3, 32))),
               "prefix": PrefixTuning(rng.standard_normal((3, 2, 3, 2, 8)))}[kind]
    if adapter is not None:
        adapter.__dict__[kind] = adapter.__dict__[kind].astype(np.float64)
    ids = rng.integers(0, 50, (2, 6))
    mask = np.array([[1] * 6, [0, 0, 1, 1, 1, 1]], bool)
    w = rng.standard_normal((2, 6, 32))
    fast, ref = _both(_step, model, adapter, ids, mask, w)
    np.testing.assert_allclose(fast[0], ref[0], rtol=1e-11, atol=1e-12)
    for name in ref[1]:
        np.testing.assert_allclose(fast[1][name], ref[1][name], rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_shared_prompt_rows_equal_the_plain_prompt(padding, rng, monkeypatch):
    """The prompt's rows computed once for the batch give what prepending them to every row gives:
    hidden states (also the prompt's own, keep_virtual) and the prompt's gradient."""
    model = tiny_llama(rng, np.float64, bias=True)
    adapter = PromptTuning(rng.standard_normal((4, 32)))
    adapter.prompt = adapter.prompt.astype(np.float64)
    ids = rng.integers(0, 50, (3, 7))
    mask = np.ones((3, 7), bool)
    if padding == "left":
        mask[1, :3] = mask[2, :6] = False
    elif padding == "right":
        mask[1, 4:] = mask[2, 1:] = False
    for keep_virtual, T in ((False, 7), (True, 11)):
        w = rng.standard_normal((3, T, 32))
        results = []
        for shared in (True, False):
            monkeypatch.setattr(Llama, "share_prompt_rows", shared)
            hidden, cache = model.forward(ids, mask, adapter=adapter, keep_cache=True, keep_virtual=keep_virtual)
            results.append((hidden, model.backward(w, cache), cache.ctx.packed is not None))
        (h1, g1, took_shared), (h2, g2, took_plain) = results
        assert took_shared and not took_plain and h1.shape == h2.shape == (3, T, 32)
        np.testing.assert_allclose(h1, h2, rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(g1["prompt"], g2["prompt"], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(g1["inputs_embeds"], g2["inputs_embeds"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("split", [(3, 0), (0, 3), (1, 2)])
def test_shared_prompt_rows_split_over_processes(split, rng):
    """The model's backward with prompt_sum: two "processes" (threads here, summing through a
    barrier) that hold parts of one batch, one of them possibly none (B = 0), get the whole batch's
    prompt gradient, bitwise what one process computes. The model's own calls decide when to sum;
    the caller only passes the function."""
    import threading

    model = tiny_llama(rng, bias=True)
    adapter = PromptTuning(rng.standard_normal((4, 32)).astype(np.float32))
    ids = rng.integers(0, 50, (3, 7))
    w = rng.standard_normal((3, 7, 32)).astype(np.float32)
    hidden, cache = model.forward(ids, adapter=adapter, keep_cache=True)
    whole = model.backward(w, cache)["prompt"]
    barrier, parts, sums, calls = threading.Barrier(2), [None, None], [], [0, 0]

    def worker(rank, rows):
        def prompt_sum(x):
            calls[rank] += 1
            parts[rank] = x
            barrier.wait()
            if rank == 0:
                sums.append(parts[0] + parts[1])
            barrier.wait()
            return sums[-1]

        if rows.stop > rows.start:
            _, c = model.forward(ids[rows], adapter=adapter, keep_cache=True)
            grads = model.backward(w[rows], c, prompt_sum=prompt_sum)
        else:
            empty = np.zeros((0, 1, 32), np.float32)
            _, c = model.forward(None, inputs_embeds=empty, adapter=adapter, keep_cache=True)
            grads = model.backward(empty, c, prompt_sum=prompt_sum)
        results[rank] = grads["prompt"]

    results = [None, None]
    a = split[0]
    threads = [threading.Thread(target=worker, args=(rank, rows)) for rank, rows in enumerate((slice(0, a), slice(a, 3)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert calls[0] == calls[1] == 1 + model.config.num_layers
    assert np.array_equal(results[0], results[1])  # the same on every process...
    assert np.array_equal(results[0], whole)  # ...and the one-process bits


def test_model_inputs_are_checked_and_converted(rng):
    model = tiny_llama(rng)
    ids = rng.integers(0, 50, (2, 5))
    emb = model.embed[ids]
    want = model.forward(None, inputs_embeds=emb)
    got = model.forward(None, inputs_embeds=emb.astype(np.float64)[:, ::1])  # converted to the model's dtype
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    adapter = PromptTuning(rng.standard_normal((3, 32)).astype(np.float32))
    for bad, err, msg in [(emb[0], ValueError, r"inputs_embeds: expected shape \[B, T, 32\] with B, T >= 1, got \(5, 32\)"),
                          (emb[..., :8], ValueError, r"got \(2, 5, 8\)"),
                          (emb.tolist(), TypeError, "inputs_embeds: expected a numpy.ndarray, got list"),
                          (ids[..., None].repeat(32, -1), TypeError, "inputs_embeds: expected a float array")]:
        with pytest.raises(err, match=msg):
            model.forward(None, inputs_embeds=bad, adapter=adapter)
    hidden, cache = model.forward(ids, adapter=adapter, keep_cache=True)
    with pytest.raises(ValueError, match=r"dhidden: expected shape \[B, T, 32\]"):
        model.backward(hidden[0], cache)
    with pytest.raises(ValueError, match=r"dhidden: expected shape \[2, 5, C\] \(or \[2, 8, C\] after keep_virtual\)"):
        model.backward(hidden[:, :4], cache)


def test_a_partial_set_of_attention_biases_counts_the_missing_ones_as_zero(rng):
    model = tiny_llama(rng, np.float64, bias=True)
    layers = [dict(w) for w in model.layers]
    for w in layers:
        for name in ("qkv", "qkv_bias", "gate_up"):
            del w[name]
        w["k_bias"] = None  # as a loader leaves a bias the checkpoint lacks
    partial = Llama(model.config, model.embed, layers, model.final_norm)
    for w in layers:
        w["k_bias"] = np.zeros(16)
    zero = Llama(model.config, model.embed, [dict(w) for w in layers], model.final_norm)
    ids = rng.integers(0, 50, (2, 5))
    np.testing.assert_array_equal(partial.forward(ids), zero.forward(ids))


def test_cross_entropy_rejects_labels_out_of_range():
    for backend in ("cpp", "numpy"):
        with ops.use_backend(backend), pytest.raises(ValueError, match=r"labels: expected 2 values in \[0, 4\)"):
            ops.softmax_cross_entropy(np.zeros((2, 4), np.float32), np.array([0, -1]), 1.0)
