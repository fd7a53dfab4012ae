"""The reopen transaction (block.c: bdrv_reopen_queue/multiple/prepare/commit/abort) and its driver hooks.

Read-only ↔ read-write on raw/file and qcow2 (writes refused or allowed, the fd's mode and the
OFD lock bytes following), all-or-nothing failure (a refused prepare or a lock conflict leaves
every node, fd and lock byte as it was), cache.direct, the message of a driver without reopen
support, and qblock-io's ``reopen`` against real qemu-io.
"""
from __future__ import annotations

import errno
import fcntl
import os

import pytest

from qblock.block.block_backend import blk_insert_bs, blk_new, blk_pread, blk_pwrite, blk_set_perm, blk_unref
from qblock.block.driver import BDRV_O_NOCACHE, BDRV_O_RDWR, BlockDriver, bdrv_find_format
from qblock.block.graph import (
    BLK_PERM_ALL,
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_RESIZE,
    BLK_PERM_WRITE,
    bdrv_new_open_driver,
    bdrv_open,
    bdrv_unref,
)
from qblock.block.create import bdrv_create
from qblock.block.reopen import bdrv_reopen, bdrv_reopen_multiple, bdrv_reopen_queue, bdrv_reopen_set_read_only
from qblock.util.error import Error
from qblock.util.osdep import qemu_has_ofd_lock, qemu_lock_fd_test

from .qemu_compat import HAVE_QEMU, NO_QEMU_REASON, tools  # noqa: F401 - the module-scoped fixture

needs_ofd = pytest.mark.skipif(not qemu_has_ofd_lock(), reason="the kernel has no OFD locks")
needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason=NO_QEMU_REASON)
LOCK_BYTES = list(range(100, 105)) + list(range(200, 205))
READ, WRITE = 100, 101                      # lock bytes: the node holds CONSISTENT_READ / WRITE
UNSHARED_WRITE = 201                        # the node does not share WRITE


