"""Block exports: QEMU's block/export/export.c and include/block/export.h.

A :class:`BlockExport` serves one node to the outside world (NBD; in QEMU
also vhost-user-blk, FUSE and VDUSE) through a BlockBackend of its own.
:func:`blk_exp_add` takes QAPI's ``BlockExportOptions`` as a dict::

    blk_exp_add({"type": "nbd", "id": "exp0", "node-name": "fmt0", "writable": True,
                 "name": "disk", "description": "the disk"})

checks it with QEMU's messages, moves the node into the requested IOThread,
creates the BlockBackend (CONSISTENT_READ, plus WRITE when writable; every
permission shared, as QEMU), sets write-through and hands the export to its
driver's ``create``.

Export drivers register by type with :func:`blk_exp_register_driver`; the
block layer never imports one (``import qblock.nbd`` registers the NBD
driver, so whoever offers ``type=nbd`` imports it first).

Life cycle as in QEMU: the user (QMP) owns one reference, each connected
client another.  :func:`blk_exp_request_shutdown` drops the user's reference
and asks the driver to disconnect its clients; the last :func:`blk_exp_unref`
deletes the export from a BH in the main loop, which releases the
BlockBackend and sends ``BLOCK_EXPORT_DELETED``.

Left out: ``bdrv_activate`` (qblock has no inactive images), the vhost-user,
FUSE and VDUSE drivers, and ``blk_exp_close_all_type``'s graph locking.
Boolean options also accept keyval's ``on``/``off`` strings, as QEMU's
command line does.
"""
from __future__ import annotations

from typing import Any, ClassVar

import attrs

from qblock.block.block_backend import (
    BlockBackend,
    blk_bs,
    blk_insert_bs,
    blk_new,
    blk_set_allow_aio_context_change,
    blk_set_dev_ops,
    blk_set_enable_write_cache,
    blk_unref,
)
from qblock.block.graph import (
    BLK_PERM_ALL,
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_WRITE,
    bdrv_get_aio_context,
    bdrv_get_node_name,
    bdrv_is_read_only,
    bdrv_lookup_bs,
    bdrv_try_set_aio_context,
    id_wellformed,
)
from qblock.util.aio import (
    AIO_WAIT_WHILE,
    AioContext,
    aio_bh_schedule_oneshot,
    iothread_by_id,
    iothread_get_aio_context,
    qemu_get_aio_context,
)
from qblock.util.error import Error
from qblock.util.qapi_event import qapi_event_send

__all__ = [
    "BlockExport", "BlockExportDriver", "BLOCK_EXPORT_TYPES",
    "blk_exp_register_driver", "blk_exp_find_driver", "blk_exp_find", "blk_exp_add", "blk_exp_ref",
    "blk_exp_unref", "blk_exp_request_shutdown", "blk_exp_close_all", "blk_exp_close_all_type",
    "qmp_block_export_add", "qmp_block_export_del", "qmp_query_block_exports", "qapi_bool_parse",
]

# QAPI's BlockExportType
BLOCK_EXPORT_TYPES = ("nbd", "vhost-user-blk", "fuse", "vduse-blk")

# QAPI's BlockExportOptions base members: name -> (type, required)
_BASE_MEMBERS: dict[str, tuple[type, bool]] = {
    "type": (str, True),
    "id": (str, True),
    "fixed-iothread": (bool, False),
    "iothread": (str, False),
    "node-name": (str, True),
    "writable": (bool, False),
    "writethrough": (bool, False),
}


@attrs.define(eq=False)
class BlockExport:
    """One export (QEMU's BlockExport); drivers subclass it with their own fields (QEMU's instance_size)."""

    drv: "BlockExportDriver"
    id: str
    ctx: AioContext
    blk: BlockBackend
    refcount: int = 1
    user_owned: bool = True   # the user (QMP) still holds its reference

    @property
    def trace_name(self) -> str:
        return f"export {self.id}"


