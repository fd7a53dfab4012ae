"""Tests for the request path, qblock/block/io.py (QEMU's block/io.c).

Most tests run on a ``test-mem`` node (qblock/testing/memdrv.py), whose call
log ``bs.opaque.calls`` holds ``(op, offset, bytes, flags)`` for every driver
call, so each test states exactly what reached the driver.  Concurrency comes
from coroutines entered one after another; memdrv's ``latency-ns`` makes each
driver call sleep on the virtual clock so that requests overlap::

    coroutine   t=0                      t=L                     t=2L
    A           RMW read [0, 512) ...... write [0, 512) ......... done
    B           waits for A ............................................. RMW read ...

The property test of the whole path against a byte-array model lives in
test_io_model.py.
"""
from __future__ import annotations

import errno

import attrs
import pytest

from qblock.block import io
from qblock.block.block_backend import (
    blk_bs,
    blk_co_flush,
    blk_co_pdiscard,
    blk_co_preadv,
    blk_co_pwritev,
    blk_flush,
    blk_new,
    blk_new_open,
    blk_pdiscard,
    blk_pread,
    blk_pwrite,
    blk_pwrite_zeroes,
    blk_set_enable_write_cache,
    blk_unref,
)
from qblock.block.driver import (
    BDRV_BLOCK_ALLOCATED,
    BDRV_BLOCK_DATA,
    BDRV_BLOCK_EOF,
    BDRV_BLOCK_OFFSET_VALID,
    BDRV_BLOCK_ZERO,
    BDRV_O_RDWR,
    BDRV_REQ_FUA,
    BDRV_REQ_MAY_UNMAP,
    BDRV_REQ_NO_FALLBACK,
    BDRV_REQUEST_MAX_BYTES,
    BdrvTrackedRequestType,
    BlockDriver,
    bdrv_register,
)
from qblock.block.graph import bdrv_open, bdrv_set_backing_hd, bdrv_unref
from qblock.block.io import (
    bdrv_block_status,
    bdrv_block_status_above,
    bdrv_check_byte_request,
    bdrv_co_preadv,
    bdrv_co_preadv_part,
    bdrv_co_pwritev,
    bdrv_disable_copy_on_read,
    bdrv_enable_copy_on_read,
    bdrv_flush,
    bdrv_is_allocated,
    bdrv_is_allocated_above,
    bdrv_make_zero,
    bdrv_pdiscard,
    bdrv_pread,
    bdrv_pwrite,
    bdrv_pwrite_zeroes,
    bdrv_run_co,
    mark_request_serialising,
    tracked_request_begin,
    tracked_request_end,
    wait_serialising_requests,
)
from qblock.testing.memdrv import memdrv_options
from qblock.util.aio import AIO_WAIT_WHILE
from qblock.util.aiocb import AIOCBInfo, BlockAIOCB
from qblock.util.coroutine import qemu_coroutine_create, qemu_coroutine_enter, qemu_coroutine_yield
from qblock.util.coroutine_lock import qemu_co_sleep_ns
from qblock.util.iov import QEMUIOVector, qemu_iovec_from_buf, qemu_iovec_init_slice, qemu_iovec_to_buf
from qblock.util.notify import NotifierWithReturn
from qblock.util.timer import QEMU_CLOCK_VIRTUAL, qemu_clock_get_ns

KiB = 1024
WRITE = BdrvTrackedRequestType.BDRV_TRACKED_WRITE
ALL_STYLES = ("co", "part", "aio", "sector", "sector-flags", "aio-sector")
LAT = 1000  # ns of virtual-clock latency per driver call where a test wants overlap


# --------------------------------------------------------------------------
# Helpers


@pytest.fixture
def mem():
    """Open test-mem nodes behind BlockBackends: ``mem(style, extra=..., **memdrv options)`` -> (blk, bs, state).

    At teardown every node must be idle (no tracked request, nothing in flight) before its
    BlockBackend is released.
    """
    opened = []

    def open_node(style="co", flags=BDRV_O_RDWR, extra=None, write_zeroes=False, discard=False,
                  block_status=False, **opts):
        options = memdrv_options(style, write_zeroes, discard, block_status, **opts)
        options.update(extra or {})
        blk = blk_new_open(None, None, options, flags)
        opened.append(blk)
        bs = blk_bs(blk)
        return blk, bs, bs.opaque

    yield open_node
    for blk in opened:
        bs = blk_bs(blk)
        if bs is not None:
            assert bs.tracked_requests == [] and bs.in_flight == 0 and bs.serialising_in_flight == 0
        blk_unref(blk)


def now() -> int:
    return qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL)


def qiov_of(buf) -> QEMUIOVector:
    return QEMUIOVector([memoryview(buf)])


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) % 251 + 1 for i in range(n))


def calls(state, *ops):
    """The driver calls as (op, offset, bytes), only those in ``ops`` if given."""
    return [(op, off, n) for op, off, n, _ in state.calls if not ops or op in ops]


def run_concurrently(*jobs):
    """Enter one coroutine per ``(delay_ns, fn)``; poll until all returned.

    Returns (results in job order, job indexes in completion order, completion times).
    """
    results = [None] * len(jobs)
    order, times = [], [None] * len(jobs)
    for i, (delay, fn) in enumerate(jobs):
        def entry(_, i=i, delay=delay, fn=fn):
            if delay:
                qemu_co_sleep_ns(QEMU_CLOCK_VIRTUAL, delay)
            results[i] = fn()
            times[i] = now()
            order.append(i)
        qemu_coroutine_enter(qemu_coroutine_create(entry, None))
    AIO_WAIT_WHILE(None, lambda: len(order) < len(jobs))
    return results, order, times


def run_co(fn, *args):
    """Run one coroutine_fn to completion from outside a coroutine."""
    return run_concurrently((0, lambda: fn(*args)))[0][0]


# --------------------------------------------------------------------------
# Test drivers: one whose hooks raise, one overlay with clusters and a backing node


@attrs.define
class RaiserState:
    exc: BaseException | None = None


class RaiserDriver(BlockDriver):
    """Every I/O hook raises ``bs.opaque.exc``."""

    format_name = "test-io-raiser"
    protocol_name = "test-io-raiser"
    state_class = RaiserState

    def bdrv_file_open(self, bs, options, flags):
        bs.opaque.exc = RuntimeError("raised by the test driver")
        return 0

    def bdrv_getlength(self, bs):
        return 64 * KiB

    def _raise(self, bs, *args):
        if bs.opaque.exc is None:
            return 0  # the test is over; let bdrv_close flush
        raise bs.opaque.exc

    bdrv_co_preadv = bdrv_co_pwritev = bdrv_co_flush_to_disk = _raise
    bdrv_co_pdiscard = bdrv_co_pwrite_zeroes = bdrv_co_block_status = _raise


bdrv_register(RaiserDriver)

CL = 64 * KiB  # the overlay's cluster size


@attrs.define
class OverlayState:
    data: bytearray = attrs.field(factory=bytearray)
    allocated: set = attrs.field(factory=set)
    calls: list = attrs.field(factory=list)


