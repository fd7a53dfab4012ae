"""Reopening nodes with changed options: the reopen transaction of QEMU's block.c.

``bdrv_reopen_queue`` collects a node and the children that inherit their options from it
(``inherits_from``: the ``file`` child of a format, a backing file opened with its overlay),
each with its new options and flags; ``bdrv_reopen_multiple`` then runs the transaction:

1. flush every node of the queue ("Error flushing drive");
2. ``bdrv_reopen_prepare`` each entry: the generic options (read-only, cache.*, discard,
   detect-zeroes), the copy-on-read check, the driver's ``bdrv_reopen_prepare(state, queue)``
   (a driver without it refuses: "Block format '%s' used by node '%s' does not support
   reopening files"), then every option left must equal the node's current one ("Cannot
   change the option '%s'");
3. refresh the permissions of the queued subtrees with the queue's new flags (the drivers'
   ``bdrv_check_perm``: the file driver's image locks), kept open as a transaction;
4. ``bdrv_reopen_commit`` every entry, last first, then commit the permissions — or, on any
   error, abort the permissions and ``bdrv_reopen_abort`` every prepared entry, so that every
   node (and every lock byte) is as it was.

``bdrv_reopen`` and ``bdrv_reopen_set_read_only`` are the one-node wrappers.  Errors are
raised (qblock's ``Error``), QEMU's functions return -errno and set errp.

Left out: changing the ``file`` or ``backing`` child by node name (blockdev-reopen's
bdrv_reopen_parse_file_or_backing: a child reference must name the current child),
bdrv_reset_options_allowed (every caller here keeps the old options), ``reopen_commit_post``
and AioContext switching.  Options are compared by value, strings and typed values alike
("on" equals True), where QEMU's qobject_is_equal is strict about types.
"""
from __future__ import annotations

from typing import Any

import attrs

from qblock.block.driver import BDRV_O_PROTOCOL, BDRV_O_RDWR, BlockdevDetectZeroesOptions
from qblock.block.graph import (
    BDRV_OPT_DISCARD,
    BdrvPermUpdate,
    BlockDriverState,
    _update_flags_from_options,
    bdrv_drained_begin,
    bdrv_drained_end,
    bdrv_get_device_or_node_name,
    bdrv_inherited_options,
    bdrv_list_refresh_perms,
    bdrv_parse_detect_zeroes,
    bdrv_parse_discard_flags,
    bdrv_refresh_limits,
    bdrv_runtime_opts,
    refresh_total_sectors,
)
from qblock.block.io import bdrv_flush
from qblock.util.error import Error, error_setg_errno
from qblock.util.qemu_option import qdict_extract_subqdict, qemu_opts_absorb_qdict


@attrs.define
class BDRVReopenState:
    """One node's staged reopen (QEMU's BDRVReopenState); drivers keep their staging in ``opaque``."""

    bs: BlockDriverState
    flags: int = 0
    options: dict = attrs.field(factory=dict)
    explicit_options: dict = attrs.field(factory=dict)
    detect_zeroes: BlockdevDetectZeroesOptions = BlockdevDetectZeroesOptions.BLOCKDEV_DETECT_ZEROES_OPTIONS_OFF
    opaque: Any = None


@attrs.define
class BlockReopenQueueEntry:
    state: BDRVReopenState
    prepared: bool = False


BlockReopenQueue = list   # of BlockReopenQueueEntry, in queueing order (QEMU's QTAILQ)


def _without_children(bs: BlockDriverState, options: dict) -> dict:
    """A copy of ``options`` without child references and child options.

    QEMU removes them from bs->options once the node is open; qblock keeps them there, so the
    reopen code drops them when it reads the old options.
    """
    names = [c.name for c in bs.children]
    return {k: v for k, v in options.items()
            if k not in names and not any(k.startswith(n + ".") for n in names)}


def bdrv_join_options(bs: BlockDriverState, options: dict, old_options: dict) -> None:
    """Add the old options that ``options`` does not set (block.c: bdrv_join_options)."""
    for k, v in old_options.items():
        options.setdefault(k, v)


