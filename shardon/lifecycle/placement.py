"""Placement: where a model goes, at which precision, and which idle models make room. Pure functions.

Candidates. A group is a set of devices; within a group a model goes on one device when one suffices,
else across all of the group's devices (its memory split evenly, as llama.cpp's layer split and
vLLM's tensor parallelism do). The model's configured group comes first; other groups are tried only
when nothing fits there. Among fitting candidates the best fit wins: fewest devices, then least
memory left over.

Precision ("auto"). Variants are tried from the largest down; the first that fits in *free* memory is
taken. Only when no variant fits without evicting are evictions considered; then the plan losing the
least wins (ties: the larger variant).

Eviction. Only ready models that are not pinned and have no request in flight may go. Each carries a
loss (what unloading it is expected to cost: how hot it is, from frequency and recency of use, times
the time it takes to load again); victims are taken by least loss per MB freed until the model fits,
then any victim not actually needed is put back. Nothing fits even so: :class:`InsufficientMemory`,
whose message says what was needed and what stood in the way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Half-life-like constant of the usage "heat": a model used once 10 minutes ago counts ~1/e.
HEAT_TAU_S = 600.0


@dataclass(frozen=True)
class Variant:
    label: str
    memory_mb: int


@dataclass(frozen=True)
class PlacementRequest:
    name: str
    variants: tuple[Variant, ...]  # any order; fixed precision: exactly one
    gpu_group: str | None = None


@dataclass(frozen=True)
class Resident:
    """A model holding memory now."""

    name: str
    devices: tuple[int, ...]
    per_device_mb: int
    pinned: bool = False
    in_flight: int = 0
    state: str = "ready"  # only ready models can be evicted
    idle_s: float = 0.0  # seconds since last use
    heat: float = 0.0  # decayed request count at the time of last use
    load_time_s: float = 1.0

    @property
    def memory_mb(self) -> int:
        return self.per_device_mb * len(self.devices)

    @property
    def evictable(self) -> bool:
        return self.state == "ready" and not self.pinned and self.in_flight <= 0


@dataclass(frozen=True)
class Plan:
    variant: str
    memory_mb: int
    group: str
    devices: tuple[int, ...]
    per_device_mb: int
    evict: tuple[str, ...] = ()
    loss: float = 0.0


class InsufficientMemory(Exception):
    pass


def decayed_heat(heat: float, idle_s: float) -> float:
    return heat * math.exp(-max(idle_s, 0.0) / HEAT_TAU_S)


def eviction_loss(r: Resident) -> float:
    """Expected cost of unloading ``r``: its current heat (frequency x recency) times its reload time.
    The small constants keep never-used and instant-loading models comparable by the other factor."""
    return (decayed_heat(r.heat, r.idle_s) + 0.05) * (max(r.load_time_s, 0.0) + 0.5)


def _candidates(groups: Mapping[str, Sequence[int]], preferred: str | None) -> list[tuple[int, str, tuple[int, ...]]]:
    """(group rank, group name, devices): single devices of each group, then the whole group."""
    names = sorted(groups)
    if preferred in groups:
        names.remove(preferred)  # type: ignore[arg-type]
        names.insert(0, preferred)  # type: ignore[arg-type]
    out: list[tuple[int, str, tuple[int, ...]]] = []
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name in names:
        rank = 0 if name == preferred or preferred not in groups else 1
        devices = tuple(groups[name])
        sets = [(d,) for d in devices] + ([devices] if len(devices) > 1 else [])
        for s in sets:
            key = tuple(sorted(s))
            if (rank, key) in seen:
                continue
            seen.add((rank, key))
            out.append((rank, name, s))
    return out


def _per_device(memory_mb: int, devices: tuple[int, ...]) -> int:
    return math.ceil(memory_mb / len(devices))


def _fits(free: Mapping[int, int], devices: tuple[int, ...], need: int) -> bool:
    return all(free.get(d, -1) >= need for d in devices)


def plan_placement(
    request: PlacementRequest,
    free_mb: Mapping[int, int],
    groups: Mapping[str, Sequence[int]],
    residents: Sequence[Resident] = (),
) -> Plan:
    """Choose variant, devices and victims for ``request``. ``free_mb`` is the memory each device can
    still give (after reserves and every model already placed); ``residents`` are the models placed
    now. Raises :class:`InsufficientMemory`."""
    if not request.variants:
        raise InsufficientMemory(f"model {request.name!r} has no file to load")
    variants = sorted(request.variants, key=lambda v: v.memory_mb, reverse=True)
    cands = _candidates(groups, request.gpu_group)
    if not cands:
        raise InsufficientMemory(f"insufficient memory for model {request.name!r}: no device to place it on")

    # 1. Largest variant that fits in free memory, best fit.
    for v in variants:
        best: tuple[tuple[int, int, int], tuple[int, str, tuple[int, ...]]] | None = None
        for cand in cands:
            rank, _name, devices = cand
            need = _per_device(v.memory_mb, devices)
            if _fits(free_mb, devices, need):
                leftover = sum(free_mb[d] for d in devices) - need * len(devices)
                key = (rank, len(devices), leftover)
                if best is None or key < best[0]:
                    best = (key, cand)
        if best is not None:
            _rank, group, devices = best[1]
            return Plan(v.label, v.memory_mb, group, devices, _per_device(v.memory_mb, devices))

    # 2. Evict: the plan losing least, over every variant and candidate.
    evictable = [r for r in residents if r.evictable]
    best_plan: tuple[tuple[float, int, int, int, int], Plan] | None = None
    for vi, v in enumerate(variants):
        for rank, group, devices in cands:
            need = _per_device(v.memory_mb, devices)
            victims = _choose_victims(free_mb, devices, need, evictable)
            if victims is None:
                continue
            loss = sum(eviction_loss(r) for r in victims)
            freed = {d: free_mb.get(d, 0) for d in devices}
            for r in victims:
                for d in r.devices:
                    if d in freed:
                        freed[d] += r.per_device_mb
            leftover = sum(freed.values()) - need * len(devices)
            plan_key = (round(loss, 9), vi, rank, len(devices), leftover)
            if best_plan is None or plan_key < best_plan[0]:
                plan = Plan(v.label, v.memory_mb, group, devices, need, tuple(r.name for r in victims), loss)
                best_plan = (plan_key, plan)
    if best_plan is not None:
        return best_plan[1]

    smallest = variants[-1]
    best_free = max(
        (sum(free_mb.get(d, 0) for d in devices) for _r, _g, devices in cands),
        default=0,
    )
    blocked = [r for r in residents if not r.evictable]
    why = []
    pinned = sorted(r.name for r in blocked if r.pinned)
    busy = sorted(r.name for r in blocked if not r.pinned and r.in_flight > 0)
    other = sorted(r.name for r in blocked if not r.pinned and r.in_flight <= 0)
    if pinned:
        why.append(f"pinned: {', '.join(pinned)}")
    if busy:
        why.append(f"requests in flight: {', '.join(busy)}")
    if other:
        why.append(f"loading/unloading: {', '.join(other)}")
    detail = f" ({'; '.join(why)})" if why else ""
    raise InsufficientMemory(
        f"insufficient memory for model {request.name!r}: needs {smallest.memory_mb} MB"
        f" ({smallest.label}), at most {best_free} MB free on one device group and not enough"
        f" idle models to evict{detail}"
    )


def _choose_victims(
    free_mb: Mapping[int, int], devices: tuple[int, ...], need: int, evictable: Sequence[Resident]
) -> list[Resident] | None:
    on_target = [r for r in evictable if set(r.devices) & set(devices)]
    free = {d: free_mb.get(d, 0) for d in devices}

    def fits(chosen: list[Resident]) -> bool:
        f = dict(free)
        for r in chosen:
            for d in r.devices:
                if d in f:
                    f[d] += r.per_device_mb
        return all(v >= need for v in f.values())

    def freed_here(r: Resident) -> int:
        return r.per_device_mb * len(set(r.devices) & set(devices))

    order = sorted(on_target, key=lambda r: (eviction_loss(r) / max(freed_here(r), 1), r.name))
    chosen: list[Resident] = []
    for r in order:
        if fits(chosen):
            break
        chosen.append(r)
    if not fits(chosen):
        return None
    # Put back victims that are not needed, most valuable first.
    for r in sorted(chosen, key=eviction_loss, reverse=True):
        trial = [c for c in chosen if c is not r]
        if fits(trial):
            chosen = trial
    return chosen
