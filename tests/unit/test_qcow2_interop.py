"""qcow2 interop with the real QEMU tools (Debian's qemu-utils: qemu-img, qemu-io).

Images qblock creates and writes pass ``qemu-img check`` and read back through qemu-io and ``qemu-img
compare``; images QEMU creates and writes (patterns, zero writes, discards, compressed clusters, backing
chains, internal snapshots, a lazy-refcounts crash) read back through qblock, which can go on writing them;
``qemu-img map`` agrees with qblock's block status; errors injected under the driver leave ``qemu-img check``
free of corruptions.  Skipped when qemu-img or qemu-io is missing (CI installs them).
"""
from __future__ import annotations

import errno
import json
import shutil
import struct
import subprocess

import pytest

from qblock.block.block_backend import (
    blk_bs,
    blk_flush,
    blk_pdiscard,
    blk_pread,
    blk_pwrite,
    blk_pwrite_zeroes,
    blk_unref,
)
from qblock.block.driver import (
    BDRV_BLOCK_ALLOCATED,
    BDRV_BLOCK_DATA,
    BDRV_BLOCK_OFFSET_VALID,
    BDRV_BLOCK_ZERO,
    BDRV_O_RDWR,
    BDRV_REQ_MAY_UNMAP,
    BDRV_REQ_WRITE_COMPRESSED,
)
from qblock.block.io import bdrv_block_status_above
from qblock.util.error import Error

from .qcow2_util import create, header, open_blk, poke

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="needs qemu-img and qemu-io (Debian's qemu-utils; .ci/run installs them)")
MiB = 1 << 20


def run(*args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout}{r.stderr}")
    return r


def qemu_img_check(path) -> subprocess.CompletedProcess:
    return run("qemu-img", "check", "-f", "qcow2", path, check=False)


def assert_check_clean(path) -> None:
    r = qemu_img_check(path)
    assert r.returncode == 0 and "No errors were found on the image." in r.stdout, r.stdout + r.stderr


def qemu_io(path, *cmds, fmt="qcow2", check=True) -> subprocess.CompletedProcess:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    r = run(*args, path, check=check)
    if check:
        assert "Pattern verification failed" not in r.stdout and "failed" not in r.stdout, r.stdout
    return r


def read_all(path, **opts) -> bytes:
    blk = open_blk(path, 0, **opts)
    size = blk_bs(blk).total_sectors * 512
    buf = bytearray(size)
    assert blk_pread(blk, 0, buf) == size
    blk_unref(blk)
    return bytes(buf)


def as_raw(tmp_path, path) -> bytes:
    """QEMU's own view of an image's content."""
    out = tmp_path / "view.raw"
    run("qemu-img", "convert", "-O", "raw", path, out)
    return out.read_bytes()


# --------------------------------------------------------------------------
# Byte for byte what qemu-img and qemu-io produce


@pytest.mark.parametrize("opts,qopts", [
    ({}, []),
    ({"cluster_size": 512}, ["-o", "cluster_size=512"]),
    ({"cluster_size": 2 * MiB}, ["-o", "cluster_size=2M"]),
    ({"compat": "0.10"}, ["-o", "compat=0.10"]),
    ({"lazy_refcounts": "on", "refcount_bits": 1}, ["-o", "lazy_refcounts=on,refcount_bits=1"]),
    ({"preallocation": "metadata", "cluster_size": 4096}, ["-o", "preallocation=metadata,cluster_size=4096"]),
], ids=["default", "512", "2M", "v2", "lazy-rc1", "prealloc"])
def test_create_is_byte_identical_to_qemu_img(tmp_path, opts, qopts):
    """qblock's create writes exactly the file ``qemu-img create -f qcow2`` writes."""
    a = create(tmp_path / "a.qcow2", 96 * MiB + 512, **opts)
    run("qemu-img", "create", "-q", "-f", "qcow2", *qopts, tmp_path / "b.qcow2", 96 * MiB + 512)
    assert (tmp_path / "b.qcow2").read_bytes() == open(a, "rb").read()


def test_create_with_backing_file_is_byte_identical(tmp_path):
    """A backing file name and format land where qemu-img puts them."""
    run("qemu-img", "create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", 4 * MiB)
    a = create(tmp_path / "a.qcow2", 8 * MiB, backing_file="base.qcow2", backing_fmt="qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", tmp_path / "b.qcow2", "8M")
    assert (tmp_path / "b.qcow2").read_bytes() == open(a, "rb").read()


