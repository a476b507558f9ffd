"""Gemma (1): the Llama block with three differences (transformers' models/gemma/modeling_gemma.py):

- RMSNorm scales by (1 + w), not w: the loader stores 1 + w (in float32, as transformers computes
  it), so the Llama norms run unchanged;
- token embeddings are multiplied by sqrt(hidden_size) when gathered (transformers'
  GemmaTextScaledWordEmbedding). The scale belongs to the embedding lookup, not to the hidden
  states: PEFT prepends the virtual tokens after the lookup, so they are not scaled, and a prompt
  initialized from text holds the scaled embeddings (PEFT initializes it with the same lookup);
  the tied output head is the unscaled table;
- the MLP is GeGLU with the tanh GELU: down(gelu_tanh(gate(x)) * up(x)).
Shapes as in llama.py: hidden [B, L, C]; q [B, L, H, D]; k, v [B, L, Hkv, D]; head_dim apart from C / H.
"""

from __future__ import annotations

import numpy as np

from . import layers as nn
from .llama import Llama


class Gemma(Llama):
    activation = staticmethod(nn.geglu)
    activation_backward = staticmethod(nn.geglu_backward)

    @property
    def embed_scale(self):
        # transformers: torch.tensor(hidden_size ** 0.5) cast to the weights' dtype (float32 here)
        return np.float32(self.config.hidden_size ** 0.5)

    def embed_tokens(self, ids):
        """ids [B, T] -> token embeddings [B, T, C], scaled by sqrt(hidden_size)."""
        x = super().embed_tokens(ids)
        return x * x.dtype.type(self.embed_scale)
