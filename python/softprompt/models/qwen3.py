"""Qwen3: the Llama block with a per-head RMSNorm of q and k before RoPE (transformers'
models/qwen3/modeling_qwen3.py: `q_norm`, `k_norm`, each RMSNorm(head_dim) with the model's
rms_norm_eps), an explicit `head_dim`, no q/k/v biases by default, Qwen2's sliding-window settings.

Block:  q, k, v = split(qkv(n1(h)));  q, k = rope(qn(q)), rope(kn(k));  h = h + o(attn(q, k, v));
        h = h + down(silu(gate(n2(h))) * up(n2(h)))
Shapes: hidden [B, L, C] (rows N = B*L); qkv [N, (H + 2 Hkv) D]; q [N, H, D]; k, v [N, Hkv, D].
The norms run on the fused qkv's q and k parts viewed as [N*H, D] rows (the Llama block's qk_norm
hook), then RoPE and the split run as the Llama block's (one C++ rope_split); the backward mirrors
it (rope_merge, the two norms' backward, the fused GEMM).
"""

from __future__ import annotations

import numpy as np

from . import layers as nn
from .llama import Llama


def qk_norm(qkv, q_norm, k_norm, H, Hkv, D, eps):
    """qkv [N, (H + 2 Hkv) D] -> the same layout with q's and k's heads RMS-normed (weights [D]),
    and the norms' cache (rstd_q [N*H], rstd_k [N*Hkv])."""
    N = qkv.shape[0]
    q, rstd_q = nn.rmsnorm(np.ascontiguousarray(qkv[:, :H * D]).reshape(N * H, D), q_norm, eps)
    k, rstd_k = nn.rmsnorm(np.ascontiguousarray(qkv[:, H * D:(H + Hkv) * D]).reshape(N * Hkv, D), k_norm, eps)
    out = np.empty_like(qkv)
    out[:, :H * D], out[:, H * D:(H + Hkv) * D] = q.reshape(N, H * D), k.reshape(N, Hkv * D)
    out[:, (H + Hkv) * D:] = qkv[:, (H + Hkv) * D:]
    return out, (rstd_q, rstd_k)


def qk_norm_backward(dout, qkv, cache, q_norm, k_norm, H, Hkv, D):
    """qk_norm's backward: dout [N, (H + 2 Hkv) D] -> dqkv, in place of dout."""
    rstd_q, rstd_k = cache
    N = qkv.shape[0]
    dq = nn.rmsnorm_backward(np.ascontiguousarray(dout[:, :H * D]).reshape(N * H, D),
                             np.ascontiguousarray(qkv[:, :H * D]).reshape(N * H, D), rstd_q, q_norm)
    dk = nn.rmsnorm_backward(np.ascontiguousarray(dout[:, H * D:(H + Hkv) * D]).reshape(N * Hkv, D),
                             np.ascontiguousarray(qkv[:, H * D:(H + Hkv) * D]).reshape(N * Hkv, D), rstd_k, k_norm)
    dout[:, :H * D], dout[:, H * D:(H + Hkv) * D] = dq.reshape(N, H * D), dk.reshape(N, Hkv * D)
    return dout


class Qwen3(Llama):
    """The Llama weights plus, per layer, "q_norm" and "k_norm" [head_dim]."""

    def qk_norm(self, i, qkv):
        c, w = self.config, self.layers[i]
        normed, norms = qk_norm(qkv, w["q_norm"], w["k_norm"], c.num_heads, c.num_kv_heads, c.head_dim, c.norm_eps)
        return normed, (qkv, norms)

    def qk_norm_backward(self, i, dqkv, cache):
        c, w = self.config, self.layers[i]
        qkv, norms = cache
        return qk_norm_backward(dqkv, qkv, norms, w["q_norm"], w["k_norm"], c.num_heads, c.num_kv_heads, c.head_dim)
