"""Which of a model's nodes a request prefers: weighted round robin, or prefix affinity.

Least connections, the default, is no policy object at all: the balancer's own pick. A policy is
consulted by the scheduler (``Route.policy``) wherever it takes a slot for a request: ``pick``
chooses among the route's candidates (-1 when none can take a request now), ``placed`` is told the
node the request got. Eligibility (healthy, below its cap, the circuit's rules) is the balancer's:
a node is eligible when ``balancer.pick((node,))`` returns it.

Prefix affinity sends a request to the node that served the longest known prefix of its prompt
(the same system prompt and conversation so far), so that node's KV cache is reused, or to the node
that served its session last (the ``user`` field or ``X-Session-ID``). A prompt never seen goes to
its first block's node by rendezvous hashing, so every gateway with the same nodes agrees on it.
The preferred node is taken only while within the load bound of consistent hashing with bounded
loads: its load after taking the request at most ``ceil(load_bound x (total + 1) x its weight /
total weight)``. Past it, the least-loaded node takes the request, and the prefix is remembered
there from then on. The prompt is never tokenized: its bytes, from where the prompt starts in the
body, are hashed in fixed-size blocks (CRC-32, chained); the table of known prefixes is two dicts
that take turns (a cheap LRU). docs/routing.md has the reasoning.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

__all__ = ["BLOCK_BYTES", "Affinity", "PrefixAffinity", "PrefixTable", "RoundRobin", "eligible", "prefix_hashes"]

BLOCK_BYTES = 256
"""Bytes of prompt per hashed block."""
ANCHOR_BYTES = 64
"""The prompt's first bytes, hashed for the first placement of a prompt never seen."""
TABLE_SIZE = 1 << 16
"""Known prefixes per model, per generation of the table (two generations)."""
_PROMPT_STARTS = (b'"messages"', b'"prompt"', b'"input"')
_SESSION = 0xFFFFFFFF << 32  # a session's key: above every prefix block's (block count << 32)
_M64 = (1 << 64) - 1


def eligible(balancer: Any, node: int) -> bool:
    """Whether ``node`` can take a request now, by the balancer's rules."""
    return bool(balancer.pick((node,), None) == node)


def node_load(balancer: Any, node: int) -> float:
    """Requests on ``node``: Shardon's in flight, and what the node reports beyond them."""
    return float(balancer.inflight(node) + balancer.load(node))


class Affinity:
    """A request's affinity key: ``anchor`` for a first placement, ``chain`` the prefix hashes
    (shortest first; one entry for a session); what ``pick`` found is kept for ``placed``."""

    __slots__ = ("anchor", "chain", "found", "hit")

    def __init__(self, anchor: int, chain: list[int]) -> None:
        self.anchor = anchor
        self.chain = chain
        self.hit = 0  # chain[:hit] is known, on node `found`
        self.found = -1


def prefix_hashes(body: bytes) -> Affinity:
    """The prompt's key: from where the prompt starts in the JSON body (``"messages"``, ``"prompt"``,
    ``"input"``), the CRC-32 of its first ``ANCHOR_BYTES``, and for each full block of
    ``BLOCK_BYTES`` the CRC-32 of every byte up to the block's end, the block count above it."""
    start = -1
    for marker in _PROMPT_STARTS:
        start = body.find(marker)
        if start >= 0:
            break
    start = max(start, 0)
    view = memoryview(body)
    anchor = zlib.crc32(view[start : start + ANCHOR_BYTES])
    chain: list[int] = []
    crc = 0
    end = len(body) - BLOCK_BYTES
    pos = start
    count = 0
    while pos <= end:
        crc = zlib.crc32(view[pos : pos + BLOCK_BYTES], crc)
        pos += BLOCK_BYTES
        count += 1
        chain.append(crc | count << 32)
    return Affinity(anchor, chain)


def session_key(session: str) -> Affinity:
    """A session's key: one table entry, and the same hash for its first placement."""
    crc = zlib.crc32(session.encode("utf-8", "surrogatepass"))
    return Affinity(crc, [crc | _SESSION])


def rendezvous(anchor: int, candidates: Sequence[int]) -> int:
    """The candidate with the highest hash of (``anchor``, node): -1 when there is none."""
    best = -1
    best_score = -1
    for node in candidates:
        x = (anchor ^ (node * 0x9E3779B97F4A7C15)) & _M64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
        x ^= x >> 31
        if x > best_score:
            best, best_score = node, x
    return best


