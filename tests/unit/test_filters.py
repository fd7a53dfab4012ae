"""Filter drivers: copy-before-write, blkverify and log (block/copy-before-write.c, block/blkverify.c)."""
import errno
import shutil
import subprocess

import pytest

from qblock.block.block_backend import (
    blk_aio_pwritev,
    blk_bs,
    blk_flush,
    blk_new_open,
    blk_pdiscard,
    blk_pread,
    blk_pwrite,
    blk_pwrite_zeroes,
    blk_unref,
)
from qblock.block.driver import BDRV_O_RDWR, BDRV_O_UNMAP, BDRV_REQ_FUA
from qblock.testing.memdrv import memdrv_options
from qblock.trace.control import trace_add_sink, trace_enable_events, trace_remove_sink
from qblock.util.aio import aio_poll, qemu_get_aio_context
from qblock.util.error import Error
from qblock.util.iov import QEMU_IOVEC_INIT_BUF

MiB = 1 << 20
CLUSTER = 64 * 1024


def _drain(results, n):
    while len(results) < n:
        aio_poll(qemu_get_aio_context(), True)


# --------------------------------------------------------------------------
# copy-before-write

def _cbw(size=MiB, target=None, **file_opts):
    o = {"driver": "copy-before-write",
         "file": memdrv_options("co", write_zeroes=True, discard=True, size=size, **file_opts),
         "target": target or memdrv_options("co", size=size)}
    blk = blk_new_open(None, None, o, BDRV_O_RDWR | BDRV_O_UNMAP)
    bs = blk_bs(blk)
    return blk, bs.file.bs.opaque, bs.opaque.target.bs.opaque


