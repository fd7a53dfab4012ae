"""I/O accounting (block/accounting.c): the counters, latencies and histograms behind query-blockstats.

QEMU has no unit test for accounting; its iotests (227 and others) read the same counters
through query-blockstats.  Here a device-like caller accounts requests on a BlockBackend's
stats: ``block_acct_start`` before the request, ``block_acct_done``/``block_acct_failed``
after it.  Latencies come from the virtual clock, so they are exact: a null-co node with
``latency-ns`` takes exactly that long, and the clock can be stepped by hand.
"""
import errno

import pytest

from qblock.block.accounting import (
    BLOCK_MAX_IOTYPE,
    BlockAcctCookie,
    BlockAcctStats,
    BlockAcctType,
    block_acct_done,
    block_acct_failed,
    block_acct_idle_time_ns,
    block_acct_init,
    block_acct_invalid,
    block_acct_merge_done,
    block_acct_query,
    block_acct_setup,
    block_acct_start,
    block_latency_histogram_clear,
    block_latency_histogram_set,
)
from qblock.block.block_backend import (
    blk_flush,
    blk_get_stats,
    blk_new,
    blk_new_open,
    blk_pdiscard,
    blk_pread,
    blk_pwrite,
    blk_unref,
)
from qblock.block.driver import BDRV_O_RDWR
from qblock.testing.memdrv import memdrv_options
from qblock.util.timer import QEMU_CLOCK_VIRTUAL, qemu_clock_get_ns, qemu_clock_step

NONE = BlockAcctType.BLOCK_ACCT_NONE
READ = BlockAcctType.BLOCK_ACCT_READ
WRITE = BlockAcctType.BLOCK_ACCT_WRITE
FLUSH = BlockAcctType.BLOCK_ACCT_FLUSH
UNMAP = BlockAcctType.BLOCK_ACCT_UNMAP
LATENCY = 250_000

# The members of QAPI's BlockDeviceStats that block_acct_query always fills (iotest 227's list).
QUERY_KEYS = {
    "rd_bytes", "wr_bytes", "unmap_bytes",
    "rd_operations", "wr_operations", "flush_operations", "unmap_operations",
    "rd_total_time_ns", "wr_total_time_ns", "flush_total_time_ns", "unmap_total_time_ns",
    "wr_highest_offset", "rd_merged", "wr_merged", "unmap_merged",
    "failed_rd_operations", "failed_wr_operations", "failed_flush_operations", "failed_unmap_operations",
    "invalid_rd_operations", "invalid_wr_operations", "invalid_flush_operations", "invalid_unmap_operations",
    "account_invalid", "account_failed", "timed_stats",
}


def now():
    return qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL)


def accounted(stats, type, bytes, request):
    """Account ``request()`` as a device does: start, run, then done or failed by its result."""
    cookie = BlockAcctCookie()
    block_acct_start(stats, cookie, bytes, type)
    ret = request()
    if ret < 0:
        block_acct_failed(stats, cookie)
    else:
        block_acct_done(stats, cookie)
    assert cookie.type is NONE
    return ret


def one_io(stats, type, latency_ns, bytes=512, failed=False):
    """Account one request that takes ``latency_ns`` of virtual time."""
    cookie = BlockAcctCookie()
    block_acct_start(stats, cookie, bytes, type)
    qemu_clock_step(latency_ns)
    (block_acct_failed if failed else block_acct_done)(stats, cookie)


@pytest.fixture
def null_blk():
    """A BlockBackend on null-co whose every request sleeps LATENCY ns of virtual time (flushes too)."""
    blk = blk_new_open(None, None, {"driver": "null-co", "size": 1 << 20, "latency-ns": LATENCY}, BDRV_O_RDWR)
    yield blk
    blk_unref(blk)


@pytest.fixture(autouse=True)
def _clock_not_at_zero():
    """A last access at virtual time 0 would read as "never", as in QEMU; keep the clock past it."""
    qemu_clock_step(1)