OPS = [("w", 0x11, 0, 4096), ("w", 0x22, 3 * 65536 + 100, 200000), ("w", 0x33, 5 * MiB, MiB),
       ("z", 0, 5 * MiB, 4 * 65536, 0), ("w", 0x44, 1000, 70000), ("d", 0, 3 * 65536, 4 * 65536),
       ("z", 0, 5 * MiB + 8 * 65536, 2 * 65536, 1), ("w", 0x55, 30 * MiB, 10000)]


def apply_ops(blk, ops) -> list[str]:
    """Run ``ops`` through qblock; the same operations as qemu-io commands."""
    cmds = []
    for op in ops:
        if op[0] == "w":
            assert blk_pwrite(blk, op[2], bytes([op[1]]) * op[3]) == op[3]
            cmds.append(f"write -P {op[1]:#x} {op[2]} {op[3]}")
        elif op[0] == "z":
            assert blk_pwrite_zeroes(blk, op[2], op[3], BDRV_REQ_MAY_UNMAP if op[4] else 0) == 0
            cmds.append(f"write -z {'-u ' if op[4] else ''}{op[2]} {op[3]}")
        else:
            assert blk_pdiscard(blk, op[2], op[3]) == 0
            cmds.append(f"discard {op[2]} {op[3]}")
    return cmds


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cs", [512, 65536])
def test_same_writes_give_the_same_file_as_qemu_io(tmp_path, cs, compat):
    """Writes, zero writes and discards through qblock leave the file qemu-io leaves, byte for byte."""
    a = create(tmp_path / "a.qcow2", 64 * MiB, cluster_size=cs, compat=compat)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs},compat={compat}", tmp_path / "b.qcow2",
        "64M")
    blk = open_blk(a, discard="unmap")
    cmds = apply_ops(blk, OPS)
    blk_unref(blk)
    qemu_io(tmp_path / "b.qcow2", *cmds)
    assert (tmp_path / "b.qcow2").read_bytes() == open(a, "rb").read()
    assert_check_clean(a)


# --------------------------------------------------------------------------
# Images qblock writes, as QEMU sees them


@pytest.mark.parametrize("backing", [False, True], ids=["alone", "backed"])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cs", [512, 65536, 2 * MiB])
def test_qblock_images_pass_check_and_read_back_in_qemu(tmp_path, cs, compat, backing):
    """qemu-img check finds no errors or leaks; qemu-io reads the patterns; qemu-img compare equals a raw image."""
    size = 40 * MiB
    raw = tmp_path / "model.raw"
    opts = {}
    if backing:
        base = tmp_path / "base.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", base, "24M")
        qemu_io(base, "write -P 0x99 0 24M")
        opts = dict(backing_file=str(base), backing_fmt="qcow2")
        run("qemu-img", "convert", "-O", "raw", base, raw)
        run("qemu-img", "resize", "-f", "raw", raw, size)
    else:
        run("qemu-img", "create", "-q", "-f", "raw", raw, size)
    img = create(tmp_path / "img.qcow2", size, cluster_size=cs, compat=compat, **opts)
    ops = [("w", 0x11, 0, 4096), ("w", 0x22, 3 * 65536 + 100, 200000), ("w", 0x33, 5 * MiB, MiB),
           ("z", 0, 5 * MiB, 4 * 65536, 0), ("w", 0x44, 1000, 70000), ("z", 0, 8 * MiB, 2 * MiB, 1),
           ("w", 0x55, 30 * MiB, 10000), ("w", 0x66, 30 * MiB - 300, 1000)]
    if not (backing and compat == "0.10"):
        ops.append(("d", 0, 4 * MiB, 4 * MiB))      # cluster-aligned for every cluster size here
    blk = open_blk(img, discard="unmap")
    cmds = apply_ops(blk, ops)
    blk_unref(blk)
    assert_check_clean(img)
    qemu_io(raw, *cmds, fmt="raw")
    r = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, raw, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    reads = ["read -P 0x11 0 1000", "read -P 0x44 1000 70000", "read -P 0x66 31456980 1000",
             "read -P 0x55 31457980 9300"]
    qemu_io(img, *reads)


def test_qblock_compressed_clusters_in_qemu(tmp_path):
    """Clusters qblock writes compressed pass qemu-img check, show as compressed data and read back in qemu-io."""
    img = create(tmp_path / "c.qcow2", 4 * MiB)
    blk = open_blk(img)
    for i in range(8):
        assert blk_pwrite(blk, i * 65536, bytes([0x41 + i]) * 65536, flags=BDRV_REQ_WRITE_COMPRESSED) == 65536
    blk_unref(blk)
    r = qemu_img_check(img)
    assert r.returncode == 0 and "100.00% compressed clusters" in r.stdout, r.stdout
    qemu_io(img, *[f"read -P {0x41 + i:#x} {i * 65536} 65536" for i in range(8)])
    entries = json.loads(run("qemu-img", "map", "--output=json", img).stdout)
    assert entries[0]["data"] and "offset" not in entries[0]


