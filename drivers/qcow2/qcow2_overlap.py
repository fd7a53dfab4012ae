"""Metadata overlap checks: part of QEMU's block/qcow2-refcount.c.

Before anything is written to the image file, ``qcow2_pre_write_overlap_check``
makes sure the range does not hit metadata (the header, the active L1 and L2
tables, the refcount table and blocks, the snapshot table and the inactive
L1/L2 tables of internal snapshots), within the ``overlap-check`` template
(none, constant, cached — the default — or all).  A write that would hit
metadata is refused and the image marked corrupt: a bug or a damaged image
must not destroy what is left of the metadata.
"""
from __future__ import annotations

import errno
import struct

from qblock.block.io import bdrv_co_pread

from .qcow2_h import (
    L1E_OFFSET_MASK,
    QCOW2_OL_ACTIVE_L1,
    QCOW2_OL_ACTIVE_L2,
    QCOW2_OL_INACTIVE_L1,
    QCOW2_OL_INACTIVE_L2,
    QCOW2_OL_MAIN_HEADER,
    QCOW2_OL_MAX_BITNR,
    QCOW2_OL_REFCOUNT_BLOCK,
    QCOW2_OL_REFCOUNT_TABLE,
    QCOW2_OL_SNAPSHOT_TABLE,
    REFT_OFFSET_MASK,
    offset_into_cluster,
    ranges_overlap,
    start_of_cluster,
)

METADATA_OL_NAMES = ("qcow2_header", "active L1 table", "active L2 table", "refcount table", "refcount block",
                     "snapshot table", "inactive L1 table", "inactive L2 table", "bitmap directory")


def qcow2_check_metadata_overlap(bs, ign: int, offset: int, size: int) -> int:
    """0, the QCOW2_OL_* bit of a metadata structure the range overlaps, or -errno."""
    s = bs.opaque
    chk = s.overlap_check & ~ign
    if not size:
        return 0
    if chk & QCOW2_OL_MAIN_HEADER and offset < s.cluster_size:
        return QCOW2_OL_MAIN_HEADER
    size = -(-(offset_into_cluster(s, offset) + size) // s.cluster_size) * s.cluster_size
    offset = start_of_cluster(s, offset)
    if chk & QCOW2_OL_ACTIVE_L1 and s.l1_size:
        if ranges_overlap(offset, size, s.l1_table_offset, s.l1_size * 8):
            return QCOW2_OL_ACTIVE_L1
    if chk & QCOW2_OL_REFCOUNT_TABLE and s.refcount_table_size:
        if ranges_overlap(offset, size, s.refcount_table_offset, s.refcount_table_size * 8):
            return QCOW2_OL_REFCOUNT_TABLE
    if chk & QCOW2_OL_SNAPSHOT_TABLE and s.snapshots_size:
        if ranges_overlap(offset, size, s.snapshots_offset, s.snapshots_size):
            return QCOW2_OL_SNAPSHOT_TABLE
    if chk & QCOW2_OL_INACTIVE_L1:
        for sn in s.snapshots:
            if sn.l1_size and ranges_overlap(offset, size, sn.l1_table_offset, sn.l1_size * 8):
                return QCOW2_OL_INACTIVE_L1
    if chk & QCOW2_OL_ACTIVE_L2:
        for e in s.l1_table:
            l2 = e & L1E_OFFSET_MASK
            if l2 and ranges_overlap(offset, size, l2, s.cluster_size):
                return QCOW2_OL_ACTIVE_L2
    if chk & QCOW2_OL_REFCOUNT_BLOCK:
        for i in range(min(s.refcount_table_size, s.max_refcount_table_index + 1)):
            rb = s.refcount_table[i] & REFT_OFFSET_MASK
            if rb and ranges_overlap(offset, size, rb, s.cluster_size):
                return QCOW2_OL_REFCOUNT_BLOCK
    if chk & QCOW2_OL_INACTIVE_L2:
        for sn in s.snapshots:
            buf = bytearray(sn.l1_size * 8)
            ret = bdrv_co_pread(bs.file, sn.l1_table_offset, len(buf), buf)
            if ret < 0:
                return ret
            for e in struct.unpack(f">{sn.l1_size}Q", buf):
                l2 = e & L1E_OFFSET_MASK
                if l2 and ranges_overlap(offset, size, l2, s.cluster_size):
                    return QCOW2_OL_INACTIVE_L2
    return 0


def qcow2_pre_write_overlap_check(bs, ign: int, offset: int, size: int) -> int:
    """0 if writing [offset, +size) of the file is safe; else the image is marked corrupt and -EIO."""
    ret = qcow2_check_metadata_overlap(bs, ign, offset, size)
    if ret < 0:
        return ret
    if ret > 0:
        from .qcow2_header import qcow2_signal_corruption
        bitnr = (ret & -ret).bit_length() - 1
        if bitnr >= QCOW2_OL_MAX_BITNR:
            raise AssertionError("bad overlap bit")
        qcow2_signal_corruption(bs, True, offset, size, "Preventing invalid write on metadata "
                                f"(overlaps with {METADATA_OL_NAMES[bitnr]})")
        return -errno.EIO
    return 0
