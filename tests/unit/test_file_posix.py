"""The file protocol driver (block/file-posix.c) over real files."""
import errno
import os

import pytest

from qblock.block.block_backend import (
    blk_bs,
    blk_flush,
    blk_getlength,
    blk_new_open,
    blk_pdiscard,
    blk_pread,
    blk_pwrite,
    blk_pwrite_zeroes,
    blk_truncate,
    blk_unref,
)
from qblock.block.driver import (
    BDRV_BLOCK_DATA,
    BDRV_BLOCK_ZERO,
    BDRV_O_RDWR,
    BDRV_REQ_MAY_UNMAP,
    BDRV_REQ_NO_FALLBACK,
    bdrv_find_format,
)
from qblock.block.io import bdrv_block_status
from qblock.util.error import Error


@pytest.fixture
def img(tmp_path):
    path = tmp_path / "t.img"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    return str(path)


def _open(path, flags=BDRV_O_RDWR, **opts):
    o = {"driver": "file", "filename": path}
    o.update({k.replace("_", "-"): v for k, v in opts.items()})
    return blk_new_open(None, None, o, flags)


def test_written_data_is_on_disk(img):
    """Bytes written through qblock are in the file, read with plain open()."""
    blk = _open(img)
    assert blk_pwrite(blk, 1000, b"\xab" * 5000) == 5000
    assert blk_flush(blk) == 0
    blk_unref(blk)
    with open(img, "rb") as f:
        data = f.read()
    assert data[1000:6000] == b"\xab" * 5000 and data[999] == 0 and data[6000] == 0


def test_read_back_and_length(img):
    """Reads return what the file holds and the length is the file's size."""
    with open(img, "r+b") as f:
        f.seek(4096)
        f.write(b"qblock")
    blk = _open(img, flags=0)
    assert blk_getlength(blk) == 1 << 20
    buf = bytearray(10)
    assert blk_pread(blk, 4094, buf) == 10
    assert bytes(buf) == b"\0\0qblock\0\0"
    blk_unref(blk)


def test_read_past_eof_of_unaligned_file_is_zeroes(tmp_path):
    """A file whose size is not a whole sector reads as zeroes after its end (short read filled)."""
    path = tmp_path / "odd.img"
    path.write_bytes(b"\x11" * 1000)
    blk = _open(str(path), flags=0)
    assert blk_getlength(blk) == 1024
    buf = bytearray(b"\xff" * 1024)
    assert blk_pread(blk, 0, buf) == 1024
    assert bytes(buf) == b"\x11" * 1000 + b"\0" * 24
    blk_unref(blk)


def test_open_errors_use_qemu_wording(tmp_path):
    """A missing file, a directory and a missing filename fail with QEMU's messages."""
    with pytest.raises(Error, match=r"Could not open '/nonexistent/x': No such file or directory"):
        _open("/nonexistent/x")
    with pytest.raises(Error, match=r"Could not open '.*': Is a directory"):
        _open(str(tmp_path))
    with pytest.raises(Error, match="A regular file was expected by the 'file' driver"):
        _open(str(tmp_path), flags=0)
    with pytest.raises(Error, match="The 'file' block driver requires a file name"):
        blk_new_open(None, None, {"driver": "file"}, 0)
    with pytest.raises(Error, match="aio=native was specified, but it requires cache.direct=on"):
        _open(str(tmp_path / "x"), aio="native")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can open any file")
def test_permission_denied(tmp_path):
    """A file without permission fails the open with EACCES's message."""
    path = tmp_path / "locked.img"
    path.write_bytes(b"\0" * 512)
    path.chmod(0)
    with pytest.raises(Error, match="Permission denied"):
        _open(str(path))


def test_read_only_refuses_writes(img):
    """A node opened read-only fails writes with -EPERM and leaves the file alone."""
    blk = _open(img, flags=0)
    assert blk_pwrite(blk, 0, b"x" * 512) == -errno.EPERM
    blk_unref(blk)
    with open(img, "rb") as f:
        assert f.read(512) == b"\0" * 512


def test_discard_punches_a_hole(img):
    """A discard with discard=unmap punches a hole: block status reports zeroes there and the file reads zeroes."""
    blk = _open(img, discard="unmap")
    assert blk_pwrite(blk, 0, b"\x55" * (256 << 10)) == 256 << 10
    assert blk_flush(blk) == 0
    bs = blk_bs(blk)
    ret, pnum, _, _ = bdrv_block_status(bs, 0, 1 << 20)
    assert ret & BDRV_BLOCK_DATA and pnum >= 256 << 10
    assert blk_pdiscard(blk, 64 << 10, 64 << 10) == 0
    ret, pnum, _, _ = bdrv_block_status(bs, 64 << 10, 64 << 10)
    if ret & BDRV_BLOCK_DATA:
        pytest.skip("this filesystem does not punch holes")
    assert ret & BDRV_BLOCK_ZERO and pnum == 64 << 10
    buf = bytearray(64 << 10)
    assert blk_pread(blk, 64 << 10, buf) == 64 << 10 and not any(buf)
    blk_unref(blk)


