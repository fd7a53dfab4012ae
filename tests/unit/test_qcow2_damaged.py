"""Damaged qcow2 images: QEMU's errors, word for word, and no Python exception, hang or write on a fuzzed one.

A corpus of deliberately damaged images (bytes written into images qemu-img and qemu-io made): each is opened
by qblock and by the real ``qemu-img info``/``qemu-io`` on the same file.  Where QEMU refuses the image at
open, qblock raises its Error with QEMU's message; where QEMU fails a read, qblock's read returns -EIO and
writes the same ``qcow2: Image is corrupt: ...`` line; where QEMU reads data, qblock reads the same data.
The few places where qblock differs on purpose are listed in DIFFERENT with the reason.

Then hypothesis damages a small image at random (header fields, bytes of the L1, L2, refcount and snapshot
tables, the data, the file's length): opening it read-only either works or raises qblock's Error, every
read returns data or a negative errno, no driver hook raises (``bs.last_driver_exception``), nothing takes
longer than a few seconds, and the file is left exactly as it was (bytes and mtime).  Short in CI;
QBLOCK_LONG=1 runs many more examples.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qblock.block.block_backend import blk_bs, blk_getlength, blk_pread, blk_pwrite, blk_unref
from qblock.block.driver import BDRV_O_RDWR
from qblock.block.io import bdrv_block_status
from qblock.util.error import Error

from .qcow2_util import fast_tmp, header, open_blk, peek, poke  # noqa: F401 - fast_tmp is a fixture

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="needs qemu-img and qemu-io (Debian's qemu-utils; .ci/run installs them)")

LONG = os.environ.get("QBLOCK_LONG") == "1"
COPIED = 1 << 63


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True)


def put(fmt: str, offset: int, *values):
    return lambda p: poke(p, offset, struct.pack(fmt, *values))


def both(*damages):
    def apply(p):
        for d in damages:
            d(p)
    return apply


def truncate_to(size: int):
    def apply(p):
        with open(p, "r+b") as f:
            f.truncate(size)
    return apply


# The base image (64 MiB, 64 KiB clusters): header 0, reftable 0x10000, refblock 0x20000, L1 0x30000,
# L2 0x40000, data 0x50000.. (0x11 at 0-256K), a compressed cluster of 0x22 at guest 1 MiB.
OPEN_ERRORS = {
    "bad-magic": put(">I", 0, 0x12345678),
    "version-1": put(">I", 4, 1),
    "version-4": put(">I", 4, 4),
    "cluster-bits-8": put(">I", 20, 8),
    "cluster-bits-22": put(">I", 20, 22),
    "truncated-header": truncate_to(50),
    "header-length-too-small": put(">I", 100, 100),
    "header-length-past-cluster": put(">I", 100, 70000),
    "l1-size-huge": put(">I", 36, 0x10000000),
    "l1-too-small-for-size": put(">I", 36, 0),
    "l1-offset-unaligned": put(">Q", 40, 0x30200),
    "reftable-offset-unaligned": put(">Q", 48, 0x10200),
    "reftable-clusters-zero": put(">I", 56, 0),
    "reftable-clusters-huge": put(">I", 56, 0x1000000),
    "refcount-order-7": put(">I", 96, 7),
    "backing-offset-past-cluster": put(">Q", 8, 0x20000),
    "backing-name-too-long": both(put(">Q", 8, 0x200), put(">I", 16, 2000)),
    "unknown-incompatible-feature": put(">Q", 72, 1 << 20),
    "too-many-snapshots": put(">I", 60, 70000),
    "snapshot-table-unaligned": both(put(">I", 60, 1), put(">Q", 64, 0x10001)),
    "header-extension-too-large": both(put(">I", 112, 0x12345678), put(">I", 116, 0x100000)),
    "encryption-method-3": put(">I", 32, 3),
    "size-huge": put(">Q", 24, 1 << 62),
    # QEMU opens these (and reads zeros): the tables are read past the end of the file.
    "l1-table-past-end": put(">Q", 40, 0x10000000),
    "reftable-past-end": put(">Q", 48, 0x10000000),
}

# Where qblock differs from QEMU 7.2 on purpose: (qblock's Error message, why).
DIFFERENT = {
    "encryption-aes": (put(">I", 32, 1), "Use of AES-CBC encrypted qcow2 images is no longer supported in system "
                       "emulators", "qblock has no crypto layer; QEMU's tools still open AES images"),
    "encryption-luks": (put(">I", 32, 2), "Unsupported encryption method 2", "no crypto layer (no LUKS)"),
}

# Read-time damage: (damage, guest offset read, expect): expect is a pattern byte QEMU and qblock both read,
# or "EIO" (both fail the read), or ("qblock-EIO", why) where only qblock fails it.
READ_CASES = {
    "l1-entry-unaligned": (put(">Q", 0x30000, COPIED | 0x40200), 0, "EIO"),
    "l2-entry-unaligned": (put(">Q", 0x40008, COPIED | 0x60200), 0x10000, "EIO"),
    "l2-entry-past-end": (put(">Q", 0x40008, COPIED | 0x10000000), 0x10000, 0),
    "l2-table-past-end": (put(">Q", 0x30000, COPIED | 0x10000000), 0,
                          ("qblock-EIO", "an L2 table wholly past the end of the file is corruption in qblock "
                                         "(QEMU reads it as an empty table)")),
    "refcount-zero-on-used-cluster": (put(">H", 0x20000 + 2 * 5, 0), 0, 0x11),
    "l2-entry-on-the-l1-table": (put(">Q", 0x40008, COPIED | 0x30000), 0x20000, 0x11),
    "compressed-data-garbage": (lambda p: poke(p, 0x90000, b"\xff" * 64), 1 << 20, "EIO"),
    "compressed-entry-past-end": (put(">Q", 0x40000 + 8 * 16, (1 << 62) | 0x10000000), 1 << 20, "EIO"),
    "zero-flag-in-a-v2-image": (None, 0x10000, "EIO"),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("damaged")
    base = d / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
    r = run("qemu-io", "-c", "write -P 0x11 0 256k", "-c", "write -c -P 0x22 1M 64k", base)
    assert r.returncode == 0, r.stderr
    v2 = d / "v2.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "64M")
    assert run("qemu-io", "-c", "write -P 0x11 0 256k", v2).returncode == 0
    return d


def damaged(images, tmp_path, damage, name="img.qcow2", base="base.qcow2"):
    p = tmp_path / name
    shutil.copy(images / base, p)
    damage(str(p))
    return p


def qemu_open_error(p) -> str | None:
    r = run("qemu-img", "info", "-f", "qcow2", p)
    if r.returncode == 0:
        return None
    m = re.match(r"qemu-img: Could not open '[^']*': (.*)", r.stderr.strip())
    assert m, r.stderr
    return m.group(1)


def corruption_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("qcow2: ")]


def file_state(p) -> tuple[bytes, int]:
    return open(p, "rb").read(), os.stat(p).st_mtime_ns


@pytest.mark.parametrize("case", list(OPEN_ERRORS))
def test_open_fails_with_qemus_message(images, tmp_path, case):
    """qblock refuses the image at open with QEMU's very message, or opens it where QEMU does."""
    p = damaged(images, tmp_path, OPEN_ERRORS[case])
    before = file_state(p)
    expect = qemu_open_error(p)
    if expect is None:
        blk = open_blk(p, 0)
        buf = bytearray(65536)
        assert blk_pread(blk, 0, buf) == 65536
        blk_unref(blk)
    else:
        with pytest.raises(Error) as e:
            open_blk(p, 0)
        assert e.value.msg == expect
    assert file_state(p) == before


