"""The event loop: QEMU's util/async.c, util/aio-posix.c, util/aio-wait.c and iothread.c.

An :class:`AioContext` owns bottom halves, timers (one list per clock), file
descriptor handlers and a list of coroutines scheduled into it.
:func:`aio_poll` is the loop, one turn per call: wait for file descriptors
until the nearest deadline, then run scheduled BHs, ready fd handlers and
expired timers, in QEMU's order.

BH semantics are QEMU's (the 5.0+ flag scheme): scheduling a BH twice before
it runs runs it once; a BH scheduled while BHs run goes to the next
``aio_bh_poll``; cancel keeps it queued but skips it; delete frees it without
running it; one-shot BHs free themselves after running; idle BHs run but do
not count as progress.  Within one poll the ready BHs run newest first, as
in QEMU: aio_bh_enqueue pushes onto the head of the list and aio_bh_poll
pops from the head (in the seed's 3.x the list was walked from its newest BH
too).  A context may instead shuffle each batch of BHs
and scheduled coroutines with a seeded RNG (:func:`aio_context_set_shuffle`),
so stress tests explore other legal interleavings and replay any failure.

``aio_co_schedule``/``aio_co_enter``/``aio_co_wake`` follow util/async.c
exactly: another thread's context → scheduled there; inside a coroutine →
queued on the current coroutine's wake-up list; otherwise entered at once.

Differences from QEMU: the virtual clock warps to the next virtual timer when
a blocking poll has nothing else to do (qtest moves it by hand instead); and
a blocking poll that nothing could ever wake (no BH, timer, fd, busy thread
pool or other thread) raises :class:`AioPollDeadlock` with a dump of what
every coroutine waits on, where QEMU would hang.
"""
from __future__ import annotations

import gc
import itertools
import os
import random
import selectors
import signal
import sys
import threading
import traceback
from collections import deque
from typing import Any, Callable

import attrs
import greenlet

from qblock.trace import control as _trace
from qblock.trace.events import (
    trace_aio_bh_call,
    trace_aio_bh_schedule,
    trace_aio_co_schedule,
    trace_aio_co_schedule_bh_cb,
    trace_aio_poll,
)
from qblock.util import coroutine as _co
from qblock.util.coroutine import (
    Coroutine,
    CoroutineError,
    qemu_aio_coroutine_enter,
    request_id_get,
    request_id_set,
)
from qblock.util.timer import (
    QEMU_CLOCK_HOST,
    QEMU_CLOCK_REALTIME,
    QEMU_CLOCK_VIRTUAL,
    QEMU_CLOCK_VIRTUAL_RT,
    QEMUTimer,
    QEMUTimerListGroup,
    qemu_clock_advance_virtual_time,
    qemu_soonest_timeout,
)

__all__ = [
    "AioContext", "QEMUBH", "EventNotifier", "IOThread", "AioPollDeadlock",
    "aio_context_new", "qemu_get_aio_context", "qemu_get_current_aio_context",
    "aio_context_acquire", "aio_context_release", "aio_context_set_shuffle",
    "aio_bh_new", "qemu_bh_new", "qemu_bh_schedule", "qemu_bh_schedule_idle", "qemu_bh_cancel",
    "qemu_bh_delete", "aio_bh_schedule_oneshot", "aio_bh_poll", "aio_poll", "aio_notify",
    "aio_compute_timeout", "aio_set_fd_handler", "aio_set_event_notifier",
    "aio_disable_external", "aio_enable_external", "aio_timer_new", "aio_co_schedule",
    "aio_co_enter", "aio_co_wake", "event_notifier_init", "event_notifier_set",
    "event_notifier_test_and_clear", "event_notifier_cleanup", "event_notifier_get_fd",
    "AIO_WAIT_WHILE", "aio_wait_kick", "aio_wait_bh_oneshot", "iothread_create", "iothread_get_aio_context",
    "iothread_by_id",
    "iothread_destroy", "aio_dump_waiters", "aio_dump_install_signal",
]

