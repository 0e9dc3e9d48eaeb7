"""Request ids (`_ids_c` compiled, or the `_ids_py` reference): see ``_ids_py.py``.

Selected like every twin pair (`shardon._fast.load_twin`); ``IDS_COMPILED`` tells which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import load_twin

__all__ = ["IDS_COMPILED", "RequestIds"]

if TYPE_CHECKING:
    from ._ids_py import RequestIds

    IDS_COMPILED: bool
else:
    _impl, IDS_COMPILED = load_twin("shardon._fast._ids", "request ids")
    RequestIds = _impl.RequestIds
