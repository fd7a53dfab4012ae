"""Reliability: faults injected under qcow2 and under a guest, blkverify against a raw copy.

Each test keeps a model of what must be on disk and checks it after the faults:

* every blkdebug event on qcow2's write path, injected once with EIO and with
  ENOSPC: the one request that meets it fails with that errno, every other
  request succeeds, ``qemu-img check`` finds no corruption (leaks are
  allowed, as in QEMU), and everything written by a successful request reads
  back;
* a guest on virtio-blk with ``werror=stop,rerror=stop`` runs thousands of
  random requests over qcow2 while random faults hit qcow2's file: the VM
  stops, is resumed, the kept requests are retried; every request completes
  once, OK, and every byte reads back as written;
* blkverify holds qcow2 with a backing file, under a throttle filter, against
  a raw copy, for random unaligned reads and writes: no mismatch.

``QBLOCK_LONG=1`` runs the long versions (more requests, more examples).
"""
from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qblock.block.block_backend import (
    blk_aio_preadv,
    blk_aio_pwritev,
    blk_bs,
    blk_flush,
    blk_new_open,
    blk_pdiscard,
    blk_pread,
    blk_pwrite,
    blk_pwrite_zeroes,
    blk_truncate,
    blk_unref,
)
from qblock.block.driver import (
    BDRV_O_RDWR,
    BDRV_O_RESIZE,
    BDRV_O_UNMAP,
    BDRV_REQ_WRITE_COMPRESSED,
)
from qblock.block.throttle_groups import user_creatable_del, user_creatable_process_cmdline
from qblock.util.aio import aio_poll, qemu_get_aio_context
from qblock.util.iov import QEMU_IOVEC_INIT_BUF

from .qcow2_util import check_image, create, open_blk

MiB = 1 << 20
LONG = os.environ.get("QBLOCK_LONG") == "1"
HAVE_QEMU_IMG = shutil.which("qemu-img") is not None


def qemu_img_check_ok(path) -> str:
    """Assert ``qemu-img check`` finds no corruption (leaks allowed); return its output."""
    if not HAVE_QEMU_IMG:
        corruptions, _leaks, errors = check_image(path)
        assert (corruptions, errors) == (0, 0)
        return ""
    r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode in (0, 3), r.stdout + r.stderr          # 3: leaked clusters only
    assert "ERROR" not in r.stdout, r.stdout
    return r.stdout


class Model:
    """What the image must contain: bytes we know, and ranges a failed request left unknown."""

    def __init__(self, size: int):
        self.data = bytearray(size)
        self.known = bytearray(b"\x01") * size

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset:offset + len(data)] = data
        self.known[offset:offset + len(data)] = b"\x01" * len(data)

    def forget(self, offset: int, nbytes: int) -> None:
        self.known[offset:offset + nbytes] = bytes(nbytes)

    def grow(self, size: int) -> None:
        if size > len(self.data):
            extra = size - len(self.data)
            self.data.extend(bytes(extra))
            self.known.extend(b"\x01" * extra)

    def check(self, blk, ranges) -> None:
        """Read back every known byte of ``ranges``.  Unknown runs are not read at all: after a
        failed compressed write, for example, QEMU's L2 entry already points at the unwritten
        compressed cluster, and reading it fails with -EIO — in QEMU too."""
        for offset, nbytes in ranges:
            pos, end = offset, offset + nbytes
            while pos < end:
                if not self.known[pos]:
                    pos += 1
                    continue
                run = pos
                while run < end and self.known[run]:
                    run += 1
                got = bytearray(run - pos)
                assert blk_pread(blk, pos, got) == run - pos
                if got != self.data[pos:run]:
                    bad = next(i for i in range(run - pos) if got[i] != self.data[pos + i])
                    raise AssertionError(f"byte {pos + bad:#x} reads {got[bad]:#x}, "
                                         f"expected {self.data[pos + bad]:#x}")
                pos = run


# --------------------------------------------------------------------------
# Every write-path event of qcow2, failed once


def _pattern(seed: int, n: int) -> bytes:
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(n))


