"""The BlockBackend: QEMU's block/block-backend.c, the device-facing half of the block layer.

A device holds a :class:`BlockBackend` and calls ``blk_*``; the BlockBackend
holds the ``root`` edge to the top node.  The write path is the seed's::

    blk_aio_pwritev(blk, offset, qiov, flags, cb, opaque)
      blk_aio_prwv            AIOCB + coroutine, entered with bdrv_coroutine_enter
        blk_aio_write_entry
          blk_co_do_pwritev   (the seed's blk_co_pwritev body; QEMU 5.0+ splits it out)
            blk_wait_while_drained
            blk_check_byte_request          -ENOMEDIUM, -EIO beyond the end
            throttle_group_co_io_limits_intercept   only when limits are set
            BDRV_REQ_FUA when the write cache is off
            bdrv_co_pwritev(blk->root, ...)
          blk_aio_complete    the callback runs only once blk_aio_prwv returned:
                              if the coroutine finished first, a one-shot BH
                              (blk_aio_complete_bh) runs it

Also: synchronous wrappers, drain (requests queue while drained and resume
afterwards), device ops (media change, resize, drained begin/end),
``werror``/``rerror`` policies with ``blk_get_error_action`` and
``blk_error_action`` (BLOCK_IO_ERROR events, VM stop), iostatus, limits,
plugging, names, permissions and AioContexts.
"""
from __future__ import annotations

import enum
import errno
from typing import Any, Callable

import attrs

from qblock.block.accounting import BlockAcctStats
from qblock.block.driver import (
    BDRV_O_NO_IO,
    BDRV_O_RDWR,
    BDRV_O_RESIZE,
    BDRV_REQ_FUA,
    BDRV_REQ_MAY_UNMAP,
    BDRV_REQ_ZERO_WRITE,
    BDRV_REQUEST_MAX_SECTORS,
    BDRV_SECTOR_BITS,
    BDRV_SECTOR_SIZE,
    INT_MAX,
    NOT_DONE,
    PreallocMode,
)
from qblock.block.graph import (
    BLK_PERM_ALL,
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_GRAPH_MOD,
    BLK_PERM_RESIZE,
    BLK_PERM_WRITE,
    BLK_PERM_WRITE_UNCHANGED,
    BdrvChild,
    BdrvChildClass,
    BlockDriverState,
    bdrv_coroutine_enter,
    bdrv_drain_all_begin,
    bdrv_drain_all_end,
    bdrv_drained_begin,
    bdrv_drained_end,
    bdrv_find_node,
    bdrv_get_aio_context,
    bdrv_getlength,
    bdrv_is_inserted,
    bdrv_is_read_only,
    bdrv_list_refresh_perms,
    bdrv_open,
    bdrv_ref,
    bdrv_root_attach_child,
    bdrv_root_unref_child,
    bdrv_try_set_aio_context,
    id_wellformed,
)
from qblock.block.io import (
    bdrv_co_flush,
    bdrv_co_pdiscard,
    bdrv_co_preadv_part,
    bdrv_co_pwritev_part,
    bdrv_co_truncate,
    bdrv_dec_in_flight,
    bdrv_inc_in_flight,
    bdrv_io_plug,
    bdrv_io_unplug,
    run_co_in,
)
from qblock.block.throttle_groups import ThrottleGroupMember
from qblock.trace.events import (
    trace_blk_add_fua,
    trace_blk_aio_complete,
    trace_blk_aio_prwv,
    trace_blk_check_byte_request,
    trace_blk_co_preadv,
    trace_blk_co_pwritev,
    trace_blk_root_attach,
    trace_blk_root_detach,
    trace_blk_wait_while_drained,
)
from qblock.util.aio import (
    AIO_WAIT_WHILE,
    AioContext,
    aio_bh_schedule_oneshot,
    aio_co_enter,
    aio_wait_kick,
    qemu_get_aio_context,
)
from qblock.util.aiocb import AIOCBInfo, BlockAIOCB, qemu_aio_unref
from qblock.util.coroutine import coroutine_fn, qemu_coroutine_create
from qblock.util.coroutine_lock import CoQueue, qemu_co_enter_next, qemu_co_queue_wait
from qblock.util.cutils import MIN_NON_ZERO
from qblock.util.error import Error, strerror
from qblock.util.iov import QEMUIOVector
from qblock.util.qapi_event import qapi_event_send
from qblock.util.runstate import RunState, qemu_system_vmstop_request

__all__ = [
    "BlockBackend", "BlockDevOps", "BlockdevOnError", "BlockErrorAction", "BlockDeviceIoStatus",
    "blk_new", "blk_new_open", "blk_ref", "blk_unref", "blk_insert_bs", "blk_remove_bs", "blk_bs",
    "blk_name", "blk_by_name", "monitor_add_blk", "monitor_remove_blk", "blk_next", "blk_all_next",
    "blk_get_aio_context", "blk_set_aio_context", "blk_getlength", "blk_is_read_only", "blk_is_inserted",
    "blk_is_available", "blk_set_perm", "blk_get_perm", "blk_co_preadv", "blk_co_pwritev",
    "blk_co_flush", "blk_co_pdiscard", "blk_co_pwrite_zeroes", "blk_co_truncate", "blk_aio_preadv",
    "blk_aio_pwritev", "blk_aio_flush", "blk_aio_pdiscard", "blk_aio_pwrite_zeroes", "blk_aio_cancel",
    "blk_aio_cancel_async", "blk_abort_aio_request", "blk_pread", "blk_pwrite", "blk_preadv",
    "blk_pwritev", "blk_flush", "blk_pdiscard", "blk_pwrite_zeroes", "blk_truncate", "blk_drain",
    "blk_drain_all", "blk_set_enable_write_cache", "blk_enable_write_cache", "blk_io_plug",
    "blk_io_unplug", "blk_get_max_transfer", "blk_get_max_iov", "blk_get_request_alignment",
    "blk_set_guest_block_size", "blk_set_dev_ops", "blk_attach_dev", "blk_detach_dev",
    "blk_iostatus_enable", "blk_iostatus_is_enabled", "blk_iostatus_reset", "blk_iostatus_set_err",
    "blk_iostatus", "blk_set_on_error", "blk_get_on_error", "blk_get_error_action", "blk_error_action",
    "blk_get_stats", "blk_inc_in_flight", "blk_dec_in_flight", "blk_set_allow_write_beyond_eof",
    "blk_set_disable_request_queuing", "blk_set_allow_aio_context_change", "child_root", "blk_get_geometry",
    # include/block/block.h as devices see it through block-backend.h
    "BDRV_SECTOR_BITS", "BDRV_SECTOR_SIZE", "BDRV_REQUEST_MAX_SECTORS", "BDRV_REQ_FUA", "BDRV_REQ_MAY_UNMAP",
    "BLK_PERM_ALL", "BLK_PERM_CONSISTENT_READ", "BLK_PERM_WRITE", "BLK_PERM_RESIZE", "BLK_PERM_WRITE_UNCHANGED",
    "BLK_PERM_GRAPH_MOD",
]


