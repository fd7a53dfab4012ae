"""I/O channels over sockets: QEMU's io/channel.c, io/channel-socket.c and io/net-listener.c.

A :class:`QIOChannel` is a byte stream with QEMU's two ways of waiting:
inside a coroutine, a read or write that would block calls
:func:`qio_channel_yield`, which registers an fd handler with the channel's
AioContext (the main loop's when none is attached) and yields; the handler
(``qio_channel_restart_read``/``_write``) removes itself and wakes the
coroutine with ``aio_co_wake``.  Outside a coroutine the same calls block the
thread in :func:`qio_channel_wait`, as QEMU does.

The ``*_all`` helpers loop until every byte moved and return QEMU's codes:
``0`` (done) or ``-1`` with an :class:`~qblock.util.error.Error` appended to
``errp`` (QEMU's ``Error **errp``); the ``*_eof`` variants return ``1`` when
done and ``0`` at a clean end-of-file before the first byte.  The low-level
``qio_channel_readv``/``writev`` return a byte count,
:data:`QIO_CHANNEL_ERR_BLOCK` or ``-1``.

:class:`QIOChannelSocket` wraps a Python socket; the ``io_*`` methods are
QEMU's ``QIOChannelClass`` table.  :class:`QIONetListener` listens on every
address a SocketAddress resolves to and calls a callback with each accepted
channel from an fd handler in the main loop's AioContext.

SocketAddress values are QAPI's flat dicts: ``{"type": "unix", "path": P}``,
``{"type": "inet", "host": H, "port": "N"}`` (``port`` is a string, as in
QAPI) or ``{"type": "fd", "str": "N"}``.

Left out: TLS (io/channel-tls.c), fd passing, websockets, vsock, abstract
UNIX sockets, the asynchronous (QIOTask) listen/connect variants and the io/
trace events.  Difference from QEMU: the listener's fd handlers live in the
main AioContext (QEMU uses the GLib main context, which nested ``aio_poll``
calls do not dispatch).
"""
from __future__ import annotations

import enum
import errno as _errno
import os
import select
import socket
from typing import Any, Callable

import attrs

from qblock.util.aio import AioContext, aio_co_wake, aio_set_fd_handler, qemu_get_aio_context
from qblock.util.coroutine import (
    Coroutine,
    CoroutineError,
    coroutine_fn,
    qemu_coroutine_self,
    qemu_coroutine_yield,
    qemu_in_coroutine,
)
from qblock.util.error import Error, error_setg_errno
from qblock.util.iov import as_view, iov_discard_front

__all__ = [
    "G_IO_IN", "G_IO_OUT", "QIO_CHANNEL_ERR_BLOCK", "QIOChannelShutdown",
    "QIO_CHANNEL_SHUTDOWN_READ", "QIO_CHANNEL_SHUTDOWN_WRITE", "QIO_CHANNEL_SHUTDOWN_BOTH",
    "QIOChannel", "QIOChannelSocket", "QIONetListener",
    "qio_channel_set_name", "qio_channel_readv_full", "qio_channel_writev_full", "qio_channel_readv",
    "qio_channel_writev", "qio_channel_read", "qio_channel_write",
    "qio_channel_readv_full_all_eof", "qio_channel_readv_full_all", "qio_channel_readv_all_eof",
    "qio_channel_readv_all", "qio_channel_read_all_eof", "qio_channel_read_all",
    "qio_channel_writev_full_all", "qio_channel_writev_all", "qio_channel_write_all",
    "qio_channel_set_blocking", "qio_channel_set_delay", "qio_channel_set_cork", "qio_channel_shutdown",
    "qio_channel_close", "qio_channel_yield", "qio_channel_wake_read", "qio_channel_wait",
    "qio_channel_attach_aio_context", "qio_channel_detach_aio_context", "qio_channel_set_aio_fd_handler",
    "qio_channel_socket_new", "qio_channel_socket_new_fd", "qio_channel_socket_listen_sync",
    "qio_channel_socket_connect_sync", "qio_channel_socket_accept", "qio_channel_socket_get_local_address",
    "qio_net_listener_new", "qio_net_listener_set_name", "qio_net_listener_open_sync", "qio_net_listener_add",
    "qio_net_listener_set_client_func", "qio_net_listener_disconnect", "qio_net_listener_is_connected",
]

