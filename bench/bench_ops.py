"""Benchmark the ops: softprompt's C++ core vs the NumPy reference vs PyTorch, side by side.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/bench_ops.py [--threads 1,2] [--quick]

(unset OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE in this command only: they slow NumPy's BLAS here.)
Prints a table (median ms, GFLOP/s, ratios), writes bench/results/ops.json and, when matplotlib is
installed, bench/results/ops_speedup.png. PyTorch runs only where torch is installed. With several
thread counts (--threads 1,2,4) it also prints a scaling table (GF/s and parallel efficiency).

Attention FLOPs: forward 4*B*H*T*K*D, backward 10*B*H*T*K*D (scores recomputed), where
K = P + S for full attention and P + S/2 causal (only the unmasked half of the input keys counts).
PyTorch: scaled_dot_product_attention over [prefix | input] keys (concatenated, as a user would),
in its native [B, H, T, D] layout; a bool mask keeps the prefix visible when causal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import softprompt
from softprompt import ops

SHAPES = [  # (B, H, T, D, P); S = T, Hkv = H
    (16, 4, 64, 32, 10),
    (8, 12, 128, 64, 20),
    (4, 16, 512, 64, 32),
    (1, 32, 256, 128, 10),
]
PREPEND_SHAPES = [(8, 20, 64, 576), (32, 20, 512, 2048)]  # (B, P, T, D)
RESULTS = Path(__file__).resolve().parent / "results"


def machine():
    cpu = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__}


@contextlib.contextmanager
def busy_core(cpu=1, enabled=True):
    """A machine that is not idle: a Python spin loop pinned to `cpu` (another process, as a
    browser or a compile would be) for the duration of the block, then stopped."""
    if not enabled:
        yield
        return
    # The loop checks now and then that this process still runs: a benchmark killed by a signal
    # skips the `finally` below, and its spinner must not stay behind.
    code = (f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile os.getppid() == {os.getpid()}:\n"
            f"    for _ in range(1_000_000):\n        pass\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.3)  # let it start spinning
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def median_seconds(fn, min_time=0.4, min_reps=5, max_reps=200):
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def attention_flops(B, H, T, D, P, causal, backward):
    keys = P + (T / 2 if causal else T)
    return (14 if backward else 4) * B * H * T * keys * D


# --------------------------------------------------------------------------- contestants
def numpy_inputs(B, H, T, D, P, rng):
    q = rng.standard_normal((B, T, H, D), dtype=np.float32)
    k = rng.standard_normal((B, T, H, D), dtype=np.float32)
    v = rng.standard_normal((B, T, H, D), dtype=np.float32)
    pk = rng.standard_normal((P, H, D), dtype=np.float32)
    pv = rng.standard_normal((P, H, D), dtype=np.float32)
    return q, k, v, pk, pv


def ours(backend, inputs, causal, backward):
    q, k, v, pk, pv = inputs
    dout = np.ones_like(q)

    def run():
        out, lse = ops.prefix_attention_forward(q, k, v, pk, pv, causal=causal, backend=backend)
        if backward:
            ops.prefix_attention_backward(dout, q, k, v, pk, pv, out, lse, causal=causal, backend=backend)

    return run


def torch_runner(torch, inputs, causal, backward):
    F = torch.nn.functional
    q, k, v, pk, pv = (torch.from_numpy(np.ascontiguousarray(a.swapaxes(-3, -2))) for a in inputs)  # heads first
    B, H, T, D = q.shape
    P = pk.shape[1]
    mask = None
    if causal:  # prefix always visible, input keys lower-triangular
        mask = torch.ones(T, P + T, dtype=torch.bool)
        mask[:, P:] = torch.ones(T, T, dtype=torch.bool).tril()
    for t in (q, k, v, pk, pv):
        t.requires_grad_(backward)
    gout = torch.ones(B, H, T, D)

    def run():
        kf = torch.cat([pk.expand(B, H, P, D), k], dim=2)
        vf = torch.cat([pv.expand(B, H, P, D), v], dim=2)
        if not backward:
            with torch.no_grad():
                F.scaled_dot_product_attention(q, kf, vf, attn_mask=mask)
            return
        for t in (q, k, v, pk, pv):
            t.grad = None
        F.scaled_dot_product_attention(q, kf, vf, attn_mask=mask).backward(gout)

    return run


# --------------------------------------------------------------------------- the sweep
def sweep_draws(n, seed=0):
    """n seeded random attention problems (B, H, Hkv, T, D, P, causal, window, softcap) over the
    ranges of the issue: B 1..16, H 4..32 with and without GQA, T 32..512 (any value, not only
    multiples of the kernels' blocks), D in {48, 64, 80, 96, 128, 256}, P 0..64, a sliding window and
    soft-capping on some draws; a draw whose fwd+bwd work passes 6 GFLOP is drawn again (time)."""
    rng = np.random.default_rng(seed)
    draws = []
    while len(draws) < n:
        H = int(rng.choice([4, 6, 8, 12, 16, 24, 32]))
        Hkv = H if rng.random() < 0.5 else int(rng.choice([d for d in (1, 2, 4, 8) if H % d == 0 and d < H]))
        B, T, D, P = int(rng.integers(1, 17)), int(rng.integers(32, 513)), int(rng.choice([48, 64, 80, 96, 128, 256])), \
            int(rng.integers(0, 65))
        causal = bool(rng.random() < 0.5)
        window = int(rng.integers(8, T + 1)) if causal and rng.random() < 0.3 else None
        softcap = float(rng.uniform(5, 50)) if rng.random() < 0.3 else None
        if attention_flops(B, H, T, D, P, causal, True) > 6e9:
            continue
        draws.append((B, H, Hkv, T, D, P, causal, window, softcap))
    return draws


CORNERS = [  # known hard cases: tiny T, T one past a block, one head, D = 256, long prefix, window 1
    (1, 4, 4, 33, 48, 0, False, None, None), (2, 16, 16, 256, 64, 40, False, None, None),
    (6, 8, 8, 96, 64, 16, True, None, None), (1, 32, 8, 65, 256, 64, True, None, 30.0),
    (16, 4, 1, 129, 80, 1, True, 8, None), (4, 8, 2, 512, 96, 64, True, 128, 50.0),
]


def sweep_runners(torch, draw, rng):
    """(ours, torch) fwd+bwd callables for one draw. torch: SDPA (enable_gqa) over the
    concatenated [prefix | input] keys with a bool mask for causal/window; with soft-capping SDPA
    has no cap, so the eager form transformers runs for Gemma 2 (scores, tanh cap, mask, softmax)."""
    B, H, Hkv, T, D, P, causal, window, softcap = draw
    q = rng.standard_normal((B, T, H, D), dtype=np.float32)
    k, v = (rng.standard_normal((B, T, Hkv, D), dtype=np.float32) for _ in range(2))
    pk, pv = (rng.standard_normal((P, Hkv, D), dtype=np.float32) for _ in range(2))
    dout = rng.standard_normal(q.shape, dtype=np.float32)
    kw = dict(causal=causal, window=window, softcap=softcap)

    def run_ours():
        out, lse = ops.prefix_attention_forward(q, k, v, pk, pv, **kw)
        ops.prefix_attention_backward(dout, q, k, v, pk, pv, out, lse, **kw)

    F = torch.nn.functional
    tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(a.swapaxes(1, 2))).requires_grad_(True) for a in (q, k, v))
    tpk, tpv = (torch.from_numpy(np.ascontiguousarray(a.swapaxes(0, 1))).requires_grad_(True) for a in (pk, pv))
    gout = torch.from_numpy(np.ascontiguousarray(dout.swapaxes(1, 2)))
    x = P + torch.arange(T)[:, None]  # positions: query i at P + i, key y at y (ops' convention)
    y = torch.arange(P + T)[None, :]
    visible = torch.ones(T, P + T, dtype=torch.bool)
    if causal:
        visible &= y <= x
    if window:
        visible &= x - y < window
    mask = None if visible.all() else visible
    group = H // Hkv

    def run_torch():
        for t in (tq, tk, tv, tpk, tpv):
            t.grad = None
        kf = torch.cat([tpk.expand(B, Hkv, P, D), tk], dim=2)
        vf = torch.cat([tpv.expand(B, Hkv, P, D), tv], dim=2)
        if softcap is None:
            out = F.scaled_dot_product_attention(tq, kf, vf, attn_mask=mask, enable_gqa=group > 1)
        else:
            if group > 1:
                kf, vf = kf.repeat_interleave(group, 1), vf.repeat_interleave(group, 1)
            s = torch.tanh((tq @ kf.transpose(-1, -2)) * (D ** -0.5 / softcap)) * softcap
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            out = torch.softmax(s, -1) @ vf
        out.backward(gout)

    return run_ours, run_torch


def bench_sweep(torch, n, threads, rounds=3):
    """The worst and best ratio (torch time / ours, fwd+bwd) over the draws and the corner cases."""
    rng = np.random.default_rng(1)
    rows = []
    print(f"\nattention sweep: {n} seeded draws + {len(CORNERS)} corner cases, fwd+bwd, {threads} threads")
    print(f"{'(B, H, Hkv, T, D, P)':>28} {'causal':>6} {'window':>6} {'softcap':>7}  {'ours ms':>8}  {'torch ms':>8}  x torch")
    for kind, draw in [("draw", d) for d in sweep_draws(n)] + [("corner", d) for d in CORNERS]:
        run_ours, run_torch = sweep_runners(torch, draw, rng)
        t_torch, t_ours = [], []
        for _ in range(rounds):  # alternate, so a noisy moment hits both sides
            t_ours.append(median_seconds(run_ours, min_time=0.15, min_reps=3))
            t_torch.append(median_seconds(run_torch, min_time=0.15, min_reps=3))
        ours_ms, torch_ms = min(t_ours) * 1e3, min(t_torch) * 1e3
        B, H, Hkv, T, D, P, causal, window, softcap = draw
        row = {"kind": kind, "shape": [B, H, Hkv, T, D, P], "causal": causal, "window": window, "softcap": softcap,
               "threads": threads, "ours_ms": ours_ms, "torch_ms": torch_ms, "vs_torch": torch_ms / ours_ms}
        rows.append(row)
        print(f"{str((B, H, Hkv, T, D, P)):>28} {str(causal):>6} {str(window):>6} "
              f"{'-' if softcap is None else f'{softcap:.0f}':>7}  {ours_ms:8.2f}  {torch_ms:8.2f}  {row['vs_torch']:7.2f}",
              flush=True)
    for causal in (False, True):
        sel = [r for r in rows if r["causal"] == causal]
        worst, best = min(sel, key=lambda r: r["vs_torch"]), max(sel, key=lambda r: r["vs_torch"])
        print(f"{'causal' if causal else 'non-causal'}: worst {worst['vs_torch']:.2f}x at {worst['shape']} "
              f"(window {worst['window']}, softcap {worst['softcap']}), best {best['vs_torch']:.2f}x, "
              f"median {statistics.median(r['vs_torch'] for r in sel):.2f}x over {len(sel)}")
    return rows


def bench_busy(torch, threads):
    """fwd+bwd of the bench's shapes, quiet and with another process spinning on CPU 1, for both
    sides: the slowdown (busy / quiet) and the ratio to torch under the same load. "ours" adapts its
    team to the load (softprompt.set_adaptive_threads, the default); "fixed" is the same kernels with
    adaptation off, measured beside it; "one" is ours on one thread, quiet (a call the team moves to
    the one free core takes about that long: busy / quiet = the 2-thread speedup then)."""
    from softprompt import _core

    rng = np.random.default_rng(0)
    rows = []
    print(f"\nbusy machine: fwd+bwd, {threads} threads, a spin loop pinned to CPU 1 in 'busy'")
    print(f"{'(B, H, T, D, P)':>22} {'causal':>6}  {'ours quiet':>10} {'ours busy':>9} {'x quiet':>7} {'fixed busy':>10}  "
          f"{'torch quiet':>11} {'torch busy':>10}  busy x torch  {'1 thread quiet':>14} {'2-thread speedup':>16}")
    for shape in SHAPES:
        inputs = numpy_inputs(*shape, rng)
        for causal in (False, True):
            # "one": ours on one thread, quiet only: a call that runs on the free core alone takes
            # this long, so busy / quiet cannot go below one / quiet (the 2-thread speedup) then.
            runners = {"ours": ours("cpp", inputs, causal, True), "fixed": ours("cpp", inputs, causal, True),
                       "one": ours("cpp", inputs, causal, True), "torch": torch_runner(torch, inputs, causal, True)}
            t, seen = {}, []
            # Alternating loads, the sides in turn forward then backward (the second of two runs
            # under a new load was measured slower whichever it was); the best of two each.
            for load, order in (("quiet", 1), ("busy", 1), ("quiet", -1), ("busy", -1)):
                with busy_core(enabled=load == "busy"):
                    for side in list(runners)[::order]:
                        softprompt.set_adaptive_threads(side != "fixed")
                        if (side == "fixed" and load == "quiet") or (side == "one" and load == "busy"):
                            continue  # fixed quiet = ours quiet; one: quiet only
                        softprompt.set_num_threads(1 if side == "one" else threads)
                        sec = median_seconds(runners[side], min_time=0.3)
                        softprompt.set_num_threads(threads)
                        t[(side, load)] = min(sec, t.get((side, load), sec))
                        if side == "ours" and load == "busy":
                            seen.append(_core.free_cores())
            softprompt.set_adaptive_threads(True)
            row = {"shape": shape, "causal": causal, "threads": threads,
                   **{f"{side}_{load}_ms": v * 1e3 for (side, load), v in t.items()}}
            row["free_cores_seen_busy"] = seen
            row["ours_slowdown"] = t[("ours", "busy")] / t[("ours", "quiet")]
            row["fixed_slowdown"] = t[("fixed", "busy")] / t[("ours", "quiet")]
            row["torch_slowdown"] = t[("torch", "busy")] / t[("torch", "quiet")]
            row["two_thread_speedup"] = t[("one", "quiet")] / t[("ours", "quiet")]
            row["busy_vs_torch"] = t[("torch", "busy")] / t[("ours", "busy")]
            rows.append(row)
            print(f"{str(shape):>22} {str(causal):>6}  {row['ours_quiet_ms']:10.2f} {row['ours_busy_ms']:9.2f} "
                  f"{row['ours_slowdown']:7.2f} {row['fixed_busy_ms']:10.2f}  {row['torch_quiet_ms']:11.2f} "
                  f"{row['torch_busy_ms']:10.2f}  {row['busy_vs_torch']:12.2f}  {row['one_quiet_ms']:14.2f} "
                  f"{row['two_thread_speedup']:16.2f}", flush=True)
    print(f"worst slowdown {max(r['ours_slowdown'] for r in rows):.2f}x (fixed threads: "
          f"{max(r['fixed_slowdown'] for r in rows):.2f}x, torch: {max(r['torch_slowdown'] for r in rows):.2f}x); "
          f"worst busy ratio to torch {min(r['busy_vs_torch'] for r in rows):.2f}x")
    return rows


# --------------------------------------------------------------------------- runs
def set_threads(n, torch):
    softprompt.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except ImportError:
        pass


def bench_attention(torch, quick, threads):
    rows = []
    rng = np.random.default_rng(0)
    for shape in SHAPES[:2] if quick else SHAPES:
        inputs = numpy_inputs(*shape, rng)
        for causal in (False, True):
            for backward in (False, True):
                row = {"shape": shape, "causal": causal, "mode": "fwd+bwd" if backward else "fwd", "threads": threads}
                flops = attention_flops(*shape, causal, backward)
                contestants = {"ours": ours("cpp", inputs, causal, backward), "numpy": ours("numpy", inputs, causal, backward)}
                if torch is not None:
                    contestants["torch"] = torch_runner(torch, inputs, causal, backward)
                for name, fn in contestants.items():
                    sec = median_seconds(fn, min_time=0.2 if name == "numpy" else 0.4, min_reps=3 if name == "numpy" else 5)
                    row[f"{name}_ms"] = sec * 1e3
                    row[f"{name}_gflops"] = flops / sec / 1e9
                for peer in ("numpy", "torch"):
                    if f"{peer}_ms" in row:
                        row[f"vs_{peer}"] = row[f"{peer}_ms"] / row["ours_ms"]
                rows.append(row)
                print_attention_row(row)
    return rows


def bench_prepend(quick):
    rows = []
    rng = np.random.default_rng(0)
    for B, P, T, D in PREPEND_SHAPES[:1] if quick else PREPEND_SHAPES:
        prompt = rng.standard_normal((P, D), dtype=np.float32)
        x = rng.standard_normal((B, T, D), dtype=np.float32)
        y = ops.prepend_forward(prompt, x)
        dst = np.empty_like(y)
        # Bytes moved: read prompt per row + x, write y (forward); read dy, write dx + dprompt (backward).
        nbytes = 2 * y.nbytes
        row = {"shape": (B, P, T, D), "bytes": nbytes}
        row["memcpy_ms"] = median_seconds(lambda: np.copyto(dst, y)) * 1e3
        row["forward_ms"] = median_seconds(lambda: ops.prepend_forward(prompt, x)) * 1e3
        row["backward_ms"] = median_seconds(lambda: ops.prepend_backward(y, P)) * 1e3
        row["numpy_forward_ms"] = median_seconds(lambda: ops.prepend_forward(prompt, x, backend="numpy")) * 1e3
        row["numpy_backward_ms"] = median_seconds(lambda: ops.prepend_backward(y, P, backend="numpy")) * 1e3
        for key in ("memcpy", "forward", "backward", "numpy_forward", "numpy_backward"):
            row[f"{key}_gbs"] = nbytes / row[f"{key}_ms"] / 1e6
        row["forward_vs_memcpy"] = row["forward_gbs"] / row["memcpy_gbs"]
        row["backward_vs_memcpy"] = row["backward_gbs"] / row["memcpy_gbs"]
        rows.append(row)
        print(
            f"prepend {str((B, P, T, D)):>22}  memcpy {row['memcpy_gbs']:6.1f} GB/s  "
            f"fwd {row['forward_gbs']:6.1f} GB/s ({row['forward_vs_memcpy']:.0%})  "
            f"bwd {row['backward_gbs']:6.1f} GB/s ({row['backward_vs_memcpy']:.0%})  "
            f"numpy fwd {row['numpy_forward_gbs']:6.1f} bwd {row['numpy_backward_gbs']:6.1f} GB/s"
        )
    return rows


def print_attention_header(has_torch):
    peer = "  torch ms  torch GF/s  x torch" if has_torch else ""
    print(f"{'(B, H, T, D, P)':>22} {'causal':>6} {'mode':>7} {'thr':>3}  {'ours ms':>8} {'GF/s':>6}{peer}  {'numpy ms':>9}  x numpy")


def print_attention_row(r):
    peer = f"  {r['torch_ms']:8.2f}  {r['torch_gflops']:10.1f}  {r['vs_torch']:7.2f}" if "torch_ms" in r else ""
    print(
        f"{str(r['shape']):>22} {str(r['causal']):>6} {r['mode']:>7} {r['threads']:>3}  {r['ours_ms']:8.2f} {r['ours_gflops']:6.1f}"
        f"{peer}  {r['numpy_ms']:9.2f}  {r['vs_numpy']:7.1f}",
        flush=True,
    )


def write_json(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def print_scaling(rows, thread_counts):
    """GF/s per thread count and the parallel efficiency against one thread (or the fewest)."""
    base = thread_counts[0]
    print(f"\nscaling (fwd+bwd GF/s; efficiency = GF/s / ({base}-thread GF/s x threads / {base}))")
    keyed = {(tuple(r["shape"]), r["causal"], r["mode"], r["threads"]): r for r in rows}
    for shape in {tuple(r["shape"]) for r in rows}:
        for causal in (False, True):
            line = f"{str(shape):>22} {'causal' if causal else 'full':>6}"
            first = keyed.get((shape, causal, "fwd+bwd", base))
            for n in thread_counts:
                r = keyed.get((shape, causal, "fwd+bwd", n))
                if r is None or first is None:
                    continue
                eff = r["ours_gflops"] / (first["ours_gflops"] * n / base)
                torch = f" torch {r['torch_gflops']:6.1f}" if "torch_gflops" in r else ""
                line += f" | {n:>2} thr: ours {r['ours_gflops']:6.1f} ({eff:4.0%}){torch}"
            print(line)


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart")
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=False)
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        sel = [r for r in rows if r["mode"] == mode]
        labels = [",".join(map(str, r["shape"])) + ("\ncausal" if r["causal"] else "\nfull") for r in sel]
        xs = np.arange(len(sel))
        peers = [p for p in ("torch", "numpy") if all(f"vs_{p}" in r for r in sel)]
        for i, peer in enumerate(peers):
            ax.bar(xs + (i - (len(peers) - 1) / 2) * 0.38, [r[f"vs_{peer}"] for r in sel], 0.38, label=f"vs {peer}")
        ax.axhline(1, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(xs, labels, fontsize=7, rotation=35)
        ax.set_title(f"softprompt speedup, {mode}")
        ax.legend()
    fig.suptitle(f"(B, H, T, D, P), float32, {rows[0]['threads']} threads", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default=str(os.cpu_count()), help="thread counts for every contestant, e.g. 1,2,4")
    parser.add_argument("--quick", action="store_true", help="two shapes only (smoke run)")
    parser.add_argument("--out", default=str(RESULTS / "ops.json"))
    parser.add_argument("--replot", action="store_true", help="only redraw the chart from --out's JSON")
    parser.add_argument("--busy", action="store_true",
                        help="the attention shapes quiet and with a spin loop pinned to CPU 1 (another process), "
                             "alternating, both sides; writes bench/results/ops_busy.json")
    parser.add_argument("--rounds", type=int, default=5, help="--sweep: alternations per problem (the best of each side)")
    parser.add_argument("--sweep", type=int, default=0, metavar="N",
                        help="only the attention sweep: N seeded random shapes and the corner cases against torch, "
                             "fwd+bwd, at the last --threads; writes bench/results/ops_sweep.json")
    args = parser.parse_args(argv)
    if args.replot:
        rows = json.loads(Path(args.out).read_text())["attention"]
        last = max(r["threads"] for r in rows)
        plot([r for r in rows if r["threads"] == last], Path(args.out).with_name("ops_speedup.png"))
        return 0

    thread_counts = [int(t) for t in args.threads.split(",")]
    try:
        import torch
    except ImportError:
        torch = None
    try:
        from threadpoolctl import threadpool_info

        blas = [{k: i.get(k) for k in ("internal_api", "version", "architecture")} for i in threadpool_info()]
    except ImportError:
        blas = "threadpoolctl not installed"
    info = machine() | {"threads": thread_counts, "torch": getattr(torch, "__version__", None), "blas": blas,
                        "attention_kernel": softprompt.ops.get_attention_kernel(),
                        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}
    print(json.dumps(info))
    if args.busy:
        if torch is None:
            print("the busy-machine table compares with torch: pip install torch==2.13.0")
            return 1
        set_threads(thread_counts[-1], torch)
        rows = bench_busy(torch, thread_counts[-1])
        write_json(RESULTS / "ops_busy.json", {"machine": info, "busy": rows})
        print(f"wrote {RESULTS / 'ops_busy.json'}")
        return 0
    if args.sweep:
        if torch is None:
            print("the sweep compares with torch: pip install torch==2.13.0")
            return 1
        set_threads(thread_counts[-1], torch)
        rows = bench_sweep(torch, args.sweep, thread_counts[-1], args.rounds)
        out = Path(args.out).with_name("ops_sweep.json") if args.out == str(RESULTS / "ops.json") else Path(args.out)
        write_json(out, {"machine": info, "sweep": rows})
        print(f"wrote {out}")
        return 0
    print_attention_header(torch is not None)
    attention = []
    for n in thread_counts:
        set_threads(n, torch)
        attention += bench_attention(torch, args.quick, n)
    set_threads(thread_counts[-1], torch)
    prepend = bench_prepend(args.quick)
    if len(thread_counts) > 1:
        print_scaling(attention, thread_counts)
    write_json(Path(args.out), {"machine": info, "attention": attention, "prepend": prepend})
    print(f"wrote {args.out}")
    plot([r for r in attention if r["threads"] == thread_counts[-1]], Path(args.out).with_name("ops_speedup.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
