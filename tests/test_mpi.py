"""Data-parallel training over MPI: real `mpiexec -n 2` runs of the command line on the tiny task,
against one process; the batch split; faults ending the job instead of hanging it.

mpi4py and an MPI runtime (the `mpich` wheel, which brings `mpiexec`) are test extras."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from softprompt.distributed import SingleProcess, launched_size, shard, world

# The mpich wheel puts mpiexec beside this Python's scripts, which need not be on PATH.
MPIEXEC = shutil.which("mpiexec") or shutil.which("mpiexec", path=sysconfig.get_path("scripts"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny task on a wider model (128): every product of a rank's shard is above the 64^3
    multiply-adds below which OpenBLAS switches kernels and rounds rows differently."""
    from conftest import make_tiny_task

    return make_tiny_task(tmp_path_factory.mktemp("tiny_wide"), hidden_size=128, intermediate_size=256)
needs_mpi = pytest.mark.skipif(
    MPIEXEC is None or not __import__("importlib").util.find_spec("mpi4py"),
    reason="mpi4py and an MPI runtime are test extras: pip install '.[test]' (mpi4py, mpich)")
TIMEOUT = 240  # seconds: any run here that takes longer is a hang


def test_shard_splits_a_batch_evenly_and_completely():
    for n in range(0, 12):
        for size in range(1, 5):
            parts = [shard(list(range(n)), r, size) for r in range(size)]
            assert sum(parts, []) == list(range(n))  # contiguous, in order, nothing lost or repeated
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard([7, 8, 9], 0, 2) == [7] and shard([7, 8, 9], 1, 2) == [8, 9]
    assert shard([5], 1, 3) == []  # a rank may get nothing when the batch is smaller than the world


