"""A tiny in-memory driver whose shape a test chooses, so every path of block/io.c runs.

``test-mem-<style>`` drivers keep the node's bytes in a bytearray and log
every call the block layer makes to them.  The style picks the callback
QEMU's ``bdrv_driver_pwritev`` ladder reaches:

=================  ===========================================================
``co``             ``bdrv_co_preadv`` / ``bdrv_co_pwritev`` (byte based)
``part``           ``bdrv_co_preadv_part`` / ``bdrv_co_pwritev_part``
``aio``            ``bdrv_aio_preadv`` / ``bdrv_aio_pwritev`` (completion from a BH or timer)
``sector``         ``bdrv_co_readv`` / ``bdrv_co_writev`` (sector based, no flags)
``sector-flags``   ``bdrv_co_readv`` / ``bdrv_co_writev_flags``
``aio-sector``     ``bdrv_aio_readv`` / ``bdrv_aio_writev`` (the seed's sector-based AIO)
=================  ===========================================================

Options: ``size`` (default 1 MiB), ``align`` (request_alignment; default 1
for byte-based styles, 512 otherwise), ``max-transfer``, ``fua`` (the driver
honours BDRV_REQ_FUA itself; not the flag-less sector styles), ``write-zeroes``
(it has ``bdrv_co_pwrite_zeroes``; ``write-zeroes-notsup`` makes it answer
-ENOTSUP), ``pwrite-zeroes-alignment``, ``max-pwrite-zeroes``, ``discard``,
``pdiscard-alignment``, ``max-pdiscard``, ``latency-ns`` (virtual-clock
sleep in every call, so requests overlap; the AIO styles complete from a
timer then; in every style the data moves when the call ends), ``fail`` (an
errno every data, zero-write and discard call returns), ``fail-flush`` (an
errno every flush returns), ``block-status`` (data/zero per 4 KiB block:
written blocks are data, blocks wholly zeroed or discarded are zero).
``write-zeroes``, ``discard`` and ``block-status`` are chosen by
:func:`memdrv_options`' arguments of the same names, since they decide which
hooks the driver class has.

``state.calls`` records ``(op, offset, bytes, flags)`` for every driver call;
``state.flushes`` counts flushes.
"""
from __future__ import annotations

import errno

import attrs

from qblock.block.driver import (
    BDRV_BLOCK_DATA,
    BDRV_BLOCK_OFFSET_VALID,
    BDRV_BLOCK_ZERO,
    BDRV_REQ_FUA,
    BDRV_REQ_MAY_UNMAP,
    BDRV_SECTOR_SIZE,
    BlockDriver,
    bdrv_find_format,
    bdrv_register,
)
from qblock.block.graph import bdrv_get_aio_context
from qblock.util.aio import aio_bh_schedule_oneshot, aio_timer_new
from qblock.util.aiocb import AIOCBInfo, BlockAIOCB
from qblock.util.coroutine_lock import qemu_co_sleep_ns
from qblock.util.iov import qemu_iovec_from_buf, qemu_iovec_to_buf
from qblock.util.qemu_option import (
    QEMU_OPT_BOOL,
    QEMU_OPT_NUMBER,
    QEMU_OPT_SIZE,
    QemuOptDesc,
    QemuOptsList,
    qemu_opts_absorb_qdict,
)
from qblock.util.timer import QEMU_CLOCK_VIRTUAL, SCALE_NS, qemu_clock_get_ns, timer_mod_ns

STYLES = ("co", "part", "aio", "sector", "sector-flags", "aio-sector")
STATUS_BLOCK = 4096

memdrv_opts = QemuOptsList("test-mem", [
    QemuOptDesc("size", QEMU_OPT_SIZE, "size of the node"),
    QemuOptDesc("align", QEMU_OPT_SIZE, "request_alignment"),
    QemuOptDesc("max-transfer", QEMU_OPT_SIZE, "max_transfer"),
    QemuOptDesc("fua", QEMU_OPT_BOOL, "honour BDRV_REQ_FUA"),
    QemuOptDesc("write-zeroes", QEMU_OPT_BOOL, "implement bdrv_co_pwrite_zeroes"),
    QemuOptDesc("write-zeroes-notsup", QEMU_OPT_BOOL, "bdrv_co_pwrite_zeroes answers -ENOTSUP"),
    QemuOptDesc("pwrite-zeroes-alignment", QEMU_OPT_SIZE, "pwrite_zeroes_alignment"),
    QemuOptDesc("max-pwrite-zeroes", QEMU_OPT_SIZE, "max_pwrite_zeroes"),
    QemuOptDesc("discard", QEMU_OPT_BOOL, "implement bdrv_co_pdiscard"),
    QemuOptDesc("pdiscard-alignment", QEMU_OPT_SIZE, "pdiscard_alignment"),
    QemuOptDesc("max-pdiscard", QEMU_OPT_SIZE, "max_pdiscard"),
    QemuOptDesc("latency-ns", QEMU_OPT_NUMBER, "virtual-clock sleep in every call"),
    QemuOptDesc("fail", QEMU_OPT_NUMBER, "errno every data call returns"),
    QemuOptDesc("fail-flush", QEMU_OPT_NUMBER, "errno every flush returns"),
    QemuOptDesc("block-status", QEMU_OPT_BOOL, "report data/zero per 4 KiB block"),
])


