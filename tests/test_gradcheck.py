"""Float64 central finite differences of both ops through the C++ core (and the reference)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_problem

from softprompt import ops


def numeric_grad(f, x, eps=1e-6):
    """Central differences of the scalar f() with respect to every element of x (changed in place)."""
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + eps
        up = f()
        x[idx] = old - eps
        down = f()
        x[idx] = old
        g[idx] = (up - down) / (2 * eps)
    return g


@pytest.mark.parametrize("backend", ["cpp", "numpy"])
@pytest.mark.parametrize(
    "shape,causal,per_row,mask",
    [
        ((2, 3, 4, 2, 1, 3, 2), False, False, None),
        ((2, 3, 4, 2, 1, 3, 2), True, False, "left"),
        ((2, 4, 3, 4, 2, 5, 3), True, True, "right"),
        ((1, 2, 5, 2, 2, 3, 0), False, False, "random"),
        ((2, 3, 3, 2, 2, 2, 1), False, False, "empty"),
    ],
)
def test_prefix_attention_gradients(rng, kernel, backend, shape, causal, per_row, mask):
    q, k, v, pk, pv, m = make_problem(rng, *shape, per_row=per_row, mask=mask)
    w = rng.standard_normal(q.shape)  # loss = sum(w * out)
    kwargs = dict(causal=causal, key_padding_mask=m, scale=0.8, backend=backend)

    def loss():
        return float(np.sum(w * ops.prefix_attention_forward(q, k, v, pk, pv, **kwargs)[0]))

    out, lse = ops.prefix_attention_forward(q, k, v, pk, pv, **kwargs)
    grads = ops.prefix_attention_backward(w, q, k, v, pk, pv, out, lse, **kwargs)
    for name, x, g in zip(("q", "k", "v", "prefix_k", "prefix_v"), (q, k, v, pk, pv), grads):
        np.testing.assert_allclose(g, numeric_grad(loss, x), rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("backend", ["cpp", "numpy"])
@pytest.mark.parametrize("per_row", [False, True])
def test_prepend_gradients(rng, backend, per_row):
    B, P, T, D = 3, 2, 4, 5
    prompt = rng.standard_normal((B, P, D) if per_row else (P, D))
    x = rng.standard_normal((B, T, D))
    w = rng.standard_normal((B, P + T, D))

    def loss():
        return float(np.sum(w * ops.prepend_forward(prompt, x, backend=backend) ** 2))

    y = ops.prepend_forward(prompt, x, backend=backend)
    dprompt, dx = ops.prepend_backward(2 * w * y, P, shared=not per_row, backend=backend)
    np.testing.assert_allclose(dprompt, numeric_grad(loss, prompt), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-6, atol=1e-8)
