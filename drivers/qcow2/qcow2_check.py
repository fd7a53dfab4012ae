"""Consistency check and repair: QEMU's qcow2_check_refcounts (block/qcow2-refcount.c) and
qcow2_co_check_locked (block/qcow2.c, kept here beside what it calls).

``qcow2_check_refcounts`` rebuilds every cluster's refcount in memory (the
IMRT, a plain list of ints here) from the metadata — header, active L1 and
L2 tables, data and compressed clusters, snapshot L1/L2 tables, snapshot
table, refcount table and blocks — checking entries on the way (reserved
bits, alignment, regions past the end of the file, COPIED on compressed
clusters) and gathering the fragmentation statistics ``qemu-img check``
prints.  ``compare_refcounts`` compares it with the refcounts on disk: a
cluster counted higher on disk is a leak, lower is a corruption, and a used
cluster with refcount 0 (or a broken refcount table or block) means the
whole refcount structure must be rebuilt.  ``check_oflag_copied`` checks the
COPIED flags against the refcounts.  Repairs follow ``fix``
(BDRV_FIX_LEAKS, BDRV_FIX_ERRORS) as QEMU's do, down to the messages
("Leaked cluster 10 refcount=1 reference=0", "Repairing ...", "Rebuilding
refcount structure") and the order of writes; ``rebuild_refcount_structure``
writes new refcount blocks and a new table from the IMRT, then the header.

Left out (QEMU has them): subclusters and external data files (qblock opens
neither), persistent bitmaps (their clusters show up as leaks), encryption
headers, discarding overhanging snapshots (see
``qcow2_check_read_snapshot_table``).
"""
from __future__ import annotations

import errno
import functools
import itertools
import struct
import sys

import attrs

from qblock.block.check import BDRV_FIX_ERRORS, BDRV_FIX_LEAKS, BdrvCheckResult
from qblock.block.driver import BDRV_SECTOR_SIZE, PreallocMode
from qblock.block.graph import bdrv_getlength
from qblock.block.io import bdrv_co_pread, bdrv_co_pwrite, bdrv_co_pwrite_sync, bdrv_co_truncate
from qblock.util.error import Error, error_report, error_setg_errno, strerror

from .qcow2_cache import (
    qcow2_cache_empty,
    qcow2_cache_get,
    qcow2_cache_has_dirty,
    qcow2_cache_is_table_offset,
    qcow2_cache_put,
    qcow2_cache_write,
)
from .qcow2_h import (
    HDR_REFCOUNT_TABLE_OFFSET,
    INT64_MAX,
    INT_MAX,
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    QCOW2_CLUSTER_COMPRESSED,
    QCOW2_CLUSTER_NORMAL,
    QCOW2_CLUSTER_ZERO_ALLOC,
    QCOW2_DISCARD_ALWAYS,
    QCOW2_OL_ACTIVE_L2,
    QCOW2_OL_INACTIVE_L2,
    QCOW_MAX_L1_SIZE,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    REFT_OFFSET_MASK,
    REFT_RESERVED_MASK,
    c_hex,
    l2_entry_set,
    offset_into_cluster,
    qcow2_get_cluster_type,
    refcount_diff,
    size_to_clusters,
)
from .qcow2_overlap import qcow2_pre_write_overlap_check

CHECK_FRAG_INFO = 0x2      # check_refcounts_l1/l2: update the BlockFragInfo counters

__all__ = ["BDRV_FIX_ERRORS", "BDRV_FIX_LEAKS", "qcow2_check_refcounts", "qcow2_co_check_locked"]


def _err(msg: str) -> None:
    """QEMU's fprintf(stderr, ...) of the check: one line."""
    sys.stderr.write(msg + "\n")


def _copy_res(res: BdrvCheckResult) -> BdrvCheckResult:
    return attrs.evolve(res, bfi=attrs.evolve(res.bfi))


def _assign_res(dst: BdrvCheckResult, src: BdrvCheckResult) -> None:
    """``*dst = *src`` (the caller's object is filled in place)."""
    for a in attrs.fields(BdrvCheckResult):
        setattr(dst, a.name, getattr(src, a.name))
    dst.bfi = attrs.evolve(src.bfi)


def _sync_cached_l2(bs, l2_offset: int, table) -> None:
    """qblock addition: a table the check rewrote on disk must not live on, stale, in the L2 cache."""
    cached = qcow2_cache_is_table_offset(bs.opaque.l2_table_cache, l2_offset)
    if cached is not None:
        cached[:] = table


