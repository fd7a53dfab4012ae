"""Image locking of the file protocol: the lock part of QEMU's block/file-posix.c.

``raw_apply_lock_bytes``, ``raw_check_lock_bytes`` and ``raw_handle_perm_lock``
(RAW_PL_PREPARE/COMMIT/ABORT), called by the driver's permission and reopen hooks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from qblock.block.driver import BDRV_O_INACTIVE
from qblock.block.graph import (
    BLK_PERM_ALL,
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_RESIZE,
    BLK_PERM_WRITE,
    BLK_PERM_WRITE_UNCHANGED,
    bdrv_perm_names,
)
from qblock.util.error import Error, warn_report
from qblock.util.osdep import qemu_lock_fd, qemu_lock_fd_test, qemu_unlock_fd

if TYPE_CHECKING:
    from .file_posix import BDRVRawState


# --------------------------------------------------------------------------
# Image locking (raw_apply_lock_bytes, raw_check_lock_bytes, raw_handle_perm_lock)
#
# One byte per permission: RAW_LOCK_PERM_BASE + bit is read-locked while this
# node holds the permission, RAW_LOCK_SHARED_BASE + bit while it does not
# share it.  Locks are Linux OFD locks, owned by the open file description, so
# two fds of one process conflict as two processes do.

RAW_LOCK_PERM_BASE = 100
RAW_LOCK_SHARED_BASE = 200
# The permissions that have lock bytes: QEMU 7.2's BLK_PERM_ALL.  GRAPH_MOD
# (removed in 6.2) gets none, so qblock's bytes mean to a real QEMU what its own do.
RAW_LOCK_PERMS = BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE | BLK_PERM_WRITE_UNCHANGED | BLK_PERM_RESIZE


def _perm_bits():
    """(i, 1 << i) for each permission that has lock bytes (QEMU's PERM_FOREACH)."""
    return [(i, 1 << i) for i in range(RAW_LOCK_PERMS.bit_length())]


def raw_apply_lock_bytes(s: BDRVRawState | None, fd: int, perm_lock_bits: int, shared_perm_lock_bits: int,
                         unlock: bool) -> None:
    """Lock the bytes of ``perm_lock_bits`` and of ``shared_perm_lock_bits`` (the permissions NOT
    shared); with ``unlock``, also unlock the bytes no longer needed.  ``s`` None: no record of what
    is held, so lock (or unlock) every byte asked.  Raises Error."""
    held = [s.locked_perm, s.locked_shared_perm] if s is not None else [BLK_PERM_ALL if unlock else 0] * 2
    try:
        for k, (base, want) in enumerate(((RAW_LOCK_PERM_BASE, perm_lock_bits),
                                          (RAW_LOCK_SHARED_BASE, shared_perm_lock_bits))):
            for i, bit in _perm_bits():
                if want & bit and not held[k] & bit:
                    if qemu_lock_fd(fd, base + i, 1, False):
                        raise Error(f"Failed to lock byte {base + i}")
                    held[k] |= bit
                elif unlock and held[k] & bit and not want & bit:
                    if qemu_unlock_fd(fd, base + i, 1):
                        raise Error(f"Failed to unlock byte {base + i}")
                    held[k] &= ~bit
    finally:
        if s is not None:
            s.locked_perm, s.locked_shared_perm = held


def raw_check_lock_bytes(fd: int, perm: int, shared_perm: int) -> None:
    """Fail when another holder does not share a permission in ``perm``, or holds one we do not share."""
    for i, bit in _perm_bits():
        if perm & bit:
            ret = qemu_lock_fd_test(fd, RAW_LOCK_SHARED_BASE + i, 1, True)
            if ret:
                raise Error(f'Failed to get "{bdrv_perm_names(bit)}" lock', errno=-ret)
    for i, bit in _perm_bits():
        if not shared_perm & bit:
            ret = qemu_lock_fd_test(fd, RAW_LOCK_PERM_BASE + i, 1, True)
            if ret:
                raise Error(f'Failed to get shared "{bdrv_perm_names(bit)}" lock', errno=-ret)


RAW_PL_PREPARE, RAW_PL_COMMIT, RAW_PL_ABORT = range(3)


def _apply_quietly(s: BDRVRawState, perm_lock_bits: int, shared_perm_lock_bits: int) -> None:
    # Only unlocks bytes, which cannot fail in theory; report it if it does.
    try:
        raw_apply_lock_bytes(s, s.fd, perm_lock_bits, shared_perm_lock_bits, True)
    except Error as e:
        warn_report(e.msg)


def raw_handle_perm_lock(bs, op: int, new_perm: int, new_shared: int) -> None:
    """The three steps of a permission change on the lock bytes; PREPARE raises Error (QEMU's messages)."""
    s: BDRVRawState = bs.opaque
    if not s.use_lock or bs.open_flags & BDRV_O_INACTIVE:
        return
    if op == RAW_PL_PREPARE:
        if (s.perm | new_perm) == s.perm and (s.shared_perm & new_shared) == s.shared_perm:
            return  # only unlocking is to come, in COMMIT or ABORT
        try:
            raw_apply_lock_bytes(s, s.fd, s.perm | new_perm, ~s.shared_perm | ~new_shared, False)
            try:
                raw_check_lock_bytes(s.fd, new_perm, new_shared)
            except Error as e:
                e.hint = f"Is another process using the image [{bs.filename}]?\n"
                raise
        except Error:
            _apply_quietly(s, s.perm, ~s.shared_perm)  # back to the bytes of the committed state
            raise
    elif op == RAW_PL_ABORT:
        _apply_quietly(s, s.perm, ~s.shared_perm)
    else:
        _apply_quietly(s, new_perm, ~new_shared)
