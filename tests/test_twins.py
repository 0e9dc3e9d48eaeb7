"""The pure-Python twins serve the whole gateway too.

Every ``shardon._fast`` primitive is tested against both implementations in-process (tests/_fast,
tests/httpd, tests/upstream). This runs the end-to-end suite once more in a subprocess with
``SHARDON_NO_EXTENSIONS=1``, so the twins of the wire objects and of the callback path are proven
where they matter: behind real sockets, with the official client, through every outcome.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORCED = os.environ.get("SHARDON_NO_EXTENSIONS", "").strip().lower() in ("1", "true", "yes")


@pytest.mark.timeout(600)
def test_gateway_suite_passes_on_the_python_twins() -> None:
    if FORCED:
        pytest.skip("this whole run is on the twins already")
    # The native engine only: granian's run exercises no twin (it has no callback path).
    env = dict(os.environ, SHARDON_NO_EXTENSIONS="1", SHARDON_TEST_ENGINES="native")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "tests/gateway",
            "tests/store/test_access.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=580,
    )
    tail = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    assert " passed" in result.stdout and "failed" not in result.stdout, tail


def test_compiled_wire_and_sse_modules_loaded() -> None:
    """The hot-path modules are the compiled ones (fails when they were not built)."""
    import shardon._fast.sse as sse
    import shardon._fast.wire as wire

    if FORCED:
        assert not wire.WIRE_COMPILED and not sse.SSE_COMPILED
        return
    assert wire.WIRE_COMPILED, "shardon._fast._wire_c not built (pip install --no-deps -e .)"
    assert sse.SSE_COMPILED, "shardon._fast._sse_c not built (pip install --no-deps -e .)"
    from shardon.receipts import OutputHasher
    from shardon.schemas import UsageStripper

    assert OutputHasher.__module__ == "shardon._fast._sse_c"
    assert UsageStripper.__module__ == "shardon._fast._sse_c"
