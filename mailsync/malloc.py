"""glibc's allocator, told to give large buffers back to the system (no Django here: the
fetch process, mailsync/sync/fetcher.py, calls it too).

glibc raises its mmap threshold to the size of each large buffer freed (up to 32 MB), so the
sources and attachments of large mails (tens of MB) come from the heap after the first, and
their memory stays with the process when freed: RSS crept up by ~100 MB per large mail parsed.
A fixed threshold keeps buffers of 1 MB or more mmapped, given back to the system when freed.
"""
from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3
LARGE_BUFFER = 1 << 20


def large_buffers_back_to_the_system() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, LARGE_BUFFER)
    except (OSError, AttributeError):  # not glibc (musl, say): its allocator does its own thing
        pass
