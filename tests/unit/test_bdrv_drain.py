"""Draining nodes: the behaviours of QEMU's tests/unit/test-bdrv-drain.c (QEMU 7.2+ semantics).

A drained section on a node quiesces the node and, through its parent edges, every
parent up to the BlockBackends, never its children.  The driver's drain hooks run only
on a node's 0->1 and 1->0 quiesce transitions.  The test driver below (``bdrv_test``)
counts those transitions in ``drain_count`` and makes every read sleep 100 us on the
virtual clock, so a drain has something to wait for.

Not ported: the block-job tests (``/bdrv-drain/blockjob/*``,
``/bdrv_drop_intermediate/poll``), since qblock has no block jobs yet.
"""
from __future__ import annotations

import errno
import threading

import attrs
import pytest

from qblock.block import graph
from qblock.block.block_backend import (
    BlockBackend,
    blk_aio_preadv,
    blk_all_next,
    blk_bs,
    blk_co_preadv,
    blk_insert_bs,
    blk_new,
    blk_set_aio_context,
    blk_set_disable_request_queuing,
    blk_unref,
    block_backends,
)
from qblock.block.driver import BDRV_O_PROTOCOL, BDRV_O_RDWR, BDRV_SECTOR_BITS, BlockDriver, bdrv_register
from qblock.block.graph import (
    BDRV_CHILD_COW,
    BDRV_CHILD_DATA,
    BDRV_CHILD_PRIMARY,
    BLK_PERM_ALL,
    BLK_PERM_CONSISTENT_READ,
    ChildOfBds,
    BdrvChildClass,
    bdrv_append,
    bdrv_attach_child,
    bdrv_default_perms,
    bdrv_drain,
    bdrv_drain_all_begin,
    bdrv_drain_all_end,
    bdrv_drained_begin,
    bdrv_drained_end,
    bdrv_get_aio_context,
    bdrv_new_open_driver,
    bdrv_open,
    bdrv_ref,
    bdrv_replace_node,
    bdrv_set_backing_hd,
    bdrv_try_set_aio_context,
    bdrv_unref,
    bdrv_unref_child,
    child_of_bds,
)
from qblock.block.io import bdrv_co_preadv, bdrv_dec_in_flight, bdrv_flush, bdrv_inc_in_flight
from qblock.util.aio import (
    AIO_WAIT_WHILE,
    aio_bh_schedule_oneshot,
    aio_co_enter,
    aio_co_wake,
    aio_context_acquire,
    aio_context_release,
    aio_poll,
    aio_wait_kick,
    iothread_create,
    iothread_destroy,
    iothread_get_aio_context,
    qemu_get_aio_context,
    qemu_get_current_aio_context,
)
from qblock.util.coroutine import qemu_coroutine_create, qemu_coroutine_enter, qemu_coroutine_self, \
    qemu_coroutine_yield
from qblock.util.coroutine_lock import qemu_co_sleep_ns
from qblock.util.iov import QEMUIOVector
from qblock.util.timer import QEMU_CLOCK_VIRTUAL

# --------------------------------------------------------------------------
# The test driver (QEMU's bdrv_test)


@attrs.define
class BDRVTestState:
    drain_count: int = 0
    bh_indirection_ctx: object = None
    sleep_in_drain_begin: bool = False
    # qblock additions: how many reads went through bh_indirection_ctx, and an event that holds
    # that BH until the node's drain begins (so a read is certainly in flight when a drain polls).
    bh_indirections: int = 0
    release_on_drain: threading.Event | None = None
    read_started: threading.Event | None = None


def _sleep_in_drain_begin(bs) -> None:
    qemu_co_sleep_ns(QEMU_CLOCK_VIRTUAL, 100_000)
    bdrv_dec_in_flight(bs)


def _co_reenter_bh(arg) -> None:
    s, co = arg
    if s.release_on_drain is not None:
        assert s.release_on_drain.wait(10)
    s.bh_indirections += 1
    aio_co_wake(co)


class BdrvTestDriver(BlockDriver):
    """Counts drain transitions; reads sleep 100 us and may bounce through a BH in another context."""

    format_name = "test"
    state_class = BDRVTestState
    supports_backing = True

    def bdrv_drain_begin(self, bs) -> None:
        s: BDRVTestState = bs.opaque
        s.drain_count += 1
        if s.release_on_drain is not None:
            s.release_on_drain.set()
        if s.sleep_in_drain_begin:
            co = qemu_coroutine_create(_sleep_in_drain_begin, bs)
            bdrv_inc_in_flight(bs)
            aio_co_enter(bdrv_get_aio_context(bs), co)

    def bdrv_drain_end(self, bs) -> None:
        bs.opaque.drain_count -= 1

    def bdrv_close(self, bs) -> None:
        # Nodes are closed inside a drained section.
        assert bs.opaque.drain_count > 0

    def bdrv_co_preadv(self, bs, offset, bytes, qiov, flags) -> int:
        s: BDRVTestState = bs.opaque
        if s.read_started is not None:
            s.read_started.set()
        # Long enough that a drain has to poll for it.
        qemu_co_sleep_ns(QEMU_CLOCK_VIRTUAL, 100_000)
        if s.bh_indirection_ctx is not None:
            aio_bh_schedule_oneshot(s.bh_indirection_ctx, _co_reenter_bh, (s, qemu_coroutine_self()))
            qemu_coroutine_yield()
        return 0

    def bdrv_child_perm(self, bs, c, role, reopen_queue, perm, shared):
        return bdrv_default_perms(bs, c, role, reopen_queue, perm, shared)