def bdrv_reopen_queue_child(bs_queue: BlockReopenQueue | None, bs: BlockDriverState, options: dict | None,
                            klass, role: int, parent_is_format: bool, parent_options: dict | None,
                            parent_flags: int, keep_old_opts: bool) -> BlockReopenQueue:
    """Queue ``bs`` (and its inheriting children) with ``options``; the node stays drained until freed.

    Precedence, as QEMU's: options passed in, then the node's old explicit options, then what
    it inherits from the parent, then the node's old effective options.
    """
    if bs_queue is None:
        bs_queue = []
    options = dict(options or {})
    bs_entry = next((e for e in bs_queue if e.state.bs is bs), None)
    if bs_entry is None:
        bdrv_drained_begin(bs)
    if bs_entry is not None or keep_old_opts:
        old = bs_entry.state.explicit_options if bs_entry is not None else _without_children(bs, bs.explicit_options)
        bdrv_join_options(bs, options, dict(old))
    explicit_options = dict(options)
    if parent_options is not None:
        flags = bdrv_inherited_options(role, parent_is_format, parent_flags, parent_options, options)
    else:
        flags = bs.open_flags
    if keep_old_opts:
        bdrv_join_options(bs, options, _without_children(bs, bs.options))
    try:
        flags = _update_flags_from_options(flags, qemu_opts_absorb_qdict(bdrv_runtime_opts, dict(options)))
    except Error:
        pass  # bdrv_reopen_prepare reports it
    # bdrv_open_inherit sets BDRV_O_PROTOCOL itself; keep the node's own (QEMU clears it here).
    flags = (flags & ~BDRV_O_PROTOCOL) | (bs.open_flags & BDRV_O_PROTOCOL)
    if bs_entry is None:
        bs_entry = BlockReopenQueueEntry(BDRVReopenState(bs))
        bs_queue.append(bs_entry)
    bs_entry.state.options = options
    bs_entry.state.explicit_options = explicit_options
    bs_entry.state.flags = flags

    for child in list(bs.children):
        if child.bs.inherits_from is not bs:
            continue
        child_keep_old = keep_old_opts
        if child.name in options:
            # A reference to the current child reopens it with its own options; anything else
            # is not this child's business (and is refused by bdrv_reopen_prepare).
            if options[child.name] != child.bs.node_name:
                continue
            child_keep_old = True
            new_child_options: dict = {}
        else:
            qdict_extract_subqdict(explicit_options, child.name + ".")
            new_child_options = qdict_extract_subqdict(options, child.name + ".")
        bdrv_reopen_queue_child(bs_queue, child.bs, new_child_options, child.klass, child.role,
                                bs.drv is not None and bs.drv.is_format, options, flags, child_keep_old)
    return bs_queue


def bdrv_reopen_queue(bs_queue: BlockReopenQueue | None, bs: BlockDriverState, options: dict | None,
                      keep_old_opts: bool) -> BlockReopenQueue:
    """Add ``bs`` with ``options`` (and the children inheriting from it) to the queue."""
    return bdrv_reopen_queue_child(bs_queue, bs, options, None, 0, False, None, 0, keep_old_opts)


def bdrv_reopen_queue_free(bs_queue: BlockReopenQueue | None) -> None:
    for entry in bs_queue or ():
        bdrv_drained_end(entry.state.bs)
    if bs_queue:
        bs_queue.clear()


def _option_value(v: Any) -> Any:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (int, float)):
        return str(v)
    return v


def bdrv_can_set_read_only(bs: BlockDriverState, read_only: bool) -> None:
    """Refuse read-only while copy-on-read is on (reopen ignores BDRV_O_ALLOW_RDWR, as QEMU's does)."""
    if bs.copy_on_read and read_only:
        raise Error(f"Can't set node '{bdrv_get_device_or_node_name(bs)}' to r/o with copy-on-read enabled")


