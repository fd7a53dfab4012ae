"""I/O accounting: QEMU's block/accounting.c.

Devices account their requests (``block_acct_start`` when a request
arrives, ``block_acct_done``/``block_acct_failed`` when it completes,
``block_acct_invalid`` for requests rejected on submission,
``block_acct_merge_done`` for requests merged into others) in the
BlockBackend's :class:`BlockAcctStats`: bytes, operations, failures, invalid
requests, merges and total latency per type, the time of the last access
(for ``idle_time_ns``) and latency histograms with configurable bin
boundaries (QMP ``block-latency-histogram-set``).

Time comes from QEMU_CLOCK_REALTIME, or the virtual clock in qtest mode.
Difference: under qtest QEMU counts every latency as a fixed 1 ms; qblock's
virtual clock moves deterministically, so it counts the real (virtual)
latency.
"""
from __future__ import annotations

import bisect
import enum
import threading

import attrs

from qblock.util.timer import QEMU_CLOCK_REALTIME, QEMU_CLOCK_VIRTUAL, qemu_clock_get_ns, qtest_enabled

__all__ = ["BlockAcctType", "BlockAcctStats", "BlockAcctCookie", "BlockLatencyHistogram", "block_acct_init",
           "block_acct_setup", "block_acct_start", "block_acct_done", "block_acct_failed",
           "block_acct_invalid", "block_acct_merge_done", "block_acct_idle_time_ns",
           "block_latency_histogram_set", "block_latency_histogram_clear", "block_acct_query"]


class BlockAcctType(enum.IntEnum):
    BLOCK_ACCT_NONE = 0
    BLOCK_ACCT_READ = 1
    BLOCK_ACCT_WRITE = 2
    BLOCK_ACCT_FLUSH = 3
    BLOCK_ACCT_UNMAP = 4


BLOCK_MAX_IOTYPE = 5


def _clock() -> int:
    return QEMU_CLOCK_VIRTUAL if qtest_enabled() else QEMU_CLOCK_REALTIME


@attrs.define
class BlockLatencyHistogram:
    """Counts of latencies per bin; ``boundaries`` b0 < b1 < ... give bins [0,b0), [b0,b1), ..., [bn,inf)."""

    boundaries: list[int] = attrs.field(factory=list)
    bins: list[int] = attrs.field(factory=list)


@attrs.define
class BlockAcctCookie:
    """One request being accounted: its size, start time and type."""

    bytes: int = 0
    start_time_ns: int = 0
    type: BlockAcctType = BlockAcctType.BLOCK_ACCT_NONE


@attrs.define
class BlockAcctStats:
    """Per-type counters of one BlockBackend (QEMU's BlockAcctStats)."""

    nr_bytes: list[int] = attrs.field(factory=lambda: [0] * BLOCK_MAX_IOTYPE)
    nr_ops: list[int] = attrs.field(factory=lambda: [0] * BLOCK_MAX_IOTYPE)
    invalid_ops: list[int] = attrs.field(factory=lambda: [0] * BLOCK_MAX_IOTYPE)
    failed_ops: list[int] = attrs.field(factory=lambda: [0] * BLOCK_MAX_IOTYPE)
    total_time_ns: list[int] = attrs.field(factory=lambda: [0] * BLOCK_MAX_IOTYPE)
    merged: list[int] = attrs.field(factory=lambda: [0] * BLOCK_MAX_IOTYPE)
    last_access_time_ns: int = 0
    account_invalid: bool = True
    account_failed: bool = True
    latency_histogram: list[BlockLatencyHistogram] = attrs.field(
        factory=lambda: [BlockLatencyHistogram() for _ in range(BLOCK_MAX_IOTYPE)])
    lock: threading.Lock = attrs.field(factory=threading.Lock, repr=False, eq=False)


def block_acct_init(stats: BlockAcctStats) -> None:
    stats.__init__()


def block_acct_setup(stats: BlockAcctStats, account_invalid: bool, account_failed: bool) -> None:
    stats.account_invalid = account_invalid
    stats.account_failed = account_failed


def block_acct_start(stats: BlockAcctStats, cookie: BlockAcctCookie, bytes: int, type: BlockAcctType) -> None:
    """Start accounting a request of ``bytes`` bytes."""
    cookie.bytes = bytes
    cookie.start_time_ns = qemu_clock_get_ns(_clock())
    cookie.type = type


def _histogram_account(hist: BlockLatencyHistogram, latency_ns: int) -> None:
    if not hist.bins:
        return
    hist.bins[bisect.bisect_right(hist.boundaries, latency_ns)] += 1


