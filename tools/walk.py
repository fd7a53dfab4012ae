"""The stage tracer behind ``qblock trace``: function-level steps, yields, BHs, timers and trace events.

While a walk is recorded, :class:`StageTracer` hooks three things, all of
them only for as long as it records (the untraced path pays nothing):

* ``sys.setprofile`` (and ``threading.setprofile`` for IOThreads), filtered to
  the functions that mirror a stage of QEMU's path (the table below): each
  call and return becomes an ``enter``/``exit`` step, named by the QEMU source
  file and function it mirrors (``block/io.c:bdrv_aligned_pwritev``);
* ``greenlet.settrace``: a coroutine switch becomes a ``yield`` (with what the
  coroutine waits on) or a ``resume`` step;
* a trace sink: the block layer's trace events (what each stage decided:
  padding, FUA emulation, fragmentation, throttling) become ``event`` steps,
  and ``aio_bh_call``/``timer_fire``/``virtio_notify`` become ``bh``/``timer``/``irq``.

Depth is kept per coroutine; a coroutine's steps are indented below the
step that first entered it, so the walk reads like a call tree even across
yields.  Every step carries the virtual time, the AioContext, the coroutine
id and the request id, and :func:`format_text`, :func:`format_json` and
:func:`format_perfetto` render them.
"""
from __future__ import annotations

import enum
import fnmatch
import importlib
import inspect
import json
import sys
import threading
from typing import Any, Callable, Iterable

import attrs
import greenlet

from qblock.trace import control as _trace
from qblock.util.aio import qemu_get_current_aio_context
from qblock.util.coroutine import Coroutine, request_id_get
from qblock.util.qapi_event import qapi_event_add_listener, qapi_event_remove_listener
from qblock.util.timer import QEMU_CLOCK_VIRTUAL, qemu_clock_get_ns

# Which Python functions are stages, and the QEMU source file each module mirrors.
STAGE_MODULES: list[tuple[str, str, list[str]]] = [
    ("qblock.hw.guest", "guest", ["VirtioBlkGuest.kick", "VirtioBlkGuest._interrupt", "VirtioBlkGuest._complete"]),
    ("qblock.hw.virtio", "hw/virtio/virtio.c",
     ["virtio_queue_notify", "virtqueue_pop", "virtqueue_push", "virtio_notify", "virtio_notify_irqfd"]),
    ("qblock.hw.virtio_blk_dataplane", "hw/block/dataplane/virtio-blk.c",
     ["virtio_blk_data_plane_handle_output", "virtio_blk_data_plane_notify", "notify_guest_bh"]),
    ("qblock.hw.virtio_blk", "hw/block/virtio-blk.c",
     ["virtio_blk_handle_output", "virtio_blk_handle_vq", "virtio_blk_get_request", "virtio_blk_handle_request",
      "virtio_blk_submit_multireq", "submit_requests", "virtio_blk_handle_flush",
      "virtio_blk_handle_discard_write_zeroes", "virtio_blk_rw_complete", "virtio_blk_flush_complete",
      "virtio_blk_discard_write_zeroes_complete", "virtio_blk_req_complete", "virtio_blk_handle_rw_error",
      "virtio_blk_dma_restart_cb", "virtio_blk_dma_restart_bh"]),
    ("qblock.block.block_backend", "block/block-backend.c",
     ["blk_aio_pwritev", "blk_aio_preadv", "blk_aio_flush", "blk_aio_pdiscard", "blk_aio_pwrite_zeroes",
      "blk_aio_prwv", "blk_aio_write_entry", "blk_aio_read_entry", "blk_aio_flush_entry",
      "blk_aio_pdiscard_entry", "blk_co_do_pwritev", "blk_co_do_preadv", "blk_co_do_flush",
      "blk_co_do_pdiscard", "blk_check_byte_request", "blk_wait_while_drained", "blk_aio_complete",
      "blk_aio_complete_bh", "blk_io_plug", "blk_io_unplug", "blk_error_action", "blk_get_error_action"]),
    ("qblock.util.runstate", "softmmu/runstate.c", ["vm_stop", "vm_start"]),
    ("qblock.block.graph", "block.c", ["bdrv_coroutine_enter"]),
    ("qblock.util.aio", "util/async.c", ["aio_co_enter", "aio_co_schedule", "aio_co_wake"]),
    ("qblock.block.throttle_groups", "block/throttle-groups.c",
     ["throttle_group_co_io_limits_intercept", "throttle_group_schedule_timer", "schedule_next_request",
      "timer_cb", "throttle_group_restart_queue"]),
    ("qblock.block.io", "block/io.c",
     ["bdrv_co_pwritev_part", "bdrv_co_preadv_part", "bdrv_pad_request", "bdrv_padding_rmw_read",
      "mark_request_serialising", "wait_serialising_requests", "tracked_request_begin", "tracked_request_end",
      "bdrv_aligned_pwritev", "bdrv_aligned_preadv", "bdrv_co_write_req_prepare", "bdrv_co_write_req_finish",
      "bdrv_driver_pwritev", "bdrv_driver_preadv", "bdrv_co_flush", "bdrv_co_do_pwrite_zeroes",
      "bdrv_co_do_zero_pwritev", "bdrv_co_pdiscard", "bdrv_co_pwrite_zeroes", "bdrv_co_io_em_complete"]),
    ("qblock.util.thread_pool", "util/thread-pool.c", ["thread_pool_submit_co", "thread_pool_submit_aio"]),
]

