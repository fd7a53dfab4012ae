"""The BlockBackend (block/block-backend.c): QEMU's test-block-backend.c, then the device-facing API.

``test_drain_aio_error`` and ``test_drain_all_aio_error`` are QEMU's two tests.  The rest pins
down what block-backend.c promises a device: AIO completions that never run inside the
``blk_aio_*`` call, the request checks and their errno values, FUA when the write cache is off,
request queuing while drained, the life cycle with its permissions and names, the
``werror``/``rerror`` policies with their BLOCK_IO_ERROR events and VM stop, iostatus, limits,
plugging, the synchronous wrappers and a BlockBackend living in an IOThread.

Drivers: ``null-co``/``null-aio`` (with and without ``latency-ns``) and the in-memory test
driver (``qblock.testing.memdrv``), whose call log shows what reached the driver.
"""
import errno
import threading

import pytest

from qblock.block.block_backend import (
    BlockDeviceIoStatus,
    BlockDevOps,
    BlockdevOnError,
    BlockErrorAction,
    blk_abort_aio_request,
    blk_aio_cancel,
    blk_aio_cancel_async,
    blk_aio_flush,
    blk_aio_pdiscard,
    blk_aio_preadv,
    blk_aio_pwrite_zeroes,
    blk_aio_pwritev,
    blk_all_next,
    blk_attach_dev,
    blk_bs,
    blk_by_name,
    blk_check_byte_request,
    blk_co_pwritev,
    blk_detach_dev,
    blk_drain,
    blk_drain_all,
    blk_enable_write_cache,
    blk_error_action,
    blk_flush,
    blk_get_aio_context,
    blk_get_error_action,
    blk_get_max_iov,
    blk_get_max_transfer,
    blk_get_on_error,
    blk_get_perm,
    blk_get_request_alignment,
    blk_getlength,
    blk_insert_bs,
    blk_io_plug,
    blk_io_unplug,
    blk_iostatus,
    blk_iostatus_enable,
    blk_iostatus_is_enabled,
    blk_iostatus_reset,
    blk_iostatus_set_err,
    blk_is_available,
    blk_is_inserted,
    blk_is_read_only,
    blk_name,
    blk_new,
    blk_new_open,
    blk_next,
    blk_pdiscard,
    blk_pread,
    blk_pwrite,
    blk_pwrite_zeroes,
    blk_ref,
    blk_remove_bs,
    blk_set_aio_context,
    blk_set_allow_aio_context_change,
    blk_set_allow_write_beyond_eof,
    blk_set_dev_ops,
    blk_set_disable_request_queuing,
    blk_set_enable_write_cache,
    blk_set_on_error,
    blk_set_perm,
    blk_truncate,
    blk_unref,
    block_backends,
    child_root,
    monitor_add_blk,
    monitor_remove_blk,
)
from qblock.block.driver import (
    BDRV_O_NO_IO,
    BDRV_O_RDWR,
    BDRV_O_RESIZE,
    BDRV_O_UNMAP,
    BDRV_REQ_FUA,
    BDRV_REQ_MAY_UNMAP,
    INT_MAX,
    IOV_MAX,
    NOT_DONE,
    bdrv_find_format,
    bdrv_register,
)
from qblock.block.graph import (
    BLK_PERM_ALL,
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_RESIZE,
    BLK_PERM_WRITE,
    bdrv_drained_begin,
    bdrv_drained_end,
    bdrv_get_aio_context,
    bdrv_open,
    bdrv_try_set_aio_context,
    bdrv_unref,
)
from qblock.testing.memdrv import memdrv_name, memdrv_options
from qblock.util import runstate
from qblock.util.aio import (
    aio_bh_schedule_oneshot,
    aio_context_acquire,
    aio_context_release,
    aio_poll,
    aio_timer_new,
    iothread_create,
    iothread_destroy,
    iothread_get_aio_context,
    qemu_get_aio_context,
)
from qblock.util.coroutine import qemu_coroutine_create, qemu_coroutine_enter, qemu_coroutine_self
from qblock.util.error import Error
from qblock.util.iov import QEMUIOVector
from qblock.util.qapi_event import qapi_event_add_listener, qapi_event_remove_listener
from qblock.util.timer import QEMU_CLOCK_REALTIME, SCALE_NS, qemu_clock_get_ns, timer_del, timer_mod_ns

SIZE = 1 << 20
LATENCY = 1000
WAIT_S = 10  # upper bound for threading.Event waits, so a broken test fails instead of hanging
WATCHDOG_S = 5  # the same for the main loop while a test has an IOThread
RW = BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE

NULL_CO = {"driver": "null-co", "size": SIZE}
NULL_CO_LAT = {"driver": "null-co", "size": SIZE, "latency-ns": LATENCY}
NULL_AIO = {"driver": "null-aio", "size": SIZE}
NULL_AIO_LAT = {"driver": "null-aio", "size": SIZE, "latency-ns": LATENCY}
NULL_DRIVERS = pytest.mark.parametrize("opts", [NULL_CO, NULL_CO_LAT, NULL_AIO, NULL_AIO_LAT],
                                       ids=["null-co", "null-co-latency", "null-aio", "null-aio-latency"])


# --------------------------------------------------------------------------
# Helpers and fixtures


class PlugMemDriver(type(bdrv_find_format(memdrv_name("co")))):
    """test-mem (co style) that also logs bdrv_io_plug/unplug and the coroutine of every write."""

    format_name = "test-blk-plug"
    protocol_name = "test-blk-plug"

    def bdrv_io_plug(self, bs):
        bs.opaque.calls.append(("plug", 0, 0, 0))

    def bdrv_io_unplug(self, bs):
        bs.opaque.calls.append(("unplug", 0, 0, 0))

    def bdrv_co_pwritev(self, bs, offset, bytes, qiov, flags):
        bs.opaque.calls.append(("write-co", qemu_coroutine_self(), 0, 0))
        return super().bdrv_co_pwritev(bs, offset, bytes, qiov, flags)


bdrv_register(PlugMemDriver)


class RecordingDevOps(BlockDevOps):
    """A device's BlockDevOps that logs every callback with its opaque."""

    def __init__(self, tray_open=False):
        self.log = []
        self.tray_open = tray_open

    def drained_begin(self, opaque):
        self.log.append(("drained_begin", opaque))

    def drained_end(self, opaque):
        self.log.append(("drained_end", opaque))

    def resize_cb(self, opaque):
        self.log.append(("resize", opaque))

    def is_tray_open(self, opaque):
        return self.tray_open


def open_blk(options, flags=BDRV_O_RDWR, name=None):
    """A BlockBackend over a new node graph opened from ``options``; named ``name`` if given."""
    blk = blk_new_open(None, None, dict(options), flags)
    if name is not None:
        monitor_add_blk(blk, name)
    return blk


def close_blk(blk):
    """Drop the monitor name and the last reference of ``blk``."""
    monitor_remove_blk(blk)
    blk_unref(blk)


def qiov_of(buf):
    return QEMUIOVector([memoryview(buf)], -1)


def poll_main(max_rounds=100):
    """Run the main loop without blocking until it has nothing left to do."""
    ctx = qemu_get_aio_context()
    for _ in range(max_rounds):
        if not aio_poll(ctx, False):
            return


class Recorder:
    """An AIO completion callback that records (opaque, ret, whether the blk_aio_* call had returned)."""

    def __init__(self):
        self.returned = False
        self.seen = []

    def __call__(self, opaque, ret):
        self.seen.append((opaque, ret, self.returned))