# GLib's GIOCondition bits, as QEMU passes them to qio_channel_yield
G_IO_IN = 1
G_IO_OUT = 4

QIO_CHANNEL_ERR_BLOCK = -2   # "the operation would block" (include/io/channel.h)


class QIOChannelShutdown(enum.IntEnum):
    QIO_CHANNEL_SHUTDOWN_READ = 0
    QIO_CHANNEL_SHUTDOWN_WRITE = 1
    QIO_CHANNEL_SHUTDOWN_BOTH = 2


QIO_CHANNEL_SHUTDOWN_READ = QIOChannelShutdown.QIO_CHANNEL_SHUTDOWN_READ
QIO_CHANNEL_SHUTDOWN_WRITE = QIOChannelShutdown.QIO_CHANNEL_SHUTDOWN_WRITE
QIO_CHANNEL_SHUTDOWN_BOTH = QIOChannelShutdown.QIO_CHANNEL_SHUTDOWN_BOTH

_SHUT_HOW = {QIO_CHANNEL_SHUTDOWN_READ: socket.SHUT_RD, QIO_CHANNEL_SHUTDOWN_WRITE: socket.SHUT_WR,
             QIO_CHANNEL_SHUTDOWN_BOTH: socket.SHUT_RDWR}


def _seterr(errp: list | None, err: Error) -> None:
    if errp is not None:
        errp.append(err)


# ---------------------------------------------------------------------------
# The channel and its class table (io/channel.c, io/channel-socket.c)


@attrs.define(eq=False)
class QIOChannel:
    """A byte stream (QEMU's QIOChannel); subclasses provide the ``io_*`` methods of QIOChannelClass."""

    name: str = ""
    ctx: AioContext | None = None            # set by qio_channel_attach_aio_context
    read_coroutine: Coroutine | None = None  # the coroutine waiting in qio_channel_yield(G_IO_IN)
    write_coroutine: Coroutine | None = None
    handler_ctx: AioContext | None = None    # where the fd handler is registered now

    @property
    def trace_name(self) -> str:
        return self.name or f"ioc@{id(self):#x}"

    def fileno(self) -> int:
        raise NotImplementedError

    def io_readv(self, iov: list[memoryview], errp: list | None) -> int:
        raise NotImplementedError

    def io_writev(self, iov: list[memoryview], errp: list | None) -> int:
        raise NotImplementedError

    def io_set_blocking(self, enabled: bool, errp: list | None) -> int:
        raise NotImplementedError

    def io_close(self, errp: list | None) -> int:
        raise NotImplementedError

    # Optional entries of the class table (unannotated: not attrs fields); None where a channel lacks them.
    io_shutdown = None     # (how, errp) -> int
    io_set_delay = None    # (enabled) -> None
    io_set_cork = None     # (enabled) -> None


