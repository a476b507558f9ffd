"""The `softprompt` command: train, eval, predict, generate, info.

    softprompt train                       # prompt tuning of SmolLM2 on movie-review sentiment
    softprompt train --method prefix --output runs/prefix
    softprompt eval --adapter softprompt-output
    softprompt predict --adapter softprompt-output --data reviews.jsonl --output preds.jsonl
    softprompt generate --adapter softprompt-output "A tender, funny film."
    softprompt info
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import softprompt  # sets the BLAS thread timeout before NumPy loads

from . import data as data_mod
from .adapters import read_adapter_config
from .distributed import DistributedError, launched_rank, world
from .train import DEFAULT_INIT_TEXT, DEFAULT_LR, Task, TrainConfig, train


def _train_parser(sub):
    p = sub.add_parser("train", allow_abbrev=False,
                       help="tune a prompt or prefix (default: SmolLM2 on Rotten Tomatoes sentiment)")
    p.add_argument("--method", choices=["prompt", "prefix"], default="prompt")
    p.add_argument("--num-virtual-tokens", type=int, default=20)
    p.add_argument("--init", choices=["random", "vocab", "text", "labels", "zero"], default=None,
                   help="prompt: random|vocab|text|labels (default text); prefix: random|zero|text (default text: "
                        "the model's own keys and values for --init-text)")
    p.add_argument("--init-text", default=DEFAULT_INIT_TEXT)
    p.add_argument("--prefix-projection", action="store_true", help="Li & Liang's tanh-MLP reparameterization")
    p.add_argument("--encoder-hidden-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=None,
                   help=f"default {DEFAULT_LR['prompt']} for prompt, {DEFAULT_LR['prefix']} for prefix, "
                        f"{DEFAULT_LR['prefix_projection']} with --prefix-projection")
    p.add_argument("--epochs", type=float, default=None, help="overrides --max-steps")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--patience", type=int, default=0, help="early stopping after N evaluations without gain")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--output", default="softprompt-output")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR with its settings; --max-steps/--epochs extend (or shorten) it, "
                        "--threads and --no-progress may change, any other flag must match the run's")
    p.add_argument("--model", default=None, help="a Hugging Face folder or a .gguf file (default SmolLM2)")
    p.add_argument("--data", default=None, help="your JSONL/CSV file (text+label or source+target), cut into "
                                                "test/validation/train by a fixed rule")
    p.add_argument("--train-file", default=None, help="or separate files, used as they are: training...")
    p.add_argument("--validation-file", default=None, help="...validation (optional: no validation, last adapter)")
    p.add_argument("--test-file", default=None, help="...and test (optional)")
    for name in ("text", "label", "source", "target"):
        p.add_argument(f"--{name}-field", default=name, help=f"the records' {name} field (default {name!r})")
    p.add_argument("--save", choices=["best", "last"], default="best",
                   help="the adapter written: the best on validation (default) or the last")
    p.add_argument("--labels", default=None, help="comma-separated label names, in class order")
    words = p.add_mutually_exclusive_group()
    words.add_argument("--label-words", default=None, metavar="'LABEL=WORDS,...'",
                       help="each label's words, scored after the templated text (any number of tokens): "
                            "comma-separated label=words pairs, the words verbatim after the first '=' (a leading "
                            "space included); default ' <label>'")
    words.add_argument("--label-words-file", default=None, metavar="FILE.json",
                       help="the same as a JSON object label -> words (for words with commas)")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap the templated input in the model's own chat template (tokenizer_config.json or GGUF)")
    p.add_argument("--template", default=None,
                   help="the input around each example: {text} (classification; default 'Review: {text}\\nSentiment:') "
                        "or {source} (generation; default '{source}') is replaced by the field")
    p.add_argument("--max-eval", type=int, default=None, help="evaluate at most N examples per split")
    p.add_argument("--no-progress", action="store_true")


def _cmd_train(args):
    cfg = TrainConfig(
        method=args.method, num_virtual_tokens=args.num_virtual_tokens, init=args.init, init_text=args.init_text,
        prefix_projection=args.prefix_projection, encoder_hidden_size=args.encoder_hidden_size, lr=args.lr,
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        warmup=args.warmup, schedule=args.schedule, weight_decay=args.weight_decay, clip=args.clip, seed=args.seed,
        threads=args.threads, eval_every=args.eval_every, patience=args.patience,
        checkpoint_every=args.checkpoint_every, output=args.output, resume=args.resume, model=args.model,
        data=args.data, labels=args.labels.split(",") if args.labels else None, max_eval=args.max_eval,
        progress=not args.no_progress, train_file=args.train_file, validation_file=args.validation_file,
        test_file=args.test_file, text_field=args.text_field, label_field=args.label_field,
        source_field=args.source_field, target_field=args.target_field, save=args.save, template=args.template,
        chat_template=args.chat_template, label_words=_label_words(args),
    )
    comm = world()
    if args.resume:  # the saved run's settings; see _resumed_config for the flags that may change
        saved = None
        if comm.rank == 0:  # rank 0's files; a failure to read them is every rank's
            try:
                saved = _saved_config(Path(args.resume))
            except (OSError, ValueError) as exc:
                saved = ValueError(f"resume: cannot read {Path(args.resume) / 'run_config.json'} ({exc})")
        saved = comm.bcast(saved)
        if isinstance(saved, Exception):
            raise saved
        if saved:
            cfg = _resumed_config(cfg, saved, args)
    cfg.resolved()  # a bad setting stops every rank alike, before any collective
    if comm.size == 1:
        train(cfg, comm=comm)
        return 0
    try:
        train(cfg, comm=comm)
    except DistributedError:
        raise  # every rank has it; main() prints rank 0's
    except BaseException:  # an error on one rank would leave the others waiting: end them all
        traceback.print_exc()
        sys.stderr.write(f"softprompt train: rank {comm.rank} failed; ending all {comm.size} ranks\n")
        sys.stderr.flush()
        comm.abort(1)
    return 0


# What `--resume DIR` may change: how long the run goes on (--max-steps or --epochs: extend, or
# shorten if the run has not passed it) and how it runs here (--threads, --no-progress). Any other
# flag given must equal the saved run's setting, or the resume stops with an error naming it.
RESUME_MAY_CHANGE = {"max_steps", "epochs", "threads", "progress", "resume"}


def _resumed_config(cfg, saved, args):
    """The saved run's TrainConfig with the flags the command line gave and may change."""
    explicit = args.explicit
    conflicts = []
    for name in sorted(explicit - RESUME_MAY_CHANGE):
        value, was = getattr(cfg, name), saved.get(name)
        if value != was:
            conflicts.append(f"--{name.replace('_', '-')} {value!r} (the run has {was!r})")
    if conflicts:
        raise ValueError(f"resume: {', '.join(conflicts)} conflict with {Path(args.resume) / 'run_config.json'}; "
                         "a resumed run may change only --max-steps / --epochs, --threads and --no-progress")
    changes = {"resume": args.resume, "progress": cfg.progress}
    if "max_steps" in explicit or "epochs" in explicit:
        changes["max_steps"], changes["epochs"] = cfg.max_steps, cfg.epochs if "epochs" in explicit else None
    if "threads" in explicit:
        changes["threads"] = cfg.threads
    return TrainConfig(**{**saved, **changes})