# QEMUBH flags (util/async.c)
BH_PENDING = 1 << 0
BH_SCHEDULED = 1 << 1
BH_DELETED = 1 << 2
BH_ONESHOT = 1 << 3
BH_IDLE = 1 << 4
_BH_ONESHOT_SCHEDULED = BH_SCHEDULED | BH_ONESHOT
_BH_SCHEDULED_OR_DELETED = BH_SCHEDULED | BH_DELETED
_BH_CLEAR_ON_DEQUEUE = ~(BH_PENDING | BH_SCHEDULED | BH_IDLE)
_getcurrent = greenlet.getcurrent
_ev_aio_bh_call = trace_aio_bh_call.event


class AioPollDeadlock(RuntimeError):
    """A blocking aio_poll() that nothing could ever wake: QEMU would hang here."""


# ---------------------------------------------------------------------------
# EventNotifier (util/event_notifier-posix.c)


class EventNotifier:
    """A wake-up that crosses threads: an eventfd where available, else a pipe."""

    def __init__(self, active: bool = False):
        if hasattr(os, "eventfd"):
            self.rfd = self.wfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:  # pragma: no cover - non-Linux hosts
            self.rfd, self.wfd = os.pipe()
            os.set_blocking(self.rfd, False)
            os.set_blocking(self.wfd, False)
        if active:
            self.set()

    def set(self) -> None:
        try:
            if self.rfd == self.wfd:
                os.eventfd_write(self.wfd, 1)
            else:  # pragma: no cover
                os.write(self.wfd, b"\0")
        except BlockingIOError:
            pass

    def test_and_clear(self) -> bool:
        got = False
        while True:
            try:
                data = os.read(self.rfd, 8 if self.rfd == self.wfd else 512)
            except BlockingIOError:
                return got
            if not data:
                return got
            got = True
            if self.rfd == self.wfd:
                return True

    def fileno(self) -> int:
        return self.rfd

    def cleanup(self) -> None:
        if self.rfd >= 0:
            os.close(self.rfd)
            if self.wfd != self.rfd:
                os.close(self.wfd)
        self.rfd = self.wfd = -1


def event_notifier_init(active: bool = False) -> EventNotifier:
    return EventNotifier(active)


def event_notifier_set(e: EventNotifier) -> None:
    e.set()


def event_notifier_test_and_clear(e: EventNotifier) -> bool:
    return e.test_and_clear()


def event_notifier_cleanup(e: EventNotifier) -> None:
    e.cleanup()


def event_notifier_get_fd(e: EventNotifier) -> int:
    return e.rfd


# ---------------------------------------------------------------------------
# Bottom halves and the context


@attrs.define(eq=False, slots=True)
class QEMUBH:
    """A bottom half: a callback the loop runs soon (QEMU's QEMUBH)."""

    ctx: "AioContext"
    cb: Callable[[Any], None]
    opaque: Any
    name: str | None = None
    flags: int = 0
    request_id: Any = None

    @property
    def trace_name(self) -> str:
        return self.name or getattr(self.cb, "__qualname__", "bh")


@attrs.define(eq=False, slots=True)
class AioHandler:
    fd: int
    io_read: Callable[[Any], None] | None
    io_write: Callable[[Any], None] | None
    opaque: Any
    is_external: bool
    is_notifier: bool = False


_ctx_ids = itertools.count()