@attrs.define(eq=False)
class QIOChannelSocket(QIOChannel):
    """A channel over a socket (QEMU's QIOChannelSocket)."""

    sock: socket.socket | None = None
    fd: int = -1

    def fileno(self) -> int:
        return self.fd

    def io_readv(self, iov: list[memoryview], errp: list | None) -> int:
        try:
            if len(iov) == 1:
                return self.sock.recv_into(iov[0])
            return self.sock.recvmsg_into(iov)[0]
        except BlockingIOError:
            return QIO_CHANNEL_ERR_BLOCK
        except OSError as e:
            _seterr(errp, error_setg_errno(e.errno or _errno.EIO, "Unable to read from socket"))
            return -1

    def io_writev(self, iov: list[memoryview], errp: list | None) -> int:
        try:
            if len(iov) == 1:
                return self.sock.send(iov[0])
            return self.sock.sendmsg(iov)
        except BlockingIOError:
            return QIO_CHANNEL_ERR_BLOCK
        except OSError as e:
            _seterr(errp, error_setg_errno(e.errno or _errno.EIO, "Unable to write to socket"))
            return -1

    def io_set_blocking(self, enabled: bool, errp: list | None) -> int:
        self.sock.setblocking(enabled)
        return 0

    def io_shutdown(self, how: QIOChannelShutdown, errp: list | None) -> int:
        try:
            self.sock.shutdown(_SHUT_HOW[how])
        except OSError as e:
            if e.errno == _errno.ENOTCONN:
                return 0  # the peer is gone already: nothing left to shut down
            _seterr(errp, error_setg_errno(e.errno, "Unable to shutdown socket"))
            return -1
        return 0

    def io_set_delay(self, enabled: bool) -> None:
        if self.sock.family in (socket.AF_INET, socket.AF_INET6):
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0 if enabled else 1)

    def io_set_cork(self, enabled: bool) -> None:
        if self.sock.family in (socket.AF_INET, socket.AF_INET6) and hasattr(socket, "TCP_CORK"):
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1 if enabled else 0)

    def io_close(self, errp: list | None) -> int:
        if self.sock is not None:
            _qio_channel_remove_handlers(self)
            self.sock.close()
            self.sock = None
            self.fd = -1
        return 0


def qio_channel_set_name(ioc: QIOChannel, name: str) -> None:
    ioc.name = name


def qio_channel_readv_full(ioc: QIOChannel, iov: list[memoryview], errp: list | None = None) -> int:
    """Read into ``iov`` once: bytes read, 0 at EOF, QIO_CHANNEL_ERR_BLOCK, or -1 (no fd passing in qblock)."""
    return ioc.io_readv(iov, errp)


def qio_channel_writev_full(ioc: QIOChannel, iov: list[memoryview], errp: list | None = None) -> int:
    return ioc.io_writev(iov, errp)


def qio_channel_readv(ioc: QIOChannel, iov: list[memoryview], errp: list | None = None) -> int:
    return ioc.io_readv(iov, errp)


def qio_channel_writev(ioc: QIOChannel, iov: list[memoryview], errp: list | None = None) -> int:
    return ioc.io_writev(iov, errp)


def qio_channel_read(ioc: QIOChannel, buf, errp: list | None = None) -> int:
    return ioc.io_readv([as_view(buf)], errp)


def qio_channel_write(ioc: QIOChannel, buf, errp: list | None = None) -> int:
    return ioc.io_writev([as_view(buf)], errp)


def _wait_for(ioc: QIOChannel, condition: int) -> None:
    if qemu_in_coroutine():
        qio_channel_yield(ioc, condition)
    else:
        qio_channel_wait(ioc, condition)


def qio_channel_readv_full_all_eof(ioc: QIOChannel, iov: list[memoryview], errp: list | None = None) -> int:
    """Fill all of ``iov``: 1 when done, 0 at EOF before the first byte, -1 on error or a short read."""
    local = [v for v in iov if len(v)]
    partial = False
    while local:
        n = ioc.io_readv(local, errp)
        if n == QIO_CHANNEL_ERR_BLOCK:
            _wait_for(ioc, G_IO_IN)
            continue
        if n < 0:
            return -1
        if n == 0:
            if partial:
                _seterr(errp, Error("Unexpected end-of-file before all bytes were read"))
                return -1
            return 0
        partial = True
        iov_discard_front(local, n)
    return 1


def qio_channel_readv_full_all(ioc: QIOChannel, iov: list[memoryview], errp: list | None = None) -> int:
    """Fill all of ``iov``: 0 when done, -1 on error or EOF."""
    ret = qio_channel_readv_full_all_eof(ioc, iov, errp)
    if ret == 0:
        _seterr(errp, Error("Unexpected end-of-file before all data were read"))
        return -1
    return 0 if ret == 1 else ret


