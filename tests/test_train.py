"""The training driver on a tiny model and a tiny learnable task: learning, resume, checkpoints,
data files, the command line, and PEFT loading what we train."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import softprompt
from conftest import VOCAB, WORDS
from softprompt import cli
from softprompt import data as data_mod
from softprompt.adapters import PrefixProjection
from softprompt.train import AdamW, TrainConfig, learning_rate, save_checkpoint, train

torch = pytest.importorskip("torch", reason="torch is a test extra: pip install '.[test]'")
transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install '.[test]'")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

def _cfg(tmp_path, **kw):
    base = dict(max_steps=100, batch_size=16, warmup=5, eval_every=50, checkpoint_every=50, init="random",
                output=str(tmp_path / "run"), progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("method,lr,projection", [("prompt", 0.1, False), ("prefix", 0.3, False), ("prefix", 0.01, True)])
def test_training_learns_the_task(tiny, tmp_path, method, lr, projection):
    _, model, dataset, _ = tiny
    m = train(_cfg(tmp_path, method=method, lr=lr, prefix_projection=projection), model=model, dataset=dataset,
              log=lambda s: None)
    assert m["initial_accuracy"] < 0.6  # chance-level start on the balanced test split...
    assert m["test_accuracy"] >= 0.85  # ...and well above chance after 100 steps
    out = tmp_path / "run"
    history = json.loads((out / "metrics.json").read_text())
    assert history["steps"] == 100 and history["tokens_per_second"] > 0
    assert history["train_seconds"] > history["eval_seconds"]  # validation time is inside the training time
    for name in ("adapter_model.safetensors", "adapter_config.json", "metrics.json", "checkpoint.npz", "softprompt.json"):
        assert (out / name).exists(), name
    adapter = (softprompt.PrefixTuning if method == "prefix" else softprompt.PromptTuning).from_pretrained(out, model)
    task = softprompt.train.Task(model, dataset)
    assert task.evaluate(adapter, task.test) == pytest.approx(m["test_accuracy"])  # the saved file is the result


def test_resume_gives_the_same_adapter_bitwise(tiny, tmp_path):
    _, model, dataset, _ = tiny
    kw = dict(method="prefix", lr=0.3, max_steps=12, eval_every=5, checkpoint_every=4, grad_accum=2, batch_size=8)
    straight = train(_cfg(tmp_path / "a", **kw), model=model, dataset=dataset, log=lambda s: None)
    # The same run, interrupted after step 8 (its last checkpoint), then resumed.
    interrupted = _cfg(tmp_path / "b", **kw)

    def stop_after_8(run):
        if run.state["step"] == 8:
            raise KeyboardInterrupt("stopped after step 8")

    with pytest.raises(KeyboardInterrupt):
        train(interrupted, model=model, dataset=dataset, log=lambda s: None, on_step=stop_after_8)
    resumed = train(TrainConfig(**{**_cfg(tmp_path / "b", **kw).__dict__, "resume": str(tmp_path / "b" / "run")}),
                    model=model, dataset=dataset, log=lambda s: None)
    a = softprompt.PrefixTuning.from_pretrained(tmp_path / "a" / "run").prefix
    b = softprompt.PrefixTuning.from_pretrained(tmp_path / "b" / "run").prefix
    np.testing.assert_array_equal(a, b)
    assert resumed["test_accuracy"] == straight["test_accuracy"] and resumed["steps"] == 12


def test_checkpoint_writes_are_atomic(tiny, tmp_path, monkeypatch):
    _, model, _, _ = tiny
    adapter = softprompt.PromptTuning.for_model(model, 3)
    opt = AdamW(adapter.parameters(), 0.1)
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, adapter, opt, {"step": 1, "best_params": None})
    good = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, adapter, opt, {"step": 2, "best_params": None})
    assert path.read_bytes() == good  # the last complete checkpoint survives
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]  # no temporary left behind


def test_prompt_inits(tiny):
    _, model, _, _ = tiny
    ids = [VOCAB.index("negative"), VOCAB.index("positive")]
    labels = softprompt.PromptTuning.for_model(model, 4, init="labels", label_ids=ids).prompt
    np.testing.assert_array_equal(labels[:2], model.embed[ids])
    text = softprompt.PromptTuning.for_model(model, 5, init="text", init_text="good bad").prompt
    np.testing.assert_array_equal(text, model.embed[[7, 8, 7, 8, 7]])  # repeated to fill P
    vocab = softprompt.PromptTuning.for_model(model, 3, init="vocab").prompt
    assert all(any(np.array_equal(row, e) for e in model.embed) for row in vocab)
    with pytest.raises(ValueError, match="init: expected"):
        softprompt.PromptTuning.for_model(model, 3, init="bogus")
    with pytest.raises(ValueError, match="label_ids: required"):
        softprompt.PromptTuning.for_model(model, 3, init="labels")


def test_schedule_and_optimizer():
    assert learning_rate(0, 100, 1.0, 10, "linear") == pytest.approx(0.1)
    assert learning_rate(9, 100, 1.0, 10, "linear") == pytest.approx(1.0)
    assert learning_rate(55, 100, 1.0, 10, "linear") == pytest.approx(0.5)
    assert learning_rate(55, 100, 1.0, 10, "cosine") == pytest.approx(0.5)
    assert learning_rate(100, 100, 1.0, 10, "linear") == 0.0
    # AdamW's first step moves every coordinate by lr (the normalized update), plus decay.
    p = {"x": np.array([1.0, -2.0], dtype=np.float32)}
    AdamW(p, 0.1, weight_decay=0.5).step({"x": np.array([3.0, -0.001], dtype=np.float32)}, 0.1)
    np.testing.assert_allclose(p["x"], [1.0 - 0.05 - 0.1, -2.0 + 0.1 + 0.1], rtol=1e-4)


def test_prefix_projection_gradients_match_finite_differences(tiny):
    _, model, _, _ = tiny
    rng = np.random.default_rng(1)
    base = rng.standard_normal((2, 2, 3, 2, 16))
    proj = PrefixProjection(base, hidden=5, seed=2)
    for k, v in proj.parameters().items():
        proj.__dict__[k] = v.astype(np.float64)
    proj.w2[...] = rng.standard_normal(proj.w2.shape) * 0.3
    w = rng.standard_normal(base.shape)
    grads = proj.gradients({"prefix": w})
    for name, p in proj.parameters().items():
        i = tuple(rng.integers(0, n) for n in p.shape)
        old = p[i]
        p[i] = old + 1e-6
        up = np.sum(w * proj.prefix_matrix())
        p[i] = old - 1e-6
        down = np.sum(w * proj.prefix_matrix())
        p[i] = old
        assert grads[name][i] == pytest.approx((up - down) / 2e-6, rel=1e-5, abs=1e-8), name


@pytest.mark.parametrize(
    "content,suffix,message",
    [
        ('{"text": "a", "label": "x"}\n{"text": "b"}\n', ".jsonl", ":2: missing or empty field 'label'"),
        ('{"text": "a", "label": "x"}\nnot json\n', ".jsonl", ":2: not valid JSON"),
        ('{"prompt": "a"}\n', ".jsonl", ":1: expected fields text+label or source+target"),
        ("text,label\nfine,x\n,y\n", ".csv", ":3: missing or empty field 'text'"),
        ('{"source": "a", "target": "b"}\n{"text": "c", "label": "d"}\n', ".jsonl", ":2: a classification record in a generation file"),
        ("", ".jsonl", "has no records"),
        ("x", ".txt", "expected a .jsonl or .csv file"),
    ],
)
def test_bad_data_files(tmp_path, content, suffix, message):
    f = tmp_path / f"data{suffix}"
    f.write_text(content)
    with pytest.raises(ValueError) as info:
        data_mod.load_file(f)
    assert message in str(info.value) and str(f) in str(info.value)


def test_generation_data_trains_on_targets_only(tiny, tmp_path):
    _, model, _, _ = tiny
    rng = np.random.default_rng(3)
    rows = [{"source": " ".join(rng.choice(WORDS, 3)), "target": "good bad"} for _ in range(80)]
    f = tmp_path / "gen.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = data_mod.load_file(f)
    assert dataset.kind == "generation"
    m = train(_cfg(tmp_path, method="prompt", lr=0.1, max_steps=40, eval_every=20), model=model, dataset=dataset,
              log=lambda s: None)
    assert m["test_loss"] < 0.5 * m["zero_shot_loss"]  # mean target-token cross-entropy


def test_cli_commands(tiny, tmp_path, capsys):
    folder, _, _, data_file = tiny
    out = tmp_path / "cli-run"
    assert cli.main(["train", "--model", str(folder), "--data", str(data_file), "--max-steps", "30", "--lr", "0.1",
                     "--init", "random", "--eval-every", "15", "--output", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--adapter", str(out), "--data", str(data_file), "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_accuracy"] == json.loads((out / "metrics.json").read_text())["test_accuracy"]
    assert cli.main(["eval", "--adapter", str(out), "--data", str(data_file)]) == 0  # the whole file
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == len(data_file.read_text().splitlines()) and 0.5 < result["data_accuracy"] <= 1
    assert cli.main(["generate", "--adapter", str(out), "w1 good w2"]) == 0
    assert capsys.readouterr().out.strip() in ("positive", "negative")
    assert cli.main(["info", "--model", str(folder), "--adapter", str(out)]) == 0
    info = capsys.readouterr().out
    assert "prompt tuning, 20 virtual tokens" in info and "| 10 |" in info
    # errors are reported, not raised
    assert cli.main(["train", "--model", str(folder), "--data", str(tmp_path / "none.jsonl"), "--output", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_trained_adapter_loads_in_peft_with_the_same_predictions(tiny, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is a test extra: pip install '.[test]'")
    folder, model, dataset, _ = tiny
    train(_cfg(tmp_path, method="prefix", lr=0.3, max_steps=30, eval_every=30), model=model, dataset=dataset,
          log=lambda s: None)
    adapter = softprompt.PrefixTuning.from_pretrained(tmp_path / "run", model)
    task = softprompt.train.Task(model, dataset)
    ids, mask = data_mod.pad_batch(task.test[:16])
    ours = softprompt.losses.label_word_logits(model, model.forward(ids, mask, adapter=adapter), mask.sum(1) - 1,
                                              task.label_ids).argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
        pm = peft.PeftModel.from_pretrained(base, tmp_path / "run").eval()
        with torch.no_grad():
            logits = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()
    theirs = logits[np.arange(16), mask.sum(1) - 1][:, task.label_ids].argmax(1)
    np.testing.assert_array_equal(ours, theirs)


def test_separate_files_with_other_field_names(tiny, tmp_path, capsys):
    """--train-file / --validation-file / --test-file (CSV, fields sentence/sentiment) are used as
    they are: the test metric is the test file's, and eval scores a whole file."""
    import csv

    folder, model, _, data_file = tiny
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    files = {}
    for name, part in (("train", rows[:400]), ("validation", rows[400:450]), ("test", rows[450:530])):
        files[name] = tmp_path / f"{name}.csv"
        with open(files[name], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sentiment", "sentence"])
            w.writerows([[r["label"], r["text"]] for r in part])
    out = tmp_path / "run"
    argv = ["train", "--model", str(folder), "--train-file", str(files["train"]), "--validation-file",
            str(files["validation"]), "--test-file", str(files["test"]), "--text-field", "sentence", "--label-field",
            "sentiment", "--max-steps", "40", "--lr", "0.1", "--init", "random", "--eval-every", "20", "--output",
            str(out), "--no-progress"]
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    adapter = softprompt.PromptTuning.from_pretrained(out, model)
    test = data_mod.load_files(files["train"], test=files["test"], fields=data_mod.Fields(text="sentence",
                                                                                         label="sentiment"))
    task = softprompt.train.Task(model, test)
    assert len(task.test) == 80 and task.evaluate(adapter, task.test) == pytest.approx(metrics["test_accuracy"])
    capsys.readouterr()
    assert cli.main(["eval", "--adapter", str(out), "--data", str(files["test"])]) == 0  # fields from the run
    result = json.loads(capsys.readouterr().out)
    assert result == {"data_accuracy": pytest.approx(metrics["test_accuracy"]), "examples": 80}
    for bad, message in [(["--data", str(data_file)], "not both"), (["--test-file", str(files["test"])], "need --train-file")]:
        code = cli.main(["train", "--model", str(folder), "--output", str(tmp_path / "x"), "--no-progress", *bad]
                        + (["--train-file", str(files["train"])] if "not both" in message else []))
        assert code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("save", ["best", "last"])
def test_the_adapter_written_is_the_best_on_validation(save, tiny, tmp_path, monkeypatch):
    """Validation scores scripted to peak at step 4 of 12: --save best writes the adapter of step 4,
    --save last the last one."""
    _, model, dataset, _ = tiny
    from softprompt.train import Task

    scores = iter([0.6, 0.9, 0.7])  # validations at steps 2, 4, 6... only the first three matter here
    real = Task.evaluate

    def scripted(self, adapter, examples, **kw):
        if examples is self.validation:
            return next(scores, 0.5)
        return real(self, adapter, examples, **kw)

    monkeypatch.setattr(Task, "evaluate", scripted)
    snapshots = {}
    cfg = _cfg(tmp_path, method="prefix", lr=0.3, max_steps=12, eval_every=2, save=save)
    train(cfg, model=model, dataset=dataset, log=lambda s: None,
          on_step=lambda run: snapshots.__setitem__(run.state["step"], run.adapter.prefix.copy()))
    saved = softprompt.PrefixTuning.from_pretrained(tmp_path / "run").prefix
    np.testing.assert_array_equal(saved, snapshots[4 if save == "best" else 12])


def test_template_flag_is_used_saved_and_checked(tiny, tmp_path, capsys):
    folder, model, _, data_file = tiny
    out = tmp_path / "run"
    template = "w3 {text} : Sentiment"  # words of the tiny vocabulary
    assert cli.main(["train", "--model", str(folder), "--data", str(data_file), "--template", template, "--max-steps",
                     "20", "--lr", "0.1", "--init", "random", "--eval-every", "10", "--output", str(out),
                     "--no-progress"]) == 0
    info = json.loads((out / "softprompt.json").read_text())
    assert info["template"] == template
    ds = data_mod.load_file(data_file)
    task = softprompt.train.Task(model, ds, template)
    e = ds.test[0]
    assert task.test[0].ids == model.tokenizer.encode(template.replace("{text}", e.text), add_special_tokens=False).ids
    metrics = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert cli.main(["eval", "--adapter", str(out), "--data", str(data_file), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    code = cli.main(["train", "--model", str(folder), "--data", str(data_file), "--template", "no placeholder",
                     "--output", str(tmp_path / "x"), "--no-progress"])
    assert code == 2 and "template: expected a string with the placeholder {text}" in capsys.readouterr().err


def test_generation_template_wraps_the_source(tiny):
    _, model, _, _ = tiny
    e = data_mod.Example(source="w1 w2", target="good")
    enc = data_mod.encode_generation(model.tokenizer, e, None, 512, "Review : {source} Sentiment :")
    src = model.tokenizer.encode("Review : w1 w2 Sentiment :", add_special_tokens=False).ids
    assert enc.ids == src + model.tokenizer.encode("good", add_special_tokens=False).ids and enc.loss_from == len(src) - 1
    with pytest.raises(ValueError, match=r"placeholder \{source\}"):
        data_mod.check_template("{text}", "generation")


def test_predict_writes_one_row_per_input_in_order(tiny, tmp_path, capsys):
    folder, model, _, data_file = tiny
    out = tmp_path / "run"
    assert cli.main(["train", "--model", str(folder), "--data", str(data_file), "--max-steps", "20", "--lr", "0.1",
                     "--init", "random", "--eval-every", "10", "--output", str(out), "--no-progress"]) == 0
    texts = [json.loads(line)["text"] for line in data_file.read_text().splitlines()[:37]]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))  # no labels needed
    assert cli.main(["predict", "--adapter", str(out), "--data", str(tmp_path / "in.jsonl"), "--output",
                     str(tmp_path / "p.jsonl"), "--batch-size", "8", "--no-progress"]) == 0
    preds = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(preds) == 37
    adapter = softprompt.PromptTuning.from_pretrained(out, model)
    task = softprompt.train.Task(model, data_mod.Dataset("classification", [], [], [], labels=("negative", "positive")))
    for t, p in zip(texts, preds):  # in order, each against the row scored alone
        logits = task.logits(adapter, [task.encode_text(t)])[0].astype(np.float64)
        want = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        np.testing.assert_allclose([p["probabilities"]["negative"], p["probabilities"]["positive"]], want, rtol=1e-5)
        assert p["label"] == ("negative", "positive")[int(want.argmax())]


def test_predict_generates_text_for_a_generation_adapter(tiny, tmp_path):
    folder, model, _, _ = tiny
    rng = np.random.default_rng(4)
    rows = [{"source": " ".join(rng.choice(WORDS, 3)), "target": "good bad"} for _ in range(40)]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert cli.main(["train", "--model", str(folder), "--data", str(tmp_path / "g.jsonl"), "--max-steps", "3",
                     "--init", "random", "--output", str(out), "--no-progress"]) == 0
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"source": r["source"]}) + "\n" for r in rows[:5]))
    assert cli.main(["predict", "--adapter", str(out), "--data", str(tmp_path / "in.jsonl"), "--output",
                     str(tmp_path / "p.jsonl"), "--max-new-tokens", "4", "--no-progress"]) == 0
    preds = [json.loads(line)["text"] for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    adapter = softprompt.PromptTuning.from_pretrained(out, model)
    for r, text in zip(rows[:5], preds):
        ids = model.tokenizer.encode(r["source"], add_special_tokens=False).ids
        assert text == model.tokenizer.decode(softprompt.generate(model, [ids], adapter=adapter, max_new_tokens=4)[0])


def test_classification_metrics_count_the_confusion_matrix(tiny, tmp_path):
    """metrics.json has the test confusion matrix (rows true, columns predicted) and macro-F1,
    recounted here from each test example's prediction."""
    _, model, dataset, _ = tiny
    m = train(_cfg(tmp_path, max_steps=20, lr=0.1), model=model, dataset=dataset, log=lambda s: None)
    adapter = softprompt.PromptTuning.from_pretrained(tmp_path / "run", model)
    task = softprompt.train.Task(model, dataset)
    predicted = [int(task.logits(adapter, [e]).argmax()) for e in task.test]
    true = [e.answer for e in task.test]
    counts = np.zeros((2, 2), int)
    for t, p in zip(true, predicted):
        counts[t, p] += 1
    assert m["test_confusion_matrix"] == counts.tolist()
    f1 = [2 * counts[k, k] / (counts[k].sum() + counts[:, k].sum()) for k in range(2)]
    assert m["test_macro_f1"] == pytest.approx(np.mean(f1)) and m["test_accuracy"] == pytest.approx(np.mean(
        np.array(true) == np.array(predicted)))
    assert (tmp_path / "run" / "confusion_matrix.png").exists() or not __import__("importlib").util.find_spec(
        "matplotlib")
    assert softprompt.train.macro_f1([[3, 0, 0], [0, 0, 0], [1, 0, 0]]) == pytest.approx((2 * 3 / 7 + 0 + 0) / 3)


def test_generation_metrics_against_the_libraries(tiny, tmp_path):
    """After a generation run metrics.json has exact match, BLEU and chrF (sacrebleu) and ROUGE-L
    (rouge-score): recomputed here from each test source decoded alone, with the libraries called
    directly."""
    import sacrebleu
    from rouge_score import rouge_scorer

    _, model, _, _ = tiny
    rng = np.random.default_rng(3)
    rows = [{"source": " ".join(rng.choice(WORDS, 3)), "target": "good bad" if i % 2 else "bad"} for i in range(80)]
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = data_mod.load_file(tmp_path / "gen.jsonl")
    m = train(_cfg(tmp_path, method="prompt", lr=0.1, max_steps=30, eval_every=15), model=model, dataset=dataset,
              log=lambda s: None)
    assert m["test_perplexity"] == pytest.approx(np.exp(m["test_loss"]))
    adapter = softprompt.PromptTuning.from_pretrained(tmp_path / "run", model)
    task = softprompt.train.Task(model, dataset)
    longest = max(len(model.tokenizer.encode(r["target"], add_special_tokens=False).ids) for r in rows)
    predictions, references = [], []
    for e, raw in zip(task.test, dataset.test):
        out = softprompt.generate(model, [e.ids[:e.loss_from + 1]], adapter=adapter, max_new_tokens=longest + 8)[0]
        predictions.append(model.tokenizer.decode(out))
        references.append(raw.target)
    assert m["test_exact_match"] == pytest.approx(np.mean([" ".join(p.split()) == r for p, r in zip(predictions, references)]))
    assert m["test_bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)
    assert m["test_chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert m["test_rougeL"] == pytest.approx(np.mean([scorer.score(r, p)["rougeL"].fmeasure
                                                      for p, r in zip(predictions, references)]))


