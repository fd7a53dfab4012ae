"""The L2 table and refcount block caches: QEMU's block/qcow2-cache.c.

A ``Qcow2Cache`` holds whole tables (one cluster each), found by their host
offset.  ``qcow2_cache_get`` hands out the table (a ``bytearray``) and takes
a reference; ``qcow2_cache_put`` drops it; ``qcow2_cache_entry_mark_dirty``
says the table must be written back.  The least recently used unreferenced
entry is replaced when a new table is needed, after writing it back.

Write ordering lives here, as in QEMU: a cache may *depend* on another
(``qcow2_cache_set_dependency``): before any of its dirty tables is written,
the other cache is written and the file flushed.  ``depends_on_flush`` asks
for a plain flush of the file first (data written by COW must be on disk
before an L2 entry points at it).  So an L2 entry never reaches the disk
before the refcount block that accounts for its cluster.

Every function runs under ``s->lock``.  Differences from QEMU: tables are
allocated on first use, not when the cache is created; entries are found
through a dict, not a linear scan; the cache-clean timer is not modelled.
"""
from __future__ import annotations

import errno

import attrs

from qblock.block.driver import BlkdebugEvent
from qblock.block.io import BLKDBG_EVENT, bdrv_co_flush, bdrv_co_pread, bdrv_co_pwrite
from qblock.trace.events import (
    trace_qcow2_cache_entry_flush,
    trace_qcow2_cache_flush,
    trace_qcow2_cache_get,
    trace_qcow2_cache_get_done,
    trace_qcow2_cache_get_read,
    trace_qcow2_cache_get_replace_entry,
)
from qblock.util.coroutine import qemu_coroutine_self

from .qcow2_h import (
    QCOW2_OL_ACTIVE_L2,
    QCOW2_OL_REFCOUNT_BLOCK,
    qcow2_need_accurate_refcounts,
)
from .qcow2_overlap import qcow2_pre_write_overlap_check


@attrs.define(eq=False)
class Qcow2CachedTable:
    offset: int = 0
    lru_counter: int = 0
    ref: int = 0
    dirty: bool = False


@attrs.define(eq=False)
class Qcow2Cache:
    """A fixed number of cached tables (QEMU's struct Qcow2Cache)."""

    size: int
    table_size: int
    name: str
    entries: list = attrs.field(factory=list)
    tables: list = attrs.field(factory=list)          # bytearray or None, same index as entries
    by_offset: dict = attrs.field(factory=dict)       # offset -> index
    by_table: dict = attrs.field(factory=dict)        # id(table) -> index
    depends: "Qcow2Cache | None" = None
    depends_on_flush: bool = False
    lru_counter: int = 0

    @property
    def trace_name(self) -> str:
        return self.name


def _is_l2(bs, c: Qcow2Cache) -> int:
    return 1 if c is bs.opaque.l2_table_cache else 0


def qcow2_cache_create(bs, num_tables: int, table_size: int, name: str = "") -> Qcow2Cache:
    c = Qcow2Cache(num_tables, table_size, name or "qcow2-cache")
    c.entries = [Qcow2CachedTable() for _ in range(num_tables)]
    c.tables = [None] * num_tables
    return c


def qcow2_cache_destroy(c: Qcow2Cache) -> None:
    for e in c.entries:
        if e.ref:
            raise AssertionError(f"{c.name}: destroying a cache whose table is still referenced")
    c.entries = []
    c.tables = []
    c.by_offset.clear()
    c.by_table.clear()


def _table(c: Qcow2Cache, i: int) -> bytearray:
    t = c.tables[i]
    if t is None:
        t = bytearray(c.table_size)
        c.tables[i] = t
        c.by_table[id(t)] = i
    return t


def _index_of(c: Qcow2Cache, table) -> int:
    i = c.by_table.get(id(table))
    if i is None or c.tables[i] is not table:
        raise AssertionError(f"{c.name}: table not in this cache")
    return i


def qcow2_cache_flush_dependency(bs, c: Qcow2Cache) -> int:
    ret = qcow2_cache_flush(bs, c.depends)
    if ret < 0:
        return ret
    c.depends = None
    c.depends_on_flush = False
    return 0