def qio_channel_readv_all_eof(ioc: QIOChannel, iov: list[memoryview], errp: list | None = None) -> int:
    return qio_channel_readv_full_all_eof(ioc, iov, errp)


def qio_channel_readv_all(ioc: QIOChannel, iov: list[memoryview], errp: list | None = None) -> int:
    return qio_channel_readv_full_all(ioc, iov, errp)


def qio_channel_read_all_eof(ioc: QIOChannel, buf, errp: list | None = None) -> int:
    return qio_channel_readv_full_all_eof(ioc, [as_view(buf)], errp)


def qio_channel_read_all(ioc: QIOChannel, buf, errp: list | None = None) -> int:
    """Fill all of ``buf`` (a writable buffer): 0, or -1 with the reason in ``errp``."""
    return qio_channel_readv_full_all(ioc, [as_view(buf)], errp)


def qio_channel_writev_full_all(ioc: QIOChannel, iov: list, errp: list | None = None) -> int:
    """Write all of ``iov``: 0, or -1 with the reason in ``errp``."""
    local = [as_view(v) for v in iov if len(v)]
    while local:
        n = ioc.io_writev(local, errp)
        if n == QIO_CHANNEL_ERR_BLOCK:
            _wait_for(ioc, G_IO_OUT)
            continue
        if n < 0:
            return -1
        iov_discard_front(local, n)
    return 0


def qio_channel_writev_all(ioc: QIOChannel, iov: list, errp: list | None = None) -> int:
    return qio_channel_writev_full_all(ioc, iov, errp)


def qio_channel_write_all(ioc: QIOChannel, buf, errp: list | None = None) -> int:
    return qio_channel_writev_full_all(ioc, [buf], errp)


def qio_channel_set_blocking(ioc: QIOChannel, enabled: bool, errp: list | None = None) -> int:
    return ioc.io_set_blocking(enabled, errp)


def qio_channel_set_delay(ioc: QIOChannel, enabled: bool) -> None:
    """Nagle on (``enabled``) or off, where the channel has such a thing."""
    if ioc.io_set_delay is not None:
        ioc.io_set_delay(enabled)


def qio_channel_set_cork(ioc: QIOChannel, enabled: bool) -> None:
    if ioc.io_set_cork is not None:
        ioc.io_set_cork(enabled)


def qio_channel_shutdown(ioc: QIOChannel, how: QIOChannelShutdown, errp: list | None = None) -> int:
    """Shut one or both directions: a coroutine waiting to read wakes and sees end-of-file."""
    if ioc.io_shutdown is None:
        _seterr(errp, Error("Data path shutdown not supported"))
        return -1
    return ioc.io_shutdown(how, errp)


def qio_channel_close(ioc: QIOChannel, errp: list | None = None) -> int:
    return ioc.io_close(errp)


# ---------------------------------------------------------------------------
# Coroutines waiting on a channel


def qio_channel_restart_read(ioc: QIOChannel) -> None:
    """fd handler: the channel is readable, wake the coroutine that waits to read."""
    co = ioc.read_coroutine
    if co is None:
        return
    ioc.read_coroutine = None
    qio_channel_set_aio_fd_handlers(ioc)
    aio_co_wake(co)


def qio_channel_restart_write(ioc: QIOChannel) -> None:
    co = ioc.write_coroutine
    if co is None:
        return
    ioc.write_coroutine = None
    qio_channel_set_aio_fd_handlers(ioc)
    aio_co_wake(co)


