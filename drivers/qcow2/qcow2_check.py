"""Refcount consistency: the core of QEMU's qcow2_check_refcounts (block/qcow2-refcount.c).

``qcow2_check_refcounts`` recomputes every cluster's refcount from the
metadata (header, L1 and L2 tables, data and compressed clusters, internal
snapshots, refcount table and blocks), compares it with the stored one,
and with ``fix`` repairs the differences and the COPIED flags, printing
QEMU's lines ("Leaked cluster 5 refcount=1 reference=0", "ERROR cluster 5
refcount=0 reference=1", "Repairing ...").  The driver uses it to repair an
image left dirty by lazy refcounts and as its ``bdrv_co_check`` hook;
``qemu-img check`` on top of it (summaries, exit codes, ``-r``) belongs to
the check tool.

Left out (QEMU has them): rebuilding the refcount structure when a refcount
block is itself broken, fragmentation statistics, persistent bitmaps (their
clusters show up as leaks), repairing L2 entries that are not aligned.
"""
from __future__ import annotations

import errno
import struct
import sys

import attrs

from .qcow2_cache import qcow2_cache_entry_mark_dirty, qcow2_cache_get, qcow2_cache_put
from .qcow2_h import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW2_CLUSTER_COMPRESSED,
    QCOW2_CLUSTER_NORMAL,
    QCOW2_CLUSTER_ZERO_ALLOC,
    QCOW2_DISCARD_ALWAYS,
    QCOW_OFLAG_COPIED,
    REFT_OFFSET_MASK,
    bdrv_co_pread,
    l2_entry_get,
    l2_entry_set,
    offset_into_cluster,
    qcow2_get_cluster_type,
    refcount_diff,
    size_to_clusters,
    start_of_cluster,
)

BDRV_FIX_LEAKS = 1
BDRV_FIX_ERRORS = 2


