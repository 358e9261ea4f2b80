"""glibc malloc tuning for forward-heavy processes (never on import).

By default glibc hands freed multi-MB scratch buffers back to the kernel after every forward pass and
maps them again on the next one, costing thousands of page faults per forward (measured on the
project's 2-core machine: about half the forward speed of LeNet/WRN in NCHW; benchmarks/README.md).
Raising the trim threshold (keep freed memory) and the mmap threshold (serve big buffers from the
heap, which can be reused) removes that. Both must be set: either alone does not help.

When it happens: the ``baffle`` CLI calls ``tune_malloc()`` at start-up. In the Python API, the first
call that runs many forward passes — ``baffle.compute_loss_diffs`` (whatever its engine; so also
``baffle.estimate_gradient`` and the round functions of ``baffle.rounds``) and
``baffle.fast.choose_memory_format`` — calls ``auto_tune_malloc()``, which runs ``tune_malloc()``
once per process. The settings are process-wide
and stay for the life of the process (the freed heap it keeps, at most ``TRIM_THRESHOLD`` bytes, is
not returned to the kernel).

Opting out: set the environment variable ``BAFFLE_TUNE_MALLOC=0`` (also "false", "no", "off"). It is
read when the first such call happens, not at import, so it can be set from Python before that call.
Settings applied earlier by an explicit ``tune_malloc(...)`` call are never overwritten.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 1 << 30   # keep up to 1 GiB of freed heap instead of returning it to the kernel
MMAP_THRESHOLD = 32 << 20  # glibc's maximum: buffers below 32 MiB come from the (reusable) heap

ENV_VAR = "BAFFLE_TUNE_MALLOC"
_OFF = ("0", "false", "no", "off")

_applied: dict[str, int] | None = None
_auto_decided = False  # auto_tune_malloc ran (tuned, opted out, or not applicable)


def tune_malloc(trim_threshold: int = TRIM_THRESHOLD, mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """Set glibc's M_TRIM_THRESHOLD and M_MMAP_THRESHOLD via ``mallopt``; True if both took effect.

    A no-op returning False on non-Linux systems or C libraries without ``mallopt`` (musl, macOS).
    The same effect without code: MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_MMAP_THRESHOLD_=33554432.
    """
    global _applied
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    if ok:
        _applied = {"trim_threshold": int(trim_threshold), "mmap_threshold": int(mmap_threshold)}
    return ok


def auto_tune_malloc() -> bool:
    """``tune_malloc()`` with the defaults on the first call in this process, unless the environment
    variable ``BAFFLE_TUNE_MALLOC`` is "0" (read now) or the allocator was already tuned; later calls
    do nothing. Returns whether tuned settings are in effect."""
    global _auto_decided
    if not _auto_decided and _applied is None:
        _auto_decided = True
        if os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF:
            tune_malloc()
    return _applied is not None


def malloc_settings() -> dict[str, int] | None:
    """The settings applied by ``tune_malloc`` in this process, or None (glibc defaults)."""
    return None if _applied is None else dict(_applied)


__all__ = ["ENV_VAR", "auto_tune_malloc", "malloc_settings", "tune_malloc"]