def locked_bytes(path) -> set[int]:
    """The lock bytes some open file description holds on ``path`` (F_OFD_GETLK from a new fd)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return {off for off in LOCK_BYTES if qemu_lock_fd_test(fd, off, 1, True) == -errno.EAGAIN}
    finally:
        os.close(fd)


def fd_mode(bs) -> int:
    """O_RDONLY or O_RDWR of the file node's fd."""
    return fcntl.fcntl(bs.opaque.fd, fcntl.F_GETFL) & os.O_ACCMODE


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def reader(bs):
    """A BlockBackend that only reads ``bs`` and shares everything."""
    blk = blk_new(None, BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
    blk_insert_bs(blk, bs)
    return blk


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_read_only_to_read_write_and_back(fmt, raw_img, qcow2_img):
    """A read-only node reopened read-write takes writers (its file child too), and refuses them again once read-only."""
    path = raw_img if fmt == "raw" else qcow2_img
    bs = bdrv_open(path, None, {"driver": fmt}, 0)
    blk = reader(bs)
    try:
        file_bs = bs.file.bs
        assert bs.read_only and file_bs.read_only and fd_mode(file_bs) == os.O_RDONLY
        with pytest.raises(Error, match="Block node is read-only"):
            blk_set_perm(blk, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, BLK_PERM_ALL)

        bdrv_reopen_set_read_only(bs, False)
        assert not bs.read_only and not file_bs.read_only
        assert bs.open_flags & BDRV_O_RDWR and fd_mode(file_bs) == os.O_RDWR
        blk_set_perm(blk, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, BLK_PERM_ALL)
        assert blk_pwrite(blk, 0, b"\xa5" * 512) >= 0

        blk_set_perm(blk, BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
        bdrv_reopen_set_read_only(bs, True)
        assert bs.read_only and file_bs.read_only and fd_mode(file_bs) == os.O_RDONLY
        with pytest.raises(Error, match="Block node is read-only"):
            blk_set_perm(blk, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, BLK_PERM_ALL)
        buf = bytearray(512)
        assert blk_pread(blk, 0, buf) >= 0 and buf == b"\xa5" * 512
    finally:
        blk_unref(blk)
        bdrv_unref(bs)


@needs_ofd
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_lock_bytes_follow_reopen(fmt, raw_img, qcow2_img):
    """The image's lock bytes move to the new fd: no write byte while read-only, the writer's bytes once read-write."""
    path = raw_img if fmt == "raw" else qcow2_img
    bs = bdrv_open(path, None, {"driver": fmt}, 0)
    blk = reader(bs)
    try:
        before = locked_bytes(path)
        assert READ in before and WRITE not in before
        bdrv_reopen_set_read_only(bs, False)
        blk_set_perm(blk, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, BLK_PERM_CONSISTENT_READ)
        held = locked_bytes(path)
        assert {READ, WRITE, UNSHARED_WRITE} <= held
        blk_set_perm(blk, BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
        bdrv_reopen_set_read_only(bs, True)
        assert locked_bytes(path) == before
    finally:
        blk_unref(blk)
        bdrv_unref(bs)
    assert locked_bytes(path) == set()


def test_qcow2_reopen_read_only_writes_back_and_marks_clean(qcow2_img):
    """Going read-only writes qcow2's caches back and clears the dirty bit (qcow2_reopen_prepare)."""
    bs = bdrv_open(qcow2_img, None, {"driver": "qcow2", "lazy-refcounts": "on"}, BDRV_O_RDWR)
    blk = blk_new(None, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, BLK_PERM_ALL)
    blk_insert_bs(blk, bs)
    try:
        assert blk_pwrite(blk, 65536, b"\x11" * 4096) >= 0
        assert bs.opaque.incompatible_features & 1           # dirty: lazy refcounts held back
        blk_set_perm(blk, BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
        bdrv_reopen_set_read_only(bs, True)
        assert not bs.opaque.incompatible_features & 1
        with open(qcow2_img, "rb") as f:
            f.seek(72)
            assert int.from_bytes(f.read(8), "big") & 1 == 0   # incompatible_features on disk
        buf = bytearray(4096)
        assert blk_pread(blk, 65536, buf) >= 0 and buf == b"\x11" * 4096
    finally:
        blk_unref(blk)
        bdrv_unref(bs)


def test_qcow2_options_change(qcow2_img):
    """qcow2 runtime options change through reopen; the generic check refuses unknown and fixed ones."""
    bs = bdrv_open(qcow2_img, None, {"driver": "qcow2"}, BDRV_O_RDWR)
    try:
        assert not bs.opaque.use_lazy_refcounts
        bdrv_reopen(bs, {"lazy-refcounts": "on"})
        assert bs.opaque.use_lazy_refcounts
        with pytest.raises(Error, match="Cannot change the option 'foo'"):
            bdrv_reopen(bs, {"foo": "bar"})
        with pytest.raises(Error, match="Cannot change the option 'driver'"):
            bdrv_reopen(bs, {"driver": "raw"})
        with pytest.raises(Error, match="Cannot change the option 'locking'"):
            bdrv_reopen(bs, {"file.locking": "off"})
        assert bs.opaque.use_lazy_refcounts and not bs.read_only
    finally:
        bdrv_unref(bs)


def test_backing_stays_read_only(tmp_path):
    """Reopening an overlay read-write leaves its backing file (which inherits read-only=on) read-only."""
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    bdrv_create(bdrv_find_format("qcow2"), base, {"size": 1 << 20})
    bdrv_create(bdrv_find_format("qcow2"), top, {"size": 1 << 20, "backing_file": base, "backing_fmt": "qcow2"})
    bs = bdrv_open(top, None, {"driver": "qcow2"}, 0)
    try:
        bdrv_reopen_set_read_only(bs, False)
        assert not bs.read_only and not bs.file.bs.read_only
        assert bs.backing.bs.read_only and bs.backing.bs.file.bs.read_only
        bdrv_reopen_set_read_only(bs.backing.bs, False)       # what qemu-img commit does to the base
        assert not bs.backing.bs.read_only and not bs.backing.bs.file.bs.read_only
    finally:
        bdrv_unref(bs)


@needs_ofd
def test_abort_when_one_prepare_fails(raw_img, qcow2_img):
    """A refused prepare on the second node of a queue leaves both nodes, their fds and lock bytes as they were."""
    a = bdrv_open(raw_img, None, {"driver": "raw"}, 0)
    b = bdrv_open(qcow2_img, None, {"driver": "qcow2"}, 0)
    blk_a, blk_b = reader(a), reader(b)
    try:
        state = [(n.read_only, n.open_flags, n.file.bs.opaque.fd, fd_mode(n.file.bs)) for n in (a, b)]
        locks = locked_bytes(raw_img), locked_bytes(qcow2_img)
        fds = open_fds()
        q = bdrv_reopen_queue(None, a, {"read-only": False}, True)
        q = bdrv_reopen_queue(q, b, {"read-only": False, "foo": "bar"}, True)
        with pytest.raises(Error, match="Cannot change the option 'foo'"):
            bdrv_reopen_multiple(q)
        assert [(n.read_only, n.open_flags, n.file.bs.opaque.fd, fd_mode(n.file.bs)) for n in (a, b)] == state
        assert (locked_bytes(raw_img), locked_bytes(qcow2_img)) == locks
        assert open_fds() == fds                               # the new fds were closed
        assert a.quiesce_counter == 0 and b.quiesce_counter == 0
    finally:
        blk_unref(blk_a)
        blk_unref(blk_b)
        bdrv_unref(a)
        bdrv_unref(b)


@needs_ofd
def test_abort_when_the_lock_is_taken(qcow2_img):
    """Read-write needs qcow2's file to take the write lock; another user not sharing writes makes the
    permission stage fail, and every node goes back to read-only with its old fd and lock bytes."""
    bs = bdrv_open(qcow2_img, None, {"driver": "qcow2"}, 0)
    blk = reader(bs)
    other = bdrv_open(None, None, {"driver": "file", "filename": qcow2_img}, 0)
    other_blk = blk_new(None, BLK_PERM_CONSISTENT_READ, BLK_PERM_CONSISTENT_READ)   # shares no writes
    blk_insert_bs(other_blk, other)
    try:
        fd = bs.file.bs.opaque.fd
        locks = locked_bytes(qcow2_img)
        fds = open_fds()
        with pytest.raises(Error, match='Failed to get "write" lock'):
            bdrv_reopen_set_read_only(bs, False)
        assert bs.read_only and bs.file.bs.read_only
        assert bs.file.bs.opaque.fd == fd and fd_mode(bs.file.bs) == os.O_RDONLY
        assert locked_bytes(qcow2_img) == locks
        assert open_fds() == fds
        blk_unref(other_blk)
        bdrv_unref(other)
        other_blk = other = None
        bdrv_reopen_set_read_only(bs, False)                  # free now
        assert not bs.read_only and fd_mode(bs.file.bs) == os.O_RDWR
    finally:
        if other_blk is not None:
            blk_unref(other_blk)
            bdrv_unref(other)
        blk_unref(blk)
        bdrv_unref(bs)


def test_writer_keeps_node_read_write(raw_img):
    """A parent still writing refuses read-only, with QEMU 7.2's message, and nothing changes."""
    bs = bdrv_open(raw_img, None, {"driver": "raw"}, BDRV_O_RDWR)
    blk = blk_new(None, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE | BLK_PERM_RESIZE, BLK_PERM_ALL)
    blk_insert_bs(blk, bs)
    try:
        with pytest.raises(Error, match=f"Read-only block node '{bs.node_name}' cannot support read-write users"):
            bdrv_reopen_set_read_only(bs, True)
        assert not bs.read_only and fd_mode(bs.file.bs) == os.O_RDWR
        assert blk_pwrite(blk, 0, b"\x01" * 512) >= 0
    finally:
        blk_unref(blk)
        bdrv_unref(bs)


def test_cache_direct_change(raw_img):
    """cache.direct=on reopens the file with O_DIRECT (and its alignment); off goes back."""
    o_direct = getattr(os, "O_DIRECT", 0)
    bs = bdrv_open(raw_img, None, {"driver": "raw"}, BDRV_O_RDWR)
    blk = reader(bs)
    try:
        file_bs = bs.file.bs
        try:
            bdrv_reopen(bs, {"cache.direct": "on"})
        except Error as e:
            if "O_DIRECT" in str(e) or "Invalid argument" in str(e):
                pytest.skip(f"no O_DIRECT here: {e}")
            raise
        assert bs.open_flags & BDRV_O_NOCACHE and file_bs.open_flags & BDRV_O_NOCACHE
        assert fcntl.fcntl(file_bs.opaque.fd, fcntl.F_GETFL) & o_direct
        assert file_bs.bl.request_alignment >= 512
        buf = bytearray(512)
        assert blk_pread(blk, 1, buf, 100) >= 0 and buf[:100] == b"\x5a" * 100
        bdrv_reopen(bs, {"cache.direct": "off"})
        assert not file_bs.open_flags & BDRV_O_NOCACHE
        assert not fcntl.fcntl(file_bs.opaque.fd, fcntl.F_GETFL) & o_direct
        assert file_bs.bl.request_alignment == 1
    finally:
        blk_unref(blk)
        bdrv_unref(bs)


class NoReopenDriver(BlockDriver):
    """A driver without bdrv_reopen_prepare."""

    format_name = "no-reopen"

    def bdrv_getlength(self, bs) -> int:
        return 0


def test_driver_without_reopen_support():
    """A driver without bdrv_reopen_prepare refuses with QEMU's message."""
    bs = bdrv_new_open_driver(NoReopenDriver(), "nr0")
    try:
        with pytest.raises(Error, match="Block format 'no-reopen' used by node 'nr0' does not support reopening files"):
            bdrv_reopen(bs, {"read-only": True})
        assert bs.quiesce_counter == 0
    finally:
        bdrv_unref(bs)


# --------------------------------------------------------------------------
# qblock-io's reopen against qemu-io 7.2

def _image(tools, fmt: str) -> str:
    import subprocess
    d = os.path.join(tools.tmp, f"src-{fmt}")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "t.img")
    if not os.path.exists(path):
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, "1M"], check=True)
    return path


REOPEN_CASES = [
    ["-r", "-c", "reopen -w", "-c", "write 0 512"],
    ["-c", "reopen -r", "-c", "write 0 512", "-c", "read 0 512"],
    ["-c", "reopen -r", "-c", "reopen -w", "-c", "write -P 7 0 512", "-c", "read -P 7 0 512"],
    ["-c", "reopen -o read-only=on", "-c", "write 0 512"],
    ["-r", "-c", "reopen -o read-only=off", "-c", "write 0 512"],
    ["-c", "reopen -c none", "-c", "write 0 512", "-c", "reopen -c writeback", "-c", "read 0 512"],
    ["-c", "reopen -o foo=bar"],
    ["-c", "reopen -o driver=raw"],
    ["-c", "reopen -o file.locking=off"],
    ["-c", "reopen -o node-name=foo"],
    ["-c", "reopen -o force-share=on"],
    ["-c", "reopen -o discard=bogus"],
    ["-c", "reopen -o read-only=bogus"],
    ["-c", "reopen -o lazy-refcounts=on"],
    ["-c", "reopen -o discard=unmap", "-c", "reopen -o detect-zeroes=unmap"],
    ["-U", "-r", "-c", "reopen -w"],
]


@needs_qemu
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("case", REOPEN_CASES, ids=[" ".join(c) for c in REOPEN_CASES])
def test_qemu_io_reopen_compat(tools, fmt, case):
    """qblock-io's reopen prints, exits and writes what qemu-io 7.2's does."""
    img = _image(tools, fmt)
    q, b, dq, db = tools.both("io", ["-f", fmt] + case + ["t.img"], [img])
    assert (b.out, b.err, b.rc) == (q.out, q.err, q.rc)
    with open(os.path.join(dq, "t.img"), "rb") as fq, open(os.path.join(db, "t.img"), "rb") as fb:
        assert fb.read() == fq.read()


FILTER_CASES = {
    "throttle": ["--object", "throttle-group,id=tg0,x-bps-total=1048576", "--object", "throttle-group,id=tg1",
                 "--image-opts", "driver=throttle,throttle-group=tg0,file.driver=qcow2,file.file.driver=file,"
                 "file.file.filename=t.img",
                 "-c", "reopen -o throttle-group=tg1", "-c", "write -P 5 0 4k", "-c", "reopen -o throttle-group=nope",
                 "-c", "reopen -r", "-c", "write 0 4k", "-c", "reopen -w", "-c", "read -P 5 0 4k"],
    "null-co": ["--image-opts", "driver=null-co,size=1M", "-c", "reopen -r", "-c", "write 0 4k",
                "-c", "reopen -o size=2M", "-c", "reopen -w", "-c", "write 0 4k"],
    "blkdebug": ["--image-opts", "driver=blkdebug,align=4096,image.driver=file,image.filename=t.img",
                 "-c", "reopen -r", "-c", "write 0 4k", "-c", "reopen -o align=512", "-c", "reopen -o align=4096",
                 "-c", "reopen -w", "-c", "write -P 9 0 4k", "-c", "read -P 9 0 4k"],
}


@needs_qemu
@pytest.mark.parametrize("name", list(FILTER_CASES))
def test_qemu_io_reopen_filters_compat(tools, name):
    """throttle (a new group; one that does not exist), null-co and blkdebug (nothing of theirs may change) reopen
    as in qemu-io 7.2."""
    img = _image(tools, "qcow2" if name == "throttle" else "raw")   # (blkdebug align=4096: a 1 MiB raw file)
    q, b, dq, db = tools.both("io", FILTER_CASES[name], [img])
    assert (b.out, b.err, b.rc) == (q.out, q.err, q.rc)
    assert "Throttle group 'nope' does not exist" in q.err or "Cannot change the option" in q.err
    with open(os.path.join(dq, "t.img"), "rb") as fq, open(os.path.join(db, "t.img"), "rb") as fb:
        assert fb.read() == fq.read()


@needs_qemu
def test_writer_needs_an_aligned_size_without_resize(tools):
    """A writer of a node whose size is not a multiple of request_alignment is refused, as QEMU 7.2 refuses it."""
    img = _image(tools, "qcow2")   # a fresh qcow2 file: 196616 bytes, not a multiple of 4096
    argv = ["--image-opts", "driver=blkdebug,align=4096,image.driver=file,image.filename=t.img", "-c", "read 0 512"]
    q, b, _, _ = tools.both("io", argv, [img])
    assert (b.out, b.err, b.rc) == (q.out, q.err, q.rc)
    assert "Cannot get 'write' permission without 'resize'" in q.err
    q, b, _, _ = tools.both("io", ["-r"] + argv, [img])
    assert (b.out, b.err, b.rc) == (q.out, q.err, q.rc) and q.rc == 0
