"""The training driver: AdamW on the adapter's arrays only, warmup + linear/cosine decay, clipping,
gradient accumulation, length-bucketed batches, evaluation and early stopping, atomic checkpoints
with bitwise-exact resume, and the files PEFT reads.

The frozen model's weights are never updated or copied; only the adapter (and, for BERT, a small
classification head) are trained.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import data as data_mod
from . import losses
from .adapters import PrefixProjection, PrefixTuning, PromptTuning, _atomic_write, _task_type
from .models.base import Continuations

# Defaults per method, chosen by experiment on the default job (see README).
# With --prefix-projection every Adam step moves the prefix through a 256-wide MLP: the same 5e-3
# collapsed the default job to the majority class (57.2% test), hence a ~30x smaller default.
DEFAULT_LR = {"prompt": 3e-2, "prefix": 5e-3, "prefix_projection": 1.5e-4}
DEFAULT_INIT = {"prompt": "text", "prefix": "text"}
DEFAULT_INIT_TEXT = "Classify the sentiment of this movie review as positive or negative."
CHECKPOINT = "checkpoint.npz"


@dataclass
class TrainConfig:
    method: str = "prompt"  # prompt | prefix
    num_virtual_tokens: int = 20
    init: str | None = None  # default per method (DEFAULT_INIT)
    init_text: str = DEFAULT_INIT_TEXT
    prefix_projection: bool = False
    encoder_hidden_size: int = 256
    lr: float | None = None  # default per method (DEFAULT_LR)
    epochs: float | None = None  # overrides max_steps when given
    max_steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    warmup: int = 30
    schedule: str = "linear"  # linear | cosine
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    threads: int | None = None  # our kernels' and NumPy's BLAS threads (default: all cores, shared by MPI ranks)
    eval_every: int = 100
    patience: int = 0  # evaluations without improvement before stopping; 0 = never stop early
    checkpoint_every: int = 50
    output: str = "softprompt-output"
    resume: str | None = None
    model: str | None = None
    data: str | None = None  # one file, cut into test/validation/train by data.py's fixed rule
    train_file: str | None = None  # or separate files, used as they are (validation, test optional)
    validation_file: str | None = None
    test_file: str | None = None
    text_field: str = "text"  # the records' field names
    label_field: str = "label"
    source_field: str = "source"
    target_field: str = "target"
    labels: list | None = None
    label_words: dict | None = None  # label -> words scored after the templated text; None: " <label>"
    chat_template: bool = False  # wrap the templated input in the model's own chat template
    template: str | None = None  # with {text} (classification) or {source} (generation); None: the default
    save: str = "best"  # the adapter written: the best on validation ("best") or the last ("last")
    max_eval: int | None = None  # cap on evaluated examples per split (quick runs)
    progress: bool = True

    def resolved(self):
        c = TrainConfig(**asdict(self))
        if c.method not in ("prompt", "prefix"):
            raise ValueError(f"method: expected 'prompt' or 'prefix', got {c.method!r}")
        if c.lr is None:
            c.lr = DEFAULT_LR["prefix_projection" if c.prefix_projection else c.method]
        c.init = DEFAULT_INIT[c.method] if c.init is None else c.init
        for name in ("num_virtual_tokens", "batch_size", "grad_accum", "max_steps", "eval_every", "checkpoint_every"):
            if getattr(c, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(c, name)}")
        if c.lr <= 0 or c.warmup < 0 or c.clip < 0 or c.weight_decay < 0:
            raise ValueError("lr > 0, warmup >= 0, clip >= 0 and weight_decay >= 0 expected")
        if c.schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule: expected 'linear' or 'cosine', got {c.schedule!r}")
        if c.prefix_projection and c.method != "prefix":
            raise ValueError("prefix_projection: only for --method prefix")
        if c.save not in ("best", "last"):
            raise ValueError(f"save: expected 'best' or 'last', got {c.save!r}")
        if c.data and c.train_file:
            raise ValueError("data: give --data (one file, split) or --train-file (separate files), not both")
        if c.label_words is not None and (not isinstance(c.label_words, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in c.label_words.items())):
            raise ValueError(f"label_words: expected a dict of label -> words (strings), got {c.label_words!r}")
        if (c.validation_file or c.test_file) and not c.train_file:
            raise ValueError("validation_file, test_file: need --train-file")
        return c

    def fields(self):
        return data_mod.Fields(self.text_field, self.label_field, self.source_field, self.target_field)


# --------------------------------------------------------------------------- optimizer, schedule
class AdamW:
    """AdamW (decoupled weight decay) over a dict of float32 arrays, updated in place."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.params, self.lr, self.betas, self.eps, self.wd = params, lr, betas, eps, weight_decay
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, grads, lr):
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        for k, p in self.params.items():
            g = grads[k].astype(p.dtype, copy=False)
            self.m[k] *= b1
            self.m[k] += (1 - b1) * g
            self.v[k] *= b2
            self.v[k] += (1 - b2) * g * g
            if self.wd:
                p -= lr * self.wd * p
            p -= lr * (self.m[k] / c1) / (np.sqrt(self.v[k] / c2) + self.eps)


