"""Health: active probes, the circuit breaker (open, half-open with one trial, closed), a node dying."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

from tests.fleet.fleet_helpers import ADMIN, call, chat, node_state, wait_circuit
from tests.support import node_entry, wait_until


def config(tmp_path: Path, *nodes: dict[str, Any], **upstream: Any) -> dict[str, Any]:
    return {
        "nodes": list(nodes),
        "auth": {"admin_keys": [ADMIN]},
        "store": {"path": str(tmp_path / "fleet.db")},
        "upstream": {"load_interval_s": 60, **upstream},
    }


def probed(node: Any) -> None:
    """Until the gateway's first probe reached the node (a failure set before it would count)."""
    wait_until(lambda: node.stats.per_path.get("/health", 0) >= 1)


def test_a_killed_node_leaves_rotation_within_one_probe_interval(
    make_mock: Any, make_gateway: Any, tmp_path: Path
) -> None:
    doomed = make_mock(models=["m1"], name="doomed")
    other = make_mock(models=["m1"], name="other")
    interval, timeout = 1.0, 0.5
    gw = make_gateway(
        config(
            tmp_path,
            node_entry(doomed, "doomed", ["m1"]),
            node_entry(other, "other", ["m1"]),
            health_interval_s=interval,
            health_timeout_s=timeout,
        )
    )
    probed(doomed)
    doomed.stop()
    killed = time.monotonic()
    state = wait_circuit(gw, "doomed", "open", timeout=10)
    # No request was made: the probe found it, within one interval (and its timeout).
    assert time.monotonic() - killed < interval + timeout + 2.0  # (slack for a loaded machine)
    assert state["healthy"] is False and "health check" in state["last_error"]
    for _ in range(4):
        status, headers, _ = chat(gw.url)
        assert status == 200 and headers["x-shardon-node"] == "other"


