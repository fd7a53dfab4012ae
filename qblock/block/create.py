"""Image creation: ``bdrv_create`` and ``bdrv_create_file`` of QEMU's block.c.

A driver that can create images implements
``bdrv_co_create_opts(self, filename, options) -> int`` (0, or raise Error
with QEMU's message); these functions run it in a coroutine from anywhere,
as QEMU's ``bdrv_create`` does.  ``bdrv_create_file`` picks the protocol
driver from the filename (``file`` unless a ``proto:`` prefix names another).
"""
from __future__ import annotations

import errno
from typing import Any

from qblock.block.driver import BlockDriver
from qblock.block.graph import bdrv_find_protocol
from qblock.block.io import run_co_in
from qblock.util.aio import qemu_get_aio_context
from qblock.util.error import Error, error_setg_errno

__all__ = ["bdrv_create", "bdrv_create_file"]


def bdrv_create(drv: BlockDriver, filename: str, options: dict[str, Any] | None = None) -> None:
    """Create ``filename`` with ``drv``; raises Error (QEMU's wording) when it cannot."""
    if drv.bdrv_co_create_opts is None:
        raise Error(f"Driver '{drv.format_name}' does not support image creation", errno=errno.ENOTSUP)

    def co_create() -> int:
        try:
            return drv.bdrv_co_create_opts(filename, dict(options or {}))
        except Error as e:
            return e

    ret = run_co_in(qemu_get_aio_context(), co_create)
    if isinstance(ret, Error):
        raise ret
    if ret < 0:
        raise error_setg_errno(-ret, f"Could not create image '{filename}'")


def bdrv_create_file(filename: str, options: dict[str, Any] | None = None) -> None:
    """Create the file (or other protocol object) ``filename`` with the protocol driver it names."""
    drv = bdrv_find_protocol(filename, True)
    bdrv_create(drv, filename, options)
