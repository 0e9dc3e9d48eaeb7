"""OS-level thread names, so ``top -H``, ``ps -L`` and ``/proc/<pid>/task/*/comm`` tell threads apart.

CPython before 3.14 names only the ``threading.Thread`` object, not the kernel thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["name_this_thread"]

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
