"""The blkdebug filter (block/blkdebug.c): rules, states, limits and breakpoints."""
import errno

import pytest

from qblock.block.block_backend import (
    blk_aio_pwritev,
    blk_bs,
    blk_flush,
    blk_new_open,
    blk_pread,
    blk_pwrite,
    blk_unref,
)
from qblock.block.driver import BDRV_O_RDWR
from qblock.testing.memdrv import memdrv_options
from qblock.util.aio import aio_poll, qemu_get_aio_context
from qblock.util.error import Error
from qblock.util.iov import QEMU_IOVEC_INIT_BUF


def _open(**opts):
    o = {"driver": "blkdebug", "image": memdrv_options("co", size=1 << 20)}
    o.update(opts)
    return blk_new_open(None, None, o, BDRV_O_RDWR)


def test_inject_error_once_on_pwritev():
    """An inject-error rule on the pwritev event fails the next write once with its errno."""
    blk = _open(**{"inject-error.0.event": "pwritev", "inject-error.0.errno": "28", "inject-error.0.once": "on"})
    assert blk_pwrite(blk, 0, b"x" * 512) == -errno.ENOSPC
    assert blk_pwrite(blk, 0, b"x" * 512) == 512
    blk_unref(blk)


def test_inject_error_without_once_keeps_failing():
    """Without once the rule stays active: later writes and reads fail too (as real qemu-io shows)."""
    blk = _open(**{"inject-error.event": "pwritev"})
    assert blk_pread(blk, 0, bytearray(512)) == 512   # not active before its event fired
    assert blk_pwrite(blk, 0, b"x" * 512) == -errno.EIO
    assert blk_pread(blk, 0, bytearray(512)) == -errno.EIO
    assert blk_pwrite(blk, 4096, b"x" * 512) == -errno.EIO
    blk_unref(blk)


def test_sector_and_iotype_filters():
    """A rule bound to a sector only fails requests covering it; iotype restricts the kind of request."""
    blk = _open(**{"inject-error.0.event": "pwritev", "inject-error.0.sector": "8"})
    assert blk_pwrite(blk, 0, b"x" * 512) == 512
    assert blk_pwrite(blk, 4096, b"x" * 512) == -errno.EIO
    blk_unref(blk)
    blk = _open(**{"inject-error.0.event": "none", "inject-error.0.iotype": "flush"})
    assert blk_pwrite(blk, 0, b"x" * 512) == 512
    assert blk_flush(blk) == -errno.EIO
    blk_unref(blk)


def test_failure_is_asynchronous_unless_immediately():
    """Without immediately the failing request completes only after the event loop turns."""
    blk = _open(**{"inject-error.0.event": "pwritev"})
    results = []
    blk_aio_pwritev(blk, 0, QEMU_IOVEC_INIT_BUF(bytearray(512)), 0, lambda o, r: results.append(r), None)
    assert results == []
    while not results:
        aio_poll(qemu_get_aio_context(), True)
    assert results == [-errno.EIO]
    blk_unref(blk)


def test_set_state_machine():
    """Rules see the state from before the event; set-state moves it for later events."""
    blk = _open(**{"set-state.0.event": "pwritev", "set-state.0.state": "1", "set-state.0.new_state": "2",
                   "inject-error.0.event": "pwritev", "inject-error.0.state": "2"})
    assert blk_pwrite(blk, 0, b"x" * 512) == 512      # state 1 -> 2, the error rule did not match yet
    assert blk_pwrite(blk, 0, b"x" * 512) == -errno.EIO
    assert blk_bs(blk).opaque.state == 2
    blk_unref(blk)


def test_config_file(tmp_path):
    """Rules can come from a config file in QEMU's syntax."""
    cfg = tmp_path / "blkdebug.conf"
    cfg.write_text('# fail the first write\n[inject-error]\nevent = "pwritev"\nerrno = "5"\nonce = "on"\n')
    blk = _open(config=str(cfg))
    assert blk_pwrite(blk, 0, b"x" * 512) == -errno.EIO
    assert blk_pwrite(blk, 0, b"x" * 512) == 512
    blk_unref(blk)
    with pytest.raises(Error, match="Could not read blkdebug config file"):
        _open(config=str(tmp_path / "missing"))


def test_align_makes_the_layer_pad():
    """align=4096 makes unaligned requests read-modify-write against the image."""
    blk = _open(align=4096)
    assert blk_bs(blk).bl.request_alignment == 4096
    assert blk_pwrite(blk, 100, b"abc") == 3
    calls = blk_bs(blk).file.bs.opaque.calls
    assert ("read", 0, 4096, 0) in calls and ("write", 0, 4096, 0) in calls
    buf = bytearray(6)
    blk_pread(blk, 99, buf)
    assert bytes(buf) == b"\0abc\0\0"
    blk_unref(blk)


@pytest.mark.parametrize("opts,msg", [
    ({"align": "3000"}, "Cannot meet constraints with align 3000"),
    ({"align": "4096", "max-transfer": "6000"}, "Cannot meet constraints with max-transfer 6000"),
    ({"inject-error.0.event": "bogus"}, "invalid parameter value: bogus"),
    ({"inject-error.0.errno": "5"}, "Missing event name for rule"),
])
def test_bad_options(opts, msg):
    """Invalid limits and rules fail the open with QEMU's messages."""
    with pytest.raises(Error, match=msg):
        _open(**opts)


def test_breakpoint_suspends_and_resumes():
    """A breakpoint on an event suspends the request there until resumed (qemu-io break/resume)."""
    blk = _open()
    bs = blk_bs(blk)
    drv = bs.drv
    assert drv.bdrv_debug_breakpoint(bs, "pwritev", "A") == 0
    assert drv.bdrv_debug_breakpoint(bs, "bogus", "B") == -errno.ENOENT
    results = []
    blk_aio_pwritev(blk, 0, QEMU_IOVEC_INIT_BUF(bytearray(b"z" * 512)), 0, lambda o, r: results.append(r), None)
    aio_poll(qemu_get_aio_context(), False)
    assert drv.bdrv_debug_is_suspended(bs, "A") and results == []
    assert drv.bdrv_debug_resume(bs, "A") == 0
    while not results:
        aio_poll(qemu_get_aio_context(), True)
    assert results == [0] and not drv.bdrv_debug_is_suspended(bs, "A")
    assert drv.bdrv_debug_resume(bs, "A") == -errno.ENOENT
    blk_unref(blk)


def test_blkdebug_filename_syntax(tmp_path):
    """The blkdebug:CONFIG:IMAGE filename names the config file and the image."""
    cfg = tmp_path / "c.conf"
    cfg.write_text('[inject-error]\nevent = "pwritev"\n')
    img = tmp_path / "i.img"
    img.write_bytes(bytes(65536))
    blk = blk_new_open(f"blkdebug:{cfg}:{img}", None, {"driver": "raw"}, BDRV_O_RDWR)
    assert blk_pwrite(blk, 0, b"x" * 512) == -errno.EIO
    blk_unref(blk)
    with pytest.raises(Error, match="blkdebug requires both config file and image path"):
        blk_new_open("blkdebug:nocolon", None, {"driver": "raw"}, BDRV_O_RDWR)
