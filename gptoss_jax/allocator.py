"""The process's C allocator set up for XLA on a CPU: memory freed by one step is reused by the next.

XLA's CPU runtime allocates each execution's buffers afresh. glibc serves an allocation above its mmap threshold
(at most 32 MiB by default), or any large one made by a thread other than the main one (each thread arena grows
only in 64 MiB heaps), straight from the kernel, and returns it on free — so every step page-faults its logits,
gradients and optimizer temporaries in again: 269 of the tiny demo's 563 ms per training step were kernel
time. With one arena, an mmap threshold of 1 GiB and a trim threshold of 1 GiB, the freed memory stays in the
process and the step takes 396 ms (benchmarks/RESULTS.md); allocations above 1 GiB (a 20b embedding, say) still
come from and go back to the kernel.

`gptoss-jax` calls `reuse_freed_memory()` first thing; a Python program that wants the same calls it before its
first jax computation (threads that already have an arena keep theirs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters (malloc.h)
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, 1 << 30))


@functools.cache
def reuse_freed_memory() -> bool:
    """Sets glibc's malloc up as above; False (and nothing changed) where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        gnu = libc.gnu_get_libc_version  # glibc only: musl and the BSD and macOS libcs have other allocators
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    gnu.restype = ctypes.c_char_p
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    applied = all(mallopt(parameter, value) == 1 for parameter, value in _SETTINGS)
    if not applied:
        log.warning("glibc %s refused the allocator settings %s; CPU steps page-fault their buffers afresh",
                    gnu().decode(), _SETTINGS)
    return applied
