"""Guest-to-host mapping: QEMU's block/qcow2-cluster.c.

* lookup: ``qcow2_get_cluster_offset`` walks L1 → L2 and reports the type
  of a run of clusters and its host offset;
* L1/L2 upkeep: ``qcow2_grow_l1_table``, ``qcow2_write_l1_entry``,
  ``l2_allocate`` (a new L2 table, copied from the old one when the old one
  is shared), ``get_cluster_table``;
* allocating writes are in ``qcow2_cluster_alloc`` (the second half of
  QEMU's file);
* ``qcow2_alloc_compressed_cluster_offset``, ``qcow2_cluster_discard``,
  ``qcow2_cluster_zeroize``;
* ``qcow2_expand_zero_clusters`` (amend's downgrade to compat=0.10): zero
  clusters become data clusters, in snapshots too.

Runs under ``s->lock``.
Left out: subclusters, encryption.
"""
from __future__ import annotations

import errno
import struct
from typing import Any, Callable

from qblock.block.driver import BDRV_REQ_MAY_UNMAP, BDRV_SECTOR_BITS, BlkdebugEvent
from qblock.block.graph import bdrv_getlength
from qblock.block.io import BLKDBG_EVENT, bdrv_co_pread, bdrv_co_pwrite, bdrv_co_pwrite_sync, bdrv_co_pwrite_zeroes
from qblock.util.error import Error, error_report
from qblock.trace.events import (
    trace_qcow2_l2_allocate,
    trace_qcow2_l2_allocate_done,
    trace_qcow2_l2_allocate_get_empty,
    trace_qcow2_l2_allocate_write_l1,
    trace_qcow2_l2_allocate_write_l2,
)

from .qcow2_cache import (
    qcow2_cache_depends_on_flush,
    qcow2_cache_empty,
    qcow2_cache_entry_mark_dirty,
    qcow2_cache_flush,
    qcow2_cache_get,
    qcow2_cache_get_empty,
    qcow2_cache_is_table_offset,
    qcow2_cache_put,
)
from .qcow2_h import (
    c_hex,
    HDR_L1_SIZE_OFFSET,
    INT_MAX,
    L1E_OFFSET_MASK,
    L1E_SIZE,
    L2E_COMPRESSED_OFFSET_SIZE_MASK,
    L2E_OFFSET_MASK,
    QCOW2_CLUSTER_COMPRESSED,
    QCOW2_CLUSTER_UNALLOCATED,
    QCOW2_CLUSTER_ZERO_ALLOC,
    QCOW2_CLUSTER_ZERO_PLAIN,
    QCOW2_DISCARD_ALWAYS,
    QCOW2_DISCARD_OTHER,
    QCOW2_DISCARD_REQUEST,
    QCOW2_OL_ACTIVE_L1,
    QCOW2_OL_ACTIVE_L2,
    QCOW2_OL_INACTIVE_L2,
    QCOW_MAX_L1_SIZE,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    l2_entry_get,
    l2_entry_set,
    offset_into_cluster,
    offset_to_l1_index,
    offset_to_l2_index,
    qcow2_get_cluster_type,
    refcount_diff,
    size_to_clusters,
)
from .qcow2_refcount import (
    qcow2_alloc_bytes,
    qcow2_alloc_clusters,
    qcow2_free_any_clusters,
    qcow2_free_clusters,
    qcow2_get_refcount,
    qcow2_process_discards,
    qcow2_update_cluster_refcount,
)
from .qcow2_overlap import qcow2_pre_write_overlap_check


def _corrupt(bs, msg: str) -> int:
    from .qcow2_header import qcow2_signal_corruption
    qcow2_signal_corruption(bs, True, -1, -1, msg)
    return -errno.EIO


def _entries(table, index: int, n: int) -> tuple:
    return struct.unpack_from(f">{n}Q", table, index * 8)


# --------------------------------------------------------------------------
# L1 and L2 tables


