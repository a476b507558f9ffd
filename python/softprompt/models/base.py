"""The frozen transformer every architecture shares: adapter injection, the layer loop, backward.

Data flow (one training step): token ids -> embeddings (frozen) -> `ops.prepend_forward` (prompt
tuning) -> N blocks, each calling `ops.prefix_attention_forward` (prefix tuning: the layer's K/V
prefix) -> final norm -> head; then the same path backwards, ending in the gradient of the prompt or
prefix. Positions follow PEFT: a prompt takes positions 0..P-1 and the input tokens follow it; with a
prefix the input tokens start at position P; padding never shifts a real token's position (positions
count real tokens only), so left- and right-padded batches give each sequence the same result
(except under a sliding window, which counts key slots as transformers' does: left padding moves
the virtual tokens out of a query's window sooner).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import ops
from . import layers as nn
from .quant import QuantizedWeight, StackedWeight


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE's frequencies are scaled for long contexts: transformers' `rope_parameters` (or the
    Hub's `rope_scaling`) and GGUF's `rope.scaling.*` keys and `rope_freqs` tensor. The formulas
    are transformers' (modeling_rope_utils.py); see `models.layers.rope_inv_freq`."""

    rope_type: str = "default"  # one of layers.ROPE_TYPES
    factor: float = 1.0  # linear, dynamic, yarn, llama3
    original_max_position_embeddings: int | None = None  # yarn, llama3: the pretraining context
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn: cos/sin scale (None: from factor, mscale, mscale_all_dim)
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn: round the correction range outwards
    freq_factors: tuple | None = None  # GGUF rope_freqs: inv_freq[i] / freq_factors[i] (llama.cpp)


@dataclass(frozen=True)
class ModelConfig:
    """The frozen model's shape and settings, read from config.json or GGUF metadata."""

    arch: str  # the model file that runs it: "llama", "gpt2" or "bert"
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    # Gemma 3's local ("sliding_attention") layers rotate with their own base and scaling:
    rope_local_theta: float | None = None
    rope_local_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 2048
    sliding_window: int | None = None  # keys a query sees, itself included (Mistral, Qwen2); None: all
    layer_types: tuple | None = None  # per layer "sliding_attention" | "full_attention"; None: every
    # layer slides when sliding_window is set (transformers' names)
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # q/k/v biases (Qwen2); GPT-2 and BERT always have them
    type_vocab_size: int = 0
    model_type: str = ""  # the Hugging Face model_type it came from (llama, qwen2, gpt2, bert)
    name_or_path: str = ""
    causal: bool = True
    attention_scale: float | None = None  # the scores' factor; None: 1 / sqrt(head_dim)
    attention_scale_by_layer: bool = False  # GPT-2's scale_attn_by_inverse_layer_idx: / (layer + 1)
    attn_logit_softcapping: float | None = None  # scores -> c tanh(scores / c) (Gemma 2); None: none
    final_logit_softcapping: float | None = None  # LM logits -> c tanh(logits / c) (Gemma 2); None: none
    bos_token_id: int | None = None
    eos_token_id: int | None = None  # generation stops here; appended to generation targets
    pad_token_id: int | None = None


@dataclass(frozen=True)
class ChatTemplate:
    """The model's chat template (a Jinja template, the format transformers' apply_chat_template
    renders) and the special-token strings it may use."""

    template: str
    bos_token: str = ""
    eos_token: str = ""


@dataclass
class RopeTables:
    """Rotary angles of every row the layers see: cos, sin [N = B*L, head_dim/2]."""

    cos: np.ndarray
    sin: np.ndarray


@dataclass
class KVCache:
    """Generation's keys and values so far, per layer: layer -> (k, v) [B, S, Hkv, D]."""

    layers: dict = field(default_factory=dict)


@dataclass
class Continuations:
    """Rows that continue the batch's sequences (rank classification: each label's tokens after the
    first, after its example's input): row r holds tokens that follow sequence rows[r], at the
    positions after its last real token; its queries see that sequence's keys (virtual tokens
    included), then its own tokens causally."""

    rows: np.ndarray  # int [R]: the batch row each continues
    ids: np.ndarray  # int [R, E]
    mask: np.ndarray  # bool [R, E], right-padded (True = real token)


@dataclass
class ContinuationLayout:
    """Where a Continuations' past keys lie in the packed rows: index [R, S] (left-padded, 0 where
    index_mask is False) into the first P + B*T packed rows; groups: (rows, width) attended
    together, their pasts cut to their last `width` slots (all rows with the full width S, or under
    a sliding window the rows whose pasts have one length, unpadded, so no padding shifts a key's
    distance, the layer prefix's included)."""

    index: np.ndarray  # int [R, S]
    index_mask: np.ndarray  # bool [R, S]
    own_mask: np.ndarray | None  # bool [R, E] (None: nothing padded)
    groups: list  # (int array of rows, width)


