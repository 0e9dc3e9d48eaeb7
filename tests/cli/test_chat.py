"""``shardon chat`` in a pseudo-terminal, as a user types: answers streamed, errors said, /exit."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from shardon.commands import pick_chat_model
from tests.support import Terminal


@pytest.fixture
def gateway(make_mock: Any, make_gateway: Any) -> str:
    node = make_mock(models=["m1"], chunks=8, delay_ms=150)
    return str(make_gateway(nodes=[{"id": "n", "url": node.url, "models": ["m1"]}]).url)


@pytest.fixture
def chat(gateway: str) -> Iterator[Any]:
    terms: list[Terminal] = []

    def start(*args: str) -> Terminal:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDON_")}
        term = Terminal([sys.executable, "-m", "shardon", "chat", "--url", gateway, *args], env=env)
        terms.append(term)
        return term

    yield start
    for term in terms:
        term.close()


def test_chat_streams_the_answer_and_exits_on_exit(chat: Any) -> None:
    term = chat()
    term.expect(b"Chatting with m1", timeout=30)  # the only model, found through /v1/models
    prompt = term.expect(b"> ", timeout=10)
    term.send("Say hello.")
    first = term.expect(b"tok0", timeout=10, start=prompt + 2)
    last = term.expect(b"tok7", timeout=10, start=first)
    # Streamed: the first word was printed before the last one had been generated (8 tokens, 150 ms apart).
    offset, read_first, read_last = 0, None, None
    for i, (_, data) in enumerate(term.reads):
        if read_first is None and offset + len(data) > first:
            read_first = i
        if offset + len(data) > last:
            read_last = i
            break
        offset += len(data)
    assert read_first is not None and read_last is not None and read_first < read_last
    assert term.reads[read_last][0] - term.reads[read_first][0] > 0.5
    term.expect(b"> ", timeout=10, start=last)  # the next question
    term.send("/exit")
    assert term.wait(10) == 0


def test_chat_says_what_went_wrong_and_goes_on(chat: Any) -> None:
    term = chat("--model", "nope")
    prompt = term.expect(b"> ", timeout=30)
    term.send("hi")
    term.expect(b"shardon: 404 model_not_found: The model 'nope' does not exist", timeout=10, start=prompt)
    term.expect(b"> ", timeout=10, start=prompt + 2)
    os.write(term.fd, b"\x04")  # Ctrl-D: end of input leaves too
    assert term.wait(10) == 0


def test_chat_without_a_gateway_fails_clearly() -> None:
    term = Terminal([sys.executable, "-m", "shardon", "chat", "--url", "http://127.0.0.1:9"])
    try:
        assert term.wait(30) == 1
        assert b"shardon: cannot reach http://127.0.0.1:9" in term.output
    finally:
        term.close()


@pytest.mark.parametrize(
    ("entries", "picked"),
    [
        ([{"id": "base", "chat": False}, {"id": "instruct", "chat": True}], "instruct"),
        ([{"id": "a", "loaded": False}, {"id": "b", "loaded": True}], "b"),
        ([{"id": "mock-model"}], "mock-model"),  # a node's model: no extra fields
        ([{"id": "base", "chat": False}], None),
        ([], None),
    ],
)
def test_the_default_chat_model(entries: list[dict[str, Any]], picked: str | None) -> None:
    assert pick_chat_model(entries) == picked
