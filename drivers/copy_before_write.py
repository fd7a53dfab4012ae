"""Copy before write: QEMU's block/copy-before-write.c (a filter node since 6.0).

Before a write, write-zeroes or discard reaches the ``file`` child, the old
data of every cluster it touches is copied to the ``target`` child — once
per cluster; later writes to a copied cluster go straight through — so the
target holds a point-in-time copy of the file as it was when the filter was
inserted (what a backup job exports).  Concurrent writes to a cluster being
copied wait for that copy.  If the copy fails, the guest write fails with
the copy's errno (QEMU's ``on-cbw-error=break-guest-write``).

In the seed's era this was the backup job's before-write notifier
(``bdrv_add_before_write_notifier``); QEMU 6.0 turned it into this filter, and
``before_write_notifiers`` were removed in 6.1.  The cluster size is the
target's (``bdrv_get_info``), at least 64 KiB, as block-copy chooses.
"""
from __future__ import annotations

import errno

import attrs

from qblock.block.driver import (
    BlockDriver,
    BlockDriverInfo,
    bdrv_register,
)
from qblock.block.graph import (
    bdrv_pass_supported_flags,
    BDRV_CHILD_DATA,
    BDRV_CHILD_FILTERED,
    BLK_PERM_ALL,
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_RESIZE,
    BLK_PERM_WRITE,
    bdrv_default_perms,
    bdrv_get_info,
    bdrv_getlength,
    bdrv_open_child,
    child_format,
)
from qblock.block.io import (
    bdrv_co_block_status_from_file,
    bdrv_co_flush,
    bdrv_co_pdiscard,
    bdrv_co_preadv,
    bdrv_co_pwrite_zeroes,
    bdrv_co_pwritev,
)
from qblock.trace.control import trace_events_declare
from qblock.util.coroutine_lock import CoQueue, qemu_co_queue_restart_all, qemu_co_queue_wait
from qblock.util.error import Error
from qblock.util.iov import QEMUIOVector

BLOCK_COPY_CLUSTER_SIZE_DEFAULT = 1 << 16

_events = trace_events_declare('''
# block/copy-before-write.c (qblock: QEMU traces block-copy, not the filter)
cbw_copy_cluster(void *bs, int64_t offset, int64_t bytes) "bs %p copying old data offset %" PRId64 " bytes %" PRId64 " to the target"
cbw_wait_cluster(void *bs, int64_t cluster) "bs %p waits for the copy of cluster %" PRId64
''')
trace_cbw_copy_cluster = _events["trace_cbw_copy_cluster"]
trace_cbw_wait_cluster = _events["trace_cbw_wait_cluster"]


@attrs.define
class BDRVCopyBeforeWriteState:
    target: object = None
    cluster_size: int = BLOCK_COPY_CLUSTER_SIZE_DEFAULT
    copied: set = attrs.field(factory=set)            # clusters already in the target
    in_flight: dict = attrs.field(factory=dict)       # cluster -> CoQueue of writes waiting for its copy


# -- the copy -----------------------------------------------------------------

def cbw_copy_cluster(bs, cluster: int) -> int:
    """Copy one cluster's current data from the file child to the target (block-copy's job)."""
    s: BDRVCopyBeforeWriteState = bs.opaque
    cs = s.cluster_size
    offset = cluster * cs
    n = min(cs, bdrv_getlength(bs.file.bs) - offset)
    if n <= 0:
        return 0
    if trace_cbw_copy_cluster.event.enabled:
        trace_cbw_copy_cluster(bs, offset, n)
    buf = bytearray(n)
    qiov = QEMUIOVector([memoryview(buf)], -1)
    ret = bdrv_co_preadv(bs.file, offset, n, qiov, 0)
    if ret < 0:
        return ret
    return bdrv_co_pwritev(s.target, offset, n, qiov, 0)


