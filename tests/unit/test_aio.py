"""The event loop: the behaviours of QEMU's tests/unit/test-aio.c, plus qblock's own additions.

QEMU's tests run on the main loop's AioContext; so do these, except where a private context
keeps a test independent of what earlier tests left behind (timers, shuffling, deadlock).
QEMU's timer test sleeps on the realtime clock; here the virtual clock is stepped or warped,
so nothing sleeps.  The ``/aio-gsource/*`` half of test-aio.c has no twin: qblock has no glib
main loop around its AioContext.
"""
import os
import threading

import pytest

from qblock.util.aio import (
    AIO_WAIT_WHILE,
    AioPollDeadlock,
    aio_bh_new,
    aio_bh_schedule_oneshot,
    aio_co_enter,
    aio_co_schedule,
    aio_co_wake,
    aio_context_acquire,
    aio_context_destroy,
    aio_context_new,
    aio_context_release,
    aio_context_set_shuffle,
    aio_disable_external,
    aio_dump_waiters,
    aio_enable_external,
    aio_poll,
    aio_set_event_notifier,
    aio_set_fd_handler,
    aio_timer_new,
    aio_wait_kick,
    event_notifier_cleanup,
    event_notifier_init,
    event_notifier_set,
    event_notifier_test_and_clear,
    iothread_create,
    iothread_destroy,
    iothread_get_aio_context,
    qemu_bh_cancel,
    qemu_bh_delete,
    qemu_bh_schedule,
    qemu_get_aio_context,
    qemu_get_current_aio_context,
)
from qblock.util.coroutine import (
    CoroutineError,
    qemu_coroutine_create,
    qemu_coroutine_enter,
    qemu_coroutine_yield,
)
from qblock.util.coroutine_lock import (
    CoQueue,
    qemu_co_queue_restart_all,
    qemu_co_queue_wait,
    qemu_co_sleep_ns,
)
from qblock.util.thread_pool import thread_pool_submit_aio
from qblock.util.timer import (
    QEMU_CLOCK_VIRTUAL,
    SCALE_MS,
    SCALE_NS,
    qemu_clock_get_ns,
    qemu_clock_step,
    timer_del,
    timer_mod,
    timer_pending,
)

WAIT_S = 10  # upper bound for joins and Event waits, so a broken test fails instead of hanging


@pytest.fixture
def ctx():
    """The main loop's AioContext, which QEMU's test-aio.c uses throughout."""
    return qemu_get_aio_context()


@pytest.fixture
def private_ctx():
    """A fresh AioContext, destroyed after the test."""
    c = aio_context_new("test-aio")
    yield c
    aio_context_destroy(c)


# ---------------------------------------------------------------------------
# Test data and callbacks (the structs and callbacks at the top of test-aio.c)


class BHTestData:
    """A BH that counts its runs and reschedules itself until it has run ``max`` times."""

    def __init__(self, ctx, max=0, cb=None):
        self.n = 0
        self.max = max
        self.bh = aio_bh_new(ctx, cb or bh_test_cb, self)


def bh_test_cb(data):
    data.n += 1
    if data.n < data.max:
        qemu_bh_schedule(data.bh)


def bh_delete_cb(data):
    data.n += 1
    if data.n < data.max:
        qemu_bh_schedule(data.bh)
    else:
        qemu_bh_delete(data.bh)
        data.bh = None


class EventNotifierTestData:
    """An EventNotifier whose handler counts calls and, with ``auto_set``, re-arms itself while active."""

    def __init__(self, n=0, active=0, auto_set=False):
        self.e = event_notifier_init(False)
        self.n = n
        self.active = active
        self.auto_set = auto_set

    def event_ready_cb(self, e):
        assert event_notifier_test_and_clear(e)
        self.n += 1
        if self.active > 0:
            self.active -= 1
        if self.auto_set and self.active:
            event_notifier_set(e)


class TimerTestData:
    """A timer that counts its runs and re-arms itself ``ns`` later until it has run ``max`` times."""

    def __init__(self, ctx, clock_type, ns, max):
        self.clock_type = clock_type
        self.ns = ns
        self.max = max
        self.n = 0
        self.timer = aio_timer_new(ctx, clock_type, SCALE_NS, timer_test_cb, self)


def timer_test_cb(data):
    data.n += 1
    if data.n < data.max:
        timer_mod(data.timer, qemu_clock_get_ns(data.clock_type) + data.ns)


