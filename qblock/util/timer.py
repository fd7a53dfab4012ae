"""Clocks and timers: QEMU's util/qemu-timer.c and include/qemu/timer.h.

Clocks: ``QEMU_CLOCK_REALTIME`` (monotonic host time), ``QEMU_CLOCK_HOST``
(wall-clock time), ``QEMU_CLOCK_VIRTUAL`` and ``QEMU_CLOCK_VIRTUAL_RT``.  The
virtual clock is the one tests use: like QEMU's under qtest, it moves only
when told — :func:`qemu_clock_step` (qtest's ``clock_step``) or
:func:`qemu_clock_advance_virtual_time` — or when ``aio_poll(ctx, True)`` has
nothing else to do and warps it to the next virtual timer deadline.  Timing
behaviour is then exact and instant.

Each AioContext owns a :class:`QEMUTimerListGroup` (one :class:`QEMUTimerList`
per clock).  A timer list is a heap ordered by expiry time, ties in arming
order (QEMU keeps a sorted linked list with the same order).

``qtest_enabled()`` mirrors QEMU's flag: code that QEMU points at the virtual
clock under qtest (throttle groups, and in qblock the null driver's latency)
asks it which clock to use.
"""
from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Any, Callable

import attrs

from qblock.trace import control as _trace
from qblock.trace.events import trace_timer_fire, trace_timer_mod
from qblock.util.coroutine import request_id_get, request_id_set

__all__ = [
    "QEMU_CLOCK_REALTIME", "QEMU_CLOCK_VIRTUAL", "QEMU_CLOCK_HOST", "QEMU_CLOCK_VIRTUAL_RT",
    "QEMU_CLOCK_MAX", "SCALE_NS", "SCALE_US", "SCALE_MS", "NANOSECONDS_PER_SECOND",
    "QEMUTimer", "QEMUTimerList", "QEMUTimerListGroup", "qemu_clock_get_ns", "qemu_clock_get_ms",
    "qemu_clock_get_us", "qemu_clock_step", "qemu_clock_advance_virtual_time",
    "timer_new_ns", "timer_new_us", "timer_new_ms", "timer_init", "timer_mod", "timer_mod_ns",
    "timer_mod_anticipate", "timer_mod_anticipate_ns", "timer_del", "timer_pending", "timer_expired",
    "timer_expire_time_ns", "timer_free", "qemu_soonest_timeout", "qtest_enabled", "qtest_set_enabled",
]

QEMU_CLOCK_REALTIME = 0
QEMU_CLOCK_VIRTUAL = 1
QEMU_CLOCK_HOST = 2
QEMU_CLOCK_VIRTUAL_RT = 3
QEMU_CLOCK_MAX = 4

SCALE_MS = 1000000
SCALE_US = 1000
SCALE_NS = 1
NANOSECONDS_PER_SECOND = 1000000000

_CLOCK_NAMES = {QEMU_CLOCK_REALTIME: "realtime", QEMU_CLOCK_VIRTUAL: "virtual",
                QEMU_CLOCK_HOST: "host", QEMU_CLOCK_VIRTUAL_RT: "virtual_rt"}

_virtual_ns = 0
_virtual_lock = threading.Lock()
_qtest = False

# Timer lists of every clock that follows virtual time; told when it jumps.
_virtual_lists: "set[QEMUTimerList]" = set()


def qtest_enabled() -> bool:
    """True when deterministic (qtest-like) timing is on: QEMU points some timers at the virtual clock then."""
    return _qtest


def qtest_set_enabled(on: bool) -> None:
    global _qtest
    _qtest = bool(on)


def qemu_clock_get_ns(clock_type: int) -> int:
    """Current time of a clock in nanoseconds."""
    if clock_type == QEMU_CLOCK_VIRTUAL or clock_type == QEMU_CLOCK_VIRTUAL_RT:
        return _virtual_ns
    if clock_type == QEMU_CLOCK_REALTIME:
        return time.monotonic_ns()
    if clock_type == QEMU_CLOCK_HOST:
        return time.time_ns()
    raise ValueError(f"unknown clock type {clock_type}")


def qemu_clock_get_ms(clock_type: int) -> int:
    return qemu_clock_get_ns(clock_type) // SCALE_MS


