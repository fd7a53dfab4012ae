"""The NBD server (nbd/server.c, blockdev-nbd.c) and block exports (block/export/export.c), spoken to byte by byte.

The server runs in the test process; a raw client (qblock.testing.nbd_client)
turns the main loop while it waits.  The protocol table in nbd_harness.py
holds QEMU 7.2's answers (test_nbd_interop.py checks them against the real
qemu-nbd); here qblock's server must give the same ones.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import struct

import pytest

from qblock.block.block_backend import blk_get_perm
from qblock.block.driver import (
    BDRV_REQ_FUA,
    BDRV_REQ_MAY_UNMAP,
)
from qblock.block.export import (
    blk_exp_add,
    blk_exp_close_all,
    blk_exp_find,
    qmp_block_export_del,
    qmp_query_block_exports,
)
from qblock.block.graph import BLK_PERM_ALL, BLK_PERM_CONSISTENT_READ, BLK_PERM_RESIZE, BLK_PERM_WRITE, bdrv_open, \
    bdrv_unref
from qblock.nbd import blockdev_nbd
from qblock.nbd.blockdev_nbd import (
    nbd_server_addr,
    nbd_server_start,
    nbd_server_stop,
    qmp_nbd_server_start,
)
from qblock.nbd.nbd import (
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EINVAL,
    NBD_EIO,
    NBD_ENOSPC,
    NBD_ENOTSUP,
    NBD_EPERM,
    NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_READ_ONLY,
    NBD_OPT_EXPORT_NAME,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
    nbd_cmd_lookup,
    nbd_err_lookup,
    nbd_opt_lookup,
    system_errno_to_nbd_errno,
)
from qblock.nbd.server import MAX_NBD_REQUESTS, NBD_MAX_BLOCK_STATUS_EXTENTS, exports
from qblock.testing.memdrv import memdrv_options
from qblock.testing.nbd_client import ConnectionClosed, NBDTestClient
from qblock.trace.control import trace_add_sink, trace_enable_events, trace_remove_sink
from qblock.util.aio import qemu_get_aio_context
from qblock.util.error import Error
from qblock.util.qapi_event import qapi_event_add_listener, qapi_event_remove_listener
from tests.unit.nbd_harness import EXPECTED, RO_SCENARIOS, SCENARIOS, SIZE, QblockNBDServer, run_scenario

MiB = 1 << 20


@pytest.fixture
def make_server(tmp_path):
    """Build QblockNBDServer(tmp_path, ...) and always tear it down."""
    made = []

    def make(**kw):
        s = QblockNBDServer(tmp_path, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def server(make_server):
    return make_server()


# --------------------------------------------------------------------------
# The protocol table (QEMU 7.2's answers)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_protocol_scenario(server, name):
    """Each handshake and request scenario gets QEMU 7.2's answer, and leaves the connection as QEMU does."""
    c = server.connect()
    assert run_scenario(c, SCENARIOS[name]) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(RO_SCENARIOS))
def test_protocol_scenario_read_only(make_server, name):
    """A read-only export refuses writes, zeroes and trims with EINVAL "Export is read-only" and stays connected."""
    s = make_server(writable=False)
    assert run_scenario(s.connect(), RO_SCENARIOS[name]) == EXPECTED[name]


# --------------------------------------------------------------------------
# Transmission


def test_write_read_back(server):
    """Written bytes read back identically, with simple replies, structured replies and DF."""
    c = server.connect()
    c.connect_export("disk", structured=False)
    data = os.urandom(3 * 4096 + 100)
    assert c.write(5000, data).error == 0
    assert c.read(5000, len(data)).data == data
    s = server.connect()
    s.connect_export("disk")
    assert s.read(5000, len(data)).data == data
    assert s.read(5000, len(data), NBD_CMD_FLAG_DF).data == data
    with open(server.image, "rb") as f:
        f.seek(5000)
        assert f.read(len(data)) == data