@attrs.define
class MemState:
    data: bytearray = attrs.field(factory=bytearray)
    align: int = 1
    max_transfer: int = 0
    fua: bool = False
    zeroes_notsup: bool = False
    pwrite_zeroes_alignment: int = 0
    max_pwrite_zeroes: int = 0
    pdiscard_alignment: int = 0
    max_pdiscard: int = 0
    latency_ns: int = 0
    fail: int = 0
    fail_flush: int = 0
    calls: list = attrs.field(factory=list)
    flushes: int = 0
    written: bytearray = attrs.field(factory=bytearray)   # 1 per 4 KiB block that holds data


_aiocb_info = AIOCBInfo()


class MemDriverBase(BlockDriver):
    state_class = MemState
    runtime_opts = memdrv_opts
    style = "co"

    def bdrv_file_open(self, bs, options: dict, flags: int) -> int:
        s: MemState = bs.opaque
        o = qemu_opts_absorb_qdict(memdrv_opts, options)
        s.data = bytearray(o.get("size", 1 << 20))
        s.written = bytearray((len(s.data) + STATUS_BLOCK - 1) // STATUS_BLOCK)
        byte_based = self.style in ("co", "part", "aio")
        s.align = o.get("align", 1 if byte_based else BDRV_SECTOR_SIZE)
        s.max_transfer = o.get("max-transfer", 0)
        s.fua = o.get("fua", False)
        s.zeroes_notsup = o.get("write-zeroes-notsup", False)
        s.pwrite_zeroes_alignment = o.get("pwrite-zeroes-alignment", 0)
        s.max_pwrite_zeroes = o.get("max-pwrite-zeroes", 0)
        s.pdiscard_alignment = o.get("pdiscard-alignment", 0)
        s.max_pdiscard = o.get("max-pdiscard", 0)
        s.latency_ns = o.get("latency-ns", 0)
        s.fail = o.get("fail", 0)
        s.fail_flush = o.get("fail-flush", 0)
        # Only the styles whose write hook takes flags can honour FUA.
        if s.fua and self.style not in ("sector", "aio-sector"):
            bs.supported_write_flags = BDRV_REQ_FUA
        # Zero flags follow the hook, not the option: memdrv_options() picks the hook from
        # write_zeroes=True and so never passes the "write-zeroes" option itself.
        if self.bdrv_co_pwrite_zeroes is not None:
            bs.supported_zero_flags = BDRV_REQ_MAY_UNMAP | (BDRV_REQ_FUA if s.fua else 0)
        return 0

    def bdrv_refresh_limits(self, bs) -> None:
        s: MemState = bs.opaque
        bs.bl.request_alignment = s.align
        bs.bl.max_transfer = s.max_transfer
        bs.bl.pwrite_zeroes_alignment = s.pwrite_zeroes_alignment
        bs.bl.max_pwrite_zeroes = s.max_pwrite_zeroes
        bs.bl.pdiscard_alignment = s.pdiscard_alignment
        bs.bl.max_pdiscard = s.max_pdiscard

    def bdrv_getlength(self, bs) -> int:
        return len(bs.opaque.data)

    # -- the work, shared by every style --------------------------------

    def _check(self, s: MemState, offset: int, bytes: int) -> None:
        if offset % s.align or bytes % s.align:
            raise AssertionError(f"test-mem got an unaligned request [{offset}, +{bytes}) with align {s.align}")
        if s.max_transfer and bytes > s.max_transfer:
            raise AssertionError(f"test-mem got {bytes} bytes, more than max_transfer {s.max_transfer}")
        if offset + bytes > len(s.data):
            raise AssertionError(f"test-mem got a request beyond its end: [{offset}, +{bytes})")

    def _sleep(self, s: MemState) -> None:
        if s.latency_ns:
            qemu_co_sleep_ns(QEMU_CLOCK_VIRTUAL, s.latency_ns)

    def _read(self, bs, offset: int, bytes: int, qiov, qiov_offset: int = 0) -> int:
        s: MemState = bs.opaque
        s.calls.append(("read", offset, bytes, 0))
        self._check(s, offset, bytes)
        if s.fail:
            return -s.fail
        qemu_iovec_from_buf(qiov, qiov_offset, memoryview(s.data)[offset:offset + bytes], bytes)
        return 0

    def _write(self, bs, offset: int, bytes: int, qiov, flags: int, qiov_offset: int = 0) -> int:
        s: MemState = bs.opaque
        s.calls.append(("write", offset, bytes, flags))
        self._check(s, offset, bytes)
        if s.fail:
            return -s.fail
        qemu_iovec_to_buf(qiov, qiov_offset, memoryview(s.data)[offset:offset + bytes], bytes)
        _mark(s, offset, bytes, True)
        return 0

    def bdrv_co_flush_to_disk(self, bs) -> int:
        s: MemState = bs.opaque
        s.calls.append(("flush", 0, 0, 0))
        s.flushes += 1
        self._sleep(s)
        return -s.fail_flush


def _mark(s: MemState, offset: int, bytes: int, data: bool) -> None:
    """Update the block-status map: data marks every block touched, zeroes only the blocks wholly covered."""
    if data:
        first, end = offset // STATUS_BLOCK, (offset + bytes + STATUS_BLOCK - 1) // STATUS_BLOCK
    else:
        first, end = (offset + STATUS_BLOCK - 1) // STATUS_BLOCK, (offset + bytes) // STATUS_BLOCK
    for b in range(first, end):
        s.written[b] = 1 if data else 0


def _check_range(s: MemState, what: str, offset: int, bytes: int) -> None:
    if offset < 0 or bytes < 0 or offset + bytes > len(s.data):
        raise AssertionError(f"test-mem got a {what} beyond its end: [{offset}, +{bytes})")


def _co_pwrite_zeroes(self, bs, offset: int, bytes: int, flags: int) -> int:
    s: MemState = bs.opaque
    s.calls.append(("write_zeroes", offset, bytes, flags))
    if offset % s.align or bytes % s.align:
        raise AssertionError(f"test-mem got an unaligned zero write [{offset}, +{bytes}) with align {s.align}")
    _check_range(s, "zero write", offset, bytes)
    self._sleep(s)
    if s.zeroes_notsup:
        return -errno.ENOTSUP
    if s.max_pwrite_zeroes and bytes > s.max_pwrite_zeroes:
        raise AssertionError(f"test-mem got a {bytes}-byte zero write above max_pwrite_zeroes")
    if s.fail:
        return -s.fail
    s.data[offset:offset + bytes] = bytes_(bytes)
    _mark(s, offset, bytes, False)
    return 0


def _co_pdiscard(self, bs, offset: int, bytes: int) -> int:
    s: MemState = bs.opaque
    s.calls.append(("discard", offset, bytes, 0))
    _check_range(s, "discard", offset, bytes)  # unaligned heads and tails are allowed: discard is advisory
    self._sleep(s)
    if s.max_pdiscard and bytes > s.max_pdiscard:
        raise AssertionError(f"test-mem got a {bytes}-byte discard above max_pdiscard")
    if s.fail:
        return -s.fail
    s.data[offset:offset + bytes] = bytes_(bytes)  # discarded space reads back as zeroes here
    _mark(s, offset, bytes, False)
    return 0


def _co_block_status(self, bs, want_zero: bool, offset: int, bytes: int):
    s: MemState = bs.opaque
    blk = offset // STATUS_BLOCK
    kind = s.written[blk]
    end = offset + bytes
    pos = (blk + 1) * STATUS_BLOCK
    while pos < end and s.written[pos // STATUS_BLOCK] == kind:
        pos += STATUS_BLOCK
    pnum = min(pos, end) - offset
    flags = BDRV_BLOCK_OFFSET_VALID | (BDRV_BLOCK_DATA if kind else BDRV_BLOCK_ZERO)
    return flags, pnum, offset, bs


bytes_ = bytes


def _complete(args) -> None:
    acb, work = args
    acb.cb(acb.opaque, work())


def _aio_submit(bs, cb, opaque, work) -> BlockAIOCB:
    """Do ``work`` (the data transfer) and call ``cb`` after the latency (a timer) or from a BH."""
    acb = BlockAIOCB(_aiocb_info, bs, cb, opaque)
    ctx = bdrv_get_aio_context(bs)
    latency = bs.opaque.latency_ns
    if latency:
        t = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, _complete, (acb, work))
        timer_mod_ns(t, qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) + latency)
    else:
        aio_bh_schedule_oneshot(ctx, _complete, (acb, work))
    return acb


