"""The frozen model's GEMM rate at Llama-3.2-1B's shapes: what bounds a tuning step there.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/bench_gemm.py [--threads 2] [--rows 512]

A tuning step is almost all GEMM: the forward (x @ W.T) and the backward with respect to the
inputs (dy @ W) through every frozen matrix, the LM head included, 2 x 2 x rows x params FLOPs.
Measured side by side, alternating, each median of `--reps`: softprompt's C++ GEMM on a weight kept
as Q4_K, Q6_K, bf16 or float32, and torch's float32 matmul (what PyTorch + PEFT's float32 step runs),
on the shapes of one Llama-3.2-1B layer (q/o 2048x2048, k/v 512x2048, gate/up 8192x2048, down
2048x8192) and its LM head (128,256x2048). Prints GF/s per shape and what the whole step's GEMMs take
at each side's rate; writes bench/results/gemm_1b.json with the machine.

    ... python bench/bench_gemm.py --model smollm2 [--rows 1536]

does the same on SmolLM2-135M's own matrices (layer 0 of the default model's GGUF, kept in its Q4_1
blocks and expanded to float32; its 30 layers; the tied LM head), at 1536 rows (the 32 x 48 batch of
bench_inference.py's first full-logit case); writes bench/results/gemm_smollm2.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
LAYER = {"q": (2048, 2048), "k": (512, 2048), "v": (512, 2048), "o": (2048, 2048), "gate": (8192, 2048),
         "up": (8192, 2048), "down": (2048, 8192)}
LAYERS, HEAD = 16, (128256, 2048)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", choices=["1b", "smollm2"], default="1b",
                    help="1b: Llama-3.2-1B's shapes, random weights; smollm2: the default model's matrices")
    ap.add_argument("--rows", type=int, help="tokens (default 512, 8 x 64 as bench_1b.py; smollm2: 1536)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, help="the JSON to write (default bench/results/gemm_1b.json or, with "
                                             "--model smollm2, gemm_smollm2.json)")
    args = ap.parse_args()
    import torch

    import softprompt
    from softprompt.models.quant import QuantizedWeight

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gguf
    from bench_1b import _blocks
    from bench_ops import machine

    softprompt.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    smol = args.model == "smollm2"
    args.rows = args.rows or (1536 if smol else 512)
    if smol:  # the default model's own matrices: layer 0 and the tied head, as softprompt keeps them
        model = softprompt.load_model(keep_quantized=True)
        layer = model.layers[0]
        mats = {name: layer[name] for name in ("qkv", "o", "gate_up", "down")}
        mats["head"] = model.output_embeddings()
        shapes = {name: w.shape for name, w in mats.items()}
        n_layers = len(model.layers)
    else:
        shapes, n_layers = dict(LAYER, head=HEAD), LAYERS
    rows = []
    for name, (out, cols) in shapes.items():
        x = rng.standard_normal((args.rows, cols)).astype(np.float32)
        dy = rng.standard_normal((args.rows, out)).astype(np.float32)
        if smol:
            w = mats[name]
            w32 = np.ascontiguousarray(np.asarray(w, dtype=np.float32))
            weights = {"file": w}  # in the file's GGUF type (row["format"])
        else:
            w32 = (rng.standard_normal((out, cols)) * 0.02).astype(np.float32)
            Q = gguf.GGMLQuantizationType
            weights = {fmt: QuantizedWeight(_blocks(rng, out, cols, q), fmt, cols) for fmt, q in (("q4_k", Q.Q4_K),
                                                                                                 ("q6_k", Q.Q6_K))}
            weights["bf16"] = QuantizedWeight((w32.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8), "bf16",
                                              cols)
        weights["f32"] = w32
        tw, tx, tdy = torch.from_numpy(w32), torch.from_numpy(x), torch.from_numpy(dy)
        runs = {f"ours-{fmt}": (lambda w=w: (softprompt.ops.linear_forward(x, w), softprompt.ops.linear_backward(dy, w)))
                for fmt, w in weights.items()}
        runs["torch-f32"] = lambda: (tx @ tw.T, tdy @ tw)
        times = {k: [] for k in runs}
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(args.reps):  # alternate the sides, so a noisy neighbour hits each alike
            for k, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        flops = 2 * 2 * args.rows * out * cols
        row = {"matrix": name, "shape": [out, cols], "count": 1 if name == "head" else n_layers,
               "gflop": flops / 1e9, **{k: statistics.median(v) for k, v in times.items()}}
        if smol:
            row["format"] = getattr(mats[name], "format", "f32")
        rows.append(row)
        print(f"{name:5} [{out:6},{cols:5}]  " + "  ".join(f"{k} {flops / row[k] / 1e9:6.1f} GF/s" for k in runs),
              flush=True)
    sides = [k for k in rows[0] if k.startswith(("ours-", "torch-"))]
    step = {k: sum(r[k] * r["count"] for r in rows) for k in sides}
    total = sum(r["gflop"] * r["count"] for r in rows)
    print(f"\none step's frozen GEMMs ({total / 1e3:.2f} TFLOP, forward + backward to the inputs):")
    for k, s in step.items():
        print(f"  {k:10} {s:6.2f} s  ({total / s:5.1f} GF/s)  {s / step['torch-f32']:.2f}x torch-f32")
    if smol:  # "ours-file": every matrix in its GGUF type, already in `step`
        name = "ours-file"
    else:  # The Q4_K_M file types q/k/o/gate/up as Q4_K and v/down/head as Q6_K (bench_1b.py)
        mix = {"q": "q4_k", "k": "q4_k", "o": "q4_k", "gate": "q4_k", "up": "q4_k", "v": "q6_k", "down": "q6_k",
               "head": "q6_k"}
        step["ours-q4_k_m"] = sum(r[f"ours-{mix[r['matrix']]}"] * r["count"] for r in rows)
        name = "ours-q4_k_m"
    if not smol:
        print(f"  {name:10} {step[name]:6.2f} s  {step[name] / step['torch-f32']:.2f}x torch-f32")
    RESULTS.mkdir(exist_ok=True)
    out = {"machine": machine(), "model": args.model, "threads": args.threads, "rows": args.rows, "step_tflop": total / 1e3,
           "shapes": rows, "step_gemm_s": step,
           "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}}
    target = args.out or RESULTS / ("gemm_smollm2.json" if smol else "gemm_1b.json")
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, target)


if __name__ == "__main__":
    main()
