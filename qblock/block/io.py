"""The request path: QEMU's block/io.c.

Every read and write on a node walks these stages, as in QEMU (the seed shows
them for a write)::

    bdrv_co_pwritev(child, offset, bytes, qiov, flags)
      bdrv_check_byte_request                 -ENOMEDIUM, -EIO
      tracked_request_begin                   the request becomes visible to others
      bdrv_pad_request                        head / tail padding to request_alignment
        mark_request_serialising + wait       overlapping requests wait for this one
        bdrv_padding_rmw_read                 read-modify-write of the padding
      bdrv_aligned_pwritev
        bdrv_co_write_req_prepare             read-only, serialisation, before_write_notifiers
        detect-zeroes                         all-zero data becomes a zero write
        bdrv_co_do_pwrite_zeroes | bdrv_driver_pwritev, split at max_transfer
          the driver's callback               co_pwritev(_part) / aio_pwritev / co_writev(_flags) / aio_writev
          FUA emulation                       a flush after the write when the driver lacks FUA
        bdrv_co_write_req_finish              write_gen, size growth, wr_highest_offset
      tracked_request_end                     waiters are woken

Reads mirror it (padding, serialisation, copy-on-read, zeroes past the end
of the node), and write-zeroes, discard, flush, block status and truncate
have their own paths, each with QEMU's conditions and errno values.

Padding is QEMU 4.2's (bdrv_init_padding/bdrv_pad_request/
bdrv_padding_rmw_read) with the later fix that a failed RMW read fails the
write.  Flushing recurses into every child written through (QEMU 5.0+)
rather than ``bs->file`` only.  Later fixes taken as well: FUA emulation
advances ``write_gen`` before its flush (else the flush found nothing new and
skipped the disk), and copy-on-read hands the caller no more than it asked
for when a cluster reaches past the request.  A Python exception escaping a
driver hook is turned into ``-EIO`` here, traced (``bdrv_driver_exception``),
reported on stderr and kept in ``bs.last_driver_exception``: it is never lost
(an AssertionError, a broken contract, propagates instead).
"""
from __future__ import annotations

import errno
from typing import Any, Callable

import attrs

from qblock.block.driver import (
    BDRV_BLOCK_ALLOCATED,
    BDRV_BLOCK_DATA,
    BDRV_BLOCK_EOF,
    BDRV_BLOCK_OFFSET_VALID,
    BDRV_BLOCK_RAW,
    BDRV_BLOCK_ZERO,
    BDRV_O_NO_FLUSH,
    BDRV_O_UNMAP,
    BDRV_REQ_COPY_ON_READ,
    BDRV_REQ_FUA,
    BDRV_REQ_MASK,
    BDRV_REQ_MAY_UNMAP,
    BDRV_REQ_NO_FALLBACK,
    BDRV_REQ_NO_SERIALISING,
    BDRV_REQ_PREFETCH,
    BDRV_REQ_SERIALISING,
    BDRV_REQ_WRITE_COMPRESSED,
    BDRV_REQ_WRITE_UNCHANGED,
    BDRV_REQ_ZERO_WRITE,
    BDRV_REQUEST_MAX_BYTES,
    BDRV_SECTOR_BITS,
    BDRV_SECTOR_SIZE,
    INT_MAX,
    MAX_BOUNCE_BUFFER,
    NOT_DONE,
    BdrvTrackedRequestType,
    BlkdebugEvent,
    BlockDriverInfo,
    BlockdevDetectZeroesOptions,
    PreallocMode,
)
from qblock.block.graph import (
    BLK_PERM_RESIZE,
    BLK_PERM_WRITE,
    BLK_PERM_WRITE_UNCHANGED,
    BdrvChild,
    BdrvTrackedRequest,
    BlockDriverState,
    backing_bs,
    bdrv_get_aio_context,
    bdrv_get_cluster_size,
    bdrv_get_info,
    bdrv_getlength,
    bdrv_is_inserted,
    bdrv_is_read_only,
    bdrv_is_sg,
    bdrv_round_to_clusters,
    refresh_total_sectors,
)
from qblock.trace.events import (
    trace_bdrv_aligned_preadv,
    trace_bdrv_aligned_pwritev,
    trace_bdrv_before_write_notifiers,
    trace_bdrv_co_do_copy_on_readv,
    trace_bdrv_co_flush,
    trace_bdrv_co_pdiscard,
    trace_bdrv_co_preadv,
    trace_bdrv_co_pwrite_zeroes,
    trace_bdrv_co_pwritev,
    trace_bdrv_detect_zeroes,
    trace_bdrv_driver_done,
    trace_bdrv_driver_exception,
    trace_bdrv_driver_preadv,
    trace_bdrv_driver_pwritev,
    trace_bdrv_fragment,
    trace_bdrv_fua_emulate,
    trace_bdrv_mark_request_serialising,
    trace_bdrv_pad_head,
    trace_bdrv_pad_tail,
    trace_bdrv_padding_rmw_read,
    trace_bdrv_wait_serialising_requests,
)
from qblock.util.aio import AIO_WAIT_WHILE, aio_co_enter, aio_co_wake, aio_poll, aio_wait_kick
from qblock.util.aiocb import qemu_aio_ref, qemu_aio_unref
from qblock.util.coroutine import (
    coroutine_fn,
    qemu_coroutine_create,
    qemu_coroutine_self,
    qemu_coroutine_yield,
    qemu_in_coroutine,
)
from qblock.util.coroutine_lock import CoQueue, qemu_co_queue_next, qemu_co_queue_restart_all, qemu_co_queue_wait
from qblock.util.cutils import MIN_NON_ZERO, QEMU_ALIGN_DOWN, ROUND_UP
from qblock.util.error import Error, warn_report
from qblock.util.iov import (
    QEMUIOVector,
    qemu_iovec_from_buf,
    qemu_iovec_init_slice,
    qemu_iovec_is_zero,
    qemu_iovec_memset,
)
from qblock.util.notify import notifier_with_return_list_notify

READ = BdrvTrackedRequestType.BDRV_TRACKED_READ
WRITE = BdrvTrackedRequestType.BDRV_TRACKED_WRITE
DISCARD = BdrvTrackedRequestType.BDRV_TRACKED_DISCARD
TRUNCATE = BdrvTrackedRequestType.BDRV_TRACKED_TRUNCATE
_DZ_OFF = BlockdevDetectZeroesOptions.BLOCKDEV_DETECT_ZEROES_OPTIONS_OFF
_DZ_UNMAP = BlockdevDetectZeroesOptions.BLOCKDEV_DETECT_ZEROES_OPTIONS_UNMAP
_BLKDBG_PWRITEV = BlkdebugEvent.BLKDBG_PWRITEV
_BLKDBG_PWRITEV_ZERO = BlkdebugEvent.BLKDBG_PWRITEV_ZERO
_BLKDBG_PWRITEV_DONE = BlkdebugEvent.BLKDBG_PWRITEV_DONE
# Trace events tested on every request: the flag test without the function's attribute lookup.
_ev_bdrv_co_pwritev = trace_bdrv_co_pwritev.event
_ev_bdrv_co_preadv = trace_bdrv_co_preadv.event
_ev_bdrv_aligned_pwritev = trace_bdrv_aligned_pwritev.event
_ev_bdrv_aligned_preadv = trace_bdrv_aligned_preadv.event
_ev_bdrv_driver_pwritev = trace_bdrv_driver_pwritev.event
_ev_bdrv_driver_preadv = trace_bdrv_driver_preadv.event
_ev_bdrv_driver_done = trace_bdrv_driver_done.event


# --------------------------------------------------------------------------
# In-flight counting and debug events


def bdrv_inc_in_flight(bs: BlockDriverState) -> None:
    bs.in_flight += 1


def bdrv_dec_in_flight(bs: BlockDriverState) -> None:
    """One request fewer in flight; wakes anyone waiting in AIO_WAIT_WHILE (bdrv_wakeup)."""
    bs.in_flight -= 1
    aio_wait_kick()


def bdrv_debug_event(bs: BlockDriverState | None, event: BlkdebugEvent) -> None:
    """Tell a listening debug driver (blkdebug) that ``event`` happened; a no-op otherwise."""
    if bs is not None:
        drv = bs.drv
        if drv is not None and drv.bdrv_debug_event is not None:
            drv.bdrv_debug_event(bs, event)


def BLKDBG_EVENT(child: BdrvChild | None, event: BlkdebugEvent) -> None:
    """QEMU's BLKDBG_EVENT macro: the event goes to the child's node."""
    if child is not None:
        bdrv_debug_event(child.bs, event)


def _driver_exception(bs: BlockDriverState, hook: str, exc: BaseException) -> int:
    """A driver hook raised: keep it, trace it, report it, and fail the request with -EIO."""
    bs.last_driver_exception = exc
    text = f"{type(exc).__name__}: {exc}"
    if trace_bdrv_driver_exception.event.enabled:
        trace_bdrv_driver_exception(bs, hook, text)
    warn_report(f"driver '{bs.drv.format_name if bs.drv else None}' on node '{bs.node_name}': "
                f"{hook} raised {text}; the request fails with -EIO")
    return -errno.EIO


