"""The load the nodes report (vLLM and llama.cpp /metrics, llama.cpp /slots), read and balanced on."""

from __future__ import annotations

import concurrent.futures
from collections import Counter
from pathlib import Path
from typing import Any

from tests.fleet.fleet_helpers import ADMIN, call, chat, node_state
from tests.support import node_entry, wait_until

VLLM = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="m1"}} {running}
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="m1"}} {waiting}
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="m1"}} {kv}
vllm:prompt_tokens_total{{engine="0",model_name="m1"}} 12345.0
"""

LLAMA = """# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 3
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 5
llamacpp:kv_cache_usage_ratio 0.25
"""


def config(tmp_path: Path, *nodes: dict[str, Any]) -> dict[str, Any]:
    return {
        "nodes": list(nodes),
        "auth": {"admin_keys": [ADMIN]},
        "store": {"path": str(tmp_path / "fleet.db")},
        "upstream": {"load_interval_s": 0.1},
    }


def test_a_node_reporting_a_full_queue_gets_fewer_requests(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    busy = make_mock(models=["m1"], name="busy", ttft_ms=300)
    idle = make_mock(models=["m1"], name="idle", ttft_ms=300)
    busy.node.reported.metrics = VLLM.format(running=8, waiting=20, kv=0.97)  # other clients fill it
    idle.node.reported.metrics = VLLM.format(running=0, waiting=0, kv=0.0)
    gw = make_gateway(
        config(
            tmp_path,
            node_entry(busy, "busy", ["m1"], max_concurrent=8),
            node_entry(idle, "idle", ["m1"], max_concurrent=8),
        )
    )
    load = wait_until(lambda: node_state(gw, "busy")["load"])
    assert load["source"] == "vllm /metrics"
    assert (load["running"], load["waiting"], load["kv_cache_usage"]) == (8, 20, 0.97)
    assert wait_until(lambda: node_state(gw, "idle")["load"])["waiting"] == 0

    pool = concurrent.futures.ThreadPoolExecutor(12)
    results = list(pool.map(lambda _: chat(gw.url, max_tokens=1), range(12)))
    pool.shutdown()
    assert all(status == 200 for status, _, _ in results)
    served = Counter(headers["x-shardon-node"] for _, headers, _ in results)
    assert served["busy"] < served["idle"], served  # same weight and capacity: the load made the difference

    status, _, metrics = call(gw.url, "GET", "/metrics")
    assert status == 200
    text = metrics.decode()
    assert 'shardon_node_reported_requests{node="busy",state="waiting"} 20.0' in text
    assert 'shardon_node_kv_cache_usage{node="busy"} 0.97' in text
    assert 'shardon_node_circuit{node="busy"} 0.0' in text

    # The node frees up: its reported load is read again, and it gets its share.
    busy.node.reported.metrics = VLLM.format(running=0, waiting=0, kv=0.1)
    wait_until(lambda: node_state(gw, "busy")["load"]["waiting"] == 0)
    assert gw.call(lambda: gw.gateway.scheduler.balancer.load(gw.gateway.registry.nodes["busy"].index)) == 0


def test_llama_cpp_metrics_and_slots(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    metrics = make_mock(models=["m1"], name="metrics")
    slots = make_mock(models=["m1"], name="slots")
    silent = make_mock(models=["m1"], name="silent")
    metrics.node.reported.metrics = LLAMA
    slots.node.reported.slots = [
        {"id": 0, "id_task": 7, "n_ctx": 4096, "is_processing": True},
        {"id": 1, "id_task": -1, "n_ctx": 4096, "is_processing": False},
        {"id": 2, "id_task": 9, "n_ctx": 4096, "is_processing": True},
    ]
    gw = make_gateway(
        config(
            tmp_path,
            node_entry(metrics, "metrics", ["m1"]),
            node_entry(slots, "slots", ["m1"]),
            node_entry(silent, "silent", ["m1"]),
        )
    )
    load = wait_until(lambda: node_state(gw, "metrics")["load"])
    assert (load["source"], load["running"], load["waiting"], load["kv_cache_usage"]) == (
        "llama.cpp /metrics",
        3,
        5,
        0.25,
    )
    load = wait_until(lambda: node_state(gw, "slots")["load"])
    assert (load["source"], load["running"], load["slots"]) == ("llama.cpp /slots", 2, 3)
    # A node that reports nothing is asked once, not on every round.
    wait_until(lambda: silent.stats.per_path.get("/slots", 0) >= 1)
    asked = silent.stats.per_path.get("/metrics", 0)
    wait_until(lambda: metrics.stats.per_path.get("/metrics", 0) >= 5)
    assert silent.stats.per_path.get("/metrics", 0) == asked == 1
    assert node_state(gw, "silent")["load"] is None