def qcow2_grow_l1_table(bs, min_size: int, exact_size: bool) -> int:
    """Make the L1 table hold at least ``min_size`` entries: a new table is written, then the header switched."""
    s = bs.opaque
    if min_size <= s.l1_size:
        return 0
    if min_size > INT_MAX // 8:
        return -errno.EFBIG
    if exact_size:
        new_l1_size = min_size
    else:
        new_l1_size = max(s.l1_size, 1)
        while min_size > new_l1_size:
            new_l1_size = (new_l1_size * 3 + 1) // 2
    if new_l1_size > QCOW_MAX_L1_SIZE // L1E_SIZE:
        return -errno.EFBIG
    new_l1_size2 = L1E_SIZE * new_l1_size
    new_l1_table = s.l1_table + [0] * (new_l1_size - s.l1_size)

    BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_L1_GROW_ALLOC_TABLE)
    new_l1_table_offset = qcow2_alloc_clusters(bs, new_l1_size2)
    if new_l1_table_offset < 0:
        return new_l1_table_offset
    ret = qcow2_cache_flush(bs, s.refcount_block_cache)
    if ret >= 0:
        # The L1 position has not been updated yet, so these clusters must be free.
        ret = qcow2_pre_write_overlap_check(bs, 0, new_l1_table_offset, new_l1_size2)
    if ret >= 0:
        BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_L1_GROW_WRITE_TABLE)
        raw = struct.pack(f">{new_l1_size}Q", *new_l1_table)
        ret = bdrv_co_pwrite_sync(bs.file, new_l1_table_offset, new_l1_size2, raw)
    if ret >= 0:
        BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_L1_GROW_ACTIVATE_TABLE)
        ret = bdrv_co_pwrite_sync(bs.file, HDR_L1_SIZE_OFFSET, 12, struct.pack(">IQ", new_l1_size, new_l1_table_offset))
    if ret < 0:
        qcow2_free_clusters(bs, new_l1_table_offset, new_l1_size2, QCOW2_DISCARD_OTHER)
        return ret
    old_l1_table_offset, old_l1_size = s.l1_table_offset, s.l1_size
    s.l1_table_offset = new_l1_table_offset
    s.l1_table = new_l1_table
    s.l1_size = new_l1_size
    qcow2_free_clusters(bs, old_l1_table_offset, old_l1_size * L1E_SIZE, QCOW2_DISCARD_OTHER)
    return 0


L1_ENTRIES_PER_SECTOR = 512 // 8


def qcow2_write_l1_entry(bs, l1_index: int) -> int:
    """Write the 512-byte sector of the L1 table holding entry ``l1_index`` (no read-modify-write)."""
    s = bs.opaque
    start = l1_index & ~(L1_ENTRIES_PER_SECTOR - 1)
    entries = s.l1_table[start:min(start + L1_ENTRIES_PER_SECTOR, s.l1_size)]
    buf = bytearray(512)
    struct.pack_into(f">{len(entries)}Q", buf, 0, *entries)
    ret = qcow2_pre_write_overlap_check(bs, QCOW2_OL_ACTIVE_L1, s.l1_table_offset + 8 * start, len(buf))
    if ret < 0:
        return ret
    BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_L1_UPDATE)
    return bdrv_co_pwrite_sync(bs.file, s.l1_table_offset + 8 * start, len(buf), buf)


def l2_load(bs, l2_offset: int, l1_index: int):
    """(0, table) for the L2 table at ``l2_offset`` (from the cache or the file), or (-errno, None).

    qblock addition: a table that would be read entirely from beyond the end
    of the file is corruption (QEMU reads it as zeroes, i.e. unallocated).
    """
    s = bs.opaque
    if qcow2_cache_is_table_offset(s.l2_table_cache, l2_offset) is None:
        file_len = bdrv_getlength(bs.file.bs)
        if 0 <= file_len <= l2_offset:
            return _corrupt(bs, f"L2 table offset {c_hex(l2_offset)} beyond the end of the image file "
                                f"(L1 index: {c_hex(l1_index)})"), None
    return qcow2_cache_get(bs, s.l2_table_cache, l2_offset)