def qcow2_cache_entry_flush(bs, c: Qcow2Cache, i: int) -> int:
    """Write back entry ``i`` if dirty, honouring the cache's dependencies first."""
    s = bs.opaque
    e = c.entries[i]
    if not e.dirty or not e.offset:
        return 0
    if trace_qcow2_cache_entry_flush.event.enabled:
        trace_qcow2_cache_entry_flush(qemu_coroutine_self(), _is_l2(bs, c), i)
    ret = 0
    if c.depends is not None:
        ret = qcow2_cache_flush_dependency(bs, c)
    elif c.depends_on_flush:
        ret = bdrv_co_flush(bs.file.bs)
        if ret >= 0:
            c.depends_on_flush = False
    if ret < 0:
        return ret
    if c is s.refcount_block_cache:
        ret = qcow2_pre_write_overlap_check(bs, QCOW2_OL_REFCOUNT_BLOCK, e.offset, c.table_size)
    elif c is s.l2_table_cache:
        ret = qcow2_pre_write_overlap_check(bs, QCOW2_OL_ACTIVE_L2, e.offset, c.table_size)
    else:
        ret = qcow2_pre_write_overlap_check(bs, 0, e.offset, c.table_size)
    if ret < 0:
        return ret
    if c is s.refcount_block_cache:
        BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_REFBLOCK_UPDATE_PART)
    elif c is s.l2_table_cache:
        BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_L2_UPDATE)
    ret = bdrv_co_pwrite(bs.file, e.offset, c.table_size, c.tables[i])
    if ret < 0:
        return ret
    e.dirty = False
    return 0


def qcow2_cache_write(bs, c: Qcow2Cache) -> int:
    """Write back every dirty table (without flushing the file)."""
    if trace_qcow2_cache_flush.event.enabled:
        trace_qcow2_cache_flush(qemu_coroutine_self(), _is_l2(bs, c))
    result = 0
    for i, e in enumerate(c.entries):
        if not (e.dirty and e.offset):
            continue            # (the check qcow2_cache_entry_flush makes first, done here for speed)
        ret = qcow2_cache_entry_flush(bs, c, i)
        if ret < 0 and result != -errno.ENOSPC:
            result = ret
    return result


def qcow2_cache_flush(bs, c: Qcow2Cache) -> int:
    """Write back every dirty table, then flush the file."""
    result = qcow2_cache_write(bs, c)
    if result == 0:
        ret = bdrv_co_flush(bs.file.bs)
        if ret < 0:
            result = ret
    return result


def qcow2_cache_set_dependency(bs, c: Qcow2Cache, dependency: Qcow2Cache) -> int:
    """From now on ``dependency`` is written (and the file flushed) before any table of ``c``."""
    if dependency.depends is not None:
        ret = qcow2_cache_flush_dependency(bs, dependency)
        if ret < 0:
            return ret
    if c.depends is not None and c.depends is not dependency:
        ret = qcow2_cache_flush_dependency(bs, c)
        if ret < 0:
            return ret
    c.depends = dependency
    return 0


def qcow2_cache_depends_on_flush(c: Qcow2Cache) -> None:
    c.depends_on_flush = True


def qcow2_cache_empty(bs, c: Qcow2Cache) -> int:
    ret = qcow2_cache_flush(bs, c)
    if ret < 0:
        return ret
    for e in c.entries:
        if e.ref:
            raise AssertionError(f"{c.name}: emptying a cache whose table is still referenced")
        e.offset = 0
        e.lru_counter = 0
    c.by_offset.clear()
    return 0


def _find_entry_to_replace(c: Qcow2Cache) -> int:
    min_lru, min_index = None, -1
    for i, e in enumerate(c.entries):
        if e.ref:
            continue
        if min_lru is None or e.lru_counter < min_lru:
            min_lru, min_index = e.lru_counter, i
    if min_index < 0:
        # QEMU aborts here: every table is in use.
        raise AssertionError(f"{c.name}: every cache entry is referenced")
    return min_index


