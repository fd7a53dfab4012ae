"""The node graph: QEMU's block.c (with the drain functions of block/io.c).

A :class:`BlockDriverState` (a node) runs one driver and reaches its
children through :class:`BdrvChild` edges; every edge carries the
permissions its parent needs (``perm``) and tolerates from others
(``shared_perm``).  A BlockBackend is a parent too, through its ``root``
edge.

What is here, by QEMU's names:

* nodes: ``bdrv_new``, ``bdrv_open`` (options as a dict, ``json:{...}`` or
  ``key=value,...``; drivers found in the registry; format probing; QEMU's
  error wording), ``bdrv_new_open_driver``, ``bdrv_ref``/``bdrv_unref``
  (closed and deleted on the last reference), node names (validated, unique,
  automatic ``#block...`` names for the rest), ``bdrv_find_node``,
  ``bdrv_next_node``, ``bdrv_lookup_bs``;
* edges: ``bdrv_root_attach_child``, ``bdrv_attach_child``,
  ``bdrv_open_child``, ``bdrv_unref_child``, ``bdrv_set_backing_hd``,
  ``bdrv_replace_node``, ``bdrv_append``, ``bdrv_filter_bs``,
  ``bdrv_skip_filters``; cycles refused with QEMU's message; the ``_noperm``
  helpers link and unlink without a permission check, so that a change made
  of several steps (``bdrv_append``) is checked once, as QEMU 6.0+ does;
* permissions: ``bdrv_default_perms`` and QEMU's conflict checks, applied
  to the whole affected subgraph in topological order and rolled back as a
  unit on failure, with QEMU's messages naming both users; each node's new
  cumulative perms go to its driver's ``bdrv_check_perm`` and are then
  committed (``bdrv_set_perm``) or aborted (``bdrv_abort_perm_update``) with
  the rest, as QEMU's transaction does (the file driver's image locks); a
  reopen passes its queue, whose new flags count, and keeps the update open
  (``BdrvPermUpdate``) until its own commit or abort (block/reopen.py);
* limits: ``bdrv_refresh_limits`` merging children's limits as QEMU does;
* drain: ``bdrv_drained_begin``/``bdrv_drained_end``/``bdrv_drain_all_*``,
  from inside or outside coroutines;
* AioContexts: ``bdrv_get_aio_context``, ``bdrv_set_aio_context``.

Drain follows QEMU 7.2+ (driver drain hooks only on a node's 0→1 and 1→0
quiesce transitions; draining a node quiesces its parents, never its
children; one quiesce per drained child edge, ``quiesced_parent``), which is
what QEMU's test-bdrv-drain expects today; the seed's 4.x code also had
subtree drains, which later QEMU removed.  Permission updates follow QEMU 6.0+
(topological order, all-or-nothing), which fixed ordering bugs of the
seed's recursive update.  ``reqs_lock`` is not modelled: a node's requests run
in its AioContext's thread.
"""
from __future__ import annotations

import errno
import itertools
import os
import random
import re
from typing import Any, Callable, Iterator

import attrs

from qblock.block import driver as _drv
from qblock.block.driver import (
    BDRV_REQ_FUA,
    BDRV_REQ_MAY_UNMAP,
    BDRV_REQ_NO_FALLBACK,
    BDRV_REQ_WRITE_UNCHANGED,
    BDRV_O_AUTO_RDONLY,
    BDRV_O_COPY_ON_READ,
    BDRV_O_INACTIVE,
    BDRV_O_NO_BACKING,
    BDRV_O_NO_FLUSH,
    BDRV_O_NO_IO,
    BDRV_O_NOCACHE,
    BDRV_O_PROTOCOL,
    BDRV_O_RDWR,
    BDRV_O_SNAPSHOT,
    BDRV_O_UNMAP,
    BDRV_SECTOR_SIZE,
    BlockDriver,
    BlockDriverInfo,
    BlockdevDetectZeroesOptions,
    BlockLimits,
    IOV_MAX,
    bdrv_find_format,
    bdrv_find_protocol_driver,
    driver_state,
)
from qblock.trace.events import trace_bdrv_open_common, trace_bdrv_unref_close
from qblock.util.aio import (
    AIO_WAIT_WHILE,
    AioContext,
    aio_bh_schedule_oneshot,
    aio_co_enter,
    aio_co_wake,
    aio_poll,
    qemu_get_aio_context,
    qemu_get_current_aio_context,
)
from qblock.util.coroutine import qemu_coroutine_self, qemu_coroutine_yield, qemu_in_coroutine
from qblock.util.coroutine_lock import CoQueue
from qblock.util.cutils import DIV_ROUND_UP, MIN_NON_ZERO, is_power_of_2
from qblock.util.error import Error, error_setg_errno
from qblock.util.notify import NotifierWithReturnList
from qblock.util.qemu_option import (
    QEMU_OPT_BOOL,
    QEMU_OPT_STRING,
    QemuOptDesc,
    QemuOptsList,
    keyval_parse,
    parse_json_filename,
    qapi_enum_parse,
    qdict_extract_subqdict,
    qdict_flatten,
    qemu_opts_absorb_qdict,
)

# --------------------------------------------------------------------------
# Permissions (include/block/block.h)

BLK_PERM_CONSISTENT_READ = 0x01
BLK_PERM_WRITE = 0x02
BLK_PERM_WRITE_UNCHANGED = 0x04
BLK_PERM_RESIZE = 0x08
BLK_PERM_GRAPH_MOD = 0x10      # removed in QEMU 6.2; the seed's era still has it
BLK_PERM_ALL = 0x1F
DEFAULT_PERM_PASSTHROUGH = BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE | BLK_PERM_WRITE_UNCHANGED | BLK_PERM_RESIZE
DEFAULT_PERM_UNCHANGED = BLK_PERM_ALL & ~DEFAULT_PERM_PASSTHROUGH

_PERM_NAMES = [(BLK_PERM_CONSISTENT_READ, "consistent read"), (BLK_PERM_WRITE, "write"),
               (BLK_PERM_WRITE_UNCHANGED, "write unchanged"), (BLK_PERM_RESIZE, "resize"),
               (BLK_PERM_GRAPH_MOD, "change children")]


def bdrv_perm_names(perm: int) -> str:
    """``consistent read, write`` for a permission mask (bdrv_perm_names)."""
    return ", ".join(name for bit, name in _PERM_NAMES if perm & bit)


# Child roles (BdrvChildRole, QEMU 5.0+).  The seed's era used role objects;
# their names are kept below as presets.
BDRV_CHILD_DATA = 1 << 0
BDRV_CHILD_METADATA = 1 << 1
BDRV_CHILD_FILTERED = 1 << 2
BDRV_CHILD_COW = 1 << 3
BDRV_CHILD_PRIMARY = 1 << 4
BDRV_CHILD_IMAGE = BDRV_CHILD_DATA | BDRV_CHILD_METADATA | BDRV_CHILD_PRIMARY

child_file = BDRV_CHILD_IMAGE                                        # a format's storage ("file")
child_format = BDRV_CHILD_DATA | BDRV_CHILD_FILTERED | BDRV_CHILD_PRIMARY   # a filter's child
child_backing = BDRV_CHILD_COW                                       # a backing file


# --------------------------------------------------------------------------
# Options every node takes (block.c: bdrv_runtime_opts)

BDRV_OPT_CACHE_DIRECT = "cache.direct"
BDRV_OPT_CACHE_NO_FLUSH = "cache.no-flush"
BDRV_OPT_READ_ONLY = "read-only"
BDRV_OPT_AUTO_READ_ONLY = "auto-read-only"
BDRV_OPT_DISCARD = "discard"
BDRV_OPT_FORCE_SHARE = "force-share"

bdrv_runtime_opts = QemuOptsList("bdrv_common", [
    QemuOptDesc("node-name", QEMU_OPT_STRING, "Node name of the block device node"),
    QemuOptDesc("driver", QEMU_OPT_STRING, "Block driver to use for the node"),
    QemuOptDesc(BDRV_OPT_CACHE_DIRECT, QEMU_OPT_BOOL, "Bypass software writeback cache on the host"),
    QemuOptDesc(BDRV_OPT_CACHE_NO_FLUSH, QEMU_OPT_BOOL, "Ignore flush requests"),
    QemuOptDesc(BDRV_OPT_READ_ONLY, QEMU_OPT_BOOL, "Node is opened in read-only mode"),
    QemuOptDesc(BDRV_OPT_AUTO_READ_ONLY, QEMU_OPT_BOOL, "Node can become read-only if opening read-write fails"),
    QemuOptDesc("detect-zeroes", QEMU_OPT_STRING, "try to optimize zero writes (off, on, unmap)"),
    QemuOptDesc(BDRV_OPT_DISCARD, QEMU_OPT_STRING, "discard operation (ignore/off, unmap/on)"),
    QemuOptDesc(BDRV_OPT_FORCE_SHARE, QEMU_OPT_BOOL, "always accept other writers (default: off)"),
])


# --------------------------------------------------------------------------
# Structures


class BdrvChildClass:
    """What a parent does when its child is drained, resized, attached ... (QEMU's BdrvChildClass)."""

    parent_is_bds = False
    stay_at_node = False

    def get_parent_desc(self, c: "BdrvChild") -> str:
        return "an unnamed user"

    def drained_begin(self, c: "BdrvChild") -> None:
        pass

    def drained_end(self, c: "BdrvChild") -> None:
        pass

    def drained_poll(self, c: "BdrvChild") -> bool:
        return False

    def resize(self, c: "BdrvChild") -> None:
        pass

    def attach(self, c: "BdrvChild") -> None:
        pass

    def detach(self, c: "BdrvChild") -> None:
        pass

    def change_aio_ctx(self, c: "BdrvChild", ctx: AioContext) -> None:
        pass


