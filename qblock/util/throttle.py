"""I/O throttling maths: QEMU's util/throttle.c and include/qemu/throttle.h.

Each limit is a leaky bucket (:class:`LeakyBucket`).  Accounting an I/O pours
its bytes (or operations) into the bucket; the bucket drains at ``avg`` units
per second.  While the level stays under the bucket's size the guest may
burst; once it overflows, :func:`throttle_compute_wait` says how many
nanoseconds must pass before the next request may go.  With
``burst_length > 1`` a second level, ``burst_level``, drains at ``max`` units
per second so that a burst cannot exceed ``max`` units/s for more than
``burst_length`` seconds.

A :class:`ThrottleConfig` holds six buckets (bytes and operations, each for
total/read/write) and ``op_size``; a :class:`ThrottleState` holds a config and
the time of the last leak; :class:`ThrottleTimers` holds the per-direction
timers that wake throttled requests.  Everything here is pure except
:func:`throttle_config` and :func:`throttle_schedule_timer`, which read the
clock (:func:`qblock.util.timer.qemu_clock_get_ns`), and the ``throttle_timers_*``
functions, which create timers in an AioContext.

C types are kept: ``avg``, ``max``, ``burst_length`` and ``op_size`` are
uint64 (assigning a negative or too large int wraps modulo 2**64, so ``-1``
becomes a huge and therefore invalid limit); ``level`` and ``burst_level`` are
doubles; waits are int64 ns truncated from a double, as C's cast does.

Where this module's API differs from QEMU's C signatures:

- ``direction`` is a :class:`ThrottleDirection` (modern QEMU) or a bool
  ``is_write`` (QEMU 3.x): ``False``/``True`` index as READ/WRITE.
- :func:`throttle_is_valid` returns a bool; with ``errp=True`` it raises
  :class:`~qblock.util.error.Error` with QEMU's message instead of returning False.
- :func:`throttle_compute_timer` returns ``(must_wait, next_timestamp)``
  instead of filling an out-parameter.
- :func:`throttle_get_config` fills ``cfg`` when given and returns it (a new
  config otherwise).
- ThrottleLimits (QAPI) is a dict keyed by the QAPI member names
  (``'bps-total'``, ``'iops-read-max-length'``, ``'iops-size'`` ...);
  :func:`throttle_limits_to_config` always raises on error.
- :class:`ThrottleTimers` keeps the 3.x fields ``read_timer_cb`` /
  ``write_timer_cb``; ``timer_cb`` (modern QEMU's array) is a read-only view.
- A freshly built :class:`LeakyBucket` has ``burst_length = 1`` (C's zeroed
  struct has 0), so ``ThrottleConfig()`` equals what :func:`throttle_config_init` leaves.

Left out: throttle groups (block/throttle-groups.c), which share one
ThrottleState between several nodes, belong to ``qblock/block/``.
"""
from __future__ import annotations

import enum
from typing import Any, Callable

import attrs

from qblock.util.aio import AioContext, aio_timer_new
from qblock.util.error import Error
from qblock.util.timer import (
    NANOSECONDS_PER_SECOND,
    QEMU_CLOCK_REALTIME,
    SCALE_NS,
    QEMUTimer,
    qemu_clock_get_ns,
    timer_free,
    timer_mod,
    timer_pending,
)

__all__ = [
    "THROTTLE_VALUE_MAX", "BucketType", "THROTTLE_BPS_TOTAL", "THROTTLE_BPS_READ",
    "THROTTLE_BPS_WRITE", "THROTTLE_OPS_TOTAL", "THROTTLE_OPS_READ", "THROTTLE_OPS_WRITE",
    "BUCKETS_COUNT", "ThrottleDirection", "THROTTLE_READ", "THROTTLE_WRITE", "THROTTLE_MAX",
    "LeakyBucket", "ThrottleConfig", "ThrottleState", "ThrottleTimers",
    "throttle_leak_bucket", "throttle_do_leak", "throttle_compute_wait", "throttle_compute_wait_for",
    "throttle_compute_timer", "throttle_config_init", "throttle_init", "throttle_timers_init",
    "throttle_timers_destroy", "throttle_timers_detach_aio_context",
    "throttle_timers_attach_aio_context", "throttle_timers_are_initialized", "throttle_enabled",
    "throttle_is_valid", "throttle_config", "throttle_get_config", "throttle_schedule_timer",
    "throttle_account", "THROTTLE_LIMITS_KEYS", "throttle_limits_to_config",
    "throttle_config_to_limits",
]