def test_chat_template_wraps_the_task_template(tiny, tmp_path, capsys):
    """A folder's tokenizer_config.json chat_template, rendered as transformers renders it, around
    the task template; saved with the run and used by eval; a model without one is refused."""
    folder, _, _, data_file = tiny
    import shutil

    chat_folder = tmp_path / "chat"
    shutil.copytree(folder, chat_folder)
    template = ("{% for m in messages %}{{ bos_token }}w{{ loop.index }} {{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %} :{% endif %}")
    (chat_folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "Review"}))
    model = softprompt.load_model(chat_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(chat_folder / "tokenizer.json"), bos_token="Review",
                                                   chat_template=template)
    want = tok.apply_chat_template([{"role": "user", "content": "w5 good"}], tokenize=False, add_generation_prompt=True)
    assert data_mod.render_chat(model.chat_template, "{text}").replace("{text}", "w5 good") == want
    ds = data_mod.load_file(data_file)
    task = softprompt.train.Task(model, ds, "{text}", chat_template=True)
    assert task.test[0].ids == model.tokenizer.encode(want.replace("w5 good", ds.test[0].text), add_special_tokens=False).ids
    out = tmp_path / "run"
    assert cli.main(["train", "--model", str(chat_folder), "--data", str(data_file), "--template", "{text}",
                     "--chat-template", "--max-steps", "10", "--init", "random", "--output", str(out),
                     "--no-progress"]) == 0
    assert json.loads((out / "softprompt.json").read_text())["chat_template"] is True
    capsys.readouterr()
    assert cli.main(["eval", "--adapter", str(out), "--data", str(data_file), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == pytest.approx(
        json.loads((out / "metrics.json").read_text())["test_accuracy"])
    code = cli.main(["train", "--model", str(folder), "--data", str(data_file), "--chat-template", "--output",
                     str(tmp_path / "x"), "--no-progress"])
    assert code == 2 and "chat_template: the model has none" in capsys.readouterr().err
