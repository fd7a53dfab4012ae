"""A conformance kit for block drivers: the contracts QEMU's block layer relies on, checked against a byte-array model.

Use it from a driver's own test suite::

    from qblock.testing.conformance import DriverUnderTest, run_conformance, CHECKS

    def make(tmp_path):            # fresh storage for every check
        return {"driver": "xor", "key": "0x5a", "file.driver": "null-co", ...}

    def test_conformance(tmp_path):
        report = run_conformance(DriverUnderTest(lambda: make(tmp_path)))
        assert report.ok, report.text()

or one pytest case per contract with ``pytest.mark.parametrize("check", CHECKS, ids=...)``
and :func:`run_check`.

Each check opens a fresh BlockBackend from the options factory and drives
the node the way devices and tools do; a failure names the QEMU contract it
breaks (e.g. "bdrv_co_preadv fills exactly bytes of qiov with the data last
written").  The checks: reads and writes against a model (aligned,
unaligned, vectored, across max_transfer), write-zeroes with and without
MAY_UNMAP, discard (advisory: never touches bytes outside the range), FUA
writes, flush, block status consistent with the data, concurrent
overlapping writes, bad offsets, read-only behaviour, length, and data
surviving a close and a new open (when the storage is persistent).
"""
from __future__ import annotations

import errno
import random
from typing import Callable

import attrs

from qblock.block.block_backend import (
    BlockBackend,
    blk_bs,
    blk_co_pwritev,
    blk_flush,
    blk_getlength,
    blk_new_open,
    blk_pdiscard,
    blk_pread,
    blk_preadv,
    blk_pwrite,
    blk_pwrite_zeroes,
    blk_pwritev,
    blk_unref,
)
from qblock.block.driver import (
    BDRV_BLOCK_ZERO,
    BDRV_O_RDWR,
    BDRV_REQ_FUA,
    BDRV_REQ_MAY_UNMAP,
)
from qblock.block.graph import bdrv_get_aio_context
from qblock.block.io import bdrv_block_status
from qblock.util.aio import AIO_WAIT_WHILE
from qblock.util.coroutine import qemu_coroutine_create
from qblock.util.iov import QEMUIOVector
from qblock.util.error import Error

__all__ = ["DriverUnderTest", "CheckResult", "Report", "CHECKS", "run_check", "run_conformance"]


@attrs.define
class DriverUnderTest:
    """How to open the driver under test.

    ``options`` returns the options of a node on fresh storage each time it is
    called (unless ``persistent``: then the same storage, for the reopen check).
    ``size`` limits how much of the node the checks use.
    """

    options: Callable[[], dict]
    persistent: bool = False
    size: int = 1 << 20
    discard_zeroes: bool = False   # a discarded range must read back as zeroes
    stores_data: bool = True       # False for drivers like null-co: data checks are skipped
    seed: int = 1

    def open(self, flags: int = BDRV_O_RDWR, options: dict | None = None) -> BlockBackend:
        opts = dict(options if options is not None else self.options())
        opts.setdefault("discard", "unmap")
        return blk_new_open(None, None, opts, flags)


@attrs.define
class CheckResult:
    name: str
    contract: str
    passed: bool
    detail: str = ""


@attrs.define
class Report:
    results: list[CheckResult]

    @property
    def ok(self) -> bool:
        return all(r.passed for r in self.results)

    def text(self) -> str:
        lines = []
        for r in self.results:
            mark = "ok  " if r.passed else "FAIL"
            lines.append(f"{mark} {r.name}: {r.contract}" + (f"\n       {r.detail}" if r.detail else ""))
        return "\n".join(lines)


class ContractBroken(AssertionError):
    pass


def _expect(cond: bool, detail: str) -> None:
    if not cond:
        raise ContractBroken(detail)