def test_fua_write_reaches_driver_as_bdrv_req_fua(make_server):
    """NBD_CMD_FLAG_FUA on a write becomes BDRV_REQ_FUA at the driver."""
    s = make_server(node=memdrv_options("co", fua=True, size=SIZE))
    c = s.connect()
    c.connect_export("disk")
    assert c.write(0, b"a" * 512, NBD_CMD_FLAG_FUA).error == 0
    assert c.write(512, b"b" * 512).error == 0
    calls = [call for call in s.bs.opaque.calls if call[0] == "write"]
    assert calls == [("write", 0, 512, BDRV_REQ_FUA), ("write", 512, 512, 0)]


def test_write_zeroes_flags(make_server):
    """WRITE_ZEROES may unmap (on a discard=unmap node) unless NO_HOLE; FAST_ZERO that cannot be fast is ENOTSUP."""
    s = make_server(node={**memdrv_options("co", write_zeroes=True, size=SIZE), "discard": "unmap"})
    c = s.connect()
    c.connect_export("disk")
    assert c.command(NBD_CMD_WRITE_ZEROES, 0, 4096).error == 0
    assert c.command(NBD_CMD_WRITE_ZEROES, 4096, 4096, NBD_CMD_FLAG_NO_HOLE).error == 0
    r = c.command(NBD_CMD_WRITE_ZEROES, 8192, 4096, NBD_CMD_FLAG_FAST_ZERO)
    assert (r.error, r.message) == (NBD_ENOTSUP, "writing to file failed")
    zeroes = [call for call in s.bs.opaque.calls if call[0] == "write_zeroes"]
    assert zeroes == [("write_zeroes", 0, 4096, BDRV_REQ_MAY_UNMAP), ("write_zeroes", 4096, 4096, 0)]


def test_trim_punches_a_hole(make_server, tmp_path):
    """TRIM on raw over a file opened with discard=unmap punches a hole: zeroes, and a hole in block status."""
    image = tmp_path / "trim.raw"
    image.write_bytes(b"")
    os.truncate(image, SIZE)
    server = make_server(node={"driver": "raw", "discard": "unmap", "file.driver": "file",
                               "file.filename": str(image)})
    c = server.connect()
    c.connect_export("disk", contexts=["base:allocation"])
    assert c.write(0, b"\xaa" * 65536).error == 0
    assert c.command(NBD_CMD_TRIM, 0, 65536).error == 0
    assert c.read(0, 65536).data == bytes(65536)
    r = c.command(NBD_CMD_BLOCK_STATUS, 0, 65536)
    assert r.extents[0][0] == (65536, NBD_STATE_HOLE | NBD_STATE_ZERO)


def test_block_status_base_allocation(make_server):
    """base:allocation: data extents carry no flag, unwritten ones HOLE|ZERO; REQ_ONE returns one extent."""
    s = make_server(node=memdrv_options("co", block_status=True, size=SIZE))
    c = s.connect()
    c.handshake()
    c.opt_structured_reply()
    contexts, _ = c.opt_set_meta_context("disk", ["base:allocation"])
    assert contexts == {0: "base:allocation"}
    c.opt_go("disk")
    assert c.write(8192, b"x" * 4096).error == 0
    r = c.command(NBD_CMD_BLOCK_STATUS, 0, 65536)
    assert r.extents == {0: [(8192, NBD_STATE_HOLE | NBD_STATE_ZERO), (4096, 0),
                             (65536 - 12288, NBD_STATE_HOLE | NBD_STATE_ZERO)]}
    r = c.command(NBD_CMD_BLOCK_STATUS, 0, 65536, NBD_CMD_FLAG_REQ_ONE)
    assert r.extents == {0: [(8192, NBD_STATE_HOLE | NBD_STATE_ZERO)]}


def test_block_status_extent_limit():
    """One reply chunk holds at most NBD_MAX_BLOCK_STATUS_EXTENTS extents (1 MiB of them)."""
    assert NBD_MAX_BLOCK_STATUS_EXTENTS == 131072