@dataclass
class PackedPrompt:
    """Packed rows (see Transformer.share_prompt_rows): the layers see one sequence
    [1, P + B*T + R*E]: prompt tuning's P prompt rows first (P = 0 otherwise), then the batch's B
    rows of T tokens, then any continuation rows (R rows of E tokens, see Continuations)."""

    num_virtual_tokens: int  # P: prompt rows (0 for prefix tuning or no adapter)
    batch: int  # B; 0 for a process that holds no rows of a data-parallel batch
    length: int  # T
    key_mask: np.ndarray | None  # bool [B, T] (True = real token), or None when nothing is padded
    continuation: ContinuationLayout | None = None
    continuation_shape: tuple = (0, 0)  # (R, E)
    # Backward only (data parallelism): sums a float64 vector over every process holding part of
    # the batch; see Transformer.backward's prompt_sum.
    prompt_sum: Callable[[np.ndarray], np.ndarray] | None = None


@dataclass
class Context:
    """What every layer of one forward pass shares."""

    positions: np.ndarray  # [B, L] int: position of every row of the sequence the layers see
    key_mask: np.ndarray | None  # bool [B, L] (True = real token), or None when nothing is padded
    prefix: np.ndarray | None  # [num_layers, 2, (B,) P, Hkv, D] or None
    # set by the model's prepare() (RoPE models); Gemma 3: {layer type: RopeTables}
    rope: RopeTables | dict | None = None
    token_type_ids: np.ndarray | None = None  # int [B, L] (BERT; None = all type 0)
    kv_cache: KVCache | None = None  # generation: keys and values are appended here
    packed: PackedPrompt | None = None  # shared prompt rows: attention tells prompt and batch apart


@dataclass
class ForwardCache:
    """What `Transformer.backward` reads, from `forward(..., keep_cache=True)`."""

    ctx: Context
    kind: str | None  # "prompt", "prefix" or None (no adapter)
    num_virtual_tokens: int  # P (0 without an adapter)
    length: int  # L: the rows per sequence the layers saw (P + T after a prepended prompt)
    embed: object  # the embedding stage's cache
    blocks: list  # one cache per layer
    final: object  # the final norm's cache


def _as_ids(input_ids, vocab_size):
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
        raise ValueError(f"input_ids: expected shape [B, T] with B, T >= 1, got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"input_ids: expected integer token ids, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"input_ids: token ids must be in [0, {vocab_size}), got range [{ids.min()}, {ids.max()}]")
    return ids.astype(np.int64, copy=False)


def _as_mask(attention_mask, shape):
    if attention_mask is None:
        return np.ones(shape, dtype=bool)
    m = np.asarray(attention_mask)
    if m.ndim == 1:
        m = m[None]
    if m.shape != shape:
        raise ValueError(f"attention_mask: expected shape {list(shape)} like input_ids, got {m.shape}")
    if m.dtype != bool:
        if not np.isin(m, (0, 1)).all():
            raise ValueError("attention_mask: expected 0/1 (or bool) values")
        m = m.astype(bool)
    return m


