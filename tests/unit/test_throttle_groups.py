"""Throttle groups, the BlockBackend limits and the throttle filter (block/throttle-groups.c, block/throttle.c).

``test_groups`` ports test-throttle.c's ``/throttle/groups``.  The rest
checks the scheduling itself on the virtual clock: round robin between
members, exact waits (the times QEMU's algorithm gives, computed by
:func:`qemu_times` below with util/throttle.c's own functions, and the ones
real ``qemu-io`` prints for the same limits), bursts, iops, reconfiguration
and drain with queued requests, the ``throttle-group`` object and the filter.

Virtual times seen with real qemu-io 7.2 for the same limits (``-c 'write ...'``
one after another on ``driver=throttle,...,file.driver=null-co``):

* ``x-bps-write=1048576``, 2M then 1M: 0.00 s, 1.90 s;
* ``x-iops-write=10``, five 4k writes: 0.00, 0.00, 0.10, 0.10, 0.10 s;
  ``x-iops-size=4096`` with 8k writes: 0.00, 0.10, 0.20, 0.20 s;
* ``x-bps-write=1048576,x-bps-write-max=2097152,x-bps-write-max-length=2``,
  twelve 1M writes: 0.00, 0.40, 0.50 x5, 0.10, 1.00 x4 s.
"""
import re
import shutil
import subprocess

import pytest

from qblock.block.block_backend import (
    BlockBackend,
    block_backends,
    blk_aio_pwritev,
    blk_co_preadv,
    blk_co_pwritev,
    blk_drain,
    blk_insert_bs,
    blk_new,
    blk_new_open,
    blk_pdiscard,
    blk_pread,
    blk_pwrite,
    blk_pwrite_zeroes,
    blk_unref,
    blk_flush,
    blk_getlength,
    monitor_add_blk,
    monitor_remove_blk,
)
from qblock.block.driver import BDRV_BLOCK_RAW, BDRV_O_RDWR
from qblock.block.graph import (
    BLK_PERM_ALL,
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_WRITE,
    bdrv_drained_begin,
    bdrv_drained_end,
    bdrv_open,
    bdrv_unref,
)
from qblock.block.io import bdrv_block_status
from qblock.block.throttle_groups import (
    ThrottleGroupMember,
    blk_io_limits_enable,
    next_throttle_token,
    object_property_get,
    object_property_set,
    object_resolve_objects_root,
    qmp_block_set_io_throttle,
    qmp_object_add,
    throttle_group_config,
    throttle_group_exists,
    throttle_group_get_config,
    throttle_group_get_name,
    throttle_group_register_tgm,
    throttle_group_unregister_tgm,
    throttle_groups,
    user_creatable_del,
    user_creatable_process_cmdline,
)
from qblock.testing.memdrv import memdrv_options
from qblock.trace.control import trace_add_sink, trace_enable_events, trace_remove_sink
from qblock.util.aio import aio_poll, qemu_get_aio_context
from qblock.util.coroutine import qemu_coroutine_create, qemu_coroutine_enter
from qblock.util.error import Error
from qblock.util.iov import QEMUIOVector
from qblock.util.throttle import (
    THROTTLE_BPS_READ,
    THROTTLE_BPS_WRITE,
    THROTTLE_OPS_READ,
    THROTTLE_OPS_WRITE,
    THROTTLE_WRITE,
    ThrottleConfig,
    ThrottleState,
    throttle_account,
    throttle_compute_timer,
    throttle_config_init,
)
from qblock.util import timer
from qblock.util.timer import QEMU_CLOCK_REALTIME, QEMU_CLOCK_VIRTUAL, qemu_clock_get_ns, qemu_clock_step

MiB = 1 << 20
KiB = 1 << 10
SEC = 1_000_000_000
RW = BDRV_O_RDWR
FILTER = "driver=throttle,throttle-group=tg0,file.driver=null-co"


# --------------------------------------------------------------------------
# Helpers


@pytest.fixture(autouse=True)
def _no_group_left():
    """Every test leaves no throttle group and no throttle-group object behind."""
    before = set(map(id, block_backends))
    yield
    leftover = [tg.name for tg in throttle_groups]
    # A failed test may leave BlockBackends behind: drop them so the next test starts clean.
    for blk in [b for b in block_backends if id(b) not in before]:
        monitor_remove_blk(blk)
        blk.dev = None
        while blk.refcnt > 0 and blk in block_backends:
            blk_unref(blk)
    for tg in list(throttle_groups):
        if tg.parent is not None and tg.ref == 1:
            user_creatable_del(tg.parent)
    assert leftover == []


def now() -> int:
    return qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL)


def run_until(cond) -> None:
    ctx = qemu_get_aio_context()
    while not cond():
        aio_poll(ctx, True)


def qiov_of(size: int) -> QEMUIOVector:
    return QEMUIOVector([memoryview(bytearray(size))], -1)


