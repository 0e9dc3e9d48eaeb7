"""The official openai client, unchanged but for its base URL, through Shardon to mock nodes."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.support import node_entry


@pytest.fixture
def setup(make_mock: Any, make_gateway: Any) -> Any:
    node = make_mock(models=["m1"], chunks=5, name="n1")
    gw = make_gateway(nodes=[node_entry(node, "n1", ["m1"], max_concurrent=4)])
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=10)
    yield node, gw, client
    client.close()


def test_chat_non_streaming(setup: Any) -> None:
    node, _, client = setup
    resp = client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert resp.choices[0].message.content == "tok0 tok1 tok2 "
    assert resp.model == "m1"
    assert resp.usage is not None and resp.usage.completion_tokens == 3
    assert node.stats.per_path["/v1/chat/completions"] == 1


def test_chat_streaming(setup: Any) -> None:
    _, _, client = setup
    stream = client.chat.completions.create(
        model="m1",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text = ""
    usage = None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == "".join(f"tok{i} " for i in range(5))
    assert usage is not None and usage.completion_tokens == 5


def test_completions_both_ways(setup: Any) -> None:
    _, _, client = setup
    resp = client.completions.create(model="m1", prompt="once upon", max_tokens=2)
    assert resp.choices[0].text == "tok0 tok1 "
    pieces = [c.choices[0].text for c in client.completions.create(model="m1", prompt="x", stream=True) if c.choices]
    assert "".join(pieces) == "".join(f"tok{i} " for i in range(5))


def test_embeddings(setup: Any) -> None:
    _, _, client = setup
    resp = client.embeddings.create(model="m1", input=["a", "b"])
    assert len(resp.data) == 2
    assert len(resp.data[0].embedding) == 8
    assert resp.data[0].embedding != resp.data[1].embedding


def test_models_lists_every_configured_model(make_mock: Any, make_gateway: Any) -> None:
    a = make_mock(models=["m1", "m2"])
    b = make_mock(models=["m3"])
    gw = make_gateway(nodes=[node_entry(a, "a", ["m1", "m2"]), node_entry(b, "b", {"public-3": "m3"})])
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0) as client:
        ids = sorted(m.id for m in client.models.list())
    assert ids == ["m1", "m2", "public-3"]


def test_unknown_model_is_openai_not_found(setup: Any) -> None:
    _, _, client = setup
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404
    body: Any = info.value.body
    assert body["code"] == "model_not_found" and body["param"] == "model"
