"""The load a node reports about itself, read from what vLLM and llama.cpp's server expose.

- vLLM, ``GET /metrics`` (Prometheus text, one series per ``model_name``, summed here):
  ``vllm:num_requests_running``, ``vllm:num_requests_waiting`` and ``vllm:kv_cache_usage_perc``
  (``vllm:gpu_cache_usage_perc`` before vLLM's V1 engine), the KV cache in use as a fraction;
- llama.cpp's ``llama-server --metrics``, ``GET /metrics``: ``llamacpp:requests_processing``,
  ``llamacpp:requests_deferred`` and, in the builds that export it, ``llamacpp:kv_cache_usage_ratio``;
- llama.cpp's ``GET /slots`` (on by default in recent builds): one object per slot, busy when
  ``is_processing`` (older builds: ``state`` 1); nothing says how many wait.

The probes (`shardon.probes`) read it off the request path; the registry hands the part that is not
Shardon's own requests to the balancer, which counts it like requests in flight.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

__all__ = ["NodeLoad", "parse_metrics", "parse_slots"]


class NodeLoad(msgspec.Struct, kw_only=True):
    """What a node said about its load, when (monotonic ``at``), and from where (``source``)."""

    source: str
    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float | None = None
    slots: int | None = None
    at: float = 0.0

    @property
    def requests(self) -> float:
        """Requests on the node, running or waiting: Shardon's own and everybody else's."""
        return self.running + self.waiting

    def public(self, now: float) -> dict[str, Any]:
        return {
            "source": self.source,
            "running": self.running,
            "waiting": self.waiting,
            "kv_cache_usage": self.kv_cache_usage,
            "slots": self.slots,
            "age_s": round(max(0.0, now - self.at), 3),
        }


_GAUGES: dict[str, tuple[str, str]] = {
    "vllm:num_requests_running": ("vllm", "running"),
    "vllm:num_requests_waiting": ("vllm", "waiting"),
    "vllm:kv_cache_usage_perc": ("vllm", "kv_cache_usage"),
    "vllm:gpu_cache_usage_perc": ("vllm", "kv_cache_usage"),
    "llamacpp:requests_processing": ("llama.cpp", "running"),
    "llamacpp:requests_deferred": ("llama.cpp", "waiting"),
    "llamacpp:kv_cache_usage_ratio": ("llama.cpp", "kv_cache_usage"),
}


def parse_metrics(text: str, at: float) -> NodeLoad | None:
    """The load in a Prometheus exposition from vLLM or llama.cpp; None if it has none of their gauges."""
    sums: dict[str, float] = {}
    source = None
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        name = line[:brace] if brace >= 0 else line.split(None, 1)[0]
        known = _GAUGES.get(name)
        if known is None:
            continue
        value_text = line[line.rfind("}") + 1 :] if brace >= 0 else line[len(name) :]
        fields = value_text.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if not math.isfinite(value) or value < 0:
            continue
        source, field = known
        # Requests add up over the series (one per model); the KV cache is as full as the fullest.
        sums[field] = max(sums.get(field, 0.0), value) if field == "kv_cache_usage" else sums.get(field, 0.0) + value
    if source is None:
        return None
    return NodeLoad(
        source=f"{source} /metrics",
        running=sums.get("running", 0.0),
        waiting=sums.get("waiting", 0.0),
        kv_cache_usage=sums.get("kv_cache_usage"),
        at=at,
    )


def parse_slots(body: bytes, at: float) -> NodeLoad | None:
    """The load in llama.cpp's ``/slots`` answer; None if the body is not a list of slots."""
    try:
        slots = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    if not isinstance(slots, list) or not all(isinstance(s, dict) and "id" in s for s in slots):
        return None
    busy = sum(1 for s in slots if s.get("is_processing") or s.get("state") == 1)
    return NodeLoad(source="llama.cpp /slots", running=float(busy), slots=len(slots), at=at)
