"""virtio-blk (hw/block/virtio-blk.c) end to end: guest driver -> virtqueue -> device -> BlockBackend -> driver.

Three ways the kick reaches the device, and every test that takes ``mode``
runs in each:

    sync       ioeventfd=off: the kick runs virtio_blk_handle_output at once
    ioeventfd  the kick sets a host notifier the main loop serves (QEMU's default)
    iothread   the notifier is served in an IOThread, where the BlockBackend moved
"""
import contextlib
import errno
import struct

import attrs
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qblock.block.accounting import BlockAcctType
from qblock.block.block_backend import (
    BlockDeviceIoStatus,
    blk_bs,
    blk_enable_write_cache,
    blk_get_aio_context,
    blk_get_stats,
    blk_iostatus,
    blk_new_open,
    blk_unref,
    monitor_add_blk,
)
from qblock.block.driver import BDRV_O_RDWR, BDRV_O_UNMAP, BDRV_REQ_FUA, BDRV_REQ_MAY_UNMAP, bdrv_find_format, \
    bdrv_register
from qblock.hw.guest import GUEST_FEATURES, GuestError, VirtioBlkGuest
from qblock.hw.memory import AddressSpace
from qblock.hw.virtio import VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from qblock.hw.virtio_blk import (
    BDRV_REQUEST_MAX_SECTORS,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_CONFIG_WCE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_BARRIER,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_SCSI_CMD,
)
from qblock.qom.object import object_unparent, qdev_device_add
from qblock.testing.memdrv import MemDriverBase, MemState, memdrv_options
from qblock.trace.control import trace_add_sink, trace_disable_all, trace_enable_events, trace_remove_sink
from qblock.util import runstate
from qblock.util.aio import (
    AIO_WAIT_WHILE,
    aio_wait_bh_oneshot,
    iothread_create,
    iothread_destroy,
    qemu_get_aio_context,
)
from qblock.util.error import Error
from qblock.util.qapi_event import qapi_event_add_listener, qapi_event_remove_listener
from qblock.util.runstate import RunState, runstate_get, runstate_is_running, vm_start

MODES = ["sync", "ioeventfd", "iothread"]
W, R = BlockAcctType.BLOCK_ACCT_WRITE, BlockAcctType.BLOCK_ACCT_READ
KiB = 1024


# ---------------------------------------------------------------------------
# A test driver that fails chosen requests and records which buffers it was given


@attrs.define
class VblkState(MemState):
    fail_fn: object = None          # (op, offset, bytes) -> errno to fail with, or 0
    buffers: list = attrs.field(factory=list)


class VblkTestDriver(MemDriverBase):
    format_name = "test-vblk"
    protocol_name = "test-vblk"
    state_class = VblkState
    style = "co"

    def _io(self, bs, op, offset, nbytes, qiov, flags):
        s = bs.opaque
        self._sleep(s)
        s.buffers.extend(v.obj for v in qiov.iov)
        err = s.fail_fn(op, offset, nbytes) if s.fail_fn else 0
        if err:
            s.calls.append((op, offset, nbytes, flags))
            return -err
        if op == "read":
            return self._read(bs, offset, nbytes, qiov)
        return self._write(bs, offset, nbytes, qiov, flags)

    def bdrv_co_preadv(self, bs, offset, nbytes, qiov, flags):
        return self._io(bs, "read", offset, nbytes, qiov, flags)

    def bdrv_co_pwritev(self, bs, offset, nbytes, qiov, flags):
        return self._io(bs, "write", offset, nbytes, qiov, flags)

    def bdrv_co_flush_to_disk(self, bs):
        s = bs.opaque
        err = s.fail_fn("flush", 0, 0) if s.fail_fn else 0
        if err:
            s.calls.append(("flush", 0, 0, 0))
            return -err
        return super().bdrv_co_flush_to_disk(bs)


if bdrv_find_format("test-vblk") is None:
    bdrv_register(VblkTestDriver)


def vblk_opts(**opts):
    d = {"driver": "test-vblk", "size": 1 << 20}
    d.update({k.replace("_", "-"): v for k, v in opts.items()})
    return d


# ---------------------------------------------------------------------------
# Rigs: a BlockBackend, a realized device, a guest


class Rig:
    count = 0

    def __init__(self, mode="sync", drive=None, flags=BDRV_O_RDWR, guest_kw=None, name=None, **props):
        Rig.count += 1
        self.mode = mode
        self.blk = blk_new_open(None, None, drive or vblk_opts(), flags)
        if name:
            monitor_add_blk(self.blk, name)
        self.iothread = None
        self.mem = AddressSpace(16 << 20)
        opts = {"driver": "virtio-blk-device", "drive": self.blk, "memory": self.mem}
        if mode == "sync":
            opts["ioeventfd"] = False
        elif mode == "iothread":
            self.iothread = iothread_create(f"vblk-io{Rig.count}")
            opts["iothread"] = self.iothread
        opts.update(props)
        self.dev = None
        self.guest = None
        try:
            self.dev = qdev_device_add(opts)
            self.guest = VirtioBlkGuest(self.dev, **(guest_kw or {}))
        except BaseException:
            self.close()
            raise

    @property
    def bs(self):
        return blk_bs(self.blk)

    @property
    def state(self):
        return self.bs.opaque

    def kept(self):
        out, req = [], self.dev.rq
        while req is not None:
            out.append(req)
            req = req.next
        return out

    def close(self):
        if self.guest is not None:
            self.guest.shutdown()
        if self.dev is not None:
            object_unparent(self.dev)
        blk_unref(self.blk)
        if self.iothread is not None:
            iothread_destroy(self.iothread)


@pytest.fixture
def rigs():
    """Make rigs; close them all at the end, and put the VM back to running."""
    made = []

    def make(*args, **kw):
        r = Rig(*args, **kw)
        made.append(r)
        return r

    yield make
    for r in reversed(made):
        r.close()
    runstate._reset_for_tests()