@pytest.mark.parametrize("case", list(DIFFERENT))
def test_open_differs_from_qemu_only_where_documented(images, tmp_path, case):
    """Encrypted images: qblock has no crypto layer, so it refuses them (QEMU's tools need a key)."""
    damage, msg, _why = DIFFERENT[case]
    p = damaged(images, tmp_path, damage)
    with pytest.raises(Error) as e:
        open_blk(p, 0)
    assert e.value.msg == msg


@pytest.mark.parametrize("case", list(READ_CASES))
def test_read_of_damaged_metadata_as_qemu(images, tmp_path, capfd, case):
    """A read through damaged metadata fails with -EIO and QEMU's corruption line, or reads QEMU's data."""
    damage, offset, expect = READ_CASES[case]
    if damage is None:      # the v2 case
        p = damaged(images, tmp_path, put(">Q", 0x40008, 1), base="v2.qcow2")
    else:
        p = damaged(images, tmp_path, damage)
    before = file_state(p)
    if isinstance(expect, int):
        q = run("qemu-io", "-r", "-f", "qcow2", "-c", f"read -P {expect:#x} {offset} 64k", p)
    else:
        q = run("qemu-io", "-r", "-f", "qcow2", "-c", f"read {offset} 64k", p)
    capfd.readouterr()
    blk = open_blk(p, 0)
    buf = bytearray(65536)
    ret = blk_pread(blk, offset, buf)
    bs = blk_bs(blk)
    assert bs.last_driver_exception is None and bs.file.bs.last_driver_exception is None
    blk_unref(blk)
    err = capfd.readouterr().err
    if expect == "EIO":
        assert "read failed: Input/output error" in q.stdout
        assert ret == -errno.EIO
        assert corruption_lines(err) == corruption_lines(q.stderr)
    elif isinstance(expect, tuple):
        assert q.returncode == 0 and "read 65536/65536" in q.stdout      # QEMU reads it...
        assert ret == -errno.EIO and corruption_lines(err)               # ... qblock does not (see READ_CASES)
    else:
        assert q.returncode == 0 and "Pattern verification failed" not in q.stdout, q.stdout
        assert ret == 65536 and buf == bytes([expect]) * 65536
        assert corruption_lines(err) == corruption_lines(q.stderr) == []
    assert file_state(p) == before


