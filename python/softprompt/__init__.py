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

# Our OpenMP threads keep libgomp's default wait policy (a short spin after each parallel region,
# then sleep): with every GEMM of a step on these threads, it measured 6-10% faster than passive.
from . import ops, reference  # noqa: E402, F401
from .adapters import PrefixProjection, PrefixTuning, PromptTuning  # noqa: E402
from .generate import generate  # noqa: E402
from .models import load_model  # noqa: E402
from .ops import (  # noqa: E402
    get_adaptive_threads,
    get_num_threads,
    has_openmp,
    set_adaptive_threads,
    set_num_threads,
)

__version__ = "0.1.0"
__all__ = [
    "ops",
    "reference",
    "load_model",
    "PromptTuning",
    "PrefixTuning",
    "PrefixProjection",
    "generate",
    "set_num_threads",
    "get_num_threads",
    "set_adaptive_threads",
    "get_adaptive_threads",
    "has_openmp",
    "__version__",
]
