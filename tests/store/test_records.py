"""Request records and ids (shardon.store.records): the leaf every other module may import."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

from shardon.store import RequestIds, RequestRecord, format_request_id, parse_request_id, records, request_id_floor

BASE = 1_700_000_000.0


def test_record_defaults() -> None:
    a, b = RequestRecord(), RequestRecord()
    assert type(a.id) is int and b.id > a.id  # ids only increase
    assert len(format_request_id(a.id)) == 16
    assert request_id_floor(a.received_at - 1) <= a.id <= request_id_floor(a.received_at + 1)
    assert abs(a.received_at - time.time()) < 5
    assert a.status == 0 and a.stream is False and a.finished_at is None


def test_ids_only_increase_even_when_the_clock_goes_back() -> None:
    ids = RequestIds()
    a = ids.next(BASE)
    b = ids.next(BASE - 10)  # the clock stepped back
    c = ids.next(BASE)
    assert a == request_id_floor(BASE) and a < b < c
    ids.seed(c + 100)
    assert ids.next(BASE) == c + 101
    ids.seed(5)  # never backwards
    assert ids.next(BASE) == c + 102


def test_request_id_text_round_trip() -> None:
    i = request_id_floor(BASE) + 7
    text = format_request_id(i)
    assert len(text) == 16 and text == text.lower() and parse_request_id(text) == i
    assert parse_request_id(text.upper()) == i
    for bad in ("", "0x" + text[2:], text + "0", "g" * 16):
        with pytest.raises(ValueError):
            parse_request_id(bad)


def test_records_imports_nothing_above_the_primitives() -> None:
    """A leaf above ``shardon._fast`` (the id sequence is a primitive there): the request path and the
    compiled code may import it without the log's machinery."""
    tree = ast.parse(Path(records.__file__).read_text())
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ]
    above = [
        m for m in imported if m is None or m.startswith(".") or (m.startswith("shardon") and m != "shardon._fast.ids")
    ]
    assert imported and not above, above