def test_one_process_needs_no_mpi(monkeypatch):
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SOFTPROMPT_MPI"):
        monkeypatch.delenv(var, raising=False)
    assert launched_size() == 1 and isinstance(world(), SingleProcess)
    code = ("import sys, softprompt, softprompt.train, softprompt.cli; from softprompt.distributed import world; "
            "world(); print('mpi4py' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert out.stdout.strip() == "False", out.stderr  # nothing MPI-related is imported


def _train_args(folder, data_file, out, *extra):
    return ["-m", "softprompt.cli", "train", "--model", str(folder), "--data", str(data_file), "--output", str(out),
            "--max-steps", "8", "--batch-size", "17", "--warmup", "2", "--eval-every", "4", "--checkpoint-every", "3",
            "--lr", "0.03", "--init", "random", "--threads", "1", "--max-eval", "60", "--no-progress", *extra]


def _run(args, ranks=1, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    cmd = [sys.executable, *args] if ranks == 1 else [MPIEXEC, "-n", str(ranks), sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT)


def _adapter(out):
    from safetensors.numpy import load_file

    return load_file(str(Path(out) / "adapter_model.safetensors"))


def _close(a, b, tol):
    """Relative difference in norm (tol 0: the same bits); printed so that a failure shows how far
    off it was."""
    assert a.keys() == b.keys()
    for k in a:
        rel = np.linalg.norm(a[k] - b[k]) / np.linalg.norm(b[k])
        print(f"{k}: relative difference {rel:.2e}")
        assert rel <= tol, (k, rel)


@needs_mpi
@pytest.mark.parametrize("method", [["--method", "prompt"], ["--method", "prefix"],
                                    ["--method", "prefix", "--prefix-projection", "--lr", "1e-3"]])
def test_two_ranks_train_the_same_adapter_as_one_process(tiny, tmp_path, method):
    """Batch 17 over 2 ranks: shards of 8 and 9 examples, weighted so the loss means the same.
    8 AdamW steps; the same bits (see the gradient test for why)."""
    folder, _, _, data_file = tiny
    one = _run(_train_args(folder, data_file, tmp_path / "one", *method))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(_train_args(folder, data_file, tmp_path / "two", *method), ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    _close(_adapter(tmp_path / "two"), _adapter(tmp_path / "one"), 0.0)
    import json

    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["ranks"] == 2 and m1["ranks"] == 1 and m2["steps"] == m1["steps"] == 8
    assert m2["test_accuracy"] == m1["test_accuracy"]  # sharded evaluation counts every example once
    assert two.stdout.count("zero-shot test accuracy") == 1  # rank 0 alone logs


@needs_mpi
def test_killed_rank_ends_the_job_and_resume_finishes_it(tiny, tmp_path):
    folder, _, _, data_file = tiny
    out = tmp_path / "run"
    launcher = [str(Path(__file__).with_name("mpi_launcher.py")), "--kill", "1:5"]
    killed = _run(launcher + _train_args(folder, data_file, out)[2:], ranks=2)
    assert killed.returncode != 0  # ended (bounded by TIMEOUT), not hung
    assert "KILLED" in killed.stdout + killed.stderr or "signal 9" in killed.stdout + killed.stderr
    assert (out / "checkpoint.npz").exists() and not (out / "adapter_model.safetensors").exists()
    resumed = _run(["-m", "softprompt.cli", "train", "--resume", str(out), "--no-progress"], ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "at step 3 of 8" in resumed.stdout
    straight = _run(_train_args(folder, data_file, tmp_path / "straight"), ranks=2)
    assert straight.returncode == 0, straight.stderr[-3000:]
    for k, v in _adapter(tmp_path / "straight").items():  # the same ranks, the same sums: bitwise
        np.testing.assert_array_equal(_adapter(out)[k], v)


GRADIENT = """
import json
import sys
import numpy as np
import softprompt
from softprompt import data as data_mod
from softprompt.distributed import SingleProcess, world
from softprompt.train import Task, TrainConfig, make_adapter, step_gradients
softprompt.set_num_threads(1)
folder, data_file, method, sizes, words = sys.argv[1:6]
model = softprompt.load_model(folder)
task = Task(model, data_mod.load_file(data_file), label_words=json.loads(words))
task.train[3] = task.train[3].__class__(**{**task.train[3].__dict__, "ids": task.train[3].ids[:-2]})  # ragged
adapter = make_adapter(model, TrainConfig(method=method, init="random").resolved(), task.label_ids)
micro, start = [], 0
for n in map(int, sizes.split(",")):  # accumulated micro-batches of these sizes
    micro.append(list(range(start, start + n)))
    start += n
w = world()
grads, loss, tokens = step_gradients(task, adapter, micro, w)
if w.rank == 0:
    ref, ref_loss, ref_tokens = step_gradients(task, adapter, micro, SingleProcess())
    assert tokens == ref_tokens, (tokens, ref_tokens)
    print(f"LOSS {abs(loss - ref_loss) / ref_loss:.3e}")
    for k in ref:
        print(f"REL {k} {np.linalg.norm(grads[k] - ref[k]) / np.linalg.norm(ref[k]):.3e}")
"""


@needs_mpi
@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("sizes", ["17,16", "1,9"])
@pytest.mark.parametrize("words", [None, {"negative": " w1 bad w2", "positive": " good"}], ids=["one-token", "multi"])
def test_two_ranks_compute_the_one_process_gradient(tiny, method, sizes, words):
    """One step's gradient (two accumulated micro-batches: 17 and 16 examples, split 8+9 and 8+8,
    one shorter example; or 1 and 9, where rank 0 has no row of the first and only takes part in
    the reductions) on 2 ranks is bitwise the one-process gradient: every row's forward and
    backward is the one-process row (same padding, the global loss scale, products big enough for
    OpenBLAS's row-exact kernels), the adapter's sums over rows are float64 sums of float32 rows
    (which do not round, so their order does not matter), and the shared prompt rows' backward runs
    on the reduced sums. With label words of several tokens the label rows that continue an
    example run on the rank that holds it, and their share of the shared prompt's gradient joins
    the rows' float64 sum."""
    folder, _, _, data_file = tiny
    out = _run(["-c", GRADIENT, str(folder), str(data_file), method, sizes, json.dumps(words)], ranks=2)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split("\n")
    assert float(next(x for x in lines if x.startswith("LOSS")).split()[1]) < 1e-12
    rel = [float(x.split()[2]) for x in lines if x.startswith("REL")]
    print(out.stdout)
    assert rel and max(rel) == 0.0


AGREE = """
import sys
from softprompt.distributed import DistributedError, world
w = world()
try:
    w.agree(OSError("data.jsonl: cannot read shard") if w.rank == 1 else None)
except DistributedError as e:
    print(f"rank {w.rank} caught: {e}", flush=True)
    sys.exit(3)
"""

HANG = """
import time
import numpy as np
from softprompt.distributed import world
w = world()
if w.rank == 1:
    time.sleep(60)  # a rank that hangs
w.allreduce_sum(np.ones(3))
"""


@needs_mpi
def test_a_failure_on_one_rank_stops_every_rank_with_the_reason(tmp_path):
    out = _run(["-c", AGREE], ranks=2)
    assert out.returncode != 0
    assert "rank 0 caught: 1 of 2 ranks failed:\n  rank 1: OSError: data.jsonl: cannot read shard" in out.stdout
    assert "rank 1 caught: rank 1: stopping, another rank failed" in out.stdout


@needs_mpi
def test_a_hanging_rank_times_out_with_a_message():
    out = _run(["-c", HANG], ranks=2, env_extra={"SOFTPROMPT_MPI_TIMEOUT": "3"})
    assert out.returncode != 0
    assert "rank 0: allreduce got no answer from the other ranks in 3 s" in out.stderr


@needs_mpi
def test_bad_data_file_under_mpi_is_reported_once(tiny, tmp_path):
    folder, _, _, _ = tiny
    out = _run(_train_args(folder, tmp_path / "missing.jsonl", tmp_path / "run"), ranks=2)
    assert out.returncode == 2
    assert out.stderr.count("2 of 2 ranks failed") == 1 and "missing.jsonl" in out.stderr


STALL = """
import sys, time
import numpy as np
from softprompt.distributed import world
w = world()
what = sys.argv[1]
if w.rank == (0 if what == "bcast" else 1):  # bcast's root may finish alone: stall the root there
    time.sleep(60)  # a rank that never arrives in time
if what == "bcast":
    w.bcast({"step": 3})
else:
    w.agree(OSError("bad file") if w.rank == 0 else None)
"""


@needs_mpi
@pytest.mark.parametrize("what", ["bcast", "agree"])
def test_a_stalled_rank_ends_every_collective_with_a_message(what):
    """bcast and agree (whose gather of the failures is two sums) keep the deadline too."""
    out = _run(["-c", STALL, what], ranks=2, env_extra={"SOFTPROMPT_MPI_TIMEOUT": "3"})
    assert out.returncode != 0
    waiting = "rank 1: bcast" if what == "bcast" else "rank 0: allreduce"
    assert f"{waiting} got no answer from the other ranks in 3 s" in out.stderr, out.stderr[-2000:]


GATHER = """
import json
import os
from softprompt.distributed import world
w = world()
got = w.gather_text(None if w.rank == 0 else f"rank {w.rank} says \\u00e9")
obj = w.bcast({"a": [1, 2]} if w.rank == 0 else None)
os.write(1, f"GOT {got} OBJ {obj}\\n".encode())  # one write per rank: lines never interleave
"""


@needs_mpi
def test_gather_text_and_bcast_carry_the_values():
    out = _run(["-c", GATHER], ranks=2)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("GOT [None, 'rank 1 says \u00e9'] OBJ {'a': [1, 2]}") == 2, out.stdout