def test_allocation_depth_context(make_server):
    """With allocation-depth on, qemu:allocation-depth is offered (id 1) and reports depth 1 for a raw image."""
    s = make_server(export={"allocation-depth": True})
    c = s.connect()
    c.handshake()
    contexts, _ = c.opt_list_meta_context("disk", [])
    assert sorted(contexts.values()) == ["base:allocation", "qemu:allocation-depth"]
    c.opt_structured_reply()
    contexts, _ = c.opt_set_meta_context("disk", ["qemu:allocation-depth", "base:allocation"])
    assert contexts == {0: "base:allocation", 1: "qemu:allocation-depth"}
    c.opt_go("disk")
    r = c.command(NBD_CMD_BLOCK_STATUS, 0, MiB)
    assert r.extents == {0: [(MiB, NBD_STATE_HOLE | NBD_STATE_ZERO)], 1: [(MiB, 1)]}


def test_sparse_read_sends_holes(server):
    """A structured read without DF sends OFFSET_HOLE for unwritten ranges and OFFSET_DATA for the rest."""
    c = server.connect()
    c.connect_export("disk")
    assert c.write(4 * 4096, b"d" * 4096).error == 0
    r = c.read(0, 8 * 4096)
    assert r.data == bytes(4 * 4096) + b"d" * 4096 + bytes(3 * 4096)
    assert [t for t, _, _ in r.chunks] == [NBD_REPLY_TYPE_OFFSET_HOLE, NBD_REPLY_TYPE_OFFSET_DATA,
                                          NBD_REPLY_TYPE_OFFSET_HOLE]
    r = c.read(0, 8 * 4096, NBD_CMD_FLAG_DF)
    assert [t for t, _, _ in r.chunks] == [NBD_REPLY_TYPE_OFFSET_DATA]


def test_cache_and_flush(make_server):
    """CACHE prefetches without error; FLUSH after a write reaches the driver."""
    s = make_server(node=memdrv_options("co", size=SIZE))
    c = s.connect()
    c.connect_export("disk")
    assert c.command(NBD_CMD_CACHE, 0, 65536).error == 0
    assert c.write(0, b"f" * 512).error == 0
    assert c.command(NBD_CMD_FLUSH).error == 0
    assert s.bs.opaque.flushes == 1   # (a flush with nothing written since the last one is skipped)


@pytest.mark.parametrize("err, nbd_err", [(errno.EIO, NBD_EIO), (errno.ENOSPC, NBD_ENOSPC),
                                          (errno.EDQUOT, NBD_ENOSPC), (errno.EPERM, NBD_EPERM),
                                          (errno.ENOTSUP, NBD_ENOTSUP), (errno.ENOMEDIUM, NBD_EINVAL)])
def test_driver_errors_map_to_nbd_errors(make_server, err, nbd_err):
    """A failing driver's errno reaches the client as QEMU's system_errno_to_nbd_errno maps it."""
    s = make_server(node=memdrv_options("co", fail=err, size=SIZE))
    c = s.connect()
    c.connect_export("disk", structured=False)
    assert c.write(0, b"x" * 512).error == nbd_err
    assert c.read(0, 512).error == nbd_err
    s2 = s.connect()
    s2.connect_export("disk")
    r = s2.write(0, b"x" * 512)
    assert (r.error, r.message) == (nbd_err, "writing to file failed")


def test_sparse_read_failure_disconnects(make_server):
    """As in QEMU 7.2, a read error inside a structured (sparse) read ends the connection instead of replying."""
    s = make_server(node=memdrv_options("co", fail=errno.EIO, size=SIZE))
    c = s.connect()
    c.connect_export("disk")
    with pytest.raises(ConnectionClosed):
        c.read(0, 512)
    d = s.connect()
    d.connect_export("disk")
    assert d.read(0, 512, NBD_CMD_FLAG_DF).error == NBD_EIO


