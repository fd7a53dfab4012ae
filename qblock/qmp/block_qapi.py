"""What the block layer tells QMP: QEMU's block/qapi.c (and block.c's bdrv_named_nodes_list).

``query-named-block-nodes`` (:func:`qmp_query_named_block_nodes`, one
:func:`bdrv_block_device_info` per named node, newest first as QEMU's list
prepends), ``query-block`` (:func:`qmp_query_block`, one
:func:`bdrv_query_info` per BlockBackend that has a name or a device) and
``query-blockstats`` (:func:`qmp_query_blockstats`: per BlockBackend, with
the node chain below it, or per node with ``query-nodes``).  Replies are
built member by member in the schema's order, as QEMU's output visitor does.

``bdrv_get_allocated_file_size`` (block.c) lives here: protocol drivers
answer it themselves, filters ask their filtered child, formats sum their
children.

Left out: snapshots, dirty bitmaps, ``format-specific`` image information
and ``driver-specific`` statistics unless a driver has the
``bdrv_get_specific_info`` / ``bdrv_get_specific_stats`` hooks (qblock's
drivers do not yet), timed statistics (``timed_stats`` is always empty),
implicit nodes (qblock creates none).
"""
from __future__ import annotations

import errno
from typing import Any

from qblock.block.accounting import block_acct_query
from qblock.block.block_backend import (
    BlockBackend,
    blk_all_next,
    blk_bs,
    blk_enable_write_cache,
    blk_iostatus,
    blk_iostatus_is_enabled,
    blk_name,
)
from qblock.block.driver import BDRV_O_NO_FLUSH, BDRV_O_NOCACHE, BlockDriverInfo
from qblock.block.graph import (
    BDRV_CHILD_DATA,
    BDRV_CHILD_FILTERED,
    BDRV_CHILD_METADATA,
    BlockDriverState,
    bdrv_filter_bs,
    bdrv_get_format_name,
    bdrv_get_full_backing_filename,
    bdrv_get_info,
    bdrv_getlength,
    bdrv_is_read_only,
    bdrv_next_node,
    graph_bdrv_states,
)
from qblock.block.throttle_groups import throttle_group_get_config, throttle_group_get_name
from qblock.block.write_threshold import bdrv_write_threshold_get
from qblock.util.error import error_setg_errno
from qblock.util.throttle import (
    THROTTLE_BPS_READ,
    THROTTLE_BPS_TOTAL,
    THROTTLE_BPS_WRITE,
    THROTTLE_OPS_READ,
    THROTTLE_OPS_TOTAL,
    THROTTLE_OPS_WRITE,
)

__all__ = ["bdrv_block_device_info", "bdrv_query_image_info", "bdrv_query_info", "bdrv_query_bds_stats",
           "bdrv_query_blk_stats", "bdrv_named_nodes_list", "bdrv_get_allocated_file_size",
           "qmp_query_block", "qmp_query_named_block_nodes", "qmp_query_blockstats", "int64_of_uint64"]

_INT64_MAX = (1 << 63) - 1


def int64_of_uint64(value: int) -> int:
    """A uint64 QEMU stores and reports through an ``int`` member (it comes out negative past INT64_MAX)."""
    return value - (1 << 64) if value > _INT64_MAX else value


def bdrv_get_allocated_file_size(bs: BlockDriverState) -> int:
    """Bytes the image takes on the host, or a negative errno (block.c)."""
    drv = bs.drv
    if drv is None:
        return -errno.ENOMEDIUM
    if drv.bdrv_get_allocated_file_size is not None:
        return drv.bdrv_get_allocated_file_size(bs)
    if drv.bdrv_file_open is not None:
        return -errno.ENOTSUP  # a protocol's data is not in its children
    if drv.is_filter:
        child = bdrv_filter_bs(bs)
        return bdrv_get_allocated_file_size(child) if child is not None else -errno.ENOTSUP
    # bdrv_sum_allocated_file_size: every child storing data or metadata, each node counted once
    total, seen = 0, set()
    for c in bs.children:
        if c.role & (BDRV_CHILD_DATA | BDRV_CHILD_METADATA) and id(c.bs) not in seen:
            seen.add(id(c.bs))
            size = bdrv_get_allocated_file_size(c.bs)
            if size < 0:
                return size
            total += size
    return total


def _filter_or_cow_bs(bs: BlockDriverState) -> BlockDriverState | None:
    """bdrv_filter_or_cow_bs: the backing file, or the node a filter filters."""
    if bs.backing is not None:
        return bs.backing.bs
    return bdrv_filter_bs(bs)


