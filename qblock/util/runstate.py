"""The VM's run state: QEMU's softmmu/runstate.c and softmmu/cpus.c (vm_stop/vm_start), the small part block devices need.

``werror=stop`` stops the VM through :func:`qemu_system_vmstop_request`;
devices register :func:`qemu_add_vm_change_state_handler` callbacks (virtio-blk
restarts the requests it kept when the VM runs again).  Stopping is a request
served by the main loop in QEMU; qblock serves it from a BH in the main
AioContext, so the stop happens after the failing request's completion
returned, as in QEMU.
"""
from __future__ import annotations

import enum
from typing import Any, Callable

import attrs

from qblock.util.aio import aio_bh_schedule_oneshot, qemu_get_aio_context
from qblock.util.qapi_event import qapi_event_send

__all__ = ["RunState", "runstate_is_running", "runstate_get", "vm_stop", "vm_start",
           "qemu_system_vmstop_request", "qemu_add_vm_change_state_handler",
           "qemu_del_vm_change_state_handler", "VMChangeStateEntry"]


class RunState(enum.Enum):
    RUN_STATE_RUNNING = "running"
    RUN_STATE_PAUSED = "paused"
    RUN_STATE_IO_ERROR = "io-error"
    RUN_STATE_SHUTDOWN = "shutdown"


@attrs.define(eq=False)
class VMChangeStateEntry:
    cb: Callable[[Any, bool, RunState], None]
    opaque: Any


_state = RunState.RUN_STATE_RUNNING
_handlers: list[VMChangeStateEntry] = []
_pending_stop: RunState | None = None


def runstate_get() -> RunState:
    return _state


def runstate_is_running() -> bool:
    return _state is RunState.RUN_STATE_RUNNING


def qemu_add_vm_change_state_handler(cb: Callable[[Any, bool, RunState], None], opaque: Any) -> VMChangeStateEntry:
    """``cb(opaque, running, state)`` whenever the VM stops or starts."""
    e = VMChangeStateEntry(cb, opaque)
    _handlers.append(e)
    return e


def qemu_del_vm_change_state_handler(e: VMChangeStateEntry) -> None:
    if e in _handlers:
        _handlers.remove(e)


def _notify(running: bool, state: RunState) -> None:
    # Handlers run in reverse order when stopping, in order when starting (as QEMU's vm_state_notify).
    for e in (list(_handlers) if running else list(reversed(_handlers))):
        e.cb(e.opaque, running, state)


def vm_stop(state: RunState = RunState.RUN_STATE_PAUSED) -> None:
    """Stop the VM now (no-op if it is already stopped)."""
    global _state
    if _state is not RunState.RUN_STATE_RUNNING:
        _state = state if state is not RunState.RUN_STATE_PAUSED else _state
        return
    _state = state
    _notify(False, state)
    qapi_event_send("STOP", {})


def vm_start() -> None:
    """Run the VM again; change-state handlers see running=True."""
    global _state
    if _state is RunState.RUN_STATE_RUNNING:
        return
    _state = RunState.RUN_STATE_RUNNING
    qapi_event_send("RESUME", {})
    _notify(True, RunState.RUN_STATE_RUNNING)


def _vmstop_bh(opaque: Any) -> None:
    global _pending_stop
    state, _pending_stop = _pending_stop, None
    if state is not None:
        vm_stop(state)


def qemu_system_vmstop_request(state: RunState) -> None:
    """Ask the main loop to stop the VM soon (from a BH)."""
    global _pending_stop
    if _pending_stop is None:
        _pending_stop = state
        aio_bh_schedule_oneshot(qemu_get_aio_context(), _vmstop_bh, None, "vmstop_request")


def _reset_for_tests() -> None:
    global _state, _pending_stop
    _state = RunState.RUN_STATE_RUNNING
    _pending_stop = None
    _handlers.clear()