def limits(**buckets) -> ThrottleConfig:
    """A ThrottleConfig from bucket averages, e.g. ``limits(BPS_WRITE=MiB)``."""
    cfg = ThrottleConfig()
    throttle_config_init(cfg)
    names = {"BPS_READ": THROTTLE_BPS_READ, "BPS_WRITE": THROTTLE_BPS_WRITE,
             "OPS_READ": THROTTLE_OPS_READ, "OPS_WRITE": THROTTLE_OPS_WRITE}
    for key, value in buckets.items():
        cfg.buckets[names[key]].avg = value
    return cfg


def qemu_times(cfg: ThrottleConfig, requests: list[tuple[int, int]], start: int = 0) -> list[int]:
    """When QEMU's algorithm lets each of ``requests`` ((direction, bytes), issued one after another) go.

    A request computes its wait when it arrives; if it must wait, it goes when
    its timer fires and is accounted then, without a second check.  This is
    util/throttle.c's arithmetic, run by hand for a single member.
    """
    ts = ThrottleState()
    ts.cfg = cfg
    ts.previous_leak = start
    t = start
    times = []
    for direction, size in requests:
        must_wait, when = throttle_compute_timer(ts, direction, t)
        if must_wait:
            t = when
        times.append(t - start)
        throttle_account(ts, direction, size)
    return times


def sequential_writes(blk: BlockBackend, sizes: list[int]) -> list[int]:
    """Write ``sizes`` one after another (as qemu-io -c 'write ...' does); times since the first, in ns."""
    t0 = now()
    times = []
    offset = 0
    for size in sizes:
        assert blk_pwrite(blk, offset % MiB, bytearray(size)) == size
        times.append(now() - t0)
        offset += size
    return times


def throttled_blk(**qmp) -> BlockBackend:
    """A named BlockBackend ``drive0`` on null-co with ``block_set_io_throttle`` limits (all others 0)."""
    blk = blk_new_open(None, None, "driver=null-co", RW)
    monitor_add_blk(blk, "drive0")
    args = dict(bps=0, bps_rd=0, bps_wr=0, iops=0, iops_rd=0, iops_wr=0)
    args.update(qmp)
    qmp_block_set_io_throttle(device="drive0", **args)
    return blk


def drop(blk: BlockBackend) -> None:
    monitor_remove_blk(blk)
    blk_unref(blk)


class AioLog:
    """Completions of blk_aio_pwritev requests: (offset, ret, virtual time)."""

    def __init__(self):
        self.done: list[tuple[int, int, int]] = []

    def submit(self, blk: BlockBackend, offset: int, size: int) -> None:
        blk_aio_pwritev(blk, offset, qiov_of(size), 0, self.cb, offset)

    def cb(self, offset: int, ret: int) -> None:
        self.done.append((offset, ret, now()))


# --------------------------------------------------------------------------
# test-throttle.c: /throttle/groups


def test_groups():
    """Members registered under one name share one ThrottleState and its configuration."""
    blks = [blk_new(qemu_get_aio_context(), 0, BLK_PERM_ALL) for _ in range(3)]
    tgm1, tgm2, tgm3 = (b.public.throttle_group_member for b in blks)
    assert tgm1.throttle_state is None and tgm2.throttle_state is None and tgm3.throttle_state is None

    throttle_group_register_tgm(tgm1, "bar", qemu_get_aio_context())
    throttle_group_register_tgm(tgm2, "foo", qemu_get_aio_context())
    throttle_group_register_tgm(tgm3, "bar", qemu_get_aio_context())

    assert tgm1.throttle_state is not None and tgm2.throttle_state is not None
    assert tgm3.throttle_state is not None
    assert throttle_group_get_name(tgm1) == "bar"
    assert throttle_group_get_name(tgm2) == "foo"
    assert tgm1.throttle_state is tgm3.throttle_state

    # A configuration set through one member is the whole group's.
    cfg1 = limits(BPS_READ=500000, BPS_WRITE=285000, OPS_READ=20000, OPS_WRITE=12000)
    throttle_group_config(tgm1, cfg1)
    cfg1 = throttle_group_get_config(tgm1, cfg1)
    cfg2 = throttle_group_get_config(tgm3, ThrottleConfig())
    assert cfg1 == cfg2

    # Changing a copy changes nothing; configuring through another member with cfg1 keeps them equal.
    cfg2.buckets[THROTTLE_BPS_READ].avg = 4547
    cfg2.buckets[THROTTLE_BPS_WRITE].avg = 1349
    cfg2.buckets[THROTTLE_OPS_READ].avg = 123
    cfg2.buckets[THROTTLE_OPS_WRITE].avg = 86
    throttle_group_config(tgm3, cfg1)
    cfg1 = throttle_group_get_config(tgm1, cfg1)
    cfg2 = throttle_group_get_config(tgm3, cfg2)
    assert cfg1 == cfg2

    throttle_group_unregister_tgm(tgm1)
    throttle_group_unregister_tgm(tgm2)
    throttle_group_unregister_tgm(tgm3)
    assert tgm1.throttle_state is None and tgm2.throttle_state is None and tgm3.throttle_state is None
    for blk in blks:
        blk_unref(blk)