class BlockExportDriver:
    """An export type (QEMU's BlockExportDriver): ``type``, the instance class and three hooks.

    ``opts_members`` declares the members of the type's branch of
    BlockExportOptions (name -> (python type, required)).
    """

    type: ClassVar[str] = ""
    instance_class: ClassVar[type[BlockExport]] = BlockExport
    opts_members: ClassVar[dict[str, tuple[type, bool]]] = {}

    def create(self, exp: BlockExport, opts: dict[str, Any]) -> None:
        """Set up ``exp`` (its BlockBackend exists); raise Error to fail blk_exp_add."""
        raise NotImplementedError

    def delete(self, exp: BlockExport) -> None:
        """Free what ``create`` set up; the refcount is 0."""

    def request_shutdown(self, exp: BlockExport) -> None:
        """Disconnect clients so that they drop their references."""

    def __repr__(self) -> str:
        return f"<BlockExportDriver {self.type}>"


_drivers: dict[str, BlockExportDriver] = {}
block_exports: list[BlockExport] = []   # newest first, as QEMU's QLIST_INSERT_HEAD


def blk_exp_register_driver(drv: BlockExportDriver) -> BlockExportDriver:
    """Make export type ``drv.type`` available to blk_exp_add."""
    _drivers[drv.type] = drv
    return drv


def blk_exp_find_driver(type: str) -> BlockExportDriver | None:
    return _drivers.get(type)


def blk_exp_find(id: str) -> BlockExport | None:
    for exp in block_exports:
        if exp.id == id:
            return exp
    return None


# --------------------------------------------------------------------------
# QAPI input checks (what QEMU's generated visitors reject before the command runs)

_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


def qapi_bool_parse(name: str, value: Any) -> bool:
    """A QAPI boolean: a bool, or keyval's on/off spelling (util/qapi-util.c: qapi_bool_parse)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise Error(f"Parameter '{name}' expects 'on' or 'off'")
    raise Error(f"Invalid parameter type for '{name}', expected: boolean")


def _qapi_check_members(opts: dict[str, Any], members: dict[str, tuple[type, bool]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (typ, required) in members.items():
        if name not in opts:
            if required:
                raise Error(f"Parameter '{name}' is missing")
            continue
        value = opts[name]
        if typ is bool:
            value = qapi_bool_parse(name, value)
        elif typ is str and not isinstance(value, str):
            raise Error(f"Invalid parameter type for '{name}', expected: string")
        elif typ is list and not isinstance(value, list):
            raise Error(f"Invalid parameter type for '{name}', expected: array")
        out[name] = value
    for name in opts:
        if name not in members:
            raise Error(f"Parameter '{name}' is unexpected")
    return out


# --------------------------------------------------------------------------
# Life cycle


def blk_exp_add(export: dict[str, Any]) -> BlockExport:
    """Create an export from QAPI BlockExportOptions (a dict); raises Error with QEMU's messages."""
    type_ = export.get("type")
    if type_ is not None and type_ not in BLOCK_EXPORT_TYPES:
        raise Error(f"Parameter 'type' does not accept value '{type_}'")
    drv = blk_exp_find_driver(type_) if isinstance(type_, str) else None
    members = dict(_BASE_MEMBERS)
    if drv is not None:
        members.update(drv.opts_members)
    opts = _qapi_check_members(export, members)

    fixed_iothread = opts.get("fixed-iothread", False)
    if not id_wellformed(opts["id"]):
        raise Error("Invalid block export id")
    if blk_exp_find(opts["id"]) is not None:
        raise Error(f"Block export id '{opts['id']}' is already in use")
    if drv is None:
        raise Error("No driver found for the requested export type")

    bs = bdrv_lookup_bs(None, opts["node-name"])
    writable = opts.setdefault("writable", False)
    if bdrv_is_read_only(bs) and writable:
        raise Error("Cannot export read-only node as writable")

    ctx = bdrv_get_aio_context(bs)
    if "iothread" in opts:
        iothread = iothread_by_id(opts["iothread"])
        if iothread is None:
            raise Error(f"iothread \"{opts['iothread']}\" not found")
        new_ctx = iothread_get_aio_context(iothread)
        try:
            bdrv_try_set_aio_context(bs, new_ctx)
            ctx = new_ctx
        except Error:
            if fixed_iothread:
                raise  # with fixed-iothread=false, QEMU ignores the failure and stays where it is

    perm = BLK_PERM_CONSISTENT_READ
    if writable:
        perm |= BLK_PERM_WRITE
    blk = blk_new(ctx, perm, BLK_PERM_ALL)
    if not fixed_iothread:
        blk_set_allow_aio_context_change(blk, True)
    exp = None
    try:
        blk_insert_bs(blk, bs)
        blk_set_enable_write_cache(blk, not opts.setdefault("writethrough", False))
        exp = drv.instance_class(drv=drv, id=opts["id"], ctx=ctx, blk=blk)
        drv.create(exp, opts)
    except BaseException:
        blk_set_dev_ops(blk, None, None)
        blk_unref(blk)
        raise
    block_exports.insert(0, exp)
    return exp


