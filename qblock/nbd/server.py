"""The NBD server: QEMU's nbd/server.c (as of QEMU 7.2).

One :class:`NBDExport` per ``block-export-add type=nbd`` (the export driver
``blk_exp_nbd`` registers with :mod:`qblock.block.export` when this module is
imported), one :class:`NBDClient` per connection.

Negotiation (``nbd_negotiate``, a coroutine entered by :func:`nbd_client_new`)
is the fixed newstyle handshake: the server sends ``NBDMAGIC``,
``IHAVEOPT`` and its flags, then answers options until ``NBD_OPT_GO`` or
``NBD_OPT_EXPORT_NAME`` (``LIST``, ``ABORT``, ``INFO``/``GO`` with
``NBD_INFO_EXPORT``, ``NAME``, ``DESCRIPTION`` and ``BLOCK_SIZE``,
``STRUCTURED_REPLY``, ``LIST``/``SET_META_CONTEXT`` with ``base:allocation``
and ``qemu:allocation-depth``; anything else gets ``NBD_REP_ERR_UNSUP``).

Transmission is QEMU's ``nbd_trip``: one coroutine receives a request, then
schedules the coroutine that receives the next one (at most
``MAX_NBD_REQUESTS`` in flight per client) and only then serves its own, so
requests of one client overlap and complete out of order; replies go out
whole under the client's ``send_lock`` CoMutex.  Bad requests get QEMU's
answers: a bad magic or a failed read disconnects; a write larger than
``NBD_MAX_BUFFER_SIZE`` is answered with ``EINVAL`` and then disconnects
(its payload was not read); other invalid requests (too long, past the end,
read-only, unknown flags or command) get ``EINVAL`` and the connection stays.
Reads with structured replies (and no ``DF`` flag) send ``OFFSET_HOLE``
chunks for zero ranges, found with block status, as QEMU's
``nbd_co_send_sparse_read``.

A closing client shuts its socket down at once; requests already running
finish (their replies fail) and hold the client until they do, then the
socket is closed and the export reference dropped.

Left out: TLS (``NBD_OPT_STARTTLS`` gets ``NBD_REP_ERR_POLICY`` "TLS not
configured" as in QEMU without TLS), exporting dirty bitmaps
(``qemu:dirty-bitmap:*``; qblock has no dirty bitmaps, so ``bitmaps`` fails
with QEMU's "not found" message), the eject notifier of ``nbd-server-add``,
moving an export between AioContexts while clients are connected (QEMU's
``blk_aio_attached``/``blk_aio_detach`` and the ``quiescing`` state), and
the later extended headers.
"""
from __future__ import annotations

import errno
from typing import Any, Callable

import attrs

from qblock.block.block_backend import (
    blk_bs,
    blk_co_flush,
    blk_co_pdiscard,
    blk_co_preadv,
    blk_co_pwrite_zeroes,
    blk_co_pwritev,
    blk_get_max_transfer,
    blk_get_perm,
    blk_get_request_alignment,
    blk_getlength,
    blk_set_perm,
)
from qblock.block.driver import (
    BDRV_BLOCK_ALLOCATED,
    BDRV_BLOCK_DATA,
    BDRV_BLOCK_ZERO,
    BDRV_REQ_COPY_ON_READ,
    BDRV_REQ_FUA,
    BDRV_REQ_MAY_UNMAP,
    BDRV_REQ_NO_FALLBACK,
    BDRV_REQ_PREFETCH,
    BDRV_REQUEST_MAX_BYTES,
    BDRV_SECTOR_SIZE,
)
from qblock.block.export import (
    BlockExport,
    BlockExportDriver,
    blk_exp_ref,
    blk_exp_register_driver,
    blk_exp_unref,
)
from qblock.block.graph import BLK_PERM_RESIZE, backing_bs, bdrv_getlength
from qblock.block.io import bdrv_co_block_status, bdrv_co_block_status_above
from qblock.nbd.nbd import (
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_NO_ZEROES,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_CACHE,
    NBD_FLAG_SEND_DF,
    NBD_FLAG_SEND_FAST_ZERO,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_DESCRIPTION,
    NBD_INFO_EXPORT,
    NBD_INFO_NAME,
    NBD_INIT_MAGIC,
    NBD_MAX_BUFFER_SIZE,
    NBD_MAX_STRING_SIZE,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_INFO,
    NBD_OPT_LIST,
    NBD_OPT_LIST_META_CONTEXT,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STARTTLS,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_OPTS_MAGIC,
    NBD_REP_ACK,
    NBD_REP_ERR_BLOCK_SIZE_REQD,
    NBD_REP_ERR_INVALID,
    NBD_REP_ERR_POLICY,
    NBD_REP_ERR_UNKNOWN,
    NBD_REP_ERR_UNSUP,
    NBD_REP_INFO,
    NBD_REP_MAGIC,
    NBD_REP_META_CONTEXT,
    NBD_REP_SERVER,
    NBD_REPLY_EXPORT_NAME_SIZE,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_ERROR,
    NBD_REPLY_TYPE_NONE,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_REQUEST_MAGIC,
    NBD_REQUEST_SIZE,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
    NBD_STRUCTURED_REPLY_MAGIC,
    NBDExtent,
    NBDOptionReply,
    NBDRequestWire,
    NBDSimpleReply,
    NBDStructuredReplyChunk,
    nbd_cmd_lookup,
    nbd_err_lookup,
    nbd_info_lookup,
    nbd_opt_lookup,
    nbd_rep_lookup,
    system_errno_to_nbd_errno,
)
from qblock.nbd.trace import (
    trace_nbd_client_close,
    trace_nbd_client_new,
    trace_nbd_client_put_free,
    trace_nbd_co_receive_align_compliance,
    trace_nbd_co_receive_request_decode_type,
    trace_nbd_co_receive_request_payload_received,
    trace_nbd_co_send_extents,
    trace_nbd_co_send_simple_reply,
    trace_nbd_co_send_structured_done,
    trace_nbd_co_send_structured_error,
    trace_nbd_co_send_structured_read,
    trace_nbd_co_send_structured_read_hole,
    trace_nbd_negotiate_begin,
    trace_nbd_negotiate_handle_export_name,
    trace_nbd_negotiate_handle_export_name_request,
    trace_nbd_negotiate_handle_info_block_size,
    trace_nbd_negotiate_handle_info_request,
    trace_nbd_negotiate_handle_info_requests,
    trace_nbd_negotiate_meta_context,
    trace_nbd_negotiate_meta_query_parse,
    trace_nbd_negotiate_meta_query_reply,
    trace_nbd_negotiate_meta_query_skip,
    trace_nbd_negotiate_new_style_size_flags,
    trace_nbd_negotiate_options_check_magic,
    trace_nbd_negotiate_options_check_option,
    trace_nbd_negotiate_options_flags,
    trace_nbd_negotiate_send_info,
    trace_nbd_negotiate_send_rep_err,
    trace_nbd_negotiate_send_rep_len,
    trace_nbd_negotiate_send_rep_list,
    trace_nbd_negotiate_success,
    trace_nbd_receive_request,
    trace_nbd_trip,
)
from qblock.util.aio import aio_co_schedule
from qblock.util.coroutine import (
    Coroutine,
    coroutine_fn,
    qemu_coroutine_create,
    qemu_coroutine_enter,
    qemu_coroutine_self,
)
from qblock.util.coroutine_lock import CoMutex, qemu_co_mutex_lock, qemu_co_mutex_unlock
from qblock.util.cutils import QEMU_ALIGN_DOWN
from qblock.util.error import Error, error_prepend, error_report, error_setg_errno, strerror
from qblock.util.iov import QEMUIOVector
from qblock.util.qio_channel import (
    G_IO_IN,
    QIO_CHANNEL_ERR_BLOCK,
    QIO_CHANNEL_SHUTDOWN_BOTH,
    QIOChannel,
    QIOChannelSocket,
    qio_channel_attach_aio_context,
    qio_channel_close,
    qio_channel_detach_aio_context,
    qio_channel_read_all,
    qio_channel_readv,
    qio_channel_set_blocking,
    qio_channel_set_cork,
    qio_channel_set_delay,
    qio_channel_shutdown,
    qio_channel_write_all,
    qio_channel_writev_all,
    qio_channel_yield,
)

