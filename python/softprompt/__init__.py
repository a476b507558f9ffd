"""softprompt: prompt tuning and prefix tuning of frozen transformers on the CPU.

The hot ops (prefix attention, prompt prepend, forward and backward) run in a C++ core
(Eigen + OpenMP); ``softprompt.ops`` is their NumPy-facing API and ``softprompt.reference``
their pure-NumPy twin.
"""

from __future__ import annotations

import os as _os

# NumPy's OpenBLAS keeps its worker threads spinning for ~2^28 cycles after every threaded call; on a
# laptop's few cores they then starve our OpenMP threads (attention ran 8x slower inside the model).
# Sleeping after 2^4 cycles costs the GEMMs nothing measurable. Takes effect when softprompt is
# imported before NumPy (always for the `softprompt` command); a user's own setting wins.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

# libgomp's own default for our threads: they spin briefly after each parallel region, then sleep.
# (Passive waiting was needed while a step alternated our kernels with NumPy's BLAS; the model's
# GEMMs now run on these same threads, and spinning is then 6-10% faster, measured.)
import operator as _operator  # noqa: E402

from . import _core, ops, reference  # noqa: E402, F401
from .adapters import PrefixTuning, PromptTuning
from .generate import generate
from .models import load_model
from ._core import get_num_threads as _get_num_threads
from ._core import has_openmp
from ._core import set_num_threads as _set_num_threads

__version__ = "0.1.0"
__all__ = [
    "ops",
    "reference",
    "load_model",
    "PromptTuning",
    "PrefixTuning",
    "generate",
    "set_num_threads",
    "get_num_threads",
    "has_openmp",
    "__version__",
]


def set_num_threads(n: int) -> None:
    """Threads used by the C++ kernels (default: OpenMP's, which honours OMP_NUM_THREADS).
    Process-wide; without OpenMP the kernels always run on one thread."""
    if isinstance(n, bool):
        raise TypeError("n: expected an int, got bool")
    try:
        n = _operator.index(n)
    except TypeError:
        raise TypeError(f"n: expected an int, got {type(n).__name__}") from None
    if n < 1:
        raise ValueError(f"n: expected a thread count >= 1, got {n}")
    _set_num_threads(n)


def get_num_threads() -> int:
    """Threads the C++ kernels use."""
    return _get_num_threads()