def learning_rate(step, total, base, warmup, schedule):
    """Linear warmup over `warmup` steps, then linear or cosine decay to 0 at `total` (step from 0)."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    return base * max(0.0, 1.0 - frac)


def clip_gradients(grads, max_norm):
    """Scales all gradients together so their global L2 norm is at most max_norm. -> the norm."""
    norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    if max_norm and norm > max_norm:
        for g in grads.values():
            g *= max_norm / norm
    return norm


def make_adapter(model, cfg, label_ids=None, num_labels=None):
    """A fresh adapter for the resolved TrainConfig (label_ids: for the "labels" init). num_labels:
    give it a ClassificationHead of that many classes (an encoder's classification, Task.uses_head)."""
    P = cfg.num_virtual_tokens
    if cfg.method == "prompt":
        adapter = PromptTuning.for_model(model, P, init=cfg.init, init_text=cfg.init_text, label_ids=label_ids,
                                         seed=cfg.seed)
    elif cfg.prefix_projection:
        base = PrefixTuning.for_model(model, P, init=cfg.init, init_text=cfg.init_text, seed=cfg.seed).prefix
        adapter = PrefixProjection(base, cfg.encoder_hidden_size, seed=cfg.seed)
        adapter.base_model_name_or_path = model.config.name_or_path
        adapter.init, adapter.init_text = cfg.init, cfg.init_text if cfg.init == "text" else None
        adapter.task_type = _task_type(model)
    else:
        adapter = PrefixTuning.for_model(model, P, init=cfg.init, init_text=cfg.init_text, seed=cfg.seed)
    if num_labels:
        adapter.head = losses.ClassificationHead(model.config.hidden_size, num_labels, seed=cfg.seed)
    return adapter


# --------------------------------------------------------------------------- the task
class Task:
    """Encodes a Dataset for a model and computes loss, gradient and accuracy on batches.

    Classification with a causal LM scores the label words at the answer position; with an encoder
    (BERT: `uses_head`) a ClassificationHead on the pooled output is trained with the adapter (it
    is the adapter's .head, see make_adapter), and the input gets the tokenizer's special tokens
    ([CLS] first, which the pooler reads), as PEFT's users tokenize for BertForSequenceClassification."""

    def __init__(self, model, dataset, template=None, num_virtual_tokens=0, chat_template=False, label_words=None):
        self.template = template = data_mod.check_template(template, dataset.kind)
        self.chat_template = bool(chat_template)
        if chat_template:  # the model's chat template around the task template (the placeholder passes)
            if model.chat_template is None:
                raise ValueError("chat_template: the model has none (tokenizer_config.json's chat_template or the "
                                 "GGUF's tokenizer.chat_template)")
            template = data_mod.render_chat(model.chat_template, template)
        self.encoding_template = template
        self.model, self.dataset = model, dataset
        # Inputs are cut to 512 tokens, and where positions come from a table (GPT-2, BERT) to what
        # the table holds after the virtual tokens' positions.
        limit = model.position_limit
        max_tokens = 512 if limit is None else min(512, limit - num_virtual_tokens)
        if max_tokens < 2:
            raise ValueError(f"num_virtual_tokens: {num_virtual_tokens} leaves {max_tokens} of the model's {limit} "
                             "positions for the input")
        self.max_tokens = max_tokens
        tok = model.tokenizer
        if tok is None:
            raise ValueError("model: training needs a tokenizer")
        self.kind = dataset.kind
        self.uses_head = self.kind == "classification" and not model.config.causal
        if self.kind == "generation" and not model.config.causal:
            raise ValueError("data: generation (source/target) needs a causal model, not an encoder")
        self.label_words = ()
        if label_words is not None and (self.kind != "classification" or self.uses_head):
            raise ValueError("label_words: only for classification with a causal model (an encoder trains a "
                             "classification head)")
        if self.kind == "classification":
            self.labels = list(dataset.labels)
            if not self.uses_head:
                self.label_words = data_mod.label_words_for(tok, self.labels, label_words)
            # The words' own tokens, in label order: the prompt's "labels" init.
            self.label_ids = [t for w in self.label_words for t in tok.encode(w, add_special_tokens=False).ids]
            enc = self.encode
        else:
            self.labels, self.label_ids = [], []
            eos = model.config.eos_token_id
            enc = lambda e: data_mod.encode_generation(tok, e, eos, max_tokens, template)  # noqa: E731
        self.train = [enc(e) for e in dataset.train]
        self.validation = [enc(e) for e in dataset.validation]
        self.test = [enc(e) for e in dataset.test]
        # Label tokens after the first, padded to the training set's longest: a row's continuation
        # then has the same shape whatever batch or process it falls in.
        self.continuation_length = max((len(c) - 1 for e in self.train for c in e.label_tokens), default=0)

    def encode(self, example):
        """An Example (classification) -> Encoded: the templated text, and each label's tokens after it."""
        return data_mod.encode_classification(self.model.tokenizer, example, self.labels, self.encoding_template,
                                              self.max_tokens, add_special_tokens=self.uses_head,
                                              label_words=self.label_words)

    def encode_text(self, text):
        """encode for a text without a label (predictions)."""
        return self.encode(data_mod.Example(text=text, label=self.labels[0]))

    def loss_and_grads(self, adapter, batch, length=None, total=None, prompt_sum=None, raw=False):
        """-> (loss, {param: grad}, tokens, weight) for a list of Encoded; the loss is a mean over
        `weight` items (examples for classification, target tokens for generation), or, with
        total, their sum divided by total (a shard of a bigger batch: each of its rows then gets
        the exact gradient it has in the whole batch). length: pad to at least this many tokens.
        prompt_sum: see Transformer.backward. raw: the model's gradient of the prompt or prefix
        itself ({"prompt"} or {"prefix"}), before the adapter maps it to its parameters."""
        ids, mask = data_mod.pad_batch(batch, length=length)
        if self.uses_head:
            return self._head_loss_and_grads(adapter, batch, ids, mask, total, raw)
        if self.kind == "classification":
            scores, state = self._label_scores(adapter, batch, ids, mask, keep_cache=True)
            loss, dscores = losses.cross_entropy(scores, np.array([e.answer for e in batch]), total)
            grads = self._label_scores_backward(dscores, state, prompt_sum)
            weight = len(batch)
        else:
            hidden, cache = self.model.forward(ids, mask, adapter=adapter, keep_cache=True)
            targets, loss_mask = _next_token_targets(ids, mask, batch)
            loss, dh = losses.lm_loss(self.model, hidden, targets, loss_mask, total)
            weight = int(loss_mask.sum())
            grads = self.model.backward(dh, cache, prompt_sum)
        grads = {k: grads[k] for k in ("prompt", "prefix") if k in grads} if raw else adapter.gradients(grads)
        return loss, grads, int(mask.sum()), weight

    # Rank classification: label k's score is the summed log-probability of its tokens t_1..t_n
    # after the input, less log Z of the first token's distribution, which every label shares, so
    # neither the ranking nor the softmax over labels changes (one-token labels: the label words'
    # logits, the verbalizer). Labels of several tokens: t_1..t_{n-1} of every such label run as
    # extra rows of the same pass (models.base.Continuations), packed with the input's rows for
    # the row-wise layers and attending to their example's keys, so the input runs once, not once
    # per label.
    def _label_scores(self, adapter, batch, ids, mask, keep_cache=False):
        """-> scores [B, K] (float64), and the state _label_scores_backward reads."""
        first = np.array([[c[0] for c in e.label_tokens] for e in batch])  # [B, K]
        if (first == first[:1]).all():
            first = first[0]  # one set of first tokens for every row: the [K] path
        cont = self._continuation_rows(batch)
        out = self.model.forward(ids, mask, adapter=adapter, keep_cache=keep_cache,
                                 continuations=None if cont is None else cont[2])
        hidden, cache = out if keep_cache else (out, None)
        logp = None
        if cont is not None:
            hidden, hidden_c = hidden
            example, label, rows, targets = cont
            logp = losses.TokenLogProbs(self.model, hidden_c, targets, rows.mask)
        pos = mask.sum(1) - 1
        first_logits = losses.label_word_logits(self.model, hidden, pos, first)
        scores = first_logits.astype(np.float64)
        if logp is not None:
            np.add.at(scores, (example, label), logp.values.sum(axis=1))
        return scores, (hidden.shape, cache, pos, first, first_logits, cont, logp)

    def _label_scores_backward(self, dscores, state, prompt_sum=None):
        """The model's gradients (backward's dict) given d loss / d scores [B, K]."""
        shape, cache, pos, first, first_logits, cont, logp = state
        dh = losses.label_word_logits_backward(self.model, dscores, shape, pos, first, first_logits)
        dc = None
        if logp is not None:
            example, label = cont[0], cont[1]
            dc = logp.backward(np.broadcast_to(dscores[example, label][:, None], logp.values.shape))
        return self.model.backward(dh, cache, prompt_sum, dcontinuation=dc)

    def _continuation_rows(self, batch):
        """The label tokens after the first, as rows: -> (example [R], label [R], Continuations
        (ids [R, E]: t_1..t_{n-1}), targets [R, E]: t_2..t_n), or None when every label here is one
        token. E is at least the training set's longest, so a row's shape does not depend on its
        batch (data parallelism)."""
        pairs = [(b, k) for b, e in enumerate(batch) for k, c in enumerate(e.label_tokens) if len(c) > 1]
        if not pairs:
            return None
        E = max(self.continuation_length, max(len(batch[b].label_tokens[k]) - 1 for b, k in pairs))
        ids, targets = np.zeros((len(pairs), E), dtype=np.int64), np.zeros((len(pairs), E), dtype=np.int64)
        mask = np.zeros((len(pairs), E), dtype=bool)
        for r, (b, k) in enumerate(pairs):
            c = batch[b].label_tokens[k]
            ids[r, :len(c) - 1], targets[r, :len(c) - 1], mask[r, :len(c) - 1] = c[:-1], c[1:], True
        example, label = (np.array(x) for x in zip(*pairs))
        return example, label, Continuations(example, ids, mask), targets

    def _head_loss_and_grads(self, adapter, batch, ids, mask, total, raw):
        """loss_and_grads through the adapter's classification head on the pooled output."""
        head = _head(adapter)
        hidden, cache = self.model.forward(ids, mask, adapter=adapter, keep_cache=True, keep_virtual=True)
        pooled, pooled_cache = self.model.pooled(hidden)
        loss, dpooled, head_grads, _ = head.loss(pooled, np.array([e.answer for e in batch]), total)
        grads = self.model.backward(self.model.pooled_backward(dpooled, pooled_cache), cache)
        grads = {**{k: grads[k] for k in ("prompt", "prefix") if k in grads}, **head_grads}
        return loss, grads if raw else adapter.gradients(grads), int(mask.sum()), len(batch)

    def logits(self, adapter, batch, head=None):
        """Classification scores [B, K] of a list of Encoded (see encode): each label's rank-
        classification score (see _label_scores; their softmax is the label probabilities), or
        (uses_head) the head's logits on the pooled output (head: the adapter's, or this one)."""
        ids, mask = data_mod.pad_batch(batch)
        if self.uses_head:
            hidden = self.model.forward(ids, mask, adapter=adapter, keep_virtual=True)
            return _head(adapter, head).logits(self.model.pooled(hidden)[0])
        return self._label_scores(adapter, batch, ids, mask)[0]

    def max_target_tokens(self):
        """The longest training target in tokens (generation; 0 for classification)."""
        return max((len(e.ids) - 1 - e.loss_from for e in self.train), default=0) if self.kind == "generation" else 0

    def weight(self, e):
        """What one example counts in a mean loss: 1, or its target tokens (generation)."""
        return 1 if self.kind == "classification" else max(0, len(e.ids) - 1 - e.loss_from)

    def evaluate(self, adapter, examples, batch_size=32, limit=None, comm=None, head=None):
        """Classification accuracy (or, for generation, the mean loss per target token) on examples;
        see evaluate_metrics."""
        report = self.evaluate_metrics(adapter, examples, batch_size, limit, comm, head)
        return report["accuracy" if self.kind == "classification" else "loss"]

    def evaluate_metrics(self, adapter, examples, batch_size=32, limit=None, comm=None, head=None):
        """-> classification: {"accuracy", "macro_f1", "confusion_matrix" (rows: the true label,
        columns: the predicted one, in label order)}; generation: {"loss" (mean per target token),
        "perplexity" (exp of it)}. With an MPI communicator every rank evaluates its share and the
        counts are summed (all ranks must call it). head: the classification head to use without
        an adapter (uses_head)."""
        examples = examples[:limit] if limit else examples
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))  # less padding
        if comm is not None and comm.size > 1:
            order = order[comm.rank::comm.size]  # interleaved: every rank gets short and long ones
        K = len(self.labels)
        confusion, loss_sum, targets = np.zeros((K, K)), 0.0, 0
        for b0 in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[b0:b0 + batch_size]]
            if self.kind == "classification":
                predicted = self.logits(adapter, batch, head).argmax(1)
                np.add.at(confusion, (np.array([e.answer for e in batch]), predicted), 1)
            else:  # a sum over target tokens, whatever batches they fall in
                ids, mask = data_mod.pad_batch(batch)
                hidden = self.model.forward(ids, mask, adapter=adapter)
                target_ids, loss_mask = _next_token_targets(ids, mask, batch)
                if loss_mask.any():
                    loss_sum += losses.lm_loss(self.model, hidden, target_ids, loss_mask, total=1)[0]
                    targets += int(loss_mask.sum())
        if comm is not None and comm.size > 1:
            flat = comm.allreduce_sum(np.concatenate([confusion.reshape(-1), [loss_sum, targets]]))
            confusion, loss_sum, targets = flat[:-2].reshape(K, K), flat[-2], flat[-1]
        if self.kind == "classification":
            return {"accuracy": float(np.trace(confusion)) / max(1, len(examples)),
                    "macro_f1": macro_f1(confusion), "confusion_matrix": confusion.astype(int).tolist()}
        loss = float(loss_sum) / max(1, targets)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}

    def generate_targets(self, adapter, split="test", limit=None, max_new_tokens=None, batch_size=16):
        """Greedy decoding (KV cache, batched) of each example's source in a split (generation)
        -> (predictions, references) as text. max_new_tokens: default the longest training target
        + 8 tokens."""
        from .generate import generate

        encoded, raw = getattr(self, split), getattr(self.dataset, split)
        encoded, raw = (encoded[:limit], raw[:limit]) if limit else (encoded, raw)
        new = max_new_tokens or self.max_target_tokens() + 8
        eos = self.model.config.eos_token_id
        predictions = []
        for b0 in range(0, len(encoded), batch_size):
            sources = [e.ids[:e.loss_from + 1] for e in encoded[b0:b0 + batch_size]]
            out = generate(self.model, sources, adapter=adapter, max_new_tokens=new,
                           stop_tokens=[eos] if eos is not None else [])
            predictions += [self.model.tokenizer.decode(ids) for ids in out]
        return predictions, [e.target for e in raw]

    def predict(self, adapter, text):
        """The label (classification) for one text."""
        return self.labels[int(self.logits(adapter, [self.encode_text(text)]).argmax())]