bdrv_test = bdrv_register(BdrvTestDriver)

BDRV_DRAIN_ALL = "drain_all"
BDRV_DRAIN = "drain"
DRAIN_TYPES = (BDRV_DRAIN_ALL, BDRV_DRAIN)


@pytest.fixture(autouse=True)
def _no_leaks():
    """Every test deletes the nodes and BlockBackends it creates and leaves nothing drained."""
    nodes = list(graph.all_bdrv_states)
    blks = list(block_backends)
    yield
    leaked = ([n for n in graph.all_bdrv_states if n not in nodes], [b for b in block_backends if b not in blks],
              graph.bdrv_drain_all_count)
    # Forget whatever a failed test left behind, so that one failure does not cascade.
    graph.all_bdrv_states[:] = nodes
    graph.graph_bdrv_states[:] = [n for n in graph.graph_bdrv_states if n in nodes]
    block_backends[:] = blks
    graph.bdrv_drain_all_count = 0
    assert leaked == ([], [], 0)


def do_drain_begin(drain_type: str, bs) -> None:
    if drain_type == BDRV_DRAIN_ALL:
        bdrv_drain_all_begin()
    else:
        bdrv_drained_begin(bs)


def do_drain_end(drain_type: str, bs) -> None:
    if drain_type == BDRV_DRAIN_ALL:
        bdrv_drain_all_end()
    else:
        bdrv_drained_end(bs)


def call_in_coroutine(fn) -> None:
    """Run ``fn()`` in a new coroutine and poll the main loop until it returned."""
    done = []

    def entry(_):
        fn()
        done.append(True)

    qemu_coroutine_enter(qemu_coroutine_create(entry))
    while not done:
        aio_poll(qemu_get_aio_context(), True)


def co_in_main_loop(fn, *args) -> None:
    """From a coroutine, run ``fn(*args)`` in a main-loop BH and wait for it (QEMU's co_wrapper_bh)."""
    co = qemu_coroutine_self()
    done = []

    def bh(_):
        fn(*args)
        done.append(True)
        aio_co_wake(co)

    aio_bh_schedule_oneshot(qemu_get_aio_context(), bh)
    qemu_coroutine_yield()
    assert done


def drain_test_setup() -> BlockBackend:
    """QEMU's test_setup(): a BlockBackend on read-write "test-node" with backing node "backing"; the BB holds both."""
    blk = blk_new(qemu_get_aio_context(), BLK_PERM_ALL, BLK_PERM_ALL)
    bs = bdrv_new_open_driver(bdrv_test, "test-node", BDRV_O_RDWR)
    blk_insert_bs(blk, bs)
    backing = bdrv_new_open_driver(bdrv_test, "backing", 0)
    bdrv_set_backing_hd(bs, backing)
    bdrv_unref(backing)
    bdrv_unref(bs)
    return blk



def _aio_ret_cb(box: list, ret: int) -> None:
    box[0] = ret


# --------------------------------------------------------------------------
# /bdrv-drain/driver-cb/*


def drv_cb_common(blk: BlockBackend, drain_type: str, recursive: bool) -> None:
    bs = blk_bs(blk)
    backing = bs.backing.bs
    s, backing_s = bs.opaque, backing.opaque

    assert (s.drain_count, backing_s.drain_count) == (0, 0)
    do_drain_begin(drain_type, bs)
    assert (s.drain_count, backing_s.drain_count) == (1, int(recursive))
    do_drain_end(drain_type, bs)
    assert (s.drain_count, backing_s.drain_count) == (0, 0)

    # The same with a request in flight: the drain waits for it and for its callback.
    aio_ret = [-errno.EINPROGRESS]
    acb = blk_aio_preadv(blk, 0, QEMUIOVector([], -1), 0, _aio_ret_cb, aio_ret)
    assert acb is not None
    assert aio_ret[0] == -errno.EINPROGRESS
    assert (s.drain_count, backing_s.drain_count) == (0, 0)

    do_drain_begin(drain_type, bs)
    assert aio_ret[0] == 0
    assert (s.drain_count, backing_s.drain_count) == (1, int(recursive))
    do_drain_end(drain_type, bs)
    assert (s.drain_count, backing_s.drain_count) == (0, 0)


def test_drv_cb_drain_all():
    """drain_all calls the drain hooks of every node once, and waits for a pending request and its callback."""
    blk = drain_test_setup()
    drv_cb_common(blk, BDRV_DRAIN_ALL, True)
    blk_unref(blk)


def test_drv_cb_drain():
    """Draining a node calls its own drain hooks only, not those of its backing child."""
    blk = drain_test_setup()
    drv_cb_common(blk, BDRV_DRAIN, False)
    blk_unref(blk)