def set_event_notifier(ctx, e, handler):
    aio_set_event_notifier(ctx, e, handler, False)


def wait_until_inactive(ctx, data):
    while data.active > 0:
        aio_poll(ctx, True)


def dummy_notifier_read(e):
    event_notifier_test_and_clear(e)


def run_in_thread(target, *args):
    """Run ``target(*args)`` in a new thread, join it, and re-raise whatever it raised."""
    failure = []

    def body():
        try:
            target(*args)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            failure.append(exc)

    t = threading.Thread(target=body, name="test-aio-worker")
    t.start()
    t.join(WAIT_S)
    assert not t.is_alive()
    if failure:
        raise failure[0]


# ---------------------------------------------------------------------------
# /aio/acquire


def test_acquire(ctx):
    """A blocking aio_poll is woken by another thread's notifier while the poller still holds the context."""
    notifier = event_notifier_init(False)
    set_event_notifier(ctx, notifier, dummy_notifier_read)
    assert not aio_poll(ctx, False)

    start_lock = threading.Lock()
    start_lock.acquire()
    state = {"thread_acquired": False}

    def test_acquire_thread():
        with start_lock:
            pass
        event_notifier_set(notifier)
        aio_context_acquire(ctx)
        aio_context_release(ctx)
        state["thread_acquired"] = True

    thread = threading.Thread(target=test_acquire_thread, name="test_acquire_thread")
    thread.start()

    aio_context_acquire(ctx)
    start_lock.release()
    assert aio_poll(ctx, True)
    assert not state["thread_acquired"]
    aio_context_release(ctx)

    thread.join(WAIT_S)
    assert not thread.is_alive()
    set_event_notifier(ctx, notifier, None)
    event_notifier_cleanup(notifier)
    assert state["thread_acquired"]


# ---------------------------------------------------------------------------
# /aio/bh/*


def test_bh_schedule(ctx):
    """A scheduled BH runs once at the next poll, which reports progress."""
    data = BHTestData(ctx)
    qemu_bh_schedule(data.bh)
    assert data.n == 0

    assert aio_poll(ctx, True)
    assert data.n == 1

    assert not aio_poll(ctx, False)
    assert data.n == 1
    qemu_bh_delete(data.bh)


def test_bh_schedule10(ctx):
    """A BH rescheduled from its own callback runs once per poll, not again in the same poll."""
    data = BHTestData(ctx, max=10)
    qemu_bh_schedule(data.bh)
    assert data.n == 0

    assert aio_poll(ctx, False)
    assert data.n == 1

    assert aio_poll(ctx, True)
    assert data.n == 2

    while data.n < 10:
        aio_poll(ctx, True)
    assert data.n == 10

    assert not aio_poll(ctx, False)
    assert data.n == 10
    qemu_bh_delete(data.bh)


def test_bh_cancel(ctx):
    """A cancelled BH does not run and the poll reports no progress."""
    data = BHTestData(ctx)
    qemu_bh_schedule(data.bh)
    assert data.n == 0

    qemu_bh_cancel(data.bh)
    assert data.n == 0

    assert not aio_poll(ctx, False)
    assert data.n == 0
    qemu_bh_delete(data.bh)


def test_bh_delete(ctx):
    """A BH deleted after being scheduled never runs."""
    data = BHTestData(ctx)
    qemu_bh_schedule(data.bh)
    assert data.n == 0

    qemu_bh_delete(data.bh)
    assert data.n == 0

    assert not aio_poll(ctx, False)
    assert data.n == 0


def test_bh_callback_delete_one(ctx):
    """A BH may delete itself from its own callback."""
    data1 = BHTestData(ctx, max=1, cb=bh_delete_cb)
    qemu_bh_schedule(data1.bh)
    assert data1.n == 0

    while data1.n < data1.max:
        aio_poll(ctx, True)
    assert data1.n == data1.max
    assert data1.bh is None

    assert not aio_poll(ctx, False)


def test_bh_callback_delete_many(ctx):
    """Several BHs run in one poll, and each deletes itself once it reached its own count."""
    datas = [BHTestData(ctx, max=m, cb=bh_delete_cb) for m in (1, 3, 2, 4)]
    for d in datas:
        qemu_bh_schedule(d.bh)
    assert [d.n for d in datas] == [0, 0, 0, 0]

    assert aio_poll(ctx, False)
    assert [d.n for d in datas] == [1, 1, 1, 1]
    assert datas[0].bh is None

    while any(d.n < d.max for d in datas):
        aio_poll(ctx, True)
    assert [d.n for d in datas] == [d.max for d in datas]
    assert all(d.bh is None for d in datas)


