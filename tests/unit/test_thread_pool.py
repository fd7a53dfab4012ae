"""The thread pool (util/thread-pool.c): the behaviours of QEMU's tests/unit/test-thread-pool.c, plus errors.

QEMU's cancel test sleeps so that workers pick up some long jobs; here the long jobs block on a
``threading.Event`` instead, and the test waits until at least one has started, so nothing
sleeps.  ``/thread-pool/cancel-async`` has no twin: qblock cancels only through
``thread_pool_cancel``, which acts on queued jobs and never blocks.
"""
import errno
import threading
import time

import pytest

from qblock.util.aio import (
    aio_context_destroy,
    aio_context_new,
    aio_bh_schedule_oneshot,
    aio_poll,
    iothread_create,
    iothread_destroy,
    iothread_get_aio_context,
    qemu_get_aio_context,
    qemu_get_current_aio_context,
)
from qblock.util.coroutine import qemu_coroutine_create, qemu_coroutine_enter
from qblock.util.thread_pool import (
    aio_get_thread_pool,
    thread_pool_cancel,
    thread_pool_submit,
    thread_pool_submit_aio,
    thread_pool_submit_co,
)

WAIT_S = 10  # upper bound for Event waits, so a broken test fails instead of hanging


@pytest.fixture
def ctx():
    """The main loop's AioContext, whose pool QEMU's test-thread-pool.c uses; left with no job in flight."""
    c = qemu_get_aio_context()
    yield c
    drain(c)


def drain(ctx):
    """Poll ``ctx`` until no thread-pool job it owns is still in flight."""
    while ctx.busy:
        aio_poll(ctx, True)


class WorkerTestData:
    """One job's counters: ``n`` is changed by the worker, ``ret`` by the completion callback."""

    def __init__(self):
        self.lock = threading.Lock()
        self.n = 0
        self.ret = -errno.EINPROGRESS
        self.aiocb = None
        self.worker_thread = None
        self.cb_thread = None


class Active:
    """How many completion callbacks are still expected (callbacks are serialised in one context)."""

    count = 0


def worker_cb(data):
    with data.lock:
        old = data.n
        data.n += 1
    data.worker_thread = threading.get_ident()
    return old


def done_cb(data, ret):
    assert data.ret in (-errno.EINPROGRESS, -errno.ECANCELED)
    data.ret = ret
    data.aiocb = None
    data.cb_thread = threading.get_ident()
    Active.count -= 1


def wait_all_idle(pool):
    """Until every worker of ``pool`` waits for a job (a worker just done is still on its way)."""
    deadline = time.monotonic() + WAIT_S
    while pool.idle_threads != pool.cur_threads and time.monotonic() < deadline:
        time.sleep(0)   # yield the GIL to them
    assert pool.idle_threads == pool.cur_threads


def run_job_stream(ctx, total, depth):
    """Run ``total`` trivial jobs, ``depth`` in flight (each completion submits the next); the
    worker thread of each job, in the order they ran."""
    threads, left = [], [total]

    def job(_):
        threads.append(threading.get_ident())
        return 0

    def cb(_, ret):
        assert ret == 0
        left[0] -= 1
        if left[0] >= depth:
            thread_pool_submit_aio(ctx, job, None, cb, None)

    for _ in range(min(depth, total)):
        thread_pool_submit_aio(ctx, job, None, cb, None)
    while left[0]:
        aio_poll(ctx, True)
    return threads


# ---------------------------------------------------------------------------
# QEMU's tests


def test_submit(ctx):
    """A fire-and-forget job runs once on a worker thread."""
    data = WorkerTestData()
    thread_pool_submit(ctx, worker_cb, data)
    while data.n == 0:
        aio_poll(ctx, True)
    assert data.n == 1
    assert data.worker_thread != threading.get_ident()