def _head(adapter, head=None):
    head = head if head is not None else getattr(adapter, "head", None)
    if head is None:
        raise ValueError("adapter: classification with an encoder needs the adapter's classification head "
                         "(adapter.head); this adapter has none")
    return head


def text_metrics(predictions, references):
    """Generated texts against references -> ({"exact_match", "bleu", "chrf", "rougeL"}, note).
    exact_match: the share equal after stripping and collapsing whitespace (case-sensitive); bleu
    and chrf: sacrebleu's corpus scores with its defaults (0-100); rougeL: the mean ROUGE-L F1 of
    rouge-score with its Porter stemmer. Without the `metrics` extra only exact_match, and a note
    saying what to install."""
    norm = lambda t: " ".join(t.split())
    out = {"exact_match": float(np.mean([norm(p) == norm(r) for p, r in zip(predictions, references)]))}
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError:
        return out, "BLEU, chrF and ROUGE-L need the metrics extra: pip install 'softprompt[metrics]'"
    out["bleu"] = float(sacrebleu.corpus_bleu(predictions, [references]).score)
    out["chrf"] = float(sacrebleu.corpus_chrf(predictions, [references]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    out["rougeL"] = float(np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]))
    return out, None


def macro_f1(confusion):
    """The mean over classes of F1 = 2 tp / (2 tp + fp + fn), from a confusion matrix (rows: true,
    columns: predicted); a class with no true and no predicted example counts 0 (scikit-learn's
    zero_division=0)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    denominator = confusion.sum(0) + confusion.sum(1)  # 2 tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return float(f1.mean()) if len(f1) else 0.0


def _next_token_targets(ids, mask, batch):
    """Position t predicts token t+1; only target tokens count (from each example's loss_from, up
    to its last real token). -> targets [B, T], loss_mask [B, T]."""
    targets = np.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    t = np.arange(ids.shape[1])[None, :]
    starts = np.array([e.loss_from for e in batch])[:, None]
    return targets, (t >= starts) & (t < mask.sum(1)[:, None] - 1)


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, adapter, opt, state):
    """Everything a resume needs in one .npz, written atomically (a killed run leaves the last
    complete checkpoint, never a torn one)."""
    arrays = {f"param/{k}": v for k, v in adapter.parameters().items()}
    arrays.update({f"m/{k}": v for k, v in opt.m.items()})
    arrays.update({f"v/{k}": v for k, v in opt.v.items()})
    if state.get("best_params") is not None:
        arrays.update({f"best/{k}": v for k, v in state["best_params"].items()})
    meta = {k: v for k, v in state.items() if k != "best_params"}
    meta["adam_t"] = opt.t
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())

    _atomic_write(path, write)


def load_checkpoint(path: Path, adapter, opt, content=None):
    """Restores adapter and optimizer from the checkpoint at path (or from its bytes, content).
    -> the saved training state."""
    import zipfile

    try:
        with np.load(path if content is None else io.BytesIO(content)) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            arrays = {}
            for k, p in adapter.parameters().items():
                for name in (f"param/{k}", f"m/{k}", f"v/{k}"):
                    arrays[name] = z[name]
                    if arrays[name].shape != p.shape:  # never broadcast a checkpoint into an adapter
                        raise ValueError(f"array {name} has shape {arrays[name].shape}, the adapter's is {p.shape}")
            best = {k[5:]: z[k].copy() for k in z.files if k.startswith("best/")} or None
            if not isinstance(meta, dict) or "adam_t" not in meta:
                raise ValueError("its meta record has no adam_t")
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise ValueError(f"resume: {path} is not a usable checkpoint ({exc})") from None
    for k, p in adapter.parameters().items():
        p[...] = arrays[f"param/{k}"]
        opt.m[k][...] = arrays[f"m/{k}"]
        opt.v[k][...] = arrays[f"v/{k}"]
    opt.t = meta.pop("adam_t")
    meta["best_params"] = best
    return meta


# --------------------------------------------------------------------------- the loop
def micro_batches(task, cfg, epoch):
    """The batches of one epoch: a function of (seed, epoch) only, so a resumed run sees the same."""
    rng = np.random.default_rng([cfg.seed, epoch])
    return data_mod.bucketed_batches(task.train, cfg.batch_size, rng)


@dataclass
class Run:
    """Everything one training job holds: the resolved config, the model's task, the adapter and its
    optimizer, the output folder, and the state a checkpoint saves (see `train`)."""

    cfg: TrainConfig
    comm: object  # distributed.SingleProcess or MPIWorld
    task: Task
    adapter: object
    opt: AdamW
    total: int  # optimizer steps of the whole run
    out: Path
    log: Callable
    state: dict = field(default_factory=lambda: {
        "step": 0, "history": [], "evals": [], "best": None, "best_step": None, "since_best": 0,
        "train_seconds": 0.0, "eval_seconds": 0.0, "tokens": 0, "best_params": None})

    @property
    def metric(self):
        return "accuracy" if self.task.kind == "classification" else "loss"

    def better(self, a, b):
        return a > b if self.task.kind == "classification" else a < b


def train(cfg: TrainConfig, model=None, dataset=None, log=print, comm=None, on_step=None):
    """Runs the job described by cfg. -> metrics dict (also written to OUTPUT/metrics.json).

    on_step(run): called after every optimizer step (and its evaluation and checkpoint), with the
    `Run` (its .state["step"] is the step just done); raising there ends the run like an
    interruption (tests use it to stop or kill a run at a given step).

    Under an MPI launcher with several processes (see `softprompt.distributed`), data-parallel:
    every rank holds the model and takes its contiguous share of each global micro-batch; one
    allreduce per step sums the adapter's gradient (weighted by examples or target tokens, so the
    loss means what it means in one process), and every rank applies the same AdamW update. Rank 0
    alone logs, shows progress and writes files; evaluation is sharded and reduced."""
    run = _setup(cfg, model, dataset, log, comm)
    if run.cfg.resume:
        _resume(run)
    else:
        _start(run)
    _loop(run, on_step)
    return _finish(run)


def _setup(cfg, model, dataset, log, comm):
    """Threads, model, data, adapter and optimizer, on every rank (any rank's failure stops all)."""
    from . import load_model, set_num_threads
    from .distributed import world

    comm = comm or world()
    cfg = cfg.resolved()
    if comm.rank != 0:
        log = _quiet
    threads = cfg.threads or _threads_per_rank(comm)
    if threads:
        set_num_threads(threads)
        _limit_blas_threads(threads)
    error = task = None
    try:  # every rank loads its own copy; a failure anywhere stops every rank with all the reasons
        model = model or load_model(cfg.model)
        if dataset is None:
            dataset = _dataset(cfg)
        task = Task(model, dataset, cfg.template, num_virtual_tokens=cfg.num_virtual_tokens,
                    chat_template=cfg.chat_template, label_words=cfg.label_words)
    except (OSError, ValueError, KeyError) as exc:
        error = exc
    comm.agree(error)
    adapter = make_adapter(task.model, cfg, task.label_ids, num_labels=len(task.labels) if task.uses_head else None)
    opt = AdamW(adapter.parameters(), cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(task.train) / (cfg.batch_size * cfg.grad_accum)))
    total = int(round(cfg.epochs * steps_per_epoch)) if cfg.epochs else cfg.max_steps
    return Run(cfg, comm, task, adapter, opt, total, Path(cfg.resume or cfg.output), log)


