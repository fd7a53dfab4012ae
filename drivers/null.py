"""The null drivers: QEMU's block/null.c.

``null-co`` answers with coroutine callbacks, ``null-aio`` with AIO-style
callbacks completed from a BH (or a timer), so it exercises block/io.c's AIO
emulation.  Writes are discarded; reads leave the buffer untouched unless
``read-zeroes=on``.  Options: ``size`` (default 1 GiB), ``latency-ns``
(default 0), ``read-zeroes`` (default off).  Filenames ``null-co://`` and
``null-aio://``.

Difference from QEMU: the latency runs on QEMU_CLOCK_REALTIME, or on the
virtual clock in qtest mode (so a traced or tested request with latency is
deterministic and instant).
"""
from __future__ import annotations

import errno

import attrs

from qblock.block.driver import (
    BDRV_BLOCK_OFFSET_VALID,
    BDRV_BLOCK_ZERO,
    BDRV_REQ_FUA,
    BlockDriver,
    bdrv_register,
)
from qblock.block.graph import bdrv_get_aio_context
from qblock.util.aio import aio_bh_schedule_oneshot, aio_timer_new
from qblock.util.aiocb import AIOCBInfo, BlockAIOCB, qemu_aio_unref
from qblock.util.coroutine_lock import qemu_co_sleep_ns
from qblock.util.error import Error
from qblock.util.iov import qemu_iovec_memset
from qblock.util.qemu_option import (
    QEMU_OPT_BOOL,
    QEMU_OPT_NUMBER,
    QEMU_OPT_SIZE,
    QemuOptDesc,
    QemuOptsList,
    qemu_opts_absorb_qdict,
)
from qblock.util.timer import QEMU_CLOCK_REALTIME, QEMU_CLOCK_VIRTUAL, SCALE_NS, qemu_clock_get_ns, \
    qtest_enabled, timer_mod_ns

NULL_OPT_LATENCY = "latency-ns"
NULL_OPT_ZEROES = "read-zeroes"


@attrs.define
class BDRVNullState:
    length: int = 0
    latency_ns: int = 0
    read_zeroes: bool = False


runtime_opts = QemuOptsList("null", [
    QemuOptDesc("size", QEMU_OPT_SIZE, "size of the null block"),
    QemuOptDesc(NULL_OPT_LATENCY, QEMU_OPT_NUMBER, "nanoseconds (approximated) to wait before completing request"),
    QemuOptDesc(NULL_OPT_ZEROES, QEMU_OPT_BOOL, "return zeroes when read"),
])


def _latency_clock() -> int:
    return QEMU_CLOCK_VIRTUAL if qtest_enabled() else QEMU_CLOCK_REALTIME


class _NullCommon(BlockDriver):
    state_class = BDRVNullState
    runtime_opts = runtime_opts

    def bdrv_parse_filename(self, filename: str, options: dict) -> None:
        # Only exists so that the null-co:// (null-aio://) filename is accepted.
        if filename != f"{self.protocol_name}://":
            raise Error(f"The only allowed filename for this driver is '{self.protocol_name}://'")

    def bdrv_file_open(self, bs, options: dict, flags: int) -> int:
        s: BDRVNullState = bs.opaque
        opts = qemu_opts_absorb_qdict(runtime_opts, options)
        s.length = opts.get("size", 1 << 30)
        latency = opts.get(NULL_OPT_LATENCY, 0)
        if latency >= 1 << 63:  # a negative number, seen as the uint64 it is in C
            raise Error("latency-ns is invalid", errno=errno.EINVAL)
        s.latency_ns = latency
        s.read_zeroes = opts.get(NULL_OPT_ZEROES, False)
        bs.supported_write_flags = BDRV_REQ_FUA
        bs.filename = bs.exact_filename = f"{self.protocol_name}://"  # what null_refresh_filename gives
        return 0

    def bdrv_reopen_prepare(self, state, queue) -> int:
        # null_reopen_prepare: nothing of its own can change (a changed size is refused by the generic check).
        return 0

    def bdrv_getlength(self, bs) -> int:
        return bs.opaque.length

    def bdrv_co_block_status(self, bs, want_zero: bool, offset: int, bytes: int):
        ret = BDRV_BLOCK_OFFSET_VALID
        if bs.opaque.read_zeroes:
            ret |= BDRV_BLOCK_ZERO
        return ret, bytes, offset, bs


class NullCoDriver(_NullCommon):
    """null-co: coroutine callbacks."""

    format_name = "null-co"
    protocol_name = "null-co"

    def _common(self, bs) -> int:
        s: BDRVNullState = bs.opaque
        if s.latency_ns:
            qemu_co_sleep_ns(_latency_clock(), s.latency_ns)
        return 0

    def bdrv_co_preadv(self, bs, offset: int, bytes: int, qiov, flags: int) -> int:
        if bs.opaque.read_zeroes:
            qemu_iovec_memset(qiov, 0, 0, bytes)
        return self._common(bs)

    def bdrv_co_pwritev(self, bs, offset: int, bytes: int, qiov, flags: int) -> int:
        return self._common(bs)

    def bdrv_co_flush_to_disk(self, bs) -> int:
        return self._common(bs)


null_aiocb_info = AIOCBInfo()


def _null_complete(acb: BlockAIOCB) -> None:
    acb.cb(acb.opaque, 0)
    qemu_aio_unref(acb)


class NullAioDriver(_NullCommon):
    """null-aio: AIO-style callbacks, completed from a one-shot BH or a latency timer."""

    format_name = "null-aio"
    protocol_name = "null-aio"

    def _aio_common(self, bs, cb, opaque) -> BlockAIOCB:
        s: BDRVNullState = bs.opaque
        acb = BlockAIOCB(null_aiocb_info, bs, cb, opaque)
        ctx = bdrv_get_aio_context(bs)
        if s.latency_ns:
            clock = _latency_clock()
            t = aio_timer_new(ctx, clock, SCALE_NS, _null_complete, acb)
            timer_mod_ns(t, qemu_clock_get_ns(clock) + s.latency_ns)
        else:
            aio_bh_schedule_oneshot(ctx, _null_complete, acb, "null_bh_cb")
        return acb

    def bdrv_aio_preadv(self, bs, offset: int, bytes: int, qiov, flags: int, cb, opaque):
        if bs.opaque.read_zeroes:
            qemu_iovec_memset(qiov, 0, 0, bytes)
        return self._aio_common(bs, cb, opaque)

    def bdrv_aio_pwritev(self, bs, offset: int, bytes: int, qiov, flags: int, cb, opaque):
        return self._aio_common(bs, cb, opaque)

    def bdrv_aio_flush(self, bs, cb, opaque):
        return self._aio_common(bs, cb, opaque)


bdrv_register(NullCoDriver)
bdrv_register(NullAioDriver)
