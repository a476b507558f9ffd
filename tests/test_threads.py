"""Thread count setting, bitwise determinism across thread counts, and concurrent calls."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import make_problem

import softprompt
from softprompt import ops


@pytest.fixture
def restore_threads():
    n = softprompt.get_num_threads()
    yield
    softprompt.set_num_threads(n)


def run_all(q, k, v, pk, pv, m, causal, dout):
    out, lse = ops.prefix_attention_forward(q, k, v, pk, pv, causal=causal, key_padding_mask=m)
    grads = ops.prefix_attention_backward(dout, q, k, v, pk, pv, out, lse, causal=causal, key_padding_mask=m)
    return (out, lse, *grads)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal,per_row,mask", [(False, False, None), (True, False, "left"), (True, True, "random")])
def test_bitwise_identical_on_1_and_2_threads(rng, kernel, restore_threads, dtype, causal, per_row, mask):
    # Large enough to run threaded (T > one query block, many work items), shared prefix and GQA.
    q, k, v, pk, pv, m = make_problem(rng, 4, 150, 150, 8, 2, 32, 10, dtype=dtype, per_row=per_row, mask=mask)
    dout = rng.standard_normal(q.shape).astype(dtype)
    softprompt.set_num_threads(1)
    one = run_all(q, k, v, pk, pv, m, causal, dout)
    softprompt.set_num_threads(2)
    two = run_all(q, k, v, pk, pv, m, causal, dout)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
    dy = rng.standard_normal((64, 20 + 100, 64)).astype(dtype)
    softprompt.set_num_threads(1)
    dprompt1, dx1 = ops.prepend_backward(dy, 20)
    softprompt.set_num_threads(2)
    dprompt2, dx2 = ops.prepend_backward(dy, 20)
    np.testing.assert_array_equal(dprompt1, dprompt2)
    np.testing.assert_array_equal(dx1, dx2)


def test_set_and_get_num_threads(restore_threads):
    softprompt.set_num_threads(3)
    assert softprompt.get_num_threads() == 3
    with pytest.raises(ValueError, match="n: expected a thread count >= 1, got 0"):
        softprompt.set_num_threads(0)
    with pytest.raises(TypeError, match="n: expected an int, got str"):
        softprompt.set_num_threads("2")
    with pytest.raises(TypeError, match="n: expected an int, got bool"):
        softprompt.set_num_threads(True)


@pytest.mark.skipif(not softprompt.has_openmp(), reason="built without OpenMP: always one thread")
def test_omp_num_threads_is_honoured():
    code = "import softprompt; print(softprompt.get_num_threads())"
    env = dict(os.environ, OMP_NUM_THREADS="3")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"


def test_concurrent_calls_from_python_threads(rng):
    # Kernels release the GIL; calls from several Python threads must not interfere.
    problems = [make_problem(rng, 2, 70, 80, 4, 2, 16, 5, mask="right") for _ in range(4)]
    want = [ops.prefix_attention_forward(q, k, v, pk, pv, key_padding_mask=m)[0] for q, k, v, pk, pv, m in problems]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda p: ops.prefix_attention_forward(*p[:5], key_padding_mask=p[5])[0], problems * 3))
    for i, g in enumerate(got):
        np.testing.assert_array_equal(g, want[i % 4])


def test_the_backend_switch_is_per_thread(rng):
    """Two threads at once, one inside use_backend("numpy"), the other on the default: each gets its
    own backend's bits (float32, where the two round differently)."""
    import threading

    q, k, v, pk, pv, _ = make_problem(rng, 2, 70, 70, 4, 2, 16, 3, dtype=np.float32)
    want = {b: ops.prefix_attention_forward(q, k, v, pk, pv, causal=True, backend=b)[0] for b in ("cpp", "numpy")}
    assert not np.array_equal(want["cpp"], want["numpy"])  # so that a mix-up shows
    barrier, got, seen = threading.Barrier(2), {}, {}

    def worker(name):
        ctx = ops.use_backend("numpy") if name == "numpy" else ops.use_backend(ops.get_backend())
        with ctx:
            barrier.wait()  # both threads are inside their setting now
            for _ in range(5):
                got[name] = ops.prefix_attention_forward(q, k, v, pk, pv, causal=True)[0]
                seen[name] = ops.get_backend()
            barrier.wait()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("cpp", "numpy")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert seen == {"cpp": "cpp", "numpy": "numpy"} and ops.get_backend() == "cpp"
    for name in ("cpp", "numpy"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_adaptive_threads_are_on_by_default():
    out = subprocess.run([sys.executable, "-c", "import softprompt; print(softprompt.get_adaptive_threads())"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_set_and_get_adaptive_threads():
    softprompt.set_adaptive_threads(True)
    assert softprompt.get_adaptive_threads() is True
    softprompt.set_adaptive_threads(False)
    assert softprompt.get_adaptive_threads() is False
    with pytest.raises(TypeError, match="enabled: expected a bool, got int"):
        softprompt.set_adaptive_threads(1)


def _team_sizes(work, seconds):
    """The team size a call of `work` flops gets, probed every 0.1 s for `seconds` (each probe is a
    kernel call, which is when the load is sampled)."""
    import time

    from softprompt import _core

    sizes = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sizes.append(_core.threads_for(work))
        time.sleep(0.1)
    return sizes


@pytest.mark.skipif(not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
                    reason="load sampling reads /proc/stat; needs 2 CPUs to take one")
@pytest.mark.skipif(not softprompt.has_openmp(), reason="built without OpenMP: always one thread")
def test_fewer_threads_while_another_process_keeps_a_core_busy(restore_threads):
    """Another process spinning on one of the CPUs: small calls drop to the cores left, large ones
    keep the team; with adaptation off, or once the spinner stops, every call gets the team."""
    from softprompt import _core

    cpus = sorted(os.sched_getaffinity(0))
    softprompt.set_num_threads(len(cpus))
    softprompt.set_adaptive_threads(True)
    before = _team_sizes(1e6, 0.5)[-1]
    if before < len(cpus):  # not this test's doing: say so rather than fail on a shared host
        pytest.skip(f"other processes already keep {len(cpus) - before} of {len(cpus)} CPUs busy")
    spin = f"import os\nos.sched_setaffinity(0, {{{cpus[-1]}}})\nwhile True:\n    pass\n"
    proc = subprocess.Popen([sys.executable, "-c", spin])
    try:
        sizes = _team_sizes(1e6, 1.5)
        assert sizes[-1] <= len(cpus) - 1, sizes  # at least the spinner's core is taken
        assert _core.free_cores() <= len(cpus) - 1
        assert _core.threads_for(1e9) == len(cpus)  # a long call still uses the loaded core's share
        assert _core.threads_for(1e4) == 1  # a tiny call runs serially anyway
        softprompt.set_adaptive_threads(False)
        assert _core.threads_for(1e6) == len(cpus)
        softprompt.set_adaptive_threads(True)
    finally:
        proc.kill()
        proc.wait()
    # The spinner gone, the whole team comes back (within a few samples: polled, not at one instant).
    assert len(cpus) in _team_sizes(1e6, 2.0)
    # More threads than CPUs, when asked for, while nothing else runs: adaptation only takes
    # threads away for cores other processes use.
    softprompt.set_num_threads(len(cpus) + 1)
    assert len(cpus) + 1 in _team_sizes(1e6, 1.0)