def qemu_clock_get_us(clock_type: int) -> int:
    return qemu_clock_get_ns(clock_type) // SCALE_US


def qemu_clock_advance_virtual_time(dest: int) -> int:
    """Move the virtual clock forward to ``dest`` ns (never backwards); wake contexts whose timers expired."""
    global _virtual_ns
    with _virtual_lock:
        if dest > _virtual_ns:
            _virtual_ns = dest
        now = _virtual_ns
    for tl in tuple(_virtual_lists):
        d = tl.deadline_ns()
        if d == 0:
            tl.notify()
    return now


def qemu_clock_step(ns: int) -> int:
    """qtest's ``clock_step``: advance the virtual clock by ``ns``; returns the new time."""
    if ns < 0:
        raise ValueError("clock_step needs a non-negative step")
    return qemu_clock_advance_virtual_time(_virtual_ns + ns)


def qemu_soonest_timeout(a: int, b: int) -> int:
    """The sooner of two timeouts in ns, where -1 means infinite."""
    if a < 0:
        return b
    if b < 0:
        return a
    return min(a, b)


# ---------------------------------------------------------------------------
# Timers

_seq = itertools.count()


@attrs.define(eq=False, slots=True)
class QEMUTimer:
    """A timer (QEMU's QEMUTimer); ``expire_time`` is -1 while it is not pending."""

    timer_list: "QEMUTimerList"
    scale: int
    cb: Callable[[Any], None]
    opaque: Any
    expire_time: int = -1
    gen: int = 0            # bumped on every mod/del, so stale heap entries are skipped
    request_id: Any = None  # request id carried to the callback when tracing

    @property
    def trace_name(self) -> str:
        cb = getattr(self.cb, "__qualname__", "timer")
        return f"timer({cb})"


class QEMUTimerList:
    """The timers of one clock in one AioContext, ordered by expiry (QEMU's QEMUTimerList)."""

    def __init__(self, clock_type: int, notify_cb: Callable[[], None] | None = None, ctx: Any = None):
        self.clock_type = clock_type
        self.notify_cb = notify_cb
        self.ctx = ctx
        self.heap: list[tuple[int, int, int, QEMUTimer]] = []
        self.lock = threading.Lock()
        if clock_type in (QEMU_CLOCK_VIRTUAL, QEMU_CLOCK_VIRTUAL_RT):
            _virtual_lists.add(self)

    def notify(self) -> None:
        if self.notify_cb is not None:
            self.notify_cb()

    def _top(self) -> QEMUTimer | None:
        heap = self.heap
        while heap:
            expire, _, gen, ts = heap[0]
            if ts.gen == gen and ts.expire_time == expire:
                return ts
            heapq.heappop(heap)
        return None

    def has_timers(self) -> bool:
        with self.lock:
            return self._top() is not None

    def expire_ns(self) -> int:
        """Absolute expiry of the earliest timer, or -1 when none is pending."""
        with self.lock:
            ts = self._top()
            return -1 if ts is None else ts.expire_time

    def deadline_ns(self) -> int:
        """ns until the earliest timer expires: -1 none, 0 already expired (timerlist_deadline_ns)."""
        expire = self.expire_ns()
        if expire < 0:
            return -1
        now = qemu_clock_get_ns(self.clock_type)
        return max(expire - now, 0)

    def run_timers(self) -> bool:
        """Run every expired timer, earliest first; True when a callback ran (timerlist_run_timers)."""
        progress = False
        now = qemu_clock_get_ns(self.clock_type)
        while True:
            with self.lock:
                ts = self._top()
                if ts is None or ts.expire_time > now:
                    break
                heapq.heappop(self.heap)
                expire = ts.expire_time
                ts.expire_time = -1
                ts.gen += 1
            if trace_timer_fire.event.enabled:
                trace_timer_fire(self.ctx, ts, self.clock_type, expire)
            progress = True
            if ts.request_id is not None:
                old = request_id_set(ts.request_id)
                try:
                    ts.cb(ts.opaque)
                finally:
                    request_id_set(old)
            else:
                ts.cb(ts.opaque)
        return progress

    def destroy(self) -> None:
        _virtual_lists.discard(self)
        self.heap.clear()


