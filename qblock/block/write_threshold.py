"""Write threshold: QEMU's block/write-threshold.c as in the seed's era (a before-write notifier).

A management tool sets a threshold on a node; the first write (or discard)
that reaches past it sends the QMP event ``BLOCK_WRITE_THRESHOLD`` — node
name, amount exceeded, threshold — once, and the threshold disarms itself.

Later QEMU (6.1) calls ``bdrv_write_threshold_check_write`` directly from
``bdrv_co_write_req_prepare`` instead of a notifier; the behaviour is the same.
"""
from __future__ import annotations

from qblock.block.graph import BdrvTrackedRequest, BlockDriverState
from qblock.trace.events import trace_bdrv_write_threshold_exceeded
from qblock.util.notify import NotifierWithReturn, notifier_with_return_list_add, notifier_with_return_remove
from qblock.util.qapi_event import qapi_event_send

__all__ = ["bdrv_write_threshold_set", "bdrv_write_threshold_get", "bdrv_write_threshold_is_set",
           "bdrv_write_threshold_exceeded"]


def bdrv_write_threshold_is_set(bs: BlockDriverState) -> bool:
    return bs.write_threshold_offset > 0


def bdrv_write_threshold_get(bs: BlockDriverState) -> int:
    """The threshold in bytes, 0 when none is set."""
    return bs.write_threshold_offset


def bdrv_write_threshold_exceeded(bs: BlockDriverState, req: BdrvTrackedRequest) -> int:
    """How many bytes past the threshold a request reaches (0 if it stays below)."""
    if bdrv_write_threshold_is_set(bs):
        wtr = bs.write_threshold_offset
        if req.offset > wtr:
            return req.offset - wtr + req.bytes
        if req.offset + req.bytes > wtr:
            return req.offset + req.bytes - wtr
    return 0


def _write_threshold_disable(bs: BlockDriverState) -> None:
    if bs.write_threshold_notifier is not None:
        notifier_with_return_remove(bs.write_threshold_notifier)
        bs.write_threshold_notifier = None
    bs.write_threshold_offset = 0


def _before_write_notify(notifier: NotifierWithReturn, req: BdrvTrackedRequest) -> int:
    bs = req.bs
    amount = bdrv_write_threshold_exceeded(bs, req)
    if amount > 0:
        threshold = bs.write_threshold_offset
        if trace_bdrv_write_threshold_exceeded.event.enabled:
            trace_bdrv_write_threshold_exceeded(bs, amount, threshold)
        _write_threshold_disable(bs)
        qapi_event_send("BLOCK_WRITE_THRESHOLD",
                        {"node-name": bs.node_name, "amount-exceeded": amount, "write-threshold": threshold})
    return 0  # the write always proceeds


def bdrv_write_threshold_set(bs: BlockDriverState, threshold_bytes: int) -> None:
    """Arm (or move) the threshold; 0 disarms it."""
    if bdrv_write_threshold_is_set(bs):
        if threshold_bytes > 0:
            bs.write_threshold_offset = threshold_bytes
        else:
            _write_threshold_disable(bs)
    elif threshold_bytes > 0:
        bs.write_threshold_offset = threshold_bytes
        bs.write_threshold_notifier = NotifierWithReturn(_before_write_notify)
        notifier_with_return_list_add(bs.before_write_notifiers, bs.write_threshold_notifier)