def l2_allocate(bs, l1_index: int):
    """(0, table): a new L2 table for ``l1_index`` (a copy of the old one, if any), on disk before the L1 entry."""
    s = bs.opaque
    old_l2_offset = s.l1_table[l1_index]
    if trace_qcow2_l2_allocate.event.enabled:
        trace_qcow2_l2_allocate(bs, l1_index)
    table = None
    l2_offset = qcow2_alloc_clusters(bs, s.cluster_size)
    ret = l2_offset if l2_offset < 0 else 0
    if ret == 0 and l2_offset == 0:
        ret = _corrupt(bs, "Preventing invalid allocation of L2 table at offset 0")
    if ret == 0:
        ret = qcow2_cache_flush(bs, s.refcount_block_cache)
    if ret == 0:
        if trace_qcow2_l2_allocate_get_empty.event.enabled:
            trace_qcow2_l2_allocate_get_empty(bs, l1_index)
        ret, table = qcow2_cache_get_empty(bs, s.l2_table_cache, l2_offset)
    if ret == 0:
        if not old_l2_offset & L1E_OFFSET_MASK:
            table[:] = bytes(s.cluster_size)
        else:
            BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_L2_ALLOC_COW_READ)
            ret, old_table = qcow2_cache_get(bs, s.l2_table_cache, old_l2_offset & L1E_OFFSET_MASK)
            if ret == 0:
                table[:] = old_table
                qcow2_cache_put(s.l2_table_cache, old_table)
    if ret == 0:
        BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_L2_ALLOC_WRITE)
        if trace_qcow2_l2_allocate_write_l2.event.enabled:
            trace_qcow2_l2_allocate_write_l2(bs, l1_index)
        qcow2_cache_entry_mark_dirty(s.l2_table_cache, table)
        ret = qcow2_cache_flush(bs, s.l2_table_cache)
    if ret == 0:
        if trace_qcow2_l2_allocate_write_l1.event.enabled:
            trace_qcow2_l2_allocate_write_l1(bs, l1_index)
        s.l1_table[l1_index] = l2_offset | QCOW_OFLAG_COPIED
        ret = qcow2_write_l1_entry(bs, l1_index)
    if trace_qcow2_l2_allocate_done.event.enabled:
        trace_qcow2_l2_allocate_done(bs, l1_index, ret)
    if ret == 0:
        return 0, table
    if table is not None:
        qcow2_cache_put(s.l2_table_cache, table)
    s.l1_table[l1_index] = old_l2_offset
    if l2_offset > 0:
        qcow2_free_clusters(bs, l2_offset, s.cluster_size, QCOW2_DISCARD_ALWAYS)
    return ret, None


def count_contiguous_clusters(nb_clusters: int, cluster_size: int, entries, stop_flags: int) -> int:
    """How many of ``entries`` continue the first one's host run (with the same ``stop_flags`` bits)."""
    mask = stop_flags | L2E_OFFSET_MASK | QCOW_OFLAG_COMPRESSED
    first = entries[0] & mask
    if not first:
        return 0
    for i in range(nb_clusters):
        if entries[i] & mask != first + i * cluster_size:
            return i
    return nb_clusters


def count_contiguous_clusters_unallocated(nb_clusters: int, entries, wanted_type) -> int:
    for i in range(nb_clusters):
        if qcow2_get_cluster_type(entries[i]) != wanted_type:
            return i
    return nb_clusters