class PrefixTable:
    """Prefix hash → the node that last served it; at most ``2 x size`` entries: when the newer dict
    is full it becomes the older one, and the older one is dropped."""

    __slots__ = ("newer", "older", "size")

    def __init__(self, size: int = TABLE_SIZE) -> None:
        self.size = size
        self.newer: dict[int, int] = {}
        self.older: dict[int, int] = {}

    def get(self, key: int) -> int:
        node = self.newer.get(key, -1)
        return node if node >= 0 else self.older.get(key, -1)

    def put(self, keys: Sequence[int], node: int) -> None:
        newer = self.newer
        for key in keys:
            newer[key] = node
        if len(newer) >= self.size:
            self.older = newer
            self.newer = {}

    def __len__(self) -> int:
        return len(self.newer) + len(self.older)


class PrefixAffinity:
    """The prefix-affinity policy of one model (see the module docstring)."""

    __slots__ = ("load_bound", "table")

    name = "prefix_affinity"
    sessions = True  # a session (X-Session-ID, the user field) keeps its node

    def __init__(self, load_bound: float = 1.25, table_size: int = TABLE_SIZE) -> None:
        self.load_bound = load_bound
        self.table = PrefixTable(table_size)

    def key(self, session: str | None, body: bytes) -> Affinity:
        return session_key(session) if session else prefix_hashes(body)

    def pick(self, scheduler: Any, candidates: Sequence[int], affinity: Affinity | None) -> int:
        balancer = scheduler.balancer
        if affinity is None:
            return int(balancer.pick(candidates, None))
        table = self.table
        chain = affinity.chain
        node = -1
        i = len(chain)
        while i > 0:
            i -= 1
            node = table.get(chain[i])
            if node >= 0:
                if node in candidates:
                    affinity.hit = i + 1
                    break
                node = -1
        affinity.found = node
        if node < 0:
            node = rendezvous(affinity.anchor, candidates)
        if node >= 0 and self.within_bound(scheduler, candidates, node):
            return node
        return int(balancer.pick(candidates, None))

    def within_bound(self, scheduler: Any, candidates: Sequence[int], node: int) -> bool:
        """Whether ``node`` may take one more request: eligible, and its load after it within the
        bound over its weighted share of the model's load."""
        balancer = scheduler.balancer
        if not eligible(balancer, node):
            return False
        weights = scheduler.node_weights
        total = 0.0
        weight = 0.0
        for other in candidates:
            if balancer.healthy(other):
                total += node_load(balancer, other)
                weight += weights.get(other, 1.0)
        share = weights.get(node, 1.0) / weight if weight > 0 else 1.0
        return node_load(balancer, node) + 1 <= math.ceil(self.load_bound * (total + 1) * share)

    def placed(self, affinity: Affinity | None, node: int) -> None:
        if affinity is None:
            return
        chain = affinity.chain
        if affinity.found == node:
            # The known part is on this node already: refresh where it was found, add the rest.
            self.table.put(chain[affinity.hit - 1 :] if affinity.hit else chain, node)
        else:
            self.table.put(chain, node)


class RoundRobin:
    """Smooth weighted round robin over the eligible candidates (nginx's): each pick adds every
    eligible node's weight to its credit and takes the node with the most, which then pays the
    sum. Over any run of picks a node's share is its weight's, spread out, not in bursts."""

    __slots__ = ("credit",)

    name = "round_robin"
    sessions = False

    def __init__(self) -> None:
        self.credit: dict[int, float] = {}

    def key(self, session: str | None, body: bytes) -> None:
        return None

    def pick(self, scheduler: Any, candidates: Sequence[int], affinity: object) -> int:
        balancer = scheduler.balancer
        weights = scheduler.node_weights
        credit = self.credit
        best = -1
        most = -math.inf
        total = 0.0
        for node in candidates:
            if not eligible(balancer, node):
                continue
            weight = weights.get(node, 1.0)
            total += weight
            value = credit[node] = credit.get(node, 0.0) + weight
            if value > most:
                best, most = node, value
        if best >= 0:
            credit[best] -= total
        return best

    def placed(self, affinity: object, node: int) -> None:
        pass