class BlockdevOnError(enum.Enum):
    BLOCKDEV_ON_ERROR_REPORT = "report"
    BLOCKDEV_ON_ERROR_IGNORE = "ignore"
    BLOCKDEV_ON_ERROR_ENOSPC = "enospc"
    BLOCKDEV_ON_ERROR_STOP = "stop"
    BLOCKDEV_ON_ERROR_AUTO = "auto"


class BlockErrorAction(enum.Enum):
    BLOCK_ERROR_ACTION_IGNORE = "ignore"
    BLOCK_ERROR_ACTION_REPORT = "report"
    BLOCK_ERROR_ACTION_STOP = "stop"


class BlockDeviceIoStatus(enum.Enum):
    BLOCK_DEVICE_IO_STATUS_OK = "ok"
    BLOCK_DEVICE_IO_STATUS_FAILED = "failed"
    BLOCK_DEVICE_IO_STATUS_NOSPACE = "nospace"


class BlockDevOps:
    """What a device wants to hear from its BlockBackend (QEMU's BlockDevOps); methods take ``opaque``.

    Subclass and define only what the device has: ``change_media_cb(opaque, load)``,
    ``eject_request_cb(opaque, force)``, ``is_tray_open(opaque)``, ``is_medium_locked(opaque)``,
    ``resize_cb(opaque)``, ``drained_begin(opaque)``, ``drained_end(opaque)``.
    """

    change_media_cb = None
    eject_request_cb = None
    is_tray_open = None
    is_medium_locked = None
    resize_cb = None
    drained_begin = None
    drained_end = None


@attrs.define(eq=False)
class BlockBackendPublic:
    throttle_group_member: ThrottleGroupMember = attrs.field(factory=ThrottleGroupMember)


@attrs.define(eq=False)
class BlockBackend:
    """The device's handle on the block layer (QEMU's BlockBackend)."""

    ctx: AioContext
    perm: int
    shared_perm: int
    name: str | None = None
    refcnt: int = 1
    root: BdrvChild | None = None
    public: BlockBackendPublic = attrs.field(factory=BlockBackendPublic)
    dev: Any = None
    dev_ops: BlockDevOps | None = None
    dev_opaque: Any = None
    guest_block_size: int = 512
    enable_write_cache: bool = True
    stats: BlockAcctStats = attrs.field(factory=BlockAcctStats)
    on_read_error: BlockdevOnError = BlockdevOnError.BLOCKDEV_ON_ERROR_REPORT
    on_write_error: BlockdevOnError = BlockdevOnError.BLOCKDEV_ON_ERROR_ENOSPC
    iostatus_enabled: bool = False
    iostatus: BlockDeviceIoStatus = BlockDeviceIoStatus.BLOCK_DEVICE_IO_STATUS_OK
    allow_aio_context_change: bool = False
    allow_write_beyond_eof: bool = False
    quiesce_counter: int = 0
    queued_requests: CoQueue = attrs.field(factory=lambda: CoQueue("queued_requests"))
    disable_request_queuing: bool = False
    in_flight: int = 0
    id: int = 0

    @property
    def trace_name(self) -> str:
        return self.name or f"blk{self.id}"

    def __repr__(self) -> str:
        return f"<BlockBackend {self.trace_name} bs={self.root.bs.node_name if self.root else None}>"


# Trace events tested on every request: the flag test without the function's attribute lookup.
_ev_blk_aio_prwv = trace_blk_aio_prwv.event
_ev_blk_aio_complete = trace_blk_aio_complete.event
_ev_blk_co_pwritev = trace_blk_co_pwritev.event
_ev_blk_co_preadv = trace_blk_co_preadv.event

block_backends: list[BlockBackend] = []          # every BlockBackend (blk_all_next)
monitor_block_backends: list[BlockBackend] = []  # the named ones (blk_next, blk_by_name)
_blk_ids = iter(range(1, 1 << 62))


# --------------------------------------------------------------------------
# The root edge (child_root)


