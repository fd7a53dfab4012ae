"""Image locking of the file protocol: QEMU's OFD lock bytes (block/file-posix.c) and their interplay.

Byte 100+bit is read-locked while a node holds permission ``bit``, byte 200+bit while it does
not share it; a new user tests the other side's bytes.  Inside one process two fds conflict
as two processes do, so most of these tests need no second process; the interop tests hold
an image with the real QEMU tools (or qblock's) and compare what the other side prints.
"""
import errno
import os
import shutil
import subprocess
import sys
import time

import pytest

from qblock.block.block_backend import blk_insert_bs, blk_new, blk_new_open, blk_pread, blk_set_perm, blk_unref
from qblock.block.driver import BDRV_O_RDWR
from qblock.block.graph import (
    BLK_PERM_ALL,
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_RESIZE,
    BLK_PERM_WRITE,
    bdrv_open,
    bdrv_unref,
)
from qblock.block.create import bdrv_create_file
from qblock.util.error import Error
from qblock.util.osdep import qemu_has_ofd_lock, qemu_lock_fd_test

pytestmark = pytest.mark.skipif(not qemu_has_ofd_lock(), reason="the kernel has no OFD locks")

QEMU_IO = shutil.which("qemu-io")
QEMU_IMG = shutil.which("qemu-img")
QSD = shutil.which("qemu-storage-daemon")
QBLOCK_IO = [sys.executable, "-m", "qblock.tools.qemu_io"]
QBLOCK_IMG = [sys.executable, "-m", "qblock.tools.qemu_img"]
TIMEOUT = 30
LOCK_BYTES = list(range(100, 105)) + list(range(200, 205))


def locked_bytes(path) -> set[int]:
    """The lock bytes some open file description holds on ``path``, read back with F_OFD_GETLK from a new fd."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return {off for off in LOCK_BYTES if qemu_lock_fd_test(fd, off, 1, True) == -errno.EAGAIN}
    finally:
        os.close(fd)


def open_file(path, flags=BDRV_O_RDWR, **opts):
    """A BlockBackend straight on a file node (no format), with blk_new_open's perms."""
    return blk_new_open(None, None, {"driver": "file", "filename": path, **opts}, flags)


def attach(path, perm, shared, rw=False, **opts):
    """A file node (read-write if ``rw`` or ``perm`` writes) under a BlockBackend that asks for ``perm`` and shares ``shared``."""
    flags = BDRV_O_RDWR if rw or perm & BLK_PERM_WRITE else 0
    bs = bdrv_open(None, None, {"driver": "file", "filename": path, **opts}, flags)
    blk = blk_new(None, perm, shared)
    try:
        blk_insert_bs(blk, bs)
    except Error:
        blk_unref(blk)
        raise
    finally:
        bdrv_unref(bs)
    return blk


# -- the lock bytes ------------------------------------------------------------