@contextlib.contextmanager
def rig(*args, **kw):
    r = Rig(*args, **kw)
    try:
        yield r
    finally:
        r.close()
        runstate._reset_for_tests()


@pytest.fixture
def events():
    """QMP events sent during the test, as (name, data)."""
    got = []

    def listener(name, data, stamp):
        got.append((name, dict(data)))

    qapi_event_add_listener(listener)
    yield got
    qapi_event_remove_listener(listener)


def pattern(seed, size):
    return bytes((seed * 7 + i) & 0xFF for i in range(size))


def driver_io(r, op):
    return [(c[1], c[2]) for c in r.state.calls if c[0] == op]


# ---------------------------------------------------------------------------
# Realize, properties, config space


def test_config_space_and_features_describe_the_disk(rigs):
    """The config space carries capacity, seg_max 126, block sizes, wce, queues and discard limits."""
    r = rigs(drive=vblk_opts(size=4 << 20))
    g = r.guest
    c = g.config
    assert (c["capacity"], c["seg_max"], c["blk_size"], c["num_queues"], c["wce"]) == (8192, 126, 512, 1, 1)
    assert (c["max_discard_sectors"], c["max_discard_seg"], c["discard_sector_alignment"]) == (
        BDRV_REQUEST_MAX_SECTORS, 1, 1)
    assert (c["max_write_zeroes_sectors"], c["max_write_zeroes_seg"], c["write_zeroes_may_unmap"]) == (
        BDRV_REQUEST_MAX_SECTORS, 1, 1)
    for f in (VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_CONFIG_WCE,
              VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES):
        assert g.has(f)
    assert not g.has(VIRTIO_BLK_F_MQ) and not g.has(VIRTIO_BLK_F_RO)
    assert r.dev.config_size == 57 and r.dev.vq[0].vring.num == 128


@pytest.mark.parametrize("mode", MODES)
def test_block_size_and_queue_properties_reach_the_config_space(rigs, mode):
    """logical/physical block sizes, num-queues and discard=off show in the config space and features."""
    r = rigs(mode, logical_block_size="4096", physical_block_size="8192", **{"num-queues": "2", "discard": "off"})
    c = r.guest.config
    assert (c["blk_size"], c["physical_block_exp"], c["num_queues"]) == (4096, 1, 2)
    assert r.guest.has(VIRTIO_BLK_F_MQ) and not r.guest.has(VIRTIO_BLK_F_DISCARD)
    assert c["max_discard_sectors"] == 0 and r.dev.config_size == 57
    assert len(r.guest.queues) == 2
    req = r.guest.queue_write(8, pattern(1, 4096), queue=1)
    r.guest.kick(1)
    r.guest.wait(req)
    assert req.status == VIRTIO_BLK_S_OK and r.state.data[4096:8192] == pattern(1, 4096)


@pytest.mark.parametrize("props, message", [
    ({"num-queues": "0"}, "num-queues property must be larger than 0"),
    ({"num-queues": "70000"}, "Parameter 'num-queues' expects uint16"),
    ({"queue-size": "2"}, "invalid queue-size property (2), must be > 2"),
    ({"queue-size": "100"}, "invalid queue-size property (100), must be a power of 2 (max 1024)"),
    ({"queue-size": "2048"}, "invalid queue-size property (2048), must be a power of 2 (max 1024)"),
    ({"max-discard-sectors": "0"}, "invalid max-discard-sectors property (0), must be between 1 and 4194303"),
    ({"max-write-zeroes-sectors": "4194304"},
     "invalid max-write-zeroes-sectors property (4194304), must be between 1 and 4194303"),
    ({"werror": "sometimes"}, "Parameter 'werror' does not accept value 'sometimes'"),
    ({"logical_block_size": "1000"}, "Property .logical_block_size doesn't take value '1000', it's not a power of 2"),
    ({"logical_block_size": "256"},
     "Property .logical_block_size doesn't take value 256 (minimum: 512, maximum: 2097152)"),
    ({"logical_block_size": "4096", "physical_block_size": "512"},
     "logical_block_size > physical_block_size not supported"),
    ({"cyls": "70000", "heads": "16", "secs": "63"}, "cyls must be between 1 and 65535"),
    ({"iothread": "nosuch"}, "Device 'nosuch' not found"),
    ({"drive": "nosuch"}, "Property 'virtio-blk-device.drive' can't find value 'nosuch'"),
    ({"foo": "1"}, "Property 'virtio-blk-device.foo' not found"),
    ({"serial": 5}, "Invalid parameter type for 'serial', expected: string"),
])
def test_bad_configuration_is_refused_with_qemu_messages(props, message):
    """Each bad property or combination fails with QEMU's message and leaves the drive free."""
    blk = blk_new_open(None, None, vblk_opts(), BDRV_O_RDWR)
    try:
        with pytest.raises(Error) as exc:
            qdev_device_add({"driver": "virtio-blk-device", "drive": blk, "memory": AddressSpace(1 << 20),
                             **props})
        assert str(exc.value) == message
        assert blk.dev is None and blk.refcnt == 1
    finally:
        blk_unref(blk)


def test_device_needs_a_drive_and_ioeventfd_for_an_iothread():
    """No drive is "drive property not set"; an iothread without ioeventfd is refused."""
    with pytest.raises(Error, match="drive property not set"):
        qdev_device_add({"driver": "virtio-blk-device"})
    blk = blk_new_open(None, None, vblk_opts(), BDRV_O_RDWR)
    it = iothread_create("vblk-noeventfd")
    try:
        with pytest.raises(Error, match="ioeventfd is required for iothread"):
            qdev_device_add({"driver": "virtio-blk-device", "drive": blk, "iothread": "vblk-noeventfd",
                             "ioeventfd": "off"})
    finally:
        blk_unref(blk)
        iothread_destroy(it)


