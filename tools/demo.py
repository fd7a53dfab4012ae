"""``qblock-demo``: the runtime at work, traced.

Three coroutines take turns on one CoMutex and sleep on the virtual clock,
while the main loop (``aio_poll``) runs their timers and wake-ups.  Every
coroutine switch, timer and BH is printed as a trace line (QEMU's log-backend
format), prefixed with the virtual time, so a reader sees who runs when and
why.  Deterministic: the same output on every run.
"""
from __future__ import annotations

import argparse
import sys

from qblock.trace.control import trace_add_sink, trace_enable_events, trace_remove_sink
from qblock.util import timer
from qblock.util.aio import aio_poll, qemu_get_aio_context
from qblock.util.coroutine import qemu_coroutine_create, qemu_coroutine_enter
from qblock.util.coroutine_lock import CoMutex, qemu_co_mutex_lock, qemu_co_mutex_unlock, qemu_co_sleep_ns
from qblock.util.timer import QEMU_CLOCK_VIRTUAL, qemu_clock_get_ns


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qblock-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", default="qemu_*coroutine*,qemu_co_mutex*,timer_fire",
                   help="comma-separated event globs to show (default: coroutines, mutex, timers)")
    args = p.parse_args(argv)

    timer.qtest_set_enabled(True)
    start = qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL)
    out = sys.stdout

    def sink(rec):
        out.write(f"[{(rec.ts_virtual_ns - start) / 1e6:7.3f} ms] {rec.text()}\n")

    for pattern in args.trace.split(","):
        trace_enable_events(pattern)
    trace_add_sink(sink)

    lock = CoMutex("lock")
    finished = []

    def worker(name: str) -> None:
        for step in range(2):
            qemu_co_mutex_lock(lock)
            out.write(f"           {name} holds the lock (step {step}), sleeps 1 ms\n")
            qemu_co_sleep_ns(QEMU_CLOCK_VIRTUAL, 1_000_000)
            qemu_co_mutex_unlock(lock)
        finished.append(name)

    for name in ("A", "B", "C"):
        qemu_coroutine_enter(qemu_coroutine_create(worker, name))
    ctx = qemu_get_aio_context()
    while len(finished) < 3:
        aio_poll(ctx, True)
    trace_remove_sink(sink)
    out.write(f"all done after {(qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) - start) / 1e6:.3f} ms of virtual time;"
              f" finish order {' '.join(finished)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