def qcow2_get_cluster_offset(bs, offset: int, bytes: int) -> tuple[int, int, int]:
    """(cluster type or -errno, bytes of that type from ``offset``, host cluster offset).

    For compressed clusters the third value is the compressed descriptor;
    one compressed cluster is reported at a time.
    """
    s = bs.opaque
    offset_in_cluster = offset_into_cluster(s, offset)
    bytes_needed = bytes + offset_in_cluster
    l1_bits = s.l2_bits + s.cluster_bits
    bytes_available = (1 << l1_bits) - (offset & ((1 << l1_bits) - 1)) + offset_in_cluster
    bytes_needed = min(bytes_needed, bytes_available)
    cluster_offset = 0
    l1_index = offset >> l1_bits
    l2_offset = s.l1_table[l1_index] & L1E_OFFSET_MASK if l1_index < s.l1_size else 0
    if not l2_offset:
        ctype = QCOW2_CLUSTER_UNALLOCATED
    else:
        if offset_into_cluster(s, l2_offset):
            return _corrupt(bs, f"L2 table offset {c_hex(l2_offset)} unaligned (L1 index: {c_hex(l1_index)})"), 0, 0
        ret, l2_table = l2_load(bs, l2_offset, l1_index)
        if ret < 0:
            return ret, 0, 0
        l2_index = offset_to_l2_index(s, offset)
        nb_clusters = min(size_to_clusters(s, bytes_needed), s.l2_size - l2_index)
        entries = _entries(l2_table, l2_index, nb_clusters)
        qcow2_cache_put(s.l2_table_cache, l2_table)
        cluster_offset = entries[0]
        ctype = qcow2_get_cluster_type(cluster_offset)
        if s.qcow_version < 3 and ctype in (QCOW2_CLUSTER_ZERO_PLAIN, QCOW2_CLUSTER_ZERO_ALLOC):
            return _corrupt(bs, f"Zero cluster entry found in pre-v3 image (L2 offset: {c_hex(l2_offset)}, "
                                f"L2 index: {c_hex(l2_index)})"), 0, 0
        if ctype == QCOW2_CLUSTER_COMPRESSED:
            c = 1
            cluster_offset &= L2E_COMPRESSED_OFFSET_SIZE_MASK
        elif ctype in (QCOW2_CLUSTER_ZERO_PLAIN, QCOW2_CLUSTER_UNALLOCATED):
            c = count_contiguous_clusters_unallocated(nb_clusters, entries, ctype)
            cluster_offset = 0
        else:
            c = count_contiguous_clusters(nb_clusters, s.cluster_size, entries, QCOW_OFLAG_ZERO)
            cluster_offset &= L2E_OFFSET_MASK
            if offset_into_cluster(s, cluster_offset):
                return _corrupt(bs, f"Cluster allocation offset {c_hex(cluster_offset)} unaligned "
                                    f"(L2 offset: {c_hex(l2_offset)}, L2 index: {c_hex(l2_index)})"), 0, 0
        bytes_available = c * s.cluster_size
    bytes_available = min(bytes_available, bytes_needed)
    return ctype, bytes_available - offset_in_cluster, cluster_offset


def get_cluster_table(bs, offset: int):
    """(0, L2 table, index) for ``offset``, allocating (or un-sharing) the L2 table as needed."""
    s = bs.opaque
    l1_index = offset_to_l1_index(s, offset)
    if l1_index >= s.l1_size:
        ret = qcow2_grow_l1_table(bs, l1_index + 1, False)
        if ret < 0:
            return ret, None, 0
    l2_offset = s.l1_table[l1_index] & L1E_OFFSET_MASK
    if offset_into_cluster(s, l2_offset):
        return _corrupt(bs, f"L2 table offset {c_hex(l2_offset)} unaligned (L1 index: {c_hex(l1_index)})"), None, 0
    if s.l1_table[l1_index] & QCOW_OFLAG_COPIED and l2_offset:   # (QEMU asserts on COPIED with offset 0)
        ret, table = l2_load(bs, l2_offset, l1_index)
    else:
        # First allocate a new L2 table (copying a shared one), then drop our reference to the old one.
        ret, table = l2_allocate(bs, l1_index)
        if ret == 0 and l2_offset:
            qcow2_free_clusters(bs, l2_offset, s.cluster_size, QCOW2_DISCARD_OTHER)
    if ret < 0:
        return ret, None, 0
    return 0, table, offset_to_l2_index(s, offset)