@attrs.define
class BdrvCheckResult:
    """The counters of QEMU's BdrvCheckResult (qblock.block.check has the full one, with BlockFragInfo)."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0


def _err(msg: str) -> None:
    sys.stderr.write(msg + "\n")


def inc_refcounts(bs, res: BdrvCheckResult, refcounts: list, offset: int, size: int) -> None:
    s = bs.opaque
    if size <= 0:
        return
    start = start_of_cluster(s, offset)
    last = start_of_cluster(s, offset + size - 1)
    for cluster_offset in range(start, last + 1, s.cluster_size):
        k = cluster_offset >> s.cluster_bits
        if k >= len(refcounts):
            refcounts.extend([0] * (k + 1 - len(refcounts)))
        if refcounts[k] >= s.refcount_max:
            _err(f"ERROR: overflow cluster offset=0x{cluster_offset:x}")
            res.corruptions += 1
            continue
        refcounts[k] += 1


def _read_l2(bs, l2_offset: int, active: bool):
    s = bs.opaque
    if active:
        ret, table = qcow2_cache_get(bs, s.l2_table_cache, l2_offset)
        if ret < 0:
            return ret, None
        data = bytes(table)
        qcow2_cache_put(s.l2_table_cache, table)
        return 0, data
    buf = bytearray(s.cluster_size)
    ret = bdrv_co_pread(bs.file, l2_offset, s.cluster_size, buf)
    return ret, buf


def check_refcounts_l1(bs, res: BdrvCheckResult, refcounts: list, l1_table_offset: int, l1_size: int,
                       active: bool) -> int:
    s = bs.opaque
    inc_refcounts(bs, res, refcounts, l1_table_offset, l1_size * 8)
    if active:
        l1 = list(s.l1_table[:l1_size])
    else:
        buf = bytearray(l1_size * 8)
        ret = bdrv_co_pread(bs.file, l1_table_offset, len(buf), buf)
        if ret < 0:
            _err("ERROR: I/O error in check_refcounts_l1")
            res.check_errors += 1
            return ret
        l1 = list(struct.unpack(f">{l1_size}Q", buf))
    for i, entry in enumerate(l1):
        l2_offset = entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        inc_refcounts(bs, res, refcounts, l2_offset, s.cluster_size)
        if offset_into_cluster(s, l2_offset):
            _err(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted")
            res.corruptions += 1
            continue
        ret, table = _read_l2(bs, l2_offset, active)
        if ret < 0:
            _err("ERROR: I/O error in check_refcounts_l2")
            res.check_errors += 1
            return ret
        for entry2 in struct.unpack(f">{s.l2_size}Q", table):
            ctype = qcow2_get_cluster_type(entry2)
            if ctype == QCOW2_CLUSTER_COMPRESSED:
                if entry2 & QCOW_OFLAG_COPIED:
                    _err(f"ERROR: coffset=0x{entry2 & s.cluster_offset_mask:x}: copied flag must never be set "
                         "for compressed clusters")
                    res.corruptions += 1
                nb_csectors = ((entry2 >> s.csize_shift) & s.csize_mask) + 1
                inc_refcounts(bs, res, refcounts, (entry2 & s.cluster_offset_mask) & ~511, nb_csectors * 512)
            elif ctype in (QCOW2_CLUSTER_NORMAL, QCOW2_CLUSTER_ZERO_ALLOC):
                off = entry2 & L2E_OFFSET_MASK
                if offset_into_cluster(s, off):
                    _err(f"ERROR offset={off:x}: Cluster is not properly aligned; L2 entry corrupted.")
                    res.corruptions += 1
                    continue
                inc_refcounts(bs, res, refcounts, off, s.cluster_size)
    return 0


def calculate_refcounts(bs, res: BdrvCheckResult, nb_clusters: int) -> tuple[int, list]:
    s = bs.opaque
    refcounts = [0] * nb_clusters
    inc_refcounts(bs, res, refcounts, 0, s.cluster_size)        # the header
    ret = check_refcounts_l1(bs, res, refcounts, s.l1_table_offset, s.l1_size, True)
    if ret < 0:
        return ret, refcounts
    for sn in s.snapshots:
        ret = check_refcounts_l1(bs, res, refcounts, sn.l1_table_offset, sn.l1_size, False)
        if ret < 0:
            return ret, refcounts
    inc_refcounts(bs, res, refcounts, s.snapshots_offset, s.snapshots_size)
    inc_refcounts(bs, res, refcounts, s.refcount_table_offset, s.refcount_table_size * 8)
    for i in range(s.refcount_table_size):
        offset = s.refcount_table[i] & REFT_OFFSET_MASK
        if not offset:
            continue
        cluster = offset >> s.cluster_bits
        if offset_into_cluster(s, offset):
            _err(f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted")
            res.corruptions += 1
            continue
        if cluster >= len(refcounts):
            _err(f"ERROR refcount block {i} is outside image")
            res.corruptions += 1
            continue
        inc_refcounts(bs, res, refcounts, offset, s.cluster_size)
        if refcounts[cluster] != 1:
            _err(f"ERROR refcount block {i} refcount={refcounts[cluster]}")
            res.corruptions += 1
    return 0, refcounts


def compare_refcounts(bs, res: BdrvCheckResult, fix: int, refcounts: list) -> int:
    """Compare stored and computed refcounts; repair them as ``fix`` allows.  The highest used cluster."""
    from .qcow2_refcount import qcow2_get_refcount, update_refcount
    s = bs.opaque
    highest_cluster = 0
    for i in range(len(refcounts)):
        ret, refcount1 = qcow2_get_refcount(bs, i)
        if ret < 0:
            _err(f"Can't get refcount for cluster {i}: {ret}")
            res.check_errors += 1
            continue
        refcount2 = refcounts[i]
        if refcount1 > 0 or refcount2 > 0:
            highest_cluster = i
        if refcount1 == refcount2:
            continue
        num_fixed = None
        if refcount1 > refcount2 and fix & BDRV_FIX_LEAKS:
            num_fixed = "leaks_fixed"
        elif refcount1 < refcount2 and fix & BDRV_FIX_ERRORS:
            num_fixed = "corruptions_fixed"
        kind = "Repairing" if num_fixed else "ERROR" if refcount1 < refcount2 else "Leaked"
        _err(f"{kind} cluster {i} refcount={refcount1} reference={refcount2}")
        if num_fixed:
            ret = update_refcount(bs, i << s.cluster_bits, 1, refcount_diff(refcount1, refcount2),
                                  refcount1 > refcount2, QCOW2_DISCARD_ALWAYS)
            if ret >= 0:
                setattr(res, num_fixed, getattr(res, num_fixed) + 1)
                continue
        if refcount1 < refcount2:
            res.corruptions += 1
        else:
            res.leaks += 1
    return highest_cluster


def check_oflag_copied(bs, res: BdrvCheckResult, fix: int) -> int:
    """COPIED must be set exactly on active L2 tables and data clusters whose refcount is 1."""
    from .qcow2_cluster import qcow2_write_l1_entry
    from .qcow2_refcount import qcow2_get_refcount
    s = bs.opaque
    for i in range(s.l1_size):
        l1_entry = s.l1_table[i]
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset or offset_into_cluster(s, l2_offset):
            continue
        ret, refcount = qcow2_get_refcount(bs, l2_offset >> s.cluster_bits)
        if ret < 0:
            continue
        if (refcount == 1) != bool(l1_entry & QCOW_OFLAG_COPIED):
            _err(f"{'Repairing' if fix & BDRV_FIX_ERRORS else 'ERROR'} OFLAG_COPIED L2 cluster: "
                 f"l1_index={i} l1_entry={l1_entry:x} refcount={refcount}")
            if fix & BDRV_FIX_ERRORS:
                s.l1_table[i] = l1_entry | QCOW_OFLAG_COPIED if refcount == 1 else l1_entry & ~QCOW_OFLAG_COPIED
                ret = qcow2_write_l1_entry(bs, i)
                if ret < 0:
                    res.check_errors += 1
                    return ret
                res.corruptions_fixed += 1
            else:
                res.corruptions += 1
        ret, table = qcow2_cache_get(bs, s.l2_table_cache, l2_offset)
        if ret < 0:
            res.check_errors += 1
            return ret
        try:
            for j in range(s.l2_size):
                entry = l2_entry_get(table, j)
                if qcow2_get_cluster_type(entry) not in (QCOW2_CLUSTER_NORMAL, QCOW2_CLUSTER_ZERO_ALLOC):
                    continue
                data_offset = entry & L2E_OFFSET_MASK
                if offset_into_cluster(s, data_offset):
                    continue
                ret, refcount = qcow2_get_refcount(bs, data_offset >> s.cluster_bits)
                if ret < 0:
                    continue
                if (refcount == 1) != bool(entry & QCOW_OFLAG_COPIED):
                    _err(f"{'Repairing' if fix & BDRV_FIX_ERRORS else 'ERROR'} OFLAG_COPIED data cluster: "
                         f"l2_entry={entry:x} refcount={refcount}")
                    if fix & BDRV_FIX_ERRORS:
                        new = entry | QCOW_OFLAG_COPIED if refcount == 1 else entry & ~QCOW_OFLAG_COPIED
                        qcow2_cache_entry_mark_dirty(s.l2_table_cache, table)
                        l2_entry_set(table, j, new)
                        res.corruptions_fixed += 1
                    else:
                        res.corruptions += 1
        finally:
            qcow2_cache_put(s.l2_table_cache, table)
    return 0


def qcow2_check_refcounts(bs, res, fix: int = 0) -> int:
    """Recompute and compare every refcount, repairing as ``fix`` (BDRV_FIX_*) allows; 0 or -errno.

    ``res`` is a BdrvCheckResult (this module's or the block layer's: only
    the counters and ``image_end_offset`` are touched), as QEMU fills it.
    """
    from qblock.block.graph import bdrv_getlength
    s = bs.opaque
    if len(s.snapshots) != s.nb_snapshots:
        # Opened with BDRV_O_CHECK, which skips the snapshot table: read it now.
        from qblock.util.error import Error
        from .qcow2_snapshot import qcow2_read_snapshots
        try:
            qcow2_read_snapshots(bs)
        except Error as e:
            _err(f"ERROR: {e}")
            res.check_errors += 1
            return -(e.errno or errno.EIO)
    size = bdrv_getlength(bs.file.bs)
    if size < 0:
        res.check_errors += 1
        return size
    ret, refcounts = calculate_refcounts(bs, res, size_to_clusters(s, size))
    if ret < 0:
        return ret
    highest_cluster = compare_refcounts(bs, res, fix, refcounts)
    ret = check_oflag_copied(bs, res, fix)
    res.image_end_offset = (highest_cluster + 1) * s.cluster_size
    return min(ret, 0)