# Drivers: every bdrv_* hook of their classes is a stage, named with QEMU's prefix for that driver.
DRIVER_MODULES: list[tuple[str, str, str]] = [
    ("qblock.drivers.null", "block/null.c", "null_"),
    ("qblock.drivers.raw", "block/raw-format.c", "raw_"),
    ("qblock.drivers.file_posix.file_posix", "block/file-posix.c", "raw_"),
    ("qblock.drivers.throttle", "block/throttle.c", "throttle_"),
    ("qblock.drivers.blkdebug", "block/blkdebug.c", "blkdebug_"),
    ("qblock.drivers.blkverify", "block/blkverify.c", "blkverify_"),
    ("qblock.drivers.copy_before_write", "block/copy-before-write.c", "cbw_"),
    ("qblock.drivers.copy_on_read", "block/copy-on-read.c", "cor_"),
    ("qblock.drivers.log", "drivers/log.py", "log_"),
    ("qblock.drivers.qcow2.qcow2", "block/qcow2.c", "qcow2_"),
]
# Module-level functions of these driver modules are stages too (qcow2's allocation steps).
DRIVER_FUNCTION_MODULES: list[tuple[str, str]] = [
    ("qblock.drivers.qcow2.qcow2_cluster", "block/qcow2-cluster.c"),
    ("qblock.drivers.qcow2.qcow2_refcount", "block/qcow2-refcount.c"),
    ("qblock.drivers.qcow2.qcow2_cache", "block/qcow2-cache.c"),
    ("qblock.drivers.copy_before_write", "block/copy-before-write.c"),
]

EVENT_KINDS = {"aio_bh_call": "bh", "timer_fire": "timer", "virtio_notify": "irq", "virtio_notify_irqfd": "irq"}
# Runtime events the tracer already shows as yield/resume steps, or that only add noise to a walk.
DEFAULT_EVENT_EXCLUDE = ("qemu_*coroutine*", "qemu_co_mutex*", "aio_co_schedule*", "aio_bh_schedule", "timer_mod",
                         "aio_poll", "thread_pool_*", "blk_root_*", "bdrv_co_preadv", "bdrv_co_pwritev",
                         "blk_co_preadv", "blk_co_pwritev", "bdrv_aligned_*", "bdrv_driver_preadv",
                         "bdrv_driver_pwritev", "virtqueue_*", "virtio_queue_notify")


@attrs.define
class Stage:
    name: str          # the QEMU function name shown
    src: str           # the QEMU source file ("guest" for the guest driver)
    params: tuple      # parameter names to show on entry


@attrs.define
class Step:
    """One line of a walk."""

    seq: int
    kind: str          # enter, exit, event, yield, resume, bh, timer, irq
    name: str
    src: str
    ts_ns: int
    ctx: str
    co: int | None
    req: int | None
    depth: int
    thread: str
    fields: dict

    @property
    def where(self) -> str:
        return f"{self.src}:{self.name}" if self.src else self.name


