"""virtio-blk: QEMU's hw/block/virtio-blk.c, the device the seed starts from.

The path of one guest write, as the seed walks it::

    guest kick  ->  virtio_queue_notify  ->  virtio_blk_handle_output
      virtio_blk_handle_vq              blk_io_plug; pop with notifications off, until the ring stays empty
        virtio_blk_get_request          virtqueue_pop: the descriptor chain, mapped (no copy)
        virtio_blk_handle_request       outhdr (type, ioprio, sector), status byte, checks, MultiReqBuffer
      virtio_blk_submit_multireq        sort by sector, cut into runs of mergeable requests
        submit_requests                 one concatenated qiov per run, mr_next chain, block_acct_merge_done
          blk_aio_pwritev(..., virtio_blk_rw_complete, first request)
    virtio_blk_rw_complete              walk mr_next: OK, or virtio_blk_handle_rw_error (werror/rerror)
      virtio_blk_req_complete           status byte, virtqueue_push, virtio_notify -> guest interrupt

A request the error policy stops on stays on ``s.rq``; when the VM runs
again ``virtio_blk_dma_restart_cb`` schedules a BH that submits them anew.
With ``ioeventfd`` (on by default, as virtio-pci's) the kick reaches the
device through an EventNotifier served by the dataplane code
(:mod:`qblock.hw.virtio_blk_dataplane`) in the main loop, or in an
IOThread's AioContext with ``iothread=``; ``ioeventfd=off`` runs the handler
inside the kick.

Defaults are the seed's era: queue-size 128, num-queues 1, seg-max-adjust
off (seg_max 126).  Left out: SCSI passthrough (answered as QEMU answers it
without the ``scsi`` feature), zoned commands, migration of ``s.rq``.
Taken from later QEMU: discard/write-zeroes, rerror/werror device
properties, the request list kept in-flight across the restart BH, and
header parsing that leaves the element intact (QEMU 5.x's iov_discard_undo)
so a stopped request is parsed again unchanged.
"""
from __future__ import annotations

import itertools
import struct
from typing import Any

import attrs

from qblock.block.accounting import (
    BlockAcctCookie,
    BlockAcctType,
    block_acct_done,
    block_acct_failed,
    block_acct_invalid,
    block_acct_merge_done,
    block_acct_start,
)
from qblock.block.block_backend import (
    BDRV_REQ_MAY_UNMAP,
    BDRV_REQUEST_MAX_SECTORS,
    BDRV_SECTOR_BITS,
    BDRV_SECTOR_SIZE,
    BlockBackend,
    BlockDevOps,
    BlockErrorAction,
    blk_aio_flush,
    blk_aio_pdiscard,
    blk_aio_preadv,
    blk_aio_pwrite_zeroes,
    blk_aio_pwritev,
    blk_dec_in_flight,
    blk_drain,
    blk_enable_write_cache,
    blk_error_action,
    blk_get_aio_context,
    blk_get_error_action,
    blk_get_geometry,
    blk_get_max_iov,
    blk_get_max_transfer,
    blk_get_stats,
    blk_inc_in_flight,
    blk_io_plug,
    blk_io_unplug,
    blk_iostatus_enable,
    blk_is_inserted,
    blk_is_read_only,
    blk_set_dev_ops,
    blk_set_enable_write_cache,
    blk_set_guest_block_size,
)
from qblock.hw.block import (
    DEFINE_BLOCK_CHS_PROPERTIES,
    DEFINE_BLOCK_ERROR_PROPERTIES,
    DEFINE_BLOCK_PROPERTIES,
    BlockConf,
    blkconf_apply_backend_options,
    blkconf_blocksizes,
    blkconf_geometry,
    get_physical_block_exp,
)
from qblock.hw.virtio import (
    TYPE_VIRTIO_DEVICE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_F_ANY_LAYOUT,
    VIRTIO_F_VERSION_1,
    VIRTIO_QUEUE_MAX,
    VIRTQUEUE_MAX_SIZE,
    VirtIODevice,
    VirtQueue,
    VirtQueueElement,
    virtio_add_feature,
    virtio_add_queue,
    virtio_cleanup,
    virtio_clear_feature,
    virtio_del_queue,
    virtio_device_start_ioeventfd,
    virtio_error,
    virtio_has_feature,
    virtio_init,
    virtio_ldl_p,
    virtio_ldq_p,
    virtio_notify,
    virtio_notify_config,
    virtio_queue_empty,
    virtio_queue_set_notification,
    virtio_vdev_has_feature,
    virtqueue_detach_element,
    virtqueue_pop,
    virtqueue_push,
)
from qblock.hw.virtio_blk_dataplane import (
    VirtIOBlockDataPlane,
    virtio_blk_data_plane_create,
    virtio_blk_data_plane_destroy,
    virtio_blk_data_plane_notify,
    virtio_blk_data_plane_start,
    virtio_blk_data_plane_stop,
)
from qblock.qom.object import (
    DEFINE_PROP_BIT,
    DEFINE_PROP_BIT64,
    DEFINE_PROP_BOOL,
    DEFINE_PROP_LINK,
    DEFINE_PROP_STRING,
    DEFINE_PROP_UINT16,
    DEFINE_PROP_UINT32,
    ObjectClass,
    PropertyInfoLink,
    TypeInfo,
    device_class_set_props,
    type_init,
    type_register_static,
)
from qblock.trace import control as _trace
from qblock.trace.events import (
    trace_virtio_blk_handle_read,
    trace_virtio_blk_handle_write,
    trace_virtio_blk_req_complete,
    trace_virtio_blk_rw_complete,
    trace_virtio_blk_submit_multireq,
)
from qblock.util.aio import (
    IOThread,
    aio_bh_schedule_oneshot,
    aio_context_acquire,
    aio_context_release,
    iothread_by_id,
    qemu_get_aio_context,
)
from qblock.util.coroutine import request_id_set
from qblock.util.cutils import is_power_of_2
from qblock.util.error import Error
from qblock.util.iov import (
    QEMUIOVector,
    iov_discard_back,
    iov_discard_front,
    iov_from_buf,
    iov_size,
    iov_to_buf,
    qemu_iovec_add,
    qemu_iovec_concat,
    qemu_iovec_destroy,
    qemu_iovec_init,
    qemu_iovec_init_external,
)
from qblock.util.runstate import RunState, qemu_add_vm_change_state_handler, qemu_del_vm_change_state_handler

