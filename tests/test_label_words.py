"""Label words of any length (rank classification): each label's score against the summed
log-probabilities of its tokens computed directly from the model's logits, the gradient against
float64 finite differences, tokenization across the template boundary, bad input, and the command
line with separate files."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import softprompt
from conftest import VOCAB, WORDS, numeric_sample, tiny_llama
from softprompt import cli
from softprompt import data as data_mod
from softprompt.adapters import PrefixProjection, PrefixTuning, PromptTuning
from softprompt.train import Task

MULTI = {"negative": " w1 bad w2", "positive": " good"}  # three tokens and one


def _word_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    return tok


def _model(rng, dtype=np.float64, window=None, vocab=50, tokenizer=None):
    model = tiny_llama(rng)
    if vocab != model.config.vocab_size:
        model.embed = (0.3 * rng.standard_normal((vocab, model.config.hidden_size))).astype(np.float32)
    model.config = dataclasses.replace(model.config, vocab_size=vocab, sliding_window=window)
    model = model.astype(dtype)
    model.tokenizer = tokenizer or _word_tokenizer()
    return model


def _dataset(rng, n=12):
    ex = [data_mod.Example(text=" ".join(rng.choice(WORDS, int(rng.integers(1, 6)))), label=("negative", "positive")[i % 2])
          for i in range(n)]
    return data_mod.Dataset("classification", ex, [], [], labels=("negative", "positive"))


def _adapter(kind, model, rng):
    if kind is None:
        return None
    if kind == "prompt":
        a = PromptTuning.for_model(model, 3, init="random", seed=1)
    else:
        a = PrefixTuning.for_model(model, 3, init="random", seed=1)
        if kind == "projection":
            a = PrefixProjection(a.prefix, 16, seed=1)
    for name, value in vars(a).items():  # float64 (finite differences), big enough to matter
        if isinstance(value, np.ndarray) and value.dtype == np.float32:
            setattr(a, name, rng.standard_normal(value.shape) * (0.5 if kind == "prompt" else 0.2))
    return a


def _direct_scores(model, adapter, e):
    """Each label's summed log-probability of its tokens after e.ids, from the full logits of
    the sequence "input + label tokens" run alone."""
    out = []
    for c in e.label_tokens:
        seq = np.array([list(e.ids) + list(c)])
        logits = model.forward(seq, adapter=adapter)[0] @ model.output_embeddings().T  # model.logits: float32
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        n = len(e.ids)
        out.append(sum(logp[n - 1 + j, t] for j, t in enumerate(c)))
    return np.array(out)


@pytest.mark.parametrize("kind", [None, "prompt", "prompt_unshared", "prefix", "projection"])
@pytest.mark.parametrize("window", [None, 4, 12])  # 12: the prefix within reach of some queries, not all
def test_rank_scores_are_the_summed_token_log_probabilities(rng, kind, window, monkeypatch):
    model = _model(rng, window=window)
    if kind == "prompt_unshared":
        monkeypatch.setattr(model, "share_prompt_rows", False)
    adapter = _adapter("prompt" if kind == "prompt_unshared" else kind, model, rng)
    task = Task(model, _dataset(rng), label_words=MULTI)
    batch = task.train
    assert [len(c) for c in batch[0].label_tokens] == [3, 1]
    scores = task.logits(adapter, batch)  # one batch: right-padded, every length
    direct = np.array([_direct_scores(model, adapter, e) for e in batch])
    # The scores leave out the first token's log Z, the same for every label of a row.
    np.testing.assert_allclose(scores - scores[:, :1], direct - direct[:, :1], rtol=1e-9, atol=1e-9)
    assert task.continuation_length == 2


@pytest.mark.parametrize("kind", ["prompt", "prompt_unshared", "prefix", "projection"])
def test_rank_classification_gradient_matches_finite_differences(rng, kind, monkeypatch):
    model = _model(rng, window=3 if kind == "prefix" else None)
    if kind == "prompt_unshared":
        monkeypatch.setattr(model, "share_prompt_rows", False)
    adapter = _adapter("prompt" if kind == "prompt_unshared" else kind, model, rng)
    task = Task(model, _dataset(rng, 6), label_words={"negative": " w1 bad w2", "positive": " good w3"})
    batch = task.train
    loss, grads, _, _ = task.loss_and_grads(adapter, batch)
    want = -np.mean([_log_softmax(_direct_scores(model, adapter, e))[e.answer] for e in batch])
    assert loss == pytest.approx(want, rel=1e-9)
    for name, p in adapter.parameters().items():
        idx, numeric = numeric_sample(lambda: task.loss_and_grads(adapter, batch)[0], p, n=6, rng=rng)
        np.testing.assert_allclose(grads[name].reshape(-1)[idx], numeric, rtol=1e-5, atol=1e-8)


def _log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def test_one_token_labels_keep_the_label_word_logits(rng):
    """Labels of one token each: the scores are the label words' logits at the last input token
    (the verbalizer), with no second pass."""
    model = _model(rng)
    task = Task(model, _dataset(rng))
    batch = task.train[:5]
    assert all(len(c) == 1 for e in batch for c in e.label_tokens) and task.continuation_length == 0
    ids, mask = data_mod.pad_batch(batch)
    logits = model.forward(ids, mask)[np.arange(5), mask.sum(1) - 1] @ model.output_embeddings().T
    np.testing.assert_allclose(task.logits(None, batch), logits[:, [VOCAB.index("negative"), VOCAB.index("positive")]],
                               rtol=1e-12)


def _bpe_tokenizer():
    """A byte-pair tokenizer (Metaspace, never prepending the space marker) trained here: "great"
    alone is the token "great", after a space "▁great" (what a merge across the template's end
    gives)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    corpus = ["Review: a great film. Sentiment: great film", "Review: a dull film. Sentiment: dull plot",
              "great dull film plot Review Sentiment"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"], show_progress=False))
    return tok


def test_label_tokens_are_those_of_the_words_after_the_input(rng):
    tok = _bpe_tokenizer()
    model = _model(rng, vocab=tok.get_vocab_size(), tokenizer=tok)
    words = {"positive": "great film", "negative": "dull plot"}  # no leading space: the template ends with one
    ex = [data_mod.Example(text=t, label=lab) for t, lab in (("a great film.", "positive"), ("a dull film.", "negative"))]
    task = Task(model, data_mod.Dataset("classification", ex, [], [], labels=("negative", "positive")),
                template="Review: {text} Sentiment: ", label_words=words)
    e = task.train[0]
    prompt = "Review: a great film. Sentiment: "
    alone = tok.encode("great film", add_special_tokens=False).ids
    together = tok.encode(prompt + "great film", add_special_tokens=False).ids
    base = tok.encode(prompt, add_special_tokens=False).ids
    assert base[-1] == tok.token_to_id("▁")  # the template's last space, merged away below
    assert together[:len(base) - 1] == base[:-1] and together[len(base) - 1] == tok.token_to_id("▁great")
    assert list(e.ids) == base[:-1] and list(e.label_tokens[1]) == together[len(base) - 1:]
    assert list(e.label_tokens[1]) != alone  # "great" alone is another token
    np.testing.assert_allclose(np.diff(task.logits(None, [e])[0]), np.diff(_direct_scores(model, None, e)), rtol=1e-9)


def test_bad_label_words_are_refused(rng):
    model = _model(rng, dtype=np.float32)
    ds = _dataset(rng)
    cases = [({"negative": "", "positive": " good"}, "'negative'.s words '' tokenize to nothing"),
             ({"negative": " good ", "positive": " good"}, "'negative' and 'positive' have the same tokens"),
             ({"negative": " bad"}, r"none for \['positive'\]"),
             ({"negative": " bad", "positive": " good", "neutral": " w1"}, r"unknown \['neutral'\]"),
             ({"negative": " good", "positive": " good w1"}, "'negative'.s tokens begin 'positive'.s")]
    for words, message in cases:
        with pytest.raises(ValueError, match="label_words: .*" + message):
            Task(model, ds, label_words=words)
    with pytest.raises(ValueError, match="pair 2 .'positive good'. is not label=words"):
        data_mod.parse_label_words("negative= bad,positive good")
    assert data_mod.parse_label_words("a= x=y,b=z") == {"a": " x=y", "b": "z"}  # verbatim after the first '='
    gen = data_mod.Dataset("generation", [data_mod.Example(source="w1", target="w2")], [], [])
    with pytest.raises(ValueError, match="label_words: only for classification with a causal model"):
        Task(model, gen, label_words=MULTI)


def test_command_line_with_separate_files_and_multi_token_label_words(tiny, tmp_path, capsys):
    """train --train-file/--validation-file/--test-file --label-words-file; eval on the whole test
    file; predict: in order, each row's probabilities the softmax of its scores alone."""
    folder, model, dataset, _ = tiny
    for name, split in (("train", dataset.train[:200]), ("valid", dataset.validation[:40]),
                        ("test", dataset.test[:30])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"review": e.text, "y": e.label}) + "\n"
                                                        for e in split))
    (tmp_path / "words.json").write_text(json.dumps({"positive": " good, w1", "negative": " bad"}))
    out = tmp_path / "run"
    assert cli.main(["train", "--model", str(folder), "--train-file", str(tmp_path / "train.jsonl"),
                     "--validation-file", str(tmp_path / "valid.jsonl"), "--test-file", str(tmp_path / "test.jsonl"),
                     "--text-field", "review", "--label-field", "y", "--label-words-file", str(tmp_path / "words.json"),
                     "--template", "Review: {text} Sentiment:", "--max-steps", "12", "--eval-every", "6",
                     "--lr", "0.1", "--init", "random", "--output", str(out), "--no-progress"]) == 0
    info = json.loads((out / "softprompt.json").read_text())
    assert info["label_words"] == {"negative": " bad", "positive": " good, w1"}
    metrics = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert cli.main(["eval", "--adapter", str(out), "--data", str(tmp_path / "test.jsonl")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["examples"] == 30 and printed["data_accuracy"] == pytest.approx(metrics["test_accuracy"])
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"review": e.text}) + "\n" for e in dataset.test[:9]))
    assert cli.main(["predict", "--adapter", str(out), "--data", str(tmp_path / "in.jsonl"), "--output",
                     str(tmp_path / "p.jsonl"), "--batch-size", "4", "--no-progress"]) == 0
    preds = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    adapter = PromptTuning.from_pretrained(out, model)
    task = Task(model, data_mod.Dataset("classification", [], [], [], labels=("negative", "positive")),
                "Review: {text} Sentiment:", label_words={"positive": " good, w1", "negative": " bad"})
    for e, p in zip(dataset.test[:9], preds):
        s = task.logits(adapter, [task.encode_text(e.text)])[0]
        want = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        np.testing.assert_allclose([p["probabilities"]["negative"], p["probabilities"]["positive"]], want, rtol=1e-5)
    assert len(preds) == 9
    # bad label words: one line, exit 2, nothing written
    bad = tmp_path / "bad"
    assert cli.main(["train", "--model", str(folder), "--train-file", str(tmp_path / "train.jsonl"), "--text-field",
                     "review", "--label-field", "y", "--label-words", "negative= bad,positive= bad",
                     "--output", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "label_words: 'negative' and 'positive' have the same tokens" in err and not bad.exists()
    with pytest.raises(SystemExit):  # argparse: the two flags exclude each other
        cli.main(["train", "--model", str(folder), "--label-words", "x", "--label-words-file", "y.json"])
    assert "not allowed with argument --label-words" in capsys.readouterr().err
