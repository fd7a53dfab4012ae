"""Changing the refcount width of an image: qcow2_change_refcount_order of QEMU's block/qcow2-refcount.c.

``qemu-img amend -o refcount_bits=N`` rewrites every refcount at the new
width: walks over the old refcount structure allocate the new refcount
blocks and, after them, the new table (walking again until a walk allocates
nothing more, since each allocation changes refcounts the walk has seen); a
last walk writes the new refcount blocks; then the new table is written,
the header switched to it, and the old blocks and table freed through the
new structure.  A refcount too big for the new width fails the change before
anything is switched.  Runs under ``s->lock``.
"""
from __future__ import annotations

import errno
import struct
from typing import Any, Callable

import attrs

from qblock.block.io import bdrv_co_pwrite
from qblock.util.error import Error, error_setg_errno

from .qcow2_cache import qcow2_cache_flush, qcow2_cache_get, qcow2_cache_put
from .qcow2_h import (
    QCOW2_DISCARD_NEVER,
    QCOW2_DISCARD_OTHER,
    QCOW_MAX_REFTABLE_SIZE,
    REFT_OFFSET_MASK,
    REFTABLE_ENTRY_SIZE,
    c_hex,
    offset_into_cluster,
)
from .qcow2_header import qcow2_signal_corruption, qcow2_update_header
from .qcow2_overlap import qcow2_pre_write_overlap_check
from .qcow2_refcount import (
    _refcount_accessors as refcount_accessors,
    qcow2_alloc_clusters,
    qcow2_free_clusters,
    update_max_refcount_table_index,
)

# status_cb(bs, offset, total_work_size), as QEMU's BlockDriverAmendStatusCB without the opaque pointer.
StatusCB = Callable[[Any, int, int], None]


def _get_refcounts(order: int, get, refblock, start: int, n: int) -> list[int]:
    """``n`` refcounts from ``start`` of a refcount block of 2^order-bit entries."""
    if order >= 3:
        width = 1 << (order - 3)
        return list(struct.unpack_from(f">{n}{'BHIQ'[order - 3]}", refblock, start * width))
    return [get(refblock, i) for i in range(start, start + n)]