def _block_account_one_io(stats: BlockAcctStats, cookie: BlockAcctCookie, failed: bool) -> None:
    t = cookie.type
    if t == BlockAcctType.BLOCK_ACCT_NONE:
        return
    time_ns = qemu_clock_get_ns(_clock())
    latency_ns = time_ns - cookie.start_time_ns
    with stats.lock:
        if failed:
            stats.failed_ops[t] += 1
        else:
            stats.nr_bytes[t] += cookie.bytes
            stats.nr_ops[t] += 1
        _histogram_account(stats.latency_histogram[t], latency_ns)
        if not failed or stats.account_failed:
            stats.total_time_ns[t] += latency_ns
            stats.last_access_time_ns = time_ns
    cookie.type = BlockAcctType.BLOCK_ACCT_NONE


def block_acct_done(stats: BlockAcctStats, cookie: BlockAcctCookie) -> None:
    """The request completed: count its bytes, the operation and its latency."""
    _block_account_one_io(stats, cookie, False)


def block_acct_failed(stats: BlockAcctStats, cookie: BlockAcctCookie) -> None:
    """The request failed: count a failure (and its latency when account_failed)."""
    _block_account_one_io(stats, cookie, True)


def block_acct_invalid(stats: BlockAcctStats, type: BlockAcctType) -> None:
    """A request was rejected on submission; no I/O, so no latency."""
    with stats.lock:
        stats.invalid_ops[type] += 1
        if stats.account_invalid:
            stats.last_access_time_ns = qemu_clock_get_ns(_clock())


def block_acct_merge_done(stats: BlockAcctStats, type: BlockAcctType, num_requests: int) -> None:
    """``num_requests`` requests were merged into others."""
    with stats.lock:
        stats.merged[type] += num_requests


def block_acct_idle_time_ns(stats: BlockAcctStats) -> int:
    return qemu_clock_get_ns(_clock()) - stats.last_access_time_ns


def block_latency_histogram_set(stats: BlockAcctStats, type: BlockAcctType, boundaries: list[int]) -> int:
    """Set the bin boundaries (at least one, strictly increasing, positive); -EINVAL otherwise. Clears the counts."""
    import errno
    prev = 0
    for b in boundaries:
        if b <= prev:
            return -errno.EINVAL
        prev = b
    if not boundaries:
        return -errno.EINVAL  # a single bin tells nothing; later QEMU refuses it too
    with stats.lock:
        hist = stats.latency_histogram[type]
        hist.boundaries = list(boundaries)
        hist.bins = [0] * (len(boundaries) + 1)
    return 0


def block_latency_histogram_clear(stats: BlockAcctStats) -> None:
    with stats.lock:
        for hist in stats.latency_histogram:
            hist.boundaries = []
            hist.bins = []


_R, _W, _F, _U = (BlockAcctType.BLOCK_ACCT_READ, BlockAcctType.BLOCK_ACCT_WRITE,
                  BlockAcctType.BLOCK_ACCT_FLUSH, BlockAcctType.BLOCK_ACCT_UNMAP)


def block_acct_query(stats: BlockAcctStats, wr_highest_offset: int = 0) -> dict:
    """The ``stats`` member of a query-blockstats entry (QAPI BlockDeviceStats names)."""
    d = {
        "rd_bytes": stats.nr_bytes[_R], "wr_bytes": stats.nr_bytes[_W], "unmap_bytes": stats.nr_bytes[_U],
        "rd_operations": stats.nr_ops[_R], "wr_operations": stats.nr_ops[_W],
        "flush_operations": stats.nr_ops[_F], "unmap_operations": stats.nr_ops[_U],
        "rd_total_time_ns": stats.total_time_ns[_R], "wr_total_time_ns": stats.total_time_ns[_W],
        "flush_total_time_ns": stats.total_time_ns[_F], "unmap_total_time_ns": stats.total_time_ns[_U],
        "rd_merged": stats.merged[_R], "wr_merged": stats.merged[_W], "unmap_merged": stats.merged[_U],
        "wr_highest_offset": wr_highest_offset,
        "failed_rd_operations": stats.failed_ops[_R], "failed_wr_operations": stats.failed_ops[_W],
        "failed_flush_operations": stats.failed_ops[_F], "failed_unmap_operations": stats.failed_ops[_U],
        "invalid_rd_operations": stats.invalid_ops[_R], "invalid_wr_operations": stats.invalid_ops[_W],
        "invalid_flush_operations": stats.invalid_ops[_F], "invalid_unmap_operations": stats.invalid_ops[_U],
        "account_invalid": stats.account_invalid, "account_failed": stats.account_failed,
        "timed_stats": [],
    }
    if stats.last_access_time_ns:
        d["idle_time_ns"] = block_acct_idle_time_ns(stats)
    for key, t in (("rd_latency_histogram", _R), ("wr_latency_histogram", _W), ("flush_latency_histogram", _F)):
        hist = stats.latency_histogram[t]
        if hist.bins:
            d[key] = {"boundaries": list(hist.boundaries), "bins": list(hist.bins)}
    return d
