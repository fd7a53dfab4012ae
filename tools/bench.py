"""Benchmarks: ``python -m qblock.tools.bench SUITE``.

Every figure is printed beside a baseline measured in the same run (a bare
greenlet, a plain Python loop, or QEMU's own C tool) and the ratio, so the
numbers mean something on any machine.  Suites:

``runtime``  coroutine create/enter/finish, yield/re-enter, BH schedule+run,
             a disabled trace event (issue: foundation).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import greenlet


def _best(fn: Callable[[int], None], n: int, repeat: int = 5) -> float:
    """Best time per iteration in microseconds over ``repeat`` runs of ``fn(n)``."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def _row(name: str, ours: float, base_name: str, base: float, target: str = "") -> str:
    ratio = ours / base if base else float("inf")
    return f"{name:<38} {ours:8.3f} us   {base_name:<34} {base:8.3f} us   ratio {ratio:5.2f}x  {target}"


def bench_runtime(n: int) -> list[str]:
    from qblock.trace.events import trace_aio_bh_call
    from qblock.util.aio import aio_bh_new, aio_bh_poll, qemu_bh_schedule, qemu_get_aio_context
    from qblock.util.coroutine import qemu_aio_coroutine_enter, qemu_coroutine_create, qemu_coroutine_yield

    ctx = qemu_get_aio_context()
    rows = []

    # 1. create + enter + finish
    def body(_):
        pass

    def ours_lifecycle(k):
        for _ in range(k):
            qemu_aio_coroutine_enter(ctx, qemu_coroutine_create(body, None))

    def fresh_greenlet(k):
        for _ in range(k):
            greenlet.greenlet(body).switch(None)

    ours = _best(ours_lifecycle, n)
    base = _best(fresh_greenlet, max(n // 4, 1000))
    rows.append(_row("coroutine create+enter+finish (pooled)", ours, "fresh greenlet create+run", base,
                     f"(target <= 1.5 us; {base / ours:.1f}x better than a fresh greenlet)"))

    # 2. yield + re-enter round trip
    def loop(_):
        while True:
            qemu_coroutine_yield()

    co = qemu_coroutine_create(loop, None)
    qemu_aio_coroutine_enter(ctx, co)

    def ours_roundtrip(k):
        for _ in range(k):
            qemu_aio_coroutine_enter(ctx, co)

    main = greenlet.getcurrent()

    def bare_loop():
        while True:
            main.switch()

    g = greenlet.greenlet(bare_loop)
    g.switch()

    def bare_roundtrip(k):
        for _ in range(k):
            g.switch()

    ours = _best(ours_roundtrip, n)
    base = _best(bare_roundtrip, n)
    rows.append(_row("yield + re-enter round trip", ours, "bare greenlet switch round trip", base,
                     "(target <= 1.5x)"))

    # 3. BH schedule + run
    hits = [0]

    def cb(_):
        hits[0] += 1

    bh = aio_bh_new(ctx, cb, None)

    def ours_bh(k):
        for _ in range(k):
            qemu_bh_schedule(bh)
            aio_bh_poll(ctx)

    def plain_call(k):
        for _ in range(k):
            cb(None)

    ours = _best(ours_bh, n)
    base = _best(plain_call, n)
    rows.append(_row("BH schedule + aio_bh_poll", ours, "plain function call", base))

    # 4. disabled trace event
    def ours_trace(k):
        for _ in range(k):
            trace_aio_bh_call(ctx, bh, cb)

    def empty(k):
        for _ in range(k):
            pass

    ours = _best(ours_trace, n * 4)
    base = _best(empty, n * 4)
    rows.append(_row("disabled trace event (call + flag test)", ours - base, "empty loop iteration", base,
                     "(target <= 0.1 us)"))
    return rows


SUITES = {"runtime": bench_runtime}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qblock.tools.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("suite", choices=sorted(SUITES), help="which benchmark suite to run")
    p.add_argument("-n", type=int, default=200_000, help="iterations per measurement (default 200000)")
    args = p.parse_args(argv)
    print(f"qblock bench {args.suite}: best of 5 runs of {args.n} iterations, Python {sys.version.split()[0]}")
    for line in SUITES[args.suite](args.n):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