def _label_words(args):
    if args.label_words is not None:
        return data_mod.parse_label_words(args.label_words)
    if args.label_words_file is not None:
        return data_mod.read_label_words(args.label_words_file)
    return None


def _explicit_flags(argv):
    """The TrainConfig fields the command line gave (--no-progress counts as progress,
    --label-words-file as label_words)."""
    names = {tok[2:].split("=", 1)[0].replace("-", "_") for tok in argv if tok.startswith("--")}
    rename = {"no_progress": "progress", "label_words_file": "label_words"}
    return {rename.get(n, n) for n in names}


def _saved_config(run: Path):
    """The run's run_config.json as a dict of TrainConfig fields (None if there is none); a
    ValueError naming the file for anything else."""
    f = run / "run_config.json"
    if not f.exists():
        return None
    saved = json.loads(f.read_text())
    if not isinstance(saved, dict):
        raise ValueError(f"expected a JSON object, got {type(saved).__name__}")
    unknown = sorted(set(saved) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown settings {unknown}")
    try:
        TrainConfig(**saved).resolved()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"its settings do not make a run ({exc})") from None
    return saved


def _load_run(adapter_dir, model_arg):
    adapter_dir = Path(adapter_dir)
    info_file = adapter_dir / "softprompt.json"
    info = read_adapter_config(info_file)[0] if info_file.exists() else {}
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"adapter: {str(adapter_dir)!r} has no adapter_config.json")
    model = softprompt.load_model(model_arg or info.get("model"))
    adapter_cls = softprompt.PrefixTuning if read_adapter_config(config_file)[0].get(
        "peft_type") == "PREFIX_TUNING" else softprompt.PromptTuning
    adapter = adapter_cls.from_pretrained(adapter_dir, model)
    return model, adapter, info