def qcow2_alloc_compressed_cluster_offset(bs, offset: int, compressed_size: int) -> tuple[int, int]:
    """(0, host offset) of newly allocated bytes for a compressed cluster at guest ``offset``, L2 updated."""
    s = bs.opaque
    ret, table, l2_index = get_cluster_table(bs, offset)
    if ret < 0:
        return ret, 0
    if l2_entry_get(table, l2_index) & L2E_OFFSET_MASK:
        # Compression cannot overwrite anything.
        qcow2_cache_put(s.l2_table_cache, table)
        return -errno.EIO, 0
    cluster_offset = qcow2_alloc_bytes(bs, compressed_size)
    if cluster_offset < 0:
        qcow2_cache_put(s.l2_table_cache, table)
        return cluster_offset, 0
    nb_csectors = ((cluster_offset + compressed_size - 1) >> 9) - (cluster_offset >> 9)
    entry = cluster_offset | QCOW_OFLAG_COMPRESSED | (nb_csectors << s.csize_shift)
    BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_L2_UPDATE_COMPRESSED)
    qcow2_cache_entry_mark_dirty(s.l2_table_cache, table)
    l2_entry_set(table, l2_index, entry)      # compressed clusters never have the COPIED flag
    qcow2_cache_put(s.l2_table_cache, table)
    return 0, cluster_offset


# --------------------------------------------------------------------------
# Discard and zeroes


def discard_single_l2(bs, offset: int, nb_clusters: int, type_, full_discard: bool) -> int:
    """Discard clusters of one L2 table: how many, or -errno.  Without full_discard v3 images read zeroes."""
    s = bs.opaque
    ret, table, l2_index = get_cluster_table(bs, offset)
    if ret < 0:
        return ret
    nb_clusters = min(nb_clusters, s.l2_size - l2_index)
    for i in range(nb_clusters):
        old = l2_entry_get(table, l2_index + i)
        ctype = qcow2_get_cluster_type(old)
        if ctype == QCOW2_CLUSTER_UNALLOCATED and (full_discard or bs.backing is None):
            continue
        if ctype == QCOW2_CLUSTER_ZERO_PLAIN and not full_discard:
            continue
        # First the L2 entry, then the refcount (update_refcount orders their writes).
        qcow2_cache_entry_mark_dirty(s.l2_table_cache, table)
        l2_entry_set(table, l2_index + i, QCOW_OFLAG_ZERO if not full_discard and s.qcow_version >= 3 else 0)
        qcow2_free_any_clusters(bs, old, 1, type_)
    qcow2_cache_put(s.l2_table_cache, table)
    return nb_clusters


def _check_range(bs, offset: int, nbytes: int) -> None:
    s = bs.opaque
    end = offset + nbytes
    if offset_into_cluster(s, offset) or (offset_into_cluster(s, end) and end != bs.total_sectors << BDRV_SECTOR_BITS):
        raise AssertionError(f"qcow2: range [{offset:#x}, {end:#x}) is not cluster aligned")


def qcow2_cluster_discard(bs, offset: int, nbytes: int, type_, full_discard: bool) -> int:
    s = bs.opaque
    _check_range(bs, offset, nbytes)
    nb_clusters = size_to_clusters(s, nbytes)
    s.cache_discards = True
    ret = 0
    while nb_clusters > 0:
        cleared = discard_single_l2(bs, offset, nb_clusters, type_, full_discard)
        if cleared < 0:
            ret = cleared
            break
        nb_clusters -= cleared
        offset += cleared * s.cluster_size
    s.cache_discards = False
    qcow2_process_discards(bs, ret)
    return ret


