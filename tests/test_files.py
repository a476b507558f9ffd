"""Hardening around files and runs: every damaged file the package reads is named in one line (exit
2 from the command line, never a traceback); an adapter folder is never taken half-updated; the
adapter's init is recorded (PEFT still loads it offline); `--resume` with flags does what it says;
CSV byte-order marks; truncation that leaves room for the virtual tokens."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

import softprompt
from softprompt import cli
from softprompt import data as data_mod
from softprompt.train import TrainConfig, train

torch = pytest.importorskip("torch", reason="torch is a test extra: pip install '.[test]'")
transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install '.[test]'")
peft = pytest.importorskip("peft", reason="peft is a test extra: pip install '.[test]'")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A short run of the tiny task: (model folder, data file, run folder)."""
    folder, model, dataset, data_file = tiny
    out = tmp_path_factory.mktemp("trained") / "run"
    train(TrainConfig(model=str(folder), data=str(data_file), output=str(out), max_steps=6, eval_every=3,
                      checkpoint_every=3, batch_size=8, warmup=1, init="random", max_eval=20, progress=False),
          log=lambda s: None)
    return folder, data_file, out


def _damage(path, how):
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: max(1, len(data) // 3)], "empty": b"",
                      "garbage": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))}[how])


def _gguf_of(folder, to):
    from test_model_settings import write_llama_gguf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_llama_gguf(transformers.LlamaForCausalLM.from_pretrained(folder), to)
    return to


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
@pytest.mark.parametrize("kind", ["adapter weights", "adapter config", "model weights", "model config", "tokenizer",
                                  "gguf", "checkpoint", "data"])
