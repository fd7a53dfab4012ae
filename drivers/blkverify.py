"""Verify a driver against a raw copy: QEMU's block/blkverify.c.

Every request goes to two children at once, ``test`` (the image under test)
and ``raw`` (a raw reference of the same content), each in its own
coroutine.  Reads compare the two results byte for byte; writes go to
both.  A difference is reported loudly with QEMU's line::

    blkverify: read offset=4096 bytes=512 contents mismatch at offset 4352

QEMU exits the process there; qblock prints the same line on stderr, counts
the mismatch in ``bs.opaque.mismatches`` (tests assert it stays 0) and fails
the request with -EIO.  Flush reaches only the test image, as in QEMU.
Options: ``x-raw``/``x-image`` (or the ``blkverify:RAW:IMAGE`` filename), or
``raw.*``/``test.*`` children.
"""
from __future__ import annotations

import errno
import sys

import attrs

from qblock.block.driver import BlockDriver, bdrv_register
from qblock.block.graph import BDRV_CHILD_DATA, BDRV_CHILD_FILTERED, BDRV_CHILD_PRIMARY, bdrv_getlength, bdrv_open_child
from qblock.block.io import bdrv_co_flush, bdrv_co_preadv, bdrv_co_pwritev
from qblock.util.coroutine import qemu_coroutine_create, qemu_coroutine_enter, qemu_coroutine_enter_if_inactive, \
    qemu_coroutine_self, qemu_coroutine_yield
from qblock.util.error import Error
from qblock.util.iov import QEMUIOVector, qemu_iovec_compare
from qblock.util.qemu_option import QEMU_OPT_STRING, QemuOptDesc, QemuOptsList, qemu_opts_absorb_qdict

blkverify_opts = QemuOptsList("blkverify", [
    QemuOptDesc("x-raw", QEMU_OPT_STRING, "[internal use only, will be removed]"),
    QemuOptDesc("x-image", QEMU_OPT_STRING, "[internal use only, will be removed]"),
])


@attrs.define
class BDRVBlkverifyState:
    test_file: object = None
    mismatches: list = attrs.field(factory=list)


@attrs.define(eq=False)
class BlkverifyRequest:
    co: object
    bs: object
    is_write: bool
    offset: int
    bytes: int
    flags: int
    qiov: QEMUIOVector
    raw_qiov: QEMUIOVector
    ret: int = 0
    raw_ret: int = 0
    done: int = 0

    def describe_wait(self) -> str:
        return f"blkverify: {2 - self.done} of 2 requests"


def _blkverify_err(r: BlkverifyRequest, text: str) -> int:
    line = (f"blkverify: {'write' if r.is_write else 'read'} offset={r.offset} bytes={r.bytes} {text}")
    sys.stderr.write(line + "\n")
    r.bs.opaque.mismatches.append(line)
    return -errno.EIO


def _do_test_req(r: BlkverifyRequest) -> None:
    fn = bdrv_co_pwritev if r.is_write else bdrv_co_preadv
    r.ret = fn(r.bs.opaque.test_file, r.offset, r.bytes, r.qiov, r.flags)
    r.done += 1
    qemu_coroutine_enter_if_inactive(r.co)


def _do_raw_req(r: BlkverifyRequest) -> None:
    fn = bdrv_co_pwritev if r.is_write else bdrv_co_preadv
    r.raw_ret = fn(r.bs.file, r.offset, r.bytes, r.raw_qiov, r.flags)
    r.done += 1
    qemu_coroutine_enter_if_inactive(r.co)


class BlkverifyDriver(BlockDriver):
    format_name = "blkverify"
    protocol_name = "blkverify"
    state_class = BDRVBlkverifyState
    runtime_opts = blkverify_opts
    is_filter = True

    def bdrv_parse_filename(self, filename: str, options: dict) -> None:
        if not filename.startswith("blkverify:"):
            options["x-image"] = filename
            return
        rest = filename[len("blkverify:"):]
        if ":" not in rest:
            raise Error("blkverify requires raw copy and original image path")
        raw, image = rest.split(":", 1)
        options["x-raw"] = raw
        options["x-image"] = image

    def bdrv_file_open(self, bs, options: dict, flags: int) -> int:
        s: BDRVBlkverifyState = bs.opaque
        opts = qemu_opts_absorb_qdict(blkverify_opts, options)
        # The raw copy is the filtered child (bs.file); the image under test is a plain data child.
        bdrv_open_child(opts.get("x-raw"), options, "raw", bs, child_role=BDRV_CHILD_FILTERED | BDRV_CHILD_PRIMARY)
        s.test_file = bdrv_open_child(opts.get("x-image"), options, "test", bs, child_role=BDRV_CHILD_DATA)
        return 0

    def bdrv_getlength(self, bs) -> int:
        return bdrv_getlength(bs.opaque.test_file.bs)

    def _prwv(self, bs, offset: int, bytes: int, qiov: QEMUIOVector, raw_qiov: QEMUIOVector, flags: int,
              is_write: bool) -> BlkverifyRequest:
        r = BlkverifyRequest(qemu_coroutine_self(), bs, is_write, offset, bytes, flags, qiov, raw_qiov)
        qemu_coroutine_enter(qemu_coroutine_create(_do_test_req, r))
        qemu_coroutine_enter(qemu_coroutine_create(_do_raw_req, r))
        r.co.waiting_on = r
        while r.done < 2:
            qemu_coroutine_yield()
        return r

    def bdrv_co_preadv(self, bs, offset: int, bytes: int, qiov: QEMUIOVector, flags: int) -> int:
        raw_bufs = [memoryview(bytearray(len(v))) for v in qiov.iov]
        raw_qiov = QEMUIOVector(raw_bufs, len(raw_bufs))
        r = self._prwv(bs, offset, bytes, qiov, raw_qiov, flags, False)
        if r.ret != r.raw_ret:
            return _blkverify_err(r, f"return value mismatch {r.ret} != {r.raw_ret}")
        if r.ret == 0:
            diff = qemu_iovec_compare(qiov, raw_qiov)
            if diff != -1:
                return _blkverify_err(r, f"contents mismatch at offset {offset + diff}")
        return r.ret

    def bdrv_co_pwritev(self, bs, offset: int, bytes: int, qiov: QEMUIOVector, flags: int) -> int:
        r = self._prwv(bs, offset, bytes, qiov, qiov, flags, True)
        if r.ret != r.raw_ret:
            return _blkverify_err(r, f"return value mismatch {r.ret} != {r.raw_ret}")
        return r.ret

    def bdrv_co_flush(self, bs) -> int:
        # Only the test image matters; the raw copy is just a reference.
        return bdrv_co_flush(bs.opaque.test_file.bs)


bdrv_register(BlkverifyDriver)
