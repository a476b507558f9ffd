"""NumPy reference: the seed's prompt and prefix tuning, the backward passes it leaves out, and the
NumPy twin of every other kernel of the C++ core (RMSNorm, SwiGLU, RoPE, the fused softmax
cross-entropy, the linear layers, GGUF dequantization).

This module is the correctness oracle for the C++ core, the speed baseline in bench/, and the
documentation of the math. It favours plain, whole-array NumPy over speed: the attention builds
the full [B, H, T, P+S] score tensor with
batched matmul (BLAS). No input validation here; softprompt.ops does that.

Shapes: q [B, T, H, D]; k, v [B, S, Hkv, D]; prefix_k, prefix_v [P, Hkv, D] (shared by the batch)
or [B, P, Hkv, D] (one per row); out [B, T, H, D]; lse [B, H, T].
"""

from __future__ import annotations

import numpy as np

__all__ = [
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
    "PromptTuning",
    "PrefixTuning",
    "attention",
    "attention_with_prefix",
    "prefix_attention_forward",
    "prefix_attention_backward",
    "prepend_forward",
    "prepend_backward",
]


# --------------------------------------------------------------------------- prompt prepend
def prepend_forward(prompt, x):
    """y = [prompt | x] along the sequence.  prompt [P, D] or [B, P, D]; x [B, T, D] -> y [B, P+T, D]."""
    B = x.shape[0]
    if prompt.ndim == 2:
        prompt = np.broadcast_to(prompt, (B, *prompt.shape))
    return np.concatenate([prompt, x], axis=1)


def prepend_backward(dy, prompt_length, *, shared=True):
    """dy [B, P+T, D] -> (dprompt [P, D] summed over the batch, or [B, P, D]; dx [B, T, D])."""
    dprompt = dy[:, :prompt_length]
    dprompt = dprompt.sum(axis=0) if shared else dprompt.copy()
    return dprompt, dy[:, prompt_length:].copy()


class PromptTuning:
    """The seed's learned soft prompt, prepended to the input embeddings."""

    def __init__(self, d_model: int, prompt_length: int = 20, rng=None):
        rng = np.random.default_rng() if rng is None else rng
        self.d_model = d_model
        self.prompt_length = prompt_length
        self.prompt = rng.standard_normal((prompt_length, d_model)) * 0.01  # [P, d_model]
        self.prompt_grad = None

    def forward(self, input_embeds):
        """input_embeds [B, T, d_model] -> [B, P+T, d_model]."""
        return prepend_forward(self.prompt, input_embeds)

    def backward(self, grad_output):
        """grad_output [B, P+T, d_model] -> gradient of the input embeddings [B, T, d_model]."""
        self.prompt_grad, dx = prepend_backward(grad_output, self.prompt_length)
        return dx


# --------------------------------------------------------------------------- prefix attention
class PrefixTuning:
    """The seed's learned key/value prefixes, one pair per attention layer."""

    def __init__(self, num_layers: int, num_heads: int, d_head: int, prefix_length: int = 10, rng=None):
        rng = np.random.default_rng() if rng is None else rng
        self.num_layers, self.num_heads, self.d_head = num_layers, num_heads, d_head
        self.prefix_length = prefix_length
        # [num_layers, 2 (key, value), prefix_length, num_heads, d_head]
        self.prefix = rng.standard_normal((num_layers, 2, prefix_length, num_heads, d_head)) * 0.01

    def get_prefix(self, layer_idx: int):
        """-> (prefix_k, prefix_v), each [prefix_length, num_heads, d_head]."""
        return self.prefix[layer_idx, 0], self.prefix[layer_idx, 1]


def attention(Q, K, V):
    """Plain softmax attention.  Q [B, T, H, D]; K, V [B, S, H, D] -> [B, T, H, D]."""
    out, _ = prefix_attention_forward(Q, K, V, K[0, :0], V[0, :0])
    return out


def attention_with_prefix(Q, K, V, prefix_k, prefix_v):
    """The seed's function: attention over [prefix | input] keys.  Shapes as in the module doc."""
    out, _ = prefix_attention_forward(Q, K, V, prefix_k, prefix_v)
    return out


def _heads_first(a):
    """[B, N, H, D] -> [B, H, N, D], so that batched matmul (BLAS) works per (batch, head)."""
    return a.transpose(0, 2, 1, 3)


def _full_keys(k, v, prefix_k, prefix_v, H):
    """Concatenate the prefix and repeat kv heads for grouped-query attention.
    -> k_full, v_full [B, H, P+S, D]."""
    B = k.shape[0]
    if prefix_k.ndim == 3:
        prefix_k = np.broadcast_to(prefix_k, (B, *prefix_k.shape))
        prefix_v = np.broadcast_to(prefix_v, (B, *prefix_v.shape))
    group = H // k.shape[2]  # query head h uses kv head h // group
    k_full = np.repeat(_heads_first(np.concatenate([prefix_k, k], axis=1)), group, axis=1)
    v_full = np.repeat(_heads_first(np.concatenate([prefix_v, v], axis=1)), group, axis=1)
    return k_full, v_full


