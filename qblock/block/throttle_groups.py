"""Throttle groups: QEMU's block/throttle-groups.c and include/block/throttle-groups.h.

A :class:`ThrottleGroup` holds one :class:`~qblock.util.throttle.ThrottleState`
shared by every :class:`ThrottleGroupMember` registered under its name (a
BlockBackend's ``public.throttle_group_member``, or a ``throttle`` filter
node's ``bs.opaque``).  Groups are found by name and reference counted: a
member naming a group that does not exist creates it (with no limits), and
the last member to leave destroys it; a group created as a ``throttle-group``
object lives until the object is deleted, which is refused while a member
uses it.

The request path, per direction (read or write)::

    throttle_group_co_io_limits_intercept(tgm, bytes, is_write)
      token = next_throttle_token(tgm)          round robin over members with queued requests
      must_wait = throttle_group_schedule_timer(token)   arms token's timer, at most one per group
      if must_wait or tgm has queued requests:  queue on tgm.throttled_reqs[dir] and yield
      throttle_account(...)                     the request goes: pour it into the buckets
      schedule_next_request(tgm)                wake the next member's request now, or arm its timer

    timer fires -> timer_cb -> throttle_group_restart_queue -> a coroutine wakes one request

While a member is drained (``io_limits_disabled``) its queued requests go at
once, without waiting for the group.  The group's clock is
QEMU_CLOCK_VIRTUAL in qtest mode and QEMU_CLOCK_REALTIME otherwise, as QEMU's.

Also here, to leave block_backend.py to its owners: block-backend.c's
``blk_set_io_limits``, ``blk_io_limits_enable``, ``blk_io_limits_disable`` and
``blk_io_limits_update_group``; blockdev.c's ``qmp_block_set_io_throttle``
(``block_set_io_throttle``); and the ``throttle-group`` user-creatable
object (QOM properties ``x-bps-total`` ... ``x-iops-size`` and ``limits``)
with the small part of qom/object_interfaces.c that creates and deletes it
from ``--object`` strings or QMP-style dicts (``user_creatable_process_cmdline``,
``user_creatable_add_dict``, ``user_creatable_del``).  The ``/objects``
container here holds only throttle groups: qblock has no other user-creatable
type yet.

Differences from QEMU: the group lock is a host RLock, so a coroutine that
takes it while another coroutine of the same thread yielded holding it (in
``qemu_co_mutex_lock``) cannot deadlock; ``container_of`` is a dictionary from a group's ThrottleState to the
group; QAPI visiting of ``--object`` options is done by hand, with QEMU
7.2's messages, checking members in schema order (QEMU applies properties in
QDict hash order, so with several bad properties it may name another one first).
"""
from __future__ import annotations

import errno
import re
import threading
from typing import Any

import attrs

from qblock.block.graph import bdrv_drained_begin, bdrv_drained_end, bdrv_ref, bdrv_unref, id_wellformed
from qblock.trace.events import (
    trace_throttle_group_co_io_limits_intercept,
    trace_throttle_group_config,
    trace_throttle_group_io_limits_resume,
    trace_throttle_group_register_tgm,
    trace_throttle_group_restart_queue,
    trace_throttle_group_schedule_next_request,
    trace_throttle_group_schedule_timer,
    trace_throttle_group_timer_cb,
    trace_throttle_group_unregister_tgm,
)
from qblock.util.aio import AIO_WAIT_WHILE, aio_co_enter, aio_wait_kick
from qblock.util.coroutine import coroutine_fn, qemu_coroutine_create, qemu_in_coroutine
from qblock.util.coroutine_lock import (
    CoMutex,
    CoQueue,
    qemu_co_mutex_init,
    qemu_co_mutex_lock,
    qemu_co_mutex_unlock,
    qemu_co_queue_empty,
    qemu_co_queue_init,
    qemu_co_queue_next,
    qemu_co_queue_wait,
)
from qblock.util.error import Error
from qblock.util.qemu_option import keyval_parse, qdict_crumple
from qblock.util.throttle import (
    THROTTLE_BPS_READ,
    THROTTLE_BPS_TOTAL,
    THROTTLE_BPS_WRITE,
    THROTTLE_LIMITS_KEYS,
    THROTTLE_MAX,
    THROTTLE_OPS_READ,
    THROTTLE_OPS_TOTAL,
    THROTTLE_OPS_WRITE,
    THROTTLE_READ,
    THROTTLE_WRITE,
    ThrottleConfig,
    ThrottleState,
    ThrottleTimers,
    throttle_account,
    throttle_config,
    throttle_config_init,
    throttle_config_to_limits,
    throttle_enabled,
    throttle_get_config,
    throttle_init,
    throttle_is_valid,
    throttle_limits_to_config,
    throttle_schedule_timer,
    throttle_timers_attach_aio_context,
    throttle_timers_destroy,
    throttle_timers_detach_aio_context,
    throttle_timers_init,
)
from qblock.util.timer import (
    QEMU_CLOCK_REALTIME,
    QEMU_CLOCK_VIRTUAL,
    qemu_clock_get_ns,
    qtest_enabled,
    timer_del,
    timer_expire_time_ns,
    timer_mod,
    timer_pending,
)

