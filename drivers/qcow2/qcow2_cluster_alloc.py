"""Allocating writes: the second half of QEMU's block/qcow2-cluster.c.

``qcow2_alloc_cluster_offset`` finds host clusters for a write, looping
over three steps as QEMU does: ``handle_dependencies`` (an in-flight
allocation overlapping the range: stop short of it, or wait for it and
start again), ``handle_copied`` (clusters with the COPIED flag, i.e.
refcount 1, are overwritten in place) and ``handle_alloc`` (new clusters,
one ``QCowL2Meta`` per run, entered in ``s->cluster_allocs`` so that later
writes to the same clusters wait).  Once the guest data is written,
``qcow2_alloc_cluster_link_l2`` copies the untouched head and tail of the
new clusters (``perform_cow``, merged with the data write when it can be)
and points the L2 entries at them, after making the L2 cache depend on the
refcount cache and on a flush of the file.

Runs under ``s->lock``; ``perform_cow`` drops it around its I/O.
"""
from __future__ import annotations

import errno

from qblock.block.driver import BlkdebugEvent
from qblock.block.io import BLKDBG_EVENT, bdrv_co_pwritev
from qblock.trace.events import (
    trace_qcow2_alloc_clusters_offset,
    trace_qcow2_cluster_alloc_phys,
    trace_qcow2_cluster_link_l2,
    trace_qcow2_do_alloc_clusters_offset,
    trace_qcow2_handle_alloc,
    trace_qcow2_handle_copied,
    trace_qcow2_handle_dependencies_wait,
    trace_qcow2_perform_cow,
)
from qblock.util.coroutine import qemu_coroutine_self
from qblock.util.coroutine_lock import qemu_co_mutex_lock, qemu_co_mutex_unlock, qemu_co_queue_wait
from qblock.util.iov import QEMUIOVector, qemu_iovec_slice

from .qcow2_cache import (
    qcow2_cache_depends_on_flush,
    qcow2_cache_entry_mark_dirty,
    qcow2_cache_put,
    qcow2_cache_set_dependency,
)
from .qcow2_cluster import _corrupt, _entries, count_contiguous_clusters, get_cluster_table
from .qcow2_h import (
    c_hex,
    INT_MAX,
    L2E_OFFSET_MASK,
    QCOW2_CLUSTER_NORMAL,
    QCOW2_CLUSTER_ZERO_ALLOC,
    QCOW2_DISCARD_NEVER,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    QCowL2Meta,
    Qcow2COWRegion,
    l2_entry_get,
    l2_entry_set,
    l2meta_cow_end,
    l2meta_cow_start,
    offset_into_cluster,
    offset_to_l2_index,
    qcow2_get_cluster_type,
    qcow2_need_accurate_refcounts,
    size_to_clusters,
    start_of_cluster,
)
from .qcow2_overlap import qcow2_pre_write_overlap_check
from .qcow2_refcount import qcow2_alloc_clusters, qcow2_alloc_clusters_at, qcow2_free_any_clusters, qcow2_free_clusters


# --------------------------------------------------------------------------
# Copy on write and linking new clusters


def do_perform_cow_read(bs, src_cluster_offset: int, offset_in_cluster: int, qiov: QEMUIOVector) -> int:
    if qiov.size == 0:
        return 0
    BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_COW_READ)
    if bs.drv is None:
        return -errno.ENOMEDIUM
    # Through the driver itself, not the block layer: no second tracked request, no throttling.
    return bs.drv.bdrv_co_preadv_part(bs, src_cluster_offset + offset_in_cluster, qiov.size, qiov, 0, 0)


def do_perform_cow_write(bs, cluster_offset: int, offset_in_cluster: int, qiov: QEMUIOVector) -> int:
    if qiov.size == 0:
        return 0
    ret = qcow2_pre_write_overlap_check(bs, 0, cluster_offset + offset_in_cluster, qiov.size)
    if ret < 0:
        return ret
    BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_COW_WRITE)
    return bdrv_co_pwritev(bs.file, cluster_offset + offset_in_cluster, qiov.size, qiov, 0)