def _visible(B, T, S, P, causal, key_padding_mask, window=None):
    """Which keys each query sees -> bool [B, 1, T, P+S]. The prefix is visible unless a sliding
    window hides it: with positions prefix p -> p, input j -> P + j, query i -> P + i + (S - T), a
    query at x sees a key at y iff x - y < window."""
    vis = np.ones((B, 1, T, P + S), dtype=bool)
    if causal:  # query i sees input key j iff j <= i + (S - T)
        i = np.arange(T)[:, None]
        j = np.arange(S)[None, :]
        vis[:, :, :, P:] &= j <= i + (S - T)
    if window is not None:
        x = P + np.arange(T)[:, None] + (S - T)
        y = np.arange(P + S)[None, :]
        vis &= x - y < window
    if key_padding_mask is not None:
        vis[:, :, :, P:] &= key_padding_mask[:, None, None, :]
    return vis


def _scores(q, k_full, scale):
    """q [B, T, H, D], k_full [B, H, P+S, D] -> scale * q k^T [B, H, T, P+S]."""
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf in hidden keys are masked later
        return scale * (_heads_first(q) @ k_full.swapaxes(-1, -2))


def _capped(scores, softcap):
    """Soft-capping: -> (softcap * tanh(scores / softcap), tanh(scores / softcap)), or (scores, None)."""
    if softcap is None:
        return scores, None
    th = np.tanh(scores / softcap)
    return softcap * th, th


def _probabilities(scores, visible):
    """Masked softmax.  -> p [B, H, T, P+S], lse [B, H, T] (-inf where a query sees no key)."""
    # A visible NaN score makes its row's max, and so the whole row, NaN (as in any softmax); a
    # row that sees no key (max -inf) gets zeros and lse = -inf.
    scores = np.where(visible, scores, -np.inf)
    m = scores.max(axis=-1, keepdims=True)  # np.max keeps NaN
    m_safe = np.where(np.isneginf(m), 0.0, m)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.where(visible, np.exp(scores - m_safe), 0.0)
        total = e.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(total == 0, 0.0, e / total)
        lse = np.where(total == 0, -np.inf, m_safe + np.log(total))[..., 0]
    return p, lse