def _make(style: str, zeroes: bool, discard: bool, status: bool) -> type[MemDriverBase]:
    ns: dict = {"style": style}
    if style == "co":
        ns["bdrv_co_preadv"] = lambda self, bs, o, b, q, f: (self._sleep(bs.opaque), self._read(bs, o, b, q))[1]
        ns["bdrv_co_pwritev"] = lambda self, bs, o, b, q, f: (self._sleep(bs.opaque), self._write(bs, o, b, q, f))[1]
    elif style == "part":
        ns["bdrv_co_preadv_part"] = lambda self, bs, o, b, q, qo, f: (self._sleep(bs.opaque),
                                                                       self._read(bs, o, b, q, qo))[1]
        ns["bdrv_co_pwritev_part"] = lambda self, bs, o, b, q, qo, f: (self._sleep(bs.opaque),
                                                                        self._write(bs, o, b, q, f, qo))[1]
    elif style == "aio":
        def aio_pr(self, bs, o, b, q, f, cb, opaque):
            self._check(bs.opaque, o, b)  # contract violations surface in the caller, not in a BH
            return _aio_submit(bs, cb, opaque, lambda: self._read(bs, o, b, q))

        def aio_pw(self, bs, o, b, q, f, cb, opaque):
            self._check(bs.opaque, o, b)
            return _aio_submit(bs, cb, opaque, lambda: self._write(bs, o, b, q, f))
        ns["bdrv_aio_preadv"] = aio_pr
        ns["bdrv_aio_pwritev"] = aio_pw
    elif style in ("sector", "sector-flags"):
        ns["bdrv_co_readv"] = lambda self, bs, sn, n, q: (self._sleep(bs.opaque),
                                                           self._read(bs, sn * 512, n * 512, q))[1]
        if style == "sector":
            ns["bdrv_co_writev"] = lambda self, bs, sn, n, q: (self._sleep(bs.opaque),
                                                                self._write(bs, sn * 512, n * 512, q, 0))[1]
        else:
            ns["bdrv_co_writev_flags"] = lambda self, bs, sn, n, q, f: (
                self._sleep(bs.opaque), self._write(bs, sn * 512, n * 512, q, f))[1]
    elif style == "aio-sector":
        def aio_r(self, bs, sn, q, n, cb, opaque):
            self._check(bs.opaque, sn * 512, n * 512)
            return _aio_submit(bs, cb, opaque, lambda: self._read(bs, sn * 512, n * 512, q))

        def aio_w(self, bs, sn, q, n, cb, opaque):
            self._check(bs.opaque, sn * 512, n * 512)
            return _aio_submit(bs, cb, opaque, lambda: self._write(bs, sn * 512, n * 512, q, 0))
        ns["bdrv_aio_readv"] = aio_r
        ns["bdrv_aio_writev"] = aio_w
    if zeroes:
        ns["bdrv_co_pwrite_zeroes"] = _co_pwrite_zeroes
    if discard:
        ns["bdrv_co_pdiscard"] = _co_pdiscard
    if status:
        ns["bdrv_co_block_status"] = _co_block_status
    suffix = style + ("-z" if zeroes else "") + ("-d" if discard else "") + ("-s" if status else "")
    ns["format_name"] = f"test-mem-{suffix}"
    ns["protocol_name"] = f"test-mem-{suffix}"
    return type(f"MemDriver_{suffix.replace('-', '_')}", (MemDriverBase,), ns)


def memdrv_name(style: str = "co", write_zeroes: bool = False, discard: bool = False,
                block_status: bool = False) -> str:
    """The registered name of the test-mem driver with these hooks (registered on first use)."""
    cls = _make(style, write_zeroes, discard, block_status)
    if bdrv_find_format(cls.format_name) is None:
        bdrv_register(cls)
    return cls.format_name


def memdrv_options(style: str = "co", write_zeroes: bool = False, discard: bool = False,
                   block_status: bool = False, **opts) -> dict:
    """An options dict for bdrv_open/blk_new_open of a test-mem node; ``opts`` use '_' for '-'."""
    d = {"driver": memdrv_name(style, write_zeroes, discard, block_status)}
    for k, v in opts.items():
        d[k.replace("_", "-")] = v
    return d
