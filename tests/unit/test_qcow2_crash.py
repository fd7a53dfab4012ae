"""Crash consistency of qcow2: a writer killed with SIGKILL at random moments loses no flushed write.

A writer process (qcow2_crash_child.py, a fork server that imports qblock once and forks one child per
round) writes random data to a qcow2 image on a real file — allocating writes, overwrites, zero writes
with and without unmap, discards, flushes in between, up to four requests in flight — and reports each
request submitted and acknowledged and each flush submitted and completed.  The test kills it with SIGKILL
at a random point and then checks:

* ``qemu-img check`` finds no corruption and no check error (leaked clusters are allowed: an allocation
  killed before its L2 entry was written leaks its cluster, as in QEMU).  For lazy-refcounts images, which a
  crash leaves dirty by design, the check runs after qblock's writable open repaired the image;
* the image opens in qblock, and every byte of the disk holds an allowed value:

  - let F be the last flush that completed before the kill, and *stable* the requests acknowledged before F
    was submitted; *unstable* are all other requests submitted (in flight at the kill, acknowledged after
    F was submitted, failed, or never acknowledged);
  - the stable content is the content the round started from with the stable requests applied in the
    order they were acknowledged (requests in flight never overlap, so this order is the only one);
  - a byte may hold its stable value, or the value any unstable request covering it would have put there
    (its data for a write, zero for a zero write or a discard).  A discard is advisory even when flushed:
    bytes it covered (and no later stable request did) may read as before or as zero.  Bytes are
    independent: a write killed half-way may leave part of its range old and part new;
  - a byte outside every allowed value under a stable request is a *lost flushed write*; anywhere else it
    is *unexplained data*.  Both must be zero.

The content read back becomes the start of the next round on the same image (so rounds also run on images
that crashed before, leaks included); every few rounds the image starts afresh with another layout: v3 with
64 KiB clusters, v3 with 512-byte clusters (many refcount blocks, a growing refcount table), v3 with 4 KiB
clusters over a backing file shorter than the disk, v2 over a backing file, and lazy refcounts.

Short mode: 240 kill points on two writers in parallel (this 2-core machine: about 25 s).  QBLOCK_LONG=1:
2000.  The figures are printed (``-s`` shows them).
"""
from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import threading
import time

import attrs
import pytest

from .qcow2_crash_child import pattern
from .qcow2_util import fast_tmp  # noqa: F401 - a fixture

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="needs qemu-img and qemu-io (Debian's qemu-utils; .ci/run installs them)")

LONG = os.environ.get("QBLOCK_LONG") == "1"
KILL_POINTS = 2000 if LONG else 240
WRITERS = 2
SIZE = 4 << 20
ROUNDS_PER_IMAGE = 12
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qcow2_crash_child.py")
MiB = 1 << 20

BACKING_MODEL = b"\x5c" * (2 * MiB) + b"\xc5" * MiB      # the backing file: 3 MiB, shorter than the disk
KINDS = {
    # name: (qemu-img create -o, backing, discards allowed, cluster size)
    "v3-64k": ("cluster_size=64k", False, True, 65536),
    "v3-512": ("cluster_size=512", False, True, 512),
    "v3-4k-backing": ("cluster_size=4k", True, True, 4096),
    "v2-backing": ("compat=0.10", True, False, 65536),     # v2 cannot discard over a backing file
    "lazy-refcounts": ("lazy_refcounts=on", False, True, 65536),
}


@attrs.define
class Stats:
    kill_points: int = 0
    rounds: int = 0
    requests: int = 0
    flushes: int = 0
    corruptions: int = 0
    check_errors: int = 0
    leaks_seen: int = 0
    lost_flushed_bytes: int = 0
    unexplained_bytes: int = 0
    failures: list = attrs.field(factory=list)


