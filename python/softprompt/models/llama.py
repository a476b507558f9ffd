"""The Llama family (SmolLM2, TinyLlama, Qwen2): RMSNorm, RoPE, grouped-query attention, SwiGLU.

Pre-norm blocks:  h = h + o(attn(rope(q(n1(h))), rope(k(n1(h))), v(n1(h))));  h = h + down(silu(gate(n2(h))) * up(n2(h)))
Shapes: hidden [B, L, C]; q [B, L, H, D]; k, v [B, L, Hkv, D]; MLP width F.
"""

from __future__ import annotations

import numpy as np

from . import layers as nn
from .base import ModelConfig, Transformer


class Llama(Transformer):
    """weights: embed [V, C]; per layer dict with attn_norm, q, k, v, o (+ q_bias, k_bias, v_bias),
    mlp_norm, gate, up, down; final_norm [C]; lm_head [V, C] or None when tied to embed."""

    def __init__(self, config: ModelConfig, embed, layers, final_norm, lm_head=None, tokenizer=None):
        self.config, self.embed, self.layers, self.final_norm = config, embed, layers, final_norm
        self.lm_head = None if config.tie_word_embeddings else lm_head
        self.tokenizer = tokenizer

    def output_embeddings(self):
        return self.embed if self.lm_head is None else self.lm_head

    def prepare(self, ctx, dtype):
        c = self.config
        ctx.extra["rope"] = nn.rope_tables(ctx.positions, c.head_dim, c.rope_theta, dtype)

    def block_forward(self, i, h, ctx):
        c, w = self.config, self.layers[i]
        B, L, _ = h.shape
        cos, sin = ctx.extra["rope"]
        x, n1 = nn.rmsnorm(h, w["attn_norm"], c.norm_eps)
        q = nn.rope(nn.linear(x, w["q"], w.get("q_bias")).reshape(B, L, c.num_heads, c.head_dim), cos, sin)
        k = nn.rope(nn.linear(x, w["k"], w.get("k_bias")).reshape(B, L, c.num_kv_heads, c.head_dim), cos, sin)
        v = nn.linear(x, w["v"], w.get("v_bias")).reshape(B, L, c.num_kv_heads, c.head_dim)
        att, lse = self.attention(i, q, k, v, ctx)
        h = h + nn.linear(att.reshape(B, L, -1), w["o"])
        x2, n2 = nn.rmsnorm(h, w["mlp_norm"], c.norm_eps)
        a, act = nn.swiglu(nn.linear(x2, w["gate"]), nn.linear(x2, w["up"]))
        h = h + nn.linear(a, w["down"])
        return h, (n1, x, q, k, v, att, lse, n2, x2, act)

    def block_backward(self, i, dh, cache, ctx):
        c, w = self.config, self.layers[i]
        n1, x, q, k, v, att, lse, n2, x2, act = cache
        B, L, _ = dh.shape
        cos, sin = ctx.extra["rope"]
        # MLP (residual: dh flows through unchanged and gets the branch's gradient added)
        dgate, dup = nn.swiglu_backward(nn.linear_backward(dh, w["down"]), act)
        dx2 = nn.linear_backward(dgate, w["gate"]) + nn.linear_backward(dup, w["up"])
        dh = dh + nn.rmsnorm_backward(dx2, n2, w["mlp_norm"])
        # attention
        datt = nn.linear_backward(dh, w["o"]).reshape(B, L, c.num_heads, c.head_dim)
        dq, dk, dv, dpk, dpv = self.attention_backward(i, datt, q, k, v, att, lse, ctx)
        dq, dk = nn.rope_backward(dq, cos, sin), nn.rope_backward(dk, cos, sin)
        dx = (
            nn.linear_backward(dq.reshape(B, L, -1), w["q"])
            + nn.linear_backward(dk.reshape(B, L, -1), w["k"])
            + nn.linear_backward(dv.reshape(B, L, -1), w["v"])
        )
        return dh + nn.rmsnorm_backward(dx, n1, w["attn_norm"]), dpk, dpv

    def final_forward(self, h):
        return nn.rmsnorm(h, self.final_norm, self.config.norm_eps)

    def final_backward(self, dh, cache):
        return nn.rmsnorm_backward(dh, cache, self.final_norm)