__all__ = [
    "TYPE_THROTTLE_GROUP", "ThrottleGroupMember", "ThrottleGroup", "throttle_groups",
    "throttle_group_exists", "throttle_group_incref", "throttle_group_unref", "throttle_group_get_name",
    "throttle_group_register_tgm", "throttle_group_unregister_tgm", "throttle_group_config",
    "throttle_group_get_config", "throttle_group_co_io_limits_intercept", "next_throttle_token",
    "throttle_group_schedule_timer", "schedule_next_request", "throttle_group_restart_queue",
    "throttle_group_restart_tgm", "throttle_group_attach_aio_context",
    "throttle_group_detach_aio_context", "read_timer_cb", "write_timer_cb",
    "blk_set_io_limits", "blk_io_limits_enable", "blk_io_limits_disable", "blk_io_limits_update_group",
    "qmp_block_set_io_throttle", "block_set_io_throttle",
    "object_property_set", "object_property_get", "user_creatable_add_type", "user_creatable_add_dict",
    "user_creatable_process_cmdline", "user_creatable_del", "qmp_object_add", "qmp_object_del",
    "object_resolve_objects_root",
]

TYPE_THROTTLE_GROUP = "throttle-group"
_UINT_MAX = (1 << 32) - 1
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1


# ---------------------------------------------------------------------------
# Types


@attrs.define(eq=False, repr=False)
class ThrottleGroupMember:
    """One user of a throttle group (QEMU's ThrottleGroupMember)."""

    aio_context: Any = None
    throttled_reqs_lock: CoMutex = attrs.field(factory=lambda: CoMutex("throttled_reqs_lock"))
    throttled_reqs: list = attrs.field(factory=lambda: [CoQueue("throttled_reqs[read]"),
                                                        CoQueue("throttled_reqs[write]")])
    io_limits_disabled: int = 0
    restart_pending: int = 0
    throttle_state: Any = None       # the group's ThrottleState, None when not throttled
    throttle_timers: ThrottleTimers = attrs.field(factory=ThrottleTimers)
    pending_reqs: list = attrs.field(factory=lambda: [0, 0])
    name: str = ""                   # qblock: who this member is (the BlockBackend or node), for traces

    @property
    def trace_name(self) -> str:
        return self.name or f"tgm@{id(self):#x}"

    def __repr__(self) -> str:
        group = _tg(self.throttle_state).name if self.throttle_state is not None else None
        return (f"<ThrottleGroupMember {self.trace_name} group={group} pending_reqs={self.pending_reqs} "
                f"io_limits_disabled={self.io_limits_disabled}>")


@attrs.define(eq=False, repr=False)
class ThrottleGroup:
    """A named group of members sharing one ThrottleState (QEMU's ThrottleGroup, a QOM object).

    ``head`` is QEMU's member list (new members go first); ``tokens[dir]`` is
    the member whose turn it is; ``any_timer_armed[dir]`` says some member's
    timer is already armed, so the others must wait.  ``ref`` is the QOM
    reference count; ``parent`` the id under ``/objects`` when the group was
    created as an object.
    """

    name: str | None = None
    is_initialized: bool = False
    lock: Any = attrs.field(factory=threading.RLock, repr=False)
    ts: ThrottleState = attrs.field(factory=ThrottleState)
    head: list = attrs.field(factory=list)
    tokens: list = attrs.field(factory=lambda: [None] * THROTTLE_MAX)
    any_timer_armed: list = attrs.field(factory=lambda: [False] * THROTTLE_MAX)
    clock_type: int = QEMU_CLOCK_REALTIME
    ref: int = 1
    parent: str | None = None

    @property
    def trace_name(self) -> str:
        return f"throttle-group {self.name}"

    def __repr__(self) -> str:
        members = [m.trace_name for m in self.head]
        return f"<ThrottleGroup {self.name} ref={self.ref} members={members}>"


throttle_groups: list[ThrottleGroup] = []       # every completed group, in creation order
_group_of_state: dict[int, ThrottleGroup] = {}  # container_of(ts, ThrottleGroup, ts)
_objects_root: dict[str, ThrottleGroup] = {}    # the /objects container (user-created groups)


def _tg(ts: ThrottleState) -> ThrottleGroup:
    return _group_of_state[id(ts)]


# ---------------------------------------------------------------------------
# Object life cycle (throttle_group_obj_init / _complete / _finalize)


def throttle_group_obj_init(tg: ThrottleGroup) -> None:
    """Pick the clock (virtual under qtest, as QEMU) and reset the state."""
    tg.clock_type = QEMU_CLOCK_VIRTUAL if qtest_enabled() else QEMU_CLOCK_REALTIME
    tg.is_initialized = False
    throttle_init(tg.ts)
    tg.head = []
    _group_of_state[id(tg.ts)] = tg


def _throttle_group_new() -> ThrottleGroup:
    """object_new(TYPE_THROTTLE_GROUP): a group with one reference, not yet complete."""
    tg = ThrottleGroup()
    throttle_group_obj_init(tg)
    return tg