@attrs.define(eq=False, slots=True)
class BdrvChild:
    """An edge from a parent (a node or a BlockBackend) to a child node (QEMU's BdrvChild)."""

    bs: "BlockDriverState | None"
    name: str
    klass: BdrvChildClass
    role: int
    opaque: Any
    perm: int = 0
    shared_perm: int = BLK_PERM_ALL
    quiesced_parent: bool = False
    frozen: bool = False

    @property
    def trace_name(self) -> str:
        parent = getattr(self.opaque, "trace_name", "?")
        return f"{parent}->{self.name}"

    def __repr__(self) -> str:
        child = self.bs.node_name if self.bs is not None else None
        return f"<BdrvChild {self.name} {self.trace_name} -> {child} perm={self.perm:#x} shared={self.shared_perm:#x}>"


@attrs.define(eq=False, slots=True)
class BdrvTrackedRequest:
    """A request in flight on a node, for serialisation (QEMU's BdrvTrackedRequest)."""

    bs: "BlockDriverState"
    offset: int
    bytes: int
    type: int
    co: Any
    serialising: bool = False
    overlap_offset: int = 0
    overlap_bytes: int = 0
    wait_queue: CoQueue | None = None
    waiting_for: "BdrvTrackedRequest | None" = None

    @property
    def trace_name(self) -> str:
        kind = ("read", "write", "discard", "truncate")[self.type]
        return f"{kind}[{self.offset},+{self.bytes}]"

    def describe_wait(self) -> str:
        return f"serialising request {self.trace_name} on {self.bs.node_name}"


@attrs.define(eq=False, slots=True)
class BlockDriverState:
    """A node of the graph (QEMU's BlockDriverState)."""

    drv: BlockDriver | None = None
    opaque: Any = None
    node_name: str = ""
    filename: str = ""
    exact_filename: str = ""
    backing_file: str = ""
    backing_format: str = ""
    file: BdrvChild | None = None
    backing: BdrvChild | None = None
    children: list = attrs.field(factory=list)
    parents: list = attrs.field(factory=list)
    total_sectors: int = 0
    read_only: bool = True
    open_flags: int = 0
    options: dict = attrs.field(factory=dict)
    explicit_options: dict = attrs.field(factory=dict)
    bl: BlockLimits = attrs.field(factory=BlockLimits)
    supported_write_flags: int = 0
    supported_zero_flags: int = 0
    in_flight: int = 0
    tracked_requests: list = attrs.field(factory=list)
    serialising_in_flight: int = 0
    write_gen: int = 0
    flushed_gen: int = 0
    active_flush_req: bool = False
    flush_queue: CoQueue = attrs.field(factory=lambda: CoQueue("flush_queue"))
    quiesce_counter: int = 0
    refcnt: int = 1
    aio_context: AioContext | None = None
    copy_on_read: int = 0
    force_share: bool = False
    detect_zeroes: BlockdevDetectZeroesOptions = BlockdevDetectZeroesOptions.BLOCKDEV_DETECT_ZEROES_OPTIONS_OFF
    before_write_notifiers: NotifierWithReturnList = attrs.field(factory=NotifierWithReturnList)
    write_threshold_offset: int = 0
    write_threshold_notifier: Any = None
    wr_highest_offset: int = 0
    io_plugged: int = 0
    probed: bool = False
    inherits_from: "BlockDriverState | None" = None   # the parent whose options this node inherits (reopen)
    encrypted: bool = False
    sg: bool = False
    last_driver_exception: BaseException | None = None

    @property
    def trace_name(self) -> str:
        return self.node_name or "(unnamed)"

    def __repr__(self) -> str:
        drv = self.drv.format_name if self.drv else None
        return f"<BlockDriverState {self.node_name} drv={drv}>"


# --------------------------------------------------------------------------
# Node lists and names

all_bdrv_states: list[BlockDriverState] = []      # every node (bdrv_next_all_states)
graph_bdrv_states: list[BlockDriverState] = []    # every named node, in creation order
bdrv_drain_all_count = 0

_id_counter = itertools.count(1)
_id_rng = random.Random(0)
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*", re.ASCII)


def id_wellformed(name: str) -> bool:
    """A letter followed by letters, digits, '-', '.' or '_' (util/id.c)."""
    return _ID_RE.fullmatch(name) is not None


def id_generate_block() -> str:
    """An automatic node name, ``#block<n><2 digits>`` like QEMU's id_generate(ID_BLOCK) (seeded, so reproducible)."""
    return f"#block{next(_id_counter)}{_id_rng.randrange(100):02d}"


def bdrv_find_node(node_name: str) -> BlockDriverState | None:
    for bs in graph_bdrv_states:
        if bs.node_name == node_name:
            return bs
    return None


def bdrv_next_node(bs: BlockDriverState | None) -> BlockDriverState | None:
    """The named node after ``bs`` (the first with None)."""
    if bs is None:
        return graph_bdrv_states[0] if graph_bdrv_states else None
    i = graph_bdrv_states.index(bs)
    return graph_bdrv_states[i + 1] if i + 1 < len(graph_bdrv_states) else None


def bdrv_next_all_states(bs: BlockDriverState | None) -> BlockDriverState | None:
    if bs is None:
        return all_bdrv_states[0] if all_bdrv_states else None
    i = all_bdrv_states.index(bs)
    return all_bdrv_states[i + 1] if i + 1 < len(all_bdrv_states) else None


