"""Set-up errors: QEMU's ``Error`` (util/error.c, include/qapi/error.h).

QEMU reports configuration and set-up failures through an ``Error **errp``
out-parameter filled by ``error_setg()``; the I/O path instead returns a
negative errno.  qblock keeps the same split: the I/O path returns negative
errno integers, and everything else (opening a node, parsing options,
permission conflicts, invalid throttle limits ...) raises :class:`Error` with
QEMU's wording, so ``str(err)`` is the line QEMU would print after
``qemu-img: ``.
"""
from __future__ import annotations

import errno as _errno
import os


class Error(Exception):
    """A set-up error with QEMU's message; ``errno`` is kept when QEMU has one."""

    def __init__(self, msg: str, errno: int = 0, hint: str | None = None):
        super().__init__(msg)
        self.msg = msg
        self.errno = errno
        self.hint = hint

    def __str__(self) -> str:
        return self.msg


def error_setg(fmt: str, *args) -> Error:
    """Build an :class:`Error` from a printf-style message (QEMU's error_setg)."""
    return Error(fmt % args if args else fmt)


def error_setg_errno(errno: int, fmt: str, *args) -> Error:
    """error_setg_errno: the message followed by ``: <strerror(errno)>``."""
    msg = fmt % args if args else fmt
    errno = abs(errno)
    return Error(f"{msg}: {strerror(errno)}", errno=errno)


def error_prepend(err: Error, prefix: str) -> Error:
    """error_prepend: put ``prefix`` in front of an existing error's message."""
    err.msg = prefix + err.msg
    err.args = (err.msg,)
    return err


def strerror(errno: int) -> str:
    """The C library's strerror() for a positive or negative errno."""
    errno = abs(errno)
    if errno == _errno.ENOTSUP:
        # glibc's wording; Python's os.strerror gives the same text.
        return "Operation not supported"
    return os.strerror(errno)


_progname = "qblock"


def error_set_progname(name: str) -> None:
    """The program name error_report puts before each line (QEMU's error_set_progname)."""
    global _progname
    _progname = name


def error_report(msg: str) -> None:
    """Print an error line to stderr, as QEMU's error_report does: ``PROGNAME: msg``."""
    import sys
    sys.stderr.write(f"{_progname}: {msg}\n")


def warn_report(msg: str) -> None:
    """Print a warning line to stderr (QEMU's warn_report)."""
    import sys
    sys.stderr.write(f"{_progname}: warning: {msg}\n")
