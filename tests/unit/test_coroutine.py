"""Coroutines and coroutine locks: the behaviours of QEMU's tests/unit/test-coroutine.c.

Interleavings are drawn the way test-coroutine.c draws them::

    main            c1                  c2
    enter c1 ---->  lock, yield
             <----
    enter c2 ---------------------->    lock: queued, yield
             <----------------------
    enter c1 ---->  unlock (hand-off: c2 queued on c1's wake-up list), done
                                        runs: owns the lock, yield
             <----------------------
"""
import pytest

from qblock.util.aio import aio_co_enter, aio_poll, qemu_get_aio_context
from qblock.util.coroutine import (
    CoroutineError,
    coroutine_fn,
    qemu_coroutine_create,
    qemu_coroutine_enter,
    qemu_coroutine_enter_if_inactive,
    qemu_coroutine_entered,
    qemu_coroutine_self,
    qemu_coroutine_yield,
    qemu_in_coroutine,
    request_id_get,
    request_id_set,
)
from qblock.util.coroutine_lock import (
    CoMutex,
    CoQueue,
    CoRwlock,
    qemu_co_enter_next,
    qemu_co_mutex_lock,
    qemu_co_mutex_unlock,
    qemu_co_queue_empty,
    qemu_co_queue_next,
    qemu_co_queue_restart_all,
    qemu_co_queue_wait,
    qemu_co_rwlock_downgrade,
    qemu_co_rwlock_rdlock,
    qemu_co_rwlock_unlock,
    qemu_co_rwlock_upgrade,
    qemu_co_rwlock_wrlock,
    qemu_co_sleep_ns,
)
from qblock.util.timer import QEMU_CLOCK_VIRTUAL, qemu_clock_get_ns


def test_in_coroutine():
    """qemu_in_coroutine() is false in the main program and true inside a coroutine."""
    seen = []
    assert not qemu_in_coroutine()
    qemu_coroutine_enter(qemu_coroutine_create(lambda _: seen.append(qemu_in_coroutine())))
    assert seen == [True]


def test_self():
    """qemu_coroutine_self() inside a coroutine is that coroutine."""
    box = {}

    def verify_self(_):
        box["self"] = qemu_coroutine_self()

    co = qemu_coroutine_create(verify_self)
    qemu_coroutine_enter(co)
    assert box["self"] is co


def test_entered():
    """qemu_coroutine_entered() is true for a running coroutine and one that entered a nested one, false otherwise."""
    log = []

    def step2(step1):
        log.append(("caller", qemu_coroutine_entered(step1)))
        log.append(("self", qemu_coroutine_entered(qemu_coroutine_self())))
        qemu_coroutine_yield()
        log.append(("caller2", qemu_coroutine_entered(step1)))
        log.append(("self2", qemu_coroutine_entered(qemu_coroutine_self())))

    def step1(_):
        me = qemu_coroutine_self()
        log.append(("step1", qemu_coroutine_entered(me)))
        co2 = qemu_coroutine_create(step2, me)
        log.append(("step2-before", qemu_coroutine_entered(co2)))
        qemu_coroutine_enter(co2)
        log.append(("step2-yielded", qemu_coroutine_entered(co2)))
        qemu_coroutine_enter(co2)

    co = qemu_coroutine_create(step1)
    assert not qemu_coroutine_entered(co)
    qemu_coroutine_enter(co)
    assert log == [("step1", True), ("step2-before", False), ("caller", True), ("self", True),
                   ("step2-yielded", False), ("caller2", True), ("self2", True)]


def test_lifecycle():
    """A coroutine that does not yield runs to completion inside enter, every time with a fresh one."""
    for _ in range(2):
        done = []
        qemu_coroutine_enter(qemu_coroutine_create(lambda d: d.append(True), done))
        assert done == [True]


