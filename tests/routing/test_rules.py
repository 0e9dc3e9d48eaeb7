"""The split (shardon.routing.split), the overflow rule (shardon.routing.overflow) and the
``routing:`` section (shardon.routing.config), without a gateway."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from shardon._fast import LeastConnBalancer
from shardon.config import SchedulerConfig, load_config
from shardon.errors import ConfigError
from shardon.routing.config import OverflowConfig, overflow_node_id, parse_entry
from shardon.routing.overflow import Overflow, estimated_wait
from shardon.routing.split import Split
from shardon.scheduler import Scheduler


# -- split -----------------------------------------------------------------------------------------
def test_split_deals_requests_by_weight_exactly() -> None:
    split = Split({"v1": 90, "v2": 10})
    picks = [split.choose(None) for _ in range(2000)]
    assert Counter(picks) == {"v1": 1800, "v2": 200}
    assert "v2" in picks[:10]  # spread out: the canary is not saved for the end
    three = Split({"a": 1, "b": 2, "c": 3})
    assert Counter(three.choose(None) for _ in range(600)) == {"a": 100, "b": 200, "c": 300}


def test_sticky_split_keeps_a_session_on_its_variant() -> None:
    split = Split({"v1": 90, "v2": 10}, sticky=True)
    sessions = [f"user-{i}" for i in range(2000)]
    first = {s: split.choose(s) for s in sessions}
    assert all(split.choose(s) == first[s] for s in sessions[:200])  # the same, every time
    assert all(Split({"v1": 90, "v2": 10}, sticky=True).choose(s) == first[s] for s in sessions[:200])
    share = Counter(first.values())["v2"] / len(sessions)
    assert abs(share - 0.10) < 0.02
    # Without a session the split is dealt as if not sticky; not sticky, a session changes nothing.
    assert Counter(split.choose(None) for _ in range(100)) == {"v1": 90, "v2": 10}
    plain = Split({"v1": 1, "v2": 1})
    assert [plain.choose("alice") for _ in range(4)] == ["v1", "v2", "v1", "v2"]


# -- overflow ----------------------------------------------------------------------------------------
def principal(tenant: str, overflow: bool = True) -> Any:
    return SimpleNamespace(tenant=SimpleNamespace(name=tenant), overflow=overflow)


def test_overflow_allows_its_tenants_and_keys_only() -> None:
    anyone = Overflow("m", OverflowConfig(url="http://x"), "overflow:m", 5)
    assert anyone.allows(principal("a")) and anyone.allows(principal("b"))
    assert not anyone.allows(principal("a", overflow=False))  # a key with overflow: false
    some = Overflow("m", OverflowConfig(url="http://x", tenants=["a"], model="remote"), "overflow:m", 5)
    assert some.allows(principal("a")) and not some.allows(principal("b"))
    assert some.served == "remote" and anyone.served == "m"
    assert not Overflow("m", OverflowConfig(url="http://x", tenants=[]), "overflow:m", 5).allows(principal("a"))


def test_overflow_is_needed_when_the_queue_would_miss_the_deadline() -> None:
    async def main() -> None:
        sched = Scheduler(SchedulerConfig(), LeastConnBalancer(), asyncio.get_running_loop())
        sched.add_node(0, 2, 1.0, {"m": "m"})
        sched.add_node(1, 2, 1.0, {"m": "m"})
        route = sched.route("m")
        assert route is not None
        route.service_ewma = 2.0  # each request holds its slot 2 s: 4 slots serve 2 requests a second
        rule = Overflow("m", OverflowConfig(url="http://x", deadline_s=3.0), "overflow:m", 9)
        assert estimated_wait(sched, route) == pytest.approx(0.5)  # itself, at 2 per second
        assert not rule.needed(sched, route, 30.0)
        for _i in range(5):
            sched.enqueue(route, 1, "t", 1.0, 1.0, 60.0)  # (dispatched at once while slots are free)
        assert route.waiting == 1
        for _ in range(5):
            sched.enqueue(route, 1, "t", 1.0, 1.0, 60.0)
        assert estimated_wait(sched, route) == pytest.approx(3.5)  # 6 waiting and itself, 2 per second
        assert rule.needed(sched, route, 30.0)  # past its own deadline, 3 s
        assert not Overflow("m", OverflowConfig(url="http://x"), "o", 9).needed(sched, route, 30.0)
        assert Overflow("m", OverflowConfig(url="http://x"), "o", 9).needed(sched, route, 3.0)  # what is left
        sched.set_healthy(0, False)
        assert estimated_wait(sched, route) == pytest.approx(7.0)  # half the slots
        sched.set_healthy(1, False)
        assert estimated_wait(sched, route) == math.inf
        assert rule.needed(sched, route, 30.0)  # every local node down

    asyncio.run(main())


def test_overflow_takes_a_slot_only_while_its_node_has_room() -> None:
    balancer = LeastConnBalancer()
    balancer.add(9, 2)
    rule = Overflow("m", OverflowConfig(url="http://x"), "overflow:m", 9)
    assert rule.take(balancer) and rule.take(balancer)
    assert not rule.take(balancer)  # its max_concurrent
    balancer.release(9)
    balancer.set_healthy(9, False)
    assert not rule.take(balancer)  # its circuit open


# -- config ------------------------------------------------------------------------------------------
DOCUMENTED = """
nodes:
  - {id: a, url: "http://127.0.0.1:9001", models: [chat-v1, chat-v2]}