def _unwrap(fn: Any) -> Any:
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def _params(fn: Any) -> tuple:
    try:
        names = [p for p in inspect.signature(fn).parameters]
    except (TypeError, ValueError):
        return ()
    return tuple(n for n in names if n not in ("self",))


def build_stage_table() -> dict[Any, Stage]:
    """Map each stage function's code object to what the walk shows for it."""
    table: dict[Any, Stage] = {}
    for modname, src, names in STAGE_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        for qual in names:
            obj: Any = mod
            for part in qual.split("."):
                obj = getattr(obj, part, None)
            if obj is None:
                continue
            fn = _unwrap(obj)
            name = qual.split(".")[-1].lstrip("_") if src == "guest" else qual
            if src == "guest":
                name = f"guest.{name}"
            table[fn.__code__] = Stage(name, src if src != "guest" else "", _params(fn))
    from qblock.block.driver import BlockDriver
    for modname, src, prefix in DRIVER_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        for cls in vars(mod).values():
            if isinstance(cls, type) and issubclass(cls, BlockDriver) and cls.__module__ == modname:
                for attr, fn in vars(cls).items():
                    if attr.startswith("bdrv_") and callable(fn) and hasattr(fn, "__code__"):
                        table[fn.__code__] = Stage(prefix + attr[len("bdrv_"):], src, _params(fn))
    for modname, src in DRIVER_FUNCTION_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        for name, fn in vars(mod).items():
            if inspect.isfunction(fn) and fn.__module__ == modname and not name.startswith("_"):
                table[_unwrap(fn).__code__] = Stage(name, src, _params(fn))
    return table


# --------------------------------------------------------------------------
# Formatting values


def fmt_value(name: str, v: Any) -> str | None:
    """A short, deterministic rendering of an argument, or None to leave it out."""
    if v is None or callable(v) and not hasattr(v, "trace_name"):
        return None
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, enum.Enum):
        return v.name
    if isinstance(v, int):
        if name in ("flags", "local_flags", "write_flags", "status") or name.endswith("_flags"):
            return f"{v:#x}"
        return str(v)
    if isinstance(v, str):
        return v if len(v) < 40 else v[:37] + "..."
    tn = getattr(v, "trace_name", None)
    if tn is not None:
        return tn() if callable(tn) else str(tn)
    if type(v).__name__ == "QEMUIOVector":
        return f"qiov[niov={v.niov} size={v.size}]"
    return None


def _fields_of(frame, stage: Stage) -> dict:
    out = {}
    loc = frame.f_locals
    for p in stage.params:
        if p in loc:
            s = fmt_value(p, loc[p])
            if s is not None:
                out[p] = s
    return out


# --------------------------------------------------------------------------
# The tracer


def _co_of(gr) -> Coroutine | None:
    return getattr(gr, "co", None)