def test_bh_flush(ctx):
    """A blocking poll with a BH scheduled runs it instead of waiting."""
    data = BHTestData(ctx)
    qemu_bh_schedule(data.bh)
    assert data.n == 0

    assert aio_poll(ctx, True)
    assert data.n == 1

    assert not aio_poll(ctx, False)
    assert data.n == 1
    qemu_bh_delete(data.bh)


# ---------------------------------------------------------------------------
# /aio/event/*


def test_event_add_remove(ctx):
    """Adding and removing an idle event notifier makes no progress and calls nothing."""
    data = EventNotifierTestData(active=0)
    set_event_notifier(ctx, data.e, data.event_ready_cb)
    assert not aio_poll(ctx, False)
    assert data.n == 0

    set_event_notifier(ctx, data.e, None)
    assert not aio_poll(ctx, False)
    assert data.n == 0
    event_notifier_cleanup(data.e)


def test_event_wait(ctx):
    """A set notifier's handler runs at the next poll, exactly once."""
    data = EventNotifierTestData(active=1)
    set_event_notifier(ctx, data.e, data.event_ready_cb)
    while aio_poll(ctx, False):
        pass
    assert (data.n, data.active) == (0, 1)

    event_notifier_set(data.e)
    assert aio_poll(ctx, False)
    assert (data.n, data.active) == (1, 0)

    assert not aio_poll(ctx, False)
    assert (data.n, data.active) == (1, 0)

    set_event_notifier(ctx, data.e, None)
    assert not aio_poll(ctx, False)
    assert data.n == 1
    event_notifier_cleanup(data.e)


def test_event_flush(ctx):
    """A handler that sets its own notifier again runs once per poll until it goes inactive."""
    data = EventNotifierTestData(active=10, auto_set=True)
    set_event_notifier(ctx, data.e, data.event_ready_cb)
    while aio_poll(ctx, False):
        pass
    assert (data.n, data.active) == (0, 10)

    event_notifier_set(data.e)
    assert aio_poll(ctx, False)
    assert (data.n, data.active) == (1, 9)
    assert aio_poll(ctx, False)

    wait_until_inactive(ctx, data)
    assert (data.n, data.active) == (10, 0)
    assert not aio_poll(ctx, False)

    set_event_notifier(ctx, data.e, None)
    assert not aio_poll(ctx, False)
    event_notifier_cleanup(data.e)


def test_event_wait_no_flush_cb(ctx):
    """Notifier handlers run only when their own notifier is set, beside another active notifier."""
    data = EventNotifierTestData()
    dummy = EventNotifierTestData(active=1)

    set_event_notifier(ctx, data.e, data.event_ready_cb)
    assert not aio_poll(ctx, False)
    assert data.n == 0

    event_notifier_set(data.e)
    assert aio_poll(ctx, True)
    data.n = 0

    set_event_notifier(ctx, dummy.e, dummy.event_ready_cb)

    event_notifier_set(data.e)
    assert aio_poll(ctx, False)
    assert data.n == 1
    assert not aio_poll(ctx, False)
    assert data.n == 1

    event_notifier_set(data.e)
    assert aio_poll(ctx, False)
    assert data.n == 2
    assert not aio_poll(ctx, False)
    assert data.n == 2

    event_notifier_set(dummy.e)
    wait_until_inactive(ctx, dummy)
    assert data.n == 2
    assert (dummy.n, dummy.active) == (1, 0)

    set_event_notifier(ctx, dummy.e, None)
    event_notifier_cleanup(dummy.e)

    set_event_notifier(ctx, data.e, None)
    assert not aio_poll(ctx, False)
    assert data.n == 2
    event_notifier_cleanup(data.e)


def test_external_client(ctx):
    """While external clients are disabled (nested), their handlers are skipped; re-enabled, they run."""
    for depth in (1, 2):
        data = EventNotifierTestData(active=10, auto_set=True)
        aio_set_event_notifier(ctx, data.e, data.event_ready_cb, True)
        event_notifier_set(data.e)
        for _ in range(depth):
            aio_disable_external(ctx)
        for _ in range(depth):
            assert not aio_poll(ctx, False)
            assert event_notifier_test_and_clear(data.e)
            event_notifier_set(data.e)
            aio_enable_external(ctx)
        assert data.n == 0
        assert aio_poll(ctx, False)
        assert data.n == 1
        set_event_notifier(ctx, data.e, None)
        event_notifier_cleanup(data.e)


