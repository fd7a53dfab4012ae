"""The qcow2 format driver: the request half of QEMU's block/qcow2.c.

One driver class with QEMU's hook names.  Metadata is handled under
``s->lock`` (a CoMutex); data moves without it:

* read (``bdrv_co_preadv_part``): per run of clusters of one type,
  ``qcow2_get_cluster_offset`` under the lock, then the data from the file,
  the backing file (zeroes past its end), zeroes, or a decompressed cluster;
* write (``bdrv_co_pwritev_part``): ``qcow2_alloc_cluster_offset`` finds or
  allocates host clusters (waiting for in-flight allocations of the same
  clusters), the metadata overlap check guards the write, the data goes to
  the file (merged with the COW head and tail into one write when
  possible), then ``qcow2_handle_l2meta`` links the new clusters;
* write zeroes (v3 zero flag; MAY_UNMAP frees the clusters), discard,
  compressed writes, flush (``qcow2_write_caches``: L2 tables, then
  refcount blocks, in dependency order), truncate, block status, info;
* whole-image hooks for qemu-img (specific info, measure, zero init,
  make empty in ``qcow2_info``; amend in ``qcow2_amend``).

Reopen (``bdrv_reopen_prepare``/``commit``/``abort``) changes the runtime
options (caches, lazy refcounts, overlap checks, discard passing) as
qcow2_update_options_prepare/commit/abort do; going read-only first writes
everything back and marks the image clean.  Bitmaps are not modelled.

FUA is emulated by the block layer (a flush after the write), as for QEMU's
qcow2.  Later QEMU runs the parts of a request as parallel aio tasks; qblock
runs them in turn, as the 3.x driver did.
"""
from __future__ import annotations

import errno

from qblock.block.driver import (
    BDRV_BLOCK_DATA,
    BDRV_BLOCK_OFFSET_VALID,
    BDRV_BLOCK_ZERO,
    BDRV_O_RDWR,
    BDRV_REQ_MAY_UNMAP,
    BDRV_REQ_NO_FALLBACK,
    BDRV_SECTOR_SIZE,
    IOV_MAX,
    BlkdebugEvent,
    BlockDriver,
    PreallocMode,
)
from qblock.block.graph import bdrv_get_aio_context, bdrv_getlength, bdrv_is_writable, bdrv_open_child, child_file
from qblock.block.io import (
    BLKDBG_EVENT,
    bdrv_co_block_status_above,
    bdrv_co_pread,
    bdrv_co_preadv_part,
    bdrv_co_pwrite,
    bdrv_co_pwrite_sync,
    bdrv_co_pwritev_part,
    bdrv_co_truncate,
    bdrv_flush,
    run_co_in,
)
from qblock.trace.events import (
    trace_qcow2_pwrite_zeroes,
    trace_qcow2_pwrite_zeroes_start_req,
    trace_qcow2_writev_data,
    trace_qcow2_writev_done_part,
    trace_qcow2_writev_done_req,
    trace_qcow2_writev_start_part,
    trace_qcow2_writev_start_req,
)
from qblock.util.coroutine import qemu_coroutine_self
from qblock.util.coroutine_lock import qemu_co_mutex_lock, qemu_co_mutex_unlock, qemu_co_queue_restart_all
from qblock.util.error import Error, error_report, error_setg_errno, strerror
from qblock.util.iov import qemu_iovec_from_buf, qemu_iovec_memset, qemu_iovec_subvec_niov, qemu_iovec_to_buf