def test_group_lives_while_it_has_members():
    """An implicit group exists from its first member to its last; the token passes on as members leave."""
    a, b = ThrottleGroupMember(name="a"), ThrottleGroupMember(name="b")
    throttle_group_register_tgm(a, "g", qemu_get_aio_context())
    throttle_group_register_tgm(b, "g", qemu_get_aio_context())
    assert throttle_group_exists("g")
    (tg,) = throttle_groups
    assert tg.head == [b, a] and tg.tokens == [a, a]   # new members go first; the first one holds the token

    throttle_group_unregister_tgm(a)
    assert tg.tokens == [b, b] and throttle_group_exists("g")
    throttle_group_unregister_tgm(b)
    assert not throttle_group_exists("g") and tg.tokens == [None, None]
    throttle_group_unregister_tgm(b)  # already out: nothing happens


def test_group_clock_is_virtual_only_under_qtest():
    """A group runs on the virtual clock in qtest mode and on the realtime clock otherwise, as QEMU's."""
    a, b = ThrottleGroupMember(name="a"), ThrottleGroupMember(name="b")
    throttle_group_register_tgm(a, "virt", qemu_get_aio_context())
    timer.qtest_set_enabled(False)
    try:
        throttle_group_register_tgm(b, "real", qemu_get_aio_context())
    finally:
        timer.qtest_set_enabled(True)
    assert [tg.clock_type for tg in throttle_groups] == [QEMU_CLOCK_VIRTUAL, QEMU_CLOCK_REALTIME]
    assert (a.throttle_timers.clock_type, b.throttle_timers.clock_type) == (QEMU_CLOCK_VIRTUAL, QEMU_CLOCK_REALTIME)
    throttle_group_unregister_tgm(a)
    throttle_group_unregister_tgm(b)


# --------------------------------------------------------------------------
# Round robin


def _writer(blk: BlockBackend, who: str, count: int, size: int, log: list) -> None:
    for i in range(count):
        assert blk_co_pwritev(blk, i * size, size, qiov_of(size)) == 0
        log.append((who, now()))


def test_fairness_two_blks_share_a_group_equally():
    """Two BlockBackends writing flat out in one group alternate: their shares never differ by over one request."""
    blks = []
    for name in ("drive0", "drive1"):
        blk = blk_new_open(None, None, "driver=null-aio", RW)  # completes from a BH: each write yields
        monitor_add_blk(blk, name)
        qmp_block_set_io_throttle(device=name, bps=0, bps_rd=0, bps_wr=MiB, iops=0, iops_rd=0, iops_wr=0,
                                  group="shared")
        blks.append(blk)
    assert len(throttle_groups) == 1

    log: list = []
    count, size = 8, 128 * KiB
    t0 = now()
    for blk, who in zip(blks, "AB"):
        qemu_coroutine_enter(qemu_coroutine_create(lambda a: _writer(*a), (blk, who, count, size, log)))
    run_until(lambda: len(log) == 2 * count)

    order = "".join(who for who, _ in log)
    assert order == "AB" * count
    done = {"A": 0, "B": 0}
    for who, _ in log:
        done[who] += 1
        assert abs(done["A"] - done["B"]) <= 1
    # A's first write passes at once; from then on one 128 KiB write every 125 ms, shared by both.
    elapsed = log[-1][1] - t0
    assert abs(elapsed - (25_000_000 + (2 * count - 2) * 125_000_000)) < 10
    for blk in blks:
        drop(blk)


def test_idle_member_does_not_hold_the_token():
    """A member with no queued requests is skipped: the token holder's idleness costs the others nothing."""
    blks = [blk_new_open(None, None, "driver=null-co", RW) for _ in range(2)]
    for blk in blks:
        blk_io_limits_enable(blk, "g")
    a, b = (blk.public.throttle_group_member for blk in blks)
    throttle_group_config(a, limits(BPS_WRITE=MiB))
    (tg,) = throttle_groups

    # b writes twice: its second write arms its timer, which makes b the token holder.
    sequential_writes(blks[1], [MiB, MiB])
    assert tg.tokens[THROTTLE_WRITE] is b and b.pending_reqs == [0, 0]
    assert next_throttle_token(a, THROTTLE_WRITE) is a

    # Once the bucket has drained, a writes exactly as if it were alone in the group.
    qemu_clock_step(10 * SEC)
    times = sequential_writes(blks[0], [MiB] * 3)
    assert times == qemu_times(limits(BPS_WRITE=MiB), [(THROTTLE_WRITE, MiB)] * 3)
    assert times == [0, 900_000_000, 1_900_000_000]
    for blk in blks:
        blk_unref(blk)


