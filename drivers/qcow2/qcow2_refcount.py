"""Reference counts and cluster allocation: QEMU's block/qcow2-refcount.c.

Every host cluster has a refcount (0 free, 1 used once, more when shared
with an internal snapshot or, for compressed clusters, by several
compressed pieces).  The refcount table (``s.refcount_table``, kept in
memory) points to refcount blocks, which live in the refcount block cache.

* allocation: ``alloc_clusters_noref`` finds free clusters from
  ``free_cluster_index``; ``qcow2_alloc_clusters`` claims them with
  ``update_refcount``; ``qcow2_alloc_clusters_at`` extends an allocation in
  place; ``qcow2_alloc_bytes`` packs compressed clusters;
* a missing refcount block is created by ``alloc_refcount_block`` (it
  describes itself when it can), and when the table is full
  ``qcow2_refcount_area`` writes new self-describing refcount blocks and a
  larger table after the end of the image, then switches the header to it;
  both return -EAGAIN so that the caller searches free space again;
* freeing: ``qcow2_free_clusters``/``qcow2_free_any_clusters``; clusters that
  drop to 0 may be discarded in the file (``pass-discard-*`` options);

Runs under ``s->lock``.  Left out: snapshot refcount updates,
``qcow2_shrink_reftable``.  The rest of QEMU's file is split off: the
consistency check is in ``qcow2_check``, the overlap checks in
``qcow2_overlap``, ``qcow2_write_caches`` in ``qcow2_cache``, refcount width
changes (``qcow2_change_refcount_order``, for amend) in ``qcow2_refcount_order``.
"""
from __future__ import annotations

import errno
import struct
import sys

from qblock.block.driver import BlkdebugEvent
from qblock.block.io import BLKDBG_EVENT, bdrv_co_pdiscard, bdrv_co_pread, bdrv_co_pwrite_sync
from qblock.util.error import strerror

from .qcow2_cache import (
    qcow2_cache_discard,
    qcow2_cache_entry_mark_dirty,
    qcow2_cache_flush,
    qcow2_cache_get,
    qcow2_cache_get_empty,
    qcow2_cache_is_table_offset,
    qcow2_cache_put,
    qcow2_cache_set_dependency,
)
from .qcow2_h import (
    c_hex,
    HDR_REFCOUNT_TABLE_OFFSET,
    INT64_MAX,
    L2E_OFFSET_MASK,
    QCOW2_CLUSTER_COMPRESSED,
    QCOW2_CLUSTER_NORMAL,
    QCOW2_CLUSTER_ZERO_ALLOC,
    QCOW2_DISCARD_NEVER,
    QCOW2_DISCARD_OTHER,
    QCOW_MAX_CLUSTER_OFFSET,
    QCOW_MAX_REFTABLE_SIZE,
    REFT_OFFSET_MASK,
    REFTABLE_ENTRY_SIZE,
    Qcow2DiscardRegion,
    offset_into_cluster,
    qcow2_get_cluster_type,
    size_to_clusters,
    start_of_cluster,
)


# --------------------------------------------------------------------------
# Refcount entries of 1 to 64 bits (get_refcount_ro0 ... set_refcount_ro6)