def prefix_attention_forward(q, k, v, prefix_k, prefix_v, *, causal=False, key_padding_mask=None, scale=None,
                             window=None, softcap=None):
    """softmax(cap(scale * q [prefix_k | k]^T)) [prefix_v | v]  -> (out [B, T, H, D], lse [B, H, T]);
    cap(s) = softcap * tanh(s / softcap), or s without softcap."""
    B, T, H, D = q.shape
    S, P = k.shape[1], prefix_k.shape[-3]
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    k_full, v_full = _full_keys(k, v, prefix_k, prefix_v, H)
    scores, _ = _capped(_scores(q, k_full, scale), softcap)
    p, lse = _probabilities(scores, _visible(B, T, S, P, causal, key_padding_mask, window))
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf inputs propagate (ops' rules), silently
        out = _heads_first(p @ v_full)
    return np.ascontiguousarray(out, dtype=q.dtype), lse.astype(q.dtype, copy=False)


def prefix_attention_backward(
    dout, q, k, v, prefix_k, prefix_v, out, lse, *, causal=False, key_padding_mask=None, scale=None, window=None,
    softcap=None
):
    """Gradients of the forward.  -> (dq, dk, dv, dprefix_k, dprefix_v), shaped like their inputs.

    With p = softmax(s), s = scale * q k^T:  dv = p^T do;  dp = do v^T;
    ds = p * (dp - rowsum(do * out));  dq = scale * ds k;  dk = scale * ds^T q.
    With soft-capping p = softmax(c tanh(s / c)) and ds is multiplied by 1 - tanh(s / c)^2.
    """
    B, T, H, D = q.shape
    S, Hkv, P = k.shape[1], k.shape[2], prefix_k.shape[-3]
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    k_full, v_full = _full_keys(k, v, prefix_k, prefix_v, H)
    visible = _visible(B, T, S, P, causal, key_padding_mask, window)
    hidden_row = np.isneginf(lse)[..., None]  # sees no key (a NaN lse stays: its gradients are NaN)
    lse_safe = np.where(hidden_row, 0.0, lse[..., None])
    scores, th = _capped(_scores(q, k_full, scale), softcap)
    with np.errstate(over="ignore", invalid="ignore"):  # hidden scores may overflow; they are dropped
        p = np.where(visible & ~hidden_row, np.exp(scores - lse_safe), 0.0)  # from lse
    do = _heads_first(dout)  # [B, H, T, D]
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf inputs propagate (ops' rules), silently
        dv_full = p.swapaxes(-1, -2) @ do  # [B, H, P+S, D]
        dp = do @ v_full.swapaxes(-1, -2)  # [B, H, T, P+S]
        delta = np.sum(dout * out, axis=-1).transpose(0, 2, 1)[..., None]  # [B, H, T, 1]
        ds = p * (dp - delta)
        if th is not None:
            ds = ds * (1 - th * th)
        dq = scale * _heads_first(ds @ k_full)
        dk_full = scale * (ds.swapaxes(-1, -2) @ _heads_first(q))  # [B, H, P+S, D]
    # Fold the repeated query heads back onto their kv head, then split prefix from input.
    group = H // Hkv
    dk_full = _heads_first(dk_full.reshape(B, Hkv, group, P + S, D).sum(axis=2))  # [B, P+S, Hkv, D]
    dv_full = _heads_first(dv_full.reshape(B, Hkv, group, P + S, D).sum(axis=2))
    dprefix_k, dprefix_v = dk_full[:, :P], dv_full[:, :P]
    if prefix_k.ndim == 3:  # shared prefix: sum over the batch
        dprefix_k, dprefix_v = dprefix_k.sum(axis=0), dprefix_v.sum(axis=0)
    cast = lambda a: np.ascontiguousarray(a, dtype=q.dtype)  # noqa: E731
    return cast(dq), cast(dk_full[:, P:]), cast(dv_full[:, P:]), cast(dprefix_k), cast(dprefix_v)


# --------------------------------------------------------------------------- the frozen model's kernels
# Twins of cpp/layers.cpp, cpp/linear.cpp and cpp/quant.cpp (see softprompt.ops for the contracts).
def rmsnorm_forward(x, weight, eps):
    """x [N, C], weight [C] -> y = x / rms(x) * weight [N, C], rstd [N]."""
    rstd = 1.0 / np.sqrt(np.mean(x * x, axis=-1) + eps)
    return x * rstd[:, None] * weight, rstd.astype(x.dtype)


def rmsnorm_backward(dy, x, rstd, weight, residual=None):
    """dy, x [N, C], rstd [N] -> dx [N, C] (+ residual)."""
    # dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w, xhat = x * rstd
    xhat, g = x * rstd[:, None], dy * weight
    dx = rstd[:, None] * (g - xhat * np.mean(g * xhat, axis=-1, keepdims=True))
    return dx if residual is None else dx + residual


def sigmoid(x):
    e = np.exp(-np.abs(x))  # never overflows
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def swiglu_forward(gate_up):
    """gate_up [N, 2F] = [gate | up] -> silu(gate) * up [N, F]."""
    gate, up = np.split(gate_up, 2, axis=-1)
    return gate * sigmoid(gate) * up


def swiglu_backward(da, gate_up):
    """da [N, F] -> d gate_up [N, 2F]."""
    # d silu(g)/dg = sig * (1 + g * (1 - sig))
    gate, up = np.split(gate_up, 2, axis=-1)
    sig = sigmoid(gate)
    return np.concatenate([da * up * sig * (1.0 + gate * (1.0 - sig)), da * gate * sig], axis=-1)


def _rotate(x, cos, sin):  # x [N, heads, D], cos/sin [N, D/2]: pairs (i, i + D/2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None], sin[:, None]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def rope_split(qkv, cos, sin, num_heads, num_kv_heads, head_dim):
    """qkv [N, (H + 2 Hkv) D] -> rotated q [N, H, D], rotated k [N, Hkv, D], v [N, Hkv, D]."""
    N, H, D = qkv.shape[0], num_heads, head_dim
    q, k, v = np.split(qkv.reshape(N, -1, D), [H, H + num_kv_heads], axis=1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v.copy()


def rope_merge(dq, dk, dv, cos, sin):
    """rope_split's backward -> dqkv [N, (H + 2 Hkv) D]."""
    # The rotation is orthogonal: its backward rotates by the negative angle.
    d = np.concatenate([_rotate(dq, cos, -sin), _rotate(dk, cos, -sin), dv], axis=1)
    return d.reshape(dq.shape[0], -1)


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax_cross_entropy(logits, labels, scale):
    """logits [N, V] overwritten with scale * (softmax - onehot(labels)) -> per-row loss [N] (float64)."""
    logp = log_softmax(logits.astype(np.float64))
    rows = np.arange(logits.shape[0])
    loss = -logp[rows, labels]
    d = np.exp(logp)
    d[rows, labels] -= 1.0
    logits[...] = d * scale
    return loss


def linear_forward(x, weight, bias=None):
    """x [N, in], weight [out, in], bias [out] -> [N, out]."""
    y = x @ weight.T
    if bias is not None:
        y += bias
    return y


def linear_backward(dy, weight):
    """dy [N, out] -> dx [N, in]."""
    return dy @ weight




def dequantize(blocks, format, cols):
    """GGUF blocks uint8 [rows, row bytes] of a format (ops.QUANT_FORMATS) -> float32 [rows, cols].
    The twin is gguf's own NumPy dequantizer (the reference the C++ decoder must match bitwise)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[format.upper()]
    return np.asarray(gguf.quants.dequantize(np.ascontiguousarray(blocks), qtype), dtype=np.float32).reshape(
        blocks.shape[0], cols)