def test_yield():
    """Five yields then a return take exactly six enters."""
    done = []

    def yield_5_times(d):
        for _ in range(5):
            qemu_coroutine_yield()
        d.append(True)

    co = qemu_coroutine_create(yield_5_times, done)
    i = -1
    while not done:
        qemu_coroutine_enter(co)
        i += 1
    assert i == 5


def test_nesting():
    """Coroutines nest 128 deep and every level returns."""
    nd = {"n_enter": 0, "n_return": 0, "max": 128}

    def nest(d):
        d["n_enter"] += 1
        if d["n_enter"] < d["max"]:
            qemu_coroutine_enter(qemu_coroutine_create(nest, d))
        d["n_return"] += 1

    qemu_coroutine_enter(qemu_coroutine_create(nest, nd))
    assert nd["n_enter"] == 128 and nd["n_return"] == 128


def test_order():
    """Control moves between main and coroutine exactly as enter and yield say."""
    records = []

    def co_order_test(_):
        assert qemu_in_coroutine()
        records.append((2, 1))
        qemu_coroutine_yield()
        records.append((2, 2))
        assert qemu_in_coroutine()

    records.append((1, 1))
    co = qemu_coroutine_create(co_order_test)
    qemu_coroutine_enter(co)
    records.append((1, 2))
    assert not qemu_in_coroutine()
    qemu_coroutine_enter(co)
    records.append((1, 3))
    assert records == [(1, 1), (2, 1), (1, 2), (2, 2), (1, 3)]


def test_no_dangling_access():
    """A coroutine that yielded back to a finished nested caller resumes later without touching it."""
    c2 = qemu_coroutine_create(lambda _: qemu_coroutine_yield())
    c1 = qemu_coroutine_create(lambda co: qemu_coroutine_enter(co), c2)
    qemu_coroutine_enter(c1)
    assert c1.terminated and not c2.terminated and c2.caller is None
    qemu_coroutine_enter(c2)
    assert c2.terminated


def test_reentered_recursively_is_an_error():
    """Entering the coroutine that is running raises QEMU's 're-entered recursively'."""
    def body(_):
        qemu_coroutine_enter(qemu_coroutine_self())

    with pytest.raises(CoroutineError, match="re-entered recursively"):
        qemu_coroutine_enter(qemu_coroutine_create(body))


def test_enter_terminated_is_an_error():
    """Entering a coroutine that already finished raises instead of running it again."""
    co = qemu_coroutine_create(lambda _: None)
    qemu_coroutine_enter(co)
    with pytest.raises(CoroutineError, match="terminated"):
        qemu_coroutine_enter(co)


def test_yield_outside_coroutine_is_an_error():
    """Yielding from the main program raises QEMU's 'yielding to no one'."""
    with pytest.raises(CoroutineError, match="yielding to no one"):
        qemu_coroutine_yield()


def test_coroutine_fn_outside_coroutine_fails_at_once():
    """A coroutine_fn called outside a coroutine fails before running its body."""
    ran = []

    @coroutine_fn
    def my_co_fn():
        ran.append(True)

    with pytest.raises(CoroutineError, match="outside coroutine"):
        my_co_fn()
    assert ran == []
    qemu_coroutine_enter(qemu_coroutine_create(lambda _: my_co_fn()))
    assert ran == [True]


def test_exception_reaches_enterer():
    """An exception raised inside a coroutine reaches whoever entered it and ends the coroutine."""
    def boom(_):
        qemu_coroutine_yield()
        raise ValueError("boom")

    co = qemu_coroutine_create(boom)
    qemu_coroutine_enter(co)
    with pytest.raises(ValueError, match="boom"):
        qemu_coroutine_enter(co)
    assert co.terminated


def test_exception_does_not_lose_queued_wakeups():
    """A coroutine that fails after waking another still lets the woken one run before the error surfaces."""
    ran = []
    sleeper = qemu_coroutine_create(lambda _: (qemu_coroutine_yield(), ran.append("woken")))
    qemu_coroutine_enter(sleeper)

    def waker(_):
        aio_co_enter(qemu_get_aio_context(), sleeper)
        raise RuntimeError("after wake")

    with pytest.raises(RuntimeError):
        qemu_coroutine_enter(qemu_coroutine_create(waker))
    assert ran == ["woken"]