def test_submit_aio(ctx):
    """A job's callback gets its result in the owning context, after a poll, while the job ran on a worker."""
    data = WorkerTestData()
    data.aiocb = thread_pool_submit_aio(ctx, worker_cb, data, done_cb, data)

    Active.count = 1
    assert data.ret == -errno.EINPROGRESS
    while data.ret == -errno.EINPROGRESS:
        aio_poll(ctx, True)
    assert Active.count == 0
    assert data.n == 1
    assert data.ret == 0
    assert data.aiocb is None
    assert data.cb_thread == threading.get_ident()
    assert data.worker_thread != threading.get_ident()


def test_submit_co(ctx):
    """thread_pool_submit_co yields the coroutine until the job is done and returns the job's result."""
    data = WorkerTestData()
    results = []

    def co_test_cb(data):
        Active.count = 1
        data.n = 0
        data.ret = -errno.EINPROGRESS
        results.append(thread_pool_submit_co(ctx, worker_cb, data))
        assert data.n == 1
        data.ret = 0
        Active.count -= 1

    qemu_coroutine_enter(qemu_coroutine_create(co_test_cb, data))
    assert Active.count == 1
    assert data.ret == -errno.EINPROGRESS

    while data.ret == -errno.EINPROGRESS:
        aio_poll(ctx, True)
    assert Active.count == 0
    assert data.ret == 0
    assert results == [0]
    assert data.worker_thread != threading.get_ident()


def test_submit_many(ctx):
    """A hundred jobs, more than there are workers, half by callback and half from coroutines, all complete."""
    datas = [WorkerTestData() for _ in range(100)]

    def co_submit(data):
        done_cb(data, thread_pool_submit_co(ctx, worker_cb, data))

    Active.count = 100
    for i, data in enumerate(datas):
        if i % 2:
            qemu_coroutine_enter(qemu_coroutine_create(co_submit, data))
        else:
            thread_pool_submit_aio(ctx, worker_cb, data, done_cb, data)

    while Active.count > 0:
        aio_poll(ctx, True)
    assert Active.count == 0
    assert [d.n for d in datas] == [1] * 100
    assert [d.ret for d in datas] == [0] * 100


def test_chained_jobs_stay_on_one_worker(ctx):
    """Each job submitted from the previous one's callback runs on the worker that ran that one.

    The worker is still on its way back to the queue when the callback submits, or it is the
    idle worker woken first (the last to go idle), so the other idle workers stay asleep
    (qblock's rule against GIL contention; see ThreadPool).
    """
    pool = aio_get_thread_pool(ctx)
    # First four workers at once, so that idle ones are there to be woken (wrongly) later.
    started, go = threading.Barrier(4, timeout=WAIT_S), threading.Event()

    def blocker(_):
        started.wait()
        go.wait(WAIT_S)
        return 0

    for _ in range(4):
        thread_pool_submit_aio(ctx, blocker, None, None, None)
    go.set()
    drain(ctx)
    assert pool.cur_threads >= 4
    wait_all_idle(pool)   # else one still on its way would go idle after the chain's worker, and be woken first
    threads = run_job_stream(ctx, 200, 1)
    assert len(threads) == 200
    assert len(set(threads)) == 1
    assert pool.cur_threads >= 1


@pytest.fixture
def fresh_ctx():
    """A context of its own, so its pool starts with no worker."""
    c = aio_context_new("test-thread-pool-fresh")
    yield c
    drain(c)
    aio_get_thread_pool(c).free()
    aio_context_destroy(c)