THROTTLE_VALUE_MAX = 1000000000000000

_UINT64_MASK = (1 << 64) - 1
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_UINT_MAX = (1 << 32) - 1


class BucketType(enum.IntEnum):
    """Index of a bucket in ``ThrottleConfig.buckets``."""

    THROTTLE_BPS_TOTAL = 0
    THROTTLE_BPS_READ = 1
    THROTTLE_BPS_WRITE = 2
    THROTTLE_OPS_TOTAL = 3
    THROTTLE_OPS_READ = 4
    THROTTLE_OPS_WRITE = 5
    BUCKETS_COUNT = 6


THROTTLE_BPS_TOTAL = BucketType.THROTTLE_BPS_TOTAL
THROTTLE_BPS_READ = BucketType.THROTTLE_BPS_READ
THROTTLE_BPS_WRITE = BucketType.THROTTLE_BPS_WRITE
THROTTLE_OPS_TOTAL = BucketType.THROTTLE_OPS_TOTAL
THROTTLE_OPS_READ = BucketType.THROTTLE_OPS_READ
THROTTLE_OPS_WRITE = BucketType.THROTTLE_OPS_WRITE
BUCKETS_COUNT = BucketType.BUCKETS_COUNT


class ThrottleDirection(enum.IntEnum):
    """Direction of a request; QEMU 3.x passed a bool ``is_write`` with the same values."""

    THROTTLE_READ = 0
    THROTTLE_WRITE = 1
    THROTTLE_MAX = 2


THROTTLE_READ = ThrottleDirection.THROTTLE_READ
THROTTLE_WRITE = ThrottleDirection.THROTTLE_WRITE
THROTTLE_MAX = ThrottleDirection.THROTTLE_MAX


def _uint64(value: int | float) -> int:
    """Store ``value`` as C stores it into a uint64_t: truncate, then wrap modulo 2**64."""
    return int(value) & _UINT64_MASK


def _int64(value: int) -> int:
    """Reinterpret a uint64 as the int64 a QAPI ``int`` member would hold."""
    value &= _UINT64_MASK
    return value - (1 << 64) if value > _INT64_MAX else value


@attrs.define
class LeakyBucket:
    """One limit: ``avg`` units/s sustained, bursts of ``max`` units/s for ``burst_length`` s."""

    avg: int = attrs.field(default=0, converter=_uint64)           # uint64, units per second
    max: int = attrs.field(default=0, converter=_uint64)           # uint64, burst rate in units/s
    level: float = attrs.field(default=0.0, converter=float)       # units in the bucket
    burst_level: float = attrs.field(default=0.0, converter=float)  # units in the burst bucket
    burst_length: int = attrs.field(default=1, converter=_uint64)  # uint64, burst period in seconds


def _new_buckets() -> list[LeakyBucket]:
    return [LeakyBucket() for _ in range(BUCKETS_COUNT)]


def _check_buckets(instance: Any, attribute: Any, value: list[LeakyBucket]) -> None:
    if len(value) != BUCKETS_COUNT or not all(isinstance(b, LeakyBucket) for b in value):
        raise ValueError(f"ThrottleConfig.buckets needs {int(BUCKETS_COUNT)} LeakyBucket")


@attrs.define
class ThrottleConfig:
    """The six buckets, indexed by :class:`BucketType`, and the size of one operation."""

    buckets: list[LeakyBucket] = attrs.field(factory=_new_buckets, validator=_check_buckets)
    op_size: int = attrs.field(default=0, converter=_uint64)  # uint64, bytes per operation


@attrs.define
class ThrottleState:
    """A configuration with its bucket levels and the clock time of the last leak."""

    cfg: ThrottleConfig = attrs.field(factory=ThrottleConfig)
    previous_leak: int = 0  # int64 ns