@pytest.fixture(autouse=True)
def _leftovers():
    """Whatever a failing test left behind (BlockBackends, run state) does not leak into the next test."""
    before = {id(b) for b in block_backends}
    yield
    for blk in [b for b in list(block_backends) if id(b) not in before]:
        monitor_remove_blk(blk)
        if blk.dev is not None:
            blk_detach_dev(blk, blk.dev)
        while blk in block_backends and blk.refcnt > 0:
            blk_unref(blk)
    runstate._reset_for_tests()


@pytest.fixture
def events():
    """The (name, data) of every QAPI event sent during the test."""
    log = []

    def listener(name, data, stamp):
        log.append((name, data))

    qapi_event_add_listener(listener)
    yield log
    qapi_event_remove_listener(listener)


@pytest.fixture
def iothread():
    """An IOThread for the test, destroyed afterwards; a main-loop watchdog turns a lost wake-up into a failure."""
    def bite(_):
        raise AssertionError(f"the main loop waited {WATCHDOG_S} s for a wake-up that never came "
                             "(an AIO_WAIT_WHILE condition changed after its last aio_wait_kick)")

    watchdog = aio_timer_new(qemu_get_aio_context(), QEMU_CLOCK_REALTIME, SCALE_NS, bite, None)
    timer_mod_ns(watchdog, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + WATCHDOG_S * 1_000_000_000)
    it = iothread_create("blk-test-iothread")
    yield it
    timer_del(watchdog)
    for blk in list(block_backends):  # what a failed test left in the IOThread comes home first
        if blk_get_aio_context(blk) is it.ctx:
            blk_set_aio_context(blk, qemu_get_aio_context())
    iothread_destroy(it)


# --------------------------------------------------------------------------
# QEMU's test-block-backend.c


def test_drain_aio_error():
    """A flush on a BlockBackend without a medium completes with -ENOMEDIUM, not before blk_drain."""
    blk = blk_new(qemu_get_aio_context(), BLK_PERM_ALL, BLK_PERM_ALL)
    completed = []
    acb = blk_aio_flush(blk, lambda opaque, ret: completed.append(ret), None)
    assert acb is not None
    assert completed == []
    blk_drain(blk)
    assert completed == [-errno.ENOMEDIUM]
    blk_unref(blk)


def test_drain_all_aio_error():
    """The same -ENOMEDIUM flush completes through blk_drain_all."""
    blk = blk_new(qemu_get_aio_context(), BLK_PERM_ALL, BLK_PERM_ALL)
    completed = []
    acb = blk_aio_flush(blk, lambda opaque, ret: completed.append(ret), None)
    assert acb is not None
    assert completed == []
    blk_drain_all()
    assert completed == [-errno.ENOMEDIUM]
    blk_unref(blk)


# --------------------------------------------------------------------------
# AIO completion is never reentrant


def _op_pwritev(blk, cb):
    return blk_aio_pwritev(blk, 4096, qiov_of(bytearray(b"w" * 512)), 0, cb, "pwritev")


def _op_preadv(blk, cb):
    return blk_aio_preadv(blk, 4096, qiov_of(bytearray(512)), 0, cb, "preadv")


def _op_flush(blk, cb):
    return blk_aio_flush(blk, cb, "flush")


def _op_pdiscard(blk, cb):
    return blk_aio_pdiscard(blk, 0, 4096, cb, "pdiscard")


def _op_pwrite_zeroes(blk, cb):
    return blk_aio_pwrite_zeroes(blk, 8192, 4096, 0, cb, "pwrite_zeroes")


AIO_OPS = {"pwritev": _op_pwritev, "preadv": _op_preadv, "flush": _op_flush, "pdiscard": _op_pdiscard,
           "pwrite_zeroes": _op_pwrite_zeroes}


@NULL_DRIVERS
@pytest.mark.parametrize("op", list(AIO_OPS))
def test_aio_callback_runs_once_after_return(opts, op):
    """The callback of every blk_aio_* request runs exactly once, and only after the call returned."""
    blk = open_blk(opts)
    rec = Recorder()
    acb = AIO_OPS[op](blk, rec)
    rec.returned = True
    assert acb is not None
    assert rec.seen == []
    assert blk.in_flight == 1
    blk_drain(blk)
    poll_main()
    assert rec.seen == [(op, 0, True)]
    assert blk.in_flight == 0
    blk_unref(blk)


@pytest.mark.parametrize("op", list(AIO_OPS))
def test_aio_synchronous_completion_waits_for_oneshot_bh(op):
    """A request whose coroutine finished inside blk_aio_* completes from one BH in the BlockBackend's context."""
    blk = open_blk(NULL_CO)
    rec = Recorder()
    acb = AIO_OPS[op](blk, rec)
    rec.returned = True
    assert acb.rwco.ret == 0  # the coroutine is done ...
    assert rec.seen == []     # ... but the callback waits for the BH
    assert aio_poll(qemu_get_aio_context(), False)
    assert rec.seen == [(op, 0, True)]
    assert blk.in_flight == 0
    blk_unref(blk)


def test_aio_asynchronous_completion_runs_callback_from_the_request():
    """A request still running when blk_aio_* returns calls back when its coroutine ends, with no BH needed."""
    blk = open_blk(NULL_CO_LAT)
    rec = Recorder()
    acb = _op_pwritev(blk, rec)
    rec.returned = True
    assert acb.rwco.ret == NOT_DONE
    blk_drain(blk)
    assert rec.seen == [("pwritev", 0, True)]
    assert not aio_poll(qemu_get_aio_context(), False)
    blk_unref(blk)


def test_aio_submitted_from_coroutine_completes_after_return():
    """blk_aio_* called inside a coroutine returns first; the request runs when the caller's coroutine ends."""
    blk = open_blk(NULL_CO)
    log = []

    def entry(_):
        acb = blk_aio_pwritev(blk, 0, qiov_of(bytearray(512)), 0, lambda o, r: log.append(("cb", r)), None)
        log.append(("returned", acb.rwco.ret))

    qemu_coroutine_enter(qemu_coroutine_create(entry, None))
    assert log == [("returned", NOT_DONE), ("cb", 0)]
    assert blk.in_flight == 0
    blk_unref(blk)


@pytest.mark.parametrize("opts", [NULL_CO, NULL_CO_LAT, NULL_AIO_LAT], ids=["null-co", "null-co-latency",
                                                                           "null-aio-latency"])
def test_aio_cancel_waits_for_completion(opts):
    """blk_aio_cancel returns only after the callback ran; an emulated request completes normally."""
    blk = open_blk(opts)
    rec = Recorder()
    acb = _op_pwritev(blk, rec)
    rec.returned = True
    assert rec.seen == []
    blk_aio_cancel(acb)
    assert rec.seen == [("pwritev", 0, True)]
    assert acb.refcnt == 0
    assert blk.in_flight == 0
    blk_unref(blk)


def test_aio_cancel_async_does_not_wait():
    """blk_aio_cancel_async returns at once; the request still completes once, with its own result."""
    blk = open_blk(NULL_CO_LAT)
    rec = Recorder()
    acb = _op_preadv(blk, rec)
    rec.returned = True
    blk_aio_cancel_async(acb)
    assert rec.seen == []
    blk_drain(blk)
    assert rec.seen == [("preadv", 0, True)]
    blk_unref(blk)


def test_abort_aio_request_completes_from_bh():
    """blk_abort_aio_request completes with the given error from a BH and counts as in flight until then."""
    blk = open_blk(NULL_CO)
    rec = Recorder()
    acb = blk_abort_aio_request(blk, rec, "abort", -errno.EIO)
    rec.returned = True
    assert rec.seen == []
    assert blk.in_flight == 1
    blk_drain(blk)
    assert rec.seen == [("abort", -errno.EIO, True)]
    assert blk.in_flight == 0
    assert acb.refcnt == 0
    blk_unref(blk)