def blk_exp_ref(exp: BlockExport) -> None:
    if exp.refcount <= 0:
        raise AssertionError(f"blk_exp_ref of {exp.trace_name} with refcount {exp.refcount}")
    exp.refcount += 1


def blk_exp_delete_bh(exp: BlockExport) -> None:
    """Runs in the main loop once the last reference is gone."""
    if exp.refcount != 0:
        raise AssertionError(f"blk_exp_delete_bh: {exp.trace_name} has refcount {exp.refcount}")
    if exp in block_exports:
        block_exports.remove(exp)
    exp.drv.delete(exp)
    blk_set_dev_ops(exp.blk, None, None)
    blk_unref(exp.blk)
    qapi_event_send("BLOCK_EXPORT_DELETED", {"id": exp.id})


def blk_exp_unref(exp: BlockExport) -> None:
    """Drop a reference; the last one deletes the export from a BH in the main loop."""
    if exp.refcount <= 0:
        raise AssertionError(f"blk_exp_unref of {exp.trace_name} with refcount {exp.refcount}")
    exp.refcount -= 1
    if exp.refcount == 0:
        aio_bh_schedule_oneshot(qemu_get_aio_context(), blk_exp_delete_bh, exp, "blk_exp_delete_bh")


def blk_exp_request_shutdown(exp: BlockExport) -> None:
    """Drop the user's reference and ask the driver to disconnect everyone (once)."""
    if not exp.user_owned:
        return
    exp.drv.request_shutdown(exp)
    exp.user_owned = False
    blk_exp_unref(exp)


def _blk_exp_has_type(type: str | None) -> bool:
    if type is None:
        return bool(block_exports)
    return any(exp.drv.type == type for exp in block_exports)


def blk_exp_close_all_type(type: str | None) -> None:
    """Shut down every export of ``type`` (None: all) and poll until all are deleted."""
    for exp in list(block_exports):
        if type is not None and exp.drv.type != type:
            continue
        blk_exp_request_shutdown(exp)
    AIO_WAIT_WHILE(None, lambda: _blk_exp_has_type(type))


def blk_exp_close_all() -> None:
    """Close every export and wait until their clients are gone (daemon exit)."""
    blk_exp_close_all_type(None)


# --------------------------------------------------------------------------
# QMP commands


def qmp_block_export_add(export: dict[str, Any]) -> None:
    blk_exp_add(export)


def qmp_block_export_del(id: str, mode: str = "safe") -> None:
    """Remove export ``id``: ``safe`` refuses while clients are connected, ``hard`` disconnects them."""
    if mode not in ("safe", "hard"):
        raise Error(f"Parameter 'mode' does not accept value '{mode}'")
    exp = blk_exp_find(id)
    if exp is None:
        raise Error(f"Export '{id}' is not found")
    if not exp.user_owned:
        raise Error(f"Export '{id}' is already shutting down")
    if mode == "safe" and exp.refcount > 1:
        raise Error(f"export '{exp.id}' still in use", hint="Use mode='hard' to force client disconnect\n")
    blk_exp_request_shutdown(exp)


def qmp_query_block_exports() -> list[dict[str, Any]]:
    """QAPI BlockExportInfo of every export: ``id``, ``type``, ``node-name``, ``shutting-down``."""
    return [{"id": exp.id, "type": exp.drv.type, "node-name": bdrv_get_node_name(blk_bs(exp.blk)),
             "shutting-down": not exp.user_owned} for exp in block_exports]
