"""The lifecycle manager: starts a model's backend when a request needs it, places it where it fits,
keeps it while used, evicts it when something else needs the room.

Threads. Everything that blocks or waits (GGUF headers, NVML, fork/exec, readiness polling, stopping
processes) runs on the lifecycle thread, which has its own asyncio loop. The gateway's loop only ever
calls the cheap methods below, which read immutable snapshots or post work to the lifecycle thread
with ``call_soon_threadsafe``; results come back the same way (``on_ready`` / ``on_stopped`` and the
futures are run and resolved on the gateway's loop).

Stopping handshake. Before a ready backend is stopped for being idle or to make room, the lifecycle
thread asks the gateway's loop, which owns ``in_flight``: if a request started meanwhile the stop is
called off; otherwise the endpoint is withdrawn (``on_stopped``) on the loop, so nothing new is
dispatched to it, and only then is the process stopped.

Memory accounting per device: ``free = min(total - reserve - reserved by our models,
NVML free - reserve - reserved by our models still loading)`` (CPU mode: the first term, with the
budget as total and no reserve).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from shardon.errors import ModelNotFound
from shardon.lifecycle import backends as bk
from shardon.lifecycle.catalog import Catalog, CatalogEntry, Measurements, estimate_file_memory_mb
from shardon.lifecycle.config import LifecycleConfig
from shardon.lifecycle.gpus import CPU_INDEX, Device, GpuInventory
from shardon.lifecycle.placement import (
    HEAT_TAU_S,
    InsufficientMemory,
    PlacementRequest,
    Plan,
    Resident,
    Variant,
    plan_placement,
)
from shardon.lifecycle.requests import shape_request
from shardon.lifecycle.state import (
    BackendEndpoint,
    InsufficientMemoryError,
    ModelLoadError,
    Runtime,
    ShaCache,
    Usage,
    gpu_table,
    model_rows,
    where,
)
from shardon.schemas import RoutingFields

log = logging.getLogger("shardon.lifecycle")

TICK_S = 0.1  # crash detection and idle TTL resolution
GPU_REFRESH_S = 1.0
FOOTPRINT_EVERY_S = 5.0
HANDSHAKE_TIMEOUT_S = 5.0
FREED_WAIT_S = 15.0
PLACE_ATTEMPTS = 5


class LifecycleManager:
    def __init__(
        self,
        config: LifecycleConfig,
        *,
        state_dir: str,
        loop: asyncio.AbstractEventLoop,
        on_ready: Callable[[BackendEndpoint], None],
        on_stopped: Callable[[str, str], None],
        nvml: Any = None,
    ) -> None:
        self._config = config
        self._state_dir = os.path.abspath(os.path.expanduser(state_dir))
        self._backends_dir = os.path.join(self._state_dir, "backends")
        self._logs_dir = os.path.join(self._state_dir, "logs")
        os.makedirs(self._backends_dir, exist_ok=True)
        os.makedirs(self._logs_dir, exist_ok=True)
        self._loop = loop
        self._on_ready = on_ready
        self._on_stopped = on_stopped
        self._catalog = Catalog.build(config)
        self._public = sorted(self._catalog.entries)
        self._inventory = GpuInventory(config.gpus, nvml=nvml)
        self._measurements = Measurements(os.path.join(self._state_dir, "measurements.json"))
        self._sha = ShaCache(os.path.join(self._state_dir, "sha256.json"))
        self.launch_count = 0

        # gateway-loop side
        self._usage: dict[str, Usage] = {name: Usage() for name in self._catalog.entries}
        self._ready: dict[str, asyncio.Future[BackendEndpoint]] = {}
        self._waiters: dict[str, list[asyncio.Future[BackendEndpoint]]] = {}
        self._unload_waiters: dict[str, list[asyncio.Future[None]]] = {}

        # lifecycle-thread side
        self._rt: dict[str, Runtime] = {name: Runtime(e) for name, e in self._catalog.entries.items()}
        self._variants_cache: dict[str, list[tuple[str, str, int, int]]] = {}
        self._devices: dict[int, Device] = self._inventory.refresh()
        self._devices_at = time.monotonic()
        self._thread: threading.Thread | None = None
        self._side: asyncio.AbstractEventLoop | None = None
        self._closing_event: asyncio.Event | None = None
        self._side_started = threading.Event()
        self._closed = False
        self._close_lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._handshakes: set[asyncio.Future[bool]] = set()
        self._status: list[dict[str, Any]] = []
        self._gpus: dict[str, Any] = {}
        self._publish()

    # ============================================================== gateway loop: public interface

    def start(self) -> None:
        """Start the lifecycle thread; it stops stale backends, then loads the pinned models."""
        if self._thread is not None or self._closed:
            return
        self._thread = threading.Thread(target=self._thread_main, name="shardon-lifecycle", daemon=True)
        self._thread.start()
        self._side_started.wait(10.0)
        atexit.register(self._kill_all_now)

    def close(self) -> None:
        """Stop every backend and join the thread. Idempotent; bounded by the stop grace period."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        thread, side = self._thread, self._side
        if thread is not None and side is not None:
            with contextlib.suppress(RuntimeError):
                side.call_soon_threadsafe(self._side_close)
            thread.join(self._config.stop_grace_s + 10.0)
            if thread.is_alive():
                log.error("lifecycle thread did not stop in time; killing backends")
        self._kill_all_now()
        with contextlib.suppress(Exception):
            atexit.unregister(self._kill_all_now)
        self._inventory.close()
        self._to_loop(self._loop_fail_all, "the gateway is shutting down")

    def knows(self, model: str) -> bool:
        return model in self._catalog.names

    def resolve(self, model: str) -> str | None:
        return self._catalog.names.get(model)

    def public_models(self) -> list[str]:
        return list(self._public)

    def model_fields(self) -> dict[str, dict[str, Any]]:
        """What ``/v1/models`` adds to each model's entry: its context length, whether it is loaded,
        and whether it takes chat requests."""
        return {
            name: {"context_length": entry.context, "loaded": name in self._ready, "chat": entry.chat}
            for name, entry in self._catalog.entries.items()
        }

    def shape_request(self, model: str, path: str, req: RoutingFields, body: bytes) -> tuple[int | None, bytes]:
        """(max_tokens applied, body to forward) for a request to ``model`` (see ``requests.py``)."""
        entry = self._catalog.entries.get(self._catalog.names.get(model, model))
        if entry is None:
            return None, body
        return shape_request(entry, path, req, body)

    def ensure_ready(self, model: str) -> asyncio.Future[BackendEndpoint]:
        """A future resolved with the model's endpoint once it is ready (at once when it is). One load
        per model however many callers; after a failure the next call tries again."""
        name = self._catalog.names.get(model)
        if name is None:
            fut: asyncio.Future[BackendEndpoint] = self._loop.create_future()
            fut.set_exception(ModelNotFound(f"The model '{model}' does not exist", param="model"))
            return fut
        ready = self._ready.get(name)
        if ready is not None:
            self._usage[name].last_used = time.monotonic()
            return ready
        fut = self._loop.create_future()
        if self._closed or self._thread is None:
            fut.set_exception(ModelLoadError(f"model {name!r} cannot be loaded: the lifecycle is not running"))
            return fut
        waiters = self._waiters.get(name)
        if waiters is not None:
            waiters.append(fut)
            return fut
        self._waiters[name] = [fut]
        if not self._to_side(self._side_ensure, name):
            del self._waiters[name]
            fut.set_exception(ModelLoadError(f"model {name!r} cannot be loaded: the lifecycle is not running"))
        return fut

    def request_started(self, model: str) -> None:
        u = self._usage.get(self._catalog.names.get(model, model))
        if u is None:
            return
        now = time.monotonic()
        idle = now - u.last_used if u.last_used is not None else 0.0
        u.heat = u.heat * math.exp(-idle / HEAT_TAU_S) + 1.0
        u.count += 1
        u.in_flight += 1
        u.last_used = now

    def request_finished(self, model: str) -> None:
        u = self._usage.get(self._catalog.names.get(model, model))
        if u is None:
            return
        u.in_flight = max(0, u.in_flight - 1)
        u.last_used = time.monotonic()

    def load(self, model: str) -> asyncio.Future[BackendEndpoint]:
        return self.ensure_ready(model)

    def unload(self, model: str) -> asyncio.Future[None]:
        """Withdraw the model's endpoint at once, stop its backend (running requests are cut)."""
        fut: asyncio.Future[None] = self._loop.create_future()
        name = self._catalog.names.get(model)
        if name is None:
            fut.set_exception(ModelNotFound(f"The model '{model}' does not exist", param="model"))
            return fut
        if self._closed or self._thread is None:
            fut.set_result(None)
            return fut
        self._unload_waiters.setdefault(name, []).append(fut)
        if len(self._unload_waiters[name]) == 1:
            self._to_side(self._side_unload, name)
        return fut

    def models_status(self) -> list[dict[str, Any]]:
        now_mono, now_wall = time.monotonic(), time.time()
        out = []
        for row in self._status:
            u = self._usage.get(row["name"])
            row = dict(row)
            if u is not None:
                row["in_flight"] = u.in_flight
                row["last_used"] = now_wall - (now_mono - u.last_used) if u.last_used is not None else None
            out.append(row)
        return out

    def gpus_status(self) -> dict[str, Any]:
        return self._gpus

    # ----------------------------------------------------------------------- loop-side callbacks

    def _to_side(self, fn: Callable[..., Any], *args: Any) -> bool:
        side = self._side
        if side is None or self._closed:
            return False
        try:
            side.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            return False
        return True

    def _to_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the gateway's loop is closed
            self._loop.call_soon_threadsafe(fn, *args)

    def _loop_ready(self, endpoint: BackendEndpoint) -> None:
        name = endpoint.model
        current = self._ready.get(name)
        if current is None or current.result().node_id != endpoint.node_id:  # else: already announced
            done: asyncio.Future[BackendEndpoint] = self._loop.create_future()
            done.set_result(endpoint)
            self._ready[name] = done
            self._usage[name].last_used = time.monotonic()
            try:
                self._on_ready(endpoint)
            except Exception:
                log.exception("on_ready callback failed for %s", name)
        for fut in self._waiters.pop(name, []):
            if not fut.done():
                fut.set_result(endpoint)

    def _loop_failed(self, name: str, message: str, insufficient: bool) -> None:
        cls = InsufficientMemoryError if insufficient else ModelLoadError
        for fut in self._waiters.pop(name, []):
            if not fut.done():
                fut.set_exception(cls(message))

    def _loop_withdraw(self, name: str, node_id: str) -> None:
        ready = self._ready.get(name)
        if ready is not None and ready.result().node_id == node_id:
            del self._ready[name]
        try:
            self._on_stopped(name, node_id)
        except Exception:
            log.exception("on_stopped callback failed for %s", name)

    def _loop_confirm_stop(
        self, name: str, node_id: str, force: bool, min_idle_s: float, reply: asyncio.Future[bool]
    ) -> None:
        """On the gateway loop: withdraw the endpoint unless a request is in flight or, for an idle stop,
        the model was handed out again since the decision (``force``: always withdraw)."""
        u = self._usage[name]
        idle = time.monotonic() - u.last_used if u.last_used is not None else math.inf
        ok = force or (u.in_flight <= 0 and idle >= min_idle_s)
        if ok:
            self._loop_withdraw(name, node_id)
        side = self._side
        if side is not None:
            with contextlib.suppress(RuntimeError):
                side.call_soon_threadsafe(_set_result, reply, ok)

    def _loop_unloaded(self, name: str) -> None:
        for fut in self._unload_waiters.pop(name, []):
            if not fut.done():
                fut.set_result(None)

    def _loop_fail_all(self, message: str) -> None:
        for name in list(self._waiters):
            self._loop_failed(name, message, False)
        for name in list(self._unload_waiters):
            self._loop_unloaded(name)
        self._ready.clear()

    # ============================================================================ lifecycle thread

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._side = loop
        self._closing_event = asyncio.Event()
        self._side_started.set()
        try:
            try:
                stopped = bk.cleanup_stale(self._backends_dir, self._config.stop_grace_s)
                if stopped:
                    log.warning("lifecycle: stopped %d stale backend(s)", len(stopped))
            except Exception:
                log.exception("stale backend clean-up failed")
            loop.run_until_complete(self._side_main())
        except Exception:
            log.exception("lifecycle thread failed")
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                self._side = None
                loop.close()

    async def _side_main(self) -> None:
        assert self._closing_event is not None
        loop = asyncio.get_running_loop()
        # Read the GGUF headers now, off the load path.
        prefetch = loop.run_in_executor(None, self._prefetch_variants)
        for name, rt in self._rt.items():
            if rt.entry.pinned and rt.load_task is None:
                rt.load_task = asyncio.create_task(self._load(rt))
                self._usage[name].last_used = time.monotonic()
        ticker = asyncio.create_task(self._ticker())
        if not self._closed:
            await self._closing_event.wait()
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)
        await self._shutdown()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(prefetch, 5.0)

    def _side_close(self) -> None:
        if self._closing_event is not None:
            self._closing_event.set()
        for reply in list(self._handshakes):  # the gateway loop may be blocked in close(): don't wait
            _set_result(reply, True)

    async def _shutdown(self) -> None:
        tasks = []
        for rt in self._rt.values():
            if rt.load_task is not None:
                rt.abort = True
                rt.load_task.cancel()
                tasks.append(rt.load_task)
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(rt.stop_task for rt in self._rt.values() if rt.stop_task), return_exceptions=True)
        stops = []
        for rt in self._rt.values():
            if rt.proc is not None:
                self._withdraw_now(rt)
                rt.state = "unloading"
                stops.append(self._stop(rt, "shutdown", wait_freed=False))
        await asyncio.gather(*stops, return_exceptions=True)
        self._publish()

    def _kill_all_now(self) -> None:
        """Last resort (close() timed out, or interpreter exit without close): SIGKILL every group."""
        for rt in list(self._rt.values()):
            proc = rt.proc
            if proc is None:
                continue
            proc.signal_group(signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.popen.wait(2.0)
            with contextlib.suppress(OSError):
                os.unlink(proc.pid_file)

    # ----------------------------------------------------------------------------------- commands

    def _side_ensure(self, name: str) -> None:
        rt = self._rt[name]
        if rt.state == "ready" and rt.endpoint is not None:
            self._to_loop(self._loop_ready, rt.endpoint)
        elif rt.load_task is None:
            if self._closing_event is not None and self._closing_event.is_set():
                self._to_loop(self._loop_failed, name, "the gateway is shutting down", False)
                return
            rt.load_task = asyncio.create_task(self._load(rt))

    def _side_unload(self, name: str) -> None:
        task = asyncio.create_task(self._unload(self._rt[name]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unload(self, rt: Runtime) -> None:
        name = rt.entry.name
        try:
            if rt.load_task is not None:
                rt.abort = True
                rt.load_task.cancel()
                await asyncio.gather(rt.load_task, return_exceptions=True)
            if rt.stop_task is not None:
                await asyncio.gather(rt.stop_task, return_exceptions=True)
            if rt.proc is not None:  # (an idle stop may have been called off)
                if rt.endpoint is not None:
                    await self._confirm_stop(rt, force=True)
                rt.state = "unloading"
                await self._stop(rt, "unloaded by admin")
            rt.state, rt.error = "unloaded", None
            self._publish()
        finally:
            self._to_loop(self._loop_unloaded, name)

    # ----------------------------------------------------------------------------------- loading

    def _prefetch_variants(self) -> None:
        for rt in list(self._rt.values()):
            if self._closed:
                return
            try:
                self._variants_for(rt.entry)
            except Exception as exc:
                log.debug("estimate for %s failed: %s", rt.entry.name, exc)

    def _variants_for(self, entry: CatalogEntry) -> list[tuple[str, str, int, int]]:
        """(variant, path, estimated MB, weights MB) per variant; blocking (GGUF headers), cached."""
        cached = self._variants_cache.get(entry.name)
        if cached is not None:
            return cached
        out = []
        files = entry.resolve_files()
        for variant, path in files.items():
            if entry.precision != "auto" and variant != entry.precision:
                continue
            if not os.path.exists(path):
                raise FileNotFoundError(f"model file not found: {path}")
            if entry.memory_mb is not None:
                out.append((variant, path, entry.memory_mb, 0))
                continue
            estimate, weights = estimate_file_memory_mb(
                path, entry.context, 1 if entry.backend == "llama-cpp-python" else entry.slots
            )
            out.append((variant, path, estimate, weights))
        self._variants_cache[entry.name] = out
        return out

    def _where_kind(self) -> str:
        return "cpu" if self._inventory.mode == "cpu" else "gpu"

    def _need_mb(self, entry: CatalogEntry, variant: str, estimate: int, weights: int) -> int:
        if entry.memory_mb is not None:
            return entry.memory_mb
        measured = self._measurements.get(Measurements.key(entry, variant, self._where_kind())).get("memory_mb")
        if measured:
            return max(math.ceil(measured * 1.1), weights)
        return estimate

    def _refresh_devices(self, force: bool = False) -> dict[int, Device]:
        now = time.monotonic()
        if force or now - self._devices_at >= GPU_REFRESH_S or self._inventory.mode == "cpu":
            self._devices = self._inventory.refresh()
            self._devices_at = now
        return self._devices

    def _free_by_device(self) -> dict[int, int]:
        devices = self._refresh_devices(force=True)
        cpu = self._inventory.mode == "cpu"
        reserve = 0 if cpu else self._inventory.reserve_mb
        held: dict[int, int] = dict.fromkeys(devices, 0)
        loading: dict[int, int] = dict.fromkeys(devices, 0)
        for rt in self._rt.values():
            if rt.plan is None:
                continue
            for d in rt.plan.devices:
                if d in held:
                    held[d] += rt.plan.per_device_mb
                    if rt.state == "loading":
                        loading[d] += rt.plan.per_device_mb
        free = {}
        for i, dev in devices.items():
            accounted = dev.total_mb - reserve - held[i]
            free[i] = accounted if cpu else min(accounted, dev.free_mb - reserve - loading[i])
        return free

    def _residents(self, exclude: str) -> list[Resident]:
        now = time.monotonic()
        out = []
        for name, rt in self._rt.items():
            if name == exclude or rt.plan is None:
                continue
            u = self._usage[name]
            idle = now - u.last_used if u.last_used is not None else now - rt.ready_at
            out.append(
                Resident(
                    name=name,
                    devices=rt.plan.devices,
                    per_device_mb=rt.plan.per_device_mb,
                    pinned=rt.entry.pinned,
                    in_flight=u.in_flight,
                    state=rt.state,
                    idle_s=idle,
                    heat=u.heat,
                    load_time_s=self._expected_load_time(rt),
                )
            )
        return out

    def _expected_load_time(self, rt: Runtime) -> float:
        if rt.load_time_s is not None:
            return rt.load_time_s
        if rt.plan is not None:
            rec = self._measurements.get(Measurements.key(rt.entry, rt.plan.variant, self._where_kind()))
            if "load_s" in rec:
                return float(rec["load_s"])
            return 1.0 + rt.plan.memory_mb / 1024 * 2.0  # ~2 s per GB until measured
        return 1.0

    async def _load(self, rt: Runtime) -> None:
        name = rt.entry.name
        try:
            if rt.stop_task is not None:
                await asyncio.gather(rt.stop_task, return_exceptions=True)
            if rt.state == "ready" and rt.endpoint is not None:  # the stop was called off
                self._to_loop(self._loop_ready, rt.endpoint)
                return
            rt.state, rt.error, rt.abort = "loading", None, False
            self._publish()
            loop = asyncio.get_running_loop()
            variants = self._variants_cache.get(name)
            if variants is None:
                variants = await loop.run_in_executor(None, self._variants_for, rt.entry)
            self._check_abort(rt)
            paths = {v: p for v, p, _e, _w in variants}
            plan = await self._place(rt, variants)
            self._check_abort(rt)
            await self._launch_and_wait(rt, plan, paths[plan.variant])
        except asyncio.CancelledError:
            await self._abort_load(rt, "loading was cancelled", "unloaded")
            self._to_loop(self._loop_failed, name, f"model {name!r} was not loaded: loading was cancelled", False)
            raise
        except InsufficientMemory as exc:
            await self._abort_load(rt, str(exc), "failed")
            self._to_loop(self._loop_failed, name, str(exc), True)
            self._retry_pinned(rt)
        except (bk.BackendFailed, OSError, ValueError) as exc:
            msg = f"model {name!r} failed to load: {exc}"
            log.warning("lifecycle: %s", msg)
            await self._abort_load(rt, msg, "failed")
            self._to_loop(self._loop_failed, name, msg, False)
            self._retry_pinned(rt)
        except Exception as exc:
            msg = f"model {name!r} failed to load: {exc.__class__.__name__}: {exc}"
            log.exception("lifecycle: %s", msg)
            await self._abort_load(rt, msg, "failed")
            self._to_loop(self._loop_failed, name, msg, False)
        finally:
            if asyncio.current_task() is rt.load_task:
                rt.load_task = None
            self._publish()

    @staticmethod
    def _check_abort(rt: Runtime) -> None:
        if rt.abort:
            raise asyncio.CancelledError

    def _retry_pinned(self, rt: Runtime) -> None:
        if not rt.entry.pinned or self._closed:
            return
        rt.failures += 1
        delay = min(60.0, 1.0 * 2 ** (rt.failures - 1))
        log.info("lifecycle: pinned model %s will be retried in %.0f s", rt.entry.name, delay)

        def again() -> None:
            if rt.load_task is None and rt.state != "ready" and not self._closed:
                rt.load_task = asyncio.create_task(self._load(rt))

        asyncio.get_running_loop().call_later(delay, again)

    async def _abort_load(self, rt: Runtime, message: str, state: str) -> None:
        if rt.proc is not None:
            await asyncio.shield(self._stop(rt, "load failed", wait_freed=False, final_state=state))
        rt.plan = None
        rt.state = state
        rt.error = message if state == "failed" else None
        rt.endpoint = None
        self._publish()

    async def _place(self, rt: Runtime, variants: list[tuple[str, str, int, int]]) -> Plan:
        entry = rt.entry
        request = PlacementRequest(
            name=entry.name,
            variants=tuple(Variant(v, self._need_mb(entry, v, est, w)) for v, _p, est, w in variants),
            gpu_group=entry.gpu_group,
        )
        for _attempt in range(PLACE_ATTEMPTS):
            plan = plan_placement(
                request, self._free_by_device(), self._inventory.groups, self._residents(exclude=entry.name)
            )
            rt.plan = plan  # reserved from now on
            self._publish()
            if not plan.evict:
                return plan
            victims = [self._rt[v] for v in plan.evict]
            log.info("lifecycle: evicting %s to load %s", ", ".join(plan.evict), entry.name)
            for v in victims:
                v.state = "unloading"
            oks = await asyncio.gather(*(self._confirm_stop(v, force=False) for v in victims))
            stops = []
            for v, ok in zip(victims, oks, strict=True):
                if ok:
                    v.stop_task = asyncio.create_task(self._stop(v, f"evicted for {entry.name}"))
                    stops.append(v.stop_task)
                elif v.state == "unloading" and v.proc is not None:
                    v.state = "ready"
            await asyncio.gather(*stops, return_exceptions=True)
            if all(oks):
                return plan
            rt.plan = None  # a victim got busy meanwhile: plan again
        raise InsufficientMemory(f"insufficient memory for model {entry.name!r}: the models to evict stayed busy")

    async def _launch_and_wait(self, rt: Runtime, plan: Plan, path: str) -> None:
        entry = rt.entry
        loop = asyncio.get_running_loop()
        devices = () if plan.devices == (CPU_INDEX,) else plan.devices
        fraction = None
        if devices:
            totals = [self._devices[d].total_mb for d in devices if d in self._devices]
            if totals:
                fraction = plan.per_device_mb / min(totals)
        spec = bk.build_launch(
            entry, path, port=bk.free_port(), devices=devices, python=self._config.python,
            gpu_memory_fraction=fraction,
        )  # fmt: skip
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in entry.name)
        rt.gen += 1
        self.launch_count += 1
        rt.proc = bk.spawn(
            spec,
            log_path=os.path.join(self._logs_dir, f"{safe}.log"),
            pid_file=os.path.join(self._backends_dir, f"{safe}.json"),
            model=entry.name,
        )
        rt.measure_key = Measurements.key(entry, plan.variant, self._where_kind())
        rt.sha_task = loop.run_in_executor(None, self._sha.get, path)
        self._publish()
        load_s = await bk.wait_ready(
            rt.proc,
            stall_timeout_s=entry.stall_timeout_s,
            ready_timeout_s=entry.ready_timeout_s,
            abort=lambda: rt.abort,
        )
        sha = rt.sha_task.result() if rt.sha_task.done() and rt.sha_task.exception() is None else None
        rt.endpoint = BackendEndpoint(
            node_id=f"lifecycle:{entry.name}:{rt.gen}",
            url=spec.url,
            model=entry.name,
            served_name=spec.served_name,
            slots=spec.slots,
            backend=entry.backend,
            model_file_sha256=sha,
        )
        rt.state, rt.error, rt.failures = "ready", None, 0
        rt.ready_at = time.monotonic()
        rt.load_time_s = load_s
        rt.measured_mb = 0
        rt.last_footprint = 0.0
        self._measurements.update(rt.measure_key, load_s=round(load_s, 3))
        log.info(
            "lifecycle: %s ready at %s in %.2f s (%s on %s)",
            entry.name,
            spec.url,
            load_s,
            plan.variant,
            where(rt.plan),
        )
        self._publish()
        self._to_loop(self._loop_ready, rt.endpoint)

    # ---------------------------------------------------------------------------------- stopping

    async def _confirm_stop(self, rt: Runtime, force: bool, min_idle_s: float = 0.0) -> bool:
        """Ask the gateway loop to withdraw the endpoint (refused when a request is in flight)."""
        endpoint = rt.endpoint
        if endpoint is None:
            return True
        if self._closed:
            self._withdraw_now(rt)
            return True
        reply: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        try:
            self._loop.call_soon_threadsafe(
                self._loop_confirm_stop, rt.entry.name, endpoint.node_id, force, min_idle_s, reply
            )
        except RuntimeError:  # gateway loop closed: nothing can be in flight
            return True
        self._handshakes.add(reply)
        try:
            return await asyncio.wait_for(reply, HANDSHAKE_TIMEOUT_S)
        except TimeoutError:
            log.warning("lifecycle: gateway loop did not answer; %s kept", rt.entry.name)
            return force
        finally:
            self._handshakes.discard(reply)

    def _withdraw_now(self, rt: Runtime) -> None:
        if rt.endpoint is not None:
            self._to_loop(self._loop_withdraw, rt.entry.name, rt.endpoint.node_id)

    async def _stop(self, rt: Runtime, reason: str, *, wait_freed: bool = True, final_state: str = "unloaded") -> None:
        proc = rt.proc
        if proc is None:
            return
        if rt.state == "ready":
            rt.state = "unloading"
        self._publish()
        devices = rt.plan.devices if rt.plan is not None else ()
        gpu = [d for d in devices if d != CPU_INDEX]
        before = {d: dev.free_mb for d, dev in self._refresh_devices(force=True).items()} if gpu else {}
        log.info("lifecycle: stopping %s (%s)", rt.entry.name, reason)
        try:
            await bk.stop(proc, self._config.stop_grace_s)
            if gpu and wait_freed and rt.plan is not None:
                await self._wait_freed(gpu, before, rt.plan.per_device_mb)
        finally:
            rt.proc = None
            rt.plan = None
            rt.endpoint = None
            if rt.state == "unloading":
                rt.state = final_state
            if asyncio.current_task() is rt.stop_task:
                rt.stop_task = None
            self._publish()

    async def _wait_freed(self, gpus: list[int], before: dict[int, int], per_device_mb: int) -> None:
        """After a stop on GPUs: wait (bounded) until NVML shows the memory back."""
        deadline = time.monotonic() + FREED_WAIT_S
        loop = asyncio.get_running_loop()
        while time.monotonic() < deadline:
            devices = await loop.run_in_executor(None, self._inventory.refresh)
            if all(
                d not in devices
                or devices[d].free_mb >= before.get(d, 0) + int(per_device_mb * 0.8)
                or devices[d].free_mb >= devices[d].total_mb - self._inventory.reserve_mb
                for d in gpus
            ):
                self._devices, self._devices_at = devices, time.monotonic()
                return
            await asyncio.sleep(0.05)
        log.warning("lifecycle: GPU memory on %s not freed after %.0f s; going on", gpus, FREED_WAIT_S)

    # ------------------------------------------------------------------------------------ ticker

    async def _ticker(self) -> None:
        last_gpu = 0.0
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            try:
                self._check_backends(now)
                if now - last_gpu >= GPU_REFRESH_S:
                    last_gpu = now
                    self._refresh_devices(force=True)
                    self._publish()
            except Exception:
                log.exception("lifecycle tick failed")

    def _check_backends(self, now: float) -> None:
        for name, rt in self._rt.items():
            if rt.state != "ready" or rt.proc is None:
                continue
            rc = rt.proc.poll()
            if rc is not None:
                self._on_crash(rt, rc)
                continue
            u = self._usage[name]
            ttl = rt.entry.idle_ttl_s
            if not rt.entry.pinned and ttl > 0 and u.in_flight <= 0:
                last = max(u.last_used or 0.0, rt.ready_at)
                if now - last > ttl and rt.stop_task is None:
                    rt.state = "unloading"
                    rt.stop_task = asyncio.create_task(self._idle_stop(rt))
                    continue
            if now - rt.last_footprint >= (FOOTPRINT_EVERY_S if rt.last_footprint else 0):
                rt.last_footprint = now
                self._measure(rt)

    async def _idle_stop(self, rt: Runtime) -> None:
        try:
            if await self._confirm_stop(rt, force=False, min_idle_s=rt.entry.idle_ttl_s):
                await self._stop(rt, f"idle for more than {rt.entry.idle_ttl_s:g} s")
            elif rt.state == "unloading":
                rt.state = "ready"
        finally:
            if asyncio.current_task() is rt.stop_task:
                rt.stop_task = None
            self._publish()

    def _on_crash(self, rt: Runtime, rc: int) -> None:
        proc = rt.proc
        assert proc is not None
        msg = f"backend exited unexpectedly (exit code {rc}): {proc.log_tail(600)}"
        log.warning("lifecycle: %s %s", rt.entry.name, msg)
        proc.signal_group(signal.SIGKILL)  # leftovers of the group
        with contextlib.suppress(OSError):
            os.unlink(proc.pid_file)
        endpoint = rt.endpoint
        rt.proc, rt.plan, rt.endpoint = None, None, None
        rt.state, rt.error = "failed", msg
        self._publish()
        if endpoint is not None:
            self._to_loop(self._loop_withdraw, rt.entry.name, endpoint.node_id)
        if rt.entry.pinned and rt.load_task is None and not self._closed:
            rt.load_task = asyncio.create_task(self._load(rt))

    def _measure(self, rt: Runtime) -> None:
        proc, plan = rt.proc, rt.plan
        if proc is None or plan is None or rt.measure_key is None:
            return
        if self._inventory.mode == "cpu":
            used = proc.rss_mb()
        else:
            per_gpu = self._inventory.process_memory_mb(bk.group_pids(proc.pgid))
            used = sum(per_gpu.values())
        if used <= rt.measured_mb:
            return
        rt.measured_mb = used
        prev = self._measurements.get(rt.measure_key).get("memory_mb", 0)
        if used > prev:
            self._measurements.update(rt.measure_key, memory_mb=used)
        if rt.entry.memory_mb is None and used > plan.memory_mb:
            k = len(plan.devices)
            rt.plan = Plan(plan.variant, used, plan.group, plan.devices, math.ceil(used / k), plan.evict, plan.loss)
            self._publish()

    # ------------------------------------------------------------------------------------ status

    def _publish(self) -> None:
        self._status = model_rows(self._rt)
        self._gpus = gpu_table(self._rt, self._devices, self._inventory)


def _set_result(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)
