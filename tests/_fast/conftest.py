"""Fixtures for the ``shardon._fast`` tests: every behaviour runs against both implementations.

The ``impl`` fixture follows the ``implementation`` one (tests/conftest.py): the compiled modules
(``c``) or their pure-Python twins (``py``), imported directly, not through the selector. The ``c``
case is skipped, with the reason, only when the extensions have not been built;
``test_compiled_extensions_loaded`` is the one test that fails in that case (unless
``SHARDON_NO_EXTENSIONS`` is set). ``row_writer`` and ``row_writers`` do the same for the request
log's RowWriter, which is loaded on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from tests._fast.fast_impls import NOT_BUILT, PY, ROWWRITER_NOT_LOADED, C, RowWriterClass, RowWriterLike


@pytest.fixture
def impl(implementation: str) -> SimpleNamespace:
    """Namespace with FairQueue, TokenBucket, LeastConnBalancer and RowWriter of one implementation.

    ``RowWriter`` is None in the compiled namespace when only that module failed to load: use the
    ``row_writer`` fixture for it.
    """
    if implementation == "py":
        return PY
    if C is None:
        pytest.skip(NOT_BUILT)
    return C


@pytest.fixture
def both() -> tuple[SimpleNamespace, SimpleNamespace]:
    """(compiled, python), for tests that compare the two."""
    if C is None:
        pytest.skip(NOT_BUILT)
    return C, PY


def _compiled_row_writer() -> RowWriterClass:
    if C is None:
        pytest.skip(NOT_BUILT)
    if C.RowWriter is None:
        pytest.skip(ROWWRITER_NOT_LOADED)
    writer: RowWriterClass = C.RowWriter
    return writer


@pytest.fixture
def row_writer(implementation: str) -> RowWriterClass:
    """The RowWriter class of one implementation (the compiled one skipped, with why, if unavailable)."""
    if implementation == "py":
        writer: RowWriterClass = PY.RowWriter
        return writer
    return _compiled_row_writer()


@pytest.fixture
def row_writers() -> tuple[RowWriterClass, RowWriterClass]:
    """(compiled, python) RowWriter classes, for tests that compare the two."""
    compiled = _compiled_row_writer()
    python: RowWriterClass = PY.RowWriter
    return compiled, python


@pytest.fixture
def open_writer() -> Iterator[Callable[..., RowWriterLike]]:
    """``open_writer(cls, *args, **kwargs)``: a RowWriter that is closed when the test ends."""
    opened: list[RowWriterLike] = []

    def factory(cls: RowWriterClass, *args: Any, **kwargs: Any) -> RowWriterLike:
        writer = cls(*args, **kwargs)
        opened.append(writer)
        return writer

    yield factory
    for writer in opened:
        writer.close()