__all__ = [
    "NBDExport", "NBDClient", "NBDRequest", "BlkExpNbd", "blk_exp_nbd", "MAX_NBD_REQUESTS",
    "NBD_META_ID_BASE_ALLOCATION", "NBD_META_ID_ALLOCATION_DEPTH", "NBD_MAX_BLOCK_STATUS_EXTENTS",
    "nbd_client_new", "nbd_client_get", "nbd_client_put", "nbd_export_find", "nbd_export_aio_context",
]

NBD_META_ID_BASE_ALLOCATION = 0
NBD_META_ID_ALLOCATION_DEPTH = 1
NBD_META_ID_DIRTY_BITMAP = 2      # qemu:dirty-bitmap contexts would start here (not supported)

NBD_MAX_BLOCK_STATUS_EXTENTS = (1 << 20) // 8   # 1 MiB of extents in one reply chunk
MAX_NBD_REQUESTS = 16

_U32 = (1 << 32) - 1


# --------------------------------------------------------------------------
# Data types


@attrs.define(eq=False)
class NBDRequest:
    """One decoded request (QEMU's NBDRequest); ``from_`` is QEMU's ``from``."""

    handle: int = 0
    from_: int = 0
    len: int = 0
    flags: int = 0
    type: int = 0


@attrs.define(eq=False)
class NBDRequestData:
    client: "NBDClient"
    data: bytearray | None = None
    complete: bool = False   # the whole request, payload included, was read


@attrs.define(eq=False)
class NBDExportMetaContexts:
    """The contexts chosen by NBD_OPT_SET_META_CONTEXT (and the scratch copy of LIST)."""

    exp: "NBDExport | None" = None
    count: int = 0
    base_allocation: bool = False
    allocation_depth: bool = False


@attrs.define(eq=False)
class NBDExport(BlockExport):
    """An NBD export (QEMU's struct NBDExport); ``common`` is the BlockExport base."""

    name: str | None = None
    description: str | None = None
    size: int = 0
    nbdflags: int = 0
    clients: list["NBDClient"] = attrs.field(factory=list)
    allocation_depth: bool = False

    @property
    def common(self) -> BlockExport:
        return self


exports: list[NBDExport] = []


@attrs.define(eq=False)
class NBDClient:
    """One connection (QEMU's struct NBDClient)."""

    sioc: QIOChannelSocket
    ioc: QIOChannel
    close_fn: Callable[["NBDClient", bool], None] | None = None
    tlscreds: Any = None
    tlsauthz: str | None = None
    refcount: int = 1
    exp: NBDExport | None = None
    recv_coroutine: Coroutine | None = None
    send_lock: CoMutex = attrs.field(factory=lambda: CoMutex("send_lock"))
    send_coroutine: Coroutine | None = None
    nb_requests: int = 0
    closing: bool = False
    check_align: int = 0             # non-zero: trace requests not aligned to this
    structured_reply: bool = False
    export_meta: NBDExportMetaContexts = attrs.field(factory=NBDExportMetaContexts)
    opt: int = 0                     # the option being negotiated
    optlen: int = 0                  # bytes of it not read yet

    @property
    def trace_name(self) -> str:
        return f"nbd-client@{self.sioc.fd}"


def _err(errp: list | None, msg: str) -> None:
    if errp is not None:
        errp.append(Error(msg))


def _prepend(errp: list | None, prefix: str) -> None:
    if errp:
        error_prepend(errp[-1], prefix)


def nbd_read(ioc: QIOChannel, buf, desc: str | None, errp: list | None) -> int:
    """Read all of ``buf``: 0, or -1 with "Failed to read <desc>: ..." in errp (include/block/nbd.h)."""
    if qio_channel_read_all(ioc, buf, errp) < 0:
        if desc:
            _prepend(errp, f"Failed to read {desc}: ")
        return -1
    return 0


def nbd_write(ioc: QIOChannel, buf, errp: list | None) -> int:
    return -errno.EIO if qio_channel_write_all(ioc, buf, errp) < 0 else 0


def nbd_drop(ioc: QIOChannel, size: int, errp: list | None) -> int:
    """Read and discard ``size`` bytes (nbd/common.c)."""
    buf = bytearray(min(65536, size))
    view = memoryview(buf)
    while size > 0:
        count = min(65536, size)
        if nbd_read(ioc, view[:count], None, errp) < 0:
            return -1
        size -= count
    return 0


# --------------------------------------------------------------------------
# Option replies


def nbd_negotiate_send_rep_len(client: NBDClient, type: int, len: int, errp: list | None) -> int:
    """Send an option reply header announcing ``len`` bytes of payload."""
    if trace_nbd_negotiate_send_rep_len.event.enabled:
        trace_nbd_negotiate_send_rep_len(client.opt, nbd_opt_lookup(client.opt), type, nbd_rep_lookup(type), len)
    assert len < NBD_MAX_BUFFER_SIZE
    return nbd_write(client.ioc, NBDOptionReply.pack(NBD_REP_MAGIC, client.opt, type, len), errp)


def nbd_negotiate_send_rep(client: NBDClient, type: int, errp: list | None) -> int:
    return nbd_negotiate_send_rep_len(client, type, 0, errp)


def nbd_negotiate_send_rep_err(client: NBDClient, type: int, errp: list | None, msg: str) -> int:
    """Send an error reply with a message."""
    data = msg.encode()
    assert len(data) < NBD_MAX_STRING_SIZE
    if trace_nbd_negotiate_send_rep_err.event.enabled:
        trace_nbd_negotiate_send_rep_err(msg)
    ret = nbd_negotiate_send_rep_len(client, type, len(data), errp)
    if ret < 0:
        return ret
    if nbd_write(client.ioc, data, errp) < 0:
        _prepend(errp, "write failed (error message): ")
        return -errno.EIO
    return 0


def nbd_sanitize_name(name: str) -> str:
    """A name short enough for an error reply."""
    return name if len(name) < 80 else f"{name[:80]}..."


def nbd_opt_drop(client: NBDClient, type: int, errp: list | None, msg: str) -> int:
    """Skip the rest of the option, then send an error reply: -errno on I/O failure, else 0."""
    ret = nbd_drop(client.ioc, client.optlen, errp)
    client.optlen = 0
    if not ret:
        ret = nbd_negotiate_send_rep_err(client, type, errp, msg)
    return ret


def nbd_opt_invalid(client: NBDClient, errp: list | None, msg: str) -> int:
    return nbd_opt_drop(client, NBD_REP_ERR_INVALID, errp, msg)


def nbd_opt_read(client: NBDClient, size: int, check_nul: bool, errp: list | None) -> tuple[int, bytes]:
    """(1, data) on success; (0, b"") when an error reply already handled the option; (-errno, b"")."""
    if size > client.optlen:
        return nbd_opt_invalid(client, errp, f"Inconsistent lengths in option {nbd_opt_lookup(client.opt)}"), b""
    client.optlen -= size
    buf = bytearray(size)
    if qio_channel_read_all(client.ioc, buf, errp) < 0:
        return -errno.EIO, b""
    if check_nul and 0 in buf:
        return nbd_opt_invalid(client, errp, f"Unexpected embedded NUL in option {nbd_opt_lookup(client.opt)}"), b""
    return 1, bytes(buf)


def nbd_opt_skip(client: NBDClient, size: int, errp: list | None) -> int:
    if size > client.optlen:
        return nbd_opt_invalid(client, errp, f"Inconsistent lengths in option {nbd_opt_lookup(client.opt)}")
    client.optlen -= size
    return -errno.EIO if nbd_drop(client.ioc, size, errp) < 0 else 1


def nbd_opt_read_name(client: NBDClient, errp: list | None) -> tuple[int, str]:
    """Read a 32-bit length and that many bytes of name: (1, name), (0, "") or (-errno, "")."""
    ret, raw = nbd_opt_read(client, 4, False, errp)
    if ret <= 0:
        return ret, ""
    length = int.from_bytes(raw, "big")
    if length > NBD_MAX_STRING_SIZE:
        return nbd_opt_invalid(client, errp, f"Invalid name length: {length}"), ""
    ret, raw = nbd_opt_read(client, length, True, errp)
    if ret <= 0:
        return ret, ""
    return 1, raw.decode("utf-8", "surrogateescape")


