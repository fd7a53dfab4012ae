"""Port of QEMU's tests/unit/test-throttle.c (the leaky-bucket maths and the throttle timers).

Expected values are QEMU's.  ``/throttle/groups`` belongs to the throttle
groups module and is not here.  Tests after the port check what QEMU's file
leaves out: throttle_is_valid()'s messages, the QAPI ThrottleLimits
conversion and throttle_schedule_timer() on the virtual clock.
"""
import attrs
import pytest

from qblock.util.aio import aio_poll, qemu_get_aio_context
from qblock.util.error import Error
from qblock.util.throttle import (
    BUCKETS_COUNT,
    THROTTLE_BPS_READ,
    THROTTLE_BPS_TOTAL,
    THROTTLE_BPS_WRITE,
    THROTTLE_LIMITS_KEYS,
    THROTTLE_MAX,
    THROTTLE_OPS_READ,
    THROTTLE_OPS_TOTAL,
    THROTTLE_OPS_WRITE,
    THROTTLE_READ,
    THROTTLE_VALUE_MAX,
    THROTTLE_WRITE,
    BucketType,
    LeakyBucket,
    ThrottleConfig,
    ThrottleState,
    ThrottleTimers,
    throttle_account,
    throttle_compute_timer,
    throttle_compute_wait,
    throttle_config,
    throttle_config_init,
    throttle_config_to_limits,
    throttle_enabled,
    throttle_get_config,
    throttle_init,
    throttle_is_valid,
    throttle_leak_bucket,
    throttle_limits_to_config,
    throttle_schedule_timer,
    throttle_timers_are_initialized,
    throttle_timers_attach_aio_context,
    throttle_timers_destroy,
    throttle_timers_detach_aio_context,
    throttle_timers_init,
)
from qblock.util.timer import (
    NANOSECONDS_PER_SECOND,
    QEMU_CLOCK_VIRTUAL,
    qemu_clock_get_ns,
    qemu_clock_step,
    timer_expire_time_ns,
    timer_pending,
)

UINT64_MAX = (1 << 64) - 1
JUNK = 0x0101010101010101  # what QEMU's memset(..., 1, ...) leaves in a 64-bit field


def double_cmp(x: float, y: float) -> bool:
    return abs(x - y) < 1e-6


def read_timer_cb(opaque) -> None:
    pass


def write_timer_cb(opaque) -> None:
    pass


# ---------------------------------------------------------------------------
# Single bucket operations


