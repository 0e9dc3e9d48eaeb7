"""A request's life, the one core both HTTP engines drive: `_exchange_c` (compiled from
``_exchange_py.py``, typed by ``_exchange_c.pxd``) or ``_exchange_py.py`` itself, which says what
it does. ``COMPILED`` tells which; ``SHARDON_NO_EXTENSIONS`` forces the Python one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._fast import load_twin

__all__ = ["ANSWER", "COMPILED", "DATA", "END", "RETRY", "START", "START_END", "WAIT", "Exchange", "RequestCore"]

if TYPE_CHECKING:
    from ._exchange_py import ANSWER, DATA, END, RETRY, START, START_END, WAIT, Exchange, RequestCore

    COMPILED: bool
else:
    _impl, COMPILED = load_twin("shardon._exchange", "request exchange")
    ANSWER, DATA, END, RETRY = _impl.ANSWER, _impl.DATA, _impl.END, _impl.RETRY
    START, START_END, WAIT = _impl.START, _impl.START_END, _impl.WAIT
    Exchange = _impl.Exchange
    RequestCore = _impl.RequestCore