def test_abort_aio_request_cancel_polls_the_blockbackend_context(iothread):
    """Cancelling an aborted request polls the BlockBackend's own AioContext, even without a medium."""
    ctx = iothread_get_aio_context(iothread)
    blk = blk_new(ctx, BLK_PERM_ALL, BLK_PERM_ALL)
    done = threading.Event()
    seen = []

    def in_iothread(_):
        acb = blk_abort_aio_request(blk, lambda o, r: seen.append(r), None, -errno.ENOSPC)
        blk_aio_cancel(acb)
        seen.append("cancel returned")
        done.set()

    aio_bh_schedule_oneshot(ctx, in_iothread, None)
    assert done.wait(WAIT_S)
    assert seen == [-errno.ENOSPC, "cancel returned"]
    blk_unref(blk)


# --------------------------------------------------------------------------
# blk_check_byte_request


def test_check_byte_request_beyond_end():
    """Requests that reach past the end fail with -EIO and never reach the driver."""
    blk = open_blk(memdrv_options("co", size=SIZE))
    s = blk_bs(blk).opaque
    assert blk_pread(blk, SIZE - 256, bytearray(512)) == -errno.EIO
    assert blk_pwrite(blk, SIZE - 256, bytearray(512)) == -errno.EIO
    assert blk_pread(blk, SIZE + 512, bytearray(0)) == -errno.EIO
    assert blk_pwrite_zeroes(blk, SIZE, 512) == -errno.EIO
    assert blk_pdiscard(blk, SIZE - 512, 1024) == -errno.EIO
    rec = Recorder()
    blk_aio_pwritev(blk, SIZE, qiov_of(bytearray(1)), 0, rec, "aio")
    rec.returned = True
    blk_drain(blk)
    assert rec.seen == [("aio", -errno.EIO, True)]
    assert blk_check_byte_request(blk, SIZE - 512, 513) == -errno.EIO
    assert s.calls == []
    blk_unref(blk)


def test_check_byte_request_negative_offset():
    """A negative offset is -EIO, whatever the length."""
    blk = open_blk(memdrv_options("co", size=SIZE))
    assert blk_pread(blk, -512, bytearray(512)) == -errno.EIO
    assert blk_pwrite(blk, -1, bytearray(1)) == -errno.EIO
    assert blk_check_byte_request(blk, -1, 0) == -errno.EIO
    assert blk_bs(blk).opaque.calls == []
    blk_unref(blk)


def test_check_byte_request_no_medium():
    """Without a medium every request fails with -ENOMEDIUM, and so do length and truncate."""
    blk = open_blk(NULL_CO)
    blk_remove_bs(blk)
    assert not blk_is_inserted(blk)
    assert not blk_is_available(blk)
    assert blk_getlength(blk) == -errno.ENOMEDIUM
    assert blk_pread(blk, 0, bytearray(512)) == -errno.ENOMEDIUM
    assert blk_pwrite(blk, 0, bytearray(512)) == -errno.ENOMEDIUM
    assert blk_pwrite_zeroes(blk, 0, 512) == -errno.ENOMEDIUM
    assert blk_pdiscard(blk, 0, 512) == -errno.ENOMEDIUM
    assert blk_flush(blk) == -errno.ENOMEDIUM
    assert blk_check_byte_request(blk, -1, 0) == -errno.ENOMEDIUM  # the medium is checked before the offset
    errp = []
    assert blk_truncate(blk, 0, errp=errp) == -errno.ENOMEDIUM
    assert [str(e) for e in errp] == ["No medium inserted"]
    blk_unref(blk)


def test_check_byte_request_tray_open():
    """An open tray makes the medium unavailable: -ENOMEDIUM although a node is inserted."""
    blk = open_blk(NULL_CO)
    ops = RecordingDevOps(tray_open=True)
    blk_set_dev_ops(blk, ops, "dev")
    assert blk_is_inserted(blk)
    assert not blk_is_available(blk)
    assert blk_pread(blk, 0, bytearray(512)) == -errno.ENOMEDIUM
    ops.tray_open = False
    assert blk_pread(blk, 0, bytearray(512)) == 512
    blk_set_dev_ops(blk, None, None)
    blk_unref(blk)


def test_check_byte_request_size_above_int_max():
    """A request larger than INT_MAX is -EIO, checked before the medium and beyond-EOF permission."""
    blk = open_blk({"driver": "null-co", "size": 4 << 30})
    assert blk_check_byte_request(blk, 0, INT_MAX) == 0
    assert blk_check_byte_request(blk, 0, INT_MAX + 1) == -errno.EIO
    assert blk_pwrite_zeroes(blk, 0, INT_MAX + 1) == -errno.EIO
    assert blk_check_byte_request(blk, 0, -1) == -errno.EIO
    blk_set_allow_write_beyond_eof(blk, True)
    assert blk_check_byte_request(blk, 0, INT_MAX + 1) == -errno.EIO
    blk_remove_bs(blk)
    assert blk_check_byte_request(blk, 0, INT_MAX + 1) == -errno.EIO
    blk_unref(blk)


def test_check_byte_request_zero_bytes_at_end():
    """A 0-byte request exactly at the end is fine; one byte further is not."""
    blk = open_blk(memdrv_options("co", size=SIZE))
    assert blk_check_byte_request(blk, SIZE, 0) == 0
    assert blk_pread(blk, SIZE, bytearray(0)) == 0
    assert blk_pwrite(blk, SIZE, bytearray(0)) == 0
    assert blk_check_byte_request(blk, SIZE + 1, 0) == -errno.EIO
    assert blk_check_byte_request(blk, 0, SIZE) == 0
    blk_unref(blk)


def test_allow_write_beyond_eof():
    """With allow_write_beyond_eof a write past the end grows the node and tells the device (resize_cb)."""
    blk = open_blk(NULL_CO, BDRV_O_RDWR | BDRV_O_RESIZE)
    ops = RecordingDevOps()
    blk_set_dev_ops(blk, ops, "dev")
    assert blk_pwrite(blk, SIZE, bytearray(512)) == -errno.EIO
    blk_set_allow_write_beyond_eof(blk, True)
    assert blk_pwrite(blk, SIZE, bytearray(512)) == 512
    assert blk_getlength(blk) == SIZE + 512
    assert ops.log == [("resize", "dev")]
    assert blk_pread(blk, -1, bytearray(1)) == -errno.EIO  # the offset is still checked
    blk_set_dev_ops(blk, None, None)
    blk_unref(blk)


# --------------------------------------------------------------------------
# Write cache


def test_write_cache_on_by_default():
    """A new BlockBackend has its write cache on: writes carry no FUA and cause no flush."""
    blk = open_blk(memdrv_options("co", size=SIZE, fua=True))
    assert blk_enable_write_cache(blk)
    assert blk_pwrite(blk, 0, bytearray(512)) == 512
    s = blk_bs(blk).opaque
    assert s.calls == [("write", 0, 512, 0)]
    assert s.flushes == 0
    blk_unref(blk)


def test_write_cache_off_sends_fua():
    """With the write cache off every write reaches a FUA-capable driver with BDRV_REQ_FUA and no flush."""
    blk = open_blk(memdrv_options("co", size=SIZE, fua=True))
    blk_set_enable_write_cache(blk, False)
    assert not blk_enable_write_cache(blk)
    assert blk_pwrite(blk, 0, bytearray(512)) == 512
    assert blk_pwrite(blk, 512, bytearray(512)) == 512
    rec = Recorder()
    blk_aio_pwritev(blk, 4096, qiov_of(bytearray(1024)), 0, rec, None)
    blk_drain(blk)
    assert blk_pwrite_zeroes(blk, 8192, 512) == 0
    s = blk_bs(blk).opaque
    assert s.calls == [("write", 0, 512, BDRV_REQ_FUA), ("write", 512, 512, BDRV_REQ_FUA),
                       ("write", 4096, 1024, BDRV_REQ_FUA), ("write", 8192, 512, BDRV_REQ_FUA)]
    assert s.flushes == 0
    blk_unref(blk)


