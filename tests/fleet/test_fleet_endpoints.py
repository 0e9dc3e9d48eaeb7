"""Every OpenAI endpoint a node serves, through the official openai client (both engines)."""

from __future__ import annotations

import hashlib
import http.client
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.fleet.fleet_helpers import ADMIN, call
from tests.support import node_entry, wait_until

MIB = 1 << 20


@pytest.fixture
def setup(make_mock: Any, make_gateway: Any, tmp_path: Path) -> Any:
    node = make_mock(models=["m1", "whisper-real"], chunks=5, delay_ms=20, name="n1")
    gw = make_gateway(
        nodes=[node_entry(node, "n1", {"m1": "m1", "whisper": "whisper-real"}, max_concurrent=4)],
        auth={"admin_keys": [ADMIN]},
        store={"path": str(tmp_path / "fleet.db")},
    )
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=20)
    yield node, gw, client
    client.close()


def logged(gw: Any, endpoint: str) -> list[dict[str, Any]]:
    def rows() -> list[dict[str, Any]]:
        data = call(gw.url, "GET", "/admin/requests?limit=100")[2]["data"]
        return [r for r in data if r["endpoint"] == endpoint]

    return wait_until(rows)  # type: ignore[no-any-return]


def test_responses_whole_and_streamed(setup: Any) -> None:
    node, gw, client = setup
    response = client.responses.create(model="m1", input="Say hello.")
    assert response.output_text == "tok0 tok1 tok2 tok3 tok4 "
    assert response.model == "m1" and response.usage is not None and response.usage.output_tokens == 5
    events = list(client.responses.create(model="m1", input="Say hello.", stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "tok0 tok1 tok2 tok3 tok4 "
    assert b'"stream_options"' not in node.stats.last_body  # forwarded as sent: nothing injected
    rows = logged(gw, "/v1/responses")
    assert {(r["status"], r["stream"], r["node_id"]) for r in rows} == {(200, False, "n1"), (200, True, "n1")}
    whole = next(r for r in rows if not r["stream"])
    assert whole["completion_tokens"] == 5 and whole["prompt_tokens"] >= 1


def test_rerank_score_and_moderations(setup: Any) -> None:
    _, gw, client = setup
    ranked = client.post(
        "/rerank",
        body={"model": "m1", "query": "red apple", "documents": ["a green pear", "a red apple", "red wine"]},
        cast_to=object,
    )
    assert [r["index"] for r in ranked["results"]] == [1, 2, 0]  # type: ignore[index]
    scored = client.post(
        "/score", body={"model": "m1", "text_1": "red apple", "text_2": ["red", "blue"]}, cast_to=object
    )
    assert [d["score"] for d in scored["data"]] == [0.5, 0.0]  # type: ignore[index]
    moderated = client.moderations.create(model="m1", input=["I will kill the process", "hello"])
    assert [r.flagged for r in moderated.results] == [True, False]
    assert {r["status"] for r in logged(gw, "/v1/rerank") + logged(gw, "/v1/score")} == {200}


def test_speech_is_streamed_as_the_node_sends_it(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["tts"], delay_ms=250, name="slow")
    gw = make_gateway(nodes=[node_entry(node, "slow", ["tts"])])
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=20)
    arrivals: list[float] = []
    audio = b""
    with client.audio.speech.with_streaming_response.create(model="tts", voice="alloy", input="hello") as response:
        assert response.headers["content-type"] == "audio/mpeg"
        for chunk in response.iter_bytes():
            arrivals.append(time.monotonic())
            audio += chunk
    client.close()
    assert audio == b"MOCKAUDIO:" + b"hello" * 64
    assert arrivals[-1] - arrivals[0] > 0.4  # the first bytes came while the node still produced the rest


def test_transcriptions_and_translations_forward_the_upload(setup: Any) -> None:
    node, gw, client = setup
    upload = bytes(range(256)) * 40
    digest = hashlib.sha256(upload).hexdigest()[:16]
    text = client.audio.transcriptions.create(model="whisper", file=("clip.wav", upload, "audio/wav"))
    # The node got the file intact, and the model under the name it knows.
    assert text.text == f"transcribed {len(upload)} bytes sha256 {digest} by whisper-real"
    assert b'name="model"\r\n\r\nwhisper-real\r\n' in node.stats.last_body
    assert node.stats.last_headers["content-type"].startswith("multipart/form-data; boundary=")
    plain = client.audio.transcriptions.create(model="whisper", file=("clip.wav", upload), response_format="text")
    assert str(plain).strip() == f"transcribed {len(upload)} bytes sha256 {digest} by whisper-real"
    events = list(client.audio.transcriptions.create(model="whisper", file=("clip.wav", upload), stream=True))
    assert events[-1].type == "transcript.text.done" and events[-1].text.startswith("transcribed 10240 bytes")
    assert "".join(e.delta for e in events if e.type == "transcript.text.delta").strip() == events[-1].text
    with pytest.warns(DeprecationWarning):  # (the client's: the endpoint stays in OpenAI's API)
        translated = client.audio.translations.create(model="whisper", file=("clip.wav", upload))
    assert translated.text.startswith(f"translated {len(upload)} bytes sha256 {digest}")
    rows = logged(gw, "/v1/audio/transcriptions")
    assert len(rows) == 3 and {r["model"] for r in rows} == {"whisper"} and {r["status"] for r in rows} == {200}
    assert any(r["stream"] for r in rows) and all(r["bytes_in"] > len(upload) for r in rows)


def test_images(setup: Any) -> None:
    node, _, client = setup
    generated = client.images.generate(model="m1", prompt="a red apple", n=2)
    assert len(generated.data) == 2 and generated.data[0].b64_json
    edited = client.images.edit(model="m1", image=("in.png", b"\x89PNG-fake" * 100), prompt="make it blue")
    assert edited.data is not None and edited.data[0].b64_json
    assert b"make it blue" in node.stats.last_body
    both = client.images.edit(model="m1", image=[("a.png", b"A" * 10), ("b.png", b"B" * 20)], prompt="mix")
    assert both.model_extra is not None and both.model_extra["mock_images"] == [10, 20]
    with pytest.warns(DeprecationWarning):  # (the client's: the endpoint stays in OpenAI's API)
        variation = client.images.create_variation(model="m1", image=("in.png", b"\x89PNG-fake"))
    assert variation.data is not None and variation.data[0].b64_json


def test_one_model_and_unknown_ones(setup: Any) -> None:
    _, _, client = setup
    assert client.models.retrieve("whisper").id == "whisper"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="x")
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="nope", file=("a.wav", b"x"))