# (name, offset, bytes) — the regions the workload touches, for the final comparison
SMALL_WORKLOAD = [
    ("write", 0, _pattern(1, 4096)),            # allocating: L2 table, refblock, data
    ("write", 1000, _pattern(2, 200000)),       # across many clusters, COW at both ends
    ("flush",),
    ("write", 300, _pattern(3, 100)),           # overwrite inside an allocated cluster
    ("zero", 5120, 2048),                       # zero clusters
    ("write", 20 * MiB, _pattern(4, 1000)),     # a new L2 table far away
    ("discard", 1024, 4096),                    # frees clusters (discard=unmap)
    ("compressed", 40 * MiB, _pattern(5, 512)),
    ("truncate", 128 * MiB),                    # grows the L1 table
    ("write", 100 * MiB, _pattern(6, 1000)),
    ("flush",),
]
# A 2.5 MiB write with 512-byte clusters and 64-bit refcounts outgrows the refcount table.
BIG_WORKLOAD = [("write", 0, _pattern(7, 4096)), ("flush",), ("write", 30 * MiB, _pattern(8, 2560 * 1024)),
                ("flush",)]

# (pwritev_zero is not here: QEMU raises it when handle_alloc_space zeroes a new cluster on the file
# instead of writing COW zeroes; qblock's qcow2 does not take that shortcut.)
SMALL_EVENTS = ["pwritev", "pwritev_done", "write_aio", "cow_read", "cow_write",
                "l1_update", "l2_update", "l2_alloc_write", "cluster_alloc", "cluster_alloc_bytes",
                "cluster_free", "refblock_load", "refblock_update_part", "refblock_alloc",
                "refblock_alloc_write", "refblock_alloc_hookup", "write_compressed", "l2_update_compressed",
                "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table", "flush_to_os",
                "flush_to_disk"]
# qcow2 treats both errnos alike; these few get ENOSPC in the short run too.
ENOSPC_SHORT = {"write_aio", "l2_update", "refblock_update_part", "cluster_alloc", "cow_write", "flush_to_os"}
BIG_EVENTS = ["reftable_grow", "refblock_alloc_write_blocks", "refblock_alloc_write_table",
              "refblock_alloc_switch_table"]


def _run(blk, model: Model, workload, err: int) -> list[int]:
    rets = []
    for op in workload:
        kind = op[0]
        if kind != "flush" and kind != "truncate" and op[1] >= len(model.data):
            continue            # past the end: the truncate before it failed
        if kind == "write" or kind == "compressed":
            _, off, data = op
            flags = BDRV_REQ_WRITE_COMPRESSED if kind == "compressed" else 0
            ret = blk_pwrite(blk, off, data, flags=flags)
            (model.write if ret == len(data) else lambda o, d: model.forget(o, len(d)))(off, data)
        elif kind == "zero":
            _, off, n = op
            ret = blk_pwrite_zeroes(blk, off, n, 0)
            (model.write(off, bytes(n)) if ret == 0 else model.forget(off, n))
        elif kind == "discard":
            _, off, n = op
            ret = blk_pdiscard(blk, off, n)
            model.forget(off, n)              # discarded data reads back as anything
        elif kind == "truncate":
            ret = blk_truncate(blk, op[1])
            if ret == 0:
                model.grow(op[1])
        else:
            ret = blk_flush(blk)
        rets.append(ret)
    return rets