def throttle_group_obj_complete(tg: ThrottleGroup) -> None:
    """Name the group after its object id, check the name is free and the limits valid, and list it."""
    if tg.name is None and tg.parent is not None:
        tg.name = tg.parent
    assert tg.name is not None, "a throttle group needs a name"
    if throttle_group_exists(tg.name):
        raise Error("A group with this name already exists")
    cfg = throttle_get_config(tg.ts)
    throttle_is_valid(cfg, errp=True)
    throttle_config(tg.ts, tg.clock_type, cfg)
    throttle_groups.append(tg)
    tg.is_initialized = True


def throttle_group_obj_finalize(tg: ThrottleGroup) -> None:
    if tg.is_initialized:
        throttle_groups.remove(tg)
        tg.is_initialized = False
    _group_of_state.pop(id(tg.ts), None)


def _object_ref(tg: ThrottleGroup) -> None:
    tg.ref += 1


def _object_unref(tg: ThrottleGroup) -> None:
    assert tg.ref > 0, f"{tg.trace_name} unreferenced too often"
    tg.ref -= 1
    if tg.ref == 0:
        throttle_group_obj_finalize(tg)


def throttle_group_can_be_deleted(tg: ThrottleGroup) -> bool:
    """Only the /objects container may hold a reference (no member uses the group)."""
    return tg.ref == 1


# ---------------------------------------------------------------------------
# Groups by name


def throttle_group_by_name(name: str) -> ThrottleGroup | None:
    for tg in throttle_groups:
        if tg.name == name:
            return tg
    return None


def throttle_group_exists(name: str) -> bool:
    """True when a group called ``name`` exists (object or implicit)."""
    return throttle_group_by_name(name) is not None


def throttle_group_incref(name: str) -> ThrottleState:
    """Take a reference to the group ``name``, creating it (without limits) if there is none."""
    tg = throttle_group_by_name(name)
    if tg is not None:
        _object_ref(tg)
    else:
        tg = _throttle_group_new()
        tg.name = name
        throttle_group_obj_complete(tg)
    return tg.ts


def throttle_group_unref(ts: ThrottleState) -> None:
    """Drop a reference taken by throttle_group_incref; the last one destroys the group."""
    _object_unref(_tg(ts))


def throttle_group_get_name(tgm: ThrottleGroupMember) -> str:
    """The name of the group ``tgm`` belongs to."""
    return _tg(tgm.throttle_state).name


# ---------------------------------------------------------------------------
# Round robin


def throttle_group_next_tgm(tgm: ThrottleGroupMember) -> ThrottleGroupMember:
    """The member after ``tgm`` in the group's list, wrapping around."""
    head = _tg(tgm.throttle_state).head
    i = head.index(tgm) + 1
    return head[i] if i < len(head) else head[0]


def tgm_has_pending_reqs(tgm: ThrottleGroupMember, direction: int) -> bool:
    return bool(tgm.pending_reqs[direction])


def next_throttle_token(tgm: ThrottleGroupMember, direction: int) -> ThrottleGroupMember:
    """The next member after the current token that has queued requests; ``tgm`` if none has."""
    tg = _tg(tgm.throttle_state)

    # A drained member with queued requests serves itself: it must not wait behind the others.
    if tgm_has_pending_reqs(tgm, direction) and tgm.io_limits_disabled:
        return tgm

    start = token = tg.tokens[direction]
    token = throttle_group_next_tgm(token)
    while token is not start and not tgm_has_pending_reqs(token, direction):
        token = throttle_group_next_tgm(token)

    # Nobody has anything queued: the turn is the caller's, whose request is probably the one at hand.
    if token is start and not tgm_has_pending_reqs(token, direction):
        token = tgm

    assert token is tgm or tgm_has_pending_reqs(token, direction)
    return token


def throttle_group_schedule_timer(tgm: ThrottleGroupMember, direction: int) -> bool:
    """Whether ``tgm``'s next request must wait; arms its timer (and makes it the token) if none is armed."""
    tg = _tg(tgm.throttle_state)
    tt = tgm.throttle_timers

    if tgm.io_limits_disabled:
        return False

    # One armed timer per group and direction: everybody else waits for it.
    if tg.any_timer_armed[direction]:
        return True

    must_wait = throttle_schedule_timer(tgm.throttle_state, tt, direction)
    if must_wait:
        tg.tokens[direction] = tgm
        tg.any_timer_armed[direction] = True
        if trace_throttle_group_schedule_timer.event.enabled:
            trace_throttle_group_schedule_timer(tgm, int(direction),
                                                timer_expire_time_ns(tt.timers[direction]))
    return must_wait


@coroutine_fn
def throttle_group_co_restart_queue(tgm: ThrottleGroupMember, direction: int) -> bool:
    """Wake the oldest queued request of ``tgm`` in ``direction``; False when none was queued."""
    qemu_co_mutex_lock(tgm.throttled_reqs_lock)
    ret = qemu_co_queue_next(tgm.throttled_reqs[direction])
    qemu_co_mutex_unlock(tgm.throttled_reqs_lock)
    return ret