# --------------------------------------------------------------------------
# Accuracy on the virtual clock


def test_bps_write_accuracy_through_the_filter():
    """2 MiB then 1 MiB at x-bps-write=1048576 take 1.9 s, the first write passing at once (qemu-io: 1.90 s)."""
    user_creatable_process_cmdline("throttle-group,id=tg0,x-bps-write=1048576")
    blk = blk_new_open(None, None, FILTER, RW)
    times = sequential_writes(blk, [2 * MiB, MiB])
    assert times == [0, 1_900_000_000]
    assert times == qemu_times(limits(BPS_WRITE=MiB), [(THROTTLE_WRITE, 2 * MiB), (THROTTLE_WRITE, MiB)])
    blk_unref(blk)
    user_creatable_del("tg0")


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_bps_write_accuracy_n_mib(n):
    """N MiB in 1 MiB writes at bps_wr=1 MiB/s (block_set_io_throttle) go at the times QEMU's algorithm gives."""
    blk = throttled_blk(bps_wr=MiB)
    times = sequential_writes(blk, [MiB] * n)
    assert times == qemu_times(limits(BPS_WRITE=MiB), [(THROTTLE_WRITE, MiB)] * n)
    # 0 s, then 0.9 s (the bucket holds 0.1 s of writes), then one second per MiB.
    assert [round(t / 1e6) for t in times] == [0, 900, 1900, 2900, 3900][:n]
    drop(blk)


def _qemu_io_seconds(object_opt: str, image_opts: str, cmds: list[str]) -> list[float]:
    args = ["qemu-io", "--object", object_opt, "--image-opts", image_opts]
    for c in cmds:
        args += ["-c", c]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True).stdout
    secs = []
    for line in out.splitlines():
        m = re.search(r"ops; (\d+):(\d+):(\d+\.\d+)", line)
        if m:
            secs.append(int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3)))
            continue
        m = re.search(r"ops; (\d+\.\d+) sec", line)
        if m:
            secs.append(float(m.group(1)))
    return secs


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs QEMU's qemu-io")
def test_virtual_clock_matches_real_qemu_io():
    """Real qemu-io takes, per write, what qblock's virtual clock says (to qemu-io's 10 ms display)."""
    obj = "throttle-group,id=tg0,x-bps-write=1048576"
    real = _qemu_io_seconds(obj, FILTER, ["write 0 2M", "write 2M 1M"])
    user_creatable_process_cmdline(obj)
    blk = blk_new_open(None, None, FILTER, RW)
    times = sequential_writes(blk, [2 * MiB, MiB])
    virtual = [times[0] / SEC, (times[1] - times[0]) / SEC]
    blk_unref(blk)
    user_creatable_del("tg0")
    assert len(real) == 2
    assert real == pytest.approx(virtual, abs=0.05)


# --------------------------------------------------------------------------
# iops and bursts


def test_iops_write_limit():
    """At x-iops-write=10 two writes pass at once (the bucket holds 0.1 s), then one every 100 ms."""
    user_creatable_process_cmdline("throttle-group,id=tg0,x-iops-write=10")
    blk = blk_new_open(None, None, FILTER, RW)
    times = sequential_writes(blk, [4 * KiB] * 5)
    assert times == qemu_times(limits(OPS_WRITE=10), [(THROTTLE_WRITE, 4 * KiB)] * 5)
    assert [round(t / 1e6) for t in times] == [0, 0, 100, 200, 300]
    blk_unref(blk)
    user_creatable_del("tg0")


def test_iops_size_counts_large_requests_as_several():
    """With x-iops-size=4096 an 8 KiB write counts as two operations."""
    user_creatable_process_cmdline("throttle-group,id=tg0,x-iops-write=10,x-iops-size=4096")
    blk = blk_new_open(None, None, FILTER, RW)
    times = sequential_writes(blk, [8 * KiB] * 4)
    cfg = limits(OPS_WRITE=10)
    cfg.op_size = 4096
    assert times == qemu_times(cfg, [(THROTTLE_WRITE, 8 * KiB)] * 4)
    assert [round(t / 1e6) for t in times] == [0, 100, 300, 500]
    blk_unref(blk)
    user_creatable_del("tg0")


def test_iops_total_counts_reads_and_writes():
    """An iops-total limit is shared by reads and writes."""
    blk = throttled_blk(iops=10)
    t0 = now()
    seen = []
    for is_write in (False, True, False, True):
        if is_write:
            blk_pwrite(blk, 0, bytearray(512))
        else:
            blk_pread(blk, 0, bytearray(512))
        seen.append(round((now() - t0) / 1e6))
    assert seen == [0, 0, 100, 200]
    drop(blk)


