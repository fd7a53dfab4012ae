"""The copy-on-read filter: QEMU's block/copy-on-read.c.

Reads through a ``copy-on-read`` node carry ``BDRV_REQ_COPY_ON_READ``, so
block/io.c copies every cluster the read touches that the node below does
not hold yet (read from its backing chain) into that node, as
``bdrv_co_do_copy_on_readv`` does.  Everything else passes through.  The
filter takes WRITE_UNCHANGED on its child for those copies and shares it.
"""
from __future__ import annotations

from qblock.block.driver import (
    BDRV_REQ_COPY_ON_READ,
    BlockDriver,
    bdrv_register,
)
from qblock.block.graph import (
    bdrv_pass_supported_flags,
    BLK_PERM_WRITE_UNCHANGED,
    bdrv_filter_default_perms,
    bdrv_getlength,
    bdrv_open_child,
    child_format,
)
from qblock.block.io import (
    bdrv_co_block_status_from_file,
    bdrv_co_flush,
    bdrv_co_pdiscard,
    bdrv_co_preadv,
    bdrv_co_pwrite_zeroes,
    bdrv_co_pwritev,
)


class CopyOnReadDriver(BlockDriver):
    format_name = "copy-on-read"
    is_filter = True

    def bdrv_open(self, bs, options: dict, flags: int) -> int:
        bdrv_open_child(None, options, "file", bs, child_role=child_format)
        bdrv_pass_supported_flags(bs)
        return 0

    def bdrv_child_perm(self, bs, c, role, reopen_queue, perm: int, shared: int) -> tuple[int, int]:
        nperm, nshared = bdrv_filter_default_perms(bs, c, role, reopen_queue, perm, shared)
        # Copying what was read into the child does not change what it reads as.
        return nperm | BLK_PERM_WRITE_UNCHANGED, nshared | BLK_PERM_WRITE_UNCHANGED

    def bdrv_getlength(self, bs) -> int:
        return bdrv_getlength(bs.file.bs)

    def bdrv_co_preadv(self, bs, offset: int, bytes: int, qiov, flags: int) -> int:
        return bdrv_co_preadv(bs.file, offset, bytes, qiov, flags | BDRV_REQ_COPY_ON_READ)

    def bdrv_co_pwritev(self, bs, offset: int, bytes: int, qiov, flags: int) -> int:
        return bdrv_co_pwritev(bs.file, offset, bytes, qiov, flags)

    def bdrv_co_pwrite_zeroes(self, bs, offset: int, bytes: int, flags: int) -> int:
        return bdrv_co_pwrite_zeroes(bs.file, offset, bytes, flags)

    def bdrv_co_pdiscard(self, bs, offset: int, bytes: int) -> int:
        return bdrv_co_pdiscard(bs.file, offset, bytes)

    def bdrv_co_flush(self, bs) -> int:
        return bdrv_co_flush(bs.file.bs)

    def bdrv_co_block_status(self, bs, want_zero: bool, offset: int, bytes: int):
        return bdrv_co_block_status_from_file(bs, want_zero, offset, bytes)


bdrv_register(CopyOnReadDriver)
