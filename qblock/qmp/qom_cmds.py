"""object-add, object-del and --object: QEMU's qom/qom-qmp-cmds.c and qom/object_interfaces.c.

Two user-creatable types exist in qblock: ``throttle-group`` (created by
qblock.block.throttle_groups, which keeps the ``/objects`` container for
groups) and ``iothread`` (an :class:`qblock.util.aio.IOThread`, kept here).
Both share one id namespace, as QEMU's ``/objects`` container does.
Arguments are first checked against QAPI's ObjectOptions
(:mod:`qblock.qmp.qapi_visit`), in QMP or keyval syntax.

The iothread's ``poll-max-ns``/``poll-grow``/``poll-shrink`` and the event
loop properties (``aio-max-batch``, ``thread-pool-min/max``) are checked and
kept but change nothing: qblock's AioContext does not poll adaptively.
Other object types QEMU knows are refused with a qblock message.
"""
from __future__ import annotations

import sys
from typing import Any

from qblock.block import throttle_groups
from qblock.block.graph import id_wellformed
from qblock.qmp.qapi_visit import visit_type
from qblock.util.aio import IOThread, iothread_create, iothread_destroy
from qblock.util.error import Error
from qblock.util.qemu_option import keyval_parse, qdict_crumple

__all__ = ["qmp_object_add", "qmp_object_del", "user_creatable_add_qapi", "user_creatable_process_cmdline",
           "user_creatable_cleanup", "iothread_by_object_id", "USER_CREATABLE_TYPES"]

USER_CREATABLE_TYPES = ("iothread", "throttle-group")
_INT64_MAX = (1 << 63) - 1

_iothreads: dict[str, tuple[IOThread, dict[str, Any]]] = {}


def iothread_by_object_id(id: str) -> IOThread | None:
    entry = _iothreads.get(id)
    return entry[0] if entry is not None else None


def _object_exists(id: str) -> bool:
    return id in _iothreads or throttle_groups.object_resolve_objects_root(id) is not None


def user_creatable_add_qapi(options: dict[str, Any]) -> None:
    """Create the object a checked ObjectOptions describes."""
    qom_type, id = options["qom-type"], options["id"]
    if qom_type not in USER_CREATABLE_TYPES:
        raise Error(f"qblock: object type '{qom_type}' is not supported")
    if _object_exists(id):
        raise Error(f"attempt to add duplicate property '{id}' to object (type 'container')")
    if qom_type == "throttle-group":
        throttle_groups.user_creatable_add_dict(options, keyval=False)
        return
    props = {k: v for k, v in options.items() if k not in ("qom-type", "id")}
    for name in ("poll-max-ns", "poll-grow", "poll-shrink"):
        if props.get(name, 0) < 0:
            raise Error(f"{name} value must be in range [0, {_INT64_MAX}]")
    if not id_wellformed(id):
        raise Error("Parameter 'id' expects an identifier",
                    hint="Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.")
    _iothreads[id] = (iothread_create(id), props)


def qmp_object_add(options: dict[str, Any]) -> None:
    """object-add (boxed ObjectOptions)."""
    user_creatable_add_qapi(options)


def qmp_object_del(id: str) -> None:
    """object-del: an iothread is stopped; a throttle group goes only when unused."""
    entry = _iothreads.pop(id, None)
    if entry is not None:
        iothread_destroy(entry[0])
        return
    throttle_groups.user_creatable_del(id)


def user_creatable_process_cmdline(optarg: str) -> bool:
    """``--object TYPE,id=ID,...``: create it; False when only help was asked for (and printed)."""
    if optarg == "help":
        sys.stdout.write("List of user creatable objects:\n" + "".join(f"  {t}\n" for t in USER_CREATABLE_TYPES))
        return False
    qdict = qdict_crumple(keyval_parse(optarg, "qom-type"))
    if qdict.get("help") == "on" and len(qdict) == 2:
        sys.stdout.write(f"{qdict.get('qom-type')} options: see qapi/qom.json\n")
        return False
    options = visit_type("ObjectOptions", qdict, keyval=True)
    user_creatable_add_qapi(options)
    return True


def user_creatable_cleanup() -> None:
    """Delete every iothread object (at exit); throttle groups go with their last user."""
    for id in list(_iothreads):
        thread, _ = _iothreads.pop(id)
        iothread_destroy(thread)