def test_system_errno_to_nbd_errno_table():
    """The errno mapping and the names traces print are QEMU's."""
    assert [system_errno_to_nbd_errno(e) for e in (0, errno.EROFS, errno.EFBIG, errno.EOVERFLOW,
                                                     errno.EOPNOTSUPP, errno.ESHUTDOWN, errno.ENOMEM,
                                                     errno.EBADF)] == [0, 1, 28, 75, 95, 108, 12, 22]
    assert nbd_err_lookup(NBD_ENOSPC) == "ENOSPC" and nbd_err_lookup(3) == "<unknown>"
    assert nbd_cmd_lookup(NBD_CMD_WRITE_ZEROES) == "write zeroes" and nbd_cmd_lookup(99) == "<unknown>"
    assert nbd_opt_lookup(10) == "set meta context"


def test_requests_overlap_and_complete_out_of_order(make_server):
    """A slow read does not hold back a later request of the same client: its reply comes first."""
    s = make_server(node=memdrv_options("co", latency_ns=5_000_000, size=SIZE))
    c = s.connect()
    c.connect_export("disk")
    slow = c.send_request(NBD_CMD_READ, 0, 4096)
    fast = c.send_request(NBD_CMD_READ, SIZE, 512)     # invalid: answered without touching the driver
    assert [c.receive_reply().handle, c.receive_reply().handle] == [fast, slow]


def test_at_most_max_nbd_requests_in_flight(make_server):
    """A client with 40 requests queued has at most MAX_NBD_REQUESTS (16) of them being served at once."""
    s = make_server(node=memdrv_options("co", latency_ns=1_000_000, size=SIZE))
    c = s.connect()
    c.connect_export("disk")
    handles = [c.send_request(NBD_CMD_READ, i * 4096, 4096) for i in range(40)]
    client = s.exp.clients[0]
    peak = 0
    replies = []
    while len(replies) < 40:
        peak = max(peak, client.nb_requests)
        if select.select([c.sock], [], [], 0)[0]:
            replies.append(c.receive_reply())
        else:
            s.pump()
    assert sorted(r.handle for r in replies) == handles
    assert all(r.error == 0 for r in replies)
    assert 1 < peak <= MAX_NBD_REQUESTS


def test_export_name_option_starts_transmission(server):
    """NBD_OPT_EXPORT_NAME (the old way) also starts transmission: I/O works afterwards."""
    c = server.connect()
    c.handshake()
    c.send_opt(NBD_OPT_EXPORT_NAME, b"disk")
    size, flags = struct.unpack(">QH", c.recv_exact(10))
    assert size == SIZE and flags & NBD_FLAG_CAN_MULTI_CONN
    assert c.write(0, b"z" * 100).error == 0
    assert c.read(0, 100).data == b"z" * 100


def test_export_size_of_a_partial_sector(make_server, tmp_path):
    """A 1000-byte image exports 1024 bytes (whole sectors, reading as zeroes past the end), as qemu-nbd 7.2 does."""
    image = tmp_path / "odd.raw"
    image.write_bytes(b"o" * 1000)
    s = make_server(node={"driver": "raw", "file.driver": "file", "file.filename": str(image)})
    c = s.connect()
    c.connect_export("disk")
    assert c.read(0, 1024).data == b"o" * 1000 + bytes(24)
    d = s.connect()
    d.handshake()
    assert d.opt_info("disk", ())["size"] == 1024


# --------------------------------------------------------------------------
# Misbehaving clients


def test_client_vanishing_mid_write_does_not_hurt_others(server):
    """A client that hangs up in the middle of a write payload is dropped; another client goes on."""
    good = server.connect()
    good.connect_export("disk")
    bad = server.connect()
    bad.connect_export("disk")
    bad.send(struct.pack(">IHHQQI", 0x25609513, 0, NBD_CMD_WRITE, 1, 0, 65536) + b"y" * 1000)
    bad.close()
    server.clients.remove(bad)
    assert good.write(0, b"g" * 4096).error == 0
    server.settle()
    assert len(server.exp.clients) == 1 and server.exp.refcount == 2
    assert good.read(0, 4096).data == b"g" * 4096


