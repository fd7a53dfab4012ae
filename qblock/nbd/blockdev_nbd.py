"""Starting and stopping the NBD server: QEMU's blockdev-nbd.c.

:func:`nbd_server_start` listens on a SocketAddress (QAPI's flat form:
``{"type": "unix", "path": P}`` or ``{"type": "inet", "host": H, "port": "N"}``)
and hands every accepted connection to :func:`qblock.nbd.server.nbd_client_new`.
With ``max_connections`` set, the listener stops accepting while that many
clients are connected (the kernel's backlog holds the rest) and resumes when
one leaves, as QEMU's ``nbd_update_server_watch``.  Exports are added with
``block-export-add`` (:func:`qblock.block.export.blk_exp_add`).

:func:`nbd_server_stop` closes the NBD exports (disconnecting their
clients), stops listening, and also shuts down connections still in the
handshake and waits for them: that is QEMU 9.1's fix for CVE-2024-7409
(7.2 left such clients behind, to crash later in ``close_fn``).

Left out: TLS (``tls-creds`` names an object qblock cannot have, so it fails
with QEMU's "No TLS credentials" message), the handshake timeout of QEMU 9.1,
and the deprecated ``nbd-server-add``/``nbd-server-remove`` commands.
"""
from __future__ import annotations

import socket
from typing import Any

import attrs

from qblock.block.export import blk_exp_close_all_type
from qblock.nbd.server import NBDClient, nbd_client_new, nbd_client_put
from qblock.nbd.trace import trace_nbd_server_accept
from qblock.util.aio import AIO_WAIT_WHILE, aio_wait_kick
from qblock.util.error import Error
from qblock.util.qio_channel import (
    QIO_CHANNEL_SHUTDOWN_BOTH,
    QIOChannelSocket,
    QIONetListener,
    qio_channel_set_name,
    qio_channel_shutdown,
    qio_channel_socket_get_local_address,
    qio_net_listener_disconnect,
    qio_net_listener_new,
    qio_net_listener_open_sync,
    qio_net_listener_set_client_func,
    qio_net_listener_set_name,
)

__all__ = [
    "NBDServerData", "nbd_server_start", "nbd_server_stop", "nbd_server_is_running", "nbd_server_addr",
    "nbd_server_max_connections", "nbd_server_is_qemu_nbd", "socket_address_flatten",
    "qmp_nbd_server_start", "qmp_nbd_server_stop",
]

SOMAXCONN = socket.SOMAXCONN


@attrs.define(eq=False)
class NBDServerData:
    """The running server (QEMU's NBDServerData)."""

    listener: QIONetListener
    tlscreds: Any = None
    tlsauthz: str | None = None
    max_connections: int = 0
    connections: int = 0
    conns: list[QIOChannelSocket] = attrs.field(factory=list)   # every open connection (QEMU 9.1's NBDConn)

    @property
    def trace_name(self) -> str:
        return "nbd-server"


nbd_server: NBDServerData | None = None
qemu_nbd_connections = -1   # non-negative when this is qemu-nbd (no QMP server, one built-in export)


def nbd_server_is_qemu_nbd(max_connections: int) -> None:
    """Say that this process is qemu-nbd, serving at most ``max_connections`` clients (0: unlimited)."""
    global qemu_nbd_connections
    qemu_nbd_connections = max_connections


def nbd_server_is_running() -> bool:
    return nbd_server is not None or qemu_nbd_connections >= 0


def nbd_server_max_connections() -> int:
    return nbd_server.max_connections if nbd_server is not None else qemu_nbd_connections


def _make_client_closed(server: NBDServerData, sioc: QIOChannelSocket):
    def nbd_blockdev_client_closed(client: NBDClient, ignored: bool) -> None:
        nbd_client_put(client)
        assert server.connections > 0
        server.connections -= 1
        if sioc in server.conns:
            server.conns.remove(sioc)
        if server is nbd_server:
            nbd_update_server_watch(server)
        aio_wait_kick()   # nbd_server_stop may be waiting for the count to reach 0
    return nbd_blockdev_client_closed