class ChildRoot(BdrvChildClass):
    """The class of a BlockBackend's root edge: drain and resize reach the device through it."""

    stay_at_node = False

    def get_parent_desc(self, c: BdrvChild) -> str:
        blk: BlockBackend = c.opaque
        if blk.name:
            return f"block device '{blk.name}'"
        return "an unnamed block device"

    def drained_begin(self, c: BdrvChild) -> None:
        blk: BlockBackend = c.opaque
        blk.quiesce_counter += 1
        if blk.quiesce_counter == 1 and blk.dev_ops is not None and blk.dev_ops.drained_begin is not None:
            blk.dev_ops.drained_begin(blk.dev_opaque)
        tgm = blk.public.throttle_group_member
        tgm.io_limits_disabled += 1
        if tgm.io_limits_disabled == 1 and tgm.throttle_state is not None:
            from qblock.block.throttle_groups import throttle_group_restart_tgm
            throttle_group_restart_tgm(tgm)  # throttled requests may go now

    def drained_poll(self, c: BdrvChild) -> bool:
        return c.opaque.in_flight > 0

    def drained_end(self, c: BdrvChild) -> None:
        blk: BlockBackend = c.opaque
        blk.public.throttle_group_member.io_limits_disabled -= 1
        blk.quiesce_counter -= 1
        if blk.quiesce_counter == 0:
            if blk.dev_ops is not None and blk.dev_ops.drained_end is not None:
                blk.dev_ops.drained_end(blk.dev_opaque)
            while qemu_co_enter_next(blk.queued_requests):
                pass  # resume every request queued while drained

    def resize(self, c: BdrvChild) -> None:
        blk: BlockBackend = c.opaque
        if blk.dev_ops is not None and blk.dev_ops.resize_cb is not None:
            blk.dev_ops.resize_cb(blk.dev_opaque)

    def attach(self, c: BdrvChild) -> None:
        if trace_blk_root_attach.event.enabled:
            trace_blk_root_attach(c, c.opaque, c.bs)

    def detach(self, c: BdrvChild) -> None:
        if trace_blk_root_detach.event.enabled:
            trace_blk_root_detach(c, c.opaque, c.bs)

    def can_set_aio_ctx(self, c: BdrvChild, ctx: AioContext) -> bool:
        blk: BlockBackend = c.opaque
        if blk.allow_aio_context_change:
            return True
        # Only a monitor-owned BlockBackend with no device may move without telling its user.
        return bool(blk.name) and blk.dev is None

    def change_aio_ctx(self, c: BdrvChild, ctx: AioContext) -> None:
        _blk_set_ctx(c.opaque, ctx)


child_root = ChildRoot()


def _blk_set_ctx(blk: BlockBackend, ctx: AioContext) -> None:
    tgm = blk.public.throttle_group_member
    if tgm.throttle_state is not None and ctx is not blk.ctx:
        from qblock.block.throttle_groups import throttle_group_attach_aio_context, throttle_group_detach_aio_context
        throttle_group_detach_aio_context(tgm)
        throttle_group_attach_aio_context(tgm, ctx)
    blk.ctx = ctx


# --------------------------------------------------------------------------
# Life cycle, names, permissions


def blk_new(ctx: AioContext | None = None, perm: int = 0, shared_perm: int = BLK_PERM_ALL) -> BlockBackend:
    """A BlockBackend with no medium; ``perm``/``shared_perm`` apply once a node is inserted."""
    blk = BlockBackend(ctx or qemu_get_aio_context(), perm, shared_perm, id=next(_blk_ids))
    block_backends.append(blk)
    return blk


def blk_new_open(filename: str | None, reference: str | None = None,
                 options: dict[str, Any] | str | None = None, flags: int = 0) -> BlockBackend:
    """Open a node graph and a BlockBackend on it, with permissions that follow ``flags``."""
    perm = 0
    if not flags & BDRV_O_NO_IO:
        perm |= BLK_PERM_CONSISTENT_READ
        if flags & BDRV_O_RDWR:
            perm |= BLK_PERM_WRITE
    if flags & BDRV_O_RESIZE:
        perm |= BLK_PERM_RESIZE
    blk = blk_new(qemu_get_aio_context(), perm, BLK_PERM_ALL)
    try:
        bs = bdrv_open(filename, reference, options, flags)
    except Error:
        blk_unref(blk)
        raise
    try:
        blk.root = bdrv_root_attach_child(bs, "root", child_root, 0, perm, BLK_PERM_ALL, blk)
    except Error:
        blk_unref(blk)
        raise
    blk.ctx = bdrv_get_aio_context(bs)
    return blk


def blk_ref(blk: BlockBackend) -> None:
    blk.refcnt += 1


def blk_unref(blk: BlockBackend | None) -> None:
    """Drop a reference; the last one removes the medium and deletes the BlockBackend."""
    if blk is None:
        return
    if blk.refcnt <= 0:
        raise AssertionError(f"blk_unref of {blk.trace_name} with refcnt {blk.refcnt}")
    if blk.refcnt == 1:
        # blk_drain() may take and drop temporary references.
        blk_drain(blk)
    blk.refcnt -= 1
    if blk.refcnt == 0:
        _blk_delete(blk)


def _blk_delete(blk: BlockBackend) -> None:
    if blk.public.throttle_group_member.throttle_state is not None:
        from qblock.block.throttle_groups import blk_io_limits_disable
        blk_io_limits_disable(blk)
    if blk.root is not None:
        blk_remove_bs(blk)
    if blk in monitor_block_backends:
        monitor_block_backends.remove(blk)
    blk.name = None
    if blk in block_backends:
        block_backends.remove(blk)


def blk_bs(blk: BlockBackend) -> BlockDriverState | None:
    """The node the BlockBackend is attached to, or None (no medium)."""
    return blk.root.bs if blk.root is not None else None


def blk_name(blk: BlockBackend) -> str:
    return blk.name or ""


def blk_by_name(name: str) -> BlockBackend | None:
    for blk in monitor_block_backends:
        if blk.name == name:
            return blk
    return None


def monitor_add_blk(blk: BlockBackend, name: str) -> None:
    """Give ``blk`` a user-visible name (the -drive id / device name)."""
    if blk.name:
        raise AssertionError(f"monitor_add_blk: {blk.trace_name} already has a name")
    if not id_wellformed(name):
        raise Error("Invalid device name")
    if blk_by_name(name) is not None:
        raise Error(f"Device with id '{name}' already exists")
    if bdrv_find_node(name) is not None:
        raise Error(f"Device name '{name}' conflicts with an existing node name")
    blk.name = name
    monitor_block_backends.append(blk)