def test_drv_cb_co_drain_all():
    """drain_all from inside a coroutine behaves as from the main loop."""
    blk = drain_test_setup()
    call_in_coroutine(lambda: drv_cb_common(blk_all_next(None), BDRV_DRAIN_ALL, True))
    blk_unref(blk)


def test_drv_cb_co_drain():
    """A drained section begun inside a coroutine behaves as one begun from the main loop."""
    blk = drain_test_setup()
    call_in_coroutine(lambda: drv_cb_common(blk_all_next(None), BDRV_DRAIN, False))
    blk_unref(blk)


# --------------------------------------------------------------------------
# /bdrv-drain/quiesce/*


def quiesce_common(blk: BlockBackend, drain_type: str, recursive: bool) -> None:
    bs = blk_bs(blk)
    backing = bs.backing.bs
    assert (bs.quiesce_counter, backing.quiesce_counter) == (0, 0)
    do_drain_begin(drain_type, bs)
    # drain_all: the node's own count plus the one its drained backing child propagates up.
    assert bs.quiesce_counter == (2 if drain_type == BDRV_DRAIN_ALL else 1)
    assert backing.quiesce_counter == int(recursive)
    do_drain_end(drain_type, bs)
    assert (bs.quiesce_counter, backing.quiesce_counter) == (0, 0)


def test_quiesce_drain_all():
    """drain_all quiesces the node twice (itself and through its backing child) and the backing once."""
    blk = drain_test_setup()
    quiesce_common(blk, BDRV_DRAIN_ALL, True)
    blk_unref(blk)


def test_quiesce_drain():
    """Draining a node quiesces it once and leaves its backing child alone."""
    blk = drain_test_setup()
    quiesce_common(blk, BDRV_DRAIN, False)
    blk_unref(blk)


def test_quiesce_co_drain_all():
    """drain_all from a coroutine counts quiesces as from the main loop."""
    blk = drain_test_setup()
    call_in_coroutine(lambda: quiesce_common(blk_all_next(None), BDRV_DRAIN_ALL, True))
    blk_unref(blk)


def test_quiesce_co_drain():
    """A drain from a coroutine counts quiesces as from the main loop."""
    blk = drain_test_setup()
    call_in_coroutine(lambda: quiesce_common(blk_all_next(None), BDRV_DRAIN, False))
    blk_unref(blk)


# --------------------------------------------------------------------------
# /bdrv-drain/nested

#  outer      inner      bs.quiesce  backing.quiesce  s.drain_count  backing_s.drain_count
#  drain_all  drain_all  3           2                1              1
#  drain_all  drain      3           1                1              1
#  drain      drain_all  3           1                1              1
#  drain      drain      2           0                1              0
NESTED_TABLE = [
    (BDRV_DRAIN_ALL, BDRV_DRAIN_ALL, 3, 2, 1, 1),
    (BDRV_DRAIN_ALL, BDRV_DRAIN, 3, 1, 1, 1),
    (BDRV_DRAIN, BDRV_DRAIN_ALL, 3, 1, 1, 1),
    (BDRV_DRAIN, BDRV_DRAIN, 2, 0, 1, 0),
]


def test_nested():
    """Nested drained sections add up quiesce counts but call each driver hook only once, in every combination."""
    blk = blk_new(qemu_get_aio_context(), BLK_PERM_ALL, BLK_PERM_ALL)
    bs = bdrv_new_open_driver(bdrv_test, "test-node", BDRV_O_RDWR)
    s = bs.opaque
    blk_insert_bs(blk, bs)
    backing = bdrv_new_open_driver(bdrv_test, "backing", 0)
    backing_s = backing.opaque
    bdrv_set_backing_hd(bs, backing)

    for outer, inner, bs_q, backing_q, s_count, backing_count in NESTED_TABLE:
        assert (bs.quiesce_counter, backing.quiesce_counter, s.drain_count, backing_s.drain_count) == (0, 0, 0, 0)
        do_drain_begin(outer, bs)
        do_drain_begin(inner, bs)
        assert (bs.quiesce_counter, backing.quiesce_counter, s.drain_count, backing_s.drain_count) == \
            (bs_q, backing_q, s_count, backing_count), (outer, inner)
        do_drain_end(inner, bs)
        do_drain_end(outer, bs)
        assert (bs.quiesce_counter, backing.quiesce_counter, s.drain_count, backing_s.drain_count) == (0, 0, 0, 0)

    bdrv_unref(backing)
    bdrv_unref(bs)
    blk_unref(blk)


# --------------------------------------------------------------------------
# /bdrv-drain/graph-change/drain_all