def test_wakeups_run_after_waker_yields_fifo():
    """Coroutines woken from a coroutine run only when it yields, in the order they were woken."""
    log = []

    def sleeper(name):
        qemu_coroutine_yield()
        log.append(name)

    a = qemu_coroutine_create(sleeper, "a")
    b = qemu_coroutine_create(sleeper, "b")
    qemu_coroutine_enter(a)
    qemu_coroutine_enter(b)

    def waker(_):
        ctx = qemu_get_aio_context()
        aio_co_enter(ctx, a)
        aio_co_enter(ctx, b)
        log.append("waker-before-yield")
        qemu_coroutine_yield()
        log.append("waker-resumed")

    w = qemu_coroutine_create(waker)
    qemu_coroutine_enter(w)
    log.append("main")
    qemu_coroutine_enter(w)
    assert log == ["waker-before-yield", "a", "b", "main", "waker-resumed"]


def test_enter_if_inactive():
    """qemu_coroutine_enter_if_inactive does nothing for a coroutine that is running."""
    count = []

    def body(_):
        count.append(1)
        qemu_coroutine_enter_if_inactive(qemu_coroutine_self())
        qemu_coroutine_yield()
        count.append(2)

    co = qemu_coroutine_create(body)
    qemu_coroutine_enter_if_inactive(co)
    qemu_coroutine_enter_if_inactive(co)
    assert count == [1, 2]


def test_pool_reuses_greenlets():
    """Finished coroutines give their greenlet back: a new coroutine runs on a recycled one."""
    grs = []

    def body(_):
        import greenlet
        grs.append(greenlet.getcurrent())

    for _ in range(3):
        qemu_coroutine_enter(qemu_coroutine_create(body))
    assert grs[0] is grs[1] is grs[2]


def test_request_id_follows_coroutine():
    """A request id set in a coroutine is that coroutine's and does not leak to the main program."""
    seen = []

    def body(_):
        request_id_set(42)
        qemu_coroutine_yield()
        seen.append(request_id_get())

    co = qemu_coroutine_create(body)
    qemu_coroutine_enter(co)
    assert request_id_get() is None
    qemu_coroutine_enter(co)
    assert seen == [42]


# ---------------------------------------------------------------------------
# CoMutex


def _do_test_co_mutex():
    state = {"done": 0, "locked": False}
    m = CoMutex("m")

    def mutex_fn(_):
        qemu_co_mutex_lock(m)
        assert not state["locked"]
        state["locked"] = True
        qemu_coroutine_yield()
        state["locked"] = False
        qemu_co_mutex_unlock(m)
        state["done"] += 1

    c1 = qemu_coroutine_create(mutex_fn)
    c2 = qemu_coroutine_create(mutex_fn)
    qemu_coroutine_enter(c1)
    assert state["locked"]
    qemu_coroutine_enter(c2)
    # c1 unlocks and hands the mutex to c2, which runs once c1 terminates.
    qemu_coroutine_enter(c1)
    assert state["done"] == 1 and state["locked"]
    qemu_coroutine_enter(c2)
    assert state["done"] == 2 and not state["locked"]


def test_co_mutex():
    """Two coroutines take a CoMutex in turn; the second gets it by hand-off when the first unlocks."""
    _do_test_co_mutex()


