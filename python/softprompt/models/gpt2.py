"""GPT-2: learned absolute positions, pre-LayerNorm blocks, GELU (tanh), fused c_attn.

Block:  h = h + proj(attn(split(c_attn(ln_1(h)))));  h = h + mlp_proj(gelu(fc(ln_2(h))))
The checkpoint's Conv1D weights are [in, out]; they are transposed once at load to [out, in]
(contiguous, for the C++ GEMM), so every linear here is y = x @ w.T + b.  Shapes: hidden [B, L, C]; q, k, v [B, L, H, D].
"""

from __future__ import annotations

import numpy as np

from . import layers as nn
from .base import ModelConfig, Transformer


class GPT2(Transformer):
    def __init__(self, config: ModelConfig, embed, positions, layers, final_ln, tokenizer=None, lm_head=None):
        self.config, self.embed, self.wpe, self.layers, self.final_ln = config, embed, positions, layers, final_ln
        self.lm_head = lm_head  # None: tied to embed (GPT-2's default)
        self.tokenizer = tokenizer

    def output_embeddings(self):
        return self.embed if self.lm_head is None else self.lm_head

    def embed_forward(self, x, ctx):
        if ctx.positions.max() >= self.wpe.shape[0]:
            raise ValueError(f"input_ids: sequence needs position {ctx.positions.max()}, GPT-2 has "
                             f"{self.wpe.shape[0]} (n_positions)")
        return x + self.wpe[ctx.positions], None  # positions are frozen: dx = dh

    def block_forward(self, i, h, ctx):
        c, w = self.config, self.layers[i]
        B, L, C = h.shape
        a, n1 = nn.layernorm(h, w["ln_1"], w["ln_1_bias"], c.norm_eps)
        qkv = nn.linear(a, w["c_attn"], w["c_attn_bias"]).reshape(B, L, 3, c.num_heads, c.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        att, lse = self.attention(i, q, k, v, ctx)
        h = h + nn.linear(att.reshape(B, L, C), w["c_proj"], w["c_proj_bias"])
        m, n2 = nn.layernorm(h, w["ln_2"], w["ln_2_bias"], c.norm_eps)
        f, g = nn.gelu_tanh(nn.linear(m, w["fc"], w["fc_bias"]))
        h = h + nn.linear(f, w["mlp_proj"], w["mlp_proj_bias"])
        return h, (n1, q, k, v, att, lse, n2, g)

    def block_backward(self, i, dh, cache, ctx):
        c, w = self.config, self.layers[i]
        n1, q, k, v, att, lse, n2, g = cache
        B, L, C = dh.shape
        df = nn.gelu_tanh_backward(nn.linear_backward(dh, w["mlp_proj"]), g)
        dh = dh + nn.layernorm_backward(nn.linear_backward(df, w["fc"]), n2, w["ln_2"])
        datt = nn.linear_backward(dh, w["c_proj"]).reshape(B, L, c.num_heads, c.head_dim)
        dq, dk, dv, dpk, dpv = self.attention_backward(i, datt, q, k, v, att, lse, ctx)
        dqkv = np.stack([dq, dk, dv], axis=2).reshape(B, L, 3 * C)
        return dh + nn.layernorm_backward(nn.linear_backward(dqkv, w["c_attn"]), n1, w["ln_1"]), dpk, dpv

    def final_forward(self, h):
        return nn.layernorm(h, self.final_ln[0], self.final_ln[1], self.config.norm_eps)

    def final_backward(self, dh, cache):
        return nn.layernorm_backward(dh, cache, self.final_ln[0])


def gpt2_from_hf(cfg, w, tokenizer, source):
    C, H = cfg["n_embd"], cfg["n_head"]
    config = ModelConfig(
        arch="gpt2",
        num_layers=cfg["n_layer"],
        num_heads=H,
        num_kv_heads=H,
        head_dim=C // H,
        hidden_size=C,
        vocab_size=cfg["vocab_size"],
        intermediate_size=cfg.get("n_inner") or 4 * C,
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        max_position_embeddings=cfg.get("n_positions", 1024),
        tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        attention_bias=True,
        model_type="gpt2",
        name_or_path=cfg.get("_name_or_path") or source,
        # scale_attn_weights False: raw q . k scores; scale_attn_by_inverse_layer_idx: / (layer + 1)
        attention_scale=None if cfg.get("scale_attn_weights", True) else 1.0,
        attention_scale_by_layer=bool(cfg.get("scale_attn_by_inverse_layer_idx", False)),
    )
    if cfg.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"config.json: activation_function {cfg['activation_function']!r} is not supported for "
                         "GPT-2 (gelu_new, gelu_pytorch_tanh)")
    if cfg.get("add_cross_attention"):
        raise ValueError("config.json: add_cross_attention true is not supported (GPT-2 as a decoder alone)")
    layers = []
    for i in range(config.num_layers):
        p = f"h.{i}."
        layers.append({
            "ln_1": w(p + "ln_1.weight"), "ln_1_bias": w(p + "ln_1.bias"),
            "c_attn": w.matrix(p + "attn.c_attn.weight", transpose=True), "c_attn_bias": w(p + "attn.c_attn.bias"),
            "c_proj": w.matrix(p + "attn.c_proj.weight", transpose=True), "c_proj_bias": w(p + "attn.c_proj.bias"),
            "ln_2": w(p + "ln_2.weight"), "ln_2_bias": w(p + "ln_2.bias"),
            "fc": w.matrix(p + "mlp.c_fc.weight", transpose=True), "fc_bias": w(p + "mlp.c_fc.bias"),
            "mlp_proj": w.matrix(p + "mlp.c_proj.weight", transpose=True), "mlp_proj_bias": w(p + "mlp.c_proj.bias"),
        })
    lm_head = None if config.tie_word_embeddings else w.matrix("lm_head.weight", optional=True)
    return GPT2(config, w.matrix("wte.weight"), w("wpe.weight"), layers, (w("ln_f.weight"), w("ln_f.bias")), tokenizer,
                lm_head)



