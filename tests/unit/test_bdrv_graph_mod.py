"""Changing the node graph: QEMU's tests/unit/test-bdrv-graph-mod.c, plus the rest of block.c's graph rules.

The five QEMU tests check permission updates across whole subgraphs (topological order,
one transaction for a graph change).  The qblock additions check the conflict message,
that a refused change leaves the graph as it was, reference counting, backing loops,
filters, limits merging and node names (with QEMU's messages).
"""
from __future__ import annotations

import re

import attrs
import pytest

from qblock.block import graph
from qblock.block.block_backend import (
    blk_bs,
    blk_insert_bs,
    blk_new,
    blk_set_perm,
    blk_unref,
    block_backends,
    monitor_add_blk,
)
from qblock.block.driver import (
    BDRV_O_PROTOCOL,
    BDRV_O_RDWR,
    BDRV_SECTOR_SIZE,
    BlockDriver,
    bdrv_find_format,
    bdrv_register,
)
from qblock.block.graph import (
    BDRV_CHILD_DATA,
    BDRV_CHILD_FILTERED,
    BDRV_CHILD_PRIMARY,
    BLK_PERM_ALL,
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_WRITE,
    BLK_PERM_WRITE_UNCHANGED,
    bdrv_append,
    bdrv_attach_child,
    bdrv_child_refresh_perms,
    bdrv_default_perms,
    bdrv_filter_bs,
    bdrv_find_node,
    bdrv_new_open_driver,
    bdrv_open,
    bdrv_ref,
    bdrv_refresh_limits,
    bdrv_replace_node,
    bdrv_set_backing_hd,
    bdrv_skip_filters,
    bdrv_unref,
    child_file,
    child_of_bds,
)
from qblock.util.error import Error
from qblock.util.qemu_option import QEMU_OPT_SIZE, QemuOptDesc, QemuOptsList, qemu_opts_absorb_qdict

# --------------------------------------------------------------------------
# The drivers of test-bdrv-graph-mod.c


class PassThroughDriver(BlockDriver):
    """A filter over its backing child with the default permissions."""

    format_name = "pass-through"
    is_filter = True
    filtered_child_is_backing = True

    def bdrv_child_perm(self, bs, c, role, reopen_queue, perm, shared):
        return bdrv_default_perms(bs, c, role, reopen_queue, perm, shared)


class NoPermDriver(BlockDriver):
    """Asks nothing of its children and shares everything."""

    format_name = "no-perm"
    supports_backing = True

    def bdrv_child_perm(self, bs, c, role, reopen_queue, perm, shared):
        return 0, BLK_PERM_ALL


class ExclusiveWriterDriver(BlockDriver):
    """A filter that always writes its child and lets nobody else write it."""

    format_name = "exclusive-writer"
    is_filter = True
    filtered_child_is_backing = True

    def bdrv_child_perm(self, bs, c, role, reopen_queue, perm, shared):
        return BLK_PERM_WRITE, BLK_PERM_ALL & ~BLK_PERM_WRITE


@attrs.define
class BDRVWriteToSelectedState:
    selected: object = None


class WriteToSelectedDriver(BlockDriver):
    """Several children; the selected one is written exclusively, the others not used."""

    format_name = "write-to-selected"
    state_class = BDRVWriteToSelectedState

    def bdrv_child_perm(self, bs, c, role, reopen_queue, perm, shared):
        s: BDRVWriteToSelectedState = bs.opaque
        if s.selected is not None and c is s.selected:
            return BLK_PERM_WRITE, BLK_PERM_ALL & ~BLK_PERM_WRITE
        return 0, BLK_PERM_ALL


class CloseCountingDriver(BlockDriver):
    """No I/O; counts bdrv_close calls (qblock addition)."""

    format_name = "close-counting"
    supports_backing = True
    closed: list = []

    def bdrv_close(self, bs) -> None:
        self.closed.append(bs.node_name)


class FileFilterDriver(BlockDriver):
    """A filter over its file child (qblock addition)."""

    format_name = "file-filter"
    is_filter = True