def perform_cow(bs, m: QCowL2Meta) -> int:
    """Copy the old content of the head and tail of the new clusters; with the guest data in one write if merged."""
    s = bs.opaque
    start, end = m.cow_start, m.cow_end
    data_bytes = end.offset - (start.offset + start.nb_bytes)
    if (start.nb_bytes == 0 and end.nb_bytes == 0) or m.skip_cow:
        return 0
    if trace_qcow2_perform_cow.event.enabled:
        trace_qcow2_perform_cow(qemu_coroutine_self(), m.offset, m.alloc_offset, start.nb_bytes, end.nb_bytes)
    # One read for both regions when the gap between them is small.
    merge_reads = bool(start.nb_bytes and end.nb_bytes and data_bytes <= 16384)
    if merge_reads:
        buf = bytearray(start.nb_bytes + data_bytes + end.nb_bytes)
    else:
        buf = bytearray(start.nb_bytes + end.nb_bytes)
    view = memoryview(buf)
    start_buf = view[:start.nb_bytes]
    end_buf = view[len(buf) - end.nb_bytes:]

    qemu_co_mutex_unlock(s.lock)
    try:
        if merge_reads:
            ret = do_perform_cow_read(bs, m.offset, start.offset, QEMUIOVector([view], -1))
        else:
            ret = do_perform_cow_read(bs, m.offset, start.offset, QEMUIOVector([start_buf], -1))
            if ret >= 0:
                ret = do_perform_cow_read(bs, m.offset, end.offset, QEMUIOVector([end_buf], -1))
        if ret >= 0:
            if m.data_qiov is not None:
                views = [start_buf] if start.nb_bytes else []
                views += qemu_iovec_slice(m.data_qiov, m.data_qiov_offset, data_bytes)
                if end.nb_bytes:
                    views.append(end_buf)
                # One write carries the head, the guest data and the tail (QEMU raises write_aio here too).
                BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_WRITE_AIO)
                ret = do_perform_cow_write(bs, m.alloc_offset, start.offset, QEMUIOVector(views, len(views)))
            else:
                ret = do_perform_cow_write(bs, m.alloc_offset, start.offset, QEMUIOVector([start_buf], -1))
                if ret >= 0:
                    ret = do_perform_cow_write(bs, m.alloc_offset, end.offset, QEMUIOVector([end_buf], -1))
    finally:
        qemu_co_mutex_lock(s.lock)
    if ret >= 0:
        # The copied data must be on disk before an L2 entry points at it.
        qcow2_cache_depends_on_flush(s.l2_table_cache)
        ret = 0
    return ret


def qcow2_alloc_cluster_link_l2(bs, m: QCowL2Meta) -> int:
    """After the guest data is written: COW, then point the L2 entries at the new clusters."""
    s = bs.opaque
    if trace_qcow2_cluster_link_l2.event.enabled:
        trace_qcow2_cluster_link_l2(qemu_coroutine_self(), m.nb_clusters)
    if m.nb_clusters <= 0:
        raise AssertionError("qcow2_alloc_cluster_link_l2: empty allocation")
    ret = perform_cow(bs, m)       # also for preallocation: the tail of a partial last cluster is zeroed
    if ret < 0:
        return ret
    if s.use_lazy_refcounts:
        from .qcow2_header import qcow2_mark_dirty
        qcow2_mark_dirty(bs)
    if qcow2_need_accurate_refcounts(s):
        qcow2_cache_set_dependency(bs, s.l2_table_cache, s.refcount_block_cache)
    ret, table, l2_index = get_cluster_table(bs, m.offset)
    if ret < 0:
        return ret
    qcow2_cache_entry_mark_dirty(s.l2_table_cache, table)
    if l2_index + m.nb_clusters > s.l2_size:
        raise AssertionError("qcow2_alloc_cluster_link_l2: allocation crosses an L2 table")
    old_cluster = []
    for i in range(m.nb_clusters):
        # Two writes to the same unallocated cluster may both allocate; the second one to link
        # replaces the first one's cluster, which is freed below.
        old = l2_entry_get(table, l2_index + i)
        if old:
            old_cluster.append(old)
        l2_entry_set(table, l2_index + i, (m.alloc_offset + (i << s.cluster_bits)) | QCOW_OFLAG_COPIED)
    qcow2_cache_put(s.l2_table_cache, table)
    # A COW from a shared or compressed cluster: drop our reference to the old one.
    if not m.keep_old_clusters:
        for old in old_cluster:
            qcow2_free_any_clusters(bs, old, 1, QCOW2_DISCARD_NEVER)
    return 0


def qcow2_alloc_cluster_abort(bs, m: QCowL2Meta) -> None:
    """The write failed before linking: give the new clusters back (later QEMU; 3.x leaked them)."""
    s = bs.opaque
    if not m.keep_old_clusters and m.nb_clusters:
        qcow2_free_clusters(bs, m.alloc_offset, m.nb_clusters << s.cluster_bits, QCOW2_DISCARD_NEVER)


def count_cow_clusters(bs, nb_clusters: int, entries) -> int:
    for i in range(nb_clusters):
        e = entries[i]
        if qcow2_get_cluster_type(e) == QCOW2_CLUSTER_NORMAL and e & QCOW_OFLAG_COPIED:
            return i
    return nb_clusters


# --------------------------------------------------------------------------
# Finding the host clusters for a write