# --------------------------------------------------------------------------
# Tracked requests and serialisation


def tracked_request_begin(bs: BlockDriverState, offset: int, bytes: int, type: int) -> BdrvTrackedRequest:
    """Make a request visible to overlapping ones (it starts covering exactly its own range)."""
    req = BdrvTrackedRequest(bs, offset, bytes, type, qemu_coroutine_self(), False, offset, bytes)
    bs.tracked_requests.append(req)
    return req


def tracked_request_end(req: BdrvTrackedRequest) -> None:
    """Remove a finished request and wake whoever waited for it."""
    bs = req.bs
    if req.serialising:
        bs.serialising_in_flight -= 1
    bs.tracked_requests.remove(req)
    if req.wait_queue is not None:
        qemu_co_queue_restart_all(req.wait_queue)


def mark_request_serialising(req: BdrvTrackedRequest, align: int) -> None:
    """Widen the request's overlap range to ``align`` boundaries and make others wait for it."""
    overlap_offset = req.offset & ~(align - 1)
    overlap_bytes = ROUND_UP(req.offset + req.bytes, align) - overlap_offset
    if not req.serialising:
        req.bs.serialising_in_flight += 1
        req.serialising = True
    req.overlap_offset = min(req.overlap_offset, overlap_offset)
    req.overlap_bytes = max(req.overlap_bytes, overlap_bytes)
    if trace_bdrv_mark_request_serialising.event.enabled:
        trace_bdrv_mark_request_serialising(req.bs, req, req.overlap_offset, req.overlap_bytes)


def tracked_request_overlaps(req: BdrvTrackedRequest, offset: int, bytes: int) -> bool:
    if offset >= req.overlap_offset + req.overlap_bytes:
        return False
    if req.overlap_offset >= offset + bytes:
        return False
    return True


def wait_serialising_requests(self: BdrvTrackedRequest) -> bool:
    """Wait while a serialising request overlaps ours (or ours is serialising and overlaps one)."""
    bs = self.bs
    if not bs.serialising_in_flight:
        return False
    waited = False
    while True:
        retry = False
        for req in reversed(bs.tracked_requests):   # newest first, like QEMU's list head insertion
            if req is self or (not req.serialising and not self.serialising):
                continue
            if tracked_request_overlaps(req, self.overlap_offset, self.overlap_bytes):
                if req.co is qemu_coroutine_self():
                    raise RuntimeError("wait_serialising_requests: a request would wait for itself (reentrant I/O)")
                # A request that already waits (indirectly) for us goes first; waiting would deadlock.
                if req.waiting_for is None:
                    if trace_bdrv_wait_serialising_requests.event.enabled:
                        trace_bdrv_wait_serialising_requests(bs, self, req)
                    if req.wait_queue is None:
                        req.wait_queue = CoQueue(f"wait_queue({req.trace_name})")
                    self.waiting_for = req
                    qemu_co_queue_wait(req.wait_queue)
                    self.waiting_for = None
                    retry = True
                    waited = True
                    break
        if not retry:
            return waited


def bdrv_make_request_serialising(req: BdrvTrackedRequest, align: int) -> bool:
    mark_request_serialising(req, align)
    return wait_serialising_requests(req)


# --------------------------------------------------------------------------
# Checks


def bdrv_check_byte_request(bs: BlockDriverState, offset: int, size: int) -> int:
    """0, or the errno QEMU gives: too big or negative size -EIO, no medium -ENOMEDIUM, negative offset -EIO."""
    if size > BDRV_REQUEST_MAX_BYTES or size < 0:
        return -errno.EIO
    if not bdrv_is_inserted(bs):
        return -errno.ENOMEDIUM
    if offset < 0:
        return -errno.EIO
    return 0


# --------------------------------------------------------------------------
# Padding (QEMU 4.2: BdrvRequestPadding)


@attrs.define(eq=False, slots=True)
class BdrvRequestPadding:
    """Bounce buffer and sizes for the unaligned head and tail of a request."""

    buf: bytearray | None = None
    buf_len: int = 0
    tail_buf_off: int = 0
    head: int = 0
    tail: int = 0
    merge_reads: bool = False


def bdrv_init_padding(bs: BlockDriverState, offset: int, bytes: int) -> BdrvRequestPadding | None:
    """How much padding aligns [offset, offset+bytes) to request_alignment; None when none is needed."""
    align = bs.bl.request_alignment
    head = offset & (align - 1)
    tail = (offset + bytes) & (align - 1)
    if tail:
        tail = align - tail
    if (not head and not tail) or not bytes:
        return None
    total = head + bytes + tail
    buf_len = 2 * align if (total > align and head and tail) else align
    pad = BdrvRequestPadding(bytearray(buf_len), buf_len, buf_len - align, head, tail, total == buf_len)
    if head and trace_bdrv_pad_head.event.enabled:
        trace_bdrv_pad_head(bs, offset, head, align)
    if tail and trace_bdrv_pad_tail.event.enabled:
        trace_bdrv_pad_tail(bs, offset + bytes, tail, align)
    return pad


def bdrv_pad_request(bs: BlockDriverState, qiov: QEMUIOVector | None, qiov_offset: int, offset: int,
                     bytes: int) -> tuple[BdrvRequestPadding | None, QEMUIOVector | None, int, int, int]:
    """Extend the request to request_alignment: (pad, qiov, qiov_offset, offset, bytes) of the padded request.

    The new vector is [head bytes of the bounce buffer] + the caller's data
    + [tail bytes]; nothing is copied.  The RMW read is a separate step.
    """
    pad = bdrv_init_padding(bs, offset, bytes)
    if pad is None:
        return None, qiov, qiov_offset, offset, bytes
    buf = memoryview(pad.buf)
    views = []
    if pad.head:
        views.append(buf[:pad.head])
    if qiov is not None:
        local = QEMUIOVector()
        qemu_iovec_init_slice(local, qiov, qiov_offset, bytes)
        views.extend(local.iov)
    if pad.tail:
        views.append(buf[pad.buf_len - pad.tail:])
    new_qiov = QEMUIOVector(views, len(views) or 1)
    return pad, new_qiov, 0, offset - pad.head, bytes + pad.head + pad.tail


def bdrv_padding_rmw_read(child: BdrvChild, req: BdrvTrackedRequest, pad: BdrvRequestPadding,
                          zero_middle: bool) -> int:
    """Read the aligned blocks the padding covers into the bounce buffer (the RMW read)."""
    bs = child.bs
    align = bs.bl.request_alignment
    buf = memoryview(pad.buf)
    if pad.head or pad.merge_reads:
        nbytes = pad.buf_len if pad.merge_reads else align
        if pad.head:
            bdrv_debug_event(bs, BlkdebugEvent.BLKDBG_PWRITEV_RMW_HEAD)
        if pad.merge_reads and pad.tail:
            bdrv_debug_event(bs, BlkdebugEvent.BLKDBG_PWRITEV_RMW_TAIL)
        if trace_bdrv_padding_rmw_read.event.enabled:
            trace_bdrv_padding_rmw_read(bs, "head and tail" if pad.merge_reads and pad.tail else "head",
                                        req.overlap_offset, nbytes)
        ret = bdrv_aligned_preadv(child, req, req.overlap_offset, nbytes, align,
                                  QEMUIOVector([buf[:nbytes]], -1), 0, 0)
        if ret < 0:
            return ret
        if pad.head:
            bdrv_debug_event(bs, BlkdebugEvent.BLKDBG_PWRITEV_RMW_AFTER_HEAD)
        if pad.merge_reads and pad.tail:
            bdrv_debug_event(bs, BlkdebugEvent.BLKDBG_PWRITEV_RMW_AFTER_TAIL)
    if pad.tail and not pad.merge_reads:
        bdrv_debug_event(bs, BlkdebugEvent.BLKDBG_PWRITEV_RMW_TAIL)
        tail_offset = req.overlap_offset + req.overlap_bytes - align
        if trace_bdrv_padding_rmw_read.event.enabled:
            trace_bdrv_padding_rmw_read(bs, "tail", tail_offset, align)
        ret = bdrv_aligned_preadv(child, req, tail_offset, align, align,
                                  QEMUIOVector([buf[pad.tail_buf_off:pad.tail_buf_off + align]], -1), 0, 0)
        if ret < 0:
            return ret
        bdrv_debug_event(bs, BlkdebugEvent.BLKDBG_PWRITEV_RMW_AFTER_TAIL)
    if zero_middle:
        n = pad.buf_len - pad.head - pad.tail
        pad.buf[pad.head:pad.head + n] = bytes(n)
    return 0


# --------------------------------------------------------------------------
# Calling the driver


@attrs.define(eq=False, slots=True)
class CoroutineIOCompletion:
    """Where an AIO-style driver's completion leaves its result for the waiting coroutine."""

    coroutine: Any
    ret: int = NOT_DONE

    def describe_wait(self) -> str:
        return "completion of an AIO-style driver callback"