def test_a_drive_serves_one_device(rigs):
    """A second device on the same drive is refused: "Drive '...' is already in use by another device"."""
    r = rigs(name="drive0")
    with pytest.raises(Error, match="Drive 'drive0' is already in use by another device"):
        qdev_device_add({"driver": "virtio-blk-device", "drive": "drive0"})
    assert r.blk.dev is r.dev


# ---------------------------------------------------------------------------
# Every request type, end to end


@pytest.mark.parametrize("mode", MODES)
def test_write_and_read_reach_the_driver_bytes(rigs, mode):
    """Writes land in the driver's bytes; reads bring them back into guest memory; used lengths are QEMU's."""
    r = rigs(mode)
    g = r.guest
    w1 = g.write(0, pattern(1, 4096))
    w2 = g.write(64, pattern(2, 1024), segs=[512, 512])
    assert (w1.status, w1.used_len, w2.status, w2.used_len) == (0, 1, 0, 1)
    assert r.state.data[:4096] == pattern(1, 4096) and r.state.data[32 * KiB:33 * KiB] == pattern(2, 1024)
    rd = g.read(0, 4096, segs=[1000, 3096])
    assert (rd.status, rd.used_len, rd.data) == (0, 4097, pattern(1, 4096))
    assert driver_io(r, "write") == [(0, 4096), (32 * KiB, 1024)] and driver_io(r, "read") == [(0, 4096)]
    st_ = blk_get_stats(r.blk)
    assert (st_.nr_ops[W], st_.nr_bytes[W], st_.nr_ops[R], st_.nr_bytes[R]) == (2, 5120, 1, 4096)


@pytest.mark.parametrize("mode", MODES)
def test_guest_buffers_reach_the_driver_without_a_copy(rigs, mode):
    """The qiov the driver gets is made of views of guest RAM itself, for reads and for merged writes."""
    r = rigs(mode)
    g = r.guest
    for i in range(4):
        g.queue_write(8 * i, pattern(i, 4096))
    g.kick()
    g.wait_all()
    g.read(0, 8192)
    assert r.state.buffers and all(b is r.mem.ram for b in r.state.buffers)


@pytest.mark.parametrize("mode", MODES)
def test_null_co_serves_every_request_type(rigs, mode):
    """Against null-co: writes, zero reads, flush, get_id, discard and write-zeroes all complete with OK."""
    r = rigs(mode, drive={"driver": "null-co", "size": 1 << 20, "read-zeroes": True}, serial="null0")
    g = r.guest
    assert g.write(0, pattern(3, 4096)).status == VIRTIO_BLK_S_OK
    rd = g.read(0, 4096)
    assert rd.status == VIRTIO_BLK_S_OK and rd.data == bytes(4096)
    assert g.flush().status == VIRTIO_BLK_S_OK
    assert g.get_id().data[:6] == b"null0\0"
    assert g.discard(0, 8).status == VIRTIO_BLK_S_OK
    assert g.write_zeroes(0, 8, unmap=True).status == VIRTIO_BLK_S_OK
    st_ = blk_get_stats(r.blk)
    assert (st_.nr_ops[W], st_.nr_ops[R], st_.nr_ops[BlockAcctType.BLOCK_ACCT_FLUSH]) == (2, 1, 1)


def test_flush_reaches_the_driver_after_the_writes_before_it(rigs):
    """A flush submits the writes gathered before it first, then flushes; later writes go after."""
    r = rigs()
    g = r.guest
    reqs = [g.queue_write(0, pattern(1, 4096)), g.queue_write(8, pattern(2, 4096)), g.queue_flush(),
            g.queue_write(16, pattern(3, 4096))]
    g.kick()
    g.wait_all()
    assert [q.status for q in reqs] == [0, 0, 0, 0]
    assert [c[:3] for c in r.state.calls] == [("write", 0, 8192), ("flush", 0, 0), ("write", 8192, 4096)]
    assert blk_get_stats(r.blk).nr_ops[BlockAcctType.BLOCK_ACCT_FLUSH] == 1


@pytest.mark.parametrize("serial, in_size, expected", [
    ("disk-serial-01", 20, b"disk-serial-01" + bytes(6)),
    ("abcdefghijklmnopqrstuvwxyz", 20, b"abcdefghijklmnopqrst"),
    (None, 20, bytes(20)),
    ("disk-serial-01", 8, b"disk-ser"),
])
def test_get_id_copies_the_serial(rigs, serial, in_size, expected):
    """GET_ID writes the serial with a NUL when it fits, at most 20 bytes and never past the buffer."""
    r = rigs(**({"serial": serial} if serial else {}))
    g = r.guest
    req = g.queue_request(8, 0, (), [in_size], kind="get_id")
    g.kick()
    g.wait(req)
    assert req.status == VIRTIO_BLK_S_OK and req.data == expected and req.used_len == in_size + 1


@pytest.mark.parametrize("mode", MODES)
def test_discard_and_write_zeroes_reach_the_driver(rigs, mode):
    """WRITE_ZEROES (with the unmap flag as MAY_UNMAP) and DISCARD reach the driver; only zeroes are accounted."""
    r = rigs(mode, drive=memdrv_options("co", write_zeroes=True, discard=True, size=1 << 20),
             flags=BDRV_O_RDWR | BDRV_O_UNMAP)
    g = r.guest
    g.write(0, pattern(5, 16384))
    assert g.write_zeroes(0, 8, unmap=True).status == VIRTIO_BLK_S_OK
    assert g.write_zeroes(8, 8).status == VIRTIO_BLK_S_OK
    assert g.discard(16, 8).status == VIRTIO_BLK_S_OK
    zw = [c for c in r.state.calls if c[0] == "write_zeroes"]
    assert [(c[1], c[2]) for c in zw] == [(0, 4096), (4096, 4096)]
    assert zw[0][3] & BDRV_REQ_MAY_UNMAP and not zw[1][3] & BDRV_REQ_MAY_UNMAP
    assert [c[:3] for c in r.state.calls if c[0] == "discard"] == [("discard", 8192, 4096)]
    assert r.state.data[:12288] == bytes(12288) and r.state.data[12288:16384] == pattern(5, 16384)[12288:]
    st_ = blk_get_stats(r.blk)
    assert st_.nr_ops[W] == 3 and st_.nr_ops[BlockAcctType.BLOCK_ACCT_UNMAP] == 0


