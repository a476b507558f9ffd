"""The losses (softprompt.losses) against float64 finite differences and their own plain forms."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import numeric_sample, tiny_llama
from softprompt import losses


def test_lm_loss_and_label_word_logits_match_finite_differences(rng):
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
    pos, labels = np.array([4, 1]), np.array([1, 0])
    for label_ids in (np.array([5, 9]), np.array([[5, 9], [7, 2]])):  # one set, or one per row
        want = logits[[0, 1], pos][:, label_ids] if label_ids.ndim == 1 else \
            np.take_along_axis(logits[[0, 1], pos], label_ids, axis=1)

        def loss_of():
            return losses.cross_entropy(losses.label_word_logits(model, hidden, pos, label_ids), labels)

        lg = losses.label_word_logits(model, hidden, pos, label_ids)
        np.testing.assert_allclose(lg, want, rtol=1e-10)
        d = losses.label_word_logits_backward(model, loss_of()[1], hidden.shape, pos, label_ids)
        idx, numeric = numeric_sample(lambda: loss_of()[0], hidden, rng=rng)
        np.testing.assert_allclose(d.reshape(-1)[idx], numeric, rtol=1e-5, atol=1e-8)
        loss, d2, lg2 = losses.label_word_loss(model, hidden, pos, label_ids, labels)
        assert loss == pytest.approx(-np.log(np.exp(want[[0, 1], labels]) / np.exp(want).sum(1)).mean(), rel=1e-10)
        np.testing.assert_allclose(d2.reshape(-1)[idx], numeric, rtol=1e-5, atol=1e-8)


def test_token_log_probs_and_their_weighted_backward(rng):
    """TokenLogProbs: log-softmax values at the selected positions against a direct float64
    computation, and the backward of a weighted sum against finite differences."""
    model = tiny_llama(rng).astype(np.float64)
    hidden = rng.standard_normal((3, 4, model.config.hidden_size))
    targets = rng.integers(0, model.config.vocab_size, (3, 4))
    mask = rng.random((3, 4)) < 0.6
    weights = rng.standard_normal((3, 4))
    logits = hidden @ model.output_embeddings().T
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = np.where(mask, np.take_along_axis(logp, targets[..., None], -1)[..., 0], 0.0)
    lp = losses.TokenLogProbs(model, hidden, targets, mask)
    np.testing.assert_allclose(lp.values, want, rtol=1e-10, atol=1e-12)
    d = lp.backward(weights)
    idx, numeric = numeric_sample(lambda: float((losses.TokenLogProbs(model, hidden, targets, mask).values
                                                 * weights).sum()), hidden, rng=rng)
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


def test_soft_capped_losses_match_their_plain_forms_and_finite_differences(rng):
    """final_logit_softcapping (Gemma 2): the LM loss, the label-word logits and TokenLogProbs see
    c tanh(logits / c), written out here directly; their gradients against float64 finite differences."""
    import dataclasses

    model = tiny_llama(rng).astype(np.float64)
    model.config = dataclasses.replace(model.config, final_logit_softcapping=0.7)
    hidden = 3 * rng.standard_normal((2, 5, model.config.hidden_size))  # logits past the cap
    capped = 0.7 * np.tanh(hidden @ model.output_embeddings().T / 0.7)
    logp = capped - capped.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    targets = rng.integers(0, model.config.vocab_size, (2, 5))
    mask = np.array([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]], dtype=bool)
    np.testing.assert_allclose(model.lm_logits(hidden), capped, rtol=1e-12)
    loss, d = losses.lm_loss(model, hidden, targets, mask)
    assert loss == pytest.approx(-logp[mask, targets[mask]].mean(), rel=1e-10)
    idx, numeric = numeric_sample(lambda: losses.lm_loss(model, hidden, targets, mask)[0], hidden, rng=rng)
    np.testing.assert_allclose(d.reshape(-1)[idx], numeric, rtol=1e-5, atol=1e-8)
    pos, labels, label_ids = np.array([4, 1]), np.array([1, 0]), np.array([5, 9])
    loss, d, lg = losses.label_word_loss(model, hidden, pos, label_ids, labels)
    np.testing.assert_allclose(lg, capped[[0, 1], pos][:, label_ids], rtol=1e-12)
    idx, numeric = numeric_sample(lambda: losses.label_word_loss(model, hidden, pos, label_ids, labels)[0], hidden,
                                  rng=rng)
    np.testing.assert_allclose(d.reshape(-1)[idx], numeric, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="logits: label_word_logits' output is required"):
        losses.label_word_logits_backward(model, np.ones((2, 2)), hidden.shape, pos, label_ids)
    lp = losses.TokenLogProbs(model, hidden, targets, mask)
    np.testing.assert_allclose(lp.values, np.where(mask, np.take_along_axis(logp, targets[..., None], -1)[..., 0], 0),
                               rtol=1e-10, atol=1e-12)
    weights = rng.standard_normal((2, 5))
    idx, numeric = numeric_sample(lambda: float((losses.TokenLogProbs(model, hidden, targets, mask).values
                                                 * weights).sum()), hidden, rng=rng)
    np.testing.assert_allclose(lp.backward(weights).reshape(-1)[idx], numeric, rtol=1e-5, atol=1e-8)
