"""The node policies (shardon.routing.policies) and the scheduler that consults them.

Every test that takes slots runs on both scheduler implementations (compiled from
``_scheduler_py.py``, and that file itself) and both balancers."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

from shardon.config import SchedulerConfig
from shardon.routing.policies import (
    BLOCK_BYTES,
    PrefixAffinity,
    PrefixTable,
    RoundRobin,
    eligible,
    prefix_hashes,
    rendezvous,
    session_key,
)
from tests.support import twin

SYSTEM = "You are a careful assistant. " * 20


def chat(*messages: str) -> bytes:
    roles = ["system"] + ["user", "assistant"] * len(messages)
    return json.dumps(
        {"model": "m", "messages": [{"role": r, "content": c} for r, c in zip(roles, messages, strict=False)]}
    ).encode()


@pytest.fixture(params=["c", "py"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return twin("shardon._scheduler", str(request.param))


@pytest.fixture(params=["c", "py"])
def balancer_impl(request: pytest.FixtureRequest) -> ModuleType:
    return twin("balancer", str(request.param))


def run(
    impl: ModuleType, balancer_impl: ModuleType, nodes: dict[int, tuple[int, float]], fn: Callable[[Any], Any]
) -> Any:
    """``fn(scheduler)`` on a scheduler with ``nodes`` (index → capacity, weight) serving model ``m``."""

    async def main() -> Any:
        sched = impl.Scheduler(
            SchedulerConfig(headroom_slots=0), balancer_impl.LeastConnBalancer(), asyncio.get_running_loop()
        )
        for index, (capacity, weight) in nodes.items():
            sched.add_node(index, capacity, weight, {"m": "m"})
        return await fn(sched)

    return asyncio.run(main())


# -- prefix keys -----------------------------------------------------------------------------------
def test_a_conversation_turn_extends_the_previous_turns_prefix_chain() -> None:
    first = prefix_hashes(chat(SYSTEM, "What is the capital of France? " * 5))
    second = prefix_hashes(chat(SYSTEM, "What is the capital of France? " * 5, "Paris. " * 40, "And Spain?"))
    assert len(first.chain) >= 3 and len(second.chain) > len(first.chain)
    # Every block the first turn has in full lies before where the two bodies differ, but the last.
    assert second.chain[: len(first.chain) - 1] == first.chain[:-1]
    assert first.anchor == second.anchor
    other = prefix_hashes(chat(SYSTEM, "Something else entirely. " * 30))
    shared = len(json.dumps({"model": "m", "messages": [{"role": "system", "content": SYSTEM}]})) // BLOCK_BYTES
    assert len(other.chain) > shared and len(first.chain) > shared
    assert other.chain[: shared - 1] == first.chain[: shared - 1]  # the shared system prompt
    assert other.chain[shared] != first.chain[shared]  # then the conversations differ


def test_prefix_hashes_start_at_the_prompt_and_count_full_blocks_only() -> None:
    body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"' + b"x" * 600 + b'"}]}'
    key = prefix_hashes(body)
    start = body.find(b'"messages"')
    assert len(key.chain) == (len(body) - start) // BLOCK_BYTES
    assert [h >> 32 for h in key.chain] == list(range(1, len(key.chain) + 1))  # the block count above
    # The fields before the prompt do not matter: another model name, the same key.
    assert prefix_hashes(body.replace(b'"model":"m"', b'"model":"other"')).chain == key.chain
    assert prefix_hashes(b'{"prompt":"short"}').chain == []  # no full block
    assert session_key("alice").chain == session_key("alice").chain != session_key("bob").chain


def test_the_table_keeps_two_generations() -> None:
    table = PrefixTable(size=4)
    table.put([1, 2, 3], 7)
    assert table.get(2) == 7 and table.get(9) == -1
    table.put([4], 8)  # the newer dict is full: it becomes the older one
    assert table.get(1) == 7 and table.get(4) == 8 and len(table) == 4
    table.put([5, 6, 7, 8], 9)  # full again: the first generation is gone
    assert table.get(1) == -1 and table.get(4) == -1 and table.get(5) == 9


def test_rendezvous_is_stable_and_spreads_keys() -> None:
    nodes = [0, 1, 2, 3]
    owners = Counter(rendezvous(k * 2654435761, nodes) for k in range(4000))
    assert set(owners) == set(nodes) and min(owners.values()) > 800
    # Removing a node moves only its own keys.
    moved = sum(1 for k in range(4000) if rendezvous(k * 2654435761, nodes) != rendezvous(k * 2654435761, [0, 1, 2]))
    assert moved == owners[3]
    assert rendezvous(5, []) == -1


# -- prefix affinity -------------------------------------------------------------------------------
def test_prefix_affinity_keeps_a_conversation_on_its_node(impl: ModuleType, balancer_impl: ModuleType) -> None:
    async def scenario(s: Any) -> None:
        route = s.route("m")
        route.policy = policy = PrefixAffinity()
        turns = [chat(SYSTEM, "Hello " * 60)]
        turns.append(chat(SYSTEM, "Hello " * 60, "Hi! " * 50, "How are you?"))
        turns.append(chat(SYSTEM, "Hello " * 60, "Hi! " * 50, "How are you?", "Fine. " * 30, "Good."))
        nodes = []
        for body in turns:
            affinity = policy.key(None, body)
            index = s.admit(route, "t", 1.0, affinity)
            nodes.append(index)
            s.release(index, route, "t")
        assert nodes == [nodes[0]] * 3
        # A session is kept too, whatever its prompts.
        sessions = []
        for body in turns:
            index = s.admit(route, "t", 1.0, policy.key("alice", body))
            sessions.append(index)
            s.release(index, route, "t")
        assert sessions == [sessions[0]] * 3

    run(impl, balancer_impl, {0: (8, 1.0), 1: (8, 1.0), 2: (8, 1.0)}, scenario)


def test_prefix_affinity_moves_past_the_load_bound_and_remembers(impl: ModuleType, balancer_impl: ModuleType) -> None:
    async def scenario(s: Any) -> None:
        route = s.route("m")
        route.policy = policy = PrefixAffinity(load_bound=1.25)
        body = chat(SYSTEM, "Tell me a story " * 30)
        home = s.admit(route, "t", 1.0, policy.key(None, body))
        s.release(home, route, "t")
        other = 1 - home
        # The home node busy with others' requests: 3 in flight, the other node none. Its bound for
        # one more: ceil(1.25 * (3 + 1) / 2) = 3 < 4.
        for _ in range(3):
            s.balancer.acquire(home)
        moved = s.admit(route, "t", 1.0, policy.key(None, body + b" "))
        assert moved == other
        s.release(moved, route, "t")
        for _ in range(3):
            s.balancer.release(home)
        # The prefix is remembered where it moved: the next turn goes there, though home is idle.
        again = s.admit(route, "t", 1.0, policy.key(None, body))
        assert again == other
        s.release(again, route, "t")

    run(impl, balancer_impl, {0: (8, 1.0), 1: (8, 1.0)}, scenario)


def test_the_load_a_node_reports_counts_toward_its_bound(impl: ModuleType, balancer_impl: ModuleType) -> None:
    async def scenario(s: Any) -> None:
        route = s.route("m")
        route.policy = policy = PrefixAffinity(load_bound=1.25)
        body = chat(SYSTEM, "reported load " * 30)
        home = s.admit(route, "t", 1.0, policy.key(None, body))
        s.release(home, route, "t")
        s.set_load(home, 3.0)  # other clients keep it busy (vLLM's num_requests_running)
        assert s.admit(route, "t", 1.0, policy.key(None, body)) == 1 - home

    run(impl, balancer_impl, {0: (8, 1.0), 1: (8, 1.0)}, scenario)


def test_prefix_affinity_bound_keeps_the_spread_even(impl: ModuleType, balancer_impl: ModuleType) -> None:
    """Every request with the same prefix: the bound spreads them; max over mean stays within it."""

    async def scenario(s: Any) -> None:
        route = s.route("m")
        route.policy = policy = PrefixAffinity(load_bound=1.25)
        body = chat(SYSTEM, "same question " * 30)
        for _ in range(40):
            assert s.admit(route, "t", 1.0, policy.key(None, body)) >= 0
        loads = [s.balancer.inflight(i) for i in range(4)]
        assert sum(loads) == 40
        assert max(loads) <= 1.25 * 40 / 4

    run(impl, balancer_impl, {i: (64, 1.0) for i in range(4)}, scenario)


def test_prefix_affinity_skips_an_unhealthy_or_full_node(impl: ModuleType, balancer_impl: ModuleType) -> None:
    async def scenario(s: Any) -> None:
        route = s.route("m")
        route.policy = policy = PrefixAffinity(load_bound=100.0)
        body = chat(SYSTEM, "question " * 40)
        home = s.admit(route, "t", 1.0, policy.key(None, body))
        s.release(home, route, "t")
        s.set_healthy(home, False)
        assert not eligible(s.balancer, home)
        assert s.admit(route, "t", 1.0, policy.key(None, body)) == 1 - home
        s.set_healthy(home, True)
        s.release(1 - home, route, "t")
        for _ in range(2):  # home's cap: full
            s.balancer.acquire(home)
        assert s.admit(route, "t", 1.0, policy.key(None, body)) == 1 - home

    run(impl, balancer_impl, {0: (2, 1.0), 1: (2, 1.0)}, scenario)


def test_a_queued_request_gets_its_policys_node(impl: ModuleType, balancer_impl: ModuleType) -> None:
    async def scenario(s: Any) -> None:
        route = s.route("m")
        route.policy = policy = PrefixAffinity(load_bound=100.0)
        body = chat(SYSTEM, "queued " * 40)
        home = s.admit(route, "t", 1.0, policy.key(None, body))
        s.release(home, route, "t")
        held = [s.admit(route, "t", 1.0, None) for _ in range(4)]  # both nodes full (cap 2)
        assert sorted(held) == [0, 0, 1, 1]
        first = s.enqueue(route, 1, "t", 10.0, 1.0, 5.0, policy.key(None, body))
        s.release(home, route, "t")
        assert first.future.result() == home  # its prefix's node, free again
        second = s.enqueue(route, 1, "t", 10.0, 1.0, 5.0, policy.key(None, body))
        s.release(1 - home, route, "t")  # home is full: the other node, rather than wait
        assert second.future.result() == 1 - home
        s.release(home, route, "t")
        s.release(1 - home, route, "t")
        # Placed there last: the prefix is remembered on the other node now.
        assert s.admit(route, "t", 1.0, policy.key(None, body)) == 1 - home

    run(impl, balancer_impl, {0: (2, 1.0), 1: (2, 1.0)}, scenario)


# -- round robin -----------------------------------------------------------------------------------
def test_round_robin_follows_the_weights(impl: ModuleType, balancer_impl: ModuleType) -> None:
    async def scenario(s: Any) -> list[int]:
        route = s.route("m")
        route.policy = RoundRobin()
        picks = []
        for _ in range(12):
            index = s.admit(route, "t", 1.0, None)
            picks.append(index)
            s.release(index, route, "t")
        return picks

    picks = run(impl, balancer_impl, {0: (8, 1.0), 1: (8, 2.0), 2: (8, 1.0)}, scenario)
    assert Counter(picks) == {0: 3, 1: 6, 2: 3}
    assert all(picks[i] != picks[i + 1] or picks[i] == 1 for i in range(11))  # spread, not in runs
    assert picks[:4].count(1) == 2


def test_round_robin_skips_nodes_that_cannot_take_a_request(impl: ModuleType, balancer_impl: ModuleType) -> None:
    async def scenario(s: Any) -> None:
        route = s.route("m")
        route.policy = RoundRobin()
        s.set_healthy(1, False)
        picks = [s.admit(route, "t", 1.0, None) for _ in range(4)]
        assert sorted(picks) == [0, 0, 2, 2]  # node 1 out; then every node is full
        assert s.admit(route, "t", 1.0, None) == -1

    run(impl, balancer_impl, {0: (2, 1.0), 1: (2, 1.0), 2: (2, 1.0)}, scenario)


def test_least_connections_without_a_policy_is_unchanged(impl: ModuleType, balancer_impl: ModuleType) -> None:
    async def scenario(s: Any) -> None:
        route = s.route("m")
        assert route.policy is None and route.rules is None
        assert sorted(s.admit(route, "t", 1.0) for _ in range(4)) == [0, 0, 1, 1]

    run(impl, balancer_impl, {0: (2, 1.0), 1: (2, 1.0)}, scenario)
