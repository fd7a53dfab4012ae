"""The one table of trace events, in QEMU's trace-events syntax.

Each ``# file`` line names the QEMU source file whose ``trace-events`` list the
declarations below it come from (util/trace-events, block/trace-events,
hw/block/trace-events ...), so a reader can grep QEMU for the same name.
Events QEMU does not have are grouped under ``# qblock:`` lines and say so.

Importing this module defines one function per event, ``trace_<name>``; call
sites import them by name.  Third-party drivers declare their own with
:func:`qblock.trace.control.trace_events_declare`.
"""
from qblock.trace.control import trace_events_declare

TRACE_EVENTS = r'''
# util/qemu-coroutine.c
qemu_aio_coroutine_enter(void *ctx, void *from, void *to, void *opaque) "ctx %p from %p to %p opaque %p"
qemu_coroutine_yield(void *from, void *to) "from %p to %p"
qemu_coroutine_terminate(void *co) "self %p"

# util/qemu-coroutine-lock.c
qemu_co_mutex_lock_uncontended(void *mutex, void *self) "mutex %p self %p"
qemu_co_mutex_lock_entry(void *mutex, void *self) "mutex %p self %p"
qemu_co_mutex_lock_return(void *mutex, void *self) "mutex %p self %p"
qemu_co_mutex_unlock_entry(void *mutex, void *self) "mutex %p self %p"
qemu_co_mutex_unlock_return(void *mutex, void *self) "mutex %p self %p"

# util/async.c
aio_co_schedule(void *ctx, void *co) "ctx %p co %p"
aio_co_schedule_bh_cb(void *ctx, void *co) "ctx %p co %p"

# util/thread-pool.c
thread_pool_submit(void *pool, void *req, void *opaque) "pool %p req %p opaque %p"
thread_pool_complete(void *pool, void *req, void *opaque, int ret) "pool %p req %p opaque %p ret %d"
thread_pool_cancel(void *req, void *opaque) "req %p opaque %p"

# qblock: runtime events QEMU has no trace point for
qemu_coroutine_create(void *co, void *entry, void *opaque) "co %p entry %p opaque %p"
aio_bh_schedule(void *ctx, void *bh, void *cb) "ctx %p bh %p cb %p"
aio_bh_call(void *ctx, void *bh, void *cb) "ctx %p bh %p cb %p"
timer_mod(void *ctx, void *timer, int clock, int64_t expire_ns) "ctx %p timer %p clock %d expire_ns %" PRId64
timer_fire(void *ctx, void *timer, int clock, int64_t expire_ns) "ctx %p timer %p clock %d expire_ns %" PRId64
aio_poll(void *ctx, int blocking, int progress) "ctx %p blocking %d progress %d"
'''

globals().update(trace_events_declare(TRACE_EVENTS))
