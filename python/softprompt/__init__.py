"""softprompt: prompt tuning and prefix tuning of frozen transformers on the CPU.

The hot ops (prefix attention, prompt prepend, forward and backward) run in a C++ core
(Eigen + OpenMP); ``softprompt.ops`` is their NumPy-facing API and ``softprompt.reference``
their pure-NumPy twin.
"""

from __future__ import annotations

import operator as _operator

from . import ops, reference
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
