"""Fixtures for the ``shardon._fast`` tests: every behaviour runs against both implementations.

The ``impl`` fixture is parametrised over the compiled modules (``c``) and their pure-Python twins
(``py``), imported directly, not through the selector. The ``c`` case is skipped, with the reason,
only when the extensions have not been built; ``test_compiled_extensions_loaded`` is the one test
that fails in that case (unless ``SHARDON_NO_EXTENSIONS`` is set).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fast_impls import NOT_BUILT, PY, C


@pytest.fixture(params=["c", "py"])
def impl(request: pytest.FixtureRequest) -> SimpleNamespace:
    """Namespace with FairQueue, TokenBucket and LeastConnBalancer of one implementation."""
    if request.param == "py":
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
