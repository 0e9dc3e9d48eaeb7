"""A managed model's max_tokens default and cap, and chat refused on a base model: the rule, then
end to end (the body the backend receives, the request log, /v1/models) on both engines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from shardon.errors import BadRequest
from shardon.lifecycle.catalog import CatalogEntry
from shardon.lifecycle.requests import applied_max_tokens, shape_request
from shardon.schemas import routing_decoder
from tests.lifecycle.helpers import fake_command
from tests.support import call, wait_until

CHAT = "/v1/chat/completions"


def entry(**kw: Any) -> CatalogEntry:
    kw.setdefault("default_max_tokens", 64)
    kw.setdefault("max_tokens_cap", 128)
    return CatalogEntry(name="m", aliases=(), backend="llama-cpp-python", files={"DEFAULT": "/x"}, **kw)


def shape(e: CatalogEntry, body: dict[str, Any], path: str = CHAT) -> tuple[int | None, bytes, bytes]:
    raw = orjson.dumps(body)
    applied, out = shape_request(e, path, routing_decoder.decode(raw), raw)
    return applied, raw, out


@pytest.mark.parametrize(
    ("requested", "default", "cap", "applied"),
    [
        (None, 64, 128, 64),  # none asked: the default
        (100, 64, 128, 100),  # under the cap: as asked
        (128, 64, 128, 128),
        (500, 64, 128, 128),  # over the cap: the cap
        (None, None, 128, 128),  # no default: the cap
        (None, None, None, None),  # neither: left to the backend
        (5000, 64, None, 5000),  # no cap
    ],
)
def test_applied_max_tokens(requested: int | None, default: int | None, cap: int | None, applied: int | None) -> None:
    assert applied_max_tokens(requested, default, cap) == applied


def test_a_request_without_max_tokens_gets_the_default_and_keeps_everything_else() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "cache_prompt": True, "seed": 7}
    applied, _, out = shape(entry(), body)
    assert applied == 64
    assert orjson.loads(out) == {**body, "max_tokens": 64}


def test_a_body_that_already_says_the_value_is_forwarded_as_the_clients_bytes() -> None:
    raw = b'{"model": "m",  "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}'
    applied, out = shape_request(entry(), CHAT, routing_decoder.decode(raw), raw)
    assert applied == 100 and out is raw


def test_over_the_cap_is_lowered_to_it() -> None:
    applied, _, out = shape(entry(), {"model": "m", "prompt": "x", "max_tokens": 4096}, "/v1/completions")
    assert applied == 128 and orjson.loads(out)["max_tokens"] == 128


def test_max_completion_tokens_is_read_and_both_names_are_set() -> None:
    applied, _, out = shape(entry(), {"model": "m", "messages": [], "max_completion_tokens": 1000})
    assert applied == 128
    assert orjson.loads(out) == {"model": "m", "messages": [], "max_completion_tokens": 128, "max_tokens": 128}
    # OpenAI's newer name wins when both are given.
    applied, _, out = shape(entry(), {"model": "m", "messages": [], "max_completion_tokens": 10, "max_tokens": 99})
    assert applied == 10 and orjson.loads(out)["max_tokens"] == 10


def test_no_default_and_no_cap_leaves_the_body_alone() -> None:
    applied, raw, out = shape(entry(default_max_tokens=None, max_tokens_cap=None), {"model": "m", "messages": []})
    assert applied is None and out is raw


def test_embeddings_are_left_alone() -> None:
    applied, raw, out = shape(entry(), {"model": "m", "input": "x"}, "/v1/embeddings")
    assert applied is None and out == raw


def test_request_defaults_fill_only_what_the_client_left_out() -> None:
    tuned = entry(request_defaults=(("temperature", 0.2), ("top_p", 0.9)))
    applied, _, out = shape(tuned, {"model": "m", "messages": [], "temperature": 0})
    assert applied == 64
    assert orjson.loads(out) == {"model": "m", "messages": [], "temperature": 0, "max_tokens": 64, "top_p": 0.9}
    raw = b'{"model":"m","messages":[],"temperature":1,"top_p":1,"max_tokens":9}'
    assert shape_request(tuned, CHAT, routing_decoder.decode(raw), raw) == (9, raw)  # nothing to add: as sent
    # Without a max_tokens rule the defaults still apply.
    bare = entry(default_max_tokens=None, max_tokens_cap=None, request_defaults=(("temperature", 0.2),))
    applied, _, out = shape(bare, {"model": "m", "prompt": "x"}, "/v1/completions")
    assert applied is None and orjson.loads(out) == {"model": "m", "prompt": "x", "temperature": 0.2}


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_below_one_is_a_bad_request(field: str) -> None:
    with pytest.raises(BadRequest, match=f"{field} must be at least 1") as info:
        shape(entry(), {"model": "m", "messages": [], field: 0})
    assert info.value.param == field


def test_a_base_model_refuses_chat_but_completes() -> None:
    base = entry(chat=False)
    with pytest.raises(BadRequest, match="base model") as info:
        shape(base, {"model": "m", "messages": []})
    assert info.value.param == "model"
    assert shape(base, {"model": "m", "prompt": "x"}, "/v1/completions")[0] == 64


# ------------------------------------------------------------------------------------ end to end


def _post(url: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    return call(url, "POST", path, body)


def test_gateway_applies_the_models_max_tokens_and_logs_it(make_gateway: Any, tiny_gguf: str, tmp_path: Path) -> None:
    model = {"path": tiny_gguf, "command": fake_command(), "memory_mb": 100, "context": 1024}
    gw = make_gateway(
        models=[
            {
                "name": "chatty",
                **model,
                "default_max_tokens": 64,
                "max_tokens_cap": 128,
                "request_defaults": {"seed": 7},
            },
            {"name": "base", **model, "chat": False},
        ],
        models_dir=str(tmp_path / "empty"),
        scheduler={"queue_timeout_s": 30},
    )
    listed = {m["id"]: m for m in call(gw.url, "GET", "/v1/models")[2]["data"]}
    assert listed["chatty"] == {
        "id": "chatty",
        "object": "model",
        "created": listed["chatty"]["created"],
        "owned_by": "shardon",
        "context_length": 1024,
        "loaded": False,
        "chat": True,
    }
    assert listed["base"]["chat"] is False

    messages = [{"role": "user", "content": "hi"}]
    sent: dict[int | None, Any] = {}
    for asked in (None, 100, 4096):
        body: dict[str, Any] = {"model": "chatty", "messages": messages}
        if asked is not None:
            body["max_tokens"] = asked
        status, headers, answer = _post(gw.url, CHAT, body)
        assert status == 200, answer
        sent[asked] = (headers["x-request-id"], json.loads(answer["received"]))
    assert sent[None][1] == {"model": "chatty", "messages": messages, "max_tokens": 64, "seed": 7}
    assert sent[100][1] == {"model": "chatty", "messages": messages, "max_tokens": 100, "seed": 7}
    assert sent[4096][1] == {"model": "chatty", "messages": messages, "max_tokens": 128, "seed": 7}
    for asked, applied in ((None, 64), (100, 100), (4096, 128)):
        rid = sent[asked][0]
        row = wait_until(lambda rid=rid: (r := call(gw.url, "GET", f"/admin/requests/{rid}"))[0] == 200 and r[2])
        assert row["max_tokens"] == applied

    # Loaded now, and /v1/models says so.
    listed = {m["id"]: m for m in call(gw.url, "GET", "/v1/models")[2]["data"]}
    assert listed["chatty"]["loaded"] is True and listed["base"]["loaded"] is False

    status, _, error = _post(gw.url, CHAT, {"model": "base", "messages": messages})
    assert status == 400 and error["error"]["param"] == "model" and "base model" in error["error"]["message"]
    status, _, answer = _post(gw.url, "/v1/completions", {"model": "base", "prompt": "Once"})
    assert status == 200 and json.loads(answer["received"])["max_tokens"] == 512  # ModelConfig's default


def test_the_official_client_reads_the_model_list(make_gateway: Any, tiny_gguf: str, tmp_path: Path) -> None:
    import openai

    gw = make_gateway(
        models=[{"name": "chatty", "path": tiny_gguf, "command": fake_command(), "memory_mb": 100, "context": 512}],
        models_dir=str(tmp_path / "empty"),
    )
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0) as client:
        (model,) = client.models.list().data
    assert model.id == "chatty" and model.owned_by == "shardon"
    assert model.model_extra == {"context_length": 512, "loaded": False, "chat": True}