def test_graph_change_drain_all():
    """A node created during drain_all starts quiesced, and deleting another node meanwhile is safe."""
    blk_a = blk_new(qemu_get_aio_context(), BLK_PERM_ALL, BLK_PERM_ALL)
    bs_a = bdrv_new_open_driver(bdrv_test, "test-node-a", BDRV_O_RDWR)
    a_s = bs_a.opaque
    blk_insert_bs(blk_a, bs_a)
    assert (bs_a.quiesce_counter, a_s.drain_count) == (0, 0)

    bdrv_drain_all_begin()
    assert (bs_a.quiesce_counter, a_s.drain_count) == (1, 1)

    blk_b = blk_new(qemu_get_aio_context(), BLK_PERM_ALL, BLK_PERM_ALL)
    bs_b = bdrv_new_open_driver(bdrv_test, "test-node-b", BDRV_O_RDWR)
    b_s = bs_b.opaque
    blk_insert_bs(blk_b, bs_b)
    assert (bs_a.quiesce_counter, bs_b.quiesce_counter) == (1, 1)
    assert (a_s.drain_count, b_s.drain_count) == (1, 1)
    assert blk_b.quiesce_counter == 1  # its new root edge points at a drained node

    blk_unref(blk_a)
    assert (bs_a.quiesce_counter, bs_b.quiesce_counter) == (1, 1)
    assert (a_s.drain_count, b_s.drain_count) == (1, 1)

    bdrv_unref(bs_a)  # deleted (its close hook checks that it is drained)
    assert (bs_b.quiesce_counter, b_s.drain_count) == (1, 1)
    assert bs_a not in graph.all_bdrv_states

    bdrv_drain_all_end()
    assert (bs_b.quiesce_counter, b_s.drain_count) == (0, 0)
    assert blk_b.quiesce_counter == 0

    bdrv_unref(bs_b)
    blk_unref(blk_b)


# --------------------------------------------------------------------------
# /bdrv-drain/iothread/*


def iothread_common(drain_type: str, drain_thread: int) -> None:
    """A read on a node of IOThread a completes only through a BH in IOThread b; drain waits for it.

    ``drain_thread`` 0 drains from the main thread, 1 from a coroutine running in IOThread a.
    """
    a = iothread_create("drain-a")
    b = iothread_create("drain-b")
    try:
        ctx_a, ctx_b = iothread_get_aio_context(a), iothread_get_aio_context(b)
        if drain_type == BDRV_DRAIN_ALL and drain_thread != 0:
            return  # bdrv_drain_all may only be called from the main thread

        blk = blk_new(qemu_get_aio_context(), BLK_PERM_ALL, BLK_PERM_ALL)
        bs = bdrv_new_open_driver(bdrv_test, "test-node", BDRV_O_RDWR)
        s = bs.opaque
        blk_insert_bs(blk, bs)
        blk_set_disable_request_queuing(blk, True)
        blk_set_aio_context(blk, ctx_a)
        assert bdrv_get_aio_context(bs) is ctx_a

        s.bh_indirection_ctx = ctx_b
        aio_ret = [-errno.EINPROGRESS]
        done_event = threading.Event()

        def iothread_aio_cb(box, ret):
            box[0] = ret
            done_event.set()

        aio_context_acquire(ctx_a)  # the request must not complete before blk_aio_preadv returns
        try:
            cb = iothread_aio_cb if drain_thread == 0 else _aio_ret_cb
            acb = blk_aio_preadv(blk, 0, QEMUIOVector([], -1), 0, cb, aio_ret)
            assert acb is not None
            assert aio_ret[0] == -errno.EINPROGRESS
        finally:
            aio_context_release(ctx_a)

        if drain_thread == 0:
            flushed = []

            def main_thread_bh(_):
                # Runs in IOThread a while the main thread drains: its context is not locked by the drain.
                bdrv_flush(bs)
                flushed.append(True)
                bdrv_dec_in_flight(bs)  # taken below, so the drain waits for this BH

            bdrv_inc_in_flight(bs)
            aio_bh_schedule_oneshot(ctx_a, main_thread_bh)
            do_drain_begin(drain_type, bs)
            assert bs.in_flight == 0
            assert flushed == [True]
            assert done_event.wait(10)
            assert aio_ret[0] == 0
            do_drain_end(drain_type, bs)
        else:
            co_done = []

            def drain_co_entry(_):
                assert qemu_get_current_aio_context() is ctx_a
                do_drain_begin(drain_type, bs)
                assert aio_ret[0] == 0
                do_drain_end(drain_type, bs)
                co_done.append(True)
                aio_wait_kick()

            aio_co_enter(ctx_a, qemu_coroutine_create(drain_co_entry))
            AIO_WAIT_WHILE(None, lambda: not co_done)

        assert bs.quiesce_counter == 0 and s.drain_count == 0
        assert s.bh_indirections == 1
        blk_set_aio_context(blk, qemu_get_aio_context())
        assert bdrv_get_aio_context(bs) is qemu_get_aio_context()
        bdrv_unref(bs)
        blk_unref(blk)
    finally:
        iothread_destroy(a)
        iothread_destroy(b)


def test_iothread_drain_all():
    """drain_all from the main thread waits for a request that runs in an IOThread and needs a second one."""
    iothread_common(BDRV_DRAIN_ALL, 0)
    iothread_common(BDRV_DRAIN_ALL, 1)


