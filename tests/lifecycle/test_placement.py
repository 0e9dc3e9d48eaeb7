"""Placement: best fit, configured group first, auto precision, eviction by least loss."""

from __future__ import annotations

import pytest

from shardon.lifecycle.placement import (
    InsufficientMemory,
    PlacementRequest,
    Resident,
    Variant,
    decayed_heat,
    eviction_loss,
    plan_placement,
)

CPU = {"cpu": [-1]}


def req(name: str = "m", *variants: tuple[str, int], group: str | None = None) -> PlacementRequest:
    vs = variants or (("Q4_K_M", 1000),)
    return PlacementRequest(name, tuple(Variant(label, mb) for label, mb in vs), group)


def res(name: str, devices: tuple[int, ...], mb: int, **kw: object) -> Resident:
    return Resident(name=name, devices=devices, per_device_mb=mb, **kw)  # type: ignore[arg-type]


def test_fits_in_free_memory_without_eviction() -> None:
    plan = plan_placement(req(), {-1: 4000}, CPU, [res("other", (-1,), 1000)])
    assert (plan.group, plan.devices, plan.variant, plan.evict) == ("cpu", (-1,), "Q4_K_M", ())
    assert plan.per_device_mb == plan.memory_mb == 1000


def test_auto_precision_takes_the_largest_variant_that_fits() -> None:
    r = req("m", ("Q4_K_M", 4000), ("F16", 14000), ("Q8_0", 7500))
    assert plan_placement(r, {-1: 20000}, CPU).variant == "F16"
    assert plan_placement(r, {-1: 10000}, CPU).variant == "Q8_0"
    assert plan_placement(r, {-1: 5000}, CPU).variant == "Q4_K_M"
    with pytest.raises(InsufficientMemory, match=r"needs 4000 MB \(Q4_K_M\)"):
        plan_placement(r, {-1: 3000}, CPU)


def test_smaller_variant_without_eviction_beats_evicting() -> None:
    r = req("m", ("Q4_K_M", 4000), ("F16", 14000))
    plan = plan_placement(r, {-1: 6000}, CPU, [res("idle", (-1,), 10000)])
    assert plan.variant == "Q4_K_M" and plan.evict == ()


def test_best_fit_picks_the_tightest_device() -> None:
    groups = {"all": [0, 1, 2]}
    plan = plan_placement(req("m", ("x", 10000)), {0: 30000, 1: 12000, 2: 9000}, groups)
    assert plan.devices == (1,)


def test_configured_group_comes_first_even_if_another_fits_better() -> None:
    groups = {"fast": [0, 1], "small": [2]}
    free = {0: 70000, 1: 70000, 2: 11000}
    assert plan_placement(req("m", ("x", 10000), group="fast"), free, groups).devices in ((0,), (1,))
    assert plan_placement(req("m", ("x", 10000)), free, groups).devices == (2,)  # no preference: best fit


def test_other_groups_when_the_configured_one_is_full() -> None:
    groups = {"fast": [0, 1], "small": [2]}
    plan = plan_placement(req("m", ("x", 10000), group="fast"), {0: 4000, 1: 4000, 2: 20000}, groups)
    assert (plan.group, plan.devices) == ("small", (2,))


def test_spans_the_whole_group_when_no_single_device_suffices() -> None:
    groups = {"fast": [0, 1]}
    plan = plan_placement(req("m", ("x", 100000)), {0: 60000, 1: 60000}, groups)
    assert plan.devices == (0, 1) and plan.per_device_mb == 50000
    with pytest.raises(InsufficientMemory):
        plan_placement(req("m", ("x", 100000)), {0: 60000, 1: 40000}, groups)


def test_evicts_only_what_is_needed_and_the_cheapest() -> None:
    residents = [
        res("hot", (-1,), 3000, heat=50.0, idle_s=5, load_time_s=10),
        res("cold", (-1,), 3000, heat=1.0, idle_s=3000, load_time_s=10),
        res("lukewarm", (-1,), 3000, heat=5.0, idle_s=60, load_time_s=10),
    ]
    plan = plan_placement(req("m", ("x", 4000)), {-1: 1500}, CPU, residents)
    assert plan.evict == ("cold",)
    plan = plan_placement(req("m", ("x", 7000)), {-1: 1500}, CPU, residents)
    assert set(plan.evict) == {"cold", "lukewarm"}