def monitor_remove_blk(blk: BlockBackend) -> None:
    if blk in monitor_block_backends:
        monitor_block_backends.remove(blk)
    blk.name = None


def blk_next(blk: BlockBackend | None) -> BlockBackend | None:
    lst = monitor_block_backends
    i = 0 if blk is None else lst.index(blk) + 1
    return lst[i] if i < len(lst) else None


def blk_all_next(blk: BlockBackend | None) -> BlockBackend | None:
    lst = block_backends
    i = 0 if blk is None else lst.index(blk) + 1
    return lst[i] if i < len(lst) else None


def blk_insert_bs(blk: BlockBackend, bs: BlockDriverState) -> None:
    """Attach ``bs`` as the medium (takes a new reference); raises Error on a permission conflict."""
    if blk.root is not None:
        raise Error(f"{blk.trace_name} already has a medium")
    bdrv_ref(bs)
    blk.root = bdrv_root_attach_child(bs, "root", child_root, 0, blk.perm, blk.shared_perm, blk)
    ctx = bdrv_get_aio_context(bs)
    if ctx is not blk.ctx:
        _blk_set_ctx(blk, ctx)


def blk_remove_bs(blk: BlockBackend) -> None:
    """Detach the medium: from now on I/O fails with -ENOMEDIUM."""
    root = blk.root
    if root is None:
        return
    blk_drain(blk)
    blk.root = None
    bdrv_root_unref_child(root)


def blk_set_perm(blk: BlockBackend, perm: int, shared_perm: int) -> None:
    """Change what the BlockBackend needs and shares; raises Error (nothing changed) on a conflict."""
    root = blk.root
    if root is not None:
        old = (root.perm, root.shared_perm)
        root.perm, root.shared_perm = perm, shared_perm
        try:
            bdrv_list_refresh_perms([root.bs])
        except Error:
            root.perm, root.shared_perm = old
            raise
    blk.perm, blk.shared_perm = perm, shared_perm


def blk_get_perm(blk: BlockBackend) -> tuple[int, int]:
    return blk.perm, blk.shared_perm


def blk_get_aio_context(blk: BlockBackend) -> AioContext:
    bs = blk_bs(blk)
    if bs is not None:
        return bdrv_get_aio_context(bs)
    return blk.ctx


def blk_set_aio_context(blk: BlockBackend, new_context: AioContext) -> None:
    """Move the BlockBackend (and its whole graph) to ``new_context``; raises Error if a user refuses."""
    bs = blk_bs(blk)
    if bs is None:
        _blk_set_ctx(blk, new_context)
        return
    old = blk.allow_aio_context_change
    blk.allow_aio_context_change = True
    try:
        bdrv_try_set_aio_context(bs, new_context)
    finally:
        blk.allow_aio_context_change = old


def blk_set_allow_aio_context_change(blk: BlockBackend, allow: bool) -> None:
    blk.allow_aio_context_change = allow


def blk_set_allow_write_beyond_eof(blk: BlockBackend, allow: bool) -> None:
    blk.allow_write_beyond_eof = allow


def blk_set_disable_request_queuing(blk: BlockBackend, disable: bool) -> None:
    blk.disable_request_queuing = disable


def blk_is_inserted(blk: BlockBackend) -> bool:
    bs = blk_bs(blk)
    return bs is not None and bdrv_is_inserted(bs)


def blk_dev_is_tray_open(blk: BlockBackend) -> bool:
    ops = blk.dev_ops
    return ops is not None and ops.is_tray_open is not None and ops.is_tray_open(blk.dev_opaque)


def blk_is_available(blk: BlockBackend) -> bool:
    return blk_is_inserted(blk) and not blk_dev_is_tray_open(blk)


def blk_is_read_only(blk: BlockBackend) -> bool:
    bs = blk_bs(blk)
    return bdrv_is_read_only(bs) if bs is not None else False


def blk_getlength(blk: BlockBackend) -> int:
    if not blk_is_available(blk):
        return -errno.ENOMEDIUM
    return bdrv_getlength(blk_bs(blk))


def blk_get_geometry(blk: BlockBackend) -> int:
    """The size in 512-byte sectors, 0 without a medium (block-backend.c: blk_get_geometry)."""
    length = blk_getlength(blk)
    return length >> BDRV_SECTOR_BITS if length > 0 else 0


def blk_get_stats(blk: BlockBackend) -> BlockAcctStats:
    return blk.stats


# --------------------------------------------------------------------------
# In flight and drain


def blk_inc_in_flight(blk: BlockBackend) -> None:
    blk.in_flight += 1


def blk_dec_in_flight(blk: BlockBackend) -> None:
    blk.in_flight -= 1
    aio_wait_kick()


def blk_wait_while_drained(blk: BlockBackend) -> None:
    """While the graph is drained, park the request on ``queued_requests`` (it resumes at drained_end)."""
    if blk.quiesce_counter and not blk.disable_request_queuing:
        if trace_blk_wait_while_drained.event.enabled:
            trace_blk_wait_while_drained(blk)
        blk_dec_in_flight(blk)
        qemu_co_queue_wait(blk.queued_requests)
        blk_inc_in_flight(blk)


def blk_drain(blk: BlockBackend) -> None:
    """Wait until every request of the BlockBackend completed (even without a medium)."""
    bs = blk_bs(blk)
    if bs is not None:
        bdrv_ref(bs)
        bdrv_drained_begin(bs)
    AIO_WAIT_WHILE(blk_get_aio_context(blk), lambda: blk.in_flight > 0)
    if bs is not None:
        bdrv_drained_end(bs)
        from qblock.block.graph import bdrv_unref
        bdrv_unref(bs)


