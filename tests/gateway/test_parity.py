"""The request paths are one behaviour: the same requests, sent down the native engine's callbacks,
its coroutine (``server.callbacks: false``) and granian, get the same status, headers (but the
request's id, the date, the server's name and keep-alive), body and request-log row (but ids and
times).

The implementation dimension (compiled exchange and its Python twin) is tests/test_twins.py, which
runs this module too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import (
    PATHS,
    dechunk,
    hold,
    in_background,
    node_entry,
    path_server,
    post,
    queued,
    raw_request,
    read_until,
    rows,
    wait_until,
)

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
# What differs between two runs of the same request, whatever the path; and whether the connection
# is kept after an answer, which is the engine's business (granian reads a body past the limit in
# whole and keeps the connection; the native engine stops reading it and closes).
_VARYING_HEADERS = {"x-request-id", "date", "server", "connection"}
_VARYING_FIELDS = {"id", "received_at", "queued_at", "dispatched_at", "first_token_at", "finished_at", "client_addr"}
_CREATED = re.compile(rb'"created":\d+')


def normal(reply: tuple[int, dict[str, str], bytes]) -> tuple[int, dict[str, str], bytes]:
    status, headers, body = reply
    return status, {k: v for k, v in headers.items() if k not in _VARYING_HEADERS}, _CREATED.sub(b'"created":0', body)


def _queued(node: Any, gw: Any) -> list[tuple[int, dict[str, str], bytes]]:
    first = hold(node, gw.url)
    second = in_background(post, gw.url, "/v1/chat/completions", CHAT)
    wait_until(lambda: queued(gw) == 1)
    node.gate.open()
    return [normal(first.result(10)), normal(second.result(10))]


def _cut_by_client(node: Any, gw: Any) -> list[tuple[int, dict[str, str], bytes]]:
    with raw_request(gw.port, b'{"model":"m1","prompt":"x","stream":true,"mock":{"hold_after":2}}') as sock:
        read_until(sock, lambda got: dechunk(got)[0].count(b"data: ") == 2)
    wait_until(lambda: node.stats.cancelled == 1)
    return []


# Each sends its requests to a gateway in front of a node "n" (and "bad", which answers 500).
CASES: dict[str, Callable[[Any, Any], list[tuple[int, dict[str, str], bytes]]]] = {
    "success": lambda node, gw: [normal(post(gw.url, "/v1/chat/completions", CHAT))],
    "stream": lambda node, gw: [
        normal(post(gw.url, "/v1/completions", {"model": "m1", "prompt": "x", "stream": True, "max_tokens": 4}))
    ],
    "embeddings": lambda node, gw: [normal(post(gw.url, "/v1/embeddings", {"model": "m1", "input": ["a", "b"]}))],
    "bad_json": lambda node, gw: [normal(post(gw.url, "/v1/chat/completions", b"{nope"))],
    "unknown_model": lambda node, gw: [normal(post(gw.url, "/v1/chat/completions", {**CHAT, "model": "zz"}))],
    "too_large": lambda node, gw: [normal(post(gw.url, "/v1/completions", {"model": "m1", "prompt": "x" * 5000}))],
    "5xx_retried": lambda node, gw: [
        normal(post(gw.url, "/v1/chat/completions", {**CHAT, "model": "m2"}))  # "bad" answers 500, then "n"
    ],
    "502_mid_stream": lambda node, gw: [
        normal(post(gw.url, "/v1/completions", {"model": "m1", "prompt": "x", "stream": True, "mock": {"fail": "mid"}}))
    ],
    "queued": _queued,
    "client_gone": _cut_by_client,
}


def run_case(make_mock: Any, make_gateway: Any, path: str, case: str) -> tuple[list[Any], list[dict[str, Any]]]:
    node = make_mock(models=["m1", "m2"], chunks=5, name="n")
    bad = make_mock(models=["m2"], chunks=5, name="bad")
    gw = make_gateway(
        # "bad" is the first node tried for m2 (idle nodes are tried in turn, the first listed first).
        nodes=[node_entry(bad, "bad", ["m2"], max_concurrent=1), node_entry(node, "n", ["m1", "m2"], max_concurrent=1)],
        server={**path_server(path), "max_body_bytes": 4096},
        upstream={"health_interval_s": 60, "failure_threshold": 100},
    )
    # "bad" fails from now on, once its probe at start-up has passed (its connection back in the
    # pool: a failed probe would have taken it out).
    registry = gw.gateway.registry
    wait_until(lambda: gw.call(lambda: registry.nodes["bad"].pool.idle_count) >= 1)
    bad.set_fail("status500")
    replies = CASES[case](node, gw)
    return replies, [same_anywhere(row) for row in rows(gw.url, "limit=100")["data"]]


def same_anywhere(row: dict[str, Any]) -> dict[str, Any]:
    """A row less what differs from one run to the next (its id, its times, the client's port)."""
    kept = {k: v for k, v in row.items() if k not in _VARYING_FIELDS}
    if kept.get("receipt"):
        kept["receipt"] = {k: v for k, v in kept["receipt"].items() if k not in ("request_id", "timings")}
    return kept


@pytest.mark.parametrize("engine", ["native"])  # (each case starts one gateway per path itself)
@pytest.mark.parametrize("case", list(CASES))
def test_every_path_answers_and_logs_alike(make_mock: Any, make_gateway: Any, case: str) -> None:
    results = {path: run_case(make_mock, make_gateway, path, case) for path in PATHS}
    first, *others = PATHS
    assert results[first][1], "no row logged"
    for path in others:
        assert results[path][0] == results[first][0], f"{path} answered unlike {first}"
        assert len(results[path][1]) == len(results[first][1]), f"{path} logged unlike {first}"
        for row, like in zip(results[path][1], results[first][1], strict=True):
            differ = {k: (row.get(k), like.get(k)) for k in row.keys() | like.keys() if row.get(k) != like.get(k)}
            assert not differ, f"{path} logged unlike {first}: {differ}"
    json.dumps(results[first][1])  # (rows are plain JSON)