class Lines:
    """Lines from a pipe with a deadline (a hung writer fails the test instead of hanging it)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def readline(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise TimeoutError("the writer said nothing for too long")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise EOFError("the writer exited")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


def _nonzero_bytes(x: int, ones: int) -> int:
    """One bit (the lowest of each byte) set for every nonzero byte of the big integer ``x``."""
    x |= x >> 4
    x |= x >> 2
    x |= x >> 1
    return x & ones


def request_value(kind: str, op_id: int, off: int, n: int) -> bytes:
    return pattern(op_id, off, n) if kind == "w" else bytes(n)


def verify(actual: bytes, base: bytes, events: list[str], stats: Stats) -> str | None:
    """Check ``actual`` (the disk after the kill) against the round's events; None, or what is wrong."""
    reqs: dict[int, tuple[str, int, int]] = {}
    acked: list[tuple[int, int]] = []                # (id, ret) in acknowledgement order
    flush_begin: dict[int, int] = {}                 # flush id -> number of acks before it was submitted
    stable_acks = 0
    for ev in events:
        f = ev.split()
        if f[0] == "S":
            reqs[int(f[1])] = (f[2], int(f[3]), int(f[4]))
        elif f[0] == "A":
            acked.append((int(f[1]), int(f[2])))
        elif f[0] == "B":
            flush_begin[int(f[1])] = len(acked)
        elif f[0] == "F" and int(f[2]) == 0:
            stable_acks = flush_begin[int(f[1])]
    stats.requests += len(reqs)
    stats.flushes += len(flush_begin)
    stable = [i for i, ret in acked[:stable_acks] if ret == 0]
    stable_set = set(stable)
    unstable = [i for i in reqs if i not in stable_set]
    model = bytearray(base)
    maybe_zero: list[tuple[int, int]] = []       # ranges a stable discard may have zeroed (or not)
    for i in stable:
        kind, off, n = reqs[i]
        maybe_zero = [(lo, hi) for a, b in maybe_zero for lo, hi in ((a, min(b, off)), (max(a, off + n), b))
                      if lo < hi]
        if kind == "d":
            maybe_zero.append((off, off + n))
        else:
            model[off:off + n] = request_value(kind, i, off, n)
    if actual == model:
        return None
    # Candidates for a byte besides its stable value: what an unstable request would have put there,
    # and zero where a stable discard reached.
    candidates = [(reqs[i][0], i, reqs[i][1], reqs[i][2]) for i in unstable]
    candidates += [("z", 0, lo, hi - lo) for lo, hi in maybe_zero]
    lost = unexplained = 0
    for c in range(0, len(actual), 65536):
        a, m = actual[c:c + 65536], model[c:c + 65536]
        if a == m:
            continue
        chunk = len(a)
        ones = int.from_bytes(b"\x01" * chunk, "big")
        ai = int.from_bytes(a, "big")
        bad = _nonzero_bytes(ai ^ int.from_bytes(m, "big"), ones)
        for kind, i, off, n in candidates:
            lo, hi = max(off, c), min(off + n, c + chunk)
            if lo >= hi:
                continue
            val = bytearray(chunk)
            val[lo - c:hi - c] = request_value(kind, i, lo, hi - lo)
            cover = bytearray(chunk)
            cover[lo - c:hi - c] = b"\x01" * (hi - lo)
            differs = _nonzero_bytes(ai ^ int.from_bytes(val, "big"), ones)
            bad &= differs | (ones & ~int.from_bytes(cover, "big"))
        if not bad:
            continue
        under_stable = 0
        for i in stable:
            _, off, n = reqs[i]
            lo, hi = max(off, c), min(off + n, c + chunk)
            if lo < hi:
                cover = bytearray(chunk)
                cover[lo - c:hi - c] = b"\x01" * (hi - lo)
                under_stable |= bad & int.from_bytes(cover, "big")
        lost += bin(under_stable).count("1")
        unexplained += bin(bad & ~under_stable).count("1")
    stats.lost_flushed_bytes += lost
    stats.unexplained_bytes += unexplained
    if lost or unexplained:
        return f"{lost} bytes of flushed writes lost, {unexplained} bytes unexplained"
    return None


def qemu_check(path, force_share: bool = False) -> dict:
    """qemu-img check's JSON report; ``force_share`` (-U) while the writer still holds the image open."""
    r = subprocess.run(["qemu-img", "check", *(["-U"] if force_share else []), "--output=json", str(path)],
                       capture_output=True, text=True)
    if not r.stdout.strip():
        return {"check-errors": 1, "error": r.stderr}
    d = json.loads(r.stdout)
    if r.returncode not in (0, 3):
        d["error"] = r.stderr
    return d