def test_co_mutex_fifo_no_barging():
    """Waiters get the mutex in arrival order; a newcomer during hand-off queues behind them."""
    m = CoMutex()
    order = []

    def worker(name):
        qemu_co_mutex_lock(m)
        order.append(name)
        qemu_coroutine_yield()
        qemu_co_mutex_unlock(m)

    cos = {n: qemu_coroutine_create(worker, n) for n in "abcd"}
    for n in "abc":
        qemu_coroutine_enter(cos[n])
    assert order == ["a"] and m.locked == 3
    qemu_coroutine_enter(cos["a"])  # hands off to b
    qemu_coroutine_enter(cos["d"])  # arrives while b owns it: queues behind c
    assert order == ["a", "b"]
    qemu_coroutine_enter(cos["b"])
    qemu_coroutine_enter(cos["c"])
    qemu_coroutine_enter(cos["d"])
    assert order == ["a", "b", "c", "d"] and m.locked == 0


def test_co_mutex_unlock_not_held_is_an_error():
    """Unlocking a CoMutex the coroutine does not hold raises."""
    m = CoMutex("m")
    errors = []

    def holder(_):
        qemu_co_mutex_lock(m)
        qemu_coroutine_yield()
        qemu_co_mutex_unlock(m)

    def thief(_):
        try:
            qemu_co_mutex_unlock(m)
        except CoroutineError as e:
            errors.append(str(e))

    h = qemu_coroutine_create(holder)
    qemu_coroutine_enter(h)
    qemu_coroutine_enter(qemu_coroutine_create(thief))
    qemu_coroutine_enter(h)
    assert errors and "does not hold" in errors[0]


def test_terminating_with_lock_held_is_an_error():
    """A coroutine that ends holding a CoMutex is reported to its enterer."""
    m = CoMutex()
    with pytest.raises(CoroutineError, match="holding 1 lock"):
        qemu_coroutine_enter(qemu_coroutine_create(lambda _: qemu_co_mutex_lock(m)))


# ---------------------------------------------------------------------------
# CoRwlock


def test_co_rwlock_upgrade():
    """An upgrading reader waits behind a writer that queued earlier, then gets the write lock."""
    lock = CoRwlock("rw")
    done = {"c1": False, "c2": False}

    def c1_fn(_):
        qemu_co_rwlock_rdlock(lock)
        qemu_coroutine_yield()
        qemu_co_rwlock_upgrade(lock)
        qemu_co_rwlock_unlock(lock)
        done["c1"] = True

    def c2_fn(_):
        qemu_co_rwlock_wrlock(lock)
        qemu_coroutine_yield()
        qemu_co_rwlock_unlock(lock)
        done["c2"] = True

    c1 = qemu_coroutine_create(c1_fn)
    c2 = qemu_coroutine_create(c2_fn)
    qemu_coroutine_enter(c1)
    qemu_coroutine_enter(c2)
    qemu_coroutine_enter(c1)
    assert not done["c1"]
    qemu_coroutine_enter(c2)
    assert done["c1"] and done["c2"]


def test_co_rwlock_downgrade():
    """The downgrade case that deadlocks the pre-6.0 lock completes every coroutine with tickets."""
    lock = CoRwlock("rw")
    done = {}

    def c1_fn(_):
        qemu_co_rwlock_rdlock(lock)
        qemu_coroutine_yield()
        qemu_co_rwlock_unlock(lock)
        qemu_coroutine_yield()
        done["c1"] = True

    def c2_fn(_):
        qemu_co_rwlock_wrlock(lock)
        qemu_co_rwlock_downgrade(lock)
        qemu_co_rwlock_unlock(lock)
        done["c2"] = True

    def c3_fn(_):
        qemu_co_rwlock_rdlock(lock)
        qemu_co_rwlock_unlock(lock)
        done["c3"] = True

    def c4_fn(_):
        qemu_co_rwlock_wrlock(lock)
        qemu_co_rwlock_unlock(lock)
        done["c4"] = True

    c1, c2, c3, c4 = (qemu_coroutine_create(f) for f in (c1_fn, c2_fn, c3_fn, c4_fn))
    for co in (c1, c2, c3, c4):
        qemu_coroutine_enter(co)
    assert [t.read for t in lock.tickets] == [False, True, False] and lock.owners == 1
    qemu_coroutine_enter(c1)
    assert done == {"c2": True, "c3": True, "c4": True}
    qemu_coroutine_enter(c1)
    assert done["c1"] and lock.owners == 0


