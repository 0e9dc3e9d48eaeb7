"""Hot scheduling primitives: compiled (Cython) when available, pure-Python twins otherwise.

- :class:`FairQueue`: strict priority classes, weighted fair queueing (start-time tags) across
  tenants, FIFO per tenant.
- :class:`TokenBucket`: rate limiting with caller-supplied time.
- :class:`LeastConnBalancer`: least connections per weight among healthy nodes, round-robin ties.
- :class:`RowWriter`: the request log's batch insert, on SQLite's C API with the GIL released.

Each lives in a ``_*_c.pyx`` module and a ``_*_py.py`` twin with the same API and behaviour. The
compiled classes are used unless the environment variable ``SHARDON_NO_EXTENSIONS`` is ``1``, ``true``
or ``yes``; if they cannot be imported, the twins are used and a :class:`RuntimeWarning` says so (once,
at import). ``USING_EXTENSIONS`` tells which set is in use.

Modules with their own selectors, same rules: ``shardon._fast.wire`` (the HTTP engine and upstream
connections), ``.sse`` (SSE readers), ``.tally`` (the metrics' per-request tallies), ``.rowqueue``
(the request log's in-memory row queue) and ``.accesslog`` (access lines from packed rows).

`RowWriter` is selected on its own (``ROWWRITER_COMPILED``): besides being built, its compiled form
needs the SQLite shared library that Python's ``sqlite3`` module uses, which some Python builds link
in statically; then the twin is used, with a warning saying why.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import TYPE_CHECKING

__all__ = [
    "ROWWRITER_COMPILED",
    "USING_EXTENSIONS",
    "FairQueue",
    "LeastConnBalancer",
    "RowWriter",
    "TokenBucket",
    "load_twin",
]

_NO_EXTENSIONS = os.environ.get("SHARDON_NO_EXTENSIONS", "").strip().lower() in ("1", "true", "yes")


def load_twin(stem: str, what: str) -> tuple[ModuleType, bool]:
    """The module ``<stem>_c`` (compiled) or, when ``SHARDON_NO_EXTENSIONS`` is set or it cannot be
    imported (then with one RuntimeWarning naming ``what``), its twin ``<stem>_py``; and whether it
    is the compiled one. The selector of a twin pair outside this package calls this."""
    if not _NO_EXTENSIONS:
        try:
            return importlib.import_module(stem + "_c"), True
        except ImportError as exc:
            message = f"shardon: compiled {what} unavailable ({exc}), using the pure-Python twin"
            warnings.warn(message, RuntimeWarning, stacklevel=3)
    return importlib.import_module(stem + "_py"), False


USING_EXTENSIONS: bool
ROWWRITER_COMPILED: bool

if TYPE_CHECKING:
    from ._balancer_py import LeastConnBalancer
    from ._bucket_py import TokenBucket
    from ._queue_py import FairQueue
    from ._rowwriter_py import RowWriter
elif _NO_EXTENSIONS:
    from ._balancer_py import LeastConnBalancer
    from ._bucket_py import TokenBucket
    from ._queue_py import FairQueue
    from ._rowwriter_py import RowWriter

    USING_EXTENSIONS = False
    ROWWRITER_COMPILED = False
else:
    try:
        from ._balancer_c import LeastConnBalancer
        from ._bucket_c import TokenBucket
        from ._queue_c import FairQueue

        USING_EXTENSIONS = True
    except ImportError:
        from ._balancer_py import LeastConnBalancer
        from ._bucket_py import TokenBucket
        from ._queue_py import FairQueue

        USING_EXTENSIONS = False
        warnings.warn(
            "shardon: compiled _fast extensions unavailable, using pure-Python twins",
            RuntimeWarning,
            stacklevel=2,
        )

    if USING_EXTENSIONS:
        try:
            from ._rowwriter_c import RowWriter

            ROWWRITER_COMPILED = True
        except ImportError as exc:
            from ._rowwriter_py import RowWriter

            ROWWRITER_COMPILED = False
            warnings.warn(
                f"shardon: compiled request-log writer unavailable ({exc}), using its pure-Python twin",
                RuntimeWarning,
                stacklevel=2,
            )
    else:
        from ._rowwriter_py import RowWriter

        ROWWRITER_COMPILED = False
