"""The QMP command table and dispatcher: QEMU's qapi/qmp-registry.c and qapi/qmp-dispatch.c.

A :class:`QmpCommandList` maps names to :class:`QmpCommand` (the function,
its QAPI argument type, and QEMU's option flags).  :func:`qmp_dispatch`
checks a request the way QEMU 7.2 does (``execute``/``exec-oob``/
``arguments``/``id`` members, the command's availability, out-of-band use),
visits the arguments against the schema (:mod:`qblock.qmp.qapi_visit`),
calls the command and builds the reply: ``{"return": ...}`` or
``{"error": {"class": ..., "desc": ...}}``, with ``id`` copied from the
request.

A command function takes keyword arguments named after the QAPI members
(``-`` becomes ``_``; absent optional members are not passed), or, for a
``boxed`` command, the whole checked argument dict.  It raises
:class:`qblock.util.error.Error` (class ``GenericError``) or
:class:`QMPError` with another class, and returns the reply's value (None
for ``{}``).

Coroutines, as QEMU 7.2: the monitor dispatches in a coroutine; a command
not marked ``coroutine`` then runs in a bottom half of the main AioContext,
outside coroutine context, while the dispatcher coroutine waits — so it may
drain and poll as QEMU's non-coroutine commands do.  Called outside a
coroutine (tests), the command simply runs.  Left out: preconfig state,
disabled commands, QCO_NO_SUCCESS_RESP.
"""
from __future__ import annotations

import enum
from typing import Any, Callable

import attrs

from qblock.qmp.qapi_schema import COMMANDS
from qblock.qmp.qapi_visit import visit_type
from qblock.util.aio import aio_bh_schedule_oneshot, aio_co_wake, qemu_get_aio_context
from qblock.util.coroutine import qemu_coroutine_self, qemu_coroutine_yield, qemu_in_coroutine
from qblock.util.error import Error

__all__ = ["QapiErrorClass", "QMPError", "QmpCommandOptions", "QmpCommand", "QmpCommandList",
           "qmp_register_command", "qmp_unregister_command", "qmp_find_command", "qmp_for_each_command",
           "qmp_dispatch", "qmp_dispatch_check_obj", "qmp_is_oob", "qmp_error_response",
           "qmp_build_error_object"]


class QapiErrorClass(enum.Enum):
    """QMP's error classes (qapi/error.json)."""

    ERROR_CLASS_GENERIC_ERROR = "GenericError"
    ERROR_CLASS_COMMAND_NOT_FOUND = "CommandNotFound"
    ERROR_CLASS_DEVICE_NOT_ACTIVE = "DeviceNotActive"
    ERROR_CLASS_DEVICE_NOT_FOUND = "DeviceNotFound"
    ERROR_CLASS_KVM_MISSING_CAP = "KVMMissingCap"


class QMPError(Error):
    """An Error with a class other than GenericError (QEMU's error_set with an ErrorClass)."""

    def __init__(self, error_class: QapiErrorClass, msg: str):
        super().__init__(msg)
        self.error_class = error_class


def error_get_class(err: Error) -> QapiErrorClass:
    return getattr(err, "error_class", QapiErrorClass.ERROR_CLASS_GENERIC_ERROR)


class QmpCommandOptions(enum.IntFlag):
    QCO_NO_OPTIONS = 0
    QCO_NO_SUCCESS_RESP = 1 << 0
    QCO_ALLOW_OOB = 1 << 1
    QCO_ALLOW_PRECONFIG = 1 << 2
    QCO_COROUTINE = 1 << 3


@attrs.define(eq=False)
class QmpCommand:
    """One command (QEMU's QmpCommand): name, function, argument type, options."""

    name: str
    fn: Callable[..., Any]
    arg_type: str | None = None
    boxed: bool = False
    options: QmpCommandOptions = QmpCommandOptions.QCO_NO_OPTIONS
    enabled: bool = True


@attrs.define(eq=False)
class QmpCommandList:
    """A table of commands (QEMU's QmpCommandList), in registration order."""

    commands: dict[str, QmpCommand] = attrs.field(factory=dict)


def qmp_register_command(cmds: QmpCommandList, name: str, fn: Callable[..., Any],
                         options: QmpCommandOptions = QmpCommandOptions.QCO_NO_OPTIONS,
                         arg_type: str | None = None, boxed: bool | None = None) -> QmpCommand:
    """Add ``name`` to ``cmds``; argument type and flags default to the schema's declaration."""
    decl = COMMANDS.get(name)
    if decl is not None:
        arg_type = arg_type if arg_type is not None else decl.data
        boxed = decl.boxed if boxed is None else boxed
        if decl.allow_oob:
            options |= QmpCommandOptions.QCO_ALLOW_OOB
        if decl.coroutine:
            options |= QmpCommandOptions.QCO_COROUTINE
    cmd = QmpCommand(name, fn, arg_type, bool(boxed), options)
    cmds.commands[name] = cmd
    return cmd


def qmp_unregister_command(cmds: QmpCommandList, name: str) -> None:
    cmds.commands.pop(name, None)