def nbd_negotiate_send_rep_list(client: NBDClient, exp: NBDExport, errp: list | None) -> int:
    """One NBD_REP_SERVER reply of NBD_OPT_LIST."""
    name = (exp.name or "").encode()
    desc = (exp.description or "").encode()
    if trace_nbd_negotiate_send_rep_list.event.enabled:
        trace_nbd_negotiate_send_rep_list(exp.name or "", exp.description or "")
    ret = nbd_negotiate_send_rep_len(client, NBD_REP_SERVER, len(name) + len(desc) + 4, errp)
    if ret < 0:
        return ret
    if nbd_write(client.ioc, len(name).to_bytes(4, "big") + name + desc, errp) < 0:
        _prepend(errp, "write failed (name buffer): ")
        return -errno.EINVAL
    return 0


def nbd_negotiate_handle_list(client: NBDClient, errp: list | None) -> int:
    for exp in exports:
        if nbd_negotiate_send_rep_list(client, exp, errp):
            return -errno.EINVAL
    return nbd_negotiate_send_rep(client, NBD_REP_ACK, errp)


def nbd_check_meta_export(client: NBDClient) -> None:
    """Contexts chosen for another export do not apply to the one the client is going to use."""
    if client.exp is not client.export_meta.exp:
        client.export_meta.count = 0


def _client_flags(client: NBDClient, exp: NBDExport) -> int:
    myflags = exp.nbdflags
    if client.structured_reply:
        myflags |= NBD_FLAG_SEND_DF
    return myflags


def nbd_negotiate_handle_export_name(client: NBDClient, no_zeroes: bool, errp: list | None) -> int:
    """NBD_OPT_EXPORT_NAME: reply with size and flags; an unknown name can only drop the connection."""
    if trace_nbd_negotiate_handle_export_name.event.enabled:
        trace_nbd_negotiate_handle_export_name()
    if client.optlen > NBD_MAX_STRING_SIZE:
        _err(errp, "Bad length received")
        return -errno.EINVAL
    buf = bytearray(client.optlen)
    if nbd_read(client.ioc, buf, "export name", errp) < 0:
        return -errno.EIO
    name = buf.decode("utf-8", "surrogateescape")
    client.optlen = 0
    if trace_nbd_negotiate_handle_export_name_request.event.enabled:
        trace_nbd_negotiate_handle_export_name_request(name)
    exp = nbd_export_find(name)
    if exp is None:
        _err(errp, "export not found")
        return -errno.EINVAL
    myflags = _client_flags(client, exp)
    if trace_nbd_negotiate_new_style_size_flags.event.enabled:
        trace_nbd_negotiate_new_style_size_flags(exp.size, myflags)
    reply = exp.size.to_bytes(8, "big") + myflags.to_bytes(2, "big")
    if not no_zeroes:
        reply += bytes(NBD_REPLY_EXPORT_NAME_SIZE - 10)
    ret = nbd_write(client.ioc, reply, errp)
    if ret < 0:
        _prepend(errp, "write failed: ")
        return ret
    client.exp = exp   # QEMU sets it before the write, and would then release a reference it never took
    exp.clients.append(client)
    blk_exp_ref(exp)
    nbd_check_meta_export(client)
    return 0


def nbd_negotiate_send_info(client: NBDClient, info: int, buf: bytes, errp: list | None) -> int:
    """One NBD_REP_INFO reply: the 16-bit info type, then ``buf``."""
    if trace_nbd_negotiate_send_info.event.enabled:
        trace_nbd_negotiate_send_info(info, nbd_info_lookup(info), len(buf))
    rc = nbd_negotiate_send_rep_len(client, NBD_REP_INFO, 2 + len(buf), errp)
    if rc < 0:
        return rc
    if nbd_write(client.ioc, info.to_bytes(2, "big") + buf, errp) < 0:
        return -errno.EIO
    return 0


def nbd_reject_length(client: NBDClient, fatal: bool, errp: list | None) -> int:
    """The option carried a payload it must not have: EINVAL reply (and drop the connection if ``fatal``)."""
    assert client.optlen
    msg = f"option '{nbd_opt_lookup(client.opt)}' has unexpected length"
    ret = nbd_opt_invalid(client, errp, msg)
    if fatal and not ret:
        _err(errp, msg)
        return -errno.EINVAL
    return ret


def nbd_negotiate_handle_info(client: NBDClient, errp: list | None) -> int:
    """NBD_OPT_INFO and NBD_OPT_GO: -errno, 0 for the next option, 1 to start transmission."""
    rc, name = nbd_opt_read_name(client, errp)
    if rc <= 0:
        return rc
    if trace_nbd_negotiate_handle_export_name_request.event.enabled:
        trace_nbd_negotiate_handle_export_name_request(name)
    rc, raw = nbd_opt_read(client, 2, False, errp)
    if rc <= 0:
        return rc
    requests = int.from_bytes(raw, "big")
    if trace_nbd_negotiate_handle_info_requests.event.enabled:
        trace_nbd_negotiate_handle_info_requests(requests)
    sendname = blocksize = False
    for _ in range(requests):
        rc, raw = nbd_opt_read(client, 2, False, errp)
        if rc <= 0:
            return rc
        request = int.from_bytes(raw, "big")
        if trace_nbd_negotiate_handle_info_request.event.enabled:
            trace_nbd_negotiate_handle_info_request(request, nbd_info_lookup(request))
        if request == NBD_INFO_NAME:
            sendname = True
        elif request == NBD_INFO_BLOCK_SIZE:
            blocksize = True
    if client.optlen:
        return nbd_reject_length(client, False, errp)

    exp = nbd_export_find(name)
    if exp is None:
        return nbd_negotiate_send_rep_err(client, NBD_REP_ERR_UNKNOWN, errp,
                                          f"export '{nbd_sanitize_name(name)}' not present")
    if sendname:
        rc = nbd_negotiate_send_info(client, NBD_INFO_NAME, name.encode("utf-8", "surrogateescape"), errp)
        if rc < 0:
            return rc
    if exp.description:
        rc = nbd_negotiate_send_info(client, NBD_INFO_DESCRIPTION, exp.description.encode(), errp)
        if rc < 0:
            return rc

    # Block sizes: the real minimum only to a client that asked (or for INFO); 1 means "any".
    blk = exp.blk
    check_align = 0
    if client.opt == NBD_OPT_INFO or blocksize:
        check_align = minimum = blk_get_request_alignment(blk)
    else:
        minimum = 1
    assert minimum <= NBD_MAX_BUFFER_SIZE
    preferred = max(4096, minimum)          # QEMU hard-codes 4096 (a TODO names bl.opt_transfer)
    maximum = min(blk_get_max_transfer(blk), NBD_MAX_BUFFER_SIZE)
    if trace_nbd_negotiate_handle_info_block_size.event.enabled:
        trace_nbd_negotiate_handle_info_block_size(minimum, preferred, maximum)
    rc = nbd_negotiate_send_info(client, NBD_INFO_BLOCK_SIZE,
                                 minimum.to_bytes(4, "big") + preferred.to_bytes(4, "big")
                                 + maximum.to_bytes(4, "big"), errp)
    if rc < 0:
        return rc

    myflags = _client_flags(client, exp)
    if trace_nbd_negotiate_new_style_size_flags.event.enabled:
        trace_nbd_negotiate_new_style_size_flags(exp.size, myflags)
    rc = nbd_negotiate_send_info(client, NBD_INFO_EXPORT, exp.size.to_bytes(8, "big") + myflags.to_bytes(2, "big"),
                                 errp)
    if rc < 0:
        return rc

    # A client asking only for INFO, without block sizes, on an export that needs alignment.
    if client.opt == NBD_OPT_INFO and not blocksize and blk_get_request_alignment(blk) > 1:
        return nbd_negotiate_send_rep_err(client, NBD_REP_ERR_BLOCK_SIZE_REQD, errp,
                                          "request NBD_INFO_BLOCK_SIZE to use this export")
    rc = nbd_negotiate_send_rep(client, NBD_REP_ACK, errp)
    if rc < 0:
        return rc
    if client.opt == NBD_OPT_GO:
        client.exp = exp
        client.check_align = check_align
        exp.clients.append(client)
        blk_exp_ref(exp)
        nbd_check_meta_export(client)
        rc = 1
    return rc