def test_write_on_metadata_marks_the_image_corrupt_as_qemu(images, tmp_path, capfd):
    """An L2 entry pointing at the L1 table: a write there is refused, the image marked corrupt, as by qemu-io."""
    a = damaged(images, tmp_path, put(">Q", 0x40008, COPIED | 0x30000), "qemu.qcow2")
    b = damaged(images, tmp_path, put(">Q", 0x40008, COPIED | 0x30000), "qblock.qcow2")
    q = run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 64k 4k", a)
    capfd.readouterr()
    blk = open_blk(b, BDRV_O_RDWR)
    assert blk_pwrite(blk, 65536, b"\x33" * 4096) == -errno.EIO
    assert blk_pwrite(blk, 0, b"\x33" * 4096) == -errno.EIO      # and every later write (QEMU: -ENOMEDIUM)
    blk_unref(blk)
    err = capfd.readouterr().err
    assert "write failed: Input/output error" in q.stdout
    assert corruption_lines(err) == corruption_lines(q.stderr)
    assert header(a)["incompatible_features"] == header(b)["incompatible_features"] == 2
    assert peek(a, 0x30000, 65536) == peek(b, 0x30000, 65536)      # the L1 table survived in both


# --------------------------------------------------------------------------
# Fuzzing


class FuzzTimeout(BaseException):
    """An example ran too long (a BaseException, so that no driver boundary turns it into -EIO)."""


HEADER_FIELDS = [  # (offset, struct format) of QCowHeader's fields
    (4, ">I"), (8, ">Q"), (16, ">I"), (20, ">I"), (24, ">Q"), (32, ">I"), (36, ">I"), (40, ">Q"), (48, ">Q"),
    (56, ">I"), (60, ">I"), (64, ">Q"), (72, ">Q"), (80, ">Q"), (88, ">Q"), (96, ">I"), (100, ">I"), (104, ">B"),
]
# Regions of the fuzz template (4 KiB clusters; see fuzz_template): name -> (start, length)
REGIONS = {"header": (0, 4096), "reftable": (4096, 4096), "refblock": (8192, 4096), "l1": (12288, 4096),
           "l2": (16384, 4096), "data": (20480, 65536), "tail": (-65536, 65536)}
