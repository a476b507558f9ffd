"""Losses on top of a frozen model's hidden states, each returning the loss and d loss / d hidden.

- `lm_loss`: causal-LM cross-entropy over a masked subset of target tokens; logits are computed only
  for the selected positions (full vocabulary there, nowhere else).
- `label_word_logits` (+ backward, + `label_word_loss`): the label words' first tokens' logits at one
  answer position per row (never the full vocabulary); `TokenLogProbs`: full-vocabulary log-probabilities of the label
  tokens after the first (rank classification, see train.Task).
- `ClassificationHead`: a linear layer on BERT's pooled output, trained with the adapter.
The full-vocabulary softmax cross-entropy is fused in the C++ core (`ops.softmax_cross_entropy`).
"""

from __future__ import annotations

import numpy as np

from . import ops, reference
from .models import layers as nn


def cross_entropy(logits, labels, total=None):
    """Mean cross-entropy.  logits [N, K], labels [N] -> (loss, dlogits [N, K]). total: divide the
    sum by this instead of N (a shard of a bigger batch: its rows then get the big batch's exact
    gradient)."""
    logp = reference.log_softmax(logits.astype(np.float64))
    n = logits.shape[0]
    total = n if total is None else total
    loss = -logp[np.arange(n), labels].sum() / total
    d = np.exp(logp)
    d[np.arange(n), labels] -= 1.0
    return float(loss), (d / total).astype(logits.dtype)


# Rows of full-vocabulary logits computed at once: bounds the loss's memory (SmolLM2's 49k-word
# vocabulary: ~340 rows) while keeping the two GEMMs near full speed (measured: 64 rows ran at
# 158 GFLOP/s, 256 at 220, 504 at 240 on 2 threads).
LOGITS_CHUNK_BYTES = 64 << 20