def schedule_next_request(tgm: ThrottleGroupMember, direction: int) -> None:
    """Start the next queued request of the group: now, or when the next token's timer fires.

    Called with the group lock held, from a coroutine (the intercept, a restart)
    or not (detach); a request that may go at once is woken directly only from a
    coroutine and only if it is ``tgm``'s own, otherwise through a timer armed for now.
    """
    tg = _tg(tgm.throttle_state)

    token = next_throttle_token(tgm, direction)
    if not tgm_has_pending_reqs(token, direction):
        return

    must_wait = throttle_group_schedule_timer(token, direction)

    if not must_wait:
        # Prefer our own queue: it saves a trip through the timer.
        if qemu_in_coroutine() and throttle_group_co_restart_queue(tgm, direction):
            token = tgm
            how = "woken now"
        else:
            tt = token.throttle_timers
            now = qemu_clock_get_ns(tg.clock_type)
            timer_mod(tt.timers[direction], now)
            tg.any_timer_armed[direction] = True
            how = "timer armed for now"
        tg.tokens[direction] = token
    else:
        how = "waits for a timer"
    if trace_throttle_group_schedule_next_request.event.enabled:
        trace_throttle_group_schedule_next_request(tgm, token, int(direction), how)


@coroutine_fn
def throttle_group_co_io_limits_intercept(tgm: ThrottleGroupMember, bytes: int, is_write: bool | int) -> None:
    """Wait until the group lets a request of ``bytes`` go, account it, and schedule the next one.

    ``is_write`` is QEMU 3.x's bool; a ThrottleDirection (later QEMU) works as well.
    """
    direction = THROTTLE_WRITE if is_write else THROTTLE_READ
    assert bytes >= 0, "throttled request with a negative size"
    ts = tgm.throttle_state
    tg = _tg(ts)

    tg.lock.acquire()
    # First: may this request go, or must it wait (for a timer, or behind queued ones)?
    token = next_throttle_token(tgm, direction)
    must_wait = throttle_group_schedule_timer(token, direction)
    queued = bool(must_wait or tgm.pending_reqs[direction])
    if trace_throttle_group_co_io_limits_intercept.event.enabled:
        trace_throttle_group_co_io_limits_intercept(tgm, bytes, int(direction), token, int(must_wait),
                                                    tgm.pending_reqs[direction])

    if queued:
        tgm.pending_reqs[direction] += 1
        tg.lock.release()
        qemu_co_mutex_lock(tgm.throttled_reqs_lock)
        qemu_co_queue_wait(tgm.throttled_reqs[direction], tgm.throttled_reqs_lock)
        qemu_co_mutex_unlock(tgm.throttled_reqs_lock)
        tg.lock.acquire()
        tgm.pending_reqs[direction] -= 1
        if trace_throttle_group_io_limits_resume.event.enabled:
            trace_throttle_group_io_limits_resume(tgm, bytes, int(direction))

    # The request goes now: pour it into the buckets.
    throttle_account(ts, direction, bytes)

    schedule_next_request(tgm, direction)
    tg.lock.release()


@attrs.define(eq=False)
class RestartData:
    tgm: ThrottleGroupMember
    direction: int


@coroutine_fn
def throttle_group_restart_queue_entry(data: RestartData) -> None:
    """Wake one queued request; with none queued, let the group's next member have its turn."""
    tgm = data.tgm
    direction = data.direction
    tg = _tg(tgm.throttle_state)

    empty_queue = not throttle_group_co_restart_queue(tgm, direction)
    if trace_throttle_group_restart_queue.event.enabled:
        trace_throttle_group_restart_queue(tgm, int(direction), int(not empty_queue))

    if empty_queue:
        with tg.lock:
            schedule_next_request(tgm, direction)

    tgm.restart_pending -= 1
    aio_wait_kick()


def throttle_group_restart_queue(tgm: ThrottleGroupMember, direction: int) -> None:
    """Start a coroutine in ``tgm``'s AioContext that wakes its next queued request."""
    # Called from the timer or from throttle_group_restart_tgm: this timer cannot be pending.
    assert not timer_pending(tgm.throttle_timers.timers[direction])
    tgm.restart_pending += 1
    co = qemu_coroutine_create(throttle_group_restart_queue_entry, RestartData(tgm, direction))
    aio_co_enter(tgm.aio_context, co)


def throttle_group_restart_tgm(tgm: ThrottleGroupMember) -> None:
    """Let ``tgm``'s queued requests move now (limits changed, or drain began): fire its timers early."""
    if tgm.throttle_state is None:
        return
    for direction in (THROTTLE_READ, THROTTLE_WRITE):
        t = tgm.throttle_timers.timers[direction]
        if timer_pending(t):
            timer_del(t)
            timer_cb(tgm, direction)
        else:
            throttle_group_restart_queue(tgm, direction)


def throttle_group_config(tgm: ThrottleGroupMember, cfg: ThrottleConfig) -> None:
    """Give the whole group of ``tgm`` the limits ``cfg`` (levels start empty), then restart ``tgm``."""
    ts = tgm.throttle_state
    tg = _tg(ts)
    if trace_throttle_group_config.event.enabled:
        trace_throttle_group_config(tgm, tg.name)
    with tg.lock:
        throttle_config(ts, tg.clock_type, cfg)
    throttle_group_restart_tgm(tgm)


def throttle_group_get_config(tgm: ThrottleGroupMember, cfg: ThrottleConfig | None = None) -> ThrottleConfig:
    """The group's configuration (levels included), copied into ``cfg`` or a new config."""
    ts = tgm.throttle_state
    with _tg(ts).lock:
        return throttle_get_config(ts, cfg)