@attrs.define(eq=False)
class ThrottleTimers:
    """The timers that wake throttled requests, one per :class:`ThrottleDirection`."""

    timers: list[QEMUTimer | None] = attrs.field(factory=lambda: [None] * THROTTLE_MAX)
    clock_type: int = QEMU_CLOCK_REALTIME
    read_timer_cb: Callable[[Any], None] | None = None
    write_timer_cb: Callable[[Any], None] | None = None
    timer_opaque: Any = None

    @property
    def timer_cb(self) -> tuple[Callable[[Any], None] | None, Callable[[Any], None] | None]:
        """Callbacks indexed by direction (modern QEMU's ``timer_cb[THROTTLE_MAX]``)."""
        return (self.read_timer_cb, self.write_timer_cb)


# ---------------------------------------------------------------------------
# One bucket


def throttle_leak_bucket(bkt: LeakyBucket, delta_ns: int) -> None:
    """Drain ``bkt`` for ``delta_ns`` ns: ``level`` at ``avg`` units/s, ``burst_level`` at ``max``."""
    leak = (float(bkt.avg) * float(delta_ns)) / NANOSECONDS_PER_SECOND
    level = bkt.level - leak
    bkt.level = level if level > 0 else 0.0

    # The burst level only matters, and only drains, when bursts may last over a second.
    if bkt.burst_length > 1:
        leak = (float(bkt.max) * float(delta_ns)) / NANOSECONDS_PER_SECOND
        burst_level = bkt.burst_level - leak
        bkt.burst_level = burst_level if burst_level > 0 else 0.0


def _throttle_do_compute_wait(limit: float, extra: float) -> int:
    """ns needed to drain ``extra`` units at ``limit`` units/s, truncated to int64 as C casts."""
    wait = extra * NANOSECONDS_PER_SECOND
    wait /= limit
    return int(wait)


def throttle_compute_wait(bkt: LeakyBucket) -> int:
    """ns the next request must wait because of ``bkt``; 0 when it may go now."""
    if not bkt.avg:
        return 0

    if not bkt.max:
        # No burst rate: a bucket of a tenth of a second at avg still lets short bursts pass.
        bucket_size = float(bkt.avg) / 10
        burst_bucket_size = 0.0
    else:
        # The main bucket holds a whole burst; the burst bucket holds a tenth of a second at max.
        bucket_size = float((bkt.max * bkt.burst_length) & _UINT64_MASK)
        burst_bucket_size = float(bkt.max) / 10

    extra = bkt.level - bucket_size
    if extra > 0:
        return _throttle_do_compute_wait(float(bkt.avg), extra)

    if bkt.burst_length > 1:
        assert bkt.max > 0, "burst_length > 1 needs a burst rate (see throttle_is_valid)"
        extra = bkt.burst_level - burst_bucket_size
        if extra > 0:
            return _throttle_do_compute_wait(float(bkt.max), extra)

    return 0


# ---------------------------------------------------------------------------
# A whole state


# The buckets a request of each direction must respect.
_BUCKETS_TO_CHECK = (
    (THROTTLE_BPS_TOTAL, THROTTLE_OPS_TOTAL, THROTTLE_BPS_READ, THROTTLE_OPS_READ),
    (THROTTLE_BPS_TOTAL, THROTTLE_OPS_TOTAL, THROTTLE_BPS_WRITE, THROTTLE_OPS_WRITE),
)
# The buckets a request of each direction fills: (bytes buckets, operations buckets).
_BUCKETS_TO_FILL = (
    ((THROTTLE_BPS_TOTAL, THROTTLE_BPS_READ), (THROTTLE_OPS_TOTAL, THROTTLE_OPS_READ)),
    ((THROTTLE_BPS_TOTAL, THROTTLE_BPS_WRITE), (THROTTLE_OPS_TOTAL, THROTTLE_OPS_WRITE)),
)


def _check_direction(direction: int) -> int:
    assert 0 <= direction < THROTTLE_MAX, f"bad throttle direction {direction!r}"
    return int(direction)


def throttle_do_leak(ts: ThrottleState, now: int) -> None:
    """Drain every bucket of ``ts`` for the time since the last leak; ``now`` becomes the last leak."""
    delta_ns = now - ts.previous_leak
    ts.previous_leak = now

    if delta_ns <= 0:
        return

    for bkt in ts.cfg.buckets:
        throttle_leak_bucket(bkt, delta_ns)


