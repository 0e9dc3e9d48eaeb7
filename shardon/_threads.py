"""Shardon's own threads: OS-level names, so ``top -H``, ``ps -L`` and ``/proc/<pid>/task/*/comm``
tell them apart (CPython before 3.14 names only the ``threading.Thread`` object, not the kernel
thread), and the writers whose threads are stopped at interpreter exit if still open.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import sys
import weakref
from typing import Protocol

__all__ = ["close_at_exit", "name_this_thread", "open_writers"]

_PR_SET_NAME = 15
_libc: ctypes.CDLL | None = None


def name_this_thread(name: str) -> bool:
    """Give the calling thread ``name`` (cut to the kernel's 15 bytes). True if the OS took it."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class _Closable(Protocol):
    def close(self, timeout: float = ...) -> object: ...


open_writers: weakref.WeakSet[_Closable] = weakref.WeakSet()
"""Writers (the request log, the access log) open now: added when they start their threads,
discarded when closed; those still open at interpreter exit are closed then."""


@atexit.register
def close_at_exit() -> None:  # pragma: no cover - runs at interpreter exit
    for writer in list(open_writers):
        with contextlib.suppress(Exception):
            writer.close(timeout=5.0)