def _start(run):
    """A new run: saves its settings (what `--resume DIR` continues with) and evaluates the start."""
    cfg, comm, task = run.cfg, run.comm, run.task
    if comm.rank == 0:
        saved = {k: v for k, v in asdict(cfg).items() if k not in ("resume", "progress")}
        _atomic_write(run.out / "run_config.json", lambda tmp: Path(tmp).write_text(json.dumps(saved, indent=2)))
    n_test = min(len(task.test), cfg.max_eval or len(task.test))
    ranks = f" on {comm.size} ranks" if comm.size > 1 else ""
    if not task.test:
        run.log(f"{len(task.train)} training examples{ranks}; no test examples")
        return
    run.log(f"{len(task.train)} training examples{ranks}; evaluating the start on {n_test} test examples...")
    run.state["zero_shot"] = task.evaluate(None, task.test, limit=cfg.max_eval, comm=comm, head=run.adapter.head)
    run.state["initial"] = task.evaluate(run.adapter, task.test, limit=cfg.max_eval, comm=comm)
    run.log(f"zero-shot test {run.metric} (frozen model, no adapter): {run.state['zero_shot']:.4f}; "
            f"with the initialized {cfg.method} adapter: {run.state['initial']:.4f}")


def _resume(run):
    """Rank 0 reads the checkpoint; every rank restores adapter, optimizer and state from its bytes."""
    ckpt = run.out / CHECKPOINT
    content = None
    if run.comm.rank == 0:
        content = ckpt.read_bytes() if ckpt.exists() else FileNotFoundError(f"resume: {ckpt} does not exist")
    content = run.comm.bcast(content)
    if isinstance(content, Exception):
        raise content
    run.state = load_checkpoint(ckpt, run.adapter, run.opt, content)
    if run.state["step"] > run.total:
        raise ValueError(f"resume: {run.out} is at step {run.state['step']}, past the run's end at step {run.total} "
                         "(--max-steps / --epochs can extend a run, or shorten one not yet past it)")
    run.log(f"resuming {run.out} at step {run.state['step']} of {run.total}")