def test_write_cache_off_without_fua_flushes_after_each_write():
    """With the write cache off and a driver without FUA, each write is followed by exactly one flush."""
    blk = open_blk(memdrv_options("co", size=SIZE))
    blk_set_enable_write_cache(blk, False)
    for i in range(3):
        assert blk_pwrite(blk, i * 512, bytearray(512)) == 512
    s = blk_bs(blk).opaque
    assert s.calls == [("write", 0, 512, 0), ("flush", 0, 0, 0),
                       ("write", 512, 512, 0), ("flush", 0, 0, 0),
                       ("write", 1024, 512, 0), ("flush", 0, 0, 0)]
    assert s.flushes == 3
    blk_unref(blk)


# --------------------------------------------------------------------------
# Drain


def test_requests_queue_while_drained():
    """Requests issued while the node is drained wait in the BlockBackend and run, in order, after drained_end."""
    blk = open_blk(memdrv_options("co", size=SIZE))
    bs = blk_bs(blk)
    bdrv_drained_begin(bs)
    assert blk.quiesce_counter == 1
    order = []
    cb = lambda opaque, ret: order.append((opaque, ret))  # noqa: E731
    blk_aio_pwritev(blk, 0, qiov_of(bytearray(b"x" * 512)), 0, cb, "write")
    blk_aio_preadv(blk, 0, qiov_of(bytearray(512)), 0, cb, "read")
    blk_aio_flush(blk, cb, "flush")
    poll_main()
    assert order == []
    assert bs.opaque.calls == []
    assert blk.in_flight == 0  # a queued request does not hold the drained section up
    bdrv_drained_end(bs)
    assert blk.quiesce_counter == 0
    blk_drain(blk)
    assert order == [("write", 0), ("read", 0), ("flush", 0)]
    assert bs.opaque.calls == [("write", 0, 512, 0), ("read", 0, 512, 0), ("flush", 0, 0, 0)]
    blk_unref(blk)


def test_coroutine_request_queues_while_drained():
    """A blk_co_* request from a coroutine also parks while drained and finishes after drained_end."""
    blk = open_blk(memdrv_options("co", size=SIZE))
    bs = blk_bs(blk)
    result = []

    def entry(_):
        result.append(blk_co_pwritev(blk, 0, 512, qiov_of(bytearray(512)), 0))

    bdrv_drained_begin(bs)
    qemu_coroutine_enter(qemu_coroutine_create(entry, None))
    assert result == []
    bdrv_drained_end(bs)
    assert result == [0]
    assert bs.opaque.calls == [("write", 0, 512, 0)]
    blk_unref(blk)


def test_disable_request_queuing():
    """With request queuing disabled, requests go to the driver even while drained."""
    blk = open_blk(memdrv_options("co", size=SIZE))
    bs = blk_bs(blk)
    blk_set_disable_request_queuing(blk, True)
    bdrv_drained_begin(bs)
    rec = Recorder()
    blk_aio_pwritev(blk, 0, qiov_of(bytearray(512)), 0, rec, "write")
    rec.returned = True
    assert bs.opaque.calls == [("write", 0, 512, 0)]
    poll_main()
    assert rec.seen == [("write", 0, True)]
    bdrv_drained_end(bs)
    blk_unref(blk)


def test_blk_drain_waits_for_in_flight_aio_and_callbacks():
    """blk_drain returns after every in-flight request's callback ran; the BlockBackend counts it until then."""
    blk = open_blk(NULL_CO_LAT)
    seen = []

    def cb(opaque, ret):
        seen.append((opaque, ret, blk.in_flight))

    blk_aio_pwritev(blk, 0, qiov_of(bytearray(512)), 0, cb, "a")
    blk_aio_preadv(blk, 512, qiov_of(bytearray(512)), 0, cb, "b")
    blk_aio_flush(blk, cb, "c")
    assert seen == []
    blk_drain(blk)
    # The flush had nothing to write back and completed from its BH; the others when their latency ran out.
    assert seen == [("c", 0, 3), ("a", 0, 2), ("b", 0, 1)]
    assert blk.in_flight == 0
    blk_unref(blk)


def test_request_from_callback_during_blk_drain_runs_after_it():
    """A request a completion callback issues during blk_drain is queued, and runs once blk_drain ended."""
    blk = open_blk(NULL_CO_LAT)
    seen = []

    def cb(opaque, ret):
        seen.append(opaque)
        if opaque == "first":
            blk_aio_pwritev(blk, 0, qiov_of(bytearray(512)), 0, cb, "second")

    blk_aio_pwritev(blk, 0, qiov_of(bytearray(512)), 0, cb, "first")
    blk_drain(blk)
    assert seen == ["first"]
    assert blk.in_flight == 1  # "second" left the queue at drained_end and is now sleeping in the driver
    blk_drain(blk)
    assert seen == ["first", "second"]
    blk_unref(blk)


def test_dev_ops_drained_begin_end_once_per_section():
    """The device hears drained_begin on the first and drained_end on the last of nested drained sections."""
    blk = open_blk(NULL_CO)
    bs = blk_bs(blk)
    ops = RecordingDevOps()
    blk_set_dev_ops(blk, ops, "dev")
    bdrv_drained_begin(bs)
    bdrv_drained_begin(bs)
    assert ops.log == [("drained_begin", "dev")]
    bdrv_drained_end(bs)
    assert ops.log == [("drained_begin", "dev")]
    bdrv_drained_end(bs)
    assert ops.log == [("drained_begin", "dev"), ("drained_end", "dev")]
    blk_drain(blk)
    assert ops.log == [("drained_begin", "dev"), ("drained_end", "dev")] * 2
    blk_set_dev_ops(blk, None, None)
    blk_unref(blk)


def test_drain_of_blockbackend_without_medium():
    """blk_drain and blk_drain_all work on a BlockBackend with nothing in flight and no medium."""
    blk = blk_new()
    blk_drain(blk)
    blk_drain_all()
    assert blk.in_flight == 0
    blk_unref(blk)


# --------------------------------------------------------------------------
# Life cycle, permissions, names


def test_blk_new_defaults():
    """blk_new gives one reference, no medium, write cache on, rerror=report, werror=enospc, iostatus off."""
    blk = blk_new()
    assert blk.refcnt == 1
    assert blk_bs(blk) is None
    assert blk_name(blk) == ""
    assert blk_get_perm(blk) == (0, BLK_PERM_ALL)
    assert blk_enable_write_cache(blk)
    assert blk_get_on_error(blk, True) is BlockdevOnError.BLOCKDEV_ON_ERROR_REPORT
    assert blk_get_on_error(blk, False) is BlockdevOnError.BLOCKDEV_ON_ERROR_ENOSPC
    assert not blk_iostatus_is_enabled(blk)
    assert blk_get_aio_context(blk) is qemu_get_aio_context()
    assert not blk_is_read_only(blk)
    all_blks = []
    b = blk_all_next(None)
    while b is not None:
        all_blks.append(b)
        b = blk_all_next(b)
    assert blk in all_blks
    named = []
    b = blk_next(None)
    while b is not None:
        named.append(b)
        b = blk_next(b)
    assert blk not in named
    blk_unref(blk)
    assert blk not in block_backends