def cbw_do_copy_before_write(bs, offset: int, bytes: int) -> int:
    """Copy the old data of every cluster of [offset, offset+bytes) not copied yet."""
    s: BDRVCopyBeforeWriteState = bs.opaque
    if not bytes:
        return 0
    cs = s.cluster_size
    for cluster in range(offset // cs, (offset + bytes + cs - 1) // cs):
        while cluster in s.in_flight:
            if trace_cbw_wait_cluster.event.enabled:
                trace_cbw_wait_cluster(bs, cluster)
            qemu_co_queue_wait(s.in_flight[cluster])
        if cluster in s.copied:
            continue
        s.in_flight[cluster] = CoQueue(f"cbw cluster {cluster}")
        try:
            ret = cbw_copy_cluster(bs, cluster)
            if ret == 0:
                s.copied.add(cluster)
        finally:
            qemu_co_queue_restart_all(s.in_flight.pop(cluster))
        if ret < 0:
            return ret
    return 0


class CopyBeforeWriteDriver(BlockDriver):
    format_name = "copy-before-write"
    state_class = BDRVCopyBeforeWriteState
    is_filter = True

    def bdrv_open(self, bs, options: dict, flags: int) -> int:
        s: BDRVCopyBeforeWriteState = bs.opaque
        bdrv_open_child(None, options, "file", bs, child_role=child_format)
        s.target = bdrv_open_child(None, options, "target", bs, child_role=BDRV_CHILD_DATA)
        bdi = BlockDriverInfo()
        cluster = bdi.cluster_size if bdrv_get_info(s.target.bs, bdi) == 0 else 0
        s.cluster_size = max(BLOCK_COPY_CLUSTER_SIZE_DEFAULT, cluster)
        if bdrv_getlength(s.target.bs) < bdrv_getlength(bs.file.bs):
            raise Error("The target is smaller than the source", errno=errno.EINVAL)
        bdrv_pass_supported_flags(bs)
        return 0

    def bdrv_child_perm(self, bs, c, role, reopen_queue, perm: int, shared: int) -> tuple[int, int]:
        if not role & BDRV_CHILD_FILTERED:
            # The target: we write it.  Everything but resizing is shared, so
            # the guest's disk may sit in the target's backing chain; the
            # size was checked once at open.
            return BLK_PERM_WRITE, BLK_PERM_ALL & ~BLK_PERM_RESIZE
        nperm, nshared = bdrv_default_perms(bs, c, role, reopen_queue, perm, shared)
        if bs.parents:
            if perm & BLK_PERM_WRITE:
                nperm |= BLK_PERM_CONSISTENT_READ     # we read old data before a write
            nshared &= ~(BLK_PERM_WRITE | BLK_PERM_RESIZE)
        return nperm, nshared

    def bdrv_getlength(self, bs) -> int:
        return bdrv_getlength(bs.file.bs)

    # -- I/O --------------------------------------------------------------------

    def bdrv_co_preadv(self, bs, offset: int, bytes: int, qiov, flags: int) -> int:
        return bdrv_co_preadv(bs.file, offset, bytes, qiov, flags)

    def bdrv_co_pwritev(self, bs, offset: int, bytes: int, qiov, flags: int) -> int:
        ret = cbw_do_copy_before_write(bs, offset, bytes)
        return ret if ret < 0 else bdrv_co_pwritev(bs.file, offset, bytes, qiov, flags)

    def bdrv_co_pwrite_zeroes(self, bs, offset: int, bytes: int, flags: int) -> int:
        ret = cbw_do_copy_before_write(bs, offset, bytes)
        return ret if ret < 0 else bdrv_co_pwrite_zeroes(bs.file, offset, bytes, flags)

    def bdrv_co_pdiscard(self, bs, offset: int, bytes: int) -> int:
        ret = cbw_do_copy_before_write(bs, offset, bytes)
        return ret if ret < 0 else bdrv_co_pdiscard(bs.file, offset, bytes)

    def bdrv_co_flush(self, bs) -> int:
        ret = bdrv_co_flush(bs.file.bs)
        return ret if ret < 0 else bdrv_co_flush(bs.opaque.target.bs)

    def bdrv_co_block_status(self, bs, want_zero: bool, offset: int, bytes: int):
        return bdrv_co_block_status_from_file(bs, want_zero, offset, bytes)


bdrv_register(CopyBeforeWriteDriver)
