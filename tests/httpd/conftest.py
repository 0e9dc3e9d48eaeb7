"""Fixtures for the native engine's tests: every behaviour runs against both implementations of the
client connection (``shardon.httpd._connection_c`` and its twin ``_connection_py``, imported
directly, not through the selector). The compiled case is skipped, with the reason, only when it
cannot be imported; ``test_compiled_connection_selected`` is the test that fails then (unless
``SHARDON_NO_EXTENSIONS`` asks for the twin).
"""

from __future__ import annotations

from types import ModuleType

import pytest

from tests.support import twin


@pytest.fixture
def wire(implementation: str) -> ModuleType:
    """One implementation of the client connection: ``wire.HTTPConnection`` is the server's class."""
    return twin("shardon.httpd._connection", implementation)
