"""Worker threads for blocking calls: QEMU's util/thread-pool.c.

Each AioContext has one :class:`ThreadPool` (``aio_get_thread_pool``).
``thread_pool_submit_aio`` queues ``func(arg)`` for a worker thread; when it
returns, the worker marks the element DONE and schedules the pool's
completion BH in the owning context (waking it through the context's
EventNotifier), and the BH calls ``cb(opaque, ret)`` there.
``thread_pool_submit_co`` does the same from a coroutine and yields until the
completion re-enters it in its own context.

``func`` returns an int (0 or a negative errno).  An ``OSError`` it raises
becomes ``-errno``; any other exception is re-raised from the completion BH,
so it is never lost.  Up to ``max_threads`` (64) workers; an idle worker
exits after 10 s.  Cancelling works only while the element is still queued
and completes it with ``-ECANCELED``, as in QEMU.

Differs from QEMU, because every worker needs the GIL between two jobs:

- A job that a signalled, starting or just-finished worker will take neither
  wakes nor spawns another worker, so the pool never holds more threads than
  jobs in flight.
- While a worker is busy, a new job waits for it instead of waking a second
  one, as long as the pool makes progress: only when no job has finished for
  ``stall_ns`` (1 ms) while jobs wait does the pool wake or spawn one more
  worker, and so on every ``stall_ns`` while it stays stuck.  A stream of short
  jobs (page-cache I/O) then runs on one worker that never sleeps, instead of
  eight that each sleep and wake per job and spin on the same inode lock in
  the kernel; jobs that block (a flush, a slow device, a job waiting for
  another) still each get their own worker, 1 ms later than in QEMU.  The
  cost: jobs shorter than 1 ms that could overlap in the kernel (O_DIRECT on a
  fast SSD, compression) run one at a time.  ``stall_ns = 0`` restores QEMU's
  rule of a worker per queued job.
"""
from __future__ import annotations

import errno
import itertools
import threading
from collections import deque
from typing import Any, Callable

import attrs

from qblock.trace.events import trace_thread_pool_cancel, trace_thread_pool_complete, trace_thread_pool_submit
from qblock.util import aio as _aio
from qblock.util.aio import (
    AioContext,
    aio_bh_new,
    aio_co_wake,
    aio_timer_new,
    qemu_bh_cancel,
    qemu_bh_schedule,
    qemu_get_current_aio_context,
)
from qblock.util.coroutine import coroutine_fn, qemu_coroutine_self, qemu_coroutine_yield
from qblock.util.timer import QEMU_CLOCK_REALTIME, SCALE_NS, qemu_clock_get_ns, timer_del, timer_mod, timer_pending

__all__ = ["ThreadPool", "ThreadPoolElement", "aio_get_thread_pool", "thread_pool_submit_aio",
           "thread_pool_submit_co", "thread_pool_submit", "thread_pool_cancel", "thread_pool_set_inline",
           "THREAD_QUEUED", "THREAD_ACTIVE", "THREAD_DONE"]

THREAD_QUEUED = 0
THREAD_ACTIVE = 1
THREAD_DONE = 2

IDLE_TIMEOUT_S = 10.0
STALL_NS = 1_000_000
_elem_ids = itertools.count(1)


@attrs.define(eq=False)
class ThreadPoolElement:
    """One submitted job (QEMU's ThreadPoolElement, which is also its BlockAIOCB)."""

    pool: "ThreadPool"
    func: Callable[[Any], int]
    arg: Any
    cb: Callable[[Any, int], None] | None
    opaque: Any
    state: int = THREAD_QUEUED
    ret: int = -errno.EINPROGRESS
    exc: BaseException | None = None
    id: int = attrs.field(factory=lambda: next(_elem_ids))

    @property
    def trace_name(self) -> str:
        return f"tp{self.id}"

    def describe_wait(self) -> str:
        state = ("queued", "running", "done")[self.state]
        return f"thread pool job {self.trace_name} {getattr(self.func, '__qualname__', self.func)} ({state})"