def test_slow_to_reload_models_are_kept() -> None:
    residents = [
        res("slow", (-1,), 3000, heat=2.0, idle_s=10, load_time_s=60),
        res("quick", (-1,), 3000, heat=2.0, idle_s=10, load_time_s=1),
    ]
    assert plan_placement(req("m", ("x", 3000)), {-1: 0}, CPU, residents).evict == ("quick",)


def test_one_big_victim_rather_than_many_small_ones() -> None:
    residents = [res(f"s{i}", (-1,), 1000, heat=1.0, idle_s=10) for i in range(4)]
    residents.append(res("big", (-1,), 4000, heat=1.0, idle_s=10))
    plan = plan_placement(req("m", ("x", 4000)), {-1: 0}, CPU, residents)
    assert plan.evict == ("big",)


def test_unneeded_victims_are_put_back() -> None:
    residents = [
        res("a", (-1,), 500, heat=0.0, idle_s=9999, load_time_s=0.1),
        res("b", (-1,), 5000, heat=0.5, idle_s=100, load_time_s=1),
    ]
    plan = plan_placement(req("m", ("x", 5000)), {-1: 0}, CPU, residents)
    assert plan.evict == ("b",)


def test_never_pinned_never_in_flight_never_loading() -> None:
    residents = [
        res("pinned", (-1,), 3000, pinned=True),
        res("busy", (-1,), 3000, in_flight=2),
        res("loading", (-1,), 3000, state="loading"),
    ]
    with pytest.raises(InsufficientMemory) as err:
        plan_placement(req("m", ("x", 2000)), {-1: 1000}, CPU, residents)
    msg = str(err.value)
    assert "insufficient memory for model 'm'" in msg and "needs 2000 MB" in msg
    assert "pinned: pinned" in msg and "requests in flight: busy" in msg and "loading/unloading: loading" in msg


def test_victims_on_other_devices_do_not_help() -> None:
    groups = {"a": [0], "b": [1]}
    residents = [res("elsewhere", (1,), 8000)]
    plan = plan_placement(req("m", ("x", 6000), group="a"), {0: 1000, 1: 0}, groups, residents)
    assert plan.devices == (1,) and plan.evict == ("elsewhere",)
    with pytest.raises(InsufficientMemory):
        plan_placement(req("m", ("x", 6000)), {0: 1000, 1: 0}, {"a": [0]}, residents)


def test_multi_device_victim_frees_each_of_its_devices() -> None:
    groups = {"fast": [0, 1]}
    residents = [res("wide", (0, 1), 30000)]
    plan = plan_placement(req("m", ("x", 50000)), {0: 0, 1: 0}, groups, residents)
    assert plan.evict == ("wide",) and plan.devices == (0, 1)


def test_eviction_with_auto_precision_prefers_least_loss() -> None:
    r = req("m", ("Q4", 3000), ("F16", 9000))
    residents = [res("x", (-1,), 3000, heat=1.0, idle_s=1), res("y", (-1,), 6000, heat=3.0, idle_s=1)]
    plan = plan_placement(r, {-1: 0}, CPU, residents)
    assert plan.variant == "Q4" and plan.evict == ("x",)


def test_no_devices_or_no_variants() -> None:
    with pytest.raises(InsufficientMemory, match="no device"):
        plan_placement(req(), {}, {})
    with pytest.raises(InsufficientMemory, match="no file"):
        plan_placement(PlacementRequest("m", ()), {-1: 1000}, CPU)


def test_loss_grows_with_use_and_reload_time_and_fades_with_idleness() -> None:
    base = res("a", (-1,), 1000, heat=5.0, idle_s=10, load_time_s=5)
    assert eviction_loss(res("a", (-1,), 1000, heat=10.0, idle_s=10, load_time_s=5)) > eviction_loss(base)
    assert eviction_loss(res("a", (-1,), 1000, heat=5.0, idle_s=10, load_time_s=50)) > eviction_loss(base)
    assert eviction_loss(res("a", (-1,), 1000, heat=5.0, idle_s=5000, load_time_s=5)) < eviction_loss(base)
    assert decayed_heat(4.0, 0) == 4.0 and decayed_heat(4.0, 1e9) == pytest.approx(0.0)
