"""Clocks and timers (util/qemu-timer.c): arming, disarming, expiry, ordering and scales on the virtual clock.

QEMU has no unit test of its own for qemu-timer.c; these check the behaviour its callers rely
on.  Every test runs on the virtual clock, which it steps with ``qemu_clock_step`` or lets a
blocking ``aio_poll`` warp, so timing is exact and nothing sleeps.  Tests that depend on which
timers are pending use a private AioContext, so timers other tests left armed in the main loop
cannot interfere.
"""
import pytest

from qblock.util.aio import aio_context_destroy, aio_context_new, aio_poll, aio_timer_new, qemu_get_aio_context
from qblock.util.timer import (
    QEMU_CLOCK_VIRTUAL,
    SCALE_MS,
    SCALE_NS,
    SCALE_US,
    qemu_clock_advance_virtual_time,
    qemu_clock_get_ms,
    qemu_clock_get_ns,
    qemu_clock_get_us,
    qemu_clock_step,
    timer_del,
    timer_expire_time_ns,
    timer_expired,
    timer_mod,
    timer_mod_anticipate,
    timer_mod_anticipate_ns,
    timer_mod_ns,
    timer_new_ms,
    timer_new_ns,
    timer_new_us,
    timer_pending,
)


@pytest.fixture
def ctx():
    """A fresh AioContext, destroyed after the test."""
    c = aio_context_new("test-timer")
    yield c
    aio_context_destroy(c)


def now():
    return qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL)


def recorder(ctx, log, name, scale=SCALE_NS):
    """A virtual-clock timer in ``ctx`` that appends ``(name, now)`` to ``log`` when it fires."""
    return aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, scale, lambda _: log.append((name, now())), None)


# ---------------------------------------------------------------------------
# The virtual clock


def test_clock_step_exact():
    """qemu_clock_step moves the virtual clock by exactly the step and returns the new time."""
    t0 = now()
    assert qemu_clock_step(1234) == t0 + 1234
    assert now() == t0 + 1234
    assert qemu_clock_step(0) == t0 + 1234
    assert qemu_clock_step(3 * SCALE_MS) == t0 + 1234 + 3 * SCALE_MS
    assert now() == t0 + 1234 + 3 * SCALE_MS


def test_clock_step_negative():
    """A negative step is refused and leaves the clock where it was."""
    t0 = now()
    with pytest.raises(ValueError):
        qemu_clock_step(-1)
    assert now() == t0


def test_clock_advance_never_backwards():
    """qemu_clock_advance_virtual_time moves forward only."""
    t0 = now()
    assert qemu_clock_advance_virtual_time(t0 + 500) == t0 + 500
    assert qemu_clock_advance_virtual_time(t0) == t0 + 500
    assert now() == t0 + 500


def test_clock_get_scaled():
    """qemu_clock_get_ms and qemu_clock_get_us are the nanosecond clock divided down."""
    qemu_clock_step(SCALE_MS - now() % SCALE_MS + 2 * SCALE_US + 7)
    t = now()
    assert qemu_clock_get_ms(QEMU_CLOCK_VIRTUAL) == t // SCALE_MS
    assert qemu_clock_get_us(QEMU_CLOCK_VIRTUAL) == t // SCALE_US
    assert qemu_clock_get_us(QEMU_CLOCK_VIRTUAL) % 1000 == 2


# ---------------------------------------------------------------------------
# Arming and disarming


def test_timer_mod_ns(ctx):
    """timer_mod_ns arms a timer that fires once the clock reaches its expiry, and only when polled."""
    log = []
    ts = recorder(ctx, log, "a")
    assert not timer_pending(ts)
    assert timer_expire_time_ns(ts) == -1

    expire = now() + 1000
    timer_mod_ns(ts, expire)
    assert timer_pending(ts)
    assert timer_expire_time_ns(ts) == expire
    assert not aio_poll(ctx, False)

    qemu_clock_step(999)
    assert not aio_poll(ctx, False)
    qemu_clock_step(1)
    assert log == []
    assert aio_poll(ctx, False)
    assert log == [("a", expire)]
    assert not timer_pending(ts)
    assert timer_expire_time_ns(ts) == -1
    assert not aio_poll(ctx, False)


def test_timer_mod_rearm(ctx):
    """Re-arming a pending timer replaces its expiry: it fires once, at the new time."""
    log = []
    ts = recorder(ctx, log, "a")
    t0 = now()
    timer_mod_ns(ts, t0 + 100)
    timer_mod_ns(ts, t0 + 300)
    assert timer_expire_time_ns(ts) == t0 + 300

    qemu_clock_step(200)
    assert not aio_poll(ctx, False)
    assert aio_poll(ctx, True)
    assert log == [("a", t0 + 300)]
    assert not aio_poll(ctx, False)


def test_timer_mod_past(ctx):
    """A timer armed in the past fires at the next poll, without moving the clock."""
    log = []
    ts = recorder(ctx, log, "a")
    t0 = now()
    timer_mod_ns(ts, t0 - 10)
    assert timer_expired(ts, t0)
    assert aio_poll(ctx, False)
    assert log == [("a", t0)]


def test_timer_del(ctx):
    """timer_del disarms a pending timer, which then never fires; deleting again is harmless."""
    log = []
    ts = recorder(ctx, log, "a")
    timer_mod_ns(ts, now() + 100)
    timer_del(ts)
    assert not timer_pending(ts)
    assert timer_expire_time_ns(ts) == -1
    timer_del(ts)

    qemu_clock_step(200)
    assert not aio_poll(ctx, False)
    assert log == []


