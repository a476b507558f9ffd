"""The Llama family (SmolLM2, TinyLlama, Qwen2): RMSNorm, RoPE, grouped-query attention, SwiGLU.

Pre-norm blocks:  h = h + o(attn(rope(q(n1(h))), rope(k(n1(h))), v(n1(h))));  h = h + down(silu(gate(n2(h))) * up(n2(h)))
Shapes: hidden [B, L, C]; q [B, L, H, D]; k, v [B, L, Hkv, D]; MLP width F.
"""

from __future__ import annotations

import numpy as np

from . import layers as nn
from .base import ModelConfig, RopeTables, Transformer
from .quant import QuantizedWeight, StackedWeight


class Llama(Transformer):
    """weights: embed [V, C]; per layer dict with attn_norm, q, k, v, o, mlp_norm, gate, up, down
    (+ optional biases q_bias, k_bias, v_bias, o_bias, gate_bias, up_bias, down_bias); final_norm
    [C]; lm_head [V, C] or None when tied to embed.

    At construction q/k/v are stacked into one "qkv" [(H + 2 Hkv) D, C] and gate/up into one
    "gate_up" [2F, C], once; "q", "gate", ... stay as row views of them (no second copy). One GEMM
    then replaces three (or two) in the forward, and in the backward one GEMM with the summed
    inner dimension replaces three products and two additions."""

    # The MLP's gated activation: SwiGLU, silu(gate) * up (C++); Gemma's GeGLU overrides it.
    activation = staticmethod(nn.swiglu)  # gate_up [N, 2F] -> [N, F]
    activation_backward = staticmethod(nn.swiglu_backward)  # da [N, F], gate_up -> d gate_up [N, 2F]

    def __init__(self, config: ModelConfig, embed, layers, final_norm, lm_head=None, tokenizer=None):
        self.config, self.embed, self.final_norm = config, embed, final_norm
        self.layers = [_fuse(w) for w in layers]
        self.lm_head = None if config.tie_word_embeddings else lm_head
        self.tokenizer = tokenizer

    def _cast(self, dtype):
        super()._cast(dtype)
        self.layers = [_fuse(dict(w), refuse=True) for w in self.layers]

    def output_embeddings(self):
        return self.embed if self.lm_head is None else self.lm_head

    def prepare(self, ctx, dtype):
        c = self.config
        ctx.rope = RopeTables(*nn.rope_tables(ctx.positions, c.head_dim, c.rope_theta, dtype, c.rope_scaling,
                                                   c.max_position_embeddings))

    def attention_window(self, i):
        c = self.config
        if c.sliding_window is None or (c.layer_types is not None and c.layer_types[i] != "sliding_attention"):
            return None
        return c.sliding_window

    def kv_cache_limit(self):
        # Dynamic NTK scaling changes every frequency once a forward reaches past
        # max_position_embeddings, so keys rotated by an earlier, shorter forward go stale.
        c = self.config
        return c.max_position_embeddings if c.rope_scaling.rope_type == "dynamic" else None

    # Hooks the siblings fill in (one block for the family; each hook is the identity here):
    def rope(self, i, ctx):  # layer i's rotary tables cos, sin [N, D/2] (Gemma 3: local or global)
        return ctx.rope.cos, ctx.rope.sin

    def qk_norm(self, i, qkv):  # qkv [N, (H + 2 Hkv) D] -> the same, and a cache (Qwen3, Gemma 3)
        return qkv, None

    def qk_norm_backward(self, i, dqkv, cache):
        return dqkv

    def post_norm(self, i, name, y):
        """A branch's output y [N, C] -> itself, or RMSNorm(y) where the layer has weight `name`
        (Gemma 2/3's post_attention_layernorm, post_feedforward_layernorm); and its cache."""
        w = self.layers[i].get(name)
        if w is None:
            return y, None
        out, rstd = nn.rmsnorm(y, w, self.config.norm_eps)
        return out, (y, rstd)

    def post_norm_backward(self, i, name, dy, cache):
        return dy if cache is None else nn.rmsnorm_backward(dy, cache[0], cache[1], self.layers[i][name])

    def block_forward(self, i, h, ctx):
        c, w = self.config, self.layers[i]
        B, L, C = h.shape
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        cos, sin = self.rope(i, ctx)
        h = h.reshape(B * L, C)  # every row-wise layer works on [N = B*L, C]
        x, rstd1 = nn.rmsnorm(h, w["attn_norm"], c.norm_eps)
        qkv, qk_cache = self.qk_norm(i, nn.linear(x, w["qkv"], w.get("qkv_bias")))  # [N, (H + 2 Hkv) D]
        q, k, v = nn.rope_split(qkv, cos, sin, H, Hkv, D)
        att, lse = self.attention(i, q.reshape(B, L, H, D), k.reshape(B, L, Hkv, D), v.reshape(B, L, Hkv, D), ctx)
        h_mid, post1 = self.post_norm(i, "post_attn_norm", nn.linear(att.reshape(B * L, H * D), w["o"], w.get("o_bias")))
        h_mid += h
        x2, rstd2 = nn.rmsnorm(h_mid, w["mlp_norm"], c.norm_eps)
        gate_up = nn.linear(x2, w["gate_up"], w.get("gate_up_bias"))  # [N, 2F]
        out, post2 = self.post_norm(i, "post_mlp_norm", nn.linear(self.activation(gate_up), w["down"],
                                                                  w.get("down_bias")))
        out += h_mid
        # The cache holds what the backward reads and nothing it can rebuild cheaply: the normed
        # inputs x, x2 and the SwiGLU output are not kept.
        return out.reshape(B, L, C), (h, rstd1, qk_cache, q, k, v, att, lse, post1, h_mid, rstd2, gate_up, post2)

    def block_backward(self, i, dh, cache, ctx):
        c, w = self.config, self.layers[i]
        h, rstd1, qk_cache, q, k, v, att, lse, post1, h_mid, rstd2, gate_up, post2 = cache
        B, L, C = dh.shape
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        cos, sin = self.rope(i, ctx)
        dh = dh.reshape(B * L, C)
        # MLP (residual: dh flows through unchanged and gets the branch's gradient added)
        dmlp = self.post_norm_backward(i, "post_mlp_norm", dh, post2)
        dgate_up = self.activation_backward(nn.linear_backward(dmlp, w["down"]), gate_up)
        dh_mid = nn.rmsnorm_backward(nn.linear_backward(dgate_up, w["gate_up"]), h_mid, rstd2, w["mlp_norm"],
                                     residual=dh)
        # attention
        datt = nn.linear_backward(self.post_norm_backward(i, "post_attn_norm", dh_mid, post1), w["o"])
        dq, dk, dv, dpk, dpv = self.attention_backward(
            i, datt.reshape(B, L, H, D), q.reshape(B, L, H, D), k.reshape(B, L, Hkv, D), v.reshape(B, L, Hkv, D),
            att, lse, ctx)
        dqkv = nn.rope_merge(dq.reshape(B * L, H, D), dk.reshape(B * L, Hkv, D), dv.reshape(B * L, Hkv, D), cos, sin)
        dx = nn.linear_backward(self.qk_norm_backward(i, dqkv, qk_cache), w["qkv"])
        return nn.rmsnorm_backward(dx, h, rstd1, w["attn_norm"], residual=dh_mid).reshape(B, L, C), dpk, dpv

    def final_forward(self, h):
        B, L, C = h.shape
        y, rstd = nn.rmsnorm(h.reshape(B * L, C), self.final_norm, self.config.norm_eps)
        return y.reshape(B, L, C), (h, rstd)

    def final_backward(self, dh, cache):
        h, rstd = cache
        B, L, C = h.shape
        return nn.rmsnorm_backward(dh.reshape(B * L, C), h.reshape(B * L, C), rstd, self.final_norm).reshape(B, L, C)