from .qcow2_cache import qcow2_cache_destroy, qcow2_cache_flush, qcow2_write_caches
from .qcow2_cluster import (
    qcow2_alloc_compressed_cluster_offset,
    qcow2_cluster_discard,
    qcow2_cluster_zeroize,
    qcow2_get_cluster_offset,
    qcow2_grow_l1_table,
)
from .qcow2_cluster_alloc import qcow2_alloc_cluster_abort, qcow2_alloc_cluster_link_l2, qcow2_alloc_cluster_offset
from .qcow2_amend import qcow2_amend_options, qcow2_amend_opts
from .qcow2_create import qcow2_co_create_opts, qcow2_create_opts
from .qcow2_h import (
    BDRVQcow2State,
    HDR_SIZE_OFFSET,
    INT_MAX,
    QCOW2_CLUSTER_COMPRESSED,
    QCOW2_CLUSTER_NORMAL,
    QCOW2_CLUSTER_UNALLOCATED,
    QCOW2_CLUSTER_ZERO_ALLOC,
    QCOW2_CLUSTER_ZERO_PLAIN,
    QCOW2_DISCARD_REQUEST,
    QCOW2_INCOMPAT_DIRTY,
    QCOW_HEADER,
    QCOW_MAGIC,
    QCowL2Meta,
    l2meta_cow_start,
    offset_into_cluster,
    qcow2_vm_state_offset,
    size_to_l1,
)
from .qcow2_info import qcow2_get_specific_info, qcow2_has_zero_init, qcow2_make_empty, qcow2_measure
from .qcow2_header import (
    qcow2_do_open,
    qcow2_is_broken,
    qcow2_mark_clean,
    qcow2_runtime_opts,
    qcow2_update_options_abort,
    qcow2_update_options_commit,
    qcow2_update_options_prepare,
)
from .qcow2_overlap import qcow2_pre_write_overlap_check
from .qcow2_refcount import qcow2_refcount_close
from .qcow2_threads import qcow2_co_compress, qcow2_co_decompress


def _run_locked(bs, fn, *args):
    """Run ``fn`` in a coroutine holding s->lock, from anywhere; its result (an Error it raises is re-raised)."""
    s = bs.opaque

    def co():
        qemu_co_mutex_lock(s.lock)
        try:
            return fn(*args), None
        except Error as e:
            return None, e
        finally:
            qemu_co_mutex_unlock(s.lock)

    ret, err = run_co_in(bdrv_get_aio_context(bs), co)
    if err is not None:
        raise err
    return ret


def qcow2_handle_l2meta(bs, l2meta: QCowL2Meta | None, link_l2: bool) -> tuple[int, QCowL2Meta | None]:
    """Link (or abort) every allocation of the list; waiters for them are woken.  (ret, what was left)."""
    s = bs.opaque
    ret = 0
    while l2meta is not None:
        if link_l2:
            ret = qcow2_alloc_cluster_link_l2(bs, l2meta)
            if ret:
                break
        else:
            qcow2_alloc_cluster_abort(bs, l2meta)
        if l2meta in s.cluster_allocs:
            s.cluster_allocs.remove(l2meta)
        qemu_co_queue_restart_all(l2meta.dependent_requests)
        l2meta = l2meta.next
    return ret, l2meta


def merge_cow(offset: int, bytes: int, qiov, qiov_offset: int, l2meta: QCowL2Meta | None) -> bool:
    """Can the guest data go out in one write together with the COW regions of one allocation?"""
    m = l2meta
    while m is not None:
        if (m.cow_start.nb_bytes or m.cow_end.nb_bytes) and not m.skip_cow \
                and l2meta_cow_start(m) + m.cow_start.nb_bytes == offset \
                and m.offset + m.cow_end.offset == offset + bytes \
                and qemu_iovec_subvec_niov(qiov, qiov_offset, bytes) <= IOV_MAX - 2:
            m.data_qiov = qiov
            m.data_qiov_offset = qiov_offset
            return True
        m = m.next
    return False


def is_zero(bs, offset: int, bytes: int) -> bool:
    """Does the range read as zeroes through the whole backing chain?"""
    total = bs.total_sectors * BDRV_SECTOR_SIZE
    bytes = min(bytes, total - offset)
    while bytes > 0:
        res, nr, _, _ = bdrv_co_block_status_above(bs, None, True, offset, bytes)
        if res < 0 or not res & BDRV_BLOCK_ZERO or not nr:
            return False
        offset += nr
        bytes -= nr
    return True


