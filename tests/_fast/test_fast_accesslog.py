"""Access-log lines from packed request rows, against both implementations (compiled and pure Python)."""

from __future__ import annotations

import json
import math
import os
import struct
from types import ModuleType
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardon.store import REQUEST_COLUMNS, RequestRecord, format_request_id
from tests.support import twin

FORCED = os.environ.get("SHARDON_NO_EXTENSIONS", "").strip().lower() in ("1", "true", "yes")
T0 = 1_765_000_000.25  # 2025-12-06T05:46:40.250Z
ID = 0x18C2F3A40B400001


@pytest.fixture
def mod(implementation: str) -> ModuleType:
    return twin("accesslog", implementation)


def batch(rows: list[Any]) -> tuple[bytes, bytes, int]:
    """Records (or anything msgpack can hold) packed as `RowQueue.take` hands them over."""
    packed = [r if type(r) is bytes else msgspec.msgpack.encode(r) for r in rows]
    return b"".join(packed), struct.pack(f"<{len(packed)}I", *map(len, packed)), len(packed)


def lines(mod: ModuleType, rows: list[Any], json_format: bool = False) -> list[str]:
    text, skipped = mod.AccessFormatter(REQUEST_COLUMNS, json_format).format(*batch(rows))
    assert skipped == 0
    return text.decode().splitlines()


def served(**kw: Any) -> RequestRecord:
    fields: dict[str, Any] = {
        "id": ID,
        "received_at": T0,
        "finished_at": T0 + 0.0123,
        "endpoint": "/v1/chat/completions",
        "tenant": "team-a",
        "model": "m1",
        "node_id": "n1",
        "status": 200,
        "bytes_in": 231,
        "bytes_out": 612,
        "client_addr": "127.0.0.1",
    }
    fields.update(kw)
    return RequestRecord(**fields)


def test_console_line_of_a_success(mod: ModuleType) -> None:
    assert lines(mod, [served()]) == [
        '2025-12-06T05:46:40.250Z 127.0.0.1 "POST /v1/chat/completions" 200 12.3ms model=m1 node=n1 '
        "tenant=team-a in=231 out=612 error=- id=18c2f3a40b400001"
    ]


def test_a_variant_and_an_overflow_are_marked(mod: ModuleType) -> None:
    """Only when set: the variant of a split, the overflow endpoint having served the request."""
    rows = [served(variant="chat-v2"), served(node_id="overflow:m1", overflow=True), served(variant='a "b"')]
    got = lines(mod, rows)
    assert got[0].endswith(" id=18c2f3a40b400001 variant=chat-v2")
    assert got[1].endswith(" node=overflow:m1 tenant=team-a in=231 out=612 error=- id=18c2f3a40b400001 overflow=1")
    assert got[2].endswith(" variant=a\\x20\\x22b\\x22")
    as_json = [json.loads(line) for line in lines(mod, rows, json_format=True)]
    assert as_json[0]["variant"] == "chat-v2" and "overflow" not in as_json[0]
    assert as_json[1]["overflow"] is True and "variant" not in as_json[1]
    assert as_json[2]["variant"] == 'a "b"'
    assert "variant" not in lines(mod, [served()], json_format=True)[0]


def test_console_lines_of_an_error_and_of_a_client_that_left(mod: ModuleType) -> None:
    unknown = served(model="zz", node_id=None, status=404, error_type="model_not_found", bytes_out=0)
    gone = served(endpoint="/v1/completions", status=499, error_type="client_disconnected", finished_at=T0 + 2)
    got = lines(mod, [unknown, gone])
    assert got[0].endswith(
        '"POST /v1/chat/completions" 404 12.3ms model=zz node=- tenant=team-a in=231 out=0 '
        "error=model_not_found id=18c2f3a40b400001"
    )
    assert got[1].endswith(
        '"POST /v1/completions" 499 2000.0ms model=m1 node=n1 tenant=team-a in=231 out=612 '
        "error=client_disconnected id=18c2f3a40b400001"
    )


def test_json_lines(mod: ModuleType) -> None:
    first, second = (json.loads(line) for line in lines(mod, [served(), RequestRecord(id=7, received_at=T0)], True))
    assert first == {
        "time": "2025-12-06T05:46:40.250Z",
        "client": "127.0.0.1",
        "method": "POST",
        "path": "/v1/chat/completions",
        "status": 200,
        "duration_ms": 12.3,
        "model": "m1",
        "node": "n1",
        "tenant": "team-a",
        "bytes_in": 231,
        "bytes_out": 612,
        "error": None,
        "request_id": format_request_id(ID),
    }
    assert second["duration_ms"] is None and second["model"] is None and second["status"] == 0
    assert second["path"] == "" and second["request_id"] == "0000000000000007"


def test_text_cannot_forge_a_line_or_a_field(mod: ModuleType) -> None:
    model = 'm "1"\n\\ é\x7f\x00'
    (console,) = lines(mod, [served(model=model)])
    assert "model=m\\x20\\x221\\x22\\x0a\\x5c\\x20é\\x7f\\x00 node=n1" in console
    (line,) = lines(mod, [served(model=model)], json_format=True)
    assert json.loads(line)["model"] == model and "\n" not in line