def blk_drain_all() -> None:
    """Drain every node, and wait for every BlockBackend's requests (including -ENOMEDIUM completions)."""
    bdrv_drain_all_begin()
    for blk in list(block_backends):
        AIO_WAIT_WHILE(blk_get_aio_context(blk), lambda b=blk: b.in_flight > 0)
    bdrv_drain_all_end()


# --------------------------------------------------------------------------
# The request path


def blk_check_byte_request(blk: BlockBackend, offset: int, size: int) -> int:
    """0, or: size too big -EIO, no medium -ENOMEDIUM, negative offset -EIO, beyond the end -EIO."""
    ret = 0
    if size > INT_MAX or size < 0:
        ret = -errno.EIO
    elif not blk_is_available(blk):
        ret = -errno.ENOMEDIUM
    elif offset < 0:
        ret = -errno.EIO
    elif not blk.allow_write_beyond_eof:
        length = bdrv_getlength(blk.root.bs)  # availability was checked just above
        if length < 0:
            ret = length
        elif offset > length or length - offset < size:
            ret = -errno.EIO
    if ret and trace_blk_check_byte_request.event.enabled:
        trace_blk_check_byte_request(blk, offset, size, ret)
    return ret


def _throttle_intercept(blk: BlockBackend, bytes: int, is_write: bool) -> None:
    from qblock.block.throttle_groups import throttle_group_co_io_limits_intercept
    throttle_group_co_io_limits_intercept(blk.public.throttle_group_member, bytes, is_write)


def blk_co_do_preadv(blk: BlockBackend, offset: int, bytes: int, qiov: QEMUIOVector | None,
                     qiov_offset: int, flags: int) -> int:
    """The body of the seed's blk_co_preadv (QEMU 5.0+: blk_co_do_preadv_part)."""
    blk_wait_while_drained(blk)
    bs = blk_bs(blk)  # only after waiting: the graph may have changed
    if _ev_blk_co_preadv.enabled:
        trace_blk_co_preadv(blk, bs, offset, bytes, flags)
    ret = blk_check_byte_request(blk, offset, bytes)
    if ret < 0:
        return ret
    bdrv_inc_in_flight(bs)
    if blk.public.throttle_group_member.throttle_state is not None:
        _throttle_intercept(blk, bytes, False)
    ret = bdrv_co_preadv_part(blk.root, offset, bytes, qiov, qiov_offset, flags)
    bdrv_dec_in_flight(bs)
    return ret


def blk_co_do_pwritev(blk: BlockBackend, offset: int, bytes: int, qiov: QEMUIOVector | None,
                      qiov_offset: int, flags: int) -> int:
    """The body of the seed's blk_co_pwritev (QEMU 5.0+: blk_co_do_pwritev_part)."""
    blk_wait_while_drained(blk)
    bs = blk_bs(blk)
    if _ev_blk_co_pwritev.enabled:
        trace_blk_co_pwritev(blk, bs, offset, bytes, flags)
    ret = blk_check_byte_request(blk, offset, bytes)
    if ret < 0:
        return ret
    bdrv_inc_in_flight(bs)
    if blk.public.throttle_group_member.throttle_state is not None:
        _throttle_intercept(blk, bytes, True)
    if not blk.enable_write_cache:
        if trace_blk_add_fua.event.enabled:
            trace_blk_add_fua(blk)
        flags |= BDRV_REQ_FUA
    ret = bdrv_co_pwritev_part(blk.root, offset, bytes, qiov, qiov_offset, flags)
    bdrv_dec_in_flight(bs)
    return ret


@coroutine_fn
def blk_co_preadv(blk: BlockBackend, offset: int, bytes: int, qiov: QEMUIOVector | None, flags: int = 0) -> int:
    """Read into ``qiov`` (block-backend.c: blk_co_preadv)."""
    blk_inc_in_flight(blk)
    try:
        return blk_co_do_preadv(blk, offset, bytes, qiov, 0, flags)
    finally:
        blk_dec_in_flight(blk)


@coroutine_fn
def blk_co_pwritev(blk: BlockBackend, offset: int, bytes: int, qiov: QEMUIOVector | None, flags: int = 0) -> int:
    """Write from ``qiov`` (block-backend.c: blk_co_pwritev)."""
    blk_inc_in_flight(blk)
    try:
        return blk_co_do_pwritev(blk, offset, bytes, qiov, 0, flags)
    finally:
        blk_dec_in_flight(blk)


@coroutine_fn
def blk_co_pwrite_zeroes(blk: BlockBackend, offset: int, bytes: int, flags: int = 0) -> int:
    return blk_co_pwritev(blk, offset, bytes, None, flags | BDRV_REQ_ZERO_WRITE)


def blk_co_do_pdiscard(blk: BlockBackend, offset: int, bytes: int) -> int:
    blk_wait_while_drained(blk)
    ret = blk_check_byte_request(blk, offset, bytes)
    if ret < 0:
        return ret
    return bdrv_co_pdiscard(blk.root, offset, bytes)


@coroutine_fn
def blk_co_pdiscard(blk: BlockBackend, offset: int, bytes: int) -> int:
    blk_inc_in_flight(blk)
    try:
        return blk_co_do_pdiscard(blk, offset, bytes)
    finally:
        blk_dec_in_flight(blk)


def blk_co_do_flush(blk: BlockBackend) -> int:
    blk_wait_while_drained(blk)
    if not blk_is_available(blk):
        return -errno.ENOMEDIUM
    return bdrv_co_flush(blk_bs(blk))


@coroutine_fn
def blk_co_flush(blk: BlockBackend) -> int:
    blk_inc_in_flight(blk)
    try:
        return blk_co_do_flush(blk)
    finally:
        blk_dec_in_flight(blk)


