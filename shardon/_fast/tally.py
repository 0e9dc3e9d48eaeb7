"""The metrics' per-request tallies (`_tally_c` compiled, or the `_tally_py` reference).

Selected like the rest of ``shardon._fast`` (``SHARDON_NO_EXTENSIONS``, one RuntimeWarning if the
compiled module cannot be imported); ``TALLY_COMPILED`` tells which.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from . import _NO_EXTENSIONS

__all__ = ["OTHER", "TALLY_COMPILED", "Histogram", "ModelSeries", "RequestTally"]

TALLY_COMPILED: bool

if TYPE_CHECKING or _NO_EXTENSIONS:
    from ._tally_py import OTHER, Histogram, ModelSeries, RequestTally

    TALLY_COMPILED = False
else:
    try:
        from ._tally_c import OTHER, Histogram, ModelSeries, RequestTally

        TALLY_COMPILED = True
    except ImportError as exc:
        from ._tally_py import OTHER, Histogram, ModelSeries, RequestTally

        TALLY_COMPILED = False
        warnings.warn(
            f"shardon: compiled metrics tallies unavailable ({exc}), using their pure-Python twins",
            RuntimeWarning,
            stacklevel=2,
        )