class ThreadPool:
    """The worker threads of one AioContext."""

    def __init__(self, ctx: AioContext, max_threads: int = 64):
        self.ctx = ctx
        self.max_threads = max_threads
        self.completion_bh = aio_bh_new(ctx, self._completion_bh, None, "thread_pool_completion_bh")
        self.lock = threading.Lock()
        # QEMU's request_cond, kept by hand: each idle worker blocks on its own lock, and a
        # signal releases the lock of the worker that went idle last.  (threading.Condition
        # works the same way, with a fresh lock per wait and more Python around it.)
        self.request_cond: list[Any] = []
        self.request_list: deque[ThreadPoolElement] = deque()   # QUEUED, oldest first
        self.head: list[ThreadPoolElement] = []                 # every element not yet completed
        self.cur_threads = 0
        self.idle_threads = 0
        # Workers bound to look at request_list soon (qblock only): those signalled or spawned
        # that have not yet looked (``pending_threads``), and those between the end of a job and
        # their next look (``finishing``; a set, since each worker adds itself without the
        # lock).  Under the GIL these gaps last microseconds, not QEMU's nanoseconds; a job
        # they will take wakes and spawns no other worker, which would only contend for the GIL.
        self.pending_threads = 0
        self.finishing: set[Any] = set()
        # Jobs wait for a busy worker while jobs keep finishing (qblock only; see the module
        # docstring): ``running`` workers are inside a job, ``completed`` counts finished jobs,
        # and the stall timer checks every ``stall_ns`` whether any finished meanwhile.
        self.running = 0
        self.completed = 0
        self.stall_ns = STALL_NS
        self.stall_mark = 0
        self.stall_timer = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, self._stall_timer_cb, None)
        self.stopping = False

    @property
    def trace_name(self) -> str:
        return f"pool({self.ctx.name})"

    # -- workers --------------------------------------------------------

    def _spawn(self) -> None:
        self.cur_threads += 1
        self.pending_threads += 1
        t = threading.Thread(target=self._worker, name=f"qblock-worker-{self.ctx.name}", daemon=True)
        t.start()

    def _set_idle(self, delta: int) -> None:
        self.idle_threads += delta
        with _aio_idle_lock:
            _aio._idle_helper_threads += delta

    def _worker(self) -> None:
        lock = self.lock
        finishing = self.finishing
        wake = threading.Lock()
        wake.acquire()
        lock.acquire()
        self.pending_threads -= 1
        try:
            while not self.stopping:
                if not self.request_list:
                    self._set_idle(+1)
                    self.request_cond.append(wake)
                    lock.release()
                    got = wake.acquire(timeout=IDLE_TIMEOUT_S)
                    lock.acquire()
                    if not got:
                        if wake in self.request_cond:   # timed out, never signalled
                            self.request_cond.remove(wake)
                            self._set_idle(-1)
                            if not self.request_list:
                                break   # nothing to do: this thread ends
                            continue
                        wake.acquire()   # signalled just as the wait timed out: take the signal
                    self.pending_threads -= 1   # signalled: now it looks at the queue
                    continue
                req = self.request_list.popleft()
                req.state = THREAD_ACTIVE
                self.running += 1
                lock.release()
                # As QEMU's worker_thread: the job, its result, then the BH, all without the pool lock,
                # so the AioContext woken by the BH does not wait for this thread to let go of it.
                try:
                    req.ret = _run_job(req)
                    finishing.add(wake)
                    req.state = THREAD_DONE
                    qemu_bh_schedule(self.completion_bh)
                finally:
                    lock.acquire()
                    finishing.discard(wake)
                    self.running -= 1
                    self.completed += 1
            self.cur_threads -= 1
        finally:
            lock.release()

    def _kick_locked(self) -> None:
        """Get one more worker to the queue: wake an idle one, else spawn one if allowed."""
        if self.idle_threads:
            self._signal_locked()
        elif self.cur_threads < self.max_threads:
            self._spawn()

    def _unserved_locked(self) -> int:
        """Queued jobs beyond those that signalled, starting or just-finished workers will take."""
        return len(self.request_list) - self.pending_threads - len(self.finishing)

    def _arm_stall_timer_locked(self) -> None:
        """Look again in stall_ns whether any job has finished by then."""
        self.stall_mark = self.completed
        timer_mod(self.stall_timer, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + self.stall_ns)

    def _stall_timer_cb(self, opaque: Any) -> None:
        with self.lock:
            if self._unserved_locked() <= 0:
                return
            if self.completed == self.stall_mark:   # no job finished for stall_ns: the busy ones are stuck
                self._kick_locked()
            if self._unserved_locked() > 0:
                self._arm_stall_timer_locked()

    def _signal_locked(self, all_waiters: bool = False) -> None:
        """qemu_cond_signal/broadcast on request_cond; the pool lock is held.

        A signalled worker stops counting as idle here, not when it runs again as in QEMU, so
        a job that may not wait for it (stall_ns = 0, or the stall timer's kick) spawns or wakes
        another worker instead of signalling it a second time.
        """
        waiters = self.request_cond
        while waiters:
            waiters.pop().release()
            self._set_idle(-1)
            self.pending_threads += 1
            if not all_waiters:
                return

    # -- completion, in the pool's context ------------------------------

    def _completion_bh(self, opaque: Any) -> None:
        if thread_pool_inline:
            # Deterministic mode: run what was queued here, in submission order.
            while self.request_list:
                req = self.request_list.popleft()
                req.state = THREAD_ACTIVE
                req.ret = _run_job(req)
                req.state = THREAD_DONE
        while True:
            with self.lock:
                elem = next((e for e in self.head if e.state == THREAD_DONE), None)
                if elem is None:
                    return
                self.head.remove(elem)
            self.ctx.busy -= 1
            if trace_thread_pool_complete.event.enabled:
                trace_thread_pool_complete(self, elem, elem.opaque, elem.ret)
            if elem.exc is not None:
                qemu_bh_schedule(self.completion_bh)   # the other finished elements still complete
                raise elem.exc
            if elem.cb is not None:
                # Scheduled again in case the callback runs a nested aio_poll waiting for another
                # element that finished meanwhile; cancelled after it, since the loop looks again.
                qemu_bh_schedule(self.completion_bh)
                elem.cb(elem.opaque, elem.ret)
                if not (thread_pool_inline and self.request_list):   # (inline: jobs queued by cb run next time)
                    qemu_bh_cancel(self.completion_bh)

    def free(self) -> None:
        timer_del(self.stall_timer)
        with self.lock:
            self.stopping = True
            self._signal_locked(all_waiters=True)


