"""The one door to the compiled core (``softprompt._core``): every kernel is called from here.

Public ops: prefix attention and the prompt prepend, forward and backward. Each validates its
input once, here, then runs on the C++ core (``backend="cpp"``, the default) or on its NumPy twin
in ``softprompt.reference`` (``backend="numpy"``), so the two can be compared anywhere. The
default backend is a per-thread setting: ``set_backend`` / ``get_backend`` / ``use_backend``.

The frozen model's kernels (RMSNorm, SwiGLU, RoPE, the fused softmax cross-entropy, the linear
layers' GEMM and GGUF dequantization) go through the same switch; their callers in
``softprompt.models`` and ``softprompt.losses`` pass arrays they built themselves, so only
``_core``'s own checks (bindings.cpp) guard them.

Input rules (the same for both backends):
- arrays are ``numpy.ndarray`` of float32 or float64, all of one dtype; outputs take that dtype.
- non-contiguous and negative-stride views are accepted: they are copied to C order first
  (``numpy.ascontiguousarray``), which costs one copy of that argument.
- every dimension must be at least 1, except the prefix/prompt length P, which may be 0.
- NaN or Inf in the inputs is not checked (that would cost a pass over memory) and never
  swallowed: one that a query sees reaches exactly the outputs and gradients that autograd through
  a plain softmax attention makes NaN. The score of a key hidden by a mask never counts, even if it
  is NaN or Inf; a NaN/Inf *value* row at a hidden position may still propagate (0 * Inf = NaN in
  the product: the NumPy twin always, the C++ kernels within the blocks they compute), so keep
  padded positions finite. A query that sees no key at all gets zeros (and
  lse = -inf), never NaN.
Bad input raises TypeError (wrong type or dtype) or ValueError (wrong shape or value) naming the
argument and the expected vs actual shape or dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import operator
import os

import numpy as np

from . import reference

try:
    from . import _core
except ImportError as exc:  # pragma: no cover - only in a broken install
    raise ImportError(
        "softprompt's compiled core (softprompt._core) is missing; reinstall with `pip install .`"
    ) from exc


def retain_freed_memory():
    """Asks glibc's malloc to keep freed memory for reuse instead of returning it to the system.

    Every kernel call returns new arrays (attention's out, lse, dq, dk, dv: megabytes each), and a
    training step allocates its activation cache (~15 MB per layer for SmolLM2 at 8 x 84 tokens)
    and frees it at the end. By default glibc hands those pages back, and the next call pays a page
    fault per 4 KiB to get them again (tests/test_memory.py counts them). With this, blocks
    under 32 MiB come from the heap and the heap is not trimmed, so each call reuses the last
    call's pages. The process's peak memory is unchanged (the calls needed it anyway);
    its memory is not returned between calls. Called when softprompt is imported; set
    SOFTPROMPT_RETAIN_MEMORY=0 before that to keep glibc's defaults. Does nothing off glibc."""
    if os.environ.get("SOFTPROMPT_RETAIN_MEMORY", "1") == "0":
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (TypeError: Windows' CDLL(None))
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


retain_freed_memory()

__all__ = [
    "prefix_attention_forward",
    "prefix_attention_backward",
    "prepend_forward",
    "prepend_backward",
    "set_backend",
    "get_backend",
    "use_backend",
    "rmsnorm_forward",
    "rmsnorm_backward",
    "swiglu_forward",
    "swiglu_backward",
    "rope_split",
    "rope_merge",
    "softmax_cross_entropy",
    "linear_forward",
    "linear_backward",
    "dequantize",
    "QUANT_FORMATS",
]

BACKENDS = ("cpp", "numpy")
# Per thread (and per asyncio task): a context variable, so one thread's use_backend("numpy")
# never changes the kernels another thread runs. A new thread starts on "cpp".
_backend = contextvars.ContextVar("softprompt_backend", default="cpp")


def set_backend(name: str) -> None:
    """Choose where ops run by default in this thread: "cpp" (the compiled core) or "numpy" (the
    reference)."""
    _backend.set(_check_backend(name))


def get_backend() -> str:
    """This thread's default backend."""
    return _backend.get()


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("numpy"): ...`` runs the ops inside on that backend (in this thread)."""
    token = _backend.set(_check_backend(name))
    try:
        yield
    finally:
        _backend.reset(token)


def _check_backend(name):
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


# --------------------------------------------------------------------------- validation
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _array(name, a, dtype=None):
    """Checks type and dtype of one float input; returns it C-contiguous."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(a).__name__}")
    if a.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{name}: dtype {a.dtype} does not match q's dtype {dtype}; use one dtype for all inputs")
    return np.ascontiguousarray(a)


def _expect_shape(name, a, dims):
    """dims: list of (label, size or None). Raises ValueError with both shapes on a mismatch."""
    ok = a.ndim == len(dims) and all(size is None or n == size for n, (_, size) in zip(a.shape, dims))
    if not ok:
        want = ", ".join(label if size is None else f"{label}={size}" for label, size in dims)
        raise ValueError(f"{name}: expected shape [{want}], got {tuple(a.shape)}")


def _expect_nonempty(name, a, labels):
    for n, label in zip(a.shape, labels):
        if n < 1:
            raise ValueError(f"{name}: dimension {label} must be at least 1, got shape {tuple(a.shape)}")


def _check_scale(scale, D):
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    return float(scale)


def _check_flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return bool(value)


def _check_window(window, causal):
    """-> the window as _core takes it (0: none)."""
    if window is None:
        return 0
    if isinstance(window, (bool, np.bool_)) or not isinstance(window, numbers.Integral):
        raise TypeError(f"window: expected an int or None, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window: expected a key count >= 1 or None, got {window}")
    if not causal:
        raise ValueError("window: a sliding window needs causal=True")
    return int(window)


def _check_softcap(softcap):
    """-> the soft-capping constant as _core takes it (0: none)."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap: expected a real number or None, got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap: expected a positive finite number or None, got {softcap}")
    return float(softcap)


def _check_attention(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale):
    """-> contiguous arrays, the mask (or None), causal and the resolved scale."""
    q = _array("q", q)
    dt = q.dtype
    k, v = _array("k", k, dt), _array("v", v, dt)
    prefix_k, prefix_v = _array("prefix_k", prefix_k, dt), _array("prefix_v", prefix_v, dt)
    _expect_shape("q", q, [("B", None), ("T", None), ("H", None), ("D", None)])
    _expect_nonempty("q", q, "BTHD")
    B, T, H, D = q.shape
    _expect_shape("k", k, [("B", B), ("S", None), ("Hkv", None), ("D", D)])
    _expect_nonempty("k", k, "BSHD")
    S, Hkv = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"k: kv heads Hkv={Hkv} must divide the query heads H={H} (grouped-query attention)")
    _expect_shape("v", v, [("B", B), ("S", S), ("Hkv", Hkv), ("D", D)])
    if prefix_k.ndim == 4:
        _expect_shape("prefix_k", prefix_k, [("B", B), ("P", None), ("Hkv", Hkv), ("D", D)])
    else:
        _expect_shape("prefix_k", prefix_k, [("P", None), ("Hkv", Hkv), ("D", D)])
    _expect_shape("prefix_v", prefix_v, [(label, n) for label, n in zip("BPHD" if prefix_k.ndim == 4 else "PHD", prefix_k.shape)])
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, np.ndarray):
            raise TypeError(f"key_padding_mask: expected a numpy.ndarray or None, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != np.bool_:
            raise TypeError(
                f"key_padding_mask: expected dtype bool (True = real token), got {key_padding_mask.dtype}; "
                "use mask.astype(bool)"
            )
        _expect_shape("key_padding_mask", key_padding_mask, [("B", B), ("S", S)])
        key_padding_mask = np.ascontiguousarray(key_padding_mask)
    return q, k, v, prefix_k, prefix_v, _check_flag("causal", causal), key_padding_mask, _check_scale(scale, D)


# --------------------------------------------------------------------------- prefix attention
def prefix_attention_forward(q, k, v, prefix_k, prefix_v, *, causal=False, key_padding_mask=None, scale=None,
                             window=None, softcap=None, backend=None):
    """Attention of q over [prefix | input] keys and values.

    q [B, T, H, D]; k, v [B, S, Hkv, D] (Hkv divides H: query head h uses kv head h // (H // Hkv));
    prefix_k, prefix_v [P, Hkv, D] shared by the batch, or [B, P, Hkv, D] one per row (P >= 0).
    causal: query i sees input key j iff j <= i + (S - T); the prefix is always visible.
    key_padding_mask: bool [B, S], True = real token; prefix keys stay visible.
    scale: defaults to 1 / sqrt(D).
    window: a sliding window of that many keys (None: none; needs causal). Positions: prefix key p
    at p, input key j at P + j, query i at P + i + (S - T); a query at x sees a key at y iff
    x - y < window, so virtual tokens fall out of a query's window like any other key, as in
    transformers' sliding-window mask with PEFT's virtual tokens first in the cache (Mistral).
    softcap: attention-logit soft-capping (None: none): every score s = scale * q . k becomes
    softcap * tanh(s / softcap) before the softmax (Gemma 2's `attn_logit_softcapping`, as in
    transformers' modeling_gemma2.py).
    -> out [B, T, H, D], lse [B, H, T] (log-sum-exp of the scaled (and capped) visible scores; a query
    that sees no key gets out = 0 and lse = -inf).
    """
    q, k, v, pk, pv, causal, mask, scale = _check_attention(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale)
    window, softcap = _check_window(window, causal), _check_softcap(softcap)
    if _check_backend(backend or _backend.get()) == "numpy":
        return reference.prefix_attention_forward(q, k, v, pk, pv, causal=causal, key_padding_mask=mask, scale=scale,
                                                  window=window or None, softcap=softcap or None)
    return _core.prefix_attention_forward(q, k, v, pk, pv, causal, mask, scale, window, softcap)


def prefix_attention_backward(
    dout, q, k, v, prefix_k, prefix_v, out, lse, *, causal=False, key_padding_mask=None, scale=None, window=None,
    softcap=None, backend=None
):
    """Gradients of prefix_attention_forward, given dout [B, T, H, D] and the forward's out and lse.

    -> (dq [B, T, H, D], dk [B, S, Hkv, D], dv [B, S, Hkv, D], dprefix_k, dprefix_v shaped like the
    prefix). A shared prefix's gradients are summed over the batch; with grouped-query attention
    dk/dv (and the prefix's) sum over the query heads of each group.
    """
    q, k, v, pk, pv, causal, mask, scale = _check_attention(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale)
    window, softcap = _check_window(window, causal), _check_softcap(softcap)
    B, T, H, D = q.shape
    dout, out, lse = _array("dout", dout, q.dtype), _array("out", out, q.dtype), _array("lse", lse, q.dtype)
    _expect_shape("dout", dout, [("B", B), ("T", T), ("H", H), ("D", D)])
    _expect_shape("out", out, [("B", B), ("T", T), ("H", H), ("D", D)])
    _expect_shape("lse", lse, [("B", B), ("H", H), ("T", T)])
    if _check_backend(backend or _backend.get()) == "numpy":
        return reference.prefix_attention_backward(
            dout, q, k, v, pk, pv, out, lse, causal=causal, key_padding_mask=mask, scale=scale, window=window or None,
            softcap=softcap or None)
    return _core.prefix_attention_backward(dout, q, k, v, pk, pv, out, lse, causal, mask, scale, window, softcap)


# --------------------------------------------------------------------------- prompt prepend
def prepend_forward(prompt, x, *, backend=None):
    """y = [prompt | x] along the sequence.

    prompt [P, D] shared by the batch, or [B, P, D] one per row (P >= 0); x [B, T, D] -> y [B, P+T, D].
    """
    x = _array("x", x)
    prompt = _array("prompt", prompt, x.dtype)
    _expect_shape("x", x, [("B", None), ("T", None), ("D", None)])
    _expect_nonempty("x", x, "BTD")
    B, T, D = x.shape
    if prompt.ndim == 3:
        _expect_shape("prompt", prompt, [("B", B), ("P", None), ("D", D)])
    else:
        _expect_shape("prompt", prompt, [("P", None), ("D", D)])
    if _check_backend(backend or _backend.get()) == "numpy":
        return reference.prepend_forward(prompt, x)
    return _core.prepend_forward(prompt, x)


def prepend_backward(dy, prompt_length, *, shared=True, backend=None):
    """Gradient of prepend_forward.  dy [B, P+T, D], prompt_length P ->
    (dprompt [P, D] summed over the batch if shared, else [B, P, D]; dx [B, T, D])."""
    dy = _array("dy", dy)
    _expect_shape("dy", dy, [("B", None), ("P+T", None), ("D", None)])
    _expect_nonempty("dy", dy, ("B", "P+T", "D"))
    if isinstance(prompt_length, (bool, np.bool_)):
        raise TypeError("prompt_length: expected an int, got bool")
    try:
        P = operator.index(prompt_length)
    except TypeError:
        raise TypeError(f"prompt_length: expected an int, got {type(prompt_length).__name__}") from None
    if not 0 <= P < dy.shape[1]:
        raise ValueError(f"prompt_length: expected 0 <= prompt_length < {dy.shape[1]} (dy's sequence length), got {P}")
    shared = _check_flag("shared", shared)
    if _check_backend(backend or _backend.get()) == "numpy":
        return reference.prepend_backward(dy, P, shared=shared)
    return _core.prepend_backward(dy, P, shared)


# --------------------------------------------------------------------------- frozen-model kernels
# Shapes are the callers' (models/layers.py, losses.py); the C++ versions are cpp/layers.cpp,
# cpp/linear.cpp and cpp/quant.cpp, their twins are in reference.py.
def _on_core():
    return _backend.get() == "cpp"


def rmsnorm_forward(x, weight, eps):
    """y = x / rms(x) * weight.  x [N, C], weight [C] -> y [N, C], rstd [N] (the backward's cache)."""
    if _on_core():
        return _core.rmsnorm_forward(x, weight, eps)
    return reference.rmsnorm_forward(x, weight, eps)


def rmsnorm_backward(dy, x, rstd, weight, residual=None):
    """dy, x [N, C], rstd [N] -> dx [N, C], plus residual [N, C] when given (the skip
    connection's gradient, added in the same pass)."""
    if _on_core():
        return _core.rmsnorm_backward(dy, x, rstd, weight, residual)
    return reference.rmsnorm_backward(dy, x, rstd, weight, residual)


def swiglu_forward(gate_up):
    """silu(gate) * up.  gate_up [N, 2F] = [gate | up] -> [N, F]."""
    if _on_core():
        return _core.swiglu_forward(gate_up)
    return reference.swiglu_forward(gate_up)


def swiglu_backward(da, gate_up):
    """da [N, F] -> d gate_up [N, 2F]."""
    if _on_core():
        return _core.swiglu_backward(da, gate_up)
    return reference.swiglu_backward(da, gate_up)


def rope_split(qkv, cos, sin, num_heads, num_kv_heads, head_dim):
    """The fused q/k/v projection's output qkv [N, (H + 2 Hkv) D] -> q [N, H, D], k [N, Hkv, D]
    rotated (pairs i, i + D/2) by each row's angle (cos, sin [N, D/2]), and v [N, Hkv, D]."""
    if _on_core():
        return _core.rope_split(qkv, cos, sin, num_heads, num_kv_heads, head_dim)
    return reference.rope_split(qkv, cos, sin, num_heads, num_kv_heads, head_dim)


def rope_merge(dq, dk, dv, cos, sin):
    """rope_split's backward: dq [N, H, D], dk, dv [N, Hkv, D] -> dqkv [N, (H + 2 Hkv) D]."""
    if _on_core():
        return _core.rope_merge(dq, dk, dv, cos, sin)
    return reference.rope_merge(dq, dk, dv, cos, sin)


def softmax_cross_entropy(logits, labels, scale):
    """Fused cross-entropy: logits [N, V] (float32/64, C order) are overwritten with
    scale * (softmax - onehot(labels)), the gradient of scale * sum(loss). labels [N] int in
    [0, V). -> per-row loss [N] (float64)."""
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    if labels.shape != logits.shape[:1] or (labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1])):
        raise ValueError(f"labels: expected {logits.shape[0]} values in [0, {logits.shape[1]}), got shape "
                         f"{labels.shape}, range [{labels.min() if labels.size else '-'}, "
                         f"{labels.max() if labels.size else '-'}]")
    if _on_core():
        return _core.softmax_cross_entropy(logits, labels, scale)
    return reference.softmax_cross_entropy(logits, labels, scale)


# Weight formats the GEMM reads without expanding (GGUF's; cpp/linear.h has their layouts):
# name -> (code in _core, weights per block, bytes per block).
QUANT_FORMATS = {"q4_1": (1, 32, 20), "q8_0": (2, 32, 34), "q4_0": (3, 32, 18), "q5_0": (4, 32, 22),
                 "q5_1": (5, 32, 24), "iq4_nl": (6, 32, 18), "q2_k": (7, 256, 84), "q3_k": (8, 256, 110),
                 "q4_k": (9, 256, 144), "q5_k": (10, 256, 176), "q6_k": (11, 256, 210), "f16": (12, 1, 2),
                 "bf16": (13, 1, 2)}


def _weight_args(w):
    """(raw array, format code, cols) for _core: a float32 ndarray, or a QuantizedWeight's blocks."""
    if isinstance(w, np.ndarray):
        return w, 0, w.shape[1]
    return w.blocks, QUANT_FORMATS[w.format][0], w.shape[1]


def _core_gemm(x2, w):
    """The C++ GEMM takes float32 rows and a contiguous float32 or quantized weight; anything else
    (float64 gradient checks, the "numpy" backend) runs the NumPy twin."""
    if x2.dtype != np.float32 or not _on_core() or not hasattr(_core, "linear_forward"):
        return False
    return not isinstance(w, np.ndarray) or (w.dtype == np.float32 and w.flags.c_contiguous)


def _weight_values(w, dtype):
    return w if isinstance(w, np.ndarray) else w.dequantize(dtype)


def linear_forward(x, weight, bias=None, *, few_rows=False):
    """y = x @ weight.T + bias.  x [N, in]; weight [out, in] (an ndarray or a models.quant.QuantizedWeight);
    bias [out] or None -> y [N, out]. Each output row is summed in one fixed order whatever N and the
    thread count. few_rows: up to a few rows (generation's decoding) as one dot product per output,
    reading the weight once (another summation order than the GEMM's)."""
    parts = getattr(weight, "parts", None)  # models.quant.StackedWeight: one GEMM per part
    if parts is not None:
        outs, r0 = [], 0
        for p in parts:
            b = None if bias is None else bias[r0:r0 + p.shape[0]]
            outs.append(linear_forward(x, p, b, few_rows=few_rows))
            r0 += p.shape[0]
        return np.concatenate(outs, axis=-1)
    if _core_gemm(x, weight):
        b = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        return _core.linear_forward(np.ascontiguousarray(x), *_weight_args(weight), b, few_rows=few_rows)
    return reference.linear_forward(x, _weight_values(weight, x.dtype), bias)


def linear_backward(dy, weight):
    """dx = dy @ weight.  dy [N, out] -> dx [N, in] (no weight gradient: the model is frozen)."""
    parts = getattr(weight, "parts", None)  # models.quant.StackedWeight: the parts' sum, in order
    if parts is not None:
        dx, r0 = None, 0
        for p in parts:
            d = linear_backward(np.ascontiguousarray(dy[:, r0:r0 + p.shape[0]]), p)
            dx = d if dx is None else dx + d
            r0 += p.shape[0]
        return dx
    if _core_gemm(dy, weight):
        return _core.linear_backward(np.ascontiguousarray(dy), *_weight_args(weight))
    return reference.linear_backward(dy, _weight_values(weight, dy.dtype))


def dequantize(blocks, format, cols):
    """GGUF blocks uint8 [rows, cols / weights per block * bytes per block] (QUANT_FORMATS) ->
    float32 [rows, cols], bitwise the values of gguf.quants.dequantize."""
    if format not in QUANT_FORMATS:
        raise ValueError(f"format: expected one of {sorted(QUANT_FORMATS)}, got {format!r}")
    if _on_core():
        return _core.dequantize(blocks, QUANT_FORMATS[format][0], cols)
    return reference.dequantize(blocks, format, cols)


# --------------------------------------------------------------------------- threads
def set_num_threads(n: int) -> None:
    """Threads used by the C++ kernels (default: OpenMP's, which honours OMP_NUM_THREADS).
    Process-wide; without OpenMP the kernels always run on one thread."""
    if isinstance(n, (bool, np.bool_)):
        raise TypeError("n: expected an int, got bool")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n: expected an int, got {type(n).__name__}") from None
    if n < 1:
        raise ValueError(f"n: expected a thread count >= 1, got {n}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """Threads the C++ kernels use (at most: see `set_adaptive_threads`)."""
    return _core.get_num_threads()


def set_adaptive_threads(enabled: bool) -> None:
    """Whether the C++ kernels use fewer than `get_num_threads()` threads while other processes
    keep cores busy (default: on). Every 0.2 s, the next call under ~0.3 GFLOP compares the busy
    time of the CPUs this process may run on (/proc/stat) with its own CPU time (getrusage); the
    difference, rounded to whole cores, is taken, and calls under ~0.3 GFLOP run on the cores left
    (at least one); longer calls keep every thread. Measured on 2 cores with a spin loop on one
    (bench/bench_ops.py --busy, bench/bench_e2e.py --busy): a thread sharing its core gets part of a
    time slice and every barrier waits for it, so short calls ran faster on one thread. Results are
    bitwise the same on any thread count. Linux only (elsewhere nothing is counted as taken).
    Process-wide."""
    if not isinstance(enabled, (bool, np.bool_)):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
    _core.set_adaptive_threads(bool(enabled))


def get_adaptive_threads() -> bool:
    """Whether the thread count adapts to other processes' load (see `set_adaptive_threads`)."""
    return _core.get_adaptive_threads()


def has_openmp() -> bool:
    """Whether the core was built with OpenMP (else every kernel runs on one thread)."""
    return _core.has_openmp()


def set_attention_kernel(kernel: str) -> None:
    """The C++ attention kernel: "simd" (hand-blocked, the default where it was built: GCC/Clang) or
    "eigen" (the simpler Eigen-GEMM version of the same algorithm). Process-wide."""
    _core.set_attention_kernel(kernel)


def get_attention_kernel() -> str:
    return _core.get_attention_kernel()
