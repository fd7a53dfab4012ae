"""Block commands of the monitor: QEMU's blockdev.c (and block/write-threshold.c's QMP command).

* ``blockdev-add`` (:func:`qmp_blockdev_add`): the checked BlockdevOptions
  are flattened into dotted keys and opened with ``bdrv_open`` (QEMU's
  ``bds_tree_init``); the new node is owned by the monitor
  (``monitor_bdrv_states``) until ``blockdev-del``.
* ``blockdev-del`` (:func:`qmp_blockdev_del`) with QEMU's checks: the node
  exists, no BlockBackend uses it, the monitor owns it, nothing else holds a
  reference.
* ``block_set_io_throttle`` (:func:`qmp_block_set_io_throttle`, the work is
  qblock.block.throttle_groups'), ``block-set-write-threshold``,
  ``block-latency-histogram-set``, ``x-debug-query-block-graph``.
* :func:`qmp_get_blk` finds a BlockBackend by name or by its device's id,
  with QEMU's DeviceNotFound errors; :func:`blockdev_close_all_bdrv_states`
  drops the monitor's nodes at exit (from QEMU's bdrv_close_all).

Left out: drive_add/-drive, transactions, jobs (backup, mirror, commit,
stream), snapshots, blockdev-reopen, block_resize, dirty bitmaps.
"""
from __future__ import annotations

from typing import Any

from qblock.block.block_backend import BlockBackend, blk_all_next, blk_by_name, blk_get_stats
from qblock.block.accounting import BlockAcctType, block_latency_histogram_clear, block_latency_histogram_set
from qblock.block.driver import BDRV_O_RDWR
from qblock.block.graph import (
    BlockDriverState,
    bdrv_find_node,
    bdrv_get_device_or_node_name,
    bdrv_get_xdbg_block_graph,
    bdrv_open,
    bdrv_unref,
)
from qblock.block.write_threshold import bdrv_write_threshold_set
from qblock.qmp.dispatch import QapiErrorClass, QMPError
from qblock.util.error import Error
from qblock.util.qemu_option import qdict_flatten

__all__ = ["monitor_bdrv_states", "bds_tree_init", "bdrv_set_monitor_owned", "qmp_blockdev_add",
           "qmp_blockdev_del", "blockdev_close_all_bdrv_states", "qmp_get_blk", "qmp_block_set_io_throttle",
           "qmp_block_set_write_threshold", "qmp_block_latency_histogram_set", "qmp_x_debug_query_block_graph",
           "bdrv_has_blk"]

_UINT64_MASK = (1 << 64) - 1

monitor_bdrv_states: list[BlockDriverState] = []   # nodes created by blockdev-add, owned by the monitor


def bdrv_set_monitor_owned(bs: BlockDriverState) -> None:
    monitor_bdrv_states.append(bs)


def bdrv_has_blk(bs: BlockDriverState) -> bool:
    """Is ``bs`` the root of some BlockBackend?"""
    return any(not c.klass.parent_is_bds for c in bs.parents)


def bds_tree_init(bs_opts: dict[str, Any]) -> BlockDriverState:
    """Open a node tree from flattened blockdev-add options (read-write unless ``read-only``)."""
    read_only = bs_opts.get("read-only") in (True, "on")
    return bdrv_open(None, None, bs_opts, 0 if read_only else BDRV_O_RDWR)


def qmp_blockdev_add(options: dict[str, Any]) -> None:
    """blockdev-add: ``options`` is a checked BlockdevOptions (nested dicts)."""
    qdict = qdict_flatten(options)
    # "backing": null means no backing file; qblock's open takes that as an empty reference.
    for key, value in list(qdict.items()):
        if value is None and (key == "backing" or key.endswith(".backing")):
            qdict[key] = ""
    if not qdict.get("node-name"):
        raise Error("'node-name' must be specified for the root node")
    bs = bds_tree_init(qdict)
    bdrv_set_monitor_owned(bs)