def throttle_compute_wait_for(ts: ThrottleState, direction: int) -> int:
    """Longest wait, in ns, over the four buckets a request of ``direction`` must respect."""
    max_wait = 0
    for index in _BUCKETS_TO_CHECK[_check_direction(direction)]:
        wait = throttle_compute_wait(ts.cfg.buckets[index])
        if wait > max_wait:
            max_wait = wait
    return max_wait


def throttle_compute_timer(ts: ThrottleState, direction: int, now: int) -> tuple[bool, int]:
    """Leak up to ``now``; return ``(True, when)`` if a request must wait until ``when``, else ``(False, now)``."""
    throttle_do_leak(ts, now)

    wait = throttle_compute_wait_for(ts, direction)
    if wait:
        return True, now + wait
    return False, now


# ---------------------------------------------------------------------------
# Initialisation and timers


def throttle_config_init(cfg: ThrottleConfig) -> None:
    """Reset ``cfg`` in place to no limits: every field 0, every ``burst_length`` 1."""
    if len(cfg.buckets) != BUCKETS_COUNT:
        cfg.buckets = _new_buckets()
    # Reset the existing buckets rather than replacing them, as memset does to the C array.
    for bkt in cfg.buckets:
        bkt.avg = 0
        bkt.max = 0
        bkt.level = 0.0
        bkt.burst_level = 0.0
        bkt.burst_length = 1
    cfg.op_size = 0


def throttle_init(ts: ThrottleState) -> None:
    """Reset ``ts`` in place: an empty configuration and ``previous_leak`` 0."""
    ts.previous_leak = 0
    throttle_config_init(ts.cfg)


def throttle_timers_attach_aio_context(tt: ThrottleTimers, new_context: AioContext) -> None:
    """Create the timers in ``new_context``, one per direction that has a callback."""
    for direction, cb in enumerate(tt.timer_cb):
        if cb is not None:
            tt.timers[direction] = aio_timer_new(new_context, tt.clock_type, SCALE_NS,
                                                 cb, tt.timer_opaque)


def throttle_timers_init(tt: ThrottleTimers, aio_context: AioContext, clock_type: int,
                         read_timer_cb: Callable[[Any], None] | None,
                         write_timer_cb: Callable[[Any], None] | None,
                         timer_opaque: Any) -> None:
    """Reset ``tt`` and create its timers on ``clock_type`` in ``aio_context``; a None callback gets no timer."""
    assert read_timer_cb is not None or write_timer_cb is not None, "throttle timers need a callback"
    tt.timers = [None] * THROTTLE_MAX
    tt.clock_type = clock_type
    tt.read_timer_cb = read_timer_cb
    tt.write_timer_cb = write_timer_cb
    tt.timer_opaque = timer_opaque
    throttle_timers_attach_aio_context(tt, aio_context)


def throttle_timers_detach_aio_context(tt: ThrottleTimers) -> None:
    """Cancel and free the timers (before ``tt`` moves to another AioContext)."""
    for direction in range(THROTTLE_MAX):
        timer = tt.timers[direction]
        if timer is not None:
            timer_free(timer)
            tt.timers[direction] = None


def throttle_timers_destroy(tt: ThrottleTimers) -> None:
    """Free the timers; the last call on a ThrottleTimers."""
    throttle_timers_detach_aio_context(tt)


def throttle_timers_are_initialized(tt: ThrottleTimers) -> bool:
    """True when ``tt`` holds at least one timer."""
    return any(timer is not None for timer in tt.timers)


# ---------------------------------------------------------------------------
# Configuration


def throttle_enabled(cfg: ThrottleConfig) -> bool:
    """True when any bucket sets a limit (``avg > 0``)."""
    return any(bkt.avg > 0 for bkt in cfg.buckets)