bdrv_pass_through = bdrv_register(PassThroughDriver)
bdrv_no_perm = bdrv_register(NoPermDriver)
bdrv_exclusive_writer = bdrv_register(ExclusiveWriterDriver)
bdrv_write_to_selected = bdrv_register(WriteToSelectedDriver)
bdrv_close_counting = bdrv_register(CloseCountingDriver)
bdrv_file_filter = bdrv_register(FileFilterDriver)


def no_perm_node(name: str):
    return bdrv_new_open_driver(bdrv_no_perm, name, BDRV_O_RDWR)


def pass_through_node(name: str):
    return bdrv_new_open_driver(bdrv_pass_through, name, BDRV_O_RDWR)


def exclusive_writer_node(name: str):
    return bdrv_new_open_driver(bdrv_exclusive_writer, name, BDRV_O_RDWR)


@pytest.fixture(autouse=True)
def _no_leaks():
    """Every test deletes the nodes and BlockBackends it creates."""
    nodes = list(graph.all_bdrv_states)
    blks = list(block_backends)
    yield
    leaked = ([n for n in graph.all_bdrv_states if n not in nodes], [b for b in block_backends if b not in blks])
    graph.all_bdrv_states[:] = nodes
    graph.graph_bdrv_states[:] = [n for n in graph.graph_bdrv_states if n in nodes]
    block_backends[:] = blks
    assert leaked == ([], [])


def edges(bs) -> list[tuple[str, str, int, int]]:
    """(parent, child name, perm, shared) of every parent edge of ``bs``: a snapshot to compare (in any order)."""
    return sorted((c.trace_name, c.name, c.perm, c.shared_perm) for c in bs.parents)


# --------------------------------------------------------------------------
# /bdrv-graph-mod/*


def test_update_perm_tree():
    """Appending a filter that would give a node two exclusive writers fails, and the graph stays as it was."""
    root = blk_new(None, BLK_PERM_WRITE | BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL & ~BLK_PERM_WRITE)
    bs = no_perm_node("node")
    filter = pass_through_node("filter")
    blk_insert_bs(root, bs)
    bdrv_attach_child(filter, bs, "child", child_of_bds, BDRV_CHILD_DATA)
    before = (edges(bs), list(filter.children), bs.refcnt, filter.refcnt)

    with pytest.raises(Error, match="^Permission conflict on node 'node'"):
        bdrv_append(filter, bs)

    assert blk_bs(root) is bs
    assert filter.backing is None
    assert (edges(bs), list(filter.children), bs.refcnt, filter.refcnt) == before

    bdrv_unref(filter)
    blk_unref(root)


def test_should_update_child():
    """bdrv_append does not redirect an edge that would make a loop (target's backing stays on node)."""
    root = blk_new(None, 0, BLK_PERM_ALL)
    bs = no_perm_node("node")
    filter = no_perm_node("filter")
    target = no_perm_node("target")
    blk_insert_bs(root, bs)

    bdrv_set_backing_hd(target, bs)
    assert target.backing.bs is bs
    bdrv_attach_child(filter, target, "target", child_of_bds, BDRV_CHILD_DATA)
    bdrv_append(filter, bs)
    assert target.backing.bs is bs
    assert blk_bs(root) is filter and filter.backing.bs is bs

    bdrv_unref(filter)
    bdrv_unref(bs)
    blk_unref(root)


def test_parallel_exclusive_write():
    """Replacing a filter by a parallel one succeeds: the old filter's write is dropped in the same update."""
    top = exclusive_writer_node("top")
    base = no_perm_node("base")
    fl1 = pass_through_node("fl1")
    fl2 = pass_through_node("fl2")
    bdrv_ref(base)  # bdrv_attach_child takes a reference; two filters need two

    bdrv_attach_child(top, fl1, "backing", child_of_bds, BDRV_CHILD_FILTERED | BDRV_CHILD_PRIMARY)
    bdrv_attach_child(fl1, base, "backing", child_of_bds, BDRV_CHILD_FILTERED | BDRV_CHILD_PRIMARY)
    bdrv_attach_child(fl2, base, "backing", child_of_bds, BDRV_CHILD_FILTERED | BDRV_CHILD_PRIMARY)

    bdrv_replace_node(fl1, fl2)
    assert top.backing.bs is fl2
    assert bdrv_filter_bs(top) is fl2

    bdrv_unref(fl2)
    bdrv_unref(top)