# --------------------------------------------------------------------------
# Meta contexts


def nbd_negotiate_send_meta_context(client: NBDClient, context: str, context_id: int, errp: list | None) -> int:
    """One NBD_REP_META_CONTEXT reply (LIST replies carry id 0)."""
    if client.opt == NBD_OPT_LIST_META_CONTEXT:
        context_id = 0
    if trace_nbd_negotiate_meta_query_reply.event.enabled:
        trace_nbd_negotiate_meta_query_reply(context, context_id)
    name = context.encode()
    hdr = NBDOptionReply.pack(NBD_REP_MAGIC, client.opt, NBD_REP_META_CONTEXT, 4 + len(name))
    return -errno.EIO if qio_channel_writev_all(client.ioc, [hdr + context_id.to_bytes(4, "big"), name],
                                                errp) < 0 else 0


def nbd_meta_empty_or_pattern(client: NBDClient, pattern: str, query: str) -> bool:
    """True if ``query`` is ``pattern``, or empty while LISTing."""
    if not query:
        if trace_nbd_negotiate_meta_query_parse.event.enabled:
            trace_nbd_negotiate_meta_query_parse("empty")
        return client.opt == NBD_OPT_LIST_META_CONTEXT
    if query == pattern:
        if trace_nbd_negotiate_meta_query_parse.event.enabled:
            trace_nbd_negotiate_meta_query_parse(pattern)
        return True
    if trace_nbd_negotiate_meta_query_skip.event.enabled:
        trace_nbd_negotiate_meta_query_skip("pattern not matched")
    return False


def nbd_meta_base_query(client: NBDClient, meta: NBDExportMetaContexts, query: str) -> bool:
    """The ``base:`` namespace (only ``base:allocation``); True if ``query`` was in it."""
    if not query.startswith("base:"):
        return False
    if trace_nbd_negotiate_meta_query_parse.event.enabled:
        trace_nbd_negotiate_meta_query_parse("base:")
    if nbd_meta_empty_or_pattern(client, "allocation", query[len("base:"):]):
        meta.base_allocation = True
    return True


def nbd_meta_qemu_query(client: NBDClient, meta: NBDExportMetaContexts, query: str) -> bool:
    """The ``qemu:`` namespace: ``qemu:allocation-depth`` (dirty bitmaps: none to offer)."""
    if not query.startswith("qemu:"):
        return False
    if trace_nbd_negotiate_meta_query_parse.event.enabled:
        trace_nbd_negotiate_meta_query_parse("qemu:")
    query = query[len("qemu:"):]
    if not query:
        if client.opt == NBD_OPT_LIST_META_CONTEXT:
            meta.allocation_depth = meta.exp.allocation_depth
        if trace_nbd_negotiate_meta_query_parse.event.enabled:
            trace_nbd_negotiate_meta_query_parse("empty")
        return True
    if query == "allocation-depth":
        if trace_nbd_negotiate_meta_query_parse.event.enabled:
            trace_nbd_negotiate_meta_query_parse("allocation-depth")
        meta.allocation_depth = meta.exp.allocation_depth
        return True
    if query.startswith("dirty-bitmap:"):
        if trace_nbd_negotiate_meta_query_parse.event.enabled:
            trace_nbd_negotiate_meta_query_parse("dirty-bitmap:")
        if trace_nbd_negotiate_meta_query_skip.event.enabled:
            trace_nbd_negotiate_meta_query_skip("no dirty-bitmap match")
        return True
    if trace_nbd_negotiate_meta_query_skip.event.enabled:
        trace_nbd_negotiate_meta_query_skip("unknown qemu context")
    return True


def nbd_negotiate_meta_query(client: NBDClient, meta: NBDExportMetaContexts, errp: list | None) -> int:
    """Read and parse one query: -errno, 0 (option handled by an error reply) or 1."""
    ret, raw = nbd_opt_read(client, 4, False, errp)
    if ret <= 0:
        return ret
    length = int.from_bytes(raw, "big")
    if length > NBD_MAX_STRING_SIZE:
        if trace_nbd_negotiate_meta_query_skip.event.enabled:
            trace_nbd_negotiate_meta_query_skip("length too long")
        return nbd_opt_skip(client, length, errp)
    ret, raw = nbd_opt_read(client, length, True, errp)
    if ret <= 0:
        return ret
    query = raw.decode("utf-8", "surrogateescape")
    if nbd_meta_base_query(client, meta, query):
        return 1
    if nbd_meta_qemu_query(client, meta, query):
        return 1
    if trace_nbd_negotiate_meta_query_skip.event.enabled:
        trace_nbd_negotiate_meta_query_skip("unknown namespace")
    return 1


def nbd_negotiate_meta_queries(client: NBDClient, meta: NBDExportMetaContexts, errp: list | None) -> int:
    """NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT: -errno, or 0 when handled."""
    if client.opt == NBD_OPT_SET_META_CONTEXT and not client.structured_reply:
        return nbd_opt_invalid(client, errp, f"request option '{nbd_opt_lookup(client.opt)}' when structured "
                                             "reply is not negotiated")
    if client.opt == NBD_OPT_LIST_META_CONTEXT:
        meta = NBDExportMetaContexts()   # only SET changes the client's choice
    else:
        meta.exp = None
        meta.count = 0
        meta.base_allocation = meta.allocation_depth = False

    ret, export_name = nbd_opt_read_name(client, errp)
    if ret <= 0:
        return ret
    meta.exp = nbd_export_find(export_name)
    if meta.exp is None:
        return nbd_opt_drop(client, NBD_REP_ERR_UNKNOWN, errp,
                            f"export '{nbd_sanitize_name(export_name)}' not present")
    ret, raw = nbd_opt_read(client, 4, False, errp)
    if ret <= 0:
        return ret
    nb_queries = int.from_bytes(raw, "big")
    if trace_nbd_negotiate_meta_context.event.enabled:
        trace_nbd_negotiate_meta_context(nbd_opt_lookup(client.opt), export_name, nb_queries)
    if client.opt == NBD_OPT_LIST_META_CONTEXT and not nb_queries:
        meta.base_allocation = True     # list every context we have
        meta.allocation_depth = meta.exp.allocation_depth
    else:
        for _ in range(nb_queries):
            ret = nbd_negotiate_meta_query(client, meta, errp)
            if ret <= 0:
                return ret
    count = 0
    if meta.base_allocation:
        ret = nbd_negotiate_send_meta_context(client, "base:allocation", NBD_META_ID_BASE_ALLOCATION, errp)
        if ret < 0:
            return ret
        count += 1
    if meta.allocation_depth:
        ret = nbd_negotiate_send_meta_context(client, "qemu:allocation-depth", NBD_META_ID_ALLOCATION_DEPTH, errp)
        if ret < 0:
            return ret
        count += 1
    ret = nbd_negotiate_send_rep(client, NBD_REP_ACK, errp)
    if ret == 0:
        meta.count = count
    return ret


# --------------------------------------------------------------------------
# The option loop and the handshake