__all__ = [
    "TYPE_VIRTIO_BLK", "VirtIOBlock", "VirtIOBlkConf", "VirtIOBlockReq", "MultiReqBuffer",
    "virtio_blk_get_request", "virtio_blk_handle_request", "virtio_blk_handle_vq", "virtio_blk_handle_output",
    "virtio_blk_submit_multireq", "submit_requests", "virtio_blk_rw_complete", "virtio_blk_flush_complete",
    "virtio_blk_discard_write_zeroes_complete", "virtio_blk_req_complete", "virtio_blk_handle_rw_error",
    "virtio_blk_sect_range_ok", "virtio_blk_dma_restart_cb", "virtio_blk_dma_restart_bh",
    "virtio_blk_update_config", "virtio_blk_set_config", "virtio_blk_get_features", "virtio_blk_set_status",
    "virtio_blk_reset", "virtio_blk_device_realize", "virtio_blk_device_unrealize",
    "VIRTIO_ID_BLOCK", "VIRTIO_BLK_T_IN", "VIRTIO_BLK_T_OUT", "VIRTIO_BLK_T_SCSI_CMD", "VIRTIO_BLK_T_FLUSH",
    "VIRTIO_BLK_T_GET_ID", "VIRTIO_BLK_T_DISCARD", "VIRTIO_BLK_T_WRITE_ZEROES", "VIRTIO_BLK_T_BARRIER",
    "VIRTIO_BLK_S_OK", "VIRTIO_BLK_S_IOERR", "VIRTIO_BLK_S_UNSUPP", "VIRTIO_BLK_ID_BYTES",
    "VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP", "VIRTIO_BLK_MAX_MERGE_REQS", "VIRTIO_BLK_F_SIZE_MAX",
    "VIRTIO_BLK_F_SEG_MAX", "VIRTIO_BLK_F_GEOMETRY", "VIRTIO_BLK_F_RO", "VIRTIO_BLK_F_BLK_SIZE",
    "VIRTIO_BLK_F_SCSI", "VIRTIO_BLK_F_WCE", "VIRTIO_BLK_F_FLUSH", "VIRTIO_BLK_F_TOPOLOGY",
    "VIRTIO_BLK_F_CONFIG_WCE", "VIRTIO_BLK_F_MQ", "VIRTIO_BLK_F_DISCARD", "VIRTIO_BLK_F_WRITE_ZEROES",
    "VIRTIO_BLK_CONFIG",
]

TYPE_VIRTIO_BLK = "virtio-blk-device"
VIRTIO_ID_BLOCK = 2

# include/standard-headers/linux/virtio_blk.h
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_SCSI = 7
VIRTIO_BLK_F_WCE = 9
VIRTIO_BLK_F_FLUSH = VIRTIO_BLK_F_WCE
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_SCSI_CMD = 2
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_BARRIER = 0x80000000

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_ID_BYTES = 20
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
VIRTIO_BLK_MAX_MERGE_REQS = 32


# struct virtio_blk_config: capacity, size_max, seg_max, geometry {cylinders, heads, sectors}, blk_size,
# physical_block_exp, alignment_offset, min_io_size, opt_io_size, wce, unused, num_queues,
# max_discard_sectors, max_discard_seg, discard_sector_alignment, max_write_zeroes_sectors,
# max_write_zeroes_seg, write_zeroes_may_unmap, unused1[3]
VIRTIO_BLK_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
VIRTIO_BLK_CFG_SIZE = 36                  # offsetof(struct virtio_blk_config, max_discard_sectors)
_CFG_END_DISCARD = 48                     # endof(discard_sector_alignment)
_CFG_END_WRITE_ZEROES = 57                # endof(write_zeroes_may_unmap)
_CFG_WCE_OFFSET = 32

# struct virtio_blk_outhdr { le32 type; le32 ioprio; le64 sector; }
_OUTHDR_SIZE = 16
# struct virtio_blk_discard_write_zeroes { le64 sector; le32 num_sectors; le32 flags; }
_DWZ = struct.Struct("<QII")


@attrs.define(eq=False)
class VirtIOBlkConf:
    """virtio-blk's configuration (QEMU's VirtIOBlkConf)."""

    conf: BlockConf = attrs.field(factory=BlockConf)
    iothread: IOThread | None = None
    serial: str | None = None
    request_merging: int = 1
    num_queues: int = 1
    queue_size: int = 128
    seg_max_adjust: bool = False
    max_discard_sectors: int = BDRV_REQUEST_MAX_SECTORS
    max_write_zeroes_sectors: int = BDRV_REQUEST_MAX_SECTORS
    x_enable_wce_if_config_wce: bool = True


@attrs.define(eq=False)
class VirtIOBlock(VirtIODevice):
    """A virtio-blk device (QEMU's VirtIOBlock)."""

    blk: BlockBackend | None = None
    rq: "VirtIOBlockReq | None" = None          # requests an error stopped, newest first (via next)
    conf: VirtIOBlkConf = attrs.field(factory=VirtIOBlkConf)
    change: Any = attrs.field(default=None, repr=False)
    dataplane: VirtIOBlockDataPlane | None = attrs.field(default=None, repr=False)
    dataplane_disabled: bool = False
    dataplane_started: bool = False
    original_wce: bool = True
    sector_mask: int = 0
    blk_host_features: int = 0                   # QEMU: VirtIOBlock.host_features (beside the vdev's)
    config_size: int = 0