def _throttle_invalid_reason(cfg: ThrottleConfig) -> str | None:
    """QEMU's message for the first rule ``cfg`` breaks, None when it is valid."""
    b = cfg.buckets

    def total_and_rw(total: int, read: int, write: int, field: str) -> bool:
        return bool(getattr(b[total], field)
                    and (getattr(b[read], field) or getattr(b[write], field)))

    if (total_and_rw(THROTTLE_BPS_TOTAL, THROTTLE_BPS_READ, THROTTLE_BPS_WRITE, "avg")
            or total_and_rw(THROTTLE_OPS_TOTAL, THROTTLE_OPS_READ, THROTTLE_OPS_WRITE, "avg")
            or total_and_rw(THROTTLE_BPS_TOTAL, THROTTLE_BPS_READ, THROTTLE_BPS_WRITE, "max")
            or total_and_rw(THROTTLE_OPS_TOTAL, THROTTLE_OPS_READ, THROTTLE_OPS_WRITE, "max")):
        return "bps/iops/max total values and read/write values cannot be used at the same time"

    if (cfg.op_size and not b[THROTTLE_OPS_TOTAL].avg and not b[THROTTLE_OPS_READ].avg
            and not b[THROTTLE_OPS_WRITE].avg):
        return "iops size requires an iops value to be set"

    for bkt in b:
        # uint64 fields: a negative value has wrapped to a huge one and fails here.
        if bkt.avg > THROTTLE_VALUE_MAX or bkt.max > THROTTLE_VALUE_MAX:
            return "bps/iops/max values must be within [0, %d]" % THROTTLE_VALUE_MAX
        if not bkt.burst_length:
            return "the burst length cannot be 0"
        if bkt.burst_length > 1 and not bkt.max:
            return "burst length set without burst rate"
        if bkt.max and bkt.burst_length > THROTTLE_VALUE_MAX // bkt.max:
            return "burst length too high for this burst rate"
        if bkt.max and not bkt.avg:
            return "bps_max/iops_max require corresponding bps/iops values"
        if bkt.max and bkt.max < bkt.avg:
            return "bps_max/iops_max cannot be lower than bps/iops"

    return None


def throttle_is_valid(cfg: ThrottleConfig, errp: bool = False) -> bool:
    """True when ``cfg`` is usable; with ``errp=True`` an invalid one raises Error with QEMU's message instead."""
    reason = _throttle_invalid_reason(cfg)
    if reason is None:
        return True
    if errp:
        raise Error(reason)
    return False


def _throttle_config_copy(dst: ThrottleConfig, src: ThrottleConfig) -> None:
    """``*dst = *src``: copy every field into ``dst``'s own buckets."""
    for d, s in zip(dst.buckets, src.buckets):
        d.avg = s.avg
        d.max = s.max
        d.level = s.level
        d.burst_level = s.burst_level
        d.burst_length = s.burst_length
    dst.op_size = src.op_size


def throttle_config(ts: ThrottleState, clock_type: int, cfg: ThrottleConfig) -> None:
    """Install a copy of ``cfg`` in ``ts`` with empty buckets, and start leaking from now on ``clock_type``."""
    _throttle_config_copy(ts.cfg, cfg)
    for bkt in ts.cfg.buckets:
        bkt.level = 0.0
        bkt.burst_level = 0.0
    ts.previous_leak = qemu_clock_get_ns(clock_type)


def throttle_get_config(ts: ThrottleState, cfg: ThrottleConfig | None = None) -> ThrottleConfig:
    """Copy ``ts``'s configuration (levels included) into ``cfg``, or a new config, and return it."""
    if cfg is None:
        cfg = ThrottleConfig()
    _throttle_config_copy(cfg, ts.cfg)
    return cfg


# ---------------------------------------------------------------------------
# Use on the request path


def throttle_schedule_timer(ts: ThrottleState, tt: ThrottleTimers, direction: int) -> bool:
    """True when a request of ``direction`` must wait; arms that direction's timer unless already pending."""
    direction = _check_direction(direction)
    timer = tt.timers[direction]
    assert timer is not None, "no throttle timer for this direction"
    now = qemu_clock_get_ns(tt.clock_type)

    must_wait, next_timestamp = throttle_compute_timer(ts, direction, now)
    if not must_wait:
        return False

    # Already armed: the pending timer wakes the queue; do not push it back.
    if timer_pending(timer):
        return True

    timer_mod(timer, next_timestamp)
    return True