# --------------------------------------------------------------------------
# Images QEMU writes, through qblock


def test_qemu_written_images_read_back_and_take_writes(tmp_path):
    """Patterns, zero writes (with and without unmap), discards and compressed writes from qemu-io read back."""
    img = tmp_path / "q.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "16M")
    qemu_io(img, "write -P 0xa1 0 1M", "write -P 0xa2 3M 300000", "write -z 100k 64k", "write -z -u 512k 64k",
            "discard 3M 64k", "write -c -P 0xa3 8M 4096", "write -c -P 0xa4 8196k 4096", "write -P 0xa5 15M 1M")
    assert read_all(img) == as_raw(tmp_path, img)
    blk = open_blk(img)
    assert blk_pwrite(blk, 8 * MiB + 100, b"\xb1" * 5000) == 5000        # over a compressed cluster
    assert blk_pwrite(blk, 90000, b"\xb2" * 200000) == 200000
    blk_unref(blk)
    assert_check_clean(img)
    qemu_io(img, "read -P 0xa3 8M 100", "read -P 0xb1 8388708 5000", "read -P 0xa4 8393708 3092",
            "read -P 0xb2 90000 200000", "read -P 0xa1 290000 10000")


def test_qemu_img_convert_compressed_image_reads_back(tmp_path):
    """An image from ``qemu-img convert -c`` (compressed clusters) reads back as its source."""
    src = tmp_path / "src.raw"
    run("qemu-img", "create", "-q", "-f", "raw", src, "6M")
    qemu_io(src, "write -P 0x61 0 2M", "write -P 0x62 3M 100k", "write -P 0 5M 64k", fmt="raw")
    img = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", src, img)
    assert read_all(img) == src.read_bytes()
    blk = open_blk(img)
    assert blk_pwrite(blk, MiB + 7, b"\x63" * 100) == 100
    blk_unref(blk)
    assert_check_clean(img)


def test_backing_chain_made_by_qemu_img(tmp_path):
    """A three-level chain from ``qemu-img create -b``: reads fall through; writes COW from below."""
    base, mid, top = tmp_path / "base.qcow2", tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
    qemu_io(base, "write -P 0x01 0 4M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid, "6M")
    qemu_io(mid, "write -P 0x02 1M 1M", "write -z 2M 64k")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top, "8M")
    qemu_io(top, "write -P 0x03 1536k 4k")
    assert read_all(top) == as_raw(tmp_path, top)
    blk = open_blk(top)
    assert blk_pwrite(blk, 2 * MiB + 100, b"\x04" * 100) == 100
    assert blk_pwrite(blk, 5 * MiB, b"\x05" * 100) == 100            # past the base's end
    blk_unref(blk)
    assert_check_clean(top)
    qemu_io(top, "read -P 0 2M 100", "read -P 0x04 2097252 100", "read -P 0 2097352 100", "read -P 0x01 64k 4k",
            "read -P 0x03 1536k 4k", "read -P 0x02 1540k 4k", "read -P 0x05 5M 100", "read -P 0 6M 2M")


def test_image_with_internal_snapshots(tmp_path):
    """The active layer of an image with an internal snapshot reads back; a write COWs shared clusters correctly."""
    img = tmp_path / "s.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 0x41 0 1M")
    run("qemu-img", "snapshot", "-c", "snap1", img)
    qemu_io(img, "write -P 0x42 512k 1M")
    assert read_all(img) == as_raw(tmp_path, img)
    blk = open_blk(img)
    assert len(blk_bs(blk).opaque.snapshots) == 1
    assert blk_pwrite(blk, 100, b"\x43" * 200000) == 200000
    blk_unref(blk)
    assert_check_clean(img)
    assert "snap1" in run("qemu-img", "snapshot", "-l", img).stdout
    run("qemu-img", "snapshot", "-a", "snap1", img)
    qemu_io(img, "read -P 0x41 0 1M", "read -P 0 1M 3M")