# ---------------------------------------------------------------------------
# /aio/timer/schedule


def test_timer_schedule(private_ctx):
    """A virtual timer runs only when polled after expiry; a blocking poll warps the clock to its deadline."""
    ctx = private_ctx
    data = TimerTestData(ctx, QEMU_CLOCK_VIRTUAL, ns=750 * SCALE_MS, max=2)
    timer_mod(data.timer, qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) + data.ns)
    assert data.n == 0

    while aio_poll(ctx, False):
        pass
    assert not aio_poll(ctx, False)
    assert data.n == 0

    qemu_clock_step(1000 * SCALE_MS)
    assert data.n == 0

    assert aio_poll(ctx, False)
    assert data.n == 1

    while aio_poll(ctx, False):
        pass
    assert not aio_poll(ctx, False)
    assert data.n == 1

    deadline = data.timer.expire_time
    assert deadline == qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) + data.ns
    assert aio_poll(ctx, True)
    assert data.n == 2
    assert qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) == deadline

    assert not aio_poll(ctx, False)
    assert data.n == 2
    assert not timer_pending(data.timer)
    timer_del(data.timer)


# ---------------------------------------------------------------------------
# /aio/coroutine/*


class ChainData:
    """One side of the queue-chaining ping-pong."""

    def __init__(self, max):
        self.other = None
        self.i = 0
        self.max = max


def test_coroutine_queue_chaining(ctx):
    """Two coroutines waking each other 25000 times through aio_co_enter chain iteratively, not recursively."""
    def chain(data):
        data.i = 0
        while data.i < data.max:
            aio_co_enter(ctx, data.other)
            qemu_coroutine_yield()
            data.i += 1

    data_a = ChainData(25000)
    data_b = ChainData(25000)
    data_b.other = qemu_coroutine_create(chain, data_a)
    data_a.other = qemu_coroutine_create(chain, data_b)

    qemu_coroutine_enter(data_b.other)
    assert data_a.i == data_a.max
    assert data_b.i == data_b.max - 1

    qemu_coroutine_enter(data_a.other)
    assert data_b.i == data_b.max


def test_coroutine_worker_thread_co_enter(ctx):
    """aio_co_enter from a worker thread schedules the coroutine, which then runs in the main thread."""
    main_ident = threading.get_ident()
    ran_in = []
    co = qemu_coroutine_create(lambda _: ran_in.append(threading.get_ident()))

    run_in_thread(aio_co_enter, qemu_get_aio_context(), co)
    assert ran_in == []

    assert aio_poll(ctx, True)
    assert ran_in == [main_ident]
    assert not aio_poll(ctx, False)


# ---------------------------------------------------------------------------
# qblock: BH order and shuffling


def test_bh_run_order_newest_first(ctx):
    """Without shuffling, BHs scheduled before a poll run newest first, as QEMU's aio_bh_poll takes
    them from the head of the list aio_bh_enqueue pushes onto."""
    order = []
    bhs = [aio_bh_new(ctx, order.append, i) for i in range(6)]
    for i in (3, 0, 5, 1, 4, 2):
        qemu_bh_schedule(bhs[i])
    assert aio_poll(ctx, False)
    assert order == [2, 4, 1, 5, 0, 3]
    for bh in bhs:
        qemu_bh_delete(bh)


def _shuffled_bh_order(ctx, seed, count=8):
    order = []
    aio_context_set_shuffle(ctx, seed)
    for i in range(count):
        aio_bh_schedule_oneshot(ctx, order.append, i)
    assert aio_poll(ctx, False)
    aio_context_set_shuffle(ctx, None)
    return order


def test_bh_shuffle_replay(private_ctx):
    """A shuffle seed replays the same BH order; some seed gives an order other than QEMU's (newest first)."""
    ctx = private_ctx
    newest_first = list(range(7, -1, -1))
    first = _shuffled_bh_order(ctx, 1234)
    assert sorted(first) == sorted(newest_first)
    assert _shuffled_bh_order(ctx, 1234) == first
    assert any(_shuffled_bh_order(ctx, seed) != newest_first for seed in range(20))
    assert _shuffled_bh_order(ctx, None) == newest_first


