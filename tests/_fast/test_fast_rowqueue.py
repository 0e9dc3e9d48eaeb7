"""The request log's row queue, against both implementations (compiled and pure Python)."""

from __future__ import annotations

import os
import struct
import sys
import threading
from types import ModuleType
from typing import Any

import msgspec
import pytest

from shardon.store import RequestRecord
from tests.support import twin

FORCED = os.environ.get("SHARDON_NO_EXTENSIONS", "").strip().lower() in ("1", "true", "yes")
ENCODER = msgspec.msgpack.Encoder()
DECODE = msgspec.msgpack.Decoder(RequestRecord).decode


def _load(name: str) -> ModuleType:
    return twin("rowqueue", name)


@pytest.fixture
def rq_mod(implementation: str) -> ModuleType:
    return _load(implementation)


class Wakes:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1


class Refused(list[Any]):
    def __call__(self, record: Any) -> None:
        self.append(record)


def new(mod: ModuleType, batch_max: int = 1000, wake: Any = None, refuse: Any = None, defer: int = 64) -> Any:
    return mod.RowQueue(ENCODER, wake or Wakes(), batch_max, refuse if refuse is not None else Refused(), defer)


def record(i: int, **kw: Any) -> RequestRecord:
    return RequestRecord(id=i, received_at=1000.0 + i, model=f"m{i}", status=200, **kw)


def rows_of(taken: tuple[bytes, bytes, int]) -> list[RequestRecord]:
    payload, lengths, count = taken
    assert len(lengths) == 4 * count
    out, pos = [], 0
    for (n,) in struct.iter_unpack("<I", lengths):
        out.append(DECODE(payload[pos : pos + n]))
        pos += n
    assert pos == len(payload)
    return out


def test_rows_come_out_in_order_as_frames(rq_mod: ModuleType) -> None:
    q = new(rq_mod)
    assert q.take(10) is None
    for i in range(5):
        assert q.append(record(i, tenant="t" * i)) is True
    assert len(q) == 5
    taken = q.take(3)
    assert taken[2] == 3
    assert [r.id for r in rows_of(taken)] == [0, 1, 2]
    assert len(q) == 2
    q.append(record(5))
    rest = rows_of(q.take(100))
    assert [r.id for r in rest] == [3, 4, 5]
    assert rest[1].tenant == "tttt"
    assert q.take(1) is None and len(q) == 0