def test_garbage_after_handshake_closes_only_that_client(server):
    """Random bytes instead of a request get an EINVAL reply and a hang-up; the other client is untouched."""
    good = server.connect()
    good.connect_export("disk")
    bad = server.connect()
    bad.connect_export("disk", structured=False)
    bad.send(os.urandom(28))
    r = bad.receive_reply()
    assert r.error == NBD_EINVAL
    assert bad.wait_closed()
    assert good.write(4096, b"h" * 512).error == 0
    assert good.read(4096, 512).data == b"h" * 512


def test_client_that_never_reads_replies_does_not_block_others(server):
    """A client that sends reads but never reads the replies stalls only itself; it is freed once it leaves."""
    stuck = server.connect()
    stuck.connect_export("disk")
    for i in range(40):
        stuck.send_request(NBD_CMD_READ, 0, MiB, NBD_CMD_FLAG_DF)
    good = server.connect()
    good.connect_export("disk")
    for i in range(20):
        assert good.write(i * 4096, bytes([i]) * 4096).error == 0
        assert good.read(i * 4096, 4096).data == bytes([i]) * 4096
    stuck_client = server.exp.clients[0]
    assert stuck_client.send_coroutine is not None   # blocked writing a reply nobody reads
    stuck.close()
    server.clients.remove(stuck)
    server.settle(0.2)
    assert len(server.exp.clients) == 1 and server.exp.refcount == 2


def test_disconnect_with_requests_in_flight_waits_for_them(make_server):
    """Requests still running when the client hangs up finish first; then the client is freed."""
    s = make_server(node=memdrv_options("co", latency_ns=10_000_000, size=SIZE))
    c = s.connect()
    c.connect_export("disk")
    for i in range(8):
        c.send_request(NBD_CMD_WRITE, i * 4096, 4096, 0, b"w" * 4096)
    s.pump()
    c.close()
    s.clients.remove(c)
    s.settle(0.2)
    assert s.exp.clients == [] and s.exp.refcount == 1
    assert bytes(s.bs.opaque.data[:4096]) == b"w" * 4096


# --------------------------------------------------------------------------
# Exports: block-export-add / -del / query


def test_writethrough_export_writes_with_fua(make_server):
    """writethrough=on runs the export's BlockBackend with the write cache off: every write carries FUA."""
    s = make_server(node=memdrv_options("co", fua=True, size=SIZE), export={"writethrough": True})
    c = s.connect()
    c.connect_export("disk")
    assert c.write(0, b"t" * 512).error == 0
    assert [call for call in s.bs.opaque.calls if call[0] == "write"] == [("write", 0, 512, BDRV_REQ_FUA)]


def test_export_permissions(server):
    """The export's BlockBackend takes CONSISTENT_READ and WRITE and shares everything but RESIZE."""
    assert blk_get_perm(server.exp.blk) == (BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE,
                                            BLK_PERM_ALL & ~BLK_PERM_RESIZE)


def test_query_block_exports_and_del(server):
    """query-block-exports lists newest first; safe removal refuses while a client is connected, hard does not."""
    bs2 = bdrv_open(None, None, {"driver": "null-co", "node-name": "null0"}, 0)
    try:
        blk_exp_add({"type": "nbd", "id": "exp1", "node-name": "null0"})
        assert qmp_query_block_exports() == [
            {"id": "exp1", "type": "nbd", "node-name": "null0", "shutting-down": False},
            {"id": "exp0", "type": "nbd", "node-name": "fmt0", "shutting-down": False}]
        c = server.connect()
        c.connect_export("disk")
        with pytest.raises(Error) as e:
            qmp_block_export_del("exp0")
        assert str(e.value) == "export 'exp0' still in use"
        assert e.value.hint == "Use mode='hard' to force client disconnect\n"
        events = []
        listener = lambda name, data, ts: events.append((name, data))  # noqa: E731
        qapi_event_add_listener(listener)
        try:
            qmp_block_export_del("exp0", mode="hard")
            assert qmp_query_block_exports()[1]["shutting-down"] is True
            with pytest.raises(Error, match="^Export 'exp0' is already shutting down$"):
                qmp_block_export_del("exp0")
            assert c.wait_closed()
            server.settle()
            qmp_block_export_del("exp1")
            server.settle()
        finally:
            qapi_event_remove_listener(listener)
        assert events == [("BLOCK_EXPORT_DELETED", {"id": "exp0"}), ("BLOCK_EXPORT_DELETED", {"id": "exp1"})]
        assert qmp_query_block_exports() == [] and exports == []
        with pytest.raises(Error, match="^Export 'exp0' is not found$"):
            qmp_block_export_del("exp0")
    finally:
        bdrv_unref(bs2)