def qcow2_cache_do_get(bs, c: Qcow2Cache, offset: int, read_from_disk: bool) -> tuple[int, bytearray | None]:
    if trace_qcow2_cache_get.event.enabled:
        trace_qcow2_cache_get(qemu_coroutine_self(), _is_l2(bs, c), offset, read_from_disk)
    if offset == 0 or offset % c.table_size:
        # QEMU asserts (a caller must check alignment and signal corruption first).
        raise AssertionError(f"{c.name}: table offset {offset:#x} is not aligned")
    i = c.by_offset.get(offset)
    if i is None:
        i = _find_entry_to_replace(c)
        if trace_qcow2_cache_get_replace_entry.event.enabled:
            trace_qcow2_cache_get_replace_entry(qemu_coroutine_self(), _is_l2(bs, c), i)
        ret = qcow2_cache_entry_flush(bs, c, i)
        if ret < 0:
            return ret, None
        e = c.entries[i]
        if e.ref:
            # The flush yielded and someone took this entry meanwhile: start again.
            return qcow2_cache_do_get(bs, c, offset, read_from_disk)
        if trace_qcow2_cache_get_read.event.enabled:
            trace_qcow2_cache_get_read(qemu_coroutine_self(), _is_l2(bs, c), i)
        c.by_offset.pop(e.offset, None)
        e.offset = 0
        table = _table(c, i)
        if read_from_disk:
            if c is bs.opaque.l2_table_cache:
                BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_L2_LOAD)
            ret = bdrv_co_pread(bs.file, offset, c.table_size, table)
            if ret < 0:
                return ret, None
        if offset in c.by_offset:
            # Loaded by someone else while we read: use theirs.
            return qcow2_cache_do_get(bs, c, offset, read_from_disk)
        e.offset = offset
        e.dirty = False
        c.by_offset[offset] = i
    e = c.entries[i]
    e.ref += 1
    if trace_qcow2_cache_get_done.event.enabled:
        trace_qcow2_cache_get_done(qemu_coroutine_self(), _is_l2(bs, c), i)
    return 0, _table(c, i)


def qcow2_cache_get(bs, c: Qcow2Cache, offset: int) -> tuple[int, bytearray | None]:
    """(0, table) with a reference taken, or (-errno, None)."""
    return qcow2_cache_do_get(bs, c, offset, True)


def qcow2_cache_get_empty(bs, c: Qcow2Cache, offset: int) -> tuple[int, bytearray | None]:
    """Like qcow2_cache_get, but the table is not read: the caller fills it."""
    return qcow2_cache_do_get(bs, c, offset, False)


def qcow2_cache_put(c: Qcow2Cache, table) -> None:
    i = _index_of(c, table)
    e = c.entries[i]
    e.ref -= 1
    if e.ref == 0:
        c.lru_counter += 1
        e.lru_counter = c.lru_counter
    if e.ref < 0:
        raise AssertionError(f"{c.name}: reference count of entry {i} below zero")


def qcow2_cache_entry_mark_dirty(c: Qcow2Cache, table) -> None:
    i = _index_of(c, table)
    if not c.entries[i].offset:
        raise AssertionError(f"{c.name}: marking a discarded entry dirty")
    c.entries[i].dirty = True


def qcow2_cache_is_table_offset(c: Qcow2Cache, offset: int):
    """The cached table at ``offset``, or None."""
    i = c.by_offset.get(offset)
    return c.tables[i] if i is not None else None


def qcow2_cache_discard(c: Qcow2Cache, table) -> None:
    """Forget a table whose cluster was freed: it is never written back."""
    i = _index_of(c, table)
    e = c.entries[i]
    if e.ref:
        raise AssertionError(f"{c.name}: discarding a referenced table")
    c.by_offset.pop(e.offset, None)
    e.offset = 0
    e.lru_counter = 0
    e.dirty = False


def qcow2_cache_has_dirty(c: Qcow2Cache) -> bool:
    return any(e.dirty and e.offset for e in c.entries)


# --------------------------------------------------------------------------
# Writing the caches back (QEMU keeps these two in qcow2-refcount.c)


def qcow2_write_caches(bs) -> int:
    """Write back the L2 tables, then (unless lazy refcounts hold them back) the refcount blocks."""
    s = bs.opaque
    ret = qcow2_cache_write(bs, s.l2_table_cache)
    if ret < 0:
        return ret
    if qcow2_need_accurate_refcounts(s):
        ret = qcow2_cache_write(bs, s.refcount_block_cache)
        if ret < 0:
            return ret
    return 0


def qcow2_flush_caches(bs) -> int:
    """qcow2_write_caches, then a flush of the file."""
    ret = qcow2_write_caches(bs)
    if ret < 0:
        return ret
    return bdrv_co_flush(bs.file.bs)
