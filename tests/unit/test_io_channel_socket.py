"""QIOChannelSocket and QIONetListener (io/channel.c, io/channel-socket.c, io/net-listener.c): QEMU's
test-io-channel-socket.c in spirit — data through a socket pair from coroutines, yield and wake-up, EOF."""
from __future__ import annotations

import os
import socket

import pytest

from qblock.testing.nbd_client import aio_pump
from qblock.util.aio import qemu_get_aio_context
from qblock.util.coroutine import qemu_coroutine_create, qemu_coroutine_enter
from qblock.util.qio_channel import (
    G_IO_IN,
    QIO_CHANNEL_SHUTDOWN_BOTH,
    qio_channel_close,
    qio_channel_read_all,
    qio_channel_read_all_eof,
    qio_channel_set_blocking,
    qio_channel_shutdown,
    qio_channel_socket_connect_sync,
    qio_channel_socket_get_local_address,
    qio_channel_socket_new,
    qio_channel_socket_new_fd,
    qio_channel_wake_read,
    qio_channel_write_all,
    qio_channel_writev_all,
    qio_channel_yield,
    qio_net_listener_disconnect,
    qio_net_listener_new,
    qio_net_listener_open_sync,
    qio_net_listener_set_client_func,
)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    ca, cb = qio_channel_socket_new_fd(a.detach()), qio_channel_socket_new_fd(b.detach())
    for c in (ca, cb):
        qio_channel_set_blocking(c, False)
    yield ca, cb
    for c in (ca, cb):
        qio_channel_close(c)


def _run_until(cond, limit: int = 2000) -> None:
    ctx = qemu_get_aio_context()
    for _ in range(limit):
        if cond():
            return
        aio_pump(ctx, 10_000_000)
    raise AssertionError("condition never became true")


def test_coroutines_move_more_than_the_socket_buffer(pair):
    """A writer and a reader coroutine move 4 MiB (far more than the socket buffers) by yielding on EAGAIN."""
    ca, cb = pair
    data = os.urandom(4 << 20)
    got = bytearray(len(data))
    done = []

    def writer(_):
        done.append(("w", qio_channel_writev_all(ca, [memoryview(data)[:1000], memoryview(data)[1000:]])))

    def reader(_):
        done.append(("r", qio_channel_read_all(cb, got)))

    qemu_coroutine_enter(qemu_coroutine_create(writer, None))
    qemu_coroutine_enter(qemu_coroutine_create(reader, None))
    _run_until(lambda: len(done) == 2)
    assert sorted(done) == [("r", 0), ("w", 0)] and got == data
    assert ca.handler_ctx is None and cb.handler_ctx is None   # no fd handler left behind


def test_eof_before_and_within_a_read(pair):
    """read_all_eof returns 0 at a clean EOF; a short read ends in QEMU's error messages."""
    ca, cb = pair
    out = []

    def reader(_):
        errp: list = []
        out.append(qio_channel_read_all_eof(cb, bytearray(8), errp))
        out.append(str(errp[0]) if errp else None)
        errp = []
        out.append(qio_channel_read_all(cb, bytearray(8), errp))
        out.append(str(errp[0]))

    qemu_coroutine_enter(qemu_coroutine_create(reader, None))
    assert qio_channel_write_all(ca, b"1234") == 0
    qio_channel_shutdown(ca, QIO_CHANNEL_SHUTDOWN_BOTH)
    _run_until(lambda: len(out) == 4)
    assert out == [-1, "Unexpected end-of-file before all bytes were read",
                   -1, "Unexpected end-of-file before all data were read"]


def test_shutdown_wakes_a_waiting_reader(pair):
    """A coroutine waiting to read wakes up at shutdown and sees end-of-file."""
    ca, cb = pair
    out = []

    def reader(_):
        out.append(qio_channel_read_all_eof(cb, bytearray(16)))

    qemu_coroutine_enter(qemu_coroutine_create(reader, None))
    assert cb.read_coroutine is not None
    qio_channel_shutdown(cb, QIO_CHANNEL_SHUTDOWN_BOTH)
    _run_until(lambda: out)
    assert out == [0]


def test_wake_read_interrupts_the_wait(pair):
    """qio_channel_wake_read re-enters a coroutine in qio_channel_yield; it stops watching the fd."""
    _, cb = pair
    steps = []

    def waiter(_):
        qio_channel_yield(cb, G_IO_IN)
        steps.append("woken")

    qemu_coroutine_enter(qemu_coroutine_create(waiter, None))
    assert cb.handler_ctx is qemu_get_aio_context()
    qio_channel_wake_read(cb)
    assert steps == ["woken"] and cb.read_coroutine is None and cb.handler_ctx is None


def test_listener_accepts_unix_and_inet(tmp_path):
    """QIONetListener calls its client function for each connection, on UNIX and TCP sockets."""
    for addr in ({"type": "unix", "path": str(tmp_path / "l.sock")}, {"type": "inet", "host": "127.0.0.1",
                                                                      "port": "0"}):
        listener = qio_net_listener_new()
        qio_net_listener_open_sync(listener, addr, 5)
        accepted = []
        qio_net_listener_set_client_func(listener, lambda lis, cioc, data: accepted.append((cioc, data)), "x")
        local = qio_channel_socket_get_local_address(listener.sioc[0])
        client = qio_channel_socket_new()
        assert qio_channel_socket_connect_sync(client, local) == 0
        _run_until(lambda: accepted)
        cioc, data = accepted[0]
        assert data == "x"
        assert qio_channel_write_all(client, b"hi") == 0
        buf = bytearray(2)
        assert qio_channel_read_all(cioc, buf) == 0 and buf == b"hi"
        for c in (client, cioc):
            qio_channel_close(c)
        qio_net_listener_disconnect(listener)
        if addr["type"] == "unix":
            assert not os.path.exists(addr["path"])