def test_a_dying_nodes_queued_requests_complete_elsewhere(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    doomed = make_mock(models=["m1"], name="doomed", ttft_ms=400)
    other = make_mock(models=["m1"], name="other", ttft_ms=100)
    gw = make_gateway(
        config(
            tmp_path,
            node_entry(doomed, "doomed", ["m1"], max_concurrent=1),
            node_entry(other, "other", ["m1"], max_concurrent=1),
            health_interval_s=0.5,
        ),
        scheduler={"queue_timeout_s": 30},
    )
    probed(doomed)
    pool = concurrent.futures.ThreadPoolExecutor(8)
    futures = [pool.submit(chat, gw.url, max_tokens=1) for _ in range(8)]
    wait_until(lambda: doomed.stats.in_flight == 1 and gw.call(lambda: gw.gateway.scheduler.routes["m1"].waiting) >= 4)
    doomed.stop()  # its running request is cut, its queued ones are still to come
    results = [f.result(30) for f in futures]
    pool.shutdown()
    assert [status for status, _, _ in results] == [200] * 8
    assert sum(1 for _, headers, _ in results if headers["x-shardon-node"] == "other") >= 7
    wait_circuit(gw, "doomed", "open")
    rows = wait_until(lambda: [r for r in call(gw.url, "GET", "/admin/requests?limit=50")[2]["data"]] or None)
    assert any(r["retries"] >= 1 for r in rows)  # the one cut on the dying node was retried


def test_the_breaker_opens_half_opens_with_one_trial_and_closes(
    make_mock: Any, make_gateway: Any, tmp_path: Path
) -> None:
    node = make_mock(models=["m1"], name="n")
    gw = make_gateway(
        config(
            tmp_path,
            node_entry(node, "n", ["m1"], max_concurrent=4),
            health_interval_s=60,
            failure_threshold=2,
            cooldown_s=0.5,
            max_retries=0,
        )
    )
    probed(node)
    node.set_fail("status500")
    assert chat(gw.url)[0] == 500
    assert node_state(gw, "n")["circuit"] == "closed"  # one failure: not yet
    assert chat(gw.url)[0] == 500
    state = node_state(gw, "n")
    assert state["circuit"] == "open" and state["cooldown_s"] == 0.5 and state["failures"] == 2
    sent = node.stats.per_path["/v1/chat/completions"]
    status, _, err = chat(gw.url)
    assert status == 503 and err["error"]["code"] == "no_capacity"
    assert node.stats.per_path["/v1/chat/completions"] == sent  # no client request to an open node

    node.set_fail(None)
    wait_circuit(gw, "n", "half_open")
    pool = concurrent.futures.ThreadPoolExecutor(3)
    trial = pool.submit(chat, gw.url, mock={"ttft_ms": 800})
    wait_until(lambda: node.stats.in_flight == 1)
    others = [pool.submit(chat, gw.url) for _ in range(2)]
    wait_until(lambda: gw.call(lambda: gw.gateway.scheduler.routes["m1"].waiting) == 2)
    assert node.stats.per_path["/v1/chat/completions"] == sent + 1  # exactly one trial went
    assert node_state(gw, "n")["circuit"] == "half_open"
    assert trial.result(10)[0] == 200
    assert [f.result(10)[0] for f in others] == [200, 200]  # queued behind the trial, then served
    pool.shutdown()
    state = node_state(gw, "n")
    assert state["circuit"] == "closed" and state["healthy"] is True and state["failures"] == 0
    assert node.stats.per_path["/v1/chat/completions"] == sent + 3


def test_a_failed_trial_doubles_the_cooldown(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    node = make_mock(models=["m1"], name="n")
    gw = make_gateway(
        config(
            tmp_path,
            node_entry(node, "n", ["m1"]),
            health_interval_s=60,
            failure_threshold=1,
            cooldown_s=0.2,
            max_cooldown_s=0.5,
            max_retries=0,
        )
    )
    probed(node)
    node.set_fail("status500")
    assert chat(gw.url)[0] == 500
    cooldowns = [node_state(gw, "n")["cooldown_s"]]
    for _ in range(3):
        wait_circuit(gw, "n", "half_open")
        assert chat(gw.url)[0] == 500  # the trial fails
        state = node_state(gw, "n")
        assert state["circuit"] == "open"
        cooldowns.append(state["cooldown_s"])
    assert cooldowns == [0.2, 0.4, 0.5, 0.5]  # doubled each time, up to max_cooldown_s
    node.set_fail(None)
    wait_circuit(gw, "n", "half_open")
    assert chat(gw.url)[0] == 200
    state = node_state(gw, "n")
    assert state["circuit"] == "closed" and state["cooldown_s"] == 0


def test_without_client_requests_the_probe_is_the_trial(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    node = make_mock(models=["m1"], name="n")
    gw = make_gateway(
        config(tmp_path, node_entry(node, "n", ["m1"]), health_interval_s=0.1, cooldown_s=0.2, max_cooldown_s=0.2)
    )
    probed(node)
    node.set_fail("status503")  # llama.cpp's answer while it loads a model
    state = wait_circuit(gw, "n", "open")
    assert "answered 503" in state["last_error"]
    probes = node.stats.per_path["/health"]
    wait_until(lambda: node.stats.per_path["/health"] >= probes + 2)  # half-open: the probe took the trial
    assert node_state(gw, "n")["circuit"] in ("open", "half_open")
    node.set_fail(None)
    wait_circuit(gw, "n", "closed")
    assert "/v1/chat/completions" not in node.stats.per_path
    assert chat(gw.url)[0] == 200


def test_a_node_without_health_is_probed_on_its_model_list(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    node = make_mock(models=["m1"], name="bare")
    node.node.reported.health = False  # a 404 on /health, like llama-cpp-python's server or a hosted API
    gw = make_gateway(config(tmp_path, node_entry(node, "bare", ["m1"]), health_interval_s=0.1))
    wait_until(lambda: node.stats.per_path.get("/v1/models", 0) >= 2)
    assert node.stats.per_path["/health"] == 1  # asked once
    assert node_state(gw, "bare")["circuit"] == "closed"
    assert chat(gw.url)[0] == 200