def test_cbw_copies_old_data_once_per_cluster():
    """The first write to a cluster copies its old content to the target; later writes go straight down."""
    blk, src, tgt = _cbw()
    src.data[:] = bytes(range(256)) * (MiB // 256)
    old = bytes(src.data)
    assert blk_pwrite(blk, 4096, b"\xaa" * 512) == 512
    assert [c[:3] for c in tgt.calls] == [("write", 0, CLUSTER)]
    assert tgt.data[:CLUSTER] == old[:CLUSTER]
    assert src.data[4096:4608] == b"\xaa" * 512
    assert blk_pwrite(blk, 8192, b"\xbb" * 512) == 512          # same cluster: no second copy
    assert len(tgt.calls) == 1
    assert tgt.data[:CLUSTER] == old[:CLUSTER]                  # the target keeps the point-in-time view
    # A write spanning two new clusters copies both.
    assert blk_pwrite(blk, 2 * CLUSTER - 512, b"\xcc" * 1024) == 1024
    assert [c[1:3] for c in tgt.calls[1:]] == [(CLUSTER, CLUSTER), (2 * CLUSTER, CLUSTER)]
    assert tgt.data[CLUSTER:3 * CLUSTER] == old[CLUSTER:3 * CLUSTER]
    blk_unref(blk)


def test_cbw_reads_pass_through_without_copying():
    blk, src, tgt = _cbw()
    src.data[:4] = b"abcd"
    buf = bytearray(4)
    assert blk_pread(blk, 0, buf) == 4 and buf == b"abcd"
    assert tgt.calls == []
    blk_unref(blk)


def test_cbw_zero_write_and_discard_copy_first():
    """write-zeroes and discard destroy old data too, so they copy before reaching the file."""
    blk, src, tgt = _cbw()
    src.data[:] = b"\x11" * MiB
    assert blk_pwrite_zeroes(blk, 0, 4096) == 0
    assert blk_pdiscard(blk, 3 * CLUSTER, CLUSTER) == 0
    assert [c[1] for c in tgt.calls] == [0, 3 * CLUSTER]
    assert tgt.data[:CLUSTER] == b"\x11" * CLUSTER
    assert tgt.data[3 * CLUSTER:4 * CLUSTER] == b"\x11" * CLUSTER
    assert src.data[:4096] == bytes(4096)
    blk_unref(blk)


def test_cbw_concurrent_writes_wait_for_the_copy():
    """A second write to a cluster whose copy is in flight waits for it; the copy happens once."""
    blk, src, tgt = _cbw(latency_ns=1_000_000)
    src.data[:] = b"\x22" * MiB
    names = []
    sink = trace_add_sink(lambda rec: names.append(rec.name))
    trace_enable_events("cbw_*")
    results = []
    for off, byte in ((0, 0x33), (4096, 0x44)):
        blk_aio_pwritev(blk, off, QEMU_IOVEC_INIT_BUF(bytearray([byte]) * 4096), 0,
                        lambda o, r: results.append(r), None)
    _drain(results, 2)
    assert results == [0, 0]
    assert len(tgt.calls) == 1 and tgt.data[:CLUSTER] == b"\x22" * CLUSTER
    assert src.data[:4096] == b"\x33" * 4096 and src.data[4096:8192] == b"\x44" * 4096
    trace_remove_sink(sink)
    assert "cbw_wait_cluster" in names and names.count("cbw_copy_cluster") == 1
    blk_unref(blk)


def test_cbw_copy_error_fails_the_guest_write():
    """If the old data cannot be saved, the guest write fails with that errno and the file is untouched."""
    blk, src, tgt = _cbw(target=memdrv_options("co", size=MiB, fail=errno.ENOSPC))
    src.data[:] = b"\x55" * MiB
    assert blk_pwrite(blk, 0, b"\x66" * 512) == -errno.ENOSPC
    assert src.data[:512] == b"\x55" * 512
    # Nothing was recorded as copied: once the target works again, the copy is retried.
    tgt.fail = 0
    assert blk_pwrite(blk, 0, b"\x66" * 512) == 512
    assert tgt.data[:CLUSTER] == b"\x55" * CLUSTER
    blk_unref(blk)


def test_cbw_target_smaller_than_source_is_refused():
    with pytest.raises(Error, match="The target is smaller than the source"):
        _cbw(target=memdrv_options("co", size=MiB // 2))


def test_cbw_flush_reaches_both_children():
    blk, src, tgt = _cbw()
    assert blk_pwrite(blk, 0, b"w" * 512) == 512    # something to flush: the guest data and the copy
    assert blk_flush(blk) == 0
    assert src.flushes == 1 and tgt.flushes == 1
    blk_unref(blk)


# --------------------------------------------------------------------------
# blkverify

def _blkverify(test_opts=None, raw_opts=None):
    o = {"driver": "blkverify",
         "raw": raw_opts or memdrv_options("co", size=MiB),
         "test": test_opts or memdrv_options("co", size=MiB)}
    blk = blk_new_open(None, None, o, BDRV_O_RDWR)
    bs = blk_bs(blk)
    return blk, bs.opaque.test_file.bs.opaque, bs.file.bs.opaque, bs.opaque


def test_blkverify_writes_both_and_reads_compare():
    blk, test, raw, s = _blkverify()
    assert blk_pwrite(blk, 1000, b"hello") == 5
    assert test.data[1000:1005] == raw.data[1000:1005] == b"hello"
    buf = bytearray(5)
    assert blk_pread(blk, 1000, buf) == 5 and buf == b"hello"
    assert s.mismatches == []
    blk_unref(blk)


def test_blkverify_contents_mismatch(capsys):
    """A byte that differs fails the read with -EIO and names the first differing offset, in QEMU's words."""
    blk, test, raw, s = _blkverify()
    test.data[4096 + 300] = 1
    assert blk_pread(blk, 4096, bytearray(512)) == -errno.EIO
    line = "blkverify: read offset=4096 bytes=512 contents mismatch at offset 4396"
    assert s.mismatches == [line]
    assert line in capsys.readouterr().err
    blk_unref(blk)


def test_blkverify_return_value_mismatch():
    blk, test, raw, s = _blkverify(test_opts=memdrv_options("co", size=MiB, fail=errno.EIO))
    assert blk_pwrite(blk, 0, b"x" * 512) == -errno.EIO
    assert s.mismatches == ["blkverify: write offset=0 bytes=512 return value mismatch -5 != 0"]
    blk_unref(blk)


def test_blkverify_both_children_run_concurrently():
    """The two children are served by their own coroutines: with latency both are in flight at once."""
    lat = {"latency_ns": 1_000_000}
    blk, test, raw, s = _blkverify(memdrv_options("co", size=MiB, **lat), memdrv_options("co", size=MiB, **lat))
    ctx = qemu_get_aio_context()
    from qblock.util.timer import QEMU_CLOCK_VIRTUAL, qemu_clock_get_ns
    start = qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL)
    results = []
    blk_aio_pwritev(blk, 0, QEMU_IOVEC_INIT_BUF(bytearray(512)), 0, lambda o, r: results.append(r), None)
    _drain(results, 1)
    assert results == [0]
    assert qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) - start == 1_000_000     # not 2 ms: they overlapped
    assert ctx is not None
    blk_unref(blk)


def test_blkverify_filename_needs_both_paths():
    with pytest.raises(Error, match="blkverify requires raw copy and original image path"):
        blk_new_open("blkverify:only-one", None, {}, BDRV_O_RDWR)


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io")
def test_blkverify_mismatch_line_matches_qemu_io(tmp_path, capsys):
    """The mismatch report is the line real qemu-io prints for the same pair of images."""
    raw, img = tmp_path / "raw.img", tmp_path / "test.img"
    raw.write_bytes(bytes(MiB))
    data = bytearray(MiB)
    data[8192 + 17] = 9
    img.write_bytes(bytes(data))
    spec = f"blkverify:{raw}:{img}"
    q = subprocess.run(["qemu-io", "-c", "read 8192 4096", spec], capture_output=True, text=True)
    qemu_line = next(line for line in q.stderr.splitlines() if line.startswith("blkverify:"))
    blk = blk_new_open(spec, None, {}, 0)      # probed: raw over the blkverify protocol node, as in QEMU
    assert blk_bs(blk).drv.format_name == "raw"
    assert blk_pread(blk, 8192, bytearray(4096)) == -errno.EIO
    assert blk_bs(blk).file.bs.opaque.mismatches == [qemu_line]
    assert qemu_line in capsys.readouterr().err
    blk_unref(blk)


# --------------------------------------------------------------------------
# log

def _parse(line):
    fields = {}
    for tok in line.split():
        k, _, v = tok.partition("=")
        fields[k] = v if _ else True
    return fields


def test_log_one_line_per_request_and_completion(tmp_path):
    path = tmp_path / "q.log"
    o = {"driver": "log", "logfile": str(path), "node-name": "log0",
         "file": memdrv_options("co", size=MiB, fua=True, latency_ns=500)}
    blk = blk_new_open(None, None, o, BDRV_O_RDWR)
    assert blk_pwrite(blk, 0x1000, b"z" * 0x1000, flags=BDRV_REQ_FUA) == 0x1000
    assert blk_pread(blk, 0, bytearray(512)) == 512
    assert blk_flush(blk) == 0
    blk_unref(blk)
    lines = [_parse(line) for line in path.read_text().splitlines()]
    # The last flush is the one closing the node makes (bdrv_close flushes; the filter's
    # bdrv_co_flush hook runs even when nothing new was written, as in QEMU).
    assert [(f["op"], "return" in f) for f in lines] == [
        ("write", False), ("write", True), ("read", False), ("read", True), ("flush", False), ("flush", True),
        ("flush", False), ("flush", True)]
    w, wr = lines[0], lines[1]
    assert (w["node"], w["id"], w["offset"], w["count"], w["fua"]) == ("log0", "1", "0x1000", "0x1000", "1")
    assert (wr["id"], wr["ret"], wr["elapsed_ns"]) == ("1", "0", "500")     # virtual clock in tests
    assert lines[2]["id"] == "2" and lines[2]["fua"] == "0"
    assert "offset" in lines[4] and "fua" not in lines[4]


def test_log_bad_logfile_is_a_clear_error(tmp_path):
    o = {"driver": "log", "logfile": str(tmp_path / "no" / "such" / "dir"),
         "file": memdrv_options("co", size=MiB)}
    with pytest.raises(Error, match="Could not open log file"):
        blk_new_open(None, None, o, BDRV_O_RDWR)


# --------------------------------------------------------------------------
# copy-on-read

def test_copy_on_read_populates_the_top_image_from_its_backing_file(tmp_path):
    """Reads through copy-on-read copy what came from the backing file into the top qcow2 image, once."""
    from qblock.block.create import bdrv_create
    from qblock.block.driver import bdrv_find_format
    from qblock.block.io import bdrv_is_allocated

    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    base.write_bytes(bytes(range(256)) * (MiB // 256))
    bdrv_create(bdrv_find_format("qcow2"), str(top),
                {"size": MiB, "backing_file": str(base), "backing_fmt": "raw", "cluster_size": 65536})
    o = {"driver": "copy-on-read", "node-name": "cor",
         "file": {"driver": "qcow2", "node-name": "top", "file.driver": "file", "file.filename": str(top)}}
    blk = blk_new_open(None, None, o, BDRV_O_RDWR)
    topbs = blk_bs(blk).file.bs
    assert bdrv_is_allocated(topbs, 0, CLUSTER) == (0, CLUSTER)
    buf = bytearray(1000)
    assert blk_pread(blk, 70000, buf) == 1000
    assert bytes(buf) == base.read_bytes()[70000:71000]
    # The whole cluster the read touched is in the top image now; the others are still not.
    assert bdrv_is_allocated(topbs, CLUSTER, CLUSTER) == (1, CLUSTER)
    assert bdrv_is_allocated(topbs, 0, CLUSTER)[0] == 0
    # Overwrite the base: the top image keeps the copy, so the data read earlier does not change.
    with open(base, "r+b") as f:
        f.write(b"\xff" * MiB)
    assert blk_pread(blk, CLUSTER, buf) == 1000
    assert bytes(buf) == (bytes(range(256)) * 4)[:1000]
    blk_unref(blk)
    # Without the filter, a plain read of another cluster copies nothing.
    blk = blk_new_open(None, None, {"driver": "qcow2", "file.driver": "file", "file.filename": str(top)},
                       BDRV_O_RDWR)
    assert blk_pread(blk, 3 * CLUSTER, buf) == 1000 and bytes(buf) == b"\xff" * 1000
    assert bdrv_is_allocated(blk_bs(blk), 3 * CLUSTER, CLUSTER)[0] == 0
    blk_unref(blk)
    if shutil.which("qemu-img"):
        r = subprocess.run(["qemu-img", "check", str(top)], capture_output=True, text=True)
        assert r.returncode == 0 and "No errors were found on the image." in r.stdout, r.stdout + r.stderr
