"""Host locking helpers: QEMU's util/osdep.c (qemu_lock_fd, qemu_unlock_fd, qemu_lock_fd_test, qemu_has_ofd_lock).

Byte-range locks through fcntl(2): Linux OFD locks (``F_OFD_SETLK``/``F_OFD_GETLK``, owned by the
open file description, so two fds of one process conflict as two processes do) where the kernel
has them, else POSIX locks (``F_SETLK``/``F_GETLK``, owned by the process), as QEMU falls back.
Results are 0 or a negative errno.  ``struct flock`` is packed by hand (64-bit ``off_t``).
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct

F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", None)
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", None)
# struct flock: short l_type, l_whence; off_t l_start, l_len; pid_t l_pid (64-bit off_t).
_flock = struct.Struct("@hhqqi")
_FLOCK_SIZE = (_flock.size + 7) // 8 * 8

_ofd_lock_state: bool | None = None


def qemu_has_ofd_lock() -> bool:
    """True when the kernel has OFD locks (probed once on /dev/null, as QEMU does)."""
    global _ofd_lock_state
    if _ofd_lock_state is None:
        _ofd_lock_state = False
        if F_OFD_GETLK is not None:
            try:
                fd = os.open("/dev/null", os.O_RDWR)
            except OSError:
                return False
            try:
                fcntl.fcntl(fd, F_OFD_GETLK, _pack_flock(fcntl.F_WRLCK, 0, 0))
                _ofd_lock_state = True
            except OSError:
                pass  # EINVAL: no OFD locks, fall back to POSIX locks
            finally:
                os.close(fd)
    return _ofd_lock_state


def _pack_flock(l_type: int, start: int, length: int) -> bytes:
    return _flock.pack(l_type, os.SEEK_SET, start, length, 0).ljust(_FLOCK_SIZE, b"\0")


def _setlk_op() -> int:
    return F_OFD_SETLK if qemu_has_ofd_lock() else fcntl.F_SETLK


def _getlk_op() -> int:
    return F_OFD_GETLK if qemu_has_ofd_lock() else fcntl.F_GETLK


def qemu_lock_fcntl(fd: int, start: int, length: int, l_type: int) -> int:
    try:
        fcntl.fcntl(fd, _setlk_op(), _pack_flock(l_type, start, length))
    except OSError as e:
        return -(e.errno or errno.EIO)
    return 0


def qemu_lock_fd(fd: int, start: int, length: int, exclusive: bool) -> int:
    return qemu_lock_fcntl(fd, start, length, fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK)


def qemu_unlock_fd(fd: int, start: int, length: int) -> int:
    return qemu_lock_fcntl(fd, start, length, fcntl.F_UNLCK)


def qemu_lock_fd_test(fd: int, start: int, length: int, exclusive: bool) -> int:
    """0 when the lock could be taken now, -EAGAIN when someone else holds a conflicting one."""
    l_type = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    try:
        res = fcntl.fcntl(fd, _getlk_op(), _pack_flock(l_type, start, length))
    except OSError as e:
        return -(e.errno or errno.EIO)
    return 0 if _flock.unpack_from(res)[0] == fcntl.F_UNLCK else -errno.EAGAIN
