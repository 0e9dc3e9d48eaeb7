"""Admission and dispatch, the step every request takes: `_scheduler_c` (compiled from
``_scheduler_py.py``, typed by ``_scheduler_c.pxd``) or ``_scheduler_py.py`` itself, which says
what it does. ``COMPILED`` tells which; ``SHARDON_NO_EXTENSIONS`` forces the Python one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._fast import load_twin

__all__ = ["COMPILED", "Route", "Scheduler", "Waiter"]

if TYPE_CHECKING:
    from ._scheduler_py import Route, Scheduler, Waiter

    COMPILED: bool
else:
    _impl, COMPILED = load_twin("shardon._scheduler", "scheduler")
    Route = _impl.Route
    Scheduler = _impl.Scheduler
    Waiter = _impl.Waiter