def test_burst_with_max_and_max_length():
    """bps-write 1 MiB/s with bursts of 2 MiB/s for 2 s: waits of 0.4 s and 0.5 s, then 1 s per MiB (as qemu-io)."""
    opts = "throttle-group,id=tg0,x-bps-write=1048576,x-bps-write-max=2097152,x-bps-write-max-length=2"
    user_creatable_process_cmdline(opts)
    blk = blk_new_open(None, None, FILTER, RW)
    times = sequential_writes(blk, [MiB] * 12)
    cfg = limits(BPS_WRITE=MiB)
    cfg.buckets[THROTTLE_BPS_WRITE].max = 2 * MiB
    cfg.buckets[THROTTLE_BPS_WRITE].burst_length = 2
    assert times == qemu_times(cfg, [(THROTTLE_WRITE, MiB)] * 12)
    waits = [round((b - a) / 1e7) / 100 for a, b in zip([0] + times, times)]
    assert waits == [0.0, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5, 0.1, 1.0, 1.0, 1.0, 1.0]
    blk_unref(blk)
    user_creatable_del("tg0")


# --------------------------------------------------------------------------
# Invalid configurations


QMP_ZERO = dict(bps=0, bps_rd=0, bps_wr=0, iops=0, iops_rd=0, iops_wr=0)
TOTAL_AND_RW = "bps/iops/max total values and read/write values cannot be used at the same time"


@pytest.mark.parametrize("args, message", [
    (dict(bps=1, bps_rd=1), TOTAL_AND_RW),
    (dict(iops=1, iops_wr=1), TOTAL_AND_RW),
    (dict(bps=10, bps_max=20, bps_rd_max=20), TOTAL_AND_RW),
    (dict(bps=-1), "bps/iops/max values must be within [0, 1000000000000000]"),
    (dict(iops_wr=10 ** 15 + 1), "bps/iops/max values must be within [0, 1000000000000000]"),
    (dict(iops_size=4096), "iops size requires an iops value to be set"),
    (dict(bps=10, bps_max_length=0), "the burst length cannot be 0"),
    (dict(bps=10, bps_max_length=5), "burst length set without burst rate"),
    (dict(bps=10, bps_max=10 ** 9, bps_max_length=10 ** 7), "burst length too high for this burst rate"),
    (dict(bps_max=10), "bps_max/iops_max require corresponding bps/iops values"),
    (dict(iops=100, iops_max=50), "bps_max/iops_max cannot be lower than bps/iops"),
])
def test_block_set_io_throttle_rejects_invalid_limits(args, message):
    """block_set_io_throttle refuses an invalid configuration with QEMU's message and keeps the old limits."""
    blk = throttled_blk(bps_wr=MiB)
    with pytest.raises(Error) as e:
        qmp_block_set_io_throttle(device="drive0", **dict(QMP_ZERO, **args))
    assert str(e.value) == message
    cfg = throttle_group_get_config(blk.public.throttle_group_member)
    assert cfg.buckets[THROTTLE_BPS_WRITE].avg == MiB and cfg.buckets[THROTTLE_BPS_READ].avg == 0
    drop(blk)


def test_block_set_io_throttle_device_lookup():
    """The BlockBackend is found by device name or device id, with QEMU's errors otherwise."""
    blk = blk_new(qemu_get_aio_context(), 0, BLK_PERM_ALL)
    monitor_add_blk(blk, "empty")
    for kwargs, message in [({}, "Need exactly one of 'device' and 'id'"),
                            (dict(device="empty", id="x"), "Need exactly one of 'device' and 'id'"),
                            (dict(device="nope"), "Device 'nope' not found"),
                            (dict(id="nope"), "Device 'nope' not found"),
                            (dict(device="empty"), "Device has no medium")]:
        with pytest.raises(Error) as e:
            qmp_block_set_io_throttle(**kwargs, **dict(QMP_ZERO, bps=1))
        assert str(e.value) == message
    drop(blk)

    class Dev:
        id = "virtio0"
    blk = blk_new_open(None, None, "driver=null-co", RW)
    blk.dev = Dev()
    qmp_block_set_io_throttle(id="virtio0", **dict(QMP_ZERO, iops=5))
    assert throttle_group_get_name(blk.public.throttle_group_member) == "virtio0"
    blk.dev = None
    blk_unref(blk)