_aio_idle_lock = threading.Lock()

# Deterministic mode (qblock trace on the virtual clock): jobs run in the pool's
# completion BH, in submission order, instead of on worker threads.  The
# coroutine still yields and is woken from the BH, so the walk keeps its shape.
thread_pool_inline = False


def thread_pool_set_inline(on: bool) -> None:
    global thread_pool_inline
    thread_pool_inline = bool(on)


def _run_job(req: ThreadPoolElement) -> int:
    """Run one job: OSError becomes -errno; any other exception is kept for the completion BH."""
    try:
        ret = req.func(req.arg)
        if not isinstance(ret, int):
            raise TypeError(f"thread pool function {req.func!r} returned {ret!r}, not an int")
    except OSError as e:
        ret = -(e.errno or errno.EIO)
    except BaseException as e:  # noqa: BLE001 - re-raised in the completion BH
        req.exc = e
        ret = -errno.EIO
    return ret


def aio_get_thread_pool(ctx: AioContext) -> ThreadPool:
    """The context's pool, created on first use."""
    if ctx.thread_pool is None:
        ctx.thread_pool = ThreadPool(ctx)
    return ctx.thread_pool


def thread_pool_submit_aio(ctx: AioContext | None, func: Callable[[Any], int], arg: Any,
                           cb: Callable[[Any, int], None] | None, opaque: Any = None) -> ThreadPoolElement:
    """Run ``func(arg)`` on a worker; ``cb(opaque, ret)`` runs in ``ctx`` when it is done."""
    pool = aio_get_thread_pool(ctx or qemu_get_current_aio_context())
    req = ThreadPoolElement(pool, func, arg, cb, opaque)
    if trace_thread_pool_submit.event.enabled:
        trace_thread_pool_submit(pool, req, opaque)
    pool.ctx.busy += 1
    with pool.lock:
        pool.head.append(req)
        pool.request_list.append(req)
        if thread_pool_inline:
            qemu_bh_schedule(pool.completion_bh)
            return req
        unserved = pool._unserved_locked()
        if unserved <= 0:
            return req   # a worker on its way to the queue takes it
        if pool.stall_ns and (pool.running or pool.pending_threads or pool.finishing):
            # A worker in a job or on its way will come back for it: wake no other unless the pool stalls.
            if not timer_pending(pool.stall_timer):
                pool._arm_stall_timer_locked()
            return req
        pool._kick_locked()
    return req


def thread_pool_submit(ctx: AioContext | None, func: Callable[[Any], int], arg: Any) -> ThreadPoolElement:
    """Fire and forget: run ``func(arg)`` and ignore its result."""
    return thread_pool_submit_aio(ctx, func, arg, None, None)


@attrs.define(eq=False)
class _ThreadPoolCo:
    co: Any
    ret: int = -errno.EINPROGRESS


def _thread_pool_co_cb(tpc: _ThreadPoolCo, ret: int) -> None:
    tpc.ret = ret
    aio_co_wake(tpc.co)


@coroutine_fn
def thread_pool_submit_co(ctx: AioContext | None, func: Callable[[Any], int], arg: Any) -> int:
    """Run ``func(arg)`` on a worker and yield until it returns; its result."""
    self = qemu_coroutine_self()
    tpc = _ThreadPoolCo(self)
    req = thread_pool_submit_aio(ctx or self.ctx, func, arg, _thread_pool_co_cb, tpc)
    self.waiting_on = req
    qemu_coroutine_yield()
    return tpc.ret


def thread_pool_cancel(req: ThreadPoolElement) -> bool:
    """Cancel a job that has not started: it completes with -ECANCELED. False once it runs."""
    pool = req.pool
    if trace_thread_pool_cancel.event.enabled:
        trace_thread_pool_cancel(req, req.opaque)
    with pool.lock:
        if req.state != THREAD_QUEUED:
            return False
        pool.request_list.remove(req)
        req.state = THREAD_DONE
        req.ret = -errno.ECANCELED
    qemu_bh_schedule(pool.completion_bh)
    return True
