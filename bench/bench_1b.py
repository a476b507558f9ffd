"""End to end at the 1B scale: Llama-3.2-1B's shapes, softprompt on a Q4_K_M-style GGUF and on a
bfloat16 folder, against PyTorch + PEFT on the same weights in float32 (and bfloat16).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/bench_1b.py [--threads 2] [--cache DIR]

The model: hidden 2048, 16 layers, 32 query / 8 key-value heads of 64, SwiGLU 8192, vocabulary
128,256, tied embeddings (Llama-3.2-1B's shapes; RoPE base 500,000 without Llama 3's frequency
scaling), random weights written once into --cache (default ~/.cache/softprompt-bench-1b, about
12 GB):
- `llama1b.Q4_K_M.gguf`: random Q4_K blocks for attn_q/k/output, ffn_gate/up, Q6_K for attn_v,
  ffn_down and the embedding table (which is also the output head), the way llama.cpp's Q4_K_M
  recipe types them;
- `f32/`: the same values, dequantized by gguf, as a float32 folder (PyTorch's float32 side);
- `bf16/`: those values rounded to bfloat16, a bfloat16 folder (softprompt's and PyTorch's bf16 side).
Each (side, method) runs in its own process: load the model, one warm-up step, `--steps` timed
steps (forward + backward + AdamW on 8 x 64 random tokens, P = 20 virtual tokens, the
full-vocabulary causal-LM loss over every next-token position), one timed eval forward (the logits
at the last position of 8 x 64 tokens). Peak RSS is the process's high-water mark (VmHWM), loading
included. Both sides start from the same adapter, so their step-0 losses agree on the same weights.
Writes bench/results/e2e_1b.json with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN, LAYERS, HEADS, KV_HEADS, MLP, VOCAB = 2048, 16, 32, 8, 8192, 128256
BATCH, LENGTH, P, SEED, THETA = 8, 64, 20, 0, 500000.0
SIDES = ("ours-gguf", "ours-bf16", "torch-f32", "torch-bf16")


def hwm_mb():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmHWM")) / 1024


# --------------------------------------------------------------------------- the files
def _blocks(rng, rows, cols, qtype):
    """Random Q4_K / Q6_K blocks with scales that keep the weights within about +-0.1."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_K:  # d, dmin first; 6-bit scales
        b[..., 0:2] = rng.uniform(2e-5, 1e-4, b.shape[:2]).astype(np.float16).view(np.uint8).reshape(*b.shape[:2], 2)
        b[..., 2:4] = rng.uniform(0, 1.5e-3, b.shape[:2]).astype(np.float16).view(np.uint8).reshape(*b.shape[:2], 2)
    else:  # Q6_K: d last; int8 scales
        b[..., 208:210] = rng.uniform(5e-6, 2.5e-5, b.shape[:2]).astype(np.float16).view(np.uint8).reshape(*b.shape[:2], 2)
    return b.reshape(rows, -1)


def _permute(w, n_heads):  # llama.cpp's converter: rotate-half rows -> interleaved pairs (and back: _unpermute)
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w, n_heads):
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def prepare(cache: Path):
    import gguf
    import ml_dtypes
    from safetensors.numpy import save_file

    if (cache / "done").exists():
        return
    cache.mkdir(parents=True, exist_ok=True)
    Q4, Q6 = gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K
    rng = np.random.default_rng(SEED)
    w = gguf.GGUFWriter(str(cache / "llama1b.Q4_K_M.gguf"), "llama")
    for add, value in ((w.add_block_count, LAYERS), (w.add_context_length, 131072), (w.add_embedding_length, HIDDEN),
                       (w.add_feed_forward_length, MLP), (w.add_head_count, HEADS), (w.add_head_count_kv, KV_HEADS),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_freq_base, THETA)):
        add(value)
    f32 = {}
    names = {"attn_q": ("self_attn.q_proj", HEADS * 64, HIDDEN, Q4), "attn_k": ("self_attn.k_proj", KV_HEADS * 64, HIDDEN, Q4),
             "attn_v": ("self_attn.v_proj", KV_HEADS * 64, HIDDEN, Q6), "attn_output": ("self_attn.o_proj", HIDDEN, HEADS * 64, Q4),
             "ffn_gate": ("mlp.gate_proj", MLP, HIDDEN, Q4), "ffn_up": ("mlp.up_proj", MLP, HIDDEN, Q4),
             "ffn_down": ("mlp.down_proj", HIDDEN, MLP, Q6)}

    def matrix(gguf_name, hf_name, rows, cols, qtype, heads=None):
        raw = _blocks(rng, rows, cols, qtype)
        w.add_tensor(gguf_name, raw, raw_dtype=qtype)
        values = np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(rows, cols)
        f32[hf_name] = values if heads is None else np.ascontiguousarray(_unpermute(values, heads))

    matrix("token_embd.weight", "model.embed_tokens.weight", VOCAB, HIDDEN, Q6)
    norm = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
    w.add_tensor("output_norm.weight", norm)
    f32["model.norm.weight"] = norm
    for i in range(LAYERS):
        for n in ("attn_norm", "ffn_norm"):
            v = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
            w.add_tensor(f"blk.{i}.{n}.weight", v)
            f32[f"model.layers.{i}.{'input_layernorm' if n == 'attn_norm' else 'post_attention_layernorm'}.weight"] = v
        for ours, (theirs, rows, cols, qtype) in names.items():
            matrix(f"blk.{i}.{ours}.weight", f"model.layers.{i}.{theirs}.weight", rows, cols, qtype,
                   {"attn_q": HEADS, "attn_k": KV_HEADS}.get(ours))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": MLP, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "head_dim": 64, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
              "rope_theta": THETA, "max_position_embeddings": 131072, "tie_word_embeddings": True,
              "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000,
              "eos_token_id": 128001}
    for name, cast in (("f32", np.float32), ("bf16", ml_dtypes.bfloat16)):
        folder = cache / name
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32" if name == "f32" else "bfloat16"}))
        save_file({k: np.ascontiguousarray(v.astype(cast)) for k, v in f32.items()}, str(folder / "model.safetensors"))
    (cache / "done").write_text("")