def zero_single_l2(bs, offset: int, nb_clusters: int, flags: int) -> int:
    s = bs.opaque
    unmap = bool(flags & BDRV_REQ_MAY_UNMAP)
    ret, table, l2_index = get_cluster_table(bs, offset)
    if ret < 0:
        return ret
    nb_clusters = min(nb_clusters, s.l2_size - l2_index)
    for i in range(nb_clusters):
        old = l2_entry_get(table, l2_index + i)
        ctype = qcow2_get_cluster_type(old)
        # Nothing to do when the cluster already reads as zeroes with the right allocation.
        if ctype == QCOW2_CLUSTER_ZERO_PLAIN or (ctype == QCOW2_CLUSTER_ZERO_ALLOC and not unmap):
            continue
        qcow2_cache_entry_mark_dirty(s.l2_table_cache, table)
        if ctype == QCOW2_CLUSTER_COMPRESSED or unmap:
            l2_entry_set(table, l2_index + i, QCOW_OFLAG_ZERO)
            qcow2_free_any_clusters(bs, old, 1, QCOW2_DISCARD_REQUEST)
        else:
            l2_entry_set(table, l2_index + i, old | QCOW_OFLAG_ZERO)
    qcow2_cache_put(s.l2_table_cache, table)
    return nb_clusters


def qcow2_cluster_zeroize(bs, offset: int, nbytes: int, flags: int) -> int:
    """Mark whole clusters as reading zeroes (v3 zero flag); with MAY_UNMAP their host clusters are freed."""
    s = bs.opaque
    _check_range(bs, offset, nbytes)
    if s.qcow_version < 3:
        # No zero flag before v3; without a backing file a discard reads as zeroes (later QEMU).
        if bs.backing is None:
            return qcow2_cluster_discard(bs, offset, nbytes, QCOW2_DISCARD_REQUEST, True)
        return -errno.ENOTSUP
    nb_clusters = size_to_clusters(s, nbytes)
    s.cache_discards = True
    ret = 0
    while nb_clusters > 0:
        cleared = zero_single_l2(bs, offset, nb_clusters, flags)
        if cleared < 0:
            ret = cleared
            break
        nb_clusters -= cleared
        offset += cleared * s.cluster_size
    s.cache_discards = False
    qcow2_process_discards(bs, ret)
    return ret


# --------------------------------------------------------------------------
# Zero clusters into data clusters (for a downgrade to compat=0.10)

# status_cb(bs, offset, total_work_size), as QEMU's BlockDriverAmendStatusCB without the opaque pointer.
StatusCB = Callable[[Any, int, int], None]