def lm_loss(model, hidden, targets, loss_mask, total=None):
    """Next-token loss: hidden [B, T, C] at position t predicts targets[b, t] where loss_mask[b, t].

    targets [B, T] int, loss_mask [B, T] bool. Mean over the selected positions (or the sum divided
    by total, for a shard of a bigger batch).
    -> (loss, dhidden [B, T, C]). Logits exist only for the selected positions, a chunk of rows at
    a time, and their buffer becomes their gradient in place.
    """
    loss_mask = np.asarray(loss_mask, dtype=bool)
    if loss_mask.shape != hidden.shape[:2] or np.shape(targets) != hidden.shape[:2]:
        raise ValueError(f"targets, loss_mask: expected shape {list(hidden.shape[:2])}, got "
                         f"{np.shape(targets)} and {loss_mask.shape}")
    rows = np.flatnonzero(loss_mask)
    n = len(rows)
    if n == 0:
        raise ValueError("loss_mask: selects no token")
    w = model.output_embeddings()  # [V, C]
    labels = np.asarray(targets).reshape(-1)[rows]
    if labels.min() < 0 or labels.max() >= w.shape[0]:
        raise ValueError(f"targets: expected token ids in [0, {w.shape[0]}) at the masked positions")
    C = hidden.shape[-1]
    h = hidden.reshape(-1, C)
    dh = np.zeros_like(h)
    chunks = -(-n * w.shape[0] * hidden.itemsize // LOGITS_CHUNK_BYTES)
    size = -(-n // chunks)
    total = n if total is None else total
    cap = model.config.final_logit_softcapping
    loss = 0.0
    for r0 in range(0, n, size):
        sel = rows[r0:r0 + size]
        logits = nn.linear(h[sel], w)  # [rows, V]
        th = nn.softcap(logits, cap)
        loss += float(ops.softmax_cross_entropy(logits, labels[r0:r0 + size], 1.0 / total).sum())
        dh[sel] = nn.linear_backward(nn.softcap_backward(logits, th), w)
    return loss / total, dh.reshape(hidden.shape)


def _rowwise(a, b):
    """a [N, K] @ b [K, M] computed row by row the same way whatever N (BLAS switches to other
    kernels for small products, so a row's result would depend on how many rows came with it): a
    shard of a batch then gets bitwise the rows the whole batch gets. For the label words' few
    columns only; the cost is nothing next to the model."""
    return np.einsum("nk,km->nm", a, b)


def label_word_logits(model, hidden, positions, label_ids):
    """hidden [B, T, C], positions [B] (the answer position of each row), label_ids [K] (or [B, K],
    one set per row) -> [B, K], soft-capped as the model's LM logits are (final_logit_softcapping)."""
    h = hidden[np.arange(hidden.shape[0]), positions]
    label_ids = np.asarray(label_ids)
    if label_ids.ndim == 2:
        logits = np.einsum("bc,bkc->bk", h, model.output_embeddings()[label_ids])
    else:
        logits = _rowwise(h, model.output_embeddings()[label_ids].T)
    nn.softcap(logits, model.config.final_logit_softcapping)
    return logits


def label_word_logits_backward(model, dlogits, hidden_shape, positions, label_ids, logits=None):
    """label_word_logits' backward: dlogits [B, K] -> dhidden [B, T, C] (zero off the answer
    positions). logits: label_word_logits' output, required when the model soft-caps its logits
    (the cap's derivative is 1 - (logits / cap)^2)."""
    w = model.output_embeddings()
    cap = model.config.final_logit_softcapping
    if cap is not None:
        if logits is None:
            raise ValueError("logits: label_word_logits' output is required for a model with final_logit_softcapping")
        dlogits = dlogits * (1 - np.square(np.asarray(logits, dtype=np.float64) / cap))
    label_ids = np.asarray(label_ids)
    dhidden = np.zeros(hidden_shape, dtype=w.dtype)
    rows = np.arange(hidden_shape[0])
    if label_ids.ndim == 2:
        dhidden[rows, positions] = np.einsum("bk,bkc->bc", dlogits.astype(w.dtype), w[label_ids])
    else:
        dhidden[rows, positions] = _rowwise(dlogits.astype(w.dtype), w[label_ids])
    return dhidden


def label_word_loss(model, hidden, positions, label_ids, labels, total=None):
    """Cross-entropy over the label words' logits at each row's answer position (one-token label
    words; see train.Task for any length). labels [B] in [0, K); total: as in cross_entropy.
    -> (loss, dhidden [B, T, C], logits [B, K])."""
    logits = label_word_logits(model, hidden, positions, label_ids)
    loss, dlogits = cross_entropy(logits, np.asarray(labels), total)
    return loss, label_word_logits_backward(model, dlogits, hidden.shape, positions, label_ids, logits), logits


class TokenLogProbs:
    """log p(targets) under the full vocabulary at selected positions of hidden states, with the
    backward of any weighted sum of them (rank classification: the label tokens after the first).

    hidden [R, T, C], targets [R, T] int, mask [R, T] bool. `.values` [R, T] float64 (0 where not
    selected). The selected rows' softmax - onehot (d(-log p)/d logits) is kept, [n, V] in the
    model's dtype, for `backward`: n is small here (label tokens), so no chunking."""

    def __init__(self, model, hidden, targets, mask):
        self.model, self.shape = model, hidden.shape
        self.rows = np.flatnonzero(np.asarray(mask, dtype=bool))
        w = model.output_embeddings()
        h = hidden.reshape(-1, hidden.shape[-1])[self.rows]
        self.grad = nn.linear(h, w)  # [n, V] logits, then d(-log p) / d(raw logits) in place
        th = nn.softcap(self.grad, model.config.final_logit_softcapping)
        nll = ops.softmax_cross_entropy(self.grad, np.asarray(targets).reshape(-1)[self.rows], 1.0)
        nn.softcap_backward(self.grad, th)
        self.values = np.zeros(hidden.shape[:2])
        self.values.reshape(-1)[self.rows] = -nll

    def backward(self, dvalues):
        """dvalues [R, T] (d loss / d values) -> dhidden [R, T, C]."""
        g = self.grad * (-np.asarray(dvalues).reshape(-1)[self.rows])[:, None].astype(self.grad.dtype)
        dh = np.zeros((self.shape[0] * self.shape[1], self.shape[2]), dtype=self.grad.dtype)
        dh[self.rows] = nn.linear_backward(g, self.model.output_embeddings())
        return dh.reshape(self.shape)


class ClassificationHead:
    """logits = pooled @ weight.T + bias on an encoder's pooled output (BERT's tanh(dense(h[:, 0]))),
    trained beside the adapter; PEFT's `classifier` of BertForSequenceClassification. Init: normal
    with std 0.02 (BERT's initializer_range), zero bias."""

    def __init__(self, hidden_size, num_labels, seed=0):
        rng = np.random.default_rng(seed)
        self.weight = (rng.standard_normal((num_labels, hidden_size)) * 0.02).astype(np.float32)
        self.bias = np.zeros(num_labels, dtype=np.float32)

    def parameters(self):
        return {"classifier.weight": self.weight, "classifier.bias": self.bias}

    def logits(self, pooled):
        """pooled [B, C] -> [B, K], row by row (a row's result does not depend on its batch)."""
        return _rowwise(pooled, self.weight.T) + self.bias

    def loss(self, pooled, labels, total=None):
        """pooled [B, C], labels [B] in [0, K) -> (loss, dpooled [B, C], grads {name: array, float64},
        logits [B, K]). total: as in cross_entropy. The weight's gradient sums the rows' outer
        products in float64 (exact for float32 rows), so any split of the batch gives the same sum."""
        logits = self.logits(pooled)
        loss, dlogits = cross_entropy(logits, np.asarray(labels), total)
        grads = {"classifier.weight": np.einsum("nk,nc->kc", dlogits.astype(np.float64), pooled.astype(np.float64)),
                 "classifier.bias": dlogits.sum(0, dtype=np.float64)}
        return loss, _rowwise(dlogits, self.weight), grads, logits
