"""softprompt keeps freed memory for reuse (ops.retain_freed_memory, at import): repeated kernel
calls then reuse their pages instead of faulting new ones in; SOFTPROMPT_RETAIN_MEMORY=0 opts out.
Measured by the kernel's own count of minor page faults (getrusage) in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CALLS = """
import resource, numpy as np, softprompt
from softprompt import ops
rng = np.random.default_rng(0)
B, T, H, D, P = 2, 256, 8, 64, 16
q, k, v = (rng.standard_normal((B, T, H, D), dtype=np.float32) for _ in range(3))
pk, pv = (rng.standard_normal((P, H, D), dtype=np.float32) for _ in range(2))
def call():  # outputs out, dq, dk, dv (1 MiB each), lse, dprefix: new arrays every call
    out, lse = ops.prefix_attention_forward(q, k, v, pk, pv)
    return ops.prefix_attention_backward(out, q, k, v, pk, pv, out, lse)
call(); call()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    call()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5, 4 * q.nbytes)
"""


def faults_per_call(retain):
    env = dict(os.environ, SOFTPROMPT_RETAIN_MEMORY=retain)
    out = subprocess.run([sys.executable, "-c", CALLS], env=env, capture_output=True, text=True, check=True)
    faults, output_bytes = out.stdout.split()
    return float(faults), int(output_bytes)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and Linux's fault count")
def test_repeated_calls_reuse_their_pages():
    faults, output_bytes = faults_per_call("1")
    pages = output_bytes / 4096
    assert faults < 0.05 * pages, f"{faults} page faults per call for {pages:.0f} pages of outputs"
    # glibc's defaults (the opt-out) hand the outputs' pages back and fault them in again each call
    faults_default, _ = faults_per_call("0")
    assert faults_default > 0.5 * pages, f"SOFTPROMPT_RETAIN_MEMORY=0: {faults_default} faults per call"