def expand_zero_clusters_in_l1(bs, l1_table: list, is_active_l1: bool, visited: list,
                               l1_entries: int, status_cb: StatusCB | None) -> int:
    """Zero clusters of one L1 table become data clusters (unbacked plain ones are just dropped): 0 or -errno."""
    s = bs.opaque
    for i, l1_entry in enumerate(l1_table):
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            visited[0] += 1
            if status_cb is not None:
                status_cb(bs, visited[0], l1_entries)
            continue
        if offset_into_cluster(s, l2_offset):
            return _corrupt(bs, f"L2 table offset {c_hex(l2_offset)} unaligned (L1 index: {c_hex(i)})")
        ret, l2_refcount = qcow2_get_refcount(bs, l2_offset >> s.cluster_bits)
        if ret < 0:
            return ret
        # qblock caches whole L2 tables: one slice per table.
        if is_active_l1:
            ret, l2_table = qcow2_cache_get(bs, s.l2_table_cache, l2_offset)
        else:
            l2_table = bytearray(s.cluster_size)
            ret = bdrv_co_pread(bs.file, l2_offset, s.cluster_size, l2_table)
        if ret < 0:
            return ret
        l2_dirty = False
        ret = 0
        try:
            for j in range(s.l2_size):
                l2_entry = l2_entry_get(l2_table, j)
                cluster_type = qcow2_get_cluster_type(l2_entry)
                if cluster_type not in (QCOW2_CLUSTER_ZERO_PLAIN, QCOW2_CLUSTER_ZERO_ALLOC):
                    continue
                offset = l2_entry & L2E_OFFSET_MASK
                if cluster_type == QCOW2_CLUSTER_ZERO_PLAIN:
                    if bs.backing is None:
                        # Nothing below: an unallocated cluster reads as zeroes too.
                        l2_entry_set(l2_table, j, 0)
                        l2_dirty = True
                        continue
                    offset = qcow2_alloc_clusters(bs, s.cluster_size)
                    if offset < 0:
                        ret = offset
                        break
                    if l2_refcount > 1:
                        # A shared L2 table: the new cluster is shared as often.
                        ret = qcow2_update_cluster_refcount(bs, offset >> s.cluster_bits,
                                                            refcount_diff(1, l2_refcount), False, QCOW2_DISCARD_OTHER)
                        if ret < 0:
                            qcow2_free_clusters(bs, offset, s.cluster_size, QCOW2_DISCARD_OTHER)
                            break

                def drop_new_cluster() -> None:
                    if cluster_type == QCOW2_CLUSTER_ZERO_PLAIN:
                        qcow2_free_clusters(bs, offset, s.cluster_size, QCOW2_DISCARD_ALWAYS)

                if offset_into_cluster(s, offset):
                    ret = _corrupt(bs, f"Cluster allocation offset {c_hex(offset)} unaligned "
                                       f"(L2 offset: {c_hex(l2_offset)}, L2 index: {c_hex(j)})")
                    drop_new_cluster()
                    break
                ret = qcow2_pre_write_overlap_check(bs, 0, offset, s.cluster_size)
                if ret >= 0:
                    ret = bdrv_co_pwrite_zeroes(bs.file, offset, s.cluster_size, 0)
                if ret < 0:
                    drop_new_cluster()
                    break
                l2_entry_set(l2_table, j, offset | QCOW_OFLAG_COPIED if l2_refcount == 1 else offset)
                l2_dirty = True
            if ret >= 0:
                ret = 0
            if ret == 0 and l2_dirty:
                if is_active_l1:
                    qcow2_cache_entry_mark_dirty(s.l2_table_cache, l2_table)
                    qcow2_cache_depends_on_flush(s.l2_table_cache)
                else:
                    ret = qcow2_pre_write_overlap_check(bs, QCOW2_OL_INACTIVE_L2 | QCOW2_OL_ACTIVE_L2,
                                                        l2_offset, s.cluster_size)
                    if ret >= 0:
                        ret = bdrv_co_pwrite(bs.file, l2_offset, s.cluster_size, l2_table)
        finally:
            if is_active_l1:
                qcow2_cache_put(s.l2_table_cache, l2_table)
        if ret < 0:
            return ret
        visited[0] += 1
        if status_cb is not None:
            status_cb(bs, visited[0], l1_entries)
    return 0


def qcow2_expand_zero_clusters(bs, status_cb: StatusCB | None) -> int:
    """Make the image readable without the v3 zero flag, in the active layer and every snapshot: 0 or -errno."""
    from .qcow2_header import qcow2_validate_table
    s = bs.opaque
    l1_entries = s.l1_size + sum(sn.l1_size for sn in s.snapshots) if status_cb is not None else 0
    visited = [0]
    ret = expand_zero_clusters_in_l1(bs, s.l1_table, True, visited, l1_entries, status_cb)
    if ret < 0:
        return ret
    # Snapshot L1 tables may point at active L2 tables, which are changed on disk from now on: write the
    # cache back and forget it.
    ret = qcow2_cache_empty(bs, s.l2_table_cache)
    if ret < 0:
        return ret
    for sn in s.snapshots:
        try:
            qcow2_validate_table(s, sn.l1_table_offset, sn.l1_size, L1E_SIZE, QCOW_MAX_L1_SIZE, "Snapshot L1 table")
        except Error as e:
            error_report(e.msg)
            return -(e.errno or errno.EINVAL)
        raw = bytearray(sn.l1_size * L1E_SIZE)
        ret = bdrv_co_pread(bs.file, sn.l1_table_offset, len(raw), raw)
        if ret < 0:
            return ret
        l1_table = list(struct.unpack(f">{sn.l1_size}Q", raw))
        ret = expand_zero_clusters_in_l1(bs, l1_table, False, visited, l1_entries, status_cb)
        if ret < 0:
            return ret
    return 0
