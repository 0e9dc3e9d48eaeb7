"""When a node is taken out of rotation and when it comes back, through what a user sees (the answers,
``/admin/status``, ``/health``), with probes slow enough not to interfere.

The rule is the README's circuit breaker: ``failure_threshold`` failed requests in a row (a 5xx
answer counts, a success starts the count again), a failed probe or a refused connection open a
node's circuit: no client request reaches it; after ``cooldown_s`` one trial (a client's request or
the next probe) closes it again if it passes. Its edges (the single trial, the doubling cool-down) are
in tests/fleet/test_fleet_health.py and, on the registry alone, tests/fleet/test_fleet_breaker.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support import call, get, node_entry, post, wait_until

OK = {"model": "m1", "prompt": "x", "max_tokens": 1}
# The node sends half its answer, then drops the connection: a failure before anything reached the
# client, and (with no retries) a 502.
FAILING = {**OK, "mock": {"fail": "mid"}}


def state(gw: Any) -> dict[str, Any]:
    """The node "n" in ``/admin/status``: its circuit, health and count of consecutive failures."""
    (node,) = call(gw.url, "GET", "/admin/status")[2]["nodes"]
    return {"circuit": node["circuit"], "healthy": node["healthy"], "failures": node["failures"]}


def generations(node: Any) -> int:
    return int(node.stats.per_path.get("/v1/completions", 0))


@pytest.mark.parametrize("threshold", [1, 3])
def test_consecutive_failed_requests_take_a_node_out(make_mock: Any, make_gateway: Any, threshold: int) -> None:
    node = make_mock(models=["m1"], chunks=2, name="n")
    gw = make_gateway(
        nodes=[node_entry(node, "n", ["m1"])],
        # No other probe and no trial during the test.
        upstream={"health_interval_s": 60, "max_retries": 0, "failure_threshold": threshold, "cooldown_s": 60},
    )
    wait_until(lambda: node.stats.per_path.get("/health", 0) == 1)  # the probe at start-up passed
    closed = {"circuit": "closed", "healthy": True}
    if threshold > 1:
        # A success starts the count again.
        assert post(gw.url, "/v1/completions", FAILING)[0] == 502
        assert state(gw) == {**closed, "failures": 1}
        assert post(gw.url, "/v1/completions", OK)[0] == 200
        assert state(gw) == {**closed, "failures": 0}
    for failures in range(1, threshold):
        assert post(gw.url, "/v1/completions", FAILING)[0] == 502
        assert state(gw) == {**closed, "failures": failures}  # still in rotation
    assert post(gw.url, "/v1/completions", FAILING)[0] == 502
    assert state(gw) == {"circuit": "open", "healthy": False, "failures": threshold}  # out
    # Out of rotation: requests no longer reach it (no other node: 503), /health counts it out.
    sent = generations(node)
    status, headers, body = post(gw.url, "/v1/completions", OK)
    assert status == 503 and json.loads(body)["error"]["code"] == "no_capacity" and "retry-after" in headers
    assert generations(node) == sent
    assert json.loads(get(gw.url, "/health")[2])["nodes_healthy"] == 0


def test_a_node_out_of_rotation_is_back_after_a_passing_probe(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=2, name="n")
    node.set_fail("status503")
    gw = make_gateway(
        nodes=[node_entry(node, "n", ["m1"])],
        upstream={"health_interval_s": 0.2, "cooldown_s": 1.0, "max_cooldown_s": 1.0},
    )
    wait_until(lambda: state(gw)["circuit"] == "open", timeout=10)  # the failed probe: out at once
    # Out (the cool-down has a second to run): requests are refused without reaching it.
    for _ in range(2):
        assert post(gw.url, "/v1/completions", OK)[0] == 503
    assert generations(node) == 0
    # Its trials (the probes, after each cool-down) fail while it does: it stays out.
    probes = node.stats.per_path["/health"]
    wait_until(lambda: node.stats.per_path["/health"] >= probes + 1, timeout=10)
    assert not state(gw)["healthy"]
    # The node recovers: the next trial passes and puts it back.
    node.set_fail(None)
    wait_until(lambda: state(gw) == {"circuit": "closed", "healthy": True, "failures": 0}, timeout=10)
    status, headers, _ = post(gw.url, "/v1/completions", OK)
    assert status == 200 and headers["x-shardon-node"] == "n"