def test_leak_bucket():
    """A bucket leaks avg units per second down to zero, and its burst level leaks max units per second."""
    cfg = ThrottleConfig()
    throttle_config_init(cfg)
    bkt = attrs.evolve(cfg.buckets[THROTTLE_BPS_TOTAL])  # C copies the struct

    bkt.avg = 150
    bkt.max = 15
    bkt.level = 1.5

    # Leak for the time of one operation.
    throttle_leak_bucket(bkt, NANOSECONDS_PER_SECOND // 150)
    assert bkt.avg == 150
    assert bkt.max == 15
    assert double_cmp(bkt.level, 0.5)

    # Leak again: the bucket empties.
    throttle_leak_bucket(bkt, NANOSECONDS_PER_SECOND // 150)
    assert bkt.avg == 150
    assert bkt.max == 15
    assert double_cmp(bkt.level, 0)

    # The level never goes below zero.
    throttle_leak_bucket(bkt, NANOSECONDS_PER_SECOND // 150)
    assert bkt.avg == 150
    assert bkt.max == 15
    assert double_cmp(bkt.level, 0)

    # The burst level leaks too, once burst_length is over one second.
    bkt.burst_level = 6
    bkt.max = 250
    bkt.burst_length = 2
    throttle_leak_bucket(bkt, NANOSECONDS_PER_SECOND // 100)
    assert double_cmp(bkt.burst_level, 3.5)

    throttle_leak_bucket(bkt, NANOSECONDS_PER_SECOND // 100)
    assert double_cmp(bkt.burst_level, 1)

    throttle_leak_bucket(bkt, NANOSECONDS_PER_SECOND // 100)
    assert double_cmp(bkt.burst_level, 0)

    throttle_leak_bucket(bkt, NANOSECONDS_PER_SECOND // 100)
    assert double_cmp(bkt.burst_level, 0)


def test_compute_wait():
    """The wait is zero until the bucket overflows, then the time to drain the excess at avg."""
    cfg = ThrottleConfig()
    throttle_config_init(cfg)
    bkt = attrs.evolve(cfg.buckets[THROTTLE_BPS_TOTAL])

    # No limit set.
    bkt.avg = 0
    bkt.max = 15
    bkt.level = 1.5
    assert throttle_compute_wait(bkt) == 0

    # Level exactly at the bucket size.
    bkt.avg = 150
    bkt.max = 15
    bkt.level = 15
    assert throttle_compute_wait(bkt) == 0

    # Level below the bucket size.
    bkt.avg = 150
    bkt.max = 15
    bkt.level = 9
    assert throttle_compute_wait(bkt) == 0

    # Half an operation above the bucket size: wait for half an operation.
    bkt.avg = 150
    bkt.max = 15
    bkt.level = 15.5
    assert throttle_compute_wait(bkt) == NANOSECONDS_PER_SECOND // 150 // 2

    # I/O at the burst rate for 2.2 s: bursts last burst_length (2 s) plus the
    # 100 ms the level leaked meanwhile, then the request has to wait.
    bkt.burst_length = 2
    bkt.level = 0
    bkt.avg = 10
    bkt.max = 200
    for i in range(22):
        units = bkt.max / 10.0
        bkt.level += units
        bkt.burst_level += units
        throttle_leak_bucket(bkt, NANOSECONDS_PER_SECOND // 10)
        wait = throttle_compute_wait(bkt)
        assert double_cmp(bkt.burst_level, 0)
        assert double_cmp(bkt.level, (i + 1) * (bkt.max - bkt.avg) / 10.0)
        result = 0 if i < 21 else int(1.8 * NANOSECONDS_PER_SECOND)
        assert wait == result, i


# ---------------------------------------------------------------------------
# Init / destroy


def _fill_with_junk(ts: ThrottleState, tt: ThrottleTimers) -> None:
    """Stand-in for QEMU's memset(&ts, 1, ...): every field holds garbage."""
    ts.previous_leak = JUNK
    ts.cfg.op_size = JUNK
    for bkt in ts.cfg.buckets:
        bkt.avg = bkt.max = bkt.burst_length = JUNK
        bkt.level = bkt.burst_level = float(JUNK)
    tt.timers = [object(), object()]
    tt.clock_type = JUNK
    tt.read_timer_cb = tt.write_timer_cb = tt.timer_opaque = object()


def _init_and_check(read_cb, write_cb) -> ThrottleTimers:
    """throttle_init + throttle_timers_init over junk, then QEMU's checks on the cleared fields."""
    ts = ThrottleState()
    tt = ThrottleTimers()
    _fill_with_junk(ts, tt)

    throttle_init(ts)
    throttle_timers_init(tt, qemu_get_aio_context(), QEMU_CLOCK_VIRTUAL, read_cb, write_cb, ts)

    assert tt.clock_type == QEMU_CLOCK_VIRTUAL
    assert (tt.timers[THROTTLE_READ] is not None) == (read_cb is not None)
    assert (tt.timers[THROTTLE_WRITE] is not None) == (write_cb is not None)

    assert not ts.previous_leak
    assert not ts.cfg.op_size
    for bkt in ts.cfg.buckets:
        assert not bkt.avg
        assert not bkt.max
        assert not bkt.level
    return tt


def test_init():
    """throttle_init clears the state and throttle_timers_init creates both timers on the given clock."""
    tt = _init_and_check(read_timer_cb, write_timer_cb)
    throttle_timers_destroy(tt)


def test_init_readonly():
    """Without a write callback only the read timer is created."""
    tt = _init_and_check(read_timer_cb, None)
    throttle_timers_destroy(tt)


def test_init_writeonly():
    """Without a read callback only the write timer is created."""
    tt = _init_and_check(None, write_timer_cb)
    throttle_timers_destroy(tt)


def test_destroy():
    """throttle_timers_destroy frees every timer."""
    ts = ThrottleState()
    tt = ThrottleTimers()
    throttle_init(ts)
    throttle_timers_init(tt, qemu_get_aio_context(), QEMU_CLOCK_VIRTUAL,
                         read_timer_cb, write_timer_cb, ts)
    throttle_timers_destroy(tt)
    for i in range(THROTTLE_MAX):
        assert tt.timers[i] is None


def test_have_timer():
    """throttle_timers_are_initialized is false for empty timers and true after throttle_timers_init."""
    ts = ThrottleState()
    tt = ThrottleTimers()
    assert not throttle_timers_are_initialized(tt)

    throttle_init(ts)
    throttle_timers_init(tt, qemu_get_aio_context(), QEMU_CLOCK_VIRTUAL,
                         read_timer_cb, write_timer_cb, ts)
    assert throttle_timers_are_initialized(tt)

    throttle_timers_destroy(tt)


def test_detach_attach():
    """Detaching from the AioContext drops the timers and attaching creates them again."""
    ctx = qemu_get_aio_context()
    ts = ThrottleState()
    tt = ThrottleTimers()

    throttle_init(ts)
    throttle_timers_init(tt, ctx, QEMU_CLOCK_VIRTUAL, read_timer_cb, write_timer_cb, ts)
    assert throttle_timers_are_initialized(tt)

    throttle_timers_detach_aio_context(tt)
    assert not throttle_timers_are_initialized(tt)

    throttle_timers_attach_aio_context(tt, ctx)
    assert throttle_timers_are_initialized(tt)

    throttle_timers_destroy(tt)


# ---------------------------------------------------------------------------
# throttle_config / throttle_get_config


def test_config_functions():
    """throttle_config copies the limits, empties the buckets and stamps the leak time; get_config reads them back."""
    orig_cfg = ThrottleConfig()

    orig_cfg.buckets[THROTTLE_BPS_TOTAL].avg = 153
    orig_cfg.buckets[THROTTLE_BPS_READ].avg = 56
    orig_cfg.buckets[THROTTLE_BPS_WRITE].avg = 1

    orig_cfg.buckets[THROTTLE_OPS_TOTAL].avg = 150
    orig_cfg.buckets[THROTTLE_OPS_READ].avg = 69
    orig_cfg.buckets[THROTTLE_OPS_WRITE].avg = 23

    orig_cfg.buckets[THROTTLE_BPS_TOTAL].max = 0
    orig_cfg.buckets[THROTTLE_BPS_READ].max = 56
    orig_cfg.buckets[THROTTLE_BPS_WRITE].max = 120

    orig_cfg.buckets[THROTTLE_OPS_TOTAL].max = 150
    orig_cfg.buckets[THROTTLE_OPS_READ].max = 400
    orig_cfg.buckets[THROTTLE_OPS_WRITE].max = 500

    orig_cfg.buckets[THROTTLE_BPS_TOTAL].level = 45
    orig_cfg.buckets[THROTTLE_BPS_READ].level = 65
    orig_cfg.buckets[THROTTLE_BPS_WRITE].level = 23

    orig_cfg.buckets[THROTTLE_OPS_TOTAL].level = 1
    orig_cfg.buckets[THROTTLE_OPS_READ].level = 90
    orig_cfg.buckets[THROTTLE_OPS_WRITE].level = 75

    orig_cfg.op_size = 1

    ts = ThrottleState()
    tt = ThrottleTimers()
    throttle_init(ts)
    throttle_timers_init(tt, qemu_get_aio_context(), QEMU_CLOCK_VIRTUAL,
                         read_timer_cb, write_timer_cb, ts)
    assert not ts.previous_leak

    # QEMU's virtual clock has run since boot; qblock's starts at 0 and moves only when stepped.
    qemu_clock_step(NANOSECONDS_PER_SECOND)
    throttle_config(ts, QEMU_CLOCK_VIRTUAL, orig_cfg)
    assert ts.previous_leak
    assert ts.previous_leak == qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL)

    final_cfg = ThrottleConfig()
    throttle_get_config(ts, final_cfg)

    throttle_timers_destroy(tt)

    assert final_cfg.buckets[THROTTLE_BPS_TOTAL].avg == 153
    assert final_cfg.buckets[THROTTLE_BPS_READ].avg == 56
    assert final_cfg.buckets[THROTTLE_BPS_WRITE].avg == 1

    assert final_cfg.buckets[THROTTLE_OPS_TOTAL].avg == 150
    assert final_cfg.buckets[THROTTLE_OPS_READ].avg == 69
    assert final_cfg.buckets[THROTTLE_OPS_WRITE].avg == 23

    assert final_cfg.buckets[THROTTLE_BPS_TOTAL].max == 0
    assert final_cfg.buckets[THROTTLE_BPS_READ].max == 56
    assert final_cfg.buckets[THROTTLE_BPS_WRITE].max == 120

    assert final_cfg.buckets[THROTTLE_OPS_TOTAL].max == 150
    assert final_cfg.buckets[THROTTLE_OPS_READ].max == 400
    assert final_cfg.buckets[THROTTLE_OPS_WRITE].max == 500

    assert final_cfg.op_size == 1

    for i in range(BUCKETS_COUNT):
        assert not final_cfg.buckets[i].level


# ---------------------------------------------------------------------------
# Configuration checks


def set_cfg_value(cfg: ThrottleConfig, is_max: bool, index: int, value: int) -> None:
    """Set avg, or max together with a non-zero avg (a max never comes without an avg)."""
    if is_max:
        cfg.buckets[index].max = value
        cfg.buckets[index].avg = max(cfg.buckets[index].avg, 1)
    else:
        cfg.buckets[index].avg = value


def test_enabled():
    """Any positive avg enables throttling; a negative one is an invalid config."""
    cfg = ThrottleConfig()
    throttle_config_init(cfg)
    assert not throttle_enabled(cfg)

    for i in range(BUCKETS_COUNT):
        throttle_config_init(cfg)
        set_cfg_value(cfg, False, i, 150)
        assert throttle_is_valid(cfg)
        assert throttle_enabled(cfg)

    for i in range(BUCKETS_COUNT):
        throttle_config_init(cfg)
        set_cfg_value(cfg, False, i, -150)
        assert not throttle_is_valid(cfg)


def _conflicts_for_one_set(is_max: bool, total: int, read: int, write: int) -> None:
    cfg = ThrottleConfig()
    throttle_config_init(cfg)
    assert throttle_is_valid(cfg)

    set_cfg_value(cfg, is_max, total, 1)
    set_cfg_value(cfg, is_max, read, 1)
    assert not throttle_is_valid(cfg)

    throttle_config_init(cfg)
    set_cfg_value(cfg, is_max, total, 1)
    set_cfg_value(cfg, is_max, write, 1)
    assert not throttle_is_valid(cfg)

    throttle_config_init(cfg)
    set_cfg_value(cfg, is_max, total, 1)
    set_cfg_value(cfg, is_max, read, 1)
    set_cfg_value(cfg, is_max, write, 1)
    assert not throttle_is_valid(cfg)

    throttle_config_init(cfg)
    set_cfg_value(cfg, is_max, total, 1)
    assert throttle_is_valid(cfg)

    throttle_config_init(cfg)
    set_cfg_value(cfg, is_max, read, 1)
    set_cfg_value(cfg, is_max, write, 1)
    assert throttle_is_valid(cfg)


def test_conflicting_config():
    """A total limit cannot be combined with a read or write limit of the same kind."""
    _conflicts_for_one_set(False, THROTTLE_BPS_TOTAL, THROTTLE_BPS_READ, THROTTLE_BPS_WRITE)
    _conflicts_for_one_set(False, THROTTLE_OPS_TOTAL, THROTTLE_OPS_READ, THROTTLE_OPS_WRITE)
    _conflicts_for_one_set(True, THROTTLE_BPS_TOTAL, THROTTLE_BPS_READ, THROTTLE_BPS_WRITE)
    _conflicts_for_one_set(True, THROTTLE_OPS_TOTAL, THROTTLE_OPS_READ, THROTTLE_OPS_WRITE)


def _is_valid_for_value(value: int, should_be_valid: bool) -> None:
    cfg = ThrottleConfig()
    for is_max in (False, True):
        for index in range(BUCKETS_COUNT):
            throttle_config_init(cfg)
            set_cfg_value(cfg, is_max, index, value)
            assert throttle_is_valid(cfg) == should_be_valid, (is_max, index, value)


def test_is_valid():
    """Negative avg or max values are invalid; zero and positive ones are valid."""
    _is_valid_for_value(-1, False)
    _is_valid_for_value(0, True)
    _is_valid_for_value(1, True)


def test_ranges():
    """Limits go up to THROTTLE_VALUE_MAX, and burst_length * max may not exceed it."""
    cfg = ThrottleConfig()
    for i in range(BUCKETS_COUNT):
        b = cfg.buckets[i]
        throttle_config_init(cfg)  # resets the buckets in place, so b stays cfg.buckets[i]

        # avg 0 disables throttling but is valid.
        b.avg = 0
        assert throttle_is_valid(cfg)
        assert not throttle_enabled(cfg)

        b.avg = 1
        assert throttle_is_valid(cfg)

        b.avg = THROTTLE_VALUE_MAX
        assert throttle_is_valid(cfg)

        b.avg = THROTTLE_VALUE_MAX
        b.max = THROTTLE_VALUE_MAX
        assert throttle_is_valid(cfg)

        b.avg = THROTTLE_VALUE_MAX + 1
        assert not throttle_is_valid(cfg)

        b.avg = THROTTLE_VALUE_MAX
        b.max = THROTTLE_VALUE_MAX + 1
        assert not throttle_is_valid(cfg)

        # burst_length must be within [1, THROTTLE_VALUE_MAX].
        b.avg = 1
        b.max = 1
        b.burst_length = 0
        assert not throttle_is_valid(cfg)

        b.avg = 1
        b.max = 1
        b.burst_length = 1
        assert throttle_is_valid(cfg)

        b.avg = 1
        b.max = 1
        b.burst_length = THROTTLE_VALUE_MAX
        assert throttle_is_valid(cfg)

        b.avg = 1
        b.max = 1
        b.burst_length = THROTTLE_VALUE_MAX + 1
        assert not throttle_is_valid(cfg)

        # burst_length * max may not exceed THROTTLE_VALUE_MAX.
        b.avg = 1
        b.max = 2
        b.burst_length = THROTTLE_VALUE_MAX // 2
        assert throttle_is_valid(cfg)

        b.avg = 1
        b.max = 3
        b.burst_length = THROTTLE_VALUE_MAX // 2
        assert not throttle_is_valid(cfg)

        b.avg = 1
        b.max = THROTTLE_VALUE_MAX
        b.burst_length = 1
        assert throttle_is_valid(cfg)

        b.avg = 1
        b.max = THROTTLE_VALUE_MAX
        b.burst_length = 2
        assert not throttle_is_valid(cfg)


def test_max_is_missing_limit():
    """A max needs an avg, and may not be lower than it."""
    cfg = ThrottleConfig()
    for i in range(BUCKETS_COUNT):
        throttle_config_init(cfg)
        cfg.buckets[i].max = 100
        cfg.buckets[i].avg = 0
        assert not throttle_is_valid(cfg)

        cfg.buckets[i].max = 0
        cfg.buckets[i].avg = 0
        assert throttle_is_valid(cfg)

        cfg.buckets[i].max = 0
        cfg.buckets[i].avg = 100
        assert throttle_is_valid(cfg)

        cfg.buckets[i].max = 30
        cfg.buckets[i].avg = 100
        assert not throttle_is_valid(cfg)

        cfg.buckets[i].max = 100
        cfg.buckets[i].avg = 100
        assert throttle_is_valid(cfg)


def test_iops_size_is_missing_limit():
    """op_size without any iops limit is invalid."""
    cfg = ThrottleConfig()
    throttle_config_init(cfg)
    cfg.op_size = 4096
    assert not throttle_is_valid(cfg)


# ---------------------------------------------------------------------------
# Accounting


def do_test_accounting(is_ops: bool, size: int, avg: float, op_size: int,
                       total_result: float, read_result: float, write_result: float) -> bool:
    """Account one read and one write of ``size``; compare the levels of the tested family."""
    to_test = ((THROTTLE_BPS_TOTAL, THROTTLE_BPS_READ, THROTTLE_BPS_WRITE),
               (THROTTLE_OPS_TOTAL, THROTTLE_OPS_READ, THROTTLE_OPS_WRITE))[is_ops]

    cfg = ThrottleConfig()
    throttle_config_init(cfg)
    for index in to_test:
        cfg.buckets[index].avg = avg
    cfg.op_size = op_size

    ts = ThrottleState()
    tt = ThrottleTimers()
    throttle_init(ts)
    throttle_timers_init(tt, qemu_get_aio_context(), QEMU_CLOCK_VIRTUAL,
                         read_timer_cb, write_timer_cb, ts)
    throttle_config(ts, QEMU_CLOCK_VIRTUAL, cfg)

    throttle_account(ts, THROTTLE_READ, size)
    throttle_account(ts, THROTTLE_WRITE, size)

    try:
        return (double_cmp(ts.cfg.buckets[to_test[0]].level, total_result)
                and double_cmp(ts.cfg.buckets[to_test[1]].level, read_result)
                and double_cmp(ts.cfg.buckets[to_test[2]].level, write_result))
    finally:
        throttle_timers_destroy(tt)


@pytest.mark.parametrize(
    "is_ops, size, avg, op_size, total, read, write",
    [
        (False, 1 * 512, 150, 0, 1024, 512, 512),
        (False, 2 * 512, 150, 0, 2048, 1024, 1024),
        (False, 2 * 512, 150, 17, 2048, 1024, 1024),
        (True, 1 * 512, 150, 0, 2, 1, 1),
        (True, 2 * 512, 150, 0, 2, 1, 1),
        (True, 64 * 512, 150, 13 * 512, (64.0 * 2) / 13, 64.0 / 13, 64.0 / 13),
        (True, 64 * 512, 300, 13 * 512, (64.0 * 2) / 13, 64.0 / 13, 64.0 / 13),
    ],
    ids=["bps-1op", "bps-2ops", "bps-2ops-op_size", "ops-1op", "ops-2ops",
         "ops-jumbo", "ops-jumbo-avg300"],
)
def test_accounting(is_ops, size, avg, op_size, total, read, write):
    """Bytes always count the request size; operations count size / op_size when the request is larger."""
    assert do_test_accounting(is_ops, size, avg, op_size, total, read, write)


# ---------------------------------------------------------------------------
# Beyond test-throttle.c: error messages


def _cfg_with(**buckets) -> ThrottleConfig:
    """A fresh config with ``NAME=dict(field=value)`` applied to the named buckets."""
    cfg = ThrottleConfig()
    throttle_config_init(cfg)
    for name, fields in buckets.items():
        if name == "op_size":
            cfg.op_size = fields
            continue
        for field, value in fields.items():
            setattr(cfg.buckets[BucketType["THROTTLE_" + name]], field, value)
    return cfg


RANGE_MSG = "bps/iops/max values must be within [0, 1000000000000000]"


@pytest.mark.parametrize("cfg, message", [
    (_cfg_with(BPS_TOTAL=dict(avg=1), BPS_READ=dict(avg=1)),
     "bps/iops/max total values and read/write values cannot be used at the same time"),
    (_cfg_with(OPS_TOTAL=dict(avg=1, max=2), OPS_WRITE=dict(avg=0, max=2)),
     "bps/iops/max total values and read/write values cannot be used at the same time"),
    (_cfg_with(op_size=4096, BPS_TOTAL=dict(avg=1)),
     "iops size requires an iops value to be set"),
    (_cfg_with(OPS_READ=dict(avg=THROTTLE_VALUE_MAX + 1)), RANGE_MSG),
    (_cfg_with(BPS_WRITE=dict(avg=1, max=-1)), RANGE_MSG),
    (_cfg_with(BPS_READ=dict(avg=1, burst_length=0)), "the burst length cannot be 0"),
    (_cfg_with(BPS_READ=dict(avg=1, burst_length=2)), "burst length set without burst rate"),
    (_cfg_with(OPS_TOTAL=dict(avg=1, max=3, burst_length=THROTTLE_VALUE_MAX // 2)),
     "burst length too high for this burst rate"),
    (_cfg_with(BPS_TOTAL=dict(max=100)), "bps_max/iops_max require corresponding bps/iops values"),
    (_cfg_with(BPS_TOTAL=dict(avg=100, max=30)), "bps_max/iops_max cannot be lower than bps/iops"),
], ids=["conflict-avg", "conflict-max", "iops-size", "range-avg", "range-negative-max",
        "burst-length-0", "burst-without-rate", "burst-too-high", "max-without-avg", "max-below-avg"])
def test_is_valid_messages(cfg, message):
    """Each rule of throttle_is_valid reports QEMU's message when asked to raise."""
    assert not throttle_is_valid(cfg)
    with pytest.raises(Error) as exc:
        throttle_is_valid(cfg, errp=True)
    assert str(exc.value) == message


def test_is_valid_rule_order():
    """When several rules fail the first in QEMU's order is reported, buckets in index order."""
    cfg = _cfg_with(BPS_TOTAL=dict(avg=-1), BPS_READ=dict(avg=1), op_size=512)
    with pytest.raises(Error, match="cannot be used at the same time"):
        throttle_is_valid(cfg, errp=True)

    cfg = _cfg_with(BPS_TOTAL=dict(avg=-1), op_size=512)
    with pytest.raises(Error, match="iops size requires"):
        throttle_is_valid(cfg, errp=True)

    # Bucket 1 breaks "burst length 0", bucket 2 the range: bucket 1 is checked first.
    cfg = _cfg_with(BPS_READ=dict(burst_length=0), BPS_WRITE=dict(avg=-1))
    with pytest.raises(Error, match="the burst length cannot be 0"):
        throttle_is_valid(cfg, errp=True)


def test_is_valid_errp_on_valid_config():
    """A valid config returns True whether or not errors are to be raised."""
    cfg = _cfg_with(BPS_READ=dict(avg=100, max=200, burst_length=60))
    assert throttle_is_valid(cfg, errp=True) is True
    assert throttle_is_valid(cfg) is True


def test_leaky_bucket_uint64():
    """avg, max, burst_length and op_size store values as C's uint64 does, so -150 wraps."""
    bkt = LeakyBucket(avg=-150)
    assert bkt.avg == UINT64_MAX - 149
    bkt.max = -1
    bkt.burst_length = 1 << 64
    assert bkt.max == UINT64_MAX
    assert bkt.burst_length == 0
    bkt.avg = 150.9  # a double stored into a uint64 is truncated
    assert bkt.avg == 150
    bkt.level = 3
    assert isinstance(bkt.level, float)
    cfg = ThrottleConfig()
    cfg.op_size = -1
    assert cfg.op_size == UINT64_MAX


# ---------------------------------------------------------------------------
# Beyond test-throttle.c: QAPI ThrottleLimits


def test_limits_to_config_round_trip():
    """ThrottleLimits -> ThrottleConfig -> ThrottleLimits keeps every value, unset members read back as defaults."""
    limits = {"bps-read": 1000, "bps-read-max": 5000, "bps-read-max-length": 10,
              "iops-total": 100, "iops-total-max": 150, "iops-size": 4096}
    cfg = ThrottleConfig()
    throttle_config_init(cfg)
    throttle_limits_to_config(limits, cfg)

    assert cfg.buckets[THROTTLE_BPS_READ] == LeakyBucket(avg=1000, max=5000, burst_length=10)
    assert cfg.buckets[THROTTLE_OPS_TOTAL] == LeakyBucket(avg=100, max=150)
    assert cfg.op_size == 4096
    assert throttle_enabled(cfg)

    back = throttle_config_to_limits(cfg)
    assert tuple(back) == THROTTLE_LIMITS_KEYS
    expected = {key: 0 for key in THROTTLE_LIMITS_KEYS}
    expected.update({key: 1 for key in THROTTLE_LIMITS_KEYS if key.endswith("-max-length")})
    expected.update(limits)
    assert back == expected

    cfg2 = ThrottleConfig()
    throttle_config_init(cfg2)
    throttle_limits_to_config(back, cfg2)
    assert cfg2 == cfg


def test_limits_to_config_keeps_unset_members():
    """Members absent from the dict leave the config's current values alone."""
    cfg = ThrottleConfig()
    throttle_config_init(cfg)
    cfg.buckets[THROTTLE_BPS_WRITE].avg = 77
    throttle_limits_to_config({"iops-write": 5}, cfg)
    assert cfg.buckets[THROTTLE_BPS_WRITE].avg == 77
    assert cfg.buckets[THROTTLE_OPS_WRITE].avg == 5


@pytest.mark.parametrize("key", [k for k in THROTTLE_LIMITS_KEYS if k.endswith("-max-length")])
def test_limits_to_config_max_length_too_big(key):
    """A *-max-length over UINT_MAX is rejected with QEMU's message naming the member."""
    cfg = ThrottleConfig()
    throttle_config_init(cfg)
    with pytest.raises(Error) as exc:
        throttle_limits_to_config({key: (1 << 32)}, cfg)
    assert str(exc.value) == f"{key} value must be in the range [0, 4294967295]"

    # UINT_MAX itself passes this check and goes on to throttle_is_valid.
    throttle_config_init(cfg)
    with pytest.raises(Error, match="burst length set without burst rate"):
        throttle_limits_to_config({key: (1 << 32) - 1}, cfg)


def test_limits_to_config_invalid():
    """The converted config is checked by throttle_is_valid, negative values wrapping as in QEMU."""
    cfg = ThrottleConfig()
    throttle_config_init(cfg)
    with pytest.raises(Error, match=r"^bps/iops/max values must be within \[0, 1000000000000000\]$"):
        throttle_limits_to_config({"bps-total": -1}, cfg)
    assert cfg.buckets[THROTTLE_BPS_TOTAL].avg == UINT64_MAX
    assert throttle_config_to_limits(cfg)["bps-total"] == -1

    throttle_config_init(cfg)
    with pytest.raises(Error, match="cannot be used at the same time"):
        throttle_limits_to_config({"bps-total": 1, "bps-write": 1}, cfg)


def test_limits_to_config_bad_members():
    """Unknown members and non-integer values are refused as QAPI's input visitor refuses them."""
    cfg = ThrottleConfig()
    throttle_config_init(cfg)
    with pytest.raises(Error, match="^Parameter 'bps_total' is unexpected$"):
        throttle_limits_to_config({"bps_total": 1}, cfg)
    with pytest.raises(Error, match="^Invalid parameter type for 'iops-read', expected: integer$"):
        throttle_limits_to_config({"iops-read": "100"}, cfg)
    with pytest.raises(Error, match="expected: integer"):
        throttle_limits_to_config({"iops-read": 1 << 63}, cfg)
    assert cfg == ThrottleConfig()


# ---------------------------------------------------------------------------
# Beyond test-throttle.c: the timer path on the virtual clock


def test_compute_timer_directions():
    """A read waits on the read and total buckets only; a bool is_write selects the same buckets."""
    ts = ThrottleState()
    throttle_init(ts)
    cfg = _cfg_with(BPS_WRITE=dict(avg=100))
    throttle_config(ts, QEMU_CLOCK_VIRTUAL, cfg)
    now = ts.previous_leak
    throttle_account(ts, THROTTLE_WRITE, 30)  # 20 bytes over the 10-byte bucket

    assert throttle_compute_timer(ts, THROTTLE_READ, now) == (False, now)
    assert throttle_compute_timer(ts, False, now) == (False, now)
    assert throttle_compute_timer(ts, THROTTLE_WRITE, now) == (True, now + 200000000)
    assert throttle_compute_timer(ts, True, now) == (True, now + 200000000)

    # 100 ms later the bucket has leaked 10 bytes: 10 over, 100 ms to wait.
    assert throttle_compute_timer(ts, THROTTLE_WRITE, now + 100000000) == (True, now + 200000000)
    assert double_cmp(ts.cfg.buckets[THROTTLE_BPS_WRITE].level, 20)


def test_schedule_timer():
    """An overflowing request arms its direction's timer once; when the timer fires the next request may go."""
    ctx = qemu_get_aio_context()
    fired = []
    ts = ThrottleState()
    tt = ThrottleTimers()
    throttle_init(ts)
    throttle_timers_init(tt, ctx, QEMU_CLOCK_VIRTUAL, lambda opaque: fired.append(("read", opaque)),
                         lambda opaque: fired.append(("write", opaque)), "tgm")
    cfg = ThrottleConfig()
    throttle_limits_to_config({"iops-total": 1}, cfg)
    throttle_config(ts, QEMU_CLOCK_VIRTUAL, cfg)
    start = qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL)

    # The first request goes at once; it fills the 0.1-operation bucket by 0.9 operation.
    assert not throttle_schedule_timer(ts, tt, THROTTLE_READ)
    throttle_account(ts, THROTTLE_READ, 512)

    assert throttle_schedule_timer(ts, tt, THROTTLE_READ)
    assert timer_expire_time_ns(tt.timers[THROTTLE_READ]) == start + 900000000
    assert not timer_pending(tt.timers[THROTTLE_WRITE])

    # Throttled again while the timer is pending: the timer is left where it is.
    qemu_clock_step(300000000)
    assert throttle_schedule_timer(ts, tt, THROTTLE_READ)
    assert timer_expire_time_ns(tt.timers[THROTTLE_READ]) == start + 900000000

    # The total bucket is shared, so a write is throttled too, on its own timer.
    assert throttle_schedule_timer(ts, tt, THROTTLE_WRITE)
    assert timer_expire_time_ns(tt.timers[THROTTLE_WRITE]) == start + 900000000

    # A blocking poll warps the virtual clock to the deadline and runs both callbacks.
    while len(fired) < 2:
        aio_poll(ctx, True)
    assert fired == [("read", "tgm"), ("write", "tgm")]
    assert qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) == start + 900000000

    assert not throttle_schedule_timer(ts, tt, THROTTLE_READ)
    assert not timer_pending(tt.timers[THROTTLE_READ])
    throttle_timers_destroy(tt)


def test_get_config_copies():
    """throttle_get_config returns a copy: changing it leaves the state alone."""
    ts = ThrottleState()
    throttle_init(ts)
    cfg = _cfg_with(OPS_READ=dict(avg=10))
    throttle_config(ts, QEMU_CLOCK_VIRTUAL, cfg)
    got = throttle_get_config(ts)
    assert got == cfg
    got.buckets[THROTTLE_OPS_READ].avg = 99
    assert ts.cfg.buckets[THROTTLE_OPS_READ].avg == 10
    cfg.buckets[THROTTLE_OPS_READ].avg = 98
    assert ts.cfg.buckets[THROTTLE_OPS_READ].avg == 10