def _set_refcounts(order: int, set_, refblock, start: int, n: int, values: list[int] | None) -> None:
    """Store ``values`` (zeroes if None) as ``n`` refcounts from ``start``."""
    if order >= 3:
        width = 1 << (order - 3)
        if values is None:
            refblock[start * width:(start + n) * width] = bytes(n * width)
        else:
            struct.pack_into(f">{n}{'BHIQ'[order - 3]}", refblock, start * width, *values)
        return
    per_byte = 8 >> order
    i, end = start, start + n
    if values is None:
        while i < end and i % per_byte:
            set_(refblock, i, 0)
            i += 1
        whole = (end - i) // per_byte
        refblock[i // per_byte:i // per_byte + whole] = bytes(whole)
        i += whole * per_byte
        while i < end:
            set_(refblock, i, 0)
            i += 1
    else:
        for k, v in enumerate(values):
            set_(refblock, start + k, v)


@attrs.define(eq=False)
class NewRefcountStructure:
    """The refcount table being built (QEMU keeps these in local variables of qcow2_change_refcount_order)."""

    refcount_order: int
    refblock_size: int
    reftable: list = attrs.field(factory=list)
    reftable_index: int = 0
    refblock: bytearray | None = None     # the new refblock being filled; None in the allocation walks
    refblock_is_zero: bool = True         # qblock: ``refblock`` was all zeroes when this block began
    allocated: bool = False


def alloc_refblock(bs, new: NewRefcountStructure, refblock_empty: bool) -> None:
    """An allocation walk's step: give the next new refblock a cluster unless it is empty.  Raises Error."""
    s = bs.opaque
    index = new.reftable_index
    if not refblock_empty and index >= len(new.reftable):
        per_cluster = s.cluster_size // REFTABLE_ENTRY_SIZE
        new_size = -(-(index + 1) // per_cluster) * per_cluster
        if new_size > QCOW_MAX_REFTABLE_SIZE // REFTABLE_ENTRY_SIZE:
            raise Error("This operation would make the refcount table grow beyond the maximum size supported by "
                        "QEMU, aborting", errno=errno.ENOTSUP)
        new.reftable.extend([0] * (new_size - len(new.reftable)))
    if not refblock_empty and not new.reftable[index]:
        offset = qcow2_alloc_clusters(bs, s.cluster_size)
        if offset < 0:
            raise error_setg_errno(-offset, "Failed to allocate refblock")
        new.reftable[index] = offset
        new.allocated = True


def flush_refblock(bs, new: NewRefcountStructure, refblock_empty: bool) -> None:
    """The writing walk's step: the finished new refblock goes to its cluster.  Raises Error."""
    s = bs.opaque
    index = new.reftable_index
    if index < len(new.reftable) and new.reftable[index]:
        offset = new.reftable[index]
        ret = qcow2_pre_write_overlap_check(bs, 0, offset, s.cluster_size)
        if ret < 0:
            raise error_setg_errno(-ret, "Overlap check failed")
        ret = bdrv_co_pwrite(bs.file, offset, s.cluster_size, new.refblock)
        if ret < 0:
            raise error_setg_errno(-ret, "Failed to write refblock")
    elif not refblock_empty:
        raise AssertionError("flush_refblock: a refblock with refcounts but no cluster")


def walk_over_reftable(bs, new: NewRefcountStructure, operation, status_cb: StatusCB, index: int,
                       total: int) -> None:
    """Go over every refcount of the image in order, cutting them into new refblocks; ``operation`` gets each.

    With ``new.refblock`` set the refcounts are copied into it at the new width.  A refcount too
    big for the new width fails the walk (QEMU's message).  Raises Error.

    QEMU goes entry by entry; qblock takes runs of entries that fall into one new refblock at once,
    reading each run after the operation on the refblock before it, as QEMU does.
    """
    s = bs.opaque
    new_bits = 1 << new.refcount_order
    new_get, new_set = refcount_accessors(new.refcount_order)
    new_refblock_index = 0
    new_refblock_empty = True

    def finish() -> None:
        nonlocal new_refblock_index, new_refblock_empty
        operation(bs, new, new_refblock_empty)
        # Every entry of the finished block was written in this round: if all were 0, so is the buffer.
        new.refblock_is_zero = new_refblock_empty
        new.reftable_index += 1
        new_refblock_index = 0
        new_refblock_empty = True

    reftable_index = 0
    while reftable_index < s.refcount_table_size:         # the table may grow while we walk
        refblock_offset = s.refcount_table[reftable_index] & REFT_OFFSET_MASK
        status_cb(bs, index * s.refcount_table_size + reftable_index, total * s.refcount_table_size)
        refblock = None
        if refblock_offset:
            if offset_into_cluster(s, refblock_offset):
                qcow2_signal_corruption(bs, True, -1, -1, f"Refblock offset {c_hex(refblock_offset)} unaligned "
                                                          f"(reftable index: {c_hex(reftable_index)})")
                raise Error("Image is corrupt (unaligned refblock offset)", errno=errno.EIO)
            ret, refblock = qcow2_cache_get(bs, s.refcount_block_cache, refblock_offset)
            if ret < 0:
                raise error_setg_errno(-ret, "Failed to retrieve refblock")
        try:
            pos = 0
            while pos < s.refcount_block_size:
                if new_refblock_index >= new.refblock_size:
                    finish()
                n = min(s.refcount_block_size - pos, new.refblock_size - new_refblock_index)
                if refblock is not None:
                    values = _get_refcounts(s.refcount_order, s.get_refcount, refblock, pos, n)
                    if new_bits < 64 and max(values) >> new_bits:
                        k = next(k for k, v in enumerate(values) if v >> new_bits)
                        offset = ((reftable_index << s.refcount_block_bits) + pos + k) << s.cluster_bits
                        raise Error(f"Cannot decrease refcount entry width to {new_bits} bits: Cluster at offset "
                                    f"{c_hex(offset)} has a refcount of {values[k]}", errno=errno.EINVAL)
                    new_refblock_empty = new_refblock_empty and not any(values)
                else:
                    values = None        # no refblock: every refcount is 0
                if new.refblock is not None and (values is not None or not new.refblock_is_zero):
                    _set_refcounts(new.refcount_order, new_set, new.refblock, new_refblock_index, n, values)
                new_refblock_index += n
                pos += n
        finally:
            if refblock is not None:
                qcow2_cache_put(s.refcount_block_cache, refblock)
        reftable_index += 1
    if new_refblock_index > 0:
        # The last new refblock is only partly covered: the rest counts nothing.
        if new.refblock is not None and not new.refblock_is_zero:
            _set_refcounts(new.refcount_order, new_set, new.refblock, new_refblock_index,
                           new.refblock_size - new_refblock_index, None)
        finish()
    status_cb(bs, (index + 1) * s.refcount_table_size, total * s.refcount_table_size)


def qcow2_change_refcount_order(bs, refcount_order: int, status_cb: StatusCB) -> None:
    """Rewrite every refcount at 2^refcount_order bits in new refblocks and a new table.  Raises Error.

    Walk once to allocate the new refblocks and, after them, the new table; walk again until no
    walk allocates any more (an allocation changes refcounts the walk has seen); walk a last time
    to write the new refblocks; write the table, switch the header, free the old structures.
    """
    s = bs.opaque
    if s.qcow_version < 3 or not 0 <= refcount_order <= 6:
        raise AssertionError("qcow2_change_refcount_order: needs a v3 image and an order of 0 to 6")
    new = NewRefcountStructure(refcount_order, 1 << (s.cluster_bits - (refcount_order - 3)))
    new_reftable_offset = 0
    allocated_reftable_size = 0
    walk_index = 0
    try:
        while True:
            new.allocated = False
            # This walk, one that finds everything allocated, and the writing walk: at least three.
            total_walks = max(walk_index + 2, 3)
            walk_over_reftable(bs, new, alloc_refblock, status_cb, walk_index, total_walks)
            walk_index += 1
            new.reftable_index = 0
            if not new.allocated:
                break
            if new_reftable_offset:
                qcow2_free_clusters(bs, new_reftable_offset, allocated_reftable_size * REFTABLE_ENTRY_SIZE,
                                    QCOW2_DISCARD_NEVER)
            new_reftable_offset = qcow2_alloc_clusters(bs, len(new.reftable) * REFTABLE_ENTRY_SIZE)
            if new_reftable_offset < 0:
                ret, new_reftable_offset = new_reftable_offset, 0
                raise error_setg_errno(-ret, "Failed to allocate the new reftable")
            allocated_reftable_size = len(new.reftable)

        new.refblock = bytearray(s.cluster_size)
        walk_over_reftable(bs, new, flush_refblock, status_cb, walk_index, walk_index + 1)

        table_bytes = len(new.reftable) * REFTABLE_ENTRY_SIZE
        ret = qcow2_pre_write_overlap_check(bs, 0, new_reftable_offset, table_bytes)
        if ret < 0:
            raise error_setg_errno(-ret, "Overlap check failed")
        ret = bdrv_co_pwrite(bs.file, new_reftable_offset, table_bytes,
                             struct.pack(f">{len(new.reftable)}Q", *new.reftable))
        if ret < 0:
            raise error_setg_errno(-ret, "Failed to write the new reftable")
        ret = qcow2_cache_flush(bs, s.refcount_block_cache)
        if ret < 0:
            raise error_setg_errno(-ret, "Failed to flush the refblock cache")

        # The header first; the rest of the in-memory state only once it points at the new table.
        old = (s.refcount_order, s.refcount_table_size, s.refcount_table_offset)
        s.refcount_order, s.refcount_table_size, s.refcount_table_offset = \
            refcount_order, len(new.reftable), new_reftable_offset
        ret = qcow2_update_header(bs)
        if ret < 0:
            s.refcount_order, s.refcount_table_size, s.refcount_table_offset = old
            raise error_setg_errno(-ret, "Failed to update the qcow2 header")
        old_reftable = s.refcount_table
        s.refcount_table = new.reftable
        update_max_refcount_table_index(s)
        s.refcount_bits = 1 << refcount_order
        s.refcount_max = (1 << s.refcount_bits) - 1
        s.refcount_block_bits = s.cluster_bits - (refcount_order - 3)
        s.refcount_block_size = 1 << s.refcount_block_bits
        s.get_refcount, s.set_refcount = refcount_accessors(refcount_order)
        # What is freed below is now the old structure, counted in the new one.
        new.reftable, new_reftable_offset = old_reftable, old[2]
    finally:
        for offset in new.reftable:
            offset &= REFT_OFFSET_MASK
            if offset:
                qcow2_free_clusters(bs, offset, s.cluster_size, QCOW2_DISCARD_OTHER)
        if new.reftable and new_reftable_offset > 0:
            qcow2_free_clusters(bs, new_reftable_offset, len(new.reftable) * REFTABLE_ENTRY_SIZE,
                                QCOW2_DISCARD_OTHER)