def qio_channel_set_aio_fd_handler(ioc: QIOChannel, ctx: AioContext, io_read: Callable[[Any], None] | None,
                                   io_write: Callable[[Any], None] | None, opaque: Any) -> None:
    """Watch the channel's fd in ``ctx`` (both None: stop watching)."""
    fd = ioc.fileno()
    if fd < 0:
        return
    old = ioc.handler_ctx
    if old is not None and old is not ctx:
        aio_set_fd_handler(old, fd, None, None)
    aio_set_fd_handler(ctx, fd, io_read, io_write, opaque)
    ioc.handler_ctx = ctx if (io_read or io_write) else None


def qio_channel_set_aio_fd_handlers(ioc: QIOChannel) -> None:
    rd = qio_channel_restart_read if ioc.read_coroutine is not None else None
    wr = qio_channel_restart_write if ioc.write_coroutine is not None else None
    ctx = ioc.ctx if ioc.ctx is not None else qemu_get_aio_context()
    qio_channel_set_aio_fd_handler(ioc, ctx, rd, wr, ioc)


def _qio_channel_remove_handlers(ioc: QIOChannel) -> None:
    if ioc.handler_ctx is not None and ioc.fileno() >= 0:
        aio_set_fd_handler(ioc.handler_ctx, ioc.fileno(), None, None)
    ioc.handler_ctx = None


@coroutine_fn
def qio_channel_yield(ioc: QIOChannel, condition: int) -> None:
    """Wait until the channel is readable (G_IO_IN) or writable (G_IO_OUT), or someone re-enters us."""
    self = qemu_coroutine_self()
    if condition == G_IO_IN:
        if ioc.read_coroutine is not None:
            raise CoroutineError(f"qio_channel_yield: {ioc.trace_name} already has a reader")
        ioc.read_coroutine = self
    elif condition == G_IO_OUT:
        if ioc.write_coroutine is not None:
            raise CoroutineError(f"qio_channel_yield: {ioc.trace_name} already has a writer")
        ioc.write_coroutine = self
    else:
        raise ValueError(f"qio_channel_yield: condition {condition}")
    qio_channel_set_aio_fd_handlers(ioc)
    self.waiting_on = ioc
    qemu_coroutine_yield()
    # Woken other than through the fd handler (qio_channel_wake_read): stop watching.
    if condition == G_IO_IN and ioc.read_coroutine is self:
        ioc.read_coroutine = None
        qio_channel_set_aio_fd_handlers(ioc)
    elif condition == G_IO_OUT and ioc.write_coroutine is self:
        ioc.write_coroutine = None
        qio_channel_set_aio_fd_handlers(ioc)


def qio_channel_wake_read(ioc: QIOChannel) -> None:
    """Wake the coroutine waiting in qio_channel_yield(G_IO_IN), if there is one."""
    co = ioc.read_coroutine
    if co is not None:
        aio_co_wake(co)


def qio_channel_wait(ioc: QIOChannel, condition: int) -> None:
    """Block the thread until the channel is ready (outside coroutines)."""
    fd = ioc.fileno()
    if condition == G_IO_IN:
        select.select([fd], [], [])
    else:
        select.select([], [fd], [])


def qio_channel_attach_aio_context(ioc: QIOChannel, ctx: AioContext) -> None:
    """From now on coroutines waiting on ``ioc`` are woken from ``ctx``."""
    ioc.ctx = ctx
    qio_channel_set_aio_fd_handlers(ioc)


def qio_channel_detach_aio_context(ioc: QIOChannel) -> None:
    ioc.read_coroutine = None
    ioc.write_coroutine = None
    _qio_channel_remove_handlers(ioc)
    ioc.ctx = None


# ---------------------------------------------------------------------------
# Sockets (io/channel-socket.c, util/qemu-sockets.c)


def qio_channel_socket_new() -> QIOChannelSocket:
    return QIOChannelSocket()


def _qio_channel_socket_set_sock(sioc: QIOChannelSocket, sock: socket.socket) -> None:
    sioc.sock = sock
    sioc.fd = sock.fileno()


