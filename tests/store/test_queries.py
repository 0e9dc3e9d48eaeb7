"""The request log's reads and the admin query strings (shardon.store.queries), on real SQLite files."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import pytest

from shardon.store import REQUEST_COLUMNS, RequestLog, format_request_id, parse_status_filter, queries, request_id_floor
from shardon.store.queries import (
    MAX_LIMIT,
    parse_audit_query,
    parse_request_id,
    parse_requests_query,
    parse_stats_query,
    parse_usage_query,
)
from tests.store.store_helpers import BASE, dataset, hexid, rec, rid, ro


def test_filters_and_pagination(rlog: RequestLog) -> None:
    dataset(rlog)
    with ro(rlog) as conn:

        def ids(**kw: Any) -> tuple[int, list[int]]:
            page = queries.requests(conn, **kw)
            got = [round(r["received_at"] - BASE) for r in page["data"]]
            assert [r["id"] for r in page["data"]] == [hexid(i) for i in got]
            return page["total"], got

        total, got = ids()
        assert total == 20 and got == list(range(19, -1, -1))  # newest first
        assert ids(status=404) == (4, [17, 12, 7, 2])
        assert ids(status="404") == ids(status=404)
        assert ids(status="4xx") == (8, [18, 17, 13, 12, 8, 7, 3, 2])
        assert ids(status="2xx")[0] == 8
        assert ids(status="5xx")[0] == 4
        assert ids(model="m1")[0] == 10
        assert ids(node="n2") == (10, list(range(19, 9, -1)))
        assert ids(tenant="a")[1] == [17, 16, 13, 12, 9, 8, 5, 4, 1, 0]
        assert ids(since=BASE + 5, until=BASE + 8) == (3, [7, 6, 5])  # since <= t < until
        assert ids(model="m1", node="n1", status="2xx") == (2, [6, 0])
        assert ids(model="nope") == (0, [])
        # pagination: total ignores limit/offset
        assert ids(limit=5, offset=0) == (20, [19, 18, 17, 16, 15])
        assert ids(limit=5, offset=15) == (20, [4, 3, 2, 1, 0])
        assert ids(limit=5, offset=20) == (20, [])
        assert ids(status="4xx", limit=3, offset=3) == (8, [12, 8, 7])
        with pytest.raises(ValueError):
            queries.requests(conn, status="6xx")


def test_since_bound_keeps_rows_at_or_after_since(rlog: RequestLog) -> None:
    """``since`` seeks the primary key (``id >= request_id_floor(since)``) and keeps the exact test."""
    since = BASE + 100.2505  # the middle of a millisecond
    floor = request_id_floor(since)
    rows = {
        "a second before": (BASE + 99.2505, None),
        "earlier, same millisecond": (since - 0.0003, floor),  # id >= floor: only received_at excludes it
        "a millisecond before": (since - 0.001, None),
        "at since": (since, None),
        "later, same millisecond": (since + 0.0003, floor + 5),
        "next millisecond": (since + 0.001, None),
        "an hour after": (since + 3600, None),
        "counter carried on": (since + 0.0002, floor + 7 * (1 << 20)),  # id ahead of its time
    }
    for n, (t, request_id) in enumerate(rows.values()):
        rlog.append(rec(n, received_at=t, id=request_id if request_id is not None else rid(n, t)))
    assert rlog.flush()
    expect = {"at since", "later, same millisecond", "next millisecond", "an hour after", "counter carried on"}
    names = {t: name for name, (t, _) in rows.items()}
    with ro(rlog) as conn:
        page = queries.requests(conn, since=since)
        assert {names[r["received_at"]] for r in page["data"]} == expect and page["total"] == len(expect)
        ids = [r["id"] for r in page["data"]]
        assert ids == sorted(ids, reverse=True)  # newest (largest id) first
        assert queries.stats(conn, since=since)["total"] == len(expect)
        assert sum(d["requests"] for d in queries.stats_by_tenant(conn, since=since)["data"]) == len(expect)
        until = queries.requests(conn, since=since - 0.001, until=since)  # [since - 1 ms, since)
        assert {names[r["received_at"]] for r in until["data"]} == {"earlier, same millisecond", "a millisecond before"}
        assert queries.requests(conn)["total"] == len(rows)


def _plans(conn: sqlite3.Connection, call: Any) -> list[tuple[str, str]]:
    """``(sql, query plan)`` of every statement ``call()`` runs on ``conn``."""
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        call()
    finally:
        conn.set_trace_callback(None)
    out = []
    for sql in statements:
        plan = " | ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
        out.append((sql, plan))
    return out


def test_listing_walks_the_primary_key(rlog: RequestLog) -> None:
    """The admin listing is newest first by id: no sort (no temp B-tree), no index; ``since`` seeks."""
    dataset(rlog)
    with ro(rlog) as conn:
        default = [(sql, plan) for sql, plan in _plans(conn, lambda: queries.requests(conn)) if "ORDER BY" in sql]
        assert len(default) == 1 and "ORDER BY id DESC" in default[0][0]
        plan = default[0][1]
        assert "TEMP B-TREE" not in plan and "INDEX" not in plan and plan.startswith("SCAN requests"), plan
        for sql, plan in _plans(conn, lambda: queries.requests(conn, since=BASE + 5, model="m1")):
            assert "USING INTEGER PRIMARY KEY (rowid>?)" in plan and "TEMP B-TREE" not in plan, (sql, plan)
        for _, plan in _plans(conn, lambda: queries.stats(conn, since=BASE + 5)):
            assert "USING INTEGER PRIMARY KEY" in plan, plan
        # errors (status <> 200) still use the partial index
        errors = _plans(conn, lambda: queries.requests(conn, status=404))
        assert all("idx_requests_errors" in plan for _, plan in errors), errors


def test_row_shape_and_receipt(rlog: RequestLog) -> None:
    rlog.append(
        rec(
            1,
            model="m",
            node_id="n1",
            backend="llama.cpp",
            model_file_sha256="ab" * 32,
            output_sha256="cd" * 32,
            stream=True,
            dispatched_at=BASE + 1.25,
            first_token_at=BASE + 1.5,
            finished_at=BASE + 3,
            prompt_tokens=10,
            completion_tokens=5,
            key_id="k1",
            tenant="t",
            priority="high",
        )
    )
    rlog.append(rec(2))  # not finished
    assert rlog.flush()
    with ro(rlog) as conn:
        row = queries.request(conn, rid(1))
        assert row is not None
        assert set(REQUEST_COLUMNS) <= set(row) and "receipt" in row and "node_id" in row
        assert row["id"] == hexid(1) and row["receipt"]["request_id"] == hexid(1)  # as x-request-id shows it
        assert row["stream"] is True and row["overflow"] is False
        receipt = row["receipt"]
        assert receipt["node"] == "n1" and receipt["backend"] == "llama.cpp"
        assert receipt["model_file_sha256"] == "ab" * 32 and receipt["output_sha256"] == "cd" * 32
        assert receipt["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        assert receipt["timings"]["queue_ms"] == 250.0
        assert receipt["timings"]["ttft_ms"] == 500.0
        assert receipt["timings"]["duration_ms"] == 2000.0
        unfinished = queries.request(conn, rid(2))
        assert unfinished is not None and unfinished["receipt"] is None
        assert queries.request(conn, rid(3)) is None
        assert queries.request(conn, parse_request_id("f" * 16)) is None  # beyond int64: no such row, no error


def test_stats_percentiles_on_known_data(rlog: RequestLog) -> None:
    for i in range(100):  # latencies 1..100 ms, ttft 0.5..50 ms, queue 0.1..10 ms
        t = BASE + i
        rlog.append(
            rec(
                i,
                model="m1" if i < 50 else "m2",
                received_at=t,
                dispatched_at=t + (i + 1) / 10000,
                first_token_at=t + (i + 1) / 2000,
                finished_at=t + (i + 1) / 1000,
                prompt_tokens=10,
                completion_tokens=2,
            )
        )
    for i in range(100, 110):  # failures: counted, excluded from the latency percentiles
        rlog.append(rec(i, model="m1", status=503, finished_at=BASE + i + 99, prompt_tokens=1))
    rlog.append(rec(200, model="m1", status=499, prompt_tokens=None, completion_tokens=None))
    assert rlog.flush()
    approx = pytest.approx
    with ro(rlog) as conn:
        s = queries.stats(conn)
        assert s["total"] == 111 and s["completed"] == 100 and s["failed"] == 11
        assert s["by_status"] == {"200": 100, "503": 10, "499": 1}
        assert s["tokens"] == {"prompt": 1010, "completion": 200}
        assert s["latency_ms"] == approx({"p50": 50, "p90": 90, "p99": 99}, abs=0.01)
        assert s["ttft_ms"] == approx({"p50": 25, "p90": 45, "p99": 49.5}, abs=0.01)
        assert s["queue_ms"] == approx({"p50": 5, "p90": 9, "p99": 9.9}, abs=0.01)

        part = queries.stats(conn, since=BASE + 90, until=BASE + 100)  # latencies 91..100
        assert part["total"] == 10
        assert part["latency_ms"] == approx({"p50": 95, "p90": 99, "p99": 100}, abs=0.01)
        empty = queries.stats(conn, since=BASE + 10_000)
        assert empty["total"] == 0 and empty["latency_ms"] == {"p50": None, "p90": None, "p99": None}
        assert queries.stats(conn, model="m2")["total"] == 50

        by_model = {d["model"]: d for d in queries.stats_by_model(conn)["data"]}
        assert by_model["m1"]["total"] == 61 and by_model["m2"]["total"] == 50
        assert by_model["m1"]["latency_ms"] == approx({"p50": 25, "p90": 45, "p99": 50}, abs=0.01)
        assert by_model["m2"]["latency_ms"] == approx({"p50": 75, "p90": 95, "p99": 100}, abs=0.01)
        assert by_model["m1"]["by_status"] == {"200": 50, "503": 10, "499": 1}


def test_usage_report_per_tenant_and_key(rlog: RequestLog) -> None:
    rows = [
        ("a", "ka1", 200, 10, 5, False),
        ("a", "ka1", 200, 20, 7, True),
        ("a", "ka2", 429, None, None, False),
        ("b", "kb1", 200, 1, 1, False),
        (None, None, 401, None, None, False),
    ]
    for i, (tenant, key, status, p, c, overflow) in enumerate(rows):
        rlog.append(
            rec(i, tenant=tenant, key_id=key, status=status, prompt_tokens=p, completion_tokens=c, overflow=overflow)
        )
    rlog.append(rec(99, tenant="a", key_id="ka1", received_at=BASE - 1000, prompt_tokens=1000))
    assert rlog.flush()
    with ro(rlog) as conn:
        report = queries.stats_by_tenant(conn, since=BASE)
        by_tenant = {d["tenant"]: d for d in report["data"]}
        assert report["data"][0]["tenant"] == "a"  # busiest first
        a = by_tenant["a"]
        assert (a["requests"], a["completed"], a["failed"]) == (3, 2, 1)
        assert (a["prompt_tokens"], a["completion_tokens"], a["total_tokens"]) == (30, 12, 42)
        # What the overflow endpoint served, and its tokens: the tenant's, and its key's.
        assert a["overflow"] == {"requests": 1, "prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27}
        keys = {k["key_id"]: k for k in a["keys"]}
        assert keys["ka1"]["requests"] == 2 and keys["ka1"]["prompt_tokens"] == 30
        assert keys["ka1"]["overflow"]["total_tokens"] == 27
        assert keys["ka2"] == {
            "key_id": "ka2",
            "requests": 1,
            "completed": 0,
            "failed": 1,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
            "overflow": {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }
        assert by_tenant["b"]["total_tokens"] == 2
        assert by_tenant["b"]["overflow"]["requests"] == 0
        assert by_tenant[None]["requests"] == 1
        only_a = queries.stats_by_tenant(conn, tenant="a")["data"]
        assert len(only_a) == 1 and only_a[0]["prompt_tokens"] == 1030  # no time bound: includes the old row


def test_stats_by_model_show_variants_and_overflow(rlog: RequestLog) -> None:
    rows = [("chat", "chat-v1", 200, False)] * 9 + [("chat", "chat-v2", 200, False), ("chat", "chat-v2", 502, False)]
    rows += [("m", None, 200, True), ("m", None, 200, False)]
    for i, (model, variant, status, overflow) in enumerate(rows):
        rlog.append(
            rec(i, model=model, variant=variant, status=status, overflow=overflow, prompt_tokens=3, completion_tokens=2)
        )
    assert rlog.flush()
    with ro(rlog) as conn:
        by_model = {d["model"]: d for d in queries.stats_by_model(conn)["data"]}
    chat, m = by_model["chat"], by_model["m"]
    assert chat["variants"] == {
        "chat-v1": {"total": 9, "completed": 9, "failed": 0, "share": round(9 / 11, 4)},
        "chat-v2": {"total": 2, "completed": 1, "failed": 1, "share": round(2 / 11, 4)},
    }
    assert chat["overflow"] == {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    assert m["variants"] == {}
    assert m["overflow"] == {"requests": 1, "prompt_tokens": 3, "completion_tokens": 2}


def test_audit_entries(rlog: RequestLog) -> None:
    rlog.audit("admin", "key.create", "k1", {"tenant": "a", "max_priority": "high"})
    rlog.audit("admin", "model.unload", "m1", None)
    rlog.audit(None, "config.reload", None, {"when": time})  # not JSON-able: stored as str
    assert rlog.flush()
    with ro(rlog) as conn:
        page = queries.audit_entries(conn, limit=2)
        assert page["total"] == 3
        assert [e["action"] for e in page["data"]] == ["config.reload", "model.unload"]
        assert page["data"][1]["detail"] == {}
        assert isinstance(page["data"][0]["detail"]["when"], str)
        last = queries.audit_entries(conn, limit=2, offset=2)["data"]
        assert last[0]["actor"] == "admin" and last[0]["target"] == "k1"
        assert last[0]["detail"] == {"tenant": "a", "max_priority": "high"}
        assert set(last[0]) == {"id", "at", "actor", "action", "target", "detail"}


def test_parse_status_filter() -> None:
    assert parse_status_filter(404) == (404, 405)
    assert parse_status_filter("404") == (404, 405)
    assert parse_status_filter("4xx") == (400, 500)
    assert parse_status_filter("2XX") == (200, 300)
    for bad in ("6xx", "abc", "99", "600", "", "4x", True):
        with pytest.raises(ValueError):
            parse_status_filter(bad)


def test_parse_requests_query() -> None:
    got = parse_requests_query("status=4xx&model=m&limit=10&offset=20&since=1700000000")
    assert got == {"status": "4xx", "model": "m", "limit": 10, "offset": 20, "since": 1_700_000_000.0}
    assert parse_requests_query(b"?status=404&node=n1&tenant=t&key_id=k") == {
        "status": 404,
        "node": "n1",
        "tenant": "t",
        "key_id": "k",
        "limit": 100,
        "offset": 0,
    }
    assert parse_requests_query("") == {"limit": 100, "offset": 0}
    assert parse_requests_query(None) == {"limit": 100, "offset": 0}
    assert parse_requests_query("model=&status=") == {"limit": 100, "offset": 0}  # empty = not given
    assert parse_requests_query("model=a%2Fb+c")["model"] == "a/b c"
    iso = parse_requests_query("since=2023-11-14T22:13:20Z&until=2023-11-14T23:13:20%2B01:00")
    assert iso["since"] == 1_700_000_000.0 and iso["until"] == 1_700_000_000.0
    assert parse_requests_query("since=2023-11-14T22:13:20")["since"] == 1_700_000_000.0  # naive = UTC
    # every kwarg is accepted by the query function
    assert set(parse_requests_query("since=1&until=2&status=200&model=m&node=n&tenant=t&key_id=k")) <= set(
        queries.requests.__code__.co_varnames
    )


@pytest.mark.parametrize(
    ("qs", "param"),
    [
        ("status=6xx", "status"),
        ("status=20", "status"),
        ("limit=-1", "limit"),
        (f"limit={MAX_LIMIT + 1}", "limit"),
        ("limit=ten", "limit"),
        ("offset=1.5", "offset"),
        ("since=yesterday", "since"),
        ("since=nan", "since"),
        ("until=-5", "until"),
        ("since=20&until=10", "since"),
        ("modle=m", "modle"),
        ("model=a&model=b", "model"),
        ("model=" + "x" * 300, "model"),
        ("tenant=a%00b", "tenant"),
        ("&".join(f"p{i}=1" for i in range(40)), "query"),
        (b"model=\xff", "query"),
        ("model=%ff", "query"),
    ],
)
def test_parse_requests_query_rejects(qs: str | bytes, param: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_requests_query(qs)
    assert str(info.value).startswith(f"{param}: ")


def test_other_admin_queries() -> None:
    assert parse_stats_query("since=1&until=2&model=m&tenant=t") == {
        "since": 1.0,
        "until": 2.0,
        "model": "m",
        "tenant": "t",
    }
    assert parse_usage_query("tenant=t") == {"tenant": "t"}
    with pytest.raises(ValueError, match=r"^status: unknown parameter"):
        parse_usage_query("status=200")
    assert parse_audit_query("limit=5") == {"limit": 5, "offset": 0}
    with pytest.raises(ValueError, match=r"^model: "):
        parse_audit_query("model=m")
    assert parse_request_id("0123abcd" * 2) == 0x0123ABCD0123ABCD
    assert parse_request_id("18BCFE569F400001") == 0x18BCFE569F400001  # either case
    assert parse_request_id(format_request_id(rid(7))) == rid(7)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a/b",
        "0123abcd",  # too short
        "0123abcd" * 2 + "0",  # too long
        "x" * 16,
        "0x23abcd0123abcd",  # int(..., 16) would take these four
        "0123_abcd0123abc",
        " 123abcd0123abcd",
        "+123abcd0123abcd",
        "\u0660" * 16,  # a non-ASCII digit
        "r00001",  # an old text id
        "0123abcd0123abcd0123abcd0123abcd",  # a uuid4 hex
    ],
)
def test_parse_request_id_rejects_malformed_ids(bad: str) -> None:
    with pytest.raises(ValueError, match=r"^id: "):
        parse_request_id(bad)
