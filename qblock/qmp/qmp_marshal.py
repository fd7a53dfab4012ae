"""Which function runs which command: QEMU's generated qapi-init-commands.c (qmp_init_marshal) and monitor_init_qmp_commands.

Argument types, ``boxed`` and out-of-band permission come from the
declarations in :mod:`qblock.qmp.qapi_schema`.
"""
from __future__ import annotations

from qblock.qmp import block_export_cmds, block_qapi, blockdev, qmp_cmds, qom_cmds
from qblock.qmp.dispatch import QmpCommandList, QmpCommandOptions, qmp_register_command

__all__ = ["qmp_init_marshal", "monitor_init_qmp_commands", "QMP_COMMAND_FUNCTIONS"]

QMP_COMMAND_FUNCTIONS = {
    "qmp_capabilities": qmp_cmds.qmp_qmp_capabilities,
    "query-version": qmp_cmds.qmp_query_version,
    "query-commands": qmp_cmds.qmp_query_commands,
    "quit": qmp_cmds.qmp_quit,
    "blockdev-add": blockdev.qmp_blockdev_add,
    "blockdev-del": blockdev.qmp_blockdev_del,
    "query-block": block_qapi.qmp_query_block,
    "query-named-block-nodes": block_qapi.qmp_query_named_block_nodes,
    "query-blockstats": block_qapi.qmp_query_blockstats,
    "block_set_io_throttle": blockdev.qmp_block_set_io_throttle,
    "block-set-write-threshold": blockdev.qmp_block_set_write_threshold,
    "block-latency-histogram-set": blockdev.qmp_block_latency_histogram_set,
    "x-debug-query-block-graph": blockdev.qmp_x_debug_query_block_graph,
    "nbd-server-start": block_export_cmds.qmp_nbd_server_start,
    "nbd-server-stop": block_export_cmds.qmp_nbd_server_stop,
    "block-export-add": block_export_cmds.qmp_block_export_add,
    "block-export-del": block_export_cmds.qmp_block_export_del,
    "query-block-exports": block_export_cmds.qmp_query_block_exports,
    "object-add": qom_cmds.qmp_object_add,
    "object-del": qom_cmds.qmp_object_del,
}


def qmp_init_marshal(cmds: QmpCommandList) -> None:
    """Register every command qblock implements in ``cmds``."""
    for name, fn in QMP_COMMAND_FUNCTIONS.items():
        qmp_register_command(cmds, name, fn)


def monitor_init_qmp_commands() -> None:
    """Fill the command-mode table and the negotiation-mode table (only qmp_capabilities)."""
    from qblock.qmp.monitor import qmp_cap_negotiation_commands, qmp_commands
    qmp_commands.commands.clear()
    qmp_init_marshal(qmp_commands)
    qmp_cap_negotiation_commands.commands.clear()
    qmp_register_command(qmp_cap_negotiation_commands, "qmp_capabilities", qmp_cmds.qmp_qmp_capabilities,
                         QmpCommandOptions.QCO_ALLOW_PRECONFIG)
