"""Asynchronous events (QEMU's qapi_event_send_* and monitor_qapi_event_queue).

Code that QEMU has emit a QMP event (``BLOCK_IO_ERROR``,
``BLOCK_WRITE_THRESHOLD``, ``BLOCK_IMAGE_CORRUPTED``, ``STOP``, ``RESUME`` ...)
calls :func:`qapi_event_send` with the event name and its data dict; a QMP
monitor, a test or a tool listens with :func:`qapi_event_add_listener`.
Each event carries a host timestamp as QMP events do.
"""
from __future__ import annotations

from typing import Any, Callable

from qblock.util.timer import QEMU_CLOCK_HOST, qemu_clock_get_ns

__all__ = ["qapi_event_send", "qapi_event_add_listener", "qapi_event_remove_listener"]

_listeners: list[Callable[[str, dict[str, Any], dict[str, int]], None]] = []


def qapi_event_add_listener(fn: Callable[[str, dict[str, Any], dict[str, int]], None]) -> None:
    """Call ``fn(name, data, timestamp)`` for every event from now on."""
    _listeners.append(fn)


def qapi_event_remove_listener(fn: Callable[[str, dict[str, Any], dict[str, int]], None]) -> None:
    if fn in _listeners:
        _listeners.remove(fn)


def qapi_event_send(name: str, data: dict[str, Any]) -> None:
    """Emit event ``name`` with ``data`` to every listener."""
    ns = qemu_clock_get_ns(QEMU_CLOCK_HOST)     # wall-clock time, as QMP timestamps are
    stamp = {"seconds": ns // 1_000_000_000, "microseconds": ns % 1_000_000_000 // 1000}
    for fn in list(_listeners):
        fn(name, data, stamp)