def test_new_stats_are_empty():
    """Fresh stats count nothing, account invalid and failed requests, and have no histogram."""
    stats = BlockAcctStats()
    for counters in (stats.nr_bytes, stats.nr_ops, stats.invalid_ops, stats.failed_ops, stats.total_time_ns,
                     stats.merged):
        assert counters == [0] * BLOCK_MAX_IOTYPE
    assert stats.last_access_time_ns == 0
    assert stats.account_invalid and stats.account_failed
    assert all(not h.bins for h in stats.latency_histogram)
    blk = blk_new()
    assert blk_get_stats(blk) == stats
    blk_unref(blk)


def test_block_acct_setup_and_init():
    """block_acct_setup switches invalid/failed accounting; block_acct_init starts the stats afresh."""
    stats = BlockAcctStats()
    block_acct_setup(stats, False, False)
    assert (stats.account_invalid, stats.account_failed) == (False, False)
    one_io(stats, READ, 10)
    block_acct_init(stats)
    assert stats == BlockAcctStats()


def test_counts_after_known_workload(null_blk):
    """Bytes, operations and total latency per type match the workload, latencies from the virtual clock."""
    stats = blk_get_stats(null_blk)
    buf = bytearray(4096)
    for i in range(3):
        assert accounted(stats, READ, 4096, lambda: blk_pread(null_blk, i * 4096, buf)) == 4096
    for i in range(2):
        assert accounted(stats, WRITE, 512, lambda: blk_pwrite(null_blk, i * 512, buf, 512)) == 512
    assert accounted(stats, FLUSH, 0, lambda: blk_flush(null_blk)) == 0         # writes to flush: sleeps
    assert accounted(stats, FLUSH, 0, lambda: blk_flush(null_blk)) == 0         # nothing new: no driver call
    assert accounted(stats, UNMAP, 65536, lambda: blk_pdiscard(null_blk, 0, 65536)) == 0  # discard=ignore
    assert stats.nr_bytes == [0, 3 * 4096, 2 * 512, 0, 65536]
    assert stats.nr_ops == [0, 3, 2, 2, 1]
    assert stats.total_time_ns == [0, 3 * LATENCY, 2 * LATENCY, LATENCY, 0]
    assert stats.failed_ops == [0] * BLOCK_MAX_IOTYPE
    assert stats.invalid_ops == [0] * BLOCK_MAX_IOTYPE
    assert stats.last_access_time_ns == now()
    q = block_acct_query(stats, 1024)
    assert (q["rd_bytes"], q["wr_bytes"], q["unmap_bytes"]) == (12288, 1024, 65536)
    assert (q["rd_operations"], q["wr_operations"], q["flush_operations"], q["unmap_operations"]) == (3, 2, 2, 1)
    assert (q["rd_total_time_ns"], q["wr_total_time_ns"], q["flush_total_time_ns"], q["unmap_total_time_ns"]) == (
        3 * LATENCY, 2 * LATENCY, LATENCY, 0)
    assert q["wr_highest_offset"] == 1024
    assert q["idle_time_ns"] == 0


def test_failed_ops_with_account_failed():
    """A failed request counts as failed, not as done, and its latency and access time count too."""
    blk = blk_new_open(None, None, memdrv_options("co", size=1 << 20, latency_ns=LATENCY, fail=errno.EIO),
                       BDRV_O_RDWR)
    stats = blk_get_stats(blk)
    buf = bytearray(512)
    assert accounted(stats, READ, 512, lambda: blk_pread(blk, 0, buf)) == -errno.EIO
    assert accounted(stats, WRITE, 512, lambda: blk_pwrite(blk, 0, buf)) == -errno.EIO
    assert stats.failed_ops == [0, 1, 1, 0, 0]
    assert stats.nr_ops == [0] * BLOCK_MAX_IOTYPE
    assert stats.nr_bytes == [0] * BLOCK_MAX_IOTYPE
    assert stats.total_time_ns == [0, LATENCY, LATENCY, 0, 0]
    assert stats.last_access_time_ns == now()
    q = block_acct_query(stats)
    assert (q["failed_rd_operations"], q["failed_wr_operations"], q["failed_flush_operations"],
            q["failed_unmap_operations"]) == (1, 1, 0, 0)
    blk_unref(blk)