def _loop(run, on_step):
    """Optimizer steps until the run's total or an early stop; evaluations and checkpoints."""
    cfg, comm, task, state = run.cfg, run.comm, run.task, run.state
    if cfg.progress and comm.rank == 0:
        run.adapter.print_trainable_parameters(task.model)
    bar = _progress(run.total, state["step"], cfg.progress and comm.rank == 0)
    epoch, batches, cursor = _position(task, cfg, state["step"])
    t_start = time.perf_counter() - state["train_seconds"]
    try:
        while state["step"] < run.total:
            step = state["step"]
            # Gradient accumulation and data parallelism: the step's loss is the mean over every
            # example (or target token) of its micro-batches, however they are split over ranks
            # (step_gradients).
            micro = []
            for _ in range(cfg.grad_accum):
                if cursor >= len(batches):
                    epoch, batches, cursor = epoch + 1, micro_batches(task, cfg, epoch + 1), 0
                micro.append(batches[cursor])
                cursor += 1
            grads, loss, tokens = step_gradients(task, run.adapter, micro, comm)
            gnorm = clip_gradients(grads, cfg.clip)
            lr = learning_rate(step, run.total, cfg.lr, cfg.warmup, cfg.schedule)
            run.opt.step(grads, lr)
            state["step"] = step + 1
            state["tokens"] += tokens
            state["train_seconds"] = time.perf_counter() - t_start
            state["history"].append({"step": step + 1, "loss": loss, "lr": lr, "grad_norm": gnorm})
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{_tokens_per_second(state):.0f}")
                bar.update(1)
            stop = False
            if task.validation and (state["step"] % cfg.eval_every == 0 or state["step"] == run.total):
                stop = _validate(run, bar)
                state["train_seconds"] = time.perf_counter() - t_start  # validation included
            if comm.rank == 0 and (state["step"] % cfg.checkpoint_every == 0 or state["step"] == run.total or stop):
                save_checkpoint(run.out / CHECKPOINT, run.adapter, run.opt, state)
            if stop:
                _write_line(bar, run.log, f"early stop: no validation improvement in {cfg.patience} evaluations")
                break
            if on_step is not None:
                on_step(run)
    finally:
        if bar is not None:
            bar.close()