def test_co_schedule_shuffle_replay(private_ctx):
    """Scheduled coroutines follow the shuffle seed too, and the same seed replays the same order."""
    ctx = private_ctx

    def run(seed):
        order = []
        aio_context_set_shuffle(ctx, seed)
        for i in range(8):
            aio_co_schedule(ctx, qemu_coroutine_create(order.append, i))
        assert aio_poll(ctx, False)
        aio_context_set_shuffle(ctx, None)
        return order

    assert run(None) == list(range(8))
    assert run(99) == run(99)
    assert any(run(seed) != list(range(8)) for seed in range(20))


# ---------------------------------------------------------------------------
# qblock: aio_co_schedule, IOThreads, AIO_WAIT_WHILE


def test_co_schedule_twice(ctx):
    """Scheduling a coroutine that is already scheduled is an error; it still runs once."""
    runs = []
    co = qemu_coroutine_create(runs.append, "ran")
    aio_co_schedule(ctx, co)
    with pytest.raises(CoroutineError, match="already scheduled"):
        aio_co_schedule(ctx, co)
    assert aio_poll(ctx, False)
    assert runs == ["ran"]


def test_co_schedule_iothread():
    """aio_co_schedule, aio_co_enter and aio_co_wake from the main thread run the coroutine in the IOThread."""
    iothread = iothread_create("test-aio-iot0")
    try:
        iot_ctx = iothread_get_aio_context(iothread)
        seen = []
        events = [threading.Event() for _ in range(3)]

        def entry(step):
            seen.append((step, threading.get_ident(), qemu_get_current_aio_context()))
            events[step].set()
            if step == 1:
                qemu_coroutine_yield()
                seen.append((2, threading.get_ident(), qemu_get_current_aio_context()))
                events[2].set()

        aio_co_schedule(iot_ctx, qemu_coroutine_create(entry, 0))
        assert events[0].wait(WAIT_S)

        co = qemu_coroutine_create(entry, 1)
        aio_co_enter(iot_ctx, co)
        assert events[1].wait(WAIT_S)
        aio_co_wake(co)
        assert events[2].wait(WAIT_S)

        ident = iothread.thread.ident
        assert ident != threading.get_ident()
        assert seen == [(0, ident, iot_ctx), (1, ident, iot_ctx), (2, ident, iot_ctx)]
    finally:
        iothread_destroy(iothread)


def test_aio_wait_while_iothread(ctx):
    """AIO_WAIT_WHILE in the main thread is woken by aio_wait_kick from an IOThread BH."""
    iothread = iothread_create("test-aio-iot1")
    try:
        iot_ctx = iothread_get_aio_context(iothread)
        go = threading.Event()
        state = {"done": False, "thread": None}

        def bh(opaque):
            assert go.wait(WAIT_S)
            state["thread"] = threading.get_ident()
            state["done"] = True
            aio_wait_kick()

        def cond():
            go.set()  # let the BH finish only once the main thread is waiting
            return not state["done"]

        aio_bh_schedule_oneshot(iot_ctx, bh, None)
        assert AIO_WAIT_WHILE(iot_ctx, cond)
        assert state["done"]
        assert state["thread"] == iothread.thread.ident
    finally:
        iothread_destroy(iothread)


# ---------------------------------------------------------------------------
# qblock: deadlock detection and the waiter dump


def test_aio_poll_deadlock(private_ctx):
    """A blocking poll that nothing could wake raises AioPollDeadlock with the waiter dump."""
    ctx = private_ctx
    queue = CoQueue("test-deadlock-queue")
    co = qemu_coroutine_create(lambda q: qemu_co_queue_wait(q), queue)
    qemu_coroutine_enter(co)
    try:
        assert threading.active_count() == 1 or all(
            t.name.startswith("qblock-worker") for t in threading.enumerate() if t is not threading.current_thread()
        ), "another thread is alive: the poll below would block instead of failing"
        with pytest.raises(AioPollDeadlock) as excinfo:
            aio_poll(ctx, True)
        msg = str(excinfo.value)
        assert "would wait forever" in msg
        assert "live coroutine(s)" in msg
        assert "CoQueue test-deadlock-queue (1 waiting)" in msg
    finally:
        qemu_co_queue_restart_all(queue)
    assert co.terminated