@coroutine_fn
def blk_co_truncate(blk: BlockBackend, offset: int, exact: bool = False,
                    prealloc: PreallocMode = PreallocMode.PREALLOC_MODE_OFF, errp: list | None = None) -> int:
    if not blk_is_available(blk):
        if errp is not None:
            errp.append(Error("No medium inserted", errno=errno.ENOMEDIUM))
        return -errno.ENOMEDIUM
    return bdrv_co_truncate(blk.root, offset, exact, prealloc, errp)


# --------------------------------------------------------------------------
# AIO emulation (blk_aio_prwv and friends)


def _blk_aio_em_aiocb_get_aio_context(acb: "BlkAioEmAIOCB") -> AioContext:
    return blk_get_aio_context(acb.rwco.blk)


blk_aio_em_aiocb_info = AIOCBInfo(get_aio_context=_blk_aio_em_aiocb_get_aio_context)


@attrs.define(eq=False, slots=True)
class BlkRwCo:
    blk: BlockBackend
    offset: int
    iobuf: Any
    ret: int
    flags: int


@attrs.define(eq=False)
class BlkAioEmAIOCB(BlockAIOCB):
    """The AIOCB of an emulated asynchronous request: a coroutine does the work."""

    rwco: BlkRwCo | None = None
    bytes: int = 0
    has_returned: bool = False

    def describe_wait(self) -> str:
        return f"{self.trace_name} on {self.rwco.blk.trace_name}"


def blk_aio_complete(acb: BlkAioEmAIOCB) -> None:
    """Run the user's callback, but only once blk_aio_prwv has returned the AIOCB."""
    if acb.has_returned:
        rwco = acb.rwco
        if _ev_blk_aio_complete.enabled:
            trace_blk_aio_complete(rwco.blk, acb, rwco.ret, 0)
        acb.cb(acb.opaque, rwco.ret)
        blk_dec_in_flight(rwco.blk)
        qemu_aio_unref(acb)


def blk_aio_complete_bh(acb: BlkAioEmAIOCB) -> None:
    assert acb.has_returned
    rwco = acb.rwco
    if _ev_blk_aio_complete.enabled:
        trace_blk_aio_complete(rwco.blk, acb, rwco.ret, 1)
    acb.cb(acb.opaque, rwco.ret)
    blk_dec_in_flight(rwco.blk)
    qemu_aio_unref(acb)


def blk_aio_prwv(blk: BlockBackend, offset: int, bytes: int, iobuf: Any, co_entry: Callable[[Any], None],
                 flags: int, cb: Callable[[Any, int], None], opaque: Any) -> BlkAioEmAIOCB:
    """Start a request in a new coroutine and return its AIOCB; ``cb(opaque, ret)`` runs when it is done.

    Called from outside the BlockBackend's AioContext thread, the caller holds that context's lock
    (aio_context_acquire), as QEMU 4.x requires: otherwise the request may complete twice.
    """
    blk_inc_in_flight(blk)
    rwco = BlkRwCo(blk, offset, iobuf, NOT_DONE, flags)
    acb = BlkAioEmAIOCB(blk_aio_em_aiocb_info, blk_bs(blk), cb, opaque, rwco=rwco, bytes=bytes)
    co = qemu_coroutine_create(co_entry, acb)
    if _ev_blk_aio_prwv.enabled:
        trace_blk_aio_prwv(blk, co_entry.__name__, offset, bytes, co)
    bs = blk_bs(blk)
    if bs is not None:
        bdrv_coroutine_enter(bs, co)
    else:
        aio_co_enter(blk.ctx, co)
    acb.has_returned = True
    if rwco.ret != NOT_DONE:
        # The coroutine already finished: the callback must not run before our caller has the AIOCB.
        aio_bh_schedule_oneshot(blk_get_aio_context(blk), blk_aio_complete_bh, acb, "blk_aio_complete_bh")
    return acb


def blk_aio_read_entry(acb: BlkAioEmAIOCB) -> None:
    rwco = acb.rwco
    qiov = rwco.iobuf
    rwco.ret = blk_co_do_preadv(rwco.blk, rwco.offset, acb.bytes, qiov, 0, rwco.flags)
    blk_aio_complete(acb)


def blk_aio_write_entry(acb: BlkAioEmAIOCB) -> None:
    rwco = acb.rwco
    rwco.ret = blk_co_do_pwritev(rwco.blk, rwco.offset, acb.bytes, rwco.iobuf, 0, rwco.flags)
    blk_aio_complete(acb)


def blk_aio_flush_entry(acb: BlkAioEmAIOCB) -> None:
    rwco = acb.rwco
    rwco.ret = blk_co_do_flush(rwco.blk)
    blk_aio_complete(acb)


def blk_aio_pdiscard_entry(acb: BlkAioEmAIOCB) -> None:
    rwco = acb.rwco
    rwco.ret = blk_co_do_pdiscard(rwco.blk, rwco.offset, acb.bytes)
    blk_aio_complete(acb)


def blk_aio_preadv(blk: BlockBackend, offset: int, qiov: QEMUIOVector, flags: int,
                   cb: Callable[[Any, int], None], opaque: Any) -> BlkAioEmAIOCB:
    return blk_aio_prwv(blk, offset, qiov.size, qiov, blk_aio_read_entry, flags, cb, opaque)


def blk_aio_pwritev(blk: BlockBackend, offset: int, qiov: QEMUIOVector, flags: int,
                    cb: Callable[[Any, int], None], opaque: Any) -> BlkAioEmAIOCB:
    """Write ``qiov`` at ``offset`` asynchronously: the seed's entry point from virtio-blk."""
    return blk_aio_prwv(blk, offset, qiov.size, qiov, blk_aio_write_entry, flags, cb, opaque)


