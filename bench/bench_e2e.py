"""End-to-end: one tuning step of SmolLM2-135M, softprompt vs PyTorch + PEFT, on the same GGUF file.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/bench_e2e.py [--threads 2] [--steps 6] [--repeats 2] [--busy]

(unset OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE in this command only: they slow NumPy's BLAS here.)
Every (side, method, loss) runs in its own subprocess, so each peak RSS is that side's alone.
A step is forward + backward + AdamW on a batch of 8 x 64 random tokens with P = 20 virtual tokens:
- "lm":    the full-vocabulary causal-LM loss over every next-token position (PEFT: labels=input_ids);
- "label": label-word classification (" positive"/" negative") at the last position.
Inference: an evaluation forward (label-word logits) on a batch of 32 x 64 tokens with the adapter.
The best step of each side is reported beside the median (on a shared host noise only adds time,
so the best is the estimate of what each side's code costs, as timeit's docs argue; the median shows
what a run met). Both sides start from the same adapter (ours written in PEFT's format, loaded by PEFT), so their
step-0 losses must agree (to 1e-4). Reports medians after warm-up, tokens/s (real tokens), peak RSS
and the ratios; writes bench/results/e2e.json. The PEFT side runs only where torch, transformers and
peft are installed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, LENGTH, P, EVAL_BATCH, SEED = 8, 64, 20, 32, 0
LABEL_WORDS = (" positive", " negative")


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def batch(vocab, rows, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(rows, LENGTH), dtype=np.int64)
    labels = rng.integers(0, 2, size=rows)
    return ids, labels


def timed(fn, warmup, steps):
    out = [fn() for _ in range(max(1, warmup))]  # the first call's result: the step-0 loss
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return out[0], times


# --------------------------------------------------------------------------- softprompt
def run_ours(args):
    import softprompt
    from softprompt import _core, losses
    from softprompt.train import AdamW

    softprompt.set_num_threads(args.threads)
    softprompt.set_adaptive_threads(args.side != "fixed")
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    model = softprompt.load_model(keep_quantized=args.weights == "quantized")
    rss_model = peak_rss_mb()
    adapter = _adapter(model, args.method)
    adapter.save_pretrained(args.adapter_dir)  # the PEFT side starts from the same arrays
    label_ids = [model.tokenizer.encode(w).ids[0] for w in LABEL_WORDS]
    ids, labels = batch(model.config.vocab_size, BATCH, SEED)
    params = adapter.parameters()
    opt = AdamW(params, 1e-3)
    targets = np.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    loss_mask = np.zeros(ids.shape, dtype=bool)
    loss_mask[:, :-1] = True

    def step():
        hidden, cache = model.forward(ids, adapter=adapter, keep_cache=True)
        if args.loss == "lm":
            loss, dh = losses.lm_loss(model, hidden, targets, loss_mask)
        else:
            loss, dh, _ = losses.label_word_loss(model, hidden, np.full(BATCH, LENGTH - 1), label_ids, labels)
        opt.step(adapter.gradients(model.backward(dh, cache)), 1e-3)
        return loss

    loss0, times = timed(step, args.warmup, args.steps)
    eval_ids, _ = batch(model.config.vocab_size, EVAL_BATCH, SEED + 1)

    def infer():
        hidden = model.forward(eval_ids, adapter=adapter)
        return losses.label_word_logits(model, hidden, np.full(EVAL_BATCH, LENGTH - 1), label_ids)

    free = _core.free_cores()  # the cores the team saw free at the last step
    _, eval_times = timed(infer, 1, max(2, args.steps // 2))
    return {"loss0": loss0, "step_s": times, "eval_s": eval_times, "rss_model_mb": rss_model, "free_cores": free}


def _adapter(model, method):
    import softprompt

    if method == "prompt":
        return softprompt.PromptTuning.for_model(model, P, init="vocab", seed=SEED)
    return softprompt.PrefixTuning.for_model(model, P, init="text", init_text="Classify the sentiment of this review.")


# --------------------------------------------------------------------------- PyTorch + PEFT
def run_peft(args):
    import torch
    import transformers
    from peft import PeftModel

    from softprompt.models import default_model_path

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    path = default_model_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                 dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    rss_model = peak_rss_mb()
    # PEFT refuses is_trainable=True for prompt-learning adapters: load, then unfreeze the adapter.
    model = PeftModel.from_pretrained(base, args.adapter_dir)
    for p in model.prompt_encoder.parameters():
        p.requires_grad_(True)
    model.train()  # SmolLM2 has no dropout: train mode changes nothing but PEFT's bookkeeping
    label_ids = [tok(w)["input_ids"][0] for w in LABEL_WORDS]
    ids, labels = batch(base.config.vocab_size, BATCH, SEED)
    ids, labels = torch.from_numpy(ids), torch.from_numpy(labels)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    lw = torch.tensor(label_ids)

    def step():
        opt.zero_grad(set_to_none=True)
        if args.loss == "lm":
            loss = model(input_ids=ids, labels=ids).loss
        else:  # logits at the last position only, then the label words' columns
            logits = model(input_ids=ids, logits_to_keep=1).logits[:, -1, lw]
            loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        opt.step()
        return float(loss)

    loss0, times = timed(step, args.warmup, args.steps)
    eval_ids, _ = batch(base.config.vocab_size, EVAL_BATCH, SEED + 1)
    eval_ids = torch.from_numpy(eval_ids)
    model.eval()

    def infer():
        with torch.inference_mode():
            return model(input_ids=eval_ids, logits_to_keep=1).logits[:, -1, lw]

    _, eval_times = timed(infer, 1, max(2, args.steps // 2))
    return {"loss0": loss0, "step_s": times, "eval_s": eval_times, "rss_model_mb": rss_model}


# --------------------------------------------------------------------------- driver
def child(args):
    result = (run_peft if args.side == "peft" else run_ours)(args)
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result))


def spawn(side, method, loss, args, adapter_dir):
    cmd = [sys.executable, __file__, "--child", side, "--method", method, "--loss", loss, "--threads",
           str(args.threads), "--weights", args.weights, "--steps", str(args.steps), "--warmup", str(args.warmup), "--adapter-dir", adapter_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{side} {method} {loss} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def pool(results):
    """One side's repeated runs as one: all timed steps, the largest peak RSS, the first loss."""
    return {"loss0": results[0]["loss0"], "step_s": [t for r in results for t in r["step_s"]],
            "eval_s": [t for r in results for t in r["eval_s"]], "rss_model_mb": max(r["rss_model_mb"] for r in results),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results), "free_cores": [r.get("free_cores") for r in results]}


