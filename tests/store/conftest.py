"""Fixtures of the request log tests: a started log on a temporary file; the process's ids restored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shardon.store import RequestLog, records
from tests.store.store_helpers import open_log


@pytest.fixture
def rlog(tmp_path: Path) -> Iterator[RequestLog]:
    rl = open_log(tmp_path)
    rl.start()
    try:
        yield rl
    finally:
        rl.close()


@pytest.fixture(autouse=True)
def _request_ids_restored() -> Iterator[None]:
    """Some tests seed the process-wide request ids into the future: put them back after each."""
    last = records.request_ids.last
    yield
    records.request_ids.last = last
