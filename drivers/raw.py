"""The raw format: QEMU's block/raw-format.c.

Passes every request to its ``file`` child, shifted by ``offset`` and kept
inside ``size`` when those options are given (a request outside the window
fails: -ENOSPC for writes, -EINVAL for reads, and nothing outside is
touched).  FUA, write-zeroes flags, discard, flush, block status and
truncate pass through; the limits are the child's.  Reopen may change
``offset`` and ``size`` (checked in prepare, applied in commit).

A raw image whose format was probed rather than named is guarded as QEMU
guards it: 512-byte alignment, and a write to the first sector whose content
would probe as another format fails with -EPERM.
"""
from __future__ import annotations

import errno

import attrs

from qblock.block.driver import (
    BDRV_BLOCK_OFFSET_VALID,
    BDRV_BLOCK_RAW,
    BDRV_SECTOR_SIZE,
    BlkdebugEvent,
    BlockDriver,
    bdrv_drivers,
    bdrv_register,
)
from qblock.block.graph import bdrv_pass_supported_flags, bdrv_get_info, bdrv_getlength, bdrv_is_read_only, bdrv_open_child, child_format
from qblock.block.io import (
    BLKDBG_EVENT,
    bdrv_co_pdiscard,
    bdrv_co_preadv,
    bdrv_co_pwrite_zeroes,
    bdrv_co_pwritev,
    bdrv_co_truncate,
)
from qblock.util.error import Error, error_setg_errno
from qblock.util.iov import QEMUIOVector, qemu_iovec_slice, qemu_iovec_to_buf
from qblock.util.qemu_option import QEMU_OPT_SIZE, QemuOptDesc, QemuOptsList, qemu_opts_absorb_qdict

BLOCK_PROBE_BUF_SIZE = 512
INT64_MAX = (1 << 63) - 1


@attrs.define
class BDRVRawState:
    offset: int = 0
    size: int = 0
    has_size: bool = False


raw_runtime_opts = QemuOptsList("raw", [
    QemuOptDesc("offset", QEMU_OPT_SIZE, "offset in the disk where the image starts"),
    QemuOptDesc("size", QEMU_OPT_SIZE, "virtual disk size"),
])


def bdrv_probe_all(buf: bytes, filename: str | None) -> BlockDriver | None:
    """The format driver that claims ``buf`` with the highest score."""
    best, score_max = None, 0
    for drv in bdrv_drivers():
        if drv.bdrv_probe is not None:
            score = drv.bdrv_probe(buf, len(buf), filename)
            if score > score_max:
                best, score_max = drv, score
    return best