def handle_dependencies(bs, guest_offset: int, cur_bytes: int, m: QCowL2Meta | None) -> tuple[int, int]:
    """(0, bytes usable before the next in-flight allocation), or (-EAGAIN, 0) after waiting for one."""
    s = bs.opaque
    nbytes = cur_bytes
    for old_alloc in list(s.cluster_allocs):
        start, end = guest_offset, guest_offset + nbytes
        old_start, old_end = l2meta_cow_start(old_alloc), l2meta_cow_end(old_alloc)
        if end <= old_start or start >= old_end:
            continue
        nbytes = old_start - start if start < old_start else 0
        if nbytes == 0 and m is not None:
            # Do not wait while holding allocations of our own: let the caller finish them first.
            return 0, 0
        if nbytes == 0:
            if trace_qcow2_handle_dependencies_wait.event.enabled:
                trace_qcow2_handle_dependencies_wait(qemu_coroutine_self(), old_alloc)
            qemu_co_queue_wait(old_alloc.dependent_requests, s.lock)
            return -errno.EAGAIN, 0
    return 0, nbytes


def handle_copied(bs, guest_offset: int, host_offset: int, nbytes: int) -> tuple[int, int, int]:
    """(1, host offset, bytes) of clusters that can be overwritten in place; (0, host_offset, bytes) if none."""
    s = bs.opaque
    if trace_qcow2_handle_copied.event.enabled:
        trace_qcow2_handle_copied(qemu_coroutine_self(), guest_offset, host_offset, nbytes)
    l2_index = offset_to_l2_index(s, guest_offset)
    nb_clusters = min(size_to_clusters(s, offset_into_cluster(s, guest_offset) + nbytes), s.l2_size - l2_index)
    ret, table, l2_index = get_cluster_table(bs, guest_offset)
    if ret < 0:
        return ret, host_offset, nbytes
    entries = _entries(table, l2_index, nb_clusters)
    qcow2_cache_put(s.l2_table_cache, table)
    cluster_offset = entries[0]
    if qcow2_get_cluster_type(cluster_offset) != QCOW2_CLUSTER_NORMAL or not cluster_offset & QCOW_OFLAG_COPIED:
        return 0, host_offset, nbytes
    host = cluster_offset & L2E_OFFSET_MASK
    if offset_into_cluster(s, host):
        return _corrupt(bs, f"Data cluster offset {c_hex(host)} unaligned (guest offset: {c_hex(guest_offset)})"), \
            host_offset, nbytes
    if host_offset and host != host_offset:
        return 0, host_offset, 0      # allocated in place, but not contiguous with what we have
    keep_clusters = count_contiguous_clusters(nb_clusters, s.cluster_size, entries,
                                              QCOW_OFLAG_COPIED | QCOW_OFLAG_ZERO)
    nbytes = min(nbytes, keep_clusters * s.cluster_size - offset_into_cluster(s, guest_offset))
    return 1, host + offset_into_cluster(s, guest_offset), nbytes


def do_alloc_cluster_offset(bs, guest_offset: int, host_offset: int, nb_clusters: int) -> tuple[int, int, int]:
    """(0, host offset, clusters): new clusters anywhere, or only at ``host_offset`` when it is given."""
    s = bs.opaque
    if trace_qcow2_do_alloc_clusters_offset.event.enabled:
        trace_qcow2_do_alloc_clusters_offset(qemu_coroutine_self(), guest_offset, host_offset, nb_clusters)
    if trace_qcow2_cluster_alloc_phys.event.enabled:
        trace_qcow2_cluster_alloc_phys(qemu_coroutine_self())
    if host_offset == 0:
        off = qcow2_alloc_clusters(bs, nb_clusters * s.cluster_size)
        if off < 0:
            return off, host_offset, nb_clusters
        return 0, off, nb_clusters
    n = qcow2_alloc_clusters_at(bs, host_offset, nb_clusters)
    if n < 0:
        return n, host_offset, nb_clusters
    return 0, host_offset, n


