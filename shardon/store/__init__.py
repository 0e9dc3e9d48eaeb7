"""The request log: one SQLite row per request that reached the gateway, the admin audit trail, the
API keys and nodes created at run time, and the access log.

- `records`: `RequestRecord` and request ids (a leaf any module may import);
- `log`: `RequestLog`, the writer and compactor threads (`backlog`: the on-disk backlog;
  `compactor`: the SQLite side; `schema`: tables and migrations; `queries`: the reads);
- `access`: `AccessLog`, access lines formatted and written off the event loop;
- `keys`: `KeyTable`, the persisted API keys;
- `nodes`: `NodeTable`, the nodes registered through the admin API.

Design (threading, backlog format, durability, schema): ``docs/request-log.md``.
"""

from __future__ import annotations

from .access import AccessLog
from .backlog import encode_frame, read_segment
from .keys import KeyTable
from .log import RequestLog
from .nodes import NodeRow, NodeTable
from .queries import parse_status_filter
from .records import (
    REQUEST_COLUMNS,
    RequestIds,
    RequestRecord,
    format_request_id,
    parse_request_id,
    receipt_for,
    request_id_floor,
    request_ids,
)
from .schema import AUDIT_COLUMNS, SCHEMA_VERSION

__all__ = [
    "AUDIT_COLUMNS",
    "REQUEST_COLUMNS",
    "SCHEMA_VERSION",
    "AccessLog",
    "KeyTable",
    "NodeRow",
    "NodeTable",
    "RequestIds",
    "RequestLog",
    "RequestRecord",
    "encode_frame",
    "format_request_id",
    "parse_request_id",
    "parse_status_filter",
    "read_segment",
    "receipt_for",
    "request_id_floor",
    "request_ids",
]
