"""Realistic OpenAI traffic against Shardon, for locust.

Each simulated user belongs to a team (one API key per team, the teams taking turns) and sends
chat completions and, less often, completions: streamed or not, at mixed priorities, with prompt
lengths and ``max_tokens`` drawn from log-normal distributions. Besides each request's total time
(request type ``POST``), locust reports, in milliseconds:

- ``TTFT``: time to the first token of a streamed answer;
- ``ITL``: each gap between two tokens of a streamed answer (inter-token time).

Headless, for a fixed time (``bench/README.md`` has the figures)::

    locust -f bench/locustfile.py --headless -u 50 -r 10 -t 60s --host http://127.0.0.1:8080 \\
        --csv bench/results/locust --only-summary

Environment:

- ``SHARDON_LOCUST_MODEL``: the model asked for (default ``mock-model``, the built-in mock node's);
- ``SHARDON_LOCUST_KEYS``: comma-separated API keys, one per team (default: no key);
- ``SHARDON_LOCUST_STREAM``: the share of streamed requests (default 0.7);
- ``SHARDON_LOCUST_SEED``: seeds the draws, for repeatable runs.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import time
from typing import Any

from locust import HttpUser, between, events, task

MODEL = os.environ.get("SHARDON_LOCUST_MODEL", "mock-model")
KEYS = [k.strip() for k in os.environ.get("SHARDON_LOCUST_KEYS", "").split(",") if k.strip()]
STREAM_SHARE = float(os.environ.get("SHARDON_LOCUST_STREAM", "0.7"))
PRIORITIES = (("low", 0.2), ("normal", 0.65), ("high", 0.15))
# Prompt words: median 120, most between 40 and 350; max_tokens: median 96, 16 to 512.
PROMPT_WORDS = (120, 0.7, 8, 2000)
MAX_TOKENS = (96, 0.6, 16, 512)
_TEXT = (
    "the gateway routes each request to a node with a free slot while teams share the capacity fairly "
    "by weight and priority summarise explain translate list compare write a short answer about this text"
)
WORDS = _TEXT.split()

_teams = itertools.count()
_seed = os.environ.get("SHARDON_LOCUST_SEED")
_random = random.Random(int(_seed) if _seed else None)


def lognormal(median: float, sigma: float, low: int, high: int) -> int:
    return int(min(high, max(low, _random.lognormvariate(math.log(median), sigma))))


def prompt(words: int) -> str:
    return " ".join(_random.choice(WORDS) for _ in range(words))


def priority() -> str:
    names, weights = zip(*PRIORITIES, strict=True)
    return _random.choices(names, weights)[0]


def report(kind: str, name: str, milliseconds: float) -> None:
    events.request.fire(
        request_type=kind, name=name, response_time=milliseconds, response_length=0, exception=None, context={}
    )


class OpenAIUser(HttpUser):
    """One member of a team, calling the OpenAI API with the team's key."""

    wait_time = between(0.2, 1.5)

    def on_start(self) -> None:
        team = next(_teams)
        self.headers = {"Content-Type": "application/json"}
        if KEYS:
            self.headers["Authorization"] = f"Bearer {KEYS[team % len(KEYS)]}"

    @task(9)
    def chat(self) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt(lognormal(*PROMPT_WORDS))}],
            "max_tokens": lognormal(*MAX_TOKENS),
        }
        self.call("/v1/chat/completions", body)

    @task(1)
    def completion(self) -> None:
        body = {"model": MODEL, "prompt": prompt(lognormal(*PROMPT_WORDS)), "max_tokens": lognormal(*MAX_TOKENS)}
        self.call("/v1/completions", body)

    def call(self, path: str, body: dict[str, Any]) -> None:
        stream = _random.random() < STREAM_SHARE
        body["stream"] = stream
        headers = dict(self.headers, **{"X-Priority": priority()})
        name = f"{path} (stream)" if stream else path
        started = time.perf_counter()
        with self.client.post(
            path, data=json.dumps(body), headers=headers, name=name, stream=stream, catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:300]}")
                return
            if not stream:
                if not resp.json().get("choices"):
                    resp.failure(f"no choices: {resp.text[:300]}")
                return
            problem = self.read_stream(resp, name, started)
            # The request's time is the whole stream's, not the time to its headers.
            resp.request_meta["response_time"] = (time.perf_counter() - started) * 1000
            if problem:
                resp.failure(problem)

    @staticmethod
    def read_stream(resp: Any, name: str, started: float) -> str | None:
        """Read an SSE answer, reporting TTFT and every inter-token gap; what went wrong, or None."""
        last = 0.0
        tokens = 0
        size = 0
        done = False
        for line in resp.iter_lines(chunk_size=None):
            size += len(line)
            if not line.startswith(b"data: "):
                if line.startswith(b"event: error"):
                    return "error event in the stream"
                continue
            data = line[6:]
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                return f"error in the stream: {event['error']}"
            choices = event.get("choices") or []
            if not choices or not (choices[0].get("delta", {}).get("content") or choices[0].get("text")):
                continue
            now = time.perf_counter()
            if tokens == 0:
                report("TTFT", name, (now - started) * 1000)
            else:
                report("ITL", name, (now - last) * 1000)
            last = now
            tokens += 1
        resp.request_meta["response_length"] = size
        if not done:
            return "stream ended without [DONE]"
        if tokens == 0:
            return "stream without a token"
        return None