# ---------------------------------------------------------------------------
# Timers


def timer_cb(tgm: ThrottleGroupMember, direction: int) -> None:
    """A member's timer fired: the group has no armed timer any more, and the member's next request goes."""
    tg = _tg(tgm.throttle_state)
    if trace_throttle_group_timer_cb.event.enabled:
        trace_throttle_group_timer_cb(tgm, int(direction))
    with tg.lock:
        tg.any_timer_armed[direction] = False
    throttle_group_restart_queue(tgm, direction)


def read_timer_cb(opaque: ThrottleGroupMember) -> None:
    timer_cb(opaque, THROTTLE_READ)


def write_timer_cb(opaque: ThrottleGroupMember) -> None:
    timer_cb(opaque, THROTTLE_WRITE)


# ---------------------------------------------------------------------------
# Membership


def throttle_group_register_tgm(tgm: ThrottleGroupMember, groupname: str, ctx: Any) -> None:
    """Make ``tgm`` a member of the group ``groupname`` (created if needed), with timers in ``ctx``."""
    ts = throttle_group_incref(groupname)
    tg = _tg(ts)

    tgm.throttle_state = ts
    tgm.aio_context = ctx
    tgm.restart_pending = 0

    with tg.lock:
        # A new group's first member holds the tokens.
        for direction in (THROTTLE_READ, THROTTLE_WRITE):
            if tg.tokens[direction] is None:
                tg.tokens[direction] = tgm
            qemu_co_queue_init(tgm.throttled_reqs[direction])

        tg.head.insert(0, tgm)

        throttle_timers_init(tgm.throttle_timers, tgm.aio_context, tg.clock_type,
                             read_timer_cb, write_timer_cb, tgm)
        qemu_co_mutex_init(tgm.throttled_reqs_lock)
    if trace_throttle_group_register_tgm.event.enabled:
        trace_throttle_group_register_tgm(tgm, groupname, ctx)


def throttle_group_unregister_tgm(tgm: ThrottleGroupMember) -> None:
    """Take ``tgm`` out of its group (it must have no queued requests); a no-op when it is in none."""
    ts = tgm.throttle_state
    if ts is None:
        return
    tg = _tg(ts)
    if trace_throttle_group_unregister_tgm.event.enabled:
        trace_throttle_group_unregister_tgm(tgm, tg.name)

    # Let throttle_group_restart_queue_entry() coroutines finish first.
    if tgm.restart_pending > 0:
        AIO_WAIT_WHILE(tgm.aio_context, lambda: tgm.restart_pending > 0)

    with tg.lock:
        for direction in (THROTTLE_READ, THROTTLE_WRITE):
            if tgm.pending_reqs[direction] or not qemu_co_queue_empty(tgm.throttled_reqs[direction]):
                raise AssertionError(f"{tgm.trace_name} leaves {tg.trace_name} with queued requests")
            timer = tgm.throttle_timers.timers[direction]
            if timer is not None and timer_pending(timer):
                raise AssertionError(f"{tgm.trace_name} leaves {tg.trace_name} with its timer armed")
            if tg.tokens[direction] is tgm:
                token = throttle_group_next_tgm(tgm)
                # The last member leaves no token behind.
                tg.tokens[direction] = None if token is tgm else token

        tg.head.remove(tgm)
        throttle_timers_destroy(tgm.throttle_timers)

    throttle_group_unref(ts)
    tgm.throttle_state = None


def throttle_group_attach_aio_context(tgm: ThrottleGroupMember, new_context: Any) -> None:
    """Re-create ``tgm``'s timers in ``new_context``."""
    throttle_timers_attach_aio_context(tgm.throttle_timers, new_context)
    tgm.aio_context = new_context


def throttle_group_detach_aio_context(tgm: ThrottleGroupMember) -> None:
    """Free ``tgm``'s timers before a move; an armed one hands the group's turn to the next member."""
    tg = _tg(tgm.throttle_state)
    tt = tgm.throttle_timers

    # The member was drained: nothing of its own is queued.
    for direction in (THROTTLE_READ, THROTTLE_WRITE):
        if tgm.pending_reqs[direction] or not qemu_co_queue_empty(tgm.throttled_reqs[direction]):
            raise AssertionError(f"{tgm.trace_name} changes AioContext with queued requests")

    with tg.lock:
        for direction in (THROTTLE_READ, THROTTLE_WRITE):
            timer = tt.timers[direction]
            if timer is not None and timer_pending(timer):
                tg.any_timer_armed[direction] = False
                schedule_next_request(tgm, direction)

    throttle_timers_detach_aio_context(tt)
    tgm.aio_context = None


# ---------------------------------------------------------------------------
# BlockBackend (block/block-backend.c)


def blk_set_io_limits(blk: Any, cfg: ThrottleConfig) -> None:
    """Apply ``cfg`` to the group of ``blk`` (it must be in one: blk_io_limits_enable first)."""
    throttle_group_config(blk.public.throttle_group_member, cfg)