def _refcount_accessors(order: int):
    if order == 3:
        def get(rb, i):
            return rb[i]

        def set_(rb, i, v):
            rb[i] = v
        return get, set_
    if order >= 4:
        st = struct.Struct({4: ">H", 5: ">I", 6: ">Q"}[order])
        width = st.size

        def get(rb, i):
            return st.unpack_from(rb, i * width)[0]

        def set_(rb, i, v):
            st.pack_into(rb, i * width, v)
        return get, set_
    bits = 1 << order
    per_byte = 8 // bits
    mask = (1 << bits) - 1

    def get(rb, i):
        return (rb[i // per_byte] >> ((i % per_byte) * bits)) & mask

    def set_(rb, i, v):
        shift = (i % per_byte) * bits
        rb[i // per_byte] = (rb[i // per_byte] & ~(mask << shift) & 0xFF) | (v << shift)
    return get, set_


def update_max_refcount_table_index(s) -> None:
    i = s.refcount_table_size - 1
    while i > 0 and not s.refcount_table[i] & REFT_OFFSET_MASK:
        i -= 1
    s.max_refcount_table_index = max(i, 0)


def qcow2_refcount_init(bs) -> int:
    """Load the refcount table (QEMU's qcow2_refcount_init)."""
    s = bs.opaque
    s.get_refcount, s.set_refcount = _refcount_accessors(s.refcount_order)
    if s.refcount_table_size > 0:
        size2 = s.refcount_table_size * REFTABLE_ENTRY_SIZE
        BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_REFTABLE_LOAD)
        buf = bytearray(size2)
        ret = bdrv_co_pread(bs.file, s.refcount_table_offset, size2, buf)
        if ret < 0:
            return ret
        s.refcount_table = list(struct.unpack(f">{s.refcount_table_size}Q", buf))
        update_max_refcount_table_index(s)
    return 0


def qcow2_refcount_close(bs) -> None:
    bs.opaque.refcount_table = []


def load_refcount_block(bs, refcount_block_offset: int):
    BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_REFBLOCK_LOAD)
    return qcow2_cache_get(bs, bs.opaque.refcount_block_cache, refcount_block_offset)


def qcow2_signal_corruption(bs, fatal: bool, offset: int, size: int, msg: str) -> None:
    """qcow2_header's, imported when first needed (the two modules import each other)."""
    from .qcow2_header import qcow2_signal_corruption as signal
    signal(bs, fatal, offset, size, msg)


def qcow2_get_refcount(bs, cluster_index: int) -> tuple[int, int]:
    """(0, refcount of the cluster) or (-errno, 0)."""
    s = bs.opaque
    refcount_table_index = cluster_index >> s.refcount_block_bits
    if refcount_table_index >= s.refcount_table_size:
        return 0, 0
    refcount_block_offset = s.refcount_table[refcount_table_index] & REFT_OFFSET_MASK
    if not refcount_block_offset:
        return 0, 0
    if offset_into_cluster(s, refcount_block_offset):
        qcow2_signal_corruption(bs, True, -1, -1, f"Refblock offset {c_hex(refcount_block_offset)} unaligned "
                                f"(reftable index: {c_hex(refcount_table_index)})")
        return -errno.EIO, 0
    ret, refcount_block = qcow2_cache_get(bs, s.refcount_block_cache, refcount_block_offset)
    if ret < 0:
        return ret, 0
    refcount = s.get_refcount(refcount_block, cluster_index & (s.refcount_block_size - 1))
    qcow2_cache_put(s.refcount_block_cache, refcount_block)
    return 0, refcount


def in_same_refcount_block(s, offset_a: int, offset_b: int) -> bool:
    shift = s.cluster_bits + s.refcount_block_bits
    return offset_a >> shift == offset_b >> shift


def alloc_refcount_block(bs, cluster_index: int):
    """(0, refblock) for the block covering ``cluster_index``, allocating it (and growing the table) if needed.

    (-EAGAIN, None) after any allocation: the caller's free clusters may now hold metadata.
    """
    s = bs.opaque
    refcount_table_index = cluster_index >> s.refcount_block_bits
    if refcount_table_index < s.refcount_table_size:
        refcount_block_offset = s.refcount_table[refcount_table_index] & REFT_OFFSET_MASK
        if refcount_block_offset:
            if offset_into_cluster(s, refcount_block_offset):
                qcow2_signal_corruption(bs, True, -1, -1, f"Refblock offset {c_hex(refcount_block_offset)} unaligned "
                                        f"(reftable index: {c_hex(refcount_table_index)})")
                return -errno.EIO, None
            return load_refcount_block(bs, refcount_block_offset)

    # A new refcount block is needed.  It cannot come from qcow2_alloc_clusters (that would recurse):
    # it is placed where it can describe itself, or is described by an existing block.
    BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_REFBLOCK_ALLOC)
    # We write to the refcount table, so we might depend on L2 tables.
    ret = qcow2_cache_flush(bs, s.l2_table_cache)
    if ret < 0:
        return ret, None
    new_block = alloc_clusters_noref(bs, s.cluster_size, INT64_MAX)
    if new_block < 0:
        return new_block, None
    if new_block == 0:
        qcow2_signal_corruption(bs, True, -1, -1, "Preventing invalid allocation of refcount block at offset 0")
        return -errno.EIO, None

    if in_same_refcount_block(s, new_block, cluster_index << s.cluster_bits):
        ret, refcount_block = qcow2_cache_get_empty(bs, s.refcount_block_cache, new_block)
        if ret < 0:
            return ret, None
        refcount_block[:] = bytes(s.cluster_size)
        s.set_refcount(refcount_block, (new_block >> s.cluster_bits) & (s.refcount_block_size - 1), 1)
    else:
        # Described somewhere else; this recurses at most twice.
        ret = update_refcount(bs, new_block, s.cluster_size, 1, False, QCOW2_DISCARD_NEVER)
        if ret < 0:
            return ret, None
        ret = qcow2_cache_flush(bs, s.refcount_block_cache)
        if ret < 0:
            return ret, None
        ret, refcount_block = qcow2_cache_get_empty(bs, s.refcount_block_cache, new_block)
        if ret < 0:
            return ret, None
        refcount_block[:] = bytes(s.cluster_size)

    # Now the new refcount block needs to be written to disk.
    BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_REFBLOCK_ALLOC_WRITE)
    qcow2_cache_entry_mark_dirty(s.refcount_block_cache, refcount_block)
    ret = qcow2_cache_flush(bs, s.refcount_block_cache)
    if ret < 0:
        qcow2_cache_put(s.refcount_block_cache, refcount_block)
        return ret, None

    if refcount_table_index < s.refcount_table_size:
        # The table is big enough: hook the block up.
        BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_REFBLOCK_ALLOC_HOOKUP)
        ret = bdrv_co_pwrite_sync(bs.file, s.refcount_table_offset + refcount_table_index * REFTABLE_ENTRY_SIZE,
                                  8, struct.pack(">Q", new_block))
        qcow2_cache_put(s.refcount_block_cache, refcount_block)
        if ret < 0:
            return ret, None
        s.refcount_table[refcount_table_index] = new_block
        s.max_refcount_table_index = max(s.max_refcount_table_index, refcount_table_index)
        return -errno.EAGAIN, None

    qcow2_cache_put(s.refcount_block_cache, refcount_block)

    # The table must grow: new self-describing refcount blocks and a new table go after
    # everything the current refcount blocks cover, and the header switches to them at once.
    BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_REFTABLE_GROW)
    blocks_used = -(-max(cluster_index + 1, (new_block >> s.cluster_bits) + 1) // s.refcount_block_size)
    meta_offset = blocks_used * s.refcount_block_size * s.cluster_size
    ret = qcow2_refcount_area(bs, meta_offset, 0, False, refcount_table_index, new_block)
    if ret < 0:
        return ret, None
    return -errno.EAGAIN, None


def qcow2_refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int,
                                 generous_increase: bool) -> tuple[int, int]:
    """(bytes of refcount blocks and table needed to count ``clusters`` and themselves, refblock count)."""
    blocks_per_table_cluster = cluster_size // REFTABLE_ENTRY_SIZE
    refcounts_per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // refcounts_per_block)
        table = -(-blocks // blocks_per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous_increase:
            clusters += -(-table // 2)
            n = 0
            generous_increase = False
        if n == last:
            break
    return (blocks + table) * cluster_size, blocks


def qcow2_refcount_area(bs, start_offset: int, additional_clusters: int, exact_size: bool,
                        new_refblock_index: int, new_refblock_offset: int) -> int:
    """Write refcount blocks for everything up to ``start_offset`` (plus ``additional_clusters``) and a new table.

    The new blocks and table are placed at ``start_offset`` and describe
    themselves.  Returns the end offset of the new structures, or -errno.
    """
    s = bs.opaque
    _, total_refblock_count = qcow2_refcount_metadata_size(
        start_offset // s.cluster_size + additional_clusters, s.cluster_size, s.refcount_order, not exact_size)
    if total_refblock_count > QCOW_MAX_REFTABLE_SIZE:
        return -errno.EFBIG
    area_reftable_index = (start_offset // s.cluster_size) // s.refcount_block_size
    if exact_size:
        table_size = total_refblock_count
    else:
        table_size = total_refblock_count + -(-total_refblock_count // 2)
    per_cluster = s.cluster_size // REFTABLE_ENTRY_SIZE
    table_size = -(-table_size // per_cluster) * per_cluster
    table_clusters = table_size * REFTABLE_ENTRY_SIZE // s.cluster_size
    if table_size > QCOW_MAX_REFTABLE_SIZE:
        return -errno.EFBIG

    new_table = [0] * table_size
    keep = min(table_size, s.max_refcount_table_index + 1, len(s.refcount_table))
    new_table[:keep] = s.refcount_table[:keep]
    if new_refblock_offset:
        new_table[new_refblock_index] = new_refblock_offset

    additional_refblock_count = sum(1 for i in range(area_reftable_index, total_refblock_count) if not new_table[i])
    table_offset = start_offset + additional_refblock_count * s.cluster_size
    end_offset = table_offset + table_clusters * s.cluster_size

    block_offset = start_offset
    c = s.refcount_block_cache
    for i in range(area_reftable_index, total_refblock_count):
        if new_table[i]:
            ret, refblock = qcow2_cache_get(bs, c, new_table[i])
            if ret < 0:
                return ret
        else:
            ret, refblock = qcow2_cache_get_empty(bs, c, block_offset)
            if ret < 0:
                return ret
            refblock[:] = bytes(s.cluster_size)
            qcow2_cache_entry_mark_dirty(c, refblock)
            new_table[i] = block_offset
            block_offset += s.cluster_size
        first_offset_covered = i * s.refcount_block_size * s.cluster_size
        if first_offset_covered < end_offset:
            j = (start_offset - first_offset_covered) // s.cluster_size if first_offset_covered < start_offset else 0
            end_index = min((end_offset - first_offset_covered) // s.cluster_size, s.refcount_block_size)
            for k in range(j, end_index):
                if s.get_refcount(refblock, k):
                    qcow2_cache_put(c, refblock)
                    raise AssertionError("qcow2_refcount_area: the new area is not free")
                s.set_refcount(refblock, k, 1)
            qcow2_cache_entry_mark_dirty(c, refblock)
        qcow2_cache_put(c, refblock)
    if block_offset != table_offset:
        raise AssertionError("qcow2_refcount_area: refblock placement went wrong")

    BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_REFBLOCK_ALLOC_WRITE_BLOCKS)
    ret = qcow2_cache_flush(bs, c)
    if ret < 0:
        return ret
    BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_REFBLOCK_ALLOC_WRITE_TABLE)
    raw = struct.pack(f">{table_size}Q", *new_table)
    ret = bdrv_co_pwrite_sync(bs.file, table_offset, len(raw), raw)
    if ret < 0:
        return ret
    BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_REFBLOCK_ALLOC_SWITCH_TABLE)
    ret = bdrv_co_pwrite_sync(bs.file, HDR_REFCOUNT_TABLE_OFFSET, 12, struct.pack(">QI", table_offset, table_clusters))
    if ret < 0:
        return ret
    old_table_offset, old_table_size = s.refcount_table_offset, s.refcount_table_size
    s.refcount_table = new_table
    s.refcount_table_size = table_size
    s.refcount_table_offset = table_offset
    update_max_refcount_table_index(s)
    qcow2_free_clusters(bs, old_table_offset, old_table_size * REFTABLE_ENTRY_SIZE, QCOW2_DISCARD_OTHER)
    return end_offset


# --------------------------------------------------------------------------
# Discards of freed clusters


def qcow2_process_discards(bs, ret: int) -> None:
    """Pass the collected freed ranges to the file as discards (advisory: errors are ignored)."""
    s = bs.opaque
    discards, s.discards = s.discards, []
    if ret >= 0:
        for d in discards:
            bdrv_co_pdiscard(bs.file, d.offset, d.bytes)


def sync_before_reuse(bs) -> int:
    """Write the L2 tables back (and flush) before a cluster freed since they were last written is reused.

    qblock addition (QEMU 7.2 has the window): a discard or an unmapping zero write frees a cluster in
    the refcount cache while the L2 entry that stops pointing at it may still be only in the L2 cache.
    If another write reused the cluster at once, its data would reach the file first, and a crash then
    would leave the old L2 entry pointing at it: the discarded range would read another offset's data.
    0 or -errno.
    """
    s = bs.opaque
    if not s.freed_before_l2_sync:
        return 0
    s.freed_before_l2_sync = False
    ret = qcow2_cache_flush(bs, s.l2_table_cache)
    if ret < 0:
        s.freed_before_l2_sync = True
    return ret


def _issue_pending_discards(bs) -> None:
    """Before a cluster can be handed out again, discard what was freed so far.

    qblock addition: QEMU issues the collected discards only at the end of the
    request (qcow2_cluster_discard), so a cluster freed early in a long discard
    that allocates L2 tables later on could be reused and then punched out.
    """
    if bs.opaque.discards:
        qcow2_process_discards(bs, 0)


def update_refcount_discard(bs, offset: int, length: int) -> None:
    s = bs.opaque
    for d in s.discards:
        new_start = min(offset, d.offset)
        new_end = max(offset + length, d.offset + d.bytes)
        if new_end - new_start <= length + d.bytes:
            d.offset, d.bytes = new_start, new_end - new_start
            break
    else:
        d = Qcow2DiscardRegion(offset, length)
        s.discards.append(d)
    for p in list(s.discards):
        if p is d or p.offset > d.offset + d.bytes or d.offset > p.offset + p.bytes:
            continue
        s.discards.remove(p)
        d.offset = min(d.offset, p.offset)
        d.bytes += p.bytes


# --------------------------------------------------------------------------
# Updating refcounts


def update_refcount(bs, offset: int, length: int, addend: int, decrease: bool, type_) -> int:
    """Add (or with ``decrease`` subtract) ``addend`` to the refcount of every cluster in the range."""
    s = bs.opaque
    if length < 0:
        return -errno.EINVAL
    if length == 0:
        return 0
    if decrease:
        qcow2_cache_set_dependency(bs, s.refcount_block_cache, s.l2_table_cache)
    else:
        _issue_pending_discards(bs)
    c = s.refcount_block_cache
    refcount_block = None
    old_table_index = -1
    start = start_of_cluster(s, offset)
    last = start_of_cluster(s, offset + length - 1)
    cluster_offset = start
    ret = 0
    while cluster_offset <= last:
        cluster_index = cluster_offset >> s.cluster_bits
        table_index = cluster_index >> s.refcount_block_bits
        if table_index != old_table_index:
            if refcount_block is not None:
                qcow2_cache_put(c, refcount_block)
                refcount_block = None
            ret, refcount_block = alloc_refcount_block(bs, cluster_index)
            if ret == -errno.EAGAIN and s.free_cluster_index > start >> s.cluster_bits:
                # Let the caller try the same clusters first: they may still be free.
                s.free_cluster_index = start >> s.cluster_bits
            if ret < 0:
                break
            qcow2_cache_entry_mark_dirty(c, refcount_block)
        old_table_index = table_index
        block_index = cluster_index & (s.refcount_block_size - 1)
        refcount = s.get_refcount(refcount_block, block_index)
        if decrease:
            if refcount < addend:
                ret = -errno.EINVAL
                break
            refcount -= addend
        else:
            if refcount + addend > s.refcount_max:
                ret = -errno.EINVAL
                break
            refcount += addend
        if refcount == 0:
            s.freed_before_l2_sync = True
            if cluster_index < s.free_cluster_index:
                s.free_cluster_index = cluster_index
        s.set_refcount(refcount_block, block_index, refcount)
        if refcount == 0:
            # A freed table must never be written back over whatever reuses its cluster.
            table = qcow2_cache_is_table_offset(c, cluster_offset)
            if table is not None:
                qcow2_cache_put(c, refcount_block)
                refcount_block = None
                old_table_index = -1
                qcow2_cache_discard(c, table)
            table = qcow2_cache_is_table_offset(s.l2_table_cache, cluster_offset)
            if table is not None:
                qcow2_cache_discard(s.l2_table_cache, table)
            if s.discard_passthrough[type_]:
                update_refcount_discard(bs, cluster_offset, s.cluster_size)
        cluster_offset += s.cluster_size
    else:
        ret = 0
    if not s.cache_discards:
        qcow2_process_discards(bs, ret)
    if refcount_block is not None:
        qcow2_cache_put(c, refcount_block)
    if ret < 0:
        # Undo what was done (this may succeed, e.g. after -ENOSPC for a new refcount block).
        update_refcount(bs, offset, cluster_offset - offset, addend, not decrease, QCOW2_DISCARD_NEVER)
    return ret


def qcow2_update_cluster_refcount(bs, cluster_index: int, addend: int, decrease: bool, type_) -> int:
    s = bs.opaque
    ret = update_refcount(bs, cluster_index << s.cluster_bits, 1, addend, decrease, type_)
    return ret if ret < 0 else 0


# --------------------------------------------------------------------------
# Cluster allocation


def alloc_clusters_noref(bs, size: int, max_offset: int) -> int:
    """The offset of ``size`` bytes of free clusters, without taking them; or -errno."""
    s = bs.opaque
    ret = sync_before_reuse(bs)
    if ret < 0:
        return ret
    _issue_pending_discards(bs)
    nb_clusters = size_to_clusters(s, size)
    # QEMU looks at one cluster at a time (qcow2_get_refcount each); qblock scans a refcount block
    # per cache lookup, with the same result and the same free_cluster_index.
    block_size = s.refcount_block_size
    i = 0
    while i < nb_clusters:
        index = s.free_cluster_index
        table_index = index >> s.refcount_block_bits
        block_offset = s.refcount_table[table_index] & REFT_OFFSET_MASK if table_index < s.refcount_table_size else 0
        if not block_offset:
            # No refcount block yet: every cluster it would describe is free.
            take = min(nb_clusters - i, ((table_index + 1) << s.refcount_block_bits) - index)
            s.free_cluster_index += take
            i += take
            continue
        if offset_into_cluster(s, block_offset):
            ret, _ = qcow2_get_refcount(bs, index)      # reports the corruption
            return ret
        ret, block = qcow2_cache_get(bs, s.refcount_block_cache, block_offset)
        if ret < 0:
            return ret
        get = s.get_refcount
        j = index & (block_size - 1)
        while i < nb_clusters and j < block_size:
            i = 0 if get(block, j) else i + 1
            j += 1
        qcow2_cache_put(s.refcount_block_cache, block)
        s.free_cluster_index = (table_index << s.refcount_block_bits) + j
    if s.free_cluster_index > 0 and s.free_cluster_index - 1 > max_offset >> s.cluster_bits:
        return -errno.EFBIG
    return (s.free_cluster_index - nb_clusters) << s.cluster_bits


def qcow2_alloc_clusters(bs, size: int) -> int:
    """Allocate ``size`` bytes of contiguous clusters: their offset, or -errno."""
    BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_CLUSTER_ALLOC)
    while True:
        offset = alloc_clusters_noref(bs, size, QCOW_MAX_CLUSTER_OFFSET)
        if offset < 0:
            return offset
        ret = update_refcount(bs, offset, size, 1, False, QCOW2_DISCARD_NEVER)
        if ret != -errno.EAGAIN:
            break
    return ret if ret < 0 else offset


def qcow2_alloc_clusters_at(bs, offset: int, nb_clusters: int) -> int:
    """Take up to ``nb_clusters`` free clusters starting at ``offset``: how many, or -errno."""
    s = bs.opaque
    if nb_clusters == 0:
        return 0
    ret = sync_before_reuse(bs)
    if ret < 0:
        return ret
    while True:
        cluster_index = offset >> s.cluster_bits
        i = 0
        while i < nb_clusters:
            ret, refcount = qcow2_get_refcount(bs, cluster_index + i)
            if ret < 0:
                return ret
            if refcount:
                break
            i += 1
        ret = update_refcount(bs, offset, i << s.cluster_bits, 1, False, QCOW2_DISCARD_NEVER)
        if ret != -errno.EAGAIN:
            break
    return ret if ret < 0 else i


def qcow2_alloc_bytes(bs, size: int) -> int:
    """Space for a compressed cluster of ``size`` bytes, packed after the previous one: its offset, or -errno."""
    s = bs.opaque
    BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_CLUSTER_ALLOC_BYTES)
    if not 0 < size <= s.cluster_size:
        raise AssertionError("qcow2_alloc_bytes: bad size")
    offset = s.free_byte_offset
    if offset:
        ret, refcount = qcow2_get_refcount(bs, offset >> s.cluster_bits)
        if ret < 0:
            return ret
        if refcount == s.refcount_max:
            offset = 0
    free_in_cluster = s.cluster_size - offset_into_cluster(s, offset)
    while True:
        if not offset or free_in_cluster < size:
            new_cluster = alloc_clusters_noref(bs, s.cluster_size, min(s.cluster_offset_mask, QCOW_MAX_CLUSTER_OFFSET))
            if new_cluster < 0:
                return new_cluster
            if new_cluster == 0:
                qcow2_signal_corruption(bs, True, -1, -1,
                                        "Preventing invalid allocation of compressed cluster at offset 0")
                return -errno.EIO
            if not offset or -(-offset // s.cluster_size) * s.cluster_size != new_cluster:
                offset = new_cluster
                free_in_cluster = s.cluster_size
            else:
                free_in_cluster += s.cluster_size
        ret = update_refcount(bs, offset, size, 1, False, QCOW2_DISCARD_NEVER)
        if ret < 0:
            offset = 0
        if ret != -errno.EAGAIN:
            break
    if ret < 0:
        return ret
    # The refcount went up: the refcount blocks must reach the disk before the caller's L2 update.
    qcow2_cache_set_dependency(bs, s.l2_table_cache, s.refcount_block_cache)
    s.free_byte_offset = offset + size
    if not offset_into_cluster(s, s.free_byte_offset):
        s.free_byte_offset = 0
    return offset


def qcow2_free_clusters(bs, offset: int, size: int, type_) -> None:
    BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_CLUSTER_FREE)
    ret = update_refcount(bs, offset, size, 1, True, type_)
    if ret < 0:
        # As QEMU: the clusters leak (qemu-img check -r leaks reclaims them).
        sys.stderr.write(f"qcow2_free_clusters failed: {strerror(-ret)}\n")


def qcow2_free_any_clusters(bs, l2_entry: int, nb_clusters: int, type_) -> None:
    """Free the clusters an L2 entry points to, whatever its type."""
    s = bs.opaque
    ctype = qcow2_get_cluster_type(l2_entry)
    if ctype == QCOW2_CLUSTER_COMPRESSED:
        nb_csectors = ((l2_entry >> s.csize_shift) & s.csize_mask) + 1
        qcow2_free_clusters(bs, (l2_entry & s.cluster_offset_mask) & ~511, nb_csectors * 512, type_)
    elif ctype in (QCOW2_CLUSTER_NORMAL, QCOW2_CLUSTER_ZERO_ALLOC):
        host = l2_entry & L2E_OFFSET_MASK
        if offset_into_cluster(s, host):
            qcow2_signal_corruption(bs, False, -1, -1, f"Cannot free unaligned cluster {c_hex(host)}")
        else:
            qcow2_free_clusters(bs, host, nb_clusters << s.cluster_bits, type_)