def qio_channel_socket_new_fd(fd: int, errp: list | None = None) -> QIOChannelSocket | None:
    """A channel over an already open socket descriptor (which the channel now owns)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        _seterr(errp, error_setg_errno(e.errno, "Unable to query local socket address"))
        return None
    sioc = QIOChannelSocket()
    _qio_channel_socket_set_sock(sioc, sock)
    return sioc


def _unix_listen(path: str, num: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise error_setg_errno(e.errno, f"Failed to unlink socket {path}") from None
        try:
            sock.bind(path)
        except OSError as e:
            raise error_setg_errno(e.errno, f"Failed to bind socket to {path}") from None
        try:
            sock.listen(num)
        except OSError as e:
            raise error_setg_errno(e.errno, "Failed to listen on socket") from None
    except Error:
        sock.close()
        raise
    return sock


def _inet_listen(host: str, port: str, num: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                                   socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise Error(f"address resolution failed for {host}:{port}: {e.strerror}") from None
    last = _errno.EADDRNOTAVAIL
    for family, type_, proto, _, sockaddr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(sockaddr)
            sock.listen(num)
            return sock
        except OSError as e:
            last = e.errno
            sock.close()
    raise error_setg_errno(last, "Failed to find an available port")


def qio_channel_socket_listen_sync(ioc: QIOChannelSocket, addr: dict, num: int,
                                   errp: list | None = None) -> int:
    """Listen on ``addr`` (a flat SocketAddress dict); 0, or -1 with the reason in ``errp``."""
    try:
        kind = addr.get("type")
        if kind == "unix":
            sock = _unix_listen(addr["path"], num)
        elif kind == "inet":
            sock = _inet_listen(addr.get("host", ""), str(addr.get("port", "")), num)
        elif kind == "fd":
            sock = socket.socket(fileno=int(addr["str"]))
            sock.listen(num)
        else:
            raise Error(f"Unknown socket address type '{kind}'")
    except Error as e:
        _seterr(errp, e)
        return -1
    sock.setblocking(False)
    _qio_channel_socket_set_sock(ioc, sock)
    return 0


def qio_channel_socket_connect_sync(ioc: QIOChannelSocket, addr: dict, errp: list | None = None) -> int:
    """Connect to ``addr`` (blocking); 0, or -1 with the reason in ``errp``."""
    sock = None
    try:
        if addr.get("type") == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(addr["path"])
        else:
            sock = socket.create_connection((addr.get("host", ""), int(addr.get("port", "0"))))
    except OSError as e:
        if sock is not None:
            sock.close()
        _seterr(errp, error_setg_errno(e.errno or _errno.EIO, "Failed to connect to socket"))
        return -1
    _qio_channel_socket_set_sock(ioc, sock)
    return 0


def qio_channel_socket_accept(ioc: QIOChannelSocket, errp: list | None = None) -> QIOChannelSocket | None:
    """Accept one connection: a new blocking channel, or None (``errp`` says why)."""
    try:
        sock, _ = ioc.sock.accept()
    except OSError as e:
        _seterr(errp, error_setg_errno(e.errno or _errno.EIO, "Unable to accept connection"))
        return None
    sock.setblocking(True)
    cioc = QIOChannelSocket()
    _qio_channel_socket_set_sock(cioc, sock)
    return cioc


def qio_channel_socket_get_local_address(ioc: QIOChannelSocket, errp: list | None = None) -> dict | None:
    """The bound address as a flat SocketAddress dict."""
    sock = ioc.sock
    try:
        name = sock.getsockname()
    except OSError as e:
        _seterr(errp, error_setg_errno(e.errno, "Unable to query local socket address"))
        return None
    if sock.family == socket.AF_UNIX:
        return {"type": "unix", "path": name if isinstance(name, str) else name.decode()}
    return {"type": "inet", "host": name[0], "port": str(name[1])}


# ---------------------------------------------------------------------------
# Listening (io/net-listener.c)


@attrs.define(eq=False)
class QIONetListener:
    """Listening sockets and the callback for accepted clients (QEMU's QIONetListener)."""

    name: str = ""
    sioc: list[QIOChannelSocket] = attrs.field(factory=list)
    io_func: Callable[["QIONetListener", QIOChannelSocket, Any], None] | None = None
    io_data: Any = None
    connected: bool = False
    ctx: AioContext | None = None

    @property
    def trace_name(self) -> str:
        return self.name or "listener"


def qio_net_listener_new() -> QIONetListener:
    return QIONetListener()


def qio_net_listener_set_name(listener: QIONetListener, name: str) -> None:
    listener.name = name


def qio_net_listener_channel_func(opaque: tuple[QIONetListener, QIOChannelSocket]) -> None:
    """fd handler: a listening socket is readable, accept and hand the client to io_func."""
    listener, sioc = opaque
    errp: list = []
    cioc = qio_channel_socket_accept(sioc, errp)
    if cioc is None:
        return  # EAGAIN (another listener took it) or a transient accept error
    if listener.io_func is not None:
        listener.io_func(listener, cioc, listener.io_data)
    else:
        qio_channel_close(cioc)


def _qio_net_listener_watch(listener: QIONetListener, sioc: QIOChannelSocket) -> None:
    ctx = listener.ctx or qemu_get_aio_context()
    if listener.io_func is not None:
        aio_set_fd_handler(ctx, sioc.fd, qio_net_listener_channel_func, None, (listener, sioc))
    else:
        aio_set_fd_handler(ctx, sioc.fd, None, None)


def qio_net_listener_add(listener: QIONetListener, sioc: QIOChannelSocket) -> None:
    if listener.name:
        qio_channel_set_name(sioc, listener.name)
    listener.sioc.append(sioc)
    _qio_net_listener_watch(listener, sioc)
    listener.connected = True


def qio_net_listener_open_sync(listener: QIONetListener, addr: dict, num: int) -> None:
    """Listen on every address ``addr`` resolves to; raise Error when none worked."""
    if addr.get("type") == "inet":
        host, port = addr.get("host", ""), str(addr.get("port", ""))
        try:
            infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                                       socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise Error(f"address resolution failed for {host}:{port}: {e.strerror}") from None
        addrs = []
        for info in infos:
            a = {"type": "inet", "host": info[4][0], "port": str(info[4][1])}
            if a not in addrs:
                addrs.append(a)
    else:
        addrs = [addr]
    err: list = []
    success = False
    for a in addrs:
        sioc = qio_channel_socket_new()
        if qio_channel_socket_listen_sync(sioc, a, num, None if err else err) == 0:
            success = True
            qio_net_listener_add(listener, sioc)
    if not success:
        raise err[0]


def qio_net_listener_set_client_func(listener: QIONetListener,
                                     func: Callable[[QIONetListener, QIOChannelSocket, Any], None] | None,
                                     data: Any = None, notify: Callable[[Any], None] | None = None) -> None:
    """Call ``func(listener, channel, data)`` for each new client; None stops accepting (the backlog waits)."""
    listener.io_func = func
    listener.io_data = data
    for sioc in listener.sioc:
        _qio_net_listener_watch(listener, sioc)


def qio_net_listener_disconnect(listener: QIONetListener) -> None:
    """Stop listening and close the listening sockets."""
    if not listener.connected:
        return
    ctx = listener.ctx or qemu_get_aio_context()
    for sioc in listener.sioc:
        aio_set_fd_handler(ctx, sioc.fd, None, None)
        path = None
        if sioc.sock is not None and sioc.sock.family == socket.AF_UNIX:
            path = sioc.sock.getsockname()
        qio_channel_close(sioc)
        if path:
            try:
                os.unlink(path)  # socket_listen_cleanup: a UNIX listener removes its socket file
            except OSError:
                pass
    listener.sioc.clear()
    listener.connected = False


def qio_net_listener_is_connected(listener: QIONetListener) -> bool:
    return listener.connected
