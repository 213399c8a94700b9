"""Keep large freed blocks in the process's heap (glibc's ``mallopt``; elsewhere a no-op).

glibc maps every block over 32 MB afresh and unmaps it on free, and returns the top of the heap
to the kernel whenever it frees. A process that allocates the same large arrays over and over
then faults every page of them in again, page by page, with the kernel zeroing each one:

- an r18 forward pass at 112 px: each layer's activations of a 64-image batch are tens of MB.
  On the CPU, about 770k page faults per 80 images (3 GB zeroed); with freed blocks kept, ~1k
  once the heap has grown, and the forward passes ran 1.4-1.5x faster (2 threads, batches of
  16 and 64; ``docs/benchmarks.md``);
- the whole-IJB-C evaluation: each test's 277 MB score grid, 63 MB of pair scores and the ROC's
  copies. 676k faults and 1.7 s of system time; kept, 247k faults, and the evaluation ran
  4.35 s against 5.34 s (peak RSS 3.39 GB against 3.29 GB).

The price is that freed memory stays with the process (its peak) instead of going back to the
kernel, which is what a process that repeats the same work wants. ``unibct-ray eval`` sets it
for itself, and every inference actor when it builds its models (``unibct_ray.inference``).
Set ``MALLOC_MMAP_THRESHOLD_`` in the environment to keep glibc's own choice.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["keep_freed_memory"]

#: glibc's ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Serve blocks up to 1 GB from the heap and never trim it. Returns True when set (glibc,
    and no ``MALLOC_MMAP_THRESHOLD_`` in the environment)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        # The symbols this process already has (libc among them): no library search, which
        # runs ldconfig in a subprocess.
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    except OSError:
        return False
    if mallopt is None:  # not glibc (musl, macOS): nothing to tune
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    ok &= mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
    return bool(ok)
