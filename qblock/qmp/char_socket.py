"""Character devices for monitors: QEMU's chardev/char.c (registry, front ends) and chardev/char-socket.c.

``--chardev socket,id=c0,path=/tmp/qmp.sock,server=on,wait=off`` (or
``host=127.0.0.1,port=4444`` for TCP) makes a listening :class:`SocketChardev`.
As in QEMU it serves one client at a time: while a client is connected the
listener is not watched, so a second client is accepted (and greeted) only
after the first one disconnects.  The front end — a QMP monitor — sets its
handlers with :func:`qemu_chr_fe_set_handlers`: ``can_read()`` says how many
bytes it takes now (0 while suspended), ``read(bytes)`` gets them and
``event(CHR_EVENT_*)`` hears of connections opening and closing.  Bytes the
front end did not take yet wait in the chardev until
:func:`qemu_chr_fe_accept_input`.  Output is queued and written whenever the
socket takes it (an fd write handler in the main AioContext).

``wait=on`` (QEMU's default for a server) blocks start-up until a client
connects, as QEMU does.  Left out: client mode (``server=off``), telnet,
websocket, TLS, ``reconnect``, fd passing, every backend but ``socket``.
"""
from __future__ import annotations

import enum
import errno
import os
import socket
import sys
from typing import Any, Callable

import attrs

from qblock.util.aio import aio_poll, aio_set_fd_handler, qemu_get_aio_context
from qblock.util.error import Error, error_setg_errno
from qblock.util.qemu_option import keyval_parse, parse_option_bool

__all__ = ["QEMUChrEvent", "Chardev", "SocketChardev", "CharBackend", "qemu_chr_new_from_opts",
           "qemu_chr_parse_opts", "qemu_chr_find", "qemu_chr_fe_init", "qemu_chr_fe_set_handlers",
           "qemu_chr_fe_write_all", "qemu_chr_fe_accept_input", "qemu_chr_fe_flush", "qemu_chr_cleanup",
           "qemu_chr_delete"]


class QEMUChrEvent(enum.Enum):
    CHR_EVENT_BREAK = 0
    CHR_EVENT_OPENED = 1
    CHR_EVENT_MUX_IN = 2
    CHR_EVENT_MUX_OUT = 3
    CHR_EVENT_CLOSED = 4


@attrs.define(eq=False)
class CharBackend:
    """The front end's side of a chardev (QEMU's CharBackend)."""

    chr: "Chardev | None" = None
    fd_can_read: Callable[[Any], int] | None = None
    fd_read: Callable[[Any, bytes], None] | None = None
    fd_event: Callable[[Any, QEMUChrEvent], None] | None = None
    opaque: Any = None


class Chardev:
    """A character device (QEMU's Chardev): an id and at most one front end."""

    def __init__(self, label: str):
        self.label = label
        self.be: CharBackend | None = None

    def chr_write(self, data: bytes) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def chr_accept_input(self) -> None:
        pass

    def chr_flush(self, timeout: float) -> None:
        pass

    def chr_close(self) -> None:
        pass


_chardevs: dict[str, Chardev] = {}