@pytest.mark.parametrize("optarg, message", [
    ("throttle-group,id=tg0,x-bps-write=-1", "Property values cannot be negative"),
    ("throttle-group,id=tg0,x-bps-write=abc", "Parameter 'x-bps-write' expects integer"),
    ("throttle-group,id=tg0,x-bps-write=99999999999999999999", "Parameter 'x-bps-write' expects integer"),
    ("throttle-group,id=tg0,x-foo=1", "Parameter 'x-foo' is unexpected"),
    ("throttle-group,x-bps-write=1", "Parameter 'id' is missing"),
    ("throttle-group,id=0tg", "Parameter 'id' expects an identifier"),
    ("foo-bar,id=x", "Parameter 'qom-type' does not accept value 'foo-bar'"),
    ("throttle-group,id=tg0,x-bps-total=1,x-bps-write=1", TOTAL_AND_RW),
    ("throttle-group,id=tg0,x-bps-total=1,x-bps-total-max-length=5", "burst length set without burst rate"),
    ("throttle-group,id=tg0,x-bps-total-max-length=5000000000",
     "x-bps-total-max-length value must be in therange [0, 4294967295]"),
    ("throttle-group,id=tg0,x-iops-size=4096", "iops size requires an iops value to be set"),
    ("throttle-group,id=tg0,limits.bps-total=1,limits.bps-read=5", TOTAL_AND_RW),
    ("throttle-group,id=tg0,limits.bps-total=-1", "bps/iops/max values must be within [0, 1000000000000000]"),
    ("throttle-group,id=tg0,limits.bps-total=abc", "Parameter 'limits.bps-total' expects integer"),
    ("throttle-group,id=tg0,limits.foo=1", "Parameter 'limits.foo' is unexpected"),
    ("throttle-group,id=tg0,limits=5", "Invalid parameter type for 'limits', expected: object"),
])
def test_object_rejects_invalid_options(optarg, message):
    """--object throttle-group refuses bad options with qemu-io 7.2's messages and leaves no group behind."""
    with pytest.raises(Error) as e:
        user_creatable_process_cmdline(optarg)
    assert str(e.value) == message
    assert object_resolve_objects_root("tg0") is None and throttle_groups == []


def test_object_duplicate_id_and_name_clash():
    """A second object with the same id, or an object named like an implicit group, is refused."""
    user_creatable_process_cmdline("throttle-group,id=tg0")
    with pytest.raises(Error) as e:
        user_creatable_process_cmdline("throttle-group,id=tg0")
    assert str(e.value) == "attempt to add duplicate property 'tg0' to object (type 'container')"
    user_creatable_del("tg0")

    tgm = ThrottleGroupMember()
    throttle_group_register_tgm(tgm, "tg1", qemu_get_aio_context())
    with pytest.raises(Error) as e:
        user_creatable_process_cmdline("throttle-group,id=tg1")
    assert str(e.value) == "A group with this name already exists"
    assert object_resolve_objects_root("tg1") is None
    throttle_group_unregister_tgm(tgm)


def test_object_properties_structured_form_and_after_creation():
    """``limits.*`` equals the x- form; ``limits`` may change later, single x- properties may not."""
    qmp_object_add("throttle-group", "tg0", limits={"bps-write": MiB, "iops-total": 100})
    tg0 = object_resolve_objects_root("tg0")
    user_creatable_process_cmdline("throttle-group,id=tg1,x-bps-write=1048576,x-iops-total=0x64")
    tg1 = object_resolve_objects_root("tg1")
    assert object_property_get(tg0, "limits") == object_property_get(tg1, "limits")
    assert object_property_get(tg0, "x-bps-write") == MiB and object_property_get(tg1, "x-iops-total") == 100

    with pytest.raises(Error) as e:
        object_property_set(tg0, "x-bps-write", 5)
    assert str(e.value) == "Property cannot be set after initialization"
    object_property_set(tg0, "limits", {"bps-write": 2 * MiB})
    assert object_property_get(tg0, "x-bps-write") == 2 * MiB
    assert object_property_get(tg0, "x-iops-total") == 100          # merged with what was there
    with pytest.raises(Error) as e:
        object_property_set(tg0, "limits", {"bps-total": 1})
    assert str(e.value) == TOTAL_AND_RW
    assert object_property_get(tg0, "x-bps-total") == 0             # refused as a whole
    with pytest.raises(Error) as e:
        object_property_get(tg0, "x-nothing")
    assert str(e.value) == "Property 'throttle-group.x-nothing' not found"
    user_creatable_del("tg0")
    user_creatable_del("tg1")


def test_object_delete_refused_while_in_use():
    """A throttle-group object cannot be deleted while a node or BlockBackend is in the group."""
    user_creatable_process_cmdline("throttle-group,id=tg0,x-bps-write=1048576")
    blk = blk_new_open(None, None, FILTER, RW)
    blk2 = blk_new_open(None, None, "driver=null-co", RW)
    blk_io_limits_enable(blk2, "tg0")
    for release in (lambda: blk_unref(blk), lambda: blk_unref(blk2)):
        with pytest.raises(Error) as e:
            user_creatable_del("tg0")
        assert str(e.value) == "object 'tg0' is in use, can not be deleted"
        release()
    user_creatable_del("tg0")
    assert not throttle_group_exists("tg0")
    with pytest.raises(Error) as e:
        user_creatable_del("tg0")
    assert str(e.value) == "object 'tg0' not found"


# --------------------------------------------------------------------------
# Reconfiguration and drain with queued requests


