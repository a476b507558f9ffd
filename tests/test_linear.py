"""Frozen linear layers in the C++ core (cpp/linear.cpp, cpp/quant.cpp) and quantized weights
(models/quant.py): dequantization bitwise against gguf's own dequantizer, the GEMM against a
float64 NumPy product, row and thread invariance, bad input, and a tiny quantized Llama against
the same model expanded to float64."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

import softprompt
from softprompt import PrefixTuning, PromptTuning, _core, losses, ops, reference
from softprompt.models import layers as nn
from softprompt.models.quant import FORMATS, QuantizedWeight

needs_gemm = pytest.mark.skipif(not hasattr(_core, "linear_forward"),
                                reason="the C++ GEMM needs a GCC/Clang build (vector extensions)")
GGUF_TYPE = {fmt: gguf.GGMLQuantizationType[fmt.upper()] for fmt in FORMATS}
# Byte offsets of each block's fp16 scales: d (and m / dmin), the rest of a block is random bits.
SCALES = {"q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q8_0": (0,), "iq4_nl": (0,),
          "q2_k": (80, 82), "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}
# The largest d (and the range of m / dmin) that keeps the weights within about +-0.3, as trained
# weights are: the k-quants multiply d by 6-bit (Q6_K: 8-bit) sub-block scales.
D_MAX = {"q2_k": 0.004, "q3_k": 0.002, "q4_k": 3e-4, "q5_k": 1.5e-4, "q6_k": 6e-5, "iq4_nl": 0.002}
M_RANGE = {"q2_k": (0.0, 0.004), "q4_k": (0.0, 0.004), "q5_k": (0.0, 0.004)}


def cols_for(fmt, n=3):
    """A row length of n blocks (k-quants: n 256-weight super-blocks; 16-bit: n * 32 weights)."""
    return n * max(32, FORMATS[fmt][1])


def random_blocks(rng, rows, cols, fmt, special=False):
    """Random blocks of `fmt` with sane scales (and, with special, zero/subnormal/negative ones):
    uint8 [rows, row bytes]."""
    _, per_block, size = FORMATS[fmt]
    if per_block == 1:  # 16-bit floats, a few of them special
        v = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        if special:
            v.flat[::11] = 0.0
            v.flat[1::11] = 3e-6 if fmt == "f16" else 1e-39
        bits = v.astype(np.float16).view(np.uint16) if fmt == "f16" else (v.view(np.uint32) >> 16).astype(np.uint16)
        return bits.view(np.uint8).reshape(rows, 2 * cols)
    nb = cols // per_block
    b = rng.integers(0, 256, (rows, nb, size), dtype=np.uint8)
    for n, off in enumerate(SCALES[fmt]):
        hi = D_MAX.get(fmt, 0.05)
        d = rng.uniform(hi / 50, hi, (rows, nb)).astype(np.float16) if n == 0 else \
            rng.uniform(*M_RANGE.get(fmt, (-0.4, 0.1)), (rows, nb)).astype(np.float16)
        if special and n == 0:
            d.flat[::7] = np.float16(3e-6)  # subnormal half
            d.flat[1::7] = 0
            d.flat[2::7] *= -1
        b[..., off:off + 2] = d.view(np.uint8).reshape(rows, nb, 2)
    return b.reshape(rows, nb * size)


def quantized(rng, rows, cols, fmt="q4_1"):
    return QuantizedWeight(random_blocks(rng, rows, cols, fmt), fmt, cols)


# --------------------------------------------------------------------------- dequantization
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_dequantize_is_bitwise_gguf(fmt, rng):
    cols = cols_for(fmt)
    blocks = random_blocks(rng, 37, cols, fmt, special=True)
    ref = np.asarray(gguf.quants.dequantize(blocks, GGUF_TYPE[fmt]), dtype=np.float32).reshape(37, cols)
    for ours in (_core.dequantize(blocks, FORMATS[fmt][0], cols), reference.dequantize(blocks, fmt, cols)):
        assert ours.dtype == np.float32 and ours.shape == (37, cols)
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    w = QuantizedWeight(blocks, fmt, cols)  # a gather dequantizes only its rows
    np.testing.assert_array_equal(w[np.array([[3, 0], [36, 3]])], ref[[[3, 0], [36, 3]]])
    for part in (w[1:4], w[5:6]):  # the GEMM's partial rows: any 32-weight-aligned window
        assert np.array_equal(np.asarray(part).view(np.uint32), ref[1:4].view(np.uint32) if part.shape[0] == 3
                              else ref[5:6].view(np.uint32))


def test_quantized_weight_views_stacking_and_values(rng):
    w = quantized(rng, 10, 64)
    full = np.asarray(w)
    assert full.shape == (10, 64) and full.dtype == np.float32 and w.size == 640
    part = w[2:5]
    assert part.base is w and part.shape == (3, 64) and np.shares_memory(part.blocks, w.blocks)
    np.testing.assert_array_equal(np.asarray(part), full[2:5])
    np.testing.assert_array_equal(np.asarray(w.take_rows([3, 0, 9])), full[[3, 0, 9]])
    both = QuantizedWeight.concatenate([w, w[:4]])
    np.testing.assert_array_equal(np.asarray(both), np.concatenate([full, full[:4]]))
    assert w.astype(np.float64).dtype == np.float64 and w.astype(np.float32, copy=False).dtype == np.float32
    assert part[1:2].base is w  # a view of a view views the original, as in NumPy
    with pytest.raises(ValueError, match="copy"):
        np.asarray(w, copy=False)
    with ops.use_backend("numpy"):
        np.testing.assert_array_equal(w.dequantize(), full)


def test_quantized_weight_rejects_bad_input(rng):
    with pytest.raises(ValueError, match="format"):
        QuantizedWeight(np.zeros((2, 20), np.uint8), "q7_x", 32)
    with pytest.raises(ValueError, match="cols: expected a positive multiple of 256 for q4_k"):
        QuantizedWeight(np.zeros((2, 144), np.uint8), "q4_k", 96)
    with pytest.raises(ValueError, match="cols"):
        QuantizedWeight(np.zeros((2, 20), np.uint8), "q4_1", 48)
    with pytest.raises(ValueError, match=r"blocks: expected uint8 \[rows, 40\]"):
        QuantizedWeight(np.zeros((2, 20), np.uint8), "q4_1", 64)
    with pytest.raises(TypeError, match="row slices"):
        quantized(rng, 4, 32)[::2]
    with pytest.raises(TypeError, match="integer row ids"):
        quantized(rng, 4, 32)[np.array([0.5])]
    with pytest.raises(IndexError, match=r"rows: ids must be in \[0, 4\)"):
        quantized(rng, 4, 32)[np.array([4])]
    with pytest.raises(ValueError, match="one format"):
        QuantizedWeight.concatenate([quantized(rng, 2, 32), quantized(rng, 2, 32, "q8_0")])


# --------------------------------------------------------------------------- the GEMM
def _reference(x, w, b=None):
    y = x.astype(np.float64) @ np.asarray(w).astype(np.float64).T
    return y if b is None else y + b


@needs_gemm
@pytest.mark.parametrize("fmt,M,rows,cols", [
    (fmt, *shape) for fmt in ("f32", "q4_1", "q8_0")
    for shape in [(1, 1, 32), (5, 17, 64), (7, 64, 96), (13, 65, 128), (100, 130, 576), (3, 8, 3200), (9, 3200, 64)]
] + [(fmt, *shape) for fmt in sorted(set(FORMATS) - {"q4_1", "q8_0"})
     for shape in [(5, 17, cols_for(fmt, 1)), (13, 65, cols_for(fmt, 2)), (3, 8, cols_for(fmt, 13))]]
   + [("f32", 6, 70, 33), ("f32", 2, 3, 1), ("f16", 6, 70, 33), ("bf16", 2, 3, 1)])  # 16-bit: any length
def test_linear_matches_float64(fmt, M, rows, cols, rng):
    w = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.1) if fmt == "f32" else quantized(rng, rows, cols, fmt)
    x = rng.standard_normal((M, cols), dtype=np.float32)
    b = rng.standard_normal(rows, dtype=np.float32)
    dy = rng.standard_normal((M, rows), dtype=np.float32)
    wf = np.asarray(w).astype(np.float64)
    tol = dict(rtol=1e-4, atol=2e-5 * np.sqrt(max(rows, cols)))
    with ops.use_backend("cpp"):
        y, yb, dx = nn.linear(x, w), nn.linear(x, w, b), nn.linear_backward(dy, w)
    assert y.dtype == dx.dtype == np.float32 and y.shape == (M, rows) and dx.shape == (M, cols)
    np.testing.assert_allclose(y, _reference(x, wf), **tol)
    np.testing.assert_allclose(yb, _reference(x, wf, b), **tol)
    np.testing.assert_allclose(dx, dy.astype(np.float64) @ wf, **tol)
    with ops.use_backend("numpy"):  # the twin takes the same weights
        np.testing.assert_allclose(nn.linear(x, w, b), yb, **tol)
        np.testing.assert_allclose(nn.linear_backward(dy, w), dx, **tol)


@needs_gemm
@pytest.mark.parametrize("fmt", ["f32", "q4_1"])
def test_linear_with_no_rows(fmt, rng):
    w = rng.standard_normal((70, 64), dtype=np.float32) if fmt == "f32" else quantized(rng, 70, 64)
    assert nn.linear(np.zeros((0, 64), np.float32), w).shape == (0, 70)
    assert nn.linear_backward(np.zeros((0, 70), np.float32), w).shape == (0, 64)
    assert nn.linear(np.zeros((2, 0, 64), np.float32), w).shape == (2, 0, 70)


@needs_gemm
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("rows,cols", [(130, 768), (40, 3328), (3200, 256)])
def test_quantized_gemm_is_bitwise_the_gemm_of_its_values(fmt, rows, cols, rng):
    """Dequantizing into the panels changes nothing: the same bits as the float32 GEMM on the
    dequantized weight, forward and backward (K beyond one 3072 block in both directions)."""
    w = quantized(rng, rows, cols, fmt)
    wf = np.asarray(w)
    x = rng.standard_normal((37, cols), dtype=np.float32)
    dy = rng.standard_normal((37, rows), dtype=np.float32)
    assert np.array_equal(nn.linear(x, w), nn.linear(x, wf))
    assert np.array_equal(nn.linear_backward(dy, w), nn.linear_backward(dy, wf))


@needs_gemm
@pytest.mark.parametrize("fmt,cols", [("f32", 576), ("f32", 33), ("q4_1", 576), ("q8_0", 96)])
def test_decoding_few_rows_path_matches_float64(fmt, cols, rng):
    """Under nn.decoding() (generation), up to FEW_ROWS rows go through one dot product per output
    instead of the packed GEMM: the same values to float32 rounding; more rows keep the GEMM."""
    rows = 70
    w = rng.standard_normal((rows, cols), dtype=np.float32) if fmt == "f32" else quantized(rng, rows, cols, fmt)
    b = rng.standard_normal(rows, dtype=np.float32)
    wf = np.asarray(w).astype(np.float64)
    for M in (1, 3, nn.FEW_ROWS, nn.FEW_ROWS + 1):
        x = rng.standard_normal((M, cols), dtype=np.float32)
        with nn.decoding():
            y = nn.linear(x, w, b)
        np.testing.assert_allclose(y, _reference(x, wf, b), rtol=1e-4, atol=1e-4)
        if M > nn.FEW_ROWS:
            assert np.array_equal(y, nn.linear(x, w, b))


@needs_gemm
@pytest.mark.parametrize("fmt,cols", [("f32", 576), ("f32", 37), ("q4_1", 576)])
def test_decoding_few_rows_path_row_bits_do_not_depend_on_the_batch(fmt, cols, rng):
    """Generation at batch 1 and batch 8 gives a sequence the same logits: on the few-rows path each
    row's dot products are summed alike whether it comes alone or with others (the compiler fused
    a*b+c for some row counts and not for others until the FMAs were explicit)."""
    rows = 40
    w = rng.standard_normal((rows, cols), dtype=np.float32) if fmt == "f32" else quantized(rng, rows, cols, fmt)
    b = rng.standard_normal(rows, dtype=np.float32)
    x = rng.standard_normal((nn.FEW_ROWS, cols), dtype=np.float32)
    with nn.decoding():
        together = nn.linear(x, w, b)
        for M in range(1, nn.FEW_ROWS + 1):
            assert np.array_equal(nn.linear(x[:M], w, b), together[:M]), M
        alone = np.concatenate([nn.linear(x[m:m + 1], w, b) for m in range(nn.FEW_ROWS)])
    assert np.array_equal(alone, together)


@needs_gemm
def test_linear_edge_cases(rng):
    x = rng.standard_normal((5, 64), dtype=np.float32)
    b = rng.standard_normal(70)  # float64 and strided biases are taken (converted) as NumPy's were
    w = rng.standard_normal((70, 64), dtype=np.float32)
    np.testing.assert_allclose(nn.linear(x, w, b), x @ w.T + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nn.linear(x, w, b[::-1]), x @ w.T + b[::-1], rtol=1e-5, atol=1e-5)
    # a weight without rows: the backward's sum is empty, so zeros (not uninitialized memory)
    dx = _core.linear_backward(np.zeros((5, 0), np.float32), np.zeros((0, 70), np.float32), 0, 70)
    assert dx.shape == (5, 70) and not dx.any()
    assert _core.linear_forward(x, np.zeros((0, 64), np.float32), 0, 64).shape == (5, 0)


@needs_gemm
@pytest.mark.parametrize("fmt", ["f32", "q4_1"])
@pytest.mark.parametrize("rows,cols", [(200, 576), (70, 3200)])
def test_linear_rows_do_not_depend_on_their_batch_or_the_threads(fmt, rows, cols, rng):
    """Each row is summed in one fixed order: a shard of rows gets bitwise the rows of the whole
    batch (what makes MPI data parallelism exact), on any number of threads."""
    w = rng.standard_normal((rows, cols), dtype=np.float32) if fmt == "f32" else quantized(rng, rows, cols)
    x = rng.standard_normal((61, cols), dtype=np.float32)
    dy = rng.standard_normal((61, rows), dtype=np.float32)
    y, dx = nn.linear(x, w), nn.linear_backward(dy, w)
    for part in (slice(0, 1), slice(5, 12), slice(13, 61)):
        assert np.array_equal(nn.linear(x[part], w), y[part])
        assert np.array_equal(nn.linear_backward(dy[part], w), dx[part])
    threads = softprompt.get_num_threads()
    try:
        for n in (1, 2, 3):
            softprompt.set_num_threads(n)
            assert np.array_equal(nn.linear(x, w), y) and np.array_equal(nn.linear_backward(dy, w), dx)
    finally:
        softprompt.set_num_threads(threads)


@needs_gemm
def test_core_linear_rejects_bad_input(rng):
    w = quantized(rng, 8, 64)
    x = rng.standard_normal((3, 64), dtype=np.float32)
    with pytest.raises(TypeError):
        _core.linear_forward(x.astype(np.float64), w.blocks, 1, 64)  # no silent cast
    with pytest.raises(ValueError, match=r"x: expected shape \(3, 64\), got \(3, 32\)"):
        _core.linear_forward(x[:, :32].copy(), w.blocks, 1, 64)
    with pytest.raises(ValueError, match=r"weight: expected shape \(8, 60\), got \(8, 40\)"):
        _core.linear_forward(x, w.blocks, 1, 32 * 3)
    with pytest.raises(ValueError, match="format"):
        _core.linear_forward(x, w.blocks, 99, 64)
    with pytest.raises(TypeError, match="weight: expected float32"):
        _core.linear_forward(x, w.blocks, 0, 64)
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.linear_forward(x, np.zeros((64, 8), np.float32).T, 0, 64)
    with pytest.raises(ValueError, match=r"bias: expected shape \(8,\)"):
        _core.linear_forward(x, w.blocks, 1, 64, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"dy: expected shape \(3, 8\)"):
        _core.linear_backward(np.zeros((3, 9), np.float32), w.blocks, 1, 64)
    with pytest.raises(ValueError, match="cols"):
        _core.dequantize(w.blocks, 1, 40)


# --------------------------------------------------------------------------- a quantized model
def _quantize_layers(model, rng):
    """The tiny model with every linear weight replaced by random Q4_1 blocks (re-stacked as the
    loader does) -> (quantized model, the same values as a float64 model)."""
    from softprompt.models.llama import _fuse

    layers = []
    for w in model.layers:
        w = {k: v for k, v in w.items() if k not in ("qkv", "gate_up", "qkv_bias")}
        for name in ("q", "k", "v", "o", "gate", "up", "down"):
            w[name] = quantized(rng, *w[name].shape)
        layers.append(_fuse(w))
    model.layers = layers
    return model, model.astype(np.float64)


@needs_gemm
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_quantized_model_matches_its_float64_twin(kind, tiny, rng):
    model = tiny[1]  # a Llama with hidden 64, intermediate 128: whole 32-weight blocks
    qmodel, ref = _quantize_layers(_copy(model), rng)
    assert isinstance(qmodel.layers[0]["qkv"], QuantizedWeight) and qmodel.layers[0]["q"].base is qmodel.layers[0]["qkv"]
    assert qmodel.num_parameters() == model.num_parameters()
    C, L = model.config.hidden_size, model.config.num_layers
    Hkv, D = model.config.num_kv_heads, model.config.head_dim
    adapter = (PromptTuning(rng.standard_normal((4, C)).astype(np.float32)) if kind == "prompt"
               else PrefixTuning(rng.standard_normal((L, 2, 4, Hkv, D)).astype(np.float32)))
    ids = rng.integers(0, model.config.vocab_size, (3, 9))
    targets = rng.integers(0, model.config.vocab_size, (3, 9))
    mask = np.ones((3, 9), bool)

    def step(m, a):
        h, cache = m.forward(ids, adapter=a, keep_cache=True)
        loss, dh = losses.lm_loss(m, h, targets, mask)
        return loss, h, a.gradients(m.backward(dh, cache))

    loss, h, g = step(qmodel, adapter)
    adapter.__dict__[kind] = adapter.__dict__[kind].astype(np.float64)
    loss64, h64, g64 = step(ref, adapter)
    assert abs(loss - loss64) < 1e-4 * abs(loss64)
    np.testing.assert_allclose(h, h64, rtol=1e-3, atol=1e-3)
    for name in g64:
        np.testing.assert_allclose(g[name], g64[name], rtol=2e-3, atol=1e-5 * np.abs(g64[name]).max(), err_msg=name)


def _copy(model):
    new = object.__new__(type(model))
    new.__dict__.update(model.__dict__)
    return new


def test_embedding_std_of_a_quantized_table_is_the_std_of_its_values(rng):
    """PromptTuning's random init reads the table's standard deviation: a quantized table gives the
    std of its dequantized values without expanding it whole (chunks of rows)."""
    from softprompt.adapters import embedding_std

    w = quantized(rng, 1000, 256, "q6_k")
    assert embedding_std(w, rows=64) == pytest.approx(float(np.std(np.asarray(w).astype(np.float64))), rel=1e-12)
    f = np.asarray(w)
    assert embedding_std(f) == float(np.std(f))