def test_write_zeroes_with_and_without_unmap(img):
    """Write-zeroes makes the range read as zeroes, with MAY_UNMAP and without, and NO_FALLBACK where supported."""
    blk = _open(img, discard="unmap")
    blk_pwrite(blk, 0, b"\x77" * (128 << 10))
    assert blk_pwrite_zeroes(blk, 0, 64 << 10, BDRV_REQ_MAY_UNMAP) == 0
    assert blk_pwrite_zeroes(blk, 64 << 10, 32 << 10, 0) == 0
    buf = bytearray(128 << 10)
    blk_pread(blk, 0, buf)
    assert not any(buf[:96 << 10]) and buf[96 << 10:] == b"\x77" * (32 << 10)
    ret = blk_pwrite_zeroes(blk, 100 << 10, 4096, BDRV_REQ_NO_FALLBACK)
    assert ret in (0, -errno.ENOTSUP)
    blk_unref(blk)


def test_truncate_grows_and_shrinks(img):
    """Truncate grows the file (new area reads zero) and shrinks it."""
    blk = _open(img, flags=BDRV_O_RDWR | 0x4)  # BDRV_O_RESIZE asks for the resize permission
    assert blk_truncate(blk, 2 << 20) == 0
    assert os.path.getsize(img) == 2 << 20 and blk_getlength(blk) == 2 << 20
    assert blk_truncate(blk, 512 << 10) == 0
    assert os.path.getsize(img) == 512 << 10
    blk_unref(blk)


def test_flush_failure_poisons_later_flushes(img, monkeypatch):
    """After one failed fdatasync every later flush fails (QEMU's page_cache_inconsistent)."""
    import qblock.drivers.file_posix.file_posix_aio as fp  # where handle_aiocb_flush calls os.fdatasync
    blk = _open(img)
    blk_pwrite(blk, 0, b"x" * 512)
    monkeypatch.setattr(fp.os, "fdatasync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "boom")))
    assert blk_flush(blk) == -errno.EIO
    monkeypatch.undo()
    blk_pwrite(blk, 0, b"y" * 512)
    assert blk_flush(blk) == -errno.EIO
    blk_unref(blk)


def test_o_direct_pads_to_the_probed_alignment(img):
    """cache.direct=on probes request_alignment and unaligned requests are padded (RMW) against the file."""
    try:
        blk = _open(img, **{"cache.direct": "on"})
    except Error as e:
        pytest.skip(f"O_DIRECT not available here: {e}")
    bs = blk_bs(blk)
    assert bs.bl.request_alignment in (512, 1024, 2048, 4096)
    assert blk_pwrite(blk, 10, b"hello") == 5
    buf = bytearray(20)
    assert blk_pread(blk, 0, buf) == 20
    assert bytes(buf) == b"\0" * 10 + b"hello" + b"\0" * 5
    blk_unref(blk)
    with open(img, "rb") as f:
        assert f.read(15)[10:] == b"hello"


def test_create_rounds_size_up_to_a_sector(tmp_path):
    """File creation makes a file of the requested size rounded up to 512, as qemu-img create does."""
    path = str(tmp_path / "new.img")
    drv = bdrv_find_format("file")
    assert drv.bdrv_co_create_opts(path, {"size": "1000"}) == 0
    assert os.path.getsize(path) == 1024
    with pytest.raises(Error, match="Invalid preallocation mode: 'bogus'"):
        drv.bdrv_co_create_opts(path, {"size": "1M", "preallocation": "bogus"})


def test_vectored_io_across_many_buffers(img):
    """A request made of many small buffers reaches the file in one piece, in order."""
    from qblock.block.block_backend import blk_preadv, blk_pwritev
    from qblock.util.iov import QEMUIOVector, qemu_iovec_add, qemu_iovec_init
    bufs = [bytearray([i]) * 512 for i in range(64)]
    q = qemu_iovec_init(None, 64)
    for b in bufs:
        qemu_iovec_add(q, b)
    blk = _open(img)
    assert blk_pwritev(blk, 4096, q) == 0
    out = [bytearray(512) for _ in range(64)]
    q2 = QEMUIOVector([memoryview(b) for b in out], 64)
    assert blk_preadv(blk, 4096, q2) == 0
    assert out == bufs
    blk_unref(blk)
