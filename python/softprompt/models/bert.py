"""BERT encoder (covers MiniLM): bidirectional, token types, post-LayerNorm blocks, GELU, pooler.

Embeddings:  h = LN(token + position + token_type)
Block:       h = LN(h + out(attn(q(h), k(h), v(h))));  h = LN(h + down(gelu(up(h))))
Pooler:      tanh(dense(h[:, 0]))        Shapes: hidden [B, L, C]; q, k, v [B, L, H, D].
The optional masked-LM head (BertForMaskedLM checkpoints) gives `logits`.
"""

from __future__ import annotations

import numpy as np

from . import layers as nn
from .base import ModelConfig, Transformer


class Bert(Transformer):
    def __init__(self, config, embed, positions, token_types, embed_ln, layers, pooler=None, mlm=None, tokenizer=None):
        self.config, self.embed, self.wpe, self.wtt, self.embed_ln = config, embed, positions, token_types, embed_ln
        self.layers, self.pooler, self.mlm, self.tokenizer = layers, pooler, mlm, tokenizer

    def embed_forward(self, x, ctx):
        if ctx.positions.max() >= self.wpe.shape[0]:
            raise ValueError(f"input_ids: sequence needs position {ctx.positions.max()}, the model has "
                             f"{self.wpe.shape[0]} (max_position_embeddings)")
        types = ctx.token_type_ids
        e = x + self.wpe[ctx.positions] + (self.wtt[0] if types is None else self.wtt[types])
        return nn.layernorm(e, self.embed_ln[0], self.embed_ln[1], self.config.norm_eps)

    def embed_backward(self, dh, cache, ctx):
        return nn.layernorm_backward(dh, cache, self.embed_ln[0])

    def block_forward(self, i, h, ctx):
        c, w = self.config, self.layers[i]
        B, L, C = h.shape
        q = nn.linear(h, w["q"], w["q_bias"]).reshape(B, L, c.num_heads, c.head_dim)
        k = nn.linear(h, w["k"], w["k_bias"]).reshape(B, L, c.num_heads, c.head_dim)
        v = nn.linear(h, w["v"], w["v_bias"]).reshape(B, L, c.num_heads, c.head_dim)
        att, lse = self.attention(i, q, k, v, ctx)
        h1, n1 = nn.layernorm(h + nn.linear(att.reshape(B, L, C), w["o"], w["o_bias"]), w["ln_1"], w["ln_1_bias"], c.norm_eps)
        f, g = nn.gelu_erf(nn.linear(h1, w["up"], w["up_bias"]))
        h2, n2 = nn.layernorm(h1 + nn.linear(f, w["down"], w["down_bias"]), w["ln_2"], w["ln_2_bias"], c.norm_eps)
        return h2, (q, k, v, att, lse, n1, g, n2)

    def block_backward(self, i, dh, cache, ctx):
        c, w = self.config, self.layers[i]
        q, k, v, att, lse, n1, g, n2 = cache
        B, L, C = dh.shape
        dr2 = nn.layernorm_backward(dh, n2, w["ln_2"])  # gradient of h1 + mlp(h1)
        dh1 = dr2 + nn.linear_backward(nn.gelu_erf_backward(nn.linear_backward(dr2, w["down"]), g), w["up"])
        dr1 = nn.layernorm_backward(dh1, n1, w["ln_1"])  # gradient of h + attn(h)
        datt = nn.linear_backward(dr1, w["o"]).reshape(B, L, c.num_heads, c.head_dim)
        dq, dk, dv, dpk, dpv = self.attention_backward(i, datt, q, k, v, att, lse, ctx)
        dx = (nn.linear_backward(dq.reshape(B, L, C), w["q"]) + nn.linear_backward(dk.reshape(B, L, C), w["k"])
              + nn.linear_backward(dv.reshape(B, L, C), w["v"]))
        return dr1 + dx, dpk, dpv

    # -- pooler and masked-LM head --------------------------------------------------------
    def pooled(self, hidden_all):
        """tanh(dense(h[:, 0])) of the full sequence (with prompt tuning, row 0 is the first virtual
        token, as in PEFT).  -> pooled [B, C], cache."""
        if self.pooler is None:
            raise ValueError("model: this BERT checkpoint has no pooler weights (llama.cpp's GGUF converter drops "
                             "them: train from the Hugging Face folder)")
        p = np.tanh(nn.linear(hidden_all[:, 0], self.pooler[0], self.pooler[1]))
        return p, (p, hidden_all.shape)

    def pooled_backward(self, dpooled, cache):
        p, shape = cache
        dh = np.zeros(shape, dtype=dpooled.dtype)
        dh[:, 0] = nn.linear_backward(dpooled * (1 - p * p), self.pooler[0])
        return dh

    def output_embeddings(self):
        return self.embed

    def logits(self, input_ids, attention_mask=None, *, adapter=None):
        """Masked-LM logits for the T input tokens (needs a BertForMaskedLM checkpoint)."""
        if self.mlm is None:
            raise ValueError("model: this BERT checkpoint has no masked-LM head; use forward() or pooled()")
        h = self.forward(input_ids, attention_mask, adapter=adapter)
        t, _ = nn.gelu_erf(nn.linear(h, self.mlm["dense"], self.mlm["dense_bias"]))
        t, _ = nn.layernorm(t, self.mlm["ln"], self.mlm["ln_bias"], self.config.norm_eps)
        return (t @ self.embed.T + self.mlm["bias"]).astype(np.float32, copy=False)