def test_failed_ops_without_account_failed():
    """With account_failed off a failure is still counted, but neither its latency nor its access time."""
    stats = BlockAcctStats()
    block_acct_setup(stats, True, False)
    one_io(stats, READ, 100)
    t_done = now()
    one_io(stats, READ, 50, failed=True)
    one_io(stats, FLUSH, 70, failed=True)
    assert stats.failed_ops == [0, 1, 0, 1, 0]
    assert stats.nr_ops == [0, 1, 0, 0, 0]
    assert stats.total_time_ns == [0, 100, 0, 0, 0]
    assert stats.last_access_time_ns == t_done
    assert block_acct_idle_time_ns(stats) == 120


def test_invalid_ops():
    """An invalid request counts per type with no latency; it is an access only while account_invalid is on."""
    stats = BlockAcctStats()
    block_acct_invalid(stats, WRITE)
    block_acct_invalid(stats, WRITE)
    block_acct_invalid(stats, UNMAP)
    assert stats.invalid_ops == [0, 0, 2, 0, 1]
    assert stats.total_time_ns == [0] * BLOCK_MAX_IOTYPE
    assert stats.nr_ops == [0] * BLOCK_MAX_IOTYPE
    t_invalid = now()
    assert stats.last_access_time_ns == t_invalid
    qemu_clock_step(10)
    block_acct_setup(stats, False, True)
    block_acct_invalid(stats, READ)
    assert stats.invalid_ops == [0, 1, 2, 0, 1]
    assert stats.last_access_time_ns == t_invalid
    q = block_acct_query(stats)
    assert (q["invalid_rd_operations"], q["invalid_wr_operations"], q["invalid_flush_operations"],
            q["invalid_unmap_operations"]) == (1, 2, 0, 1)
    assert q["account_invalid"] is False and q["account_failed"] is True


def test_merged_requests():
    """block_acct_merge_done adds the number of merged requests per type and nothing else."""
    stats = BlockAcctStats()
    block_acct_merge_done(stats, WRITE, 3)
    block_acct_merge_done(stats, WRITE, 2)
    block_acct_merge_done(stats, READ, 1)
    block_acct_merge_done(stats, UNMAP, 4)
    assert stats.merged == [0, 1, 5, 0, 4]
    assert stats.nr_ops == [0] * BLOCK_MAX_IOTYPE
    assert stats.last_access_time_ns == 0
    q = block_acct_query(stats)
    assert (q["rd_merged"], q["wr_merged"], q["unmap_merged"]) == (1, 5, 4)


def test_cookie_is_accounted_once():
    """After done (or failed) the cookie's type is NONE, so accounting it again changes nothing."""
    stats = BlockAcctStats()
    cookie = BlockAcctCookie()
    block_acct_start(stats, cookie, 4096, WRITE)
    assert (cookie.bytes, cookie.type, cookie.start_time_ns) == (4096, WRITE, now())
    qemu_clock_step(30)
    block_acct_done(stats, cookie)
    assert cookie.type is NONE
    block_acct_done(stats, cookie)
    block_acct_failed(stats, cookie)
    assert stats.nr_ops == [0, 0, 1, 0, 0]
    assert stats.nr_bytes == [0, 0, 4096, 0, 0]
    assert stats.failed_ops == [0] * BLOCK_MAX_IOTYPE
    assert stats.total_time_ns == [0, 0, 30, 0, 0]


def test_idle_time():
    """idle_time_ns is the virtual time since the last accounted access, and absent from the query before one."""
    stats = BlockAcctStats()
    assert "idle_time_ns" not in block_acct_query(stats)
    one_io(stats, WRITE, 5)
    assert block_acct_idle_time_ns(stats) == 0
    qemu_clock_step(12345)
    assert block_acct_idle_time_ns(stats) == 12345
    assert block_acct_query(stats)["idle_time_ns"] == 12345
    one_io(stats, READ, 1)
    assert block_acct_idle_time_ns(stats) == 0