def bdrv_co_io_em_complete(co: CoroutineIOCompletion, ret: int) -> None:
    """The completion callback given to AIO-style drivers: store ret, wake the coroutine.

    A driver that completes before its submission returns calls this from the waiting
    coroutine itself: then there is nobody to wake, and _aio_wait does not yield (QEMU asserts).
    """
    co.ret = ret
    if co.coroutine is not qemu_coroutine_self():
        aio_co_wake(co.coroutine)


def _aio_wait(bs: BlockDriverState, hook: str, acb: Any, co: CoroutineIOCompletion) -> int:
    if acb is None:
        return -errno.EIO
    if co.ret == NOT_DONE:
        co.coroutine.waiting_on = co
        qemu_coroutine_yield()
    return co.ret


def _sector_args(offset: int, bytes: int) -> tuple[int, int]:
    if offset & (BDRV_SECTOR_SIZE - 1) or bytes & (BDRV_SECTOR_SIZE - 1):
        raise AssertionError(f"sector-based driver got an unaligned request: offset {offset} bytes {bytes}")
    if bytes > BDRV_REQUEST_MAX_BYTES:
        raise AssertionError("sector-based driver got a request beyond BDRV_REQUEST_MAX_BYTES")
    return offset >> BDRV_SECTOR_BITS, bytes >> BDRV_SECTOR_BITS


def _slice(qiov: QEMUIOVector, qiov_offset: int, bytes: int) -> QEMUIOVector:
    if qiov_offset == 0 and bytes == qiov.size:
        return qiov
    local = QEMUIOVector()
    return qemu_iovec_init_slice(local, qiov, qiov_offset, bytes)


def bdrv_driver_preadv(bs: BlockDriverState, offset: int, bytes: int, qiov: QEMUIOVector,
                       qiov_offset: int, flags: int) -> int:
    """Hand an aligned read to the driver in the first callback style it implements."""
    drv = bs.drv
    if drv is None:
        return -errno.ENOMEDIUM
    hook = "?"
    try:
        if drv.bdrv_co_preadv_part is not None:
            hook = "bdrv_co_preadv_part"
            if _ev_bdrv_driver_preadv.enabled:
                trace_bdrv_driver_preadv(bs, hook, offset, bytes, flags)
            ret = drv.bdrv_co_preadv_part(bs, offset, bytes, qiov, qiov_offset, flags)
        else:
            if qiov_offset or bytes != qiov.size:
                qiov = _slice(qiov, qiov_offset, bytes)
            if drv.bdrv_co_preadv is not None:
                hook = "bdrv_co_preadv"
                if _ev_bdrv_driver_preadv.enabled:
                    trace_bdrv_driver_preadv(bs, hook, offset, bytes, flags)
                ret = drv.bdrv_co_preadv(bs, offset, bytes, qiov, flags)
            elif drv.bdrv_aio_preadv is not None:
                hook = "bdrv_aio_preadv"
                if trace_bdrv_driver_preadv.event.enabled:
                    trace_bdrv_driver_preadv(bs, hook, offset, bytes, flags)
                co = CoroutineIOCompletion(qemu_coroutine_self())
                ret = _aio_wait(bs, hook, drv.bdrv_aio_preadv(bs, offset, bytes, qiov, flags,
                                                              bdrv_co_io_em_complete, co), co)
            elif drv.bdrv_co_readv is not None:
                hook = "bdrv_co_readv"
                if trace_bdrv_driver_preadv.event.enabled:
                    trace_bdrv_driver_preadv(bs, hook, offset, bytes, flags)
                sector_num, nb_sectors = _sector_args(offset, bytes)
                ret = drv.bdrv_co_readv(bs, sector_num, nb_sectors, qiov)
            elif drv.bdrv_aio_readv is not None:
                hook = "bdrv_aio_readv"
                if trace_bdrv_driver_preadv.event.enabled:
                    trace_bdrv_driver_preadv(bs, hook, offset, bytes, flags)
                sector_num, nb_sectors = _sector_args(offset, bytes)
                co = CoroutineIOCompletion(qemu_coroutine_self())
                ret = _aio_wait(bs, hook, drv.bdrv_aio_readv(bs, sector_num, qiov, nb_sectors,
                                                             bdrv_co_io_em_complete, co), co)
            else:
                return -errno.ENOTSUP
    except AssertionError:
        raise
    except Exception as e:  # noqa: BLE001 - the driver boundary
        return _driver_exception(bs, hook, e)
    if _ev_bdrv_driver_done.enabled:
        trace_bdrv_driver_done(bs, hook, ret)
    return ret


def bdrv_driver_pwritev(bs: BlockDriverState, offset: int, bytes: int, qiov: QEMUIOVector,
                        qiov_offset: int, flags: int) -> int:
    """Hand an aligned write to the driver; emulate FUA with a flush when the driver lacks it."""
    if flags & ~BDRV_REQ_MASK or flags & BDRV_REQ_NO_FALLBACK:
        raise AssertionError(f"bdrv_driver_pwritev: bad flags {flags:#x}")
    drv = bs.drv
    if drv is None:
        return -errno.ENOMEDIUM
    supported = bs.supported_write_flags
    hook = "?"
    try:
        if drv.bdrv_co_pwritev_part is not None:
            hook = "bdrv_co_pwritev_part"
            if _ev_bdrv_driver_pwritev.enabled:
                trace_bdrv_driver_pwritev(bs, hook, offset, bytes, flags & supported)
            ret = drv.bdrv_co_pwritev_part(bs, offset, bytes, qiov, qiov_offset, flags & supported)
            flags &= ~supported
        else:
            if qiov_offset or bytes != qiov.size:
                qiov = _slice(qiov, qiov_offset, bytes)
            if drv.bdrv_co_pwritev is not None:
                hook = "bdrv_co_pwritev"
                if _ev_bdrv_driver_pwritev.enabled:
                    trace_bdrv_driver_pwritev(bs, hook, offset, bytes, flags & supported)
                ret = drv.bdrv_co_pwritev(bs, offset, bytes, qiov, flags & supported)
                flags &= ~supported
            elif drv.bdrv_aio_pwritev is not None:
                hook = "bdrv_aio_pwritev"
                if trace_bdrv_driver_pwritev.event.enabled:
                    trace_bdrv_driver_pwritev(bs, hook, offset, bytes, flags & supported)
                co = CoroutineIOCompletion(qemu_coroutine_self())
                acb = drv.bdrv_aio_pwritev(bs, offset, bytes, qiov, flags & supported, bdrv_co_io_em_complete, co)
                flags &= ~supported
                ret = _aio_wait(bs, hook, acb, co)
            elif drv.bdrv_co_writev_flags is not None:
                hook = "bdrv_co_writev_flags"
                if trace_bdrv_driver_pwritev.event.enabled:
                    trace_bdrv_driver_pwritev(bs, hook, offset, bytes, flags & supported)
                sector_num, nb_sectors = _sector_args(offset, bytes)
                ret = drv.bdrv_co_writev_flags(bs, sector_num, nb_sectors, qiov, flags & supported)
                flags &= ~supported
            elif drv.bdrv_co_writev is not None:
                hook = "bdrv_co_writev"
                if trace_bdrv_driver_pwritev.event.enabled:
                    trace_bdrv_driver_pwritev(bs, hook, offset, bytes, 0)
                sector_num, nb_sectors = _sector_args(offset, bytes)
                ret = drv.bdrv_co_writev(bs, sector_num, nb_sectors, qiov)
            elif drv.bdrv_aio_writev is not None:
                hook = "bdrv_aio_writev"
                if trace_bdrv_driver_pwritev.event.enabled:
                    trace_bdrv_driver_pwritev(bs, hook, offset, bytes, 0)
                sector_num, nb_sectors = _sector_args(offset, bytes)
                co = CoroutineIOCompletion(qemu_coroutine_self())
                ret = _aio_wait(bs, hook, drv.bdrv_aio_writev(bs, sector_num, qiov, nb_sectors,
                                                              bdrv_co_io_em_complete, co), co)
            else:
                return -errno.ENOTSUP
    except AssertionError:
        raise
    except Exception as e:  # noqa: BLE001 - the driver boundary
        return _driver_exception(bs, hook, e)
    if _ev_bdrv_driver_done.enabled:
        trace_bdrv_driver_done(bs, hook, ret)
    # emulate_flags: FUA the driver could not honour becomes a flush.
    if ret == 0 and flags & BDRV_REQ_FUA:
        if trace_bdrv_fua_emulate.event.enabled:
            trace_bdrv_fua_emulate(bs, offset, bytes)
        # bdrv_co_write_req_finish bumps write_gen only after we return, so without this the
        # flush would see nothing written since the last one and skip the disk (QEMU's bug,
        # fixed upstream in 2025 by advancing the generation before the emulated flush).
        bs.write_gen += 1
        ret = bdrv_co_flush(bs)
    return ret


