"""Gemma 2: Gemma's block (gemma.py: (1 + w) norms, scaled embeddings, GeGLU) with four more
differences (transformers' models/gemma2/modeling_gemma2.py):

- a norm after each branch as well as before it: h = h + post_attn_norm(o(attn(attn_norm(h))));
  h = h + post_mlp_norm(mlp(mlp_norm(h))) (the Llama block's post_norm hook, weights
  "post_attn_norm" and "post_mlp_norm"; transformers' post_attention_layernorm,
  pre_feedforward_layernorm, post_feedforward_layernorm);
- attention-logit soft-capping: scores -> c tanh(scores / c) before the softmax, c =
  attn_logit_softcapping (in both C++ kernels and the NumPy twin: ops.prefix_attention_forward's
  softcap);
- final-logit soft-capping: the LM logits -> c tanh(logits / c), c = final_logit_softcapping (in
  Transformer.lm_logits, the losses and generation);
- the score factor query_pre_attn_scalar ** -0.5 (ModelConfig.attention_scale), not head_dim ** -0.5;
  a sliding window on the layers layer_types marks "sliding_attention" (by default every other
  layer, the first included).
Shapes as in llama.py: hidden [B, L, C]; q [B, L, H, D]; k, v [B, L, Hkv, D].
"""

from __future__ import annotations

from .gemma import Gemma


class Gemma2(Gemma):
    """Gemma's weights plus, per layer, "post_attn_norm" and "post_mlp_norm" [C] (stored as 1 + w);
    the soft-capping constants and the score factor come with the config."""