def throttle_account(ts: ThrottleState, direction: int, size: int) -> None:
    """Pour a request of ``size`` bytes into the bytes and operations buckets of ``direction``."""
    size = _uint64(size)
    units = 1.0
    # A request larger than op_size counts as size / op_size operations.
    if ts.cfg.op_size and size > ts.cfg.op_size:
        units = float(size) / float(ts.cfg.op_size)

    bytes_buckets, ops_buckets = _BUCKETS_TO_FILL[_check_direction(direction)]
    for index in bytes_buckets:
        bkt = ts.cfg.buckets[index]
        bkt.level += float(size)
        if bkt.burst_length > 1:
            bkt.burst_level += float(size)
    for index in ops_buckets:
        bkt = ts.cfg.buckets[index]
        bkt.level += units
        if bkt.burst_length > 1:
            bkt.burst_level += units


# ---------------------------------------------------------------------------
# QAPI ThrottleLimits <-> ThrottleConfig

# QAPI member name -> (bucket index or None for op_size, LeakyBucket field).
_LIMITS_FIELDS: dict[str, tuple[int | None, str]] = {
    "bps-total": (THROTTLE_BPS_TOTAL, "avg"),
    "bps-read": (THROTTLE_BPS_READ, "avg"),
    "bps-write": (THROTTLE_BPS_WRITE, "avg"),
    "iops-total": (THROTTLE_OPS_TOTAL, "avg"),
    "iops-read": (THROTTLE_OPS_READ, "avg"),
    "iops-write": (THROTTLE_OPS_WRITE, "avg"),
    "bps-total-max": (THROTTLE_BPS_TOTAL, "max"),
    "bps-read-max": (THROTTLE_BPS_READ, "max"),
    "bps-write-max": (THROTTLE_BPS_WRITE, "max"),
    "iops-total-max": (THROTTLE_OPS_TOTAL, "max"),
    "iops-read-max": (THROTTLE_OPS_READ, "max"),
    "iops-write-max": (THROTTLE_OPS_WRITE, "max"),
    "bps-total-max-length": (THROTTLE_BPS_TOTAL, "burst_length"),
    "bps-read-max-length": (THROTTLE_BPS_READ, "burst_length"),
    "bps-write-max-length": (THROTTLE_BPS_WRITE, "burst_length"),
    "iops-total-max-length": (THROTTLE_OPS_TOTAL, "burst_length"),
    "iops-read-max-length": (THROTTLE_OPS_READ, "burst_length"),
    "iops-write-max-length": (THROTTLE_OPS_WRITE, "burst_length"),
    "iops-size": (None, "op_size"),
}

THROTTLE_LIMITS_KEYS: tuple[str, ...] = tuple(_LIMITS_FIELDS)


def _check_limits_members(arg: dict[str, int]) -> None:
    """What QAPI's input visitor checks before throttle.c sees the struct: known members, int64 values."""
    for key, value in arg.items():
        if key not in _LIMITS_FIELDS:
            raise Error(f"Parameter '{key}' is unexpected")
        if (isinstance(value, bool) or not isinstance(value, int)
                or not _INT64_MIN <= value <= _INT64_MAX):
            raise Error(f"Invalid parameter type for '{key}', expected: integer")


def throttle_limits_to_config(arg: dict[str, int], cfg: ThrottleConfig) -> None:
    """Apply the members present in a QAPI ThrottleLimits dict to ``cfg``, then check it; raises Error."""
    _check_limits_members(arg)
    # Members are applied in the schema's order, so the first bad *-max-length is reported.
    for key, (index, field) in _LIMITS_FIELDS.items():
        if key not in arg:
            continue
        value = arg[key]
        if field == "burst_length" and value > _UINT_MAX:
            raise Error(f"{key} value must be in the range [0, {_UINT_MAX}]")
        if index is None:
            cfg.op_size = value
        else:
            setattr(cfg.buckets[index], field, value)

    throttle_is_valid(cfg, errp=True)


def throttle_config_to_limits(cfg: ThrottleConfig) -> dict[str, int]:
    """A QAPI ThrottleLimits dict with every member set from ``cfg`` (uint64 read back as int64)."""
    var: dict[str, int] = {}
    for key, (index, field) in _LIMITS_FIELDS.items():
        value = cfg.op_size if index is None else getattr(cfg.buckets[index], field)
        var[key] = _int64(value)
    return var