class QEMUTimerListGroup:
    """One timer list per clock (QEMU's QEMUTimerListGroup)."""

    def __init__(self, notify_cb: Callable[[], None] | None = None, ctx: Any = None):
        self.tl = [QEMUTimerList(t, notify_cb, ctx) for t in range(QEMU_CLOCK_MAX)]

    def deadline_ns(self, clocks: tuple[int, ...] = (QEMU_CLOCK_REALTIME, QEMU_CLOCK_VIRTUAL,
                                                    QEMU_CLOCK_HOST, QEMU_CLOCK_VIRTUAL_RT)) -> int:
        deadline = -1
        for t in clocks:
            deadline = qemu_soonest_timeout(deadline, self.tl[t].deadline_ns())
        return deadline

    def run_timers(self) -> bool:
        progress = False
        for tl in self.tl:
            progress |= tl.run_timers()
        return progress

    def destroy(self) -> None:
        for tl in self.tl:
            tl.destroy()


def timer_init(timer_list: QEMUTimerList, scale: int, cb: Callable[[Any], None], opaque: Any = None) -> QEMUTimer:
    return QEMUTimer(timer_list, scale, cb, opaque)


def _main_tlg(clock_type: int) -> QEMUTimerList:
    from qblock.util.aio import qemu_get_aio_context  # main loop timers live in its context
    return qemu_get_aio_context().tlg.tl[clock_type]


def timer_new_ns(clock_type: int, cb: Callable[[Any], None], opaque: Any = None) -> QEMUTimer:
    """A timer in the main loop's AioContext with nanosecond scale."""
    return QEMUTimer(_main_tlg(clock_type), SCALE_NS, cb, opaque)


def timer_new_us(clock_type: int, cb: Callable[[Any], None], opaque: Any = None) -> QEMUTimer:
    return QEMUTimer(_main_tlg(clock_type), SCALE_US, cb, opaque)


def timer_new_ms(clock_type: int, cb: Callable[[Any], None], opaque: Any = None) -> QEMUTimer:
    return QEMUTimer(_main_tlg(clock_type), SCALE_MS, cb, opaque)


def timer_mod_ns(ts: QEMUTimer, expire_time: int) -> None:
    """(Re-)arm ``ts`` to fire at ``expire_time`` ns of its clock."""
    tl = ts.timer_list
    with tl.lock:
        ts.gen += 1
        ts.expire_time = max(expire_time, 0)
        if _trace.trace_active:
            ts.request_id = request_id_get()
        heapq.heappush(tl.heap, (ts.expire_time, next(_seq), ts.gen, ts))
        earliest = tl.heap[0][3] is ts
    if trace_timer_mod.event.enabled:
        trace_timer_mod(tl.ctx, ts, tl.clock_type, ts.expire_time)
    if earliest:
        tl.notify()


def timer_mod(ts: QEMUTimer, expire_time: int) -> None:
    """Arm ``ts`` for ``expire_time`` in the timer's scale units."""
    timer_mod_ns(ts, expire_time * ts.scale)


def timer_mod_anticipate_ns(ts: QEMUTimer, expire_time: int) -> None:
    """Arm ``ts`` unless it is already pending with an earlier expiry."""
    if ts.expire_time < 0 or expire_time < ts.expire_time:
        timer_mod_ns(ts, expire_time)


def timer_mod_anticipate(ts: QEMUTimer, expire_time: int) -> None:
    timer_mod_anticipate_ns(ts, expire_time * ts.scale)


def timer_del(ts: QEMUTimer) -> None:
    """Disarm ``ts``; a no-op when it is not pending."""
    with ts.timer_list.lock:
        if ts.expire_time >= 0:
            ts.gen += 1
            ts.expire_time = -1


def timer_free(ts: QEMUTimer) -> None:
    timer_del(ts)


def timer_pending(ts: QEMUTimer) -> bool:
    return ts.expire_time >= 0


def timer_expired(ts: QEMUTimer, current_time: int) -> bool:
    """True when ``ts`` is pending and due at ``current_time`` (in its scale)."""
    return ts.expire_time >= 0 and ts.expire_time <= current_time * ts.scale


def timer_expire_time_ns(ts: QEMUTimer) -> int:
    """Expiry of a pending timer in ns, -1 when it is not pending."""
    return ts.expire_time


def clock_name(clock_type: int) -> str:
    return _CLOCK_NAMES.get(clock_type, str(clock_type))
