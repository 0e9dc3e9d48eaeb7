"""Fixtures for the native engine's tests: every behaviour runs against both wire implementations.

The ``wire`` fixture is parametrised over the compiled module ``shardon._fast._wire_c`` (``c``) and
its pure-Python twin ``shardon._fast._wire_py`` (``py``), imported directly, not through the
selector (``shardon._fast.wire``), like the ``impl`` fixture of tests/_fast. The ``c`` case is
skipped, with the reason, only when the compiled module cannot be imported; it still runs when
``SHARDON_NO_EXTENSIONS`` is set, since that variable chooses what the gateway uses, not what the
two implementations must do. ``test_compiled_wire_selected`` is the one test that fails when the
compiled module is missing (unless ``SHARDON_NO_EXTENSIONS`` asks for the twin).
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import pytest

with warnings.catch_warnings():
    # The selector warns when the compiled module is missing; test_compiled_wire_selected reports
    # that case, so importing the engine here must not fail on it.
    warnings.simplefilter("ignore", RuntimeWarning)
    import shardon.httpd  # noqa: F401

from shardon._fast import _wire_py

WIRE_NOT_BUILT = "compiled wire module shardon._fast._wire_c unavailable (run: pip install --no-deps -e .)"


def load_wire_c() -> tuple[ModuleType | None, str]:
    """(``shardon._fast._wire_c``, "") or (None, why it could not be imported)."""
    try:
        return importlib.import_module("shardon._fast._wire_c"), ""
    except ImportError as exc:
        return None, f"{WIRE_NOT_BUILT}: {exc}"


@pytest.fixture(params=["c", "py"])
def wire(request: pytest.FixtureRequest) -> ModuleType:
    """One implementation of the wire objects: ``wire.HTTPConnection`` is the server's connection class."""
    if request.param == "py":
        return _wire_py
    module, why = load_wire_c()
    if module is None:
        pytest.skip(why)
    return module