INTERESTING = [0, 1, 2, 3, 7, 8, 9, 12, 16, 21, 22, 63, 64, 104, 105, 112, 511, 512, 4095, 4096, 4097, 65536,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40, 1 << 56, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


def field_value(fmt: str):
    top = (1 << (8 * struct.calcsize(fmt))) - 1
    return st.one_of(st.sampled_from([v for v in INTERESTING if v <= top]), st.integers(0, top))


mutation = st.one_of(
    st.sampled_from(HEADER_FIELDS).flatmap(lambda f: st.tuples(st.just("field"), st.just(f), field_value(f[1]))),
    st.tuples(st.just("bytes"), st.sampled_from(sorted(REGIONS)), st.integers(0, 65535),
              st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("entry"), st.sampled_from(["reftable", "refblock", "l1", "l2"]), st.integers(0, 511),
              st.sampled_from(INTERESTING) | st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("truncate"), st.integers(0, 200000)),
)


def mutate(path: str, size: int, m) -> None:
    kind = m[0]
    if kind == "field":
        (off, fmt), value = m[1], m[2]
        poke(path, off, struct.pack(fmt, value))
    elif kind == "bytes":
        start, length = REGIONS[m[1]]
        if start < 0:
            start += size
        poke(path, max(start, 0) + m[2] % length, m[3])
    elif kind == "entry":
        start, _ = REGIONS[m[1]]
        fmt = ">H" if m[1] == "refblock" else ">Q"
        width = struct.calcsize(fmt)
        poke(path, start + (m[2] * width) % 4096, struct.pack(fmt, m[3] & ((1 << (8 * width)) - 1)))
    else:
        with open(path, "r+b") as f:
            f.truncate(m[1])


@pytest.fixture(scope="module")
def fuzz_template(tmp_path_factory):
    """A small image with a bit of everything: data, zero and compressed clusters, an internal snapshot."""
    p = tmp_path_factory.mktemp("fuzz") / "template.qcow2"
    assert run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", p, "4M").returncode == 0
    r = run("qemu-io", "-c", "write -P 0x11 0 64k", "-c", "write -z 64k 8k", "-c", "write -c -P 0x22 128k 4k",
            "-c", "write -P 0x33 3M 12k", p)
    assert r.returncode == 0, r.stderr
    assert run("qemu-img", "snapshot", "-c", "s1", p).returncode == 0
    assert run("qemu-io", "-c", "write -P 0x44 8k 8k", p).returncode == 0
    h = header(p)
    assert (h["refcount_table_offset"], h["l1_table_offset"]) == (4096, 12288), h   # as REGIONS says
    return open(p, "rb").read()


def _alarm(signum, frame):
    raise FuzzTimeout()


def exercise_read_only(path: str) -> None:
    """Open read-only and read: qblock Error or data or -errno, nothing else; the file is not touched."""
    before = file_state(path)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    try:
        try:
            blk = open_blk(path, 0)
        except Error as e:
            assert e.msg
            event("refused at open")
            return
        try:
            bs = blk_bs(blk)
            length = blk_getlength(blk)
            assert length >= 0
            buf = bytearray(65536)
            failed = 0
            for off in list(range(0, min(length, 1 << 20), 65536)) + [max(length - 65536, 0)]:
                ret = blk_pread(blk, off, buf)
                assert ret == min(65536, length - off) or -4096 < ret < 0, ret
                failed += ret < 0
            event("opened, some reads failed" if failed else "opened, every read worked")
            for off in range(0, min(length, 1 << 20), 256 << 10):
                ret, pnum, _, _ = bdrv_block_status(bs, off, min(256 << 10, length - off))
                assert ret >= 0 or -4096 < ret, ret
            assert bs.last_driver_exception is None, bs.last_driver_exception
            assert bs.file.bs.last_driver_exception is None
        finally:
            blk_unref(blk)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        assert file_state(path) == before, "a read-only open changed the file"


@settings(max_examples=2000 if LONG else 60, deadline=None, derandomize=not LONG,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutations=st.lists(mutation, min_size=1, max_size=6))
def test_fuzzed_image_opens_or_fails_cleanly(fuzz_template, fast_tmp, capfd, mutations):
    """Random damage: a qblock Error at open, or reads that return data or -errno; no exception, hang or write."""
    path = os.path.join(fast_tmp, "fuzz.qcow2")
    with open(path, "wb") as f:
        f.write(fuzz_template)
    for m in mutations:
        mutate(path, len(fuzz_template), m)
    exercise_read_only(path)
    capfd.readouterr()          # corruption reports are expected; keep the output short


def exercise_writable(path: str) -> None:
    """Open read/write and write, zero, discard, flush, close: a qblock Error at open or -errno, nothing else."""
    from qblock.block.block_backend import blk_flush, blk_pdiscard, blk_pwrite_zeroes
    from qblock.block.driver import BDRV_REQ_MAY_UNMAP
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    try:
        try:
            blk = open_blk(path, BDRV_O_RDWR, discard="unmap")
        except Error as e:
            assert e.msg
            event("refused at open")
            return
        try:
            bs = blk_bs(blk)
            length = blk_getlength(blk)
            rets = []
            for off in (0, 8192, 65536 + 100, 131072, 3 << 20):
                if off + 12288 <= length:
                    rets.append(blk_pwrite(blk, off, b"\x5a" * 12288))
            if length >= 1 << 20:
                rets.append(blk_pwrite_zeroes(blk, 65536, 65536, BDRV_REQ_MAY_UNMAP))
                rets.append(blk_pdiscard(blk, 0, 4096))
            rets.append(blk_flush(blk))
            for ret in rets:
                assert ret >= 0 or -4096 < ret, ret
            event("opened, some writes failed" if any(r < 0 for r in rets) else "opened, every write worked")
            assert bs.last_driver_exception is None, bs.last_driver_exception
            assert bs.file.bs.last_driver_exception is None
        finally:
            blk_unref(blk)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@settings(max_examples=1000 if LONG else 30, deadline=None, derandomize=not LONG,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutations=st.lists(mutation, min_size=1, max_size=4))
def test_fuzzed_image_takes_writes_or_fails_cleanly(fuzz_template, fast_tmp, capfd, mutations):
    """Random damage, then writes, zero writes, a discard and a flush: each succeeds or returns -errno."""
    path = os.path.join(fast_tmp, "fuzzw.qcow2")
    with open(path, "wb") as f:
        f.write(fuzz_template)
    for m in mutations:
        mutate(path, len(fuzz_template), m)
    exercise_writable(path)
    capfd.readouterr()