class RawDriver(BlockDriver):
    format_name = "raw"
    is_format = True
    state_class = BDRVRawState
    runtime_opts = raw_runtime_opts
    has_variable_length = True

    def bdrv_probe(self, buf: bytes, buf_size: int, filename: str | None) -> int:
        return 1  # the smallest score: raw is chosen only when no other format claims the image

    def bdrv_open(self, bs, options: dict, flags: int) -> int:
        s: BDRVRawState = bs.opaque
        opts = qemu_opts_absorb_qdict(raw_runtime_opts, options)
        offset = opts.get("offset", 0)
        has_size = "size" in opts
        size = opts.get("size", 0)
        bdrv_open_child(None, options, "file", bs, child_role=child_format)
        fbs = bs.file.bs
        bs.sg = fbs.sg
        bdrv_pass_supported_flags(bs)
        if bs.probed and not bdrv_is_read_only(bs):
            import sys
            sys.stderr.write(
                f"WARNING: Image format was not specified for '{fbs.filename}' and probing guessed raw.\n"
                "         Automatically detecting the format is dangerous for raw images, "
                "write operations on block 0 will be restricted.\n"
                "         Specify the 'raw' format explicitly to remove the restrictions.\n")
        self._apply_options(bs, s, offset, has_size, size)
        return 0

    @staticmethod
    def _apply_options(bs, s: BDRVRawState, offset: int, has_size: bool, size: int) -> None:
        real_size = bdrv_getlength(bs.file.bs)
        if real_size < 0:
            raise error_setg_errno(-real_size, "Could not get image size")
        if offset > real_size:
            raise Error(f"Offset ({offset}) cannot be greater than size of the containing file ({real_size})",
                        errno=errno.EINVAL)
        if has_size and real_size - offset < size:
            raise Error(f"The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the "
                        f" actual size of the containing file ({real_size})", errno=errno.EINVAL)
        if has_size and size % BDRV_SECTOR_SIZE:
            raise Error(f"Specified size is not multiple of {BDRV_SECTOR_SIZE}", errno=errno.EINVAL)
        s.offset = offset
        s.has_size = has_size
        s.size = size if has_size else real_size - offset

    # -- reopen (raw_reopen_prepare/commit/abort): offset and size may change -----

    def bdrv_reopen_prepare(self, state, queue) -> int:
        opts = qemu_opts_absorb_qdict(raw_runtime_opts, state.options)
        new = BDRVRawState()
        self._apply_options(state.bs, new, opts.get("offset", 0), "size" in opts, opts.get("size", 0))
        state.opaque = new
        return 0

    def bdrv_reopen_commit(self, state) -> None:
        s: BDRVRawState = state.bs.opaque
        new: BDRVRawState = state.opaque
        s.offset, s.size, s.has_size = new.offset, new.size, new.has_size
        state.opaque = None

    def bdrv_reopen_abort(self, state) -> None:
        state.opaque = None

    @staticmethod
    def _adjust_offset(bs, offset: int, bytes: int, is_write: bool) -> tuple[int, int]:
        """(0, shifted offset), or (-ENOSPC for writes / -EINVAL for reads, 0) outside the window."""
        s: BDRVRawState = bs.opaque
        if s.has_size and (offset > s.size or bytes > s.size - offset):
            return (-errno.ENOSPC if is_write else -errno.EINVAL), 0
        if offset > INT64_MAX - s.offset:
            return -errno.EINVAL, 0
        return 0, offset + s.offset

    def bdrv_refresh_limits(self, bs) -> None:
        if bs.probed:
            # Any probed image works in 512-byte sectors, so the first one can be protected.
            bs.bl.request_alignment = BDRV_SECTOR_SIZE

    def bdrv_getlength(self, bs) -> int:
        s: BDRVRawState = bs.opaque
        length = bdrv_getlength(bs.file.bs)
        if length < 0:
            return length
        if length < s.offset:
            s.size = 0
        elif s.has_size:
            s.size = min(s.size, length - s.offset)
        else:
            s.size = length - s.offset
        return s.size

    def bdrv_co_preadv(self, bs, offset: int, bytes: int, qiov, flags: int) -> int:
        ret, offset = self._adjust_offset(bs, offset, bytes, False)
        if ret:
            return ret
        BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_READ_AIO)
        return bdrv_co_preadv(bs.file, offset, bytes, qiov, flags)

    def bdrv_co_pwritev(self, bs, offset: int, bytes: int, qiov, flags: int) -> int:
        if bs.probed and offset < BLOCK_PROBE_BUF_SIZE and bytes:
            # A probed image: refuse writing a first sector that would probe as another format.
            if offset != 0 or bytes < BLOCK_PROBE_BUF_SIZE:
                return -errno.EINVAL
            first = bytearray(BLOCK_PROBE_BUF_SIZE)
            if qemu_iovec_to_buf(qiov, 0, first, BLOCK_PROBE_BUF_SIZE) != BLOCK_PROBE_BUF_SIZE:
                return -errno.EINVAL
            if bdrv_probe_all(bytes_(first), None) is not bs.drv:
                return -errno.EPERM
            # Write the checked copy: the guest may change its buffer meanwhile.
            views = [memoryview(first)] + qemu_iovec_slice(qiov, BLOCK_PROBE_BUF_SIZE,
                                                           qiov.size - BLOCK_PROBE_BUF_SIZE)
            qiov = QEMUIOVector(views, len(views))
        ret, offset = self._adjust_offset(bs, offset, bytes, True)
        if ret:
            return ret
        BLKDBG_EVENT(bs.file, BlkdebugEvent.BLKDBG_WRITE_AIO)
        return bdrv_co_pwritev(bs.file, offset, bytes, qiov, flags)

    def bdrv_co_pwrite_zeroes(self, bs, offset: int, bytes: int, flags: int) -> int:
        ret, offset = self._adjust_offset(bs, offset, bytes, True)
        if ret:
            return ret
        return bdrv_co_pwrite_zeroes(bs.file, offset, bytes, flags)

    def bdrv_co_pdiscard(self, bs, offset: int, bytes: int) -> int:
        ret, offset = self._adjust_offset(bs, offset, bytes, True)
        if ret:
            return ret
        return bdrv_co_pdiscard(bs.file, offset, bytes)

    def bdrv_co_block_status(self, bs, want_zero: bool, offset: int, bytes: int):
        return BDRV_BLOCK_RAW | BDRV_BLOCK_OFFSET_VALID, bytes, offset + bs.opaque.offset, bs.file.bs

    def bdrv_co_truncate(self, bs, offset: int, exact: bool, prealloc) -> int:
        s: BDRVRawState = bs.opaque
        if s.has_size:
            raise Error("Cannot resize fixed-size raw disks", errno=errno.ENOTSUP)
        if INT64_MAX - offset < s.offset:
            raise Error("Disk size too large for the chosen offset", errno=errno.EINVAL)
        s.size = offset
        errp: list = []
        ret = bdrv_co_truncate(bs.file, offset + s.offset, exact, prealloc, errp)
        if errp:
            raise errp[0]
        return ret

    def bdrv_get_info(self, bs, bdi) -> int:
        return bdrv_get_info(bs.file.bs, bdi)


bytes_ = bytes
bdrv_register(RawDriver)