def handle_alloc(bs, guest_offset: int, host_offset: int, nbytes: int, m: QCowL2Meta | None):
    """(1, host offset, bytes, m) after allocating new clusters (a new QCowL2Meta heads ``m``); (0, ..) if none."""
    s = bs.opaque
    if trace_qcow2_handle_alloc.event.enabled:
        trace_qcow2_handle_alloc(qemu_coroutine_self(), guest_offset, host_offset, nbytes)
    l2_index = offset_to_l2_index(s, guest_offset)
    nb_clusters = min(size_to_clusters(s, offset_into_cluster(s, guest_offset) + nbytes), s.l2_size - l2_index)
    ret, table, l2_index = get_cluster_table(bs, guest_offset)
    if ret < 0:
        return ret, host_offset, nbytes, m
    entries = _entries(table, l2_index, nb_clusters)
    qcow2_cache_put(s.l2_table_cache, table)
    entry = entries[0]
    # Compressed clusters are overwritten one at a time.
    nb_clusters = 1 if entry & QCOW_OFLAG_COMPRESSED else count_cow_clusters(bs, nb_clusters, entries)
    if nb_clusters <= 0:
        raise AssertionError("handle_alloc: no cluster needs COW or allocation")
    keep_old_clusters = False
    alloc_cluster_offset = 0
    if (qcow2_get_cluster_type(entry) == QCOW2_CLUSTER_ZERO_ALLOC and entry & QCOW_OFLAG_COPIED
            and (not host_offset or start_of_cluster(s, host_offset) == entry & L2E_OFFSET_MASK)):
        # Reuse preallocated zero clusters.
        if offset_into_cluster(s, entry & L2E_OFFSET_MASK):
            return _corrupt(bs, f"Preallocated zero cluster offset {c_hex(entry & L2E_OFFSET_MASK)} unaligned "
                                f"(guest offset: {c_hex(guest_offset)})"), host_offset, nbytes, m
        nb_clusters = count_contiguous_clusters(nb_clusters, s.cluster_size, entries, QCOW_OFLAG_COPIED)
        alloc_cluster_offset = entry & L2E_OFFSET_MASK
        keep_old_clusters = True
    if not alloc_cluster_offset:
        ret, alloc_cluster_offset, nb_clusters = do_alloc_cluster_offset(
            bs, guest_offset, start_of_cluster(s, host_offset), nb_clusters)
        if ret < 0:
            return ret, host_offset, nbytes, m
        if nb_clusters == 0:
            return 0, host_offset, 0, m       # cannot extend the contiguous allocation
        if not alloc_cluster_offset:
            ret = qcow2_pre_write_overlap_check(bs, 0, alloc_cluster_offset, nb_clusters * s.cluster_size)
            return (ret if ret < 0 else -errno.EIO), host_offset, nbytes, m
    # requested: from the first new cluster to the end of the (maybe shortened) request;
    # avail: the new clusters; nb_bytes: the part of them the request writes.
    requested_bytes = nbytes + offset_into_cluster(s, guest_offset)
    avail_bytes = min(INT_MAX, nb_clusters << s.cluster_bits)
    nb_bytes = min(requested_bytes, avail_bytes)
    new_m = QCowL2Meta(
        offset=start_of_cluster(s, guest_offset),
        alloc_offset=alloc_cluster_offset,
        nb_clusters=nb_clusters,
        keep_old_clusters=keep_old_clusters,
        cow_start=Qcow2COWRegion(0, offset_into_cluster(s, guest_offset)),
        cow_end=Qcow2COWRegion(nb_bytes, avail_bytes - nb_bytes),
        next=m,
    )
    s.cluster_allocs.append(new_m)
    nbytes = min(nbytes, nb_bytes - offset_into_cluster(s, guest_offset))
    return 1, alloc_cluster_offset + offset_into_cluster(s, guest_offset), nbytes, new_m


def qcow2_alloc_cluster_offset(bs, offset: int, nbytes: int):
    """Host clusters for writing ``nbytes`` at guest ``offset``: (0, bytes covered, host cluster offset, l2meta).

    The bytes covered are contiguous in the file; new clusters come with one
    QCowL2Meta each run, linked through ``next``, to be completed by
    qcow2_alloc_cluster_link_l2 after the data is written.
    """
    s = bs.opaque
    if trace_qcow2_alloc_clusters_offset.event.enabled:
        trace_qcow2_alloc_clusters_offset(qemu_coroutine_self(), offset, nbytes)
    while True:   # "again:" — after waiting for a dependency everything is looked up afresh
        start, remaining, cluster_offset, host_offset, cur_bytes, m = offset, nbytes, 0, 0, 0, None
        restart = False
        while True:
            if not host_offset:
                host_offset = start_of_cluster(s, cluster_offset)
            start += cur_bytes
            remaining -= cur_bytes
            cluster_offset += cur_bytes
            if remaining == 0:
                break
            cur_bytes = remaining
            ret, cur_bytes = handle_dependencies(bs, start, cur_bytes, m)
            if ret == -errno.EAGAIN:
                restart = True
                break
            if ret < 0:
                return ret, 0, 0, m
            if cur_bytes == 0:
                break
            ret, cluster_offset, cur_bytes = handle_copied(bs, start, cluster_offset, cur_bytes)
            if ret < 0:
                return ret, 0, 0, m
            if ret:
                continue
            if cur_bytes == 0:
                break
            ret, cluster_offset, cur_bytes, m = handle_alloc(bs, start, cluster_offset, cur_bytes, m)
            if ret < 0:
                return ret, 0, 0, m
            if ret:
                continue
            break
        if not restart:
            break
    done = nbytes - remaining
    if done <= 0 or not host_offset:
        raise AssertionError("qcow2_alloc_cluster_offset made no progress")
    return 0, done, host_offset, m