def nbd_negotiate_options(client: NBDClient, errp: list | None) -> int:
    """Answer options until GO/EXPORT_NAME: -errno, 0 to transmit, 1 after NBD_OPT_ABORT."""
    raw = bytearray(4)
    if nbd_read(client.ioc, raw, "flags", errp) < 0:
        return -errno.EIO
    flags = int.from_bytes(raw, "big")
    if trace_nbd_negotiate_options_flags.event.enabled:
        trace_nbd_negotiate_options_flags(flags)
    fixed_newstyle = no_zeroes = False
    if flags & NBD_FLAG_C_FIXED_NEWSTYLE:
        fixed_newstyle = True
        flags &= ~NBD_FLAG_C_FIXED_NEWSTYLE
    if flags & NBD_FLAG_C_NO_ZEROES:
        no_zeroes = True
        flags &= ~NBD_FLAG_C_NO_ZEROES
    if flags != 0:
        _err(errp, f"Unknown client flags 0x{flags:x} received")
        return -errno.EINVAL

    hdr = bytearray(16)
    while True:
        if nbd_read(client.ioc, memoryview(hdr)[:8], "opts magic", errp) < 0:
            return -errno.EINVAL
        magic = int.from_bytes(hdr[:8], "big")
        if trace_nbd_negotiate_options_check_magic.event.enabled:
            trace_nbd_negotiate_options_check_magic(magic)
        if magic != NBD_OPTS_MAGIC:
            _err(errp, "Bad magic received")
            return -errno.EINVAL
        if nbd_read(client.ioc, memoryview(hdr)[8:12], "option", errp) < 0:
            return -errno.EINVAL
        option = int.from_bytes(hdr[8:12], "big")
        client.opt = option
        if nbd_read(client.ioc, memoryview(hdr)[12:16], "option length", errp) < 0:
            return -errno.EINVAL
        length = int.from_bytes(hdr[12:16], "big")
        assert not client.optlen
        client.optlen = length
        if length > NBD_MAX_BUFFER_SIZE:
            _err(errp, f"len ({length} ) is larger than max len ({NBD_MAX_BUFFER_SIZE})")   # sic, QEMU 7.2
            return -errno.EINVAL
        if trace_nbd_negotiate_options_check_option.event.enabled:
            trace_nbd_negotiate_options_check_option(option, nbd_opt_lookup(option))

        if fixed_newstyle:
            if option == NBD_OPT_LIST:
                ret = nbd_reject_length(client, False, errp) if length else nbd_negotiate_handle_list(client, errp)
            elif option == NBD_OPT_ABORT:
                # Reply if we can, but the client may hang up without reading it.
                nbd_negotiate_send_rep(client, NBD_REP_ACK, None)
                return 1
            elif option == NBD_OPT_EXPORT_NAME:
                return nbd_negotiate_handle_export_name(client, no_zeroes, errp)
            elif option in (NBD_OPT_INFO, NBD_OPT_GO):
                ret = nbd_negotiate_handle_info(client, errp)
                if ret == 1:
                    assert option == NBD_OPT_GO
                    return 0
            elif option == NBD_OPT_STARTTLS:
                if length:
                    ret = nbd_reject_length(client, False, errp)
                else:
                    ret = nbd_negotiate_send_rep_err(client, NBD_REP_ERR_POLICY, errp, "TLS not configured")
            elif option == NBD_OPT_STRUCTURED_REPLY:
                if length:
                    ret = nbd_reject_length(client, False, errp)
                elif client.structured_reply:
                    ret = nbd_negotiate_send_rep_err(client, NBD_REP_ERR_INVALID, errp,
                                                     "structured reply already negotiated")
                else:
                    ret = nbd_negotiate_send_rep(client, NBD_REP_ACK, errp)
                    client.structured_reply = True
            elif option in (NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT):
                ret = nbd_negotiate_meta_queries(client, client.export_meta, errp)
            else:
                ret = nbd_opt_drop(client, NBD_REP_ERR_UNSUP, errp,
                                   f"Unsupported option {option} ({nbd_opt_lookup(option)})")
        else:
            # Old (non-fixed) newstyle: nothing but NBD_OPT_EXPORT_NAME can be answered.
            if option == NBD_OPT_EXPORT_NAME:
                return nbd_negotiate_handle_export_name(client, no_zeroes, errp)
            _err(errp, f"Unsupported option {option} ({nbd_opt_lookup(option)})")
            return -errno.EINVAL
        if ret < 0:
            return ret


@coroutine_fn
def nbd_negotiate(client: NBDClient, errp: list | None) -> int:
    """The handshake: -errno, 0 when transmission starts, 1 after NBD_OPT_ABORT."""
    qio_channel_set_blocking(client.ioc, False)
    if trace_nbd_negotiate_begin.event.enabled:
        trace_nbd_negotiate_begin()
    buf = (NBD_INIT_MAGIC.to_bytes(8, "big") + NBD_OPTS_MAGIC.to_bytes(8, "big")
           + (NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_bytes(2, "big"))
    if nbd_write(client.ioc, buf, errp) < 0:
        _prepend(errp, "write failed: ")
        return -errno.EINVAL
    ret = nbd_negotiate_options(client, errp)
    if ret != 0:
        if ret < 0:
            _prepend(errp, "option negotiation failed: ")
        return ret
    # Requests are served in the export's AioContext: wait for the socket there.
    if client.exp is not None and client.exp.ctx is not None:
        qio_channel_attach_aio_context(client.ioc, client.exp.ctx)
    assert not client.optlen
    if trace_nbd_negotiate_success.event.enabled:
        trace_nbd_negotiate_success()
    return 0


# --------------------------------------------------------------------------
# Receiving requests


@coroutine_fn
def nbd_read_eof(client: NBDClient, buffer: memoryview, errp: list | None) -> int:
    """Fill ``buffer``: 1 when done, 0 at a clean end-of-file, -EIO otherwise (server.c's own copy)."""
    size = len(buffer)
    pos = 0
    ioc = client.ioc
    while pos < size:
        n = qio_channel_readv(ioc, [buffer[pos:]], errp)
        if n == QIO_CHANNEL_ERR_BLOCK:
            qio_channel_yield(ioc, G_IO_IN)
            continue
        if n < 0:
            return -errno.EIO
        if n == 0:
            if pos:
                _err(errp, "Unexpected end-of-file before all bytes were read")
                return -errno.EIO
            return 0
        pos += n
    return 1


@coroutine_fn
def nbd_receive_request(client: NBDClient, request: NBDRequest, errp: list | None) -> int:
    """Read and decode one 28-byte request header: 0, or -errno."""
    buf = bytearray(NBD_REQUEST_SIZE)
    ret = nbd_read_eof(client, memoryview(buf), errp)
    if ret < 0:
        return ret
    if ret == 0:
        return -errno.EIO   # the client hung up between requests: no message
    magic, request.flags, request.type, request.handle, request.from_, request.len = NBDRequestWire.unpack(buf)
    if trace_nbd_receive_request.event.enabled:
        trace_nbd_receive_request(magic, request.flags, request.type, request.from_, request.len)
    if magic != NBD_REQUEST_MAGIC:
        _err(errp, f"invalid magic (got 0x{magic:x})")
        return -errno.EINVAL
    return 0


def nbd_client_get(client: NBDClient) -> None:
    client.refcount += 1


def nbd_client_put(client: NBDClient) -> None:
    """Drop a reference; the last one closes the channel and releases the export."""
    client.refcount -= 1
    if client.refcount == 0:
        # The last reference is the one client_close() gave back through close_fn.
        assert client.closing
        if trace_nbd_client_put_free.event.enabled:
            trace_nbd_client_put_free(client)
        qio_channel_detach_aio_context(client.ioc)
        qio_channel_close(client.ioc)
        exp = client.exp
        if exp is not None:
            exp.clients.remove(client)
            blk_exp_unref(exp)


def client_close(client: NBDClient, negotiated: bool) -> None:
    """Shut the connection down; running requests finish, then drop their references."""
    if client.closing:
        return
    client.closing = True
    if trace_nbd_client_close.event.enabled:
        trace_nbd_client_close(client, int(negotiated))
    qio_channel_shutdown(client.ioc, QIO_CHANNEL_SHUTDOWN_BOTH, None)
    if client.close_fn is not None:
        client.close_fn(client, negotiated)


def nbd_request_get(client: NBDClient) -> NBDRequestData:
    assert client.nb_requests <= MAX_NBD_REQUESTS - 1
    client.nb_requests += 1
    nbd_client_get(client)
    return NBDRequestData(client)


def nbd_request_put(req: NBDRequestData) -> None:
    client = req.client
    req.data = None
    client.nb_requests -= 1
    nbd_client_receive_next_request(client)
    nbd_client_put(client)


@coroutine_fn
def nbd_co_receive_request(req: NBDRequestData, request: NBDRequest, errp: list | None) -> int:
    """Read one request (and a write's payload) and check it.

    0: valid; -EIO: drop the connection now; any other -errno: reply with an
    error (the caller disconnects too if the payload could not be read).
    """
    client = req.client
    assert client.recv_coroutine is qemu_coroutine_self()
    ret = nbd_receive_request(client, request, errp)
    if ret < 0:
        return ret
    type_ = request.type
    if trace_nbd_co_receive_request_decode_type.event.enabled:
        trace_nbd_co_receive_request_decode_type(request.handle, type_, nbd_cmd_lookup(type_))
    if type_ != NBD_CMD_WRITE:
        req.complete = True   # no payload: the next request can be read
    if type_ == NBD_CMD_DISC:
        return -errno.EIO     # disconnect without a reply, whatever the other fields say

    exp = client.exp
    if type_ == NBD_CMD_READ or type_ == NBD_CMD_WRITE or type_ == NBD_CMD_CACHE:
        if request.len > NBD_MAX_BUFFER_SIZE:
            _err(errp, f"len ({request.len} ) is larger than max len ({NBD_MAX_BUFFER_SIZE})")   # sic, QEMU 7.2
            return -errno.EINVAL
        if type_ != NBD_CMD_CACHE:
            req.data = bytearray(request.len)   # blk_try_blockalign
    if type_ == NBD_CMD_WRITE:
        if nbd_read(client.ioc, req.data, "CMD_WRITE data", errp) < 0:
            return -errno.EIO
        req.complete = True
        if trace_nbd_co_receive_request_payload_received.event.enabled:
            trace_nbd_co_receive_request_payload_received(request.handle, request.len)

    # Sanity checks
    if exp.nbdflags & NBD_FLAG_READ_ONLY and type_ in (NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_CMD_TRIM):
        _err(errp, "Export is read-only")
        return -errno.EROFS
    if request.from_ > exp.size or request.len > exp.size - request.from_:
        _err(errp, f"operation past EOF; From: {request.from_}, Len: {request.len}, Size: {exp.size}")
        return -errno.ENOSPC if type_ in (NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES) else -errno.EINVAL
    if client.check_align and (request.from_ | request.len) % client.check_align:
        # The block layer copes with unaligned requests; trace the client's non-compliance.
        if trace_nbd_co_receive_align_compliance.event.enabled:
            trace_nbd_co_receive_align_compliance(nbd_cmd_lookup(type_), request.from_, request.len,
                                                  client.check_align)
    valid_flags = NBD_CMD_FLAG_FUA
    if type_ == NBD_CMD_READ and client.structured_reply:
        valid_flags |= NBD_CMD_FLAG_DF
    elif type_ == NBD_CMD_WRITE_ZEROES:
        valid_flags |= NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO
    elif type_ == NBD_CMD_BLOCK_STATUS:
        valid_flags |= NBD_CMD_FLAG_REQ_ONE
    if request.flags & ~valid_flags:
        _err(errp, f"unsupported flags for command {nbd_cmd_lookup(type_)} (got 0x{request.flags:x})")
        return -errno.EINVAL
    return 0


# --------------------------------------------------------------------------
# Sending replies


@coroutine_fn
def nbd_co_send_iov(client: NBDClient, iov: list, errp: list | None) -> int:
    """Send one whole reply under the send lock: 0 or -EIO."""
    qemu_co_mutex_lock(client.send_lock)
    client.send_coroutine = qemu_coroutine_self()
    ret = -errno.EIO if qio_channel_writev_all(client.ioc, iov, errp) < 0 else 0
    client.send_coroutine = None
    qemu_co_mutex_unlock(client.send_lock)
    return ret


@coroutine_fn
def nbd_co_send_simple_reply(client: NBDClient, handle: int, error: int, data, len: int,
                             errp: list | None) -> int:
    nbd_err = system_errno_to_nbd_errno(error)
    if trace_nbd_co_send_simple_reply.event.enabled:
        trace_nbd_co_send_simple_reply(handle, nbd_err, nbd_err_lookup(nbd_err), len)
    reply = NBDSimpleReply.pack(NBD_SIMPLE_REPLY_MAGIC, nbd_err, handle)
    return nbd_co_send_iov(client, [reply, data] if len else [reply], errp)


def set_be_chunk(flags: int, type: int, handle: int, length: int) -> bytes:
    return NBDStructuredReplyChunk.pack(NBD_STRUCTURED_REPLY_MAGIC, flags, type, handle, length)


@coroutine_fn
def nbd_co_send_structured_done(client: NBDClient, handle: int, errp: list | None) -> int:
    if trace_nbd_co_send_structured_done.event.enabled:
        trace_nbd_co_send_structured_done(handle)
    return nbd_co_send_iov(client, [set_be_chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, handle, 0)], errp)