def make_image(d, kind: str, backing) -> str:
    opts, with_backing, _, _ = KINDS[kind]
    path = os.path.join(d, f"{kind}.qcow2")
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
    if with_backing:
        args += ["-b", str(backing), "-F", "qcow2"]
    subprocess.run(args + [path, str(SIZE)], check=True)
    return path


def writer(wid: int, d: str, backing: str, kill_points: int, seed: int, stats: Stats, lock: threading.Lock) -> None:
    """One fork server and its rounds; everything found goes into ``stats``."""
    rng = random.Random(seed)
    wd = os.path.join(d, f"w{wid}")
    os.mkdir(wd)
    log = open(os.path.join(wd, "writer.log"), "w+")      # what the writer writes to stderr (repairs, errors)
    proc = subprocess.Popen([sys.executable, CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                            bufsize=0)
    lines = Lines(proc.stdout.fileno())
    local = Stats()

    def send(line: str) -> None:
        proc.stdin.write((line + "\n").encode())

    def fail(msg: str) -> None:
        local.failures.append(f"writer {wid} round {local.rounds} ({kind}): {msg}")

    try:
        assert lines.readline(60) == "READY"
        kind, path, base, events, next_id = None, None, b"", None, 0
        kills = 0
        while True:
            last = kills >= kill_points
            if kind is None or local.rounds % ROUNDS_PER_IMAGE == 0:
                if kind is not None and not last:
                    pass
                kind = list(KINDS)[(local.rounds // ROUNDS_PER_IMAGE + wid) % len(KINDS)]
                path = make_image(wd, kind, backing)
                base = (BACKING_MODEL + bytes(SIZE - len(BACKING_MODEL))) if KINDS[kind][1] else bytes(SIZE)
                events = []
            elif kind != "lazy-refcounts":
                chk = qemu_check(path)       # as the crash left it
                local.leaks_seen += chk.get("leaks", 0)
                if chk.get("corruptions") or chk.get("check-errors"):
                    local.corruptions += chk.get("corruptions", 0)
                    local.check_errors += chk.get("check-errors", 0)
                    fail(f"qemu-img check after the kill: {chk}")
                    shutil.copy(path, path + f".corrupt{local.rounds}")
            local.rounds += 1
            cfg = {"seed": rng.getrandbits(32), "path": path, "size": SIZE, "cluster_size": KINDS[kind][3],
                   "qd": rng.choice((1, 2, 4)), "p_flush": rng.choice((0.02, 0.1, 0.3)),
                   "discard": KINDS[kind][2], "first_id": next_id}
            keep = os.environ.get("QBLOCK_CRASH_KEEP")
            if keep:
                shutil.copy(path, path + ".crashed")
            send("ROUND " + json.dumps(cfg))
            pid = None
            line = lines.readline()
            while not line.startswith("R"):
                if line.startswith("PID "):
                    pid = int(line.split()[1])
                else:
                    fail(f"the writer could not reopen the image: {line}")
                    raise RuntimeError(line)
                line = lines.readline()
            with open(path + ".read", "rb") as f:
                actual = f.read()
            why = verify(actual, base, events, local)
            if why:
                fail(why)
                if keep:
                    stem = os.path.join(keep, f"w{wid}-r{local.rounds}-{kind}")
                    shutil.copy(path + ".crashed", stem + ".qcow2")
                    with open(stem + ".base", "wb") as f:
                        f.write(base)
                    with open(stem + ".events", "w") as f:
                        f.write("\n".join(events) + "\n")
            base = actual
            if kind == "lazy-refcounts":
                chk = qemu_check(path, force_share=True)  # after qblock's writable open (still held) repaired it
                local.leaks_seen += chk.get("leaks", 0)
                if chk.get("corruptions") or chk.get("check-errors"):
                    local.corruptions += chk.get("corruptions", 0)
                    local.check_errors += chk.get("check-errors", 0)
                    fail(f"qemu-img check after the repair: {chk}")
            if last:
                send("X")
                assert lines.readline().startswith("DONE")
                break
            send("C")
            if lines.readline() != "G":
                raise RuntimeError("the writer did not start")
            events = []
            want = rng.choice((0, 1, 2, 5, 10, 20, 40, 80))
            while len(events) < want:
                ev = lines.readline()
                if ev.startswith(("DONE", "E")):
                    fail(f"the writer stopped by itself: {ev}")
                    raise RuntimeError(ev)
                events.append(ev)
            time.sleep(rng.choice((0, 0, 0.0002, 0.001, 0.003)))
            os.kill(pid, signal.SIGKILL)
            kills += 1
            local.kill_points += 1
            while True:
                ev = lines.readline()
                if ev.startswith("DONE"):
                    break
                if ev.startswith("E"):
                    fail(f"the writer failed: {ev}")
                events.append(ev)
            next_id = max([next_id] + [int(e.split()[1]) for e in events if e.startswith("S")])
    except Exception as e:      # noqa: BLE001 - recorded, the test fails on it
        log.seek(0)
        local.failures.append(f"writer {wid}: {type(e).__name__}: {e} (exit status {proc.poll()}); its stderr "
                              "ends with:\n"
                              + "".join(log.readlines()[-15:]))
    finally:
        try:
            send("QUIT")
        except OSError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        with lock:
            for a in attrs.fields(Stats):
                if a.name == "failures":
                    stats.failures += local.failures
                else:
                    setattr(stats, a.name, getattr(stats, a.name) + getattr(local, a.name))


def test_killed_writer_loses_no_flushed_write_and_corrupts_nothing(fast_tmp):
    """SIGKILL at random points: qemu-img check finds no corruption and every flushed write reads back."""
    d = fast_tmp
    backing = os.path.join(d, "backing.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", backing, "3M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5c 0 2M", "-c", "write -P 0xc5 2M 1M", backing], check=True,
                   capture_output=True)
    stats, lock = Stats(), threading.Lock()
    seed = int(os.environ.get("QBLOCK_CRASH_SEED", random.randrange(1 << 30)))
    t0 = time.monotonic()
    threads = [threading.Thread(target=writer, args=(w, d, backing, KILL_POINTS // WRITERS, seed + w, stats, lock))
               for w in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.monotonic() - t0
    print(f"\nqcow2 crash test (seed {seed}): {stats.kill_points} kill points in {secs:.1f} s, {stats.rounds} rounds, "
          f"{stats.requests} requests, {stats.flushes} flushes; corruptions {stats.corruptions}, check errors "
          f"{stats.check_errors}, lost flushed bytes {stats.lost_flushed_bytes}, unexplained bytes "
          f"{stats.unexplained_bytes}, leaked clusters seen {stats.leaks_seen}")
    assert not stats.failures, "\n".join(stats.failures[:20])
    assert stats.kill_points == KILL_POINTS // WRITERS * WRITERS
    assert stats.corruptions == stats.check_errors == stats.lost_flushed_bytes == stats.unexplained_bytes == 0


def test_verify_finds_a_lost_flushed_write():
    """The checker itself: a flushed write that did not reach the disk is reported, an unflushed one is allowed."""
    base = bytes(8192)
    events = ["S 1 w 0 4096", "A 1 0", "B 1", "S 2 w 4096 4096", "F 1 0", "A 2 0"]
    good = bytearray(base)
    good[0:4096] = pattern(1, 0, 4096)
    stats = Stats()
    assert verify(bytes(good), base, events, stats) is None            # write 2 (unflushed) may be missing
    good[4096:6000] = pattern(2, 4096, 1904)
    assert verify(bytes(good), base, events, stats) is None            # or partly there
    lost = bytearray(good)
    lost[100:200] = bytes(100)
    assert verify(bytes(lost), base, events, stats) and stats.lost_flushed_bytes == 100
    junk = bytearray(good)
    junk[5000] ^= 0xFF
    assert verify(bytes(junk), base, events, stats) and stats.unexplained_bytes == 1
