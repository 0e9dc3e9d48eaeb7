"""When a node is taken out of rotation and when it comes back, through what a user sees (the answers,
``/admin/status``, ``/health``), with health checks slow enough not to interfere.

The rule is the README's: "three consecutive failures take a node out of rotation until a health
check passes" (failed requests and failed checks alike). It is tested here, in one place, so that a
change of the rule (a circuit breaker with a half-open trial) changes this module alone.
"""

from __future__ import annotations

import json
from typing import Any

from tests.support import call, get, node_entry, post, wait_until

OK = {"model": "m1", "prompt": "x", "max_tokens": 1}
# The node sends half its answer, then drops the connection: a failure before anything reached the
# client, and (with no retries) a 502.
FAILING = {**OK, "mock": {"fail": "mid"}}


def state(gw: Any) -> dict[str, Any]:
    """The node "n" in ``/admin/status``: its health and its count of consecutive failures."""
    (node,) = call(gw.url, "GET", "/admin/status")[2]["nodes"]
    return {"healthy": node["healthy"], "failures": node["failures"]}


def generations(node: Any) -> int:
    return int(node.stats.per_path.get("/v1/completions", 0))


def test_three_consecutive_failures_take_a_node_out(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=2, name="n")
    node.set_fail("status503")  # the check at start-up fails: one failure
    gw = make_gateway(
        nodes=[node_entry(node, "n", ["m1"])],
        upstream={"health_interval_s": 60, "max_retries": 0},  # no other check during the test
    )
    wait_until(lambda: state(gw) == {"healthy": True, "failures": 1})
    node.set_fail(None)
    # A failed request counts with the failed check; a success starts the count again.
    assert post(gw.url, "/v1/completions", FAILING)[0] == 502
    assert state(gw) == {"healthy": True, "failures": 2}
    assert post(gw.url, "/v1/completions", OK)[0] == 200
    assert state(gw) == {"healthy": True, "failures": 0}
    for failures in (1, 2):
        assert post(gw.url, "/v1/completions", FAILING)[0] == 502
        assert state(gw) == {"healthy": True, "failures": failures}  # still in rotation
    assert post(gw.url, "/v1/completions", FAILING)[0] == 502
    assert state(gw) == {"healthy": False, "failures": 3}  # the third in a row: out
    # Out of rotation: requests no longer reach it (no other node: 503), /health counts it out.
    sent = generations(node)
    status, headers, body = post(gw.url, "/v1/completions", OK)
    assert status == 503 and json.loads(body)["error"]["code"] == "no_capacity" and "retry-after" in headers
    assert generations(node) == sent
    assert json.loads(get(gw.url, "/health")[2])["nodes_healthy"] == 0


def test_a_node_out_of_rotation_is_back_after_a_passing_check(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=2, name="n")
    node.set_fail("status503")
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])], upstream={"health_interval_s": 0.5})
    wait_until(lambda: not state(gw)["healthy"], timeout=10)  # three failed checks
    # While its checks fail it stays out: requests are refused without reaching it.
    checks = node.stats.per_path["/v1/models"]
    for _ in range(2):
        assert post(gw.url, "/v1/completions", OK)[0] == 503
    wait_until(lambda: node.stats.per_path["/v1/models"] >= checks + 2, timeout=10)
    assert not state(gw)["healthy"] and generations(node) == 0
    # The node recovers: the next check passes and puts it back.
    node.set_fail(None)
    wait_until(lambda: state(gw) == {"healthy": True, "failures": 0}, timeout=10)
    status, headers, _ = post(gw.url, "/v1/completions", OK)
    assert status == 200 and headers["x-shardon-node"] == "n"