def test_a_damaged_file_is_named_in_one_line(kind, how, trained, tmp_path, capsys):
    folder, data_file, run = trained
    model, out, data = tmp_path / "model", tmp_path / "run", tmp_path / "data.jsonl"
    shutil.copytree(folder, model)
    shutil.copytree(run, out)
    shutil.copy(data_file, data)
    gguf_file = _gguf_of(folder, tmp_path / "m.gguf") if kind == "gguf" else None
    target = {"adapter weights": out / "adapter_model.safetensors", "adapter config": out / "adapter_config.json",
              "model weights": next(model.glob("*.safetensors")), "model config": model / "config.json",
              "tokenizer": model / "tokenizer.json", "gguf": gguf_file, "checkpoint": out / "checkpoint.npz",
              "data": data}[kind]
    _damage(target, how)
    if kind == "checkpoint":
        argv = ["train", "--resume", str(out), "--no-progress"]
    elif kind == "gguf":
        argv = ["info", "--model", str(gguf_file)]
    elif kind == "data":
        argv = ["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "o"), "--no-progress"]
    elif kind.startswith("adapter"):
        argv = ["eval", "--adapter", str(out), "--model", str(model), "--data", str(data), "--max-eval", "5"]
    else:
        argv = ["info", "--model", str(model)]
    capsys.readouterr()  # what building the files printed
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert target.name in err, err


def test_an_adapter_folder_cut_between_its_files_is_refused(trained, tmp_path, monkeypatch):
    """The weights are written first, the config last, and the weights carry the config's hash: a
    save killed between the two writes leaves a folder that load refuses, naming it."""
    from softprompt import adapters

    folder, _, run = trained
    model = softprompt.load_model(folder)
    shutil.copytree(run, tmp_path / "a")
    adapter = softprompt.PromptTuning.from_pretrained(tmp_path / "a", model)
    adapter.prompt += 1.0
    real, calls = adapters._atomic_write, []

    def dies_before_the_config(path, write):
        if path.name == adapters.CONFIG_NAME:
            raise KeyboardInterrupt("killed between the writes")
        calls.append(path.name)
        real(path, write)

    adapter.init = "vocab"  # a config that differs from the old one
    monkeypatch.setattr(adapters, "_atomic_write", dies_before_the_config)
    with pytest.raises(KeyboardInterrupt):
        adapter.save_pretrained(tmp_path / "a")
    assert calls == [adapters.WEIGHTS_NAME]
    monkeypatch.setattr(adapters, "_atomic_write", real)
    with pytest.raises(ValueError, match="adapter_model.safetensors was written with another adapter_config.json"):
        softprompt.PromptTuning.from_pretrained(tmp_path / "a", model)
    adapter.save_pretrained(tmp_path / "a")  # a whole save: fine again
    np.testing.assert_array_equal(softprompt.PromptTuning.from_pretrained(tmp_path / "a", model).prompt, adapter.prompt)


@pytest.mark.parametrize("method, init", [("prompt", "text"), ("prompt", "vocab"), ("prompt", "random"),
                                          ("prompt", "labels"), ("prefix", "text"), ("prefix", "zero")])
def test_the_init_is_recorded_and_peft_loads_the_file_offline(method, init, tiny, tmp_path, monkeypatch):
    folder, model, dataset, _ = tiny
    from softprompt.train import Task, make_adapter

    task = Task(model, dataset)
    adapter = make_adapter(model, TrainConfig(method=method, init=init, init_text="good bad").resolved(), task.label_ids)
    adapter.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    if method == "prompt" and init != "labels":
        assert cfg["prompt_tuning_init"] == {"text": "TEXT", "vocab": "SAMPLE_VOCAB", "random": "RANDOM"}[init]
        assert "softprompt_init" not in cfg
        if init == "text":
            assert cfg["prompt_tuning_init_text"] == "good bad" and cfg["tokenizer_name_or_path"]
    else:
        assert cfg["softprompt_init"] == init
        if init == "text":
            assert cfg["softprompt_init_text"] == "good bad"
    loaded = type(adapter).from_pretrained(tmp_path / "a", model)
    assert (loaded.init, loaded.init_text) == (init, "good bad" if init == "text" else None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
        pm = peft.PeftModel.from_pretrained(base, tmp_path / "a").eval()
        ids = torch.tensor([[3, 4, 5]])
        with torch.no_grad():
            logits = pm(input_ids=ids).logits[:, -3:].numpy()
    np.testing.assert_allclose(model.logits(ids.numpy(), adapter=adapter), logits, atol=1e-4 * np.abs(logits).max(),
                               rtol=0)


def test_resume_with_flags_extends_or_refuses(trained, tmp_path, capsys):
    folder, data_file, run = trained
    out = tmp_path / "run"
    shutil.copytree(run, out)
    assert cli.main(["train", "--resume", str(out), "--max-steps", "8", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 8 and "resuming" in capsys.readouterr().out
    for argv, message in [(["--lr", "0.5"], "--lr 0.5 (the run has 0.03) conflict"),
                          (["--batch-size", "4"], "--batch-size 4 (the run has 8) conflict"),
                          (["--max-steps", "5"], "is at step 8, past the run's end at step 5")]:
        code = cli.main(["train", "--resume", str(out), "--no-progress", *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err


def test_a_checkpoint_that_does_not_fit_names_the_array(trained, tmp_path):
    from softprompt.train import AdamW, load_checkpoint

    folder, _, run = trained
    model = softprompt.load_model(folder)
    adapter = softprompt.PromptTuning.for_model(model, 7)  # the run's has 20 virtual tokens
    with pytest.raises(ValueError, match=r"array param/prompt has shape \(20, 64\), the adapter's is \(7, 64\)"):
        load_checkpoint(run / "checkpoint.npz", adapter, AdamW(adapter.parameters(), 0.1))


def test_csv_with_a_byte_order_mark_reads(tmp_path):
    f = tmp_path / "d.csv"
    f.write_bytes("\ufefftext,label\n".encode() + b"".join(f"w{i} good,positive\nw{i} bad,negative\n".encode()
                                                             for i in range(10)))
    ds = data_mod.load_file(f)
    assert ds.labels == ("negative", "positive") and len(ds.train) + len(ds.validation) + len(ds.test) == 20


def test_truncation_keeps_room_for_the_virtual_tokens(tmp_path):
    """A BERT whose position table has 64 rows, 20 virtual tokens and texts far longer: every input
    is cut to 44 tokens, and training and evaluation run."""
    from test_bert import _bert

    _bert(tmp_path / "bert")  # max_position_embeddings 64
    long = " ".join(["w1"] * 200)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"{long} {w}", "label": lab}) + "\n"
                                              for w, lab in [("good", "positive"), ("bad", "negative")] * 10))
    for method in ("prompt", "prefix"):
        cfg = TrainConfig(method=method, model=str(tmp_path / "bert"), data=str(tmp_path / "d.jsonl"), init="random",
                          max_steps=2, batch_size=4, warmup=1, output=str(tmp_path / method), progress=False)
        train(cfg, log=lambda s: None)
        from softprompt.train import Task

        task = Task(softprompt.load_model(tmp_path / "bert"), data_mod.load_file(tmp_path / "d.jsonl"), num_virtual_tokens=20)
        assert max(len(e.ids) for e in task.train) <= 44


def test_a_head_file_from_an_earlier_save_is_not_taken(tiny, tmp_path):
    from softprompt.losses import ClassificationHead

    _, model, _, _ = tiny
    with_head = softprompt.PrefixTuning.for_model(model, 3, init="random", seed=1)
    with_head.head = ClassificationHead(64, 2)
    with_head.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "classification_head.safetensors").exists()
    softprompt.PrefixTuning.for_model(model, 3, init="random", seed=5).save_pretrained(tmp_path / "a")
    assert softprompt.PrefixTuning.from_pretrained(tmp_path / "a", model).head is None
    # a head bound to other weights (a save cut after the head, before the weights) is refused
    with_head.save_pretrained(tmp_path / "b")
    other = softprompt.PrefixTuning.for_model(model, 3, init="random", seed=5)
    other.head = with_head.head
    head_file = (tmp_path / "b" / "classification_head.safetensors").read_bytes()
    other.save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "classification_head.safetensors").write_bytes(head_file)
    with pytest.raises(ValueError, match="classification_head.safetensors was written with another"):
        softprompt.PrefixTuning.from_pretrained(tmp_path / "b", model)