def nbd_accept(listener: QIONetListener, cioc: QIOChannelSocket, opaque: Any) -> None:
    server: NBDServerData = opaque
    server.connections += 1
    server.conns.append(cioc)
    if trace_nbd_server_accept.event.enabled:
        trace_nbd_server_accept(listener, cioc, server.connections)
    nbd_update_server_watch(server)
    qio_channel_set_name(cioc, "nbd-server")
    nbd_client_new(cioc, server.tlscreds, server.tlsauthz, _make_client_closed(server, cioc))


def nbd_update_server_watch(s: NBDServerData) -> None:
    """Accept while below max-connections; otherwise leave new clients in the backlog."""
    if not s.max_connections or s.connections < s.max_connections:
        qio_net_listener_set_client_func(s.listener, nbd_accept, s, None)
    else:
        qio_net_listener_set_client_func(s.listener, None, None, None)


def nbd_server_free(server: NBDServerData | None) -> None:
    """Stop listening, shut down the connections left and wait until they are gone."""
    if server is None:
        return
    qio_net_listener_disconnect(server.listener)
    for sioc in list(server.conns):
        qio_channel_shutdown(sioc, QIO_CHANNEL_SHUTDOWN_BOTH, None)
    AIO_WAIT_WHILE(None, lambda: server.connections > 0)


def nbd_get_tls_creds(id: str):
    raise Error(f"No TLS credentials with id '{id}'")   # qblock has no tls-creds-* objects


def nbd_server_start(addr: dict, tls_creds: str | None = None, tls_authz: str | None = None,
                     max_connections: int = 0) -> None:
    """Listen for NBD clients on ``addr`` (a flat SocketAddress); raises Error with QEMU's messages."""
    global nbd_server
    if nbd_server is not None:
        raise Error("NBD server already running")
    if not isinstance(max_connections, int) or not 0 <= max_connections <= 0xFFFFFFFF:
        raise Error("Parameter 'max-connections' expects uint32_t")
    server = NBDServerData(qio_net_listener_new(), max_connections=max_connections)
    qio_net_listener_set_name(server.listener, "nbd-listener")
    nbd_server = server
    try:
        # The server is persistent: a backlog of SOMAXCONN, not max_connections.
        qio_net_listener_open_sync(server.listener, addr, SOMAXCONN)
        if tls_creds:
            server.tlscreds = nbd_get_tls_creds(tls_creds)
            if addr.get("type") != "inet":
                raise Error("TLS is only supported with IPv4/IPv6")
        server.tlsauthz = tls_authz
        nbd_update_server_watch(server)
    except BaseException:
        nbd_server = None
        nbd_server_free(server)
        raise


def nbd_server_stop() -> None:
    """Close every NBD export and the listener; raises Error("NBD server not running")."""
    global nbd_server
    if nbd_server is None:
        raise Error("NBD server not running")
    blk_exp_close_all_type("nbd")
    server, nbd_server = nbd_server, None
    nbd_server_free(server)


def nbd_server_addr() -> dict:
    """The address the server listens on (the first, if it resolved to several), e.g. to learn port 0's port."""
    if nbd_server is None or not nbd_server.listener.sioc:
        raise Error("NBD server not running")
    return qio_channel_socket_get_local_address(nbd_server.listener.sioc[0])


def socket_address_flatten(addr: dict) -> dict:
    """QAPI SocketAddressLegacy (``{"type": "unix", "data": {...}}``) to the flat SocketAddress."""
    if "data" not in addr:
        return dict(addr)
    kind = addr.get("type")
    data = dict(addr["data"])
    if kind == "fd":
        return {"type": "fd", "str": data.get("str", "")}
    return {"type": kind, **data}


def qmp_nbd_server_start(addr: dict, tls_creds: str | None = None, tls_authz: str | None = None,
                         max_connections: int = 0) -> None:
    """QMP ``nbd-server-start``: ``addr`` is a SocketAddressLegacy (the flat form is accepted too)."""
    nbd_server_start(socket_address_flatten(addr), tls_creds, tls_authz, max_connections)


def qmp_nbd_server_stop() -> None:
    nbd_server_stop()
