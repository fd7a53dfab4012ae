"""Internal snapshots, the table only: part of QEMU's block/qcow2-snapshot.c.

``qcow2_read_snapshots`` parses the snapshot table (with the extra data of
QEMU 5.2+: 64-bit VM state size, disk size, icount; extra data past those
is kept byte for byte) so that the active layer of an image with internal
snapshots can be used: the snapshots' L1 tables and the table itself take
part in the overlap checks and in refcount checks, and the header keeps
them when it is rewritten.  ``qcow2_write_snapshots`` writes the table anew
(amend's upgrade to compat=1.1 needs it).  Creating, applying and deleting
snapshots (``qemu-img snapshot -c/-a/-d``) are not implemented.
``qcow2_check_read_snapshot_table`` is the check's reading of the table
(BDRV_O_CHECK opens skip it) and ``qcow2_check_fix_snapshot_table`` its
repair: incomplete v3 entries are written back whole.  A table with more
than QCOW_MAX_SNAPSHOTS entries is reported, not cut down.
"""
from __future__ import annotations

import errno
import struct
import sys

from qblock.block.check import BDRV_FIX_ERRORS
from qblock.block.io import bdrv_co_pread, bdrv_co_pwrite, bdrv_co_pwrite_sync
from qblock.util.error import Error, error_report, error_setg_errno, strerror

from .qcow2_h import HDR_NB_SNAPSHOTS_OFFSET, QCOW_MAX_SNAPSHOT_EXTRA_DATA, QCOW_MAX_SNAPSHOTS, QCowSnapshot

QCOW_SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")     # 40 bytes
QCOW_SNAPSHOT_EXTRA_DATA = struct.Struct(">QQq")       # vm_state_size_large, disk_size, icount
QCOW_MAX_SNAPSHOTS_SIZE = 1024 * 65536 * 4             # QEMU's bound on the whole table (about 256 MiB)


class _TableReader:
    """Reads of the snapshot table through one buffer filled 64 KiB at a time (qblock: QEMU reads each field
    with its own bdrv_pread, which Python cannot afford for tens of thousands of entries)."""

    CHUNK = 65536

    def __init__(self, bs) -> None:
        self.bs = bs
        self.start = 0
        self.buf = b""

    def read(self, offset: int, n: int) -> bytes:
        """``n`` bytes at ``offset`` (zeros past the end of the file); raises Error on an I/O error."""
        if not (self.start <= offset and offset + n <= self.start + len(self.buf)):
            size = max(n, self.CHUNK)
            buf = bytearray(size)
            ret = bdrv_co_pread(self.bs.file, offset, size, buf)
            if ret < 0:
                raise error_setg_errno(-ret, "Failed to read snapshot table")
            self.start, self.buf = offset, bytes(buf)
        pos = offset - self.start
        return self.buf[pos:pos + n]