@pytest.mark.parametrize(
    ("fields", "console", "key", "value"),
    [
        ({"received_at": -1.0}, "- 127.0.0.1", "time", None),
        ({"received_at": math.nan}, "- 127.0.0.1", "time", None),
        ({"received_at": 253402300800.0}, "- 127.0.0.1", "time", None),  # year 10000
        ({"finished_at": None}, "200 - model=", "duration_ms", None),
        ({"finished_at": T0 + 1e9}, "200 - model=", "duration_ms", None),  # 10^12 ms
        ({"finished_at": T0 - 0.00004}, "200 -0.0ms", "duration_ms", -0.0),
        ({"status": True}, '" 1 12.3ms', "status", 1),  # a bool is 0 or 1, as the C reader sees it
        ({"status": 200.0}, '" - 12.3ms', "status", None),  # an integer field holding a float
        ({"model": 5}, "model=- node", "model", None),  # a text field holding a number
        ({"id": -1}, "id=-", "request_id", None),
    ],
)
def test_missing_or_unusable_values(
    mod: ModuleType, fields: dict[str, Any], console: str, key: str, value: Any
) -> None:
    record = served(**fields)
    assert console in lines(mod, [record])[0]
    assert json.loads(lines(mod, [record], json_format=True)[0])[key] == value


def test_rows_that_are_not_records_give_no_line_and_are_counted(mod: ModuleType) -> None:
    good = served()
    row = list(msgspec.msgpack.decode(msgspec.msgpack.encode(good)))
    nested = [*row[:-1], ["x"]]
    huge = [*row[:-1], 1 << 63]  # beyond int64
    rows = [good, b"\xc1", {"a": 1}, row[:-1], nested, huge, b"", good]
    text, skipped = mod.AccessFormatter(REQUEST_COLUMNS).format(*batch(rows))
    assert skipped == 6
    assert text.decode().splitlines() == lines(mod, [good, good])


def test_bad_batches_and_columns_are_refused(mod: ModuleType) -> None:
    payload, lengths, _ = batch([served(), served()])
    fmt = mod.AccessFormatter(REQUEST_COLUMNS)
    with pytest.raises(ValueError, match="u32 per row"):
        fmt.format(payload, lengths, 3)
    with pytest.raises(ValueError, match="add up"):
        fmt.format(payload[:-1], lengths, 2)
    assert fmt.format(b"", b"", 0) == (b"", 0)
    with pytest.raises(ValueError, match="no status column"):
        mod.AccessFormatter([c for c in REQUEST_COLUMNS if c != "status"])


_text = st.one_of(st.none(), st.text(max_size=40), st.integers(-5, 5))
_time = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0, 4e9),
    st.integers(-(1 << 63), (1 << 63) - 1),
    st.booleans(),
)
_int = st.one_of(st.none(), st.integers(-(1 << 63), (1 << 63) - 1), st.booleans(), st.floats(-1e6, 1e6))


@settings(max_examples=300, deadline=None)
@given(
    texts=st.lists(_text, min_size=6, max_size=6),
    times=st.lists(_time, min_size=2, max_size=2),
    ints=st.lists(_int, min_size=4, max_size=4),
    json_format=st.booleans(),
)
def test_twins_write_the_same_bytes(texts: list[Any], times: list[Any], ints: list[Any], json_format: bool) -> None:
    record = RequestRecord(
        client_addr=texts[0],
        endpoint=texts[1],
        model=texts[2],
        node_id=texts[3],
        tenant=texts[4],
        error_type=texts[5],
        received_at=times[0],
        finished_at=times[1],
        id=ints[0],
        status=ints[1],
        bytes_in=ints[2],
        bytes_out=ints[3],
    )
    rows = batch([record, served()])
    py = twin("accesslog", "py").AccessFormatter(REQUEST_COLUMNS, json_format).format(*rows)
    try:
        c = twin("accesslog", "c")
    except pytest.skip.Exception:
        if FORCED:
            return
        raise
    assert c.AccessFormatter(REQUEST_COLUMNS, json_format).format(*rows) == py
    text = py[0].decode()
    assert text.count("\n") == 2 and text.endswith("\n")  # one line each, whatever the values hold
    if json_format:
        for line in text.split("\n")[:-1]:  # (not splitlines: it also splits at U+0085, U+2028, ...)
            json.loads(line)


def test_compiled_formatter_loaded() -> None:
    """The access log uses the compiled formatter (fails when it was not built)."""
    from shardon._fast import accesslog

    if FORCED:
        assert accesslog.ACCESSLOG_COMPILED is False
        assert accesslog.AccessFormatter is twin("accesslog", "py").AccessFormatter
        return
    assert accesslog.ACCESSLOG_COMPILED is True
    assert accesslog.AccessFormatter is twin("accesslog", "c").AccessFormatter