def bdrv_driver_pwritev_compressed(bs: BlockDriverState, offset: int, bytes: int, qiov: QEMUIOVector,
                                   qiov_offset: int) -> int:
    drv = bs.drv
    if drv is None:
        return -errno.ENOMEDIUM
    if drv.bdrv_co_pwritev_compressed is None:
        return -errno.ENOTSUP
    try:
        return drv.bdrv_co_pwritev_compressed(bs, offset, bytes, _slice(qiov, qiov_offset, bytes))
    except Exception as e:  # noqa: BLE001 - the driver boundary
        return _driver_exception(bs, "bdrv_co_pwritev_compressed", e)


# --------------------------------------------------------------------------
# Reads


def bdrv_co_do_copy_on_readv(child: BdrvChild, offset: int, bytes: int, qiov: QEMUIOVector,
                             qiov_offset: int, flags: int) -> int:
    """Read whole clusters through a bounce buffer and write the unallocated ones back (copy-on-read)."""
    bs = child.bs
    drv = bs.drv
    if drv is None:
        return -errno.ENOMEDIUM
    max_transfer = MIN_NON_ZERO(bs.bl.max_transfer, BDRV_REQUEST_MAX_BYTES)
    cluster_offset, cluster_bytes = bdrv_round_to_clusters(bs, offset, bytes)
    skip_bytes = offset - cluster_offset
    if trace_bdrv_co_do_copy_on_readv.event.enabled:
        trace_bdrv_co_do_copy_on_readv(bs, offset, bytes, cluster_offset, cluster_bytes)
    bounce = bytearray(min(max_transfer, cluster_bytes, MAX_BOUNCE_BUFFER))
    progress = 0
    while cluster_bytes:
        ret, pnum = bdrv_is_allocated(bs, cluster_offset, min(cluster_bytes, max_transfer))
        if ret < 0:
            pnum = min(cluster_bytes, max_transfer)
        if ret == 0 and pnum == 0:
            break  # the image ends in the middle of the cluster
        if skip_bytes >= pnum:
            # QEMU asserts it too: allocation must not change inside the cluster before the request.
            raise AssertionError(f"{bs.node_name}: allocation status changes inside a cluster "
                                 f"(pnum {pnum} at {cluster_offset}, request at {offset})")
        if ret <= 0:
            pnum = min(pnum, MAX_BOUNCE_BUFFER)
            want = min(pnum - skip_bytes, bytes - progress)   # what the caller asked for in this piece
            bview = memoryview(bounce)[:pnum]
            local = QEMUIOVector([bview], -1)
            ret = bdrv_driver_preadv(bs, cluster_offset, pnum, local, 0, 0)
            if ret < 0:
                return ret
            bdrv_debug_event(bs, BlkdebugEvent.BLKDBG_COR_WRITE)
            if drv.bdrv_co_pwrite_zeroes is not None and not any(bview):
                ret = bdrv_co_do_pwrite_zeroes(bs, cluster_offset, pnum, BDRV_REQ_WRITE_UNCHANGED)
            else:
                ret = bdrv_driver_pwritev(bs, cluster_offset, pnum, local, 0, BDRV_REQ_WRITE_UNCHANGED)
            if ret < 0:
                return ret
            # The last cluster may reach past the request: hand out only what was asked for.
            if want > 0 and not flags & BDRV_REQ_PREFETCH:  # PREFETCH only populates the image
                qemu_iovec_from_buf(qiov, qiov_offset + progress, bview[skip_bytes:], want)
        else:
            # Read directly into the destination, no further than the request (later QEMU's
            # MIN(pnum - skip_bytes, bytes - progress); 4.1 overran a cluster that ends beyond it).
            want = min(pnum - skip_bytes, bytes - progress)
            if want > 0:
                ret = bdrv_driver_preadv(bs, offset + progress, want, qiov, qiov_offset + progress, 0)
                if ret < 0:
                    return ret
        cluster_offset += pnum
        cluster_bytes -= pnum
        progress += pnum - skip_bytes
        skip_bytes = 0
    return 0


def bdrv_aligned_preadv(child: BdrvChild, req: BdrvTrackedRequest, offset: int, bytes: int, align: int,
                        qiov: QEMUIOVector, qiov_offset: int, flags: int) -> int:
    """Forward an aligned read: serialisation, copy-on-read, zeroes past the end, max_transfer splitting."""
    bs = child.bs
    if _ev_bdrv_aligned_preadv.enabled:
        trace_bdrv_aligned_preadv(bs, offset, bytes, flags)
    max_transfer = QEMU_ALIGN_DOWN(MIN_NON_ZERO(bs.bl.max_transfer, INT_MAX), align)
    if flags & BDRV_REQ_COPY_ON_READ:
        # Touching the same cluster counts as overlapping, so allocating writes do not race COR.
        mark_request_serialising(req, bdrv_get_cluster_size(bs))
    if not flags & BDRV_REQ_NO_SERIALISING:
        wait_serialising_requests(req)
    if flags & BDRV_REQ_COPY_ON_READ:
        ret, pnum = bdrv_is_allocated(bs, offset, bytes)
        if ret < 0:
            return ret
        if not ret or pnum != bytes:
            ret = bdrv_co_do_copy_on_readv(child, offset, bytes, qiov, qiov_offset, flags)
            return ret if ret < 0 else 0
        if flags & BDRV_REQ_PREFETCH:
            return 0  # allocated already: a prefetch (NBD_CMD_CACHE, qiov None) has nothing to do
    total_bytes = bdrv_getlength(bs)
    if total_bytes < 0:
        return total_bytes
    max_bytes = ROUND_UP(max(0, total_bytes - offset), align)
    if bytes <= max_bytes and bytes <= max_transfer:
        ret = bdrv_driver_preadv(bs, offset, bytes, qiov, qiov_offset, 0)
        return ret if ret < 0 else 0
    if bytes > max_transfer and trace_bdrv_fragment.event.enabled:
        trace_bdrv_fragment(bs, offset, bytes, max_transfer)
    remaining = bytes
    while remaining:
        done = bytes - remaining
        if max_bytes:
            num = min(remaining, max_bytes, max_transfer)
            ret = bdrv_driver_preadv(bs, offset + done, num, qiov, qiov_offset + done, 0)
            max_bytes -= num
        else:
            num = remaining
            ret = qemu_iovec_memset(qiov, qiov_offset + done, 0, remaining)
        if ret < 0:
            return ret
        remaining -= num
    return 0


@coroutine_fn
def bdrv_co_preadv_part(child: BdrvChild, offset: int, bytes: int, qiov: QEMUIOVector,
                        qiov_offset: int, flags: int = 0) -> int:
    """Read ``bytes`` at ``offset`` into ``qiov`` from ``qiov_offset`` (block/io.c: bdrv_co_preadv_part)."""
    bs = child.bs
    if _ev_bdrv_co_preadv.enabled:
        trace_bdrv_co_preadv(bs, offset, bytes, flags)
    ret = bdrv_check_byte_request(bs, offset, bytes)
    if ret < 0:
        return ret
    if bytes == 0 and offset & (bs.bl.request_alignment - 1):
        return 0  # aligning an empty request is nonsense, but not an error
    bdrv_inc_in_flight(bs)
    if bs.copy_on_read and not flags & BDRV_REQ_NO_SERIALISING:
        flags |= BDRV_REQ_COPY_ON_READ
    pad, qiov, qiov_offset, offset, bytes = bdrv_pad_request(bs, qiov, qiov_offset, offset, bytes)
    req = tracked_request_begin(bs, offset, bytes, READ)
    try:
        ret = bdrv_aligned_preadv(child, req, offset, bytes, bs.bl.request_alignment, qiov, qiov_offset, flags)
    finally:
        tracked_request_end(req)
        bdrv_dec_in_flight(bs)
    return ret


@coroutine_fn
def bdrv_co_preadv(child: BdrvChild, offset: int, bytes: int, qiov: QEMUIOVector, flags: int = 0) -> int:
    """Read ``bytes`` at ``offset`` into ``qiov`` (block/io.c: bdrv_co_preadv)."""
    return bdrv_co_preadv_part(child, offset, bytes, qiov, 0, flags)


# --------------------------------------------------------------------------
# Writes


def bdrv_co_write_req_prepare(child: BdrvChild, offset: int, bytes: int, req: BdrvTrackedRequest,
                              flags: int) -> int:
    """Before a write or discard: read-only check, serialisation, permissions, before-write notifiers."""
    bs = child.bs
    if bs.read_only:
        return -errno.EPERM
    if flags & BDRV_REQ_SERIALISING:
        mark_request_serialising(req, bdrv_get_cluster_size(bs))
    wait_serialising_requests(req)
    if flags & BDRV_REQ_WRITE_UNCHANGED:
        if not child.perm & (BLK_PERM_WRITE_UNCHANGED | BLK_PERM_WRITE):
            raise AssertionError(f"write-unchanged request through '{child.name}' without the permission")
    elif not child.perm & BLK_PERM_WRITE:
        raise AssertionError(f"write request through edge '{child.name}' of {child.trace_name} "
                             f"without the WRITE permission")
    end_sector = (offset + bytes + BDRV_SECTOR_SIZE - 1) >> BDRV_SECTOR_BITS
    if end_sector > bs.total_sectors and not child.perm & BLK_PERM_RESIZE and req.type != DISCARD:
        raise AssertionError(f"write beyond the end of {bs.node_name} without the RESIZE permission")
    if not bs.before_write_notifiers.notifiers:
        return 0
    ret = notifier_with_return_list_notify(bs.before_write_notifiers, req)
    if trace_bdrv_before_write_notifiers.event.enabled:
        trace_bdrv_before_write_notifiers(bs, offset, bytes, ret)
    return ret


