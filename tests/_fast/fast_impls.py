"""Both implementations of the ``shardon._fast`` primitives, for the tests (imported by conftest).

The compiled modules and the pure-Python twins are imported directly, not through the selector.
The compiled row writer is loaded on its own: besides being built, it needs the SQLite shared
library that the ``sqlite3`` module uses, so it can be missing while the other three load
(``C.RowWriter`` is then None and ``ROWWRITER_NOT_LOADED`` says why).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any, Protocol

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if importlib.util.find_spec("shardon") is None:  # running from a checkout that isn't installed
    sys.path.insert(0, ROOT)

with warnings.catch_warnings():
    # The selector warns when the compiled modules are missing; that case is what
    # test_compiled_extensions_loaded reports, so importing the package here must not fail on it.
    warnings.simplefilter("ignore", RuntimeWarning)
    import shardon._fast  # noqa: F401

from shardon._fast import _balancer_py, _bucket_py, _queue_py, _rowwriter_py  # noqa: E402

NOT_BUILT = "compiled shardon._fast extensions not built (run: pip install --no-deps -e .)"


def load_compiled() -> tuple[ModuleType, ModuleType, ModuleType] | None:
    try:
        return (
            importlib.import_module("shardon._fast._queue_c"),
            importlib.import_module("shardon._fast._bucket_c"),
            importlib.import_module("shardon._fast._balancer_c"),
        )
    except ImportError:
        return None


def load_rowwriter() -> tuple[ModuleType | None, str]:
    """(``shardon._fast._rowwriter_c``, "") or (None, why it could not be imported)."""
    try:
        return importlib.import_module("shardon._fast._rowwriter_c"), ""
    except ImportError as exc:
        return None, f"compiled RowWriter (shardon._fast._rowwriter_c) unavailable: {exc}"


class RowWriterLike(Protocol):
    """The API both RowWriter implementations share (what the tests use)."""

    @property
    def path(self) -> str: ...
    @property
    def written(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def insert(self, records: list[Any]) -> int: ...
    def close(self) -> None: ...


RowWriterClass = Callable[..., RowWriterLike]

COMPILED = load_compiled()
ROWWRITER_C, ROWWRITER_NOT_LOADED = load_rowwriter()
PY = SimpleNamespace(
    name="py",
    FairQueue=_queue_py.FairQueue,
    TokenBucket=_bucket_py.TokenBucket,
    LeastConnBalancer=_balancer_py.LeastConnBalancer,
    RowWriter=_rowwriter_py.RowWriter,
)
C = (
    None
    if COMPILED is None
    else SimpleNamespace(
        name="c",
        FairQueue=COMPILED[0].FairQueue,
        TokenBucket=COMPILED[1].TokenBucket,
        LeastConnBalancer=COMPILED[2].LeastConnBalancer,
        RowWriter=None if ROWWRITER_C is None else ROWWRITER_C.RowWriter,
    )
)
