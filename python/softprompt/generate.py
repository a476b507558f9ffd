"""Text generation for causal models (Llama family, GPT-2) with a KV cache, batched with left padding.

Greedy (temperature 0) or temperature + top-p (nucleus) sampling; stop tokens end a row. With prompt
tuning the virtual tokens are the first P rows of the cache; with prefix tuning every layer's prefix
is always visible and the input tokens start at position P, as in training (and in PEFT).
`use_cache=False` recomputes the whole sequence at every step: slower, and the tests' reference; a
model whose cached keys would go stale (dynamic NTK RoPE past max_position_embeddings, see
`Transformer.kv_cache_limit`) recomputes too, so the cache never changes the result.
"""

from __future__ import annotations

import numpy as np

from .models import layers as nn
from .models.base import Context, KVCache


def _batch(input_ids, pad_id=0):
    """A list of token-id lists (or an int array [B, T]) -> left-padded ids and mask [B, T]."""
    if isinstance(input_ids, np.ndarray) and input_ids.ndim == 2:
        return input_ids.astype(np.int64), np.ones(input_ids.shape, dtype=bool)
    seqs = [list(s) for s in input_ids]
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("input_ids: expected one or more non-empty token sequences")
    T = max(len(s) for s in seqs)
    ids = np.full((len(seqs), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), T), dtype=bool)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = s
        mask[b, T - len(s):] = True
    return ids, mask


def _pick(logits, temperature, top_p, rng):
    """logits [B, V] -> next token ids [B]."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    out = np.empty(len(p), dtype=np.int64)
    for b in range(len(p)):
        order = np.argsort(-p[b])
        cum = np.cumsum(p[b, order])
        keep = order[: int(np.searchsorted(cum, top_p)) + 1]  # smallest set with mass >= top_p
        q = p[b, keep] / p[b, keep].sum()
        out[b] = keep[rng.choice(len(keep), p=q)]
    return out


def generate(model, input_ids, *, adapter=None, max_new_tokens=32, temperature=0.0, top_p=1.0,
             stop_tokens=(), seed=0, use_cache=True):
    """New tokens for each sequence of `input_ids` (a list of id lists, left-padded here, or an
    int array [B, T]). -> list of lists of generated ids (a stop token ends a row, not included)."""
    if not model.config.causal:
        raise ValueError("model: generation needs a causal (decoder) model")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature >= 0 and 0 < top_p <= 1 expected, got {temperature}, {top_p}")
    ids, mask = _batch(input_ids)
    windowed = any(model.attention_window(i) for i in range(model.config.num_layers))
    if windowed and adapter is not None and not mask.all():
        # A sliding window counts key slots: left padding would move the virtual tokens out of a
        # query's window sooner, so padded rows run one by one (a sequence's tokens never depend on
        # its batch). Sampling draws each row from its own generator, seeded (seed, row).
        rows = [ids[b][mask[b]] for b in range(ids.shape[0])]
        return [generate(model, row[None], adapter=adapter, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_p=top_p, stop_tokens=stop_tokens, seed=[seed, b], use_cache=use_cache)[0]
                for b, row in enumerate(rows)]
    limit = model.kv_cache_limit()
    virtual = 0 if adapter is None else adapter.num_virtual_tokens
    if use_cache and limit is not None and virtual + ids.shape[1] + max_new_tokens > limit:
        use_cache = False  # the cached keys would differ from a recomputation's (kv_cache_limit)
    rng = np.random.default_rng(seed)
    stop = set(int(t) for t in stop_tokens)
    B = ids.shape[0]
    out = [[] for _ in range(B)]
    done = np.zeros(B, dtype=bool)
    if not use_cache:
        for _ in range(max_new_tokens):
            nxt = _pick(model.logits(ids, mask, adapter=adapter)[:, -1], temperature, top_p, rng)
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones((B, 1), dtype=bool)], axis=1)
            if _record(out, done, nxt, stop):
                break
        return out

    # Prefill: the whole prompt once, keeping every layer's keys and values.
    _, _, x, ctx = model.inject(adapter, model.embed_tokens(ids), mask)
    mask = np.ones(x.shape[:2], dtype=bool) if ctx.key_mask is None else ctx.key_mask
    prefix, kv = ctx.prefix, KVCache()
    ctx.kv_cache = kv
    h = model.run(x, ctx)[0]
    pos = ctx.positions
    next_pos = pos[:, -1] + 1
    with nn.decoding():  # a few rows per step: dot products that read each weight once
        for step in range(max_new_tokens):
            nxt = _pick(model.lm_logits(h[:, -1]), temperature, top_p, rng)
            if _record(out, done, nxt, stop) or step == max_new_tokens - 1:
                break
            # One step: the new token against the cache (its key is appended inside attention()).
            mask = np.concatenate([mask, np.ones((B, 1), dtype=bool)], axis=1)
            ctx = Context(positions=next_pos[:, None], key_mask=mask, prefix=prefix, kv_cache=kv)
            h = model.run(model.embed_tokens(nxt[:, None]), ctx)[0]
            next_pos = next_pos + 1
    return out


def _record(out, done, nxt, stop):
    """Appends each unfinished row's token; -> True when every row is finished."""
    for b, t in enumerate(nxt):
        if done[b]:
            continue
        if int(t) in stop:
            done[b] = True
        else:
            out[b].append(int(t))
    return bool(done.all())