class StageTracer:
    """Records a walk while active: ``with StageTracer(...) as t: ...; t.steps``."""

    def __init__(self, clock: int = QEMU_CLOCK_VIRTUAL, event_patterns: Iterable[str] = ("*",),
                 on_step: Callable[[Step], None] | None = None):
        self.table = build_stage_table()
        self.clock = clock
        self.t0 = qemu_clock_get_ns(clock)
        self.steps: list[Step] = []
        self.on_step = on_step
        self._stacks: dict[int, list] = {}      # coroutine id (0 per thread leader) -> open stage frames
        self._base: dict[int, int] = {}         # coroutine id -> depth below which it was entered
        self._seq = 0
        self._lock = threading.RLock()
        self._patterns = list(event_patterns)
        self._saved_enabled: list = []
        self._threads_hooked: set[int] = set()
        self._active = False

    # -- helpers ------------------------------------------------------------

    def _key(self) -> tuple[int, Coroutine | None]:
        gr = greenlet.getcurrent()
        co = _co_of(gr)
        if co is None or not co.id:
            return -threading.get_ident(), None
        return co.id, co

    def _depth(self, key: int) -> int:
        return self._base.get(key, 0) + len(self._stacks.get(key, ()))

    def _emit(self, kind: str, name: str, src: str, depth: int, co: Coroutine | None, fields: dict) -> None:
        ctx = co.ctx if co is not None and co.ctx is not None else qemu_get_current_aio_context()
        self._seq += 1
        thread = threading.current_thread().name
        req = co.request_id if co is not None else request_id_get()
        step = Step(self._seq, kind, name, src, qemu_clock_get_ns(self.clock) - self.t0, ctx.name,
                    co.id if co is not None else None, req, depth, thread, fields)
        self.steps.append(step)
        if self.on_step is not None:
            self.on_step(step)

    # -- hooks ----------------------------------------------------------------

    def _profile(self, frame, event: str, arg: Any) -> None:
        if event != "call" and event != "return":
            return
        stage = self.table.get(frame.f_code)
        if stage is None:
            return
        with self._lock:
            tid = threading.get_ident()
            if tid not in self._threads_hooked:
                self._threads_hooked.add(tid)
                greenlet.settrace(self._gtrace)
            key, co = self._key()
            stack = self._stacks.setdefault(key, [])
            if event == "call":
                fields = _fields_of(frame, stage)
                self._emit("enter", stage.name, stage.src, self._depth(key), co, fields)
                stack.append(frame)
            else:
                if not stack or stack[-1] is not frame:
                    return  # entered before the walk started
                stack.pop()
                fields = {"ret": str(arg)} if isinstance(arg, int) and not isinstance(arg, bool) else {}
                self._emit("exit", stage.name, stage.src, self._depth(key), co, fields)

    def _gtrace(self, event: str, args) -> None:
        if event not in ("switch", "throw"):
            return
        origin, target = args
        oco, tco = _co_of(origin), _co_of(target)
        with self._lock:
            if oco is not None and oco.id and not oco.terminated and oco.caller is None:
                # The running coroutine gave control back: a yield.
                waits = oco.waiting_on
                desc = getattr(waits, "describe_wait", None)
                what = desc() if desc is not None else (str(waits) if isinstance(waits, str) else "")
                self._emit("yield", f"co{oco.id}", "", self._depth(oco.id), oco,
                           {"waits on": what} if what else {})
            if tco is not None and tco.id:
                if tco.id not in self._base:
                    okey = oco.id if oco is not None and oco.id else -threading.get_ident()
                    self._base[tco.id] = self._depth(okey)
                    entry = getattr(tco.entry, "__name__", "?")
                    self._emit("resume", f"co{tco.id}", "", self._base[tco.id], tco, {"starts": entry})
                elif tco.gr is not None and tco.caller is not None:
                    self._emit("resume", f"co{tco.id}", "", self._depth(tco.id), tco, {})

    def _qapi_event(self, name: str, data: dict, stamp: dict) -> None:
        with self._lock:
            key, co = self._key()
            fields = {k: fmt_value(k, v) or str(v) for k, v in data.items()}
            self._emit("qmp", name, "", self._depth(key), co, fields)

    def _record(self, rec: _trace.TraceRecord) -> None:
        with self._lock:
            key, co = self._key()
            kind = EVENT_KINDS.get(rec.name, "event")
            fields = {k: v for k, v in rec.as_json()["fields"].items() if v is not None}
            self._emit(kind, rec.name, "", self._depth(key), co, fields)

    # -- life cycle -------------------------------------------------------------

    def start(self) -> "StageTracer":
        from qblock.trace import events  # noqa: F401 - make sure every event is declared
        self._saved_enabled = [(ev, ev.enabled) for ev in _trace.trace_event_iter()]
        for ev in _trace.trace_event_iter():
            ev.enabled = (any(fnmatch.fnmatchcase(ev.name, p) for p in self._patterns)
                          and not any(fnmatch.fnmatchcase(ev.name, p) for p in DEFAULT_EVENT_EXCLUDE))
        _trace._update_active()
        _trace.trace_add_sink(self._record)
        qapi_event_add_listener(self._qapi_event)
        self._threads_hooked = {threading.get_ident()}
        greenlet.settrace(self._gtrace)
        threading.setprofile(self._profile)
        sys.setprofile(self._profile)
        self._active = True
        return self

    def stop(self) -> None:
        if not self._active:
            return
        sys.setprofile(None)
        threading.setprofile(None)
        greenlet.settrace(None)
        _trace.trace_remove_sink(self._record)
        qapi_event_remove_listener(self._qapi_event)
        for ev, state in self._saved_enabled:
            ev.enabled = state
        _trace._update_active()
        self._active = False

    def __enter__(self) -> "StageTracer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------
# Output formats