# --------------------------------------------------------------------------- one side
def run_ours(args):
    import softprompt
    from softprompt import losses
    from softprompt.models import layers as nn
    from softprompt.train import AdamW
    from threadpoolctl import threadpool_limits

    softprompt.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    source = Path(args.cache) / ("llama1b.Q4_K_M.gguf" if args.side == "ours-gguf" else "bf16")
    t0 = time.perf_counter()
    model = softprompt.load_model(source)
    load_s = time.perf_counter() - t0
    cls = softprompt.PromptTuning if args.method == "prompt" else softprompt.PrefixTuning
    adapter = cls.for_model(model, P, init="random", seed=SEED)
    if not Path(args.adapter_dir, "adapter_config.json").exists():
        adapter.save_pretrained(args.adapter_dir)
    adapter = cls.from_pretrained(args.adapter_dir, model)
    ids = np.random.default_rng(SEED).integers(0, VOCAB, (BATCH, LENGTH))
    targets = np.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    mask = np.zeros(ids.shape, dtype=bool)
    mask[:, :-1] = True
    opt = AdamW(adapter.parameters(), 1e-3)

    def step():
        hidden, cache = model.forward(ids, adapter=adapter, keep_cache=True)
        loss, dh = losses.lm_loss(model, hidden, targets, mask)
        opt.step(adapter.gradients(model.backward(dh, cache)), 1e-3)
        return loss

    def infer():  # the logits at the last position
        return nn.linear(model.forward(ids, adapter=adapter)[:, -1], model.output_embeddings())

    return load_s, step, infer


def run_torch(args):
    import torch
    import transformers
    from peft import PeftModel

    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.side == "torch-f32" else torch.bfloat16
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.AutoModelForCausalLM.from_pretrained(Path(args.cache) / args.side.split("-")[1], dtype=dtype)
    load_s = time.perf_counter() - t0
    model = PeftModel.from_pretrained(base, args.adapter_dir)
    for p in model.prompt_encoder.parameters():
        p.requires_grad_(True)
    model.train()
    ids = torch.from_numpy(np.random.default_rng(SEED).integers(0, VOCAB, (BATCH, LENGTH)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return float(loss)

    def infer():
        with torch.inference_mode():
            return model(input_ids=ids, logits_to_keep=1).logits

    return load_s, step, infer


def child(args):
    load_s, step, infer = (run_ours if args.side.startswith("ours") else run_torch)(args)
    loss0 = float(step())  # warm-up; its loss is the step-0 loss
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    infer()
    t0 = time.perf_counter()
    infer()
    eval_s = time.perf_counter() - t0
    print("RESULT " + json.dumps({"load_s": load_s, "step_s": times, "eval_s": eval_s, "loss0": loss0,
                                  "peak_rss_mb": hwm_mb()}))


def spawn(side, method, args, adapter_dir):
    cmd = [sys.executable, __file__, "--child", side, "--method", method, "--threads", str(args.threads),
           "--steps", str(args.steps), "--cache", args.cache, "--adapter-dir", adapter_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{side} {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--methods", default="prompt,prefix")
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "softprompt-bench-1b"))
    ap.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--adapter-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.side = args.child
        return child(args)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_ops import machine

    t0 = time.perf_counter()
    prepare(Path(args.cache))
    print(f"files ready in {args.cache} ({time.perf_counter() - t0:.0f} s)")
    rows = []
    sides = args.sides.split(",")
    for method in args.methods.split(","):
        with tempfile.TemporaryDirectory() as tmp:  # one adapter per method, for every side
            for side in sides:
                r = spawn(side, method, args, tmp)
                row = {"method": method, "side": side, "step_s": statistics.median(r["step_s"]),
                       "eval_s": r["eval_s"], "load_s": r["load_s"], "peak_rss_mb": r["peak_rss_mb"], "loss0": r["loss0"]}
                rows.append(row)
                print(f"{method:7} {side:11} step {row['step_s']:7.2f} s  eval {row['eval_s']:6.2f} s  load "
                      f"{row['load_s']:5.1f} s  peak RSS {row['peak_rss_mb']:7.0f} MiB  loss0 {row['loss0']:.5f}", flush=True)
    ratios = {}
    for method in args.methods.split(","):
        ref = next((r for r in rows if r["method"] == method and r["side"] == "torch-f32"), None)
        for r in rows:
            if ref is not None and r["method"] == method and r["side"] != "torch-f32":
                ratios[f"{method} {r['side']} / torch-f32"] = {k: r[k] / ref[k] for k in ("step_s", "eval_s", "peak_rss_mb")}
    for k, v in ratios.items():
        print(f"{k}: step {v['step_s']:.2f}x, eval {v['eval_s']:.2f}x, peak RSS {v['peak_rss_mb']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    out = {"machine": machine(), "threads": args.threads, "steps": args.steps, "batch": [BATCH, LENGTH], "P": P,
           "model": "Llama-3.2-1B shapes, random weights", "rows": rows, "ratios": ratios,
           "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}}
    tmp = RESULTS / "e2e_1b.json.tmp"
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, RESULTS / "e2e_1b.json")


if __name__ == "__main__":
    main()