def test_latency_histogram_bins():
    """Latencies land in [0,b0), [b0,b1), ..., [bn,inf); a latency equal to a boundary goes to the upper bin."""
    stats = BlockAcctStats()
    assert block_latency_histogram_set(stats, READ, [10, 20, 30]) == 0
    assert stats.latency_histogram[READ].bins == [0, 0, 0, 0]
    for latency in (0, 9, 10, 19, 20, 29, 30, 10**9):
        one_io(stats, READ, latency)
    assert stats.latency_histogram[READ].boundaries == [10, 20, 30]
    assert stats.latency_histogram[READ].bins == [2, 2, 2, 2]
    one_io(stats, WRITE, 15)  # no histogram for writes: nothing recorded
    assert stats.latency_histogram[WRITE].bins == []
    q = block_acct_query(stats)
    assert q["rd_latency_histogram"] == {"boundaries": [10, 20, 30], "bins": [2, 2, 2, 2]}
    assert "wr_latency_histogram" not in q and "flush_latency_histogram" not in q


def test_latency_histogram_counts_failed_requests():
    """Failed requests go into the histogram too, even with account_failed off."""
    stats = BlockAcctStats()
    block_acct_setup(stats, True, False)
    block_latency_histogram_set(stats, FLUSH, [100])
    one_io(stats, FLUSH, 99, failed=True)
    one_io(stats, FLUSH, 100, failed=True)
    one_io(stats, FLUSH, 100)
    assert stats.latency_histogram[FLUSH].bins == [1, 2]
    assert block_acct_query(stats)["flush_latency_histogram"] == {"boundaries": [100], "bins": [1, 2]}


@pytest.mark.parametrize("boundaries", [[], [0], [-5, 10], [10, 10], [20, 10], [1, 5, 3]],
                         ids=["empty", "zero", "negative", "equal", "decreasing", "unsorted"])
def test_latency_histogram_set_rejects(boundaries):
    """Boundaries must be at least one, positive and strictly increasing: -EINVAL, and the old histogram stays."""
    stats = BlockAcctStats()
    assert block_latency_histogram_set(stats, WRITE, [50]) == 0
    one_io(stats, WRITE, 60)
    assert block_latency_histogram_set(stats, WRITE, boundaries) == -errno.EINVAL
    assert stats.latency_histogram[WRITE].boundaries == [50]
    assert stats.latency_histogram[WRITE].bins == [0, 1]


def test_latency_histogram_set_again_and_clear():
    """Setting new boundaries starts the counts over; clearing disables every histogram."""
    stats = BlockAcctStats()
    block_latency_histogram_set(stats, READ, [10])
    block_latency_histogram_set(stats, WRITE, [10])
    one_io(stats, READ, 5)
    assert block_latency_histogram_set(stats, READ, [1, 1000]) == 0
    assert stats.latency_histogram[READ].bins == [0, 0, 0]
    block_latency_histogram_clear(stats)
    assert all(h.bins == [] and h.boundaries == [] for h in stats.latency_histogram)
    one_io(stats, READ, 5)
    q = block_acct_query(stats)
    assert not {"rd_latency_histogram", "wr_latency_histogram", "flush_latency_histogram"} & set(q)


def test_query_keys():
    """block_acct_query fills QEMU's query-blockstats names; idle_time_ns and histograms only when they exist."""
    stats = BlockAcctStats()
    q = block_acct_query(stats)
    assert set(q) == QUERY_KEYS
    assert q["timed_stats"] == []
    assert q["account_invalid"] is True and q["account_failed"] is True
    assert all(q[k] == 0 for k in QUERY_KEYS - {"timed_stats", "account_invalid", "account_failed"})
    for t in (READ, WRITE, FLUSH):
        block_latency_histogram_set(stats, t, [1000])
    one_io(stats, UNMAP, 7, bytes=4096)
    q = block_acct_query(stats, 8192)
    assert set(q) == QUERY_KEYS | {"idle_time_ns", "rd_latency_histogram", "wr_latency_histogram",
                                   "flush_latency_histogram"}
    assert (q["unmap_bytes"], q["unmap_operations"], q["unmap_total_time_ns"]) == (4096, 1, 7)
    assert q["wr_highest_offset"] == 8192
