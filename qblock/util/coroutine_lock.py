"""Coroutine queues and locks: QEMU's util/qemu-coroutine-lock.c and util/qemu-coroutine-sleep.c.

* :class:`CoQueue` — a FIFO of waiting coroutines.  Waking goes through
  ``aio_co_wake``, so a coroutine woken from inside another coroutine of the
  same context only runs once the waker yields or terminates.
* :class:`CoMutex` — FIFO hand-off: ``qemu_co_mutex_unlock`` gives the mutex
  to the oldest waiter before waking it, so nobody can barge in between.
  Unlocking a mutex one does not hold raises CoroutineError.
* :class:`CoRwlock` — the fair ticket lock QEMU adopted in 6.0 (the older
  design deadlocks in the downgrade case QEMU's test-coroutine now covers).
* ``qemu_co_sleep_ns`` — sleep on an AioContext timer.

Differences from QEMU: CoMutex does not spin when the holder runs in another
AioContext (it queues at once); internal state is guarded by a host lock
where QEMU uses atomics.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Any

import attrs

from qblock.trace.events import (
    trace_qemu_co_mutex_lock_entry,
    trace_qemu_co_mutex_lock_return,
    trace_qemu_co_mutex_lock_uncontended,
    trace_qemu_co_mutex_unlock_entry,
    trace_qemu_co_mutex_unlock_return,
)
from qblock.util.aio import aio_co_wake, aio_timer_new, qemu_get_current_aio_context
from qblock.util.coroutine import (
    Coroutine,
    CoroutineError,
    coroutine_fn,
    qemu_coroutine_self,
    qemu_coroutine_yield,
)
from qblock.util.timer import SCALE_NS, clock_name, qemu_clock_get_ns, timer_del, timer_mod_ns

__all__ = [
    "CoQueue", "CoMutex", "CoRwlock", "QemuCoSleep",
    "qemu_co_queue_init", "qemu_co_queue_wait", "qemu_co_queue_next", "qemu_co_queue_restart_all",
    "qemu_co_enter_next", "qemu_co_enter_all", "qemu_co_queue_empty",
    "qemu_co_mutex_init", "qemu_co_mutex_lock", "qemu_co_mutex_unlock", "qemu_co_mutex_assert_locked",
    "qemu_co_rwlock_init", "qemu_co_rwlock_rdlock", "qemu_co_rwlock_wrlock", "qemu_co_rwlock_unlock",
    "qemu_co_rwlock_upgrade", "qemu_co_rwlock_downgrade",
    "qemu_co_sleep_ns", "qemu_co_sleep_ns_wakeable", "qemu_co_sleep_wake",
]


def _lockable_unlock(lock: Any) -> None:
    if isinstance(lock, CoMutex):
        qemu_co_mutex_unlock(lock)
    else:
        lock.release()


def _lockable_lock(lock: Any) -> None:
    if isinstance(lock, CoMutex):
        qemu_co_mutex_lock(lock)
    else:
        lock.acquire()


# ---------------------------------------------------------------------------
# CoQueue


@attrs.define(eq=False)
class CoQueue:
    """Coroutines waiting for something, oldest first."""

    name: str = ""
    entries: deque = attrs.field(factory=deque)

    def describe_wait(self) -> str:
        return f"CoQueue {self.name or hex(id(self))} ({len(self.entries)} waiting)"

    @property
    def trace_name(self) -> str:
        return self.name or f"CoQueue@{id(self):#x}"


def qemu_co_queue_init(queue: CoQueue | None = None, name: str = "") -> CoQueue:
    if queue is None:
        return CoQueue(name)
    queue.entries.clear()
    return queue


@coroutine_fn
def qemu_co_queue_wait(queue: CoQueue, lock: Any = None) -> None:
    """Wait at the tail of ``queue``; ``lock`` (a CoMutex or host lock) is dropped meanwhile and re-taken."""
    self = qemu_coroutine_self()
    queue.entries.append(self)
    self.waiting_on = queue
    if lock is not None:
        _lockable_unlock(lock)
    qemu_coroutine_yield()
    if lock is not None:
        _lockable_lock(lock)


def _co_queue_do_restart(queue: CoQueue, single: bool) -> bool:
    if not queue.entries:
        return False
    while queue.entries:
        aio_co_wake(queue.entries.popleft())
        if single:
            break
    return True


def qemu_co_queue_next(queue: CoQueue) -> bool:
    """Wake the oldest waiter; False when there was none."""
    return _co_queue_do_restart(queue, True)


def qemu_co_queue_restart_all(queue: CoQueue) -> None:
    """Wake every waiter, oldest first."""
    _co_queue_do_restart(queue, False)


def qemu_co_enter_next(queue: CoQueue, lock: Any = None) -> bool:
    """Wake the oldest waiter from outside a coroutine, dropping ``lock`` around the wake-up."""
    if not queue.entries:
        return False
    co = queue.entries.popleft()
    if lock is not None:
        _lockable_unlock(lock)
    aio_co_wake(co)
    if lock is not None:
        _lockable_lock(lock)
    return True


def qemu_co_enter_all(queue: CoQueue, lock: Any = None) -> None:
    while qemu_co_enter_next(queue, lock):
        pass


def qemu_co_queue_empty(queue: CoQueue) -> bool:
    return not queue.entries


# ---------------------------------------------------------------------------
# CoMutex


@attrs.define(eq=False)
class CoMutex:
    """A coroutine mutex with FIFO hand-off (QEMU's CoMutex)."""

    name: str = ""
    locked: int = 0                       # 0 free, 1 held, n > 1 held with n - 1 waiters
    holder: Coroutine | None = None
    ctx: Any = None
    waiters: deque = attrs.field(factory=deque)
    _guard: threading.Lock = attrs.field(factory=threading.Lock, repr=False)

    def describe_wait(self) -> str:
        holder = self.holder.trace_name if self.holder is not None else "nobody (handing off)"
        return f"CoMutex {self.name or hex(id(self))} held by {holder}"

    @property
    def trace_name(self) -> str:
        return self.name or f"CoMutex@{id(self):#x}"


def qemu_co_mutex_init(mutex: CoMutex | None = None, name: str = "") -> CoMutex:
    if mutex is None:
        return CoMutex(name)
    mutex.locked = 0
    mutex.holder = None
    mutex.ctx = None
    mutex.waiters.clear()
    return mutex


@coroutine_fn
def qemu_co_mutex_lock(mutex: CoMutex) -> None:
    """Take ``mutex``, waiting in line behind earlier waiters."""
    self = qemu_coroutine_self()
    with mutex._guard:
        contended = mutex.locked != 0
        mutex.locked += 1
        if contended:
            mutex.waiters.append(self)
    if not contended:
        if trace_qemu_co_mutex_lock_uncontended.event.enabled:
            trace_qemu_co_mutex_lock_uncontended(mutex, self)
        mutex.ctx = qemu_get_current_aio_context()
    else:
        if trace_qemu_co_mutex_lock_entry.event.enabled:
            trace_qemu_co_mutex_lock_entry(mutex, self)
        self.waiting_on = mutex
        qemu_coroutine_yield()
        if trace_qemu_co_mutex_lock_return.event.enabled:
            trace_qemu_co_mutex_lock_return(mutex, self)
    mutex.holder = self
    self.locks_held += 1


@coroutine_fn
def qemu_co_mutex_unlock(mutex: CoMutex) -> None:
    """Release ``mutex``; the oldest waiter, if any, owns it from now on and is woken."""
    self = qemu_coroutine_self()
    if trace_qemu_co_mutex_unlock_entry.event.enabled:
        trace_qemu_co_mutex_unlock_entry(mutex, self)
    if not mutex.locked or mutex.holder is not self:
        holder = mutex.holder.trace_name if mutex.holder is not None else "nobody"
        raise CoroutineError(f"qemu_co_mutex_unlock: {self.trace_name} does not hold "
                             f"{mutex.trace_name} (held by {holder})")
    mutex.ctx = None
    mutex.holder = None
    self.locks_held -= 1
    with mutex._guard:
        mutex.locked -= 1
        nxt = mutex.waiters.popleft() if mutex.locked else None
    if nxt is not None:
        mutex.ctx = nxt.ctx
        aio_co_wake(nxt)
    if trace_qemu_co_mutex_unlock_return.event.enabled:
        trace_qemu_co_mutex_unlock_return(mutex, self)


def qemu_co_mutex_assert_locked(mutex: CoMutex) -> None:
    """Raise unless the current coroutine holds ``mutex``."""
    if not mutex.locked or mutex.holder is not qemu_coroutine_self():
        raise CoroutineError(f"{mutex.trace_name} is not held by the current coroutine")


# ---------------------------------------------------------------------------
# CoRwlock (the ticket lock of QEMU 6.0 and later)


@attrs.define(eq=False)
class CoRwTicket:
    read: bool
    co: Coroutine


@attrs.define(eq=False)
class CoRwlock:
    """A fair reader/writer lock: ``owners`` is 0 when free, n with n readers, -1 with a writer."""

    name: str = ""
    owners: int = 0
    tickets: deque = attrs.field(factory=deque)
    mutex: CoMutex = attrs.field(factory=CoMutex)

    def describe_wait(self) -> str:
        return f"CoRwlock {self.name or hex(id(self))} owners={self.owners} tickets={len(self.tickets)}"

    @property
    def trace_name(self) -> str:
        return self.name or f"CoRwlock@{id(self):#x}"


def qemu_co_rwlock_init(lock: CoRwlock | None = None, name: str = "") -> CoRwlock:
    if lock is None:
        return CoRwlock(name)
    lock.owners = 0
    lock.tickets.clear()
    qemu_co_mutex_init(lock.mutex)
    return lock


def _rwlock_maybe_wake_one(lock: CoRwlock) -> None:
    """Give the lock to the ticket at the head of the line if it can have it; drops lock.mutex."""
    co = None
    if lock.tickets:
        tkt = lock.tickets[0]
        if tkt.read:
            if lock.owners >= 0:
                lock.owners += 1
                co = tkt.co
        elif lock.owners == 0:
            lock.owners = -1
            co = tkt.co
    if co is not None:
        lock.tickets.popleft()
        qemu_co_mutex_unlock(lock.mutex)
        aio_co_wake(co)
    else:
        qemu_co_mutex_unlock(lock.mutex)


@coroutine_fn
def qemu_co_rwlock_rdlock(lock: CoRwlock) -> None:
    self = qemu_coroutine_self()
    qemu_co_mutex_lock(lock.mutex)
    if lock.owners == 0 or (lock.owners > 0 and not lock.tickets):
        lock.owners += 1
        qemu_co_mutex_unlock(lock.mutex)
    else:
        lock.tickets.append(CoRwTicket(True, self))
        qemu_co_mutex_unlock(lock.mutex)
        self.waiting_on = lock
        qemu_coroutine_yield()
        assert lock.owners >= 1
        # Let the next reader in line follow.
        qemu_co_mutex_lock(lock.mutex)
        _rwlock_maybe_wake_one(lock)
    self.locks_held += 1


@coroutine_fn
def qemu_co_rwlock_unlock(lock: CoRwlock) -> None:
    self = qemu_coroutine_self()
    if lock.owners == 0:
        raise CoroutineError(f"qemu_co_rwlock_unlock: {lock.trace_name} is not locked")
    self.locks_held -= 1
    qemu_co_mutex_lock(lock.mutex)
    if lock.owners > 0:
        lock.owners -= 1
    else:
        lock.owners = 0
    _rwlock_maybe_wake_one(lock)


@coroutine_fn
def qemu_co_rwlock_downgrade(lock: CoRwlock) -> None:
    """Turn the write lock held into a read lock."""
    qemu_co_mutex_lock(lock.mutex)
    if lock.owners != -1:
        qemu_co_mutex_unlock(lock.mutex)
        raise CoroutineError(f"qemu_co_rwlock_downgrade: {lock.trace_name} is not write-locked")
    lock.owners = 1
    _rwlock_maybe_wake_one(lock)


@coroutine_fn
def qemu_co_rwlock_wrlock(lock: CoRwlock) -> None:
    self = qemu_coroutine_self()
    qemu_co_mutex_lock(lock.mutex)
    if lock.owners == 0:
        lock.owners = -1
        qemu_co_mutex_unlock(lock.mutex)
    else:
        lock.tickets.append(CoRwTicket(False, self))
        qemu_co_mutex_unlock(lock.mutex)
        self.waiting_on = lock
        qemu_coroutine_yield()
        assert lock.owners == -1
    self.locks_held += 1


@coroutine_fn
def qemu_co_rwlock_upgrade(lock: CoRwlock) -> None:
    """Turn the read lock held into a write lock, queueing behind earlier tickets if needed."""
    self = qemu_coroutine_self()
    qemu_co_mutex_lock(lock.mutex)
    if lock.owners <= 0:
        qemu_co_mutex_unlock(lock.mutex)
        raise CoroutineError(f"qemu_co_rwlock_upgrade: {lock.trace_name} is not read-locked")
    if lock.owners == 1 and not lock.tickets:
        lock.owners = -1
        qemu_co_mutex_unlock(lock.mutex)
    else:
        lock.owners -= 1
        lock.tickets.append(CoRwTicket(False, self))
        _rwlock_maybe_wake_one(lock)
        self.waiting_on = lock
        qemu_coroutine_yield()
        assert lock.owners == -1


# ---------------------------------------------------------------------------
# Sleeping (util/qemu-coroutine-sleep.c)


@attrs.define(eq=False)
class QemuCoSleep:
    """A sleeping coroutine that qemu_co_sleep_wake() can wake early."""

    to_wake: Coroutine | None = None
    clock_type: int = 0
    expire_ns: int = -1

    def describe_wait(self) -> str:
        return f"sleep on the {clock_name(self.clock_type)} clock until {self.expire_ns} ns"


def qemu_co_sleep_wake(w: QemuCoSleep) -> None:
    """Wake a coroutine sleeping in qemu_co_sleep_ns_wakeable; a no-op when none sleeps."""
    co = w.to_wake
    if co is not None:
        w.to_wake = None
        aio_co_wake(co)


def _co_sleep_cb(w: QemuCoSleep) -> None:
    qemu_co_sleep_wake(w)


@coroutine_fn
def qemu_co_sleep_ns_wakeable(w: QemuCoSleep, clock_type: int, ns: int) -> None:
    """Sleep ``ns`` on ``clock_type`` unless woken earlier through ``w``."""
    self = qemu_coroutine_self()
    if w.to_wake is not None:
        raise CoroutineError("qemu_co_sleep_ns_wakeable: already sleeping")
    ctx = qemu_get_current_aio_context()
    ts = aio_timer_new(ctx, clock_type, SCALE_NS, _co_sleep_cb, w)
    w.clock_type = clock_type
    w.expire_ns = qemu_clock_get_ns(clock_type) + ns
    w.to_wake = self
    timer_mod_ns(ts, w.expire_ns)
    self.waiting_on = w
    qemu_coroutine_yield()
    timer_del(ts)
    w.to_wake = None


@coroutine_fn
def qemu_co_sleep_ns(clock_type: int, ns: int) -> None:
    """Sleep ``ns`` nanoseconds on an AioContext timer of ``clock_type``."""
    qemu_co_sleep_ns_wakeable(QemuCoSleep(), clock_type, ns)

