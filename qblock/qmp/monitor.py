"""QMP monitors: QEMU's monitor/qmp.c and the QMP half of monitor/monitor.c.

A :class:`MonitorQMP` sits on a chardev (:mod:`qblock.qmp.char_socket`).
When a client connects it sends the greeting and starts in capabilities
negotiation mode, where only ``qmp_capabilities`` exists (anything else gets
``CommandNotFound`` "Expecting capabilities negotiation with
'qmp_capabilities'"); ``qmp_capabilities`` switches it to command mode.
Input goes through QEMU's JSON streamer (:mod:`qblock.qmp.qjson`); each
complete value (or parse error) becomes a request on the monitor's queue
(``handle_qmp_command``).  Without the ``oob`` capability the monitor is
suspended while a request waits or runs, so requests run one at a time in
order, as in QEMU.

One dispatcher coroutine for all monitors (``monitor_qmp_dispatcher_co``,
QEMU's ``qmp_dispatcher_co``) takes requests round-robin and runs them
through :func:`qblock.qmp.dispatch.qmp_dispatch`; replies go back with
:func:`qmp_send_response`.  Output is QEMU's byte for byte: JSON in QDict key
order, ``--monitor pretty=on`` indentation, and ``\\r\\n`` line ends
(monitor_puts turns every ``\\n`` into ``\\r\\n``).

Events: :func:`monitor_qapi_event_emit` is hooked to
:mod:`qblock.util.qapi_event`, so every ``qapi_event_send`` (BLOCK_IO_ERROR,
BLOCK_WRITE_THRESHOLD, BLOCK_EXPORT_DELETED ...) reaches each monitor in
command mode as ``{"timestamp": ..., "event": ..., "data": ...}``; an event
sent from an IOThread is delivered from a BH in the main loop.

The greeting's version: qblock reports QEMU 7.2.0 — the QEMU whose QMP
schema and replies it follows — with ``package`` ``"qblock <version>"``, so
clients that check the QEMU version see what they talk to.

Differences from QEMU: the monitor runs in the main loop (QEMU reads QMP in a
monitor I/O thread and offers ``oob`` because of it; qblock offers ``oob``
too, and honours ``exec-oob`` checks, but an out-of-band command runs right
when it is read, in the main loop); no HMP; no event rate limiting (QEMU
throttles only non-block events); no ``getfd``/fd sets.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Any

import attrs

from qblock.qmp.char_socket import (
    CharBackend,
    QEMUChrEvent,
    qemu_chr_fe_accept_input,
    qemu_chr_fe_flush,
    qemu_chr_fe_init,
    qemu_chr_fe_set_handlers,
    qemu_chr_fe_write_all,
    qemu_chr_find,
)
from qblock.qmp.dispatch import (
    QapiErrorClass,
    QmpCommandList,
    qmp_dispatch,
    qmp_error_response,
    qmp_is_oob,
)
from qblock.qmp.qjson import JSONMessageParser, qobject_to_json_pretty
from qblock.util.aio import aio_bh_schedule_oneshot, aio_co_schedule, qemu_get_aio_context
from qblock.util.coroutine import qemu_coroutine_create, qemu_coroutine_yield
from qblock.util.error import Error
from qblock.util.qapi_event import qapi_event_add_listener, qapi_event_remove_listener

__all__ = ["MonitorQMP", "QMP_CAPABILITY_OOB", "QMP_REQ_QUEUE_LEN_MAX", "qmp_commands",
           "qmp_cap_negotiation_commands", "mon_list", "monitor_init_qmp", "monitor_init",
           "monitor_init_globals", "monitor_cleanup", "qmp_send_response", "monitor_qapi_event_emit",
           "handle_qmp_command", "monitor_qmp_dispatch", "monitor_cur", "monitor_set_cur",
           "monitor_suspend", "monitor_resume", "qmp_dispatcher_co_wake", "qmp_greeting",
           "QBLOCK_QEMU_VERSION"]

QMP_CAPABILITY_OOB = "oob"
QMP_CAPABILITIES = (QMP_CAPABILITY_OOB,)
QMP_REQ_QUEUE_LEN_MAX = 8

# The QEMU version qblock's QMP follows (reported by query-version and the greeting).
QBLOCK_QEMU_VERSION = (7, 2, 0)

qmp_commands = QmpCommandList()
qmp_cap_negotiation_commands = QmpCommandList()


@attrs.define(eq=False)
class QMPRequest:
    """A request waiting for the dispatcher: the parsed object, or the parse error to report."""

    mon: "MonitorQMP"
    req: Any
    err: Error | None


@attrs.define(eq=False)
class MonitorQMP:
    """One QMP monitor on one chardev (QEMU's MonitorQMP)."""

    chr: CharBackend
    pretty: bool = False
    commands: QmpCommandList = attrs.field(default=qmp_cap_negotiation_commands)
    capab_offered: set = attrs.field(factory=set)
    capab: set = attrs.field(factory=set)
    qmp_requests: deque = attrs.field(factory=deque)
    suspend_cnt: int = 0
    parser: JSONMessageParser | None = None
    connected: bool = False

    def __repr__(self) -> str:
        label = self.chr.chr.label if self.chr.chr is not None else "?"
        return f"<MonitorQMP {label}>"


mon_list: list[MonitorQMP] = []
_cur_mon: Any = None


def monitor_cur() -> Any:
    """The monitor whose command is running (QEMU's monitor_cur), or None."""
    return _cur_mon


def monitor_set_cur(mon: Any) -> Any:
    """Make ``mon`` the current monitor; returns the previous one."""
    global _cur_mon
    old, _cur_mon = _cur_mon, mon
    return old


def qmp_oob_enabled(mon: MonitorQMP) -> bool:
    return QMP_CAPABILITY_OOB in mon.capab


def monitor_qmp_caps_reset(mon: MonitorQMP) -> None:
    mon.capab_offered = {QMP_CAPABILITY_OOB}
    mon.capab = set()


# ---------------------------------------------------------------------------
# Output


def monitor_puts(mon: MonitorQMP, text: str) -> None:
    """Write ``text``, every ``\\n`` as ``\\r\\n`` (monitor_puts)."""
    qemu_chr_fe_write_all(mon.chr, text.replace("\n", "\r\n").encode("utf-8", "surrogateescape"))


def qmp_send_response(mon: MonitorQMP, rsp: dict) -> None:
    """Send one reply or event as a line of JSON (pretty when the monitor asked for it)."""
    monitor_puts(mon, qobject_to_json_pretty(rsp, mon.pretty) + "\n")


def monitor_qmp_respond(mon: MonitorQMP, rsp: dict | None) -> None:
    if rsp is not None:
        qmp_send_response(mon, rsp)


def qmp_greeting(mon: MonitorQMP) -> dict:
    from qblock.qmp.qmp_cmds import qmp_query_version
    caps = [c for c in QMP_CAPABILITIES if c in mon.capab_offered]
    return {"QMP": {"version": qmp_query_version(), "capabilities": caps}}


# ---------------------------------------------------------------------------
# Input, suspension and the dispatcher


def monitor_can_read(mon: MonitorQMP) -> int:
    """One byte at a time unless suspended, as QEMU's monitor_can_read."""
    return 0 if mon.suspend_cnt else 1


def monitor_suspend(mon: MonitorQMP) -> None:
    mon.suspend_cnt += 1


def monitor_resume(mon: MonitorQMP) -> None:
    if mon.suspend_cnt > 0:
        mon.suspend_cnt -= 1
        if mon.suspend_cnt == 0:
            # Feed what the chardev kept back, from a BH as QEMU's monitor_accept_input.
            aio_bh_schedule_oneshot(qemu_get_aio_context(), lambda _: qemu_chr_fe_accept_input(mon.chr), None,
                                    "monitor_accept_input")


def monitor_qmp_read(mon: MonitorQMP, buf: bytes) -> None:
    mon.parser.feed(buf)


def monitor_qmp_dispatch(mon: MonitorQMP, req: Any) -> None:
    """Dispatch one request and send its reply; capability-mode errors get QEMU's better message."""
    rsp = qmp_dispatch(mon.commands, req, qmp_oob_enabled(mon), mon)
    if mon.commands is qmp_cap_negotiation_commands and rsp is not None:
        error = rsp.get("error")
        if error is not None and error.get("class") == QapiErrorClass.ERROR_CLASS_COMMAND_NOT_FOUND.value:
            error.pop("desc")
            error["desc"] = "Expecting capabilities negotiation with 'qmp_capabilities'"
    monitor_qmp_respond(mon, rsp)


def handle_qmp_command(mon: MonitorQMP, req: Any, err: Error | None) -> None:
    """A complete JSON value (or a parse error) arrived: run it now if out-of-band, else queue it."""
    if isinstance(req, dict) and qmp_is_oob(req):
        monitor_qmp_dispatch(mon, req)
        return
    # Without OOB one request at a time: stop reading until it has been handled.
    if not qmp_oob_enabled(mon) or len(mon.qmp_requests) == QMP_REQ_QUEUE_LEN_MAX - 1:
        monitor_suspend(mon)
    mon.qmp_requests.append(QMPRequest(mon, req, err))
    qmp_dispatcher_co_wake()


_dispatcher_co = None
_dispatcher_busy = False
_dispatcher_shutdown = False


def monitor_qmp_requests_pop_any() -> QMPRequest | None:
    """The next request, taking monitors round-robin (the served monitor goes to the end of mon_list)."""
    for mon in list(mon_list):
        if mon.qmp_requests:
            req = mon.qmp_requests.popleft()
            mon_list.remove(mon)
            mon_list.append(mon)
            return req
    return None


def monitor_qmp_dispatcher_co(opaque: Any) -> None:
    """The dispatcher coroutine: run queued requests, sleep when there are none."""
    global _dispatcher_busy, _dispatcher_co
    while True:
        _dispatcher_busy = False
        if _dispatcher_shutdown:
            break
        req_obj = monitor_qmp_requests_pop_any()
        if req_obj is None:
            qemu_coroutine_yield()
            continue
        _dispatcher_busy = True
        mon = req_obj.mon
        oob_enabled = qmp_oob_enabled(mon)
        if oob_enabled and len(mon.qmp_requests) == QMP_REQ_QUEUE_LEN_MAX - 1:
            monitor_resume(mon)
        if req_obj.req is not None or req_obj.err is None:
            monitor_qmp_dispatch(mon, req_obj.req)
        else:
            monitor_qmp_respond(mon, qmp_error_response(req_obj.err))
        if not oob_enabled:
            monitor_resume(mon)
    _dispatcher_co = None


def qmp_dispatcher_co_wake() -> None:
    """Wake the dispatcher if it sleeps; it runs from the main loop, never inside the caller."""
    global _dispatcher_busy
    if not _dispatcher_busy and _dispatcher_co is not None:
        _dispatcher_busy = True
        aio_co_schedule(qemu_get_aio_context(), _dispatcher_co)


def monitor_qmp_cleanup_queue_and_resume(mon: MonitorQMP) -> None:
    need_resume = (not qmp_oob_enabled(mon) or len(mon.qmp_requests) == QMP_REQ_QUEUE_LEN_MAX) \
        and bool(mon.qmp_requests)
    mon.qmp_requests.clear()
    if need_resume:
        monitor_resume(mon)


def _new_parser(mon: MonitorQMP) -> JSONMessageParser:
    return JSONMessageParser(lambda obj, err: handle_qmp_command(mon, obj, err))


def monitor_qmp_event(mon: MonitorQMP, event: QEMUChrEvent) -> None:
    if event is QEMUChrEvent.CHR_EVENT_OPENED:
        mon.commands = qmp_cap_negotiation_commands
        monitor_qmp_caps_reset(mon)
        mon.connected = True
        qmp_send_response(mon, qmp_greeting(mon))
    elif event is QEMUChrEvent.CHR_EVENT_CLOSED:
        mon.connected = False
        monitor_qmp_cleanup_queue_and_resume(mon)
        mon.parser = _new_parser(mon)


def monitor_init_qmp(chr, pretty: bool = False) -> MonitorQMP:
    """A QMP monitor on chardev ``chr`` (monitor_init_qmp)."""
    be = CharBackend()
    qemu_chr_fe_init(be, chr)
    mon = MonitorQMP(be, pretty)
    mon.parser = _new_parser(mon)
    monitor_qmp_caps_reset(mon)
    mon_list.append(mon)
    qemu_chr_fe_set_handlers(be, monitor_can_read, monitor_qmp_read, monitor_qmp_event, mon)
    return mon


def monitor_init(opts: dict[str, Any]) -> MonitorQMP:
    """``--monitor chardev=NAME[,mode=control][,pretty=on|off]`` (monitor_init for MonitorOptions)."""
    chardev = opts.get("chardev")
    if chardev is None:
        raise Error("Parameter 'chardev' is missing")
    mode = opts.get("mode", "control")
    if mode != "control":
        raise Error("Only QMP is supported")
    chr = qemu_chr_find(chardev)
    if chr is None:
        raise Error(f'chardev "{chardev}" not found')
    return monitor_init_qmp(chr, bool(opts.get("pretty", False)))


# ---------------------------------------------------------------------------
# Events (monitor_qapi_event_emit)


def monitor_qapi_event_emit(event: str, qdict: dict) -> None:
    """Send an event to every monitor in command mode."""
    for mon in list(mon_list):
        if mon.connected and mon.commands is qmp_commands:
            qmp_send_response(mon, qdict)


def _qapi_event_listener(name: str, data: dict, timestamp: dict) -> None:
    qdict: dict[str, Any] = {"timestamp": dict(timestamp), "event": name}
    if data:
        qdict["data"] = data
    if threading.current_thread() is threading.main_thread():
        monitor_qapi_event_emit(name, qdict)
    else:
        aio_bh_schedule_oneshot(qemu_get_aio_context(), lambda _: monitor_qapi_event_emit(name, qdict), None,
                                "monitor_qapi_event_emit")


_globals_done = False


def monitor_init_globals() -> None:
    """Register the commands, start the dispatcher coroutine and listen for events (once)."""
    global _globals_done, _dispatcher_co, _dispatcher_busy, _dispatcher_shutdown
    if _globals_done:
        return
    from qblock.qmp.qmp_marshal import monitor_init_qmp_commands
    monitor_init_qmp_commands()
    _dispatcher_shutdown = False
    _dispatcher_busy = True
    _dispatcher_co = qemu_coroutine_create(monitor_qmp_dispatcher_co, None)
    _dispatcher_co.waiting_on = "QMP requests (monitor_qmp_dispatcher_co)"
    aio_co_schedule(qemu_get_aio_context(), _dispatcher_co)
    qapi_event_add_listener(_qapi_event_listener)
    _globals_done = True


def monitor_cleanup() -> None:
    """Stop the dispatcher, flush and drop every monitor (at exit)."""
    global _globals_done, _dispatcher_shutdown, _dispatcher_co, _dispatcher_busy
    qapi_event_remove_listener(_qapi_event_listener)
    _dispatcher_shutdown = True
    if _dispatcher_co is not None and not _dispatcher_busy:
        _dispatcher_busy = True
        aio_co_schedule(qemu_get_aio_context(), _dispatcher_co)
        from qblock.util.aio import AIO_WAIT_WHILE
        AIO_WAIT_WHILE(None, lambda: _dispatcher_co is not None)
    for mon in list(mon_list):
        qemu_chr_fe_flush(mon.chr)
        mon_list.remove(mon)
        if mon.chr.chr is not None:
            mon.chr.chr.be = None
    _dispatcher_co = None
    _globals_done = False
