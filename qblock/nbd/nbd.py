"""NBD protocol constants and names: QEMU's include/block/nbd.h, nbd/nbd-internal.h and nbd/common.c.

The wire format is NBD's (``doc/proto.md`` of the NetworkBlockDevice
project): the newstyle handshake (magics, global and client flags), options
(``NBD_OPT_*``) and their replies (``NBD_REP_*``, ``NBD_INFO_*``), the
transmission flags of an export (``NBD_FLAG_*``), requests (``NBD_CMD_*``,
``NBD_CMD_FLAG_*``), simple and structured replies (``NBD_REPLY_TYPE_*``),
block status flags (``NBD_STATE_*``) and the protocol's errno values
(``NBD_E*``).  The ``*_lookup`` functions give the names QEMU's traces print.

``struct`` formats for the fixed-size wire structures sit beside their QEMU
struct names.  Left out: the extended headers of later QEMU (64-bit
lengths), NBD_OPT_STARTTLS handling (TLS) and the client-side ioctls.
"""
from __future__ import annotations

import errno
import struct

# Handshake (nbd-internal.h)
NBD_REQUEST_SIZE = 4 + 2 + 2 + 8 + 8 + 4
NBD_REPLY_SIZE = 4 + 4 + 8
NBD_REPLY_EXPORT_NAME_SIZE = 8 + 2 + 124
NBD_OLDSTYLE_NEGOTIATE_SIZE = 8 + 8 + 8 + 4 + 124

NBD_INIT_MAGIC = 0x4E42444D41474943      # "NBDMAGIC"
NBD_REQUEST_MAGIC = 0x25609513
NBD_REPLY_MAGIC = 0x67446698
NBD_OPTS_MAGIC = 0x49484156454F5054      # "IHAVEOPT"
NBD_CLIENT_MAGIC = 0x0000420281861253
NBD_REP_MAGIC = 0x0003E889045565A9

NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

NBD_DEFAULT_PORT = 10809
NBD_MAX_BUFFER_SIZE = 32 * 1024 * 1024   # largest READ/WRITE payload QEMU accepts
NBD_MAX_STRING_SIZE = 4096               # export names, descriptions, context names

# Transmission (export) flags
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11

# Handshake (global) flags, server to client
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
# Client flags
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# Options
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10


def NBD_REP_ERR(value: int) -> int:
    return (1 << 31) | value


NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4

NBD_REP_ERR_UNSUP = NBD_REP_ERR(1)
NBD_REP_ERR_POLICY = NBD_REP_ERR(2)
NBD_REP_ERR_INVALID = NBD_REP_ERR(3)
NBD_REP_ERR_PLATFORM = NBD_REP_ERR(4)
NBD_REP_ERR_TLS_REQD = NBD_REP_ERR(5)
NBD_REP_ERR_UNKNOWN = NBD_REP_ERR(6)
NBD_REP_ERR_SHUTDOWN = NBD_REP_ERR(7)
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_ERR(8)
NBD_REP_ERR_TOO_BIG = NBD_REP_ERR(9)

# NBD_REP_INFO types
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# Request flags
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4

# Requests
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7

# Structured replies
NBD_REPLY_FLAG_DONE = 1 << 0


def NBD_REPLY_ERR(value: int) -> int:
    return (1 << 15) | value


NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR = NBD_REPLY_ERR(1)
NBD_REPLY_TYPE_ERROR_OFFSET = NBD_REPLY_ERR(2)


def nbd_reply_type_is_error(type: int) -> bool:
    return bool(type & (1 << 15))


# base:allocation extent flags
NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1
# qemu:dirty-bitmap extent flags
NBD_STATE_DIRTY = 1 << 0

# Errors on the wire
NBD_SUCCESS = 0
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# Wire structures (all big-endian), named after QEMU's packed structs
NBDOption = struct.Struct(">QII")                 # magic, option, length
NBDOptionReply = struct.Struct(">QIII")           # magic, option, type, length
NBDRequestWire = struct.Struct(">IHHQQI")         # magic, flags, type, handle, from, len
NBDSimpleReply = struct.Struct(">IIQ")            # magic, error, handle
NBDStructuredReplyChunk = struct.Struct(">IHHQI")  # magic, flags, type, handle, length
NBDExtent = struct.Struct(">II")                  # length, flags