def test_iothread_drain():
    """Draining an IOThread's node, from the main thread or from a coroutine in that IOThread, waits for its request."""
    iothread_common(BDRV_DRAIN, 0)
    iothread_common(BDRV_DRAIN, 1)


@pytest.mark.parametrize("drain_type", DRAIN_TYPES)
def test_iothread_drain_waits_for_request(drain_type):
    """(qblock) A drain from the main thread waits for a read still running in an IOThread when the drain begins."""
    a = iothread_create("wait-a")
    b = iothread_create("wait-b")
    try:
        blk = blk_new(qemu_get_aio_context(), BLK_PERM_ALL, BLK_PERM_ALL)
        bs = bdrv_new_open_driver(bdrv_test, "test-node", BDRV_O_RDWR)
        s = bs.opaque
        blk_insert_bs(blk, bs)
        blk_set_aio_context(blk, iothread_get_aio_context(a))
        s.bh_indirection_ctx = iothread_get_aio_context(b)
        s.release_on_drain = threading.Event()  # IOThread b holds the read until the drain begins
        s.read_started = threading.Event()
        events = []

        def cb(_, ret):
            events.append(("read done", ret))

        acb = blk_aio_preadv(blk, 0, QEMUIOVector([], -1), 0, cb, None)
        assert acb is not None
        assert s.read_started.wait(10)  # the read is in the driver (not queued by the BlockBackend)
        assert events == []
        do_drain_begin(drain_type, bs)
        assert s.release_on_drain.is_set()
        assert events == [("read done", 0)]
        assert bs.in_flight == 0 and blk.in_flight == 0
        do_drain_end(drain_type, bs)

        s.release_on_drain = s.read_started = None
        blk_set_aio_context(blk, qemu_get_aio_context())
        bdrv_unref(bs)
        blk_unref(blk)
    finally:
        iothread_destroy(a)
        iothread_destroy(b)


# --------------------------------------------------------------------------
# /bdrv-drain/deletion/drain, /bdrv-drain/detach/*


@attrs.define
class BDRVTestTopState:
    wait_child: object = None


class BdrvTestTopDriver(BlockDriver):
    """Reads go to the "wait-child"; closing drops every child."""

    format_name = "test_top_driver"
    state_class = BDRVTestTopState

    def bdrv_close(self, bs) -> None:
        for c in list(bs.children):
            bdrv_unref_child(bs, c)

    def bdrv_co_preadv(self, bs, offset, bytes, qiov, flags) -> int:
        return bdrv_co_preadv(bs.opaque.wait_child, offset, bytes, qiov, flags)

    def bdrv_child_perm(self, bs, c, role, reopen_queue, perm, shared):
        return bdrv_default_perms(bs, c, role, reopen_queue, perm, shared)


bdrv_test_top_driver = bdrv_register(BdrvTestTopDriver)


def do_test_delete_by_drain(detach_instead_of_delete: bool, drain_type: str) -> None:
    """A drain of a child lets a pending read finish, whose coroutine deletes (or detaches) the parent mid-drain."""
    bs = bdrv_new_open_driver(bdrv_test_top_driver, "top", BDRV_O_RDWR)
    bs.total_sectors = 65536 >> BDRV_SECTOR_BITS
    tts = bs.opaque

    null_bs = bdrv_open("null-co://", None, None, BDRV_O_RDWR | BDRV_O_PROTOCOL)
    bdrv_attach_child(bs, null_bs, "null-child", child_of_bds, BDRV_CHILD_DATA)

    child_bs = bdrv_new_open_driver(bdrv_test, "child", BDRV_O_RDWR)
    child_bs.total_sectors = 65536 >> BDRV_SECTOR_BITS
    tts.wait_child = bdrv_attach_child(bs, child_bs, "wait-child", child_of_bds,
                                       BDRV_CHILD_DATA | BDRV_CHILD_PRIMARY)

    null_bs = bdrv_open("null-co://", None, None, BDRV_O_RDWR | BDRV_O_PROTOCOL)
    bdrv_attach_child(bs, null_bs, "null-child", child_of_bds, BDRV_CHILD_DATA)

    blk = blk_new(qemu_get_aio_context(), BLK_PERM_ALL, BLK_PERM_ALL)
    blk_insert_bs(blk, bs)
    bdrv_unref(bs)
    assert (bs.refcnt, child_bs.refcnt, null_bs.refcnt) == (1, 1, 1)

    done = []

    def co_delete_by_drain(_):
        buf = bytearray(65536)
        # A request from the parent to the child: the drain of the child is under way when it returns.
        bdrv_co_preadv(tts.wait_child, 0, 65536, QEMUIOVector([memoryview(buf)], -1), 0)
        assert bs.refcnt == 1
        if not detach_instead_of_delete:
            co_in_main_loop(blk_unref, blk)  # blk_co_unref
        else:
            for c in list(bs.children):
                co_in_main_loop(bdrv_unref_child, bs, c)  # bdrv_co_unref_child
        done.append(True)

    qemu_coroutine_enter(qemu_coroutine_create(co_delete_by_drain))
    assert not done

    if drain_type == BDRV_DRAIN:
        bdrv_ref(child_bs)
        bdrv_drain(child_bs)
        bdrv_unref(child_bs)
    else:
        bdrv_drain_all_begin()
        bdrv_drain_all_end()

    while not done:
        aio_poll(qemu_get_aio_context(), True)

    if detach_instead_of_delete:
        assert bs.children == [] and bs.refcnt == 1
        blk_unref(blk)
    assert bs not in graph.all_bdrv_states
    assert child_bs not in graph.all_bdrv_states