_req_ids = itertools.count(1)
_mrb_ids = itertools.count(1)


@attrs.define(eq=False)
class VirtIOBlockReq:
    """One guest request in the device (QEMU's VirtIOBlockReq)."""

    elem: VirtQueueElement
    dev: VirtIOBlock
    vq: VirtQueue
    sector_num: int = 0
    in_: memoryview | None = attrs.field(default=None, repr=False)   # QEMU's req->in: the status byte
    in_len: int = 0
    out: bytearray = attrs.field(factory=lambda: bytearray(_OUTHDR_SIZE), repr=False)
    qiov: QEMUIOVector = attrs.field(factory=QEMUIOVector, repr=False)
    next: "VirtIOBlockReq | None" = attrs.field(default=None, repr=False)
    mr_next: "VirtIOBlockReq | None" = attrs.field(default=None, repr=False)
    acct: BlockAcctCookie = attrs.field(factory=BlockAcctCookie, repr=False)
    id: int = attrs.field(factory=lambda: next(_req_ids))

    @property
    def trace_name(self) -> str:
        return f"vreq{self.id}"


@attrs.define(eq=False)
class MultiReqBuffer:
    """Reads or writes gathered from one pass over the queue, to be merged (QEMU's MultiReqBuffer)."""

    reqs: list = attrs.field(factory=lambda: [None] * VIRTIO_BLK_MAX_MERGE_REQS)
    num_reqs: int = 0
    is_write: bool = False
    no: int = attrs.field(factory=lambda: next(_mrb_ids), repr=False)

    @property
    def trace_name(self) -> str:
        return f"mrb{self.no}"


def _with_request_id(req: VirtIOBlockReq, fn, *args) -> None:
    """Submit with the request's id set, so traces follow it into the block layer."""
    if not _trace.trace_active:
        fn(*args)
        return
    old = request_id_set(req.id)
    try:
        fn(*args)
    finally:
        request_id_set(old)


# ---------------------------------------------------------------------------
# Completion


def virtio_blk_init_request(s: VirtIOBlock, vq: VirtQueue, req: VirtIOBlockReq) -> None:
    req.dev = s
    req.vq = vq
    req.qiov = QEMUIOVector()
    req.in_len = 0
    req.next = None
    req.mr_next = None


def virtio_blk_free_request(req: VirtIOBlockReq) -> None:
    """Nothing to free in Python; kept so the code reads as QEMU's."""


def virtio_blk_req_complete(req: VirtIOBlockReq, status: int) -> None:
    """Write the status byte, return the element to the guest and interrupt it (batched under dataplane)."""
    s = req.dev
    if trace_virtio_blk_req_complete.event.enabled:
        trace_virtio_blk_req_complete(s, req, status)
    req.in_[0] = status
    virtqueue_push(req.vq, req.elem, req.in_len)
    if s.dataplane_started and not s.dataplane_disabled:
        virtio_blk_data_plane_notify(s.dataplane, req.vq)
    else:
        virtio_notify(s, req.vq)


def virtio_blk_handle_rw_error(req: VirtIOBlockReq, error: int, is_read: bool, acct_failed: bool) -> bool:
    """Apply rerror/werror to a failed request; True when the caller must not complete it with OK.

    stop: keep it on ``s.rq`` (and stop the VM); report: complete it with IOERR;
    ignore: let the caller complete it with OK.
    """
    s = req.dev
    action = blk_get_error_action(s.blk, is_read, error)
    if action is BlockErrorAction.BLOCK_ERROR_ACTION_STOP:
        # The chain is cut: the request is parsed again from its element on restart.
        req.mr_next = None
        req.next = s.rq
        s.rq = req
    elif action is BlockErrorAction.BLOCK_ERROR_ACTION_REPORT:
        virtio_blk_req_complete(req, VIRTIO_BLK_S_IOERR)
        if acct_failed:
            block_acct_failed(blk_get_stats(s.blk), req.acct)
        virtio_blk_free_request(req)
    blk_error_action(s.blk, action, is_read, error)
    return action is not BlockErrorAction.BLOCK_ERROR_ACTION_IGNORE


def virtio_blk_rw_complete(opaque: VirtIOBlockReq, ret: int) -> None:
    """A read or write finished: complete every request merged into it (the mr_next chain) with ``ret``."""
    next_ = opaque
    s = next_.dev
    ctx = blk_get_aio_context(s.conf.conf.blk)
    aio_context_acquire(ctx)
    try:
        while next_ is not None:
            req = next_
            next_ = req.mr_next
            if trace_virtio_blk_rw_complete.event.enabled:
                trace_virtio_blk_rw_complete(s, req, ret)
            if req.qiov.nalloc != -1:
                # The run's first request carried the merged vector that submit_requests built.
                qemu_iovec_destroy(req.qiov)
            if ret:
                p = virtio_ldl_p(s, req.out, 0)
                is_read = not p & VIRTIO_BLK_T_OUT
                if virtio_blk_handle_rw_error(req, -ret, is_read, True):
                    continue
            virtio_blk_req_complete(req, VIRTIO_BLK_S_OK)
            block_acct_done(blk_get_stats(s.blk), req.acct)
            virtio_blk_free_request(req)
    finally:
        aio_context_release(ctx)


def virtio_blk_flush_complete(opaque: VirtIOBlockReq, ret: int) -> None:
    req = opaque
    s = req.dev
    ctx = blk_get_aio_context(s.conf.conf.blk)
    aio_context_acquire(ctx)
    try:
        if ret and virtio_blk_handle_rw_error(req, -ret, False, True):
            return
        virtio_blk_req_complete(req, VIRTIO_BLK_S_OK)
        block_acct_done(blk_get_stats(s.blk), req.acct)
        virtio_blk_free_request(req)
    finally:
        aio_context_release(ctx)