_ARROW = {"enter": "→", "exit": "←", "event": "·", "yield": "⇥", "resume": "↪", "bh": "◆", "timer": "⏱",
          "irq": "⚡", "qmp": "!", "note": "#"}


def step_matches(step: Step, patterns: list[str] | None) -> bool:
    if not patterns:
        return True
    names = (step.name, step.where)
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def format_step_text(step: Step) -> str:
    co = f"co{step.co}" if step.co is not None else "-"
    req = str(step.req) if step.req is not None else "-"
    fields = " ".join(f"{k}={v}" for k, v in step.fields.items())
    head = f"{step.ts_ns / 1e6:10.3f}  {step.ctx:<6} {co:<5} {req:<4} {'  ' * step.depth}{_ARROW.get(step.kind, '?')} "
    if step.kind in ("enter", "exit"):
        body = step.where
    elif step.kind in ("yield", "resume"):
        body = f"{step.kind} {step.name}"
    else:
        body = step.name
    return (head + body + ("  " + fields if fields else "")).rstrip()


TEXT_HEADER = "  time(ms)  ctx    co    req  step"


def format_text(steps: Iterable[Step]) -> str:
    return "\n".join([TEXT_HEADER] + [format_step_text(s) for s in steps]) + "\n"


def format_step_json(step: Step) -> str:
    return json.dumps({"seq": step.seq, "name": step.name, "src": step.src, "kind": step.kind,
                       "ts_ns": step.ts_ns, "ctx": step.ctx, "co": step.co, "req": step.req,
                       "depth": step.depth, "fields": step.fields}, sort_keys=True)


def format_json(steps: Iterable[Step]) -> str:
    return "".join(format_step_json(s) + "\n" for s in steps)


def format_perfetto(steps: list[Step]) -> str:
    """Chrome trace-event JSON: AioContexts as processes, coroutines (and each context's loop) as threads."""
    events: list[dict] = []
    pids: dict[str, int] = {}
    tids: dict[tuple[int, Any], int] = {}
    tid_names: dict[tuple[int, int], str] = {}
    open_spans: dict[tuple[int, int], list[str]] = {}

    def pid_of(ctx: str) -> int:
        if ctx not in pids:
            pids[ctx] = len(pids) + 1
            events.append({"ph": "M", "name": "process_name", "pid": pids[ctx], "tid": 0,
                           "args": {"name": f"AioContext {ctx}"}})
        return pids[ctx]

    def tid_of(pid: int, step: Step) -> int:
        key = (pid, step.co if step.co is not None else ("guest" if step.name.startswith("guest.") else "loop"))
        if key not in tids:
            tids[key] = len(tids) + 1
            label = (f"co{step.co}" if step.co is not None
                     else "guest" if key[1] == "guest" else f"{step.ctx} loop")
            tid_names[(pid, tids[key])] = label
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tids[key], "args": {"name": label}})
        return tids[key]

    for s in steps:
        pid = pid_of(s.ctx)
        tid = tid_of(pid, s)
        ts = s.ts_ns / 1000 + s.seq * 1e-3   # keep order within a virtual instant
        args = dict(s.fields)
        if s.req is not None:
            args["req"] = s.req
        if s.kind == "enter":
            events.append({"ph": "B", "name": s.where, "pid": pid, "tid": tid, "ts": ts, "args": args})
            open_spans.setdefault((pid, tid), []).append(s.where)
        elif s.kind == "exit":
            stack = open_spans.get((pid, tid), [])
            if stack and stack[-1] == s.where:
                stack.pop()
                events.append({"ph": "E", "name": s.where, "pid": pid, "tid": tid, "ts": ts, "args": args})
        else:
            events.append({"ph": "i", "s": "t", "name": f"{s.kind}: {s.name}", "pid": pid, "tid": tid, "ts": ts,
                           "args": args})
    # Close whatever is still open (a walk cut short), so every B has its E.
    last = max((e.get("ts", 0) for e in events), default=0)
    for (pid, tid), stack in open_spans.items():
        while stack:
            last += 1e-3
            events.append({"ph": "E", "name": stack.pop(), "pid": pid, "tid": tid, "ts": last, "args": {}})
    return json.dumps({"traceEvents": events, "displayTimeUnit": "ns"}, indent=None) + "\n"
