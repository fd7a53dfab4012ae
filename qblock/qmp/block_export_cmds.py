"""The QMP side of the NBD server and block exports: QEMU's blockdev-nbd.c and block/export/export.c commands.

``nbd-server-start`` takes its address as a SocketAddressLegacy
(``{"type": "unix", "data": {"path": ...}}``); :func:`socket_address_flatten`
turns it into the flat SocketAddress (``{"type": "unix", "path": ...}``) that
``--nbd-server addr.type=unix,addr.path=...`` gives directly
(:func:`nbd_server_start_options`, QEMU's NbdServerOptions).  The server
and the exports themselves are ``qblock.nbd.blockdev_nbd`` and
``qblock.block.export``; they are imported when a command runs, so the
monitor works without them (the commands then fail with a qblock message).
"""
from __future__ import annotations

from typing import Any

from qblock.util.error import Error

__all__ = ["socket_address_flatten", "qmp_nbd_server_start", "nbd_server_start_options", "qmp_nbd_server_stop",
           "qmp_block_export_add", "qmp_block_export_del", "qmp_query_block_exports", "blk_exp_close_all"]


def _nbd():
    try:
        from qblock.nbd import blockdev_nbd
    except ImportError as e:  # pragma: no cover - only before the NBD server exists
        raise Error(f"qblock: the NBD server is not available ({e})") from None
    return blockdev_nbd


def _export():
    try:
        from qblock import nbd as _nbd_types  # registers the nbd export type
        from qblock.block import export
        del _nbd_types
    except ImportError as e:  # pragma: no cover - only before block exports exist
        raise Error(f"qblock: block exports are not available ({e})") from None
    return export


def socket_address_flatten(addr: dict[str, Any]) -> dict[str, Any]:
    """SocketAddressLegacy (members under ``data``) to the flat SocketAddress (util/qemu-sockets.c)."""
    return {"type": addr["type"], **addr["data"]}


def qmp_nbd_server_start(addr: dict[str, Any], tls_creds: str | None = None, tls_authz: str | None = None,
                         max_connections: int | None = None) -> None:
    _nbd().nbd_server_start(socket_address_flatten(addr), tls_creds, tls_authz, max_connections or 0)


def nbd_server_start_options(arg: dict[str, Any]) -> None:
    """``--nbd-server``: a checked NbdServerOptions (flat ``addr``)."""
    _nbd().nbd_server_start(arg["addr"], arg.get("tls-creds"), arg.get("tls-authz"),
                            arg.get("max-connections", 0))


def qmp_nbd_server_stop() -> None:
    _nbd().nbd_server_stop()


def qmp_block_export_add(options: dict[str, Any]) -> None:
    """block-export-add (boxed BlockExportOptions)."""
    _export().blk_exp_add(options)


def qmp_block_export_del(id: str, mode: str = "safe") -> None:
    _export().qmp_block_export_del(id, mode)


def qmp_query_block_exports() -> list[dict[str, Any]]:
    return _export().qmp_query_block_exports()


def blk_exp_close_all() -> None:
    """Close every export (at exit); nothing to do when exports were never loaded."""
    import sys
    export = sys.modules.get("qblock.block.export")
    if export is not None:
        export.blk_exp_close_all()
    nbd = sys.modules.get("qblock.nbd.blockdev_nbd")
    if nbd is not None and nbd.nbd_server_is_running():
        nbd.nbd_server_stop()
