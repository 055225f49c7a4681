"""The service's heap: frame-sized buffers stay in it between frames instead of being mapped anew."""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# A worker's frame is 0.3 MB at 1080p, 1.2 MB at 4K, and passes through a few buffers on its way to
# the port (the socket read, the parser, the message). Above glibc's default threshold (128 KiB,
# rising only after a free) each is a fresh mmap whose pages all fault on first touch: about 220
# faults, 0.6 ms of the service's main thread, per 1080p frame. Below these, buffers are reused.
MMAP_THRESHOLD = 8 * 1024 * 1024
# Free memory the heap keeps at its top instead of giving it back: a few frames' buffers.
TRIM_THRESHOLD = 16 * 1024 * 1024


def keep_frame_buffers() -> bool:
    """Tune glibc's malloc so frame-sized buffers are reused; False (logged) where there is no
    mallopt (another libc), which costs speed, not correctness."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.debug("no mallopt in this libc: frame buffers are mapped per frame")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and \
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.debug("mallopt refused the frame buffer thresholds")
    return ok


def give_back() -> None:
    """Return the heap's free pages to the system (glibc's malloc_trim): after a worker's frames
    are dropped, their memory is free in the heap but still counted as the service's, since the
    heap keeps what lies below other allocations; nothing where there is no malloc_trim."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    trim(0)
