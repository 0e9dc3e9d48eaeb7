"""A model whose backend fails to load answers 503 (``model_load_failed``), end to end, on every
request path: a backend that never gets ready (stall detection) and one that exits at once. The
backend is tests/lifecycle/fake_backend.py: no llama-cpp-python needed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.lifecycle.helpers import fake_command
from tests.support import call, post, rows


@pytest.mark.parametrize("mode", ["stall", "crash"])
def test_a_failed_load_answers_503(make_gateway: Any, tmp_path: Path, mode: str) -> None:
    model = tmp_path / "fake.gguf"
    model.write_bytes(b"GGUF")
    gw = make_gateway(
        models=[
            {
                "name": "stuck",
                "path": str(model),
                "memory_mb": 10,
                "stall_timeout_s": 1,
                "ready_timeout_s": 5,
                "command": fake_command(mode),
            }
        ],
        models_dir=str(tmp_path / "empty"),
        scheduler={"queue_timeout_s": 30},
    )
    started = time.monotonic()
    body = {"model": "stuck", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    status, _, raw = post(gw.url, "/v1/chat/completions", body)
    assert status == 503
    err = json.loads(raw)["error"]
    assert err["code"] == "model_load_failed" and "stuck" in err["message"]
    assert time.monotonic() - started < 20  # the load's own limits, not the 30 s queue deadline
    (model_row,) = call(gw.url, "GET", "/admin/models")[2]["data"]
    assert model_row["state"] == "failed"
    (logged,) = rows(gw.url)["data"]
    assert logged["status"] == 503 and logged["error_type"] == "model_load_failed"