def test_barrier_flag_is_ignored(rigs):
    """VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_BARRIER is a plain write."""
    r = rigs()
    g = r.guest
    req = g.queue_request(VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_BARRIER, 8, [pattern(9, 512)])
    g.kick()
    g.wait(req)
    assert req.status == VIRTIO_BLK_S_OK and r.state.data[4096:4608] == pattern(9, 512)


def test_read_only_drive_offers_ro_and_fails_writes(rigs):
    """A read-only drive sets VIRTIO_BLK_F_RO; reads work and a write completes with IOERR."""
    r = rigs(flags=0)
    g = r.guest
    assert g.has(VIRTIO_BLK_F_RO)
    assert g.read(0, 512).status == VIRTIO_BLK_S_OK
    assert g.write(0, pattern(1, 512)).status == VIRTIO_BLK_S_IOERR
    assert r.state.data[:512] == bytes(512)


def test_write_cache_follows_config_wce_and_negotiation(rigs):
    """The wce config byte switches the cache mode; a guest without CONFIG_WCE and FLUSH gets writethrough."""
    r = rigs()
    g = r.guest
    g.set_writeback(False)
    assert not blk_enable_write_cache(r.blk) and g.read_config()["wce"] == 0
    g.write(0, pattern(1, 512))
    assert r.state.calls[-2:] == [("write", 0, 512, 0), ("flush", 0, 0, 0)]    # FUA emulated by a flush
    g.set_writeback(True)
    assert blk_enable_write_cache(r.blk)
    no_wce = rigs(guest_kw={"accept": GUEST_FEATURES & ~(1 << VIRTIO_BLK_F_CONFIG_WCE) & ~(1 << VIRTIO_BLK_F_FLUSH)})
    assert not blk_enable_write_cache(no_wce.blk)
    no_wce.guest.accept |= 1 << VIRTIO_BLK_F_FLUSH
    no_wce.guest.reset()
    assert blk_enable_write_cache(no_wce.blk)


def test_write_cache_property_off_sets_writethrough(rigs):
    """write-cache=off makes the drive writethrough; the config space shows wce 0."""
    r = rigs(**{"write-cache": "off"})
    assert r.guest.config["wce"] == 0 and not blk_enable_write_cache(r.blk)
    r.guest.write(0, pattern(1, 512))
    assert r.state.calls[-1] == ("flush", 0, 0, 0) or r.state.calls[-1][3] & BDRV_REQ_FUA


# ---------------------------------------------------------------------------
# Merging (the seed's virtio_blk_submit_multireq)


@pytest.mark.parametrize("mode", MODES)
def test_32_sequential_writes_become_one_128k_write(rigs, mode):
    """32 sequential 4 KiB writes in one kick reach the driver as one 128 KiB write, 31 merged."""
    r = rigs(mode)
    g = r.guest
    reqs = [g.queue_write(8 * i, pattern(i, 4096)) for i in range(32)]
    g.kick()
    g.wait_all()
    assert all(q.status == VIRTIO_BLK_S_OK for q in reqs)
    assert driver_io(r, "write") == [(0, 128 * KiB)]
    assert r.state.data[:128 * KiB] == b"".join(pattern(i, 4096) for i in range(32))
    st_ = blk_get_stats(r.blk)
    assert (st_.merged[W], st_.nr_ops[W], st_.nr_bytes[W]) == (31, 32, 128 * KiB)


def test_requests_out_of_order_merge_after_sorting(rigs):
    """Writes at sectors 8, 0, 16 are sorted into one 12 KiB write; completion walks 0 -> 8 -> 16."""
    r = rigs()
    g = r.guest
    reqs = {s: g.queue_write(s, pattern(s, 4096)) for s in (8, 0, 16)}
    g.kick()
    g.wait_all()
    assert driver_io(r, "write") == [(0, 12 * KiB)]
    assert [head for _, head, _ in g.used_log] == [reqs[0].head, reqs[8].head, reqs[16].head]
    assert blk_get_stats(r.blk).merged[W] == 2


@pytest.mark.parametrize("sectors, expected", [
    ([0, 8, 24], [(0, 8 * KiB), (12 * KiB, 4 * KiB)]),           # a gap cuts the run
    ([0, 8, 8, 16], [(0, 8 * KiB), (4 * KiB, 8 * KiB)]),          # an overlap is not "sequential" either
    ([40, 0, 32, 8], [(0, 8 * KiB), (16 * KiB, 8 * KiB)]),
])
def test_only_sequential_requests_merge(rigs, sectors, expected):
    """Runs end where sector + length does not reach the next request's sector."""
    r = rigs()
    g = r.guest
    for s in sectors:
        g.queue_write(s, pattern(s, 4096))
    g.kick()
    g.wait_all()
    assert driver_io(r, "write") == expected


def test_direction_change_submits_what_was_gathered(rigs):
    """W0 W8 R16 W24: the read submits the two writes (merged), the next write submits the read."""
    r = rigs()
    g = r.guest
    reqs = [g.queue_write(0, pattern(0, 4096)), g.queue_write(8, pattern(8, 4096)), g.queue_read(16, 4096),
            g.queue_write(24, pattern(24, 4096))]
    g.kick()
    g.wait_all()
    assert [c[:3] for c in r.state.calls] == [("write", 0, 8192), ("read", 8192, 4096), ("write", 12288, 4096)]
    assert all(q.status == VIRTIO_BLK_S_OK for q in reqs)