def test_parallel_perm_update():
    """Permissions are updated parents first (topological order), so switching the exclusively written child works."""
    top = no_perm_node("top")
    ws = bdrv_new_open_driver(bdrv_write_to_selected, "ws", BDRV_O_RDWR)
    s = ws.opaque
    base = no_perm_node("base")
    fl1 = pass_through_node("fl1")
    fl2 = pass_through_node("fl2")
    bdrv_ref(base)

    bdrv_attach_child(top, ws, "file", child_of_bds, BDRV_CHILD_DATA)
    c_fl1 = bdrv_attach_child(ws, fl1, "first", child_of_bds, BDRV_CHILD_DATA)
    c_fl2 = bdrv_attach_child(ws, fl2, "second", child_of_bds, BDRV_CHILD_DATA)
    bdrv_attach_child(fl1, base, "backing", child_of_bds, BDRV_CHILD_FILTERED | BDRV_CHILD_PRIMARY)
    bdrv_attach_child(fl2, base, "backing", child_of_bds, BDRV_CHILD_FILTERED | BDRV_CHILD_PRIMARY)

    for selected, other in ((c_fl1, c_fl2), (c_fl2, c_fl1), (c_fl1, c_fl2)):
        s.selected = selected
        bdrv_child_refresh_perms(top, top.children[0])
        assert selected.perm & BLK_PERM_WRITE
        assert not other.perm & BLK_PERM_WRITE

    bdrv_unref(top)


def test_append_greedy_filter():
    """Appending an exclusive-writer filter below another one succeeds: permissions are checked after the change."""
    top = exclusive_writer_node("top")
    base = no_perm_node("base")
    fl = exclusive_writer_node("fl1")
    bdrv_attach_child(top, base, "backing", child_of_bds, BDRV_CHILD_FILTERED | BDRV_CHILD_PRIMARY)

    bdrv_append(fl, base)
    assert top.backing.bs is fl and fl.backing.bs is base
    assert [c.opaque for c in base.parents] == [fl]

    bdrv_unref(fl)
    bdrv_unref(top)


# --------------------------------------------------------------------------
# Permission conflicts (qblock additions)


def _null_node(name: str):
    return bdrv_open(None, None, {"driver": "null-co", "node-name": name}, BDRV_O_RDWR | BDRV_O_PROTOCOL)


def test_perm_conflict_message_names_both_users():
    """A refused BlockBackend names both users in QEMU's words, and the node keeps only its first user."""
    bs = _null_node("null")
    blk1 = blk_new(None, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, BLK_PERM_ALL & ~BLK_PERM_WRITE)
    monitor_add_blk(blk1, "disk1")
    blk2 = blk_new(None, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, BLK_PERM_ALL)
    monitor_add_blk(blk2, "disk2")
    blk_insert_bs(blk1, bs)
    before = (edges(bs), bs.refcnt)

    with pytest.raises(Error) as exc:
        blk_insert_bs(blk2, bs)
    assert str(exc.value) == (
        "Permission conflict on node 'null': permissions 'write' are both required by block device 'disk2' "
        "(uses node 'null' as 'root' child) and unshared by block device 'disk1' (uses node 'null' as 'root' child).")
    assert blk_bs(blk2) is None
    assert (edges(bs), bs.refcnt) == before

    blk_unref(blk2)
    blk_unref(blk1)
    bdrv_unref(bs)


