"""``GET /admin/overview`` agrees with ``/admin/stats`` and shows what is in flight, on both engines."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import pytest

from shardon.web.overview import parse_overview_query
from tests.support import node_entry, post, wait_until
from tests.web.helpers import ADMIN, TEAM_KEY, admin, chat


@pytest.fixture
def site(make_mock: Any, make_gateway: Any) -> Any:
    a = make_mock(models=["m1", "m2"], chunks=6, name="a")
    b = make_mock(models=["m1"], chunks=6, name="b")
    return make_gateway(
        nodes=[
            node_entry(a, "node-a", ["m1", "m2"], max_concurrent=4),
            node_entry(b, "node-b", ["m1"], max_concurrent=2),
        ],
        auth={"admin_keys": [ADMIN]},
        tenants=[{"name": "team", "keys": [{"key": TEAM_KEY, "id": "team-1"}]}],
    )


def test_totals_models_nodes_and_series_agree_with_the_request_log(site: Any) -> None:
    gw = site
    for i in range(9):
        assert chat(gw.url, TEAM_KEY, model="m1" if i % 3 else "m2", stream=i % 2 == 0).status == 200
    assert chat(gw.url, "sk-wrong").status == 401
    assert chat(gw.url, TEAM_KEY, model="nope").status == 404
    view = admin(gw.url, "/admin/overview?window=600&points=30").json()
    assert view["window_s"] == 600 and view["step_s"] == 20 and len(view["series"]["t"]) == 30
    stats = admin(gw.url, f"/admin/stats?since={view['since']!r}").json()
    totals = view["totals"]
    assert totals["requests"] == stats["total"] == 11
    assert totals["failed"] == stats["failed"] == 2
    assert totals["completed"] == stats["completed"] == 9
    assert totals["prompt_tokens"] == stats["tokens"]["prompt"]
    assert totals["completion_tokens"] == stats["tokens"]["completion"] == 9 * 4
    assert totals["ttft_ms"] == {"p50": stats["ttft_ms"]["p50"], "p99": stats["ttft_ms"]["p99"]}
    assert totals["ttft_ms"]["p50"] is not None
    # Per model: the two models and the requests that named no known one.
    by_model = {m["model"]: m for m in view["models"]}
    assert by_model["m1"]["requests"] == 6 and by_model["m2"]["requests"] == 3
    per_model = {m["model"]: m for m in admin(gw.url, f"/admin/stats/models?since={view['since']!r}").json()["data"]}
    for name in ("m1", "m2"):
        assert by_model[name]["ttft_ms"]["p50"] == per_model[name]["ttft_ms"]["p50"]
        assert by_model[name]["ttft_ms"]["p99"] == per_model[name]["ttft_ms"]["p99"]
        assert by_model[name]["queued"] == 0
    # Per node: live nodes with their capacity, and what each served.
    by_node = {n["node"]: n for n in view["nodes"]}
    assert by_node["node-a"]["capacity"] == 4 and by_node["node-b"]["capacity"] == 2
    assert by_node["node-a"]["healthy"] is True and by_node["node-a"]["live"] is True
    served = {row["node_id"] for row in admin(gw.url, "/admin/requests?status=200").json()["data"]}
    assert by_node["node-a"]["requests"] + by_node["node-b"]["requests"] == 9
    assert {n for n, e in by_node.items() if e["requests"] and n} == served
    assert view["capacity"] == 6
    # The series add up to the totals; the last minute holds every request.
    series = view["series"]
    assert sum(series["requests"]) == 11 and sum(series["failed"]) == 2
    assert sum(series["tokens"]) == totals["tokens"]
    assert view["recent"]["requests"] == 11
    assert view["recent"]["requests_per_s"] == pytest.approx(11 / view["recent"]["seconds"])
    assert series["t"][0] == view["since"] and series["t"][-1] <= view["now"]


def test_in_flight_and_queued_are_shown_while_they_last(site: Any) -> None:
    gw = site
    admin(gw.url, "/admin/overview")  # starts sampling
    held = {"mock": {"hold": True}}  # each held at the node until the test lets it go
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(chat, gw.url, TEAM_KEY, model="m2", **held) for _ in range(6)]
        # m2 lives on node-a alone (4 slots): 4 run, 2 wait; the samples (every 2 s) see it too.
        view = wait_until(
            lambda: (
                (v := admin(gw.url, "/admin/overview").json())["in_flight"] == 6
                and v["queued"] == 2
                and max((x for x in v["series"]["in_flight"] if x is not None), default=0) == 6
                and max((x for x in v["series"]["queued"] if x is not None), default=0) == 2
                and v
            ),
            timeout=15,
        )
        by_node = {n["node"]: n for n in view["nodes"]}
        assert by_node["node-a"]["in_flight"] == 4 and by_node["node-b"]["in_flight"] == 0
        assert {m["model"]: m["queued"] for m in view["models"]}["m2"] == 2
        node_a = gw.call(lambda: gw.gateway.registry.nodes["node-a"].config.url)
        assert post(node_a, "/mock/gate", {"action": "open"})[0] == 200
        assert [f.result().status for f in futures] == [200] * 6
    after = admin(gw.url, "/admin/overview").json()
    assert after["in_flight"] == 0 and after["queued"] == 0
    assert after["totals"]["requests"] == 6


def test_samples_are_kept_between_calls(site: Any) -> None:
    gw = site
    admin(gw.url, "/admin/overview")
    overview = gw.gateway.ui.overview
    first = len(gw.call(lambda: list(overview.samples)))
    wait_until(lambda: len(gw.call(lambda: list(overview.samples))) > first, timeout=5)


def test_bad_parameters_are_400s_naming_the_parameter(site: Any) -> None:
    gw = site
    for query, param in (("window=5", "window"), ("points=1", "points"), ("window=x", "window"), ("since=1", "since")):
        resp = admin(gw.url, f"/admin/overview?{query}")
        assert resp.status == 400, query
        assert resp.json()["error"]["param"] == param


def test_query_parsing() -> None:
    assert parse_overview_query("") == (900, 60)
    assert parse_overview_query(b"window=3600&points=120") == (3600, 120)
    assert parse_overview_query("window=") == (900, 60)
    with pytest.raises(ValueError, match="window: given more than once"):
        parse_overview_query("window=60&window=120")
    with pytest.raises(ValueError, match="points: must be an integer between 2 and 360"):
        parse_overview_query("points=1000")


def test_a_quiet_gateway_has_an_empty_picture(site: Any) -> None:
    view = admin(site.url, "/admin/overview").json()
    assert view["totals"]["requests"] == 0 and view["totals"]["ttft_ms"] == {"p50": None, "p99": None}
    assert view["recent"]["requests_per_s"] == 0
    assert [m["model"] for m in view["models"]] == ["m1", "m2"]
    assert sum(view["series"]["requests"]) == 0 and all(v is None for v in view["series"]["ttft_p50"])
    assert time.time() - view["now"] < 5