def test_lock_bytes_follow_the_permissions(raw_img):
    """Perm bytes for what the node holds, shared bytes for what it does not share; none once perms drop."""
    blk = attach(raw_img, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, BLK_PERM_ALL & ~(BLK_PERM_WRITE | BLK_PERM_RESIZE))
    try:
        assert locked_bytes(raw_img) == {100, 101, 201, 203}
        blk_set_perm(blk, BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
        assert locked_bytes(raw_img) == {100}
    finally:
        blk_unref(blk)
    assert locked_bytes(raw_img) == set()


def test_qcow2_lock_bytes_are_qemus(qcow2_img):
    """A qcow2 image opened read-write (read-only) locks the same bytes as qemu-io does: 100,101,103,201,203 (100,201,203)."""
    blk = blk_new_open(qcow2_img, None, None, BDRV_O_RDWR)
    assert locked_bytes(qcow2_img) == {100, 101, 103, 201, 203}
    blk_unref(blk)
    blk = blk_new_open(qcow2_img, None, None, 0)
    assert locked_bytes(qcow2_img) == {100, 201, 203}
    blk_unref(blk)
    assert locked_bytes(qcow2_img) == set()


def test_a_parentless_node_locks_nothing(raw_img):
    """A node nobody uses has no permissions, so no lock bytes (qemu-storage-daemon --blockdev alone)."""
    bs = bdrv_open(None, None, {"driver": "file", "filename": raw_img}, BDRV_O_RDWR)
    assert locked_bytes(raw_img) == set()
    bdrv_unref(bs)


# -- conflicts inside one process ----------------------------------------------------


def test_two_writers_that_share_nothing_conflict(raw_img):
    """Writer + writer: the second fails with QEMU's message and hint, and leaves the first's bytes alone."""
    unshared = BLK_PERM_ALL & ~(BLK_PERM_WRITE | BLK_PERM_RESIZE)
    first = attach(raw_img, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, unshared)
    try:
        with pytest.raises(Error) as e:
            attach(raw_img, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, unshared)
        assert e.value.msg == 'Failed to get "write" lock'
        assert e.value.hint == f"Is another process using the image [{raw_img}]?\n"
        assert locked_bytes(raw_img) == {100, 101, 201, 203}
    finally:
        blk_unref(first)


def test_reader_refused_by_a_writer_that_does_not_share_write(raw_img):
    """A reader that does not share write meets a writer: 'Failed to get shared "write" lock'."""
    writer = attach(raw_img, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, BLK_PERM_ALL)
    try:
        with pytest.raises(Error, match='^Failed to get shared "write" lock$'):
            attach(raw_img, BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL & ~BLK_PERM_WRITE)
    finally:
        blk_unref(writer)


def test_reader_and_writer_that_shares_read_work_together(raw_img):
    """A writer that shares read (but not write) and a reader that shares write both open."""
    writer = attach(raw_img, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, BLK_PERM_CONSISTENT_READ)
    reader = attach(raw_img, BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
    buf = bytearray(512)
    assert blk_pread(reader, 0, buf) == 512
    assert buf == b"\x5a" * 512
    blk_unref(reader)
    blk_unref(writer)


def test_qcow2_opened_twice_read_write(qcow2_img):
    """The second read-write open of a qcow2 image fails as QEMU's does; force-share read-only passes."""
    blk = blk_new_open(qcow2_img, None, None, BDRV_O_RDWR)
    try:
        with pytest.raises(Error, match='^Failed to get "write" lock$'):
            blk_new_open(qcow2_img, None, None, BDRV_O_RDWR)
        with pytest.raises(Error, match='^Failed to get shared "write" lock$'):
            blk_new_open(qcow2_img, None, None, 0)
        shared = blk_new_open(qcow2_img, None, {"force-share": "on"}, 0)
        blk_unref(shared)
    finally:
        blk_unref(blk)


def test_locking_off_takes_and_checks_no_locks(qcow2_img):
    """file.locking=off: no bytes locked, and a holder's bytes are not checked."""
    blk = blk_new_open(qcow2_img, None, {"file.locking": "off"}, BDRV_O_RDWR)
    assert locked_bytes(qcow2_img) == set()
    other = blk_new_open(qcow2_img, None, None, BDRV_O_RDWR)
    try:
        blk2 = blk_new_open(qcow2_img, None, {"file.locking": "off"}, 0)
        blk_unref(blk2)
    finally:
        blk_unref(other)
        blk_unref(blk)


def test_locking_on_and_bad_value(raw_img):
    """locking=on locks (OFD locks are there, so no warning); any other value is refused."""
    blk = attach(raw_img, BLK_PERM_CONSISTENT_READ, BLK_PERM_CONSISTENT_READ, locking="on")
    assert locked_bytes(raw_img) == {100, 201, 202, 203}
    blk_unref(blk)
    with pytest.raises(Error, match="invalid parameter value: maybe"):
        open_file(raw_img, locking="maybe")


def test_failed_check_rolls_back_the_whole_update(raw_img):
    """A refused permission change leaves the edge and the node's bytes as they were."""
    blk = attach(raw_img, BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL, rw=True)
    other = attach(raw_img, BLK_PERM_CONSISTENT_READ, BLK_PERM_CONSISTENT_READ)
    try:
        with pytest.raises(Error, match='^Failed to get "write" lock$'):
            blk_set_perm(blk, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, BLK_PERM_ALL)
        assert (blk.root.perm, blk.root.shared_perm) == (BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
        assert blk.root.bs.opaque.locked_perm == BLK_PERM_CONSISTENT_READ
        assert blk.root.bs.opaque.locked_shared_perm == 0
    finally:
        blk_unref(other)
        blk_unref(blk)


def test_close_releases_the_locks(qcow2_img):
    """After the holder closes, the image opens read-write again."""
    blk = blk_new_open(qcow2_img, None, None, BDRV_O_RDWR)
    blk_unref(blk)
    assert locked_bytes(qcow2_img) == set()
    blk = blk_new_open(qcow2_img, None, None, BDRV_O_RDWR)
    blk_unref(blk)


def test_create_refused_while_the_image_is_held(qcow2_img):
    """Creating over an image in use fails before truncating it (raw_co_create's lock step)."""
    blk = blk_new_open(qcow2_img, None, None, BDRV_O_RDWR)
    size = os.path.getsize(qcow2_img)
    try:
        with pytest.raises(Error, match='^Failed to get "write" lock$') as e:
            bdrv_create_file(qcow2_img, {"size": 4096})
        assert e.value.hint == f"Is another process using the image [{qcow2_img}]?\n"
        assert os.path.getsize(qcow2_img) == size
    finally:
        blk_unref(blk)
    bdrv_create_file(qcow2_img, {"size": 4096})
    assert locked_bytes(qcow2_img) == set()


# -- interop with the real QEMU tools ------------------------------------------------


def run(argv, cwd):
    p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    return p.returncode, p.stderr


def hold(argv, path, cwd):
    """Start ``argv`` (an interactive qemu-io / qblock-io, or a daemon) and wait until it locks ``path``."""
    proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT
    while not locked_bytes(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{argv} did not lock {path}: {proc.communicate()[1]!r}")
        time.sleep(0.02)
    return proc


def release(proc):
    proc.kill()
    proc.communicate(timeout=TIMEOUT)


PROBES = [
    ["-c", "read 0 512"],
    ["-r", "-c", "read 0 512"],
    ["-U", "-r", "-c", "read 0 512"],
    ["-f", "raw", "-c", "write 0 512"],
]
IMG_PROBES = [["info"], ["info", "-U"], ["check"]]


def normalize(err):
    for prog in ("qemu-io", "qblock-io", "qemu-img", "qblock-img"):
        err = err.replace(f"{prog}:", "TOOL:")
    return err


def probe_both(cwd, name):
    """Each probe run by QEMU's tools and by qblock's: (argv, rc, stderr) with the tool names made equal."""
    out = []
    for args in PROBES:
        for tool, prog in ((QEMU_IO, "qemu-io"), (QBLOCK_IO, "qblock-io")):
            rc, err = run(([tool] if isinstance(tool, str) else tool) + args + [name], cwd)
            out.append((prog, args, rc, normalize(err)))
    for args in IMG_PROBES:
        for tool, prog in ((QEMU_IMG, "qemu-img"), (QBLOCK_IMG, "qblock-img")):
            rc, err = run(([tool] if isinstance(tool, str) else tool) + args[:1] + args[1:] + [name], cwd)
            out.append((prog, args, rc, normalize(err)))
    return out


def assert_same(results):
    for real, ours in zip(results[::2], results[1::2]):
        assert real[1:] == ours[1:], f"{real[0]} vs {ours[0]} {real[1]}"


needs_qemu = pytest.mark.skipif(QEMU_IO is None or QEMU_IMG is None, reason="QEMU's qemu-io/qemu-img are not installed")


@needs_qemu
@pytest.mark.parametrize("holder_args", [[], ["-r"]], ids=["rw", "ro"])
def test_qblock_tools_meet_a_qemu_io_holder_as_qemu_does(qcow2_img, tmp_path, holder_args):
    """While a real qemu-io holds a qcow2 image, qblock-io/qblock-img print what qemu-io/qemu-img print."""
    name = os.path.basename(qcow2_img)
    holder = hold([QEMU_IO, *holder_args, name], qcow2_img, tmp_path)
    try:
        results = probe_both(tmp_path, name)
    finally:
        release(holder)
    assert_same(results)
    first = results[0]
    if not holder_args:
        assert (first[2], first[3]) == (1, f'TOOL: can\'t open device {name}: Failed to get "write" lock\n'
                                           f"Is another process using the image [{name}]?\n")
    assert results[4][2] == 0  # -U -r reads through
    assert results[5][2] == 0


@needs_qemu
def test_qemu_tools_meet_a_qblock_io_holder(qcow2_img, tmp_path):
    """While qblock-io holds a qcow2 image read-write, real qemu-io/qemu-img get their usual lock errors."""
    name = os.path.basename(qcow2_img)
    holder = hold([*QBLOCK_IO, name], qcow2_img, tmp_path)
    try:
        assert locked_bytes(qcow2_img) == {100, 101, 103, 201, 203}
        rc, err = run([QEMU_IO, "-c", "read 0 512", name], tmp_path)
        assert (rc, err) == (1, f'qemu-io: can\'t open device {name}: Failed to get "write" lock\n'
                                f"Is another process using the image [{name}]?\n")
        rc, err = run([QEMU_IMG, "info", name], tmp_path)
        assert (rc, err) == (1, f"qemu-img: Could not open '{name}': Failed to get shared \"write\" lock\n"
                                f"Is another process using the image [{name}]?\n")
        assert run([QEMU_IMG, "info", "-U", name], tmp_path)[0] == 0
        assert run([QEMU_IO, "-U", "-r", "-c", "read 0 512", name], tmp_path)[0] == 0
        rc, err = run([QEMU_IMG, "create", "-f", "qcow2", name, "1M"], tmp_path)
        assert (rc, err) == (1, f'qemu-img: {name}: Failed to get "write" lock\n'
                                f"Is another process using the image [{name}]?\n")
    finally:
        release(holder)
    assert locked_bytes(qcow2_img) == set()
    assert run([QEMU_IO, "-c", "read 0 512", name], tmp_path)[0] == 0


@needs_qemu
def test_same_lock_bytes_as_qemu_io(qcow2_img, tmp_path):
    """qemu-io and qblock-io holding the same image (read-write, read-only) lock the same bytes."""
    name = os.path.basename(qcow2_img)
    for args in ([], ["-r"]):
        seen = []
        for tool in ([QEMU_IO], QBLOCK_IO):
            holder = hold([*tool, *args, name], qcow2_img, tmp_path)
            try:
                seen.append(locked_bytes(qcow2_img))
            finally:
                release(holder)
        assert seen[0] == seen[1]


@needs_qemu
def test_raw_image_held_by_qemu_io_is_shared_for_writing(raw_img, tmp_path):
    """A raw image under qemu-io shares write (only the qcow2 file child unshares it): both tools write through."""
    name = os.path.basename(raw_img)
    holder = hold([QEMU_IO, "-f", "raw", name], raw_img, tmp_path)
    try:
        for tool in ([QEMU_IO], QBLOCK_IO):
            assert run([*tool, "-f", "raw", "-c", "write 0 512", name], tmp_path) == (0, "")
        for tool in ([QEMU_IMG], QBLOCK_IMG):
            assert run([*tool, "resize", "-f", "raw", name, "2M"], tmp_path)[0] == 0
    finally:
        release(holder)


@pytest.mark.skipif(QSD is None or QEMU_IO is None, reason="qemu-storage-daemon / qemu-io are not installed")
def test_storage_daemons_hold_alike(qcow2_img, tmp_path):
    """A qcow2 node in qemu-storage-daemon and in qblock-storage-daemon: qemu-io gets the same error from both."""
    name = os.path.basename(qcow2_img)
    blockdev = ["--blockdev", f"driver=file,filename={name},node-name=f",
                "--blockdev", "driver=qcow2,file=f,node-name=q"]
    errs = []
    for daemon in ([QSD], [sys.executable, "-m", "qblock.tools.storage_daemon"]):
        holder = hold([*daemon, *blockdev], qcow2_img, tmp_path)
        try:
            errs.append((locked_bytes(qcow2_img), run([QEMU_IO, "-c", "read 0 512", name], tmp_path),
                         run([*QBLOCK_IO, "-r", "-c", "read 0 512", name], tmp_path)))
        finally:
            release(holder)
    assert errs[0] == errs[1]
    assert errs[0][1][0] == 1 and 'Failed to get "write" lock' in errs[0][1][1]


@pytest.mark.skipif(shutil.which("qemu-nbd") is None or QEMU_IMG is None, reason="qemu-nbd / qemu-img are not installed")
def test_qemu_nbd_holder_refuses_resize_to_both(raw_img, tmp_path):
    """qemu-nbd serving a raw image does not share resize: qemu-img and qblock-img resize fail alike."""
    name = os.path.basename(raw_img)
    holder = hold(["qemu-nbd", "-f", "raw", "-k", str(tmp_path / "nbd.sock"), name], raw_img, tmp_path)
    try:
        real = run([QEMU_IMG, "resize", "-f", "raw", name, "2M"], tmp_path)
        ours = run([*QBLOCK_IMG, "resize", "-f", "raw", name, "2M"], tmp_path)
    finally:
        release(holder)
    assert (real[0], normalize(real[1])) == (ours[0], normalize(ours[1])) == (
        1, f"TOOL: Could not open '{name}': Failed to get \"resize\" lock\nIs another process using the image [{name}]?\n")
    assert os.path.getsize(raw_img) == 1 << 20