def test_max_iov_limits_a_merge(rigs):
    """With max_iov 4, requests of 2 segments merge in pairs: niov > max_iov - req.niov cuts the run."""
    r = rigs()
    r.bs.bl.max_iov = 4
    g = r.guest
    for i in range(5):
        g.queue_write(8 * i, pattern(i, 4096), segs=[2048, 2048])
    g.kick()
    g.wait_all()
    assert driver_io(r, "write") == [(0, 8 * KiB), (8 * KiB, 8 * KiB), (16 * KiB, 4 * KiB)]
    assert r.state.data[:20 * KiB] == b"".join(pattern(i, 4096) for i in range(5))


def test_max_transfer_limits_a_merge(rigs):
    """With max-transfer 16 KiB, 4 KiB writes merge in fours; a request over the limit is never merged."""
    r = rigs(drive=vblk_opts(max_transfer=16 * KiB))
    g = r.guest
    for i in range(8):
        g.queue_write(8 * i, pattern(i, 4096))
    g.kick()
    g.wait_all()
    assert driver_io(r, "write") == [(0, 16 * KiB), (16 * KiB, 16 * KiB)]
    r.state.calls.clear()
    g.queue_write(128, pattern(1, 4096))
    g.queue_write(136, pattern(2, 32 * KiB))
    g.queue_write(200, pattern(3, 4096))
    g.kick()
    g.wait_all()
    # 4 KiB alone; 32 KiB alone (the block layer splits it at max_transfer); 4 KiB alone
    assert driver_io(r, "write") == [(64 * KiB, 4 * KiB), (68 * KiB, 16 * KiB), (84 * KiB, 16 * KiB),
                                     (100 * KiB, 4 * KiB)]
    assert blk_get_stats(r.blk).merged[W] == 6


def test_a_33rd_request_submits_the_first_32(rigs):
    """The buffer holds 32 requests: the 33rd submits them (one 128 KiB write) and starts a new run."""
    r = rigs()
    g = r.guest
    for i in range(33):
        g.queue_write(8 * i, pattern(i, 4096))
    g.kick()
    g.wait_all()
    assert driver_io(r, "write") == [(0, 128 * KiB), (128 * KiB, 4 * KiB)]
    assert blk_get_stats(r.blk).merged[W] == 31


def test_request_merging_off_submits_each_request(rigs):
    """request-merging=off submits every request on its own."""
    r = rigs(**{"request-merging": "off"})
    g = r.guest
    for i in range(4):
        g.queue_write(8 * i, pattern(i, 4096))
    g.kick()
    g.wait_all()
    assert driver_io(r, "write") == [(4 * KiB * i, 4 * KiB) for i in range(4)]
    assert blk_get_stats(r.blk).merged[W] == 0


def test_merged_reads_fill_each_guest_buffer(rigs):
    """Eight sequential reads become one 32 KiB read whose bytes land in each request's own buffers."""
    r = rigs()
    r.state.data[:32 * KiB] = b"".join(pattern(i, 4096) for i in range(8))
    g = r.guest
    reqs = [g.queue_read(8 * i, 4096, segs=[1024, 3072]) for i in range(8)]
    g.kick()
    g.wait_all()
    assert driver_io(r, "read") == [(0, 32 * KiB)]
    assert [q.data for q in reqs] == [pattern(i, 4096) for i in range(8)]
    assert blk_get_stats(r.blk).merged[R] == 7


# ---------------------------------------------------------------------------
# Malformed requests


@pytest.mark.parametrize("build, status, invalid", [
    ("write_past_end", VIRTIO_BLK_S_IOERR, W),
    ("read_past_end", VIRTIO_BLK_S_IOERR, R),
    ("write_misaligned_sector", VIRTIO_BLK_S_IOERR, W),
    ("write_partial_block", VIRTIO_BLK_S_IOERR, W),
    ("unknown_type", VIRTIO_BLK_S_UNSUPP, None),
    ("scsi_plain_chain", VIRTIO_BLK_S_IOERR, None),
    ("discard_without_out_bit", VIRTIO_BLK_S_UNSUPP, None),
    ("discard_two_segments", VIRTIO_BLK_S_UNSUPP, None),
    ("discard_with_unmap", VIRTIO_BLK_S_UNSUPP, None),
    ("discard_too_long", VIRTIO_BLK_S_IOERR, None),
    ("write_zeroes_unknown_flag", VIRTIO_BLK_S_UNSUPP, W),
    ("write_zeroes_past_end", VIRTIO_BLK_S_IOERR, W),
])
def test_bad_requests_complete_with_an_error_status(rigs, build, status, invalid):
    """Each bad request gets QEMU's status, is accounted invalid where QEMU does, writes nothing."""
    r = rigs(drive=vblk_opts(size=64 * KiB), logical_block_size="4096", **{"max-discard-sectors": "8"})
    g = r.guest
    wz = struct.Struct("<QII")
    if build == "write_past_end":
        req = g.queue_write(128, pattern(1, 4096))
    elif build == "read_past_end":
        req = g.queue_read(120, 8192)
    elif build == "write_misaligned_sector":
        req = g.queue_write(1, pattern(1, 4096))
    elif build == "write_partial_block":
        req = g.queue_write(0, pattern(1, 512))
    elif build == "unknown_type":
        req = g.queue_request(99, 0, [pattern(1, 512)])
    elif build == "scsi_plain_chain":
        req = g.queue_request(VIRTIO_BLK_T_SCSI_CMD, 0, [], [96])
    elif build == "discard_without_out_bit":
        req = g.queue_request(VIRTIO_BLK_T_DISCARD & ~VIRTIO_BLK_T_OUT, 0, [wz.pack(0, 8, 0)])
    elif build == "discard_two_segments":
        req = g.queue_request(VIRTIO_BLK_T_DISCARD, 0, [wz.pack(0, 8, 0), wz.pack(8, 8, 0)])
    elif build == "discard_with_unmap":
        req = g.queue_discard(0, 8, flags=1)
    elif build == "discard_too_long":
        req = g.queue_discard(0, 16)
    elif build == "write_zeroes_unknown_flag":
        req = g.queue_write_zeroes(0, 8, flags=2)
    elif build == "write_zeroes_past_end":
        req = g.queue_write_zeroes(120, 16)
    g.kick()
    g.wait(req)
    assert req.status == status
    st_ = blk_get_stats(r.blk)
    assert st_.invalid_ops == [1 if t == invalid else 0 for t in range(len(st_.invalid_ops))]
    assert r.state.calls == [] and r.state.data == bytes(64 * KiB)
    assert not r.dev.broken
    assert g.write(0, pattern(2, 4096)).status == VIRTIO_BLK_S_OK     # still usable