# --------------------------------------------------------------------------
# The in-memory refcount table (IMRT)


def qcow2_inc_refcounts_imrt(bs, res: BdrvCheckResult, imrt: list, offset: int, size: int) -> int:
    """Count one more reference to every cluster of [offset, offset + size): 0 or -errno."""
    s = bs.opaque
    if size <= 0:
        return 0
    file_len = bdrv_getlength(bs.file.bs)
    if file_len < 0:
        return file_len
    # The last cluster of an image may be partly past the end of the file, but not more.
    if offset + size - file_len >= s.cluster_size:
        _err(f"ERROR: counting reference for region exceeding the end of the file by one cluster or more: "
             f"offset 0x{offset:x} size 0x{size:x}")
        res.corruptions += 1
        return 0
    first = offset >> s.cluster_bits
    last = (offset + size - 1) >> s.cluster_bits
    if last >= len(imrt):
        imrt.extend([0] * (last + 1 - len(imrt)))
    for k in range(first, last + 1):
        if imrt[k] == s.refcount_max:
            _err(f"ERROR: overflow cluster offset=0x{k << s.cluster_bits:x}")
            _err("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean "
                 "copy if the image cannot be opened for writing")
            res.corruptions += 1
            continue
        imrt[k] += 1
    return 0


@functools.cache
def _subbyte_table(order: int) -> list:
    """For refcounts narrower than a byte: each byte value's refcounts, lowest bits first."""
    bits = 1 << order
    mask = (1 << bits) - 1
    return [tuple((b >> (i * bits)) & mask for i in range(8 // bits)) for b in range(256)]


def _decode_refblock(s, block) -> list:
    n = s.refcount_block_size
    order = s.refcount_order
    if order >= 4:
        return list(struct.unpack_from(f">{n}{'HIQ'[order - 4]}", block))
    if order == 3:
        return list(block)
    return list(itertools.chain.from_iterable(map(_subbyte_table(order).__getitem__, block)))


def _encode_refblock(s, imrt: list, start: int) -> bytes:
    """The refcount block for clusters [start, start + refcount_block_size) as the IMRT has them."""
    n = s.refcount_block_size
    values = imrt[start:start + n]
    values += [0] * (n - len(values))
    order = s.refcount_order
    if order >= 4:
        return struct.pack(f">{n}{'HIQ'[order - 4]}", *values)
    if order == 3:
        return bytes(values)
    block = bytearray(s.cluster_size)
    for i in [i for i, v in enumerate(values) if v]:
        s.set_refcount(block, i, values[i])
    return bytes(block)


def _load_refcounts(bs, table_index: int) -> tuple[int, list | None]:
    """The stored refcounts of one refcount block, as qcow2_get_refcount reads them: (0, list or None for
    all zero) or (-errno, None)."""
    from .qcow2_refcount import qcow2_get_refcount
    s = bs.opaque
    if table_index >= s.refcount_table_size:
        return 0, None
    offset = s.refcount_table[table_index] & REFT_OFFSET_MASK
    if not offset:
        return 0, None
    if offset_into_cluster(s, offset):
        ret, _ = qcow2_get_refcount(bs, table_index << s.refcount_block_bits)   # signals the corruption
        return ret, None
    ret, block = qcow2_cache_get(bs, s.refcount_block_cache, offset)
    if ret < 0:
        return ret, None
    values = _decode_refblock(s, block)
    qcow2_cache_put(s.refcount_block_cache, block)
    return 0, values


class _StoredRefcounts:
    """qcow2_get_refcount for many clusters in a row, one refcount block decoded at a time."""

    def __init__(self, bs) -> None:
        self.bs = bs
        self.blocks: dict[int, tuple[int, list | None]] = {}

    def get(self, cluster_index: int) -> tuple[int, int]:
        s = self.bs.opaque
        table_index = cluster_index >> s.refcount_block_bits
        entry = self.blocks.get(table_index)
        if entry is None:
            entry = self.blocks[table_index] = _load_refcounts(self.bs, table_index)
        ret, values = entry
        if ret < 0:
            return ret, 0
        return 0, values[cluster_index & (s.refcount_block_size - 1)] if values else 0

    def forget(self, cluster_index: int) -> None:
        self.blocks.pop(cluster_index >> self.bs.opaque.refcount_block_bits, None)


# --------------------------------------------------------------------------
# Walking the metadata


def fix_l2_entry_by_zero(bs, res: BdrvCheckResult, l2_offset: int, l2_table: bytearray, l2_index: int,
                         active: bool) -> tuple[int, bool]:
    """Turn an L2 entry into a plain zero cluster on disk: (0 or -errno, whether the overlap check failed).

    The caller counted the corruption; it becomes a fixed one here.
    """
    l2_entry_set(l2_table, l2_index, QCOW_OFLAG_ZERO)
    l2e_offset = l2_offset + l2_index * 8
    ret = qcow2_pre_write_overlap_check(bs, QCOW2_OL_ACTIVE_L2 if active else QCOW2_OL_INACTIVE_L2, l2e_offset, 8)
    if ret < 0:
        _err("ERROR: Overlap check failed")
        res.check_errors += 1
        return ret, True
    ret = bdrv_co_pwrite_sync(bs.file, l2e_offset, 8, memoryview(l2_table)[l2_index * 8:l2_index * 8 + 8])
    if ret < 0:
        _err(f"ERROR: Failed to overwrite L2 table entry: {strerror(-ret)}")
        res.check_errors += 1
        return ret, False
    _sync_cached_l2(bs, l2_offset, l2_table)
    res.corruptions -= 1
    res.corruptions_fixed += 1
    return 0, False


def check_refcounts_l2(bs, res: BdrvCheckResult, imrt: list, l2_offset: int, flags: int, fix: int,
                       active: bool) -> int:
    """Count the clusters one L2 table references, checking its entries: 0 or -errno."""
    s = bs.opaque
    cs = s.cluster_size
    table = bytearray(s.l2_size * 8)
    ret = bdrv_co_pread(bs.file, l2_offset, len(table), table)
    if ret < 0:
        _err("ERROR: I/O error in check_refcounts_l2")
        res.check_errors += 1
        return ret
    bfi = res.bfi
    next_contiguous_offset = 0
    for i, l2_entry in enumerate(struct.unpack(f">{s.l2_size}Q", table)):
        if not l2_entry:
            continue
        ctype = qcow2_get_cluster_type(l2_entry)
        if ctype != QCOW2_CLUSTER_COMPRESSED and l2_entry & L2E_STD_RESERVED_MASK:
            _err(f"ERROR found l2 entry with reserved bits set: {l2_entry:x}")
            res.corruptions += 1
        if ctype == QCOW2_CLUSTER_COMPRESSED:
            if l2_entry & QCOW_OFLAG_COPIED:
                _err(f"ERROR: coffset=0x{l2_entry & s.cluster_offset_mask:x}: copied flag must never be set for "
                     "compressed clusters")
                l2_entry &= ~QCOW_OFLAG_COPIED
                res.corruptions += 1
            coffset = l2_entry & s.cluster_offset_mask
            csize = (((l2_entry >> s.csize_shift) & s.csize_mask) + 1) * 512 - (coffset & 511)
            ret = qcow2_inc_refcounts_imrt(bs, res, imrt, coffset, csize)
            if ret < 0:
                return ret
            if flags & CHECK_FRAG_INFO:
                # Compressed clusters are fragmented by nature: neighbours share sectors.
                bfi.allocated_clusters += 1
                bfi.compressed_clusters += 1
                bfi.fragmented_clusters += 1
        elif ctype in (QCOW2_CLUSTER_NORMAL, QCOW2_CLUSTER_ZERO_ALLOC):
            offset = l2_entry & L2E_OFFSET_MASK
            if offset & (cs - 1):
                res.corruptions += 1
                if l2_entry & QCOW_OFLAG_ZERO:
                    _err(f"{'Repairing' if fix & BDRV_FIX_ERRORS else 'ERROR'} offset={offset:x}: Preallocated "
                         "cluster is not properly aligned; L2 entry corrupted.")
                    if fix & BDRV_FIX_ERRORS:
                        ret, overlap = fix_l2_entry_by_zero(bs, res, l2_offset, table, i, active)
                        if overlap:
                            return ret      # something is badly wrong: stop checking this table
                        if ret == 0:
                            continue        # the cluster is no longer used
                else:
                    _err(f"ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted.")
            if flags & CHECK_FRAG_INFO:
                bfi.allocated_clusters += 1
                if next_contiguous_offset and offset != next_contiguous_offset:
                    bfi.fragmented_clusters += 1
                next_contiguous_offset = offset + cs
            ret = qcow2_inc_refcounts_imrt(bs, res, imrt, offset, cs)
            if ret < 0:
                return ret
    return 0


def check_refcounts_l1(bs, res: BdrvCheckResult, imrt: list, l1_table_offset: int, l1_size: int, flags: int,
                       fix: int, active: bool) -> int:
    """Count an L1 table, its L2 tables and everything they reference: 0 or -errno."""
    s = bs.opaque
    if not l1_size:
        return 0
    ret = qcow2_inc_refcounts_imrt(bs, res, imrt, l1_table_offset, l1_size * 8)
    if ret < 0:
        return ret
    buf = bytearray(l1_size * 8)
    ret = bdrv_co_pread(bs.file, l1_table_offset, len(buf), buf)
    if ret < 0:
        _err("ERROR: I/O error in check_refcounts_l1")
        res.check_errors += 1
        return ret
    for entry in struct.unpack(f">{l1_size}Q", buf):
        if not entry:
            continue
        if entry & L1E_RESERVED_MASK:
            _err(f"ERROR found L1 entry with reserved bits set: {entry:x}")
            res.corruptions += 1
        l2_offset = entry & L1E_OFFSET_MASK
        ret = qcow2_inc_refcounts_imrt(bs, res, imrt, l2_offset, s.cluster_size)
        if ret < 0:
            return ret
        if offset_into_cluster(s, l2_offset):
            _err(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted")
            res.corruptions += 1
        ret = check_refcounts_l2(bs, res, imrt, l2_offset, flags, fix, active)
        if ret < 0:
            return ret
    return 0


def check_oflag_copied(bs, res: BdrvCheckResult, fix: int) -> int:
    """COPIED must be set exactly on the active L2 tables and data clusters whose refcount is 1: 0 or -errno.

    A failing refcount lookup is skipped silently: compare_refcounts reported it already.
    """
    from .qcow2_cluster import qcow2_write_l1_entry
    s = bs.opaque
    if fix & BDRV_FIX_ERRORS:
        repair = True
    elif fix & BDRV_FIX_LEAKS:
        # Only when the refcounts are known good: they were repaired just before, if at all.
        repair = not res.check_errors and not res.corruptions and not res.leaks
    else:
        repair = False
    word = "Repairing" if repair else "ERROR"
    stored = _StoredRefcounts(bs)
    table = bytearray(s.cluster_size)
    for i in range(s.l1_size):
        l1_entry = s.l1_table[i]
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        ret, refcount = stored.get(l2_offset >> s.cluster_bits)
        if ret < 0:
            continue
        if (refcount == 1) != bool(l1_entry & QCOW_OFLAG_COPIED):
            res.corruptions += 1
            _err(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} refcount={refcount}")
            if repair:
                s.l1_table[i] = l1_entry | QCOW_OFLAG_COPIED if refcount == 1 else l1_entry & ~QCOW_OFLAG_COPIED
                ret = qcow2_write_l1_entry(bs, i)
                if ret < 0:
                    res.check_errors += 1
                    return ret
                res.corruptions -= 1
                res.corruptions_fixed += 1
        ret = bdrv_co_pread(bs.file, l2_offset, s.l2_size * 8, table)
        if ret < 0:
            _err(f"ERROR: Could not read L2 table: {strerror(-ret)}")
            res.check_errors += 1
            return ret
        l2_dirty = 0
        for j, l2_entry in enumerate(struct.unpack(f">{s.l2_size}Q", table)):
            if not l2_entry & L2E_OFFSET_MASK or \
                    qcow2_get_cluster_type(l2_entry) not in (QCOW2_CLUSTER_NORMAL, QCOW2_CLUSTER_ZERO_ALLOC):
                continue
            ret, refcount = stored.get((l2_entry & L2E_OFFSET_MASK) >> s.cluster_bits)
            if ret < 0:
                continue
            if (refcount == 1) != bool(l2_entry & QCOW_OFLAG_COPIED):
                res.corruptions += 1
                _err(f"{word} OFLAG_COPIED data cluster: l2_entry={l2_entry:x} refcount={refcount}")
                if repair:
                    l2_entry_set(table, j, l2_entry | QCOW_OFLAG_COPIED if refcount == 1
                                 else l2_entry & ~QCOW_OFLAG_COPIED)
                    l2_dirty += 1
        if l2_dirty:
            ret = qcow2_pre_write_overlap_check(bs, QCOW2_OL_ACTIVE_L2, l2_offset, s.cluster_size)
            if ret < 0:
                _err(f"ERROR: Could not write L2 table; metadata overlap check failed: {strerror(-ret)}")
                res.check_errors += 1
                return ret
            ret = bdrv_co_pwrite(bs.file, l2_offset, s.cluster_size, table)
            if ret < 0:
                _err(f"ERROR: Could not write L2 table: {strerror(-ret)}")
                res.check_errors += 1
                return ret
            _sync_cached_l2(bs, l2_offset, table)
            res.corruptions -= l2_dirty
            res.corruptions_fixed += l2_dirty
    return 0


def check_refblocks(bs, res: BdrvCheckResult, fix: int, imrt: list) -> tuple[int, bool]:
    """Check the refcount table's entries and count the refcount blocks: (0 or -errno, rebuild needed)."""
    s = bs.opaque
    cs = s.cluster_size
    rebuild = False
    for i in range(s.refcount_table_size):
        entry = s.refcount_table[i]
        offset = entry & REFT_OFFSET_MASK
        cluster = offset >> s.cluster_bits
        if entry & REFT_RESERVED_MASK:
            _err(f"ERROR refcount table entry {i} has reserved bits set")
            res.corruptions += 1
            rebuild = True
            continue
        if offset_into_cluster(s, offset):
            _err(f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted")
            res.corruptions += 1
            rebuild = True
            continue
        if cluster >= len(imrt):
            res.corruptions += 1
            _err(f"{'Repairing' if fix & BDRV_FIX_ERRORS else 'ERROR'} refcount block {i} is outside image")
            if not fix & BDRV_FIX_ERRORS:
                continue
            # Grow the file so that the block is inside it.
            if offset > INT64_MAX - cs:
                ret = -errno.EINVAL
            else:
                errp: list = []
                ret = bdrv_co_truncate(bs.file, offset + cs, False, PreallocMode.PREALLOC_MODE_OFF, errp)
                if ret < 0:
                    error_report(errp[0].msg if errp else strerror(-ret))
                else:
                    size = bdrv_getlength(bs.file.bs)
                    ret = size if size < 0 else 0
                    if ret == 0:
                        new_nb_clusters = size_to_clusters(s, size)
                        imrt.extend([0] * (new_nb_clusters - len(imrt)))
                        if cluster >= len(imrt):
                            ret = -errno.EINVAL
            if ret == 0:
                res.corruptions -= 1
                res.corruptions_fixed += 1
                ret = qcow2_inc_refcounts_imrt(bs, res, imrt, offset, cs)
                if ret < 0:
                    return ret, rebuild
                continue        # just allocated and zeroed: its refcount can only be 1
            rebuild = True
            _err(f"ERROR could not resize image: {strerror(-ret)}")
            continue
        if offset:
            ret = qcow2_inc_refcounts_imrt(bs, res, imrt, offset, cs)
            if ret < 0:
                return ret, rebuild
            if imrt[cluster] != 1:
                _err(f"ERROR refcount block {i} refcount={imrt[cluster]}")
                res.corruptions += 1
                rebuild = True
    return 0, rebuild


def calculate_refcounts(bs, res: BdrvCheckResult, fix: int, imrt: list) -> tuple[int, bool]:
    """Fill the IMRT from all the metadata: (0 or -errno, rebuild needed)."""
    s = bs.opaque
    ret = qcow2_inc_refcounts_imrt(bs, res, imrt, 0, s.cluster_size)         # the header
    if ret < 0:
        return ret, False
    ret = check_refcounts_l1(bs, res, imrt, s.l1_table_offset, s.l1_size, CHECK_FRAG_INFO, fix, True)
    if ret < 0:
        return ret, False
    for sn in s.snapshots:
        if offset_into_cluster(s, sn.l1_table_offset):
            _err(f"ERROR snapshot {sn.id_str} ({sn.name}) l1_offset={c_hex(sn.l1_table_offset)}: L1 table is not "
                 "cluster aligned; snapshot table entry corrupted")
            res.corruptions += 1
            continue
        if sn.l1_size > QCOW_MAX_L1_SIZE // 8:
            _err(f"ERROR snapshot {sn.id_str} ({sn.name}) l1_size={c_hex(sn.l1_size)}: L1 table is too large; "
                 "snapshot table entry corrupted")
            res.corruptions += 1
            continue
        ret = check_refcounts_l1(bs, res, imrt, sn.l1_table_offset, sn.l1_size, 0, fix, False)
        if ret < 0:
            return ret, False
    ret = qcow2_inc_refcounts_imrt(bs, res, imrt, s.snapshots_offset, s.snapshots_size)
    if ret < 0:
        return ret, False
    ret = qcow2_inc_refcounts_imrt(bs, res, imrt, s.refcount_table_offset, s.refcount_table_size * 8)
    if ret < 0:
        return ret, False
    return check_refblocks(bs, res, fix, imrt)


def compare_refcounts(bs, res: BdrvCheckResult, fix: int, imrt: list) -> tuple[int, bool]:
    """Compare the stored refcounts with the IMRT, repairing as ``fix`` allows: (highest used cluster, rebuild
    needed).  A used cluster whose refcount is 0 is never repaired here: it calls for a rebuild."""
    from .qcow2_refcount import update_refcount
    s = bs.opaque
    highest_cluster = 0
    rebuild = False
    stored = _StoredRefcounts(bs)
    for i, refcount2 in enumerate(imrt):
        ret, refcount1 = stored.get(i)
        if ret < 0:
            _err(f"Can't get refcount for cluster {i}: {strerror(-ret)}")
            res.check_errors += 1
            continue
        if refcount1 or refcount2:
            highest_cluster = i
        if refcount1 == refcount2:
            continue
        num_fixed = None
        if refcount1 == 0:
            rebuild = True
        elif refcount1 > refcount2 and fix & BDRV_FIX_LEAKS:
            num_fixed = "leaks_fixed"
        elif refcount1 < refcount2 and fix & BDRV_FIX_ERRORS:
            num_fixed = "corruptions_fixed"
        word = "Repairing" if num_fixed else "ERROR" if refcount1 < refcount2 else "Leaked"
        _err(f"{word} cluster {i} refcount={refcount1} reference={refcount2}")
        if num_fixed:
            ret = update_refcount(bs, i << s.cluster_bits, 1, refcount_diff(refcount1, refcount2),
                                  refcount1 > refcount2, QCOW2_DISCARD_ALWAYS)
            stored.forget(i)
            if ret >= 0:
                setattr(res, num_fixed, getattr(res, num_fixed) + 1)
                continue
        if refcount1 < refcount2:
            res.corruptions += 1
        else:
            res.leaks += 1
    return highest_cluster, rebuild


# --------------------------------------------------------------------------
# Rebuilding the refcount structure


def alloc_clusters_imrt(bs, cluster_count: int, imrt: list, first_free_cluster: int) -> tuple[int, int]:
    """Take ``cluster_count`` contiguous free clusters in the IMRT (growing it past the end if need be):
    (their offset, the first free cluster seen)."""
    s = bs.opaque
    cluster = first_free_cluster
    first_gap = True
    contiguous = 0
    n = len(imrt)
    while cluster < n and contiguous < cluster_count:
        if not imrt[cluster]:
            contiguous += 1
            if first_gap:
                first_free_cluster = cluster
                first_gap = False
        elif contiguous:
            contiguous = 0
        cluster += 1
    if contiguous < cluster_count:
        need = cluster + cluster_count - contiguous
        if need > n:
            imrt.extend([0] * (need - n))
    cluster -= contiguous
    for i in range(cluster_count):
        imrt[cluster + i] = 1
    return cluster << s.cluster_bits, first_free_cluster


def rebuild_refcounts_write_refblocks(bs, imrt: list, first_cluster: int, end_cluster: int,
                                      reftable: list) -> tuple[int, Error | None]:
    """Write the refcount blocks for the used clusters of [first_cluster, end_cluster), allocating them in the
    IMRT and entering them in ``reftable`` (grown as needed, not written): (1 if it grew else 0, or -errno;
    the error)."""
    s = bs.opaque
    cs = s.cluster_size
    first_free_cluster = 0
    reftable_grown = False
    cluster = first_cluster
    while cluster < end_cluster:
        if cluster >= len(imrt) or not imrt[cluster]:
            cluster += 1
            continue
        refblock_index = cluster >> s.refcount_block_bits
        refblock_start = refblock_index << s.refcount_block_bits
        if refblock_index < len(reftable) and reftable[refblock_index]:
            refblock_offset = reftable[refblock_index]      # allocated in an earlier round
        else:
            # Never allocate inside a refcount block already written.
            first_free_cluster = max(first_free_cluster, refblock_start)
            refblock_offset, first_free_cluster = alloc_clusters_imrt(bs, 1, imrt, first_free_cluster)
            if refblock_offset // cs >= end_cluster:
                end_cluster = refblock_offset // cs + 1     # the block that counts this one must be written too
            if len(reftable) <= refblock_index:
                entries = -(-((refblock_index + 1) * 8) // cs) * cs // 8
                reftable.extend([0] * (entries - len(reftable)))
                reftable_grown = True
            reftable[refblock_index] = refblock_offset
        ret = qcow2_pre_write_overlap_check(bs, 0, refblock_offset, cs)
        if ret < 0:
            return ret, error_setg_errno(-ret, "ERROR writing refblock")
        ret = bdrv_co_pwrite(bs.file, refblock_offset, cs, _encode_refblock(s, imrt, refblock_start))
        if ret < 0:
            return ret, error_setg_errno(-ret, "ERROR writing refblock")
        cluster = refblock_start + s.refcount_block_size
    return int(reftable_grown), None


def rebuild_refcount_structure(bs, res: BdrvCheckResult, imrt: list) -> tuple[int, Error | None]:
    """Write a new refcount structure (blocks, then table, then header) from the IMRT alone: (0 or -errno,
    the error).  The old structure is leaked; the check that follows reclaims it."""
    s = bs.opaque
    qcow2_cache_empty(bs, s.refcount_block_cache)
    # Blocks for every used cluster; then room for the table, whose clusters need counting in
    # turn, which may grow the table: until it stops growing.
    reftable: list = []
    ret, err = rebuild_refcounts_write_refblocks(bs, imrt, 0, len(imrt), reftable)
    if ret < 0:
        res.check_errors += 1
        return ret, err
    while True:
        reftable_length = len(reftable) * 8
        reftable_clusters = size_to_clusters(s, reftable_length)
        reftable_offset, _ = alloc_clusters_imrt(bs, reftable_clusters, imrt, 0)
        start = reftable_offset >> s.cluster_bits
        ret, err = rebuild_refcounts_write_refblocks(bs, imrt, start, start + reftable_clusters, reftable)
        if ret < 0:
            res.check_errors += 1
            return ret, err
        if not ret:
            break
    ret = qcow2_pre_write_overlap_check(bs, 0, reftable_offset, reftable_length)
    if ret < 0:
        return ret, error_setg_errno(-ret, "ERROR writing reftable")
    ret = bdrv_co_pwrite(bs.file, reftable_offset, reftable_length, struct.pack(f">{len(reftable)}Q", *reftable))
    if ret < 0:
        return ret, error_setg_errno(-ret, "ERROR writing reftable")
    ret = bdrv_co_pwrite_sync(bs.file, HDR_REFCOUNT_TABLE_OFFSET, 12,
                              struct.pack(">QI", reftable_offset, reftable_clusters))
    if ret < 0:
        return ret, error_setg_errno(-ret, "ERROR setting reftable")
    from .qcow2_refcount import update_max_refcount_table_index
    s.refcount_table = reftable
    s.refcount_table_offset = reftable_offset
    s.refcount_table_size = len(reftable)
    update_max_refcount_table_index(s)
    return 0, None


# --------------------------------------------------------------------------
# The check


def qcow2_check_refcounts(bs, res: BdrvCheckResult, fix: int = 0) -> int:
    """Check (and with ``fix``, repair) every refcount and COPIED flag: 0 or -errno.  Runs under s->lock."""
    s = bs.opaque
    size = bdrv_getlength(bs.file.bs)
    if size < 0:
        res.check_errors += 1
        return size
    nb_clusters = size_to_clusters(s, size)
    if nb_clusters > INT_MAX:
        res.check_errors += 1
        return -errno.EFBIG
    if qcow2_cache_has_dirty(s.l2_table_cache):
        # qblock addition: the check reads L2 tables from the file (as QEMU's does), so on a node in
        # use nothing may wait in the cache.
        ret = qcow2_cache_write(bs, s.l2_table_cache)
        if ret < 0:
            res.check_errors += 1
            return ret
    res.bfi.total_clusters = size_to_clusters(s, bs.total_sectors * BDRV_SECTOR_SIZE)
    imrt = [0] * nb_clusters
    ret, rebuild = calculate_refcounts(bs, res, fix, imrt)
    if ret < 0:
        return ret
    # Without a rebuild, a repair compares again from here (with fix) and this result is dropped.
    pre_compare_res = _copy_res(res)
    highest_cluster, rebuild2 = compare_refcounts(bs, res, 0, imrt)
    rebuild = rebuild or rebuild2

    if rebuild and fix & BDRV_FIX_ERRORS:
        old_res = _copy_res(res)
        fresh_leaks = 0
        _err("Rebuilding refcount structure")
        ret, err = rebuild_refcount_structure(bs, res, imrt)
        if ret < 0:
            error_report(err.msg)
            return ret
        res.corruptions = res.leaks = 0
        # The table changed: count everything again.
        imrt[:] = [0] * len(imrt)
        ret, rebuild = calculate_refcounts(bs, res, 0, imrt)
        if ret < 0:
            return ret
        if fix & BDRV_FIX_LEAKS:
            # The old structure is leaked now; free it.  Leaks left are the rebuild's own.
            saved_res = _copy_res(res)
            res.clear()
            highest_cluster, rebuild = compare_refcounts(bs, res, BDRV_FIX_LEAKS, imrt)
            if rebuild:
                _err("ERROR rebuilt refcount structure is still broken")
            fresh_leaks = res.leaks
            _assign_res(res, saved_res)
        if res.corruptions < old_res.corruptions:
            res.corruptions_fixed += old_res.corruptions - res.corruptions
        if res.leaks < old_res.leaks:
            res.leaks_fixed += old_res.leaks - res.leaks
        res.leaks += fresh_leaks
    elif fix:
        if rebuild:
            _err("ERROR need to rebuild refcount structures")
            res.check_errors += 1
            return -errno.EIO
        if res.leaks or res.corruptions:
            _assign_res(res, pre_compare_res)
            highest_cluster, rebuild = compare_refcounts(bs, res, fix, imrt)

    ret = check_oflag_copied(bs, res, fix)
    if ret < 0:
        return ret
    res.image_end_offset = (highest_cluster + 1) * s.cluster_size
    return 0


def _add_check_result(out: BdrvCheckResult, src: BdrvCheckResult, set_allocation_info: bool) -> None:
    out.corruptions += src.corruptions
    out.leaks += src.leaks
    out.check_errors += src.check_errors
    out.corruptions_fixed += src.corruptions_fixed
    out.leaks_fixed += src.leaks_fixed
    if set_allocation_info:
        out.image_end_offset = src.image_end_offset
        out.bfi = attrs.evolve(src.bfi)


def qcow2_co_check_locked(bs, result: BdrvCheckResult, fix: int) -> int:
    """The snapshot table, then the refcounts; a repair that leaves no corruption also clears the dirty and
    corrupt bits (QEMU's qcow2_co_check_locked, block/qcow2.c).  Runs under s->lock; 0 or -errno."""
    from .qcow2_header import qcow2_mark_clean, qcow2_mark_consistent
    from .qcow2_snapshot import qcow2_check_fix_snapshot_table, qcow2_check_read_snapshot_table
    result.clear()
    snapshot_res = BdrvCheckResult()
    refcount_res = BdrvCheckResult()
    ret = qcow2_check_read_snapshot_table(bs, snapshot_res, fix)
    if ret < 0:
        _add_check_result(result, snapshot_res, False)
        return ret
    ret = qcow2_check_refcounts(bs, refcount_res, fix)
    _add_check_result(result, refcount_res, True)
    if ret < 0:
        _add_check_result(result, snapshot_res, False)
        return ret
    ret = qcow2_check_fix_snapshot_table(bs, snapshot_res, fix)
    _add_check_result(result, snapshot_res, False)
    if ret < 0:
        return ret
    if fix and not result.check_errors and not result.corruptions:
        ret = qcow2_mark_clean(bs)
        if ret < 0:
            return ret
        return qcow2_mark_consistent(bs)
    return ret