def have_peft():
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft"))


def summarize(r):
    step = statistics.median(r["step_s"])
    ev = statistics.median(r["eval_s"])
    out = {"step_s": step, "best_step_s": min(r["step_s"]), "tokens_per_s": BATCH * LENGTH / step, "eval_tokens_per_s": EVAL_BATCH * LENGTH / ev,
           "peak_rss_mb": r["peak_rss_mb"], "rss_model_mb": r["rss_model_mb"], "loss0": r["loss0"]}
    if any(f is not None for f in r["free_cores"]):
        out["free_cores"] = r["free_cores"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="timed steps (after warm-up)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="processes per side, alternating; steps pooled")
    ap.add_argument("--methods", default="prompt,prefix")
    ap.add_argument("--losses", default="lm,label")
    ap.add_argument("--no-peft", action="store_true", help="softprompt only")
    ap.add_argument("--busy", action="store_true", help="a machine that is not idle: a spin loop pinned to CPU 1 "
                    "while every step runs (both sides); writes bench/results/e2e_busy.json")
    ap.add_argument("--weights", choices=["quantized", "float"], default="quantized",
                    help="ours: keep the GGUF's Q4_1 layers quantized (default) or expand them to float32")
    ap.add_argument("--child", choices=["ours", "fixed", "peft"], help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--loss", help=argparse.SUPPRESS)
    ap.add_argument("--adapter-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.side = args.child
        return child(args)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_ops import busy_core, machine

    peft = have_peft() and not args.no_peft
    rows = []
    print(f"SmolLM2-135M, batch {BATCH} x {LENGTH}, P = {P}, {args.threads} threads, median of {args.repeats} x "
          f"{args.steps} steps")
    head = f"{'method':7} {'loss':6} {'side':9} {'s/step':>7} {'best':>7} {'tok/s':>7} {'eval tok/s':>10} {'peak RSS':>9} {'loss0':>9}"
    print(head)
    for method in args.methods.split(","):
        for loss in args.losses.split(","):
            # The sides alternate (ours, PEFT, ours, PEFT, ...) and their steps are pooled, so a slow
            # minute of a shared machine does not land on one side only.
            # Busy: "fixed" is ours with the thread team's adaptation to the load turned off.
            runs = {"ours": [], "fixed": [], "peft": []}
            with tempfile.TemporaryDirectory() as tmp, busy_core(enabled=args.busy):
                for _ in range(args.repeats):
                    runs["ours"].append(spawn("ours", method, loss, args, tmp))
                    if args.busy:
                        runs["fixed"].append(spawn("fixed", method, loss, args, tmp))
                    if peft:
                        runs["peft"].append(spawn("peft", method, loss, args, tmp))
            row = {"method": method, "loss": loss}
            for side, results in runs.items():
                if results:
                    row[side] = summarize(pool(results))
            for side in ("ours", "fixed", "peft"):
                if side in row:
                    s = row[side]
                    print(f"{method:7} {loss:6} {side:9} {s['step_s']:7.3f} {s['best_step_s']:7.3f} {s['tokens_per_s']:7.0f} "
                          f"{s['eval_tokens_per_s']:10.0f} {s['peak_rss_mb']:7.0f}MB {s['loss0']:9.5f}")
            if peft:
                o, p = row["ours"], row["peft"]
                row["ratios"] = {"step_time": o["step_s"] / p["step_s"], "step_time_best": o["best_step_s"] / p["best_step_s"],
                                 "peak_rss": o["peak_rss_mb"] / p["peak_rss_mb"],
                                 "eval_throughput": o["eval_tokens_per_s"] / p["eval_tokens_per_s"],
                                 "loss0_diff": abs(o["loss0"] - p["loss0"])}
                r = row["ratios"]
                print(f"{'':15}ours/PEFT: step time {r['step_time']:.2f}x (median), {r['step_time_best']:.2f}x (best), peak RSS {r['peak_rss']:.2f}x, eval "
                      f"throughput {r['eval_throughput']:.2f}x, |loss0 diff| {r['loss0_diff']:.1e}")
            rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    out = {"machine": machine(), "busy": args.busy, "threads": args.threads, "steps": args.steps, "repeats": args.repeats, "batch": [BATCH, LENGTH], "P": P, "rows": rows,
           "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}}
    name = "e2e_busy.json" if args.busy else "e2e.json"
    tmp = RESULTS / (name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, RESULTS / name)


if __name__ == "__main__":
    main()