class SocketChardev(Chardev):
    """A listening UNIX or TCP socket serving one client at a time (QEMU's SocketChardev, server mode)."""

    def __init__(self, label: str, listener: socket.socket, path: str | None, desc: str):
        super().__init__(label)
        self.listener = listener
        self.path = path
        self.desc = desc
        self.conn: socket.socket | None = None
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.ctx = qemu_get_aio_context()
        self.reading = False
        self._listen(True)

    # -- connections ------------------------------------------------------

    def _listen(self, on: bool) -> None:
        aio_set_fd_handler(self.ctx, self.listener.fileno(), self.tcp_chr_accept if on else None, None, None)

    def tcp_chr_accept(self, opaque: Any) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self.tcp_chr_new_client(conn)

    def tcp_chr_new_client(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        self.conn = conn
        self._listen(False)  # one client at a time
        self.inbuf.clear()
        self.outbuf.clear()
        self._set_read(True)
        if self.be is not None and self.be.fd_event is not None:
            self.be.fd_event(self.be.opaque, QEMUChrEvent.CHR_EVENT_OPENED)

    def tcp_chr_disconnect(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        aio_set_fd_handler(self.ctx, conn.fileno(), None, None, None)
        self.reading = False
        conn.close()
        self.inbuf.clear()
        self.outbuf.clear()
        if self.listener is not None:
            self._listen(True)
        if self.be is not None and self.be.fd_event is not None:
            self.be.fd_event(self.be.opaque, QEMUChrEvent.CHR_EVENT_CLOSED)

    # -- input ------------------------------------------------------------

    def _update_handlers(self) -> None:
        if self.conn is None:
            return
        aio_set_fd_handler(self.ctx, self.conn.fileno(), self.tcp_chr_read if self.reading else None,
                           self.tcp_chr_write if self.outbuf else None, None)

    def _set_read(self, on: bool) -> None:
        if self.reading != on:
            self.reading = on
            self._update_handlers()

    def tcp_chr_read(self, opaque: Any) -> None:
        if self.conn is None:
            return
        try:
            data = self.conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.tcp_chr_disconnect()
            return
        self.inbuf += data
        self._feed()

    def _feed(self) -> None:
        """Give the front end what it takes now; stop watching the socket while it takes nothing."""
        be = self.be
        while self.inbuf and self.conn is not None and be is not None:
            n = be.fd_can_read(be.opaque) if be.fd_can_read is not None else len(self.inbuf)
            if n <= 0:
                break
            chunk = bytes(self.inbuf[:n])
            del self.inbuf[:n]
            be.fd_read(be.opaque, chunk)
        if self.conn is not None:
            self._set_read(not self.inbuf)

    def chr_accept_input(self) -> None:
        self._feed()

    # -- output -----------------------------------------------------------

    def chr_write(self, data: bytes) -> None:
        if self.conn is None:
            return  # nobody listens: output is dropped, as QEMU's char-socket does
        self.outbuf += data
        self.tcp_chr_write(None)

    def tcp_chr_write(self, opaque: Any) -> None:
        while self.outbuf and self.conn is not None:
            try:
                n = self.conn.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.outbuf.clear()
                break
            del self.outbuf[:n]
        self._update_handlers()

    def chr_flush(self, timeout: float) -> None:
        """Write out queued output, blocking up to ``timeout`` seconds (used at exit)."""
        if self.conn is None or not self.outbuf:
            return
        try:
            self.conn.settimeout(timeout)
            self.conn.sendall(self.outbuf)
        except OSError:
            pass
        finally:
            self.outbuf.clear()
            if self.conn is not None:
                self.conn.setblocking(False)

    def chr_close(self) -> None:
        if self.conn is not None:
            aio_set_fd_handler(self.ctx, self.conn.fileno(), None, None, None)
            self.conn.close()
            self.conn = None
        if self.listener is not None:
            aio_set_fd_handler(self.ctx, self.listener.fileno(), None, None, None)
            self.listener.close()
            self.listener = None
            if self.path:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass


# ---------------------------------------------------------------------------
# Creating chardevs (chardev/char.c, util/qemu-sockets.c)


def qemu_chr_parse_opts(optarg: str) -> dict[str, str]:
    """``--chardev`` keyval text to options; the backend name is the implied first key."""
    return keyval_parse(optarg, "backend")


def _socket_listen_unix(path: str) -> socket.socket:
    try:
        os.unlink(path)  # QEMU replaces a stale socket file
    except FileNotFoundError:
        pass
    except OSError as e:
        raise error_setg_errno(e.errno, f"Failed to unlink socket {path}") from None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        s.listen(1)
    except OSError as e:
        s.close()
        raise error_setg_errno(e.errno, f"Failed to bind socket to {path}") from None
    s.setblocking(False)
    return s


def _socket_listen_inet(host: str, port: str) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise Error(f"address resolution failed for {host}:{port}: {e.strerror}") from None
    last: OSError | None = None
    for family, stype, proto, _, addr in infos:
        s = socket.socket(family, stype, proto)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
            s.listen(1)
            s.setblocking(False)
            return s
        except OSError as e:
            s.close()
            last = e
    raise error_setg_errno(last.errno if last else errno.EADDRNOTAVAIL, "Failed to find an available port")


def qemu_chr_new_from_opts(opts: dict[str, Any]) -> Chardev:
    """Create the chardev ``opts`` describe (``backend``, ``id`` and the backend's options)."""
    backend = opts.get("backend")
    label = opts.get("id")
    if backend is None:
        raise Error('chardev: "" missing backend')
    if label is None:
        raise Error("Parameter 'id' is missing")
    if backend != "socket":
        raise Error(f"'{backend}' is not a valid char driver name")
    known = {"backend", "id", "path", "host", "port", "server", "wait", "ipv4", "ipv6", "to", "abstract", "tight"}
    for key in opts:
        if key not in known:
            raise Error(f"Invalid parameter '{key}'")
    if label in _chardevs:
        raise Error(f"Duplicate ID '{label}' for chardev")
    path, host, port = opts.get("path"), opts.get("host"), opts.get("port")
    server = parse_option_bool("server", opts.get("server", "off"))
    wait = parse_option_bool("wait", opts.get("wait", "on"))
    if path is None and host is None:
        raise Error("Unable to parse FD number ")
    if not server:
        raise Error("qblock: chardev socket client mode (server=off) is not supported")
    if path is not None:
        listener = _socket_listen_unix(path)
        desc = f"unix:{path},server=on"
    else:
        if port is None:
            raise Error("chardev: socket: no port given")
        listener = _socket_listen_inet(host, port)
        desc = f"tcp:{host}:{port},server=on"
    chr = SocketChardev(label, listener, path, desc)
    _chardevs[label] = chr
    if wait:
        sys.stderr.write(f"QEMU waiting for connection on: disconnected:{desc}\n")
        ctx = qemu_get_aio_context()
        while chr.conn is None:
            aio_poll(ctx, True)
    return chr


def qemu_chr_find(label: str) -> Chardev | None:
    return _chardevs.get(label)


def qemu_chr_delete(chr: Chardev) -> None:
    chr.chr_close()
    if _chardevs.get(chr.label) is chr:
        del _chardevs[chr.label]


def qemu_chr_cleanup() -> None:
    """Close every chardev (at exit)."""
    for chr in list(_chardevs.values()):
        qemu_chr_delete(chr)


# ---------------------------------------------------------------------------
# Front ends (chardev/char-fe.c)


def qemu_chr_fe_init(be: CharBackend, chr: Chardev) -> None:
    if chr.be is not None:
        raise Error(f"Device '{chr.label}' is in use")
    chr.be = be
    be.chr = chr


def qemu_chr_fe_set_handlers(be: CharBackend, fd_can_read, fd_read, fd_event, opaque: Any) -> None:
    """Install the front end's callbacks; a client already connected is announced with CHR_EVENT_OPENED."""
    be.fd_can_read, be.fd_read, be.fd_event, be.opaque = fd_can_read, fd_read, fd_event, opaque
    chr = be.chr
    if isinstance(chr, SocketChardev) and chr.conn is not None and fd_event is not None:
        fd_event(opaque, QEMUChrEvent.CHR_EVENT_OPENED)


def qemu_chr_fe_write_all(be: CharBackend, data: bytes) -> None:
    if be.chr is not None:
        be.chr.chr_write(data)


def qemu_chr_fe_accept_input(be: CharBackend) -> None:
    if be.chr is not None:
        be.chr.chr_accept_input()


def qemu_chr_fe_flush(be: CharBackend, timeout: float = 1.0) -> None:
    if be.chr is not None:
        be.chr.chr_flush(timeout)