def virtio_blk_discard_write_zeroes_complete(opaque: VirtIOBlockReq, ret: int) -> None:
    req = opaque
    s = req.dev
    is_write_zeroes = (virtio_ldl_p(s, req.out, 0) & ~VIRTIO_BLK_T_BARRIER) == VIRTIO_BLK_T_WRITE_ZEROES
    ctx = blk_get_aio_context(s.conf.conf.blk)
    aio_context_acquire(ctx)
    try:
        if ret and virtio_blk_handle_rw_error(req, -ret, False, is_write_zeroes):
            return
        virtio_blk_req_complete(req, VIRTIO_BLK_S_OK)
        if is_write_zeroes:
            block_acct_done(blk_get_stats(s.blk), req.acct)
        virtio_blk_free_request(req)
    finally:
        aio_context_release(ctx)


# ---------------------------------------------------------------------------
# Submission and merging


def virtio_blk_get_request(s: VirtIOBlock, vq: VirtQueue) -> VirtIOBlockReq | None:
    elem = virtqueue_pop(vq)
    if elem is None:
        return None
    return VirtIOBlockReq(elem, s, vq)


def submit_requests(blk: BlockBackend, mrb: MultiReqBuffer, start: int, num_reqs: int, niov: int) -> None:
    """Submit ``mrb.reqs[start:start+num_reqs]`` as one request; their data vectors are joined, not copied."""
    first: VirtIOBlockReq = mrb.reqs[start]
    qiov = first.qiov
    sector_num = first.sector_num
    is_write = mrb.is_write

    if num_reqs > 1:
        # The first request's vector wraps guest memory (external): build a local one in its place.
        tmp_iov = qiov.iov
        qemu_iovec_init(qiov, niov)
        for view in tmp_iov:
            qemu_iovec_add(qiov, view)
        for i in range(start + 1, start + num_reqs):
            qemu_iovec_concat(qiov, mrb.reqs[i].qiov, 0, mrb.reqs[i].qiov.size)
            mrb.reqs[i - 1].mr_next = mrb.reqs[i]
        if trace_virtio_blk_submit_multireq.event.enabled:
            trace_virtio_blk_submit_multireq(first.dev, mrb, start, num_reqs, sector_num << BDRV_SECTOR_BITS,
                                             qiov.size, is_write)
        block_acct_merge_done(blk_get_stats(blk),
                              BlockAcctType.BLOCK_ACCT_WRITE if is_write else BlockAcctType.BLOCK_ACCT_READ,
                              num_reqs - 1)

    if is_write:
        _with_request_id(first, blk_aio_pwritev, blk, sector_num << BDRV_SECTOR_BITS, qiov, 0,
                         virtio_blk_rw_complete, first)
    else:
        _with_request_id(first, blk_aio_preadv, blk, sector_num << BDRV_SECTOR_BITS, qiov, 0,
                         virtio_blk_rw_complete, first)


