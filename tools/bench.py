"""Benchmarks: ``python -m qblock.tools.bench SUITE``.

Every figure is printed beside a baseline measured in the same run (a bare
greenlet, a plain Python loop, or QEMU's own C tool) and the ratio, so the
numbers mean something on any machine.  Suites:

``runtime``  coroutine create/enter/finish, yield/re-enter, BH schedule+run,
             a disabled trace event (issue: foundation).
``blk``      null-co 4 KiB writes at queue depth 64 through blk_aio_pwritev beside
             ``qemu-img bench``; raw over file 1 MiB sequential writes beside a plain
             ``os.pwritev`` loop; resident memory after 100k and 1M requests.
``nbd``      16 clients (two other processes) writing and read-verifying 4 KiB blocks of
             their own regions over a UNIX socket, for a few seconds: qblock's NBD
             server (raw over file, in this process) beside qemu-nbd serving the same
             kind of file; requests/s, p50/p99 latency and the ratio.
``img``      ``qblock-img bench`` beside ``qemu-img bench`` with the same flags: null-co,
             a raw file and a qcow2 image (when qblock has a qcow2 driver), 4 KiB writes
             and reads at queue depth 64.
``qcow2``    the qcow2 driver in-process beside ``qemu-img bench`` on a twin image: 256 MiB
             of 1 MiB sequential writes into a new image and reads of them (target within
             1.5x of QEMU), 4 KiB writes at queue depth 32 allocating and overwriting one
             cluster in 16 over 1 GiB.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
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


def _rss_mib() -> float:
    """Current resident set size in MiB (from /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def _blk_qd_run(blk, count: int, depth: int, size: int, length: int = 1 << 30) -> float:
    """Seconds to complete ``count`` writes of ``size`` bytes, ``depth`` in flight (qemu-img bench's loop)."""
    from qblock.block.block_backend import blk_aio_pwritev, blk_get_aio_context
    from qblock.util.aio import aio_poll
    from qblock.util.iov import QEMUIOVector

    ctx = blk_get_aio_context(blk)
    buf = bytearray(size)
    qiov = QEMUIOVector([memoryview(buf)], -1)
    state = {"issued": 0, "done": 0, "offset": 0}

    def cb(opaque, ret):
        state["done"] += 1
        if ret < 0:
            raise RuntimeError(f"bench write failed: {ret}")
        if state["issued"] < count:
            issue()

    def issue():
        off = state["offset"]
        state["offset"] = (off + size) % length
        state["issued"] += 1
        blk_aio_pwritev(blk, off, qiov, 0, cb, None)

    t0 = time.perf_counter()
    for _ in range(min(depth, count)):
        issue()
    while state["done"] < count:
        aio_poll(ctx, True)
    return time.perf_counter() - t0


def _qemu_img_bench(count: int, depth: int, size: int) -> float | None:
    if shutil.which("qemu-img") is None:
        return None
    r = subprocess.run(["qemu-img", "bench", "-w", "-c", str(count), "-d", str(depth), "-s", str(size),
                        "--image-opts", "driver=null-co,size=1G"], capture_output=True, text=True)
    m = re.search(r"Run completed in ([0-9.]+) seconds", r.stdout)
    return float(m.group(1)) if m else None


def bench_blk(n: int) -> list[str]:
    from qblock.block.block_backend import blk_get_aio_context, blk_new_open, blk_pwrite, blk_unref
    from qblock.block.driver import BDRV_O_RDWR
    from qblock.util.thread_pool import STALL_NS, aio_get_thread_pool

    rows = []
    # 1. null-co, 4 KiB writes, queue depth 64
    count = max(n // 2, 20000)
    blk = blk_new_open(None, None, {"driver": "null-co", "size": str(1 << 30)}, BDRV_O_RDWR)
    _blk_qd_run(blk, 2000, 64, 4096)  # warm up the coroutine pool
    secs = qemu = None
    for _ in range(3):  # alternate, best of three each
        t = _blk_qd_run(blk, count, 64, 4096)
        secs = t if secs is None else min(secs, t)
        q = _qemu_img_bench(count, 64, 4096)
        if q is not None:
            qemu = q if qemu is None else min(qemu, q)
    ours = count / secs
    line = f"null-co 4 KiB writes QD64 (blk_aio_pwritev)   {ours:10,.0f} req/s  (target >= 100,000)"
    if qemu:
        line += f"   qemu-img bench -w: {count / qemu:10,.0f} req/s   ratio {ours / (count / qemu):.3f}x"
    else:
        line += "   (qemu-img not installed: no comparison)"
    rows.append(line)

    # 2. memory over many requests
    rss0 = _rss_mib()
    _blk_qd_run(blk, 100_000, 64, 4096)
    rss_100k = _rss_mib()
    many = 1_000_000 if n >= 200_000 else 10 * n
    _blk_qd_run(blk, many - 100_000, 64, 4096)
    rss_1m = _rss_mib()
    rows.append(f"resident memory: start {rss0:.1f} MiB, after 100k requests {rss_100k:.1f} MiB, "
                f"after {many:,} requests {rss_1m:.1f} MiB (growth {rss_1m - rss_100k:+.1f} MiB)")
    blk_unref(blk)

    # 3. raw over file, 1 MiB sequential writes of 256 MiB, beside a plain os.pwritev loop
    total = 256 << 20 if n >= 200_000 else 64 << 20
    chunk = 1 << 20
    data = bytearray(b"\xab" * chunk)
    with tempfile.TemporaryDirectory(prefix="qblock-bench-") as d:
        path = os.path.join(d, "bench.img")
        with open(path, "wb") as f:
            f.truncate(total)
        fd = os.open(path, os.O_RDWR)

        def plain_loop() -> float:
            t0 = time.perf_counter()
            for off in range(0, total, chunk):
                os.pwritev(fd, [data], off)
            return total / (time.perf_counter() - t0)

        blk = blk_new_open(None, None, {"driver": "raw", "file.driver": "file", "file.filename": path}, BDRV_O_RDWR)

        def qblock_loop() -> float:
            t0 = time.perf_counter()
            for off in range(0, total, chunk):
                if blk_pwrite(blk, off, data) != chunk:
                    raise RuntimeError("bench write failed")
            return total / (time.perf_counter() - t0)

        pool = aio_get_thread_pool(blk_get_aio_context(blk))

        def qblock_qd8(stall_ns: int = STALL_NS) -> float:
            pool.stall_ns = stall_ns
            try:
                return total / _blk_qd_run(blk, total // chunk, 8, chunk, length=total)
            finally:
                pool.stall_ns = STALL_NS

        have_qemu = shutil.which("qemu-img") is not None

        def qemu_img(depth: int) -> float:
            flags = ["-w", "-c", str(total // chunk), "-d", str(depth), "-s", str(chunk), "-S", str(chunk),
                     "-t", "writeback", "-i", "threads", "-f", "raw", path]
            secs = _run_img_bench(["qemu-img"], flags, d) if have_qemu else None
            return total / secs if secs else 0.0

        plain_loop()  # the first pass allocates the file's pages; measure overwrites only
        plain = ours = ours8 = ours8_qemu_rule = qemu1 = qemu8 = 0.0
        for _ in range(3):  # alternate, best of three each
            plain = max(plain, plain_loop())
            ours = max(ours, qblock_loop())
            ours8 = max(ours8, qblock_qd8())
            ours8_qemu_rule = max(ours8_qemu_rule, qblock_qd8(0))
            qemu1 = max(qemu1, qemu_img(1))
            qemu8 = max(qemu8, qemu_img(8))
        blk_unref(blk)
        os.close(fd)
    mib = 1 << 20
    for label, got, qemu in (("QD1 (blk_pwrite)", ours, qemu1),
                             ("QD8 (blk_aio_pwritev, qemu-img convert's 8 in flight)", ours8, qemu8)):
        line = (f"raw over file, 1 MiB sequential writes of {total >> 20} MiB, {label}: {got / mib:8.1f} MiB/s   "
                f"plain os.pwritev loop {plain / mib:8.1f} MiB/s   ratio {got / plain:.3f}x (target >= 0.8x)")
        if qemu:
            line += f"   qemu-img bench (aio=threads): {qemu / mib:8.1f} MiB/s, {qemu / plain:.3f}x"
        rows.append(line)
    rows.append(f"  (QD8 with QEMU's thread-pool rule, a worker per queued job (stall_ns=0): "
                f"{ours8_qemu_rule / mib:8.1f} MiB/s, {ours8_qemu_rule / plain:.3f}x)")
    # What bounds QD1: each request crosses to a worker thread and back.
    rtt = _thread_round_trip_us()
    write_us = chunk / plain * 1e6
    rows.append(f"  (one thread round trip here: {rtt:.1f} us, beside {write_us:.1f} us per plain 1 MiB write, "
                f"so with no Python at all QD1 could reach {write_us / (write_us + rtt):.2f}x)")
    return rows


def _thread_round_trip_us(rounds: int = 5000) -> float:
    """Microseconds for one wake-up of another thread and one back (two locks, ping-pong)."""
    ping, pong = threading.Lock(), threading.Lock()
    ping.acquire()
    pong.acquire()

    def partner():
        for _ in range(rounds):
            ping.acquire()
            pong.release()

    t = threading.Thread(target=partner)
    t.start()
    t0 = time.perf_counter()
    for _ in range(rounds):
        ping.release()
        pong.acquire()
    secs = time.perf_counter() - t0
    t.join()
    return secs / rounds * 1e6


def bench_nbd(n: int) -> list[str]:
    """qblock's NBD server and qemu-nbd under the same load (qblock.testing.nbd_load) in one run."""
    import qblock.nbd  # noqa: F401  (registers the nbd export type)
    from qblock.block.driver import BDRV_O_RDWR
    from qblock.block.export import blk_exp_add
    from qblock.block.graph import bdrv_open, bdrv_unref
    from qblock.nbd.blockdev_nbd import nbd_server_start, nbd_server_stop
    from qblock.testing.nbd_client import aio_pump
    from qblock.testing.nbd_load import run_load
    from qblock.util.aio import qemu_get_aio_context

    clients, region = 16, 1 << 20
    seconds = 5.0 if n >= 200_000 else max(1.0, n / 40_000)

    def row(name: str, r) -> str:
        return (f"{name:<36} {r.rate:9,.0f} req/s   p50 {r.percentile_us(50):8.0f} us   "
                f"p99 {r.percentile_us(99):8.0f} us   ({r.requests:,} requests, {r.errors} errors, "
                f"{r.mismatches} mismatches)")

    rows = [f"{clients} clients, 4 KiB write + read-back-and-verify each, one request in flight per client, "
            f"{seconds:.0f} s per server, load from 2 processes over a UNIX socket"]
    with tempfile.TemporaryDirectory(prefix="qblock-bench-nbd-") as d:
        ctx = qemu_get_aio_context()
        image = os.path.join(d, "qblock.raw")
        with open(image, "wb") as f:
            f.truncate(clients * region)
        bs = bdrv_open(None, None, {"driver": "raw", "node-name": "bench-nbd0", "file.driver": "file",
                                    "file.filename": image}, BDRV_O_RDWR)
        sock = os.path.join(d, "qblock.sock")
        nbd_server_start({"type": "unix", "path": sock})
        try:
            blk_exp_add({"type": "nbd", "id": "bench-nbd0", "node-name": "bench-nbd0", "writable": True,
                         "name": "disk"})
            ours = run_load(sock, "disk", clients, 2, seconds, region, pump=lambda: aio_pump(ctx, 20_000_000))
        finally:
            nbd_server_stop()
            bdrv_unref(bs)
        rows.append(row("qblock NBD server (raw over file)", ours))
        if shutil.which("qemu-nbd") is None:
            rows.append("qemu-nbd not installed: no comparison")
            return rows
        image = os.path.join(d, "qemu.raw")
        with open(image, "wb") as f:
            f.truncate(clients * region)
        sock = os.path.join(d, "qemu.sock")
        proc = subprocess.Popen(["qemu-nbd", "-t", "-e", "0", "-k", sock, "-f", "raw", "-x", "disk", image],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            t0 = time.perf_counter()
            while not os.path.exists(sock):
                if proc.poll() is not None or time.perf_counter() - t0 > 10:
                    raise RuntimeError("qemu-nbd did not start")
                time.sleep(0.01)
            theirs = run_load(sock, "disk", clients, 2, seconds, region)
        finally:
            proc.terminate()
            proc.wait()
        rows.append(row("qemu-nbd (raw over file)", theirs))
        rows.append(f"ratio qblock/qemu-nbd: requests/s {ours.rate / theirs.rate:.3f}x   "
                    f"p50 latency {ours.percentile_us(50) / theirs.percentile_us(50):.2f}x   "
                    f"p99 latency {ours.percentile_us(99) / theirs.percentile_us(99):.2f}x")
    return rows


SUITES = {"runtime": bench_runtime, "blk": bench_blk}
SUITES["nbd"] = bench_nbd


def _run_img_bench(prog: list[str], args: list[str], cwd: str) -> float | None:
    """Seconds reported by ``PROG bench ARGS`` ("Run completed in X seconds."), None when it failed."""
    r = subprocess.run(prog + ["bench"] + args, capture_output=True, text=True, cwd=cwd)
    m = re.search(r"Run completed in ([0-9.]+) seconds", r.stdout)
    if r.returncode != 0 or not m:
        return None
    return float(m.group(1))


def bench_img(n: int) -> list[str]:
    """qblock-img bench and qemu-img bench, same flags, same kind of images, side by side."""
    from qblock.block.driver import bdrv_find_format
    ours_prog = [sys.executable, "-m", "qblock.tools.qemu_img"]
    have_qemu = shutil.which("qemu-img") is not None
    count = max(n // 4, 20000)
    rows = [f"{'image, requests':<50} {'qblock-img bench':>18} {'qemu-img bench':>18}   ratio (qblock/qemu req/s)"]
    with tempfile.TemporaryDirectory(prefix="qblock-bench-img-") as d:
        cases = [("null-co, 4 KiB writes, QD64", ["-w", "-d", "64", "-s", "4096", "--image-opts",
                                                   "driver=null-co,size=1G"])]
        raw = os.path.join(d, "bench.raw")
        with open(raw, "wb") as f:
            f.truncate(256 << 20)
        cases.append(("raw file, 4 KiB writes, QD64", ["-w", "-d", "64", "-s", "4096", "-f", "raw", raw]))
        cases.append(("raw file, 4 KiB reads, QD64", ["-d", "64", "-s", "4096", "-f", "raw", raw]))
        if bdrv_find_format("qcow2") is not None and have_qemu:
            q = os.path.join(d, "bench.qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", q, "256M"], check=True)
            subprocess.run(["qemu-io", "-c", "write 0 256M", q], check=True, capture_output=True)
            cases.append(("qcow2 (allocated), 4 KiB writes, QD64", ["-w", "-d", "64", "-s", "4096", "-f", "qcow2", q]))
            cases.append(("qcow2 (allocated), 4 KiB reads, QD64", ["-d", "64", "-s", "4096", "-f", "qcow2", q]))
        else:
            rows.append("qcow2: skipped (" + ("no qcow2 driver in qblock" if have_qemu else "qemu-img missing") + ")")
        for name, args in cases:
            flags = ["-c", str(count)] + args
            ours = _run_img_bench(ours_prog, flags, d)
            qemu = _run_img_bench(["qemu-img"], flags, d) if have_qemu else None
            o = f"{count / ours:12,.0f} req/s" if ours else "failed"
            t = f"{count / qemu:12,.0f} req/s" if qemu else ("qemu-img missing" if not have_qemu else "failed")
            ratio = f"{qemu / ours:.3f}x" if ours and qemu else "-"
            rows.append(f"{name:<50} {o:>18} {t:>18}   {ratio}")
        rows.append(f"(both: bench -c {count} and the flags shown; each tool's own 'Run completed in' time, "
                    "so start-up is not counted)")
    return rows


SUITES["img"] = bench_img


# --------------------------------------------------------------------------
# qcow2 (issue 8): the driver's own speed, in-process, beside qemu-img bench on the same kind of image


def _qcow2_qd_run(blk, offsets: list[int], size: int, depth: int, write: bool) -> float:
    """Seconds for one request of ``size`` bytes at each of ``offsets``, ``depth`` in flight."""
    from qblock.block.block_backend import blk_aio_preadv, blk_aio_pwritev, blk_get_aio_context
    from qblock.util.aio import aio_poll
    from qblock.util.iov import QEMUIOVector

    ctx = blk_get_aio_context(blk)
    bufs = [bytearray(b"\xab" * size) for _ in range(depth)]
    state = {"next": 0, "done": 0}

    def issue(slot: int) -> None:
        off = offsets[state["next"]]
        state["next"] += 1
        qiov = QEMUIOVector([memoryview(bufs[slot])], -1)
        (blk_aio_pwritev if write else blk_aio_preadv)(blk, off, qiov, 0, done, slot)

    def done(slot, ret):
        if ret < 0:
            raise RuntimeError(f"qcow2 bench request failed: {ret}")
        state["done"] += 1
        if state["next"] < len(offsets):
            issue(slot)

    t0 = time.perf_counter()
    for slot in range(min(depth, len(offsets))):
        issue(slot)
    while state["done"] < len(offsets):
        aio_poll(ctx, True)
    return time.perf_counter() - t0


def _qemu_img_bench_secs(args: list[str]) -> float | None:
    if shutil.which("qemu-img") is None:
        return None
    r = subprocess.run(["qemu-img", "bench"] + args, capture_output=True, text=True)
    m = re.search(r"Run completed in ([0-9.]+) seconds", r.stdout)
    return float(m.group(1)) if r.returncode == 0 and m else None


def _qemu_io_secs(path: str, cmd: str) -> float | None:
    """The time qemu-io prints for one command ("... 1 ops; 00.21 sec (...)")."""
    if shutil.which("qemu-io") is None:
        return None
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, path], capture_output=True, text=True)
    m = re.search(r"ops; ([0-9:.]+)[ (]", r.stdout)
    if r.returncode or not m:
        return None
    secs = 0.0
    for part in m.group(1).split(":"):
        secs = secs * 60 + float(part)
    return secs


def bench_qcow2(n: int) -> list[str]:
    """qcow2 over a file (64 KiB clusters, cache=writeback) beside qemu-img bench on a twin image.

    Sequential: 256 MiB in 1 MiB requests at queue depth 1 into a new image (allocating), then read back —
    the same pattern as ``qemu-img bench -w -s 1M -c 256 -d 1`` (and its read twin), whose own
    "Run completed" time is the baseline; ``qemu-io -c 'write -P 0xab 0 256M'`` (one request) is shown
    too.  4 KiB: one write per cluster over a 1 GiB image at queue depth 32 (offsets 64 KiB apart, so each
    write allocates a cluster and copies the rest of it), then the same writes again over the allocated
    clusters — ``qemu-img bench -w -d 32 -s 4k -S 64k``; and 4 KiB writes at random offsets over the
    allocated image, qblock only.  Ratios are qblock's time over QEMU's (lower is better).
    """
    import random

    from qblock.block.block_backend import blk_flush, blk_new_open, blk_unref
    from qblock.block.create import bdrv_create
    from qblock.block.driver import BDRV_O_RDWR, bdrv_find_format

    drv = bdrv_find_format("qcow2")
    if drv is None:
        return ["qcow2: skipped (no qcow2 driver)"]
    mib = 1 << 20
    total = 256 * mib if n >= 200_000 else 64 * mib
    count4k = 16384 if n >= 200_000 else 4096
    rows = [f"{'qcow2 work':<56} {'qblock':>14} {'QEMU':>14}   ratio (time qblock/QEMU)"]

    def row(name: str, ours: float, qemu: float | None, unit_bytes: int, target: str = "") -> None:
        o = f"{unit_bytes / ours / mib:9.1f} MiB/s"
        if qemu:
            rows.append(f"{name:<56} {o:>14} {unit_bytes / qemu / mib:9.1f} MiB/s   {ours / qemu:5.2f}x {target}")
        else:
            rows.append(f"{name:<56} {o:>14} {'(no qemu-img)':>14}")

    def iops_row(name: str, nreq: int, ours: float, qemu: float | None) -> None:
        o = f"{nreq / ours:10,.0f} IOPS"
        q = f"{nreq / qemu:10,.0f} IOPS" if qemu else "(no qemu-img)"
        rows.append(f"{name:<56} {o:>14} {q:>14}   " + (f"{ours / qemu:5.2f}x" if qemu else ""))

    with tempfile.TemporaryDirectory(prefix="qblock-bench-qcow2-") as d:
        ours_img, qemu_img = os.path.join(d, "ours.qcow2"), os.path.join(d, "qemu.qcow2")
        have_qemu = shutil.which("qemu-img") is not None

        def fresh(size: int) -> None:
            for p in (ours_img, qemu_img):
                if os.path.exists(p):
                    os.unlink(p)
            bdrv_create(drv, ours_img, {"size": size})
            if have_qemu:
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", qemu_img, str(size)], check=True)

        # Sequential 1 MiB requests, QD1, into a new image; then read back.  Best of three, alternating.
        seq = list(range(0, total, mib))
        w = r = qw = qr = float("inf")
        for _ in range(3):
            fresh(total)
            blk = blk_new_open(ours_img, None, {"driver": "qcow2"}, BDRV_O_RDWR)
            w = min(w, _qcow2_qd_run(blk, seq, mib, 1, True))
            blk_flush(blk)
            r = min(r, _qcow2_qd_run(blk, seq, mib, 1, False))
            blk_unref(blk)
            qw = min(qw, _qemu_img_bench_secs(["-w", "-f", "qcow2", "-s", "1M", "-c", str(len(seq)), "-d", "1",
                                               qemu_img]) or float("inf"))
            qr = min(qr, _qemu_img_bench_secs(["-f", "qcow2", "-s", "1M", "-c", str(len(seq)), "-d", "1",
                                               qemu_img]) or float("inf"))
        qw = None if qw == float("inf") else qw
        qr = None if qr == float("inf") else qr
        # The floor under qcow2: the same reads of a raw file, through qblock and through qemu-img.
        raw = os.path.join(d, "floor.raw")
        with open(raw, "wb") as f:
            f.write(b"\xab" * total)
        blk = blk_new_open(None, None, {"driver": "raw", "file.driver": "file", "file.filename": raw}, BDRV_O_RDWR)
        rawr = min(_qcow2_qd_run(blk, seq, mib, 1, False) for _ in range(3))
        blk_unref(blk)
        qrawr = min((_qemu_img_bench_secs(["-f", "raw", "-s", "1M", "-c", str(len(seq)), "-d", "1", raw])
                     or float("inf")) for _ in range(3)) if have_qemu else None
        os.unlink(raw)
        row(f"sequential 1 MiB writes, QD1, {total >> 20} MiB, new image", w, qw, total, "(target <= 1.5x)")
        row(f"sequential 1 MiB reads, QD1, {total >> 20} MiB", r, qr, total, "(target <= 1.5x)")
        row("  (the same reads of a raw file: the floor under qcow2)", rawr,
            None if qrawr in (None, float("inf")) else qrawr, total)
        if have_qemu:
            fresh(total)
            qio = _qemu_io_secs(qemu_img, f"write -P 0xab 0 {total >> 20}M")
            if qio:
                rows.append(f"{'  (qemu-io write -P 0xab 0 ' + str(total >> 20) + 'M, one request)':<56} "
                            f"{'':>14} {total / qio / mib:9.1f} MiB/s")

        # 4 KiB at QD32, one per cluster over 1 GiB: allocating, then overwriting; then random offsets.
        size = 1 << 30
        fresh(size)
        blk = blk_new_open(ours_img, None, {"driver": "qcow2"}, BDRV_O_RDWR)
        spread = [i * 65536 for i in range(count4k)]
        a = _qcow2_qd_run(blk, spread, 4096, 32, True)
        blk_flush(blk)
        o = _qcow2_qd_run(blk, spread, 4096, 32, True)
        blk_flush(blk)
        rng = random.Random(1)
        rand = [rng.randrange(0, count4k * 16) * 4096 for _ in range(count4k)]
        rr = _qcow2_qd_run(blk, rand, 4096, 32, True)
        blk_unref(blk)
        args = ["-w", "-f", "qcow2", "-s", "4k", "-S", "64k", "-c", str(count4k), "-d", "32", qemu_img]
        qa = _qemu_img_bench_secs(args)
        qo = _qemu_img_bench_secs(args)
        iops_row(f"4 KiB writes, QD32, {count4k} clusters of 1 GiB, allocating", count4k, a, qa)
        iops_row("4 KiB writes, QD32, the same clusters again (overwrite)", count4k, o, qo)
        iops_row("4 KiB writes, QD32, random offsets, allocated image", count4k, rr, None)
        rows.append("(QEMU: qemu-img bench's own 'Run completed' time, so start-up is not counted; "
                    "qblock: the same requests in this process)")
    return rows


SUITES["qcow2"] = bench_qcow2


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