def test_map_agrees_with_block_status(tmp_path):
    """On a mixed image (data, zero clusters, unallocated, compressed, backing data) qemu-img map and qblock agree."""
    base, img = tmp_path / "base.qcow2", tmp_path / "m.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "2M")
    qemu_io(base, "write -P 0x01 0 1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", img, "4M")
    qemu_io(img, "write -P 0x02 64k 128k", "write -z 512k 64k", "write -P 0x03 1M 64k", "write -z 1088k 64k",
            "write -c -P 0x04 2M 64k", "write -P 0x05 3M 4k")
    entries = json.loads(run("qemu-img", "map", "--output=json", img).stdout)
    blk = open_blk(img, 0)
    bs = blk_bs(blk)
    for e in entries:
        for pos in range(e["start"], e["start"] + e["length"], 65536):
            ret, pnum, map_, _ = bdrv_block_status_above(bs, None, pos, 65536)
            assert pnum > 0
            what = f"at {pos:#x}: qemu {e}, qblock flags {ret:#x} map {map_:#x}"
            assert bool(ret & BDRV_BLOCK_ZERO) == e["zero"], what
            assert bool(ret & BDRV_BLOCK_DATA) == e["data"], what
            assert bool(ret & BDRV_BLOCK_ALLOCATED) == e["present"], what
            if "offset" in e:
                assert ret & BDRV_BLOCK_OFFSET_VALID and map_ == e["offset"] + pos - e["start"], what
    blk_unref(blk)


# --------------------------------------------------------------------------
# Crashes, corruption and injected errors


def test_lazy_refcounts_image_killed_in_qemu_is_repaired(tmp_path):
    """iotest 039: qemu-io dies (sigraise 9) with the dirty bit set; a writable qblock open repairs the image."""
    img = tmp_path / "l.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=1.1,lazy_refcounts=on", img, "128M")
    qemu_io(img, "write -P 0x5a 0 512", "sigraise 9", check=False)
    assert header(img)["incompatible_features"] == 1
    r = qemu_img_check(img)
    assert r.returncode == 2 and "ERROR cluster 5 refcount=0 reference=1" in r.stdout + r.stderr
    blk = open_blk(img, 0)                  # read-only: readable, left dirty
    buf = bytearray(512)
    assert blk_pread(blk, 0, buf) == 512 and buf == b"\x5a" * 512
    blk_unref(blk)
    assert header(img)["incompatible_features"] == 1
    blk_unref(open_blk(img))
    assert header(img)["incompatible_features"] == 0
    assert_check_clean(img)
    qemu_io(img, "read -P 0x5a 0 512")


def test_corruption_is_marked_as_qemu_marks_it(tmp_path):
    """iotest 060: a write that would hit the L1 table marks the image corrupt; QEMU then refuses read/write."""
    img = tmp_path / "x.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "64M")
    poke(img, 0x30000, struct.pack(">Q", 0x8000000000030000))
    r = qemu_img_check(img)
    assert r.returncode == 2 and "ERROR cluster 3 refcount=1 reference=3" in r.stdout + r.stderr
    blk = open_blk(img)
    assert blk_pwrite(blk, 0, b"\x2a" * 512) == -errno.EIO
    blk_unref(blk)
    assert "corrupt: true" in run("qemu-img", "info", img).stdout
    r = qemu_io(img, "read 0 512", check=False)
    assert "Image is corrupt; cannot be opened read/write" in r.stderr
    with pytest.raises(Error, match="Image is corrupt; cannot be opened read/write"):
        open_blk(img)
    assert "read 512/512" in run("qemu-io", "-r", "-c", "read 0 512", img).stdout


@pytest.mark.parametrize("event", ["l2_update", "refblock_update_part", "l1_update", "cow_write", "write_aio",
                                   "refblock_alloc_hookup", "l2_alloc_write"])
def test_injected_errors_leave_qemu_img_check_free_of_corruption(tmp_path, event):
    """Errors injected at qcow2 debug events fail requests; qemu-img check then reports leaks at most."""
    img = create(tmp_path / "e.qcow2", 64 * MiB, cluster_size=512)
    blk = open_blk(None, **{"file.driver": "blkdebug", "file.image.driver": "file", "file.image.filename": img,
                            "file.inject-error.0.event": event, "file.inject-error.0.errno": "5"}, discard="unmap")
    rets = [blk_pwrite(blk, 0, b"\x11" * 4096), blk_pwrite(blk, 1000, b"\x12" * 200000),
            blk_pwrite_zeroes(blk, 5120, 2048, BDRV_REQ_MAY_UNMAP), blk_pdiscard(blk, 10240, 4096),
            blk_pwrite(blk, 40 * MiB, b"\x13" * 100), blk_flush(blk)]
    blk_unref(blk)
    assert -errno.EIO in rets
    r = qemu_img_check(img)
    assert r.returncode in (0, 3), r.stdout + r.stderr      # 3: leaks only
    assert "ERROR" not in r.stdout + r.stderr
    assert header(img)["incompatible_features"] == 0
    blk = open_blk(img, BDRV_O_RDWR)                          # and the image is usable again
    assert blk_pwrite(blk, 0, b"\x14" * 512) == 512
    blk_unref(blk)
    assert qemu_img_check(img).returncode in (0, 3)