def _ranges(workload):
    out = []
    for op in workload:
        if op[0] in ("write", "compressed"):
            out.append((op[1], len(op[2])))
        elif op[0] in ("zero", "discard"):
            out.append((op[1], op[2]))
    return out


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
@pytest.mark.parametrize("event", SMALL_EVENTS + BIG_EVENTS)
def test_every_qcow2_write_path_event_failed_once(tmp_path, event, err):
    if err == errno.ENOSPC and event not in ENOSPC_SHORT and not LONG:
        pytest.skip("ENOSPC runs on a few events only, every event with QBLOCK_LONG=1")
    big = event in BIG_EVENTS
    workload = BIG_WORKLOAD if big else SMALL_WORKLOAD
    p = create(tmp_path / "r.qcow2", 64 * MiB, cluster_size=512, refcount_bits=64)
    model = Model(64 * MiB)
    # Data written and flushed before any fault: it must survive whatever happens next.
    blk = open_blk(p, **{"file.cache.no-flush": "on"})
    for off in (0, 6 * MiB, 20 * MiB + 4096):
        blk_pwrite(blk, off, _pattern(9, 8192))
        model.write(off, _pattern(9, 8192))
    assert blk_flush(blk) == 0
    blk_unref(blk)

    blk = open_blk(None, BDRV_O_RDWR | BDRV_O_UNMAP | BDRV_O_RESIZE, discard="unmap",
                   **{"file.driver": "blkdebug", "file.image.driver": "file", "file.image.filename": p,
                      "file.image.cache.no-flush": "on",       # fdatasync is not what is tested here
                      "file.inject-error.0.event": event, "file.inject-error.0.errno": str(err),
                      "file.inject-error.0.once": "on"})
    dbg = blk_bs(blk).file.bs
    rets = _run(blk, model, workload, err)
    # At most one request fails, with the injected errno.  None fails when the error met an I/O
    # whose failure qcow2 ignores (a discard passed down to the file), or nothing yet: then the
    # flush below meets it.
    failed = [r for r in rets if r < 0]
    assert failed in ([], [-err]), (event, rets)
    assert blk_flush(blk) in (0, -err)
    assert blk_flush(blk) == 0
    assert all(not rules for rules in dbg.opaque.rules.values()), f"the workload never raised {event}"
    blk_unref(blk)

    qemu_img_check_ok(p)
    blk = open_blk(p, 0)
    ranges = _ranges(workload) + [(0, 8192), (6 * MiB, 8192), (20 * MiB + 4096, 8192)]
    model.check(blk, [(o, n) for o, n in ranges if o < len(model.data)])
    blk_unref(blk)


# --------------------------------------------------------------------------
# blkverify: qcow2 with a backing file, throttled, against a raw copy


_op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 4 * MiB - 1), st.integers(1, 70000), st.integers(0, 255)),
    st.tuples(st.just("read"), st.integers(0, 4 * MiB - 1), st.integers(1, 70000), st.just(0)),
    st.tuples(st.just("zero"), st.integers(0, 4 * MiB - 1), st.integers(1, 70000), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
)