def test_insert_remove_unref_life_cycle():
    """blk_insert_bs takes a node reference through a 'root' edge; blk_remove_bs and the last blk_unref drop it."""
    bs = bdrv_open(None, None, {"driver": "null-co", "node-name": "lc0"}, BDRV_O_RDWR)
    assert bs.refcnt == 1
    blk = blk_new(qemu_get_aio_context(), RW, BLK_PERM_ALL)
    blk_insert_bs(blk, bs)
    assert blk_bs(blk) is bs
    assert bs.refcnt == 2
    root = blk.root
    assert (root.name, root.klass, root.perm, root.shared_perm) == ("root", child_root, RW, BLK_PERM_ALL)
    assert root in bs.parents
    with pytest.raises(Error):
        blk_insert_bs(blk, bs)
    assert bs.refcnt == 2
    blk_remove_bs(blk)
    assert blk_bs(blk) is None
    assert bs.refcnt == 1
    assert bs.parents == []
    blk_insert_bs(blk, bs)
    assert blk_pwrite(blk, 0, bytearray(512)) == 512
    blk_unref(blk)
    assert blk not in block_backends
    assert bs.refcnt == 1
    assert bs.parents == []
    bdrv_unref(bs)


def test_blk_ref_keeps_the_blockbackend():
    """An extra reference keeps a BlockBackend (and the node only it holds) alive until the last blk_unref."""
    blk = open_blk(NULL_CO)
    bs = blk_bs(blk)
    blk_ref(blk)
    blk_unref(blk)
    assert blk in block_backends
    assert blk_pwrite(blk, 0, bytearray(512)) == 512
    blk_unref(blk)
    assert blk not in block_backends
    assert bs.drv is None  # the node was closed with its last reference


def test_blk_unref_drains_first():
    """The last blk_unref waits for in-flight requests, whose callbacks run before the BlockBackend goes."""
    blk = open_blk(NULL_CO_LAT)
    rec = Recorder()
    blk_aio_pwritev(blk, 0, qiov_of(bytearray(512)), 0, rec, "w")
    rec.returned = True
    blk_unref(blk)
    assert rec.seen == [("w", 0, True)]
    assert blk not in block_backends


def test_blk_new_with_perms_applies_them_on_insert():
    """blk_new's permissions become the root edge's when a node is inserted; without a node they are only kept."""
    bs = bdrv_open(None, None, {"driver": "null-co", "node-name": "perm0"}, BDRV_O_RDWR)
    blk = blk_new(qemu_get_aio_context(), BLK_PERM_CONSISTENT_READ, BLK_PERM_CONSISTENT_READ)
    blk_set_perm(blk, RW, BLK_PERM_ALL)  # no medium: just recorded
    assert blk_get_perm(blk) == (RW, BLK_PERM_ALL)
    blk_insert_bs(blk, bs)
    assert (blk.root.perm, blk.root.shared_perm) == (RW, BLK_PERM_ALL)
    blk_unref(blk)
    bdrv_unref(bs)


def test_insert_conflicts_with_exclusive_writer():
    """Inserting a node another BlockBackend writes exclusively fails with QEMU's message naming both users."""
    bs = bdrv_open(None, None, {"driver": "null-co", "node-name": "excl0"}, BDRV_O_RDWR)
    owner = blk_new(qemu_get_aio_context(), RW, BLK_PERM_CONSISTENT_READ)
    monitor_add_blk(owner, "drive0")
    blk_insert_bs(owner, bs)
    other = blk_new(qemu_get_aio_context(), BLK_PERM_WRITE, BLK_PERM_ALL)
    with pytest.raises(Error) as exc:
        blk_insert_bs(other, bs)
    assert str(exc.value) == (
        "Permission conflict on node 'excl0': permissions 'write' are both required by an unnamed block "
        "device (uses node 'excl0' as 'root' child) and unshared by block device 'drive0' (uses node "
        "'excl0' as 'root' child).")
    assert blk_bs(other) is None
    assert bs.refcnt == 2  # the failed insert gave its reference back
    assert len(bs.parents) == 1
    assert blk_pwrite(owner, 0, bytearray(512)) == 512
    blk_unref(other)
    close_blk(owner)
    bdrv_unref(bs)


def test_insert_conflicts_when_unsharing_what_others_use():
    """A BlockBackend that would unshare write from an existing writer is refused, naming it as the user."""
    bs = bdrv_open(None, None, {"driver": "null-co", "node-name": "excl1"}, BDRV_O_RDWR)
    writer = blk_new(qemu_get_aio_context(), RW, BLK_PERM_ALL)
    monitor_add_blk(writer, "drive1")
    blk_insert_bs(writer, bs)
    reader = blk_new(qemu_get_aio_context(), BLK_PERM_CONSISTENT_READ, BLK_PERM_CONSISTENT_READ)
    with pytest.raises(Error) as exc:
        blk_insert_bs(reader, bs)
    assert str(exc.value) == (
        "Permission conflict on node 'excl1': permissions 'write' are both required by block device "
        "'drive1' (uses node 'excl1' as 'root' child) and unshared by an unnamed block device (uses node "
        "'excl1' as 'root' child).")
    blk_unref(reader)
    close_blk(writer)
    bdrv_unref(bs)