def _fuse(w, refuse=False):
    """Stacks a layer's q/k/v (and biases) into "qkv" and gate/up into "gate_up", in place, the
    separate names kept as row views; the layer's reference to each original is dropped as soon as
    it is copied (the GGUF loader holds no other, so loading it never holds two copies of the
    model). refuse: rebuild after a cast broke the views apart."""
    for group in (("q", "k", "v"), ("gate", "up")):  # a missing bias beside a present one is zero
        if any(f"{g}_bias" in w for g in group):
            for rows in group:
                if w.get(f"{rows}_bias") is None:
                    w[f"{rows}_bias"] = np.zeros(w[rows].shape[0], dtype=w[rows].dtype)
    for fused, parts in (("qkv", ("q", "k", "v")), ("qkv_bias", ("q_bias", "k_bias", "v_bias")),
                         ("gate_up", ("gate", "up")), ("gate_up_bias", ("gate_bias", "up_bias"))):
        if not all(p in w for p in parts) or (fused in w and not refuse):
            continue
        stacked = _stack([w[p] for p in parts])
        w[fused] = stacked
        start = 0
        for p in parts:
            n = w[p].shape[0]
            w[p] = stacked[start:start + n]
            start += n
    return w


def _stack(parts):
    """Row-stacks weights: quantized ones of one format stay one block array, quantized ones of
    several formats a StackedWeight of the parts as they are, float ones a float array."""
    if all(isinstance(p, QuantizedWeight) for p in parts) and len({p.format for p in parts}) == 1:
        return QuantizedWeight.concatenate(parts)
    if any(isinstance(p, QuantizedWeight) for p in parts):
        return StackedWeight(parts)
    return np.ascontiguousarray(np.concatenate([np.asarray(p) for p in parts], axis=0))