def bdrv_parent_cb_resize(bs: BlockDriverState) -> None:
    for c in list(bs.parents):
        c.klass.resize(c)


def bdrv_co_write_req_finish(child: BdrvChild, offset: int, bytes: int, req: BdrvTrackedRequest, ret: int) -> None:
    """After a write or discard: bump write_gen, grow the node, remember the highest offset written."""
    bs = child.bs
    bs.write_gen += 1
    end = offset + bytes
    end_sector = (end + BDRV_SECTOR_SIZE - 1) >> BDRV_SECTOR_BITS
    if ret == 0 and end_sector > bs.total_sectors and req.type != DISCARD:
        bs.total_sectors = end_sector
        bdrv_parent_cb_resize(bs)
    if req.bytes and req.type == WRITE:
        if end > bs.wr_highest_offset:
            bs.wr_highest_offset = end


def bdrv_aligned_pwritev(child: BdrvChild, req: BdrvTrackedRequest, offset: int, bytes: int, align: int,
                         qiov: QEMUIOVector | None, qiov_offset: int, flags: int) -> int:
    """Forward an aligned write to the driver, splitting it at max_transfer (block/io.c)."""
    bs = child.bs
    drv = bs.drv
    if drv is None:
        return -errno.ENOMEDIUM
    if _ev_bdrv_aligned_pwritev.enabled:
        trace_bdrv_aligned_pwritev(bs, offset, bytes, flags)
    max_transfer = QEMU_ALIGN_DOWN(MIN_NON_ZERO(bs.bl.max_transfer, INT_MAX), align)
    ret = bdrv_co_write_req_prepare(child, offset, bytes, req, flags)
    if (ret == 0 and bs.detect_zeroes is not _DZ_OFF and not flags & BDRV_REQ_ZERO_WRITE
            and drv.bdrv_co_pwrite_zeroes is not None and qiov is not None
            and qemu_iovec_is_zero(qiov, qiov_offset, bytes)):
        flags |= BDRV_REQ_ZERO_WRITE
        if bs.detect_zeroes is _DZ_UNMAP:
            flags |= BDRV_REQ_MAY_UNMAP
        if trace_bdrv_detect_zeroes.event.enabled:
            trace_bdrv_detect_zeroes(bs, offset, bytes, flags)
    if ret < 0:
        pass  # a before-write notifier failed the request
    elif flags & BDRV_REQ_ZERO_WRITE:
        bdrv_debug_event(bs, _BLKDBG_PWRITEV_ZERO)
        ret = bdrv_co_do_pwrite_zeroes(bs, offset, bytes, flags)
    elif flags & BDRV_REQ_WRITE_COMPRESSED:
        ret = bdrv_driver_pwritev_compressed(bs, offset, bytes, qiov, qiov_offset)
    elif bytes <= max_transfer:
        bdrv_debug_event(bs, _BLKDBG_PWRITEV)
        ret = bdrv_driver_pwritev(bs, offset, bytes, qiov, qiov_offset, flags)
    else:
        bdrv_debug_event(bs, _BLKDBG_PWRITEV)
        if trace_bdrv_fragment.event.enabled:
            trace_bdrv_fragment(bs, offset, bytes, max_transfer)
        remaining = bytes
        while remaining:
            num = min(remaining, max_transfer)
            local_flags = flags
            if num < remaining and flags & BDRV_REQ_FUA and not bs.supported_write_flags & BDRV_REQ_FUA:
                # FUA emulated by a flush: only the last fragment needs it.
                local_flags &= ~BDRV_REQ_FUA
            done = bytes - remaining
            ret = bdrv_driver_pwritev(bs, offset + done, num, qiov, qiov_offset + done, local_flags)
            if ret < 0:
                break
            remaining -= num
    bdrv_debug_event(bs, _BLKDBG_PWRITEV_DONE)
    if ret >= 0:
        ret = 0
    bdrv_co_write_req_finish(child, offset, bytes, req, ret)
    return ret


def bdrv_co_do_zero_pwritev(child: BdrvChild, offset: int, bytes: int, flags: int, req: BdrvTrackedRequest) -> int:
    """An unaligned zero write: RMW the head block as data, zero the aligned middle, RMW the tail block."""
    bs = child.bs
    align = bs.bl.request_alignment
    pad = bdrv_init_padding(bs, offset, bytes)
    if pad is not None:
        mark_request_serialising(req, align)
        wait_serialising_requests(req)
        ret = bdrv_padding_rmw_read(child, req, pad, True)
        if ret < 0:
            return ret
        buf = memoryview(pad.buf)
        if pad.head or pad.merge_reads:
            aligned_offset = offset & ~(align - 1)
            write_bytes = pad.buf_len if pad.merge_reads else align
            ret = bdrv_aligned_pwritev(child, req, aligned_offset, write_bytes, align,
                                       QEMUIOVector([buf[:write_bytes]], -1), 0, flags & ~BDRV_REQ_ZERO_WRITE)
            if ret < 0 or pad.merge_reads:
                return ret
            offset += write_bytes - pad.head
            bytes -= write_bytes - pad.head
    if bytes >= align:
        aligned_bytes = bytes & ~(align - 1)
        ret = bdrv_aligned_pwritev(child, req, offset, aligned_bytes, align, None, 0, flags)
        if ret < 0:
            return ret
        bytes -= aligned_bytes
        offset += aligned_bytes
    if bytes:
        tail = memoryview(pad.buf)[pad.tail_buf_off:pad.tail_buf_off + align]
        return bdrv_aligned_pwritev(child, req, offset, align, align, QEMUIOVector([tail], -1), 0,
                                    flags & ~BDRV_REQ_ZERO_WRITE)
    return 0


@coroutine_fn
def bdrv_co_pwritev_part(child: BdrvChild, offset: int, bytes: int, qiov: QEMUIOVector | None,
                         qiov_offset: int, flags: int = 0) -> int:
    """Write ``bytes`` at ``offset`` from ``qiov`` (block/io.c: bdrv_co_pwritev_part)."""
    bs = child.bs
    if _ev_bdrv_co_pwritev.enabled:
        trace_bdrv_co_pwritev(bs, offset, bytes, flags)
    if bs.drv is None:
        return -errno.ENOMEDIUM
    ret = bdrv_check_byte_request(bs, offset, bytes)
    if ret < 0:
        return ret
    align = bs.bl.request_alignment
    if flags & BDRV_REQ_NO_FALLBACK and (offset | bytes) & (align - 1):
        return -errno.ENOTSUP  # a misaligned request cannot be made efficient
    if bytes == 0 and offset & (align - 1):
        return 0
    bdrv_inc_in_flight(bs)
    # The tracked request covers the RMW reads too, not only bdrv_aligned_pwritev.
    req = tracked_request_begin(bs, offset, bytes, WRITE)
    try:
        if flags & BDRV_REQ_ZERO_WRITE:
            return bdrv_co_do_zero_pwritev(child, offset, bytes, flags, req)
        pad, qiov, qiov_offset, offset, bytes = bdrv_pad_request(bs, qiov, qiov_offset, offset, bytes)
        if pad is not None:
            mark_request_serialising(req, align)
            wait_serialising_requests(req)
            ret = bdrv_padding_rmw_read(child, req, pad, False)
            if ret < 0:
                return ret
        return bdrv_aligned_pwritev(child, req, offset, bytes, align, qiov, qiov_offset, flags)
    finally:
        tracked_request_end(req)
        bdrv_dec_in_flight(bs)


@coroutine_fn
def bdrv_co_pwritev(child: BdrvChild, offset: int, bytes: int, qiov: QEMUIOVector | None, flags: int = 0) -> int:
    """Write ``bytes`` at ``offset`` from ``qiov`` (block/io.c: bdrv_co_pwritev)."""
    return bdrv_co_pwritev_part(child, offset, bytes, qiov, 0, flags)


# Byte-buffer forms (include/block/block-io.h: bdrv_co_pread/bdrv_co_pwrite; block/io.c:
# bdrv_co_pwrite_sync).  ``buf`` is a bytes-like object (writable for reads); 0 or -errno.


@coroutine_fn
def bdrv_co_pread(child: BdrvChild, offset: int, bytes: int, buf, flags: int = 0) -> int:
    """Read ``bytes`` at ``offset`` into ``buf``."""
    view = memoryview(buf).cast("B")[:bytes]
    return bdrv_co_preadv(child, offset, bytes, QEMUIOVector([view], -1), flags)