def _cmd_eval(args):
    model, adapter, info = _load_run(args.adapter, args.model)
    labels = info.get("labels") or (args.labels.split(",") if args.labels else None)
    fields = data_mod.Fields(**info.get("fields", {}))
    if args.data and args.split is None:  # the whole file, every row as it is
        kind, examples = data_mod.read_examples(args.data, fields)
        if kind == "classification":
            labels = data_mod.class_labels({e.label for e in examples}, labels, repr(args.data))
        dataset, split_name = data_mod.Dataset(kind, [], [], examples, labels=tuple(labels or ())), "data"
    else:  # a split of --data's fixed cut, or of the default data
        dataset = data_mod.load_file(args.data, labels, fields) if args.data else data_mod.rotten_tomatoes()
        split_name = args.split or "test"
    task = _task(model, dataset, adapter, info)
    split = task.test if split_name == "data" else {"test": task.test, "validation": task.validation,
                                                     "train": task.train}[split_name]
    value = task.evaluate(adapter, split, limit=args.max_eval)
    name = "accuracy" if task.kind == "classification" else "loss"
    print(json.dumps({f"{split_name}_{name}": value, "examples": min(len(split), args.max_eval or len(split))}))
    return 0


def _cmd_generate(args):
    model, adapter, info = _load_run(args.adapter, args.model)
    if info.get("kind") == "classification":
        labels = info["labels"]
        dataset = data_mod.Dataset("classification", [], [], [], labels=tuple(labels))
        task = _task(model, dataset, adapter, info)
        print(task.predict(adapter, args.text))
        return 0
    template = _generation_template(model, info)
    ids = model.tokenizer.encode(template.replace("{source}", args.text), add_special_tokens=False).ids
    eos = model.config.eos_token_id
    new = softprompt.generate(model, [ids], adapter=adapter, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p,
                              stop_tokens=[eos] if eos is not None else [], seed=args.seed)[0]
    print(model.tokenizer.decode(new))
    return 0


