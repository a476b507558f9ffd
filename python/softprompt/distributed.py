"""Data-parallel training over MPI (through mpi4py), and its one-process stand-in.

`world()` returns the communicator the training driver uses. Under `mpirun`/`mpiexec` (detected
from the launcher's environment) with more than one process it is `MPIWorld`, which imports mpi4py;
otherwise `SingleProcess`, and nothing MPI-related is imported. Only these operations are used:

- `allreduce_sum(buf)`: float64 vector, summed over ranks (once per optimizer step: the adapter's
  gradient, the loss and the counts packed into one buffer; prompt tuning's shared prompt rows add
  1 + num_layers small ones per micro-batch inside the model's backward). It waits with a deadline: when a rank
  died or hangs, the ranks still waiting print a message and abort the job, never a silent hang.
- `bcast(obj)`: rank 0's Python object to every rank (a resumed checkpoint's state), with the same
  deadline as allreduce_sum, as every collective here.
- `agree(error)`: every rank's setup outcome; if any rank failed (a data file it cannot read, a
  model it cannot load), every rank raises with all the failures listed.
- `abort(code)`: ends every rank's process.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

# Environment variables by which launchers announce the job's size: Open MPI, MPICH/Hydra (and
# Intel MPI), MVAPICH. SOFTPROMPT_MPI=1 forces MPI for a launcher not listed here.
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
DEFAULT_TIMEOUT = 600.0  # seconds a collective may wait for the other ranks (SOFTPROMPT_MPI_TIMEOUT)


class DistributedError(RuntimeError):
    """A failure on some rank, reported on every rank."""


class SingleProcess:
    rank, size = 0, 1

    def allreduce_sum(self, buf):
        return buf

    def bcast(self, obj):
        return obj

    def gather_text(self, text):
        return [text]

    def agree(self, error=None):
        if error is not None:
            raise error

    def abort(self, code=1):
        raise SystemExit(code)


class MPIWorld:
    def __init__(self, timeout=None):
        try:
            from mpi4py import MPI
        except ImportError:
            raise ImportError(
                "softprompt was started by an MPI launcher with several processes, but mpi4py is not "
                "installed: pip install 'softprompt[mpi]' (and an MPI runtime, see README)") from None
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = float(os.environ.get("SOFTPROMPT_MPI_TIMEOUT", DEFAULT_TIMEOUT)) if timeout is None else timeout

    def _wait(self, request, what):
        """Polls a non-blocking collective until it completes or the deadline passes."""
        deadline = time.monotonic() + self.timeout
        pause = 1e-5
        while not request.Test():
            if time.monotonic() > deadline:
                sys.stderr.write(f"softprompt: rank {self.rank}: {what} got no answer from the other ranks in "
                                 f"{self.timeout:.0f} s (a rank died or hangs); ending the job\n")
                sys.stderr.flush()
                time.sleep(1.0)  # the launcher forwards output asynchronously: let it pass before the abort
                self.abort(1)
            time.sleep(pause)
            pause = min(pause * 2, 2e-4)

    def allreduce_sum(self, buf):
        buf = np.ascontiguousarray(buf, dtype=np.float64)
        out = np.empty_like(buf)
        self._wait(self.comm.Iallreduce(buf, out, op=self.MPI.SUM), "allreduce")
        return out

    def bcast(self, obj):
        """Rank 0's (picklable) object on every rank: its length, then its bytes, each a non-blocking
        broadcast polled against the deadline."""
        import pickle

        data = np.frombuffer(pickle.dumps(obj), dtype=np.uint8) if self.rank == 0 else None
        size = np.array([0 if data is None else data.size], dtype=np.int64)
        self._wait(self.comm.Ibcast(size, root=0), "bcast")
        buf = data.copy() if self.rank == 0 else np.empty(int(size[0]), dtype=np.uint8)
        self._wait(self.comm.Ibcast(buf, root=0), "bcast")
        return obj if self.rank == 0 else pickle.loads(buf.tobytes())

    def gather_text(self, text):
        """Every rank's string (or None) on every rank, through two sums with the deadline: the
        lengths (each rank its slot), then the bytes (each rank its segment, zeros elsewhere)."""
        mine = b"" if text is None else text.encode()
        lengths = np.zeros(self.size)
        lengths[self.rank] = len(mine) + (text is not None)  # 0: None; 1 + n: n bytes
        lengths = self.allreduce_sum(lengths).astype(np.int64)
        sizes = np.maximum(lengths - 1, 0)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        buf = np.zeros(int(starts[-1]))
        buf[starts[self.rank]:starts[self.rank] + len(mine)] = np.frombuffer(mine, dtype=np.uint8)
        buf = self.allreduce_sum(buf).astype(np.uint8)
        return [None if lengths[r] == 0 else buf[starts[r]:starts[r + 1]].tobytes().decode() for r in range(self.size)]

    def agree(self, error=None):
        """Raises on every rank if any rank had an error (each rank passes its own or None)."""
        flags = self.allreduce_sum(np.array([0.0 if error is None else 1.0]))
        if flags[0] == 0:
            return
        messages = self.gather_text(None if error is None else f"{type(error).__name__}: {error}")
        if self.rank == 0:
            failed = "\n".join(f"  rank {r}: {m}" for r, m in enumerate(messages) if m is not None)
            raise DistributedError(f"{int(flags[0])} of {self.size} ranks failed:\n{failed}")
        raise DistributedError(f"rank {self.rank}: stopping, another rank failed (rank 0 reports it)")

    def abort(self, code=1):
        self.comm.Abort(code)


def launched_rank():
    """This process's rank as the MPI launcher announced it (0 when none did)."""
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK"):
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 0


def launched_size():
    """The process count an MPI launcher announced in the environment (1 when none did)."""
    for var in _SIZE_VARS:
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 1


def world():
    """MPIWorld under an MPI launcher with 2+ processes (or SOFTPROMPT_MPI=1), else SingleProcess."""
    if launched_size() > 1 or os.environ.get("SOFTPROMPT_MPI") == "1":
        w = MPIWorld()
        if w.size > 1:
            return w
    return SingleProcess()


def shard(items, rank, size):
    """This rank's contiguous part of a global batch: sizes differ by at most one; a rank may get
    none when the batch is smaller than the world."""
    n = len(items)
    return items[rank * n // size:(rank + 1) * n // size]
