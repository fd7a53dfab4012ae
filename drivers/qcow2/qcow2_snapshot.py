"""Internal snapshots, read side only: part of QEMU's block/qcow2-snapshot.c.

``qcow2_read_snapshots`` parses the snapshot table so that the active layer
of an image with internal snapshots can be used: the snapshots' L1 tables
and the table itself take part in the overlap checks and in refcount
checks, and the header keeps them when it is rewritten.  Creating,
applying and deleting snapshots (``qemu-img snapshot -c/-a/-d``) are not
implemented.
"""
from __future__ import annotations

import errno
import struct

from qblock.util.error import Error, error_setg_errno

from .qcow2_h import QCOW_MAX_SNAPSHOT_EXTRA_DATA, QCowSnapshot, bdrv_co_pread

QCOW_SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")     # 40 bytes
QCOW_MAX_SNAPSHOTS_SIZE = 1024 * 65536 * 4             # QEMU's bound on the whole table (about 256 MiB)


def qcow2_read_snapshots(bs) -> None:
    """Load ``s.snapshots`` and ``s.snapshots_size``; raises Error on a damaged table."""
    s = bs.opaque
    s.snapshots = []
    s.snapshots_size = 0
    if not s.nb_snapshots:
        return
    offset = s.snapshots_offset
    for i in range(s.nb_snapshots):
        offset = (offset + 7) & ~7
        hdr = bytearray(QCOW_SNAPSHOT_HEADER.size)
        ret = bdrv_co_pread(bs.file, offset, len(hdr), hdr)
        if ret < 0:
            raise error_setg_errno(-ret, "Failed to read snapshot table")
        (l1_table_offset, l1_size, id_str_size, name_size, date_sec, date_nsec, vm_clock_nsec,
         vm_state_size, extra_data_size) = QCOW_SNAPSHOT_HEADER.unpack(hdr)
        offset += len(hdr)
        if extra_data_size > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise Error(f"Too much extra metadata in snapshot table entry {i}", errno=errno.EFBIG)
        rest = bytearray(extra_data_size + id_str_size + name_size)
        ret = bdrv_co_pread(bs.file, offset, len(rest), rest)
        if ret < 0:
            raise error_setg_errno(-ret, "Failed to read snapshot table")
        offset += len(rest)
        sn = QCowSnapshot(l1_table_offset=l1_table_offset, l1_size=l1_size, date_sec=date_sec,
                          date_nsec=date_nsec, vm_clock_nsec=vm_clock_nsec, vm_state_size=vm_state_size)
        if extra_data_size >= 16:
            large, sn.disk_size = struct.unpack_from(">QQ", rest, 0)
            sn.vm_state_size = large
        sn.id_str = rest[extra_data_size:extra_data_size + id_str_size].decode("utf-8", "replace")
        sn.name = rest[extra_data_size + id_str_size:].decode("utf-8", "replace")
        s.snapshots.append(sn)
        if offset - s.snapshots_offset > QCOW_MAX_SNAPSHOTS_SIZE:
            raise Error("Snapshot table too large", errno=errno.EFBIG)
    s.snapshots_size = offset - s.snapshots_offset