def raw_post(url: str, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_bad_forms_are_400(setup: Any) -> None:
    _, gw, _ = setup
    form = b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nabc\r\n--XyZ--\r\n'
    status, body = raw_post(gw.url, "/v1/audio/transcriptions", form, "multipart/form-data; boundary=XyZ")
    assert status == 400 and b'"param":"model"' in body
    status, body = raw_post(gw.url, "/v1/audio/transcriptions", b'{"model":"whisper"}', "application/json")
    assert status == 400 and b"multipart/form-data" in body
    status, body = raw_post(
        gw.url, "/v1/audio/transcriptions", b"--XyZ\r\ngarbage", "multipart/form-data; boundary=XyZ"
    )
    assert status == 400 and b"invalid form" in body


def test_body_limits_per_endpoint(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["whisper", "m1"], name="n")
    gw = make_gateway(
        nodes=[node_entry(node, "n", ["whisper", "m1"])],
        server={"endpoint_max_body_bytes": {"/v1/audio/translations": 2 * MIB}},
    )
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    upload = b"\x01" * (3 * MIB)  # larger than a chat request may be
    text = client.audio.transcriptions.create(model="whisper", file=("big.wav", upload))
    assert text.text.startswith(f"transcribed {3 * MIB} bytes")
    with pytest.raises(openai.APIStatusError) as refused, pytest.warns(DeprecationWarning):
        client.audio.translations.create(model="whisper", file=("big.wav", upload))  # limited to 2 MiB here
    assert refused.value.status_code == 413
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "x" * (MIB + 10)}])
    assert refused.value.status_code == 413  # chat keeps its 1 MiB
    assert refused.value.body["code"] == "request_too_large"  # type: ignore[index]
    client.close()
