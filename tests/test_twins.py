"""The Python twins serve the whole gateway too: the implementation dimension of the end-to-end tests.

Every twin pair is tested against both implementations in-process (tests/_fast, tests/httpd,
tests/upstream, tests/test_scheduler.py). This runs the end-to-end tests once more in a subprocess
with ``SHARDON_NO_EXTENSIONS=1``, on every request path (the native engine's callbacks, its
coroutine, granian: each uses twins) and to its end, so the Python exchange, scheduler, node
registry, connections, SSE readers, queue, bucket, balancer, tallies and row writer are proven where
they matter: behind real sockets, with the official client, through every outcome.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORCED = os.environ.get("SHARDON_NO_EXTENSIONS", "").strip().lower() in ("1", "true", "yes")
# The end-to-end tests run again on the twins.
TWIN_RUN = (
    "tests/gateway",
    "tests/routing",
    "tests/fleet",
    "tests/store/test_access.py",
    "tests/deploy/test_trusted_proxies.py",
    "tests/lifecycle/test_load_failures.py",
    "tests/test_serve.py",
)


@pytest.mark.timeout(900)
def test_gateway_suite_passes_on_the_python_twins() -> None:
    if FORCED:
        pytest.skip("this whole run is on the twins already")
    env = dict(os.environ, SHARDON_NO_EXTENSIONS="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rfE",
            *TWIN_RUN,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=880,
    )
    summary = (
        result.stdout[result.stdout.rfind("short test summary") :] if "short test summary" in result.stdout else ""
    )
    tail = (summary or result.stdout[-6000:]) + result.stderr[-2000:]
    assert result.returncode == 0, tail
    assert " passed" in result.stdout and "failed" not in result.stdout, tail


@pytest.mark.parametrize(
    "selector",
    [
        "shardon.exchange",
        "shardon.scheduler",
        "shardon.nodes",
        "shardon.httpd.connection",
        "shardon.upstream.connection",
    ],
)
def test_compiled_request_path_loaded(selector: str) -> None:
    """The request path's modules are the compiled ones (fails when they were not built)."""
    module = importlib.import_module(selector)
    assert module.COMPILED is not FORCED, f"{selector}'s compiled twin not built (pip install --no-deps -e .)"
    if selector == "shardon.httpd.connection":
        from shardon.httpd import NativeServer

        assert NativeServer(object(), "127.0.0.1", 0).connection_class is module.HTTPConnection  # type: ignore[arg-type]


def test_compiled_sse_readers_loaded() -> None:
    import shardon._fast.sse as sse
    from shardon.receipts import OutputHasher
    from shardon.schemas import UsageStripper

    assert sse.SSE_COMPILED is not FORCED, "shardon._fast._sse_c not built (pip install --no-deps -e .)"
    expected = "shardon._fast._sse_py" if FORCED else "shardon._fast._sse_c"
    assert OutputHasher.__module__ == expected
    assert UsageStripper.__module__ == expected