def qcow2_read_snapshots(bs) -> None:
    """Load ``s.snapshots`` and ``s.snapshots_size``; raises Error on a damaged table."""
    s = bs.opaque
    s.snapshots = []
    s.snapshots_size = 0
    if not s.nb_snapshots:
        return
    table = _TableReader(bs)
    offset = s.snapshots_offset
    for i in range(s.nb_snapshots):
        offset = (offset + 7) & ~7
        (l1_table_offset, l1_size, id_str_size, name_size, date_sec, date_nsec, vm_clock_nsec,
         vm_state_size, extra_data_size) = QCOW_SNAPSHOT_HEADER.unpack(table.read(offset, QCOW_SNAPSHOT_HEADER.size))
        offset += QCOW_SNAPSHOT_HEADER.size
        if extra_data_size > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise Error(f"Too much extra metadata in snapshot table entry {i}", errno=errno.EFBIG)
        rest = table.read(offset, extra_data_size + id_str_size + name_size)
        offset += len(rest)
        sn = QCowSnapshot(l1_table_offset=l1_table_offset, l1_size=l1_size, date_sec=date_sec,
                          date_nsec=date_nsec, vm_clock_nsec=vm_clock_nsec, vm_state_size=vm_state_size,
                          extra_data_size=extra_data_size)
        # QCowSnapshotExtraData: vm_state_size_large, disk_size, icount; each only if the entry is long enough.
        if extra_data_size >= 8:
            sn.vm_state_size = struct.unpack_from(">Q", rest, 0)[0]
        if extra_data_size >= 16:
            sn.disk_size = struct.unpack_from(">Q", rest, 8)[0]
        else:
            sn.disk_size = bs.total_sectors * 512
        if extra_data_size >= QCOW_SNAPSHOT_EXTRA_DATA.size:
            sn.icount = struct.unpack_from(">q", rest, 16)[0]
            sn.unknown_extra_data = bytes(rest[QCOW_SNAPSHOT_EXTRA_DATA.size:extra_data_size])
        sn.id_str = rest[extra_data_size:extra_data_size + id_str_size].decode("utf-8", "replace")
        sn.name = rest[extra_data_size + id_str_size:].decode("utf-8", "replace")
        s.snapshots.append(sn)
        if offset - s.snapshots_offset > QCOW_MAX_SNAPSHOTS_SIZE:
            raise Error("Snapshot table too large", errno=errno.EFBIG)
    s.snapshots_size = offset - s.snapshots_offset


def qcow2_check_read_snapshot_table(bs, result, fix: int) -> int:
    """Read the snapshot table for a check, counting what is wrong with it in ``result``: 0 or -errno.

    As QEMU's for incomplete v3 entries (repaired by qcow2_check_fix_snapshot_table); overhanging
    snapshots are reported but not discarded.
    """
    from .qcow2_header import qcow2_validate_table
    s = bs.opaque
    raw = bytearray(12)
    ret = bdrv_co_pread(bs.file, HDR_NB_SNAPSHOTS_OFFSET, 12, raw)
    if ret < 0:
        result.check_errors += 1
        sys.stderr.write(f"ERROR failed to read the snapshot table pointer from the image header: {strerror(-ret)}\n")
        return ret
    s.nb_snapshots, s.snapshots_offset = struct.unpack(">IQ", raw)
    try:
        qcow2_validate_table(s, s.snapshots_offset, s.nb_snapshots, QCOW_SNAPSHOT_HEADER.size,
                             QCOW_SNAPSHOT_HEADER.size * QCOW_MAX_SNAPSHOTS, "snapshot table")
    except Error as e:
        result.check_errors += 1
        error_report(f"ERROR {e.msg}")
        if s.nb_snapshots > QCOW_MAX_SNAPSHOTS:
            sys.stderr.write(f"You can force-remove all {s.nb_snapshots - QCOW_MAX_SNAPSHOTS} overhanging "
                             "snapshots with qemu-img check -r all\n")
        s.snapshots_offset = s.nb_snapshots = 0
        return -e.errno
    try:
        qcow2_read_snapshots(bs)
    except Error as e:
        result.check_errors += 1
        error_report(f"ERROR failed to read the snapshot table: {e.msg}")
        s.snapshots_offset = s.nb_snapshots = 0
        s.snapshots, s.snapshots_size = [], 0
        return -(e.errno or errno.EIO)
    if s.qcow_version >= 3:
        for i, sn in enumerate(s.snapshots):
            if sn.extra_data_size < 16:
                result.corruptions += 1
                what = "Repairing" if fix & BDRV_FIX_ERRORS else "ERROR"
                sys.stderr.write(f"{what} snapshot table entry {i} is incomplete\n")
    return 0


def qcow2_check_fix_snapshot_table(bs, result, fix: int) -> int:
    """After the refcount check: write the table anew when it had corruptions and errors are being fixed.

    ``qcow2_write_snapshots`` writes every entry with its whole extra data, which is the repair of an
    incomplete entry.  0 or -errno.
    """
    if not (result.corruptions and fix & BDRV_FIX_ERRORS):
        return 0
    ret = qcow2_write_snapshots(bs)
    if ret < 0:
        result.check_errors += 1
        sys.stderr.write(f"ERROR failed to update snapshot table: {strerror(-ret)}\n")
        return ret
    result.corruptions_fixed += result.corruptions
    result.corruptions = 0
    return 0