def test_scsi_command_with_full_layout_is_unsupported(rigs):
    """A SCSI_CMD with 2 out and 3 in segments is UNSUPP with errors = 255 in the SCSI in-header."""
    r = rigs()
    g = r.guest
    req = g.queue_request(VIRTIO_BLK_T_SCSI_CMD, 0, [b"\x12" * 6], [32, 16])
    g.kick()
    g.wait(req)
    assert req.status == VIRTIO_BLK_S_UNSUPP
    assert struct.unpack_from("<I", req.data, 32)[0] == 255


def _bad_layout(g, build):
    if build == "no_in_segment":
        hdr = g.alloc(16)
        g.write_mem(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 0))
        return g.queue_chain([(hdr, 16, False), (g.alloc(512), 512, False)])
    if build == "no_out_segment":
        return g.queue_chain([(g.alloc(512), 512, True), (g.alloc(1), 1, True)])
    if build == "short_outhdr":
        hdr = g.alloc(8)
        g.write_mem(hdr, struct.pack("<II", VIRTIO_BLK_T_OUT, 0))
        return g.queue_chain([(hdr, 8, False), (g.alloc(1), 1, True)])
    if build == "short_discard_header":
        return g.queue_request(VIRTIO_BLK_T_DISCARD, 0, [struct.pack("<Q", 0)])
    if build == "descriptor_loop":
        hdr, st_ = g.alloc(16), g.alloc(1)
        a, b, c = g.alloc_descs(3)
        g.write_desc(a, hdr, 16, VRING_DESC_F_NEXT, b)
        g.write_desc(b, st_, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, c)
        g.write_desc(c, st_, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, b)
        g.publish_raw_head(a)
        return None
    raise AssertionError(build)


@pytest.mark.parametrize("mode", ["sync", "iothread"])
@pytest.mark.parametrize("build, message", [
    ("no_in_segment", "virtio-blk missing headers"),
    ("no_out_segment", "virtio-blk missing headers"),
    ("short_outhdr", "virtio-blk request outhdr too short"),
    ("short_discard_header", "virtio-blk discard/write_zeroes header too short"),
    ("descriptor_loop", "Looped descriptor"),
])
def test_broken_layouts_break_the_device_until_reset(rigs, mode, build, message):
    """A broken layout is virtio_error: never completed or written, and the device is quiet until a reset."""
    # The good write gathered before it is still submitted (the MultiReqBuffer is flushed), but a
    # broken device publishes no completion, as in QEMU.
    r = rigs(mode)
    g = r.guest
    ok = g.queue_write(0, pattern(1, 4096))
    bad = _bad_layout(g, build)
    g.kick()
    with pytest.raises(GuestError, match="needs a reset"):
        g.poll_until(lambda: False)
    # With an IOThread the guest can see NEEDS_RESET while virtio_error is still running there
    # (it sets broken last, as QEMU does): let the device's context finish its turn first.
    aio_wait_bh_oneshot(blk_get_aio_context(r.blk), lambda _: None, None)
    assert r.dev.broken and r.dev.broken_reason == message
    AIO_WAIT_WHILE(blk_get_aio_context(r.blk), lambda: r.blk.in_flight > 0)
    assert driver_io(r, "write") == [(0, 4096)]
    assert not ok.done and (bad is None or not bad.done) and g.used_log == []
    g.reset()
    assert ok.lost
    assert g.write(8, pattern(2, 4096)).status == VIRTIO_BLK_S_OK
    assert g.unexpected == []


def test_other_valid_layouts_are_accepted(rigs):
    """A header split over two descriptors, the status byte inside the data buffer, indirect chains: all fine."""
    r = rigs()
    g = r.guest
    hdr = g.alloc(16)
    g.write_mem(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 8))
    data = g.alloc(512)
    g.write_mem(data, pattern(4, 512))
    st_ = g.alloc(1)
    split = g.queue_chain([(hdr, 8, False), (hdr + 8, 8, False), (data, 512, False), (st_, 1, True)],
                          status_addr=st_)
    g.kick()
    g.wait(split)
    assert split.status == VIRTIO_BLK_S_OK and r.state.data[4096:4608] == pattern(4, 512)
    rhdr = g.alloc(16)
    g.write_mem(rhdr, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 8))
    inbuf = g.alloc(513)
    merged = g.queue_chain([(rhdr, 16, False), (inbuf, 513, True)], status_addr=inbuf + 512,
                           in_data=[(inbuf, 512)])
    g.kick()
    g.wait(merged)
    assert (merged.status, merged.used_len, merged.data) == (0, 513, pattern(4, 512))
    ind = g.queue_write(16, pattern(5, 1024), segs=[512, 512], indirect=True)
    g.kick()
    g.wait(ind)
    assert ind.status == VIRTIO_BLK_S_OK and r.state.data[8192:9216] == pattern(5, 1024)


# ---------------------------------------------------------------------------
# Errors: werror / rerror


def fail_on(op_wanted, err, ranges=None):
    def fn(op, offset, nbytes):
        if op != op_wanted:
            return 0
        if ranges is None or any(offset < e and s < offset + nbytes for s, e in ranges):
            return err
        return 0
    return fn


