"""The write threshold: QEMU's tests/unit/test-write-threshold.c (the 4.2 and the modern tests) and an end-to-end run.

QEMU's tests use a zeroed BlockDriverState and a hand-made tracked request; so do these.
The modern QEMU tests call bdrv_write_threshold_check_write(), which later QEMU runs from
bdrv_co_write_req_prepare; qblock keeps the seed's before-write notifier, so those tests
send the request through the node's before-write notifier list instead.
"""
from __future__ import annotations

import pytest

from qblock.block import graph
from qblock.block.block_backend import blk_bs, blk_new_open, blk_pdiscard, blk_pwrite, blk_unref, block_backends
from qblock.block.driver import BDRV_O_RDWR, BDRV_O_UNMAP, BdrvTrackedRequestType
from qblock.block.graph import BdrvTrackedRequest, BlockDriverState
from qblock.block.write_threshold import (
    bdrv_write_threshold_exceeded,
    bdrv_write_threshold_get,
    bdrv_write_threshold_is_set,
    bdrv_write_threshold_set,
)
from qblock.testing.memdrv import memdrv_options
from qblock.util.notify import notifier_with_return_list_notify
from qblock.util.qapi_event import qapi_event_add_listener, qapi_event_remove_listener

MiB = 1024 * 1024
THRESHOLD = 4 * MiB


def _req(bs: BlockDriverState, offset: int, bytes: int) -> BdrvTrackedRequest:
    return BdrvTrackedRequest(bs, offset, bytes, BdrvTrackedRequestType.BDRV_TRACKED_WRITE, None)


@pytest.fixture
def events():
    """Every QMP event sent during the test, as (name, data)."""
    seen = []

    def listener(name, data, timestamp):
        seen.append((name, dict(data)))

    qapi_event_add_listener(listener)
    yield seen
    qapi_event_remove_listener(listener)


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


# --------------------------------------------------------------------------
# QEMU 4.2's tests


def test_threshold_not_set_on_init():
    """A new node has no threshold: is_set is false and get is 0."""
    bs = BlockDriverState()
    assert not bdrv_write_threshold_is_set(bs)
    assert bdrv_write_threshold_get(bs) == 0


def test_threshold_set_get():
    """A threshold set is reported back."""
    bs = BlockDriverState()
    bdrv_write_threshold_set(bs, THRESHOLD)
    assert bdrv_write_threshold_is_set(bs)
    assert bdrv_write_threshold_get(bs) == THRESHOLD


def test_threshold_multi_set_get():
    """Setting a threshold again moves it (and registers one notifier only)."""
    bs = BlockDriverState()
    bdrv_write_threshold_set(bs, THRESHOLD)
    bdrv_write_threshold_set(bs, 15 * MiB)
    assert bdrv_write_threshold_is_set(bs)
    assert bdrv_write_threshold_get(bs) == 15728640
    assert len(bs.before_write_notifiers.notifiers) == 1


def test_threshold_not_trigger():
    """A request wholly below the threshold exceeds it by 0."""
    bs = BlockDriverState()
    bdrv_write_threshold_set(bs, THRESHOLD)
    assert bdrv_write_threshold_exceeded(bs, _req(bs, 1024, 1024)) == 0


def test_threshold_trigger():
    """A request crossing the threshold exceeds it by the bytes past it (1024)."""
    bs = BlockDriverState()
    bdrv_write_threshold_set(bs, THRESHOLD)
    assert bdrv_write_threshold_exceeded(bs, _req(bs, THRESHOLD - 1024, 2048)) == 1024


def test_threshold_trigger_beyond():
    """A request that starts past the threshold exceeds it by its distance plus its length."""
    bs = BlockDriverState()
    bdrv_write_threshold_set(bs, THRESHOLD)
    assert bdrv_write_threshold_exceeded(bs, _req(bs, THRESHOLD + 512, 1024)) == 512 + 1024
    assert bdrv_write_threshold_exceeded(bs, _req(bs, THRESHOLD - 1024, 1024)) == 0  # ends exactly at it


def test_threshold_disable():
    """Setting 0 disarms the threshold and removes its notifier; 0 on an unarmed node does nothing."""
    bs = BlockDriverState()
    bdrv_write_threshold_set(bs, 0)
    assert not bdrv_write_threshold_is_set(bs) and bs.before_write_notifiers.notifiers == []
    bdrv_write_threshold_set(bs, THRESHOLD)
    bdrv_write_threshold_set(bs, 0)
    assert not bdrv_write_threshold_is_set(bs) and bdrv_write_threshold_get(bs) == 0
    assert bs.before_write_notifiers.notifiers == []
    assert bdrv_write_threshold_exceeded(bs, _req(bs, THRESHOLD, 1024)) == 0