def system_errno_to_nbd_errno(err: int) -> int:
    """The NBD error for a (positive) errno; anything the protocol lacks becomes NBD_EINVAL."""
    if err == 0:
        return NBD_SUCCESS
    if err in (errno.EPERM, errno.EROFS):
        return NBD_EPERM
    if err == errno.EIO:
        return NBD_EIO
    if err == errno.ENOMEM:
        return NBD_ENOMEM
    if err in (errno.EDQUOT, errno.EFBIG, errno.ENOSPC):
        return NBD_ENOSPC
    if err == errno.EOVERFLOW:
        return NBD_EOVERFLOW
    if err in (errno.ENOTSUP, errno.EOPNOTSUPP):
        return NBD_ENOTSUP
    if err == errno.ESHUTDOWN:
        return NBD_ESHUTDOWN
    return NBD_EINVAL


_OPT_NAMES = {
    NBD_OPT_EXPORT_NAME: "export name", NBD_OPT_ABORT: "abort", NBD_OPT_LIST: "list",
    NBD_OPT_STARTTLS: "starttls", NBD_OPT_INFO: "info", NBD_OPT_GO: "go",
    NBD_OPT_STRUCTURED_REPLY: "structured reply", NBD_OPT_LIST_META_CONTEXT: "list meta context",
    NBD_OPT_SET_META_CONTEXT: "set meta context",
}
_REP_NAMES = {
    NBD_REP_ACK: "ack", NBD_REP_SERVER: "server", NBD_REP_INFO: "info", NBD_REP_META_CONTEXT: "meta context",
    NBD_REP_ERR_UNSUP: "unsupported", NBD_REP_ERR_POLICY: "denied by policy", NBD_REP_ERR_INVALID: "invalid",
    NBD_REP_ERR_PLATFORM: "platform lacks support", NBD_REP_ERR_TLS_REQD: "TLS required",
    NBD_REP_ERR_UNKNOWN: "export unknown", NBD_REP_ERR_SHUTDOWN: "server shutting down",
    NBD_REP_ERR_BLOCK_SIZE_REQD: "block size required",
}
_INFO_NAMES = {NBD_INFO_EXPORT: "export", NBD_INFO_NAME: "name", NBD_INFO_DESCRIPTION: "description",
               NBD_INFO_BLOCK_SIZE: "block size"}
_CMD_NAMES = {
    NBD_CMD_READ: "read", NBD_CMD_WRITE: "write", NBD_CMD_DISC: "disconnect", NBD_CMD_FLUSH: "flush",
    NBD_CMD_TRIM: "trim", NBD_CMD_CACHE: "cache", NBD_CMD_WRITE_ZEROES: "write zeroes",
    NBD_CMD_BLOCK_STATUS: "block status",
}
_REPLY_TYPE_NAMES = {
    NBD_REPLY_TYPE_NONE: "none", NBD_REPLY_TYPE_OFFSET_DATA: "data", NBD_REPLY_TYPE_OFFSET_HOLE: "hole",
    NBD_REPLY_TYPE_BLOCK_STATUS: "block status", NBD_REPLY_TYPE_ERROR: "generic error",
    NBD_REPLY_TYPE_ERROR_OFFSET: "error at offset",
}
_ERR_NAMES = {
    NBD_SUCCESS: "success", NBD_EPERM: "EPERM", NBD_EIO: "EIO", NBD_ENOMEM: "ENOMEM", NBD_EINVAL: "EINVAL",
    NBD_ENOSPC: "ENOSPC", NBD_EOVERFLOW: "EOVERFLOW", NBD_ENOTSUP: "ENOTSUP", NBD_ESHUTDOWN: "ESHUTDOWN",
}


def nbd_opt_lookup(opt: int) -> str:
    return _OPT_NAMES.get(opt, "<unknown>")


def nbd_rep_lookup(rep: int) -> str:
    return _REP_NAMES.get(rep, "<unknown>")


def nbd_info_lookup(info: int) -> str:
    return _INFO_NAMES.get(info, "<unknown>")


def nbd_cmd_lookup(cmd: int) -> str:
    return _CMD_NAMES.get(cmd, "<unknown>")


def nbd_reply_type_lookup(type: int) -> str:
    name = _REPLY_TYPE_NAMES.get(type)
    if name is not None:
        return name
    return "<unknown error>" if type & (1 << 15) else "<unknown>"


def nbd_err_lookup(err: int) -> str:
    return _ERR_NAMES.get(err, "<unknown>")