class Transformer:
    """A frozen pretrained transformer. Subclasses implement the embedding stage, one block and
    the final norm, each forward beside its backward; this class runs them with adapters."""

    config: ModelConfig
    tokenizer = None
    chat_template: ChatTemplate | None = None  # from tokenizer_config.json or the GGUF (models/loading.py)

    embed: np.ndarray  # token embeddings [V, C]

    # Prompt tuning of a causal model: the P prompt rows attend only to themselves, so they are the
    # same for every example. They run once, packed with the batch's rows for the row-wise layers,
    # and their keys/values serve the batch as a prefix: B*T + P rows instead of B*(P+T), the same
    # result. False: the plain way (the prompt prepended to every row).
    share_prompt_rows = True

    # -- per architecture ---------------------------------------------------------------

    def embed_forward(self, x, ctx):  # x [B, L, C] token (+ prompt) embeddings -> h, cache
        return x, None

    def embed_backward(self, dh, cache, ctx):
        return dh

    def block_forward(self, i, h, ctx):  # -> h, cache
        raise NotImplementedError

    def block_backward(self, i, dh, cache, ctx):  # -> dh, dprefix_k, dprefix_v
        raise NotImplementedError

    def final_forward(self, h):  # -> h, cache
        return h, None

    def final_backward(self, dh, cache):
        return dh

    def output_embeddings(self):  # the LM head's weight [V, C]
        raise NotImplementedError

    def prepare(self, ctx, dtype):  # per-architecture tables for this forward (RoPE, ...)
        pass

    def attention_scale(self, i):
        """Layer i's score factor (None: the ops' default 1 / sqrt(head_dim))."""
        c = self.config
        if c.attention_scale is None and not c.attention_scale_by_layer:
            return None
        scale = c.head_dim**-0.5 if c.attention_scale is None else c.attention_scale
        return scale / (i + 1) if c.attention_scale_by_layer else scale

    def attention_softcap(self, i):
        """Layer i's attention-logit soft-capping constant (None: none; see ops.prefix_attention_forward)."""
        return self.config.attn_logit_softcapping

    def attention_options(self, i):
        """Layer i's keyword arguments to the attention ops: window, scale, softcap."""
        return dict(window=self.attention_window(i), scale=self.attention_scale(i), softcap=self.attention_softcap(i))

    def attention_window(self, i):
        """Layer i's sliding window (keys a query sees, itself included; see ops'
        prefix_attention_forward), or None for full attention."""
        return None

    @property
    def position_limit(self):
        """The positions a sequence may use, virtual tokens included (a learned position table's
        rows: GPT-2, BERT), or None where positions are computed (RoPE)."""
        table = getattr(self, "wpe", None)
        return None if table is None else table.shape[0]

    def kv_cache_limit(self):
        """The sequence length (positions) up to which keys cached by an earlier forward equal the
        keys a recomputation gives, or None when always (generation recomputes past it)."""
        return None

    # -- shared -------------------------------------------------------------------------
    @property
    def dtype(self):
        return self.embed.dtype

    def embed_tokens(self, ids):
        """ids [B, T] -> token embeddings [B, T, C] (a gather: the table is not copied)."""
        return self.embed[ids]

    def num_parameters(self):
        """Frozen parameters, each shared (tied) array counted once and views of another weight
        (Llama's q inside the stacked qkv) not at all."""
        arrays = {id(a): a for a in self.arrays()}
        return sum(a.size for a in arrays.values() if not (a.base is not None and id(a.base) in arrays))

    def arrays(self):
        """Every frozen weight array."""
        out = []

        def walk(v):
            if isinstance(v, (np.ndarray, QuantizedWeight)):
                out.append(v)
            elif isinstance(v, list):
                for x in v:
                    walk(x)
            elif isinstance(v, dict):
                for x in v.values():
                    walk(x)

        for name, value in self.__dict__.items():
            if name not in ("config", "tokenizer", "chat_template"):
                walk(value)
        return out

    def attention(self, i, q, k, v, ctx):
        """The layer's attention through the C++ core: q [B, L, H, D], k/v [B, L, Hkv, D].
        With a KV cache in ctx (generation), k/v are appended to the layer's cached keys first and
        the queries attend to all of them (the causal rule with S > T)."""
        if ctx.packed is not None:
            return self._packed_attention(i, q, k, v, ctx)
        pk, pv = self._layer_prefix(i, ctx, q.dtype)
        if ctx.kv_cache is not None:
            cached = ctx.kv_cache.layers
            if i in cached:
                k = np.concatenate([cached[i][0], k], axis=1)
                v = np.concatenate([cached[i][1], v], axis=1)
            cached[i] = (k, v)
        return ops.prefix_attention_forward(q, k, v, pk, pv, causal=self.config.causal, key_padding_mask=ctx.key_mask,
                                            **self.attention_options(i))

    def attention_backward(self, i, dout, q, k, v, out, lse, ctx):
        """-> dq [B, L, H, D], dk, dv [B, L, Hkv, D], and the layer's prefix gradient (float64)."""
        if ctx.packed is not None:
            return self._packed_attention_backward(i, dout, q, k, v, out, lse, ctx)
        pk, pv = self._layer_prefix(i, ctx, q.dtype)
        return _attention_backward_rows(dout, q, k, v, pk, pv, out, lse, self.config.causal, ctx.key_mask,
                                        **self.attention_options(i))

    # Packed rows: q/k/v [1, P + B*T + R*E, heads, D]: the prompt's P rows, the batch's, then the
    # continuations'. The prompt attends to itself (causal); the batch attends to the prompt's
    # keys/values (or the layer's prefix) as a prefix, which is exactly what it sees when the prompt
    # is prepended to every row; a continuation row attends to its sequence's keys, gathered
    # (virtual ones included), then to its own. One pass, so the row-wise layers (norms,
    # projections, MLP) run once over every row: a GEMM over all of them, not a second small one.
    def _packed_parts(self, a, packed):
        """a [1, N, heads, D] -> prompt rows [1, P, ...], batch [B, T, ...], continuation [R, E, ...]."""
        P, B, T = packed.num_virtual_tokens, packed.batch, packed.length
        R, E = packed.continuation_shape
        n = P + B * T
        return a[:, :P], a[0, P:n].reshape(B, T, *a.shape[2:]), a[0, n:n + R * E].reshape(R, E, *a.shape[2:])

    def _continuation_keys(self, layout, g, width, k_main, k_own):
        """Group g's keys: its rows' last `width` past keys gathered from k_main [P + B*T, Hkv, D],
        then their own k_own [R, E, Hkv, D] -> [r, width + E, Hkv, D] and the key mask."""
        own_mask = np.ones(k_own.shape[:2], dtype=bool) if layout.own_mask is None else layout.own_mask
        cut = layout.index.shape[1] - width
        return (np.concatenate([k_main[layout.index[g, cut:]], k_own[g]], axis=1),
                np.concatenate([layout.index_mask[g, cut:], own_mask[g]], axis=1))

    def _packed_attention(self, i, q, k, v, ctx):
        packed, kw = ctx.packed, self.attention_options(i)
        P, B, T = packed.num_virtual_tokens, packed.batch, packed.length
        (qp, qb, qc), (kp, kb, kc), (vp, vb, vc) = (self._packed_parts(a, packed) for a in (q, k, v))
        pk, pv = self._layer_prefix(i, ctx, q.dtype)  # prefix tuning's; empty otherwise
        out_p = lse_p = out_b = lse_b = None
        if P:
            out_p, lse_p = ops.prefix_attention_forward(qp, kp, vp, pk, pv, causal=True, **kw)
        if B:  # the prompt's keys and values (P > 0) or the layer's prefix, before every row's own
            bk, bv = (kp[0], vp[0]) if P else (pk, pv)
            out_b, lse_b = ops.prefix_attention_forward(qb, kb, vb, bk, bv, causal=True,
                                                        key_padding_mask=packed.key_mask, **kw)
        out_c, lse_c = np.zeros_like(qc), []
        layout = packed.continuation
        if layout is not None:
            k_main, v_main = k[0, :P + B * T], v[0, :P + B * T]
            for g, width in layout.groups:
                kg, mask = self._continuation_keys(layout, g, width, k_main, kc)
                vg, _ = self._continuation_keys(layout, g, width, v_main, vc)
                out_c[g], lse = ops.prefix_attention_forward(qc[g], kg, vg, pk, pv, causal=True, key_padding_mask=mask,
                                                             **kw)
                lse_c.append(lse)
        parts = [a.reshape(-1, *a.shape[2:]) for a in (out_p, out_b, out_c) if a is not None]
        return np.concatenate(parts)[None], (lse_p, lse_b, lse_c)

    def _packed_attention_backward(self, i, dout, q, k, v, out, lse, ctx):
        packed, kw = ctx.packed, self.attention_options(i)
        P, B, T = packed.num_virtual_tokens, packed.batch, packed.length
        (qp, qb, qc), (kp, kb, kc), (vp, vb, vc), (op, ob, oc), (dp, db, dc) = (
            self._packed_parts(a, packed) for a in (q, k, v, out, dout))
        lse_p, lse_b, lse_c = lse
        pk, pv = self._layer_prefix(i, ctx, q.dtype)
        n = P + B * T
        dq, dk, dv = np.zeros_like(q[0]), np.zeros_like(k[0]), np.zeros_like(v[0])
        dprefix_k, dprefix_v = np.zeros(pk.shape), np.zeros(pv.shape)  # float64: the layer prefix's sums
        # The continuations first: what they give the batch's and the prompt's keys is added below,
        # the prompt's share before the sum over processes. float64 sums of float32 rows, in row
        # order: the same whatever rows share the batch.
        past_k, past_v = np.zeros((n, *k.shape[2:])), np.zeros((n, *v.shape[2:]))
        layout = packed.continuation
        if layout is not None:
            R, E = packed.continuation_shape
            dq_c, dk_c, dv_c = (x[n:].reshape(R, E, *x.shape[1:]) for x in (dq, dk, dv))
            k_main, v_main = k[0, :n], v[0, :n]
            for (g, width), lse_g in zip(layout.groups, lse_c):
                kg, mask = self._continuation_keys(layout, g, width, k_main, kc)
                vg, _ = self._continuation_keys(layout, g, width, v_main, vc)
                dq_c[g], dkg, dvg, dpk, dpv = _attention_backward_rows(dc[g], qc[g], kg, vg, pk, pv, oc[g], lse_g,
                                                                       True, mask, **kw)
                dk_c[g], dv_c[g] = dkg[:, width:], dvg[:, width:]
                cut = layout.index.shape[1] - width
                for j, r in enumerate(g):
                    sel = layout.index_mask[r, cut:]
                    idx = layout.index[r, cut:][sel]  # distinct within a row: += adds each once
                    past_k[idx] += dkg[j, :width][sel]
                    past_v[idx] += dvg[j, :width][sel]
                dprefix_k += dpk
                dprefix_v += dpv
        if B:
            bk, bv = (kp[0], vp[0]) if P else (pk, pv)
            dq_b, dk_b, dv_b, dbk, dbv = _attention_backward_rows(db, qb, kb, vb, bk, bv, ob, lse_b, True,
                                                                  packed.key_mask, **kw)
            dk_b += past_k[P:].reshape(dk_b.shape).astype(dk_b.dtype)
            dv_b += past_v[P:].reshape(dv_b.shape).astype(dv_b.dtype)
            dq[P:n], dk[P:n], dv[P:n] = (x.reshape(B * T, *x.shape[2:]) for x in (dq_b, dk_b, dv_b))
        else:
            dbk, dbv = np.zeros(kp.shape[1:]) if P else np.zeros(pk.shape), np.zeros(vp.shape[1:]) if P else np.zeros(pv.shape)
        if P:
            dq_p, dk_p, dv_p, dpk, dpv = ops.prefix_attention_backward(dp, qp, kp, vp, pk, pv, op, lse_p, causal=True,
                                                                       **kw)
            dbk, dbv = dbk + past_k[:P], dbv + past_v[:P]  # what the batch and continuations give the prompt
            if packed.prompt_sum is not None:  # data parallelism: what every process's rows give the prompt
                dbk, dbv = np.split(packed.prompt_sum(np.concatenate([dbk.reshape(-1), dbv.reshape(-1)])), 2)
            dk_p[0] += dbk.reshape(dk_p.shape[1:]).astype(dk_p.dtype)  # the prompt's keys and values also
            dv_p[0] += dbv.reshape(dv_p.shape[1:]).astype(dv_p.dtype)  # served every row of the batch
            dq[:P], dk[:P], dv[:P] = dq_p[0], dk_p[0], dv_p[0]
        else:
            dprefix_k += dbk
            dprefix_v += dbv
        return dq[None], dk[None], dv[None], dprefix_k, dprefix_v

    def _layer_prefix(self, i, ctx, dtype):
        c = self.config
        if ctx.prefix is None:
            empty = np.zeros((0, c.num_kv_heads, c.head_dim), dtype=dtype)
            return empty, empty
        return ctx.prefix[i, 0], ctx.prefix[i, 1]

    def forward(self, input_ids, attention_mask=None, *, adapter=None, inputs_embeds=None, token_type_ids=None,
                keep_cache=False, keep_virtual=False, continuations=None):
        """Hidden states after the final norm for the T input tokens.

        input_ids [B, T] (or inputs_embeds [B, T, C] instead), attention_mask [B, T] (1 = real
        token; left or right padding). adapter: a PromptTuning, PrefixTuning or PrefixProjection
        (or None). token_type_ids [B, T] (BERT only; default 0).
        -> hidden [B, T, C] (with keep_virtual and prompt tuning: [B, P+T, C], the prompt's rows
        first), and with keep_cache the ForwardCache for `backward`.
        Where `shares_prompt_rows(adapter)`, inputs_embeds may hold B = 0 rows: the prompt's rows
        alone (a data-parallel process without rows of its own; see `backward`).
        continuations (causal models, right-padded batches): a Continuations; then hidden is the
        pair (hidden [B, T, C], the continuation rows' hidden [R, E, C]), from one pass.
        """
        if continuations is not None:
            if inputs_embeds is not None or token_type_ids is not None or keep_virtual:
                raise ValueError("continuations: take input_ids (not inputs_embeds), no token_type_ids, no keep_virtual")
            ids = _as_ids(input_ids, self.config.vocab_size)
            return self._forward_packed(adapter, self.embed_tokens(ids), _as_mask(attention_mask, ids.shape),
                                        keep_cache, False, continuations)
        shared = token_type_ids is None and self.shares_prompt_rows(adapter)
        if inputs_embeds is None:
            x = self.embed_tokens(_as_ids(input_ids, self.config.vocab_size))
        else:
            x = self._as_rows("inputs_embeds", inputs_embeds, allow_empty_batch=shared)
        B, T = x.shape[:2]
        mask = _as_mask(attention_mask, (B, T))
        if shared:
            return self._forward_packed(adapter, x, mask, keep_cache, keep_virtual)
        kind, P, x, ctx = self.inject(adapter, x, mask)
        if token_type_ids is not None:
            types = np.asarray(token_type_ids, dtype=np.int64).reshape(B, T)
            if kind == "prompt":
                types = np.concatenate([np.zeros((B, P), dtype=np.int64), types], axis=1)
            ctx.token_type_ids = types
        h, embed_cache, caches, final_cache = self.run(x, ctx, keep_cache)
        if kind == "prompt" and not keep_virtual:
            h = h[:, P:]
        if not keep_cache:
            return h
        return h, ForwardCache(ctx, kind, P, x.shape[1], embed_cache, caches, final_cache)

    def _forward_packed(self, adapter, x, mask, keep_cache, keep_virtual, continuations=None):
        """forward with packed rows (see PackedPrompt): prompt tuning of a causal model (see
        share_prompt_rows), and any forward with continuations. The prompt's rows, the batch's and
        the continuations' run as one sequence [1, P + B*T + R*E, C], so every row-wise layer runs
        once over all of them; only attention tells them apart."""
        kind, P, prompt, prefix = _adapter_parts(adapter, self, x.dtype)
        rows_p = P if kind == "prompt" else 0  # the prompt's own rows (a prefix has none)
        B, T, C = x.shape
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0) + P  # input tokens follow the virtual ones
        rows, positions = [x.reshape(B * T, C)], [pos.reshape(-1)]
        if rows_p:
            rows.insert(0, prompt)
            positions.insert(0, np.arange(P))
        packed = PackedPrompt(rows_p, B, T, None if mask.all() else mask)
        if continuations is not None:
            xc, cpos, packed.continuation = self._continuation_rows(continuations, mask, pos, rows_p)
            packed.continuation_shape = xc.shape[:2]
            rows.append(xc.reshape(-1, C))
            positions.append(cpos.reshape(-1))
        ctx = Context(positions=np.concatenate(positions)[None], key_mask=None, prefix=prefix, packed=packed)
        h, embed_cache, caches, final_cache = self.run(np.concatenate(rows)[None], ctx, keep_cache)
        out = h[0, rows_p:rows_p + B * T].reshape(B, T, C)
        if keep_virtual and rows_p:
            out = np.concatenate([np.broadcast_to(h[:, :P], (B, P, C)), out], axis=1)
        if continuations is not None:
            out = (out, h[0, rows_p + B * T:].reshape(*packed.continuation_shape, C))
        if not keep_cache:
            return out
        return out, ForwardCache(ctx, kind, P, T + rows_p, embed_cache, caches, final_cache)

    def _continuation_rows(self, cont, mask, pos, rows_p):
        """Continuations -> (their embeddings [R, E, C], positions [R, E], ContinuationLayout)."""
        if not self.config.causal:
            raise ValueError("continuations: need a causal model")
        if not isinstance(cont, Continuations):
            raise TypeError(f"continuations: expected a Continuations, got {type(cont).__name__}")
        B, T = mask.shape
        rows = np.asarray(cont.rows, dtype=np.int64)
        if np.ndim(cont.ids) != 2 or np.size(cont.ids) == 0:
            raise ValueError(f"continuations: ids expected [R, E] with R, E >= 1 (no rows: pass None), got shape "
                             f"{np.shape(cont.ids)}")
        xc = self.embed_tokens(_as_ids(cont.ids, self.config.vocab_size))
        R, E = xc.shape[:2]
        own = _as_mask(cont.mask, (R, E))
        if rows.shape != (R,) or (R and (rows.min() < 0 or rows.max() >= B)):
            raise ValueError(f"continuations: expected {R} rows in [0, {B}), got {rows.tolist()}")
        if any(m.any() and not m[:m.sum()].all() for m in mask):
            raise ValueError("attention_mask: continuations need a right-padded batch")
        if any(not m[:m.sum()].all() for m in own):
            raise ValueError("continuations: mask expected right-padded rows (True first)")
        nxt = np.where(mask, pos, -1).max(axis=1) + 1  # after each sequence's last real token
        cpos = nxt[rows][:, None] + np.maximum(np.cumsum(own, axis=1) - 1, 0)
        # Past keys of row r: the prompt's rows, then its sequence's real ones, left-padded to the
        # batch's width (so a row computes the same whatever batch it is in).
        lengths = rows_p + mask.sum(axis=1)[rows]
        S = rows_p + T
        index, index_mask = np.zeros((R, S), dtype=np.int64), np.zeros((R, S), dtype=bool)
        for r, b in enumerate(rows):
            slots = np.concatenate([np.arange(rows_p), rows_p + b * T + np.flatnonzero(mask[b])])
            index[r, S - len(slots):], index_mask[r, S - len(slots):] = slots, True
        windowed = any(self.attention_window(i) for i in range(self.config.num_layers))
        if windowed:  # a window counts key slots: group equal pasts and cut all their padding
            groups = [(np.flatnonzero(lengths == n), int(n)) for n in np.unique(lengths)]
        else:
            groups = [(np.arange(R), S)]
        layout = ContinuationLayout(index, index_mask, None if own.all() else own, groups)
        return xc, cpos, layout

    def _backward_packed(self, dhidden, cache, prompt_sum, dcontinuation=None):
        """backward of _forward_packed (prompt_sum: see `backward`)."""
        ctx = cache.ctx
        packed = ctx.packed
        rows_p, B, T = packed.num_virtual_tokens, packed.batch, packed.length
        R, E = packed.continuation_shape
        if dhidden.shape[:2] not in ((B, T), (B, rows_p + T)):
            raise ValueError(f"dhidden: expected shape [{B}, {T}, C] (or [{B}, {rows_p + T}, C] after keep_virtual) "
                             f"like forward's output, got {dhidden.shape}")
        if (dcontinuation is None) != (packed.continuation is None):
            raise ValueError("dcontinuation: give the continuation rows' gradient [R, E, C] exactly when the "
                             "forward had continuations")
        C = dhidden.shape[2]
        dh = np.zeros((1, rows_p + B * T + R * E, C), dtype=dhidden.dtype)
        top = np.zeros((rows_p, C))  # keep_virtual: the prompt rows' output gradient, summed over the batch
        if dhidden.shape[1] == rows_p + T and rows_p:
            top = dhidden[:, :rows_p].sum(axis=0, dtype=np.float64)
            dhidden = dhidden[:, rows_p:]
        if prompt_sum is not None:
            top = prompt_sum(top.reshape(-1)).reshape(rows_p, C)
        dh[0, :rows_p] = top
        dh[0, rows_p:rows_p + B * T] = dhidden.reshape(B * T, C)
        if dcontinuation is not None:
            dc = self._as_rows("dcontinuation", dcontinuation, allow_empty_batch=True)
            if dc.shape[:2] != (R, E):
                raise ValueError(f"dcontinuation: expected shape [{R}, {E}, C], got {dc.shape}")
            dh[0, rows_p + B * T:] = dc.reshape(R * E, C)
        packed.prompt_sum = prompt_sum
        dprefix = None if cache.kind != "prefix" else np.zeros(ctx.prefix.shape, dtype=np.float64)
        try:
            dh = self.final_backward(dh, cache.final)
            for i in reversed(range(self.config.num_layers)):
                dh, dpk, dpv = self.block_backward(i, dh, cache.blocks[i], ctx)
                if dprefix is not None:
                    dprefix[i, 0], dprefix[i, 1] = dpk, dpv
        finally:
            packed.prompt_sum = None
        dx = self.embed_backward(dh, cache.embed, ctx)
        grads = {"inputs_embeds": dx[0, rows_p:rows_p + B * T].reshape(B, T, C)}
        if cache.kind == "prompt":
            grads["prompt"] = dx[0, :rows_p]
        elif dprefix is not None:
            grads["prefix"] = dprefix
        return grads

    def _as_rows(self, name, x, allow_empty_batch=False):
        """x as a C-ordered [B, T, hidden_size] array in the model's dtype (the kernels take no
        other), or a ValueError/TypeError naming the argument."""
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name}: expected a numpy.ndarray, got {type(x).__name__}")
        # allow_empty_batch: B = 0 (shared prompt rows alone, see forward) is accepted but not advertised
        min_rows = 0 if allow_empty_batch else 1
        if x.ndim != 3 or x.shape[0] < min_rows or x.shape[1] < 1 or x.shape[2] != self.config.hidden_size:
            raise ValueError(f"{name}: expected shape [B, T, {self.config.hidden_size}] with B, T >= 1, got {x.shape}")
        if x.dtype.kind != "f":
            raise TypeError(f"{name}: expected a float array, got dtype {x.dtype}")
        return np.ascontiguousarray(x, dtype=self.dtype)

    def shares_prompt_rows(self, adapter):
        """Whether forward runs adapter's prompt rows once for the batch (see share_prompt_rows)."""
        return self.share_prompt_rows and self.config.causal and _is_prompt(adapter)

    def inject(self, adapter, x, mask):
        """Applies the adapter to token embeddings x [B, T, C] with mask [B, T] (True = real).
        -> (kind, P, the layers' input [B, L, C], their Context). Positions count real tokens from
        0; a prompt takes positions 0..P-1 in front, a prefix shifts the input to start at P."""
        B = x.shape[0]
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        kind, P, prompt, prefix = _adapter_parts(adapter, self, x.dtype)
        if kind == "prompt":
            x = ops.prepend_forward(prompt, x)
            mask = np.concatenate([np.ones((B, P), dtype=bool), mask], axis=1)
            pos = np.concatenate([np.broadcast_to(np.arange(P), (B, P)), pos + P], axis=1)
        elif kind == "prefix":
            pos = pos + P
        return kind, P, x, Context(positions=pos, key_mask=None if mask.all() else mask, prefix=prefix)

    def run(self, x, ctx, keep_cache=False):
        """The layers on embeddings x [B, L, C] (prompt already prepended) for the context ctx.
        -> final hidden [B, L, C], and the caches the backward needs (None without keep_cache)."""
        self.prepare(ctx, x.dtype)
        h, embed_cache = self.embed_forward(x, ctx)
        caches = []
        for i in range(self.config.num_layers):
            h, cache = self.block_forward(i, h, ctx)
            caches.append(cache if keep_cache else None)
        h, final_cache = self.final_forward(h)
        return h, embed_cache, caches, final_cache

    def backward(self, dhidden, cache, prompt_sum=None, dcontinuation=None):
        """Gradients of a scalar loss, given d loss / d hidden [B, T, C] (or [B, P+T, C] for a
        forward with keep_virtual) and the ForwardCache from `forward(..., keep_cache=True)`.

        -> dict with "inputs_embeds" [B, T, C] and, with an adapter, "prompt" [P, C] or "prefix"
        [num_layers, 2, P, Hkv, D] (summed over the batch, mostly in float64: see
        _attention_backward_rows). The frozen weights get no gradient.

        prompt_sum (data parallelism, only where the forward shared the prompt rows, see
        `shares_prompt_rows`): a function that sums a float64 vector over every process holding
        part of the batch (each process calls backward on its own rows, B = 0 included, and the
        calls meet in the same order, whatever it is). The shared prompt rows' backward then uses,
        in every layer, what the whole batch gives their keys and values, so "prompt" is the whole
        batch's prompt gradient: the same on every process and the same bits one process computes
        for the whole batch.

        dcontinuation [R, E, C]: d loss / d the continuation rows' hidden states, for a forward with
        continuations (required then, and only then).
        """
        if not isinstance(cache, ForwardCache):
            raise TypeError(f"cache: expected the ForwardCache of forward(..., keep_cache=True), got "
                            f"{type(cache).__name__}")
        packed = cache.ctx.packed is not None
        if prompt_sum is not None and not (packed and cache.kind == "prompt"):  # the other processes would wait
            raise ValueError("prompt_sum: this forward did not share the prompt rows (see shares_prompt_rows)")
        if dcontinuation is not None and not packed:
            raise ValueError("dcontinuation: this forward had no continuations")
        dhidden = self._as_rows("dhidden", dhidden, allow_empty_batch=packed)
        if packed:
            return self._backward_packed(dhidden, cache, prompt_sum, dcontinuation)
        ctx, kind, P = cache.ctx, cache.kind, cache.num_virtual_tokens
        if kind == "prompt" and dhidden.shape[1] != cache.length:  # prompt rows unread: zero grad
            B, T, C = dhidden.shape
            dh = np.zeros((B, P + T, C), dtype=dhidden.dtype)
            dh[:, P:] = dhidden
        else:
            dh = dhidden
        dh = self.final_backward(dh, cache.final)
        dprefix = None
        if kind == "prefix":  # float64: the layers' sums over the batch, unrounded (see _attention_backward_rows)
            dprefix = np.zeros(ctx.prefix.shape, dtype=np.float64)
        for i in reversed(range(self.config.num_layers)):
            dh, dpk, dpv = self.block_backward(i, dh, cache.blocks[i], ctx)
            if dprefix is not None:
                dprefix[i, 0], dprefix[i, 1] = dpk, dpv
        dx = self.embed_backward(dh, cache.embed, ctx)
        grads = {}
        if kind == "prompt":  # per row, summed in float64 like the prefix (_attention_backward_rows)
            rows, dx = ops.prepend_backward(dx, P, shared=False)
            grads["prompt"] = rows.sum(axis=0, dtype=np.float64)
        elif kind == "prefix":
            grads["prefix"] = dprefix
        grads["inputs_embeds"] = dx
        return grads

    def logits(self, input_ids, attention_mask=None, *, adapter=None):
        """LM logits for the T input tokens (not the virtual ones).  -> float32 [B, T, vocab]."""
        h = self.forward(input_ids, attention_mask, adapter=adapter)
        return self.lm_logits(h).astype(np.float32, copy=False)

    def lm_logits(self, h):
        """The LM head: h [..., C] -> logits [..., V] in the model's dtype, soft-capped where the
        config says so (final_logit_softcapping)."""
        logits = nn.linear(h, self.output_embeddings())
        nn.softcap(logits, self.config.final_logit_softcapping)
        return logits

    def astype(self, dtype):
        """A copy of the model with every weight cast (float64 for gradient checks)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._cast(np.dtype(dtype))
        return new

    def _cast(self, dtype):
        """Casts every weight attribute (arrays, lists and dicts of arrays) in place."""
        def cast(v):
            if isinstance(v, np.ndarray) and v.dtype.kind == "f":
                return v.astype(dtype)
            if isinstance(v, (QuantizedWeight, StackedWeight)) and dtype != v.dtype:  # float32 keeps the blocks
                return v.dequantize(dtype)
            if isinstance(v, list):
                return [cast(x) for x in v]
            if isinstance(v, dict):
                return {k: cast(x) for k, x in v.items()}
            return v

        for name, value in list(self.__dict__.items()):
            if name not in ("config", "tokenizer", "chat_template"):
                self.__dict__[name] = cast(value)


def _attention_backward_rows(dout, q, k, v, pk, pv, out, lse, causal, mask, **kw):
    """The attention backward with a shared prefix's gradient summed over the batch in float64:
    the prefix goes to the kernel per row, so its gradient comes per row. A float64 sum of n
    float32 rows does not round unless their magnitudes span more than about 2^(29 - log2 n), so
    any split of the batch, over micro-batches or MPI ranks, practically always sums to the same
    bits (and otherwise differs by one float64 ulp, which the float32 cast nearly always hides).
    kw: the layer's attention_options. -> dq, dk, dv, dpk, dpv (float64)."""
    B, P = q.shape[0], pk.shape[0]
    if pk.ndim == 4 or P == 0:  # per-row or no prefix: nothing to sum
        return ops.prefix_attention_backward(dout, q, k, v, pk, pv, out, lse, causal=causal, key_padding_mask=mask,
                                             **kw)
    rows = lambda a: np.broadcast_to(a, (B, *a.shape))  # noqa: E731
    dq, dk, dv, dpk, dpv = ops.prefix_attention_backward(dout, q, k, v, rows(pk), rows(pv), out, lse, causal=causal,
                                                         key_padding_mask=mask, **kw)
    return dq, dk, dv, dpk.sum(axis=0, dtype=np.float64), dpv.sum(axis=0, dtype=np.float64)


def _is_prompt(adapter):
    return adapter is not None and getattr(adapter, "kind", None) == "prompt"


def _adapter_parts(adapter, model, dtype):
    """-> (kind, P, prompt [P, C] or None, prefix [L, 2, P, Hkv, D] or None) in the model's dtype."""
    if adapter is None:
        return None, 0, None, None
    check = getattr(adapter, "check_model", None)
    if check is None:
        raise TypeError(f"adapter: expected a PromptTuning or PrefixTuning, got {type(adapter).__name__}")
    check(model)
    if adapter.kind == "prompt":
        prompt = adapter.prompt_matrix().astype(dtype, copy=False)
        return "prompt", prompt.shape[0], prompt, None
    prefix = adapter.prefix_matrix().astype(dtype, copy=False)
    return "prefix", prefix.shape[2], None, np.ascontiguousarray(prefix)