def _model_of(blk: BlockBackend, size: int) -> bytearray:
    buf = bytearray(size)
    ret = blk_pread(blk, 0, buf)
    _expect(ret == size, f"reading the initial content failed: {ret}")
    return buf


def _compare(blk: BlockBackend, model: bytearray, what: str) -> None:
    buf = bytearray(len(model))
    ret = blk_pread(blk, 0, buf)
    _expect(ret == len(model), f"{what}: read failed with {ret}")
    if buf != model:
        off = next(i for i in range(len(model)) if buf[i] != model[i])
        raise ContractBroken(f"{what}: first difference at offset {off}: "
                             f"read {buf[off]:#04x}, expected {model[off]:#04x}")


# --------------------------------------------------------------------------
# The checks


def check_rw_model(d: DriverUnderTest) -> None:
    """bdrv_co_preadv/pwritev: every read returns the bytes last written, at any offset and length."""
    blk = d.open()
    try:
        size = min(d.size, blk_getlength(blk))
        model = _model_of(blk, size)
        rng = random.Random(d.seed)
        for i in range(60):
            off = rng.randrange(size)
            n = rng.randrange(1, min(size - off, 70000) + 1)
            data = bytes([(i * 7 + 1) & 0xFF]) * n
            ret = blk_pwrite(blk, off, data)
            _expect(ret == n, f"write [{off}, +{n}) returned {ret}")
            model[off:off + n] = data
            roff = rng.randrange(size)
            rn = rng.randrange(1, min(size - roff, 70000) + 1)
            buf = bytearray(rn)
            _expect(blk_pread(blk, roff, buf) == rn, f"read [{roff}, +{rn}) failed")
            _expect(buf == model[roff:roff + rn], f"read [{roff}, +{rn}) after write [{off}, +{n}) differs")
        _compare(blk, model, "final content")
    finally:
        blk_unref(blk)


def check_vectored(d: DriverUnderTest) -> None:
    """A request made of many buffers is one request: every buffer is filled in order."""
    blk = d.open()
    try:
        bufs = [bytearray([i + 1]) * (100 + i) for i in range(40)]
        total = sum(len(b) for b in bufs)
        ret = blk_pwritev(blk, 777, QEMUIOVector([memoryview(b) for b in bufs], len(bufs)))
        _expect(ret == 0, f"vectored write returned {ret}")
        out = [bytearray(len(b)) for b in bufs]
        ret = blk_preadv(blk, 777, QEMUIOVector([memoryview(b) for b in out], len(out)))
        _expect(ret == 0 and out == bufs, f"vectored read-back differs (ret {ret}, {total} bytes)")
    finally:
        blk_unref(blk)


