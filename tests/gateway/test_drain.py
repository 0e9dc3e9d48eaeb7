"""Draining, as SIGTERM does it (`shardon.server.run`), on every request path: what runs and what
waits is finished, new requests get 503, and past ``server.drain_timeout_s`` what is left is cut,
each request with its row. (tests/test_serve.py sends the real SIGTERM to ``shardon serve``.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.support import (
    dechunk,
    events,
    get,
    in_background,
    node_entry,
    post,
    queued,
    raw_request,
    read_until,
    rows,
    wait_until,
)

STREAM = b'{"model":"m1","prompt":"x","stream":true,"mock":{"hold_after":2}}'
QUEUED = {"model": "m1", "prompt": "queued", "max_tokens": 1}


def started(
    make_mock: Any, make_gateway: Any, tmp_path: Path, drain_timeout_s: float
) -> tuple[Any, Any, dict[str, Any]]:
    """A gateway whose one slot runs a stream the node holds after 2 tokens, with a request queued
    behind it: (node, gateway, {"stream": socket, "queued": future, "config": ...})."""
    node = make_mock(models=["m1"], chunks=6)
    config = {
        "nodes": [node_entry(node, "n", ["m1"], max_concurrent=1)],
        "store": {"path": str(tmp_path / "drain.db")},
        "server": {"drain_timeout_s": drain_timeout_s},
    }
    gw = make_gateway(dict(config))
    stream = raw_request(gw.port, STREAM)
    assert read_until(stream, lambda got: got.count(b"data: ") == 2).startswith(b"HTTP/1.1 200")
    waiting = in_background(post, gw.url, "/v1/completions", QUEUED)
    wait_until(lambda: queued(gw) == 1)
    return node, gw, {"stream": stream, "queued": waiting, "config": config}


def logged(make_gateway: Any, config: dict[str, Any]) -> list[tuple[int, str | None, bool]]:
    """The request log as a restarted gateway sees it: (status, error_type, stream), oldest first."""
    again = make_gateway(dict(config))
    return [(r["status"], r["error_type"], r["stream"]) for r in reversed(rows(again.url)["data"])]


def test_a_drain_finishes_what_runs_and_what_waits(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    node, gw, held = started(make_mock, make_gateway, tmp_path, drain_timeout_s=30)
    gw.begin_stop()
    # Draining: new requests are refused, health says so; the running and the queued ones go on.
    wait_until(lambda: get(gw.url, "/health")[0] == 503)
    assert json.loads(get(gw.url, "/health")[2])["status"] == "draining"
    status, headers, body = post(gw.url, "/v1/completions", QUEUED)
    assert status == 503 and json.loads(body)["error"]["code"] == "shutting_down"
    assert int(headers["retry-after"]) >= 1
    assert queued(gw) == 1 and node.gate.waiting == 1
    node.gate.open()
    with held["stream"] as stream:
        body, ended = dechunk(read_until(stream, lambda got: dechunk(got)[1]))
    assert ended and events(body)[-1] == b"data: [DONE]" and len(events(body)) == 6 - 2 + 2
    assert held["queued"].result(10)[0] == 200  # dispatched once the stream freed the slot
    assert gw.join(10) == 0
    assert logged(make_gateway, held["config"]) == [
        (200, None, True),
        (200, None, False),
        (503, "shutting_down", False),
    ]


def test_the_drain_timeout_cuts_what_is_left(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    node, gw, held = started(make_mock, make_gateway, tmp_path, drain_timeout_s=0.5)
    gw.begin_stop()  # and the node never lets the stream go on
    assert gw.join(15) == 0
    # The stream ends with an SSE error event; the queued request, never started, gets a 503.
    with held["stream"] as stream:
        body, ended = dechunk(read_until(stream, lambda got: dechunk(got)[1]))
    assert ended
    error = json.loads(events(body)[-1].removeprefix(b"data: "))["error"]
    assert error["code"] == "shutting_down"
    status, _, body = held["queued"].result(10)
    assert status == 503 and json.loads(body)["error"]["code"] == "shutting_down"
    wait_until(lambda: node.stats.cancelled == 1)  # the node's connection was closed: generation stopped
    # Nothing lost: both have their row.
    assert logged(make_gateway, held["config"]) == [(503, "shutting_down", True), (503, "shutting_down", False)]