@coroutine_fn
def bdrv_co_pwrite(child: BdrvChild, offset: int, bytes: int, buf, flags: int = 0) -> int:
    """Write ``bytes`` of ``buf`` at ``offset``."""
    view = memoryview(buf).cast("B")[:bytes]
    return bdrv_co_pwritev(child, offset, bytes, QEMUIOVector([view], -1), flags)


@coroutine_fn
def bdrv_co_pwrite_sync(child: BdrvChild, offset: int, bytes: int, buf, flags: int = 0) -> int:
    """Write, then flush the child's node: no later write can reach the disk before this one."""
    ret = bdrv_co_pwrite(child, offset, bytes, buf, flags)
    if ret < 0:
        return ret
    ret = bdrv_co_flush(child.bs)
    return ret if ret < 0 else 0


def bdrv_co_do_pwrite_zeroes(bs: BlockDriverState, offset: int, bytes: int, flags: int) -> int:
    """Zero a range: the driver's write-zeroes in aligned chunks, else a zeroed bounce buffer.

    MAY_UNMAP counts only on a node opened with discard=unmap.  QEMU 4.x checked that in
    bdrv_co_pwrite_zeroes, which blk_co_pwrite_zeroes bypasses; later QEMU checks it here.
    """
    drv = bs.drv
    if drv is None:
        return -errno.ENOMEDIUM
    if not bs.open_flags & BDRV_O_UNMAP:
        flags &= ~BDRV_REQ_MAY_UNMAP
    if (flags & ~bs.supported_zero_flags) & BDRV_REQ_NO_FALLBACK:
        return -errno.ENOTSUP
    max_write_zeroes = MIN_NON_ZERO(bs.bl.max_pwrite_zeroes, INT_MAX)
    alignment = max(bs.bl.pwrite_zeroes_alignment, bs.bl.request_alignment)
    max_transfer = MIN_NON_ZERO(bs.bl.max_transfer, MAX_BOUNCE_BUFFER)
    head = offset % alignment
    tail = (offset + bytes) % alignment
    max_write_zeroes = QEMU_ALIGN_DOWN(max_write_zeroes, alignment)
    if alignment % bs.bl.request_alignment or max_write_zeroes < bs.bl.request_alignment:
        # QEMU asserts here; going on would loop forever on zero-byte chunks.
        raise AssertionError(f"{bs.node_name}: pwrite_zeroes_alignment {bs.bl.pwrite_zeroes_alignment} / "
                             f"max_pwrite_zeroes {bs.bl.max_pwrite_zeroes} do not fit request_alignment "
                             f"{bs.bl.request_alignment}")
    need_flush = False
    bounce: bytearray | None = None
    ret = 0
    while bytes > 0 and not ret:
        num = bytes
        if head:
            # A small request up to the first aligned boundary.
            num = min(bytes, max_transfer, alignment - head)
            head = (head + num) % alignment
        elif tail and num > alignment:
            num -= tail  # leave the unaligned tail for its own request
        if num > max_write_zeroes:
            num = max_write_zeroes
        ret = -errno.ENOTSUP
        if drv.bdrv_co_pwrite_zeroes is not None:
            try:
                ret = drv.bdrv_co_pwrite_zeroes(bs, offset, num, flags & bs.supported_zero_flags)
            except AssertionError:
                raise
            except Exception as e:  # noqa: BLE001 - the driver boundary
                ret = _driver_exception(bs, "bdrv_co_pwrite_zeroes", e)
            if ret != -errno.ENOTSUP and flags & BDRV_REQ_FUA and not bs.supported_zero_flags & BDRV_REQ_FUA:
                need_flush = True
        if ret == -errno.ENOTSUP and not flags & BDRV_REQ_NO_FALLBACK:
            write_flags = flags & ~(BDRV_REQ_ZERO_WRITE | BDRV_REQ_MAY_UNMAP | BDRV_REQ_NO_FALLBACK)
            if flags & BDRV_REQ_FUA and not bs.supported_write_flags & BDRV_REQ_FUA:
                write_flags &= ~BDRV_REQ_FUA  # one flush at the end, not one per chunk
                need_flush = True
            num = min(num, max_transfer)
            if bounce is None or len(bounce) < num:
                bounce = bytearray(num)
            ret = bdrv_driver_pwritev(bs, offset, num, QEMUIOVector([memoryview(bounce)[:num]], -1), 0,
                                      write_flags)
        offset += num
        bytes -= num
    if ret == 0 and need_flush:
        bs.write_gen += 1  # as in bdrv_driver_pwritev: the flush must not look redundant
        ret = bdrv_co_flush(bs)
    return ret


@coroutine_fn
def bdrv_co_pwrite_zeroes(child: BdrvChild, offset: int, bytes: int, flags: int = 0) -> int:
    """Zero ``bytes`` at ``offset`` (MAY_UNMAP is dropped in bdrv_co_do_pwrite_zeroes unless discard=unmap)."""
    if trace_bdrv_co_pwrite_zeroes.event.enabled:
        trace_bdrv_co_pwrite_zeroes(child.bs, offset, bytes, flags)
    return bdrv_co_pwritev(child, offset, bytes, None, BDRV_REQ_ZERO_WRITE | flags)


# --------------------------------------------------------------------------
# Discard


@coroutine_fn
def bdrv_co_pdiscard(child: BdrvChild, offset: int, bytes: int) -> int:
    """Discard a range (advisory): a no-op unless discard=unmap and the driver discards."""
    bs = child.bs
    if bs is None or bs.drv is None:
        return -errno.ENOMEDIUM
    if trace_bdrv_co_pdiscard.event.enabled:
        trace_bdrv_co_pdiscard(bs, offset, bytes)
    ret = bdrv_check_byte_request(bs, offset, bytes)
    if ret < 0:
        return ret
    if not bs.open_flags & BDRV_O_UNMAP:
        return 0
    drv = bs.drv
    if drv.bdrv_co_pdiscard is None and drv.bdrv_aio_pdiscard is None:
        return 0
    align = max(bs.bl.pdiscard_alignment, bs.bl.request_alignment)
    head = offset % align
    tail = (offset + bytes) % align
    bdrv_inc_in_flight(bs)
    req = tracked_request_begin(bs, offset, bytes, DISCARD)
    try:
        ret = bdrv_co_write_req_prepare(child, offset, bytes, req, 0)
        if ret < 0:
            return ret
        max_pdiscard = QEMU_ALIGN_DOWN(MIN_NON_ZERO(bs.bl.max_pdiscard, INT_MAX), align)
        ralign = bs.bl.request_alignment
        if align % ralign or max_pdiscard < ralign:
            # QEMU asserts here; going on would loop forever on zero-byte chunks.
            raise AssertionError(f"{bs.node_name}: pdiscard_alignment {bs.bl.pdiscard_alignment} / max_pdiscard "
                                 f"{bs.bl.max_pdiscard} do not fit request_alignment {ralign}")
        while bytes > 0:
            num = bytes
            if head:
                # Small requests up to the alignment boundary.
                num = min(bytes, align - head)
                if num % ralign:
                    num %= ralign
                head = (head + num) % align
            elif tail:
                if num > align:
                    num -= tail  # up to the last aligned boundary
                elif tail % ralign and tail > ralign:
                    tail %= ralign
                    num -= tail
            if num > max_pdiscard:
                num = max_pdiscard
            if bs.drv is None:
                ret = -errno.ENOMEDIUM
                return ret
            try:
                if drv.bdrv_co_pdiscard is not None:
                    ret = drv.bdrv_co_pdiscard(bs, offset, num)
                else:
                    co = CoroutineIOCompletion(qemu_coroutine_self())
                    ret = _aio_wait(bs, "bdrv_aio_pdiscard",
                                    drv.bdrv_aio_pdiscard(bs, offset, num, bdrv_co_io_em_complete, co), co)
            except AssertionError:
                raise
            except Exception as e:  # noqa: BLE001 - the driver boundary
                ret = _driver_exception(bs, "bdrv_co_pdiscard", e)
            if ret and ret != -errno.ENOTSUP:
                return ret
            offset += num
            bytes -= num
        ret = 0
        return ret
    finally:
        bdrv_co_write_req_finish(child, req.offset, req.bytes, req, ret)
        tracked_request_end(req)
        bdrv_dec_in_flight(bs)


# --------------------------------------------------------------------------
# Flush


@coroutine_fn
def bdrv_co_flush(bs: BlockDriverState) -> int:
    """Flush ``bs``: to the OS, then to disk unless nothing was written since the last flush, then its children."""
    bdrv_inc_in_flight(bs)
    try:
        if not bdrv_is_inserted(bs) or bdrv_is_read_only(bs) or bdrv_is_sg(bs):
            return 0
        current_gen = bs.write_gen
        while bs.active_flush_req:
            qemu_co_queue_wait(bs.flush_queue)
        bs.active_flush_req = True
        try:
            if trace_bdrv_co_flush.event.enabled:
                trace_bdrv_co_flush(bs, current_gen, bs.flushed_gen)
            ret = _bdrv_co_do_flush(bs, current_gen)
            if ret == 0:
                bs.flushed_gen = current_gen
        finally:
            # Even if something raised: a flush left "active" would block every later one.
            bs.active_flush_req = False
            qemu_co_queue_next(bs.flush_queue)
        return ret
    finally:
        bdrv_dec_in_flight(bs)