def bdrv_lookup_bs(device: str | None, node_name: str | None = None) -> BlockDriverState:
    """A node by BlockBackend name or node name, with QEMU's messages."""
    from qblock.block.block_backend import blk_bs, blk_by_name  # the BlockBackend sits above the graph
    if device is not None:
        blk = blk_by_name(device)
        if blk is not None:
            bs = blk_bs(blk)
            if bs is None:
                raise Error(f"Device '{device}' has no medium")
            return bs
    if node_name is not None:
        bs = bdrv_find_node(node_name)
        if bs is not None:
            return bs
    raise Error(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")


def bdrv_assign_node_name(bs: BlockDriverState, node_name: str | None) -> None:
    from qblock.block.block_backend import blk_by_name
    if node_name is None:
        node_name = id_generate_block()
    elif not id_wellformed(node_name):
        raise Error(f"Invalid node-name: '{node_name}'")
    if blk_by_name(node_name) is not None:
        raise Error(f"node-name={node_name} is conflicting with a device id")
    if bdrv_find_node(node_name) is not None:
        raise Error(f"Duplicate nodes with node-name='{node_name}'")
    if len(node_name) >= 32:
        raise Error("Node name too long")
    bs.node_name = node_name
    graph_bdrv_states.append(bs)


def bdrv_get_node_name(bs: BlockDriverState) -> str:
    return bs.node_name


def bdrv_get_device_or_node_name(bs: BlockDriverState) -> str:
    from qblock.block.block_backend import blk_name
    for c in bs.parents:
        if not c.klass.parent_is_bds and getattr(c.opaque, "name", None):
            return blk_name(c.opaque)
    return bs.node_name


def bdrv_get_format_name(bs: BlockDriverState) -> str | None:
    return bs.drv.format_name if bs.drv else None


# --------------------------------------------------------------------------
# Creating, referencing and deleting nodes


def bdrv_new() -> BlockDriverState:
    """A new, empty node; drained as often as a running bdrv_drain_all_begin says."""
    bs = BlockDriverState()
    all_bdrv_states.append(bs)
    for _ in range(bdrv_drain_all_count):
        bdrv_drained_begin(bs)
    return bs


def bdrv_get_aio_context(bs: BlockDriverState | None) -> AioContext:
    if bs is None or bs.aio_context is None:
        return qemu_get_aio_context()
    return bs.aio_context


def bdrv_coroutine_enter(bs: BlockDriverState, co) -> None:
    """Enter ``co`` in the node's AioContext (block.c: aio_co_enter(bdrv_get_aio_context(bs), co))."""
    aio_co_enter(bdrv_get_aio_context(bs), co)


def BDRV_POLL_WHILE(bs: BlockDriverState | None, cond: Callable[[], bool]) -> bool:
    """Poll the node's AioContext until ``cond()`` is false (include/block/block.h)."""
    return AIO_WAIT_WHILE(bdrv_get_aio_context(bs), cond)


def bdrv_ref(bs: BlockDriverState) -> None:
    bs.refcnt += 1


def bdrv_unref(bs: BlockDriverState | None) -> None:
    """Drop a reference; the last one closes the node and takes it out of the graph."""
    if bs is None:
        return
    if bs.refcnt <= 0:
        raise RuntimeError(f"bdrv_unref of {bs.node_name} with refcnt {bs.refcnt}")
    bs.refcnt -= 1
    if bs.refcnt == 0:
        if trace_bdrv_unref_close.event.enabled:
            trace_bdrv_unref_close(bs)
        bdrv_close(bs)
        bdrv_delete(bs)


def bdrv_close(bs: BlockDriverState) -> None:
    """Finish in-flight I/O, flush, close the driver and drop every child (block.c: bdrv_close)."""
    from qblock.block.io import bdrv_flush
    bdrv_drained_begin(bs)
    if bs.drv is not None:
        bdrv_flush(bs)
    bdrv_drain(bs)
    if bs.drv is not None:
        if bs.drv.bdrv_close is not None:
            bs.drv.bdrv_close(bs)
        bs.drv = None
    for child in list(bs.children):
        bdrv_unref_child(bs, child)
    bs.backing = None
    bs.file = None
    bs.opaque = None
    bs.copy_on_read = 0
    bs.backing_file = ""
    bs.backing_format = ""
    bs.total_sectors = 0
    bs.options = {}
    bs.explicit_options = {}
    bdrv_drained_end(bs)


def bdrv_delete(bs: BlockDriverState) -> None:
    if bs in graph_bdrv_states:
        graph_bdrv_states.remove(bs)
    if bs in all_bdrv_states:
        all_bdrv_states.remove(bs)


def bdrv_is_read_only(bs: BlockDriverState) -> bool:
    return bs.read_only


def bdrv_is_writable(bs: BlockDriverState) -> bool:
    return not bs.read_only and not (bs.open_flags & BDRV_O_INACTIVE)


def bdrv_reopen_get_flags(q, bs: BlockDriverState) -> int:
    """The flags ``bs`` will have once the reopen queue ``q`` (a list of entries, or None) is committed."""
    for entry in q or ():
        if entry.state.bs is bs:
            return entry.state.flags
    return bs.open_flags


def bdrv_is_writable_after_reopen(bs: BlockDriverState, q) -> bool:
    """Whether ``bs`` is writable after the reopen in ``q`` (as now when ``q`` is None)."""
    if q is None:
        return bdrv_is_writable(bs)
    return bdrv_reopen_get_flags(q, bs) & (BDRV_O_RDWR | BDRV_O_INACTIVE) == BDRV_O_RDWR


def bdrv_is_inserted(bs: BlockDriverState | None) -> bool:
    """True when the node and every child have a driver (a medium)."""
    if bs is None:
        return False
    drv = bs.drv
    if drv is None:
        return False
    if drv.bdrv_is_inserted is not None:
        return drv.bdrv_is_inserted(bs)
    for c in bs.children:
        if not bdrv_is_inserted(c.bs):
            return False
    return True


def bdrv_is_sg(bs: BlockDriverState) -> bool:
    return bs.sg


def refresh_total_sectors(bs: BlockDriverState, hint: int) -> int:
    """Ask the driver for the length, rounded up to sectors (block.c: refresh_total_sectors)."""
    drv = bs.drv
    if drv is None:
        return -errno.ENOMEDIUM
    if bs.sg:
        return 0
    if drv.bdrv_getlength is not None:
        length = drv.bdrv_getlength(bs)
        if length < 0:
            return length
        hint = DIV_ROUND_UP(length, BDRV_SECTOR_SIZE)
    bs.total_sectors = hint
    return 0


def bdrv_nb_sectors(bs: BlockDriverState) -> int:
    if bs.drv is None:
        return -errno.ENOMEDIUM
    if bs.drv.has_variable_length:
        ret = refresh_total_sectors(bs, bs.total_sectors)
        if ret < 0:
            return ret
    return bs.total_sectors


def bdrv_getlength(bs: BlockDriverState) -> int:
    """The node's size in bytes (a whole number of sectors), or a negative errno."""
    drv = bs.drv
    if drv is not None and not drv.has_variable_length:
        return bs.total_sectors * BDRV_SECTOR_SIZE  # the common case, without bdrv_nb_sectors' call
    ret = bdrv_nb_sectors(bs)
    return ret if ret < 0 else ret * BDRV_SECTOR_SIZE


def bdrv_get_info(bs: BlockDriverState, bdi: BlockDriverInfo) -> int:
    drv = bs.drv
    if drv is None:
        return -errno.ENOMEDIUM
    if drv.bdrv_get_info is None:
        if bs.file is not None and drv.is_filter:
            return bdrv_get_info(bs.file.bs, bdi)
        return -errno.ENOTSUP
    return drv.bdrv_get_info(bs, bdi)


def bdrv_get_cluster_size(bs: BlockDriverState) -> int:
    bdi = BlockDriverInfo()
    ret = bdrv_get_info(bs, bdi)
    if ret < 0 or bdi.cluster_size == 0:
        return bs.bl.request_alignment
    return bdi.cluster_size


def bdrv_round_to_clusters(bs: BlockDriverState, offset: int, bytes: int) -> tuple[int, int]:
    """(cluster_offset, cluster_bytes) covering [offset, offset+bytes) in whole clusters."""
    bdi = BlockDriverInfo()
    if bdrv_get_info(bs, bdi) < 0 or bdi.cluster_size == 0:
        return offset, bytes
    c = bdi.cluster_size
    start = offset // c * c
    return start, (offset - start + bytes + c - 1) // c * c


# --------------------------------------------------------------------------
# Limits


def bdrv_merge_limits(dst: BlockLimits, src: BlockLimits) -> None:
    dst.opt_transfer = max(dst.opt_transfer, src.opt_transfer)
    dst.max_transfer = MIN_NON_ZERO(dst.max_transfer, src.max_transfer)
    dst.opt_mem_alignment = max(dst.opt_mem_alignment, src.opt_mem_alignment)
    dst.min_mem_alignment = max(dst.min_mem_alignment, src.min_mem_alignment)
    dst.max_iov = MIN_NON_ZERO(dst.max_iov, src.max_iov)


def bdrv_refresh_limits(bs: BlockDriverState) -> None:
    """Recompute ``bs.bl``: byte-interface default, children's limits, then the driver's own."""
    drv = bs.drv
    bs.bl = BlockLimits()
    if drv is None:
        return
    byte_based = (drv.bdrv_co_preadv is not None or drv.bdrv_co_preadv_part is not None
                  or drv.bdrv_aio_preadv is not None)
    bs.bl.request_alignment = 1 if byte_based else BDRV_SECTOR_SIZE
    if bs.file is not None:
        bdrv_refresh_limits(bs.file.bs)
        bdrv_merge_limits(bs.bl, bs.file.bs.bl)
    else:
        bs.bl.min_mem_alignment = 512
        bs.bl.opt_mem_alignment = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        bs.bl.max_iov = IOV_MAX
    if bs.backing is not None:
        bdrv_refresh_limits(bs.backing.bs)
        bdrv_merge_limits(bs.bl, bs.backing.bs.bl)
    if drv.bdrv_refresh_limits is not None:
        drv.bdrv_refresh_limits(bs)
    if bs.bl.request_alignment > _drv.BDRV_MAX_ALIGNMENT:
        raise Error("Driver requires too large request alignment")
    if not is_power_of_2(bs.bl.request_alignment):
        raise Error(f"Request alignment {bs.bl.request_alignment} of {bs.node_name} is not a power of two")


# --------------------------------------------------------------------------
# Permissions


def bdrv_pass_supported_flags(bs: BlockDriverState) -> None:
    """Let a node that forwards requests to ``bs.file`` accept the flags its child accepts.

    FUA (and for write-zeroes MAY_UNMAP and NO_FALLBACK) pass down only if
    the child supports them; WRITE_UNCHANGED always, as raw, blkdebug and
    QEMU's other pass-through nodes set in their open functions.
    """
    fbs = bs.file.bs
    bs.supported_write_flags = BDRV_REQ_WRITE_UNCHANGED | (BDRV_REQ_FUA & fbs.supported_write_flags)
    bs.supported_zero_flags = BDRV_REQ_WRITE_UNCHANGED | (
        (BDRV_REQ_FUA | BDRV_REQ_MAY_UNMAP | BDRV_REQ_NO_FALLBACK) & fbs.supported_zero_flags)


def bdrv_filter_default_perms(bs, c, role, reopen_queue, perm: int, shared: int) -> tuple[int, int]:
    return perm & DEFAULT_PERM_PASSTHROUGH, (shared & DEFAULT_PERM_PASSTHROUGH) | DEFAULT_PERM_UNCHANGED


def bdrv_default_perms(bs: BlockDriverState, c: BdrvChild | None, role: int, reopen_queue,
                       perm: int, shared: int) -> tuple[int, int]:
    """The permissions a parent asks of a child in the given role (block.c: bdrv_default_perms)."""
    if role & BDRV_CHILD_FILTERED:
        return bdrv_filter_default_perms(bs, c, role, reopen_queue, perm, shared)
    if role & BDRV_CHILD_COW:
        # A backing file is only read; others may write it only if our parents allow writes.
        perm &= BLK_PERM_CONSISTENT_READ
        nshared = (BLK_PERM_WRITE | BLK_PERM_RESIZE) if shared & BLK_PERM_WRITE else 0
        nshared |= BLK_PERM_CONSISTENT_READ | BLK_PERM_GRAPH_MOD | BLK_PERM_WRITE_UNCHANGED
        return perm, nshared
    # Storage (a format's "file" or data child)
    perm, shared = bdrv_filter_default_perms(bs, c, role, reopen_queue, perm, shared)
    if role & BDRV_CHILD_METADATA:
        if bdrv_is_writable_after_reopen(bs, reopen_queue):
            perm |= BLK_PERM_WRITE | BLK_PERM_RESIZE
        if not bs.open_flags & BDRV_O_NO_IO:
            perm |= BLK_PERM_CONSISTENT_READ
        shared &= ~(BLK_PERM_WRITE | BLK_PERM_RESIZE)
    if role & BDRV_CHILD_DATA:
        shared &= ~BLK_PERM_RESIZE
        if perm & BLK_PERM_WRITE_UNCHANGED:
            perm |= BLK_PERM_WRITE
        if perm & BLK_PERM_WRITE:
            perm |= BLK_PERM_RESIZE
    if bs.open_flags & BDRV_O_INACTIVE:
        shared |= BLK_PERM_WRITE | BLK_PERM_RESIZE
    return perm, shared


def bdrv_child_user_desc(c: BdrvChild) -> str:
    return c.klass.get_parent_desc(c)


def bdrv_child_perm(bs: BlockDriverState, child_bs: BlockDriverState | None, c: BdrvChild | None, role: int,
                    perm: int, shared: int, reopen_queue=None) -> tuple[int, int]:
    """What ``bs`` needs from (and shares on) a child, given what its own parents use and share
    (and, during a reopen, the flags the nodes of ``reopen_queue`` are about to get)."""
    hook = bs.drv.bdrv_child_perm if bs.drv is not None else None
    nperm, nshared = (hook or bdrv_default_perms)(bs, c, role, reopen_queue, perm, shared)
    if child_bs is not None and child_bs.force_share:
        nshared = BLK_PERM_ALL        # force-share=on: other writers are accepted on that node
    return nperm, nshared


def _bdrv_child_perm(bs: BlockDriverState, c: BdrvChild, perm: int, shared: int, q=None) -> tuple[int, int]:
    return bdrv_child_perm(bs, c.bs, c, c.role, perm, shared, q)


def bdrv_get_cumulative_perm(bs: BlockDriverState) -> tuple[int, int]:
    """(every permission some parent uses, the permissions all parents share)."""
    perm, shared = 0, BLK_PERM_ALL
    for c in bs.parents:
        perm |= c.perm
        shared &= c.shared_perm
    return perm, shared


def _bdrv_a_allow_b(a: BdrvChild, b: BdrvChild) -> None:
    if (b.perm & a.shared_perm) == b.perm:
        return
    name = b.bs.node_name
    raise Error(f"Permission conflict on node '{name}': permissions '{bdrv_perm_names(b.perm & ~a.shared_perm)}' "
                f"are both required by {bdrv_child_user_desc(b)} (uses node '{name}' as '{b.name}' child) "
                f"and unshared by {bdrv_child_user_desc(a)} (uses node '{name}' as '{a.name}' child).",
                errno=errno.EPERM)


def _bdrv_topological_order(roots: list[BlockDriverState]) -> list[BlockDriverState]:
    """Nodes reachable from ``roots`` (through children), every parent before its children."""
    order: list[BlockDriverState] = []
    seen: set[int] = set()

    def visit(bs: BlockDriverState) -> None:
        if id(bs) in seen:
            return
        seen.add(id(bs))
        for c in bs.children:
            visit(c.bs)
        order.append(bs)

    for r in roots:
        visit(r)
    order.reverse()
    return order


@attrs.define
class BdrvPermUpdate:
    """A permission update waiting to be committed or aborted (QEMU records it in a Transaction).

    ``undo``: edges and their old perms; ``checked``: the nodes whose driver accepted new perms.
    """

    undo: list = attrs.field(factory=list)
    checked: list = attrs.field(factory=list)

    def abort(self) -> None:
        """Newest first: drivers forget what they checked, edges get their old perms back."""
        for bs, _, _ in reversed(self.checked):
            if bs.drv is not None and bs.drv.bdrv_abort_perm_update is not None:
                bs.drv.bdrv_abort_perm_update(bs)
        for c, p, s in reversed(self.undo):
            c.perm, c.shared_perm = p, s
        self.checked.clear()
        self.undo.clear()

    def commit(self) -> None:
        """QEMU's tran_commit also runs newest first."""
        for bs, perm, shared in reversed(self.checked):
            if bs.drv is not None and bs.drv.bdrv_set_perm is not None:
                bs.drv.bdrv_set_perm(bs, perm, shared)
        self.checked.clear()
        self.undo.clear()


def bdrv_list_refresh_perms(roots: list[BlockDriverState], q=None, tran: BdrvPermUpdate | None = None) -> None:
    """Recompute the permissions of every edge below ``roots`` and check them; all or nothing.

    Raises Error (QEMU's messages) and restores every edge when a conflict is found.  ``q`` is a
    reopen queue whose new flags count instead of the nodes' current ones.  With ``tran`` given,
    the update is left in it for the caller to commit or abort (bdrv_reopen_multiple); without,
    it is committed (or aborted on error) here, as QEMU's bdrv_refresh_perms does.
    """
    t = tran if tran is not None else BdrvPermUpdate()
    try:
        for bs in _bdrv_topological_order(roots):
            for a in bs.parents:
                for b in bs.parents:
                    if a is not b:
                        _bdrv_a_allow_b(a, b)
            cum_perm, cum_shared = bdrv_get_cumulative_perm(bs)
            if cum_perm & (BLK_PERM_WRITE | BLK_PERM_WRITE_UNCHANGED) and not bdrv_is_writable_after_reopen(bs, q):
                if not bdrv_is_writable(bs):
                    raise Error("Block node is read-only", errno=errno.EPERM)
                raise Error(f"Read-only block node '{bdrv_get_node_name(bs)}' cannot support read-write users",
                            errno=errno.EPERM)
            # Unaligned writes are padded to request_alignment; without RESIZE the padding could not
            # reach past the end, so a writer needs an aligned image size.
            if cum_perm & (BLK_PERM_WRITE | BLK_PERM_WRITE_UNCHANGED) and not cum_perm & BLK_PERM_RESIZE and \
                    (bs.total_sectors * BDRV_SECTOR_SIZE) % bs.bl.request_alignment:
                raise Error("Cannot get 'write' permission without 'resize': Image size is not a multiple of "
                            "request alignment", errno=errno.EPERM)
            if bs.drv is None:
                continue
            bdrv_drv_set_perm(bs, cum_perm, cum_shared, t.checked)
            for c in bs.children:
                nperm, nshared = _bdrv_child_perm(bs, c, cum_perm, cum_shared, q)
                if (nperm, nshared) != (c.perm, c.shared_perm):
                    t.undo.append((c, c.perm, c.shared_perm))
                    c.perm, c.shared_perm = nperm, nshared
    except Error:
        if tran is None:
            t.abort()
        raise
    if tran is None:
        t.commit()


def bdrv_drv_set_perm(bs: BlockDriverState, perm: int, shared: int,
                      checked: list[tuple[BlockDriverState, int, int]]) -> None:
    """Ask the driver to check the node's new cumulative perms; on success the node joins ``checked``,
    to be committed (bdrv_set_perm) or aborted (bdrv_abort_perm_update) with the rest of the update.

    QEMU records the two as a transaction action (tran_add); here the caller's list is the transaction.
    The node has a driver (bdrv_list_refresh_perms skips those without).
    """
    if bs.drv.bdrv_check_perm is not None:
        bs.drv.bdrv_check_perm(bs, perm, shared)
    checked.append((bs, perm, shared))


def bdrv_refresh_perms(bs: BlockDriverState) -> None:
    bdrv_list_refresh_perms([bs])


def bdrv_child_refresh_perms(bs: BlockDriverState, c: BdrvChild) -> None:
    """Recompute what ``bs`` asks of child ``c`` (and below)."""
    bdrv_list_refresh_perms([bs])


# --------------------------------------------------------------------------
# Edges


class ChildOfBds(BdrvChildClass):
    """The edge class of a node parent (block.c: child_of_bds)."""

    parent_is_bds = True

    def get_parent_desc(self, c: BdrvChild) -> str:
        return f"node '{c.opaque.node_name}'"

    def drained_begin(self, c: BdrvChild) -> None:
        bdrv_do_drained_begin_quiesce(c.opaque, None)

    def drained_end(self, c: BdrvChild) -> None:
        bdrv_drained_end(c.opaque)

    def drained_poll(self, c: BdrvChild) -> bool:
        return bdrv_drain_poll(c.opaque, None, False)

    def attach(self, c: BdrvChild) -> None:
        parent: BlockDriverState = c.opaque
        drv = parent.drv
        if (drv is not None and drv.is_filter) or c.role & BDRV_CHILD_FILTERED:
            # A filter's (or raw's) primary child is its filtered child: "backing" or "file" as the driver says.
            if c.role & BDRV_CHILD_PRIMARY:
                if drv is not None and drv.filtered_child_is_backing:
                    parent.backing = c
                else:
                    parent.file = c
        elif c.role & BDRV_CHILD_COW:
            parent.backing = c
        elif c.role & BDRV_CHILD_PRIMARY and parent.file is None:
            parent.file = c

    def detach(self, c: BdrvChild) -> None:
        parent: BlockDriverState = c.opaque
        if parent.backing is c:
            parent.backing = None
        if parent.file is c:
            parent.file = None


child_of_bds = ChildOfBds()


def bdrv_parent_drained_begin_single(c: BdrvChild) -> None:
    if c.quiesced_parent:
        return
    c.quiesced_parent = True
    c.klass.drained_begin(c)


def bdrv_parent_drained_end_single(c: BdrvChild) -> None:
    if not c.quiesced_parent:
        return
    c.quiesced_parent = False
    c.klass.drained_end(c)


def bdrv_replace_child_noperm(child: BdrvChild, new_bs: BlockDriverState | None) -> None:
    """Point ``child`` at ``new_bs``; the parent follows the new node's drained state."""
    if child.frozen:
        raise Error(f"Cannot change '{child.name}' link: it is frozen")
    old_bs = child.bs
    if old_bs is not None:
        child.klass.detach(child)
        old_bs.parents.remove(child)
    child.bs = new_bs
    if new_bs is not None:
        new_bs.parents.insert(0, child)
        child.klass.attach(child)
        if new_bs.quiesce_counter and not child.quiesced_parent:
            bdrv_parent_drained_begin_single(child)
    if (new_bs is None or not new_bs.quiesce_counter) and child.quiesced_parent:
        bdrv_parent_drained_end_single(child)


def bdrv_root_attach_child(child_bs: BlockDriverState, child_name: str, child_class: BdrvChildClass,
                           child_role: int, perm: int, shared_perm: int, opaque: Any) -> BdrvChild:
    """Attach a parent (node or BlockBackend) to ``child_bs``; consumes the caller's reference.

    Raises Error on a permission conflict (and drops the reference).
    """
    child = BdrvChild(None, child_name, child_class, child_role, opaque, perm, shared_perm)
    bdrv_replace_child_noperm(child, child_bs)
    try:
        bdrv_refresh_perms(child_bs)
    except Error:
        bdrv_replace_child_noperm(child, None)
        bdrv_unref(child_bs)
        raise
    return child


def bdrv_recurse_has_child(bs: BlockDriverState, child: BlockDriverState) -> bool:
    """True when ``child`` is ``bs`` or any node below it, through any edge."""
    if bs is child:
        return True
    return any(bdrv_recurse_has_child(c.bs, child) for c in bs.children)


def bdrv_backing_role(bs: BlockDriverState) -> int:
    """The role of a backing child: a filter's filtered child, else a COW backing file."""
    if bs.drv is not None and bs.drv.is_filter:
        return BDRV_CHILD_FILTERED | BDRV_CHILD_PRIMARY
    return BDRV_CHILD_COW


def bdrv_attach_child_noperm(parent_bs: BlockDriverState, child_bs: BlockDriverState, child_name: str,
                             child_class: BdrvChildClass, child_role: int) -> BdrvChild:
    """Link a new edge with the permissions the parent asks for, without checking them.

    Takes no reference; the caller checks permissions (bdrv_list_refresh_perms) and
    undoes the link with bdrv_detach_child_noperm if they conflict.
    """
    if bdrv_recurse_has_child(child_bs, parent_bs):
        raise Error(f"Making '{child_bs.node_name}' a {child_name} child of '{parent_bs.node_name}' "
                    "would create a cycle", errno=errno.EINVAL)
    if bdrv_get_aio_context(parent_bs) is not bdrv_get_aio_context(child_bs):
        bdrv_try_set_aio_context(child_bs, bdrv_get_aio_context(parent_bs))
    cum_perm, cum_shared = bdrv_get_cumulative_perm(parent_bs)
    child = BdrvChild(None, child_name, child_class, child_role, parent_bs)
    perm, shared = bdrv_child_perm(parent_bs, child_bs, None, child_role, cum_perm, cum_shared)
    child.perm, child.shared_perm = perm, shared
    bdrv_replace_child_noperm(child, child_bs)
    parent_bs.children.insert(0, child)
    return child


def bdrv_detach_child_noperm(parent_bs: BlockDriverState, child: BdrvChild) -> BlockDriverState | None:
    """Unlink an edge without dropping its reference or refreshing permissions; returns the child node."""
    child_bs = child.bs
    if child in parent_bs.children:
        parent_bs.children.remove(child)
    bdrv_replace_child_noperm(child, None)
    return child_bs


def bdrv_attach_child(parent_bs: BlockDriverState, child_bs: BlockDriverState, child_name: str,
                      child_class: BdrvChildClass = child_of_bds, child_role: int = child_file) -> BdrvChild:
    """Make ``child_bs`` a child of ``parent_bs`` named ``child_name``; consumes the child reference.

    Raises Error (a cycle, a permission conflict) with the graph unchanged and the reference dropped.
    """
    try:
        child = bdrv_attach_child_noperm(parent_bs, child_bs, child_name, child_class, child_role)
    except Error:
        bdrv_unref(child_bs)
        raise
    try:
        bdrv_list_refresh_perms([parent_bs])
    except Error:
        bdrv_detach_child_noperm(parent_bs, child)
        bdrv_unref(child_bs)
        raise
    return child


def bdrv_root_unref_child(child: BdrvChild) -> None:
    child_bs = child.bs
    bdrv_replace_child_noperm(child, None)
    if child_bs is not None:
        try:
            bdrv_refresh_perms(child_bs)
        except Error:
            pass  # dropping permissions cannot conflict
        bdrv_unref(child_bs)


def bdrv_unref_child(parent: BlockDriverState, child: BdrvChild | None) -> None:
    """Detach ``child`` from ``parent`` and drop the reference it held."""
    if child is None:
        return
    if child in parent.children:
        parent.children.remove(child)
    bdrv_root_unref_child(child)


def bdrv_primary_child(bs: BlockDriverState | None) -> BdrvChild | None:
    """The child with the PRIMARY role: ``file`` for formats and most filters, ``backing`` for backing filters."""
    if bs is None:
        return None
    for c in bs.children:
        if c.role & BDRV_CHILD_PRIMARY:
            return c
    return None


def bdrv_primary_bs(bs: BlockDriverState | None) -> BlockDriverState | None:
    c = bdrv_primary_child(bs)
    return c.bs if c is not None else None


def _bdrv_debug_hook_bs(bs: BlockDriverState | None, hook: str) -> BlockDriverState | None:
    """The first node down the primary chain whose driver has ``hook`` (blkdebug, usually)."""
    while bs is not None and bs.drv is not None and getattr(bs.drv, hook, None) is None:
        bs = bdrv_primary_bs(bs)
    if bs is not None and bs.drv is not None and getattr(bs.drv, hook, None) is not None:
        return bs
    return None


def bdrv_debug_breakpoint(bs: BlockDriverState, event: str, tag: str) -> int:
    """Suspend requests at ``event`` under ``tag`` (qemu-io's ``break``); -ENOTSUP with no blkdebug below."""
    n = _bdrv_debug_hook_bs(bs, "bdrv_debug_breakpoint")
    return n.drv.bdrv_debug_breakpoint(n, event, tag) if n is not None else -errno.ENOTSUP


def bdrv_debug_remove_breakpoint(bs: BlockDriverState, tag: str) -> int:
    n = _bdrv_debug_hook_bs(bs, "bdrv_debug_remove_breakpoint")
    return n.drv.bdrv_debug_remove_breakpoint(n, tag) if n is not None else -errno.ENOTSUP


def bdrv_debug_resume(bs: BlockDriverState, tag: str) -> int:
    n = _bdrv_debug_hook_bs(bs, "bdrv_debug_resume")
    return n.drv.bdrv_debug_resume(n, tag) if n is not None else -errno.ENOTSUP


def bdrv_debug_is_suspended(bs: BlockDriverState, tag: str) -> bool:
    n = _bdrv_debug_hook_bs(bs, "bdrv_debug_is_suspended")
    return bool(n.drv.bdrv_debug_is_suspended(n, tag)) if n is not None else False


def bdrv_filter_bs(bs: BlockDriverState | None) -> BlockDriverState | None:
    """The node a filter filters (its file, or its backing for backing filters), else None."""
    if bs is None or bs.drv is None or not bs.drv.is_filter:
        return None
    c = bs.backing if bs.drv.filtered_child_is_backing else bs.file
    return c.bs if c is not None else None


def bdrv_skip_filters(bs: BlockDriverState | None) -> BlockDriverState | None:
    """The first node below ``bs`` (or ``bs``) that is not a filter."""
    while bs is not None and bs.drv is not None and bs.drv.is_filter:
        nxt = bdrv_filter_bs(bs)
        if nxt is None:
            break
        bs = nxt
    return bs


def backing_bs(bs: BlockDriverState) -> BlockDriverState | None:
    return bs.backing.bs if bs.backing is not None else None


def bdrv_set_backing_hd(bs: BlockDriverState, backing_hd: BlockDriverState | None) -> None:
    """Make ``backing_hd`` the backing node of ``bs`` (taking its own reference); None removes it.

    All or nothing: on a cycle or a permission conflict the old backing link stays.
    """
    drv = bs.drv
    if drv is not None and not drv.is_filter and not drv.supports_backing:
        raise Error(f"Driver '{drv.format_name}' of node '{bs.node_name}' does not support backing files",
                    errno=errno.EINVAL)
    if backing_hd is not None and bdrv_recurse_has_child(backing_hd, bs):
        raise Error(f"Making '{backing_hd.node_name}' a backing child of '{bs.node_name}' would create a cycle",
                    errno=errno.EINVAL)
    old = bs.backing
    old_index = bs.children.index(old) if old is not None else 0
    old_bs = bdrv_detach_child_noperm(bs, old) if old is not None else None
    child = None
    try:
        if backing_hd is not None:
            child = bdrv_attach_child_noperm(bs, backing_hd, "backing", child_of_bds, bdrv_backing_role(bs))
            bdrv_ref(backing_hd)
        bdrv_list_refresh_perms([bs])
    except Error:
        if child is not None:
            bdrv_detach_child_noperm(bs, child)
            bdrv_unref(backing_hd)
        if old is not None:
            bdrv_replace_child_noperm(old, old_bs)
            bs.children.insert(old_index, old)
        raise
    if old_bs is not None:
        try:
            bdrv_refresh_perms(old_bs)
        except Error:
            pass  # dropping permissions cannot conflict
        bdrv_unref(old_bs)
    if backing_hd is not None:
        bs.backing_file = backing_hd.filename
        bs.backing_format = backing_hd.drv.format_name if backing_hd.drv else ""
    bdrv_refresh_limits(bs)


def bdrv_chain_contains(top: BlockDriverState | None, base: BlockDriverState) -> bool:
    while top is not None and top is not base:
        top = backing_bs(top)
    return top is base


def _should_update_child(c: BdrvChild, to: BlockDriverState) -> bool:
    """False when moving edge ``c`` to ``to`` would create a loop (``c`` lies below ``to``)."""
    if c.klass.stay_at_node:
        return False
    found = {id(to)}
    queue = [to]
    while queue:
        v = queue.pop(0)
        for c2 in v.children:
            if c2 is c:
                return False
            if id(c2.bs) not in found:
                found.add(id(c2.bs))
                queue.append(c2.bs)
    return True


def bdrv_replace_node_noperm(from_bs: BlockDriverState, to: BlockDriverState) -> list[BdrvChild]:
    """Move the parent edges of ``from_bs`` that may move to ``to``; no permission check.

    Each moved edge takes a reference on ``to`` (and still holds its one on ``from_bs``:
    drop those once the change is final, or call bdrv_replace_node_undo).
    """
    moved = []
    for c in list(from_bs.parents):
        if not _should_update_child(c, to):
            continue
        if c.frozen:
            raise Error(f"Cannot change '{c.name}' link to '{from_bs.node_name}'", errno=errno.EPERM)
        moved.append(c)
    for c in moved:
        bdrv_ref(to)
        bdrv_replace_child_noperm(c, to)
    return moved


def bdrv_replace_node_undo(moved: list[BdrvChild], from_bs: BlockDriverState, to: BlockDriverState) -> None:
    for c in moved:
        bdrv_replace_child_noperm(c, from_bs)
        bdrv_unref(to)


def bdrv_replace_node(from_bs: BlockDriverState, to: BlockDriverState) -> None:
    """Move every parent edge of ``from_bs`` to ``to`` (except those that would loop); all or nothing."""
    if bdrv_get_aio_context(from_bs) is not bdrv_get_aio_context(to):
        raise Error("Cannot replace a node by one in another AioContext")
    bdrv_ref(from_bs)
    bdrv_drained_begin(from_bs)
    bdrv_drained_begin(to)
    try:
        moved = bdrv_replace_node_noperm(from_bs, to)
        try:
            bdrv_list_refresh_perms([to, from_bs])
        except Error:
            bdrv_replace_node_undo(moved, from_bs, to)  # the failed refresh restored every permission
            raise
        for _ in moved:
            bdrv_unref(from_bs)
    finally:
        bdrv_drained_end(to)
        bdrv_drained_end(from_bs)
        bdrv_unref(from_bs)


def bdrv_append(bs_new: BlockDriverState, bs_top: BlockDriverState) -> None:
    """Put ``bs_new`` above ``bs_top``: ``bs_top`` becomes its backing (or file for file filters), then takes its place.

    Both steps form one change whose permissions are checked once, at the end (QEMU 6.0+): a
    filter that could not sit beside ``bs_top`` may still go above it.  All or nothing.
    """
    drv = bs_new.drv
    if drv is not None and drv.is_filter and not drv.filtered_child_is_backing:
        name, role, existing = "file", child_format, bs_new.file
    else:
        name, role, existing = "backing", bdrv_backing_role(bs_new), bs_new.backing
    if existing is not None:
        raise RuntimeError(f"bdrv_append: {bs_new.node_name} already has a {name} child")
    bdrv_ref(bs_top)  # for the new edge
    bdrv_drained_begin(bs_top)
    try:
        child = bdrv_attach_child_noperm(bs_new, bs_top, name, child_of_bds, role)
        try:
            moved = bdrv_replace_node_noperm(bs_top, bs_new)
            try:
                bdrv_list_refresh_perms([bs_new, bs_top])
            except Error:
                bdrv_replace_node_undo(moved, bs_top, bs_new)  # the failed refresh restored every permission
                raise
        except Error:
            bdrv_detach_child_noperm(bs_new, child)
            raise
        for _ in moved:
            bdrv_unref(bs_top)
    except Error:
        bdrv_unref(bs_top)
        raise
    finally:
        bdrv_drained_end(bs_top)
    if name == "backing":
        bs_new.backing_file = bs_top.filename
        bs_new.backing_format = bs_top.drv.format_name if bs_top.drv else ""
    bdrv_refresh_limits(bs_new)


# --------------------------------------------------------------------------
# Opening nodes


def _normalize_options(options: dict[str, Any] | str | None) -> dict[str, Any]:
    if options is None:
        return {}
    if isinstance(options, str):
        if options.startswith("json:"):
            return parse_json_filename(options)
        return dict(keyval_parse(options))
    return qdict_flatten(options)


def path_has_protocol(path: str) -> bool:
    p = path.find(":")
    return p > 0 and "/" not in path[:p]


def bdrv_find_protocol(filename: str, allow_protocol_prefix: bool = True) -> BlockDriver:
    """The protocol driver for ``filename``: its ``proto:`` prefix, else the file driver."""
    if not path_has_protocol(filename) or not allow_protocol_prefix:
        drv = bdrv_find_format("file")
        if drv is None:
            raise Error("Unknown protocol 'file'")
        return drv
    protocol = filename.split(":", 1)[0]
    drv = bdrv_find_protocol_driver(protocol)
    if drv is None:
        raise Error(f"Unknown protocol '{protocol}'")
    return drv


BLOCK_PROBE_BUF_SIZE = 512


def find_image_format(file_bs: BlockDriverState, filename: str) -> BlockDriver:
    """Probe the first 512 bytes of ``file_bs`` with every format's bdrv_probe; raw when nothing claims it."""
    from qblock.block.io import bdrv_pread
    raw = bdrv_find_format("raw")
    length = bdrv_getlength(file_bs)
    if bdrv_is_sg(file_bs) or not bdrv_is_inserted(file_bs) or length == 0:
        if raw is None:
            raise Error("Could not determine image format: no raw driver")
        return raw
    buf = bytearray(BLOCK_PROBE_BUF_SIZE)
    n = min(BLOCK_PROBE_BUF_SIZE, max(length, 0))
    ret = bdrv_pread(_probe_child(file_bs), 0, memoryview(buf)[:n], n)
    if ret < 0:
        raise error_setg_errno(-ret, "Could not read image for determining its format")
    best, score_max = None, 0
    for drv in _drv.bdrv_drivers():
        if drv.bdrv_probe is not None:
            score = drv.bdrv_probe(bytes(buf[:n]), n, filename)
            if score > score_max:
                best, score_max = drv, score
    if best is None:
        raise Error("Could not determine image format: No compatible driver found", errno=errno.ENOENT)
    return best


class _ProbeChild(BdrvChildClass):
    def get_parent_desc(self, c: BdrvChild) -> str:
        return "format probing"


def _probe_child(bs: BlockDriverState) -> BdrvChild:
    # Probing reads through a temporary edge that asks for nothing and shares everything.
    return BdrvChild(bs, "probe", _ProbeChild(), 0, None, 0, BLK_PERM_ALL)


def _copy_default(child_opts: dict, parent_opts: dict, key: str) -> None:
    if key not in child_opts and key in parent_opts:
        child_opts[key] = parent_opts[key]


def bdrv_inherited_options(role: int, parent_is_format: bool, parent_flags: int,
                           parent_options: dict, child_options: dict) -> int:
    """The flags and default options a child inherits from its parent (block.c: bdrv_inherited_options).

    Whether the child is probed for a format: a plain data child of a node that is not a
    format (blkverify's ``test``) is; every non-backing child of a format, and every metadata
    child, is not (BDRV_O_PROTOCOL); any other child keeps its parent's choice, so a filter's
    child is opened the way the filter was.
    """
    flags = parent_flags
    if not parent_is_format and role & BDRV_CHILD_DATA and not role & (BDRV_CHILD_METADATA | BDRV_CHILD_FILTERED):
        flags &= ~BDRV_O_PROTOCOL
    if (parent_is_format and not role & BDRV_CHILD_COW) or role & BDRV_CHILD_METADATA:
        flags |= BDRV_O_PROTOCOL
    for key in (BDRV_OPT_CACHE_DIRECT, BDRV_OPT_CACHE_NO_FLUSH, BDRV_OPT_FORCE_SHARE):
        _copy_default(child_options, parent_options, key)
    if role & BDRV_CHILD_COW:
        child_options.setdefault(BDRV_OPT_READ_ONLY, "on")
        child_options.setdefault(BDRV_OPT_AUTO_READ_ONLY, "off")
        flags &= ~BDRV_O_RDWR
    else:
        _copy_default(child_options, parent_options, BDRV_OPT_READ_ONLY)
        _copy_default(child_options, parent_options, BDRV_OPT_AUTO_READ_ONLY)
    if parent_is_format and role & (BDRV_CHILD_DATA | BDRV_CHILD_METADATA):
        # Formats send flushes and respect the unmap policy themselves.
        child_options.setdefault(BDRV_OPT_DISCARD, "unmap")
    else:
        _copy_default(child_options, parent_options, BDRV_OPT_DISCARD)
    flags &= ~(BDRV_O_SNAPSHOT | BDRV_O_NO_BACKING | BDRV_O_COPY_ON_READ)
    if role & BDRV_CHILD_METADATA:
        flags &= ~BDRV_O_NO_IO
    return flags


def _update_flags_from_options(flags: int, opts) -> int:
    if opts.get(BDRV_OPT_CACHE_DIRECT, bool(flags & BDRV_O_NOCACHE)):
        flags |= BDRV_O_NOCACHE
    else:
        flags &= ~BDRV_O_NOCACHE
    if opts.get(BDRV_OPT_CACHE_NO_FLUSH, bool(flags & BDRV_O_NO_FLUSH)):
        flags |= BDRV_O_NO_FLUSH
    else:
        flags &= ~BDRV_O_NO_FLUSH
    if BDRV_OPT_READ_ONLY in opts:
        if opts.get(BDRV_OPT_READ_ONLY):
            flags &= ~BDRV_O_RDWR
        else:
            flags |= BDRV_O_RDWR
    if opts.get(BDRV_OPT_AUTO_READ_ONLY, bool(flags & BDRV_O_AUTO_RDONLY)):
        flags |= BDRV_O_AUTO_RDONLY
    else:
        flags &= ~BDRV_O_AUTO_RDONLY
    return flags


def bdrv_parse_detect_zeroes(opts: dict, open_flags: int) -> BlockdevDetectZeroesOptions:
    """The ``detect-zeroes`` option; ``unmap`` needs discard=unmap in ``open_flags``. Raises Error."""
    dz = qapi_enum_parse(BlockdevDetectZeroesOptions, opts.get("detect-zeroes"),
                         BlockdevDetectZeroesOptions.BLOCKDEV_DETECT_ZEROES_OPTIONS_OFF)
    if dz is BlockdevDetectZeroesOptions.BLOCKDEV_DETECT_ZEROES_OPTIONS_UNMAP and not open_flags & BDRV_O_UNMAP:
        raise Error("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap")
    return dz


def bdrv_parse_discard_flags(mode: str, flags: int) -> int:
    """``ignore``/``off`` clears BDRV_O_UNMAP, ``unmap``/``on`` sets it; anything else is an error."""
    if mode in ("off", "ignore"):
        return flags & ~BDRV_O_UNMAP
    if mode in ("on", "unmap"):
        return flags | BDRV_O_UNMAP
    raise Error("Invalid discard option", hint="Valid values: ignore, off, unmap, on")


def bdrv_open_driver(bs: BlockDriverState, drv: BlockDriver, node_name: str | None,
                     options: dict, open_flags: int) -> None:
    """Name the node, create its state and run the driver's open hook, then size and limits."""
    bdrv_assign_node_name(bs, node_name)
    bs.drv = drv
    bs.read_only = not (bs.open_flags & BDRV_O_RDWR)
    bs.opaque = driver_state(drv)
    try:
        hook = drv.bdrv_file_open if drv.bdrv_file_open is not None else drv.bdrv_open
        ret = hook(bs, options, open_flags) if hook is not None else 0
        if ret is not None and ret < 0:
            if bs.filename:
                raise error_setg_errno(-ret, f"Could not open '{bs.filename}'")
            raise error_setg_errno(-ret, "Could not open image")
        ret = refresh_total_sectors(bs, bs.total_sectors)
        if ret < 0:
            raise error_setg_errno(-ret, "Could not refresh total sector count")
        bdrv_refresh_limits(bs)
    except BaseException:
        if bs.drv is not None and bs.drv.bdrv_close is not None and bs.opaque is not None:
            try:
                drv.bdrv_close(bs)
            except Exception:  # noqa: BLE001 - the open error is the one to report
                pass
        for c in list(bs.children):
            bdrv_unref_child(bs, c)
        bs.drv = None
        bs.opaque = None
        if bs in graph_bdrv_states:
            graph_bdrv_states.remove(bs)
        bs.node_name = ""
        raise
    for _ in range(bs.quiesce_counter):
        if drv.bdrv_drain_begin is not None:
            drv.bdrv_drain_begin(bs)


def bdrv_open_common(bs: BlockDriverState, file_bs: BlockDriverState | None, options: dict) -> None:
    opts = qemu_opts_absorb_qdict(bdrv_runtime_opts, options)
    bs.open_flags = _update_flags_from_options(bs.open_flags, opts)
    drv = bdrv_find_format(opts.get("driver"))
    if drv is None:  # pragma: no cover - bdrv_open_inherit checked it
        raise Error(f"Unknown driver '{opts.get('driver')}'")
    filename = file_bs.filename if file_bs is not None else options.get("filename")
    if drv.bdrv_needs_filename and not filename:
        raise Error(f"The '{drv.format_name}' block driver requires a file name", errno=errno.EINVAL)
    if trace_bdrv_open_common.event.enabled:
        trace_bdrv_open_common(bs, filename or "", bs.open_flags, drv.format_name)
    bs.force_share = bool(opts.get(BDRV_OPT_FORCE_SHARE, False))
    if bs.force_share and bs.open_flags & BDRV_O_RDWR:
        raise Error("force-share=on can only be used with read-only images", errno=errno.EINVAL)
    ro = not (bs.open_flags & BDRV_O_RDWR)
    if bs.open_flags & BDRV_O_COPY_ON_READ:
        if ro:
            raise Error("Can't use copy-on-read on read-only device", errno=errno.EINVAL)
        bs.copy_on_read += 1
    discard = opts.get(BDRV_OPT_DISCARD)
    if discard is not None:
        bs.open_flags = bdrv_parse_discard_flags(discard, bs.open_flags)
    bs.detect_zeroes = bdrv_parse_detect_zeroes(opts, bs.open_flags)
    bs.filename = filename or ""
    bs.exact_filename = bs.filename
    bdrv_open_driver(bs, drv, opts.get("node-name"), options, bs.open_flags)


def bdrv_open_inherit(filename: str | None, reference: str | None, options: dict, flags: int,
                      parent: BlockDriverState | None, child_role: int) -> BlockDriverState:
    if reference is not None:
        if filename or options:
            raise Error("Cannot reference an existing block device with additional options or a new filename")
        bs = bdrv_lookup_bs(reference, reference)
        bdrv_ref(bs)
        return bs
    explicit_options = dict(options)    # what was asked of this node, before inheriting from the parent
    if parent is not None:
        # A parent without a driver yet is being probed: it will be a format.
        parent_is_format = parent.drv is None or parent.drv.is_format
        flags = bdrv_inherited_options(child_role, parent_is_format, parent.open_flags, parent.options, options)
    if filename and filename.startswith("json:"):
        json_options = parse_json_filename(filename)
        for k, v in json_options.items():
            options.setdefault(k, v)
        filename = None

    drvname = options.get("driver")
    drv = None
    protocol = bool(flags & BDRV_O_PROTOCOL)
    if drvname is not None:
        drv = bdrv_find_format(drvname)
        if drv is None:
            raise Error(f"Unknown driver '{drvname}'", errno=errno.ENOENT)
        protocol = drv.bdrv_file_open is not None
    if protocol:
        flags |= BDRV_O_PROTOCOL
    else:
        flags &= ~BDRV_O_PROTOCOL
    parse_filename = False
    if protocol and filename:
        if "filename" in options:
            raise Error("Can't specify 'file' and 'filename' options at the same time", errno=errno.EINVAL)
        options["filename"] = filename
        parse_filename = True
    if drv is None and protocol:
        fname = options.get("filename")
        if not fname:
            raise Error("Must specify either driver or file", errno=errno.EINVAL)
        drv = bdrv_find_protocol(fname, parse_filename)
        options["driver"] = drv.format_name
    if drv is not None and parse_filename and drv.bdrv_parse_filename is not None:
        drv.bdrv_parse_filename(options["filename"], options)
        if not drv.bdrv_needs_filename:
            options.pop("filename", None)

    bs = bdrv_new()
    bs.explicit_options = explicit_options
    bs.open_flags = flags
    bs.inherits_from = parent
    file_bs = None
    try:
        if not flags & BDRV_O_PROTOCOL:
            # A format (or filter) over something: open the protocol child first, for probing;
            # the driver's own bdrv_open_child then finds it by node name.
            bs.options = options
            file_bs = bdrv_open_child_bs(filename, options, "file", bs, child_file, True)
            if file_bs is not None:
                options["file"] = file_bs.node_name
            if drv is None:
                if file_bs is None:
                    raise Error("Must specify either driver or file", errno=errno.EINVAL)
                drv = find_image_format(file_bs, filename or file_bs.filename)
                bs.probed = True
                options["driver"] = drv.format_name
        bs.options = dict(options)
        bdrv_open_common(bs, file_bs, options)
        if file_bs is not None:
            bdrv_unref(file_bs)  # the driver holds its own reference through its file child
            file_bs = None
            options.pop("file", None)
        if drv.supports_backing and not flags & BDRV_O_NO_BACKING:
            bdrv_open_backing_file(bs, options)
        if options:
            key = next(iter(options))
            if flags & BDRV_O_PROTOCOL:
                raise Error(f"Block protocol '{drv.format_name}' doesn't support the option '{key}'")
            raise Error(f"Block format '{drv.format_name}' does not support the option '{key}'")
    except BaseException:
        if file_bs is not None:
            bdrv_unref(file_bs)
        bdrv_unref(bs)
        raise
    return bs


def bdrv_open(filename: str | None, reference: str | None = None,
              options: dict[str, Any] | str | None = None, flags: int = 0) -> BlockDriverState:
    """Open a node (and the nodes below it) from a filename and/or options.

    ``options`` may be a dict (nested or with dotted keys), a ``json:{...}``
    string or QEMU's ``key=value,...`` string.  Raises Error with QEMU's
    wording on failure; nothing is left open then.
    """
    return bdrv_open_inherit(filename, reference, _normalize_options(options), flags, None, 0)


def bdrv_open_child_bs(filename: str | None, options: dict, bdref_key: str, parent: BlockDriverState,
                       child_role: int, allow_none: bool) -> BlockDriverState | None:
    sub = qdict_extract_subqdict(options, bdref_key + ".")
    reference = options.pop(bdref_key, None)
    if reference is not None and not isinstance(reference, str):
        raise Error(f"Invalid reference for '{bdref_key}'")
    if filename is None and reference is None and not sub:
        if not allow_none:
            raise Error(f'A block device must be specified for "{bdref_key}"', errno=errno.EINVAL)
        return None
    return bdrv_open_inherit(filename, reference, sub, 0, parent, child_role)


def bdrv_open_child(filename: str | None, options: dict, bdref_key: str, parent: BlockDriverState,
                    child_class: BdrvChildClass = child_of_bds, child_role: int = child_file,
                    allow_none: bool = False) -> BdrvChild | None:
    """Open (or reference) the child ``bdref_key`` from the parent's options and attach it."""
    bs = bdrv_open_child_bs(filename, options, bdref_key, parent, child_role, allow_none)
    if bs is None:
        return None
    return bdrv_attach_child(parent, bs, bdref_key, child_class, child_role)


def bdrv_get_full_backing_filename(bs: BlockDriverState) -> str:
    """The backing file name, relative names taken relative to the image's directory."""
    name = bs.backing_file
    if not name or path_has_protocol(name) or name.startswith("/") or name.startswith("json:"):
        return name
    base = bs.filename
    if not base or path_has_protocol(base):
        return name
    return os.path.join(os.path.dirname(base), name)


def bdrv_open_backing_file(bs: BlockDriverState, parent_options: dict, bdref_key: str = "backing") -> None:
    """Open the backing file named by the options or the image header (block.c: bdrv_open_backing_file)."""
    if bs.backing is not None:
        return
    sub = qdict_extract_subqdict(parent_options, bdref_key + ".")
    reference = parent_options.pop(bdref_key, None)
    if reference is None and "null" in sub:
        reference = ""
    if reference == "" or reference is False:
        return  # backing explicitly disabled ("backing": null)
    if reference is None and not sub:
        if not bs.backing_file:
            return
        sub = {}
        filename = bdrv_get_full_backing_filename(bs)
        if bs.backing_format and "driver" not in sub:
            sub["driver"] = bs.backing_format
    else:
        filename = None
    try:
        backing = bdrv_open_inherit(filename, reference if isinstance(reference, str) else None, sub,
                                    0, bs, child_backing)
    except Error as e:
        raise Error(f"Could not open backing file: {e.msg}", errno=e.errno) from None
    try:
        bdrv_attach_child(bs, backing, bdref_key, child_of_bds, child_backing)
    except Error:
        raise
    bdrv_refresh_limits(bs)


def bdrv_new_open_driver(drv: BlockDriver, node_name: str | None = None, flags: int = 0,
                         options: dict | None = None) -> BlockDriverState:
    """A node running ``drv`` with no children (block.c: bdrv_new_open_driver): handy for tests and filters."""
    bs = bdrv_new()
    bs.open_flags = flags
    bs.options = dict(options or {})
    opts = dict(options or {})
    try:
        bdrv_open_driver(bs, drv, node_name, opts, flags)
    except BaseException:
        bdrv_unref(bs)
        raise
    return bs


# --------------------------------------------------------------------------
# Drain (block/io.c)


def bdrv_parent_drained_begin(bs: BlockDriverState, ignore: BdrvChild | None) -> None:
    for c in list(bs.parents):
        if c is ignore:
            continue
        bdrv_parent_drained_begin_single(c)


def bdrv_parent_drained_end(bs: BlockDriverState, ignore: BdrvChild | None) -> None:
    for c in list(bs.parents):
        if c is ignore:
            continue
        bdrv_parent_drained_end_single(c)


def bdrv_parent_drained_poll(bs: BlockDriverState, ignore: BdrvChild | None, ignore_bds_parents: bool) -> bool:
    busy = False
    for c in list(bs.parents):
        if c is ignore or (ignore_bds_parents and c.klass.parent_is_bds):
            continue
        busy |= c.klass.drained_poll(c)
    return busy


def bdrv_drain_poll(bs: BlockDriverState, ignore_parent: BdrvChild | None, ignore_bds_parents: bool) -> bool:
    """True while the node or a parent still has requests in flight."""
    if bdrv_parent_drained_poll(bs, ignore_parent, ignore_bds_parents):
        return True
    return bs.in_flight > 0


def _bdrv_drain_poll_top_level(bs: BlockDriverState, ignore_parent: BdrvChild | None) -> bool:
    ctx = bdrv_get_aio_context(bs)
    if ctx is qemu_get_current_aio_context():
        while aio_poll(ctx, False):
            pass
    return bdrv_drain_poll(bs, ignore_parent, False)


@attrs.define(eq=False)
class BdrvCoDrainData:
    co: Any
    bs: BlockDriverState | None
    begin: bool
    poll: bool
    parent: BdrvChild | None
    done: bool = False


def _bdrv_co_drain_bh_cb(data: BdrvCoDrainData) -> None:
    bs = data.bs
    if bs is not None:
        from qblock.block.io import bdrv_dec_in_flight
        bdrv_dec_in_flight(bs)
        if data.begin:
            bdrv_do_drained_begin(bs, data.parent, data.poll)
        else:
            bdrv_do_drained_end(bs, data.parent)
    else:
        bdrv_drain_all_begin()
    data.done = True
    aio_co_wake(data.co)


def bdrv_co_yield_to_drain(bs: BlockDriverState | None, begin: bool, parent: BdrvChild | None, poll: bool) -> None:
    """Drain from a coroutine: do it from a BH in the main loop and yield until it is done."""
    from qblock.block.io import bdrv_inc_in_flight
    data = BdrvCoDrainData(qemu_coroutine_self(), bs, begin, poll, parent)
    if bs is not None:
        bdrv_inc_in_flight(bs)
    aio_bh_schedule_oneshot(qemu_get_aio_context(), _bdrv_co_drain_bh_cb, data, "bdrv_co_drain_bh_cb")
    data.co.waiting_on = "drain (bdrv_co_yield_to_drain)"
    qemu_coroutine_yield()
    if not data.done:
        raise RuntimeError("bdrv_co_yield_to_drain: coroutine resumed before the drain finished")


def bdrv_do_drained_begin(bs: BlockDriverState, parent: BdrvChild | None, poll: bool) -> None:
    if qemu_in_coroutine():
        bdrv_co_yield_to_drain(bs, True, parent, poll)
        return
    bs.quiesce_counter += 1
    if bs.quiesce_counter == 1:
        bdrv_parent_drained_begin(bs, parent)
        drv = bs.drv
        if drv is not None:
            if drv.bdrv_drain_begin is not None:
                drv.bdrv_drain_begin(bs)
            elif drv.bdrv_co_drain_begin is not None:
                _bdrv_drain_invoke_co(bs, drv.bdrv_co_drain_begin)
    if poll:
        BDRV_POLL_WHILE(bs, lambda: _bdrv_drain_poll_top_level(bs, parent))


def _bdrv_drain_invoke_co(bs: BlockDriverState, hook: Callable) -> None:
    """Run a coroutine drain hook (the seed's bdrv_co_drain_begin/end) to completion."""
    from qblock.util.coroutine import qemu_coroutine_create
    from qblock.block.io import bdrv_dec_in_flight, bdrv_inc_in_flight
    done = []

    def entry(_):
        hook(bs)
        done.append(True)
        bdrv_dec_in_flight(bs)

    bdrv_inc_in_flight(bs)
    bdrv_coroutine_enter(bs, qemu_coroutine_create(entry, None))
    BDRV_POLL_WHILE(bs, lambda: not done)


def bdrv_do_drained_begin_quiesce(bs: BlockDriverState, parent: BdrvChild | None) -> None:
    bdrv_do_drained_begin(bs, parent, False)


def bdrv_drained_begin(bs: BlockDriverState) -> None:
    """Start a drained section: in-flight requests on ``bs`` finish, parents stop sending new ones."""
    bdrv_do_drained_begin(bs, None, True)


def bdrv_do_drained_end(bs: BlockDriverState, parent: BdrvChild | None) -> None:
    if qemu_in_coroutine():
        bdrv_co_yield_to_drain(bs, False, parent, False)
        return
    if bs.quiesce_counter <= 0:
        raise RuntimeError(f"bdrv_drained_end on {bs.node_name}, which is not drained")
    bs.quiesce_counter -= 1
    if bs.quiesce_counter == 0:
        drv = bs.drv
        if drv is not None:
            if drv.bdrv_drain_end is not None:
                drv.bdrv_drain_end(bs)
            elif drv.bdrv_co_drain_end is not None:
                _bdrv_drain_invoke_co(bs, drv.bdrv_co_drain_end)
        bdrv_parent_drained_end(bs, parent)


def bdrv_drained_end(bs: BlockDriverState) -> None:
    bdrv_do_drained_end(bs, None)


def bdrv_drain(bs: BlockDriverState) -> None:
    bdrv_drained_begin(bs)
    bdrv_drained_end(bs)


def _bdrv_drain_all_poll() -> bool:
    main = qemu_get_aio_context()
    while aio_poll(main, False):
        pass
    result = False
    for bs in list(all_bdrv_states):
        result |= bdrv_drain_poll(bs, None, True)
    return result


def bdrv_drain_all_begin() -> None:
    """Quiesce every node, then wait until none has requests in flight."""
    global bdrv_drain_all_count
    if qemu_in_coroutine():
        bdrv_co_yield_to_drain(None, True, None, True)
        return
    bdrv_drain_all_count += 1
    for bs in list(all_bdrv_states):
        bdrv_do_drained_begin(bs, None, False)
    AIO_WAIT_WHILE(None, _bdrv_drain_all_poll)


def bdrv_drain_all_end() -> None:
    global bdrv_drain_all_count
    for bs in list(all_bdrv_states):
        bdrv_do_drained_end(bs, None)
    if bdrv_drain_all_count <= 0:
        raise RuntimeError("bdrv_drain_all_end without bdrv_drain_all_begin")
    bdrv_drain_all_count -= 1


def bdrv_drain_all() -> None:
    bdrv_drain_all_begin()
    bdrv_drain_all_end()


# --------------------------------------------------------------------------
# AioContexts


def _bdrv_connected_nodes(bs: BlockDriverState) -> list[BlockDriverState]:
    seen: dict[int, BlockDriverState] = {}
    stack = [bs]
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen[id(n)] = n
        stack.extend(c.bs for c in n.children)
        stack.extend(c.opaque for c in n.parents if c.klass.parent_is_bds)
    return list(seen.values())


def bdrv_try_set_aio_context(bs: BlockDriverState, ctx: AioContext) -> None:
    """Move ``bs`` and every node connected to it into ``ctx`` (drained while moving)."""
    if bdrv_get_aio_context(bs) is ctx:
        return
    nodes = _bdrv_connected_nodes(bs)
    for n in nodes:
        for c in n.parents:
            if not c.klass.parent_is_bds:
                can = getattr(c.klass, "can_set_aio_ctx", None)
                if can is not None and not can(c, ctx):
                    raise Error("Cannot change iothread of active block backend")
    for n in nodes:
        bdrv_drained_begin(n)
    try:
        for n in nodes:
            if n.drv is not None and n.drv.bdrv_detach_aio_context is not None:
                n.drv.bdrv_detach_aio_context(n)
            n.aio_context = ctx if ctx is not qemu_get_aio_context() else None
            if n.drv is not None and n.drv.bdrv_attach_aio_context is not None:
                n.drv.bdrv_attach_aio_context(n, ctx)
            for c in n.parents:
                if not c.klass.parent_is_bds:
                    c.klass.change_aio_ctx(c, ctx)
    finally:
        for n in nodes:
            bdrv_drained_end(n)


def bdrv_set_aio_context(bs: BlockDriverState, ctx: AioContext) -> None:
    bdrv_try_set_aio_context(bs, ctx)


# --------------------------------------------------------------------------
# x-debug-query-block-graph (block.c: bdrv_get_xdbg_block_graph)

_PERM_QAPI = [(BLK_PERM_CONSISTENT_READ, "consistent-read"), (BLK_PERM_WRITE, "write"),
              (BLK_PERM_WRITE_UNCHANGED, "write-unchanged"), (BLK_PERM_RESIZE, "resize"),
              (BLK_PERM_GRAPH_MOD, "graph-mod")]


def bdrv_perm_list(perm: int) -> list[str]:
    """Permission bits as QAPI's BlockPermission names."""
    return [name for bit, name in _PERM_QAPI if perm & bit]


def bdrv_get_xdbg_block_graph() -> dict:
    """The whole graph as x-debug-query-block-graph returns it: block-backend and block-driver nodes, edges."""
    from qblock.block.block_backend import block_backends
    ids: dict[int, int] = {}
    nodes: list[dict] = []
    edges: list[dict] = []

    def node_id(obj: Any, type_: str, name: str) -> int:
        if id(obj) not in ids:
            ids[id(obj)] = len(ids) + 1
            nodes.append({"id": ids[id(obj)], "type": type_, "name": name})
        return ids[id(obj)]

    for blk in block_backends:
        pid = node_id(blk, "block-backend", blk.name or "")
        if blk.root is not None:
            cid = node_id(blk.root.bs, "block-driver", blk.root.bs.node_name)
            edges.append({"parent": pid, "child": cid, "name": blk.root.name,
                          "perm": bdrv_perm_list(blk.root.perm), "shared-perm": bdrv_perm_list(blk.root.shared_perm)})
    for bs in all_bdrv_states:
        pid = node_id(bs, "block-driver", bs.node_name)
        for c in reversed(bs.children):
            cid = node_id(c.bs, "block-driver", c.bs.node_name)
            edges.append({"parent": pid, "child": cid, "name": c.name,
                          "perm": bdrv_perm_list(c.perm), "shared-perm": bdrv_perm_list(c.shared_perm)})
    return {"nodes": nodes, "edges": edges}


# --------------------------------------------------------------------------
# Iteration for tools


def bdrv_all_nodes() -> Iterator[BlockDriverState]:
    return iter(list(graph_bdrv_states))