def blk_io_limits_disable(blk: Any) -> None:
    """Stop throttling ``blk``: drain it (its queued requests go at once) and leave its group.

    The reference held on the node across the drain is later QEMU's fix (the seed drains without it).
    """
    from qblock.block.block_backend import blk_bs
    tgm = blk.public.throttle_group_member
    assert tgm.throttle_state is not None, "blk_io_limits_disable on a BlockBackend without limits"
    bs = blk_bs(blk)
    if bs is not None:
        bdrv_ref(bs)
        bdrv_drained_begin(bs)
    try:
        throttle_group_unregister_tgm(tgm)
    finally:
        if bs is not None:
            bdrv_drained_end(bs)
            bdrv_unref(bs)


def blk_io_limits_enable(blk: Any, group: str) -> None:
    """Make ``blk`` a member of ``group`` (created without limits if new); then blk_set_io_limits."""
    from qblock.block.block_backend import blk_get_aio_context
    tgm = blk.public.throttle_group_member
    assert tgm.throttle_state is None, "blk_io_limits_enable on a BlockBackend that has limits"
    tgm.name = blk.trace_name
    throttle_group_register_tgm(tgm, group, blk_get_aio_context(blk))


def blk_io_limits_update_group(blk: Any, group: str) -> None:
    """Move a throttled ``blk`` to ``group``; nothing happens if it is unthrottled or already there."""
    tgm = blk.public.throttle_group_member
    if tgm.throttle_state is None:
        return
    if throttle_group_get_name(tgm) == group:
        return
    blk_io_limits_disable(blk)
    blk_io_limits_enable(blk, group)


# ---------------------------------------------------------------------------
# QMP block_set_io_throttle (blockdev.c)


def _qmp_get_blk(device: str | None, id: str | None) -> Any:
    """blockdev.c's qmp_get_blk: the BlockBackend named ``device``, or the one of the device ``id``."""
    from qblock.block.block_backend import blk_all_next, blk_by_name
    if (device is None) == (id is None):
        raise Error("Need exactly one of 'device' and 'id'")
    if id is not None:
        # blk_by_qdev_id: the device model attached to a BlockBackend carries the qdev id.
        blk = blk_all_next(None)
        while blk is not None:
            if blk.dev is not None and getattr(blk.dev, "id", None) == id:
                return blk
            blk = blk_all_next(blk)
        raise Error(f"Device '{id}' not found", errno=errno.ENODEV)
    blk = blk_by_name(device)
    if blk is None:
        raise Error(f"Device '{device}' not found", errno=errno.ENODEV)
    return blk


def qmp_block_set_io_throttle(*, device: str | None = None, id: str | None = None,
                              bps: int, bps_rd: int, bps_wr: int, iops: int, iops_rd: int, iops_wr: int,
                              bps_max: int | None = None, bps_rd_max: int | None = None,
                              bps_wr_max: int | None = None, iops_max: int | None = None,
                              iops_rd_max: int | None = None, iops_wr_max: int | None = None,
                              bps_max_length: int | None = None, bps_rd_max_length: int | None = None,
                              bps_wr_max_length: int | None = None, iops_max_length: int | None = None,
                              iops_rd_max_length: int | None = None, iops_wr_max_length: int | None = None,
                              iops_size: int | None = None, group: str | None = None) -> None:
    """Set (or, all zero, remove) the I/O limits of a BlockBackend; raises Error with QEMU's messages.

    The six averages are mandatory as in QAPI; every other member is optional
    (None = absent).  The BlockBackend joins ``group``, or a group named after
    the device, the first time it gets limits.
    """
    from qblock.block.block_backend import blk_bs
    blk = _qmp_get_blk(device, id)

    if blk_bs(blk) is None:
        raise Error("Device has no medium")

    cfg = ThrottleConfig()
    throttle_config_init(cfg)
    b = cfg.buckets
    b[THROTTLE_BPS_TOTAL].avg = bps
    b[THROTTLE_BPS_READ].avg = bps_rd
    b[THROTTLE_BPS_WRITE].avg = bps_wr
    b[THROTTLE_OPS_TOTAL].avg = iops
    b[THROTTLE_OPS_READ].avg = iops_rd
    b[THROTTLE_OPS_WRITE].avg = iops_wr

    optional = (
        (bps_max, THROTTLE_BPS_TOTAL, "max"), (bps_rd_max, THROTTLE_BPS_READ, "max"),
        (bps_wr_max, THROTTLE_BPS_WRITE, "max"), (iops_max, THROTTLE_OPS_TOTAL, "max"),
        (iops_rd_max, THROTTLE_OPS_READ, "max"), (iops_wr_max, THROTTLE_OPS_WRITE, "max"),
        (bps_max_length, THROTTLE_BPS_TOTAL, "burst_length"),
        (bps_rd_max_length, THROTTLE_BPS_READ, "burst_length"),
        (bps_wr_max_length, THROTTLE_BPS_WRITE, "burst_length"),
        (iops_max_length, THROTTLE_OPS_TOTAL, "burst_length"),
        (iops_rd_max_length, THROTTLE_OPS_READ, "burst_length"),
        (iops_wr_max_length, THROTTLE_OPS_WRITE, "burst_length"),
    )
    for value, index, field in optional:
        if value is not None:
            setattr(b[index], field, value)
    if iops_size is not None:
        cfg.op_size = iops_size

    throttle_is_valid(cfg, errp=True)

    tgm = blk.public.throttle_group_member
    if throttle_enabled(cfg):
        # Join a group the first time; afterwards only an explicit group moves the BlockBackend.
        if tgm.throttle_state is None:
            blk_io_limits_enable(blk, group if group is not None else device if device is not None else id)
        elif group is not None:
            blk_io_limits_update_group(blk, group)
        blk_set_io_limits(blk, cfg)
    elif tgm.throttle_state is not None:
        # All limits zero: throttling is switched off.
        blk_io_limits_disable(blk)