@pytest.mark.parametrize("mode", MODES)
def test_werror_report_completes_with_ioerr(rigs, events, mode):
    """werror=report: a failed write completes with IOERR, is counted failed, and BLOCK_IO_ERROR says report."""
    r = rigs(mode, werror="report")
    r.state.fail_fn = fail_on("write", errno.EIO)
    req = r.guest.write(0, pattern(1, 4096))
    assert req.status == VIRTIO_BLK_S_IOERR
    assert blk_get_stats(r.blk).failed_ops[W] == 1
    assert [(n, d["action"], d["operation"]) for n, d in events] == [("BLOCK_IO_ERROR", "report", "write")]
    assert runstate_is_running() and r.state.data[:4096] == bytes(4096)


def test_rerror_ignore_completes_with_ok(rigs, events):
    """rerror=ignore: a failed read completes with OK, and BLOCK_IO_ERROR says ignore."""
    r = rigs(rerror="ignore")
    r.state.fail_fn = fail_on("read", errno.EIO)
    assert r.guest.read(0, 4096).status == VIRTIO_BLK_S_OK
    assert [(n, d["action"]) for n, d in events] == [("BLOCK_IO_ERROR", "ignore")]
    assert blk_get_stats(r.blk).failed_ops[R] == 0 and runstate_is_running()


def test_werror_enospc_stops_only_for_enospc(rigs):
    """werror=enospc reports EIO but stops the VM on ENOSPC."""
    r = rigs(werror="enospc")
    r.state.fail_fn = fail_on("write", errno.EIO)
    assert r.guest.write(0, pattern(1, 512)).status == VIRTIO_BLK_S_IOERR
    r.state.fail_fn = fail_on("write", errno.ENOSPC)
    req = r.guest.queue_write(0, pattern(1, 512))
    r.guest.kick()
    r.guest.poll_until(lambda: not runstate_is_running())
    assert runstate_get() is RunState.RUN_STATE_IO_ERROR and not req.done
    assert blk_iostatus(r.blk) is BlockDeviceIoStatus.BLOCK_DEVICE_IO_STATUS_NOSPACE


@pytest.mark.parametrize("mode", MODES)
def test_werror_stop_pauses_keeps_and_resumes(rigs, events, mode):
    """werror=stop: failed writes stay on s->rq while the VM is paused; on resume each completes once, OK."""
    r = rigs(mode, werror="stop", drive=vblk_opts(latency_ns=1000))
    g = r.guest
    r.state.fail_fn = fail_on("write", errno.EIO, [(0, 12 * KiB)])
    writes = [g.queue_write(8 * i, pattern(i, 4096)) for i in range(3)]
    other = g.queue_write(64, pattern(7, 4096))
    read = g.queue_read(128, 4096)
    g.kick()
    g.poll_until(lambda: not runstate_is_running() and read.done and other.done)
    assert runstate_get() is RunState.RUN_STATE_IO_ERROR
    assert sorted(q.elem.index for q in r.kept()) == sorted(w.head for w in writes)
    assert not any(w.done for w in writes) and other.status == read.status == VIRTIO_BLK_S_OK
    assert blk_iostatus(r.blk) is BlockDeviceIoStatus.BLOCK_DEVICE_IO_STATUS_FAILED
    assert ("STOP", {}) in events and ("BLOCK_IO_ERROR", "stop") in [(n, d.get("action")) for n, d in events]
    with pytest.raises(GuestError, match="paused"):
        g.kick()

    r.state.fail_fn = None
    vm_start()
    g.wait_all()
    assert [w.status for w in writes] == [VIRTIO_BLK_S_OK] * 3 and r.kept() == []
    assert r.state.data[:12 * KiB] == b"".join(pattern(i, 4096) for i in range(3))
    heads = [head for _, head, _ in g.used_log]
    assert sorted(heads) == sorted(q.head for q in writes + [other, read]) and g.unexpected == []
    assert blk_get_stats(r.blk).nr_ops[W] == 4 and r.blk.in_flight == 0


def test_failed_flush_with_werror_stop_is_retried(rigs):
    """A flush that fails under werror=stop is kept and flushed again after resume."""
    r = rigs(werror="stop")
    r.guest.write(0, pattern(1, 512))             # something to flush: an idle flush skips the driver
    r.state.fail_fn = fail_on("flush", errno.EIO)
    req = r.guest.queue_flush()
    r.guest.kick()
    r.guest.poll_until(lambda: not runstate_is_running())
    assert [q.elem.index for q in r.kept()] == [req.head]
    r.state.fail_fn = None
    vm_start()
    r.guest.wait(req)
    assert req.status == VIRTIO_BLK_S_OK and r.state.flushes == 1


def test_reset_drops_requests_kept_for_restart(rigs):
    """A guest reset while requests are kept drops them: never completed, and the resume has nothing to redo."""
    r = rigs(werror="stop")
    r.state.fail_fn = fail_on("write", errno.EIO)
    req = r.guest.queue_write(0, pattern(1, 4096))
    r.guest.kick()
    r.guest.poll_until(lambda: not runstate_is_running())
    r.state.fail_fn = None
    r.guest.reset()
    assert r.kept() == [] and req.lost and not req.done
    vm_start()
    assert r.guest.write(8, pattern(2, 4096)).status == VIRTIO_BLK_S_OK
    assert r.state.data[:4096] == bytes(4096) and r.guest.unexpected == []
    assert driver_io(r, "write") == [(0, 4096), (4096, 4096)]


_op = st.one_of(
    st.tuples(st.just("write"), st.integers(1, 8)),
    st.tuples(st.just("read"), st.integers(1, 8)),
    st.tuples(st.just("flush"), st.just(0)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), mode=st.sampled_from(MODES),
       policy=st.sampled_from(["report", "ignore", "stop"]), latency=st.sampled_from([0, 1000]),
       bad=st.sets(st.integers(0, 15), max_size=8), bad_flush=st.booleans(),
       batches=st.lists(st.lists(_op, min_size=1, max_size=40), min_size=1, max_size=3))