routing:
  chat:
    policy: prefix_affinity            # least_conn (default) | round_robin | prefix_affinity
    split: {chat-v1: 90, chat-v2: 10}  # weighted variants, each a model that nodes serve
    sticky: session                    # keep a session (user field or X-Session-ID) on one variant
    overflow: {url: "https://api.example.com", api_key: "sk-x", model: "remote-name", tenants: [team-a]}
  plain:
tenants:
  - name: team-a
    keys: [{key: k1, overflow: false}]
"""


def test_the_documented_routing_section_loads(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(DOCUMENTED)
    cfg = load_config(path, environ={})
    chat = cfg.routing["chat"]
    assert chat.policy == "prefix_affinity" and chat.split == {"chat-v1": 90, "chat-v2": 10}
    assert chat.sticky == "session" and chat.load_bound == 1.25
    assert chat.overflow is not None and chat.overflow.model == "remote-name" and chat.overflow.tenants == ["team-a"]
    assert chat.overflow.max_concurrent == 64 and chat.overflow.deadline_s is None
    assert cfg.routing["plain"].policy is None
    assert cfg.tenants[0].keys[0].overflow is False


@pytest.mark.parametrize(
    ("routing", "error"),
    [
        (
            {"chat": {"policy": "random"}},
            "routing.chat.policy: expected one of least_conn, round_robin, prefix_affinity, got 'random'",
        ),
        ({"chat": {"split": {"a": 90, "b": -1}}}, "routing.chat.split.b: Expected `float` > 0.0"),
        ({"chat": {"split": {"a": "x"}}}, "routing.chat.split.a: Expected `float`"),
        ({"chat": {"split": {}}}, "routing.chat.split: name at least one variant"),
        ({"chat": {"split": {"chat": 1}}}, "routing.chat.split.chat: a variant cannot be the split's own name"),
        ({"chat": {"sticky": "session"}}, "routing.chat.sticky: only a split has variants to keep"),
        ({"chat": {"sticky": "user"}}, "routing.chat.sticky: Invalid enum value 'user'"),
        ({"chat": {"overflow": {"url": "ftp://x"}}}, "routing.chat.overflow.url: expected http://host:port or https"),
        ({"chat": {"overflow": {"url": "https://x/v1"}}}, "routing.chat.overflow.url: the node's base URL"),
        ({"chat": {"overflow": {"url": "http://x", "ca_file": "/ca.pem"}}}, "routing.chat.overflow.ca_file: only for"),
        (
            {"chat": {"overflow": {"url": "https://x", "ca_file": "/no/ca.pem"}}},
            "routing.chat.overflow.ca_file: no such",
        ),
        ({"chat": {"overflow": {"url": "http://x:99999"}}}, "routing.chat.overflow.url: bad port"),
        ({"chat": {"overflow": {}}}, "routing.chat.overflow: Object missing required field `url`"),
        ({"chat": {"overflow": {"url": "http://x", "key": "k"}}}, "routing.chat.overflow: Object contains unknown"),
        ({"chat": {"overflow": {"url": "http://x", "tenants": "a"}}}, "routing.chat.overflow.tenants: Expected"),
        ({"chat": {"load_bound": 0.5}}, "routing.chat.load_bound: Expected `float` >= 1"),
        ({"chat": {"weights": 1}}, "routing.chat: Object contains unknown field `weights`"),
        ({"chat": 3}, "routing.chat: expected a mapping"),
        ({"bad name": {}}, "routing.bad name: a model name is printable ASCII"),
        ({"c": {"split": {"a": 1}}, "a": {"split": {"b": 1}}}, "routing.c.split.a: a variant cannot be split again"),
        ([1], "routing: expected a mapping of model names"),
    ],
)
def test_a_bad_routing_entry_names_its_field(tmp_path: Path, routing: Any, error: str) -> None:
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"routing": routing}))
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(error), str(info.value)


def test_overflow_node_ids_are_reserved(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text('nodes: [{id: "overflow:chat", url: "http://127.0.0.1:1", models: [m]}]')
    with pytest.raises(ConfigError, match=r"nodes\[0\]\.id: ids starting 'overflow:'"):
        load_config(path, environ={})
    assert overflow_node_id("org/model") == "overflow:org_model"  # a node id has no "/"


def test_a_bad_routing_config_exits_non_zero(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "c.yaml"
    path.write_text("routing: {chat: {policy: fastest}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "shardon", "serve", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "routing.chat.policy" in result.stderr


def test_parse_entry_is_what_the_admin_api_uses() -> None:
    entry = parse_entry("chat", {"policy": "round_robin", "split": {"a": 1}})
    assert entry.policy == "round_robin" and entry.split == {"a": 1.0}
    with pytest.raises(ValueError, match=r"^routing\.chat\.overflow\.max_concurrent: Expected `int` >= 1"):
        parse_entry("chat", {"overflow": {"url": "http://x", "max_concurrent": 0}})