def test_delete_by_drain():
    """Deleting a node from a request completed by draining its child does not break the drain."""
    do_test_delete_by_drain(False, BDRV_DRAIN)


def test_detach_by_drain_all():
    """Detaching every child from a request completed by drain_all does not break the drain."""
    do_test_delete_by_drain(True, BDRV_DRAIN_ALL)


def test_detach_by_drain():
    """Detaching every child from a request completed by draining one of them does not break the drain."""
    do_test_delete_by_drain(True, BDRV_DRAIN)


@attrs.define
class DetachByParentData:
    parent_b: object = None
    child_b: object = None
    c: object = None
    child_c: object = None
    by_parent_cb: bool = False
    detach_on_drain: bool = False


detach_by_parent_data = DetachByParentData()


def _detach_indirect_bh(data: DetachByParentData) -> None:
    bdrv_dec_in_flight(data.child_b.bs)
    bdrv_unref_child(data.parent_b, data.child_b)
    bdrv_ref(data.c)
    data.child_c = bdrv_attach_child(data.parent_b, data.c, "PB-C", child_of_bds, BDRV_CHILD_DATA)


def _detach_by_parent_aio_cb(opaque, ret: int) -> None:
    data = detach_by_parent_data
    assert ret == 0
    if data.by_parent_cb:
        bdrv_inc_in_flight(data.child_b.bs)
        aio_bh_schedule_oneshot(qemu_get_current_aio_context(), _detach_indirect_bh, data)


class DetachByDriverCbClass(ChildOfBds):
    """child_of_bds whose drained_begin schedules the graph change; no drained_end or drained_poll."""

    def drained_begin(self, c) -> None:
        data = detach_by_parent_data
        if not data.detach_on_drain:
            return
        data.detach_on_drain = False
        bdrv_inc_in_flight(data.child_b.bs)
        aio_bh_schedule_oneshot(qemu_get_current_aio_context(), _detach_indirect_bh, data)
        child_of_bds.drained_begin(c)

    drained_end = BdrvChildClass.drained_end
    drained_poll = BdrvChildClass.drained_poll


detach_by_driver_cb_class = DetachByDriverCbClass()


def detach_indirect(by_parent_cb: bool) -> None:
    """PA->A and PB->{A, B}; a BH run while draining swaps PB's child B for C.

    by_parent_cb: the BH comes from the completion callback of a read on PA's BlockBackend;
    otherwise from PA-A's drained_begin, while PA's drain hook leaves a coroutine sleeping.
    """
    global detach_by_parent_data
    detach_by_parent_data = DetachByParentData()

    parent_a = bdrv_new_open_driver(bdrv_test, "parent-a", BDRV_O_RDWR)
    parent_b = bdrv_new_open_driver(bdrv_test, "parent-b", 0)
    a = bdrv_new_open_driver(bdrv_test, "a", BDRV_O_RDWR)
    b = bdrv_new_open_driver(bdrv_test, "b", BDRV_O_RDWR)
    c = bdrv_new_open_driver(bdrv_test, "c", BDRV_O_RDWR)

    blk = blk_new(qemu_get_aio_context(), BLK_PERM_ALL, BLK_PERM_ALL)
    blk_insert_bs(blk, parent_a)
    bdrv_unref(parent_a)
    if not by_parent_cb:
        parent_a.opaque.sleep_in_drain_begin = True

    bdrv_ref(b)
    bdrv_ref(a)
    child_b = bdrv_attach_child(parent_b, b, "PB-B", child_of_bds, BDRV_CHILD_DATA)
    child_a = bdrv_attach_child(parent_b, a, "PB-A", child_of_bds, BDRV_CHILD_COW)
    bdrv_ref(a)
    bdrv_attach_child(parent_a, a, "PA-A", child_of_bds if by_parent_cb else detach_by_driver_cb_class,
                      BDRV_CHILD_DATA)

    assert [n.refcnt for n in (parent_a, parent_b, a, b, c)] == [1, 1, 3, 2, 1]
    assert parent_b.children == [child_a, child_b]

    detach_by_parent_data = DetachByParentData(parent_b=parent_b, child_b=child_b, c=c,
                                               by_parent_cb=by_parent_cb, detach_on_drain=True)
    acb = blk_aio_preadv(blk, 0, QEMUIOVector([], -1), 0, _detach_by_parent_aio_cb, None)
    assert acb is not None

    bdrv_drained_begin(parent_b)
    bdrv_drained_begin(a)
    bdrv_drained_begin(b)
    bdrv_drained_begin(c)

    child_c = detach_by_parent_data.child_c
    assert child_c is not None
    assert [n.refcnt for n in (parent_a, parent_b, a, b, c)] == [1, 1, 3, 1, 2]
    assert parent_b.children == [child_c, child_a]
    assert [n.quiesce_counter for n in (parent_a, parent_b, a, b, c)] == [1, 3, 1, 1, 1]

    bdrv_drained_end(parent_b)
    bdrv_drained_end(a)
    bdrv_drained_end(b)
    bdrv_drained_end(c)

    bdrv_unref(parent_b)
    blk_unref(blk)
    assert (a.refcnt, b.refcnt, c.refcnt) == (1, 1, 1)
    bdrv_unref(a)
    bdrv_unref(b)
    bdrv_unref(c)