class AioContext:
    """An event loop context (QEMU's AioContext)."""

    def __init__(self, name: str | None = None):
        self.id = next(_ctx_ids)
        self.name = name or f"ctx{self.id}"
        self.lock = threading.RLock()
        self.list_lock = threading.Lock()
        self.bh_list: deque[QEMUBH] = deque()
        self.bh_slice_list: deque[deque[QEMUBH]] = deque()
        self.scheduled_coroutines: deque[Coroutine] = deque()
        self.tlg = QEMUTimerListGroup(self._timer_notify, self)
        self.handlers: dict[int, AioHandler] = {}
        self.selector = selectors.DefaultSelector()
        self.external_disable_cnt = 0
        self.notify_me = False
        self.rng: random.Random | None = None
        self.thread_pool = None
        self.busy = 0               # work in other threads that will notify this context
        self.home_thread: int | None = None
        self.notifier = EventNotifier()
        aio_set_event_notifier(self, self.notifier, _notifier_cb)
        self.handlers[self.notifier.fileno()].is_notifier = True
        self.co_schedule_bh = aio_bh_new(self, co_schedule_bh_cb, self, "co_schedule_bh")

    @property
    def trace_name(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<AioContext {self.name}>"

    def _timer_notify(self) -> None:
        aio_notify(self)


def _notifier_cb(e: EventNotifier) -> None:
    e.test_and_clear()


def aio_context_new(name: str | None = None) -> AioContext:
    return AioContext(name)


def aio_context_destroy(ctx: AioContext) -> None:
    """Release a context's file descriptors and timer lists (the finalize of QEMU's GSource)."""
    for fd in list(ctx.handlers):
        try:
            ctx.selector.unregister(fd)
        except (KeyError, ValueError):
            pass
    ctx.handlers.clear()
    ctx.selector.close()
    ctx.notifier.cleanup()
    ctx.tlg.destroy()
    if ctx.thread_pool is not None:
        ctx.thread_pool.free()
        ctx.thread_pool = None


def aio_context_set_shuffle(ctx: AioContext, seed: int | None) -> None:
    """Run each batch of ready BHs and scheduled coroutines in an order drawn from ``seed``.

    None restores QEMU's order: BHs newest first, scheduled coroutines oldest first."""
    ctx.rng = random.Random(seed) if seed is not None else None


def aio_context_acquire(ctx: AioContext) -> None:
    ctx.lock.acquire()


def aio_context_release(ctx: AioContext) -> None:
    ctx.lock.release()


_main_ctx: AioContext | None = None
_main_lock = threading.Lock()


def qemu_get_aio_context() -> AioContext:
    """The main loop's AioContext, created on first use."""
    global _main_ctx
    ctx = _main_ctx
    if ctx is None:
        with _main_lock:
            if _main_ctx is None:
                _main_ctx = AioContext("main")
            ctx = _main_ctx
    return ctx


_co._main_context_hook = qemu_get_aio_context


def qemu_get_current_aio_context() -> AioContext:
    """The context of the running thread: an IOThread's own, else the main loop's."""
    ctx = _co._tls.ctx
    return ctx if ctx is not None else qemu_get_aio_context()


def _my_aio_context() -> AioContext | None:
    """The context whose loop this thread runs; None in a helper thread (QEMU 6.0+: main only under the BQL)."""
    tls = _co._tls
    ctx = tls.ctx
    if ctx is not None:
        return ctx
    return qemu_get_aio_context() if tls.is_main else None


def aio_notify(ctx: AioContext) -> None:
    """Wake ``ctx`` if it is blocked waiting for file descriptors."""
    if ctx.notify_me:
        ctx.notifier.set()


def aio_bh_new(ctx: AioContext, cb: Callable[[Any], None], opaque: Any = None, name: str | None = None) -> QEMUBH:
    """A BH in ``ctx``; it runs only once scheduled."""
    return QEMUBH(ctx, cb, opaque, name)


def qemu_bh_new(cb: Callable[[Any], None], opaque: Any = None, name: str | None = None) -> QEMUBH:
    return QEMUBH(qemu_get_aio_context(), cb, opaque, name)


def _aio_bh_enqueue(bh: QEMUBH, new_flags: int) -> None:
    ctx = bh.ctx
    # The list lock is taken with acquire()/release() rather than a with statement throughout the
    # hot paths of this module: the same locking, at less than half the cost.
    list_lock = ctx.list_lock
    list_lock.acquire()
    try:
        old = bh.flags
        bh.flags = old | BH_PENDING | new_flags
        if not old & BH_PENDING:
            ctx.bh_list.appendleft(bh)   # at the head, as QEMU: aio_bh_poll runs the newest first
    finally:
        list_lock.release()
    if new_flags & BH_SCHEDULED:
        if _trace.trace_active:
            bh.request_id = request_id_get()
            trace_aio_bh_schedule(ctx, bh, bh.cb)
    if ctx.notify_me:
        ctx.notifier.set()


def qemu_bh_schedule(bh: QEMUBH) -> None:
    """Run ``bh`` at the next aio_bh_poll of its context (once, however often it is scheduled)."""
    _aio_bh_enqueue(bh, BH_SCHEDULED)


def qemu_bh_schedule_idle(bh: QEMUBH) -> None:
    """Like qemu_bh_schedule, but running it does not count as progress."""
    _aio_bh_enqueue(bh, BH_SCHEDULED | BH_IDLE)


def qemu_bh_cancel(bh: QEMUBH) -> None:
    """Do not run ``bh`` (it stays queued and is skipped)."""
    with bh.ctx.list_lock:
        bh.flags &= ~BH_SCHEDULED


def qemu_bh_delete(bh: QEMUBH) -> None:
    """Free ``bh`` at the next aio_bh_poll without running it."""
    _aio_bh_enqueue(bh, BH_DELETED)


def aio_bh_schedule_oneshot(ctx: AioContext, cb: Callable[[Any], None], opaque: Any = None,
                            name: str | None = None) -> QEMUBH:
    """Run ``cb(opaque)`` once at the next aio_bh_poll of ``ctx``."""
    bh = QEMUBH(ctx, cb, opaque, name)
    _aio_bh_enqueue(bh, _BH_ONESHOT_SCHEDULED)
    return bh


def _aio_bh_call(bh: QEMUBH) -> None:
    if _ev_aio_bh_call.enabled:
        trace_aio_bh_call(bh.ctx, bh, bh.cb)
    rid = bh.request_id
    if rid is not None:
        old = request_id_set(rid)
        try:
            bh.cb(bh.opaque)
        finally:
            request_id_set(old)
    else:
        bh.cb(bh.opaque)


def aio_bh_poll(ctx: AioContext) -> bool:
    """Run the BHs scheduled so far; BHs scheduled meanwhile wait for the next call."""
    progress = False
    list_lock = ctx.list_lock
    list_lock.acquire()
    try:
        if not ctx.bh_list and not ctx.bh_slice_list:
            return False
        batch, ctx.bh_list = ctx.bh_list, deque()
    finally:
        list_lock.release()
    if ctx.rng is not None and len(batch) > 1:
        items = list(batch)
        ctx.rng.shuffle(items)
        batch = deque(items)
    slices = ctx.bh_slice_list
    slices.append(batch)
    while slices:
        s = slices[0]
        if not s:
            slices.popleft()
            continue
        bh = s.popleft()
        list_lock.acquire()
        try:
            flags = bh.flags
            bh.flags = flags & _BH_CLEAR_ON_DEQUEUE
        finally:
            list_lock.release()
        if flags & _BH_SCHEDULED_OR_DELETED == BH_SCHEDULED:
            if not flags & BH_IDLE:
                progress = True
            _aio_bh_call(bh)
    return progress


def _bh_runnable(bhs) -> int:
    """-1 when no BH wants to run, 1 when only idle ones do, 0 when a normal one does."""
    t = -1
    for bh in bhs:
        if bh.flags & (BH_SCHEDULED | BH_DELETED) == BH_SCHEDULED:
            if bh.flags & BH_IDLE:
                t = 1
            else:
                return 0
    return t


_IDLE_BH_TIMEOUT_NS = 10_000_000  # idle BHs are polled at least every 10 ms


def aio_compute_timeout(ctx: AioContext) -> int:
    """How long a blocking poll may wait, in ns: 0 with work ready, -1 forever (aio_compute_timeout)."""
    timeout = -1
    with ctx.list_lock:
        for bhs in (ctx.bh_list, *ctx.bh_slice_list):
            r = _bh_runnable(bhs)
            if r == 0:
                return 0
            if r == 1:
                timeout = _IDLE_BH_TIMEOUT_NS
    deadline = ctx.tlg.deadline_ns((QEMU_CLOCK_REALTIME, QEMU_CLOCK_HOST))
    if deadline == 0 or ctx.tlg.deadline_ns((QEMU_CLOCK_VIRTUAL, QEMU_CLOCK_VIRTUAL_RT)) == 0:
        return 0  # an expired timer, virtual ones included, is work ready
    return qemu_soonest_timeout(timeout, deadline)


def aio_set_fd_handler(ctx: AioContext, fd: int, io_read: Callable[[Any], None] | None,
                       io_write: Callable[[Any], None] | None, opaque: Any = None,
                       is_external: bool = False) -> None:
    """Watch ``fd``: ``io_read(opaque)`` when readable, ``io_write(opaque)`` when writable; both None removes."""
    with ctx.list_lock:
        old = ctx.handlers.pop(fd, None)
        if old is not None:
            ctx.selector.unregister(fd)
        if io_read is None and io_write is None:
            return
        events = (selectors.EVENT_READ if io_read else 0) | (selectors.EVENT_WRITE if io_write else 0)
        h = AioHandler(fd, io_read, io_write, opaque, is_external)
        ctx.handlers[fd] = h
        ctx.selector.register(fd, events, h)
    aio_notify(ctx)


def aio_set_event_notifier(ctx: AioContext, e: EventNotifier, io_read: Callable[[EventNotifier], None] | None,
                           is_external: bool = False) -> None:
    """Call ``io_read(e)`` when the notifier is set; None removes it."""
    aio_set_fd_handler(ctx, e.fileno(), io_read, None, e, is_external)


def aio_disable_external(ctx: AioContext) -> None:
    """Stop dispatching handlers registered as external (nested calls count)."""
    with ctx.list_lock:
        ctx.external_disable_cnt += 1


def aio_enable_external(ctx: AioContext) -> None:
    with ctx.list_lock:
        assert ctx.external_disable_cnt > 0
        ctx.external_disable_cnt -= 1
    aio_notify(ctx)


def aio_timer_new(ctx: AioContext, clock_type: int, scale: int, cb: Callable[[Any], None],
                  opaque: Any = None) -> QEMUTimer:
    """A timer on ``clock_type`` whose callback runs in ``ctx``."""
    return QEMUTimer(ctx.tlg.tl[clock_type], scale, cb, opaque)


# Idle thread-pool workers, which never wake a context: ignored by the deadlock check.
_idle_helper_threads = 0


def _nothing_can_wake(ctx: AioContext) -> bool:
    if ctx.busy or len(ctx.handlers) > 1:
        return False
    if threading.active_count() - 1 - _idle_helper_threads > 0:
        return False
    return True


def aio_poll(ctx: AioContext, blocking: bool) -> bool:
    """One turn of the event loop; True when a BH, fd handler or timer made progress.

    This is the loop:
      1. decide how long to wait: not at all unless ``blocking``; not at all
         when a BH is scheduled or a timer expired; else until the nearest
         realtime timer (forever if none);
      2. wait for file descriptors (the context's EventNotifier wakes the wait
         when another thread schedules work here);
      3. if nothing woke it and a virtual timer is pending, warp the virtual
         clock to that timer's deadline;
      4. run scheduled BHs, then ready fd handlers, then expired timers.
    """
    timeout = 0
    warp_to = -1
    if blocking:
        ctx.notify_me = True
        timeout = aio_compute_timeout(ctx)
        if timeout != 0:
            vexpire = min((e for e in (ctx.tlg.tl[QEMU_CLOCK_VIRTUAL].expire_ns(),
                                       ctx.tlg.tl[QEMU_CLOCK_VIRTUAL_RT].expire_ns()) if e >= 0), default=-1)
            if vexpire >= 0 and not ctx.busy:
                warp_to, timeout = vexpire, 0
            elif timeout < 0 and vexpire < 0 and _nothing_can_wake(ctx):
                ctx.notify_me = False
                raise AioPollDeadlock(
                    f"aio_poll({ctx.name}, blocking=true) would wait forever: no BH, timer, "
                    f"file descriptor or other thread can wake it\n{aio_dump_waiters()}")
    ready = ctx.selector.select(None if timeout < 0 else timeout / 1e9)
    ctx.notify_me = False
    if warp_to >= 0 and not any(not key.data.is_notifier for key, _ in ready):
        qemu_clock_advance_virtual_time(warp_to)

    progress = False
    lock = ctx.lock
    lock.acquire()
    try:
        progress |= aio_bh_poll(ctx)
        for key, mask in ready:
            h: AioHandler = key.data
            if ctx.handlers.get(h.fd) is not h:
                continue  # removed by an earlier callback in this turn
            if h.is_external and ctx.external_disable_cnt:
                continue
            if mask & selectors.EVENT_READ and h.io_read is not None:
                h.io_read(h.opaque)
                if not h.is_notifier:
                    progress = True
            if mask & selectors.EVENT_WRITE and h.io_write is not None:
                h.io_write(h.opaque)
                progress = True
        progress |= ctx.tlg.run_timers()
    finally:
        lock.release()
    if trace_aio_poll.event.enabled:
        trace_aio_poll(ctx, int(blocking), int(progress))
    return progress


# ---------------------------------------------------------------------------
# Coroutines and contexts (util/async.c)

_co_sched_lock = threading.Lock()


def aio_co_schedule(ctx: AioContext, co: Coroutine) -> None:
    """Enter ``co`` from ``ctx``'s loop; safe from any thread. Scheduling it twice is an error."""
    with _co_sched_lock:
        if co.scheduled is not None:
            raise CoroutineError(f"aio_co_schedule: Co-routine was already scheduled in '{co.scheduled}'")
        if co.terminated:
            raise CoroutineError(f"aio_co_schedule: Co-routine {co.trace_name} already terminated")
        co.scheduled = "aio_co_schedule"
        ctx.scheduled_coroutines.append(co)
    if trace_aio_co_schedule.event.enabled:
        trace_aio_co_schedule(ctx, co)
    qemu_bh_schedule(ctx.co_schedule_bh)


def co_schedule_bh_cb(ctx: AioContext) -> None:
    """Enter, in order, the coroutines scheduled into ``ctx`` so far."""
    with _co_sched_lock:
        batch = list(ctx.scheduled_coroutines)
        ctx.scheduled_coroutines.clear()
    if ctx.rng is not None and len(batch) > 1:
        ctx.rng.shuffle(batch)
    for i, co in enumerate(batch):
        if trace_aio_co_schedule_bh_cb.event.enabled:
            trace_aio_co_schedule_bh_cb(ctx, co)
        co.scheduled = None
        try:
            qemu_aio_coroutine_enter(ctx, co)
        except BaseException:
            rest = batch[i + 1:]  # an exception must not drop the rest of the batch
            if rest:
                with _co_sched_lock:
                    ctx.scheduled_coroutines.extendleft(reversed(rest))
                qemu_bh_schedule(ctx.co_schedule_bh)
            raise


def aio_co_enter(ctx: AioContext, co: Coroutine) -> None:
    """Run ``co`` in ``ctx``: schedule it there from another thread, queue it from a coroutine, else enter it."""
    # _my_aio_context(), spelled out: this runs for every request.
    tls = _co._tls
    mine = tls.ctx
    if mine is None and tls.is_main:
        mine = _main_ctx if _main_ctx is not None else qemu_get_aio_context()
    if ctx is not mine:
        aio_co_schedule(ctx, co)
        return
    try:
        self = _getcurrent().co
    except AttributeError:
        self = tls.leader
    if self.caller is not None:
        if self is co:
            raise CoroutineError("aio_co_enter: a coroutine cannot wake itself")
        if self.co_queue_wakeup is None:
            self.co_queue_wakeup = [co]
        else:
            self.co_queue_wakeup.append(co)
    else:
        lock = ctx.lock  # aio_context_acquire/release
        lock.acquire()
        try:
            qemu_aio_coroutine_enter(ctx, co)
        finally:
            lock.release()


def aio_co_wake(co: Coroutine) -> None:
    """Wake ``co`` in the context it last ran in."""
    ctx = co.ctx
    if ctx is None:
        ctx = qemu_get_current_aio_context()
    co.waiting_on = None
    aio_co_enter(ctx, co)


# ---------------------------------------------------------------------------
# Waiting for a condition (util/aio-wait.c, include/block/aio-wait.h)


class AioWait:
    num_waiters = 0


global_aio_wait = AioWait()
_wait_lock = threading.Lock()


def _dummy_bh_cb(opaque: Any) -> None:
    pass


def aio_wait_kick() -> None:
    """Wake the main loop if someone waits in AIO_WAIT_WHILE."""
    if global_aio_wait.num_waiters:
        aio_bh_schedule_oneshot(qemu_get_aio_context(), _dummy_bh_cb, None, "aio_wait_kick")


def AIO_WAIT_WHILE(ctx: AioContext | None, cond: Callable[[], bool]) -> bool:
    """Poll until ``cond()`` is false; returns whether it had to wait.

    In ``ctx``'s own thread it polls ``ctx``; from the main thread for an
    IOThread's context it polls the main loop (with ``ctx``'s lock released)
    and relies on aio_wait_kick() to be woken.
    """
    if _co.qemu_in_coroutine():
        raise CoroutineError("AIO_WAIT_WHILE called inside a coroutine")
    waited = False
    with _wait_lock:
        global_aio_wait.num_waiters += 1
    try:
        current = qemu_get_current_aio_context()
        if ctx is None or ctx is current:
            ctx = ctx or current
            while cond():
                aio_poll(ctx, True)
                waited = True
        else:
            main = qemu_get_aio_context()
            if current is not main:
                raise CoroutineError(f"AIO_WAIT_WHILE on {ctx.name} from thread of {current.name}")
            held = ctx.lock._is_owned()
            while cond():
                if held:
                    ctx.lock.release()
                try:
                    aio_poll(main, True)
                finally:
                    if held:
                        ctx.lock.acquire()
                waited = True
    finally:
        with _wait_lock:
            global_aio_wait.num_waiters -= 1
    return waited


def aio_wait_bh_oneshot(ctx: AioContext, cb: Callable[[Any], None], opaque: Any) -> None:
    """Run ``cb(opaque)`` in ``ctx`` (maybe another thread's) and wait until it ran (util/aio-wait.c)."""
    done = []

    def bh(_: Any) -> None:
        cb(opaque)
        done.append(True)
        aio_wait_kick()

    aio_bh_schedule_oneshot(ctx, bh, None, "aio_wait_bh")
    AIO_WAIT_WHILE(ctx, lambda: not done)


# ---------------------------------------------------------------------------
# IOThreads (iothread.c)


class IOThread:
    """A thread running its own AioContext's loop (QEMU's IOThread object)."""

    def __init__(self, id: str):
        self.id = id
        self.ctx = AioContext(id)
        self.stopping = False
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"iothread-{id}", daemon=True)
        self.thread.start()
        self.started.wait()

    def _run(self) -> None:
        _co._tls.ctx = self.ctx
        self.ctx.home_thread = threading.get_ident()
        self.started.set()
        while not self.stopping:
            aio_poll(self.ctx, True)

    def _stop_bh(self, opaque: Any) -> None:
        self.stopping = True

    def stop(self) -> None:
        if self.thread.is_alive():
            aio_bh_schedule_oneshot(self.ctx, self._stop_bh, None, "iothread_stop")
            self.thread.join()