@coroutine_fn
def nbd_co_send_structured_read(client: NBDClient, handle: int, offset: int, data, size: int, final: bool,
                                errp: list | None) -> int:
    assert size
    if trace_nbd_co_send_structured_read.event.enabled:
        trace_nbd_co_send_structured_read(handle, offset, data, size)
    chunk = (set_be_chunk(NBD_REPLY_FLAG_DONE if final else 0, NBD_REPLY_TYPE_OFFSET_DATA, handle, 8 + size)
             + offset.to_bytes(8, "big"))
    return nbd_co_send_iov(client, [chunk, data], errp)


@coroutine_fn
def nbd_co_send_structured_error(client: NBDClient, handle: int, error: int, msg: str | None,
                                 errp: list | None) -> int:
    nbd_err = system_errno_to_nbd_errno(error)
    assert nbd_err
    text = (msg or "").encode()
    if trace_nbd_co_send_structured_error.event.enabled:
        trace_nbd_co_send_structured_error(handle, nbd_err, nbd_err_lookup(nbd_err), msg or "")
    chunk = (set_be_chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, handle, 6 + len(text))
             + nbd_err.to_bytes(4, "big") + len(text).to_bytes(2, "big"))
    return nbd_co_send_iov(client, [chunk + text], errp)


@coroutine_fn
def nbd_co_send_sparse_read(client: NBDClient, handle: int, offset: int, data: bytearray, size: int,
                            errp: list | None) -> int:
    """A structured read: OFFSET_HOLE chunks for zero ranges, OFFSET_DATA chunks for the rest.

    Returns -errno only if sending failed; a block status failure is reported to the client.
    """
    exp = client.exp
    blk = exp.blk
    bs = blk_bs(blk)
    view = memoryview(data)
    progress = 0
    ret = 0
    while progress < size:
        status, pnum, _, _ = bdrv_co_block_status_above(bs, None, True, offset + progress, size - progress)
        if status < 0:
            return nbd_co_send_structured_error(client, handle, -status,
                                                f"unable to check for holes: {strerror(-status)}", errp)
        assert pnum and pnum <= size - progress
        final = progress + pnum == size
        if status & BDRV_BLOCK_ZERO:
            if trace_nbd_co_send_structured_read_hole.event.enabled:
                trace_nbd_co_send_structured_read_hole(handle, offset + progress, pnum)
            chunk = (set_be_chunk(NBD_REPLY_FLAG_DONE if final else 0, NBD_REPLY_TYPE_OFFSET_HOLE, handle, 12)
                     + (offset + progress).to_bytes(8, "big") + pnum.to_bytes(4, "big"))
            ret = nbd_co_send_iov(client, [chunk], errp)
        else:
            part = view[progress:progress + pnum]
            ret = blk_co_preadv(blk, offset + progress, pnum, QEMUIOVector([part], -1), 0)
            if ret < 0:
                if errp is not None:
                    errp.append(error_setg_errno(-ret, "reading from file failed"))
                break
            ret = nbd_co_send_structured_read(client, handle, offset + progress, part, pnum, final, errp)
        if ret < 0:
            break
        progress += pnum
    return ret


@attrs.define(eq=False)
class NBDExtentArray:
    """Extents collected for one BLOCK_STATUS reply chunk (adjacent equal flags merged)."""

    nb_alloc: int
    extents: list[list[int]] = attrs.field(factory=list)   # [length, flags]
    total_length: int = 0
    can_add: bool = True


def nbd_extent_array_new(nb_alloc: int) -> NBDExtentArray:
    return NBDExtentArray(nb_alloc)


def nbd_extent_array_add(ea: NBDExtentArray, length: int, flags: int) -> int:
    """Add an extent: 0, or -1 when the array is full (after which nothing may be added)."""
    assert ea.can_add
    if not length:
        return 0
    if ea.extents and ea.extents[-1][1] == flags:
        total = ea.extents[-1][0] + length
        if total <= _U32:
            ea.extents[-1][0] = total
            ea.total_length += length
            return 0
    if len(ea.extents) >= ea.nb_alloc:
        ea.can_add = False
        return -1
    ea.total_length += length
    ea.extents.append([length, flags])
    return 0