def test_detach_by_parent_cb():
    """A graph change made by a request's completion callback while draining leaves consistent counts."""
    detach_indirect(True)


def test_detach_by_driver_cb():
    """A graph change scheduled from a parent's drained_begin runs only in the final poll of the drain."""
    detach_indirect(False)


# --------------------------------------------------------------------------
# /bdrv-drain/attach/drain, /bdrv-drain/set_aio_context


def test_append_to_drained():
    """bdrv_append over a drained node makes the new overlay drained too (its parent edge is quiesced)."""
    blk = blk_new(qemu_get_aio_context(), BLK_PERM_ALL, BLK_PERM_ALL)
    base = bdrv_new_open_driver(bdrv_test, "base", BDRV_O_RDWR)
    base_s = base.opaque
    blk_insert_bs(blk, base)
    overlay = bdrv_new_open_driver(bdrv_test, "overlay", BDRV_O_RDWR)
    overlay_s = overlay.opaque

    do_drain_begin(BDRV_DRAIN, base)
    assert (base.quiesce_counter, base_s.drain_count, base.in_flight) == (1, 1, 0)

    bdrv_append(overlay, base)
    assert (base.in_flight, overlay.in_flight) == (0, 0)
    assert (base.quiesce_counter, base_s.drain_count) == (1, 1)
    assert (overlay.quiesce_counter, overlay_s.drain_count) == (1, 1)
    assert blk_bs(blk) is overlay and overlay.backing.bs is base

    do_drain_end(BDRV_DRAIN, base)
    assert (base.quiesce_counter, base_s.drain_count) == (0, 0)
    assert (overlay.quiesce_counter, overlay_s.drain_count) == (0, 0)

    bdrv_unref(overlay)
    bdrv_unref(base)
    blk_unref(blk)


def test_set_aio_context():
    """A drained node can move from the main loop to one IOThread, to another and back."""
    a = iothread_create("set-ctx-a")
    b = iothread_create("set-ctx-b")
    try:
        ctx_a, ctx_b = iothread_get_aio_context(a), iothread_get_aio_context(b)
        bs = bdrv_new_open_driver(bdrv_test, "test-node", BDRV_O_RDWR)

        bdrv_drained_begin(bs)
        bdrv_try_set_aio_context(bs, ctx_a)
        assert bdrv_get_aio_context(bs) is ctx_a
        bdrv_drained_end(bs)

        bdrv_drained_begin(bs)
        bdrv_try_set_aio_context(bs, ctx_b)
        assert bdrv_get_aio_context(bs) is ctx_b
        bdrv_try_set_aio_context(bs, qemu_get_aio_context())
        assert bdrv_get_aio_context(bs) is qemu_get_aio_context()
        bdrv_drained_end(bs)
        assert bs.quiesce_counter == 0 and bs.opaque.drain_count == 0

        bdrv_unref(bs)
    finally:
        iothread_destroy(a)
        iothread_destroy(b)


# --------------------------------------------------------------------------
# /bdrv-drain/replace_child/mid-drain


@attrs.define
class BDRVReplaceTestState:
    setup_completed: bool = False
    was_drained: bool = False
    was_undrained: bool = False
    has_read: bool = False
    drain_count: int = 0
    yield_before_read: bool = False
    io_co: object = None
    drain_co: object = None


def _replace_test_drain_co(bs) -> None:
    s: BDRVReplaceTestState = bs.opaque
    while s.io_co is not None:  # keep waking the reader until it is done
        aio_co_wake(s.io_co)
        s.io_co = None
        qemu_coroutine_yield()
    s.drain_co = None
    bdrv_dec_in_flight(bs)


def _replace_test_read_entry(bs) -> None:
    buf = bytearray(1)
    ret = bdrv_replace_test.bdrv_co_preadv(bs, 0, 1, QEMUIOVector([memoryview(buf)], -1), 0)
    assert ret >= 0
    bdrv_dec_in_flight(bs)