def gpt2_from_gguf(f):
    """GPT-2 from a GGUF written by llama.cpp's converter (models/loading.py's GGUFFile `f`): its
    names (gguf's constants.py, MODEL_ARCH.GPT2), the Conv1D weights already transposed to
    [out, in], the tied head written out as `output.weight`."""
    C, H = int(f.field(".embedding_length")), int(f.field(".attention.head_count"))
    config = ModelConfig(
        arch="gpt2",
        num_layers=int(f.field(".block_count")),
        num_heads=H,
        num_kv_heads=H,
        head_dim=C // H,
        hidden_size=C,
        vocab_size=f.shape("token_embd.weight")[0],
        intermediate_size=int(f.field(".feed_forward_length", 4 * C)),
        norm_eps=float(f.field(".attention.layer_norm_epsilon", 1e-5)),
        max_position_embeddings=f.shape("position_embd.weight")[0],
        tie_word_embeddings=not f.has("output.weight"),
        attention_bias=True,
        **f.config_fields(),
    )
    layers = []
    for i in range(config.num_layers):
        p = f"blk.{i}."
        layers.append({
            "ln_1": f.get(p + "attn_norm.weight"), "ln_1_bias": f.get(p + "attn_norm.bias"),
            "c_attn": f.get(p + "attn_qkv.weight", keep=True), "c_attn_bias": f.get(p + "attn_qkv.bias"),
            "c_proj": f.get(p + "attn_output.weight", keep=True), "c_proj_bias": f.get(p + "attn_output.bias"),
            "ln_2": f.get(p + "ffn_norm.weight"), "ln_2_bias": f.get(p + "ffn_norm.bias"),
            "fc": f.get(p + "ffn_up.weight", keep=True), "fc_bias": f.get(p + "ffn_up.bias"),
            "mlp_proj": f.get(p + "ffn_down.weight", keep=True), "mlp_proj_bias": f.get(p + "ffn_down.bias"),
        })
    return GPT2(config, f.get("token_embd.weight", keep=True), f.get("position_embd.weight"), layers,
                (f.get("output_norm.weight"), f.get("output_norm.bias")), f.tokenizer,
                f.get("output.weight", optional=True, keep=True))
