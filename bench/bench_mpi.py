"""Data-parallel throughput: 1 and 2 MPI ranks (one thread each) against one process with 2 threads.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/bench_mpi.py [--method prompt] [--steps 8]

(unset OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE in this command only: they slow NumPy's BLAS here.)
Each configuration runs the default job's training step (SmolLM2-135M, Rotten Tomatoes, global batch
16, 20 virtual tokens) through `softprompt.train.step_gradients` + AdamW, the same code as
`softprompt train`, on the same batches. Reports tokens/s (real tokens of the global batch per second),
the step time, and, for the MPI run, the allreduce's own time (timed after a barrier, so waiting for a
slower rank is not counted), from which it predicts N-machine throughput. Needs mpi4py and an MPI
runtime (`pip install mpi4py mpich`); writes bench/results/mpi_<method>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def child(args):
    import numpy as np

    import softprompt
    from softprompt import data as data_mod
    from softprompt.distributed import world
    from softprompt.train import AdamW, Task, TrainConfig, make_adapter, micro_batches, step_gradients, _limit_blas_threads

    comm = world()
    softprompt.set_num_threads(args.threads)
    _limit_blas_threads(args.threads)
    model = softprompt.load_model()
    task = Task(model, data_mod.rotten_tomatoes())
    cfg = TrainConfig(method=args.method, batch_size=args.batch_size).resolved()
    adapter = make_adapter(model, cfg, task.label_ids)
    params = adapter.parameters()
    opt = AdamW(params, cfg.lr)
    batches = micro_batches(task, cfg, 0)
    times, tokens = [], 0
    for s in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        grads, loss, n = step_gradients(task, adapter, [batches[s]], comm)
        opt.step(grads, cfg.lr)
        if s >= args.warmup:
            times.append(time.perf_counter() - t0)
            tokens += n
    size = sum(p.size for p in params.values()) + 2
    reduce_s = []
    if comm.size > 1:  # the allreduce alone, all ranks ready (a barrier first)
        buf = np.zeros(size)
        for _ in range(20):
            comm.comm.Barrier()
            t0 = time.perf_counter()
            comm.allreduce_sum(buf)
            reduce_s.append(time.perf_counter() - t0)
    if comm.rank == 0:
        print("RESULT " + json.dumps({"ranks": comm.size, "threads": args.threads, "step_s": times,
                                      "tokens": tokens, "floats": size,
                                      "allreduce_s": statistics.median(reduce_s) if reduce_s else 0.0}))


def run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="prompt", choices=["prompt", "prefix"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    mpiexec = shutil.which("mpiexec") or shutil.which("mpiexec", path=sysconfig.get_path("scripts"))
    if mpiexec is None:
        sys.exit("bench_mpi: no mpiexec on PATH: pip install mpi4py mpich")
    base = [__file__, "--child", "--method", args.method, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--batch-size", str(args.batch_size)]
    configs = [("1 process, 2 threads", [sys.executable, *base, "--threads", "2"]),
               ("1 process, 1 thread", [sys.executable, *base, "--threads", "1"]),
               ("2 ranks x 1 thread", [mpiexec, "-n", "2", sys.executable, *base, "--threads", "1"])]
    rows = []
    print(f"{args.method} tuning, SmolLM2-135M, global batch {args.batch_size}, median of {args.steps} steps")
    print(f"{'configuration':22} {'s/step':>7} {'tokens/s':>9} {'allreduce':>10}")
    for name, cmd in configs:
        r = run(cmd)
        step = statistics.median(r["step_s"])
        r.update(name=name, median_step_s=step, tokens_per_s=r["tokens"] / sum(r["step_s"]))
        rows.append(r)
        reduce = f"{r['allreduce_s'] * 1e3:.2f} ms" if r["ranks"] > 1 else ""
        print(f"{name:22} {step:7.3f} {r['tokens_per_s']:9.0f} {reduce:>10}")
    two, one = rows[2], rows[1]
    compute = two["median_step_s"] - two["allreduce_s"]
    print(f"2 ranks vs 1 process at 1 thread: {two['tokens_per_s'] / one['tokens_per_s']:.2f}x; vs 1 process at 2 "
          f"threads: {two['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x; allreduce of {two['floats']} float64 "
          f"= {two['allreduce_s'] / two['median_step_s'] * 100:.3f}% of the step")
    RESULTS.mkdir(exist_ok=True)
    out = {"method": args.method, "batch_size": args.batch_size, "rows": rows, "compute_s_2ranks": compute,
           "cpu_count": os.cpu_count()}
    tmp = RESULTS / f"mpi_{args.method}.json.tmp"
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, RESULTS / f"mpi_{args.method}.json")


if __name__ == "__main__":
    main()