class BdrvReplaceTestDriver(BlockDriver):
    """A parent forwards reads to its backing child, optionally yielding first until drain_begin wakes it.

    The drain hooks record that the node was drained/undrained; on the last drain_end a parent
    starts a new read, as a guest would once requests flow again.
    """

    format_name = "replace_test"
    state_class = BDRVReplaceTestState
    supports_backing = True

    def bdrv_close(self, bs) -> None:
        pass

    def bdrv_co_preadv(self, bs, offset, bytes, qiov, flags) -> int:
        s: BDRVReplaceTestState = bs.opaque
        if bs.backing is not None:
            assert s.drain_count == 0
            s.io_co = qemu_coroutine_self()
            if s.yield_before_read:
                s.yield_before_read = False
                qemu_coroutine_yield()
            s.io_co = None
            ret = bdrv_co_preadv(bs.backing, offset, bytes, qiov, 0)
            s.has_read = True
            if s.drain_co is not None:
                aio_co_wake(s.drain_co)
            return ret
        s.has_read = True
        return 0

    def bdrv_drain_begin(self, bs) -> None:
        s: BDRVReplaceTestState = bs.opaque
        if not s.setup_completed:
            return
        if not s.drain_count:
            s.drain_co = qemu_coroutine_create(_replace_test_drain_co, bs)
            bdrv_inc_in_flight(bs)
            aio_co_enter(bdrv_get_aio_context(bs), s.drain_co)
            s.was_drained = True
        s.drain_count += 1

    def bdrv_drain_end(self, bs) -> None:
        s: BDRVReplaceTestState = bs.opaque
        if not s.setup_completed:
            return
        assert s.drain_count > 0
        s.drain_count -= 1
        if not s.drain_count:
            s.was_undrained = True
            if bs.backing is not None:
                co = qemu_coroutine_create(_replace_test_read_entry, bs)
                bdrv_inc_in_flight(bs)
                aio_co_enter(bdrv_get_aio_context(bs), co)

    def bdrv_child_perm(self, bs, c, role, reopen_queue, perm, shared):
        return bdrv_default_perms(bs, c, role, reopen_queue, perm, shared)


bdrv_replace_test = bdrv_register(BdrvReplaceTestDriver)

#  old  new  was_drained  was_undrained  parent has_read (before undraining the children)
#  0    0    true         true           true
#  0    1    true         false          true
#  1    0    false        true           true
#  1    1    false        false          false
MID_DRAIN_TABLE = [
    (0, 0, True, True, True),
    (0, 1, True, False, True),
    (1, 0, False, True, True),
    (1, 1, False, False, False),
]


@pytest.mark.parametrize("old_drain_count,new_drain_count,was_drained,was_undrained,has_read", MID_DRAIN_TABLE)
def test_replace_child_mid_drain(old_drain_count, new_drain_count, was_drained, was_undrained, has_read):
    """bdrv_replace_node between drained/undrained children keeps the parent drained exactly as the new child is."""
    parent_bs = bdrv_new_open_driver(bdrv_replace_test, "parent", 0)
    parent_s = parent_bs.opaque
    parent_blk = blk_new(qemu_get_aio_context(), BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
    blk_insert_bs(parent_blk, parent_bs)

    old_child_bs = bdrv_new_open_driver(bdrv_replace_test, "old-child", 0)
    new_child_bs = bdrv_new_open_driver(bdrv_replace_test, "new-child", 0)
    old_child_s, new_child_s = old_child_bs.opaque, new_child_bs.opaque
    for n in (parent_bs, old_child_bs, new_child_bs):
        n.total_sectors = 1  # so that there is something to read

    bdrv_ref(old_child_bs)
    bdrv_attach_child(parent_bs, old_child_bs, "child", child_of_bds, BDRV_CHILD_COW)
    parent_s.setup_completed = True

    for _ in range(old_drain_count):
        bdrv_drained_begin(old_child_bs)
    for _ in range(new_drain_count):
        bdrv_drained_begin(new_child_bs)

    if not old_drain_count:
        # A read that yields before reaching the child, so that it is still pending when the drain starts.
        parent_s.yield_before_read = True

        def read_co(_):
            buf = bytearray(1)
            assert blk_co_preadv(parent_blk, 0, 1, QEMUIOVector([memoryview(buf)], -1)) >= 0

        qemu_coroutine_enter(qemu_coroutine_create(read_co))
    assert not parent_s.has_read

    parent_s.was_drained = False
    parent_s.was_undrained = False

    assert parent_bs.quiesce_counter == old_drain_count
    bdrv_drained_begin(old_child_bs)
    bdrv_drained_begin(new_child_bs)
    bdrv_replace_node(old_child_bs, new_child_bs)
    bdrv_drained_end(new_child_bs)
    bdrv_drained_end(old_child_bs)
    assert parent_bs.quiesce_counter == new_drain_count
    assert parent_bs.backing.bs is new_child_bs

    assert (parent_s.was_drained, parent_s.was_undrained, parent_s.has_read) == (was_drained, was_undrained, has_read)
    # A drained child never received a request.
    assert not (old_drain_count and old_child_s.has_read)
    assert not (new_drain_count and new_child_s.has_read)

    for _ in range(new_drain_count):
        bdrv_drained_end(new_child_bs)
    for _ in range(old_drain_count):
        bdrv_drained_end(old_child_bs)

    # The last drain_end on the parent happened with the new child attached, and read from it.
    assert parent_s.has_read
    assert new_child_s.has_read

    blk_unref(parent_blk)
    bdrv_unref(parent_bs)
    bdrv_unref(old_child_bs)
    bdrv_unref(new_child_bs)
