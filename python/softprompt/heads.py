"""Losses on top of a frozen model's hidden states, each returning the loss and d loss / d hidden.

- `lm_loss`: causal-LM cross-entropy over a masked subset of target tokens; logits are computed only
  for the selected positions (full vocabulary there, nowhere else).
- `label_word_loss`: verbalizer classification: the logits of the label words only, at one answer
  position per row (never the full vocabulary).
- `ClassificationHead`: a linear layer on BERT's pooled output, trained with the adapter.
"""

from __future__ import annotations

import numpy as np


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def cross_entropy(logits, labels):
    """Mean cross-entropy.  logits [N, K], labels [N] -> (loss, dlogits [N, K])."""
    logp = _log_softmax(logits.astype(np.float64))
    n = logits.shape[0]
    loss = -logp[np.arange(n), labels].mean()
    d = np.exp(logp)
    d[np.arange(n), labels] -= 1.0
    return float(loss), (d / n).astype(logits.dtype)


def lm_loss(model, hidden, targets, loss_mask):
    """Next-token loss: hidden [B, T, C] at position t predicts targets[b, t] where loss_mask[b, t].

    targets [B, T] int, loss_mask [B, T] bool. Mean over the selected positions.
    -> (loss, dhidden [B, T, C]).
    """
    loss_mask = np.asarray(loss_mask, dtype=bool)
    if loss_mask.shape != hidden.shape[:2] or np.shape(targets) != hidden.shape[:2]:
        raise ValueError(f"targets, loss_mask: expected shape {list(hidden.shape[:2])}, got "
                         f"{np.shape(targets)} and {loss_mask.shape}")
    if not loss_mask.any():
        raise ValueError("loss_mask: selects no token")
    w = model.output_embeddings()  # [V, C]
    h = hidden[loss_mask]  # [N, C]
    loss, dlogits = cross_entropy(h @ w.T, np.asarray(targets)[loss_mask])
    dhidden = np.zeros_like(hidden)
    dhidden[loss_mask] = dlogits @ w
    return loss, dhidden


def label_word_logits(model, hidden, positions, label_ids):
    """hidden [B, T, C], positions [B] (the answer position of each row), label_ids [K] -> [B, K]."""
    h = hidden[np.arange(hidden.shape[0]), positions]
    return h @ model.output_embeddings()[np.asarray(label_ids)].T


def label_word_loss(model, hidden, positions, label_ids, labels):
    """Cross-entropy over the K label words at each row's answer position.
    labels [B] in [0, K). -> (loss, dhidden [B, T, C], logits [B, K])."""
    w = model.output_embeddings()[np.asarray(label_ids)]  # [K, C]
    rows = np.arange(hidden.shape[0])
    logits = hidden[rows, positions] @ w.T
    loss, dlogits = cross_entropy(logits, np.asarray(labels))
    dhidden = np.zeros_like(hidden)
    dhidden[rows, positions] = dlogits @ w
    return loss, dhidden, logits


class ClassificationHead:
    """logits = pooled @ weight.T + bias on BERT's pooled output; trainable beside the adapter."""

    def __init__(self, hidden_size, num_labels, seed=0):
        rng = np.random.default_rng(seed)
        self.weight = (rng.standard_normal((num_labels, hidden_size)) * 0.02).astype(np.float32)
        self.bias = np.zeros(num_labels, dtype=np.float32)

    def parameters(self):
        return {"classifier.weight": self.weight, "classifier.bias": self.bias}

    def loss(self, pooled, labels):
        """pooled [B, C], labels [B] -> (loss, dpooled, grads {name: array}, logits)."""
        logits = pooled @ self.weight.T + self.bias
        loss, dlogits = cross_entropy(logits, np.asarray(labels))
        grads = {"classifier.weight": dlogits.T @ pooled, "classifier.bias": dlogits.sum(0)}
        return loss, dlogits @ self.weight, grads, logits