def test_changing_limits_while_queued_loses_and_duplicates_nothing():
    """New limits, a new group and finally no limits, all with writes queued: each write happens exactly once."""
    blk = blk_new_open(None, None, memdrv_options("co", size="16M"), RW)
    monitor_add_blk(blk, "drive0")
    qmp_block_set_io_throttle(device="drive0", **dict(QMP_ZERO, bps_wr=MiB), group="g1")
    tgm = blk.public.throttle_group_member
    state = blk.root.bs.opaque
    log = AioLog()
    for i in range(8):
        log.submit(blk, i * MiB, MiB)
    assert tgm.pending_reqs[THROTTLE_WRITE] == 7
    run_until(lambda: len(log.done) == 2)
    assert log.done[1][2] == 900_000_000 + log.done[0][2]

    # Faster limits: the write waiting for the old timer goes at once, the rest at 4 MiB/s.
    t = now()
    qmp_block_set_io_throttle(device="drive0", **dict(QMP_ZERO, bps_wr=4 * MiB))
    run_until(lambda: len(log.done) == 4)
    assert log.done[2][2] == t and log.done[3][2] == t + 150_000_000

    # Another group: leaving the old one drains the BlockBackend, which lets every queued write go now.
    t = now()
    qmp_block_set_io_throttle(device="drive0", **dict(QMP_ZERO, bps_wr=4 * MiB), group="g2")
    assert len(log.done) == 8 and log.done[-1][2] == t
    assert throttle_group_get_name(tgm) == "g2" and [tg.name for tg in throttle_groups] == ["g2"]

    for i in range(8, 12):
        log.submit(blk, i * MiB, MiB)
    assert tgm.pending_reqs[THROTTLE_WRITE] == 3
    # No limits: the queued writes go at once and the group disappears.
    qmp_block_set_io_throttle(device="drive0", **QMP_ZERO)
    assert tgm.throttle_state is None and throttle_groups == []
    assert len(log.done) == 12 and log.done[-1][2] == now()

    assert sorted(off for off, ret, _ in log.done) == [i * MiB for i in range(12)]
    assert all(ret == 0 for _, ret, _ in log.done)
    writes = [(op, off) for op, off, _, _ in state.calls if op == "write"]
    assert sorted(writes) == [("write", i * MiB) for i in range(12)]
    drop(blk)


def test_drain_releases_queued_requests_at_once():
    """Draining a throttled BlockBackend lets its queued writes complete without waiting; they still count."""
    blk = throttled_blk(bps_wr=MiB)
    tgm = blk.public.throttle_group_member
    log = AioLog()
    for i in range(5):
        log.submit(blk, i * MiB, MiB)
    assert tgm.pending_reqs[THROTTLE_WRITE] == 4
    t = now()
    blk_drain(blk)
    assert now() == t
    assert sorted(off for off, ret, _ in log.done) == [i * MiB for i in range(5)]
    assert tgm.pending_reqs == [0, 0] and tgm.io_limits_disabled == 0

    # Throttling resumes after the drain, with the drained writes in the bucket: 5 MiB - 0.1 s.
    assert sequential_writes(blk, [MiB]) == [4_900_000_000]
    drop(blk)


def test_draining_the_filter_node_releases_its_queue():
    """A drained throttle node lets its queued requests go at once."""
    user_creatable_process_cmdline("throttle-group,id=tg0,x-bps-write=1048576")
    bs = bdrv_open(None, None, FILTER, RW)
    blk = blk_new(qemu_get_aio_context(), BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, BLK_PERM_ALL)
    blk_insert_bs(blk, bs)
    bdrv_unref(bs)
    log = AioLog()
    for i in range(4):
        log.submit(blk, i * MiB, MiB)
    assert bs.opaque.pending_reqs[THROTTLE_WRITE] == 3
    t = now()
    bdrv_drained_begin(bs)
    assert len(log.done) == 4 and now() == t and bs.opaque.io_limits_disabled == 1
    bdrv_drained_end(bs)
    assert bs.opaque.io_limits_disabled == 0
    blk_unref(blk)
    user_creatable_del("tg0")


# --------------------------------------------------------------------------
# The throttle filter


def test_filter_via_bdrv_open_throttles():
    """driver=throttle,throttle-group=tg0,file.driver=null-co opened with bdrv_open is a throttling filter."""
    user_creatable_process_cmdline("throttle-group,id=tg0,x-bps-write=1048576")
    bs = bdrv_open(None, None, FILTER, RW)
    assert bs.drv.format_name == "throttle" and bs.drv.is_filter and bs.file.bs.drv.format_name == "null-co"
    assert throttle_group_get_name(bs.opaque) == "tg0"
    blk = blk_new(qemu_get_aio_context(), BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, BLK_PERM_ALL)
    blk_insert_bs(blk, bs)
    bdrv_unref(bs)
    assert sequential_writes(blk, [MiB, MiB, MiB]) == [0, 900_000_000, 1_900_000_000]
    blk_unref(blk)
    user_creatable_del("tg0")


