"""The work the file protocol hands to the thread pool: QEMU's handle_aiocb_* in block/file-posix.c.

Vectored reads and writes straight from the request's memoryviews (short transfers looped, a read
past the end of the file zero-filled, a short write -EINVAL), fdatasync, fallocate, and the
O_DIRECT alignment helpers (probing, bounce buffers).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
from typing import TYPE_CHECKING

import attrs

from qblock.block.driver import BDRV_O_NOCACHE, BDRV_O_RDWR, IOV_MAX
from qblock.util.error import Error
from qblock.util.iov import QEMUIOVector, qemu_iovec_memset

if TYPE_CHECKING:
    from .file_posix import BDRVRawState

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
MAX_BLOCKSIZE = 4096

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int


def do_fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2); 0 or a negative errno (-ENOTSUP where the call or mode is missing)."""
    if _fallocate is None:
        return -errno.ENOTSUP
    if _fallocate(fd, mode, offset, length) == 0:
        return 0
    err = ctypes.get_errno()
    if err in (errno.ENODEV, errno.ENOSYS, errno.EOPNOTSUPP):
        return -errno.ENOTSUP  # QEMU's translate_err
    return -err



# --------------------------------------------------------------------------
# Work done on the thread pool (QEMU's handle_aiocb_*)


def _aligned_buffer(size: int) -> mmap.mmap:
    """Page-aligned anonymous memory, good for O_DIRECT."""
    return mmap.mmap(-1, max(size, 1))


def _view_address(v: memoryview) -> int | None:
    if v.readonly:
        return None
    return ctypes.addressof(ctypes.c_char.from_buffer(v)) if len(v) else 0


def _io_works(fd: int, view: memoryview) -> bool:
    try:
        os.preadv(fd, [view], 0)
    except OSError:
        return False
    return True


def _qiov_is_aligned(s: BDRVRawState, qiov: QEMUIOVector) -> bool:
    for v in qiov.iov:
        addr = _view_address(v)
        if addr is None or addr % s.buf_align or len(v) % s.buf_align:
            return False
    return True


@attrs.define(eq=False)
class RawPosixAIOData:
    """One request handed to a worker thread (QEMU's RawPosixAIOData)."""

    fd: int
    offset: int
    nbytes: int
    iov: list
    is_write: bool = False
    bounce: bool = False


def _rw_vector(fd: int, iov: list, offset: int, nbytes: int, is_write: bool) -> int:
    """Transfer as much as the file takes; the byte count done (short at EOF for reads), or -errno."""
    done = 0
    views = list(iov)
    while done < nbytes:
        try:
            if is_write:
                n = os.pwritev(fd, views[:IOV_MAX], offset + done)
            else:
                n = os.preadv(fd, views[:IOV_MAX], offset + done)
        except InterruptedError:
            continue
        except OSError as e:
            return -(e.errno or errno.EIO)
        if n == 0:
            break
        done += n
        # Drop what was transferred from the front of the vector.
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]
    return done


def handle_aiocb_rw(acb: RawPosixAIOData) -> int:
    if acb.bounce:
        buf = _aligned_buffer(acb.nbytes)
        mv = memoryview(buf)
        try:
            if acb.is_write:
                pos = 0
                for v in acb.iov:
                    mv[pos:pos + len(v)] = v
                    pos += len(v)
                n = _rw_vector(acb.fd, [mv[:acb.nbytes]], acb.offset, acb.nbytes, True)
            else:
                n = _rw_vector(acb.fd, [mv[:acb.nbytes]], acb.offset, acb.nbytes, False)
                if n >= 0:
                    pos = 0
                    for v in acb.iov:
                        take = min(len(v), max(n - pos, 0))
                        v[:take] = mv[pos:pos + take]
                        pos += len(v)
        finally:
            mv.release()
            buf.close()
    else:
        n = _rw_vector(acb.fd, acb.iov, acb.offset, acb.nbytes, acb.is_write)
    if n < 0:
        return n
    if n == acb.nbytes:
        return 0
    if acb.is_write:
        return -errno.EINVAL  # a short write
    # A read that hit the end of the file: the rest reads as zeroes.
    qemu_iovec_memset(QEMUIOVector(acb.iov, len(acb.iov)), n, 0, acb.nbytes - n)
    return 0


def handle_aiocb_flush(fd: int) -> int:
    try:
        os.fdatasync(fd)
    except OSError as e:
        return -(e.errno or errno.EIO)
    return 0


# --------------------------------------------------------------------------
# The driver


def raw_parse_flags(bdrv_flags: int) -> int:
    """The open(2) flags for the node's BDRV_O_* flags (QEMU's raw_parse_flags)."""
    os_flags = os.O_CLOEXEC | (os.O_RDWR if bdrv_flags & BDRV_O_RDWR else os.O_RDONLY)
    if bdrv_flags & BDRV_O_NOCACHE:
        os_flags |= getattr(os, "O_DIRECT", 0)
    return os_flags


def raw_probe_alignment(fd: int) -> tuple[int, int]:
    """With O_DIRECT, (request_alignment, buffer alignment) that ``fd`` accepts (QEMU's raw_probe_alignment).

    Reads of 1, 512, 1024, 2048, 4096 bytes until one works.  A size of 1 that "works" is not
    trusted: QEMU then falls back to the safe value, the larger of 4 KiB and the page size.
    """
    max_align = max(MAX_BLOCKSIZE, mmap.PAGESIZE)
    buf = _aligned_buffer(2 * max_align)
    mv = memoryview(buf)
    try:
        align = 0
        for a in (1, 512, 1024, 2048, MAX_BLOCKSIZE):
            if _io_works(fd, mv[:a]):
                align = a if a != 1 else max_align
                break
        buf_align = 0
        for a in (1, 512, 1024, 2048, MAX_BLOCKSIZE):
            if _io_works(fd, mv[a:a + max_align]):
                buf_align = a if a != 1 else max_align
                break
    finally:
        mv.release()
        buf.close()
    if not align or not buf_align:
        raise Error("Could not find working O_DIRECT alignment", errno=errno.EINVAL,
                    hint="Try cache.direct=off")
    return align, buf_align