def qmp_blockdev_del(node_name: str) -> None:
    bs = bdrv_find_node(node_name)
    if bs is None:
        raise Error(f"Failed to find node with node-name='{node_name}'")
    if bdrv_has_blk(bs):
        raise Error(f"Node {node_name} is in use")
    if bs not in monitor_bdrv_states:
        raise Error(f"Node {bs.node_name} is not owned by the monitor")
    if bs.refcnt > 1:
        raise Error(f"Block device {bdrv_get_device_or_node_name(bs)} is in use")
    monitor_bdrv_states.remove(bs)
    bdrv_unref(bs)


def blockdev_close_all_bdrv_states() -> None:
    """Drop the monitor's reference on every node it owns (at exit)."""
    for bs in list(monitor_bdrv_states):
        monitor_bdrv_states.remove(bs)
        bdrv_unref(bs)


def _blk_by_qdev_id(id: str) -> BlockBackend:
    blk = blk_all_next(None)
    while blk is not None:
        if blk.dev is not None and getattr(blk.dev, "id", None) == id:
            return blk
        blk = blk_all_next(blk)
    raise QMPError(QapiErrorClass.ERROR_CLASS_DEVICE_NOT_FOUND, f"Device '{id}' not found")


def qmp_get_blk(blk_name: str | None, qdev_id: str | None) -> BlockBackend:
    """The BlockBackend named ``blk_name``, or the one of the device ``qdev_id`` (blockdev.c)."""
    if (blk_name is None) == (qdev_id is None):
        raise Error("Need exactly one of 'device' and 'id'")
    if qdev_id is not None:
        return _blk_by_qdev_id(qdev_id)
    blk = blk_by_name(blk_name)
    if blk is None:
        raise QMPError(QapiErrorClass.ERROR_CLASS_DEVICE_NOT_FOUND, f"Device '{blk_name}' not found")
    return blk


def qmp_block_set_io_throttle(arg: dict[str, Any]) -> None:
    """block_set_io_throttle (boxed BlockIOThrottle)."""
    from qblock.block.throttle_groups import qmp_block_set_io_throttle as _set
    qmp_get_blk(arg.get("device"), arg.get("id"))  # QEMU's DeviceNotFound before anything else
    _set(**{k: v for k, v in arg.items()})


def qmp_block_set_write_threshold(node_name: str, write_threshold: int) -> None:
    """block-set-write-threshold (block/write-threshold.c); 0 disarms."""
    bs = bdrv_find_node(node_name)
    if bs is None:
        raise Error(f"Device '{node_name}' not found")
    bdrv_write_threshold_set(bs, write_threshold & _UINT64_MASK)


def qmp_block_latency_histogram_set(id: str, boundaries: list[int] | None = None,
                                    boundaries_read: list[int] | None = None,
                                    boundaries_write: list[int] | None = None,
                                    boundaries_flush: list[int] | None = None) -> None:
    """Set (or, without boundaries, clear) the latency histograms of a device's BlockBackend."""
    blk = qmp_get_blk(None, id)
    stats = blk_get_stats(blk)
    if boundaries is None and boundaries_read is None and boundaries_write is None and boundaries_flush is None:
        block_latency_histogram_clear(stats)
        return
    for specific, type_, what in ((boundaries_read, BlockAcctType.BLOCK_ACCT_READ, "read"),
                                  (boundaries_write, BlockAcctType.BLOCK_ACCT_WRITE, "write"),
                                  (boundaries_flush, BlockAcctType.BLOCK_ACCT_FLUSH, "flush")):
        chosen = specific if specific is not None else boundaries
        if chosen is not None:
            if block_latency_histogram_set(stats, type_, chosen) < 0:
                raise Error(f"Device '{id}' set {what} boundaries fail")


def qmp_x_debug_query_block_graph() -> dict[str, Any]:
    """The whole graph (qblock.block.graph's twin), in the order QEMU 7.2 lists it.

    QEMU builds every list by prepending, so nodes, edges and permission names come
    newest (or highest bit) first; its BlockPermission has no graph-mod (gone in 6.2).
    """
    graph = bdrv_get_xdbg_block_graph()
    for e in graph["edges"]:
        e["perm"] = [p for p in reversed(e["perm"]) if p != "graph-mod"]
        e["shared-perm"] = [p for p in reversed(e["shared-perm"]) if p != "graph-mod"]
    return {"nodes": list(reversed(graph["nodes"])), "edges": list(reversed(graph["edges"]))}
