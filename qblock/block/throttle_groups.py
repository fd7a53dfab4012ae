"""Throttle groups: QEMU's block/throttle-groups.c and include/block/throttle-groups.h.

A :class:`ThrottleGroupMember` is what a BlockBackend (or a throttle filter
node) carries; while ``throttle_state`` is None the member is not throttled
and the request path pays one attribute test for it.
"""
from __future__ import annotations

from typing import Any

import attrs

from qblock.util.coroutine_lock import CoMutex, CoQueue
from qblock.util.throttle import ThrottleTimers

__all__ = ["ThrottleGroupMember"]


@attrs.define(eq=False)
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
    name: str = ""