def test_co_rwlock_readers_share():
    """Readers share the lock while no writer waits; a queued writer makes later readers wait."""
    lock = CoRwlock()
    log = []

    def reader(name):
        qemu_co_rwlock_rdlock(lock)
        log.append(f"{name}+")
        qemu_coroutine_yield()
        qemu_co_rwlock_unlock(lock)

    def writer(name):
        qemu_co_rwlock_wrlock(lock)
        log.append(f"{name}+")
        qemu_co_rwlock_unlock(lock)

    r1, r2, w, r3 = (qemu_coroutine_create(reader, "r1"), qemu_coroutine_create(reader, "r2"),
                     qemu_coroutine_create(writer, "w"), qemu_coroutine_create(reader, "r3"))
    for co in (r1, r2, w, r3):
        qemu_coroutine_enter(co)
    assert log == ["r1+", "r2+"] and lock.owners == 2
    qemu_coroutine_enter(r1)
    qemu_coroutine_enter(r2)
    assert log == ["r1+", "r2+", "w+", "r3+"]
    qemu_coroutine_enter(r3)
    assert lock.owners == 0


# ---------------------------------------------------------------------------
# CoQueue and sleeping


def test_co_queue_wait_next_restart_all():
    """Waiters leave a CoQueue oldest first: next wakes one, restart_all wakes the rest."""
    q = CoQueue("q")
    log = []

    def waiter(name):
        qemu_co_queue_wait(q)
        log.append(name)

    for n in "abc":
        qemu_coroutine_enter(qemu_coroutine_create(waiter, n))
    assert not qemu_co_queue_empty(q)
    qemu_coroutine_enter(qemu_coroutine_create(lambda _: qemu_co_queue_next(q)))
    assert log == ["a"]
    qemu_coroutine_enter(qemu_coroutine_create(lambda _: qemu_co_queue_restart_all(q)))
    assert log == ["a", "b", "c"] and qemu_co_queue_empty(q)


def test_co_queue_wait_drops_and_retakes_mutex():
    """qemu_co_queue_wait with a CoMutex releases it while waiting and holds it again afterwards."""
    q = CoQueue()
    m = CoMutex()
    log = []

    def waiter(_):
        qemu_co_mutex_lock(m)
        qemu_co_queue_wait(q, m)
        log.append(("woken, holder is me", m.holder is qemu_coroutine_self()))
        qemu_co_mutex_unlock(m)

    def other(_):
        qemu_co_mutex_lock(m)
        log.append("other got the mutex")
        qemu_co_queue_next(q)
        qemu_co_mutex_unlock(m)

    qemu_coroutine_enter(qemu_coroutine_create(waiter))
    qemu_coroutine_enter(qemu_coroutine_create(other))
    assert log == ["other got the mutex", ("woken, holder is me", True)]


def test_co_enter_next_from_outside():
    """qemu_co_enter_next wakes the oldest waiter from outside any coroutine."""
    q = CoQueue()
    log = []
    qemu_coroutine_enter(qemu_coroutine_create(lambda _: (qemu_co_queue_wait(q), log.append(1))))
    assert qemu_co_enter_next(q) and log == [1]
    assert not qemu_co_enter_next(q)


def test_co_sleep_ns_on_virtual_clock():
    """qemu_co_sleep_ns wakes exactly when the virtual clock reaches the deadline."""
    ctx = qemu_get_aio_context()
    woke = []
    start = qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL)
    co = qemu_coroutine_create(lambda _: (qemu_co_sleep_ns(QEMU_CLOCK_VIRTUAL, 5_000_000),
                                          woke.append(qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL))))
    qemu_coroutine_enter(co)
    assert not aio_poll(ctx, False) and woke == []
    assert aio_poll(ctx, True)
    assert woke == [start + 5_000_000]
