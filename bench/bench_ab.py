"""Two builds of the C++ core side by side in one process: is a kernel change faster?

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/bench_ab.py A_DIR B_DIR [--threads 2] [--seconds 6]

A_DIR and B_DIR each hold a built `_core*.so` (a CMake build folder, or a copy of one). On a shared
host the same call moves 10-30% between minutes, so separate processes (or runs minutes apart) cannot
show a 5% change. Here both modules are loaded into one process and called in turn, A B B A A B ...,
for `--seconds` per problem, so a slow minute lands on both alike; prints the min and median time
of each and their ratio (A / B above 1: B is faster), and whether both return the same bits.
Problems: attention forward + backward (non-causal and causal, D = 64 to 256) and the float32 GEMM
on SmolLM2's gate/up and down shapes at 512 rows, or the attention problems given with
--attention B,H,Hkv,T,D,P,causal[,softcap] and --gemm rows,out,in (repeatable; --no-gemm leaves the
GEMM out). Adaptive threads are off in both (the team is
`--threads`). Writes nothing: it is a developer's check, the published tables come from the other
scripts here.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import sys
import time
import types
from pathlib import Path

import numpy as np

ATTENTION = [  # (B, H, Hkv, T, D, P, causal)
    (1, 12, 12, 334, 256, 12, False), (2, 16, 16, 256, 64, 40, False), (4, 24, 24, 66, 96, 1, False),
    (6, 8, 8, 315, 128, 45, True), (8, 9, 3, 64, 64, 20, True),
]
GEMM = [(512, 3072, 576), (512, 576, 1536)]  # (rows, out, in): gate/up, down


def load_core(tag, folder):
    """The `_core` extension in `folder`, as module `_ab{tag}._core` (its init symbol is PyInit__core,
    so the last name must stay `_core`; the package name keeps the two apart)."""
    found = sorted(glob.glob(str(Path(folder) / "_core*.so")))
    if not found:
        raise SystemExit(f"{folder}: expected a built _core*.so there, found none")
    package = types.ModuleType(f"_ab{tag}")
    package.__path__ = []
    sys.modules[package.__name__] = package
    spec = importlib.util.spec_from_file_location(f"_ab{tag}._core", found[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def attention_call(problem, rng):
    B, H, Hkv, T, D, P, causal, *cap = problem
    softcap = float(cap[0]) if cap else 0.0
    q = rng.standard_normal((B, T, H, D), dtype=np.float32)
    k, v = (rng.standard_normal((B, T, Hkv, D), dtype=np.float32) for _ in range(2))
    pk, pv = (rng.standard_normal((P, Hkv, D), dtype=np.float32) for _ in range(2))
    dout = rng.standard_normal(q.shape, dtype=np.float32)
    scale = 1 / np.sqrt(D)

    def run(core):
        out, lse = core.prefix_attention_forward(q, k, v, pk, pv, causal, None, scale, 0, softcap)
        return (out, lse, *core.prefix_attention_backward(dout, q, k, v, pk, pv, out, lse, causal, None, scale, 0,
                                                          softcap))

    return run


def gemm_call(shape, rng):
    rows, out, cols = shape
    w = (rng.standard_normal((out, cols)) * 0.02).astype(np.float32)
    x = rng.standard_normal((rows, cols), dtype=np.float32)
    dy = rng.standard_normal((rows, out), dtype=np.float32)
    return lambda core: (core.linear_forward(x, w, 0, cols), core.linear_backward(dy, w, 0, cols))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="folder with build A's _core*.so")
    ap.add_argument("b", help="folder with build B's _core*.so")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=6.0, help="time per problem, both builds together")
    ap.add_argument("--attention", action="append", metavar="B,H,Hkv,T,D,P,causal[,softcap]",
                    help="an attention problem instead of the default list (repeat for more; causal 0 or 1)")
    ap.add_argument("--gemm", action="append", metavar="rows,out,in",
                    help="a GEMM problem (fwd + bwd) instead of the default two (repeat for more)")
    ap.add_argument("--no-gemm", action="store_true", help="skip the GEMM problems")
    args = ap.parse_args()
    attention = ATTENTION
    if args.attention:
        try:
            attention = [tuple(float(x) for x in a.split(",")) for a in args.attention]
        except ValueError:
            attention = []
        if not attention or any(len(p) not in (7, 8) for p in attention):
            ap.error(f"--attention: expected B,H,Hkv,T,D,P,causal[,softcap] (7 or 8 numbers), got {args.attention}")
        attention = [(*(int(x) for x in p[:6]), bool(p[6]), *p[7:]) for p in attention]
    cores = {"A": load_core("A", args.a), "B": load_core("B", args.b)}
    for core in cores.values():
        core.set_num_threads(args.threads)
        core.set_adaptive_threads(False)
    rng = np.random.default_rng(0)
    problems = [(f"attention {p}", attention_call(p, rng)) for p in attention]
    gemm = GEMM
    if args.gemm:
        try:
            gemm = [tuple(int(x) for x in g.split(",")) for g in args.gemm]
        except ValueError:
            gemm = []
        if not gemm or any(len(g) != 3 for g in gemm):
            ap.error(f"--gemm: expected rows,out,in (3 integers), got {args.gemm}")
    problems += [] if args.no_gemm else [(f"gemm fwd+bwd {s}", gemm_call(s, rng)) for s in gemm]
    print(f"{args.threads} threads, {args.seconds:g} s per problem; A / B above 1: B is faster")
    for name, run in problems:
        results = {tag: run(core) for tag, core in cores.items()}  # also the warm-up
        same = all(np.array_equal(x, y) for x, y in zip(results["A"], results["B"]))
        times = {"A": [], "B": []}
        end = time.perf_counter() + args.seconds
        while time.perf_counter() < end:
            for tag in ("A", "B") if len(times["A"]) % 2 == 0 else ("B", "A"):
                t0 = time.perf_counter()
                run(cores[tag])
                times[tag].append(time.perf_counter() - t0)
        a, b = np.array(times["A"]), np.array(times["B"])
        print(f"{name:42} n={len(a):4}  min {a.min() * 1e3:8.2f} / {b.min() * 1e3:8.2f} ms ({a.min() / b.min():.3f}x)  "
              f"median {np.median(a) * 1e3:8.2f} / {np.median(b) * 1e3:8.2f} ms ({np.median(a) / np.median(b):.3f}x)  "
              f"same bits: {same}", flush=True)


if __name__ == "__main__":
    main()