class OverlayDriver(BlockDriver):
    """A tiny format with 64 KiB clusters: unallocated clusters read from the backing node."""

    format_name = "test-io-overlay"
    protocol_name = "test-io-overlay"
    state_class = OverlayState
    supports_backing = True

    def bdrv_file_open(self, bs, options, flags):
        bs.opaque.data = bytearray(4 * CL)
        return 0

    def bdrv_getlength(self, bs):
        return len(bs.opaque.data)

    def bdrv_get_info(self, bs, bdi):
        bdi.cluster_size = CL
        return 0

    def bdrv_co_preadv(self, bs, offset, bytes, qiov, flags):
        s = bs.opaque
        s.calls.append(("read", offset, bytes))
        done = 0
        while done < bytes:
            pos = offset + done
            n = min(bytes - done, CL - pos % CL)
            if pos // CL in s.allocated:
                qemu_iovec_from_buf(qiov, done, memoryview(s.data)[pos:pos + n], n)
            else:
                part = qemu_iovec_init_slice(QEMUIOVector(), qiov, done, n)
                ret = bdrv_co_preadv(bs.backing, pos, n, part, 0)
                if ret < 0:
                    return ret
            done += n
        return 0

    def bdrv_co_pwritev(self, bs, offset, bytes, qiov, flags):
        s = bs.opaque
        s.calls.append(("write", offset, bytes))
        assert offset % CL == 0 and bytes % CL == 0, "the overlay only allocates whole clusters"
        qemu_iovec_to_buf(qiov, 0, memoryview(s.data)[offset:offset + bytes], bytes)
        s.allocated.update(range(offset // CL, (offset + bytes) // CL))
        return 0

    def bdrv_co_block_status(self, bs, want_zero, offset, bytes):
        s = bs.opaque
        state = offset // CL in s.allocated
        end = (offset // CL + 1) * CL
        while end < offset + bytes and (end // CL in s.allocated) == state:
            end += CL
        flags = BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID if state else 0
        return flags, min(end, offset + bytes) - offset, offset, bs


bdrv_register(OverlayDriver)


class EagerAioDriver(BlockDriver):
    """AIO-style hooks that complete before returning (reads, flushes) or refuse to start (writes, discards)."""

    format_name = "test-io-eager-aio"
    protocol_name = "test-io-eager-aio"
    state_class = RaiserState

    def bdrv_file_open(self, bs, options, flags):
        return 0

    def bdrv_getlength(self, bs):
        return 64 * KiB

    def bdrv_aio_preadv(self, bs, offset, bytes, qiov, flags, cb, opaque):
        qemu_iovec_from_buf(qiov, 0, b"\x33" * bytes, bytes)
        cb(opaque, 0)
        return BlockAIOCB(AIOCBInfo(), bs, cb, opaque)

    def bdrv_aio_flush(self, bs, cb, opaque):
        cb(opaque, -errno.ENOSPC)
        return BlockAIOCB(AIOCBInfo(), bs, cb, opaque)

    def bdrv_aio_pwritev(self, bs, offset, bytes, qiov, flags, cb, opaque):
        return None

    def bdrv_aio_pdiscard(self, bs, offset, bytes, cb, opaque):
        return None


bdrv_register(EagerAioDriver)


@pytest.fixture
def chain():
    """An overlay BlockBackend over a test-mem backing node full of a pattern: (blk, overlay, base)."""
    base = bdrv_open(None, None, memdrv_options("co", size=4 * CL), BDRV_O_RDWR)
    base.opaque.data[:] = pattern(4 * CL, 3)
    blk = blk_new_open(None, None, {"driver": "test-io-overlay"}, BDRV_O_RDWR)
    top = blk_bs(blk)
    bdrv_set_backing_hd(top, base)
    bdrv_unref(base)  # the backing edge holds its own reference
    yield blk, top, base
    blk_unref(blk)


# --------------------------------------------------------------------------
# Bad input


def test_no_medium_is_enomedium():
    """A BlockBackend without a node, and a node whose child has no driver, both fail I/O with -ENOMEDIUM."""
    blk = blk_new()
    try:
        assert blk_pread(blk, 0, bytearray(512)) == -errno.ENOMEDIUM
        assert blk_pwrite(blk, 0, bytes(512)) == -errno.ENOMEDIUM
    finally:
        blk_unref(blk)

    blk = blk_new_open(None, None, {"driver": "raw", "file": memdrv_options("co", size=64 * KiB)}, BDRV_O_RDWR)
    try:
        raw = blk_bs(blk)
        file_bs = raw.file.bs
        drv, file_bs.drv = file_bs.drv, None
        try:
            assert bdrv_check_byte_request(raw, 0, 512) == -errno.ENOMEDIUM
            assert bdrv_pread(blk.root, 0, bytearray(512), 512) == -errno.ENOMEDIUM
            assert bdrv_pwrite(blk.root, 0, bytes(512)) == -errno.ENOMEDIUM
        finally:
            file_bs.drv = drv
    finally:
        blk_unref(blk)


@pytest.mark.parametrize("offset, size", [(-512, 512), (0, -1), (0, BDRV_REQUEST_MAX_BYTES + 1)])
def test_bad_offset_or_size_is_eio(mem, offset, size):
    """A negative offset, a negative size or a size above BDRV_REQUEST_MAX_BYTES fails with -EIO before the driver."""
    blk, bs, s = mem("co", align=512, discard=True, write_zeroes=True, extra={"discard": "unmap"})
    buf = QEMUIOVector([memoryview(bytearray(512))])
    assert bdrv_run_co(bs, bdrv_co_preadv, blk.root, offset, size, buf, 0) == -errno.EIO
    assert bdrv_run_co(bs, bdrv_co_pwritev, blk.root, offset, size, buf, 0) == -errno.EIO
    assert bdrv_pwrite_zeroes(blk.root, offset, size) == -errno.EIO
    assert bdrv_pdiscard(blk.root, offset, size) == -errno.EIO
    assert s.calls == []


def test_read_only_node_refuses_writes_and_discards(mem):
    """On a read-only node writes, zero writes and (with discard=unmap) discards fail with -EPERM; data stays."""
    blk, bs, s = mem("co", flags=0, align=512, size=64 * KiB, write_zeroes=True, discard=True,
                     extra={"discard": "unmap"})
    assert bs.read_only
    s.data[:] = pattern(64 * KiB)
    assert blk_pwrite(blk, 0, bytes(512)) == -errno.EPERM
    assert blk_pwrite(blk, 100, b"x" * 10) == -errno.EPERM
    assert blk_pwrite_zeroes(blk, 0, 4096) == -errno.EPERM
    assert blk_pdiscard(blk, 0, 4096) == -errno.EPERM
    assert blk_flush(blk) == 0
    assert s.data == pattern(64 * KiB)
    assert "write" not in [c[0] for c in s.calls] and s.flushes == 0


def test_discard_on_read_only_node_without_unmap_is_a_noop(mem):
    """Discard is advisory: without discard=unmap even a read-only node answers 0 and nothing happens."""
    blk, bs, s = mem("co", flags=0, discard=True)
    assert blk_pdiscard(blk, 0, 4096) == 0
    assert s.calls == []


def test_no_fallback_with_misaligned_request_is_enotsup(mem):
    """BDRV_REQ_NO_FALLBACK on a request not aligned to request_alignment fails with -ENOTSUP and touches nothing."""
    blk, bs, s = mem("co", align=512, write_zeroes=True)
    assert blk_pwrite_zeroes(blk, 100, 512, BDRV_REQ_NO_FALLBACK) == -errno.ENOTSUP
    assert blk_pwrite_zeroes(blk, 512, 100, BDRV_REQ_NO_FALLBACK) == -errno.ENOTSUP
    assert s.calls == []


def test_zero_length_misaligned_request_returns_0(mem):
    """A zero-length request at a misaligned offset returns 0 without a tracked request or a driver call."""
    blk, bs, s = mem("co", align=512)
    empty = QEMUIOVector([memoryview(bytearray(0))])
    assert run_co(bdrv_co_preadv, blk.root, 100, 0, empty, 0) == 0
    assert run_co(bdrv_co_pwritev, blk.root, 100, 0, empty, 0) == 0
    assert bs.write_gen == 0 and s.calls == []


def test_io_on_node_whose_driver_was_removed(mem):
    """With bs.drv gone (as after qcow2 marks an image corrupt) reads, writes, zeroes, discards and block
    status fail with -ENOMEDIUM and a flush is a no-op."""
    blk, bs, s = mem("co", align=512, discard=True, extra={"discard": "unmap"})
    drv, bs.drv = bs.drv, None
    try:
        assert bdrv_pread(blk.root, 0, bytearray(512), 512) == -errno.ENOMEDIUM
        assert bdrv_pwrite(blk.root, 0, bytes(512)) == -errno.ENOMEDIUM
        assert bdrv_pwrite(blk.root, 1, bytes(10)) == -errno.ENOMEDIUM
        assert bdrv_pwrite_zeroes(blk.root, 0, 512) == -errno.ENOMEDIUM
        assert bdrv_pdiscard(blk.root, 0, 512) == -errno.ENOMEDIUM
        assert bdrv_flush(bs) == 0
        assert bdrv_block_status(bs, 0, 512)[0] == -errno.ENOMEDIUM
        assert blk_pread(blk, 0, bytearray(512)) == -errno.ENOMEDIUM
    finally:
        bs.drv = drv
    assert s.calls == []


@pytest.mark.parametrize("op", ["write", "discard"])
def test_driver_removed_while_request_is_in_flight(mem, op):
    """A driver removed between two fragments fails the rest of the request with -ENOMEDIUM."""
    blk, bs, s = mem("co", align=512, max_transfer=4096, max_pdiscard=4096, discard=True, latency_ns=LAT,
                     extra={"discard": "unmap"})
    drv = bs.drv

    def eject():
        bs.drv = None

    if op == "write":
        job = (0, lambda: blk_co_pwritev(blk, 0, 16 * KiB, qiov_of(bytearray(16 * KiB)), 0))
    else:
        job = (0, lambda: blk_co_pdiscard(blk, 0, 16 * KiB))
    try:
        results, _, _ = run_concurrently(job, (LAT // 2, eject))
    finally:
        bs.drv = drv
    assert results[0] == -errno.ENOMEDIUM
    assert calls(s) == [(op, 0, 4096)]


# --------------------------------------------------------------------------
# Padding: section 9 of the oracles


WRITE_PADDING = [
    # (offset, bytes, RMW reads, driver writes), request_alignment 512
    (66, 42, [(0, 512)], [(0, 512)]),
    (512, 288, [(512, 512)], [(512, 512)]),
    (800, 224, [(512, 512)], [(512, 512)]),
    (66000, 131072, [(65536, 512), (196608, 512)], [(65536, 131584)]),
    (1024, 4096, [], [(1024, 4096)]),
]


@pytest.mark.parametrize("offset, size, reads, writes", WRITE_PADDING)
def test_write_padding_oracle(mem, offset, size, reads, writes):
    """An unaligned write reads exactly the padding blocks (RMW) and writes one aligned range; other bytes survive."""
    blk, bs, s = mem("co", align=512, size=256 * KiB)
    s.data[:] = pattern(256 * KiB)
    data = bytes([0xAB]) * size
    assert blk_pwrite(blk, offset, data) == size
    assert calls(s) == [("read", o, n) for o, n in reads] + [("write", o, n) for o, n in writes]
    expected = bytearray(pattern(256 * KiB))
    expected[offset:offset + size] = data
    assert s.data == expected
    assert bs.wr_highest_offset == writes[0][0] + writes[0][1]


READ_PADDING = [
    (66, 42, (0, 512)),
    (512, 288, (512, 512)),
    (800, 224, (512, 512)),
    (66000, 131072, (65536, 131584)),
    (1024, 4096, (1024, 4096)),
]


@pytest.mark.parametrize("offset, size, driver_read", READ_PADDING)
def test_read_padding_oracle(mem, offset, size, driver_read):
    """An unaligned read is one aligned driver read; only the requested bytes reach the caller's buffer."""
    blk, bs, s = mem("co", align=512, size=256 * KiB)
    s.data[:] = pattern(256 * KiB)
    buf = bytearray(b"\xee" * (size + 64))
    qiov = QEMUIOVector([memoryview(buf)[32:32 + size]])
    assert run_co(blk_co_preadv, blk, offset, size, qiov, 0) == 0
    assert calls(s) == [("read",) + driver_read]
    assert buf[32:32 + size] == s.data[offset:offset + size]
    assert buf[:32] == b"\xee" * 32 and buf[32 + size:] == b"\xee" * 32


@pytest.mark.parametrize("offset, size, serialising, overlap", [
    (66000, 131072, True, (65536, 131584)),
    (1024, 4096, False, (1024, 4096)),
])
def test_padded_write_is_serialising_on_aligned_range(mem, offset, size, serialising, overlap):
    """While it runs, a padded write is a tracked request made serialising over its 512-byte-aligned range."""
    blk, bs, s = mem("co", align=512, size=256 * KiB, latency_ns=LAT)
    seen = []

    def look():
        seen.extend((r.offset, r.bytes, r.serialising, (r.overlap_offset, r.overlap_bytes))
                    for r in bs.tracked_requests)
        seen.append(bs.serialising_in_flight)

    run_concurrently((0, lambda: blk_co_pwritev(blk, offset, size, qiov_of(bytearray(size)), 0)),
                     (LAT // 2, look))
    assert seen == [(offset, size, serialising, overlap), int(serialising)]


@pytest.mark.parametrize("offset, size, reads, writes", [
    # head, aligned middle (zeroed by the driver) and tail
    (100, 2000, [(0, 512), (2048, 512)], [("write", 0, 512), ("write_zeroes", 512, 1536), ("write", 2048, 512)]),
    # inside one block: one merged read-modify-write
    (100, 200, [(0, 512)], [("write", 0, 512)]),
    # head and tail in two neighbouring blocks: merged into one 1 KiB read and write
    (300, 600, [(0, 1024)], [("write", 0, 1024)]),
    # head and tail with one block between them
    (300, 1000, [(0, 512), (1024, 512)], [("write", 0, 512), ("write_zeroes", 512, 512), ("write", 1024, 512)]),
    # aligned start, unaligned end: middle, then tail
    (512, 700, [(1024, 512)], [("write_zeroes", 512, 512), ("write", 1024, 512)]),
    # unaligned start, aligned end: head, then middle
    (300, 1236, [(0, 512)], [("write", 0, 512), ("write_zeroes", 512, 1024)]),
    # aligned: no RMW at all
    (1024, 4096, [], [("write_zeroes", 1024, 4096)]),
])
def test_unaligned_zero_write(mem, offset, size, reads, writes):
    """An unaligned zero write RMWs head and tail blocks as data writes and zeroes the aligned middle."""
    blk, bs, s = mem("co", align=512, size=64 * KiB, write_zeroes=True)
    s.data[:] = b"\xff" * (64 * KiB)
    assert blk_pwrite_zeroes(blk, offset, size) == 0
    assert calls(s) == [("read", o, n) for o, n in reads] + writes
    expected = bytearray(b"\xff" * (64 * KiB))
    expected[offset:offset + size] = bytes(size)
    assert s.data == expected


def test_failed_rmw_read_fails_the_write(mem):
    """When the read of a read-modify-write fails, the write fails with that error and nothing is written."""
    blk, bs, s = mem("co", align=512, fail=errno.EIO)
    assert blk_pwrite(blk, 100, b"x" * 10) == -errno.EIO
    assert calls(s) == [("read", 0, 512)]


def test_before_write_notifier_can_fail_writes_and_discards(mem):
    """A before-write notifier sees the tracked request and a non-zero answer fails the write or discard."""
    blk, bs, s = mem("co", align=512, discard=True, extra={"discard": "unmap"})
    seen = []

    def notify(notifier, req):
        seen.append((req.type, req.offset, req.bytes))
        return -errno.EACCES

    io.bdrv_add_before_write_notifier(bs, NotifierWithReturn(notify))
    assert blk_pwrite(blk, 4096, bytes(4096)) == -errno.EACCES
    assert blk_pdiscard(blk, 0, 512) == -errno.EACCES
    assert seen == [(WRITE, 4096, 4096), (BdrvTrackedRequestType.BDRV_TRACKED_DISCARD, 0, 512)]
    assert s.calls == []
    assert bs.write_gen == 2  # bumped even for failed requests, as in QEMU


# --------------------------------------------------------------------------
# Serialisation


@pytest.mark.parametrize("style", ["co", "aio", "sector"])
def test_overlapping_unaligned_writes_keep_each_others_bytes(mem, style):
    """Two concurrent unaligned writes into the same block are serialised: neither RMW loses the other's bytes."""
    blk, bs, s = mem(style, align=512, size=64 * KiB, latency_ns=LAT)
    s.data[:] = pattern(64 * KiB)
    a, b = b"A" * 100, b"B" * 100
    results, order, _ = run_concurrently(
        (0, lambda: blk_co_pwritev(blk, 100, 100, qiov_of(bytearray(a)), 0)),
        (0, lambda: blk_co_pwritev(blk, 300, 100, qiov_of(bytearray(b)), 0)))
    assert results == [0, 0] and order == [0, 1]
    # B's RMW read only starts after A's write: the two cycles do not interleave.
    assert calls(s) == [("read", 0, 512), ("write", 0, 512), ("read", 0, 512), ("write", 0, 512)]
    expected = bytearray(pattern(64 * KiB))
    expected[100:200] = a
    expected[300:400] = b
    assert s.data == expected


def test_aligned_write_waits_for_serialising_write_in_same_block(mem):
    """An aligned write into a block another request is RMW-ing waits; its bytes are not overwritten by the RMW."""
    blk, bs, s = mem("co", align=512, size=64 * KiB, latency_ns=LAT)
    s.data[:] = bytes(64 * KiB)
    results, order, _ = run_concurrently(
        (0, lambda: blk_co_pwritev(blk, 0, 100, qiov_of(bytearray(b"A" * 100)), 0)),
        (LAT // 2, lambda: blk_co_pwritev(blk, 0, 512, qiov_of(bytearray(b"B" * 512)), 0)))
    assert results == [0, 0] and order == [0, 1]
    assert s.data[:512] == b"B" * 512


def test_non_overlapping_request_does_not_wait(mem):
    """A request outside a serialising request's aligned range runs at once, beside it."""
    blk, bs, s = mem("co", align=512, size=64 * KiB, latency_ns=LAT)
    start = now()
    results, order, times = run_concurrently(
        (0, lambda: blk_co_pwritev(blk, 100, 100, qiov_of(bytearray(100)), 0)),      # RMW: two driver calls
        (0, lambda: blk_co_pwritev(blk, 512, 512, qiov_of(bytearray(512)), 0)),      # the next block
        (0, lambda: blk_co_preadv(blk, 1024, 100, qiov_of(bytearray(100)), 0)))      # a read further on
    assert results == [0, 0, 0]
    assert order == [1, 2, 0]
    assert times[1] - start == LAT and times[2] - start == LAT and times[0] - start == 2 * LAT


def test_read_waits_for_overlapping_serialising_write(mem):
    """A read overlapping an unaligned write in progress waits for it and sees the new bytes."""
    blk, bs, s = mem("co", align=512, size=64 * KiB, latency_ns=LAT)
    buf = bytearray(512)
    results, order, _ = run_concurrently(
        (0, lambda: blk_co_pwritev(blk, 10, 20, qiov_of(bytearray(b"W" * 20)), 0)),
        (LAT // 2, lambda: blk_co_preadv(blk, 0, 512, qiov_of(buf), 0)))
    assert results == [0, 0] and order == [0, 1]
    assert buf[10:30] == b"W" * 20


def test_wait_serialising_requests_skips_a_request_waiting_for_us():
    """wait_serialising_requests does not wait for a request whose waiting_for is set: that would deadlock."""
    blk = blk_new_open(None, None, memdrv_options("co", align=512), BDRV_O_RDWR)
    bs = blk_bs(blk)
    reqs, log = {}, []

    def owner(_):
        reqs["a"] = tracked_request_begin(bs, 0, 512, WRITE)
        mark_request_serialising(reqs["a"], 512)
        qemu_coroutine_yield()          # holds the range until the test ends it
        tracked_request_end(reqs["a"])

    def other(_):
        reqs["b"] = req = tracked_request_begin(bs, 100, 10, WRITE)
        mark_request_serialising(req, 512)
        reqs["a"].waiting_for = req     # as if a were queued behind b
        log.append(("skip", wait_serialising_requests(req)))
        reqs["a"].waiting_for = None    # now a waits for nobody: b must wait for it
        log.append(("wait", wait_serialising_requests(req)))
        tracked_request_end(req)

    a = qemu_coroutine_create(owner, None)
    qemu_coroutine_enter(a)
    qemu_coroutine_enter(qemu_coroutine_create(other, None))
    assert log == [("skip", False)]
    qemu_coroutine_enter(a)             # a ends and wakes b
    AIO_WAIT_WHILE(None, lambda: len(log) < 2)
    assert log == [("skip", False), ("wait", True)]
    assert bs.tracked_requests == [] and bs.serialising_in_flight == 0
    blk_unref(blk)


def test_two_serialising_requests_waiting_for_each_other_do_not_deadlock(mem, monkeypatch):
    """B (in its RMW) is waited for by A; when B serialises again it finds A overlapping and goes on."""
    blk, bs, s = mem("co", align=512, size=64 * KiB, latency_ns=LAT)
    skipped = []
    real = io.wait_serialising_requests

    def spy(req):
        skipped.extend((req.trace_name, r.trace_name) for r in req.bs.tracked_requests
                       if r is not req and r.waiting_for is req and r.serialising)
        return real(req)

    monkeypatch.setattr(io, "wait_serialising_requests", spy)
    results, order, _ = run_concurrently(
        (0, lambda: blk_co_pwritev(blk, 100, 100, qiov_of(bytearray(b"B" * 100)), 0)),
        (LAT // 2, lambda: blk_co_pwritev(blk, 300, 100, qiov_of(bytearray(b"A" * 100)), 0)))
    assert results == [0, 0] and order == [0, 1]
    assert skipped == [("write[100,+100]", "write[300,+100]")]  # the rule was needed
    assert s.data[100:200] == b"B" * 100 and s.data[300:400] == b"A" * 100


# --------------------------------------------------------------------------
# max_transfer, reads past the end, callback styles


@pytest.mark.parametrize("style", ALL_STYLES)
def test_max_transfer_fragments_reads_and_writes(mem, style):
    """With max_transfer 64 KiB a 200 KiB request becomes 64, 64, 64 and 8 KiB driver calls, reads and writes."""
    blk, bs, s = mem(style, align=512, size=256 * KiB, max_transfer=64 * KiB)
    data = bytes([0x5A]) * (200 * KiB)
    assert blk_pwrite(blk, 0, data) == 200 * KiB
    buf = bytearray(200 * KiB)
    assert blk_pread(blk, 0, buf) == 200 * KiB
    pieces = [(0, 64 * KiB), (64 * KiB, 64 * KiB), (128 * KiB, 64 * KiB), (192 * KiB, 8 * KiB)]
    assert calls(s) == [("write", o, n) for o, n in pieces] + [("read", o, n) for o, n in pieces]
    assert buf == data and s.data[:200 * KiB] == data


def test_read_past_end_of_node_is_zero_filled(mem):
    """Below the BlockBackend a read past the node's end gets zeroes there; the driver sees only the node's range."""
    blk, bs, s = mem("co", align=512, size=64 * KiB, max_transfer=1024)
    s.data[:] = b"\x11" * (64 * KiB)
    buf = bytearray(b"\xff" * 4096)
    assert bdrv_pread(blk.root, 64 * KiB - 1536, buf, 4096) == 4096
    assert buf == b"\x11" * 1536 + bytes(4096 - 1536)
    assert calls(s) == [("read", 64 * KiB - 1536, 1024), ("read", 64 * KiB - 512, 512)]
    s.calls.clear()
    buf = bytearray(b"\xff" * 1000)
    assert bdrv_pread(blk.root, 80 * KiB + 3, buf, 1000) == 1000
    assert buf == bytes(1000) and s.calls == []
    assert blk_pread(blk, 64 * KiB - 512, bytearray(1024)) == -errno.EIO  # the BlockBackend refuses it


def _same_story(blk, bs, s):
    """Unaligned writes, a zero write, a fragmented write and reads; returns every read's bytes."""
    out = []
    assert blk_pwrite(blk, 0, pattern(16 * KiB, 5)) == 16 * KiB
    assert blk_pwrite(blk, 100, b"x" * 700) == 700
    assert blk_pwrite(blk, 5000, pattern(9000, 9)) == 9000
    assert blk_pwrite_zeroes(blk, 777, 3333) == 0
    assert blk_pwrite(blk, 0, pattern(20 * KiB, 2), flags=BDRV_REQ_FUA) == 20 * KiB
    for offset, size in [(0, 32 * KiB), (3, 5), (4000, 9001)]:
        buf = bytearray(size)
        assert blk_pread(blk, offset, buf) == size
        out.append(bytes(buf))
    return out, bytes(s.data)


def test_every_callback_style_gives_the_same_bytes(mem):
    """The same requests through co, part, aio, sector, sector-flags and aio-sector drivers give the same bytes."""
    results = {style: _same_story(*mem(style, align=512, size=32 * KiB, max_transfer=8 * KiB))
               for style in ALL_STYLES}
    first = results["co"]
    assert all(r == first for r in results.values())
    assert first[1] == pattern(20 * KiB, 2) + bytes(12 * KiB)


def test_aio_driver_completing_at_once_or_failing_to_start():
    """An AIO-style completion before the hook returns is taken as is; a hook returning no AIOCB is -EIO."""
    blk = blk_new_open(None, None, {"driver": "test-io-eager-aio", "discard": "unmap"}, BDRV_O_RDWR)
    try:
        buf = bytearray(100)
        assert blk_pread(blk, 10, buf) == 100 and buf == b"\x33" * 100
        assert blk_pwrite(blk, 0, bytes(512)) == -errno.EIO
        assert blk_pdiscard(blk, 0, 512) == -errno.EIO
        assert blk_flush(blk) == -errno.ENOSPC   # the write above bumped write_gen, so the disk flush ran
    finally:
        blk_unref(blk)


# --------------------------------------------------------------------------
# FUA and write-through


@pytest.mark.parametrize("style", ["co", "part", "aio", "sector-flags"])
def test_fua_reaches_a_driver_that_supports_it(mem, style):
    """With a driver that honours FUA the flag reaches every fragment and no flush is issued."""
    blk, bs, s = mem(style, align=512, size=256 * KiB, max_transfer=64 * KiB, fua=True)
    assert blk_pwrite(blk, 0, bytes(200 * KiB), flags=BDRV_REQ_FUA) == 200 * KiB
    assert [c[3] for c in s.calls] == [BDRV_REQ_FUA] * 4
    assert s.flushes == 0


@pytest.mark.parametrize("style", ["co", "aio", "sector", "aio-sector"])
def test_fua_without_driver_support_flushes_once_after_last_fragment(mem, style):
    """Without FUA support a fragmented FUA write is written without the flag and flushed once, at the end."""
    blk, bs, s = mem(style, align=512, size=256 * KiB, max_transfer=64 * KiB)
    assert blk_pwrite(blk, 0, bytes(200 * KiB), flags=BDRV_REQ_FUA) == 200 * KiB
    assert [(c[0], c[3]) for c in s.calls] == [("write", 0)] * 4 + [("flush", 0)]
    assert blk_pwrite(blk, 512, bytes(512), flags=BDRV_REQ_FUA) == 512
    assert s.flushes == 2


def test_emulated_fua_flush_is_not_skipped_after_a_flush(mem):
    """An emulated FUA right after an explicit flush still reaches the disk (write_gen advances first)."""
    blk, bs, s = mem("co", align=512)
    assert blk_pwrite(blk, 0, bytes(512)) == 512
    assert blk_flush(blk) == 0 and s.flushes == 1
    assert blk_pwrite(blk, 0, b"\x01" * 512, flags=BDRV_REQ_FUA) == 512
    assert s.flushes == 2
    assert calls(s)[-2:] == [("write", 0, 512), ("flush", 0, 0)]


@pytest.mark.parametrize("fua, flushes_per_write, flags", [(True, 0, BDRV_REQ_FUA), (False, 1, 0)])
def test_write_cache_off_adds_fua(mem, fua, flushes_per_write, flags):
    """blk_set_enable_write_cache(blk, False) makes every write FUA: native, or one flush per write."""
    blk, bs, s = mem("co", align=512, fua=fua, write_zeroes=True)
    blk_set_enable_write_cache(blk, False)
    for i in range(3):
        assert blk_pwrite(blk, i * 4096, b"\x07" * 4096) == 4096
    assert [c[3] for c in s.calls if c[0] == "write"] == [flags] * 3
    assert s.flushes == 3 * flushes_per_write
    assert blk_pwrite_zeroes(blk, 0, 64 * KiB) == 0        # zero writes too
    assert s.flushes == 4 * flushes_per_write


def test_fua_zero_write_through_bounce_buffer_flushes_once(mem):
    """A FUA zero write that falls back to bounce-buffer writes in several chunks is flushed once, at the end."""
    blk, bs, s = mem("co", align=512, size=64 * KiB, max_transfer=4096, write_zeroes=True,
                     write_zeroes_notsup=True)
    s.data[:] = b"\xff" * (64 * KiB)
    assert blk_pwrite_zeroes(blk, 0, 16 * KiB, BDRV_REQ_FUA) == 0
    assert [c[0] for c in s.calls if c[0] != "write_zeroes"] == ["write"] * 4 + ["flush"]
    assert all(c[3] == 0 for c in s.calls if c[0] == "write")
    assert s.data[:16 * KiB] == bytes(16 * KiB)


# --------------------------------------------------------------------------
# Write zeroes


def test_write_zeroes_honours_alignment_and_max(mem):
    """Driver zero writes: a head up to pwrite_zeroes_alignment, chunks of max_pwrite_zeroes, an unaligned tail."""
    blk, bs, s = mem("co", align=512, size=64 * KiB, write_zeroes=True, pwrite_zeroes_alignment=4096,
                     max_pwrite_zeroes=8192)
    s.data[:] = b"\xff" * (64 * KiB)
    assert blk_pwrite_zeroes(blk, 1024, 30000) == 0
    assert calls(s) == [("read", 30720, 512),                      # RMW of the request's unaligned tail block
                        ("write_zeroes", 1024, 3072), ("write_zeroes", 4096, 8192),
                        ("write_zeroes", 12288, 8192), ("write_zeroes", 20480, 8192),
                        ("write_zeroes", 28672, 2048), ("write", 30720, 512)]
    expected = bytearray(b"\xff" * (64 * KiB))
    expected[1024:31024] = bytes(30000)
    assert s.data == expected


def test_write_zeroes_enotsup_falls_back_to_bounce_buffer(mem):
    """A driver answering -ENOTSUP gets zeroed bounce-buffer writes of at most max_transfer instead."""
    blk, bs, s = mem("co", align=512, size=64 * KiB, max_transfer=4096, write_zeroes=True,
                     write_zeroes_notsup=True)
    s.data[:] = b"\xff" * (64 * KiB)
    assert blk_pwrite_zeroes(blk, 1024, 10240) == 0
    assert calls(s) == [("write_zeroes", 1024, 10240), ("write", 1024, 4096),
                        ("write_zeroes", 5120, 6144), ("write", 5120, 4096),
                        ("write_zeroes", 9216, 2048), ("write", 9216, 2048)]
    assert s.data[1024:11264] == bytes(10240) and s.data[11264:] == b"\xff" * (64 * KiB - 11264)


@pytest.mark.parametrize("notsup", [False, True])
def test_write_zeroes_no_fallback_is_enotsup(mem, notsup):
    """With NO_FALLBACK, a driver that cannot promise efficient zeroes makes the request fail with -ENOTSUP."""
    blk, bs, s = mem("co", align=512, size=64 * KiB, write_zeroes=True, write_zeroes_notsup=notsup)
    s.data[:] = b"\xff" * (64 * KiB)
    assert blk_pwrite_zeroes(blk, 0, 4096, BDRV_REQ_NO_FALLBACK) == -errno.ENOTSUP
    assert s.data == b"\xff" * (64 * KiB)
    assert "write" not in [c[0] for c in s.calls]


@pytest.mark.parametrize("discard, flags", [(None, 0), ("ignore", 0), ("unmap", BDRV_REQ_MAY_UNMAP)])
def test_may_unmap_needs_discard_unmap(mem, discard, flags):
    """bdrv_pwrite_zeroes keeps BDRV_REQ_MAY_UNMAP only on a node opened with discard=unmap."""
    blk, bs, s = mem("co", align=512, write_zeroes=True, extra={"discard": discard} if discard else None)
    assert bdrv_pwrite_zeroes(blk.root, 0, 4096, BDRV_REQ_MAY_UNMAP) == 0
    assert s.calls == [("write_zeroes", 0, 4096, flags)]


@pytest.mark.parametrize("mode, extra, flags", [
    ("on", {}, 0),
    ("unmap", {"discard": "unmap"}, BDRV_REQ_MAY_UNMAP),
])
def test_detect_zeroes_turns_zero_data_into_zero_write(mem, mode, extra, flags):
    """With detect-zeroes=on/unmap an all-zero data write becomes a zero write; other data is written as is."""
    blk, bs, s = mem("co", align=512, write_zeroes=True, extra={"detect-zeroes": mode, **extra})
    s.data[:8192] = b"\xff" * 8192
    assert blk_pwrite(blk, 0, bytes(4096)) == 4096
    assert blk_pwrite(blk, 4096, b"\x00" * 4095 + b"\x01") == 4096
    assert s.calls == [("write_zeroes", 0, 4096, flags), ("write", 4096, 4096, 0)]
    assert s.data[:4096] == bytes(4096)


def test_detect_zeroes_needs_driver_zero_hook(mem):
    """detect-zeroes leaves a zero write alone on a driver without bdrv_co_pwrite_zeroes."""
    blk, bs, s = mem("co", align=512, extra={"detect-zeroes": "on"})
    assert blk_pwrite(blk, 0, bytes(4096)) == 4096
    assert calls(s) == [("write", 0, 4096)]


def test_make_zero_skips_what_reads_as_zero(mem):
    """bdrv_make_zero zeroes only the ranges block status does not already report as zero."""
    blk, bs, s = mem("co", align=512, size=64 * KiB, write_zeroes=True, block_status=True)
    assert blk_pwrite(blk, 8192, b"\x01" * 4096) == 4096
    s.calls.clear()
    assert bdrv_make_zero(blk.root) == 0
    assert calls(s) == [("write_zeroes", 8192, 4096)]
    assert s.data == bytes(64 * KiB)


def test_invalid_zero_limits_raise_instead_of_looping(mem):
    """max_pwrite_zeroes below request_alignment is an assertion (as in QEMU), not an endless loop."""
    blk, bs, s = mem("co", align=512, write_zeroes=True, max_pwrite_zeroes=100)
    with pytest.raises(AssertionError, match="max_pwrite_zeroes"):
        bdrv_pwrite_zeroes(blk.root, 0, 4096)


# --------------------------------------------------------------------------
# Discard


@pytest.mark.parametrize("discard_opt, has_hook", [(None, True), ("ignore", True), ("unmap", False)])
def test_discard_is_a_noop_unless_unmap_and_driver_support(mem, discard_opt, has_hook):
    """Without discard=unmap, or without a driver discard hook, a discard returns 0 and changes nothing."""
    blk, bs, s = mem("co", align=512, size=64 * KiB, discard=has_hook,
                     extra={"discard": discard_opt} if discard_opt else None)
    s.data[:] = b"\xff" * (64 * KiB)
    assert blk_pdiscard(blk, 0, 8192) == 0
    assert s.calls == [] and s.data == b"\xff" * (64 * KiB) and bs.write_gen == 0


def test_discard_splits_at_alignment_and_max(mem):
    """Discard passes everything down: small pieces to reach pdiscard_alignment, max_pdiscard chunks, the tail."""
    blk, bs, s = mem("co", align=512, size=64 * KiB, discard=True, pdiscard_alignment=4096,
                     max_pdiscard=8192, extra={"discard": "unmap"})
    s.data[:] = b"\xff" * (64 * KiB)
    assert blk_pdiscard(blk, 1000, 20000) == 0
    assert calls(s) == [("discard", 1000, 24), ("discard", 1024, 3072), ("discard", 4096, 8192),
                        ("discard", 12288, 8192), ("discard", 20480, 512), ("discard", 20992, 8)]
    expected = bytearray(b"\xff" * (64 * KiB))
    expected[1000:21000] = bytes(20000)
    assert s.data == expected
    assert bs.write_gen == 1 and bs.wr_highest_offset == 0 and bs.total_sectors == 128


def test_discard_ignores_enotsup_but_not_other_errors(mem):
    """-ENOTSUP from the driver counts as success for every piece; another error stops the discard."""
    blk, bs, s = mem("co", align=512, discard=True, max_pdiscard=4096, fail=errno.ENOTSUP,
                     extra={"discard": "unmap"})
    assert blk_pdiscard(blk, 0, 16 * KiB) == 0
    assert len(s.calls) == 4
    s.fail = errno.EIO
    s.calls.clear()
    assert blk_pdiscard(blk, 0, 16 * KiB) == -errno.EIO
    assert len(s.calls) == 1


# --------------------------------------------------------------------------
# Flush


def test_flush_skips_disk_when_nothing_was_written(mem):
    """The disk flush is skipped when nothing was written since the last successful one (write_gen/flushed_gen)."""
    blk, bs, s = mem("co", align=512)
    assert blk_flush(blk) == 0 and s.flushes == 0
    assert blk_pwrite(blk, 0, bytes(512)) == 512
    assert bs.write_gen != bs.flushed_gen
    assert blk_flush(blk) == 0 and s.flushes == 1
    assert bs.write_gen == bs.flushed_gen
    assert blk_flush(blk) == 0 and s.flushes == 1


def test_flush_recurses_into_children_written_through(mem):
    """Flushing a format node flushes its file child; a backing child (read only) is not flushed."""
    blk = blk_new_open(None, None, {"driver": "raw", "file": memdrv_options("co", size=64 * KiB)}, BDRV_O_RDWR)
    try:
        file_state = blk_bs(blk).file.bs.opaque
        assert blk_pwrite(blk, 0, b"\x01" * 512) == 512
        assert blk_flush(blk) == 0 and file_state.flushes == 1
        assert blk_flush(blk) == 0 and file_state.flushes == 1
    finally:
        blk_unref(blk)

    base_blk, base, base_state = mem("co", size=4 * CL)
    top_blk = blk_new_open(None, None, {"driver": "test-io-overlay"}, BDRV_O_RDWR)
    try:
        bdrv_set_backing_hd(blk_bs(top_blk), base)
        assert blk_pwrite(base_blk, 0, b"\x02" * 512) == 512   # the backing node has unflushed data
        assert blk_flush(top_blk) == 0
        assert base_state.flushes == 0
        assert blk_flush(base_blk) == 0 and base_state.flushes == 1
    finally:
        blk_unref(top_blk)


def test_flush_error_propagates_and_is_retried(mem):
    """A failing disk flush below a format node fails the flush; flushed_gen stays, so the next flush retries."""
    blk = blk_new_open(None, None, {"driver": "raw", "file": memdrv_options("co", fail_flush=errno.EIO)},
                       BDRV_O_RDWR)
    try:
        file_bs = blk_bs(blk).file.bs
        assert blk_pwrite(blk, 0, bytes(512)) == 512
        assert blk_flush(blk) == -errno.EIO
        assert file_bs.flushed_gen != file_bs.write_gen
        file_bs.opaque.fail_flush = 0
        assert blk_flush(blk) == 0
        assert file_bs.opaque.flushes == 2 and file_bs.flushed_gen == file_bs.write_gen
    finally:
        blk_unref(blk)


def test_concurrent_flushes_serialise(mem, monkeypatch):
    """Flushes on one node run one at a time; one that began after a write completed flushes the disk again."""
    blk, bs, s = mem("co", align=512, latency_ns=LAT)
    spans = []
    drv = type(bs.drv)
    real = drv.bdrv_co_flush_to_disk

    def timed(self, bs_):
        start = now()
        ret = real(self, bs_)
        spans.append((start, now()))
        return ret

    monkeypatch.setattr(drv, "bdrv_co_flush_to_disk", timed)
    start = now()
    # write A   [0, L]
    # write B       [L/2, 3L/2]
    # flush 0          [9L/8 ......... 17L/8]            A is written: flushes the disk
    # flush 1               (7L/4) waits  [17L/8 ... 25L/8]   B was written since flush 0 began
    # flush 2               (7L/4) waits ..................   nothing new since flush 1: no disk flush
    results, order, _ = run_concurrently(
        (0, lambda: blk_co_pwritev(blk, 0, 512, qiov_of(bytearray(512)), 0)),
        (9 * LAT // 8, lambda: blk_co_flush(blk)),
        (LAT // 2, lambda: blk_co_pwritev(blk, 512, 512, qiov_of(bytearray(512)), 0)),
        (7 * LAT // 4, lambda: blk_co_flush(blk)),
        (7 * LAT // 4, lambda: blk_co_flush(blk)))
    assert results == [0] * 5
    assert order == [0, 2, 1, 3, 4]
    assert [(a - start, b - start) for a, b in spans] == [(9 * LAT // 8, 17 * LAT // 8),
                                                          (17 * LAT // 8, 25 * LAT // 8)]
    assert s.flushes == 2 and bs.flushed_gen == bs.write_gen


# --------------------------------------------------------------------------
# Block status


def test_block_status_with_memdrv_map(mem):
    """test-mem's block status: zero until written, data per 4 KiB block written, zero again once zeroed."""
    blk, bs, s = mem("co", align=512, size=64 * KiB, write_zeroes=True, block_status=True)
    zero = BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED | BDRV_BLOCK_OFFSET_VALID
    data = BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED | BDRV_BLOCK_OFFSET_VALID
    assert bdrv_block_status(bs, 0, 64 * KiB) == (zero | BDRV_BLOCK_EOF, 64 * KiB, 0, bs)
    assert blk_pwrite(blk, 8192 + 100, b"\x01" * 10) == 10
    assert bdrv_block_status(bs, 0, 64 * KiB) == (zero, 8192, 0, bs)
    assert bdrv_block_status(bs, 8192 + 100, 64 * KiB) == (data, 4096 - 100, 8192 + 100, bs)
    assert bdrv_block_status(bs, 12288, 64 * KiB) == (zero | BDRV_BLOCK_EOF, 52 * KiB, 12288, bs)
    assert bdrv_block_status(bs, 64 * KiB, 512)[:2] == (BDRV_BLOCK_EOF, 0)
    assert bdrv_is_allocated(bs, 0, 64 * KiB) == (1, 8192)
    assert blk_pwrite_zeroes(blk, 8192, 4096) == 0
    assert bdrv_block_status(bs, 0, 64 * KiB)[:2] == (zero | BDRV_BLOCK_EOF, 64 * KiB)


@pytest.mark.parametrize("read_zeroes, expected, allocated", [
    ("on", BDRV_BLOCK_ZERO | BDRV_BLOCK_OFFSET_VALID | BDRV_BLOCK_ALLOCATED, 1),
    ("off", BDRV_BLOCK_OFFSET_VALID, 0),
])
def test_block_status_of_null_co(read_zeroes, expected, allocated):
    """null-co reports zeroes (allocated) with read-zeroes=on and nothing (unallocated) without."""
    blk = blk_new_open(None, None, {"driver": "null-co", "size": 1 << 20, "read-zeroes": read_zeroes}, BDRV_O_RDWR)
    try:
        bs = blk_bs(blk)
        assert bdrv_block_status(bs, 4096, 8192) == (expected, 8192, 4096, bs)
        assert bdrv_block_status(bs, (1 << 20) - 512, 8192)[:2] == (expected | BDRV_BLOCK_EOF, 512)
        assert bdrv_is_allocated(bs, 0, 4096) == (allocated, 4096)
    finally:
        blk_unref(blk)


def test_block_status_without_driver_hook(mem):
    """A protocol driver without a block-status hook is all data, mapped one to one."""
    blk, bs, s = mem("co", size=64 * KiB)
    flags = BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED | BDRV_BLOCK_OFFSET_VALID
    assert bdrv_block_status(bs, 100, 1000) == (flags, 1000, 100, bs)
    assert bdrv_block_status(bs, 60 * KiB, 8 * KiB) == (flags | BDRV_BLOCK_EOF, 4 * KiB, 60 * KiB, bs)


def test_block_status_of_a_chain(chain):
    """An unallocated overlay cluster is not allocated there but is allocated in the chain (from the backing)."""
    blk, top, base = chain
    top.opaque.allocated.add(1)
    assert bdrv_is_allocated(top, 0, 4 * CL) == (0, CL)
    assert bdrv_is_allocated(top, CL, 3 * CL) == (1, CL)
    assert bdrv_is_allocated_above(top, None, 0, 4 * CL) == (1, 4 * CL)
    assert bdrv_is_allocated_above(top, base, 0, 4 * CL) == (0, CL)
    flags, pnum, _, file = bdrv_block_status_above(top, None, 0, 4 * CL)
    assert (flags & (BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED), pnum, file) == \
        (BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED, CL, base)


# --------------------------------------------------------------------------
# Copy-on-read


def test_copy_on_read_copies_whole_clusters(chain):
    """With copy-on-read a read of unallocated data copies whole clusters from the backing node, once."""
    blk, top, base = chain
    bdrv_enable_copy_on_read(top)
    try:
        buf = bytearray(100)
        assert blk_pread(blk, CL + 10, buf) == 100
        assert buf == pattern(4 * CL, 3)[CL + 10:CL + 110]
        assert top.opaque.calls == [("read", CL, CL), ("write", CL, CL)]
        assert top.opaque.allocated == {1}
        assert top.opaque.data[CL:2 * CL] == pattern(4 * CL, 3)[CL:2 * CL]
        top.opaque.calls.clear()
        assert blk_pread(blk, CL + 10, buf) == 100
        assert top.opaque.calls == [("read", CL + 10, 100)]
    finally:
        bdrv_disable_copy_on_read(top)


def test_copy_on_read_stops_at_the_end_of_the_request(chain):
    """A cluster reaching past the request is copied whole but only the requested bytes reach the caller."""
    blk, top, base = chain
    top.opaque.allocated.add(1)
    top.opaque.data[CL:2 * CL] = b"\xee" * CL
    bdrv_enable_copy_on_read(top)
    try:
        # Unallocated then allocated, the allocated cluster reaching far past the request.
        buf = bytearray(8192)
        assert blk_pread(blk, CL - 4096, buf) == 8192
        assert buf == pattern(4 * CL, 3)[CL - 4096:CL] + b"\xee" * 4096
        assert top.opaque.calls == [("read", 0, CL), ("write", 0, CL), ("read", CL, 4096)]
        # An unallocated cluster copied into a vector bigger than the request: the rest stays untouched.
        guard = bytearray(b"\x55" * 8192)
        qiov = QEMUIOVector([memoryview(guard)])
        assert run_co(bdrv_co_preadv_part, blk.root, 2 * CL, 4096, qiov, 0, 0) == 0
        assert guard == pattern(4 * CL, 3)[2 * CL:2 * CL + 4096] + b"\x55" * 4096
        assert top.opaque.allocated == {0, 1, 2}
    finally:
        bdrv_disable_copy_on_read(top)


# --------------------------------------------------------------------------
# A driver hook that raises


def _flush_after_a_write(blk):
    blk_bs(blk).write_gen += 1  # as if something had been written, so the disk flush runs
    return blk_flush(blk)


@pytest.mark.parametrize("name, call, hook", [
    ("read", lambda blk: blk_pread(blk, 0, bytearray(512)), "bdrv_co_preadv"),
    ("write", lambda blk: blk_pwrite(blk, 0, bytes(512)), "bdrv_co_pwritev"),
    ("zeroes", lambda blk: blk_pwrite_zeroes(blk, 0, 512), "bdrv_co_pwrite_zeroes"),
    ("discard", lambda blk: blk_pdiscard(blk, 0, 512), "bdrv_co_pdiscard"),
    ("flush", lambda blk: _flush_after_a_write(blk), "flush"),
    ("status", lambda blk: bdrv_block_status(blk_bs(blk), 0, 512)[0], "bdrv_co_block_status"),
])
def test_driver_exception_becomes_eio(capsys, name, call, hook):
    """A Python exception from a driver hook fails the request with -EIO, is kept and is reported on stderr."""
    blk = blk_new_open(None, None, {"driver": "test-io-raiser", "discard": "unmap"}, BDRV_O_RDWR)
    bs = blk_bs(blk)
    try:
        assert call(blk) == -errno.EIO
        assert bs.last_driver_exception is bs.opaque.exc
        err = capsys.readouterr().err
        assert (f"driver 'test-io-raiser' on node '{bs.node_name}': {hook} raised RuntimeError: "
                f"raised by the test driver; the request fails with -EIO") in err
        assert bs.tracked_requests == [] and bs.in_flight == 0
    finally:
        bs.opaque.exc = None
        blk_unref(blk)


def test_driver_assertion_is_not_swallowed():
    """An AssertionError from a driver hook (a broken contract) propagates instead of becoming -EIO."""
    blk = blk_new_open(None, None, {"driver": "test-io-raiser"}, BDRV_O_RDWR)
    bs = blk_bs(blk)
    bs.opaque.exc = AssertionError("contract")
    try:
        with pytest.raises(AssertionError, match="contract"):
            bdrv_pwrite_zeroes(blk.root, 0, 512)
        assert bs.tracked_requests == [] and bs.in_flight == 0
    finally:
        bs.opaque.exc = None
        blk_unref(blk)