def virtio_blk_submit_multireq(blk: BlockBackend, mrb: MultiReqBuffer) -> None:
    """Sort the gathered requests by sector and submit each run that may be merged as one request."""
    start = num_reqs = niov = nb_sectors = sector_num = 0

    if mrb.num_reqs == 1:
        submit_requests(blk, mrb, 0, 1, -1)
        mrb.num_reqs = 0
        return

    max_transfer = blk_get_max_transfer(mrb.reqs[0].dev.blk)

    # QEMU's qsort leaves the order of equal sectors unspecified; Python's sort keeps arrival order.
    mrb.reqs[:mrb.num_reqs] = sorted(mrb.reqs[:mrb.num_reqs], key=lambda r: r.sector_num)

    for i in range(mrb.num_reqs):
        req: VirtIOBlockReq = mrb.reqs[i]
        if num_reqs > 0:
            # No merge when the requests are not sequential, or the merge would exceed the
            # backend's maximum number of IOVs or its maximum transfer length.
            if (sector_num + nb_sectors != req.sector_num
                    or niov > blk_get_max_iov(blk) - req.qiov.niov
                    or req.qiov.size > max_transfer
                    or nb_sectors > (max_transfer - req.qiov.size) // BDRV_SECTOR_SIZE):
                submit_requests(blk, mrb, start, num_reqs, niov)
                num_reqs = 0
        if num_reqs == 0:
            sector_num = req.sector_num
            nb_sectors = niov = 0
            start = i
        nb_sectors += req.qiov.size // BDRV_SECTOR_SIZE
        niov += req.qiov.niov
        num_reqs += 1

    submit_requests(blk, mrb, start, num_reqs, niov)
    mrb.num_reqs = 0


def virtio_blk_handle_flush(req: VirtIOBlockReq, mrb: MultiReqBuffer) -> None:
    s = req.dev
    block_acct_start(blk_get_stats(s.blk), req.acct, 0, BlockAcctType.BLOCK_ACCT_FLUSH)
    # Writes gathered before the flush go first, so the flush covers them.
    if mrb.is_write and mrb.num_reqs > 0:
        virtio_blk_submit_multireq(s.blk, mrb)
    _with_request_id(req, blk_aio_flush, s.blk, virtio_blk_flush_complete, req)


def virtio_blk_sect_range_ok(dev: VirtIOBlock, sector: int, size: int) -> bool:
    """Whether [sector, +size) is a whole number of logical blocks, aligned, inside the disk."""
    nb_sectors = size >> BDRV_SECTOR_BITS
    if nb_sectors > BDRV_REQUEST_MAX_SECTORS:
        return False
    if sector & dev.sector_mask:
        return False
    if size % dev.conf.conf.logical_block_size:
        return False
    total_sectors = blk_get_geometry(dev.blk)
    if sector > total_sectors or nb_sectors > total_sectors - sector:
        return False
    return True


def virtio_blk_handle_discard_write_zeroes(req: VirtIOBlockReq, dwz_hdr: bytes, is_write_zeroes: bool) -> int:
    """Submit a discard or write-zeroes; returns the status to complete with at once if it is refused."""
    s = req.dev
    sector, num_sectors, flags = _DWZ.unpack_from(dwz_hdr)
    max_sectors = s.conf.max_write_zeroes_sectors if is_write_zeroes else s.conf.max_discard_sectors

    if num_sectors > max_sectors:
        err_status = VIRTIO_BLK_S_IOERR
    else:
        nbytes = num_sectors << BDRV_SECTOR_BITS
        if not virtio_blk_sect_range_ok(s, sector, nbytes):
            err_status = VIRTIO_BLK_S_IOERR
        elif flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
            err_status = VIRTIO_BLK_S_UNSUPP     # unknown flags
        elif is_write_zeroes:
            blk_aio_flags = BDRV_REQ_MAY_UNMAP if flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP else 0
            block_acct_start(blk_get_stats(s.blk), req.acct, nbytes, BlockAcctType.BLOCK_ACCT_WRITE)
            _with_request_id(req, blk_aio_pwrite_zeroes, s.blk, sector << BDRV_SECTOR_BITS, nbytes,
                             blk_aio_flags, virtio_blk_discard_write_zeroes_complete, req)
            return VIRTIO_BLK_S_OK
        elif flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
            err_status = VIRTIO_BLK_S_UNSUPP     # discard never takes the unmap flag
        else:
            _with_request_id(req, blk_aio_pdiscard, s.blk, sector << BDRV_SECTOR_BITS, nbytes,
                             virtio_blk_discard_write_zeroes_complete, req)
            return VIRTIO_BLK_S_OK

    if is_write_zeroes:
        block_acct_invalid(blk_get_stats(s.blk), BlockAcctType.BLOCK_ACCT_WRITE)
    return err_status


def _virtio_blk_handle_scsi(req: VirtIOBlockReq) -> None:
    """SCSI passthrough is not offered: QEMU's answer without VIRTIO_BLK_F_SCSI (errors = 255, UNSUPP)."""
    elem = req.elem
    if elem.out_num < 2 or elem.in_num < 3:
        status = VIRTIO_BLK_S_IOERR
    else:
        scsi = elem.in_sg[elem.in_num - 2]   # struct virtio_scsi_inhdr, before the status byte
        n = min(4, scsi.nbytes)
        scsi[:n] = struct.pack("<I", 255)[:n]
        status = VIRTIO_BLK_S_UNSUPP
    virtio_blk_req_complete(req, status)
    virtio_blk_free_request(req)


def virtio_blk_handle_request(req: VirtIOBlockReq, mrb: MultiReqBuffer) -> int:
    """Parse one request and start it (or gather it in ``mrb``); -1 when its layout breaks the device."""
    s = req.dev
    # Copies: the element itself stays as popped, so a stopped request can be parsed again.
    in_iov = list(req.elem.in_sg)
    out_iov = list(req.elem.out_sg)

    if req.elem.out_num < 1 or req.elem.in_num < 1:
        virtio_error(s, "virtio-blk missing headers")
        return -1
    if iov_to_buf(out_iov, 0, req.out, _OUTHDR_SIZE) != _OUTHDR_SIZE:
        virtio_error(s, "virtio-blk request outhdr too short")
        return -1
    iov_discard_front(out_iov, _OUTHDR_SIZE)
    if in_iov[-1].nbytes < 1:
        virtio_error(s, "virtio-blk request inhdr too short")
        return -1
    # The status byte is the last byte of the device-writable buffers; in_len counts all of them.
    req.in_len = iov_size(in_iov)
    req.in_ = in_iov[-1][-1:]
    iov_discard_back(in_iov, 1)

    type_ = virtio_ldl_p(s, req.out, 0)

    # VIRTIO_BLK_T_OUT is the direction; VIRTIO_BLK_T_BARRIER is a legacy flag that is ignored.
    cmd = type_ & ~(VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_BARRIER)
    if cmd == VIRTIO_BLK_T_IN:
        is_write = bool(type_ & VIRTIO_BLK_T_OUT)
        req.sector_num = virtio_ldq_p(s, req.out, 8)
        if is_write:
            qemu_iovec_init_external(req.qiov, out_iov)
            if trace_virtio_blk_handle_write.event.enabled:
                trace_virtio_blk_handle_write(s, req, req.sector_num, req.qiov.size // BDRV_SECTOR_SIZE)
        else:
            qemu_iovec_init_external(req.qiov, in_iov)
            if trace_virtio_blk_handle_read.event.enabled:
                trace_virtio_blk_handle_read(s, req, req.sector_num, req.qiov.size // BDRV_SECTOR_SIZE)
        acct_type = BlockAcctType.BLOCK_ACCT_WRITE if is_write else BlockAcctType.BLOCK_ACCT_READ
        if not virtio_blk_sect_range_ok(s, req.sector_num, req.qiov.size):
            virtio_blk_req_complete(req, VIRTIO_BLK_S_IOERR)
            block_acct_invalid(blk_get_stats(s.blk), acct_type)
            virtio_blk_free_request(req)
            return 0
        block_acct_start(blk_get_stats(s.blk), req.acct, req.qiov.size, acct_type)
        # Submit what is gathered when the buffer is full, the direction changes or merging is off.
        if mrb.num_reqs > 0 and (mrb.num_reqs == VIRTIO_BLK_MAX_MERGE_REQS or is_write != mrb.is_write
                                 or not s.conf.request_merging):
            virtio_blk_submit_multireq(s.blk, mrb)
        assert mrb.num_reqs < VIRTIO_BLK_MAX_MERGE_REQS
        mrb.reqs[mrb.num_reqs] = req
        mrb.num_reqs += 1
        mrb.is_write = is_write
    elif cmd == VIRTIO_BLK_T_FLUSH:
        virtio_blk_handle_flush(req, mrb)
    elif cmd == VIRTIO_BLK_T_SCSI_CMD:
        _virtio_blk_handle_scsi(req)
    elif cmd == VIRTIO_BLK_T_GET_ID:
        # The serial is NUL-terminated only when it is shorter than the buffer.
        serial = (s.conf.serial or "").encode() + b"\0"
        size = min(len(serial), min(iov_size(in_iov), VIRTIO_BLK_ID_BYTES))
        iov_from_buf(in_iov, 0, serial, size)
        virtio_blk_req_complete(req, VIRTIO_BLK_S_OK)
        virtio_blk_free_request(req)
    elif cmd in (VIRTIO_BLK_T_DISCARD & ~VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES & ~VIRTIO_BLK_T_OUT):
        # Both commands carry the OUT bit, which the dispatch masked: check it here.
        out_len = iov_size(out_iov)
        is_write_zeroes = (type_ & ~VIRTIO_BLK_T_BARRIER) == VIRTIO_BLK_T_WRITE_ZEROES
        if not type_ & VIRTIO_BLK_T_OUT or out_len > _DWZ.size:
            virtio_blk_req_complete(req, VIRTIO_BLK_S_UNSUPP)   # not an OUT request, or more than one segment
            virtio_blk_free_request(req)
            return 0
        dwz_hdr = bytearray(_DWZ.size)
        if iov_to_buf(out_iov, 0, dwz_hdr, _DWZ.size) != _DWZ.size:
            virtio_error(s, "virtio-blk discard/write_zeroes header too short")
            return -1
        err_status = virtio_blk_handle_discard_write_zeroes(req, dwz_hdr, is_write_zeroes)
        if err_status != VIRTIO_BLK_S_OK:
            virtio_blk_req_complete(req, err_status)
            virtio_blk_free_request(req)
    else:
        virtio_blk_req_complete(req, VIRTIO_BLK_S_UNSUPP)
        virtio_blk_free_request(req)
    return 0


def virtio_blk_handle_vq(s: VirtIOBlock, vq: VirtQueue) -> bool:
    """Serve a kick: take every available request (notifications off meanwhile), then submit the gathered ones."""
    mrb = MultiReqBuffer()
    progress = False
    ctx = blk_get_aio_context(s.blk)
    aio_context_acquire(ctx)
    try:
        blk_io_plug(s.blk)
        while True:
            virtio_queue_set_notification(vq, False)
            while (req := virtio_blk_get_request(s, vq)) is not None:
                progress = True
                if virtio_blk_handle_request(req, mrb):
                    virtqueue_detach_element(req.vq, req.elem, 0)
                    virtio_blk_free_request(req)
                    break
            virtio_queue_set_notification(vq, True)
            # The guest may have added requests after the last pop and before notifications came back.
            if virtio_queue_empty(vq):
                break
        if mrb.num_reqs:
            virtio_blk_submit_multireq(s.blk, mrb)
        blk_io_unplug(s.blk)
    finally:
        aio_context_release(ctx)
    return progress


def virtio_blk_handle_output_do(s: VirtIOBlock, vq: VirtQueue) -> None:
    virtio_blk_handle_vq(s, vq)


def virtio_blk_handle_output(vdev: VirtIODevice, vq: VirtQueue) -> None:
    """The queue's handler for a kick that reached the device directly."""
    s: VirtIOBlock = vdev
    if s.dataplane is not None:
        # Some guests kick before DRIVER_OK: start dataplane here; it then serves the ring itself.
        virtio_device_start_ioeventfd(vdev)
        if not s.dataplane_disabled:
            return
    virtio_blk_handle_output_do(s, vq)


# ---------------------------------------------------------------------------
# Restart after the VM stopped on an error


def virtio_blk_dma_restart_bh(s: VirtIOBlock) -> None:
    """Submit again every request an error kept, as if the guest had just queued them."""
    req = s.rq
    mrb = MultiReqBuffer()
    s.rq = None
    ctx = blk_get_aio_context(s.conf.conf.blk)
    aio_context_acquire(ctx)
    try:
        while req is not None:
            next_ = req.next
            req.next = None
            if virtio_blk_handle_request(req, mrb):
                # The device is now broken until reset; the kept requests are dropped.
                while req is not None:
                    next_ = req.next
                    virtqueue_detach_element(req.vq, req.elem, 0)
                    virtio_blk_free_request(req)
                    req = next_
                break
            req = next_
        if mrb.num_reqs:
            virtio_blk_submit_multireq(s.blk, mrb)
        blk_dec_in_flight(s.conf.conf.blk)   # taken in virtio_blk_dma_restart_cb
    finally:
        aio_context_release(ctx)


def virtio_blk_dma_restart_cb(s: VirtIOBlock, running: bool, state: RunState) -> None:
    """When the VM runs again, schedule the resubmission in the BlockBackend's context."""
    if not running:
        return
    # In flight until the BH ran, so a drain in between waits for the restart (later QEMU's fix).
    blk_inc_in_flight(s.conf.conf.blk)
    aio_bh_schedule_oneshot(blk_get_aio_context(s.conf.conf.blk), virtio_blk_dma_restart_bh, s,
                            "virtio_blk_dma_restart_bh")


# ---------------------------------------------------------------------------
# Config, features, status, reset


def virtio_blk_reset(vdev: VirtIODevice) -> None:
    """Wait for requests in flight, drop the ones kept for restart, restore the original cache mode."""
    s: VirtIOBlock = vdev
    ctx = blk_get_aio_context(s.blk)
    aio_context_acquire(ctx)
    try:
        blk_drain(s.blk)
        # Only after the drain: completions during it may keep more requests.
        while s.rq is not None:
            req = s.rq
            s.rq = req.next
            virtqueue_detach_element(req.vq, req.elem, 0)
            virtio_blk_free_request(req)
    finally:
        aio_context_release(ctx)
    assert not s.dataplane_started
    blk_set_enable_write_cache(s.blk, s.original_wce)


def virtio_blk_update_config(vdev: VirtIODevice, config: bytearray) -> None:
    """Fill the config space: capacity, seg_max, geometry, block sizes, wce, num_queues, discard/zeroes limits."""
    s: VirtIOBlock = vdev
    conf = s.conf.conf
    blk_size = conf.logical_block_size
    capacity = blk_get_geometry(s.blk)
    length = capacity << BDRV_SECTOR_BITS
    if length > 0 and length // conf.heads // conf.secs % blk_size:
        sectors = conf.secs & ~s.sector_mask
    else:
        sectors = conf.secs
    max_discard = discard_seg = discard_align = 0
    if virtio_has_feature(s.blk_host_features, VIRTIO_BLK_F_DISCARD):
        granularity = conf.discard_granularity
        if granularity == 0xFFFFFFFF:
            granularity = blk_size
        max_discard = s.conf.max_discard_sectors
        discard_align = granularity >> BDRV_SECTOR_BITS
        discard_seg = 1           # one segment per request
    max_wz = wz_seg = wz_may_unmap = 0
    if virtio_has_feature(s.blk_host_features, VIRTIO_BLK_F_WRITE_ZEROES):
        max_wz = s.conf.max_write_zeroes_sectors
        wz_may_unmap = 1
        wz_seg = 1
    blkcfg = VIRTIO_BLK_CONFIG.pack(
        capacity, 0, s.conf.queue_size - 2 if s.conf.seg_max_adjust else 128 - 2,
        conf.cyls & 0xFFFF, conf.heads & 0xFF, sectors & 0xFF, blk_size,
        get_physical_block_exp(conf), 0, (conf.min_io_size // blk_size) & 0xFFFF, conf.opt_io_size // blk_size,
        int(blk_enable_write_cache(s.blk)), 0, s.conf.num_queues,
        max_discard, discard_seg, discard_align, max_wz, wz_seg, wz_may_unmap)
    config[:s.config_size] = blkcfg[:s.config_size]


def virtio_blk_set_config(vdev: VirtIODevice, config: bytearray) -> None:
    """The guest wrote the config space: only ``wce`` is writable."""
    s: VirtIOBlock = vdev
    ctx = blk_get_aio_context(s.blk)
    aio_context_acquire(ctx)
    try:
        blk_set_enable_write_cache(s.blk, config[_CFG_WCE_OFFSET] != 0)
    finally:
        aio_context_release(ctx)


def virtio_blk_get_features(vdev: VirtIODevice, features: int) -> int:
    s: VirtIOBlock = vdev
    features |= s.blk_host_features
    for fbit in (VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_GEOMETRY, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_BLK_SIZE):
        features = virtio_add_feature(features, fbit)
    if virtio_has_feature(features, VIRTIO_F_VERSION_1):
        if virtio_has_feature(s.blk_host_features, VIRTIO_BLK_F_SCSI):
            raise Error("Please set scsi=off for virtio-blk devices in order to use virtio 1.0")
    else:
        features = virtio_clear_feature(features, VIRTIO_F_ANY_LAYOUT)
    if blk_enable_write_cache(s.blk) or (s.conf.x_enable_wce_if_config_wce
                                         and virtio_has_feature(features, VIRTIO_BLK_F_CONFIG_WCE)):
        features = virtio_add_feature(features, VIRTIO_BLK_F_WCE)
    if blk_is_read_only(s.blk):
        features = virtio_add_feature(features, VIRTIO_BLK_F_RO)
    if s.conf.num_queues > 1:
        features = virtio_add_feature(features, VIRTIO_BLK_F_MQ)
    return features


def virtio_blk_set_status(vdev: VirtIODevice, status: int) -> None:
    s: VirtIOBlock = vdev
    if not status & (VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK):
        assert not s.dataplane_started
    if not status & VIRTIO_CONFIG_S_DRIVER_OK:
        return
    # A driver that negotiated CONFIG_WCE sets the cache mode through the config space; for one that
    # did not, the WCE feature it accepted decides (QEMU explains why at length).
    if not virtio_vdev_has_feature(vdev, VIRTIO_BLK_F_CONFIG_WCE):
        ctx = blk_get_aio_context(s.blk)
        aio_context_acquire(ctx)
        try:
            blk_set_enable_write_cache(s.blk, virtio_vdev_has_feature(vdev, VIRTIO_BLK_F_WCE))
        finally:
            aio_context_release(ctx)


def _virtio_resize_cb(vdev: VirtIODevice) -> None:
    virtio_notify_config(vdev)


class _VirtioBlockOps(BlockDevOps):
    """What virtio-blk hears from its BlockBackend: a resize becomes a config-change interrupt."""

    @staticmethod
    def resize_cb(opaque: VirtIOBlock) -> None:
        aio_bh_schedule_oneshot(qemu_get_aio_context(), _virtio_resize_cb, opaque, "virtio_resize_cb")


virtio_block_ops = _VirtioBlockOps()


# ---------------------------------------------------------------------------
# Realize, unrealize, the type


def virtio_blk_device_realize(dev: VirtIODevice) -> None:
    """Check the configuration, prepare the drive, add the queues (virtio_blk_handle_output serves them)."""
    s: VirtIOBlock = dev
    conf = s.conf
    blk = conf.conf.blk
    if blk is None:
        raise Error("drive property not set")
    if not blk_is_inserted(blk):
        raise Error("Device needs media, but drive is empty")
    if not conf.num_queues:
        raise Error("num-queues property must be larger than 0")
    if conf.num_queues > VIRTIO_QUEUE_MAX:
        # QEMU aborts in virtio_add_queue
        raise Error(f"num-queues property must be at most {VIRTIO_QUEUE_MAX}")
    if conf.queue_size <= 2:
        raise Error(f"invalid queue-size property ({conf.queue_size}), must be > 2")
    if not is_power_of_2(conf.queue_size) or conf.queue_size > VIRTQUEUE_MAX_SIZE:
        raise Error(f"invalid queue-size property ({conf.queue_size}), must be a power of 2 "
                    f"(max {VIRTQUEUE_MAX_SIZE})")

    blkconf_apply_backend_options(conf.conf, blk_is_read_only(blk), True)
    s.original_wce = blk_enable_write_cache(blk)
    blkconf_geometry(conf.conf, 65535, 255, 255)
    blkconf_blocksizes(conf.conf)

    if virtio_has_feature(s.blk_host_features, VIRTIO_BLK_F_DISCARD) and (
            not conf.max_discard_sectors or conf.max_discard_sectors > BDRV_REQUEST_MAX_SECTORS):
        raise Error(f"invalid max-discard-sectors property ({conf.max_discard_sectors}), "
                    f"must be between 1 and {BDRV_REQUEST_MAX_SECTORS}")
    if virtio_has_feature(s.blk_host_features, VIRTIO_BLK_F_WRITE_ZEROES) and (
            not conf.max_write_zeroes_sectors or conf.max_write_zeroes_sectors > BDRV_REQUEST_MAX_SECTORS):
        raise Error(f"invalid max-write-zeroes-sectors property ({conf.max_write_zeroes_sectors}), "
                    f"must be between 1 and {BDRV_REQUEST_MAX_SECTORS}")

    s.config_size = VIRTIO_BLK_CFG_SIZE
    if virtio_has_feature(s.blk_host_features, VIRTIO_BLK_F_DISCARD):
        s.config_size = max(s.config_size, _CFG_END_DISCARD)
    if virtio_has_feature(s.blk_host_features, VIRTIO_BLK_F_WRITE_ZEROES):
        s.config_size = max(s.config_size, _CFG_END_WRITE_ZEROES)
    virtio_init(s, "virtio-blk", VIRTIO_ID_BLOCK, s.config_size)

    s.blk = blk
    s.rq = None
    s.sector_mask = conf.conf.logical_block_size // BDRV_SECTOR_SIZE - 1

    for _ in range(conf.num_queues):
        virtio_add_queue(s, conf.queue_size, virtio_blk_handle_output)
    try:
        s.dataplane = virtio_blk_data_plane_create(s, conf)
    except Error:
        for i in range(conf.num_queues):
            virtio_del_queue(s, i)
        virtio_cleanup(s)
        raise

    # After virtio_init: on resume, the transport's handler restarts dataplane (and moves the
    # BlockBackend) before this one schedules the restart BH in the BlockBackend's context.
    s.change = qemu_add_vm_change_state_handler(virtio_blk_dma_restart_cb, s)
    blk_set_dev_ops(s.blk, virtio_block_ops, s)
    blk_set_guest_block_size(s.blk, conf.conf.logical_block_size)
    blk_iostatus_enable(s.blk)


def virtio_blk_device_unrealize(dev: VirtIODevice) -> None:
    s: VirtIOBlock = dev
    blk_drain(s.blk)
    virtio_blk_data_plane_destroy(s.dataplane)
    s.dataplane = None
    for i in range(s.conf.num_queues):
        virtio_del_queue(s, i)
    if s.change is not None:
        qemu_del_vm_change_state_handler(s.change)
        s.change = None
    blk_set_dev_ops(s.blk, None, None)
    virtio_cleanup(s)


def _iothread_resolve(name: str) -> IOThread | None:
    return iothread_by_id(name)


_prop_iothread = PropertyInfoLink("iothread", IOThread, _iothread_resolve)

virtio_blk_properties = [
    *DEFINE_BLOCK_PROPERTIES("conf.conf"),
    *DEFINE_BLOCK_ERROR_PROPERTIES("conf.conf"),
    *DEFINE_BLOCK_CHS_PROPERTIES("conf.conf"),
    DEFINE_PROP_STRING("serial", "conf.serial"),
    DEFINE_PROP_BIT64("config-wce", "blk_host_features", VIRTIO_BLK_F_CONFIG_WCE, True),
    DEFINE_PROP_BIT("request-merging", "conf.request_merging", 0, True),
    DEFINE_PROP_UINT16("num-queues", "conf.num_queues", 1),
    DEFINE_PROP_UINT16("queue-size", "conf.queue_size", 128),
    DEFINE_PROP_BOOL("seg-max-adjust", "conf.seg_max_adjust", False),
    DEFINE_PROP_LINK("iothread", "conf.iothread", _prop_iothread),
    DEFINE_PROP_BIT64("discard", "blk_host_features", VIRTIO_BLK_F_DISCARD, True),
    DEFINE_PROP_BIT64("write-zeroes", "blk_host_features", VIRTIO_BLK_F_WRITE_ZEROES, True),
    DEFINE_PROP_UINT32("max-discard-sectors", "conf.max_discard_sectors", BDRV_REQUEST_MAX_SECTORS),
    DEFINE_PROP_UINT32("max-write-zeroes-sectors", "conf.max_write_zeroes_sectors", BDRV_REQUEST_MAX_SECTORS),
    DEFINE_PROP_BOOL("x-enable-wce-if-config-wce", "conf.x_enable_wce_if_config_wce", True),
]


def virtio_blk_class_init(klass: ObjectClass, data: Any) -> None:
    device_class_set_props(klass, virtio_blk_properties)
    klass.categories = {"storage"}
    klass.vdev_realize = virtio_blk_device_realize
    klass.vdev_unrealize = virtio_blk_device_unrealize
    klass.get_config = virtio_blk_update_config
    klass.set_config = virtio_blk_set_config
    klass.get_features = virtio_blk_get_features
    klass.set_status = virtio_blk_set_status
    klass.reset = virtio_blk_reset
    klass.start_ioeventfd = virtio_blk_data_plane_start
    klass.stop_ioeventfd = virtio_blk_data_plane_stop


virtio_blk_info = TypeInfo(name=TYPE_VIRTIO_BLK, parent=TYPE_VIRTIO_DEVICE, instance_struct=VirtIOBlock,
                           class_init=virtio_blk_class_init)


def virtio_register_types() -> None:
    type_register_static(virtio_blk_info)


type_init(virtio_register_types)