def _validate(run, bar):
    """Evaluates on the validation split, keeps the best adapter. -> True to stop early."""
    state = run.state
    t_eval = time.perf_counter()
    value = run.task.evaluate(run.adapter, run.task.validation, limit=run.cfg.max_eval, comm=run.comm)
    state["eval_seconds"] += time.perf_counter() - t_eval
    state["evals"].append({"step": state["step"], f"validation_{run.metric}": value})
    if state["best"] is None or run.better(value, state["best"]):
        state["best"], state["best_step"], state["since_best"] = value, state["step"], 0
        state["best_params"] = {k: v.copy() for k, v in run.adapter.parameters().items()}
    else:
        state["since_best"] += 1
    _write_line(bar, run.log, f"step {state['step']}: validation {run.metric} {value:.4f} (best {state['best']:.4f} "
                              f"at step {state['best_step']})")
    return bool(run.cfg.patience and state["since_best"] >= run.cfg.patience)


def _finish(run):
    """The test evaluation, and (rank 0) the adapter, its task description, metrics and curves."""
    from . import get_num_threads

    cfg, comm, task, state, out = run.cfg, run.comm, run.task, run.state, run.out
    if state.get("best_params") is not None and (cfg.save == "best" or cfg.patience):  # the best on validation
        for k, v in state["best_params"].items():
            run.adapter.parameters()[k][...] = v
        run.log(f"keeping the adapter of step {state['best_step']} (best validation {run.metric})")
    report = task.evaluate_metrics(run.adapter, task.test, limit=cfg.max_eval, comm=comm) if task.test else {}
    metric = run.metric
    final = report.get(metric)
    metrics = {
        f"zero_shot_{metric}": state.get("zero_shot"),
        f"initial_{metric}": state.get("initial"),
        f"test_{metric}": final,
        **{f"test_{k}": v for k, v in report.items() if k != metric},
        "train_seconds": round(state["train_seconds"], 2),
        "eval_seconds": round(state["eval_seconds"], 2),
        "tokens_per_second": round(_tokens_per_second(state), 1),
        "steps": state["step"],
        "best_validation": state["best"],
        "best_step": state["best_step"],
        "evals": state["evals"],
        "threads": get_num_threads(),
        "ranks": comm.size,
        "config": asdict(cfg),
    }
    if task.kind == "generation" and task.test and comm.rank == 0:  # decoding on rank 0 only
        scores, note = text_metrics(*task.generate_targets(run.adapter, limit=cfg.max_eval))
        metrics.update({f"test_{k}": v for k, v in scores.items()})
        if note:
            run.log(note)
    if comm.rank == 0:
        run.adapter.save_pretrained(out)
        task_info = {"kind": task.kind, "template": task.template, "labels": task.labels,
                     "label_words": dict(zip(task.labels, task.label_words)) if task.label_words else None,
                     "method": cfg.method, "model": cfg.model,
                     "fields": dataclasses.asdict(cfg.fields()), "max_target_tokens": task.max_target_tokens(),
                     "chat_template": task.chat_template}
        _atomic_write(out / "softprompt.json", lambda tmp: Path(tmp).write_text(json.dumps(task_info, indent=2)))
        _atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))
        _plot(out / "training_curves.png", state, metric)
        if "confusion_matrix" in report:
            _plot_confusion(out / "confusion_matrix.png", report["confusion_matrix"], task.labels)
    result = "no test examples" if final is None else \
        f"test {metric}: {final:.4f} (zero-shot {state.get('zero_shot'):.4f})"
    run.log(f"{result}; {state['step']} steps in {metrics['train_seconds']:.0f} s (validation included), "
            f"{metrics['tokens_per_second']:.0f} tokens/s; adapter in {out}")
    return metrics