@coroutine_fn
def blockstatus_to_extents(bs, offset: int, bytes: int, ea: NBDExtentArray) -> int:
    """base:allocation: HOLE where the chain has no data, ZERO where it reads as zeroes."""
    while bytes:
        ret, num, _, _ = bdrv_co_block_status_above(bs, None, True, offset, bytes)
        if ret < 0:
            return ret
        flags = (0 if ret & BDRV_BLOCK_DATA else NBD_STATE_HOLE) | (NBD_STATE_ZERO if ret & BDRV_BLOCK_ZERO else 0)
        if nbd_extent_array_add(ea, num, flags) < 0:
            return 0
        offset += num
        bytes -= num
    return 0


@coroutine_fn
def bdrv_is_allocated_above_depth(top, offset: int, bytes: int) -> tuple[int, int]:
    """(depth, pnum): 1 + how far down the backing chain the range's first part is allocated, 0 if nowhere.

    This is what QEMU 6.0+'s ``bdrv_is_allocated_above(bs, NULL, false, ...)``
    returns; qblock's own bdrv_is_allocated_above answers only 0 or 1.
    """
    n = bytes
    depth = 1
    intermediate = top
    while intermediate is not None:
        ret, pnum, _, _ = bdrv_co_block_status(intermediate, False, offset, bytes)
        if ret < 0:
            return ret, 0
        if ret & BDRV_BLOCK_ALLOCATED:
            return depth, pnum
        size_inter = bdrv_getlength(intermediate)
        if size_inter < 0:
            return size_inter, 0
        if n > pnum and (intermediate is top or offset + pnum < size_inter):
            n = pnum
        intermediate = backing_bs(intermediate)
        depth += 1
    return 0, n


@coroutine_fn
def blockalloc_to_extents(bs, offset: int, bytes: int, ea: NBDExtentArray) -> int:
    """qemu:allocation-depth: each extent's flags are its allocation depth."""
    while bytes:
        ret, num = bdrv_is_allocated_above_depth(bs, offset, bytes)
        if ret < 0:
            return ret
        if nbd_extent_array_add(ea, num, ret) < 0:
            return 0
        offset += num
        bytes -= num
    return 0


@coroutine_fn
def nbd_co_send_extents(client: NBDClient, handle: int, ea: NBDExtentArray, last: bool, context_id: int,
                        errp: list | None) -> int:
    ea.can_add = False
    if trace_nbd_co_send_extents.event.enabled:
        trace_nbd_co_send_extents(handle, len(ea.extents), context_id, ea.total_length, int(last))
    payload = b"".join(NBDExtent.pack(length, flags) for length, flags in ea.extents)
    chunk = (set_be_chunk(NBD_REPLY_FLAG_DONE if last else 0, NBD_REPLY_TYPE_BLOCK_STATUS, handle, 4 + len(payload))
             + context_id.to_bytes(4, "big"))
    return nbd_co_send_iov(client, [chunk, payload], errp)


@coroutine_fn
def nbd_co_send_block_status(client: NBDClient, handle: int, bs, offset: int, length: int, dont_fragment: bool,
                             last: bool, context_id: int, errp: list | None) -> int:
    ea = nbd_extent_array_new(1 if dont_fragment else NBD_MAX_BLOCK_STATUS_EXTENTS)
    if context_id == NBD_META_ID_BASE_ALLOCATION:
        ret = blockstatus_to_extents(bs, offset, length, ea)
    else:
        ret = blockalloc_to_extents(bs, offset, length, ea)
    if ret < 0:
        return nbd_co_send_structured_error(client, handle, -ret, "can't get block status", errp)
    return nbd_co_send_extents(client, handle, ea, last, context_id, errp)


@coroutine_fn
def nbd_send_generic_reply(client: NBDClient, handle: int, ret: int, error_msg: str | None,
                           errp: list | None) -> int:
    """A simple reply without payload, or a structured error chunk when ``ret`` < 0 and structured."""
    if client.structured_reply and ret < 0:
        return nbd_co_send_structured_error(client, handle, -ret, error_msg, errp)
    return nbd_co_send_simple_reply(client, handle, -ret if ret < 0 else 0, None, 0, errp)


# --------------------------------------------------------------------------
# Serving requests


@coroutine_fn
def nbd_do_cmd_read(client: NBDClient, request: NBDRequest, data: bytearray, errp: list | None) -> int:
    exp = client.exp
    assert request.type == NBD_CMD_READ
    if request.flags & NBD_CMD_FLAG_FUA:   # the protocol documents FUA for writes only; QEMU flushes
        ret = blk_co_flush(exp.blk)
        if ret < 0:
            return nbd_send_generic_reply(client, request.handle, ret, "flush failed", errp)
    if client.structured_reply and not request.flags & NBD_CMD_FLAG_DF and request.len:
        return nbd_co_send_sparse_read(client, request.handle, request.from_, data, request.len, errp)
    view = memoryview(data)
    ret = blk_co_preadv(exp.blk, request.from_, request.len, QEMUIOVector([view], -1), 0)
    if ret < 0:
        return nbd_send_generic_reply(client, request.handle, ret, "reading from file failed", errp)
    if client.structured_reply:
        if request.len:
            return nbd_co_send_structured_read(client, request.handle, request.from_, view, request.len, True,
                                               errp)
        return nbd_co_send_structured_done(client, request.handle, errp)
    return nbd_co_send_simple_reply(client, request.handle, 0, view, request.len, errp)


@coroutine_fn
def nbd_do_cmd_cache(client: NBDClient, request: NBDRequest, errp: list | None) -> int:
    """NBD_CMD_CACHE: a copy-on-read prefetch of the range."""
    ret = blk_co_preadv(client.exp.blk, request.from_, request.len, None,
                        BDRV_REQ_COPY_ON_READ | BDRV_REQ_PREFETCH)
    return nbd_send_generic_reply(client, request.handle, ret, "caching data failed", errp)


@coroutine_fn
def nbd_handle_request(client: NBDClient, request: NBDRequest, data: bytearray | None, errp: list | None) -> int:
    """Serve one valid request and send its reply: -errno only when sending failed."""
    exp = client.exp
    blk = exp.blk
    type_ = request.type
    if type_ == NBD_CMD_READ:
        return nbd_do_cmd_read(client, request, data, errp)
    if type_ == NBD_CMD_WRITE:
        flags = BDRV_REQ_FUA if request.flags & NBD_CMD_FLAG_FUA else 0
        ret = blk_co_pwritev(blk, request.from_, request.len, QEMUIOVector([memoryview(data)], -1), flags)
        return nbd_send_generic_reply(client, request.handle, ret, "writing to file failed", errp)
    if type_ == NBD_CMD_CACHE:
        return nbd_do_cmd_cache(client, request, errp)
    if type_ == NBD_CMD_WRITE_ZEROES:
        flags = 0
        if request.flags & NBD_CMD_FLAG_FUA:
            flags |= BDRV_REQ_FUA
        if not request.flags & NBD_CMD_FLAG_NO_HOLE:
            flags |= BDRV_REQ_MAY_UNMAP
        if request.flags & NBD_CMD_FLAG_FAST_ZERO:
            flags |= BDRV_REQ_NO_FALLBACK
        ret = 0
        offset, remaining = request.from_, request.len
        while ret >= 0 and remaining:   # the block layer takes at most BDRV_REQUEST_MAX_BYTES at once
            n = min(remaining, QEMU_ALIGN_DOWN(BDRV_REQUEST_MAX_BYTES, client.check_align or 1))
            ret = blk_co_pwrite_zeroes(blk, offset, n, flags)
            offset += n
            remaining -= n
        return nbd_send_generic_reply(client, request.handle, ret, "writing to file failed", errp)
    if type_ == NBD_CMD_FLUSH:
        ret = blk_co_flush(blk)
        return nbd_send_generic_reply(client, request.handle, ret, "flush failed", errp)
    if type_ == NBD_CMD_TRIM:
        ret = 0
        offset, remaining = request.from_, request.len
        while ret >= 0 and remaining:
            n = min(remaining, QEMU_ALIGN_DOWN(BDRV_REQUEST_MAX_BYTES, client.check_align or 1))
            ret = blk_co_pdiscard(blk, offset, n)
            offset += n
            remaining -= n
        if ret >= 0 and request.flags & NBD_CMD_FLAG_FUA:
            ret = blk_co_flush(blk)
        return nbd_send_generic_reply(client, request.handle, ret, "discard failed", errp)
    if type_ == NBD_CMD_BLOCK_STATUS:
        if not request.len:
            return nbd_send_generic_reply(client, request.handle, -errno.EINVAL, "need non-zero length", errp)
        meta = client.export_meta
        if meta.count:
            dont_fragment = bool(request.flags & NBD_CMD_FLAG_REQ_ONE)
            remaining = meta.count
            bs = blk_bs(blk)
            if meta.base_allocation:
                remaining -= 1
                ret = nbd_co_send_block_status(client, request.handle, bs, request.from_, request.len,
                                               dont_fragment, not remaining, NBD_META_ID_BASE_ALLOCATION, errp)
                if ret < 0:
                    return ret
            if meta.allocation_depth:
                remaining -= 1
                ret = nbd_co_send_block_status(client, request.handle, bs, request.from_, request.len,
                                               dont_fragment, not remaining, NBD_META_ID_ALLOCATION_DEPTH, errp)
                if ret < 0:
                    return ret
            assert not remaining
            return 0
        return nbd_send_generic_reply(client, request.handle, -errno.EINVAL, "CMD_BLOCK_STATUS not negotiated",
                                      errp)
    assert type_ != NBD_CMD_DISC   # nbd_co_receive_request disconnects instead
    return nbd_send_generic_reply(client, request.handle, -errno.EINVAL,
                                  f"invalid request type ({type_}) received", errp)


