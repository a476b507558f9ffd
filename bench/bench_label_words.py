"""The cost of label words of several tokens (rank classification) against one-token label words.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/bench_label_words.py [--threads 2] [--steps 4] [--repeats 3]

One training step (Task.loss_and_grads + AdamW: forward, backward, update) of prompt tuning (P = 20)
on SmolLM2-135M, a batch of 16 Rotten Tomatoes training reviews in the default template, with:
- "one_token": " negative" / " positive" (one token each: the label words' logits, one forward);
- "multi_token": " a terrible movie" / " a great movie" (three tokens each): the input runs once and
  the labels' later tokens run as a short second batch that attends to its keys (softprompt's way);
- "per_label": the same scores computed the plain way, every label's tokens appended to its own copy
  of the input (K forwards of the input: what rank classification costs without sharing).
The three run alternately in one process (the host is shared and noisy), repeats pooled; medians.
Writes bench/results/label_words.json with the machine's CPU name.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, P = 16, 20
MULTI = {"negative": " a terrible movie", "positive": " a great movie"}


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def per_label_loss_and_grads(task, adapter, batch):
    """Rank classification without sharing: row (b, k) = example b's input + label k's tokens,
    every label token scored from the full logits; CE over the labels' summed log-probs."""
    from softprompt import data as data_mod
    from softprompt import losses

    K = len(task.labels)
    rows = [data_mod.Encoded(ids=list(e.ids) + list(c), loss_from=0) for e in batch for c in e.label_tokens]
    ids, mask = data_mod.pad_batch(rows)
    targets, sel = np.zeros_like(ids), np.zeros(ids.shape, dtype=bool)
    for r, (ex, c) in enumerate((ex, c) for ex in batch for c in ex.label_tokens):
        n = len(ex.ids)
        targets[r, n - 1:n - 1 + len(c)], sel[r, n - 1:n - 1 + len(c)] = c, True
    hidden, cache = task.model.forward(ids, mask, adapter=adapter, keep_cache=True)
    logp = losses.TokenLogProbs(task.model, hidden, targets, sel)
    scores = logp.values.sum(axis=1).reshape(len(batch), K)
    loss, dscores = losses.cross_entropy(scores, np.array([e.answer for e in batch]))
    dvalues = np.repeat(dscores.reshape(-1, 1), ids.shape[1], axis=1)
    grads = task.model.backward(logp.backward(dvalues), cache)
    return loss, adapter.gradients(grads)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import softprompt
    from softprompt import data as data_mod
    from softprompt.train import AdamW, Task

    softprompt.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    model = softprompt.load_model()
    full = data_mod.rotten_tomatoes()
    n = BATCH * args.steps
    dataset = data_mod.Dataset("classification", full.train[:n], [], [], labels=full.labels)
    tasks = {"one_token": Task(model, dataset, num_virtual_tokens=P),
             "multi_token": Task(model, dataset, num_virtual_tokens=P, label_words=MULTI)}
    tasks["per_label"] = tasks["multi_token"]
    assert all(len(c) == 3 for e in tasks["multi_token"].train for c in e.label_tokens)
    adapter = softprompt.PromptTuning.for_model(model, P, init="vocab", seed=0)
    start = {k: v.copy() for k, v in adapter.parameters().items()}

    def run(name):
        for k, v in start.items():
            adapter.parameters()[k][...] = v
        task, opt, times, losses = tasks[name], AdamW(adapter.parameters(), 1e-3), [], []
        for s in range(args.steps):
            batch = task.train[s * BATCH:(s + 1) * BATCH]
            t0 = time.perf_counter()
            if name == "per_label":
                loss, grads = per_label_loss_and_grads(task, adapter, batch)
            else:
                loss, grads, _, _ = task.loss_and_grads(adapter, batch)
            opt.step(grads, 1e-3)
            times.append(time.perf_counter() - t0)
            losses.append(loss)
        return times, losses

    names = ["one_token", "multi_token", "per_label"]
    run("one_token")  # warm-up
    times = {k: [] for k in names}
    loss = {}
    for _ in range(args.repeats):
        for name in names:
            t, lo = run(name)
            times[name] += t
            loss[name] = lo
    # The shared and the plain computation are the same math: their losses agree step by step.
    np.testing.assert_allclose(loss["multi_token"], loss["per_label"], rtol=2e-4)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = {k: float(np.mean([sum(len(e.ids) for e in tasks[k].train[s * BATCH:(s + 1) * BATCH])
                                for s in range(args.steps)])) for k in names}
    out = {
        "machine": f"{cpu_name()}, {args.threads} threads",
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF)",
        "batch": BATCH, "num_virtual_tokens": P, "label_words": MULTI,
        "mean_input_tokens_per_batch": tokens["one_token"],
        "step_s": med,
        "multi_over_one_token": med["multi_token"] / med["one_token"],
        "per_label_over_multi_token": med["per_label"] / med["multi_token"],
        "steps_timed": {k: len(v) for k, v in times.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "label_words.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