def qcow2_write_snapshots(bs) -> int:
    """Write the whole table into newly allocated clusters, point the header at it, free the old one.

    0 or -errno.  Runs under s->lock: where QEMU flushes ``bs`` (bdrv_flush), qblock writes the
    caches back and flushes the file itself, as qcow2's flush hook would.
    """
    from .qcow2_cache import qcow2_flush_caches
    from .qcow2_h import QCOW2_DISCARD_ALWAYS, QCOW2_DISCARD_SNAPSHOT
    from .qcow2_overlap import qcow2_pre_write_overlap_check
    from .qcow2_refcount import qcow2_alloc_clusters, qcow2_free_clusters
    s = bs.opaque
    entries = []
    size = 0
    for sn in s.snapshots:
        id_str, name = sn.id_str.encode(), sn.name.encode()
        size = (size + 7) & ~7
        size += QCOW_SNAPSHOT_HEADER.size + max(QCOW_SNAPSHOT_EXTRA_DATA.size, sn.extra_data_size)
        size += len(id_str) + len(name)
        if size > QCOW_MAX_SNAPSHOTS_SIZE:
            return -errno.EFBIG
        entries.append((sn, id_str, name))
    snapshots_size = size
    snapshots_offset = qcow2_alloc_clusters(bs, snapshots_size)
    if snapshots_offset < 0:
        return snapshots_offset

    def fail(ret: int) -> int:
        qcow2_free_clusters(bs, snapshots_offset, snapshots_size, QCOW2_DISCARD_ALWAYS)
        return ret

    ret = qcow2_flush_caches(bs)
    if ret < 0:
        return fail(ret)
    # The header does not point here yet, so these clusters must be free of metadata.
    ret = qcow2_pre_write_overlap_check(bs, 0, snapshots_offset, snapshots_size)
    if ret < 0:
        return fail(ret)
    offset = snapshots_offset
    for sn, id_str, name in entries:
        extra_data_size = max(QCOW_SNAPSHOT_EXTRA_DATA.size, sn.extra_data_size)
        # A VM state too big for 32 bits reads as 0 to old programs: a disk-only snapshot, not a truncated one.
        vm_state_size32 = sn.vm_state_size if sn.vm_state_size <= 0xFFFFFFFF else 0
        h = QCOW_SNAPSHOT_HEADER.pack(sn.l1_table_offset, sn.l1_size, len(id_str), len(name), sn.date_sec,
                                      sn.date_nsec, sn.vm_clock_nsec, vm_state_size32, extra_data_size)
        extra = QCOW_SNAPSHOT_EXTRA_DATA.pack(sn.vm_state_size, sn.disk_size, sn.icount)
        offset = (offset + 7) & ~7
        for piece in (h, extra, sn.unknown_extra_data if sn.extra_data_size > len(extra) else b"", id_str, name):
            if piece:
                ret = bdrv_co_pwrite(bs.file, offset, len(piece), piece)
                if ret < 0:
                    return fail(ret)
            offset += len(piece)
    # The new table and its refcounts must be on disk before the header points at it.
    ret = qcow2_flush_caches(bs)
    if ret < 0:
        return fail(ret)
    ret = bdrv_co_pwrite_sync(bs.file, HDR_NB_SNAPSHOTS_OFFSET, 12, struct.pack(">IQ", len(entries),
                                                                                   snapshots_offset))
    if ret < 0:
        return fail(ret)
    qcow2_free_clusters(bs, s.snapshots_offset, s.snapshots_size, QCOW2_DISCARD_SNAPSHOT)
    s.snapshots_offset = snapshots_offset
    s.snapshots_size = snapshots_size
    return 0