@pytest.mark.parametrize("options, message", [
    ("driver=throttle,throttle-group=tg1,file.driver=null-co", "Throttle group 'tg1' does not exist"),
    ("driver=throttle,file.driver=null-co", "Please specify a throttle group"),
    ("driver=throttle,throttle-group=tg0", 'A block device must be specified for "file"'),
])
def test_filter_open_errors(options, message):
    """An unknown or missing group, or a missing file child, fails the open with QEMU's message."""
    user_creatable_process_cmdline("throttle-group,id=tg0")
    with pytest.raises(Error) as e:
        bdrv_open(None, None, options, RW)
    assert str(e.value) == message
    assert [tg.name for tg in throttle_groups] == ["tg0"]
    assert object_resolve_objects_root("tg0").ref == 1   # the failed node left no reference
    user_creatable_del("tg0")


def test_filter_passes_the_rest_through():
    """Reads, zero writes and discards are throttled; flush, length and block status go to the child."""
    user_creatable_process_cmdline("throttle-group,id=tg0,x-bps-total=1048576")
    child = memdrv_options("co", write_zeroes=True, discard=True, block_status=True, size="8M")
    opts = {"driver": "throttle", "throttle-group": "tg0", "discard": "unmap",
            **{f"file.{k}": v for k, v in child.items()}}
    blk = blk_new_open(None, None, opts, RW)
    state = blk.root.bs.file.bs.opaque
    assert blk_getlength(blk) == 8 * MiB

    t0 = now()
    assert blk_pwrite_zeroes(blk, 0, 2 * MiB) == 0
    assert blk_pdiscard(blk, 2 * MiB, MiB) == 0        # waits for the zero write: 1.9 s
    t1 = now()
    assert blk_pread(blk, 0, bytearray(MiB)) == MiB    # bps-total counts reads too: 1.1 MiB queued, 1 s
    t2 = now()
    assert blk_flush(blk) == 0
    assert (t1 - t0, t2 - t1) == (1_900_000_000, 1_000_000_000)
    assert [c[0] for c in state.calls] == ["write_zeroes", "discard", "read", "flush"]

    ret, pnum, map_, file = bdrv_block_status(blk.root.bs, 0, MiB)
    assert ret & BDRV_BLOCK_RAW == 0 and file is blk.root.bs.file.bs and pnum == MiB
    blk_unref(blk)
    user_creatable_del("tg0")


def test_two_filter_nodes_share_one_group():
    """Two throttle nodes in one group share its limit: together they write 1 MiB/s."""
    user_creatable_process_cmdline("throttle-group,id=tg0,x-bps-write=1048576")
    blks = [blk_new_open(None, None, FILTER, RW) for _ in range(2)]
    log: list = []
    for blk, who in zip(blks, "AB"):
        qemu_coroutine_enter(qemu_coroutine_create(lambda a: _writer(*a), (blk, who, 3, 512 * KiB, log)))
    run_until(lambda: len(log) == 6)
    # 3 MiB in all: the first 512 KiB go at once, the rest at 1 MiB/s, less the 0.1 s bucket.
    assert round((log[-1][1] - log[0][1]) / 1e6) == 2400
    assert sorted(who for who, _ in log) == list("AAABBB")
    for blk in blks:
        blk_unref(blk)
    user_creatable_del("tg0")


def test_reads_and_writes_are_scheduled_separately():
    """A read is not queued behind throttled writes when only writes are limited."""
    blk = throttled_blk(bps_wr=MiB)
    log = AioLog()
    for i in range(3):
        log.submit(blk, i * MiB, MiB)
    got = []

    def reader(_):
        got.append(blk_co_preadv(blk, 0, 4096, qiov_of(4096)))
    t = now()
    qemu_coroutine_enter(qemu_coroutine_create(reader, None))
    assert got == [0] and now() == t
    run_until(lambda: len(log.done) == 3)
    drop(blk)


# --------------------------------------------------------------------------
# Tracing


def test_trace_events_follow_a_throttled_request():
    """The throttle_group_* events show a request queued, its timer armed and fired, and the request resumed."""
    records = []
    sink = trace_add_sink(records.append)
    try:
        trace_enable_events("throttle_group_*")
        blk = throttled_blk(bps_wr=MiB)
        sequential_writes(blk, [MiB, MiB])
        drop(blk)
    finally:
        trace_remove_sink(sink)
    names = [r.name for r in records]
    assert names[0] == "throttle_group_register_tgm"
    i = names.index("throttle_group_schedule_timer")
    assert names[i:i + 4] == ["throttle_group_schedule_timer", "throttle_group_co_io_limits_intercept",
                              "throttle_group_timer_cb", "throttle_group_restart_queue"]
    assert "throttle_group_io_limits_resume" in names and names[-1] == "throttle_group_unregister_tgm"
    armed = records[i]
    assert armed.text().endswith("timer armed for %d ns" % (armed.values[2]))
    assert armed.values[2] == armed.ts_virtual_ns + 900_000_000