# --------------------------------------------------------------------------
# The modern tests (/write-threshold/not-trigger, /write-threshold/trigger)


def test_not_trigger(events):
    """A write below the threshold leaves it armed at 4 MiB and sends nothing."""
    bs = BlockDriverState(node_name="node")
    bdrv_write_threshold_set(bs, THRESHOLD)
    assert notifier_with_return_list_notify(bs.before_write_notifiers, _req(bs, 1024, 1024)) == 0
    assert bdrv_write_threshold_get(bs) == THRESHOLD
    assert events == []


def test_trigger(events):
    """A write across the threshold disarms it (get is 0) and reports 1024 bytes past 4 MiB."""
    bs = BlockDriverState(node_name="node")
    bdrv_write_threshold_set(bs, THRESHOLD)
    assert notifier_with_return_list_notify(bs.before_write_notifiers, _req(bs, THRESHOLD - 1024, 2048)) == 0
    assert bdrv_write_threshold_get(bs) == 0
    assert not bdrv_write_threshold_is_set(bs)
    assert bs.before_write_notifiers.notifiers == []
    assert events == [("BLOCK_WRITE_THRESHOLD",
                       {"node-name": "node", "amount-exceeded": 1024, "write-threshold": THRESHOLD})]


# --------------------------------------------------------------------------
# End to end (qblock addition)


def test_write_through_blk_emits_one_event(events):
    """A real write past the threshold sends one BLOCK_WRITE_THRESHOLD and disarms it; later writes send none."""
    blk = blk_new_open(None, None, memdrv_options(size=8 * MiB, node_name="disk"), BDRV_O_RDWR)
    bs = blk_bs(blk)
    bdrv_write_threshold_set(bs, THRESHOLD)

    assert blk_pwrite(blk, 0, bytearray(4096)) == 4096
    assert blk_pwrite(blk, THRESHOLD - 4096, bytearray(4096)) == 4096  # ends exactly at the threshold
    assert events == [] and bdrv_write_threshold_get(bs) == THRESHOLD

    assert blk_pwrite(blk, THRESHOLD - 512, b"x" * 1536) == 1536
    assert events == [("BLOCK_WRITE_THRESHOLD",
                       {"node-name": "disk", "amount-exceeded": 1024, "write-threshold": THRESHOLD})]
    assert not bdrv_write_threshold_is_set(bs)
    assert bytes(bs.opaque.data[THRESHOLD - 512:THRESHOLD + 1024]) == b"x" * 1536  # the write still happened

    assert blk_pwrite(blk, 6 * MiB, bytearray(4096)) == 4096
    assert len(events) == 1
    blk_unref(blk)


def test_write_threshold_on_protocol_node(events):
    """A threshold on the protocol node under a raw format sees the format's writes at their offsets there."""
    blk = blk_new_open(None, None, {"driver": "raw", "node-name": "fmt", "offset": 1 * MiB,
                                    "file": memdrv_options(size=8 * MiB, node_name="proto")}, BDRV_O_RDWR)
    proto = blk_bs(blk).file.bs
    bdrv_write_threshold_set(proto, 2 * MiB)
    assert blk_pwrite(blk, 1 * MiB - 4096, bytearray(8192)) == 8192  # lands at 2 MiB - 4 KiB .. 2 MiB + 4 KiB
    assert events == [("BLOCK_WRITE_THRESHOLD",
                       {"node-name": "proto", "amount-exceeded": 4096, "write-threshold": 2 * MiB})]
    blk_unref(blk)


def test_discard_past_threshold(events):
    """A discard past the threshold counts as a write (the request's range reaches past it)."""
    blk = blk_new_open(None, None, memdrv_options(discard=True, size=8 * MiB, node_name="disk"),
                       BDRV_O_RDWR | BDRV_O_UNMAP)
    bs = blk_bs(blk)
    bdrv_write_threshold_set(bs, THRESHOLD)
    assert blk_pdiscard(blk, THRESHOLD, 65536) == 0
    assert events == [("BLOCK_WRITE_THRESHOLD",
                       {"node-name": "disk", "amount-exceeded": 65536, "write-threshold": THRESHOLD})]
    blk_unref(blk)
