"""Qwen3: the Llama block with a per-head RMSNorm of q and k before RoPE (transformers'
models/qwen3/modeling_qwen3.py: `q_norm`, `k_norm`, each RMSNorm(head_dim) with the model's
rms_norm_eps), an explicit `head_dim`, no q/k/v biases by default, Qwen2's sliding-window settings.

Block:  q, k, v = split(qkv(n1(h)));  q, k = rope(qn(q)), rope(kn(k));  h = h + o(attn(q, k, v));
        h = h + down(silu(gate(n2(h))) * up(n2(h)))
Shapes: hidden [B, L, C] (rows N = B*L); qkv [N, (H + 2 Hkv) D]; q [N, H, D]; k, v [N, Hkv, D].
The norms run on the fused qkv's q and k parts viewed as [N*H, D] rows, then RoPE and the split
run as the Llama block's (one C++ rope_split); the backward mirrors it (rope_merge, the two norms'
backward, the fused GEMM).
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

    def block_forward(self, i, h, ctx):
        c, w = self.config, self.layers[i]
        B, L, C = h.shape
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        cos, sin = ctx.rope.cos, ctx.rope.sin
        h = h.reshape(B * L, C)
        x, rstd1 = nn.rmsnorm(h, w["attn_norm"], c.norm_eps)
        qkv = nn.linear(x, w["qkv"], w.get("qkv_bias"))  # [N, (H + 2 Hkv) D]
        normed, norms = qk_norm(qkv, w["q_norm"], w["k_norm"], H, Hkv, D, c.norm_eps)
        q, k, v = nn.rope_split(normed, cos, sin, H, Hkv, D)
        att, lse = self.attention(i, q.reshape(B, L, H, D), k.reshape(B, L, Hkv, D), v.reshape(B, L, Hkv, D), ctx)
        h_mid = nn.linear(att.reshape(B * L, H * D), w["o"], w.get("o_bias"))
        h_mid += h
        x2, rstd2 = nn.rmsnorm(h_mid, w["mlp_norm"], c.norm_eps)
        gate_up = nn.linear(x2, w["gate_up"], w.get("gate_up_bias"))  # [N, 2F]
        out = nn.linear(self.activation(gate_up), w["down"], w.get("down_bias"))
        out += h_mid
        return out.reshape(B, L, C), (h, rstd1, qkv, norms, q, k, v, att, lse, h_mid, rstd2, gate_up)

    def block_backward(self, i, dh, cache, ctx):
        c, w = self.config, self.layers[i]
        h, rstd1, qkv, norms, q, k, v, att, lse, h_mid, rstd2, gate_up = cache
        B, L, C = dh.shape
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        cos, sin = ctx.rope.cos, ctx.rope.sin
        dh = dh.reshape(B * L, C)
        dgate_up = self.activation_backward(nn.linear_backward(dh, w["down"]), gate_up)
        dh_mid = nn.rmsnorm_backward(nn.linear_backward(dgate_up, w["gate_up"]), h_mid, rstd2, w["mlp_norm"],
                                     residual=dh)
        datt = nn.linear_backward(dh_mid, w["o"]).reshape(B, L, H, D)
        dq, dk, dv, dpk, dpv = self.attention_backward(
            i, datt, q.reshape(B, L, H, D), k.reshape(B, L, Hkv, D), v.reshape(B, L, Hkv, D), att, lse, ctx)
        dnormed = nn.rope_merge(dq.reshape(B * L, H, D), dk.reshape(B * L, Hkv, D), dv.reshape(B * L, Hkv, D), cos, sin)
        dqkv = qk_norm_backward(dnormed, qkv, norms, w["q_norm"], w["k_norm"], H, Hkv, D)
        dx = nn.linear_backward(dqkv, w["qkv"])
        return nn.rmsnorm_backward(dx, h, rstd1, w["attn_norm"], residual=dh_mid).reshape(B, L, C), dpk, dpv