def _bdrv_co_do_flush(bs: BlockDriverState, current_gen: int) -> int:
    drv = bs.drv
    if drv is None:
        return -errno.ENOMEDIUM  # ejected while this flush waited for an earlier one
    try:
        if drv.bdrv_co_flush is not None:
            return drv.bdrv_co_flush(bs)
        BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_FLUSH_TO_OS)
        if drv.bdrv_co_flush_to_os is not None:
            ret = drv.bdrv_co_flush_to_os(bs)
            if ret < 0:
                return ret
        if not bs.open_flags & BDRV_O_NO_FLUSH and bs.flushed_gen != current_gen:
            BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_FLUSH_TO_DISK)
            if bs.drv is None:
                return -errno.ENOMEDIUM
            if drv.bdrv_co_flush_to_disk is not None:
                ret = drv.bdrv_co_flush_to_disk(bs)
            elif drv.bdrv_aio_flush is not None:
                co = CoroutineIOCompletion(qemu_coroutine_self())
                ret = _aio_wait(bs, "bdrv_aio_flush", drv.bdrv_aio_flush(bs, bdrv_co_io_em_complete, co), co)
            else:
                ret = 0  # a driver that cannot flush: trust the user's choice of cache mode
            if ret < 0:
                return ret
    except AssertionError:
        raise
    except Exception as e:  # noqa: BLE001 - the driver boundary
        return _driver_exception(bs, "flush", e)
    # Then every child we write through; the first error wins.
    ret = 0
    for child in list(bs.children):
        if child.perm & (BLK_PERM_WRITE | BLK_PERM_WRITE_UNCHANGED):
            r = bdrv_co_flush(child.bs)
            if not ret:
                ret = r
    return ret


# --------------------------------------------------------------------------
# Block status


def bdrv_unallocated_blocks_are_zero(bs: BlockDriverState) -> bool:
    if bs.backing is not None or bs.drv is None:
        return False
    bdi = BlockDriverInfo()
    if bdrv_get_info(bs, bdi) == 0:
        return bdi.unallocated_blocks_are_zero
    return False


def bdrv_co_block_status_from_file(bs: BlockDriverState, want_zero: bool, offset: int, bytes: int):
    """A filter's block status: everything is its file's (for drivers to use as their hook)."""
    return BDRV_BLOCK_RAW | BDRV_BLOCK_OFFSET_VALID, bytes, offset, bs.file.bs


def bdrv_co_block_status_from_backing(bs: BlockDriverState, want_zero: bool, offset: int, bytes: int):
    return BDRV_BLOCK_RAW | BDRV_BLOCK_OFFSET_VALID, bytes, offset, bs.backing.bs


def bdrv_co_block_status(bs: BlockDriverState, want_zero: bool, offset: int,
                         bytes: int) -> tuple[int, int, int, BlockDriverState | None]:
    """(flags, pnum, map, file) for the range at ``offset``: BDRV_BLOCK_DATA/ZERO/OFFSET_VALID/ALLOCATED/EOF."""
    local_map = 0
    local_file = None
    total_size = bdrv_getlength(bs)
    if total_size < 0:
        return total_size, 0, 0, None
    if offset >= total_size:
        return BDRV_BLOCK_EOF, 0, 0, None
    if not bytes:
        return 0, 0, 0, None
    bytes = min(bytes, total_size - offset)
    drv = bs.drv
    if drv.bdrv_co_block_status is None:
        ret = BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED
        if offset + bytes == total_size:
            ret |= BDRV_BLOCK_EOF
        if drv.protocol_name:
            ret |= BDRV_BLOCK_OFFSET_VALID
            local_map, local_file = offset, bs
        return ret, bytes, local_map, local_file
    bdrv_inc_in_flight(bs)
    try:
        align = bs.bl.request_alignment
        aligned_offset = QEMU_ALIGN_DOWN(offset, align)
        aligned_bytes = ROUND_UP(offset + bytes, align) - aligned_offset
        try:
            ret, pnum, local_map, local_file = drv.bdrv_co_block_status(bs, want_zero, aligned_offset,
                                                                         aligned_bytes)
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001 - the driver boundary
            ret, pnum = _driver_exception(bs, "bdrv_co_block_status", e), 0
        if ret < 0:
            return ret, 0, 0, None
        if not pnum or pnum % align or align <= offset - aligned_offset:
            raise AssertionError(f"{bs.node_name}: block status pnum {pnum} is not a positive multiple of {align}")
        pnum -= offset - aligned_offset
        pnum = min(pnum, bytes)
        if ret & BDRV_BLOCK_OFFSET_VALID:
            local_map += offset - aligned_offset
        if ret & BDRV_BLOCK_RAW:
            ret, pnum, local_map, local_file = bdrv_co_block_status(local_file, want_zero, local_map, pnum)
        else:
            if ret & (BDRV_BLOCK_DATA | BDRV_BLOCK_ZERO):
                ret |= BDRV_BLOCK_ALLOCATED
            elif want_zero:
                if bdrv_unallocated_blocks_are_zero(bs):
                    ret |= BDRV_BLOCK_ZERO
                elif bs.backing is not None:
                    size2 = bdrv_getlength(bs.backing.bs)
                    if size2 >= 0 and offset >= size2:
                        ret |= BDRV_BLOCK_ZERO
            if (want_zero and local_file is not None and local_file is not bs and ret & BDRV_BLOCK_DATA
                    and not ret & BDRV_BLOCK_ZERO and ret & BDRV_BLOCK_OFFSET_VALID):
                ret2, file_pnum, _, _ = bdrv_co_block_status(local_file, want_zero, local_map, pnum)
                if ret2 >= 0:
                    if ret2 & BDRV_BLOCK_EOF and (not file_pnum or ret2 & BDRV_BLOCK_ZERO):
                        ret |= BDRV_BLOCK_ZERO  # reads past the file's end are zeroes
                    else:
                        pnum = file_pnum
                        ret |= ret2 & BDRV_BLOCK_ZERO
    finally:
        bdrv_dec_in_flight(bs)
    if ret >= 0 and offset + pnum == total_size:
        ret |= BDRV_BLOCK_EOF
    return ret, pnum, local_map, local_file


def bdrv_co_block_status_above(bs: BlockDriverState, base: BlockDriverState | None, want_zero: bool,
                               offset: int, bytes: int):
    """Block status of the chain from ``bs`` down to (not including) ``base``."""
    ret, pnum, map_, file = 0, 0, 0, None
    first = True
    p = bs
    while p is not None and p is not base:
        ret, pnum, map_, file = bdrv_co_block_status(p, want_zero, offset, bytes)
        if ret < 0:
            break
        if ret & BDRV_BLOCK_ZERO and ret & BDRV_BLOCK_EOF and not first:
            pnum = bytes  # beyond an overlay's backing file everything reads as zeroes
        if ret & (BDRV_BLOCK_ZERO | BDRV_BLOCK_DATA):
            break
        bytes = min(bytes, pnum)
        first = False
        p = backing_bs(p)
    return ret, pnum, map_, file


# --------------------------------------------------------------------------
# Truncate


@coroutine_fn
def bdrv_co_truncate(child: BdrvChild, offset: int, exact: bool = False,
                     prealloc: PreallocMode = PreallocMode.PREALLOC_MODE_OFF,
                     errp: list | None = None) -> int:
    """Resize the node to ``offset`` bytes; errors are -errno, with QEMU's message appended to ``errp``."""
    bs = child.bs
    drv = bs.drv

    def fail(ret: int, msg: str) -> int:
        if errp is not None:
            errp.append(Error(msg, errno=-ret))
        return ret

    if not child.perm & BLK_PERM_RESIZE:
        raise AssertionError(f"truncate through '{child.name}' without the RESIZE permission")
    if drv is None:
        return fail(-errno.ENOMEDIUM, "No medium inserted")
    if offset < 0:
        return fail(-errno.EINVAL, "Image size cannot be negative")
    old_size = bdrv_getlength(bs)
    if old_size < 0:
        return fail(old_size, "Failed to get old image size")
    new_bytes = offset - old_size if offset > old_size else 0
    bdrv_inc_in_flight(bs)
    req = tracked_request_begin(bs, offset - new_bytes, new_bytes, TRUNCATE)
    try:
        if new_bytes:
            # Growing: no write may race the new area while it is (pre)allocated.
            mark_request_serialising(req, 1)
            wait_serialising_requests(req)
        if bs.read_only:
            return fail(-errno.EACCES, "Image is read-only")
        if drv.bdrv_co_truncate is None:
            if bs.file is not None and drv.is_filter:
                return bdrv_co_truncate(bs.file, offset, exact, prealloc, errp)
            return fail(-errno.ENOTSUP, "Image format driver does not support resize")
        try:
            ret = drv.bdrv_co_truncate(bs, offset, exact, prealloc)
        except Error as e:
            return fail(-(e.errno or errno.EINVAL), e.msg)
        except Exception as e:  # noqa: BLE001 - the driver boundary
            return fail(_driver_exception(bs, "bdrv_co_truncate", e), "Input/output error")
        if ret < 0:
            return fail(ret, f"Failed to resize: {errno.errorcode.get(-ret, ret)}")
        ret = refresh_total_sectors(bs, offset >> BDRV_SECTOR_BITS)
        if ret < 0:
            return fail(ret, "Could not refresh total sector count")
        bdrv_parent_cb_resize(bs)
        bs.write_gen += 1
        return 0
    finally:
        tracked_request_end(req)
        bdrv_dec_in_flight(bs)