def test_dump_waiters_co_queue(ctx):
    """aio_dump_waiters names a coroutine suspended in qemu_co_queue_wait and the queue it waits on."""
    queue = CoQueue("test-dump-queue")

    def queue_waiter(q):
        qemu_co_queue_wait(q)

    co = qemu_coroutine_create(queue_waiter, queue)
    qemu_coroutine_enter(co)
    dump = aio_dump_waiters()
    line = next(ln for ln in dump.splitlines() if ln.strip().startswith(co.trace_name + " "))
    assert "queue_waiter" in line
    assert "[suspended]" in line
    assert "waits on: CoQueue test-dump-queue (1 waiting)" in line
    assert "qemu_co_queue_wait" in dump

    qemu_co_queue_restart_all(queue)
    assert co.terminated
    assert co.trace_name + " " not in aio_dump_waiters()


def test_dump_waiters_co_sleep(ctx):
    """aio_dump_waiters names a coroutine in qemu_co_sleep_ns, its wake-up time and its timer."""
    def sleeper(ns):
        qemu_co_sleep_ns(QEMU_CLOCK_VIRTUAL, ns)

    expire = qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) + 5 * SCALE_MS
    co = qemu_coroutine_create(sleeper, 5 * SCALE_MS)
    qemu_coroutine_enter(co)
    dump = aio_dump_waiters()
    line = next(ln for ln in dump.splitlines() if ln.strip().startswith(co.trace_name + " "))
    assert "sleeper" in line
    assert f"waits on: sleep on the virtual clock until {expire} ns" in line
    assert f"expires at {expire} ns" in dump

    while not co.terminated:
        aio_poll(ctx, True)
    assert qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) >= expire


# ---------------------------------------------------------------------------
# qblock: fd handlers on a real pipe


def test_fd_handler_pipe(ctx):
    """An fd handler on a pipe runs when the pipe is readable and never once it is removed."""
    rfd, wfd = os.pipe()
    got = []

    def io_read(opaque):
        got.append((opaque, os.read(rfd, 64)))

    try:
        aio_set_fd_handler(ctx, rfd, io_read, None, "pipe")
        assert not aio_poll(ctx, False)
        assert got == []

        os.write(wfd, b"ping")
        assert aio_poll(ctx, True)
        assert got == [("pipe", b"ping")]
        assert not aio_poll(ctx, False)

        aio_set_fd_handler(ctx, rfd, None, None)
        os.write(wfd, b"pong")
        assert not aio_poll(ctx, False)
        assert got == [("pipe", b"ping")]
    finally:
        aio_set_fd_handler(ctx, rfd, None, None)
        os.close(rfd)
        os.close(wfd)


def test_fd_handler_write(ctx):
    """A write handler on an empty pipe runs at once, and stops once removed."""
    rfd, wfd = os.pipe()
    calls = []
    try:
        aio_set_fd_handler(ctx, wfd, None, calls.append, "w")
        assert aio_poll(ctx, False)
        assert calls == ["w"]
        aio_set_fd_handler(ctx, wfd, None, None)
        assert not aio_poll(ctx, False)
        assert calls == ["w"]
    finally:
        aio_set_fd_handler(ctx, wfd, None, None)
        os.close(rfd)
        os.close(wfd)


# ---------------------------------------------------------------------------
# qblock: nothing is lost or delayed when callbacks fail or other threads are busy


def test_co_schedule_exception_keeps_others(private_ctx):
    """A scheduled coroutine that raises does not drop the coroutines scheduled after it."""
    ctx = private_ctx
    ran = []

    def entry(i):
        ran.append(i)
        if i == 0:
            raise KeyError("first coroutine failed")

    for i in range(3):
        aio_co_schedule(ctx, qemu_coroutine_create(entry, i))
    with pytest.raises(KeyError, match="first coroutine failed"):
        aio_poll(ctx, False)
    assert ran == [0]
    assert aio_poll(ctx, False)
    assert ran == [0, 1, 2]
    assert not aio_poll(ctx, False)


def test_expired_virtual_timer_while_busy(ctx):
    """A blocking poll runs an already expired virtual timer at once, even while a thread-pool job is in flight."""
    release = threading.Event()
    job_done = []
    fired = []

    def long_job(_):
        release.wait(WAIT_S)
        return 0

    thread_pool_submit_aio(ctx, long_job, None, lambda opaque, ret: job_done.append(ret), None)
    ts = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, lambda _: fired.append(list(job_done)), None)
    try:
        timer_mod(ts, qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) + 100)
        qemu_clock_step(100)
        while not fired:
            aio_poll(ctx, True)
        assert fired == [[]], "the timer waited for the unrelated thread-pool job"
    finally:
        release.set()
        timer_del(ts)
        while not job_done:
            aio_poll(ctx, True)
    assert job_done == [0]