class Qcow2Driver(BlockDriver):
    format_name = "qcow2"
    is_format = True
    state_class = BDRVQcow2State
    runtime_opts = qcow2_runtime_opts
    create_opts = qcow2_create_opts
    supports_backing = True

    def bdrv_probe(self, buf: bytes, buf_size: int, filename: str | None) -> int:
        if buf_size >= QCOW_HEADER.size and int.from_bytes(buf[0:4], "big") == QCOW_MAGIC \
                and int.from_bytes(buf[4:8], "big") >= 2:
            return 100
        return 0

    # -- open and close ---------------------------------------------------

    def bdrv_open(self, bs, options: dict, flags: int) -> int:
        bdrv_open_child(None, options, "file", bs, child_role=child_file)
        s: BDRVQcow2State = bs.opaque
        try:
            _run_locked(bs, qcow2_do_open, bs, options, flags)
        except BaseException:
            # As QEMU's qcow2_do_open fail path: drop everything, so that the close that
            # follows writes nothing (it must not, say, clear the dirty bit of an unrepaired image).
            s.l2_table_cache = s.refcount_block_cache = None
            raise
        bs.supported_zero_flags = BDRV_REQ_MAY_UNMAP | BDRV_REQ_NO_FALLBACK if s.qcow_version >= 3 else 0
        return 0

    def bdrv_close(self, bs) -> None:
        s: BDRVQcow2State = bs.opaque
        if s.l2_table_cache is not None and s.refcount_block_cache is not None:
            if bdrv_is_writable(bs) and not qcow2_is_broken(bs) and bs.file is not None:
                _run_locked(bs, self._inactivate, bs)
            qcow2_cache_destroy(s.l2_table_cache)
            qcow2_cache_destroy(s.refcount_block_cache)
        s.l2_table_cache = s.refcount_block_cache = None
        s.l1_table = []
        qcow2_refcount_close(bs)

    # -- reopen (qcow2_reopen_prepare/commit/abort) ---------------------------

    def bdrv_reopen_prepare(self, state, queue) -> int:
        """Stage the new options; going read-only, write everything back and clear the dirty bit."""
        bs = state.bs
        state.opaque = _run_locked(bs, qcow2_update_options_prepare, bs, state.options, state.flags)
        if not state.flags & BDRV_O_RDWR and bdrv_is_writable(bs):
            ret = bdrv_flush(bs)
            if ret >= 0:
                ret = _run_locked(bs, qcow2_mark_clean, bs)
            if ret < 0:
                self.bdrv_reopen_abort(state)
                return ret
        return 0

    def bdrv_reopen_commit(self, state) -> None:
        qcow2_update_options_commit(state.bs, state.opaque)
        state.opaque = None

    def bdrv_reopen_abort(self, state) -> None:
        if state.opaque is not None:
            qcow2_update_options_abort(state.bs, state.opaque)
        state.opaque = None

    @staticmethod
    def _inactivate(bs) -> int:
        """Write both caches back and clear the dirty bit (QEMU's qcow2_inactivate)."""
        s = bs.opaque
        result = 0
        ret = qcow2_cache_flush(bs, s.l2_table_cache)
        if ret:
            result = ret
            error_report(f"Failed to flush the L2 table cache: {strerror(-ret)}")
        ret = qcow2_cache_flush(bs, s.refcount_block_cache)
        if ret:
            result = ret
            error_report(f"Failed to flush the refcount block cache: {strerror(-ret)}")
        if result == 0:
            qcow2_mark_clean(bs)
        return result

    def bdrv_co_check(self, bs, result, fix: int) -> int:
        """Check and repair as ``fix`` allows (QEMU's qcow2_co_check): see qcow2_check."""
        from .qcow2_check import qcow2_co_check_locked
        s: BDRVQcow2State = bs.opaque
        qemu_co_mutex_lock(s.lock)
        try:
            return qcow2_co_check_locked(bs, result, fix)
        finally:
            qemu_co_mutex_unlock(s.lock)

    def bdrv_refresh_limits(self, bs) -> None:
        s: BDRVQcow2State = bs.opaque
        bs.bl.pwrite_zeroes_alignment = s.cluster_size
        bs.bl.pdiscard_alignment = s.cluster_size

    def bdrv_get_info(self, bs, bdi) -> int:
        s: BDRVQcow2State = bs.opaque
        bdi.cluster_size = s.cluster_size
        bdi.vm_state_offset = qcow2_vm_state_offset(s)
        bdi.is_dirty = bool(s.incompatible_features & QCOW2_INCOMPAT_DIRTY)
        bdi.unallocated_blocks_are_zero = True     # the seed's era; later QEMU dropped the field
        return 0

    def bdrv_co_create_opts(self, filename: str, options: dict) -> int:
        return qcow2_co_create_opts(filename, options)

    # -- whole-image operations (qcow2_info, qcow2_amend) --------------------

    amend_opts = qcow2_amend_opts

    def bdrv_get_specific_info(self, bs) -> dict:
        return qcow2_get_specific_info(bs)

    def bdrv_measure(self, opts: dict, in_bs) -> tuple[int, int, int | None]:
        """(required, fully allocated, bitmaps size or None); raises Error."""
        return qcow2_measure(self, opts, in_bs)

    def bdrv_has_zero_init(self, bs) -> int:
        return qcow2_has_zero_init(bs)

    def bdrv_make_empty(self, bs) -> int:
        return _run_locked(bs, qcow2_make_empty, bs)

    def bdrv_amend_options(self, bs, options: dict, status_cb, force: bool) -> int:
        """Change the options given (qemu-img amend); raises Error with QEMU's messages."""
        return qcow2_amend_options(bs, options, status_cb, force)

    # -- read -------------------------------------------------------------

    def qcow2_co_preadv_compressed(self, bs, l2_entry: int, offset: int, bytes: int, qiov, qiov_offset: int) -> int:
        s: BDRVQcow2State = bs.opaque
        coffset = l2_entry & s.cluster_offset_mask
        nb_csectors = ((l2_entry >> s.csize_shift) & s.csize_mask) + 1
        csize = nb_csectors * 512 - (coffset & 511)
        buf = bytearray(csize)
        BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_READ_COMPRESSED)
        ret = bdrv_co_pread(bs.file, coffset, csize, buf)
        if ret < 0:
            return ret
        out_buf = bytearray(s.cluster_size)
        if qcow2_co_decompress(bs, out_buf, s.cluster_size, buf) < 0:
            return -errno.EIO
        in_cluster = offset_into_cluster(s, offset)
        qemu_iovec_from_buf(qiov, qiov_offset, memoryview(out_buf)[in_cluster:in_cluster + bytes], bytes)
        return 0

    def bdrv_co_preadv_part(self, bs, offset: int, bytes: int, qiov, qiov_offset: int, flags: int) -> int:
        s: BDRVQcow2State = bs.opaque
        while bytes:
            qemu_co_mutex_lock(s.lock)
            try:
                ctype, cur_bytes, cluster_offset = qcow2_get_cluster_offset(bs, offset, min(bytes, INT_MAX))
            finally:
                qemu_co_mutex_unlock(s.lock)
            if ctype < 0:
                return ctype
            if ctype in (QCOW2_CLUSTER_ZERO_PLAIN, QCOW2_CLUSTER_ZERO_ALLOC) or \
                    (ctype == QCOW2_CLUSTER_UNALLOCATED and bs.backing is None):
                qemu_iovec_memset(qiov, qiov_offset, 0, cur_bytes)
                ret = 0
            elif ctype == QCOW2_CLUSTER_UNALLOCATED:
                BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_READ_BACKING_AIO)
                ret = bdrv_co_preadv_part(bs.backing, offset, cur_bytes, qiov, qiov_offset, 0)
            elif ctype == QCOW2_CLUSTER_COMPRESSED:
                ret = self.qcow2_co_preadv_compressed(bs, cluster_offset, offset, cur_bytes, qiov, qiov_offset)
            else:
                BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_READ_AIO)
                ret = bdrv_co_preadv_part(bs.file, cluster_offset + offset_into_cluster(s, offset), cur_bytes,
                                          qiov, qiov_offset, 0)
            if ret < 0:
                return ret
            bytes -= cur_bytes
            offset += cur_bytes
            qiov_offset += cur_bytes
        return 0

    # -- write ------------------------------------------------------------

    def bdrv_co_pwritev_part(self, bs, offset: int, bytes: int, qiov, qiov_offset: int, flags: int) -> int:
        s: BDRVQcow2State = bs.opaque
        if qcow2_is_broken(bs):
            return -errno.EIO
        co = qemu_coroutine_self()
        if trace_qcow2_writev_start_req.event.enabled:
            trace_qcow2_writev_start_req(co, offset, bytes)
        ret = 0
        l2meta = None
        try:
            while bytes:
                if trace_qcow2_writev_start_part.event.enabled:
                    trace_qcow2_writev_start_part(co)
                offset_in_cluster = offset_into_cluster(s, offset)
                qemu_co_mutex_lock(s.lock)
                ret, cur_bytes, cluster_offset, l2meta = qcow2_alloc_cluster_offset(bs, offset, min(bytes, INT_MAX))
                if ret >= 0:
                    ret = qcow2_pre_write_overlap_check(bs, 0, cluster_offset + offset_in_cluster, cur_bytes)
                if ret >= 0:
                    qemu_co_mutex_unlock(s.lock)
                    if not merge_cow(offset, cur_bytes, qiov, qiov_offset, l2meta):
                        BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_WRITE_AIO)
                        if trace_qcow2_writev_data.event.enabled:
                            trace_qcow2_writev_data(co, cluster_offset + offset_in_cluster)
                        ret = bdrv_co_pwritev_part(bs.file, cluster_offset + offset_in_cluster, cur_bytes,
                                                   qiov, qiov_offset, 0)
                    qemu_co_mutex_lock(s.lock)
                if ret >= 0:
                    ret, l2meta = qcow2_handle_l2meta(bs, l2meta, True)
                qcow2_handle_l2meta(bs, l2meta, False)
                l2meta = None
                qemu_co_mutex_unlock(s.lock)
                if ret < 0:
                    break
                bytes -= cur_bytes
                offset += cur_bytes
                qiov_offset += cur_bytes
                if trace_qcow2_writev_done_part.event.enabled:
                    trace_qcow2_writev_done_part(co, cur_bytes)
        except BaseException:
            # A bug raised (the block layer turns it into -EIO): leave neither s->lock held nor
            # an allocation in flight, or every later request on these clusters would hang.
            if s.lock.holder is not co:
                qemu_co_mutex_lock(s.lock)
            qcow2_handle_l2meta(bs, l2meta, False)
            qemu_co_mutex_unlock(s.lock)
            raise
        ret = min(ret, 0)
        if trace_qcow2_writev_done_req.event.enabled:
            trace_qcow2_writev_done_req(co, ret)
        return ret

    def bdrv_co_pwrite_zeroes(self, bs, offset: int, bytes: int, flags: int) -> int:
        s: BDRVQcow2State = bs.opaque
        if qcow2_is_broken(bs):
            return -errno.EIO
        head = offset_into_cluster(s, offset)
        tail = -(offset + bytes) % s.cluster_size
        if trace_qcow2_pwrite_zeroes_start_req.event.enabled:
            trace_qcow2_pwrite_zeroes_start_req(qemu_coroutine_self(), offset, bytes)
        if offset + bytes == bs.total_sectors * BDRV_SECTOR_SIZE:
            tail = 0
        if head or tail:
            if head + bytes + tail > s.cluster_size:
                raise AssertionError("qcow2_co_pwrite_zeroes: unaligned request spans clusters")
            # The rest of the cluster must already read as zeroes.
            if not (is_zero(bs, offset - head, head) and is_zero(bs, offset + bytes, tail)):
                return -errno.ENOTSUP
            qemu_co_mutex_lock(s.lock)
            offset -= head
            bytes = s.cluster_size
            ctype, _, _ = qcow2_get_cluster_offset(bs, offset, bytes)
            if ctype < 0 or ctype not in (QCOW2_CLUSTER_UNALLOCATED, QCOW2_CLUSTER_ZERO_PLAIN,
                                          QCOW2_CLUSTER_ZERO_ALLOC):
                qemu_co_mutex_unlock(s.lock)
                return ctype if ctype < 0 else -errno.ENOTSUP
        else:
            qemu_co_mutex_lock(s.lock)
        if trace_qcow2_pwrite_zeroes.event.enabled:
            trace_qcow2_pwrite_zeroes(qemu_coroutine_self(), offset, bytes)
        try:
            return qcow2_cluster_zeroize(bs, offset, bytes, flags)
        finally:
            qemu_co_mutex_unlock(s.lock)

    def bdrv_co_pdiscard(self, bs, offset: int, bytes: int) -> int:
        s: BDRVQcow2State = bs.opaque
        if qcow2_is_broken(bs):
            return -errno.EIO
        if s.qcow_version < 3 and bs.backing is not None:
            return -errno.ENOTSUP   # without the zero flag, discarding would expose the backing file
        if (offset | bytes) % s.cluster_size:
            # Partial clusters are ignored, except a whole partial cluster at the end of the image.
            if offset % s.cluster_size or offset + bytes != bs.total_sectors * BDRV_SECTOR_SIZE:
                return -errno.ENOTSUP
        qemu_co_mutex_lock(s.lock)
        try:
            return qcow2_cluster_discard(bs, offset, bytes, QCOW2_DISCARD_REQUEST, False)
        finally:
            qemu_co_mutex_unlock(s.lock)

    def _pwritev_compressed_task(self, bs, offset: int, bytes: int, qiov, qiov_offset: int) -> int:
        s: BDRVQcow2State = bs.opaque
        buf = bytearray(s.cluster_size)      # zero-padded when the image ends inside the cluster
        qemu_iovec_to_buf(qiov, qiov_offset, buf, bytes)
        out_buf = bytearray(s.cluster_size)
        out_len = qcow2_co_compress(bs, out_buf, s.cluster_size - 1, buf)
        if out_len == -errno.ENOMEM:
            # Does not compress: write a normal cluster.
            return self.bdrv_co_pwritev_part(bs, offset, bytes, qiov, qiov_offset, 0)
        if out_len < 0:
            return -errno.EINVAL
        qemu_co_mutex_lock(s.lock)
        try:
            ret, cluster_offset = qcow2_alloc_compressed_cluster_offset(bs, offset, out_len)
            if ret >= 0:
                ret = qcow2_pre_write_overlap_check(bs, 0, cluster_offset, out_len)
        finally:
            qemu_co_mutex_unlock(s.lock)
        if ret < 0:
            return ret
        BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_WRITE_COMPRESSED)
        return bdrv_co_pwrite(bs.file, cluster_offset, out_len, out_buf)

    def bdrv_co_pwritev_compressed(self, bs, offset: int, bytes: int, qiov) -> int:
        s: BDRVQcow2State = bs.opaque
        if qcow2_is_broken(bs):
            return -errno.EIO
        if bytes == 0:
            # Align the end of the file to a sector, for sector-based readers.
            length = bdrv_getlength(bs.file.bs)
            return length if length < 0 else bdrv_co_truncate(bs.file, length, False)
        if offset_into_cluster(s, offset):
            return -errno.EINVAL
        if offset_into_cluster(s, bytes) and offset + bytes != bs.total_sectors * BDRV_SECTOR_SIZE:
            return -errno.EINVAL
        qiov_offset = 0
        while bytes:
            chunk = min(bytes, s.cluster_size)
            ret = self._pwritev_compressed_task(bs, offset, chunk, qiov, qiov_offset)
            if ret < 0:
                return ret
            offset += chunk
            qiov_offset += chunk
            bytes -= chunk
        return 0

    # -- flush, status, truncate --------------------------------------------

    def bdrv_co_flush_to_os(self, bs) -> int:
        s: BDRVQcow2State = bs.opaque
        if qcow2_is_broken(bs):
            return 0      # nothing more is written to a corrupt image
        qemu_co_mutex_lock(s.lock)
        try:
            return qcow2_write_caches(bs)
        finally:
            qemu_co_mutex_unlock(s.lock)

    def bdrv_co_block_status(self, bs, want_zero: bool, offset: int, bytes: int):
        s: BDRVQcow2State = bs.opaque
        qemu_co_mutex_lock(s.lock)
        try:
            ctype, pnum, cluster_offset = qcow2_get_cluster_offset(bs, offset, min(bytes, INT_MAX))
        finally:
            qemu_co_mutex_unlock(s.lock)
        if ctype < 0:
            return ctype, 0, 0, None
        status, map_, file = 0, 0, None
        if ctype in (QCOW2_CLUSTER_NORMAL, QCOW2_CLUSTER_ZERO_ALLOC):
            map_ = cluster_offset | offset_into_cluster(s, offset)
            file = bs.file.bs
            status |= BDRV_BLOCK_OFFSET_VALID
        if ctype in (QCOW2_CLUSTER_ZERO_PLAIN, QCOW2_CLUSTER_ZERO_ALLOC):
            status |= BDRV_BLOCK_ZERO
        elif ctype != QCOW2_CLUSTER_UNALLOCATED:
            status |= BDRV_BLOCK_DATA
        return status, pnum, map_, file

    def _preallocate(self, bs, offset: int, new_length: int, mode: PreallocMode) -> None:
        """Allocate and map clusters for [offset, new_length) (QEMU's preallocate_co).  Raises Error."""
        s: BDRVQcow2State = bs.opaque
        bytes = new_length - offset
        host_end = 0
        while bytes:
            cur = min(bytes, INT_MAX // s.cluster_size * s.cluster_size)
            in_cluster = offset_into_cluster(s, offset)
            ret, cur, host_offset, meta = qcow2_alloc_cluster_offset(bs, offset, cur)
            if ret < 0:
                qcow2_handle_l2meta(bs, meta, False)
                raise error_setg_errno(-ret, "Allocating clusters failed")
            m = meta
            while m is not None:
                m.prealloc = True
                m = m.next
            ret, meta = qcow2_handle_l2meta(bs, meta, True)
            if ret < 0:
                qcow2_handle_l2meta(bs, meta, False)
                raise error_setg_errno(-ret, "Mapping clusters failed")
            host_end = host_offset + in_cluster + cur
            bytes -= cur
            offset += cur
        # The file must be long enough to hold every allocated cluster.
        file_length = bdrv_getlength(bs.file.bs)
        if file_length < 0:
            raise error_setg_errno(-file_length, "Could not get file size")
        if host_end > file_length:
            if mode is PreallocMode.PREALLOC_MODE_METADATA:
                mode = PreallocMode.PREALLOC_MODE_OFF
            errp: list = []
            ret = bdrv_co_truncate(bs.file, host_end, False, mode, errp)
            if ret < 0:
                raise errp[0] if errp else error_setg_errno(-ret, "Could not resize the image file")

    def bdrv_co_truncate(self, bs, offset: int, exact: bool, prealloc: PreallocMode) -> int:
        s: BDRVQcow2State = bs.opaque
        if qcow2_is_broken(bs):
            return -errno.EIO
        if offset % BDRV_SECTOR_SIZE:
            raise Error(f"The new size must be a multiple of {BDRV_SECTOR_SIZE}", errno=errno.EINVAL)
        qemu_co_mutex_lock(s.lock)
        try:
            if s.nb_snapshots and s.qcow_version < 3:
                raise Error("Can't resize a v2 image which has snapshots", errno=errno.ENOTSUP)
            old_length = bs.total_sectors * BDRV_SECTOR_SIZE
            new_l1_size = size_to_l1(s, offset)
            if offset < old_length:
                if prealloc is not PreallocMode.PREALLOC_MODE_OFF:
                    raise Error("Preallocation can't be used for shrinking an image", errno=errno.EINVAL)
                self._check_tail_unused(bs, offset, old_length)
            else:
                ret = qcow2_grow_l1_table(bs, new_l1_size, True)
                if ret < 0:
                    raise error_setg_errno(-ret, "Failed to grow the L1 table")
            if prealloc is not PreallocMode.PREALLOC_MODE_OFF and offset > old_length:
                self._preallocate(bs, old_length, offset, prealloc)
                ret = qcow2_write_caches(bs)
                if ret < 0:
                    raise error_setg_errno(-ret, "Failed to flush the preallocated area to disk")
            bs.total_sectors = offset // BDRV_SECTOR_SIZE
            ret = bdrv_co_pwrite_sync(bs.file, HDR_SIZE_OFFSET, 8, offset.to_bytes(8, "big"))
            if ret < 0:
                raise error_setg_errno(-ret, "Failed to update the image size")
            s.l1_vm_state_index = new_l1_size
            return 0
        finally:
            qemu_co_mutex_unlock(s.lock)

    @staticmethod
    def _check_tail_unused(bs, offset: int, old_length: int) -> None:
        """qblock shrinks only when no host cluster is mapped past the new end (QEMU 2.11+ discards the tail)."""
        s = bs.opaque
        pos = -(-offset // s.cluster_size) * s.cluster_size
        while pos < old_length:
            ctype, n, _ = qcow2_get_cluster_offset(bs, pos, min(old_length - pos, INT_MAX))
            if ctype < 0:
                raise error_setg_errno(-ctype, "Failed to inquire the clusters to drop")
            if ctype not in (QCOW2_CLUSTER_UNALLOCATED, QCOW2_CLUSTER_ZERO_PLAIN):
                raise Error("qcow2 doesn't support shrinking images yet", errno=errno.ENOTSUP)
            pos += n
