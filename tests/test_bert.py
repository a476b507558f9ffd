"""BERT with adapters, in PEFT's terms: without a head the adapter is FEATURE_EXTRACTION (PEFT
loads it in BertModel: the same hidden states); with a classification head, prompt tuning is
SEQ_CLS with the head as modules_to_save (BertForSequenceClassification: the same logits), and
prefix tuning, which PEFT refuses there, stays FEATURE_EXTRACTION with the head in
classification_head.safetensors. `softprompt train` on a BERT folder trains the head with the
adapter."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from softprompt import PrefixTuning, PromptTuning
from softprompt.losses import ClassificationHead
from softprompt.models import load_model

torch = pytest.importorskip("torch", reason="torch is a test extra: pip install '.[test]'")
transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install '.[test]'")
peft = pytest.importorskip("peft", reason="peft is a test extra: pip install '.[test]'")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
WORDS = [f"w{i}" for i in range(20)]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "Review", ":", "Sentiment", "good", "bad"] + WORDS


def _bert(folder, cls=None, seed=0, **kw):
    """A tiny random BERT with a word-level tokenizer that adds [CLS] ... [SEP], saved to folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, initializer_range=0.2, **kw)
    model = (cls or transformers.BertModel)(cfg).eval()
    model.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(folder / "tokenizer.json"))
    return model


def _peft(base, adapter_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


def _close(got, want):
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
@pytest.mark.parametrize("with_head", [False, True])
def test_bert_adapters_load_in_peft_with_the_same_outputs(kind, with_head, tmp_path, rng):
    _bert(tmp_path / "bert")
    ours = load_model(tmp_path / "bert")
    adapter = (PromptTuning if kind == "prompt" else PrefixTuning).for_model(ours, 4, init="random", seed=2)
    if kind == "prefix":
        adapter.prefix *= 50
    if with_head:
        adapter.head = ClassificationHead(32, 3, seed=1)
        adapter.head.bias[:] = [0.1, -0.2, 0.3]
    adapter.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    seq_cls = with_head and kind == "prompt"
    assert cfg["task_type"] == ("SEQ_CLS" if seq_cls else "FEATURE_EXTRACTION")
    assert (tmp_path / "a" / "classification_head.safetensors").exists() == (with_head and kind == "prefix")
    ids = rng.integers(4, len(VOCAB), (2, 7))
    mask = np.ones((2, 7), bool)
    mask[1, 5:] = False
    hidden = ours.forward(ids, mask, adapter=adapter, keep_virtual=True)
    loaded = type(adapter).from_pretrained(tmp_path / "a", ours)
    if seq_cls:  # the logits of BertForSequenceClassification with the adapter
        base = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "bert", num_labels=3).eval()
        with torch.no_grad():
            want = _peft(base, tmp_path / "a")(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(int))).logits
        _close(loaded.head.logits(ours.pooled(hidden)[0]), want.numpy())
    else:  # the hidden states of BertModel with the adapter
        base = transformers.BertModel.from_pretrained(tmp_path / "bert").eval()
        with torch.no_grad():
            want = _peft(base, tmp_path / "a")(input_ids=torch.tensor(ids),
                                               attention_mask=torch.tensor(mask.astype(int))).last_hidden_state.numpy()
        rows = np.concatenate([np.ones((2, 4 if kind == "prompt" else 0), bool), mask], axis=1)
        _close(hidden[rows], want[rows])
    if with_head:
        np.testing.assert_array_equal(loaded.head.weight, adapter.head.weight)
        np.testing.assert_array_equal(loaded.head.bias, adapter.head.bias)
    else:
        assert loaded.head is None


@pytest.mark.parametrize("method, lr, steps", [("prompt", 0.05, 80), ("prefix", 0.1, 200)])
def test_train_on_bert_learns_with_a_head_and_peft_agrees(method, lr, steps, tmp_path):
    from conftest import _example

    from softprompt.train import Task, TrainConfig, train

    _bert(tmp_path / "bert")
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(400):
        e = _example(rng)
        lines.append(json.dumps({"text": e.text, "label": e.label}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    cfg = TrainConfig(method=method, model=str(tmp_path / "bert"), data=str(tmp_path / "data.jsonl"), init="random",
                      num_virtual_tokens=4, max_steps=steps, batch_size=16, warmup=5, eval_every=40, lr=lr,
                      output=str(tmp_path / "run"), progress=False)
    metrics = train(cfg, log=lambda s: None)
    assert metrics["test_accuracy"] >= 0.85 and metrics["initial_accuracy"] < 0.7
    ours = load_model(tmp_path / "bert")
    adapter = (PromptTuning if method == "prompt" else PrefixTuning).from_pretrained(tmp_path / "run", ours)
    assert adapter.head is not None and adapter.head.weight.shape == (2, 32)
    task = Task(ours, __import__("softprompt").data.load_file(tmp_path / "data.jsonl"))
    assert task.evaluate(adapter, task.test) == pytest.approx(metrics["test_accuracy"])
    if method == "prompt":  # PEFT's BertForSequenceClassification predicts the same labels
        from softprompt.data import pad_batch

        ids, mask = pad_batch(task.test[:20])
        base = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "bert", num_labels=2).eval()
        with torch.no_grad():
            want = _peft(base, tmp_path / "run")(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(int))).logits
        np.testing.assert_array_equal(task.logits(adapter, task.test[:20]).argmax(1), want.numpy().argmax(1))