def bert_from_hf(cfg, w, tokenizer, source):
    C, H = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported for BERT (gelu)")
    for key in ("add_cross_attention", "is_decoder"):
        if cfg.get(key):
            raise ValueError(f"config.json: {key} true is not supported (BERT as a bidirectional encoder)")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"config.json: position_embedding_type {cfg['position_embedding_type']!r} is not supported "
                         "(absolute)")
    config = ModelConfig(
        arch="bert",
        num_layers=cfg["num_hidden_layers"],
        num_heads=H,
        num_kv_heads=H,
        head_dim=C // H,
        hidden_size=C,
        vocab_size=cfg["vocab_size"],
        intermediate_size=cfg["intermediate_size"],
        norm_eps=cfg.get("layer_norm_eps", 1e-12),
        max_position_embeddings=cfg.get("max_position_embeddings", 512),
        tie_word_embeddings=True,
        attention_bias=True,
        type_vocab_size=cfg.get("type_vocab_size", 2),
        model_type="bert",
        name_or_path=cfg.get("_name_or_path") or source,
        causal=False,
    )
    layers = []
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}."
        layers.append({
            "q": w(p + "attention.self.query.weight"), "q_bias": w(p + "attention.self.query.bias"),
            "k": w(p + "attention.self.key.weight"), "k_bias": w(p + "attention.self.key.bias"),
            "v": w(p + "attention.self.value.weight"), "v_bias": w(p + "attention.self.value.bias"),
            "o": w(p + "attention.output.dense.weight"), "o_bias": w(p + "attention.output.dense.bias"),
            "ln_1": w(p + "attention.output.LayerNorm.weight"), "ln_1_bias": w(p + "attention.output.LayerNorm.bias"),
            "up": w(p + "intermediate.dense.weight"), "up_bias": w(p + "intermediate.dense.bias"),
            "down": w(p + "output.dense.weight"), "down_bias": w(p + "output.dense.bias"),
            "ln_2": w(p + "output.LayerNorm.weight"), "ln_2_bias": w(p + "output.LayerNorm.bias"),
        })
    pooler = None
    if w.has("pooler.dense.weight"):
        pooler = (w("pooler.dense.weight"), w("pooler.dense.bias"))
    mlm = None
    if w.has("cls.predictions.transform.dense.weight"):
        mlm = {
            "dense": w("cls.predictions.transform.dense.weight"), "dense_bias": w("cls.predictions.transform.dense.bias"),
            "ln": w("cls.predictions.transform.LayerNorm.weight"), "ln_bias": w("cls.predictions.transform.LayerNorm.bias"),
            "bias": w("cls.predictions.bias") if w.has("cls.predictions.bias") else w("cls.predictions.decoder.bias"),
        }
    return Bert(
        config, w("embeddings.word_embeddings.weight"), w("embeddings.position_embeddings.weight"),
        w("embeddings.token_type_embeddings.weight"),
        (w("embeddings.LayerNorm.weight"), w("embeddings.LayerNorm.bias")), layers, pooler, mlm, tokenizer,
    )


def bert_from_gguf(f):
    """BERT from a GGUF written by llama.cpp's converter (models/loading.py's GGUFFile `f`): its
    names (gguf's constants.py, MODEL_ARCH.BERT). That converter drops the pooler and the masked-LM
    head (llama.cpp uses BERT for embeddings), so the model has neither: `pooled` (classification)
    raises a ValueError saying so."""
    C, H = int(f.field(".embedding_length")), int(f.field(".attention.head_count"))
    config = ModelConfig(
        arch="bert",
        num_layers=int(f.field(".block_count")),
        num_heads=H,
        num_kv_heads=H,
        head_dim=C // H,
        hidden_size=C,
        vocab_size=f.shape("token_embd.weight")[0],
        intermediate_size=int(f.field(".feed_forward_length")),
        norm_eps=float(f.field(".attention.layer_norm_epsilon", 1e-12)),
        max_position_embeddings=f.shape("position_embd.weight")[0],
        tie_word_embeddings=True,
        attention_bias=True,
        type_vocab_size=f.shape("token_types.weight")[0],
        causal=False,
        **f.config_fields(),
    )
    layers = []
    for i in range(config.num_layers):
        p = f"blk.{i}."
        layer = {}
        for ours, theirs in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output"),
                             ("up", "ffn_up"), ("down", "ffn_down")):
            layer[ours], layer[ours + "_bias"] = f.get(p + theirs + ".weight", keep=True), f.get(p + theirs + ".bias")
        for ours, theirs in (("ln_1", "attn_output_norm"), ("ln_2", "layer_output_norm")):
            layer[ours], layer[ours + "_bias"] = f.get(p + theirs + ".weight"), f.get(p + theirs + ".bias")
        layers.append(layer)
    return Bert(config, f.get("token_embd.weight", keep=True), f.get("position_embd.weight"),
                f.get("token_types.weight"), (f.get("token_embd_norm.weight"), f.get("token_embd_norm.bias")),
                layers, tokenizer=f.tokenizer)