def blk_aio_pwrite_zeroes(blk: BlockBackend, offset: int, bytes: int, flags: int,
                          cb: Callable[[Any, int], None], opaque: Any) -> BlkAioEmAIOCB:
    return blk_aio_prwv(blk, offset, bytes, None, blk_aio_write_entry, flags | BDRV_REQ_ZERO_WRITE, cb, opaque)


def blk_aio_flush(blk: BlockBackend, cb: Callable[[Any, int], None], opaque: Any) -> BlkAioEmAIOCB:
    return blk_aio_prwv(blk, 0, 0, None, blk_aio_flush_entry, 0, cb, opaque)


def blk_aio_pdiscard(blk: BlockBackend, offset: int, bytes: int, cb: Callable[[Any, int], None],
                     opaque: Any) -> BlkAioEmAIOCB:
    return blk_aio_prwv(blk, offset, bytes, None, blk_aio_pdiscard_entry, 0, cb, opaque)


def blk_aio_cancel(acb: BlockAIOCB) -> None:
    """Wait for ``acb`` to complete (emulated AIO cannot be cancelled); its callback runs first."""
    from qblock.block.io import bdrv_aio_cancel
    bdrv_aio_cancel(acb)


def blk_aio_cancel_async(acb: BlockAIOCB) -> None:
    from qblock.block.io import bdrv_aio_cancel_async
    bdrv_aio_cancel_async(acb)


@attrs.define(eq=False)
class BlockBackendAIOCB(BlockAIOCB):
    blk: BlockBackend | None = None
    ret: int = 0


def _blk_aiocb_get_aio_context(acb: BlockBackendAIOCB) -> AioContext:
    return blk_get_aio_context(acb.blk)


block_backend_aiocb_info = AIOCBInfo(get_aio_context=_blk_aiocb_get_aio_context)


def _error_callback_bh(acb: BlockBackendAIOCB) -> None:
    blk_dec_in_flight(acb.blk)
    acb.cb(acb.opaque, acb.ret)
    qemu_aio_unref(acb)


def blk_abort_aio_request(blk: BlockBackend, cb: Callable[[Any, int], None], opaque: Any,
                          ret: int) -> BlockBackendAIOCB:
    """Complete a request with ``ret`` from a BH, without doing any I/O."""
    blk_inc_in_flight(blk)
    acb = BlockBackendAIOCB(block_backend_aiocb_info, blk_bs(blk), cb, opaque, blk=blk, ret=ret)
    aio_bh_schedule_oneshot(blk_get_aio_context(blk), _error_callback_bh, acb, "error_callback_bh")
    return acb


# --------------------------------------------------------------------------
# Synchronous wrappers


def _blk_run(blk: BlockBackend, fn: Callable[..., int], *args: Any) -> int:
    return run_co_in(blk_get_aio_context(blk), fn, *args)


def blk_preadv(blk: BlockBackend, offset: int, qiov: QEMUIOVector, flags: int = 0) -> int:
    return _blk_run(blk, blk_co_preadv, blk, offset, qiov.size, qiov, flags)


def blk_pwritev(blk: BlockBackend, offset: int, qiov: QEMUIOVector, flags: int = 0) -> int:
    return _blk_run(blk, blk_co_pwritev, blk, offset, qiov.size, qiov, flags)


def blk_pread(blk: BlockBackend, offset: int, buf, count: int | None = None) -> int:
    """Read into ``buf``: ``count`` (all of buf by default) on success, else a negative errno."""
    view = memoryview(buf).cast("B")
    count = len(view) if count is None else count
    if count < 0:
        return -errno.EINVAL
    ret = blk_preadv(blk, offset, QEMUIOVector([view[:count]], -1))
    return ret if ret < 0 else count


def blk_pwrite(blk: BlockBackend, offset: int, buf, count: int | None = None, flags: int = 0) -> int:
    """Write ``buf``: the byte count on success, else a negative errno."""
    view = memoryview(buf).cast("B")
    count = len(view) if count is None else count
    if count < 0:
        return -errno.EINVAL
    ret = blk_pwritev(blk, offset, QEMUIOVector([view[:count]], -1), flags)
    return ret if ret < 0 else count


def blk_pwrite_zeroes(blk: BlockBackend, offset: int, bytes: int, flags: int = 0) -> int:
    return _blk_run(blk, blk_co_pwrite_zeroes, blk, offset, bytes, flags)


def blk_flush(blk: BlockBackend) -> int:
    return _blk_run(blk, blk_co_flush, blk)


def blk_pdiscard(blk: BlockBackend, offset: int, bytes: int) -> int:
    return _blk_run(blk, blk_co_pdiscard, blk, offset, bytes)


def blk_truncate(blk: BlockBackend, offset: int, exact: bool = False,
                 prealloc: PreallocMode = PreallocMode.PREALLOC_MODE_OFF, errp: list | None = None) -> int:
    return _blk_run(blk, blk_co_truncate, blk, offset, exact, prealloc, errp)


# --------------------------------------------------------------------------
# Write cache, limits, plugging


def blk_set_enable_write_cache(blk: BlockBackend, wce: bool) -> None:
    blk.enable_write_cache = wce


def blk_enable_write_cache(blk: BlockBackend) -> bool:
    return blk.enable_write_cache


def blk_io_plug(blk: BlockBackend) -> None:
    bs = blk_bs(blk)
    if bs is not None:
        bdrv_io_plug(bs)


def blk_io_unplug(blk: BlockBackend) -> None:
    bs = blk_bs(blk)
    if bs is not None:
        bdrv_io_unplug(bs)


def blk_get_request_alignment(blk: BlockBackend) -> int:
    bs = blk_bs(blk)
    return bs.bl.request_alignment if bs is not None else 512


