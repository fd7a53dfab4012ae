"""A small NBD client speaking the raw protocol, for tests and load generators.

It is deliberately not QEMU's nbd/client.c: it sends whatever it is told,
byte for byte, so a test can send a bad magic, an oversized length, a write
without its payload or an unknown option, and see exactly what comes back.

When the server runs in the same thread (qblock's server under test), the
client must keep the event loop turning while it waits: give it a ``pump``
callable, e.g. ``lambda: aio_pump(ctx, 20_000_000)``, called whenever the
socket would block.  Without a pump the socket blocks (a server in another
process).  Every wait has a deadline (``timeout`` seconds, on
QEMU_CLOCK_REALTIME), so a test fails instead of hanging.

Example::

    c = NBDTestClient.connect_unix(path, pump)
    c.handshake()
    c.opt_structured_reply()
    info = c.opt_go("disk")
    h = c.send_request(NBD_CMD_READ, 0, 4096)
    r = c.receive_reply()          # r.error == 0, r.data has 4096 bytes
"""
from __future__ import annotations

import select
import socket
import struct
from typing import Callable

import attrs

from qblock.nbd.nbd import (
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_DESCRIPTION,
    NBD_INFO_EXPORT,
    NBD_INFO_NAME,
    NBD_INIT_MAGIC,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_INFO,
    NBD_OPT_LIST,
    NBD_OPT_LIST_META_CONTEXT,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_OPTS_MAGIC,
    NBD_REP_ACK,
    NBD_REP_INFO,
    NBD_REP_MAGIC,
    NBD_REP_META_CONTEXT,
    NBD_REP_SERVER,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    nbd_reply_type_is_error,
)
from qblock.util.aio import AioContext, aio_poll, aio_timer_new
from qblock.util.timer import QEMU_CLOCK_REALTIME, SCALE_NS, qemu_clock_get_ns, timer_del, timer_mod_ns

__all__ = ["NBDTestClient", "NBDTestReply", "NBDOptReply", "ConnectionClosed", "aio_pump"]


class ConnectionClosed(Exception):
    """The server closed the connection."""


def _noop(_) -> None:
    pass


def aio_pump(ctx: AioContext, timeout_ns: int) -> bool:
    """One blocking aio_poll of ``ctx`` that waits at most ``timeout_ns`` (a realtime timer bounds it)."""
    t = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, _noop)
    timer_mod_ns(t, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + timeout_ns)
    try:
        return aio_poll(ctx, True)
    finally:
        timer_del(t)


@attrs.define
class NBDOptReply:
    option: int
    type: int
    data: bytes


@attrs.define
class NBDTestReply:
    """A whole reply: ``error`` (NBD errno), ``data`` for reads, ``chunks`` (type, flags, payload) if structured."""

    handle: int
    error: int = 0
    data: bytes | None = None
    structured: bool = False
    chunks: list[tuple[int, int, bytes]] = attrs.field(factory=list)
    message: str = ""
    extents: dict[int, list[tuple[int, int]]] = attrs.field(factory=dict)   # context id -> [(length, flags)]


