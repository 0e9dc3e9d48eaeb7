"""Access-log lines from packed request rows: the reference implementation.

The request log's writer takes finished requests' records out of the row queue in batches, each
record packed as a msgpack array of its fields (``RowQueue.take``: the rows back to back, their
lengths as little-endian u32s). `AccessFormatter.format` turns such a batch into access lines, one
per row, without building the records again. ``_accesslog_c.pyx`` is the compiled twin (same API,
byte-for-byte the same lines), which reads the rows in C without the GIL;
``shardon._fast.accesslog`` selects.

``columns`` names the row's fields in order (the request log's columns); the line takes these:
``received_at`` (time, ISO 8601 UTC with milliseconds), ``client_addr``, ``endpoint`` (the path),
``status``, ``finished_at`` (with ``received_at``: the duration in ms), ``model``, ``node_id``,
``tenant``, ``bytes_in``, ``bytes_out``, ``error_type``, ``id`` (16 hex digits, as the
``x-request-id`` header shows it), and only when set ``variant`` (a split's) and ``overflow`` (served
by the overflow endpoint). The method is POST: the records are of the ``/v1`` POST routes.

- Console (``json=False``)::

      2026-12-07T10:11:12.345Z 127.0.0.1 "POST /v1/chat/completions" 200 12.3ms model=m1 node=n1 \
tenant=team-a in=231 out=612 error=- id=18c2f3a40b400001

  then `` variant=NAME`` when the row has a variant (text), `` overflow=1`` when its overflow is a
  non-zero integer. A missing or unusable value is ``-``. In text values, bytes below ``0x21``, ``0x7f``, ``"`` and
  ``\\`` are written ``\\xHH``, so each field is one token and a client's model name cannot forge a
  line.
- JSON (``json=True``): one object per line, the keys ``time client method path status duration_ms
  model node tenant bytes_in bytes_out error request_id``, then ``variant`` and ``overflow`` (``true``)
  on the same terms as the console's; a missing value is ``null``; strings
  escaped as JSON (``\\"``, ``\\\\``, ``\\u00HH`` below ``0x20``), other bytes as they are (UTF-8).

A row that is not a msgpack array of ``len(columns)`` None/bool/int/float/str values (int64 range)
gives no line; `format` counts it. A text field holding something else than text, or an integer
field something else than an integer (a bool counts as 0 or 1, as msgpack's reader in C sees it),
is a missing value; so is a duration of 10^12 ms or more, or a time outside years 1970-9999.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from typing import Any

import msgspec

__all__ = ["AccessFormatter"]

_FIELDS = (
    "id",
    "received_at",
    "finished_at",
    "client_addr",
    "endpoint",
    "status",
    "model",
    "node_id",
    "tenant",
    "bytes_in",
    "bytes_out",
    "error_type",
    "variant",
    "overflow",
)
_MAX_TIME = 253402300800.0  # 10000-01-01T00:00:00Z
_MAX_DURATION_MS = 1e12
_INT64 = (-(1 << 63), 1 << 63)
_CONSOLE_ESCAPE = re.compile(rb'[\x00-\x20\x7f"\\]')
_JSON_ESCAPE = re.compile(rb'[\x00-\x1f"\\]')


def _console_escape(match: re.Match[bytes]) -> bytes:
    return b"\\x%02x" % match[0][0]


def _json_escape(match: re.Match[bytes]) -> bytes:
    c = match[0][0]
    if c == 0x22:
        return b'\\"'
    if c == 0x5C:
        return b"\\\\"
    return b"\\u%04x" % c


def _cell_ok(value: Any) -> bool:
    """Whether the compiled twin's parser takes this value (None/bool/int64/float/str)."""
    if value is None or type(value) in (bool, float, str):
        return True
    return type(value) is int and _INT64[0] <= value < _INT64[1]


def _time(value: Any) -> bytes | None:
    if not isinstance(value, int | float) or not 0.0 <= value < _MAX_TIME:
        return None
    ms = math.floor(float(value) * 1000.0)
    t = time.gmtime(ms // 1000)
    return b"%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (
        t.tm_year,
        t.tm_mon,
        t.tm_mday,
        t.tm_hour,
        t.tm_min,
        t.tm_sec,
        ms % 1000,
    )


def _duration(received: Any, finished: Any) -> bytes | None:
    if not isinstance(received, int | float) or not isinstance(finished, int | float):
        return None
    ms = (float(finished) - float(received)) * 1000.0
    if not abs(ms) < _MAX_DURATION_MS:  # (and not NaN)
        return None
    return b"%.1f" % ms