_iothreads: dict[str, IOThread] = {}


def iothread_create(id: str) -> IOThread:
    """Start an IOThread named ``id``."""
    if id in _iothreads:
        from qblock.util.error import Error
        raise Error(f"attempt to add duplicate ID '{id}' to 'iothread'")
    it = IOThread(id)
    _iothreads[id] = it
    return it


def iothread_get_aio_context(iothread: IOThread) -> AioContext:
    return iothread.ctx


def iothread_by_id(id: str) -> IOThread | None:
    return _iothreads.get(id)


def iothread_destroy(iothread: IOThread) -> None:
    """Stop the thread and release its context."""
    iothread.stop()
    _iothreads.pop(iothread.id, None)
    aio_context_destroy(iothread.ctx)


# ---------------------------------------------------------------------------
# "What is everyone waiting on?" (scripts/qemugdb/coroutine.py)


def _live_coroutines() -> list[Coroutine]:
    return sorted((o for o in gc.get_objects()
                   if type(o) is Coroutine and o.id and not o.terminated and o.gr is not None),
                  key=lambda c: c.id)


def _describe_wait(obj: Any) -> str:
    if obj is None:
        return "nothing recorded"
    describe = getattr(obj, "describe_wait", None)
    if describe is not None:
        return describe()
    return _trace.trace_fmt_ptr(obj)


