"""The metrics" per-request tallies (`_tally_c` compiled, or the `_tally_py` reference).

Selected like every twin pair (`shardon._fast.load_twin`: ``SHARDON_NO_EXTENSIONS``, one
RuntimeWarning if the compiled module cannot be imported); ``TALLY_COMPILED`` tells which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import load_twin

__all__ = ["OTHER", "TALLY_COMPILED", "Histogram", "ModelSeries", "RequestTally"]

if TYPE_CHECKING:
    from ._tally_py import OTHER, Histogram, ModelSeries, RequestTally

    TALLY_COMPILED: bool
else:
    _impl, TALLY_COMPILED = load_twin("shardon._fast._tally", "metrics tallies")
    OTHER = _impl.OTHER
    Histogram = _impl.Histogram
    ModelSeries = _impl.ModelSeries
    RequestTally = _impl.RequestTally