def _int(value: Any) -> bytes | None:
    return b"%d" % value if isinstance(value, int) else None


def _text(value: Any) -> bytes | None:
    return value.encode() if type(value) is str else None


def _overflowed(value: Any) -> bool:
    return isinstance(value, int) and value != 0


class AccessFormatter:
    """Formats batches of packed rows whose fields are ``columns`` (see the module docstring)."""

    def __init__(self, columns: Sequence[str], json: bool = False) -> None:
        columns = tuple(columns)
        missing = [name for name in _FIELDS if name not in columns]
        if missing:
            raise ValueError(f"the rows have no {', '.join(missing)} column")
        self._at = {name: columns.index(name) for name in _FIELDS}
        self._ncols = len(columns)
        self.json = json
        self._decode = msgspec.msgpack.Decoder().decode

    def format(self, payload: bytes, lengths: bytes, count: int) -> tuple[bytes, int]:
        """The lines of ``count`` rows (``payload``: the rows back to back; ``lengths``: each one's
        length as a little-endian u32), and how many rows gave no line. ValueError when the lengths
        do not add up to the payload."""
        if count < 0 or len(lengths) != 4 * count:
            raise ValueError("lengths must hold one u32 per row")
        sizes = [int.from_bytes(lengths[4 * i : 4 * i + 4], "little") for i in range(count)]
        if sum(sizes) != len(payload):
            raise ValueError("row lengths do not add up to the payload")
        lines: list[bytes] = []
        skipped = 0
        pos = 0
        view = memoryview(payload)
        for size in sizes:
            row = self._row(view[pos : pos + size])
            pos += size
            if row is None:
                skipped += 1
            else:
                lines.append(self._json(row) if self.json else self._console(row))
        return b"".join(lines), skipped

    def _row(self, packed: memoryview) -> dict[str, Any] | None:
        try:
            values = self._decode(packed)
        except msgspec.DecodeError:
            return None
        if type(values) is not list or len(values) != self._ncols or not all(map(_cell_ok, values)):
            return None
        return {name: values[i] for name, i in self._at.items()}

    @staticmethod
    def _request_id(value: Any) -> bytes | None:
        return b"%016x" % value if isinstance(value, int) and value >= 0 else None

    def _console(self, row: dict[str, Any]) -> bytes:
        def text(value: Any) -> bytes:
            raw = _text(value)
            return b"-" if raw is None else _CONSOLE_ESCAPE.sub(_console_escape, raw)

        def plain(value: bytes | None) -> bytes:
            return b"-" if value is None else value

        duration = _duration(row["received_at"], row["finished_at"])
        return b'%s %s "POST %s" %s %s model=%s node=%s tenant=%s in=%s out=%s error=%s id=%s%s%s\n' % (
            plain(_time(row["received_at"])),
            text(row["client_addr"]),
            text(row["endpoint"]),
            plain(_int(row["status"])),
            b"-" if duration is None else duration + b"ms",
            text(row["model"]),
            text(row["node_id"]),
            text(row["tenant"]),
            plain(_int(row["bytes_in"])),
            plain(_int(row["bytes_out"])),
            text(row["error_type"]),
            plain(self._request_id(row["id"])),
            b"" if type(row["variant"]) is not str else b" variant=" + text(row["variant"]),
            b" overflow=1" if _overflowed(row["overflow"]) else b"",
        )

    def _json(self, row: dict[str, Any]) -> bytes:
        def text(value: bytes | None) -> bytes:
            return b"null" if value is None else b'"' + _JSON_ESCAPE.sub(_json_escape, value) + b'"'

        def number(value: bytes | None) -> bytes:
            return b"null" if value is None else value

        return (
            b'{"time":%s,"client":%s,"method":"POST","path":%s,"status":%s,"duration_ms":%s,"model":%s,'
            b'"node":%s,"tenant":%s,"bytes_in":%s,"bytes_out":%s,"error":%s,"request_id":%s%s%s}\n'
            % (
                text(_time(row["received_at"])),
                text(_text(row["client_addr"])),
                text(_text(row["endpoint"])),
                number(_int(row["status"])),
                number(_duration(row["received_at"], row["finished_at"])),
                text(_text(row["model"])),
                text(_text(row["node_id"])),
                text(_text(row["tenant"])),
                number(_int(row["bytes_in"])),
                number(_int(row["bytes_out"])),
                text(_text(row["error_type"])),
                text(self._request_id(row["id"])),
                b"" if type(row["variant"]) is not str else b',"variant":' + text(_text(row["variant"])),
                b',"overflow":true' if _overflowed(row["overflow"]) else b"",
            )
        )