def test_signalled_worker_no_longer_idle(fresh_ctx):
    """Two jobs that must run together, with one idle worker: the second spawns a worker.

    The signalled worker stops counting as idle when it is signalled (qblock; QEMU only when it
    runs again), so the second job is not left waiting for a worker that will be busy.  Under
    QEMU's rule of a worker per job (stall_ns = 0) that happens at submit time.
    """
    ctx = fresh_ctx
    pool = aio_get_thread_pool(ctx)
    pool.stall_ns = 0
    first = []
    thread_pool_submit_aio(ctx, lambda _: 0, None, lambda _, ret: first.append(ret), None)
    while not first:
        aio_poll(ctx, True)
    wait_all_idle(pool)
    assert (pool.cur_threads, pool.idle_threads) == (1, 1)

    both = threading.Barrier(2, timeout=WAIT_S)
    rets = []
    for _ in range(2):
        thread_pool_submit_aio(ctx, lambda _: both.wait() * 0, None, lambda _, ret: rets.append(ret), None)
    while len(rets) < 2:
        aio_poll(ctx, True)
    assert rets == [0, 0]
    assert pool.cur_threads == 2


def test_stream_of_short_jobs_runs_on_one_worker(fresh_ctx):
    """Eight jobs in flight, each replaced by a new one as it completes: one worker serves them all.

    While a busy worker keeps finishing jobs, new ones wait for it (qblock's stall rule; QEMU
    would start up to eight).  The stall time is made long here so that a slow test machine
    cannot make the pool look stuck.
    """
    ctx = fresh_ctx
    pool = aio_get_thread_pool(ctx)
    pool.stall_ns = 10 ** 10
    threads = run_job_stream(ctx, 400, 8)
    assert len(threads) == 400
    assert len(set(threads)) == 1
    assert pool.cur_threads == 1


@pytest.mark.parametrize("stall_ns, workers_at_submit", [(0, 2), (10 ** 10, 1)])
def test_second_job_waits_for_the_busy_worker(fresh_ctx, stall_ns, workers_at_submit):
    """Two jobs at once on an empty pool: QEMU's rule (stall_ns = 0) starts a worker for each at
    submit time; the stall rule starts one and lets the second job wait for it.  (The first job
    blocks until both are submitted, so its worker cannot be back for the second one already.)"""
    ctx = fresh_ctx
    pool = aio_get_thread_pool(ctx)
    pool.stall_ns = stall_ns
    go = threading.Event()
    rets = []
    thread_pool_submit_aio(ctx, lambda _: 0 if go.wait(WAIT_S) else -errno.ETIMEDOUT, None,
                           lambda _, ret: rets.append(ret), None)
    thread_pool_submit_aio(ctx, lambda _: 0, None, lambda _, ret: rets.append(ret), None)
    assert pool.cur_threads == workers_at_submit
    go.set()
    while len(rets) < 2:
        aio_poll(ctx, True)
    assert rets == [0, 0]


def test_stuck_workers_get_company(fresh_ctx):
    """Jobs that block until all of them run (and one that waits for a later job) still complete:
    when no job finishes for stall_ns, the pool starts one more worker, again and again."""
    ctx = fresh_ctx
    pool = aio_get_thread_pool(ctx)
    assert pool.stall_ns == 1_000_000
    together = threading.Barrier(4, timeout=WAIT_S)
    later_ran = threading.Event()
    rets = []

    def waits_for_later(_):
        return 0 if later_ran.wait(WAIT_S) else -errno.ETIMEDOUT

    def later(_):
        later_ran.set()
        return 0

    thread_pool_submit_aio(ctx, waits_for_later, None, lambda _, ret: rets.append(ret), None)
    thread_pool_submit_aio(ctx, later, None, lambda _, ret: rets.append(ret), None)
    for _ in range(4):
        thread_pool_submit_aio(ctx, lambda _: together.wait() * 0, None, lambda _, ret: rets.append(ret), None)
    while len(rets) < 6:
        aio_poll(ctx, True)
    assert rets == [0] * 6
    assert pool.cur_threads >= 4