# --------------------------------------------------------------------------
# Plugging


def bdrv_io_plug(bs: BlockDriverState) -> None:
    """Start batching: children first, then the driver's hook on the first plug."""
    for child in bs.children:
        bdrv_io_plug(child.bs)
    bs.io_plugged += 1
    if bs.io_plugged == 1 and bs.drv is not None and bs.drv.bdrv_io_plug is not None:
        bs.drv.bdrv_io_plug(bs)


def bdrv_io_unplug(bs: BlockDriverState) -> None:
    if bs.io_plugged <= 0:
        raise AssertionError(f"bdrv_io_unplug on {bs.node_name}, which is not plugged")
    bs.io_plugged -= 1
    if bs.io_plugged == 0 and bs.drv is not None and bs.drv.bdrv_io_unplug is not None:
        bs.drv.bdrv_io_unplug(bs)
    for child in bs.children:
        bdrv_io_unplug(child.bs)


def bdrv_add_before_write_notifier(bs: BlockDriverState, notifier) -> None:
    from qblock.util.notify import notifier_with_return_list_add
    notifier_with_return_list_add(bs.before_write_notifiers, notifier)


def bdrv_enable_copy_on_read(bs: BlockDriverState) -> None:
    bs.copy_on_read += 1


def bdrv_disable_copy_on_read(bs: BlockDriverState) -> None:
    if bs.copy_on_read <= 0:
        raise AssertionError("bdrv_disable_copy_on_read without enable")
    bs.copy_on_read -= 1


# --------------------------------------------------------------------------
# Synchronous wrappers: run the coroutine version and poll until it is done


def run_co_in(ctx, fn: Callable[..., Any], *args: Any) -> Any:
    """Call a coroutine_fn from anywhere: directly inside a coroutine, else in a new one entered in ``ctx``,
    polling until it is done (the generated co_wrapper functions of later QEMU; the seed writes each by hand)."""
    if qemu_in_coroutine():
        return fn(*args)
    result: list = []

    def entry(_):
        result.append(fn(*args))
        aio_wait_kick()  # the waiter may poll another context: wake it now that the result is there

    aio_co_enter(ctx, qemu_coroutine_create(entry, None))
    AIO_WAIT_WHILE(ctx, lambda: not result)
    return result[0]


def bdrv_run_co(bs: BlockDriverState, fn: Callable[..., Any], *args: Any) -> Any:
    """run_co_in the node's AioContext."""
    return run_co_in(bdrv_get_aio_context(bs), fn, *args)


def bdrv_aio_cancel(acb) -> None:
    """Cancel ``acb`` and wait until its completion callback ran (block/io.c: bdrv_aio_cancel)."""
    qemu_aio_ref(acb)
    bdrv_aio_cancel_async(acb)
    while acb.refcnt > 1:
        info = acb.aiocb_info
        ctx = info.get_aio_context(acb) if info.get_aio_context is not None else bdrv_get_aio_context(acb.bs)
        aio_poll(ctx, True)
    qemu_aio_unref(acb)


def bdrv_aio_cancel_async(acb) -> None:
    """Ask ``acb`` to cancel; its callback still runs (with -ECANCELED if the cancel took)."""
    if acb.aiocb_info.cancel_async is not None:
        acb.aiocb_info.cancel_async(acb)


def bdrv_preadv(child: BdrvChild, offset: int, qiov: QEMUIOVector) -> int:
    """Read into ``qiov``; its size, or a negative errno."""
    ret = bdrv_run_co(child.bs, bdrv_co_preadv, child, offset, qiov.size, qiov, 0)
    return ret if ret < 0 else qiov.size


def bdrv_pread(child: BdrvChild, offset: int, buf, bytes: int) -> int:
    """Read ``bytes`` into ``buf``; ``bytes``, or a negative errno."""
    if bytes < 0:
        return -errno.EINVAL
    return bdrv_preadv(child, offset, QEMUIOVector([memoryview(buf).cast("B")[:bytes]], -1))


def bdrv_pwritev(child: BdrvChild, offset: int, qiov: QEMUIOVector, flags: int = 0) -> int:
    ret = bdrv_run_co(child.bs, bdrv_co_pwritev, child, offset, qiov.size, qiov, flags)
    return ret if ret < 0 else qiov.size


def bdrv_pwrite(child: BdrvChild, offset: int, buf, bytes: int | None = None) -> int:
    """Write ``buf`` at ``offset``; the byte count, or a negative errno."""
    view = memoryview(buf).cast("B")
    if bytes is None:
        bytes = len(view)
    if bytes < 0:
        return -errno.EINVAL
    return bdrv_pwritev(child, offset, QEMUIOVector([view[:bytes]], -1))


def bdrv_pwrite_sync(child: BdrvChild, offset: int, buf, bytes: int | None = None) -> int:
    """Write and flush: a barrier no later write can pass."""
    ret = bdrv_pwrite(child, offset, buf, bytes)
    if ret < 0:
        return ret
    ret = bdrv_flush(child.bs)
    return ret if ret < 0 else 0


def bdrv_pwrite_zeroes(child: BdrvChild, offset: int, bytes: int, flags: int = 0) -> int:
    return bdrv_run_co(child.bs, bdrv_co_pwrite_zeroes, child, offset, bytes, flags)


def bdrv_flush(bs: BlockDriverState) -> int:
    return bdrv_run_co(bs, bdrv_co_flush, bs)


def bdrv_pdiscard(child: BdrvChild, offset: int, bytes: int) -> int:
    return bdrv_run_co(child.bs, bdrv_co_pdiscard, child, offset, bytes)


def bdrv_truncate(child: BdrvChild, offset: int, exact: bool = False,
                  prealloc: PreallocMode = PreallocMode.PREALLOC_MODE_OFF, errp: list | None = None) -> int:
    return bdrv_run_co(child.bs, bdrv_co_truncate, child, offset, exact, prealloc, errp)


def bdrv_block_status_above(bs: BlockDriverState, base: BlockDriverState | None, offset: int, bytes: int):
    """(flags, pnum, map, file) of the chain above ``base`` (want_zero: mapping precision)."""
    return bdrv_run_co(bs, bdrv_co_block_status_above, bs, base, True, offset, bytes)


def bdrv_block_status(bs: BlockDriverState, offset: int, bytes: int):
    return bdrv_block_status_above(bs, backing_bs(bs), offset, bytes)


def bdrv_is_allocated(bs: BlockDriverState, offset: int, bytes: int) -> tuple[int, int]:
    """(1 if allocated in ``bs`` itself else 0, or a negative errno; pnum)."""
    ret, pnum, _, _ = bdrv_run_co(bs, bdrv_co_block_status_above, bs, backing_bs(bs), False, offset, bytes)
    if ret < 0:
        return ret, pnum
    return (1 if ret & BDRV_BLOCK_ALLOCATED else 0), pnum


def bdrv_is_allocated_above(top: BlockDriverState, base: BlockDriverState | None, offset: int,
                            bytes: int) -> tuple[int, int]:
    """(1 if a prefix of the range is allocated between ``top`` and ``base`` (exclusive), else 0; pnum)."""
    n = bytes
    intermediate = top
    while intermediate is not None and intermediate is not base:
        ret, pnum_inter = bdrv_is_allocated(intermediate, offset, bytes)
        if ret < 0:
            return ret, 0
        if ret:
            return 1, pnum_inter
        size_inter = bdrv_getlength(intermediate)
        if size_inter < 0:
            return size_inter, 0
        if n > pnum_inter and (intermediate is top or offset + pnum_inter < size_inter):
            n = pnum_inter
        intermediate = backing_bs(intermediate)
    return 0, n


def bdrv_make_zero(child: BdrvChild, flags: int = 0) -> int:
    """Zero the whole node, skipping what already reads as zeroes."""
    bs = child.bs
    target_size = bdrv_getlength(bs)
    if target_size < 0:
        return target_size
    offset = 0
    while True:
        nbytes = min(target_size - offset, BDRV_REQUEST_MAX_BYTES)
        if nbytes <= 0:
            return 0
        ret, nbytes, _, _ = bdrv_block_status(bs, offset, nbytes)
        if ret < 0:
            return ret
        if ret & BDRV_BLOCK_ZERO:
            offset += nbytes
            continue
        ret = bdrv_pwrite_zeroes(child, offset, nbytes, flags)
        if ret < 0:
            return ret
        offset += nbytes