@pytest.mark.parametrize("opts, message", [
    ({"id": "0bad"}, "Invalid block export id"),
    ({"id": "exp0"}, "Block export id 'exp0' is already in use"),
    ({"node-name": "nope"}, "Cannot find device='' nor node-name='nope'"),
    ({"node-name": "ro0", "writable": True}, "Cannot export read-only node as writable"),
    ({"name": "disk"}, "NBD server already has export named 'disk'"),
    ({"name": "x" * 4097}, f"export name '{'x' * 4097}' too long"),
    ({"description": "d" * 4097}, f"description '{'d' * 4097}' too long"),
    ({"iothread": "nope"}, 'iothread "nope" not found'),
    ({"bitmaps": ["b0"]}, "Bitmap 'b0' is not found"),
    ({"frobnicate": 1}, "Parameter 'frobnicate' is unexpected"),
    ({"writable": "maybe"}, "Parameter 'writable' expects 'on' or 'off'"),
    ({"type": "floppy"}, "Parameter 'type' does not accept value 'floppy'"),
    ({"type": "fuse"}, "No driver found for the requested export type"),
])
def test_block_export_add_errors(server, opts, message):
    """block-export-add refuses bad options with QEMU's messages (checked against qemu-storage-daemon 7.2)."""
    bs = bdrv_open(None, None, {"driver": "null-co", "node-name": "ro0", "read-only": "on"}, 0)
    try:
        with pytest.raises(Error) as e:
            blk_exp_add({"type": "nbd", "id": "exp9", "node-name": "fmt0", **opts})
        assert str(e.value) == message
        assert [x["id"] for x in qmp_query_block_exports()] == ["exp0"]
    finally:
        bdrv_unref(bs)


def test_block_export_add_needs_running_server(make_server):
    """Without nbd-server-start an NBD export is refused with "NBD server not running"."""
    s = make_server(start=False)
    with pytest.raises(Error, match="^NBD server not running$"):
        blk_exp_add({"type": "nbd", "id": "e", "node-name": "fmt0"})
    assert s.bs.refcnt == 1   # nothing left attached


def test_read_only_export_of_read_only_node(make_server):
    """A read-only node exports read-only: READ_ONLY flag, no trim/zeroes flags."""
    s = make_server(writable=False)
    c = s.connect()
    c.handshake()
    flags = c.opt_info("disk", ())["flags"]
    assert flags & NBD_FLAG_READ_ONLY and flags & NBD_FLAG_CAN_MULTI_CONN


def test_blk_exp_close_all_disconnects_and_deletes(server):
    """blk_exp_close_all() (daemon exit) disconnects every client and returns once every export is gone."""
    c = server.connect()
    c.connect_export("disk")
    assert c.write(0, b"q" * 512).error == 0
    blk_exp_close_all()
    assert qmp_query_block_exports() == [] and blk_exp_find("exp0") is None
    assert c.wait_closed()


# --------------------------------------------------------------------------
# nbd-server-start / -stop


