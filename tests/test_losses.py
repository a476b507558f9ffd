"""The losses (softprompt.losses) against float64 finite differences and their own plain forms."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import numeric_sample, tiny_llama
from softprompt import losses


def test_lm_and_label_word_losses_match_finite_differences(rng):
    model = tiny_llama(rng).astype(np.float64)
    hidden = rng.standard_normal((2, 5, model.config.hidden_size))
    targets = rng.integers(0, model.config.vocab_size, (2, 5))
    mask = np.array([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]], dtype=bool)
    loss, d = losses.lm_loss(model, hidden, targets, mask)
    logits = hidden @ model.output_embeddings().T
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    assert loss == pytest.approx(-logp[mask, targets[mask]].mean(), rel=1e-10)
    idx, numeric = numeric_sample(lambda: losses.lm_loss(model, hidden, targets, mask)[0], hidden, rng=rng)
    np.testing.assert_allclose(d.reshape(-1)[idx], numeric, rtol=1e-5, atol=1e-8)
    pos, labels_ids, labels = np.array([4, 1]), np.array([5, 9]), np.array([1, 0])
    loss, d, lg = losses.label_word_loss(model, hidden, pos, labels_ids, labels)
    np.testing.assert_allclose(lg, logits[[0, 1], pos][:, labels_ids], rtol=1e-10)
    idx, numeric = numeric_sample(lambda: losses.label_word_loss(model, hidden, pos, labels_ids, labels)[0], hidden, rng=rng)
    np.testing.assert_allclose(d.reshape(-1)[idx], numeric, rtol=1e-5, atol=1e-8)


def test_lm_loss_chunks_agree(monkeypatch, rng):
    model = tiny_llama(rng)
    hidden = rng.standard_normal((3, 7, model.config.hidden_size)).astype(np.float32)
    targets = rng.integers(0, model.config.vocab_size, (3, 7))
    mask = rng.random((3, 7)) < 0.7
    whole = losses.lm_loss(model, hidden, targets, mask)
    monkeypatch.setattr(losses, "LOGITS_CHUNK_BYTES", 3 * model.config.vocab_size * 4)  # 3 rows a chunk
    chunked = losses.lm_loss(model, hidden, targets, mask)
    assert chunked[0] == pytest.approx(whole[0], rel=1e-6)  # BLAS may round differently per chunk
    np.testing.assert_allclose(chunked[1], whole[1], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="targets: expected token ids"):
        losses.lm_loss(model, hidden, np.full((3, 7), model.config.vocab_size), mask)