def blk_get_max_transfer(blk: BlockBackend) -> int:
    """The largest request the graph takes in one piece (INT_MAX when unlimited)."""
    bs = blk_bs(blk)
    return MIN_NON_ZERO(bs.bl.max_transfer if bs is not None else 0, INT_MAX)


def blk_get_max_iov(blk: BlockBackend) -> int:
    bs = blk_bs(blk)
    from qblock.block.driver import IOV_MAX
    return bs.bl.max_iov if bs is not None and bs.bl.max_iov else IOV_MAX


def blk_set_guest_block_size(blk: BlockBackend, align: int) -> None:
    blk.guest_block_size = align


# --------------------------------------------------------------------------
# Devices, errors, iostatus


def blk_set_dev_ops(blk: BlockBackend, ops: BlockDevOps | None, opaque: Any) -> None:
    blk.dev_ops = ops
    blk.dev_opaque = opaque


def blk_attach_dev(blk: BlockBackend, dev: Any) -> int:
    """Attach a device model; -EBUSY if one is attached already."""
    if blk.dev is not None:
        return -errno.EBUSY
    blk_ref(blk)
    blk.dev = dev
    blk_iostatus_reset(blk)
    return 0


def blk_detach_dev(blk: BlockBackend, dev: Any) -> None:
    if blk.dev is not dev:
        raise AssertionError("blk_detach_dev: another device is attached")
    blk.dev = None
    blk.dev_ops = None
    blk.dev_opaque = None
    blk.guest_block_size = 512
    blk_unref(blk)


def blk_set_on_error(blk: BlockBackend, on_read_error: BlockdevOnError, on_write_error: BlockdevOnError) -> None:
    blk.on_read_error = on_read_error
    blk.on_write_error = on_write_error


def blk_get_on_error(blk: BlockBackend, is_read: bool) -> BlockdevOnError:
    return blk.on_read_error if is_read else blk.on_write_error


def blk_get_error_action(blk: BlockBackend, is_read: bool, error: int) -> BlockErrorAction:
    """What the ``rerror``/``werror`` policy says to do about errno ``error`` (positive)."""
    on_err = blk_get_on_error(blk, is_read)
    if on_err is BlockdevOnError.BLOCKDEV_ON_ERROR_ENOSPC:
        return (BlockErrorAction.BLOCK_ERROR_ACTION_STOP if error == errno.ENOSPC
                else BlockErrorAction.BLOCK_ERROR_ACTION_REPORT)
    if on_err is BlockdevOnError.BLOCKDEV_ON_ERROR_STOP:
        return BlockErrorAction.BLOCK_ERROR_ACTION_STOP
    if on_err is BlockdevOnError.BLOCKDEV_ON_ERROR_REPORT:
        return BlockErrorAction.BLOCK_ERROR_ACTION_REPORT
    if on_err is BlockdevOnError.BLOCKDEV_ON_ERROR_IGNORE:
        return BlockErrorAction.BLOCK_ERROR_ACTION_IGNORE
    raise AssertionError(f"blk_get_error_action: policy {on_err} has no action")


def _send_qmp_error_event(blk: BlockBackend, action: BlockErrorAction, is_read: bool, error: int) -> None:
    bs = blk_bs(blk)
    data = {"device": blk_name(blk)}
    if bs is not None:
        data["node-name"] = bs.node_name  # optional in the event: absent without a medium
    data["operation"] = "read" if is_read else "write"
    data["action"] = action.value
    if blk_iostatus_is_enabled(blk):
        data["nospace"] = error == errno.ENOSPC
    data["reason"] = strerror(error)
    qapi_event_send("BLOCK_IO_ERROR", data)


def blk_error_action(blk: BlockBackend, action: BlockErrorAction, is_read: bool, error: int) -> None:
    """Carry out an error action: stop sets the iostatus and stops the VM; every action sends BLOCK_IO_ERROR."""
    if error < 0:
        raise AssertionError("blk_error_action takes a positive errno")
    if action is BlockErrorAction.BLOCK_ERROR_ACTION_STOP:
        blk_iostatus_set_err(blk, error)
        _send_qmp_error_event(blk, action, is_read, error)
        qemu_system_vmstop_request(RunState.RUN_STATE_IO_ERROR)
    else:
        _send_qmp_error_event(blk, action, is_read, error)


def blk_iostatus_enable(blk: BlockBackend) -> None:
    blk.iostatus_enabled = True
    blk.iostatus = BlockDeviceIoStatus.BLOCK_DEVICE_IO_STATUS_OK


def blk_iostatus_is_enabled(blk: BlockBackend) -> bool:
    """iostatus is meaningful only with werror=enospc/stop or rerror=stop."""
    return blk.iostatus_enabled and (
        blk.on_write_error in (BlockdevOnError.BLOCKDEV_ON_ERROR_ENOSPC, BlockdevOnError.BLOCKDEV_ON_ERROR_STOP)
        or blk.on_read_error is BlockdevOnError.BLOCKDEV_ON_ERROR_STOP)


def blk_iostatus(blk: BlockBackend) -> BlockDeviceIoStatus:
    return blk.iostatus


def blk_iostatus_reset(blk: BlockBackend) -> None:
    if blk_iostatus_is_enabled(blk):
        blk.iostatus = BlockDeviceIoStatus.BLOCK_DEVICE_IO_STATUS_OK


def blk_iostatus_set_err(blk: BlockBackend, error: int) -> None:
    """Record the first error since the last reset (later ones keep it)."""
    if blk_iostatus_is_enabled(blk) and blk.iostatus is BlockDeviceIoStatus.BLOCK_DEVICE_IO_STATUS_OK:
        blk.iostatus = (BlockDeviceIoStatus.BLOCK_DEVICE_IO_STATUS_NOSPACE if error == errno.ENOSPC
                        else BlockDeviceIoStatus.BLOCK_DEVICE_IO_STATUS_FAILED)