def test_timer_del_then_rearm(ctx):
    """A deleted timer can be armed again and fires only at its new expiry."""
    log = []
    ts = recorder(ctx, log, "a")
    t0 = now()
    timer_mod_ns(ts, t0 + 100)
    timer_del(ts)
    timer_mod_ns(ts, t0 + 250)
    qemu_clock_step(100)
    assert not aio_poll(ctx, False)
    qemu_clock_step(150)
    assert aio_poll(ctx, False)
    assert log == [("a", t0 + 250)]


def test_timer_mod_anticipate(ctx):
    """timer_mod_anticipate arms an idle timer and only ever moves a pending one earlier."""
    ts = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_US, lambda _: None, None)
    base = now() // SCALE_US + 1000
    timer_mod_anticipate(ts, base + 50)
    assert timer_expire_time_ns(ts) == (base + 50) * SCALE_US

    timer_mod_anticipate(ts, base + 80)
    assert timer_expire_time_ns(ts) == (base + 50) * SCALE_US

    timer_mod_anticipate(ts, base + 20)
    assert timer_expire_time_ns(ts) == (base + 20) * SCALE_US

    timer_mod_anticipate_ns(ts, (base + 20) * SCALE_US + 1)
    assert timer_expire_time_ns(ts) == (base + 20) * SCALE_US
    timer_mod_anticipate_ns(ts, (base + 20) * SCALE_US - 1)
    assert timer_expire_time_ns(ts) == (base + 20) * SCALE_US - 1

    timer_del(ts)
    timer_mod_anticipate(ts, base + 900)
    assert timer_expire_time_ns(ts) == (base + 900) * SCALE_US
    timer_del(ts)


def test_timer_expired(ctx):
    """timer_expired compares a pending timer's expiry with a time in the timer's own scale."""
    ts = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_MS, lambda _: None, None)
    assert not timer_expired(ts, 10**9)
    timer_mod(ts, 5000)
    assert not timer_expired(ts, 4999)
    assert timer_expired(ts, 5000)
    assert timer_expired(ts, 5001)
    timer_del(ts)
    assert not timer_expired(ts, 5001)


# ---------------------------------------------------------------------------
# Order and callbacks


def test_timer_equal_expiry_order(ctx):
    """Timers with the same expiry fire in the order they were armed; re-arming moves one to the back."""
    log = []
    timers = {name: recorder(ctx, log, name) for name in "abcd"}
    expire = now() + 100
    for name in "cadb":
        timer_mod_ns(timers[name], expire)
    timer_mod_ns(timers["a"], expire)

    qemu_clock_step(100)
    assert aio_poll(ctx, False)
    assert [name for name, _ in log] == ["c", "d", "b", "a"]


def test_timer_expiry_order(ctx):
    """Expired timers fire earliest first, whatever order they were armed in."""
    log = []
    t0 = now()
    for name, delta in (("late", 300), ("early", 100), ("middle", 200)):
        timer_mod_ns(recorder(ctx, log, name), t0 + delta)
    qemu_clock_step(300)
    assert aio_poll(ctx, False)
    assert log == [("early", t0 + 300), ("middle", t0 + 300), ("late", t0 + 300)]


def test_timer_rearm_from_callback(ctx):
    """A callback that re-arms its own timer makes it fire again at exactly each new deadline."""
    fired = []
    period = 7 * SCALE_MS

    def cb(_):
        fired.append(now())
        if len(fired) < 4:
            timer_mod_ns(ts, now() + period)

    ts = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, cb, None)
    t0 = now()
    timer_mod_ns(ts, t0 + period)
    while len(fired) < 4:
        assert aio_poll(ctx, True)
    assert fired == [t0 + period, t0 + 2 * period, t0 + 3 * period, t0 + 4 * period]
    assert not timer_pending(ts)
    assert not aio_poll(ctx, False)


def test_timer_warp_to_earliest(ctx):
    """A blocking poll warps the virtual clock to the earliest pending timer and runs only that one."""
    log = []
    t0 = now()
    timer_mod_ns(recorder(ctx, log, "second"), t0 + 2000)
    timer_mod_ns(recorder(ctx, log, "first"), t0 + 1000)
    assert aio_poll(ctx, True)
    assert log == [("first", t0 + 1000)]
    assert now() == t0 + 1000
    assert aio_poll(ctx, True)
    assert log == [("first", t0 + 1000), ("second", t0 + 2000)]
    assert now() == t0 + 2000


# ---------------------------------------------------------------------------
# Scales


@pytest.mark.parametrize(("new", "scale"), [(timer_new_ns, SCALE_NS), (timer_new_us, SCALE_US),
                                             (timer_new_ms, SCALE_MS)])
def test_timer_scales(new, scale):
    """timer_new_ns/us/ms create main-loop timers whose timer_mod takes units of their scale."""
    main = qemu_get_aio_context()
    fired = []
    ts = new(QEMU_CLOCK_VIRTUAL, lambda _: fired.append(now()), None)
    assert ts.scale == scale
    try:
        expire = now() // scale + 3
        timer_mod(ts, expire)
        assert timer_expire_time_ns(ts) == expire * scale

        qemu_clock_advance_virtual_time(expire * scale - 1)
        aio_poll(main, False)
        assert fired == []
        qemu_clock_step(1)
        assert aio_poll(main, False)
        assert fired == [expire * scale]
    finally:
        timer_del(ts)


def test_scale_constants():
    """The scales are nanoseconds per unit, as in QEMU's timer.h."""
    assert (SCALE_NS, SCALE_US, SCALE_MS) == (1, 1000, 1000000)