def test_every_request_completes_exactly_once(data, mode, policy, latency, bad, bad_flush, batches):
    """Random batches with random failures: every head shows once in the used ring, statuses follow the policy."""
    slots = list(range(16))
    with rig(mode, drive=vblk_opts(size=16 * 4096, latency_ns=latency), werror=policy, rerror=policy) as r:
        g = r.guest

        def fail(op, offset, nbytes):
            if op == "flush":
                return errno.EIO if bad_flush else 0
            return errno.EIO if any(offset // 4096 <= s <= (offset + nbytes - 1) // 4096 for s in bad) else 0

        r.state.fail_fn = fail
        submitted = []
        for batch in batches:
            for op, n in batch:
                if op == "write" and slots:
                    slot = slots.pop(data.draw(st.integers(0, len(slots) - 1)))
                    submitted.append((g.queue_write(slot * 8, pattern(slot, n * 512)), slot, n))
                elif op == "read":
                    submitted.append((g.queue_read(data.draw(st.integers(0, 15)) * 8, n * 512), None, n))
                elif op == "flush":
                    submitted.append((g.queue_flush(), None, 0))
            g.kick()
            while g.inflight():
                g.poll_until(lambda: g.inflight() == 0 or not runstate_is_running())
                if not runstate_is_running():
                    event(f"VM stopped with {len(r.kept())} request(s) kept")
                    r.state.fail_fn = None                  # the admin fixed the disk
                    vm_start()

        reqs = [q for q, _, _ in submitted]
        event(f"{policy}: {sum(q.status == VIRTIO_BLK_S_IOERR for q in reqs if q.done)} IOERR")
        assert all(q.done for q in reqs) and g.unexpected == []
        assert sorted(id(q) for q in g.completed) == sorted(id(q) for q in reqs)
        assert len(g.used_log) == len(reqs) and r.kept() == [] and r.blk.in_flight == 0
        for q, slot, n in submitted:
            if policy in ("ignore", "stop"):
                assert q.status == VIRTIO_BLK_S_OK
            else:
                assert q.status in (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR)
            if slot is not None:
                got = bytes(r.state.data[slot * 4096:slot * 4096 + n * 512])
                if policy == "stop" or (policy == "report" and q.status == VIRTIO_BLK_S_OK):
                    assert got == pattern(slot, n * 512)
                elif policy == "report":
                    assert got == bytes(n * 512)
                else:
                    assert got in (pattern(slot, n * 512), bytes(n * 512))


# ---------------------------------------------------------------------------
# Dataplane


def _workload(r):
    g = r.guest
    out = []
    for i in range(36):
        g.queue_write(8 * i, pattern(i, 4096))
    g.queue_flush()
    g.queue_read(0, 16 * KiB)
    g.queue_write_zeroes(8, 8)
    g.queue_write(2000, pattern(1, 4096))            # beyond the end: IOERR
    g.queue_request(77, 0)                           # unknown: UNSUPP
    g.kick()
    g.wait_all()
    out.append(g.get_id().data)
    out.append(g.read(0, 48 * KiB).data)
    statuses = sorted((q.kind, q.head, q.status, q.used_len) for q in g.completed)
    st_ = blk_get_stats(r.blk)
    return out, statuses, bytes(r.state.data), (st_.nr_ops, st_.merged, st_.invalid_ops)


def test_same_workload_same_results_in_every_mode(rigs):
    """The same batch gives the same data, statuses, used lengths and accounting with or without an IOThread."""
    results = [_workload(rigs(mode, serial="same", drive=vblk_opts(latency_ns=500))) for mode in MODES]
    assert results[0] == results[1] == results[2]


def test_dataplane_serves_the_queue_in_the_iothread(rigs):
    """With iothread=, the BlockBackend lives in the IOThread's context and the queue is handled there."""
    r = rigs("iothread")
    assert blk_get_aio_context(r.blk) is r.iothread.ctx and r.dev.dataplane_started
    seen = []
    sink = trace_add_sink(lambda rec: seen.append((rec.name, rec.ctx)))
    trace_enable_events("virtio_blk_handle_write")
    trace_enable_events("virtio_blk_req_complete")
    trace_enable_events("virtio_notify_irqfd")
    try:
        r.guest.write(0, pattern(1, 4096))
    finally:
        trace_remove_sink(sink)
        trace_disable_all()
    ctx = r.iothread.ctx.name
    assert seen == [("virtio_blk_handle_write", ctx), ("virtio_blk_req_complete", ctx),
                    ("virtio_notify_irqfd", ctx)]
    r.guest.shutdown()
    r.guest = None
    assert blk_get_aio_context(r.blk) is qemu_get_aio_context() and not r.dev.dataplane_started


def test_trace_follows_one_write_from_kick_to_interrupt(rigs):
    """In order: kick, pop, handle_write, the block layer (same request id), rw_complete, push, notify."""
    r = rigs()
    seen = []
    sink = trace_add_sink(lambda rec: seen.append(rec))
    for pat in ("virtio_*", "virtqueue_*", "blk_co_pwritev"):
        trace_enable_events(pat)
    try:
        r.guest.write(8, pattern(1, 512))
    finally:
        trace_remove_sink(sink)
        trace_disable_all()
    assert [rec.name for rec in seen] == [
        "virtio_queue_notify", "virtqueue_pop", "virtio_blk_handle_write", "blk_co_pwritev",
        "virtio_blk_rw_complete", "virtio_blk_req_complete", "virtqueue_fill", "virtqueue_flush", "virtio_notify"]
    vreq = seen[2].fields["req"]
    assert seen[3].req == vreq.id
    assert seen[2].text() == f"virtio_blk_handle_write vdev {r.dev.trace_name} req vreq{vreq.id} sector 8 nsectors 1"
