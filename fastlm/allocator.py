"""Keep freed memory in the process, so that a CPU training step stops paying for page faults.

A CPU step allocates and frees ~200 MB of tensors (logits, their gradient, the LSTM workspace, the
weight gradients). glibc's malloc serves blocks that large with fresh `mmap` pages and gives them
back to the kernel on `free`, so every step touches brand-new pages: 25,000-33,000 minor page
faults per default step on the 2-core machine (getrusage), each a trap plus the kernel zeroing
4 KiB.

With `mmap` off and heap trimming out of reach, a freed block stays in malloc's heap and the next
step's tensors of the same sizes reuse it once the heap has settled (a few steps): ~200 faults per
step, and the classic training loop alone ran 1.05-1.19x faster (benchmarks/test_train_step.py).
The cost: the process keeps its peak footprint until it exits (887 MiB against a peak of 826 MiB
for the default model), which is what a training run does anyway.
"""
from __future__ import annotations

import ctypes
import platform

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: return memory only when 2 GiB lie free at the top

_retained = False


def retain_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks for reuse (process-wide). False where not glibc."""
    global _retained
    if _retained:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success.
    _retained = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, _NEVER_TRIM) == 1
    return _retained


def is_retaining_freed_memory() -> bool:
    """Whether `retain_freed_memory` has taken effect in this process."""
    return _retained
