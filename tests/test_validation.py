"""Bad input gets a TypeError/ValueError naming the argument; hypothesis fuzzes valid and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_problem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softprompt import _core, ops


def good(rng, dtype=np.float32):
    q, k, v, pk, pv, m = make_problem(rng, 2, 3, 5, 4, 2, 8, 2, dtype=dtype, mask="right")
    return dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv, key_padding_mask=m)


def forward(a, **kw):
    a = dict(a)
    return ops.prefix_attention_forward(
        a.pop("q"), a.pop("k"), a.pop("v"), a.pop("prefix_k"), a.pop("prefix_v"), **a, **kw
    )


def backward(a, dout=None, out=None, lse=None, **kw):
    out0, lse0 = forward(a)
    a = dict(a)
    dout = np.ones_like(out0) if dout is None else dout
    return ops.prefix_attention_backward(
        dout, a.pop("q"), a.pop("k"), a.pop("v"), a.pop("prefix_k"), a.pop("prefix_v"),
        out0 if out is None else out, lse0 if lse is None else lse, **a, **kw,
    )


def other_float(a):
    return np.float64 if a["q"].dtype == np.float32 else np.float32


# Each case: (argument to replace, a function new_value(inputs), error type, message pieces).
BAD_FORWARD = [
    ("q", lambda a: a["q"].tolist(), TypeError, ["q: expected a numpy.ndarray, got list"]),
    ("q", lambda a: a["q"].astype(np.int64), TypeError, ["q: expected dtype float32 or float64, got int64"]),
    ("q", lambda a: a["q"].astype(np.float16), TypeError, ["q: expected dtype float32 or float64, got float16"]),
    ("k", lambda a: a["k"].astype(other_float(a)), TypeError, ["k: dtype float64 does not match q's dtype float32"]),
    ("prefix_v", lambda a: a["prefix_v"].astype(other_float(a)), TypeError, ["prefix_v: dtype float64"]),
    ("q", lambda a: a["q"][0], ValueError, ["q: expected shape [B, T, H, D], got (3, 4, 8)"]),
    ("k", lambda a: a["k"][:1], ValueError, ["k: expected shape [B=2, S, Hkv, D=8], got (1, 5, 2, 8)"]),
    ("k", lambda a: a["k"][..., :5], ValueError, ["k: expected shape [B=2, S, Hkv, D=8], got (2, 5, 2, 5)"]),
    ("v", lambda a: a["v"][:, :4], ValueError, ["v: expected shape [B=2, S=5, Hkv=2, D=8], got (2, 4, 2, 8)"]),
    ("k", lambda a: np.concatenate([a["k"], a["k"][:, :, :1]], axis=2), ValueError, ["Hkv=3 must divide", "H=4"]),
    ("prefix_k", lambda a: a["prefix_k"][:, :1], ValueError, ["prefix_k: expected shape [P, Hkv=2, D=8], got (2, 1, 8)"]),
    ("prefix_v", lambda a: a["prefix_v"][:1], ValueError, ["prefix_v: expected shape [P=2, H=2, D=8], got (1, 2, 8)"]),
    ("prefix_k", lambda a: np.stack([a["prefix_k"]] * 3), ValueError, ["prefix_k: expected shape [B=2, P, Hkv=2, D=8], got (3, 2, 2, 8)"]),
    ("prefix_k", lambda a: a["prefix_k"][0, 0], ValueError, ["prefix_k: expected shape [P, Hkv=2, D=8], got (8,)"]),
    ("q", lambda a: a["q"][:, :0], ValueError, ["q: dimension T must be at least 1, got shape (2, 0, 4, 8)"]),
    ("k", lambda a: a["k"][:, :0], ValueError, ["k: dimension S must be at least 1"]),
    ("key_padding_mask", lambda a: a["key_padding_mask"].astype(np.int32), TypeError, ["key_padding_mask: expected dtype bool", "int32"]),
    ("key_padding_mask", lambda a: a["key_padding_mask"][:, :4], ValueError, ["key_padding_mask: expected shape [B=2, S=5], got (2, 4)"]),
    ("key_padding_mask", lambda a: a["key_padding_mask"].tolist(), TypeError, ["key_padding_mask: expected a numpy.ndarray or None, got list"]),
    ("causal", lambda a: "yes", TypeError, ["causal: expected a bool, got str"]),
    ("scale", lambda a: "0.5", TypeError, ["scale: expected a real number or None, got str"]),
    ("scale", lambda a: float("nan"), ValueError, ["scale: expected a finite number, got nan"]),
    ("backend", lambda a: "cuda", ValueError, ["backend: expected one of ('cpp', 'numpy'), got 'cuda'"]),
]


@pytest.mark.parametrize("name,bad,exc,pieces", BAD_FORWARD, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_FORWARD)])
@pytest.mark.parametrize("op", ["forward", "backward"])
def test_bad_attention_input(rng, name, bad, exc, pieces, op):
    a = good(rng)
    a[name] = bad(a)
    with pytest.raises(exc) as info:
        if op == "forward":
            forward(a)
        else:  # build dout/out/lse from the good inputs so only `name` is bad
            g = good(rng)
            out, lse = forward(g)
            a2 = dict(a)
            ops.prefix_attention_backward(
                np.ones_like(out), a2.pop("q"), a2.pop("k"), a2.pop("v"), a2.pop("prefix_k"),
                a2.pop("prefix_v"), out, lse, **a2,
            )
    for piece in pieces:
        assert piece in str(info.value)


@pytest.mark.parametrize(
    "which,bad,exc,piece",
    [
        ("lse", lambda lse: lse[:, :, :2], ValueError, "lse: expected shape [B=2, H=4, T=3], got (2, 4, 2)"),
        ("lse", lambda lse: lse.astype(np.float64), TypeError, "lse: dtype float64 does not match q's dtype float32"),
        ("out", lambda out: out[..., :4], ValueError, "out: expected shape [B=2, T=3, H=4, D=8], got (2, 3, 4, 4)"),
        ("dout", lambda out: out[0], ValueError, "dout: expected shape [B=2, T=3, H=4, D=8], got (3, 4, 8)"),
        ("dout", lambda out: out.astype(np.int8), TypeError, "dout: expected dtype float32 or float64, got int8"),
    ],
)
def test_bad_backward_only_input(rng, which, bad, exc, piece):
    a = good(rng)
    out, lse = forward(a)
    kwargs = {"dout": np.ones_like(out), "out": out, "lse": lse}
    kwargs[which] = bad(kwargs[which] if which != "dout" else out)
    with pytest.raises(exc) as info:
        backward(a, **kwargs)
    assert piece in str(info.value)


@pytest.mark.parametrize(
    "call,exc,piece",
    [
        (lambda p, x: ops.prepend_forward(p, x[0]), ValueError, "x: expected shape [B, T, D], got (4, 6)"),
        (lambda p, x: ops.prepend_forward(p[:, :5], x), ValueError, "prompt: expected shape [P, D=6], got (3, 5)"),
        (lambda p, x: ops.prepend_forward(np.stack([p] * 3), x), ValueError, "prompt: expected shape [B=2, P, D=6], got (3, 3, 6)"),
        (lambda p, x: ops.prepend_forward(p.astype(np.float64), x), TypeError, "prompt: dtype float64 does not match"),
        (lambda p, x: ops.prepend_forward(p, x.astype(np.int32)), TypeError, "x: expected dtype float32 or float64, got int32"),
        (lambda p, x: ops.prepend_forward(p, x[:, :0]), ValueError, "x: dimension T must be at least 1"),
        (lambda p, x: ops.prepend_backward(x, -1), ValueError, "prompt_length: expected 0 <= prompt_length < 4 (dy's sequence length), got -1"),
        (lambda p, x: ops.prepend_backward(x, 4), ValueError, "got 4"),
        (lambda p, x: ops.prepend_backward(x, 1.5), TypeError, "prompt_length: expected an int, got float"),
        (lambda p, x: ops.prepend_backward(x, True), TypeError, "prompt_length: expected an int, got bool"),
        (lambda p, x: ops.prepend_backward(x, 1, shared=None), TypeError, "shared: expected a bool, got NoneType"),
        (lambda p, x: ops.prepend_backward(x[0], 1), ValueError, "dy: expected shape [B, P+T, D], got (4, 6)"),
    ],
)
def test_bad_prepend_input(rng, call, exc, piece):
    prompt = rng.standard_normal((3, 6)).astype(np.float32)
    x = rng.standard_normal((2, 4, 6)).astype(np.float32)
    with pytest.raises(exc) as info:
        call(prompt, x)
    assert piece in str(info.value)


def test_core_called_directly_raises_instead_of_crashing(rng):
    a = good(rng)
    q, k, v, pk, pv, m = a["q"], a["k"], a["v"], a["prefix_k"], a["prefix_v"], a["key_padding_mask"]
    with pytest.raises(ValueError, match=r"v: expected shape \(2, 5, 2, 8\), got \(2, 4, 2, 8\)"):
        _core.prefix_attention_forward(q, k, v[:, :4].copy(), pk, pv, False, m, 1.0)
    with pytest.raises(ValueError, match="must divide"):
        _core.prefix_attention_forward(q[:, :, :3].copy(), k, v, pk, pv, False, m, 1.0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        _core.prefix_attention_forward(q, k, v, pk, pv, False, m[:, :2].copy(), 1.0)
    with pytest.raises(TypeError):  # no silent cast of other dtypes
        _core.prefix_attention_forward(q.astype(np.int32), k, v, pk, pv, False, m, 1.0)
    with pytest.raises(TypeError):  # no silent copy of views
        _core.prefix_attention_forward(q[:, ::-1], k, v, pk, pv, False, m, 1.0)
    out, lse = _core.prefix_attention_forward(q, k, v, pk, pv, False, m, 1.0)
    with pytest.raises(ValueError, match="lse"):
        _core.prefix_attention_backward(out, q, k, v, pk, pv, out, lse[:, :1].copy(), False, m, 1.0)
    with pytest.raises(ValueError, match="prompt_length"):
        _core.prepend_backward(q[0], 9, True)


# --------------------------------------------------------------------------- hypothesis
@st.composite
def problems(draw):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 12))
    S = draw(st.integers(1, 12))
    Hkv = draw(st.integers(1, 3))
    H = Hkv * draw(st.integers(1, 3))
    D = draw(st.integers(1, 19))
    P = draw(st.integers(0, 5))
    return (B, T, S, H, Hkv, D, P), draw(st.booleans()), draw(st.booleans()), draw(
        st.sampled_from([None, "right", "left", "empty", "random"])
    ), draw(st.integers(0, 2**32 - 1))


# The kernel fixture holds for every example of the test, which is what we want here.
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(problem=problems())
def test_fuzz_valid_shapes_match_reference(kernel, problem):
    check_against_reference(*problem)


def check_against_reference(shape, causal, per_row, mask, seed):
    rng = np.random.default_rng(seed)
    q, k, v, pk, pv, m = make_problem(rng, *shape, per_row=per_row, mask=mask)
    dout = rng.standard_normal(q.shape)
    results = []
    for backend in ("cpp", "numpy"):
        kw = dict(causal=causal, key_padding_mask=m, backend=backend)
        out, lse = ops.prefix_attention_forward(q, k, v, pk, pv, **kw)
        results.append((out, lse, *ops.prefix_attention_backward(dout, q, k, v, pk, pv, out, lse, **kw)))
    for got, want in zip(*results):
        assert got.shape == want.shape
        assert np.array_equal(np.isneginf(got), np.isneginf(want))
        fin = np.isfinite(want)
        np.testing.assert_allclose(got[fin], want[fin], rtol=1e-9, atol=1e-11)


@settings(max_examples=150, deadline=None)
@given(case=st.sampled_from(BAD_FORWARD), seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float64]))
def test_fuzz_bad_inputs_raise_the_documented_error(case, seed, dtype):
    name, bad, exc, pieces = case
    a = good(np.random.default_rng(seed), dtype)
    a[name] = bad(a)
    with pytest.raises(exc) as info:
        forward(a)
    assert str(info.value).startswith(name + ":") or name == "k" and "must divide" in str(info.value)
