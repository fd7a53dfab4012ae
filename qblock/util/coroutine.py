"""Coroutines on greenlet: QEMU's util/qemu-coroutine.c (and coroutine_int.h).

A :class:`Coroutine` runs ``entry(opaque)`` on a greenlet.  The rules are
QEMU's, not greenlet's:

* ``qemu_coroutine_enter(co)`` runs ``co`` until it yields or terminates and
  records the enterer as ``co.caller``; ``qemu_coroutine_yield()`` always
  returns to that caller and clears it.
* A coroutine woken while another coroutine of the same AioContext runs
  (``aio_co_wake``/``aio_co_enter`` from inside a coroutine) is only queued on
  the running coroutine's ``co_queue_wakeup`` list.  The enter loop runs the
  queued ones right after the running one yields or terminates, newest
  wake-up list first and FIFO within it (QEMU's ``QSIMPLEQ_PREPEND`` of
  ``to->co_queue_wakeup`` onto ``pending``), iteratively, so long wake-up
  chains never grow the stack.
* Misuse raises :class:`CoroutineError` where QEMU aborts: entering a running
  (entered) coroutine, entering one that is scheduled, entering a terminated
  one, yielding outside a coroutine, calling a ``coroutine_fn`` outside one.
* An exception escaping ``entry`` terminates the coroutine and is re-raised
  to whoever entered it (after the queued wake-ups ran, so none is lost).
* Finished coroutines give their greenlet back to a per-thread pool
  (QEMU's ``alloc_pool``), so creating a coroutine costs an object, not a
  new greenlet.

Differences from QEMU: a greenlet is bound to the thread that first runs it,
so a started coroutine must be re-entered in that thread (QEMU can move a
coroutine between threads with ``aio_co_reschedule_self``; qblock raises
CoroutineError instead).  Coroutine objects are never recycled, only their
greenlets, so a stale reference to a finished coroutine fails cleanly.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import os
import threading
from collections import deque
from typing import Any, Callable

import greenlet

from qblock.trace import control as _trace
from qblock.trace.events import (
    trace_qemu_aio_coroutine_enter,
    trace_qemu_coroutine_create,
    trace_qemu_coroutine_terminate,
    trace_qemu_coroutine_yield,
)

__all__ = [
    "Coroutine", "CoroutineError", "qemu_coroutine_create", "qemu_coroutine_enter",
    "qemu_aio_coroutine_enter", "qemu_coroutine_enter_if_inactive", "qemu_coroutine_yield",
    "qemu_coroutine_self", "qemu_in_coroutine", "qemu_coroutine_entered",
    "qemu_coroutine_get_aio_context", "coroutine_fn", "request_id_get", "request_id_set",
    "POOL_MAX_SIZE",
]

# QEMU's POOL_INITIAL_MAX_SIZE: idle greenlets kept per thread.
POOL_MAX_SIZE = 64

# Check that coroutine_fn functions run inside a coroutine (on unless
# QBLOCK_COROUTINE_CHECKS=0 is set before qblock is imported).
COROUTINE_CHECKS = os.environ.get("QBLOCK_COROUTINE_CHECKS", "1") != "0"


class CoroutineError(RuntimeError):
    """Misuse of a coroutine that QEMU answers with abort()."""


# What a yielding coroutine hands its caller: nothing (a switch without arguments, the
# cheapest greenlet switch, delivers the empty tuple).  A finished one hands _TERMINATE
# (or a _Failed carrying its exception).
_YIELD = ()
_TERMINATE = "terminate"
_ids = itertools.count(1)
_next_id = _ids.__next__
_getcurrent = greenlet.getcurrent
_new_greenlet = greenlet.greenlet


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc


class Coroutine:
    """One coroutine (QEMU's struct Coroutine).

    ``caller`` is set while the coroutine runs or has entered a nested one
    (``qemu_coroutine_entered``); ``ctx`` is the AioContext it was last
    entered in; ``scheduled`` names the function that scheduled it while it
    sits on an AioContext's scheduled list; ``waiting_on`` says what a
    suspended coroutine waits for (for :func:`qblock.util.aio.aio_dump_waiters`).
    """

    __slots__ = ("entry", "entry_arg", "caller", "ctx", "co_queue_wakeup", "scheduled",
                 "locks_held", "gr", "id", "terminated", "request_id", "waiting_on",
                 "__weakref__")

    def __init__(self, entry: Callable[[Any], Any], opaque: Any, co_id: int | None = None):
        self.entry = entry
        self.entry_arg = opaque
        self.caller: Coroutine | None = None
        self.ctx = None
        self.co_queue_wakeup: list[Coroutine] | None = None
        self.scheduled: str | None = None
        self.locks_held = 0
        self.gr: greenlet.greenlet | None = None
        self.id = _next_id() if co_id is None else co_id
        self.terminated = False
        self.request_id: int | None = None
        self.waiting_on: Any = None

    @property
    def trace_name(self) -> str:
        return f"co{self.id}" if self.id else "leader"

    def __repr__(self) -> str:
        state = ("terminated" if self.terminated else "running" if self.caller is not None
                 else "suspended" if self.gr is not None else "created")
        entry = getattr(self.entry, "__qualname__", repr(self.entry))
        return f"<Coroutine {self.trace_name} {entry} {state}>"


class _ThreadState(threading.local):
    """Per-thread runtime state: the pool, the leader and the current AioContext."""

    def __init__(self) -> None:
        self.pool: list[greenlet.greenlet] = []
        self.ctx = None          # set by IOThreads; None means the main loop's context
        self.is_main = threading.current_thread() is threading.main_thread()
        self.request_id: int | None = None
        leader = Coroutine(None, None, 0)
        leader.gr = greenlet.getcurrent()
        leader.gr.co = leader
        self.leader = leader


_tls = _ThreadState()

# Installed by qblock.util.aio: returns the main loop's AioContext.
_main_context_hook: Callable[[], Any] = lambda: None


def _current_aio_context():
    ctx = _tls.ctx
    return ctx if ctx is not None else _main_context_hook()


def qemu_coroutine_self() -> Coroutine:
    """The running coroutine, or the thread's leader pseudo-coroutine outside coroutines."""
    try:
        return greenlet.getcurrent().co
    except AttributeError:
        return _tls.leader  # a thread's main greenlet before the thread state existed


def qemu_in_coroutine() -> bool:
    return qemu_coroutine_self().caller is not None


def qemu_coroutine_entered(co: Coroutine) -> bool:
    """True while ``co`` runs or has entered a nested coroutine (QEMU: ``co->caller != NULL``)."""
    return co.caller is not None


def qemu_coroutine_get_aio_context(co: Coroutine):
    return co.ctx


def qemu_coroutine_create(entry: Callable[[Any], Any], opaque: Any = None) -> Coroutine:
    """Create a coroutine that will run ``entry(opaque)``; it does not run until entered."""
    co = Coroutine(entry, opaque)
    if _trace.trace_active:
        co.request_id = request_id_get()
        trace_qemu_coroutine_create(co, entry, opaque)
    return co


def _trampoline(co: Coroutine) -> Any:
    """Body of every pooled greenlet: run coroutines one after another."""
    pool = _tls.pool
    gr = _getcurrent()  # this greenlet: co.gr of every coroutine it runs
    while True:
        try:
            co.entry(co.entry_arg)
            ret = _TERMINATE
        except greenlet.GreenletExit:
            return None  # an abandoned, never-finished coroutine is being collected
        except BaseException as e:  # noqa: BLE001 - handed to the enterer, never lost
            ret = _Failed(e)
        # Terminate: hand control back to the caller (COROUTINE_TERMINATE).
        caller = co.caller
        co.caller = None
        co.terminated = True
        co.gr = None
        if len(pool) < POOL_MAX_SIZE:
            pool.append(gr)
            # The next coroutine to run here comes back as the switch's value.
            co = caller.gr.switch(ret)
        else:
            gr.parent = caller.gr
            return ret


def _enter_error(to: Coroutine) -> CoroutineError:
    if to.scheduled is not None:
        return CoroutineError(f"qemu_aio_coroutine_enter: Co-routine was already scheduled in '{to.scheduled}'")
    if to.caller is not None:
        return CoroutineError("Co-routine re-entered recursively")
    return CoroutineError(f"Co-routine {to.trace_name} entered after it terminated")


_ev_enter = trace_qemu_aio_coroutine_enter.event
_ev_yield = trace_qemu_coroutine_yield.event
_ev_terminate = trace_qemu_coroutine_terminate.event


def qemu_aio_coroutine_enter(ctx, co: Coroutine) -> None:
    """Enter ``co`` in ``ctx``; then run every coroutine it queued for wake-up, depth-first."""
    try:
        from_ = _getcurrent().co
    except AttributeError:
        from_ = _tls.leader
    to = co
    pending: deque[Coroutine] | None = None
    error: BaseException | None = None
    while True:
        if to.caller is not None or to.scheduled is not None or to.terminated:
            raise _enter_error(to)
        if _ev_enter.enabled:
            trace_qemu_aio_coroutine_enter(ctx, from_, to, to.entry_arg)
        to.caller = from_
        to.ctx = ctx
        gr = to.gr
        try:
            if gr is not None:
                ret = gr.switch()  # resume: the value of its qemu_coroutine_yield() is unused
            else:
                pool = _tls.pool
                gr = pool.pop() if pool else _new_greenlet(_trampoline)
                gr.co = to
                to.gr = gr
                ret = gr.switch(to)  # start: the trampoline receives the coroutine to run
        except greenlet.error as e:
            to.caller = None
            raise CoroutineError(f"Co-routine {to.trace_name} cannot be entered from this thread: {e}") from None
        wake = to.co_queue_wakeup
        if wake:
            to.co_queue_wakeup = None
            if pending is None:
                pending = deque(wake)
            else:
                pending.extendleft(reversed(wake))
        if ret is not _YIELD:
            if to.locks_held and error is None:
                error = CoroutineError(f"Co-routine {to.trace_name} terminated holding {to.locks_held} lock(s)")
            if _ev_terminate.enabled:
                trace_qemu_coroutine_terminate(to)
            if ret is not _TERMINATE and error is None:
                error = ret.exc
        if not pending:
            if error is not None:
                raise error
            return
        to = pending.popleft()


def qemu_coroutine_enter(co: Coroutine) -> None:
    """Enter ``co`` in the current thread's AioContext."""
    qemu_aio_coroutine_enter(_current_aio_context(), co)


def qemu_coroutine_enter_if_inactive(co: Coroutine) -> None:
    if co.caller is None:
        qemu_coroutine_enter(co)


def qemu_coroutine_yield() -> None:
    """Switch back to whoever entered the current coroutine."""
    try:
        self = _getcurrent().co
    except AttributeError:
        self = _tls.leader
    to = self.caller
    if to is None:
        raise CoroutineError("Co-routine is yielding to no one")
    if _ev_yield.enabled:
        trace_qemu_coroutine_yield(self, to)
    self.caller = None
    to.gr.switch()  # the enterer receives _YIELD, the empty tuple


def _not_in_coroutine(name: str) -> CoroutineError:
    return CoroutineError(f"coroutine_fn {name}() called outside coroutine context")


def coroutine_fn(fn: Callable) -> Callable:
    """Mark a function that may only run inside a coroutine (QEMU's ``coroutine_fn``).

    With COROUTINE_CHECKS on (the default) the function raises CoroutineError
    at once when called outside a coroutine.  The check is a generated
    wrapper with the function's own signature, so it costs one frame and one
    attribute test, not argument packing.
    """
    fn.coroutine_fn = True
    if not COROUTINE_CHECKS:
        return fn
    sig = inspect.signature(fn)
    params, call, ns = [], [], {"_fn": fn, "_getcurrent": greenlet.getcurrent, "_tls": _tls,
                                "_fail": _not_in_coroutine, "_name": fn.__qualname__}
    star_done = False
    for i, p in enumerate(sig.parameters.values()):
        text = p.name
        if p.default is not inspect.Parameter.empty:
            ns[f"_d{i}"] = p.default
            text += f"=_d{i}"
        if p.kind is p.VAR_POSITIONAL:
            text, star_done = "*" + p.name, True
            call.append(text)
        elif p.kind is p.VAR_KEYWORD:
            text = "**" + p.name
            call.append(text)
        elif p.kind is p.KEYWORD_ONLY:
            if not star_done:
                params.append("*")
                star_done = True
            call.append(f"{p.name}={p.name}")
        else:
            call.append(p.name)
        params.append(text)
    src = (f"def checked({', '.join(params)}):\n"
           f"    try:\n"
           f"        co = _getcurrent().co\n"
           f"    except AttributeError:\n"
           f"        co = _tls.leader\n"
           f"    if co.caller is None:\n"
           f"        raise _fail(_name)\n"
           f"    return _fn({', '.join(call)})\n")
    exec(compile(src, f"<coroutine_fn {fn.__qualname__}>", "exec"), ns)
    checked = functools.wraps(fn)(ns["checked"])
    checked.coroutine_fn = True
    return checked


# ---------------------------------------------------------------------------
# Request ids for tracing: the id of the request being served follows it into
# every coroutine created for it and every BH or timer scheduled for it.


def request_id_get() -> int | None:
    """The id of the request the current coroutine (or thread) is serving, or None."""
    try:
        self = greenlet.getcurrent().co
    except AttributeError:
        self = _tls.leader
    if self.id:
        return self.request_id
    return _tls.request_id


def request_id_set(rid: int | None) -> int | None:
    """Set the request id of the current coroutine (or thread); returns the previous one."""
    try:
        self = greenlet.getcurrent().co
    except AttributeError:
        self = _tls.leader
    if self.id:
        old, self.request_id = self.request_id, rid
    else:
        old, _tls.request_id = _tls.request_id, rid
    return old