@pytest.fixture(scope="module")
def verify_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("blkverify")
    base = d / "base.raw"
    base.write_bytes(bytes(random.Random(5).randrange(256) for _ in range(4096)) * (4 * MiB // 4096))
    return d, base


@settings(max_examples=200 if LONG else 25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                                    HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(_op, min_size=1, max_size=6), min_size=1, max_size=6))
def test_blkverify_holds_qcow2_with_backing_under_throttling(verify_images, batches):
    """Random unaligned requests, a few in flight at once, give the same bytes as a raw copy."""
    d, base = verify_images
    top, raw = d / "top.qcow2", d / "raw.img"
    for f in (top, raw):
        if f.exists():
            f.unlink()
    create(top, 4 * MiB, cluster_size=65536, backing_file=str(base), backing_fmt="raw")
    shutil.copyfile(base, raw)
    user_creatable_process_cmdline("throttle-group,id=tgv,x-bps-total=67108864,x-iops-total=2000")
    o = {"driver": "blkverify",
         "raw": {"driver": "raw", "file.driver": "file", "file.filename": str(raw)},
         "test": {"driver": "throttle", "throttle-group": "tgv",
                  "file": {"driver": "qcow2", "file.driver": "file", "file.filename": str(top)}}}
    blk = blk_new_open(None, None, o, BDRV_O_RDWR)
    s = blk_bs(blk).opaque
    ctx = qemu_get_aio_context()
    try:
        for batch in batches:
            # The requests of one batch run concurrently; they must not overlap each other, or the
            # two children could legitimately order them differently.
            taken, results, expected = [], [], 0
            for kind, off, n, byte in batch:
                n = min(n, 4 * MiB - off)
                if kind == "flush":
                    assert blk_flush(blk) == 0
                    continue
                if any(off < e and s0 < off + n for s0, e in taken):
                    continue
                taken.append((off, off + n))
                if kind == "read":
                    blk_aio_preadv(blk, off, QEMU_IOVEC_INIT_BUF(bytearray(n)), 0,
                                   lambda o, r: results.append(r), None)
                elif kind == "write":
                    blk_aio_pwritev(blk, off, QEMU_IOVEC_INIT_BUF(bytearray([byte]) * n), 0,
                                    lambda o, r: results.append(r), None)
                else:
                    results.append(blk_pwrite_zeroes(blk, off, n, 0))
                expected += 1
            while len(results) < expected:
                aio_poll(ctx, True)
            assert results == [0] * expected
        assert s.mismatches == []
        # Read everything once more through blkverify: every byte compared.
        for off in range(0, 4 * MiB, MiB):
            assert blk_pread(blk, off, bytearray(MiB)) == MiB
        assert s.mismatches == []
    finally:
        blk_unref(blk)
        user_creatable_del("tgv")
    qemu_img_check_ok(top)


# --------------------------------------------------------------------------
# A guest on virtio-blk, werror=stop and rerror=stop, random faults under qcow2


def _guest_rig(path, fault_state_holder):
    """qcow2 on test-fault on file, a BlockBackend, virtio-blk (werror/rerror=stop) and its guest."""
    import qblock.hw.virtio_blk  # noqa: F401 - registers virtio-blk-device
    import qblock.testing.faultdrv  # noqa: F401 - registers test-fault
    from qblock.hw.guest import VirtioBlkGuest
    from qblock.hw.memory import AddressSpace
    from qblock.qom.object import qdev_device_add

    blk = blk_new_open(None, None, {"driver": "qcow2",
                                    "file": {"driver": "test-fault", "node-name": "faults",
                                             "file": {"driver": "file", "filename": str(path),
                                                      "cache.no-flush": "on"}}}, BDRV_O_RDWR)
    fault_state_holder.append(blk_bs(blk).file.bs.opaque)
    dev = qdev_device_add({"driver": "virtio-blk-device", "drive": blk, "memory": AddressSpace(32 << 20),
                           "ioeventfd": False, "werror": "stop", "rerror": "stop"})
    return blk, dev, VirtioBlkGuest(dev)


def test_guest_with_werror_stop_survives_random_faults_under_qcow2(tmp_path):
    """Thousands of guest requests while random faults hit qcow2's file: the VM stops, resumes, and
    every request completes exactly once, OK; every byte the guest wrote reads back; no corruption."""
    from qblock.hw.virtio_blk import VIRTIO_BLK_S_OK
    from qblock.qom.object import object_unparent
    from qblock.util import runstate
    from qblock.util.runstate import runstate_is_running, vm_start

    size = 8 * MiB
    sector_bytes, slot = 512, 16 * 1024
    nslots = size // slot
    total = 20000 if LONG else 2000
    rng = random.Random(1234)
    p = create(tmp_path / "g.qcow2", size, cluster_size=4096)
    holder: list = []
    blk, dev, g = _guest_rig(p, holder)
    faults = holder[0]
    model = bytearray(size)
    stops = issued = 0
    try:
        faults.fail_fn = lambda op, off, n: (rng.choice((errno.EIO, errno.ENOSPC)) if rng.random() < 0.03 else 0)
        while issued < total:
            # One batch: writes and reads of distinct slots (so their order inside the batch does not
            # matter), now and then a flush.
            batch, slots = [], rng.sample(range(nslots), 24)
            for s in slots:
                off = s * slot + rng.randrange(0, slot // sector_bytes) * sector_bytes
                n = rng.randrange(1, (s + 1) * slot // sector_bytes - off // sector_bytes + 1) * sector_bytes
                n = min(n, 8 * 1024)
                if rng.random() < 0.6:
                    data = rng.randbytes(n)
                    batch.append(("w", off, data, g.queue_write(off // sector_bytes, data)))
                else:
                    batch.append(("r", off, bytes(model[off:off + n]), g.queue_read(off // sector_bytes, n)))
            if rng.random() < 0.3:
                batch.append(("f", 0, b"", g.queue_flush()))
            issued += len(batch)
            g.kick()
            rounds = 0
            while g.inflight():
                g.poll_until(lambda: g.inflight() == 0 or not runstate_is_running())
                if not runstate_is_running():
                    stops += 1
                    vm_start()              # "cont": the kept requests are submitted again
                rounds += 1
                assert rounds < 1000, "the batch never finished"
            for kind, off, data, req in batch:
                assert req.done and req.status == VIRTIO_BLK_S_OK, (kind, off, req)
                if kind == "w":
                    model[off:off + len(data)] = data
                elif kind == "r":
                    assert req.data == data, f"read at {off:#x} returned stale or wrong data"
        assert g.unexpected == [] and len(g.used_log) == issued
        assert faults.injected > 0 and stops > 0
        faults.fail_fn = None
        # Everything the guest wrote, read back through the guest.
        for off in range(0, size, 64 * 1024):
            assert g.read(off // sector_bytes, 64 * 1024).data == bytes(model[off:off + 64 * 1024])
    finally:
        faults.fail_fn = None
        g.shutdown()
        object_unparent(dev)
        blk_unref(blk)
        runstate._reset_for_tests()
    qemu_img_check_ok(p)
    blk = open_blk(p, 0)
    assert blk_pread(blk, 0, got := bytearray(size)) == size and got == model
    blk_unref(blk)
    print(f"{issued} requests, {faults.injected} faults injected, {stops} stops")


# --------------------------------------------------------------------------
# Suspended requests: qemu-iotests 077 (concurrent RMW requests) through qblock-io and qemu-io


def _iotest_077_script(img: str) -> str:
    """The command stream of qemu-iotests 077, for an image at ``img``."""
    out = [f"open -o driver=raw,file.align=4k blkdebug::{img}", "aio_write -P 10 0x200 0x200", "aio_flush"]
    off = 0x1000
    for ev in ("head", "after_head"):
        out += [f"break pwritev_rmw_{ev} A", f"aio_write -P 10 {off + 0x200:#x} 0x200", "wait_break A",
                f"aio_write -P 11 {off + 0x400:#x} 0x200", "sleep 100", "resume A", "aio_flush"]
        off += 0x1000
    out += ["break pwritev_rmw_after_tail A", "aio_write -P 10 0x5000 0x200", "wait_break A"]
    out += [f"aio_write -P {11 + i} {0x5200 + i * 0x200:#x} 0x200" for i in range(7)]
    out += ["sleep 100", "resume A", "aio_flush"]
    for base, first in ((0x6000, "A"), (0x8000, "B")):
        out += ["break pwritev_rmw_after_tail A", f"aio_write -P 10 {base:#x} 0x200", "wait_break A",
                "break pwritev_rmw_after_head B", f"aio_write -P 10 {base + 0x1e00:#x} 0x200", "wait_break B",
                f"aio_write -P 11 {base + 0x800:#x} 0x1000", f"resume {first}", "sleep 100",
                f"resume {'B' if first == 'A' else 'A'}", "aio_flush"]
    for base, first in ((0xa000, "A"), (0xc000, "B")):
        out += ["break pwritev_rmw_after_tail A", f"aio_write -P 10 {base:#x} 0x200", "wait_break A",
                f"aio_write -P 11 {base + 0x800:#x} 0x1000",
                "break pwritev_rmw_after_head B", f"aio_write -P 10 {base + 0x1e00:#x} 0x200", "wait_break B",
                f"resume {first}", "sleep 100", f"resume {'B' if first == 'A' else 'A'}", "aio_flush"]
    out += ["break pwritev_rmw_after_tail A", "aio_write -P 10 0xe000 0x1800", "wait_break A",
            "aio_write -P 11 0xf000 0xc00", "sleep 100", "resume A", "aio_flush"]
    out += ["break pwritev A", "aio_write -P 10 0x10000 0x800", "wait_break A",
            "break pwritev_rmw_after_tail B", "aio_write -P 11 0x10000 0x400", "break pwritev_done C",
            "resume A", "wait_break C", "resume C", "sleep 100", "wait_break B", "resume B", "aio_flush"]
    out += ["break pwritev A", "aio_write -P 10 0x11000 0x800", "wait_break A",
            "aio_write -P 11 0x11000 0x1000", "sleep 100", "resume A", "aio_flush"]
    return "\n".join(out) + "\n"


# 077's "Verify image content": (pattern, offset, length)
IOTEST_077_CONTENT = [
    (0, 0, 0x200), (10, 0x200, 0x200), (0, 0x400, 0xc00),
    (0, 0x1000, 0x200), (10, 0x1200, 0x200), (11, 0x1400, 0x200), (0, 0x1600, 0xa00),
    (0, 0x2000, 0x200), (10, 0x2200, 0x200), (11, 0x2400, 0x200), (0, 0x2600, 0xa00),
    *[(10 + i, 0x5000 + i * 0x200, 0x200) for i in range(8)],
    *[(p, base + o, n) for base in (0x6000, 0x8000, 0xa000, 0xc000)
      for p, o, n in ((10, 0, 0x200), (0, 0x200, 0x600), (11, 0x800, 0x1000), (0, 0x1800, 0x600),
                      (10, 0x1e00, 0x200))],
    (10, 0xe000, 0x1000), (11, 0xf800, 0x400), (0, 0xfc00, 0x400),
    (11, 0x10000, 0x400), (10, 0x10400, 0x400),
    (11, 0x11800, 0x800),
]


def _filter_077(text: str) -> list[str]:
    """077's filter: drop timings, byte counts and the suspend/resume lines; keep what happened."""
    import re
    out = []
    for line in text.replace("qemu-io> ", "").splitlines():
        if "Suspended" in line or "blkdebug: Resuming request" in line or re.search(r"ops; .*sec", line):
            continue
        out.append(re.sub(r"[0-9/]* bytes at offset [0-9]*", "XXX/XXX bytes at offset XXX", line))
    return out


def test_iotest_077_concurrent_rmw_requests(tmp_path):
    """Suspended RMW requests with others overlapping them: serialising waits, and the image ends up
    as 077 expects; qblock-io prints what qemu-io prints for the same commands."""
    import sys
    ours = tmp_path / "ours.raw"
    ours.write_bytes(bytes(128 * 1024))
    r = subprocess.run([sys.executable, "-m", "qblock.tools.qemu_io"], input=_iotest_077_script(str(ours)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    data = ours.read_bytes()
    for pattern, off, n in IOTEST_077_CONTENT:
        assert data[off:off + n] == bytes([pattern]) * n, f"pattern {pattern} expected at {off:#x}+{n:#x}"
    if shutil.which("qemu-io"):
        theirs = tmp_path / "theirs.raw"
        theirs.write_bytes(bytes(128 * 1024))
        q = subprocess.run(["qemu-io"], input=_iotest_077_script(str(theirs)), capture_output=True, text=True,
                           timeout=120)
        assert q.returncode == 0, q.stderr
        assert theirs.read_bytes() == data
        assert _filter_077(r.stdout) == _filter_077(q.stdout)


def test_drain_waits_for_a_suspended_request():
    """blk_drain does not return while a request sits at a breakpoint; it returns once it is resumed."""
    from qblock.util.timer import QEMU_CLOCK_VIRTUAL, SCALE_NS, qemu_clock_get_ns, timer_mod_ns
    from qblock.util.aio import aio_timer_new
    from qblock.block.block_backend import blk_drain
    from qblock.testing.memdrv import memdrv_options

    blk = blk_new_open(None, None, {"driver": "blkdebug", "image": memdrv_options("co", size=MiB)}, BDRV_O_RDWR)
    dbg = blk_bs(blk)
    assert dbg.drv.bdrv_debug_breakpoint(dbg, "pwritev", "A") == 0
    done = []
    blk_aio_pwritev(blk, 0, QEMU_IOVEC_INIT_BUF(bytearray(b"x" * 512)), 0, lambda o, r: done.append(r), None)
    assert dbg.drv.bdrv_debug_is_suspended(dbg, "A")
    resumed_at = []
    ctx = qemu_get_aio_context()

    def resume(_):
        resumed_at.append(qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL))
        dbg.drv.bdrv_debug_resume(dbg, "A")

    t0 = qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL)
    timer_mod_ns(aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, resume), t0 + 5_000_000)
    blk_drain(blk)
    assert resumed_at == [t0 + 5_000_000] and done == [0]
    assert dbg.file.bs.opaque.data[:512] == b"x" * 512
    blk_unref(blk)