def bdrv_query_image_info(bs: BlockDriverState) -> dict[str, Any]:
    """ImageInfo of one node, without its backing chain (the caller links ``backing-image``)."""
    size = bdrv_getlength(bs)
    if size < 0:
        raise error_setg_errno(-size, f"Can't get image size '{bs.exact_filename}'")
    info: dict[str, Any] = {"filename": bs.filename, "format": bdrv_get_format_name(bs)}
    bdi = BlockDriverInfo()
    have_bdi = bdrv_get_info(bs, bdi) >= 0
    if have_bdi:
        info["dirty-flag"] = bool(bdi.is_dirty)
    actual = bdrv_get_allocated_file_size(bs)
    if actual >= 0:
        info["actual-size"] = actual
    info["virtual-size"] = size
    if have_bdi and bdi.cluster_size:
        info["cluster-size"] = bdi.cluster_size
    if bs.encrypted:
        info["encrypted"] = True
    if bs.backing_file:
        info["backing-filename"] = bs.backing_file
        full = bdrv_get_full_backing_filename(bs)
        if full and full != bs.backing_file:
            info["full-backing-filename"] = full
        if bs.backing_format:
            info["backing-filename-format"] = bs.backing_format
    hook = getattr(bs.drv, "bdrv_get_specific_info", None) if bs.drv is not None else None
    if hook is not None:
        specific = hook(bs)
        if specific is not None:
            info["format-specific"] = specific
    return info


def bdrv_block_device_info(blk: BlockBackend | None, bs: BlockDriverState, flat: bool) -> dict[str, Any]:
    """BlockDeviceInfo of ``bs`` (throttling from ``blk`` when given); ``flat`` leaves out backing images."""
    info: dict[str, Any] = {"file": bs.filename}
    if bs.node_name:
        info["node-name"] = bs.node_name
    info["ro"] = bdrv_is_read_only(bs)
    info["drv"] = bs.drv.format_name
    if bs.backing_file:
        info["backing_file"] = bs.backing_file
    info["backing_file_depth"] = 0
    info["encrypted"] = bs.encrypted
    info["detect_zeroes"] = bs.detect_zeroes.value
    tgm = blk.public.throttle_group_member if blk is not None else None
    throttled = tgm is not None and tgm.throttle_state is not None
    cfg = throttle_group_get_config(tgm) if throttled else None
    for key, bucket in (("bps", THROTTLE_BPS_TOTAL), ("bps_rd", THROTTLE_BPS_READ), ("bps_wr", THROTTLE_BPS_WRITE),
                        ("iops", THROTTLE_OPS_TOTAL), ("iops_rd", THROTTLE_OPS_READ),
                        ("iops_wr", THROTTLE_OPS_WRITE)):
        info[key] = int(cfg.buckets[bucket].avg) if cfg is not None else 0

    # The image and, unless flat, the chain of backing (or filtered) images below it.
    image = bdrv_query_image_info(bs)
    info["image"] = image
    bs0 = bs
    while not flat:
        nxt = _filter_or_cow_bs(bs0) if bs0.drv is not None else None
        if nxt is None:
            break
        info["backing_file_depth"] += 1
        bs0 = nxt
        image["backing-image"] = bdrv_query_image_info(bs0)
        image = image["backing-image"]

    if cfg is not None:
        for key, bucket in (("bps", THROTTLE_BPS_TOTAL), ("bps_rd", THROTTLE_BPS_READ),
                            ("bps_wr", THROTTLE_BPS_WRITE), ("iops", THROTTLE_OPS_TOTAL),
                            ("iops_rd", THROTTLE_OPS_READ), ("iops_wr", THROTTLE_OPS_WRITE)):
            if cfg.buckets[bucket].max:
                info[f"{key}_max"] = int(cfg.buckets[bucket].max)
        for key, bucket in (("bps", THROTTLE_BPS_TOTAL), ("bps_rd", THROTTLE_BPS_READ),
                            ("bps_wr", THROTTLE_BPS_WRITE), ("iops", THROTTLE_OPS_TOTAL),
                            ("iops_rd", THROTTLE_OPS_READ), ("iops_wr", THROTTLE_OPS_WRITE)):
            if cfg.buckets[bucket].max:
                info[f"{key}_max_length"] = int(cfg.buckets[bucket].burst_length)
        if cfg.op_size:
            info["iops_size"] = int(cfg.op_size)
        info["group"] = throttle_group_get_name(tgm)
    info["cache"] = {
        "writeback": blk_enable_write_cache(blk) if blk is not None else True,
        "direct": bool(bs.open_flags & BDRV_O_NOCACHE),
        "no-flush": bool(bs.open_flags & BDRV_O_NO_FLUSH),
    }
    info["write_threshold"] = int64_of_uint64(bdrv_write_threshold_get(bs))
    return info