def check_large_request(d: DriverUnderTest) -> None:
    """Requests larger than max_transfer are split by the block layer and still land whole."""
    blk = d.open()
    try:
        size = min(d.size, blk_getlength(blk))
        n = min(size - 512, 3 * max(blk_bs(blk).bl.max_transfer, 65536) + 4096)
        data = bytes(range(256)) * (n // 256) + bytes(n % 256)
        _expect(blk_pwrite(blk, 512, data) == n, "large write failed")
        buf = bytearray(n)
        _expect(blk_pread(blk, 512, buf) == n and buf == data, "large read-back differs")
    finally:
        blk_unref(blk)


def check_write_zeroes(d: DriverUnderTest) -> None:
    """bdrv_co_pwrite_zeroes: the range reads as zeroes afterwards, with or without MAY_UNMAP; nothing else changes."""
    blk = d.open()
    try:
        size = min(d.size, blk_getlength(blk))
        model = bytearray(b"\xa5" * size)
        _expect(blk_pwrite(blk, 0, model) == size, "fill failed")
        for off, n, flags in ((4096, 65536, 0), (100, 3000, BDRV_REQ_MAY_UNMAP), (size // 2, 131072 + 17, 0)):
            n = min(n, size - off)
            ret = blk_pwrite_zeroes(blk, off, n, flags)
            _expect(ret == 0, f"write-zeroes [{off}, +{n}) flags {flags:#x} returned {ret}")
            model[off:off + n] = bytes(n)
        _compare(blk, model, "after write-zeroes")
    finally:
        blk_unref(blk)


def check_discard(d: DriverUnderTest) -> None:
    """bdrv_co_pdiscard is advisory: it succeeds and never changes bytes outside its range."""
    blk = d.open()
    try:
        size = min(d.size, blk_getlength(blk))
        model = bytearray(b"\x3c" * size)
        _expect(blk_pwrite(blk, 0, model) == size, "fill failed")
        off, n = 65536, 131072
        ret = blk_pdiscard(blk, off, n)
        _expect(ret == 0, f"discard returned {ret}")
        buf = bytearray(size)
        blk_pread(blk, 0, buf)
        _expect(buf[:off] == model[:off] and buf[off + n:] == model[off + n:],
                "discard changed bytes outside its range")
        inside = buf[off:off + n]
        if d.discard_zeroes:
            _expect(not any(inside), "discarded range does not read as zeroes")
        else:
            _expect(inside == model[off:off + n] or not any(inside),
                    "a discarded range must read as the old data or as zeroes")
    finally:
        blk_unref(blk)


def check_fua_and_flush(d: DriverUnderTest) -> None:
    """A FUA write and a flush succeed and the data is there (FUA is honoured or emulated by a flush)."""
    blk = d.open()
    try:
        ret = blk_pwrite(blk, 8192, b"\x42" * 4096, flags=BDRV_REQ_FUA)
        _expect(ret == 4096, f"FUA write returned {ret}")
        _expect(blk_flush(blk) == 0, "flush failed")
        _expect(blk_flush(blk) == 0, "a second flush with nothing written failed")
        if d.stores_data:
            buf = bytearray(4096)
            blk_pread(blk, 8192, buf)
            _expect(buf == b"\x42" * 4096, "FUA data differs")
    finally:
        blk_unref(blk)


def check_block_status(d: DriverUnderTest) -> None:
    """bdrv_co_block_status covers the node in positive steps, and ranges reported as zero read as zeroes."""
    blk = d.open()
    try:
        bs = blk_bs(blk)
        size = min(d.size, blk_getlength(blk))
        blk_pwrite(blk, 0, b"\x99" * 65536)
        blk_pwrite_zeroes(blk, 65536, 65536, BDRV_REQ_MAY_UNMAP)
        off = 0
        steps = 0
        while off < size:
            ret, pnum, _, _ = bdrv_block_status(bs, off, size - off)
            _expect(ret >= 0, f"block status at {off} failed with {ret}")
            _expect(pnum > 0, f"block status at {off} returned pnum 0 before the end")
            if ret & BDRV_BLOCK_ZERO:
                buf = bytearray(min(pnum, 1 << 20))
                blk_pread(blk, off, buf)
                _expect(not any(buf), f"[{off}, +{pnum}) is reported as zero but holds data")
            off += pnum
            steps += 1
            _expect(steps < 100000, "block status does not make progress")
    finally:
        blk_unref(blk)


def check_concurrent_overlapping_writes(d: DriverUnderTest) -> None:
    """Overlapping writes in flight together: every byte ends up as one of the writes left it, none is lost."""
    blk = d.open()
    try:
        size = min(d.size, blk_getlength(blk), 1 << 20)
        blk_pwrite_zeroes(blk, 0, size, 0)
        rng = random.Random(d.seed + 1)
        writes = []
        for i in range(16):
            off = rng.randrange(size - 1)
            n = rng.randrange(1, min(size - off, 20000) + 1)
            writes.append((off, n, (i + 1) & 0xFF))
        done = []

        def entry(w):
            off, n, val = w
            done.append(blk_co_pwritev(blk, off, n, QEMUIOVector([memoryview(bytearray([val]) * n)], -1), 0))

        for w in writes:
            from qblock.util.aio import aio_co_enter
            aio_co_enter(bdrv_get_aio_context(blk_bs(blk)), qemu_coroutine_create(entry, w))
        AIO_WAIT_WHILE(bdrv_get_aio_context(blk_bs(blk)), lambda: len(done) < len(writes))
        _expect(all(r == 0 for r in done), f"some concurrent write failed: {done}")
        buf = bytearray(size)
        blk_pread(blk, 0, buf)
        for pos in range(size):
            cands = {val for off, n, val in writes if off <= pos < off + n}
            if cands:
                _expect(buf[pos] in cands, f"byte {pos} is {buf[pos]:#x}, written by none of {sorted(cands)}")
            else:
                _expect(buf[pos] == 0, f"byte {pos} was never written but is {buf[pos]:#x}")
    finally:
        blk_unref(blk)


def check_bad_offsets(d: DriverUnderTest) -> None:
    """Requests beyond the end or at a negative offset fail with -EIO and change nothing."""
    blk = d.open()
    try:
        length = blk_getlength(blk)
        _expect(blk_pwrite(blk, length - 100, b"x" * 200) == -errno.EIO, "a write crossing the end must be -EIO")
        _expect(blk_pread(blk, length, bytearray(1)) == -errno.EIO, "a read past the end must be -EIO")
        _expect(blk_pwrite(blk, -512, b"x" * 512) == -errno.EIO, "a negative offset must be -EIO")
        _expect(blk_pread(blk, length, bytearray(0)) == 0, "a 0-byte read at the end is allowed")
    finally:
        blk_unref(blk)


def check_read_only(d: DriverUnderTest) -> None:
    """A node opened read-only refuses writes (-EPERM) and still reads."""
    opts = d.options()
    blk = d.open(flags=0, options=opts)
    try:
        _expect(blk_pwrite(blk, 0, b"x" * 512) == -errno.EPERM, "a write to a read-only node must be -EPERM")
        _expect(blk_pread(blk, 0, bytearray(512)) == 512, "a read-only node must still read")
    finally:
        blk_unref(blk)


def check_reopen(d: DriverUnderTest) -> None:
    """Data written and flushed is there after the node is closed and opened again (persistent storage)."""
    if not d.persistent:
        return
    opts = d.options()
    blk = d.open(options=opts)
    try:
        _expect(blk_pwrite(blk, 12345, b"persist" * 100) == 700, "write failed")
        _expect(blk_flush(blk) == 0, "flush failed")
    finally:
        blk_unref(blk)
    blk = d.open(options=opts)
    try:
        buf = bytearray(700)
        blk_pread(blk, 12345, buf)
        _expect(buf == b"persist" * 100, "data lost across close and open")
    finally:
        blk_unref(blk)


CHECKS: list[tuple[str, str, Callable[[DriverUnderTest], None]]] = [
    (f.__name__[len("check_"):], f.__doc__.strip().splitlines()[0], f)
    for f in (check_rw_model, check_vectored, check_large_request, check_write_zeroes, check_discard,
              check_fua_and_flush, check_block_status, check_concurrent_overlapping_writes, check_bad_offsets,
              check_read_only, check_reopen)
]


def run_check(d: DriverUnderTest, check: tuple[str, str, Callable[[DriverUnderTest], None]]) -> CheckResult:
    name, contract, fn = check
    try:
        fn(d)
    except ContractBroken as e:
        return CheckResult(name, contract, False, str(e))
    except Error as e:
        return CheckResult(name, contract, False, f"set-up failed: {e}")
    return CheckResult(name, contract, True)


def run_conformance(d: DriverUnderTest, only: list[str] | None = None) -> Report:
    """Run every check (or those named in ``only``) and report which contracts hold."""
    return Report([run_check(d, c) for c in CHECKS if only is None or c[0] in only])