@coroutine_fn
def nbd_trip(client: NBDClient) -> None:
    """Receive one request, let the next one be received, then serve this one (owns a client reference)."""
    if trace_nbd_trip.event.enabled:
        trace_nbd_trip()
    if client.closing:
        nbd_client_put(client)
        return
    req = nbd_request_get(client)
    request = NBDRequest()
    errp: list = []
    ret = nbd_co_receive_request(req, request, errp)
    client.recv_coroutine = None
    if client.closing:
        # Closed while we waited for the request.
        nbd_request_put(req)
        nbd_client_put(client)
        return
    nbd_client_receive_next_request(client)
    if ret == -errno.EIO:
        _nbd_trip_disconnect(client, req, errp)
        return
    qio_channel_set_cork(client.ioc, True)
    if ret < 0:
        # Anything but -EIO is answered (QEMU 7.2 answers every such error with EINVAL).
        msg = str(errp.pop()) if errp else None
        ret = nbd_send_generic_reply(client, request.handle, -errno.EINVAL, msg, errp)
    else:
        ret = nbd_handle_request(client, request, req.data, errp)
    if ret < 0:
        _prepend(errp, "Failed to send reply: ")
        _nbd_trip_disconnect(client, req, errp)
        return
    if not req.complete:
        # A write whose payload was never read: the stream is out of step.
        errp.append(Error("Request handling failed in intermediate state"))
        _nbd_trip_disconnect(client, req, errp)
        return
    qio_channel_set_cork(client.ioc, False)
    nbd_request_put(req)
    nbd_client_put(client)


def _nbd_trip_disconnect(client: NBDClient, req: NBDRequestData, errp: list) -> None:
    if errp:
        error_report(f"Disconnect client, due to: {errp[-1]}")
    nbd_request_put(req)
    client_close(client, True)
    nbd_client_put(client)


def nbd_client_receive_next_request(client: NBDClient) -> None:
    """Start the coroutine that receives the next request, unless one waits already or too many are in flight."""
    if client.recv_coroutine is None and client.nb_requests < MAX_NBD_REQUESTS and not client.closing:
        nbd_client_get(client)
        client.recv_coroutine = qemu_coroutine_create(nbd_trip, client)
        aio_co_schedule(client.exp.ctx, client.recv_coroutine)


@coroutine_fn
def nbd_co_client_start(client: NBDClient) -> None:
    errp: list = []
    if nbd_negotiate(client, errp):
        if errp:
            error_report(str(errp[-1]))
        client_close(client, False)
        return
    nbd_client_receive_next_request(client)


def nbd_client_new(sioc: QIOChannelSocket, tlscreds: Any, tlsauthz: str | None,
                   close_fn: Callable[[NBDClient, bool], None] | None) -> NBDClient:
    """Serve a new connection; ``close_fn(client, negotiated)`` is told when it closes (and owns the reference)."""
    client = NBDClient(sioc=sioc, ioc=sioc, close_fn=close_fn, tlscreds=tlscreds, tlsauthz=tlsauthz)
    if trace_nbd_client_new.event.enabled:
        trace_nbd_client_new(client, sioc)
    qio_channel_set_delay(sioc, False)
    qemu_coroutine_enter(qemu_coroutine_create(nbd_co_client_start, client))
    return client


# --------------------------------------------------------------------------
# The export driver


def nbd_export_find(name: str) -> NBDExport | None:
    for exp in exports:
        if exp.name == name:
            return exp
    return None


def nbd_export_aio_context(exp: NBDExport):
    return exp.ctx


def nbd_export_create(exp: NBDExport, exp_args: dict[str, Any]) -> None:
    """Set an NBD export up on its BlockBackend; raises Error with QEMU's messages."""
    from qblock.nbd.blockdev_nbd import nbd_server_is_running, nbd_server_max_connections
    blk = exp.blk
    readonly = not exp_args.get("writable", False)
    if not nbd_server_is_running():
        raise Error("NBD server not running")
    name = exp_args["name"] if "name" in exp_args else exp_args["node-name"]
    if len(name.encode()) > NBD_MAX_STRING_SIZE:
        raise Error(f"export name '{name}' too long")
    description = exp_args.get("description")
    if description is not None and len(description.encode()) > NBD_MAX_STRING_SIZE:
        raise Error(f"description '{description}' too long")
    if nbd_export_find(name) is not None:
        raise Error(f"NBD server already has export named '{name}'")
    size = blk_getlength(blk)
    if size < 0:
        raise error_setg_errno(-size, "Failed to determine the NBD export's length")
    # Nobody may resize the node while it is exported.
    perm, shared_perm = blk_get_perm(blk)
    blk_set_perm(blk, perm, shared_perm & ~BLK_PERM_RESIZE)

    nbdflags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_CACHE
    if nbd_server_max_connections() != 1:
        nbdflags |= NBD_FLAG_CAN_MULTI_CONN   # QEMU 7.1+: one server, one cache, whoever connects
    if readonly:
        nbdflags |= NBD_FLAG_READ_ONLY
    else:
        nbdflags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO
    for bitmap in exp_args.get("bitmaps", []):
        raise Error(f"Bitmap '{bitmap}' is not found")   # qblock has no dirty bitmaps
    exp.name = name
    exp.description = description
    exp.nbdflags = nbdflags
    exp.size = QEMU_ALIGN_DOWN(size, BDRV_SECTOR_SIZE)
    exp.allocation_depth = exp_args.get("allocation-depth", False)
    exports.append(exp)


def nbd_export_request_shutdown(exp: NBDExport) -> None:
    """Disconnect every client and stop advertising the name."""
    blk_exp_ref(exp)
    for client in list(exp.clients):
        client_close(client, True)
    if exp.name is not None:
        exp.name = None
        exports.remove(exp)
    blk_exp_unref(exp)


def nbd_export_delete(exp: NBDExport) -> None:
    assert exp.name is None
    assert not exp.clients
    exp.description = None


class BlkExpNbd(BlockExportDriver):
    """The NBD export type (QEMU's blk_exp_nbd)."""

    type = "nbd"
    instance_class = NBDExport
    opts_members = {"name": (str, False), "description": (str, False), "bitmaps": (list, False),
                    "allocation-depth": (bool, False)}

    def create(self, exp: BlockExport, opts: dict[str, Any]) -> None:
        nbd_export_create(exp, opts)

    def delete(self, exp: BlockExport) -> None:
        nbd_export_delete(exp)

    def request_shutdown(self, exp: BlockExport) -> None:
        nbd_export_request_shutdown(exp)


blk_exp_nbd = blk_exp_register_driver(BlkExpNbd())
