"""A filter that fails the requests a test chooses: ``driver=test-fault,file=...``.

blkdebug's rules fire on named events and are fixed when the node opens;
reliability tests need faults decided at run time, at random, for thousands
of requests.  This filter passes every request to its ``file`` child unless
``bs.opaque.fail_fn(op, offset, bytes)`` returns an errno (positive), in
which case the request fails with ``-errno`` without reaching the child.
``op`` is one of ``read``, ``write``, ``write_zeroes``, ``discard``,
``flush``.  ``bs.opaque.injected`` counts the failures it injected.

Not in QEMU (the test-only drivers of QEMU's unit tests play the same role).
"""
from __future__ import annotations

from typing import Callable

import attrs

from qblock.block.driver import BlockDriver, bdrv_find_format, bdrv_register
from qblock.block.graph import bdrv_get_info, bdrv_getlength, bdrv_open_child, bdrv_pass_supported_flags, child_format
from qblock.block.io import (
    bdrv_co_block_status_from_file,
    bdrv_co_flush,
    bdrv_co_pdiscard,
    bdrv_co_preadv,
    bdrv_co_pwrite_zeroes,
    bdrv_co_pwritev,
    bdrv_co_truncate,
)


@attrs.define
class FaultState:
    fail_fn: Callable[[str, int, int], int] | None = None
    injected: int = 0


class FaultDriver(BlockDriver):
    format_name = "test-fault"
    state_class = FaultState
    is_filter = True

    def bdrv_open(self, bs, options: dict, flags: int) -> int:
        bdrv_open_child(None, options, "file", bs, child_role=child_format)
        bdrv_pass_supported_flags(bs)
        return 0

    def bdrv_getlength(self, bs) -> int:
        return bdrv_getlength(bs.file.bs)

    def _fault(self, bs, op: str, offset: int, bytes: int) -> int:
        s: FaultState = bs.opaque
        err = s.fail_fn(op, offset, bytes) if s.fail_fn is not None else 0
        if err:
            s.injected += 1
            return -err
        return 0

    def bdrv_co_preadv(self, bs, offset: int, bytes: int, qiov, flags: int) -> int:
        return self._fault(bs, "read", offset, bytes) or bdrv_co_preadv(bs.file, offset, bytes, qiov, flags)

    def bdrv_co_pwritev(self, bs, offset: int, bytes: int, qiov, flags: int) -> int:
        return self._fault(bs, "write", offset, bytes) or bdrv_co_pwritev(bs.file, offset, bytes, qiov, flags)

    def bdrv_co_pwrite_zeroes(self, bs, offset: int, bytes: int, flags: int) -> int:
        return (self._fault(bs, "write_zeroes", offset, bytes)
                or bdrv_co_pwrite_zeroes(bs.file, offset, bytes, flags))

    def bdrv_co_pdiscard(self, bs, offset: int, bytes: int) -> int:
        return self._fault(bs, "discard", offset, bytes) or bdrv_co_pdiscard(bs.file, offset, bytes)

    def bdrv_co_flush(self, bs) -> int:
        return self._fault(bs, "flush", 0, 0) or bdrv_co_flush(bs.file.bs)

    def bdrv_co_truncate(self, bs, offset: int, exact: bool, prealloc) -> int:
        errp: list = []
        ret = bdrv_co_truncate(bs.file, offset, exact, prealloc, errp)
        if errp:
            raise errp[0]
        return ret

    def bdrv_get_info(self, bs, bdi) -> int:
        return bdrv_get_info(bs.file.bs, bdi)

    def bdrv_co_block_status(self, bs, want_zero: bool, offset: int, bytes: int):
        return bdrv_co_block_status_from_file(bs, want_zero, offset, bytes)


if bdrv_find_format("test-fault") is None:
    bdrv_register(FaultDriver)