block_set_io_throttle = qmp_block_set_io_throttle


# ---------------------------------------------------------------------------
# The throttle-group object's properties


@attrs.define(frozen=True)
class ThrottleParamInfo:
    """One ``x-*`` property: which bucket it sets and which of its fields (QEMU's ThrottleParamInfo)."""

    name: str
    type: int
    category: str   # "avg", "max", "burst_length" or "op_size"


# In QEMU's order (the order of ThrottleGroupProperties in qapi/qom.json after "limits").
THROTTLE_GROUP_PROPERTIES: tuple[ThrottleParamInfo, ...] = tuple(
    ThrottleParamInfo(f"x-{unit}-{dirname}{suffix}", bucket, category)
    for unit, buckets in (("iops", (THROTTLE_OPS_TOTAL, THROTTLE_OPS_READ, THROTTLE_OPS_WRITE)),
                          ("bps", (THROTTLE_BPS_TOTAL, THROTTLE_BPS_READ, THROTTLE_BPS_WRITE)))
    for dirname, bucket in zip(("total", "read", "write"), buckets)
    for suffix, category in (("", "avg"), ("-max", "max"), ("-max-length", "burst_length"))
) + (ThrottleParamInfo("x-iops-size", 0, "op_size"),)

_PROPERTY_BY_NAME = {info.name: info for info in THROTTLE_GROUP_PROPERTIES}


def _throttle_group_set(tg: ThrottleGroup, info: ThrottleParamInfo, value: int) -> None:
    """One ``x-*`` property: only before the group is complete, never negative."""
    # Limits are one transaction: some combinations are invalid, so no piecemeal changes later.
    if tg.is_initialized:
        raise Error("Property cannot be set after initialization")
    _check_int64(info.name, value)
    if value < 0:
        raise Error("Property values cannot be negative")
    cfg = tg.ts.cfg
    if info.category == "avg":
        cfg.buckets[info.type].avg = value
    elif info.category == "max":
        cfg.buckets[info.type].max = value
    elif info.category == "burst_length":
        if value > _UINT_MAX:
            # QEMU's message lacks the space between "the" and "range".
            raise Error(f"{info.name} value must be in therange [0, {_UINT_MAX}]")
        cfg.buckets[info.type].burst_length = value
    else:
        cfg.op_size = value


def _throttle_group_get(tg: ThrottleGroup, info: ThrottleParamInfo) -> int:
    cfg = throttle_get_config(tg.ts)
    if info.category == "op_size":
        value = cfg.op_size
    else:
        value = getattr(cfg.buckets[info.type], info.category)
    return value - (1 << 64) if value > _INT64_MAX else value


def _throttle_group_set_limits(tg: ThrottleGroup, limits: dict[str, int]) -> None:
    """The ``limits`` property: merged into the current configuration and checked as a whole, at any time."""
    with tg.lock:
        cfg = throttle_get_config(tg.ts)
        throttle_limits_to_config(limits, cfg)
        throttle_config(tg.ts, tg.clock_type, cfg)


def _throttle_group_get_limits(tg: ThrottleGroup) -> dict[str, int]:
    with tg.lock:
        cfg = throttle_get_config(tg.ts)
    return throttle_config_to_limits(cfg)