def step_gradients(task, adapter, micro, comm):
    """One optimizer step's gradient: micro is the step's list of global micro-batches (index lists
    into task.train); this rank takes its shard of each. -> ({param: grad}, loss, tokens), the same
    on every rank: the mean over all examples (or target tokens) of all micro-batches."""
    from .distributed import shard

    params = adapter.parameters()
    weight_sum = sum(task.weight(task.train[i]) for batch in micro for i in batch)
    if weight_sum == 0:
        raise ValueError("data: a step's batches have no target tokens")
    # The model's gradient of the prompt or prefix (and a head's) is summed (over micro-batches and
    # ranks) before the adapter maps it to its parameters (PrefixProjection's MLP), so the map runs
    # once, on the same sum everywhere.
    name = "prompt" if adapter.kind == "prompt" else "prefix"
    shapes = {name: adapter.prompt_matrix().shape if name == "prompt" else adapter.prefix_matrix().shape}
    if adapter.head is not None:
        shapes.update({k: v.shape for k, v in adapter.head.parameters().items()})
    totals = {k: np.zeros(shape, dtype=np.float64) for k, shape in shapes.items()}
    loss_sum, tokens = 0.0, 0
    # Prompt tuning's shared prompt rows (models.base): their backward sums, layer by layer, what
    # every rank's rows give them (the model's backward calls prompt_sum), so every rank holds the
    # whole batch's prompt gradient, and one rank (the first with rows to add) adds it.
    shared = comm.size > 1 and task.model.shares_prompt_rows(adapter)
    for batch in micro:
        parts = [[i for i in shard(batch, r, comm.size) if task.weight(task.train[i])] for r in range(comm.size)]
        mine = parts[comm.rank]
        if not mine:  # no example (a batch smaller than the world) or no target token: nothing to add...
            if shared and any(parts):  # ...but the model's backward sums with the ranks that have rows
                _empty_backward(task.model, adapter, comm.allreduce_sum)
            continue
        # Padded to the global batch's length: each row then computes exactly as in one process.
        length = max(len(task.train[i].ids) for i in batch) if comm.size > 1 else None
        loss, grads, n, _ = task.loss_and_grads(adapter, [task.train[i] for i in mine], length, weight_sum,
                                                comm.allreduce_sum if shared else None, raw=True)
        first_with_rows = next(r for r, part in enumerate(parts) if part)
        for k, g in grads.items():
            if k != name or not shared or comm.rank == first_with_rows:
                totals[k] += g
        loss_sum += loss
        tokens += n
    flat = comm.allreduce_sum(np.concatenate([t.reshape(-1) for t in totals.values()] + [[loss_sum, tokens]]))
    summed, start = {}, 0
    for k, shape in shapes.items():
        size = int(np.prod(shape))
        summed[k] = flat[start:start + size].reshape(shape).astype(params[next(iter(params))].dtype)
        start += size
    mapped = adapter.gradients(summed)
    grads_sum = {k: np.asarray(g, dtype=params[k].dtype).reshape(params[k].shape) for k, g in mapped.items()}
    return grads_sum, float(flat[-2]), int(flat[-1])