class NBDTestClient:
    def __init__(self, sock: socket.socket, pump: Callable[[], object] | None = None, timeout: float = 20.0):
        self.sock = sock
        self.pump = pump
        self.timeout_ns = int(timeout * 1e9)
        self.pending: dict[int, tuple[int, int, int]] = {}   # handle -> (type, length, offset)
        self.next_handle = 1
        self.structured = False
        self.transmission = False   # GO or EXPORT_NAME was sent: requests, not options, come next
        if pump is not None:
            sock.setblocking(False)
        else:
            sock.settimeout(timeout)

    @classmethod
    def connect_unix(cls, path: str, pump: Callable[[], object] | None = None, timeout: float = 20.0):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        return cls(s, pump, timeout)

    @classmethod
    def connect_inet(cls, host: str, port: int, pump: Callable[[], object] | None = None, timeout: float = 20.0):
        s = socket.create_connection((host, port))
        return cls(s, pump, timeout)

    def close(self) -> None:
        self.sock.close()

    # -- bytes ------------------------------------------------------------

    def _wait(self, deadline: int, what: str) -> None:
        if qemu_clock_get_ns(QEMU_CLOCK_REALTIME) > deadline:
            raise TimeoutError(f"NBD test client: timed out waiting to {what}")
        if self.pump is not None:
            self.pump()
        else:
            select.select([self.sock], [self.sock], [], 0.05)

    def send(self, data) -> None:
        view = memoryview(data).cast("B")
        deadline = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + self.timeout_ns
        while view:
            try:
                n = self.sock.send(view)
            except (BlockingIOError, socket.timeout):
                self._wait(deadline, "send")
                continue
            except (BrokenPipeError, ConnectionResetError) as e:
                raise ConnectionClosed(str(e)) from None
            view = view[n:]

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        pos = 0
        deadline = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + self.timeout_ns
        while pos < n:
            try:
                got = self.sock.recv_into(view[pos:])
            except (BlockingIOError, socket.timeout):
                self._wait(deadline, f"receive {n - pos} more bytes")
                continue
            except ConnectionResetError as e:
                raise ConnectionClosed(str(e)) from None
            if got == 0:
                raise ConnectionClosed(f"end of file after {pos} of {n} bytes")
            pos += got
        return bytes(buf)

    def wait_closed(self) -> bool:
        """Pump until the server closes the connection, discarding whatever it still sends; True when closed."""
        deadline = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + self.timeout_ns
        while True:
            try:
                got = self.sock.recv(65536)
            except (BlockingIOError, socket.timeout):
                self._wait(deadline, "see the connection closed")
                continue
            except ConnectionResetError:
                return True
            if got == b"":
                return True

    def probe_state(self) -> str:
        """"open" if the server still answers (NBD_OPT_LIST while negotiating, NBD_CMD_FLUSH after), else "closed"."""
        try:
            if self.transmission:
                self.send_request(NBD_CMD_FLUSH, 0, 0)
                self.receive_reply()
            else:
                self.send_opt(NBD_OPT_LIST)
                self.opt_replies()
        except ConnectionClosed:
            return "closed"
        return "open"

    def peek_state(self, wait: float = 0.2) -> str:
        """After ``wait`` seconds of pumping: "closed" (EOF or reset), "data" (bytes waiting) or "open"."""
        deadline = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + int(wait * 1e9)
        while True:
            if self.pump is None:
                left = max(deadline - qemu_clock_get_ns(QEMU_CLOCK_REALTIME), 0) / 1e9
                if not select.select([self.sock], [], [], left)[0]:
                    return "open"
            try:
                got = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, TimeoutError):
                if qemu_clock_get_ns(QEMU_CLOCK_REALTIME) > deadline:
                    return "open"
                if self.pump is not None:
                    self.pump()
                else:
                    select.select([self.sock], [], [], 0.02)
                continue
            except ConnectionResetError:
                return "closed"
            return "closed" if got == b"" else "data"

    # -- handshake --------------------------------------------------------

    def handshake(self, client_flags: int = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) -> int:
        """Read the server's greeting, send our flags; returns the server's handshake flags."""
        magic, opts_magic, gflags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == NBD_INIT_MAGIC, hex(magic)
        assert opts_magic == NBD_OPTS_MAGIC, hex(opts_magic)
        self.send(struct.pack(">I", client_flags))
        return gflags

    def send_opt(self, option: int, payload: bytes = b"", length: int | None = None) -> None:
        n = len(payload) if length is None else length
        self.send(struct.pack(">QII", NBD_OPTS_MAGIC, option, n) + payload)
        if option == NBD_OPT_EXPORT_NAME:
            self.transmission = True

    def opt_reply(self) -> NBDOptReply:
        magic, option, type_, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == NBD_REP_MAGIC, hex(magic)
        return NBDOptReply(option, type_, self.recv_exact(length) if length else b"")

    def opt_replies(self) -> list[NBDOptReply]:
        """Replies up to and including the final one (ACK or an error)."""
        out = []
        while True:
            r = self.opt_reply()
            out.append(r)
            if r.type not in (NBD_REP_SERVER, NBD_REP_INFO, NBD_REP_META_CONTEXT):
                return out

    def opt_structured_reply(self) -> NBDOptReply:
        self.send_opt(NBD_OPT_STRUCTURED_REPLY)
        r = self.opt_reply()
        if r.type == NBD_REP_ACK:
            self.structured = True
        return r

    def opt_list(self) -> list[tuple[str, str]]:
        self.send_opt(NBD_OPT_LIST)
        out = []
        for r in self.opt_replies():
            if r.type == NBD_REP_SERVER:
                n = struct.unpack(">I", r.data[:4])[0]
                out.append((r.data[4:4 + n].decode(), r.data[4 + n:].decode()))
            elif r.type != NBD_REP_ACK:
                raise AssertionError(f"NBD_OPT_LIST answered with {r.type:#x}")
        return out

    @staticmethod
    def info_payload(name: str, infos: tuple[int, ...] = ()) -> bytes:
        raw = name.encode()
        return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + b"".join(
            struct.pack(">H", i) for i in infos)

    def opt_info_go(self, option: int, name: str, infos: tuple[int, ...] = (NBD_INFO_BLOCK_SIZE,)) -> dict:
        """NBD_OPT_INFO/GO: a dict of what came back ('error' holds a failure's type and message)."""
        self.send_opt(option, self.info_payload(name, infos))
        out: dict = {}
        for r in self.opt_replies():
            if r.type == NBD_REP_INFO:
                info = struct.unpack(">H", r.data[:2])[0]
                body = r.data[2:]
                if info == NBD_INFO_EXPORT:
                    out["size"], out["flags"] = struct.unpack(">QH", body)
                elif info == NBD_INFO_NAME:
                    out["name"] = body.decode()
                elif info == NBD_INFO_DESCRIPTION:
                    out["description"] = body.decode()
                elif info == NBD_INFO_BLOCK_SIZE:
                    out["block_size"] = struct.unpack(">III", body)
                out.setdefault("infos", []).append(info)
            elif r.type != NBD_REP_ACK:
                out["error"] = (r.type, r.data.decode(errors="replace"))
        if option == NBD_OPT_GO and "error" not in out:
            self.transmission = True
        return out

    def opt_go(self, name: str, infos: tuple[int, ...] = (NBD_INFO_BLOCK_SIZE,)) -> dict:
        return self.opt_info_go(NBD_OPT_GO, name, infos)

    def opt_info(self, name: str, infos: tuple[int, ...] = (NBD_INFO_BLOCK_SIZE,)) -> dict:
        return self.opt_info_go(NBD_OPT_INFO, name, infos)

    def opt_meta_context(self, option: int, name: str, queries: list[str]) -> tuple[dict[int, str], NBDOptReply]:
        """LIST or SET_META_CONTEXT: ({id: context}, final reply)."""
        raw = name.encode()
        payload = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
        for q in queries:
            qb = q.encode()
            payload += struct.pack(">I", len(qb)) + qb
        self.send_opt(option, payload)
        contexts = {}
        replies = self.opt_replies()
        for r in replies[:-1]:
            assert r.type == NBD_REP_META_CONTEXT
            contexts_id = struct.unpack(">I", r.data[:4])[0]
            contexts[contexts_id if option == NBD_OPT_SET_META_CONTEXT else len(contexts)] = r.data[4:].decode()
        return contexts, replies[-1]

    def opt_set_meta_context(self, name: str, queries: list[str]):
        return self.opt_meta_context(NBD_OPT_SET_META_CONTEXT, name, queries)

    def opt_list_meta_context(self, name: str, queries: list[str]):
        return self.opt_meta_context(NBD_OPT_LIST_META_CONTEXT, name, queries)

    def opt_abort(self) -> None:
        self.send_opt(NBD_OPT_ABORT)

    def connect_export(self, name: str, structured: bool = True, contexts: list[str] | None = None) -> dict:
        """Handshake, optional structured replies and meta contexts, then GO; returns the GO dict."""
        self.handshake()
        if structured:
            self.opt_structured_reply()
            if contexts:
                self.opt_set_meta_context(name, contexts)
        info = self.opt_go(name)
        if "error" in info:
            raise AssertionError(f"NBD_OPT_GO failed: {info['error']}")
        return info

    # -- transmission -----------------------------------------------------

    def send_request(self, type: int, offset: int, length: int, flags: int = 0, data=None,
                     handle: int | None = None, magic: int = NBD_REQUEST_MAGIC) -> int:
        if handle is None:
            handle = self.next_handle
            self.next_handle += 1
        hdr = struct.pack(">IHHQQI", magic, flags, type, handle, offset, length)
        self.pending[handle] = (type, length, offset)
        if data is not None:
            self.send(hdr + bytes(data) if len(data) < 65536 else hdr)
            if len(data) >= 65536:
                self.send(data)
        else:
            self.send(hdr)
        return handle

    def receive_reply(self) -> NBDTestReply:
        """The next whole reply (for structured replies: every chunk up to the DONE flag)."""
        magic = struct.unpack(">I", self.recv_exact(4))[0]
        if magic == NBD_SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", self.recv_exact(12))
            type_, length, _ = self.pending.pop(handle, (None, 0, 0))
            data = None
            if type_ == NBD_CMD_READ and not error:
                data = self.recv_exact(length) if length else b""
            return NBDTestReply(handle, error, data)
        if magic != NBD_STRUCTURED_REPLY_MAGIC:
            raise AssertionError(f"bad reply magic {magic:#x}")
        reply: NBDTestReply | None = None
        while True:
            if reply is not None:
                magic = struct.unpack(">I", self.recv_exact(4))[0]
                assert magic == NBD_STRUCTURED_REPLY_MAGIC, hex(magic)
            flags, type_, handle, length = struct.unpack(">HHQI", self.recv_exact(16))
            payload = self.recv_exact(length) if length else b""
            if reply is None:
                reply = NBDTestReply(handle, structured=True)
                req_type, req_len, req_off = self.pending.get(handle, (None, 0, 0))
                buf = bytearray(req_len) if req_type == NBD_CMD_READ else None
            assert handle == reply.handle, "chunks of two replies interleaved"
            reply.chunks.append((type_, flags, payload))
            if type_ == NBD_REPLY_TYPE_OFFSET_DATA:
                off = struct.unpack(">Q", payload[:8])[0] - req_off
                buf[off:off + length - 8] = payload[8:]
            elif type_ == NBD_REPLY_TYPE_OFFSET_HOLE:
                hoff, hlen = struct.unpack(">QI", payload)
                off = hoff - req_off
                buf[off:off + hlen] = bytes(hlen)
            elif type_ == NBD_REPLY_TYPE_BLOCK_STATUS:
                cid = struct.unpack(">I", payload[:4])[0]
                ext = [struct.unpack(">II", payload[i:i + 8]) for i in range(4, len(payload), 8)]
                reply.extents[cid] = ext
            elif nbd_reply_type_is_error(type_):
                reply.error, mlen = struct.unpack(">IH", payload[:6])
                reply.message = payload[6:6 + mlen].decode(errors="replace")
            if flags & NBD_REPLY_FLAG_DONE:
                break
        self.pending.pop(handle, None)
        if buf is not None and not reply.error:
            reply.data = bytes(buf)
        return reply

    # Convenience wrappers: one request, its reply

    def read(self, offset: int, length: int, flags: int = 0) -> NBDTestReply:
        self.send_request(NBD_CMD_READ, offset, length, flags)
        return self.receive_reply()

    def write(self, offset: int, data, flags: int = 0) -> NBDTestReply:
        self.send_request(NBD_CMD_WRITE, offset, len(data), flags, data)
        return self.receive_reply()

    def command(self, type: int, offset: int = 0, length: int = 0, flags: int = 0) -> NBDTestReply:
        self.send_request(type, offset, length, flags)
        return self.receive_reply()