def test_blk_set_perm_rolls_back_on_conflict():
    """A refused blk_set_perm changes nothing; once the other user shares, the same request succeeds."""
    bs = bdrv_open(None, None, {"driver": "null-co", "node-name": "perm1"}, BDRV_O_RDWR)
    a = blk_new(qemu_get_aio_context(), BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
    b = blk_new(qemu_get_aio_context(), BLK_PERM_CONSISTENT_READ, BLK_PERM_CONSISTENT_READ)
    blk_insert_bs(a, bs)
    blk_insert_bs(b, bs)
    with pytest.raises(Error) as exc:
        blk_set_perm(a, RW, BLK_PERM_ALL)
    assert str(exc.value).startswith("Permission conflict on node 'perm1': permissions 'write' are both required")
    assert blk_get_perm(a) == (BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
    assert (a.root.perm, a.root.shared_perm) == (BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
    blk_set_perm(b, BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
    blk_set_perm(a, RW, BLK_PERM_ALL)
    assert blk_get_perm(a) == (RW, BLK_PERM_ALL)
    assert a.root.perm == RW
    assert blk_pwrite(a, 0, bytearray(512)) == 512
    blk_unref(b)
    blk_unref(a)
    bdrv_unref(bs)


def test_monitor_names():
    """monitor_add_blk checks the name like QEMU; blk_by_name and blk_next see named BlockBackends only."""
    node = bdrv_open(None, None, {"driver": "null-co", "node-name": "namednode"}, BDRV_O_RDWR)
    a, b, anon = blk_new(), blk_new(), blk_new()
    monitor_add_blk(a, "disk-a")
    monitor_add_blk(b, "disk_b.1")
    for bad in ("", "1disk", "disk a", "disk/a"):
        with pytest.raises(Error, match="^Invalid device name$"):
            monitor_add_blk(anon, bad)
    with pytest.raises(Error, match="^Device with id 'disk-a' already exists$"):
        monitor_add_blk(anon, "disk-a")
    with pytest.raises(Error, match="^Device name 'namednode' conflicts with an existing node name$"):
        monitor_add_blk(anon, "namednode")
    with pytest.raises(AssertionError):
        monitor_add_blk(a, "renamed")
    assert blk_name(anon) == ""
    assert blk_by_name("disk-a") is a
    assert blk_by_name("disk_b.1") is b
    assert blk_by_name("nope") is None
    named = []
    x = blk_next(None)
    while x is not None:
        named.append(x)
        x = blk_next(x)
    assert [blk_name(x) for x in named if x in (a, b, anon)] == ["disk-a", "disk_b.1"]
    monitor_remove_blk(a)
    assert blk_by_name("disk-a") is None
    assert blk_name(a) == ""
    monitor_add_blk(anon, "disk-a")  # the name is free again
    assert blk_by_name("disk-a") is anon
    for blk in (a, b, anon):
        close_blk(blk)
    bdrv_unref(node)


def test_node_name_conflicts_with_device_name():
    """Opening a node whose node-name is a BlockBackend's name fails with QEMU's message."""
    blk = blk_new()
    monitor_add_blk(blk, "samename")
    with pytest.raises(Error, match="^node-name=samename is conflicting with a device id$"):
        bdrv_open(None, None, {"driver": "null-co", "node-name": "samename"}, BDRV_O_RDWR)
    close_blk(blk)


@pytest.mark.parametrize("filename,options,size", [
    ("null-co://", {"driver": "null-co"}, 1 << 30),
    (None, {"driver": "null-co", "size": 65536}, 65536),
    (None, "driver=null-co,size=4096", 4096),
    ('json:{"driver": "null-co", "size": 8192}', None, 8192),
], ids=["filename", "dict", "keyval", "json"])
def test_blk_new_open(filename, options, size):
    """blk_new_open opens a node from a filename, an options dict, a key=value string or json:."""
    blk = blk_new_open(filename, None, options, BDRV_O_RDWR)
    assert blk_getlength(blk) == size
    assert blk_bs(blk).drv.format_name == "null-co"
    assert blk_pwrite(blk, 0, bytearray(512)) == 512
    blk_unref(blk)


def test_blk_new_open_reference():
    """blk_new_open by reference attaches to an existing node and takes a reference on it."""
    bs = bdrv_open(None, None, {"driver": "null-co", "node-name": "ref0"}, BDRV_O_RDWR)
    blk = blk_new_open(None, "ref0", None, BDRV_O_RDWR)
    assert blk_bs(blk) is bs
    assert bs.refcnt == 2
    blk_unref(blk)
    assert bs.refcnt == 1
    bdrv_unref(bs)


@pytest.mark.parametrize("options,message", [
    ({"driver": "nope"}, "Unknown driver 'nope'"),
    ({"driver": "null-co", "foo": "bar"}, "Block protocol 'null-co' doesn't support the option 'foo'"),
])
def test_blk_new_open_failure_leaves_nothing(options, message):
    """A failed blk_new_open raises QEMU's message and leaves no BlockBackend behind."""
    before = len(block_backends)
    with pytest.raises(Error) as exc:
        blk_new_open(None, None, options, BDRV_O_RDWR)
    assert str(exc.value) == message
    assert len(block_backends) == before


@pytest.mark.parametrize("flags,perm,read_only", [
    (0, BLK_PERM_CONSISTENT_READ, True),
    (BDRV_O_RDWR, RW, False),
    (BDRV_O_RDWR | BDRV_O_RESIZE, RW | BLK_PERM_RESIZE, False),
    (BDRV_O_NO_IO, 0, True),
], ids=["ro", "rw", "rw-resize", "no-io"])
def test_blk_new_open_flags(flags, perm, read_only):
    """blk_new_open asks for the permissions its flags imply, and the node is read-only without BDRV_O_RDWR."""
    blk = blk_new_open(None, None, dict(NULL_CO), flags)
    assert blk_get_perm(blk) == (perm, BLK_PERM_ALL)
    assert blk.root.perm == perm
    assert blk_is_read_only(blk) is read_only
    blk_unref(blk)


def test_write_to_read_only_blockbackend_fails_with_eperm():
    """Writing through a read-only BlockBackend fails with -EPERM; reading works."""
    blk = open_blk(memdrv_options("co", size=SIZE), 0)
    assert blk_pwrite(blk, 0, bytearray(512)) == -errno.EPERM
    assert blk_pread(blk, 0, bytearray(512)) == 512
    assert blk_bs(blk).opaque.calls == [("read", 0, 512, 0)]
    blk_unref(blk)


def test_attach_detach_dev_reference():
    """blk_attach_dev takes a reference and refuses a second device; blk_detach_dev drops it and the dev ops."""
    blk = blk_new()
    dev = object()
    assert blk_attach_dev(blk, dev) == 0
    assert blk.refcnt == 2
    assert blk_attach_dev(blk, object()) == -errno.EBUSY
    blk_set_dev_ops(blk, RecordingDevOps(), dev)
    blk_detach_dev(blk, dev)
    assert blk.refcnt == 1
    assert blk.dev is None and blk.dev_ops is None and blk.dev_opaque is None
    blk_unref(blk)


def test_aio_context_change_needs_a_monitor_blockbackend_without_device(iothread):
    """Moving a node refuses an unnamed BlockBackend or one with a device, unless the BlockBackend allows it."""
    ctx = iothread_get_aio_context(iothread)
    main = qemu_get_aio_context()
    blk = open_blk(NULL_CO)
    bs = blk_bs(blk)
    with pytest.raises(Error, match="^Cannot change iothread of active block backend$"):
        bdrv_try_set_aio_context(bs, ctx)
    assert bdrv_get_aio_context(bs) is main
    monitor_add_blk(blk, "movable")
    bdrv_try_set_aio_context(bs, ctx)
    assert blk_get_aio_context(blk) is ctx
    bdrv_try_set_aio_context(bs, main)
    dev = object()
    blk_attach_dev(blk, dev)
    with pytest.raises(Error, match="^Cannot change iothread of active block backend$"):
        bdrv_try_set_aio_context(bs, ctx)
    blk_set_allow_aio_context_change(blk, True)
    bdrv_try_set_aio_context(bs, ctx)
    assert blk_get_aio_context(blk) is ctx
    bdrv_try_set_aio_context(bs, main)
    blk_detach_dev(blk, dev)
    close_blk(blk)


# --------------------------------------------------------------------------
# Error policies, BLOCK_IO_ERROR, VM stop, iostatus

REPORT = BlockErrorAction.BLOCK_ERROR_ACTION_REPORT
IGNORE = BlockErrorAction.BLOCK_ERROR_ACTION_IGNORE
STOP = BlockErrorAction.BLOCK_ERROR_ACTION_STOP
ON = BlockdevOnError

# blk_get_error_action: policy -> (action for ENOSPC, action for EIO), as block-backend.c decides it.
ERROR_ACTIONS = {
    ON.BLOCKDEV_ON_ERROR_REPORT: (REPORT, REPORT),
    ON.BLOCKDEV_ON_ERROR_IGNORE: (IGNORE, IGNORE),
    ON.BLOCKDEV_ON_ERROR_ENOSPC: (STOP, REPORT),
    ON.BLOCKDEV_ON_ERROR_STOP: (STOP, STOP),
}


@pytest.mark.parametrize("policy", list(ERROR_ACTIONS), ids=lambda p: p.value)
@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("is_read", [True, False], ids=["read", "write"])
def test_get_error_action(policy, error, is_read):
    """blk_get_error_action maps each policy and errno to QEMU's action, using rerror for reads, werror for writes."""
    blk = blk_new()
    other = ON.BLOCKDEV_ON_ERROR_IGNORE if policy is not ON.BLOCKDEV_ON_ERROR_IGNORE else ON.BLOCKDEV_ON_ERROR_STOP
    if is_read:
        blk_set_on_error(blk, policy, other)
    else:
        blk_set_on_error(blk, other, policy)
    assert blk_get_on_error(blk, is_read) is policy
    expected = ERROR_ACTIONS[policy][0 if error == errno.ENOSPC else 1]
    assert blk_get_error_action(blk, is_read, error) is expected
    blk_unref(blk)


def test_get_error_action_auto_is_a_bug():
    """werror=auto has no action of its own: asking for one is a programming error, as QEMU's abort()."""
    blk = blk_new()
    blk_set_on_error(blk, ON.BLOCKDEV_ON_ERROR_AUTO, ON.BLOCKDEV_ON_ERROR_AUTO)
    with pytest.raises(AssertionError):
        blk_get_error_action(blk, True, errno.EIO)
    blk_unref(blk)


def test_error_action_report_sends_block_io_error(events):
    """A report action sends BLOCK_IO_ERROR with QEMU's keys, without 'nospace' while iostatus is off."""
    blk = open_blk(dict(NULL_CO, **{"node-name": "ev0"}), name="drive-ev")
    blk_error_action(blk, REPORT, False, errno.EIO)
    poll_main()
    assert events == [("BLOCK_IO_ERROR", {"device": "drive-ev", "node-name": "ev0", "operation": "write",
                                          "action": "report", "reason": "Input/output error"})]
    assert list(events[0][1]) == ["device", "node-name", "operation", "action", "reason"]
    assert runstate.runstate_is_running()
    close_blk(blk)


def test_error_action_ignore_read(events):
    """An ignore action on a read is still reported as an event, with operation 'read'."""
    blk = open_blk(dict(NULL_CO, **{"node-name": "ev1"}), name="drive-ev1")
    blk_error_action(blk, IGNORE, True, errno.ENOSPC)
    assert events == [("BLOCK_IO_ERROR", {"device": "drive-ev1", "node-name": "ev1", "operation": "read",
                                          "action": "ignore", "reason": "No space left on device"})]
    close_blk(blk)


@pytest.mark.parametrize("error,nospace", [(errno.ENOSPC, True), (errno.EIO, False)])
def test_error_action_nospace_only_with_iostatus(events, error, nospace):
    """With iostatus enabled the event carries 'nospace', true only for ENOSPC."""
    blk = open_blk(dict(NULL_CO, **{"node-name": "ev2"}), name="drive-ev2")
    blk_iostatus_enable(blk)
    blk_error_action(blk, REPORT, False, error)
    assert events == [("BLOCK_IO_ERROR", {"device": "drive-ev2", "node-name": "ev2", "operation": "write",
                                          "action": "report", "nospace": nospace,
                                          "reason": "No space left on device" if nospace else
                                          "Input/output error"})]
    assert list(events[0][1]) == ["device", "node-name", "operation", "action", "nospace", "reason"]
    close_blk(blk)


def test_error_action_without_name_or_medium(events):
    """An unnamed BlockBackend reports device '' and, without a medium, no 'node-name' at all."""
    blk = blk_new()
    blk_error_action(blk, REPORT, True, errno.EIO)
    assert events == [("BLOCK_IO_ERROR", {"device": "", "operation": "read", "action": "report",
                                          "reason": "Input/output error"})]
    blk_unref(blk)


def test_error_action_stop_requests_vm_stop(events):
    """A stop action sets the iostatus, sends BLOCK_IO_ERROR, and stops the VM (io-error) from the main loop."""
    blk = open_blk(dict(NULL_CO, **{"node-name": "ev3"}), name="drive-ev3")
    blk_iostatus_enable(blk)
    blk_error_action(blk, STOP, False, errno.ENOSPC)
    assert blk_iostatus(blk) is BlockDeviceIoStatus.BLOCK_DEVICE_IO_STATUS_NOSPACE
    assert [e[0] for e in events] == ["BLOCK_IO_ERROR"]
    assert events[0][1]["action"] == "stop"
    assert runstate.runstate_is_running()  # the stop is a request ...
    aio_poll(qemu_get_aio_context(), False)
    assert runstate.runstate_get() is runstate.RunState.RUN_STATE_IO_ERROR  # ... served by the main loop
    assert [e[0] for e in events] == ["BLOCK_IO_ERROR", "STOP"]
    close_blk(blk)


def test_error_action_takes_a_positive_errno():
    """blk_error_action wants a positive errno, as QEMU asserts."""
    blk = blk_new()
    with pytest.raises(AssertionError):
        blk_error_action(blk, REPORT, False, -errno.EIO)
    blk_unref(blk)


@pytest.mark.parametrize("rerror,werror,enabled", [
    (ON.BLOCKDEV_ON_ERROR_REPORT, ON.BLOCKDEV_ON_ERROR_ENOSPC, True),
    (ON.BLOCKDEV_ON_ERROR_REPORT, ON.BLOCKDEV_ON_ERROR_STOP, True),
    (ON.BLOCKDEV_ON_ERROR_STOP, ON.BLOCKDEV_ON_ERROR_REPORT, True),
    (ON.BLOCKDEV_ON_ERROR_REPORT, ON.BLOCKDEV_ON_ERROR_REPORT, False),
    (ON.BLOCKDEV_ON_ERROR_ENOSPC, ON.BLOCKDEV_ON_ERROR_IGNORE, False),
    (ON.BLOCKDEV_ON_ERROR_IGNORE, ON.BLOCKDEV_ON_ERROR_IGNORE, False),
])
def test_iostatus_is_enabled_depends_on_policies(rerror, werror, enabled):
    """iostatus counts only once enabled and with werror=enospc/stop or rerror=stop."""
    blk = blk_new()
    blk_set_on_error(blk, rerror, werror)
    assert not blk_iostatus_is_enabled(blk)
    blk_iostatus_enable(blk)
    assert blk_iostatus_is_enabled(blk) is enabled
    blk_unref(blk)


def test_iostatus_first_error_wins():
    """The first error since the last reset sets the iostatus (NOSPACE for ENOSPC, FAILED otherwise)."""
    blk = blk_new()
    OK = BlockDeviceIoStatus.BLOCK_DEVICE_IO_STATUS_OK
    blk_iostatus_set_err(blk, errno.EIO)  # not enabled: nothing recorded
    assert blk_iostatus(blk) is OK
    blk_iostatus_enable(blk)
    assert blk_iostatus(blk) is OK
    blk_iostatus_set_err(blk, errno.EIO)
    assert blk_iostatus(blk) is BlockDeviceIoStatus.BLOCK_DEVICE_IO_STATUS_FAILED
    blk_iostatus_set_err(blk, errno.ENOSPC)
    assert blk_iostatus(blk) is BlockDeviceIoStatus.BLOCK_DEVICE_IO_STATUS_FAILED
    blk_iostatus_reset(blk)
    assert blk_iostatus(blk) is OK
    blk_iostatus_set_err(blk, errno.ENOSPC)
    assert blk_iostatus(blk) is BlockDeviceIoStatus.BLOCK_DEVICE_IO_STATUS_NOSPACE
    blk_iostatus_set_err(blk, errno.EIO)
    assert blk_iostatus(blk) is BlockDeviceIoStatus.BLOCK_DEVICE_IO_STATUS_NOSPACE
    dev = object()
    blk_attach_dev(blk, dev)  # attaching a device resets the iostatus
    assert blk_iostatus(blk) is OK
    blk_detach_dev(blk, dev)
    blk_unref(blk)


# --------------------------------------------------------------------------
# Limits and plugging


def test_max_transfer():
    """blk_get_max_transfer is the node's max_transfer, or INT_MAX when it has none or there is no medium."""
    blk = open_blk(NULL_CO)
    assert blk_get_max_transfer(blk) == INT_MAX
    limited = open_blk(memdrv_options("co", size=SIZE, max_transfer=65536))
    assert blk_get_max_transfer(limited) == 65536
    empty = blk_new()
    assert blk_get_max_transfer(empty) == INT_MAX
    for b in (blk, limited, empty):
        blk_unref(b)


def test_max_iov_and_request_alignment():
    """blk_get_max_iov is IOV_MAX by default; blk_get_request_alignment is the node's, 512 without one."""
    co = open_blk(NULL_CO)
    aligned = open_blk(memdrv_options("co", size=SIZE, align=4096))
    sector = open_blk(memdrv_options("sector", size=SIZE))
    empty = blk_new()
    assert blk_get_max_iov(co) == IOV_MAX
    assert blk_get_request_alignment(co) == 1
    assert blk_get_request_alignment(aligned) == 4096
    assert blk_get_request_alignment(sector) == 512
    assert blk_get_request_alignment(empty) == 512
    for b in (co, aligned, sector, empty):
        blk_unref(b)


def test_io_plug_reaches_driver_once_per_outermost_plug():
    """Nested blk_io_plug/unplug call the driver's bdrv_io_plug and bdrv_io_unplug once, at the outermost level."""
    blk = open_blk({"driver": "test-blk-plug", "size": SIZE})
    calls = blk_bs(blk).opaque.calls
    blk_io_plug(blk)
    blk_io_plug(blk)
    assert calls == [("plug", 0, 0, 0)]
    blk_io_unplug(blk)
    assert calls == [("plug", 0, 0, 0)]
    blk_io_unplug(blk)
    assert calls == [("plug", 0, 0, 0), ("unplug", 0, 0, 0)]
    blk_io_plug(blk)
    blk_io_unplug(blk)
    assert calls == [("plug", 0, 0, 0), ("unplug", 0, 0, 0)] * 2
    empty = blk_new()
    blk_io_plug(empty)  # no medium: nothing to plug
    blk_io_unplug(empty)
    blk_unref(empty)
    blk_unref(blk)


def test_io_plug_reaches_protocol_below_format():
    """Plugging a BlockBackend on raw reaches the protocol driver below it, once per outermost plug."""
    blk = open_blk({"driver": "raw", "file": {"driver": "test-blk-plug", "size": SIZE}})
    calls = blk_bs(blk).file.bs.opaque.calls
    blk_io_plug(blk)
    blk_io_plug(blk)
    blk_io_unplug(blk)
    blk_io_unplug(blk)
    assert calls == [("plug", 0, 0, 0), ("unplug", 0, 0, 0)]
    blk_unref(blk)


# --------------------------------------------------------------------------
# Synchronous wrappers


def test_sync_wrappers_return_byte_counts():
    """blk_pread/blk_pwrite return the byte count and move the data; flush, discard and zeroes return 0."""
    blk = open_blk(memdrv_options("co", size=SIZE))
    data = bytearray(range(256)) * 8
    assert blk_pwrite(blk, 4096, data) == 2048
    back = bytearray(2048)
    assert blk_pread(blk, 4096, back) == 2048
    assert back == data
    assert blk_pwrite(blk, 0, bytearray(b"\xff" * 1024), 100) == 100
    part = bytearray(1024)
    assert blk_pread(blk, 0, part, 200) == 200
    assert part[:100] == b"\xff" * 100 and part[100:] == bytes(924)
    assert blk_pwrite_zeroes(blk, 4096, 512) == 0
    assert blk_pread(blk, 4096, back) == 2048
    assert back == bytes(512) + data[512:]
    assert blk_flush(blk) == 0
    assert blk_pdiscard(blk, 0, 4096) == 0
    blk_unref(blk)


def test_sync_wrappers_inside_coroutine_run_directly():
    """Inside a coroutine blk_pwrite/blk_pread run in that coroutine, yielding while the driver sleeps."""
    blk = open_blk({"driver": "test-blk-plug", "size": SIZE, "latency-ns": LATENCY})
    result = []
    me = []

    def entry(_):
        me.append(qemu_coroutine_self())
        result.append(blk_pwrite(blk, 0, bytearray(b"a" * 512)))
        buf = bytearray(512)
        result.append(blk_pread(blk, 0, buf))
        result.append(bytes(buf[:1]))

    qemu_coroutine_enter(qemu_coroutine_create(entry, None))
    assert result == []  # sleeping in the driver
    while len(result) < 3:
        aio_poll(qemu_get_aio_context(), True)
    assert result == [512, 512, b"a"]
    calls = blk_bs(blk).opaque.calls
    assert calls[0] == ("write-co", me[0], 0, 0)
    blk_unref(blk)


# --------------------------------------------------------------------------
# A BlockBackend in an IOThread


def test_blockbackend_in_iothread(iothread):
    """A BlockBackend moved to an IOThread gives the same results, synchronously and through AIO."""
    ctx = iothread_get_aio_context(iothread)
    main = qemu_get_aio_context()
    blk = open_blk(memdrv_options("co", size=SIZE, latency_ns=LATENCY))
    blk_set_aio_context(blk, ctx)
    assert blk_get_aio_context(blk) is ctx
    assert bdrv_get_aio_context(blk_bs(blk)) is ctx

    back = bytearray(512)
    for i in range(16):
        data = bytearray([i + 1]) * 512
        assert blk_pwrite(blk, i * 512, data) == 512
        assert blk_pread(blk, i * 512, back) == 512
        assert back == data
    assert blk_pread(blk, SIZE, bytearray(1)) == -errno.EIO

    done = threading.Event()
    seen = []

    def cb(opaque, ret):
        seen.append((opaque, ret, threading.current_thread() is iothread.thread))
        if len(seen) == 2:
            done.set()

    aio_context_acquire(ctx)  # QEMU's rule for submitting from outside the context's thread
    try:
        blk_aio_pwritev(blk, 512, qiov_of(bytearray(b"z" * 512)), 0, cb, "main")
    finally:
        aio_context_release(ctx)
    aio_bh_schedule_oneshot(ctx, lambda _: blk_aio_flush(blk, cb, "iothread"), None)
    assert done.wait(WAIT_S)
    blk_drain(blk)
    assert sorted(seen) == [("iothread", 0, True), ("main", 0, True)]
    assert blk.in_flight == 0
    assert blk_pread(blk, 512, back) == 512
    assert back == b"z" * 512
    assert blk_pread(blk, 0, back) == 512
    assert back == b"\x01" * 512

    blk_set_aio_context(blk, main)
    assert blk_get_aio_context(blk) is main
    blk_unref(blk)


def test_drain_all_with_blockbackend_in_iothread(iothread):
    """blk_drain_all waits for the requests of a BlockBackend whose node lives in an IOThread."""
    ctx = iothread_get_aio_context(iothread)
    blk = open_blk(NULL_CO_LAT)
    blk_set_aio_context(blk, ctx)
    seen = []
    aio_bh_schedule_oneshot(ctx, lambda _: blk_aio_preadv(blk, 0, qiov_of(bytearray(512)), 0,
                                                          lambda o, r: seen.append(r), None), None)
    # Wait until the request is in flight, so that the drain has something to wait for.
    started = threading.Event()
    aio_bh_schedule_oneshot(ctx, lambda _: started.set(), None)
    assert started.wait(WAIT_S)
    blk_drain_all()
    assert seen == [0]
    blk_set_aio_context(blk, qemu_get_aio_context())
    blk_unref(blk)


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes_may_unmap_needs_discard_unmap(unmap):
    """MAY_UNMAP from blk_pwrite_zeroes reaches the driver only on a node opened with discard=unmap."""
    flags = BDRV_O_RDWR | (BDRV_O_UNMAP if unmap else 0)
    blk = blk_new_open(None, None, memdrv_options("co", write_zeroes=True, size=1 << 20), flags)
    assert blk_pwrite_zeroes(blk, 0, 4096, BDRV_REQ_MAY_UNMAP) == 0
    (op, off, nbytes, got), = blk_bs(blk).opaque.calls
    assert (op, off, nbytes) == ("write_zeroes", 0, 4096)
    assert bool(got & BDRV_REQ_MAY_UNMAP) == unmap
    blk_unref(blk)
