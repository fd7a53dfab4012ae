"""Monitor control commands: QEMU's monitor/qmp-cmds-control.c and monitor/qmp-cmds.c (the parts a storage daemon has).

``qmp_capabilities`` leaves negotiation mode (enabling ``oob`` if asked),
``query-version`` reports the QEMU version qblock follows (see
:data:`qblock.qmp.monitor.QBLOCK_QEMU_VERSION`) with ``package`` naming
qblock, ``query-commands`` lists the commands, ``quit`` asks the daemon's
main loop to stop (qemu-storage-daemon.c's qmp_quit sets ``exit_requested``).
"""
from __future__ import annotations

from typing import Any

from qblock.qmp.dispatch import QapiErrorClass, QMPError
from qblock.util.aio import aio_notify, qemu_get_aio_context
from qblock.util.error import Error

__all__ = ["qmp_qmp_capabilities", "qmp_query_version", "qmp_query_commands", "qmp_quit", "exit_requested",
           "qemu_exit_requested", "qemu_exit_request_reset"]

exit_requested = False


def qemu_exit_requested() -> bool:
    return exit_requested


def qemu_exit_request_reset() -> None:
    global exit_requested
    exit_requested = False


def qmp_qmp_capabilities(enable: list[str] | None = None) -> None:
    from qblock.qmp import monitor as m
    mon = m.monitor_cur()
    if mon is None or mon.commands is m.qmp_commands:
        raise QMPError(QapiErrorClass.ERROR_CLASS_COMMAND_NOT_FOUND,
                       "Capabilities negotiation is already complete, command ignored")
    caps = set()
    for cap in enable or []:
        if cap not in mon.capab_offered:
            raise Error(f"Capability '{cap}' not available")
        caps.add(cap)
    mon.capab = caps
    mon.commands = m.qmp_commands


def qmp_query_version() -> dict[str, Any]:
    from qblock import __version__ as qblock_version
    from qblock.qmp.monitor import QBLOCK_QEMU_VERSION
    major, minor, micro = QBLOCK_QEMU_VERSION
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": f"qblock {qblock_version}"}


def qmp_query_commands() -> list[dict[str, str]]:
    from qblock.qmp import monitor as m
    mon = m.monitor_cur()
    cmds = mon.commands if mon is not None else m.qmp_commands
    return [{"name": name} for name, cmd in cmds.commands.items() if cmd.enabled]


def qmp_quit() -> None:
    global exit_requested
    exit_requested = True
    aio_notify(qemu_get_aio_context())
