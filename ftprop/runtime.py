"""Process settings the `ftprop` commands make before they train or time anything: glibc's allocator.

CPU tensors come from malloc, and glibc returns large freed blocks to the kernel (munmap, heap trimming) and faults
them in again on the next allocation, so with its defaults a training step's time depends on how much memory the step
allocates and on the process's history, not only on what it computes. Measured on the residual CNN (docs/ALGORITHM.md,
"What local means for a residual block"): FTP / BP step time 1.14-1.45 from one process to the next with glibc's
defaults, 1.07-1.20 with freed memory kept, at equal arithmetic. The library itself changes nothing on import; the
command line calls `keep_freed_memory` once, and every rule then runs under the same setting.
"""
from __future__ import annotations

import ctypes
import os
import platform

# glibc's malloc settings for this process, as `keep_freed_memory` left them (named in `report.machine()`)
MALLOC = "default"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20  # the largest M_MMAP_THRESHOLD glibc accepts on 64-bit systems


def keep_freed_memory() -> bool:
    """glibc only: freed blocks of up to 32 MiB stay in the process for the next step, and the heap is not trimmed
    below 1 GiB. The environment variable FTPROP_MALLOC=default leaves glibc's settings alone. Returns whether the
    settings were changed."""
    global MALLOC
    if os.environ.get("FTPROP_MALLOC", "") == "default" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    kept = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    if kept:
        MALLOC = "freed memory kept (ftprop.runtime)"
    return kept
