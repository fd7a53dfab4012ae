"""The ``file`` protocol driver: QEMU's block/file-posix.c, split in three.

========================  ==========================================
module                    part of block/file-posix.c
========================  ==========================================
``file_posix``            the driver: open, close, reopen, permissions, I/O, create, truncate
``file_posix_aio``        the thread-pool work (handle_aiocb_*), fallocate, O_DIRECT alignment
``file_posix_lock``       image locking (raw_apply_lock_bytes, raw_check_lock_bytes, raw_handle_perm_lock)
========================  ==========================================

Importing the package registers the driver as ``file``.
"""
from qblock.block.driver import bdrv_register

from .file_posix import BDRVRawState, FileDriver, raw_runtime_opts  # noqa: F401 - the package's interface

bdrv_file = bdrv_register(FileDriver)

__all__ = ["BDRVRawState", "FileDriver", "bdrv_file", "raw_runtime_opts"]