def test_server_start_stop_errors(make_server, tmp_path):
    """nbd-server-start twice, nbd-server-stop when stopped, and TLS credentials fail with QEMU's messages."""
    s = make_server()
    with pytest.raises(Error, match="^NBD server already running$"):
        nbd_server_start({"type": "unix", "path": str(tmp_path / "other.sock")})
    nbd_server_stop()
    assert not os.path.exists(s.sock)
    with pytest.raises(Error, match="^NBD server not running$"):
        nbd_server_stop()
    with pytest.raises(Error, match="^No TLS credentials with id 'tls0'$"):
        nbd_server_start({"type": "inet", "host": "127.0.0.1", "port": "0"}, tls_creds="tls0")
    with pytest.raises(Error, match="^Failed to bind socket to /nonexistent/dir/x.sock: No such file or directory$"):
        nbd_server_start({"type": "unix", "path": "/nonexistent/dir/x.sock"})
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        with pytest.raises(Error, match="^Failed to find an available port: Address already in use$"):
            nbd_server_start({"type": "inet", "host": "127.0.0.1", "port": str(blocker.getsockname()[1])})
    finally:
        blocker.close()
    assert blockdev_nbd.nbd_server is None


def test_inet_port_zero(make_server):
    """Port "0" binds a free port; nbd_server_addr() tells which, and clients connect there."""
    s = make_server(start=False)
    qmp_nbd_server_start({"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}})
    addr = nbd_server_addr()
    assert addr["type"] == "inet" and addr["host"] == "127.0.0.1" and int(addr["port"]) > 0
    blk_exp_add({"type": "nbd", "id": "exp0", "node-name": "fmt0", "writable": True})
    c = NBDTestClient.connect_inet("127.0.0.1", int(addr["port"]), s.pump)
    s.clients.append(c)
    c.connect_export("fmt0")          # the export name defaults to the node name
    assert c.write(0, b"i" * 512).error == 0


def test_max_connections(make_server):
    """With max-connections 1 the second client waits in the backlog until the first leaves; no CAN_MULTI_CONN."""
    s = make_server(max_connections=1)
    first = s.connect()
    first.handshake()
    assert not first.opt_info("disk", ())["flags"] & NBD_FLAG_CAN_MULTI_CONN
    second = s.connect()
    assert second.peek_state(0.1) == "open"    # no greeting: not accepted yet
    first.opt_abort()
    first.opt_reply()
    assert second.handshake() == 3              # FIXED_NEWSTYLE | NO_ZEROES


def test_server_stop_closes_clients_still_negotiating(server):
    """nbd-server-stop also shuts down connections still in the handshake (QEMU 9.1's CVE-2024-7409 fix)."""
    idle = server.connect()
    idle.handshake()
    busy = server.connect()
    busy.connect_export("disk")
    nbd_server_stop()
    assert idle.wait_closed() and busy.wait_closed()
    assert blockdev_nbd.nbd_server is None and qmp_query_block_exports() == []


def test_iothread_export(make_server):
    """An export moved into an IOThread serves its clients there."""
    from qblock.util.aio import iothread_create, iothread_destroy
    it = iothread_create("nbd-io0")
    try:
        s = make_server(node=memdrv_options("co", size=SIZE), export={"iothread": "nbd-io0", "fixed-iothread": True})
        assert s.exp.ctx is it.ctx and s.exp.ctx is not qemu_get_aio_context()
        c = s.connect()
        c.connect_export("disk")
        for i in range(10):
            assert c.write(i * 512, bytes([i + 1]) * 512).error == 0
        assert c.read(0, 5120).data == b"".join(bytes([i + 1]) * 512 for i in range(10))
        s.close()
    finally:
        iothread_destroy(it)


# --------------------------------------------------------------------------
# Tracing


def test_trace_events_print_qemu_lines(server):
    """nbd_* trace events print QEMU's lines (nbd/trace-events formats)."""
    lines = []
    sink = trace_add_sink(lambda rec: lines.append(rec.text()))
    trace_enable_events("nbd_*")
    try:
        c = server.connect()
        c.connect_export("disk", structured=False)
        c.read(0, 512)
    finally:
        trace_remove_sink(sink)
    assert "nbd_negotiate_options_check_option Checking option 7 (go)" in lines
    assert "nbd_negotiate_handle_info_block_size advertising minimum 0x1, preferred 0x1000, maximum 0x2000000" \
        in lines
    assert "nbd_co_receive_request_decode_type Decoding type: handle = 1, type = 0 (read)" in lines
    assert "nbd_co_send_simple_reply Send simple reply: handle = 1, error = 0 (success), len = 512" in lines
