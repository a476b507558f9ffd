"""Gemma 3 (text): Gemma 2's block (gemma2.py) with the differences of transformers'
models/gemma3/modeling_gemma3.py:

- a per-head RMSNorm of q and k before RoPE, (1 + w) like every Gemma norm (Qwen3's qk_norm, the
  weights stored as 1 + w);
- local and global layers: "sliding_attention" layers (by default five of every six, from
  sliding_window_pattern) see a sliding window and rotate with their own RoPE base
  (rope_local_base_freq, or rope_parameters["sliding_attention"]), "full_attention" layers see
  everything and rotate with rope_theta and the RoPE scaling (rope_parameters["full_attention"]);
- no soft-capping by default (both constants are read and applied when a config sets them).
Shapes as in llama.py: hidden [B, L, C] (rows N = B*L); qkv [N, (H + 2 Hkv) D].
"""

from __future__ import annotations

from . import layers as nn
from .base import RopeTables
from .gemma2 import Gemma2
from .qwen3 import Qwen3


class Gemma3(Gemma2):
    """Gemma 2's weights plus, per layer, "q_norm" and "k_norm" [head_dim] (stored as 1 + w)."""

    def prepare(self, ctx, dtype):
        # Two rotary tables: the global layers' (rope_theta, rope_scaling) and the local layers'.
        c = self.config
        tables = {"full_attention": RopeTables(*nn.rope_tables(ctx.positions, c.head_dim, c.rope_theta, dtype,
                                                               c.rope_scaling, c.max_position_embeddings))}
        if c.layer_types is not None and "sliding_attention" in c.layer_types:
            tables["sliding_attention"] = RopeTables(*nn.rope_tables(
                ctx.positions, c.head_dim, c.rope_local_theta, dtype, c.rope_local_scaling, c.max_position_embeddings))
        ctx.rope = tables

    def rope(self, i, ctx):
        types = self.config.layer_types
        table = ctx.rope["full_attention" if types is None else types[i]]
        return table.cos, table.sin

    # Qwen3's per-head q/k norms (the weights hold 1 + w, so the plain RMSNorm is Gemma's)
    qk_norm = Qwen3.qk_norm
    qk_norm_backward = Qwen3.qk_norm_backward

    def kv_cache_limit(self):
        # Dynamic NTK scaling on either table makes keys rotated by a shorter forward go stale.
        c = self.config
        dynamic = "dynamic" in (c.rope_scaling.rope_type, c.rope_local_scaling.rope_type)
        return c.max_position_embeddings if dynamic else None