def _cmd_predict(args):
    """One JSON object per row of --data, in order: the label and every label's probability
    (classification) or the generated text (generation, greedy with the KV cache)."""
    import numpy as np

    from .adapters import _atomic_write

    model, adapter, info = _load_run(args.adapter, args.model)
    fields = data_mod.Fields(**info.get("fields", {}))
    kind, examples = data_mod.read_examples(args.data, fields, inputs_only=True)
    if kind != info.get("kind", kind):
        raise ValueError(f"{args.data}: holds {kind} records, the adapter in {args.adapter} was trained for "
                         f"{info['kind']}")
    bar = _bar(len(examples), "predict", not args.no_progress)
    rows = []
    if kind == "classification":
        labels = info["labels"]
        dataset = data_mod.Dataset(kind, [], [], [], labels=tuple(labels))
        task = _task(model, dataset, adapter, info)
        enc = [task.encode_text(e.text) for e in examples]
        for b0 in range(0, len(enc), args.batch_size):
            logits = task.logits(adapter, enc[b0:b0 + args.batch_size]).astype(np.float64)
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            rows += [{"label": labels[int(row.argmax())], "probabilities": dict(zip(labels, map(float, row)))}
                     for row in p]
            bar.update(len(logits))
    else:
        template = _generation_template(model, info)
        eos = model.config.eos_token_id
        new_tokens = args.max_new_tokens or (info.get("max_target_tokens") or 32) + 8
        for b0 in range(0, len(examples), args.batch_size):
            batch = [model.tokenizer.encode(template.replace("{source}", e.source), add_special_tokens=False).ids
                     for e in examples[b0:b0 + args.batch_size]]
            out = softprompt.generate(model, batch, adapter=adapter, max_new_tokens=new_tokens,
                                      stop_tokens=[eos] if eos is not None else [])
            rows += [{"text": model.tokenizer.decode(ids)} for ids in out]
            bar.update(len(batch))
    bar.close()
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    _atomic_write(Path(args.output), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    print(f"{len(rows)} predictions in {args.output}", file=sys.stderr)
    return 0


def _task(model, dataset, adapter, info):
    """The Task of a saved run (softprompt.json): its template, chat template and label words."""
    return Task(model, dataset, info.get("template"), adapter.num_virtual_tokens, info.get("chat_template", False),
                label_words=info.get("label_words"))


def _generation_template(model, info):
    """The run's generation template, inside the model's chat template if the run used it."""
    template = data_mod.check_template(info.get("template"), "generation")
    if info.get("chat_template"):
        if model.chat_template is None:
            raise ValueError("chat_template: the run used the model's chat template, this model has none")
        template = data_mod.render_chat(model.chat_template, template)
    return template


def _bar(total, desc, enabled):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="row", disable=not enabled, dynamic_ncols=True)


def _cmd_info(args):
    model = softprompt.load_model(args.model)
    c = model.config
    total = model.num_parameters()
    print(f"model: {c.name_or_path} ({c.model_type or c.arch}): {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} heads "
          f"({c.num_kv_heads} kv) of {c.head_dim}, vocabulary {c.vocab_size}; {total:,} frozen parameters")
    print("| P | prompt tuning | % of model | prefix tuning | % of model |")
    print("|---|---|---|---|---|")
    for P in (10, 20, 50, 100):
        pr, px = P * c.hidden_size, c.num_layers * 2 * P * c.num_kv_heads * c.head_dim
        print(f"| {P} | {pr:,} | {100 * pr / total:.4f}% | {px:,} | {100 * px / total:.3f}% |")
    if args.adapter:
        _, adapter, _ = _load_run(args.adapter, args.model)
        print(f"adapter {args.adapter}: {adapter.kind} tuning, {adapter.num_virtual_tokens} virtual tokens")
        adapter.print_trainable_parameters(model)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="softprompt", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    p = sub.add_parser("eval", help="accuracy of an adapter on a data file or the default test split")
    p.add_argument("--adapter", required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--labels", default=None)
    p.add_argument("--split", choices=["test", "validation", "train"], default=None,
                   help="a split of --data's fixed cut (or of the default data; default test); without it "
                        "--data FILE is scored whole")
    p.add_argument("--model", default=None)
    p.add_argument("--max-eval", type=int, default=None)
    p = sub.add_parser("generate", help="generate text (classification adapters print the label)")
    p.add_argument("--adapter", required=True)
    p.add_argument("text")
    p.add_argument("--model", default=None)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("predict", help="predictions for every row of a file, as JSON lines", allow_abbrev=False)
    p.add_argument("--adapter", required=True)
    p.add_argument("--data", required=True, help="JSONL/CSV with the text (or source) field; labels not needed")
    p.add_argument("--output", required=True, help="the JSON-lines file to write (atomically)")
    p.add_argument("--model", default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation: default the longest training target + 8 tokens")
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("info", help="model and adapter parameter counts")
    p.add_argument("--model", default=None)
    p.add_argument("--adapter", default=None)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.explicit = _explicit_flags(argv)
    try:
        commands = {"train": _cmd_train, "eval": _cmd_eval, "generate": _cmd_generate, "predict": _cmd_predict,
                    "info": _cmd_info}
        return commands[args.command](args)
    except (ValueError, OSError, KeyError, DistributedError) as exc:
        if launched_rank() == 0:  # under MPI every rank has the error: rank 0 reports it
            print(f"softprompt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
