"""Model-based tests (hypothesis): random operation sequences, driven through the compiled classes and
their pure-Python twins, must give the same answers, the same exceptions and the same state; and each
FairQueue must match the literal model of its fair queueing (queue_model.NaiveFairQueue).

Floats are compared exactly: both implementations do the same IEEE operations in the same order.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests._fast.queue_model import NaiveFairQueue, drain

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    """What a call did: its result, or the type of exception it raised."""
    try:
        return ("ok", fn(*args))
    except Exception as exc:
        return ("raised", type(exc).__name__)


def same(a: tuple[str, Any], b: tuple[str, Any]) -> bool:
    if a[0] == b[0] == "ok" and isinstance(a[1], float) and isinstance(b[1], float):
        return a[1] == b[1] or (math.isnan(a[1]) and math.isnan(b[1]))
    return a == b


# -- FairQueue ---------------------------------------------------------------------------------------

TENANTS = ["a", "b", "c", "d", "e"]
costs = st.one_of(
    st.integers(0, 5000).map(float),
    st.floats(0.0, 1e6, allow_nan=False),
    st.sampled_from([0.0, 1e12, 3.5e11, -1.0, math.nan, math.inf]),
)
queue_op = st.one_of(
    st.tuples(
        st.just("push"),
        st.integers(-1, 4),
        st.sampled_from(TENANTS),
        costs,
        st.sampled_from([1.0, 2.0, 0.5, 3.7, 1e-3, 0.0, 1e-300, 1e300]),
    ),
    st.tuples(st.just("pop")),
    st.tuples(st.just("pop")),
    st.tuples(st.just("remove"), st.integers(0, 200)),
    st.tuples(
        st.just("refund"),
        st.sampled_from(TENANTS),
        st.integers(-1, 4),
        st.one_of(st.floats(-1e4, 1e4, allow_nan=False), st.just(math.nan)),
    ),
    st.tuples(st.just("query"), st.integers(-1, 4)),
)


@SETTINGS
@given(quantum=st.sampled_from([1.0, 7.5, 1024.0, 1e-2]), ops=st.lists(queue_op, max_size=150))
def test_queue_twins_agree(both: tuple[SimpleNamespace, SimpleNamespace], quantum: float, ops: list) -> None:
    c_impl, py_impl = both
    qc, qp = c_impl.FairQueue(quantum), py_impl.FairQueue(quantum)
    handles: list[int] = []
    for n, op in enumerate(ops):
        kind = op[0]
        if kind == "push":
            _, p, tenant, cost, weight = op
            rc = outcome(qc.push, n, p, tenant, cost, weight)
            rp = outcome(qp.push, n, p, tenant, cost, weight)
            if rc[0] == "ok":
                handles.append(rc[1])
        elif kind == "pop":
            rc, rp = outcome(qc.pop), outcome(qp.pop)
        elif kind == "remove":
            h = handles[op[1] % len(handles)] if handles and op[1] < 150 else op[1] + 10_000
            rc, rp = outcome(qc.remove, h), outcome(qp.remove, h)
        elif kind == "refund":
            _, tenant, p, amount = op
            rc, rp = outcome(qc.refund, tenant, p, amount), outcome(qp.refund, tenant, p, amount)
        else:
            p = op[1]
            rc = outcome(lambda p: (qc.len_class(p), qc.tenants_waiting(p)), p)
            rp = outcome(lambda p: (qp.len_class(p), qp.tenants_waiting(p)), p)
        assert rc == rp, (n, op)
        assert len(qc) == len(qp)
        assert qc.top_priority() == qp.top_priority()
        assert qc.snapshot() == qp.snapshot()
    while True:
        item = qc.pop()
        assert item == qp.pop()
        if item is None:
            break


# -- property: the queue equals the literal model ----------------------------------------------------

literal_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("push"),
            st.integers(0, 3),
            st.sampled_from(TENANTS[:4]),
            st.integers(0, 200).map(float),
            st.sampled_from([0.5, 1.0, 2.0, 3.0]),
        ),
        st.tuples(st.just("pop")),
        st.tuples(st.just("remove"), st.integers(0, 60)),
        st.tuples(
            st.just("refund"),
            st.sampled_from(TENANTS[:4]),
            st.integers(0, 3),
            st.integers(-64, 64).map(float),
        ),
    ),
    max_size=120,
)


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=literal_ops)
def test_matches_literal_queue_model(impl: SimpleNamespace, ops: list[tuple]) -> None:
    q = impl.FairQueue(8.0)
    model = NaiveFairQueue(8.0)
    handles: list[int] = []
    for n, op in enumerate(ops):
        if op[0] == "push":
            _, p, t, cost, w = op
            h = q.push(n, p, t, cost, w)
            assert h == model.push(n, p, t, cost, w)
            handles.append(h)
        elif op[0] == "pop":
            assert q.pop() == model.pop()
        elif op[0] == "remove":
            h = handles[op[1] % len(handles)] if handles else op[1]
            assert q.remove(h) == model.remove(h)
        else:
            _, t, p, amount = op
            q.refund(t, p, amount)
            model.refund(t, p, amount)
        assert len(q) == len(model)
        assert [q.len_class(p) for p in range(4)] == [model.len_class(p) for p in range(4)]
        assert q.snapshot() == model.snapshot()
    assert drain(q) == drain(model)


# -- TokenBucket -------------------------------------------------------------------------------------

amounts = st.one_of(st.floats(-50.0, 200.0, allow_nan=False), st.integers(0, 100).map(float))
bucket_op = st.one_of(
    st.tuples(st.just("try_take"), amounts),
    st.tuples(st.just("time_until"), amounts),
    st.tuples(st.just("force_take"), amounts),
    st.tuples(st.just("tokens"), st.just(0.0)),
    st.tuples(
        st.just("configure"),
        st.one_of(st.floats(0.0, 1000.0), st.just(-1.0), st.just(math.inf)),
        st.one_of(st.floats(0.0, 500.0), st.just(-1.0)),
    ),
)
bucket_step = st.tuples(st.floats(-0.5, 3.0, allow_nan=False), bucket_op)  # time step, op


@SETTINGS
@given(
    rate=st.floats(0.0, 1000.0),
    capacity=st.floats(0.0, 500.0),
    steps=st.lists(bucket_step, max_size=150),
)
def test_bucket_twins_agree(
    both: tuple[SimpleNamespace, SimpleNamespace], rate: float, capacity: float, steps: list
) -> None:
    c_impl, py_impl = both
    now = 100.0
    bc, bp = c_impl.TokenBucket(rate, capacity, now), py_impl.TokenBucket(rate, capacity, now)
    for dt, op in steps:
        now += dt  # mostly forwards, sometimes backwards
        kind = op[0]
        if kind == "configure":
            rc = outcome(bc.configure, op[1], op[2], now)
            rp = outcome(bp.configure, op[1], op[2], now)
        elif kind == "tokens":
            rc, rp = outcome(bc.tokens, now), outcome(bp.tokens, now)
        else:
            rc = outcome(getattr(bc, kind), op[1], now)
            rp = outcome(getattr(bp, kind), op[1], now)
        assert same(rc, rp), (kind, op, rc, rp)
        assert (bc.rate, bc.capacity) == (bp.rate, bp.capacity)
        assert bc.tokens(now) == bp.tokens(now)


# -- LeastConnBalancer -------------------------------------------------------------------------------

node_ids = st.integers(-1, 12)
balancer_op = st.one_of(
    st.tuples(st.just("add"), node_ids, st.integers(-1, 6), st.sampled_from([1.0, 2.0, 0.5, 3.0, 0.0])),
    st.tuples(st.just("remove"), node_ids),
    st.tuples(st.just("set_healthy"), node_ids, st.booleans()),
    st.tuples(st.just("set_trial"), node_ids),
    st.tuples(st.just("set_load"), node_ids, st.sampled_from([0.0, 0.5, 2.0, 7.0, -1.0])),
    st.tuples(st.just("set_capacity"), node_ids, st.integers(-1, 6)),
    st.tuples(
        st.just("pick"),
        st.lists(node_ids, max_size=16),
        st.one_of(st.none(), st.frozensets(node_ids, max_size=4)),
    ),
    st.tuples(st.just("pick"), st.lists(node_ids, max_size=6), st.none()),
    st.tuples(st.just("acquire"), node_ids),
    st.tuples(st.just("release"), node_ids),
    st.tuples(st.just("free_slots"), st.lists(node_ids, max_size=8)),
)


@SETTINGS
@given(ops=st.lists(balancer_op, max_size=200))
def test_balancer_twins_agree(both: tuple[SimpleNamespace, SimpleNamespace], ops: list) -> None:
    c_impl, py_impl = both
    lc, lp = c_impl.LeastConnBalancer(), py_impl.LeastConnBalancer()
    for op in ops:
        kind, args = op[0], op[1:]
        if kind == "pick":
            candidates, exclude = args
            # tuples too: the gateway passes either
            args = (tuple(candidates) if len(candidates) % 2 else candidates, exclude)
        rc = outcome(getattr(lc, kind), *args)
        rp = outcome(getattr(lp, kind), *args)
        assert rc == rp, (op, rc, rp)
        for node in range(-1, 13):
            assert lc.inflight(node) == lp.inflight(node)
            assert lc.capacity(node) == lp.capacity(node)
            assert lc.healthy(node) == lp.healthy(node)
            assert lc.trial(node) == lp.trial(node)
            assert lc.load(node) == lp.load(node)