def qmp_find_command(cmds: QmpCommandList, name: str) -> QmpCommand | None:
    return cmds.commands.get(name)


def qmp_for_each_command(cmds: QmpCommandList, fn: Callable[[QmpCommand, Any], None], opaque: Any) -> None:
    for cmd in list(cmds.commands.values()):
        fn(cmd, opaque)


def qmp_dispatch_check_obj(request: Any, allow_oob: bool) -> dict:
    """The request as a dict, if its members are the ones QMP allows; raises Error otherwise."""
    if not isinstance(request, dict):
        raise Error("QMP input must be a JSON object")
    exec_key = None
    for arg_name, arg_obj in request.items():
        if arg_name == "execute" or (arg_name == "exec-oob" and allow_oob):
            if not isinstance(arg_obj, str):
                raise Error(f"QMP input member '{arg_name}' must be a string")
            if exec_key is not None:
                raise Error(f"QMP input member '{arg_name}' clashes with '{exec_key}'")
            exec_key = arg_name
        elif arg_name == "arguments":
            if not isinstance(arg_obj, dict):
                raise Error("QMP input member 'arguments' must be an object")
        elif arg_name == "id":
            continue
        else:
            raise Error(f"QMP input member '{arg_name}' is unexpected")
    if exec_key is None:
        raise Error("QMP input lacks member 'execute'")
    return request


def qmp_is_oob(request: dict) -> bool:
    """Does ``request`` ask to run out of band?"""
    return "exec-oob" in request and "execute" not in request


def qmp_build_error_object(err: Error) -> dict:
    return {"class": error_get_class(err).value, "desc": err.msg}


def qmp_error_response(err: Error) -> dict:
    return {"error": qmp_build_error_object(err)}


def _call(cmd: QmpCommand, args: dict) -> Any:
    """Check the arguments and run the command; a Python exception (a bug) becomes a GenericError.

    QEMU would abort on such a bug; a reply keeps the monitor (and its dispatcher coroutine) alive.
    """
    try:
        return _call_checked(cmd, args)
    except Error:
        raise
    except Exception as e:  # noqa: BLE001 - reported to the client and on stderr
        import sys
        import traceback
        traceback.print_exc(file=sys.stderr)
        raise Error(f"qblock: internal error in {cmd.name}: {e!r}") from e


def _call_checked(cmd: QmpCommand, args: dict) -> Any:
    if cmd.arg_type is not None:
        checked = visit_type(cmd.arg_type, args)
    elif args:
        raise Error(f"Parameter '{next(iter(args))}' is unexpected")
    else:
        checked = {}
    if cmd.boxed:
        return cmd.fn(checked)
    return cmd.fn(**{k.replace("-", "_"): v for k, v in checked.items()})


def _run_in_bh(cmd: QmpCommand, args: dict) -> Any:
    """Run a non-coroutine command from a BH in the main loop while this coroutine waits (QEMU 7.2)."""
    co = qemu_coroutine_self()
    result: list[Any] = []

    def do_qmp_dispatch_bh(opaque: Any) -> None:
        try:
            result.append((True, _call(cmd, args)))
        except Error as e:
            result.append((False, e))
        aio_co_wake(co)

    aio_bh_schedule_oneshot(qemu_get_aio_context(), do_qmp_dispatch_bh, None, "do_qmp_dispatch_bh")
    co.waiting_on = f"QMP command {cmd.name} (do_qmp_dispatch_bh)"
    qemu_coroutine_yield()
    ok, value = result[0]
    if not ok:
        raise value
    return value


def qmp_dispatch(cmds: QmpCommandList, request: Any, allow_oob: bool = False, cur_mon: Any = None) -> dict | None:
    """Run one request; the reply dict (``return`` or ``error``, and ``id`` when the request had one)."""
    rsp: dict | None = None
    id_present = isinstance(request, dict) and "id" in request
    id_value = request["id"] if id_present else None
    try:
        d = qmp_dispatch_check_obj(request, allow_oob)
        command = d.get("execute")
        oob = command is None
        if oob:
            command = d["exec-oob"]
        cmd = qmp_find_command(cmds, command)
        if cmd is None:
            raise QMPError(QapiErrorClass.ERROR_CLASS_COMMAND_NOT_FOUND, f"The command {command} has not been found")
        if not cmd.enabled:
            raise Error(f"Command {command} has been disabled")
        if oob and not cmd.options & QmpCommandOptions.QCO_ALLOW_OOB:
            raise Error(f"The command {command} does not support OOB")
        args = d.get("arguments", {})
        from qblock.qmp import monitor as _monitor
        saved = _monitor.monitor_set_cur(cur_mon)
        try:
            if qemu_in_coroutine() and not cmd.options & QmpCommandOptions.QCO_COROUTINE:
                ret = _run_in_bh(cmd, args)
            else:
                ret = _call(cmd, args)
        finally:
            _monitor.monitor_set_cur(saved)
        if cmd.options & QmpCommandOptions.QCO_NO_SUCCESS_RESP:
            return None
        rsp = {"return": {} if ret is None else ret}
    except Error as err:
        rsp = qmp_error_response(err)
    if id_present:
        rsp["id"] = id_value
    return rsp
