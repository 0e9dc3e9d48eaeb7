"""Hot scheduling primitives: compiled (Cython) when available, pure-Python twins otherwise.

- :class:`FairQueue`: strict priority classes, weighted deficit round robin across tenants, FIFO per
  tenant.
- :class:`TokenBucket`: rate limiting with caller-supplied time.
- :class:`LeastConnBalancer`: least connections per weight among healthy nodes, round-robin ties.

Each lives in a ``_*_c.pyx`` module and a ``_*_py.py`` twin with the same API and behaviour. The
compiled classes are used unless the environment variable ``SHARDON_NO_EXTENSIONS`` is ``1``, ``true``
or ``yes``; if they cannot be imported, the twins are used and a :class:`RuntimeWarning` says so (once,
at import). ``USING_EXTENSIONS`` tells which set is in use.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

__all__ = ["USING_EXTENSIONS", "FairQueue", "LeastConnBalancer", "TokenBucket"]

_NO_EXTENSIONS = os.environ.get("SHARDON_NO_EXTENSIONS", "").strip().lower() in ("1", "true", "yes")

USING_EXTENSIONS: bool

if TYPE_CHECKING:
    from ._balancer_py import LeastConnBalancer
    from ._bucket_py import TokenBucket
    from ._queue_py import FairQueue
elif _NO_EXTENSIONS:
    from ._balancer_py import LeastConnBalancer
    from ._bucket_py import TokenBucket
    from ._queue_py import FairQueue

    USING_EXTENSIONS = False
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