@pytest.mark.parametrize("defer", [1, 3, 64])
def test_rows_are_packed_in_runs_of_defer_or_at_take(rq_mod: ModuleType, defer: int) -> None:
    """A record is packed once ``defer`` are waiting, or when the writer takes rows: what it holds
    then is the row (the contract: a record does not change once appended)."""
    q = new(rq_mod, defer=defer)
    recs = [record(i) for i in range(7)]
    for rec in recs:
        q.append(rec)
    for rec in recs:
        rec.status = 500  # packed already: the rows before the last full run of defer
    packed = (len(recs) // defer) * defer
    assert len(q) == 7  # packed or not
    assert [r.status for r in rows_of(q.take(100))] == [200] * packed + [500] * (7 - packed)
    assert len(q) == 0


def test_rows_are_the_encoders_bytes(rq_mod: ModuleType) -> None:
    q = new(rq_mod)
    recs = [record(i, output_sha256="ab" * 32) for i in range(3)]
    for r in recs:
        q.append(r)
    payload, lengths, _ = q.take(10)
    assert payload == b"".join(ENCODER.encode(r) for r in recs)
    assert lengths == struct.pack("<3I", *(len(ENCODER.encode(r)) for r in recs))


@pytest.mark.parametrize("defer", [1, 2, 64])
def test_a_record_that_cannot_be_packed_is_refused_and_leaves_no_trace(rq_mod: ModuleType, defer: int) -> None:
    refused = Refused()
    q = new(rq_mod, refuse=refused, defer=defer)
    q.append(record(1))
    bad = record(2, prompt_tokens=1 << 70)  # no msgpack integer holds it
    worse = record(3, prompt_tokens=1 << 80, client_addr="y" * 3000)
    assert q.append(bad) is True  # queued: it fails when packed
    assert q.append(record(2, output_sha256="x" * 5000)) is True  # after a bigger partial write
    assert q.append(worse) is True
    assert q.append(record(4)) is True
    rows = rows_of(q.take(10))
    assert [r.id for r in rows] == [1, 2, 4]
    assert rows[1].output_sha256 == "x" * 5000
    assert refused == [bad, worse]  # each handed over once, in order
    assert len(q) == 0 and q.take(10) is None


def test_refuse_may_append_again(rq_mod: ModuleType) -> None:
    """``refuse`` is called once the queue is whole again: it may append (here, a fixed record)."""
    q: Any = None

    def refuse(rec: RequestRecord) -> None:
        q.append(record(rec.id + 100))

    q = new(rq_mod, refuse=refuse, defer=2)
    q.append(record(1, prompt_tokens=1 << 70))
    q.append(record(2))  # the run of two is packed here: 1 is refused, 101 appended
    assert [r.id for r in rows_of(q.take(10))] == [2, 101]


def test_a_closed_queue_refuses_rows_but_keeps_those_queued(rq_mod: ModuleType) -> None:
    q = new(rq_mod)
    q.append(record(1))
    q.close()
    assert q.closed is True
    assert q.append(record(2)) is False
    assert [r.id for r in rows_of(q.take(10))] == [1]


def test_clear_drops_and_counts(rq_mod: ModuleType) -> None:
    q = new(rq_mod, defer=4)
    for i in range(7):  # four packed, three deferred
        q.append(record(i))
    assert q.clear() == 7
    assert len(q) == 0 and q.take(5) is None
    q.append(record(9))
    assert [r.id for r in rows_of(q.take(5))] == [9]


def test_the_writer_is_woken_once_per_batch(rq_mod: ModuleType) -> None:
    wakes = Wakes()
    q = new(rq_mod, batch_max=4, wake=wakes)
    for i in range(3):
        q.append(record(i))
    assert wakes.n == 0
    q.append(record(3))
    assert wakes.n == 1
    for i in range(4, 20):
        q.append(record(i))
    assert wakes.n == 1  # until the writer takes rows, no more wake-ups
    q.take(4)
    q.append(record(20))
    assert wakes.n == 2  # 17 rows waiting >= 4: the first append after a take wakes it again


def test_grows_past_its_first_capacity(rq_mod: ModuleType) -> None:
    q = new(rq_mod, batch_max=1)
    n = 5000  # the compiled lengths array starts at 64 entries
    for i in range(n):
        q.append(record(i))
    ids: list[int] = []
    while (taken := q.take(777)) is not None:
        ids += [r.id for r in rows_of(taken)]
    assert ids == list(range(n))


def test_batch_max_and_defer_must_be_positive(rq_mod: ModuleType) -> None:
    with pytest.raises(ValueError, match="batch_max"):
        new(rq_mod, batch_max=0)
    with pytest.raises(ValueError, match="defer"):
        new(rq_mod, defer=0)


@pytest.mark.parametrize("defer", [1, 7, 64])
def test_append_and_take_from_two_threads_lose_nothing(rq_mod: ModuleType, defer: int) -> None:
    """The event loop appends while the writer takes (and packs): every row comes out once, in order."""
    q = new(rq_mod, batch_max=50, defer=defer)
    n = 20000
    out: list[int] = []
    done = threading.Event()

    def writer() -> None:
        while True:
            finished = done.is_set()
            taken = q.take(64)
            if taken is not None:
                out.extend(r.id for r in rows_of(taken))
            elif finished:
                return

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for i in range(n):
            q.append(record(i))
    finally:
        done.set()
        thread.join(60)
    assert out == list(range(n))


def test_the_queue_holds_a_reference_until_the_record_is_packed(rq_mod: ModuleType) -> None:
    q = new(rq_mod, defer=8)
    rec = record(1)
    before = sys.getrefcount(rec)
    q.append(rec)
    assert sys.getrefcount(rec) == before + 1  # deferred: the queue keeps it
    q.take(10)
    assert sys.getrefcount(rec) == before  # packed: let go
    q.append(rec)
    q.clear()
    assert sys.getrefcount(rec) == before
    q.append(rec)
    del q  # a queue dropped with records deferred releases them
    assert sys.getrefcount(rec) == before


def test_compiled_row_queue_loaded() -> None:
    """The request log uses the compiled queue (fails when it was not built)."""
    from shardon._fast import rowqueue

    if FORCED:
        assert rowqueue.ROWQUEUE_COMPILED is False
        assert rowqueue.RowQueue is _load("py").RowQueue
        return
    assert rowqueue.ROWQUEUE_COMPILED is True
    assert rowqueue.RowQueue is _load("c").RowQueue


def test_interleaved_appends_and_partial_takes_keep_order(rq_mod: ModuleType) -> None:
    """Partial takes free the front; later appends reuse it (the compiled queue moves rows down)."""
    q = new(rq_mod, batch_max=1)  # the compiled lengths array starts at 64 entries, its data at 64 KiB
    out: list[int] = []
    n = 0
    for round_no in range(200):
        for _ in range(37 + round_no % 5):
            q.append(record(n, client_addr="c" * (round_no % 7) * 40))
            n += 1
        out += [r.id for r in rows_of(q.take(29))]
    while (taken := q.take(50)) is not None:
        out += [r.id for r in rows_of(taken)]
    assert out == list(range(n))


def test_a_limit_refuses_rows_beyond_it(rq_mod: ModuleType) -> None:
    """With ``limit``, a reader that cannot keep up loses rows (append returns False), not memory."""
    refused = Refused()
    q = rq_mod.RowQueue(ENCODER, Wakes(), 1000, refused, 4, limit=10)
    assert q.limit == 10
    assert [q.append(record(i)) for i in range(12)] == [True] * 10 + [False] * 2
    assert len(q) == 10 and not refused  # refused by append: the caller counts them
    assert [r.id for r in rows_of(q.take(3))] == [0, 1, 2]
    assert q.append(record(12)) is True
    assert [r.id for r in rows_of(q.take(100))] == [*range(3, 10), 12]
    unlimited = new(rq_mod)
    assert unlimited.limit == 0 and all(unlimited.append(record(i)) for i in range(2000))
    with pytest.raises(ValueError):
        rq_mod.RowQueue(ENCODER, Wakes(), 10, Refused(), 4, limit=-1)