def bdrv_reopen_prepare(reopen_state: BDRVReopenState, queue: BlockReopenQueue) -> None:
    """Check and stage one node's new options; on error nothing of it stays staged."""
    bs = reopen_state.bs
    drv = bs.drv
    assert drv is not None
    # This function and the driver's hook remove what they handle; keep the original.
    orig_reopen_opts = dict(reopen_state.options)
    opts = qemu_opts_absorb_qdict(bdrv_runtime_opts, reopen_state.options)
    assert _update_flags_from_options(reopen_state.flags, opts) == reopen_state.flags
    discard = opts.get(BDRV_OPT_DISCARD)
    if discard is not None:
        try:
            reopen_state.flags = bdrv_parse_discard_flags(discard, reopen_state.flags)
        except Error:
            raise Error("Invalid discard option") from None
    reopen_state.detect_zeroes = bdrv_parse_detect_zeroes(opts, reopen_state.flags)
    # Every other generic option (node-name, driver, force-share) must stay as it is:
    # put it back, to be compared at the end.
    for key in ("node-name", "driver", "force-share"):
        if key in opts:
            reopen_state.options[key] = orig_reopen_opts[key]

    bdrv_can_set_read_only(bs, not reopen_state.flags & BDRV_O_RDWR)

    if drv.bdrv_reopen_prepare is None:
        raise Error(f"Block format '{drv.format_name}' used by node '{bdrv_get_device_or_node_name(bs)}' "
                    "does not support reopening files")
    ret = drv.bdrv_reopen_prepare(reopen_state, queue)
    if ret is not None and ret < 0:
        raise error_setg_errno(-ret, f"failed while preparing to reopen image '{bs.filename}'")
    try:
        # Options not handled are fine only when unchanged (e.g. filename); a child reference
        # may name the current child.
        for key, new in reopen_state.options.items():
            if isinstance(new, str) and any(c.name == key and c.bs.node_name == new for c in bs.children):
                continue
            if key not in bs.options or _option_value(new) != _option_value(bs.options[key]):
                raise Error(f"Cannot change the option '{key}'")
    except Error:
        if drv.bdrv_reopen_abort is not None:
            drv.bdrv_reopen_abort(reopen_state)
        raise
    reopen_state.options = orig_reopen_opts


def bdrv_reopen_commit(reopen_state: BDRVReopenState) -> None:
    """Make one node's staged changes its own."""
    bs = reopen_state.bs
    drv = bs.drv
    if drv.bdrv_reopen_commit is not None:
        drv.bdrv_reopen_commit(reopen_state)
    bs.explicit_options = _without_children(bs, reopen_state.explicit_options)
    bs.options = _without_children(bs, reopen_state.options)
    bs.options.pop("backing", None)
    bs.explicit_options.pop("backing", None)
    bs.open_flags = reopen_state.flags
    bs.read_only = not bs.open_flags & BDRV_O_RDWR     # QEMU derives it from open_flags
    bs.detect_zeroes = reopen_state.detect_zeroes
    bdrv_refresh_limits(bs)
    refresh_total_sectors(bs, bs.total_sectors)


def bdrv_reopen_abort(reopen_state: BDRVReopenState) -> None:
    drv = reopen_state.bs.drv
    if drv.bdrv_reopen_abort is not None:
        drv.bdrv_reopen_abort(reopen_state)


def bdrv_reopen_multiple(bs_queue: BlockReopenQueue) -> int:
    """Reopen every queued node, all or nothing; frees the queue.  Returns 0 or raises Error."""
    tran = BdrvPermUpdate()
    try:
        try:
            for entry in bs_queue:
                ret = bdrv_flush(entry.state.bs)
                if ret < 0:
                    raise error_setg_errno(-ret, "Error flushing drive")
            for entry in bs_queue:
                assert entry.state.bs.quiesce_counter > 0
                bdrv_reopen_prepare(entry.state, bs_queue)
                entry.prepared = True
            # The file driver takes its new fd's locks here, with the permissions the new flags give.
            bdrv_list_refresh_perms([e.state.bs for e in reversed(bs_queue)], bs_queue, tran)
        except Error:
            tran.abort()
            for entry in bs_queue:
                if entry.prepared:
                    bdrv_reopen_abort(entry.state)
            raise
        # Last first: children usually follow their parents in the queue (qcow2 wants that).
        for entry in reversed(bs_queue):
            bdrv_reopen_commit(entry.state)
        tran.commit()
    finally:
        bdrv_reopen_queue_free(bs_queue)
    return 0


def bdrv_reopen(bs: BlockDriverState, opts: dict | None, keep_old_opts: bool = True) -> int:
    """Reopen ``bs`` (and the children inheriting from it) with ``opts``; 0 or raises Error."""
    queue = bdrv_reopen_queue(None, bs, opts, keep_old_opts)
    return bdrv_reopen_multiple(queue)


def bdrv_reopen_set_read_only(bs: BlockDriverState, read_only: bool) -> int:
    return bdrv_reopen(bs, {"read-only": read_only}, True)