@pytest.mark.parametrize("field, value, message", [
    ("num_attention_heads", None, "num_attention_heads must be a positive integer"),
    ("num_attention_heads", 0, "num_attention_heads must be a positive integer"),
    ("token_dim", "x", "token_dim must be a positive integer"),
    ("num_virtual_tokens", None, "num_virtual_tokens must be a positive integer"),
])
def test_bad_adapter_config_fields_are_named(field, value, message, tiny, tmp_path):
    _, model, _, _ = tiny
    softprompt.PrefixTuning.for_model(model, 3, init="random").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg[field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    from safetensors.numpy import load_file, save_file

    save_file(load_file(str(tmp_path / "adapter_model.safetensors")), str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=message):  # (as PEFT writes it: no hash metadata)
        softprompt.PrefixTuning.from_pretrained(tmp_path, model)


@pytest.mark.parametrize("content, message", [("[1]", "expected a JSON object"), ('{"nope": 1}', "unknown settings"),
                                              ('{"batch_size": "4"}', "do not make a run")])
def test_a_bad_run_config_is_named(content, message, trained, tmp_path, capsys):
    _, _, run = trained
    shutil.copytree(run, tmp_path / "run")
    (tmp_path / "run" / "run_config.json").write_text(content)
    code = cli.main(["train", "--resume", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "run_config.json" in err and message in err and "Traceback" not in err, err


def test_minilm_style_tokenizer_padding_is_not_taken_as_tokens(tmp_path):
    """A tokenizer.json with its own padding (MiniLM pads every text to 128) must not pad inputs."""
    from test_bert import _bert

    _bert(tmp_path / "bert")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "bert" / "tokenizer.json"))
    tok.enable_padding(length=40, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=40)
    tok.save(str(tmp_path / "bert" / "tokenizer.json"))
    model = softprompt.load_model(tmp_path / "bert")
    assert len(model.tokenizer.encode("good w1").ids) == 4  # [CLS] good w1 [SEP]