def test_perm_conflict_node_parent():
    """A node parent that is refused is described as "node '<name>'" and its child edge is not created."""
    bs = _null_node("null")
    blk = blk_new(None, BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL & ~BLK_PERM_WRITE)
    blk_insert_bs(blk, bs)
    writer = exclusive_writer_node("writer")
    bdrv_ref(bs)
    refcnt = bs.refcnt

    with pytest.raises(Error) as exc:
        bdrv_attach_child(writer, bs, "backing", child_of_bds, BDRV_CHILD_FILTERED | BDRV_CHILD_PRIMARY)
    assert str(exc.value) == (
        "Permission conflict on node 'null': permissions 'write' are both required by node 'writer' "
        "(uses node 'null' as 'backing' child) and unshared by an unnamed block device "
        "(uses node 'null' as 'root' child).")
    assert writer.children == [] and writer.backing is None
    assert bs.refcnt == refcnt - 1  # the reference passed in is dropped, as QEMU does
    assert [c.name for c in bs.parents] == ["root"]

    bdrv_unref(writer)
    blk_unref(blk)
    bdrv_unref(bs)


def test_perm_conflict_all_or_nothing():
    """A conflict found deep below a change undoes every permission already updated on the way down."""
    # blk -> fl1 (pass-through) -> base  and  blk2 (read, shares everything but write) -> base
    base = no_perm_node("base")
    fl1 = pass_through_node("fl1")
    bdrv_attach_child(fl1, base, "backing", child_of_bds, BDRV_CHILD_FILTERED | BDRV_CHILD_PRIMARY)
    blk = blk_new(None, BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
    blk_insert_bs(blk, fl1)
    blk2 = blk_new(None, BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL & ~BLK_PERM_WRITE)
    blk_insert_bs(blk2, base)
    snapshot = (edges(fl1), edges(base))

    # Asking for write on the filter passes write down to base, where blk2 refuses it.
    with pytest.raises(Error, match="^Permission conflict on node 'base'"):
        blk_set_perm(blk, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, BLK_PERM_ALL)
    assert (edges(fl1), edges(base)) == snapshot

    blk_unref(blk2)
    blk_unref(blk)
    bdrv_unref(fl1)


def test_write_perm_on_read_only_node():
    """A writer on a read-only node is refused with "Block node is read-only"."""
    bs = bdrv_open(None, None, {"driver": "null-co"}, BDRV_O_PROTOCOL)
    assert bs.read_only
    for perm in (BLK_PERM_WRITE, BLK_PERM_WRITE_UNCHANGED):
        blk = blk_new(None, BLK_PERM_CONSISTENT_READ | perm, BLK_PERM_ALL)
        with pytest.raises(Error, match="^Block node is read-only$"):
            blk_insert_bs(blk, bs)
        blk_unref(blk)
    assert bs.parents == [] and bs.refcnt == 1
    bdrv_unref(bs)


# --------------------------------------------------------------------------
# References, backing links, filters (qblock additions)


def test_bdrv_unref_closes_on_last_reference():
    """bdrv_unref closes and deletes a node only when its last reference goes, and drops its children then."""
    CloseCountingDriver.closed.clear()
    top = bdrv_new_open_driver(bdrv_close_counting, "top", BDRV_O_RDWR)
    backing = bdrv_new_open_driver(bdrv_close_counting, "backing", 0)
    bdrv_set_backing_hd(top, backing)  # takes its own reference
    assert backing.refcnt == 2
    bdrv_unref(backing)

    bdrv_ref(top)
    bdrv_unref(top)
    assert CloseCountingDriver.closed == [] and bdrv_find_node("top") is top

    bdrv_unref(top)
    assert CloseCountingDriver.closed == ["top", "backing"]
    assert bdrv_find_node("top") is None and bdrv_find_node("backing") is None
    assert top.drv is None and top.children == [] and backing.parents == []
    with pytest.raises(RuntimeError):
        bdrv_unref(top)


def test_set_backing_hd_refuses_loops():
    """A backing link to a node below (through backing or file edges), or to itself, is refused with QEMU's message."""
    top = no_perm_node("top")
    mid = no_perm_node("mid")
    low = no_perm_node("low")
    bdrv_set_backing_hd(top, mid)
    bdrv_unref(mid)
    bdrv_attach_child(mid, low, "file", child_of_bds, child_file)
    before = [(n.refcnt, list(n.parents), list(n.children)) for n in (top, mid, low)]

    with pytest.raises(Error, match=r"^Making 'top' a backing child of 'mid' would create a cycle$"):
        bdrv_set_backing_hd(mid, top)
    with pytest.raises(Error, match=r"^Making 'top' a backing child of 'low' would create a cycle$"):
        bdrv_set_backing_hd(low, top)
    with pytest.raises(Error, match=r"^Making 'top' a backing child of 'top' would create a cycle$"):
        bdrv_set_backing_hd(top, top)
    with pytest.raises(Error, match=r"^Making 'top' a file child of 'low' would create a cycle$"):
        bdrv_ref(top)
        bdrv_attach_child(low, top, "file", child_of_bds, child_file)
    assert [(n.refcnt, list(n.parents), list(n.children)) for n in (top, mid, low)] == before

    bdrv_set_backing_hd(top, None)
    assert top.backing is None and top.children == []
    assert bdrv_find_node("mid") is None and bdrv_find_node("low") is None  # their last reference went
    bdrv_unref(top)


def test_set_backing_hd_needs_backing_support():
    """Only drivers that support backing files (or filters) take a backing node."""
    proto = _null_node("proto")
    other = no_perm_node("other")
    with pytest.raises(Error, match=r"^Driver 'null-co' of node 'proto' does not support backing files$"):
        bdrv_set_backing_hd(proto, other)
    assert proto.backing is None and other.refcnt == 1
    bdrv_unref(other)
    bdrv_unref(proto)


def test_set_backing_hd_conflict_keeps_old_backing():
    """A new backing node that the permissions refuse leaves the old backing link in place."""
    top = bdrv_new_open_driver(bdrv_pass_through, "top", BDRV_O_RDWR)
    old = no_perm_node("old")
    new = no_perm_node("new")
    bdrv_set_backing_hd(top, old)
    bdrv_unref(old)
    blk = blk_new(None, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, BLK_PERM_ALL)
    blk_insert_bs(blk, top)  # top passes write down to its filtered child
    blk_new_ = blk_new(None, BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL & ~BLK_PERM_WRITE)
    blk_insert_bs(blk_new_, new)  # ... which "new" does not allow
    before = (edges(old), edges(new), old.refcnt, new.refcnt, list(top.children))

    with pytest.raises(Error, match="^Permission conflict on node 'new'"):
        bdrv_set_backing_hd(top, new)
    assert top.backing.bs is old
    assert (edges(old), edges(new), old.refcnt, new.refcnt, list(top.children)) == before

    blk_unref(blk_new_)
    bdrv_unref(new)
    blk_unref(blk)
    bdrv_unref(top)


def test_filter_bs_and_skip_filters():
    """bdrv_filter_bs follows a filter's backing or file child; bdrv_skip_filters walks down to the first non-filter."""
    base = no_perm_node("base")
    f_backing = pass_through_node("f-backing")
    f_file = bdrv_new_open_driver(bdrv_file_filter, "f-file", BDRV_O_RDWR)
    blk = blk_new(None, 0, BLK_PERM_ALL)
    blk_insert_bs(blk, base)

    bdrv_append(f_backing, base)   # filtered_child_is_backing: base becomes its backing
    bdrv_append(f_file, f_backing)  # a file filter: f_backing becomes its file
    assert blk_bs(blk) is f_file
    assert bdrv_filter_bs(f_file) is f_backing and f_file.file.bs is f_backing
    assert bdrv_filter_bs(f_backing) is base and f_backing.backing.bs is base
    assert bdrv_filter_bs(base) is None
    assert bdrv_skip_filters(f_file) is base
    assert bdrv_skip_filters(base) is base
    assert bdrv_skip_filters(None) is None

    bdrv_unref(f_file)
    bdrv_unref(f_backing)
    bdrv_unref(base)
    blk_unref(blk)


# --------------------------------------------------------------------------
# Limits (qblock additions)

limits_opts = QemuOptsList("limits-proto", [
    QemuOptDesc("align", QEMU_OPT_SIZE), QemuOptDesc("opt-transfer", QEMU_OPT_SIZE),
    QemuOptDesc("max-transfer", QEMU_OPT_SIZE), QemuOptDesc("max-iov", QEMU_OPT_SIZE),
])


@attrs.define
class LimitsState:
    opts: dict = attrs.field(factory=dict)


class LimitsProtoDriver(BlockDriver):
    """A byte-based protocol whose limits come from its options."""

    format_name = "limits-proto"
    protocol_name = "limits-proto"
    state_class = LimitsState

    def bdrv_file_open(self, bs, options, flags):
        bs.opaque.opts = dict(qemu_opts_absorb_qdict(limits_opts, options).values)
        return 0

    def bdrv_co_preadv(self, bs, offset, bytes, qiov, flags):
        return 0

    def bdrv_refresh_limits(self, bs):
        o = bs.opaque.opts
        if "align" in o:
            bs.bl.request_alignment = o["align"]
        bs.bl.opt_transfer = o.get("opt-transfer", 0)
        bs.bl.max_transfer = o.get("max-transfer", 0)
        if "max-iov" in o:
            bs.bl.max_iov = o["max-iov"]


class ByteFormatDriver(BlockDriver):
    format_name = "limits-byte-format"
    supports_backing = True

    def bdrv_co_preadv(self, bs, offset, bytes, qiov, flags):
        return 0


class SectorFormatDriver(BlockDriver):
    format_name = "limits-sector-format"
    supports_backing = True

    def bdrv_co_readv(self, bs, sector_num, nb_sectors, qiov):
        return 0


bdrv_limits_proto = bdrv_register(LimitsProtoDriver)
bdrv_byte_format = bdrv_register(ByteFormatDriver)
bdrv_sector_format = bdrv_register(SectorFormatDriver)


def _proto(name: str, **opts):
    d = {"driver": "limits-proto", "node-name": name}
    d.update({k.replace("_", "-"): v for k, v in opts.items()})
    return bdrv_open(None, None, d, BDRV_O_RDWR | BDRV_O_PROTOCOL)


@pytest.mark.parametrize("drv,alignment", [("limits-byte-format", 1), ("limits-sector-format", BDRV_SECTOR_SIZE)])
def test_refresh_limits_merges_children(drv, alignment):
    """A node merges max_transfer (MIN_NON_ZERO) and opt_transfer (MAX) of file and backing, not their alignment."""
    top = bdrv_new_open_driver(bdrv_find_format(drv), "top", BDRV_O_RDWR)
    assert top.bl.request_alignment == alignment  # no children: the driver's interface decides
    assert top.bl.max_iov == graph.IOV_MAX and top.bl.min_mem_alignment == 512

    file = _proto("file", align=4096, opt_transfer=4096, max_transfer=65536, max_iov=16)
    backing = _proto("backing", opt_transfer=8192, max_transfer=0)
    bdrv_attach_child(top, file, "file", child_of_bds, child_file)
    bdrv_set_backing_hd(top, backing)
    bdrv_unref(backing)
    bdrv_refresh_limits(top)
    assert (top.bl.max_transfer, top.bl.opt_transfer, top.bl.max_iov) == (65536, 8192, 16)
    assert top.bl.request_alignment == alignment  # request_alignment is never inherited
    assert file.bl.request_alignment == 4096

    backing.opaque.opts["max-transfer"] = 32768
    bdrv_refresh_limits(top)  # refreshes the children first
    assert (backing.bl.max_transfer, top.bl.max_transfer) == (32768, 32768)

    bdrv_unref(top)


# --------------------------------------------------------------------------
# Node names (qblock additions; messages checked against qemu-io 7.2)


@pytest.mark.parametrize("name", ["a", "node.a-b_c9", "Z" + "x" * 30])
def test_node_name_valid(name):
    """A letter followed by letters, digits, '-', '.' or '_', shorter than 32 characters, is a valid node name."""
    bs = no_perm_node(name)
    assert bs.node_name == name and bdrv_find_node(name) is bs
    bdrv_unref(bs)
    assert bdrv_find_node(name) is None


@pytest.mark.parametrize("name", ["1abc", "", "a b", "a,b", "-a", "abc\n", "ä"])
def test_node_name_invalid(name):
    """An ill-formed node name is refused with "Invalid node-name: '<name>'" and leaves no node behind."""
    before = list(graph.all_bdrv_states)
    with pytest.raises(Error) as exc:
        no_perm_node(name)
    assert str(exc.value) == f"Invalid node-name: '{name}'"
    assert graph.all_bdrv_states == before


def test_node_name_too_long():
    """A 32-character node name is "Node name too long"."""
    with pytest.raises(Error, match="^Node name too long$"):
        no_perm_node("a" * 32)


def test_node_name_duplicate():
    """A second node with the same name is refused; the first keeps it."""
    bs = no_perm_node("dup")
    with pytest.raises(Error, match="^Duplicate nodes with node-name='dup'$"):
        no_perm_node("dup")
    assert bdrv_find_node("dup") is bs
    bdrv_unref(bs)


def test_node_name_conflicts_with_device():
    """A node may not take the name of a BlockBackend."""
    blk = blk_new(None, 0, BLK_PERM_ALL)
    monitor_add_blk(blk, "disk0")
    with pytest.raises(Error, match="^node-name=disk0 is conflicting with a device id$"):
        no_perm_node("disk0")
    blk_unref(blk)


def test_node_name_automatic():
    """Nodes opened without a name get unique "#block<counter><2 digits>" names that users cannot choose."""
    nodes = [no_perm_node(None) for _ in range(3)]
    names = [n.node_name for n in nodes]
    assert all(re.fullmatch(r"#block[1-9][0-9]*[0-9]{2}", n) for n in names), names
    assert len(set(names)) == 3
    assert all(bdrv_find_node(n.node_name) is n for n in nodes)
    with pytest.raises(Error, match="^Invalid node-name: '#block"):
        no_perm_node(names[0])
    for n in nodes:
        bdrv_unref(n)


# --------------------------------------------------------------------------
# bdrv_replace_node (qblock additions)


def test_replace_node_drops_filter():
    """Replacing a filter by its own child moves the filter's parents down and releases the filter's permissions."""
    base = no_perm_node("base")
    fl = pass_through_node("fl")
    bdrv_attach_child(fl, base, "backing", child_of_bds, BDRV_CHILD_FILTERED | BDRV_CHILD_PRIMARY)
    blk = blk_new(None, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, BLK_PERM_ALL)
    blk_insert_bs(blk, fl)
    bdrv_unref(fl)
    assert fl.backing.perm == BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE  # passed through

    bdrv_ref(fl)  # the BlockBackend's reference moves to base with its edge
    bdrv_replace_node(fl, base)
    assert blk_bs(blk) is base
    assert fl.parents == [] and fl.refcnt == 1 and base.refcnt == 2
    assert fl.backing.bs is base and fl.backing.perm == 0  # no parent left: it asks for nothing
    assert graph.bdrv_get_cumulative_perm(base)[0] == BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE

    bdrv_unref(fl)
    blk_unref(blk)


def test_replace_node_frozen_link():
    """A frozen parent edge cannot be moved; nothing moves then."""
    a = no_perm_node("a")
    b = no_perm_node("b")
    blk = blk_new(None, 0, BLK_PERM_ALL)
    blk_insert_bs(blk, a)
    blk.root.frozen = True
    with pytest.raises(Error, match="^Cannot change 'root' link to 'a'$"):
        bdrv_replace_node(a, b)
    assert blk_bs(blk) is a and (a.refcnt, b.refcnt) == (2, 1)
    blk.root.frozen = False
    blk_unref(blk)
    bdrv_unref(a)
    bdrv_unref(b)