def aio_dump_waiters(file=None) -> str:
    """Describe every live coroutine (what it waits on and where), pending BHs and timers."""
    lines = []
    cos = _live_coroutines()
    lines.append(f"{len(cos)} live coroutine(s):")
    for co in cos:
        state = "running" if co.caller is not None else ("scheduled" if co.scheduled else "suspended")
        entry = getattr(co.entry, "__qualname__", repr(co.entry))
        lines.append(f"  {co.trace_name} {entry}({_trace.trace_fmt_ptr(co.entry_arg)}) [{state}] "
                     f"ctx={co.ctx.name if co.ctx else None} waits on: {_describe_wait(co.waiting_on)}")
        frame = co.gr.gr_frame if co.gr is not None else None
        if frame is not None and co.caller is None:
            for fl in traceback.format_stack(frame)[-6:]:
                for sub in fl.rstrip().splitlines():
                    lines.append("      " + sub)
    ctxs = [c for c in gc.get_objects() if type(c) is AioContext]
    for ctx in sorted(ctxs, key=lambda c: c.id):
        bhs = [bh for bh in itertools.chain(ctx.bh_list, *ctx.bh_slice_list) if bh.flags & BH_SCHEDULED]
        timers = [(tl.clock_type, ts.expire_time, ts) for tl in ctx.tlg.tl
                  for (_, _, gen, ts) in tl.heap if ts.gen == gen and ts.expire_time >= 0]
        if bhs or timers or ctx.busy:
            lines.append(f"context {ctx.name}: {len(bhs)} BH(s) scheduled, {len(timers)} timer(s), busy={ctx.busy}")
            for bh in bhs:
                lines.append(f"    BH {bh.trace_name}")
            for clock, exp, ts in sorted(timers, key=lambda t: t[1]):
                lines.append(f"    timer {ts.trace_name} clock={clock} expires at {exp} ns")
    text = "\n".join(lines)
    if file is not None:
        file.write(text + "\n")
    return text


def _trace_context() -> tuple[int | None, str | None, int | None]:
    try:
        co = greenlet.getcurrent().co
    except AttributeError:
        co = _co._tls.leader
    if co.caller is not None:
        ctx = co.ctx
        return co.id, ctx.name if ctx is not None else None, co.request_id
    return None, qemu_get_current_aio_context().name, _co._tls.request_id


def _trace_clocks() -> tuple[int, int]:
    from qblock.util.timer import qemu_clock_get_ns
    return qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL), qemu_clock_get_ns(QEMU_CLOCK_REALTIME)


_trace.trace_set_context_hook(_trace_context)
_trace.trace_set_clock_hook(_trace_clocks)


def aio_dump_install_signal(signum: int = signal.SIGUSR1) -> None:
    """Print aio_dump_waiters() to stderr when the process receives ``signum``."""
    signal.signal(signum, lambda s, f: aio_dump_waiters(sys.stderr))
