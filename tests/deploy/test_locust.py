"""bench/locustfile.py, run headless for a bounded time against Shardon and two mock nodes.

50 users, three teams (one key each), for 20 s: no failure, a minimum number of requests, and the
time to first token and inter-token time reported as locust metrics next to the requests' own.
Locust runs in a subprocess (it patches the standard library with gevent).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import node_entry

ROOT = Path(__file__).resolve().parents[2]
USERS = 50
RUN_TIME_S = 20
KEYS = ["sk-load-a", "sk-load-b", "sk-load-c"]


@pytest.mark.parametrize("engine", ["native"])
@pytest.mark.timeout(180)
def test_locust_headless_run(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    nodes = [make_mock(models=["m1"], chunks=16, delay_ms=20, name=f"n{i}") for i in range(2)]
    tenants = [
        {"name": f"team-{i}", "weight": i + 1, "keys": [{"key": key, "max_priority": "high"}]}
        for i, key in enumerate(KEYS)
    ]
    gw = make_gateway(
        nodes=[node_entry(node, f"n{i}", ["m1"], max_concurrent=32) for i, node in enumerate(nodes)],
        tenants=tenants,
    )
    prefix = tmp_path / "locust"
    env = dict(
        os.environ,
        SHARDON_LOCUST_MODEL="m1",
        SHARDON_LOCUST_KEYS=",".join(KEYS),
        SHARDON_LOCUST_SEED="7",
    )
    argv = [sys.executable, "-m", "locust", "-f", str(ROOT / "bench" / "locustfile.py"), "--headless"]
    argv += ["-u", str(USERS), "-r", str(USERS), "-t", f"{RUN_TIME_S}s", "--stop-timeout", "10"]
    argv += ["--host", gw.url, "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING"]
    result = subprocess.run(
        argv,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    with open(f"{prefix}_stats.csv", newline="") as fh:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(fh)}

    total = rows[("", "Aggregated")]
    assert int(total["Failure Count"]) == 0, result.stderr[-4000:]
    requests = sum(int(r["Request Count"]) for (kind, _), r in rows.items() if kind == "POST")
    assert requests >= 300, rows.keys()
    assert {name for kind, name in rows if kind == "POST"} >= {
        "/v1/chat/completions",
        "/v1/chat/completions (stream)",
        "/v1/completions (stream)",
    }
    ttft = rows[("TTFT", "/v1/chat/completions (stream)")]
    itl = rows[("ITL", "/v1/chat/completions (stream)")]
    streams = int(rows[("POST", "/v1/chat/completions (stream)")]["Request Count"])
    # One first token per stream (a stream cut by the end of the run may have reported its own).
    assert streams <= int(ttft["Request Count"]) <= streams + USERS
    assert int(itl["Request Count"]) >= streams * 10  # 15 gaps per 16-token stream
    # The node spaces tokens 20 ms apart: the gaps locust saw are about that, the first token sooner
    # than the whole answer.
    assert 10 <= float(itl["Median Response Time"]) <= 200, itl
    assert float(ttft["Median Response Time"]) < float(
        rows[("POST", "/v1/chat/completions (stream)")]["Median Response Time"]
    )
