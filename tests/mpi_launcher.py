"""Test-only launcher of the `softprompt` command for runs under mpiexec that must fail on purpose.

    python tests/mpi_launcher.py --kill RANK:STEP train ...

runs `softprompt train ...` where rank RANK kills itself with SIGKILL right after optimizer step
STEP (through train()'s on_step callback), as a crashed machine would."""

from __future__ import annotations

import os
import signal
import sys

from softprompt import cli
from softprompt.distributed import launched_rank


def main(argv):
    if len(argv) < 2 or argv[0] != "--kill":
        sys.exit("usage: mpi_launcher.py --kill RANK:STEP COMMAND ...")
    rank, step = (int(n) for n in argv[1].split(":"))

    def kill(run):
        if launched_rank() == rank and run.state["step"] == step:
            os.kill(os.getpid(), signal.SIGKILL)

    train = cli.train
    cli.train = lambda cfg, **kw: train(cfg, on_step=kill, **kw)
    return cli.main(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