def bdrv_named_nodes_list(flat: bool) -> list[dict[str, Any]]:
    """BlockDeviceInfo of every named node, newest first (block.c: the list is built by prepending)."""
    out: list[dict[str, Any]] = []
    for bs in list(graph_bdrv_states):
        out.insert(0, bdrv_block_device_info(None, bs, flat))
    return out


def qmp_query_named_block_nodes(flat: bool = False) -> list[dict[str, Any]]:
    return bdrv_named_nodes_list(flat)


def _blk_get_attached_dev_id(blk: BlockBackend) -> str:
    dev = blk.dev
    if dev is None:
        return ""
    return str(getattr(dev, "id", None) or "")


def _blk_has_device_or_name(blk: BlockBackend) -> bool:
    return bool(blk_name(blk)) or blk.dev is not None


def bdrv_query_info(blk: BlockBackend) -> dict[str, Any]:
    """BlockInfo of one BlockBackend."""
    ops, opaque = blk.dev_ops, blk.dev_opaque
    removable = ops is not None and ops.change_media_cb is not None
    info: dict[str, Any] = {"device": blk_name(blk)}
    qdev = _blk_get_attached_dev_id(blk)
    if qdev:
        info["qdev"] = qdev
    info["type"] = "unknown"
    info["removable"] = removable
    info["locked"] = bool(ops is not None and ops.is_medium_locked is not None and ops.is_medium_locked(opaque))
    bs = blk_bs(blk)
    if bs is not None and bs.drv is not None:
        info["inserted"] = bdrv_block_device_info(blk, bs, False)
    if ops is not None and ops.is_tray_open is not None:
        info["tray_open"] = bool(ops.is_tray_open(opaque))
    if blk_iostatus_is_enabled(blk):
        info["io-status"] = blk_iostatus(blk).value
    return info


def qmp_query_block() -> list[dict[str, Any]]:
    out = []
    blk = blk_all_next(None)
    while blk is not None:
        if _blk_has_device_or_name(blk):
            out.append(bdrv_query_info(blk))
        blk = blk_all_next(blk)
    return out


def _empty_stats() -> dict[str, Any]:
    """BlockDeviceStats all zero, as a node-level entry has them (QEMU allocates it zeroed)."""
    from qblock.block.accounting import BlockAcctStats
    stats = block_acct_query(BlockAcctStats())
    stats["account_invalid"] = False
    stats["account_failed"] = False
    return stats


def _primary_data_child(bs: BlockDriverState):
    """The child bdrv_query_bds_stats reports as ``parent``: the primary child if it holds data, else the only data child."""
    primary = bs.file if bs.file is not None else None
    if primary is not None and primary.role & (BDRV_CHILD_DATA | BDRV_CHILD_FILTERED):
        return primary
    found = None
    for c in bs.children:
        if c.role & (BDRV_CHILD_DATA | BDRV_CHILD_FILTERED):
            if found is not None:
                return None
            found = c
    return found


def bdrv_query_bds_stats(bs: BlockDriverState | None, blk_level: bool) -> dict[str, Any]:
    """BlockStats of a node: its name, highest write offset, and its data child as ``parent``."""
    s: dict[str, Any] = {}
    stats = _empty_stats()
    if bs is None:
        s["stats"] = stats
        return s
    if bs.node_name:
        s["node-name"] = bs.node_name
    stats["wr_highest_offset"] = bs.wr_highest_offset
    s["stats"] = stats
    hook = getattr(bs.drv, "bdrv_get_specific_stats", None) if bs.drv is not None else None
    if hook is not None:
        specific = hook(bs)
        if specific is not None:
            s["driver-specific"] = specific
    c = _primary_data_child(bs)
    if c is not None:
        s["parent"] = bdrv_query_bds_stats(c.bs, blk_level)
    if blk_level and bs.backing is not None:
        s["backing"] = bdrv_query_bds_stats(bs.backing.bs, blk_level)
    return s


def bdrv_query_blk_stats(s: dict[str, Any], blk: BlockBackend) -> None:
    """Fill ``s["stats"]`` from the BlockBackend's accounting."""
    s["stats"] = block_acct_query(blk.stats, s["stats"]["wr_highest_offset"])


def qmp_query_blockstats(query_nodes: bool = False) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if query_nodes:
        bs = bdrv_next_node(None)
        while bs is not None:
            out.append(bdrv_query_bds_stats(bs, False))
            bs = bdrv_next_node(bs)
        return out
    blk = blk_all_next(None)
    while blk is not None:
        if _blk_has_device_or_name(blk):
            s = bdrv_query_bds_stats(blk_bs(blk), True)
            s = {"device": blk_name(blk), **s}
            qdev = _blk_get_attached_dev_id(blk)
            if qdev:
                s["qdev"] = qdev
            bdrv_query_blk_stats(s, blk)
            out.append(s)
        blk = blk_all_next(blk)
    return out