def _dataset(cfg):
    """The run's Dataset: separate files, one file with the fixed split, or the default data."""
    if cfg.train_file:
        return data_mod.load_files(cfg.train_file, cfg.validation_file, cfg.test_file, cfg.labels, cfg.fields())
    if cfg.data:
        return data_mod.load_file(cfg.data, cfg.labels, cfg.fields())
    return data_mod.rotten_tomatoes()


def _empty_backward(model, adapter, prompt_sum):
    """The forward and backward of a batch of no rows (the shared prompt rows alone), so that this
    rank takes part in every sum the other ranks' backward makes, whatever their sequence."""
    empty = np.zeros((0, 1, model.config.hidden_size), dtype=model.dtype)
    _, cache = model.forward(None, inputs_embeds=empty, adapter=adapter, keep_cache=True)
    model.backward(empty, cache, prompt_sum=prompt_sum)


def _quiet(*args, **kwargs):
    pass


def _threads_per_rank(comm):
    """With several ranks and no --threads: the machine's cores shared by the ranks on it, so
    that ranks do not oversubscribe the cores. None (the default) in one process."""
    if comm.size == 1:
        return None
    local = next((int(os.environ[v]) for v in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")
                  if os.environ.get(v, "").isdigit()), comm.size)
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this rank may use: launchers bind ranks
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 1) // local)
    return cores if cores < (os.cpu_count() or 1) else max(1, cores // local)


def _limit_blas_threads(n):
    """NumPy's BLAS threads follow --threads too (for the rest of the process)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(n, user_api="blas")


def _tokens_per_second(state):
    """Training tokens (real, not padding; virtual tokens not counted) per second of training,
    validation passes excluded."""
    return state["tokens"] / max(state["train_seconds"] - state["eval_seconds"], 1e-9)


def _position(task, cfg, step):
    """(epoch, batches, cursor) for the micro-batch that starts optimizer step `step`."""
    epoch, batches, cursor = 0, micro_batches(task, cfg, 0), 0
    for _ in range(step * cfg.grad_accum):
        if cursor >= len(batches):
            epoch, batches, cursor = epoch + 1, micro_batches(task, cfg, epoch + 1), 0
        cursor += 1
    return epoch, batches, cursor


def _progress(total, start, enabled):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _write_line(bar, log, text):
    if bar is not None:
        bar.write(text)
    else:
        log(text)


def _plot(path, state, metric):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in state["history"]]
    losses = np.array([h["loss"] for h in state["history"]])
    ax.plot(steps, losses, lw=0.6, alpha=0.35, color="C0")
    k = min(20, len(losses))
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    ax.plot(steps[k - 1:], smooth, lw=1.5, color="C0", label=f"training loss ({k}-step mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if state["evals"]:
        ax2 = ax.twinx()
        ax2.plot([e["step"] for e in state["evals"]], [e[f"validation_{metric}"] for e in state["evals"]], "o-",
                 color="C1", label=f"validation {metric}")
        ax2.set_ylabel(f"validation {metric}")
    fig.legend(loc="lower left", bbox_to_anchor=(0.1, 0.15))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    _atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))


def _plot_confusion(path, confusion, labels):
    """The test confusion matrix as a picture (rows: true label, columns: predicted), if matplotlib
    is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    confusion = np.asarray(confusion)
    size = max(3.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(confusion.shape[0]):
        for j in range(confusion.shape[1]):
            ax.text(j, i, str(confusion[i, j]), ha="center", va="center",
                    color="white" if confusion[i, j] > confusion.max() / 2 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    _atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))