def _check_int64(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not _INT64_MIN <= value <= _INT64_MAX:
        raise Error(f"Invalid parameter type for '{name}', expected: integer")


def object_property_set(tg: ThrottleGroup, name: str, value: Any) -> None:
    """Set a property of a throttle-group (qom-set): an ``x-*`` int, or ``limits`` (a ThrottleLimits dict)."""
    if name == "limits":
        if not isinstance(value, dict):
            raise Error("Invalid parameter type for 'limits', expected: object")
        _throttle_group_set_limits(tg, value)
        return
    info = _PROPERTY_BY_NAME.get(name)
    if info is None:
        raise Error(f"Property '{TYPE_THROTTLE_GROUP}.{name}' not found")
    _throttle_group_set(tg, info, value)


def object_property_get(tg: ThrottleGroup, name: str) -> Any:
    """Read a property of a throttle-group (qom-get)."""
    if name == "limits":
        return _throttle_group_get_limits(tg)
    info = _PROPERTY_BY_NAME.get(name)
    if info is None:
        raise Error(f"Property '{TYPE_THROTTLE_GROUP}.{name}' not found")
    return _throttle_group_get(tg, info)


# ---------------------------------------------------------------------------
# Creating and deleting objects (qom/object_interfaces.c, for throttle-group only)


def object_resolve_objects_root(id: str) -> ThrottleGroup | None:
    """The user-created object ``id`` (``/objects/<id>``), or None."""
    return _objects_root.get(id)


# What strtoll() with base 0 reads whole: decimal, 0x hexadecimal or 0 octal, after optional blanks and sign.
_STRTOLL_BASE0 = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def _strtoi64_base0(text: str) -> int | None:
    """qemu_strtoi64(text, NULL, 0, &value) as the keyval visitor calls it: the value, or None on error."""
    m = _STRTOLL_BASE0.fullmatch(text)
    if m is None:
        return None
    digits = m.group(2)
    if digits[:2] in ("0x", "0X"):
        value = int(digits[2:], 16)
    elif digits.startswith("0"):
        value = int(digits, 8)
    else:
        value = int(digits)
    if m.group(1) == "-":
        value = -value
    return value if _INT64_MIN <= value <= _INT64_MAX else None


def _visit_int(name: str, value: Any, keyval: bool) -> int:
    """An int64 member: a string in --object (keyval) syntax, an int in QMP syntax."""
    if keyval and isinstance(value, str):
        n = _strtoi64_base0(value)
        if n is None:
            raise Error(f"Parameter '{name}' expects integer")
        return n
    _check_int64(name, value)
    return value


def _visit_throttle_group_properties(props: dict[str, Any], keyval: bool) -> list[tuple[str, Any]]:
    """Check the members of ThrottleGroupProperties as QAPI does; return (property, value) in schema order."""
    out: list[tuple[str, Any]] = []
    if "limits" in props:
        limits = props["limits"]
        if not isinstance(limits, dict):
            raise Error("Invalid parameter type for 'limits', expected: object")
        visited = {key: _visit_int(f"limits.{key}", limits[key], keyval)
                   for key in THROTTLE_LIMITS_KEYS if key in limits}
        for key in limits:
            if key not in visited:
                raise Error(f"Parameter 'limits.{key}' is unexpected")
        out.append(("limits", visited))
    for info in THROTTLE_GROUP_PROPERTIES:
        if info.name in props:
            out.append((info.name, _visit_int(info.name, props[info.name], keyval)))
    for key in props:
        if key != "limits" and key not in _PROPERTY_BY_NAME:
            raise Error(f"Parameter '{key}' is unexpected")
    return out


def user_creatable_add_type(type: str, id: str, props: list[tuple[str, Any]]) -> ThrottleGroup:
    """Create the object ``id`` of ``type``, set ``props`` in order, add it to /objects and complete it."""
    if type != TYPE_THROTTLE_GROUP:
        raise Error(f"invalid object type: {type}")
    if not id_wellformed(id):
        raise Error("Parameter 'id' expects an identifier",
                    hint="Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.")
    tg = _throttle_group_new()
    try:
        for name, value in props:
            object_property_set(tg, name, value)
        if id in _objects_root:
            raise Error(f"attempt to add duplicate property '{id}' to object (type 'container')")
        _objects_root[id] = tg
        tg.parent = id
        _object_ref(tg)
        try:
            throttle_group_obj_complete(tg)
        except Error:
            del _objects_root[id]
            tg.parent = None
            _object_unref(tg)
            raise
    finally:
        # The container holds the object now (or, on error, nothing does).
        _object_unref(tg)
    return tg


def user_creatable_add_dict(qdict: dict[str, Any], keyval: bool = False) -> ThrottleGroup:
    """object-add from a dict with ``qom-type``, ``id`` and the properties (ints, or strings when ``keyval``)."""
    qdict = dict(qdict)
    qom_type = qdict.pop("qom-type", None)
    if qom_type is None:
        raise Error("Parameter 'qom-type' is missing")
    if qom_type != TYPE_THROTTLE_GROUP:
        raise Error(f"Parameter 'qom-type' does not accept value '{qom_type}'")
    id = qdict.pop("id", None)
    if id is None:
        raise Error("Parameter 'id' is missing")
    if not isinstance(id, str):
        raise Error("Invalid parameter type for 'id', expected: string")
    props = _visit_throttle_group_properties(qdict, keyval)
    return user_creatable_add_type(qom_type, id, props)


def user_creatable_process_cmdline(optarg: str) -> ThrottleGroup:
    """Create an object from an ``--object`` argument: ``throttle-group,id=tg0,x-bps-write=1048576``."""
    qdict = qdict_crumple(keyval_parse(optarg, "qom-type"))
    return user_creatable_add_dict(qdict, keyval=True)


def qmp_object_add(qom_type: str, id: str, **props: Any) -> ThrottleGroup:
    """QMP object-add: properties as keyword arguments (``x_bps_write=...`` or ``limits={...}``)."""
    qdict: dict[str, Any] = {"qom-type": qom_type, "id": id}
    for key, value in props.items():
        qdict[key.replace("_", "-")] = value
    return user_creatable_add_dict(qdict)


def user_creatable_del(id: str) -> None:
    """Delete the object ``id``; refused while a member still uses the group."""
    tg = _objects_root.get(id)
    if tg is None:
        raise Error(f"object '{id}' not found")
    if not throttle_group_can_be_deleted(tg):
        raise Error(f"object '{id}' is in use, can not be deleted")
    del _objects_root[id]
    tg.parent = None
    _object_unref(tg)


qmp_object_del = user_creatable_del