def test_cancel(ctx):
    """Jobs cancelled while queued complete with -ECANCELED and never run; the others run to their result."""
    test_submit_many(ctx)

    release = threading.Event()
    started = threading.Event()

    def long_cb(data):
        with data.lock:
            data.n = 1
        started.set()
        assert release.wait(WAIT_S)
        with data.lock:
            data.n |= 2
        return 0

    datas = [WorkerTestData() for _ in range(100)]
    Active.count = 100
    for data in datas:
        data.aiocb = thread_pool_submit_aio(ctx, long_cb, data, done_cb, data)
    elems = [data.aiocb for data in datas]
    assert started.wait(WAIT_S)
    assert Active.count == 100

    cancelled = [data for data in datas if thread_pool_cancel(data.aiocb)]
    running = [data for data in datas if data not in cancelled]
    assert len(cancelled) >= 100 - aio_get_thread_pool(ctx).max_threads
    assert len(running) >= 1

    release.set()
    while Active.count > 0:
        aio_poll(ctx, True)
    assert Active.count == 0
    assert len(cancelled) + len(running) == 100
    for data in cancelled:
        assert (data.n, data.ret, data.aiocb) == (0, -errno.ECANCELED, None)
    for data in running:
        assert (data.n, data.ret, data.aiocb) == (3, 0, None)
    assert not any(thread_pool_cancel(elem) for elem in elems)


# ---------------------------------------------------------------------------
# qblock: errors from the job function, and pools of IOThreads


def test_oserror_becomes_errno(ctx):
    """An OSError raised by the job function reaches the callback as -errno (-EIO when it has none)."""
    def no_space(_):
        raise OSError(errno.ENOSPC, "No space left on device")

    def no_errno(_):
        raise OSError("no errno at all")

    rets = {}
    thread_pool_submit_aio(ctx, no_space, None, rets.__setitem__, "no_space")
    thread_pool_submit_aio(ctx, no_errno, None, rets.__setitem__, "no_errno")
    while len(rets) < 2:
        aio_poll(ctx, True)
    assert rets == {"no_space": -errno.ENOSPC, "no_errno": -errno.EIO}


def test_oserror_in_submit_co(ctx):
    """thread_pool_submit_co returns -errno for an OSError raised by the job function."""
    results = []

    def entry(_):
        def fail(_):
            raise FileNotFoundError(errno.ENOENT, "gone")
        results.append(thread_pool_submit_co(ctx, fail, None))

    qemu_coroutine_enter(qemu_coroutine_create(entry, None))
    while not results:
        aio_poll(ctx, True)
    assert results == [-errno.ENOENT]


def test_exception_reraised_from_aio_poll(ctx):
    """Any other exception from the job function is re-raised from aio_poll, and other jobs still complete."""
    class Boom(Exception):
        pass

    def explode(_):
        raise Boom("job exploded")

    calls = []
    thread_pool_submit_aio(ctx, explode, None, lambda opaque, ret: calls.append(("explode", ret)), None)
    with pytest.raises(Boom, match="job exploded"):
        while True:
            aio_poll(ctx, True)
    assert calls == []

    data = WorkerTestData()
    Active.count = 1
    thread_pool_submit_aio(ctx, worker_cb, data, done_cb, data)
    while Active.count:
        aio_poll(ctx, True)
    assert data.ret == 0
    assert ctx.busy == 0


def test_submit_aio_iothread():
    """A job submitted from an IOThread runs on a worker and completes in that IOThread."""
    iothread = iothread_create("test-thread-pool-iot")
    try:
        iot_ctx = iothread_get_aio_context(iothread)
        done = threading.Event()
        seen = {}

        def cb(data, ret):
            seen["ret"] = ret
            seen["cb_thread"] = threading.get_ident()
            seen["cb_ctx"] = qemu_get_current_aio_context()
            done.set()

        def submit(data):
            thread_pool_submit_aio(None, worker_cb, data, cb, data)

        data = WorkerTestData()
        aio_bh_schedule_oneshot(iot_ctx, submit, data)
        assert done.wait(WAIT_S)
        assert seen == {"ret": 0, "cb_thread": iothread.thread.ident, "cb_ctx": iot_ctx}
        assert data.worker_thread not in (iothread.thread.ident, threading.get_ident())
    finally:
        iothread_destroy(iothread)
