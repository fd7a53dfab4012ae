"""qcow2's whole-image hooks: amend (compat, lazy refcounts, refcount width, size), specific info, measure,
zero init, make empty and the snapshot table's extra data.

The first half runs on qblock alone; the second compares with QEMU 7.2's qemu-img on copies of the same
images: same messages, same exit status and, for amend and commit, the same bytes in the file.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile

import pytest

from qblock.block.block_backend import blk_bs, blk_pread, blk_pwrite, blk_pwrite_zeroes, blk_unref
from qblock.block.driver import BDRV_REQ_WRITE_COMPRESSED
from qblock.util.error import Error

from .qcow2_util import check_blk, check_image, create, header, open_blk, poke
from .qemu_compat import HAVE_QEMU, NO_QEMU_REASON, Tools, make_tools

needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason=NO_QEMU_REASON)
MiB = 1 << 20


def amend(path, **opts):
    """Run the driver's amend hook on ``path`` with -o style options (strings, as qemu-img passes them)."""
    blk = open_blk(path)
    try:
        bs = blk_bs(blk)
        return bs.drv.bdrv_amend_options(bs, {k: v for k, v in opts.items()}, None, False)
    finally:
        blk_unref(blk)


def fill(path, compressed=True):
    """Data at 0 and 512k, a zero cluster at 128k (v3 only), compressed data at 768k."""
    blk = open_blk(path)
    assert blk_pwrite(blk, 0, b"\x11" * 65536) == 65536
    assert blk_pwrite(blk, 512 * 1024, b"\x22" * 100000) == 100000
    if header(path)["version"] == 3:
        assert blk_pwrite_zeroes(blk, 128 * 1024, 65536, 0) == 0
    if compressed:      # (several compressed clusters share a host cluster: refcounts above 1)
        assert blk_pwrite(blk, 768 * 1024, b"\x33" * 65536, flags=BDRV_REQ_WRITE_COMPRESSED) == 65536
    blk_unref(blk)


def contents(path, size=MiB) -> bytes:
    blk = open_blk(path, 0)
    buf = bytearray(size)
    assert blk_pread(blk, 0, buf) == size
    blk_unref(blk)
    return bytes(buf)


# --------------------------------------------------------------------------
# qblock alone


def test_downgrade_and_upgrade_keep_the_data_and_the_refcounts_right(tmp_path):
    """compat=0.10 turns zero clusters into plain unallocated ones and writes a v2 header; 1.1 brings v3 back."""
    p = create(tmp_path / "a.qcow2", MiB, lazy_refcounts="on")
    fill(p)
    before = contents(p)
    amend(p, compat="0.10")
    h = header(p)
    assert (h["version"], h["compatible_features"]) == (2, 0)
    assert contents(p) == before and check_image(p) == (0, 0, 0)
    amend(p, compat="1.1")
    assert header(p)["version"] == 3 and header(p)["header_length"] == 112
    assert contents(p) == before and check_image(p) == (0, 0, 0)


@pytest.mark.parametrize("bits", [1, 2, 8, 64])
def test_refcount_width_change_rewrites_every_refcount(tmp_path, bits):
    """refcount_bits=N writes new refcount blocks and table; the image checks clean and takes more writes."""
    p = create(tmp_path / "r.qcow2", 4 * MiB, cluster_size=4096)
    fill(p, compressed=bits > 4)
    before = contents(p)
    amend(p, refcount_bits=bits)
    assert header(p)["refcount_order"] == bits.bit_length() - 1
    assert contents(p) == before and check_image(p) == (0, 0, 0)
    blk = open_blk(p)
    assert blk_pwrite(blk, 2 * MiB, b"\x44" * 300000) == 300000
    res = check_blk(blk)
    assert (res.corruptions, res.leaks) == (0, 0)
    blk_unref(blk)


def test_refcount_width_too_narrow_for_a_shared_cluster_is_refused(tmp_path):
    """Two compressed clusters share a host cluster (refcount 2): 1-bit refcounts cannot hold that."""
    p = create(tmp_path / "c.qcow2", MiB)
    blk = open_blk(p)
    blk_pwrite(blk, 0, b"\x01" * 65536, flags=BDRV_REQ_WRITE_COMPRESSED)
    blk_pwrite(blk, 65536, b"\x02" * 65536, flags=BDRV_REQ_WRITE_COMPRESSED)
    blk_unref(blk)
    with pytest.raises(Error, match=r"^Cannot decrease refcount entry width to 1 bits: Cluster at offset 0x50000 "
                                    r"has a refcount of 2$"):
        amend(p, refcount_bits=1)
    assert header(p)["refcount_order"] == 4 and check_image(p) == (0, 0, 0)


def test_lazy_refcounts_on_and_off(tmp_path):
    """lazy_refcounts sets and clears the compatible feature bit; v2 images refuse it."""
    p = create(tmp_path / "l.qcow2", MiB)
    amend(p, lazy_refcounts="on")
    assert header(p)["compatible_features"] == 1
    amend(p, lazy_refcounts="off")
    assert header(p)["compatible_features"] == 0
    v2 = create(tmp_path / "v2.qcow2", MiB, compat="0.10")
    with pytest.raises(Error, match="^Lazy refcounts only supported with compatibility level 1.1"):
        amend(v2, lazy_refcounts="on")


@pytest.mark.parametrize("opts,msg", [
    ({"compat": "0.9"}, "Unknown compatibility level 0.9"),
    ({"refcount_bits": 12}, "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"compat": "0.10", "refcount_bits": 8}, "Refcount widths other than 16 bits require compatibility level 1.1 "
                                             "or above (use compat=1.1 or greater)"),
    ({"backing_file": "other.img"}, "Cannot amend the backing file"),
    ({"data_file": "d.img"}, "data-file can only be set for images that use an external data file"),
    ({"data_file_raw": "on"}, "data-file-raw cannot be set on existing images"),
    ({"encrypt.new-secret": "s"}, "Can't amend encryption options - encryption not present"),
])
def test_amend_refuses_with_qemus_messages(tmp_path, opts, msg):
    """Invalid or unsupported changes fail with qemu-img's messages and leave the image usable."""
    p = create(tmp_path / "e.qcow2", MiB)
    with pytest.raises(Error) as ei:
        amend(p, **opts)
    assert ei.value.msg == msg
    assert check_image(p) == (0, 0, 0)


def test_downgrade_needs_16_bit_refcounts(tmp_path):
    """A v3 image with 8-bit refcounts cannot become v2 without changing the width in the same amend."""
    p = create(tmp_path / "d.qcow2", MiB, refcount_bits=8)
    with pytest.raises(Error, match="^compat=0.10 requires refcount_bits=16$"):
        amend(p, compat="0.10")
    amend(p, compat="0.10", refcount_bits=16)
    assert header(p)["version"] == 2 and check_image(p) == (0, 0, 0)


def test_amend_size_grows_the_image(tmp_path):
    """size=N resizes through the generic truncate."""
    p = create(tmp_path / "s.qcow2", MiB)
    fill(p)
    amend(p, size=3 * MiB)
    assert header(p)["size"] == 3 * MiB and check_image(p) == (0, 0, 0)


def test_specific_info(tmp_path):
    """ImageInfoSpecific as qemu-img info prints it, for v2, v3 with lazy refcounts and a corrupt v3 image."""
    p2 = create(tmp_path / "v2.qcow2", MiB, compat="0.10")
    p3 = create(tmp_path / "v3.qcow2", MiB, lazy_refcounts="on", refcount_bits=8)

    def info(p):
        blk = open_blk(p, 0)
        try:
            return blk_bs(blk).drv.bdrv_get_specific_info(blk_bs(blk))
        finally:
            blk_unref(blk)

    assert info(p2) == {"type": "qcow2", "data": {"compat": "0.10", "refcount-bits": 16, "compression-type": "zlib"}}
    assert info(p3)["data"] == {"compat": "1.1", "extended-l2": False, "lazy-refcounts": True, "corrupt": False,
                                "refcount-bits": 8, "compression-type": "zlib"}
    poke(p3, 72, struct.pack(">Q", 2))        # the corrupt bit
    assert info(p3)["data"]["corrupt"] is True


def test_measure_without_input(tmp_path):
    """Sizes QEMU 7.2 prints for measure -O qcow2 --size (oracles from qemu-img)."""
    from qblock.block.driver import bdrv_find_format
    drv = bdrv_find_format("qcow2")
    assert drv.bdrv_measure({"size": 1 << 30}, None) == (393216, 1074135040, None)
    assert drv.bdrv_measure({"size": 1 << 30, "cluster_size": 4096}, None) == (2637824, 1076379648, None)
    assert drv.bdrv_measure({"size": 100 << 40, "refcount_bits": 8}, None) == (15101722624, 109966264500224, None)
    assert drv.bdrv_measure({"size": 1 << 30, "preallocation": "full"}, None) == (1074135040, 1074135040, None)
    with pytest.raises(Error, match=r"^The image size is too large \(try using a larger cluster size\)$"):
        drv.bdrv_measure({"size": 100 << 40, "cluster_size": 512}, None)


def test_has_zero_init_and_make_empty(tmp_path):
    """A new image reads as zeroes; make_empty drops every cluster and leaves a small clean image."""
    p = create(tmp_path / "z.qcow2", MiB)
    fill(p)
    blk = open_blk(p)
    bs = blk_bs(blk)
    assert bs.drv.bdrv_has_zero_init(bs) == 1
    assert bs.drv.bdrv_make_empty(bs) == 0
    buf = bytearray(MiB)
    blk_pread(blk, 0, buf)
    assert not any(buf)
    blk_unref(blk)
    assert os.path.getsize(p) == 4 * 65536 and check_image(p) == (0, 0, 0)


# --------------------------------------------------------------------------
# Against qemu-img


@pytest.fixture(scope="module")
def tools():
    """QEMU's and qblock's tools, on tmpfs when there is one (QEMU's amend flushes a lot)."""
    shm = "/dev/shm"
    t = Tools(tempfile.mkdtemp(prefix="qblock-amend-", dir=shm)) if os.access(shm, os.W_OK) else make_tools()
    yield t
    t.close()
    shutil.rmtree(t.tmp, ignore_errors=True)


def _sh(cmd: str, cwd: str) -> None:
    subprocess.run(cmd, shell=True, check=True, cwd=cwd, capture_output=True)


SETUPS = {
    "v3": 'qemu-img create -q -f qcow2 t.qcow2 1M && qemu-io -c "write -P 1 0 64k" -c "write -z 128k 64k" '
          '-c "write -P 2 512k 64k" -c "write -z 512k 64k" -c "write -c -P 3 768k 64k" t.qcow2',
    "v3-4k": 'qemu-img create -q -f qcow2 -o cluster_size=4k t.qcow2 1M && qemu-io -c "write -P 1 0 64k" '
             '-c "write -z 128k 64k" -c "write -P 2 512k 64k" t.qcow2',
    "v2": 'qemu-img create -q -f qcow2 -o compat=0.10 t.qcow2 1M && qemu-io -c "write -P 1 0 64k" t.qcow2',
    "v2-4k": 'qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4k t.qcow2 1M && '
             'qemu-io -c "write -P 1 0 64k" t.qcow2',
    "backed": 'qemu-img create -q -f qcow2 base.qcow2 1M && qemu-io -c "write -P 7 0 1M" base.qcow2 && '
              'qemu-img create -q -f qcow2 -o cluster_size=4k -b base.qcow2 -F qcow2 t.qcow2 && '
              'qemu-io -c "write -P 1 0 64k" -c "write -z 64k 8k" t.qcow2',
    "snapshots": 'qemu-img create -q -f qcow2 -o cluster_size=4k t.qcow2 4M && '
                 'qemu-io -c "write -P 1 0 1M" -c "write -z 1M 64k" t.qcow2 && qemu-img snapshot -c s1 t.qcow2 && '
                 'qemu-io -c "write -P 2 512k 64k" t.qcow2',
    "v2-snapshots": 'qemu-img create -q -f qcow2 -o compat=0.10 t.qcow2 4M && qemu-io -c "write -P 1 0 1M" '
                    't.qcow2 && qemu-img snapshot -c s1 t.qcow2 && qemu-img snapshot -c s2 t.qcow2',
    "small-clusters": 'qemu-img create -q -f qcow2 -o cluster_size=512 t.qcow2 16M && '
                      'qemu-io -c "write -P 1 0 5M" -c "write -z 8M 1M" t.qcow2',
    "dirty": 'qemu-img create -q -f qcow2 -o lazy_refcounts=on t.qcow2 1M && qemu-io -c "write -P 1 0 64k" t.qcow2 '
             '&& printf "\\000\\000\\000\\000\\000\\000\\000\\001" | dd of=t.qcow2 bs=1 seek=72 conv=notrunc',
    **{f"commit-{compat}": 'qemu-img create -q -f qcow2 base.qcow2 2M && qemu-io -c "write -P 1 0 1M" base.qcow2 && '
                           f'qemu-img create -q -f qcow2 -o compat={compat} -b base.qcow2 -F qcow2 top.qcow2 && '
                           'qemu-io -c "write -P 3 64k 64k" -c "write -P 4 1M 128k" top.qcow2'
       for compat in ("1.1", "0.10")},
}
SETUPS["v2-old-snapshots"] = SETUPS["v2-snapshots"]
_made: dict[str, str] = {}


def strip_snapshot_extra_data(path: str) -> None:
    """Rewrite the snapshot table without extra data, as QEMU before 1.x wrote v2 tables."""
    with open(path, "r+b") as f:
        f.seek(60)
        nb, offset = struct.unpack(">IQ", f.read(12))
        pos, table = offset, b""
        for _ in range(nb):
            pos = (pos + 7) & ~7
            f.seek(pos)
            h = list(struct.unpack(">QIHHIIQII", f.read(40)))
            f.seek(pos + 40 + h[8])
            names = f.read(h[2] + h[3])
            pos += 40 + h[8] + len(names)
            h[8] = 0
            table += bytes(-len(table) % 8) + struct.pack(">QIHHIIQII", *h) + names
        f.seek(offset)
        f.write(table)


def setup_image(tools, name: str) -> list[str]:
    """The files of setup ``name``, made once by QEMU's tools."""
    if name not in _made:
        d = os.path.join(tools.tmp, "setup-" + name)
        os.makedirs(d)
        _sh(SETUPS[name], d)
        if name == "v2-old-snapshots":
            strip_snapshot_extra_data(os.path.join(d, "t.qcow2"))
        _made[name] = d
    return [os.path.join(_made[name], f) for f in sorted(os.listdir(_made[name]))]


@needs_qemu
@pytest.mark.parametrize("setup,opts", [
    ("v3", "compat=0.10"), ("v3", "lazy_refcounts=on"), ("v3", "refcount_bits=1"),
    ("v3", "size=8M"), ("v3-4k", "refcount_bits=8,lazy_refcounts=on,size=2M"), ("v3-4k", "refcount_bits=64"),
    ("v2", "compat=1.1"), ("v2-4k", "compat=v3,refcount_bits=2"), ("backed", "compat=0.10"),
    ("snapshots", "compat=0.10"), ("snapshots", "refcount_bits=1"), ("snapshots", "refcount_bits=4"),
    ("v2-snapshots", "compat=1.1"), ("v2-old-snapshots", "compat=1.1"),
    ("small-clusters", "refcount_bits=64"), ("small-clusters", "compat=0.10"), ("dirty", "compat=0.10"),
    ("dirty", "lazy_refcounts=off"),
    ("v3", "compat=0.10,lazy_refcounts=on"), ("v2", "refcount_bits=8"), ("v3", "cluster_size=4k"),
    ("v3", "compat=bogus"), ("backed", "backing_fmt=raw"), ("v3", "refcount_bits=x"),
])
def test_amend_matches_qemu_img(tools, setup, opts):
    """qemu-img amend -o OPTS: same output and status, the same bytes in the image, and qemu-img check clean."""
    q, b, dq, db = tools.both("img", ["amend", "-o", opts, "t.qcow2"], setup_image(tools, setup))
    assert (b.out, b.err, b.rc) == (q.out, q.err, q.rc)
    with open(os.path.join(dq, "t.qcow2"), "rb") as fq, open(os.path.join(db, "t.qcow2"), "rb") as fb:
        assert fb.read() == fq.read()
    assert tools.qemu("img", ["check", "t.qcow2"], db).rc == 0


@needs_qemu
@pytest.mark.parametrize("argv", [
    ["measure", "-O", "qcow2", "t.qcow2"], ["measure", "-O", "qcow2", "-o", "compat=0.10", "t.qcow2"],
    ["measure", "-O", "qcow2", "-o", "cluster_size=512,refcount_bits=1", "--output=json", "t.qcow2"],
    ["measure", "-O", "qcow2", "-f", "raw", "t.qcow2"], ["measure", "-O", "qcow2", "-o", "backing_file=x", "t.qcow2"],
    ["measure", "-O", "qcow2", "-o", "extended_l2=on", "--size", "1G"],
    ["measure", "-O", "qcow2", "-o", "preallocation=bogus", "--size", "1G"],
    ["measure", "-O", "qcow2", "-o", "compat=v2", "--size", "1G"],
    ["measure", "-O", "qcow2", "-o", "cluster_size=3k", "--size", "1G"],
])
def test_measure_matches_qemu_img(tools, argv):
    """qemu-img measure -O qcow2 with an input image and with option errors."""
    q, b, _, _ = tools.both("img", argv, setup_image(tools, "backed"))
    assert (b.out, b.err, b.rc) == (q.out, q.err, q.rc)


@needs_qemu
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_commit_empties_the_top_image_as_qemu_img_does(tools, compat):
    """commit (without -d) empties the overlay: v3 rebuilt from scratch, v2 by discarding; same bytes as QEMU."""
    q, b, dq, db = tools.both("img", ["commit", "top.qcow2"], setup_image(tools, "commit-" + compat))
    assert (b.out, b.err, b.rc) == (q.out, q.err, q.rc) == ("Image committed.\n", "", 0)
    for name in ("base.qcow2", "top.qcow2"):
        with open(os.path.join(dq, name), "rb") as fq, open(os.path.join(db, name), "rb") as fb:
            assert fb.read() == fq.read(), name


@needs_qemu
@pytest.mark.parametrize("setup", ["snapshots", "v2-old-snapshots"])
def test_snapshot_extra_data_in_info(tools, setup):
    """info lists snapshots with their icount (none without extra data) and the format-specific block."""
    for fmt in ("json", "human"):
        q, b, _, _ = tools.both("img", ["info", f"--output={fmt}", "t.qcow2"], setup_image(tools, setup))
        assert (b.out, b.err, b.rc) == (q.out, q.err, q.rc)
        if fmt == "json":
            assert ("icount" in json.loads(b.out)["snapshots"][0]) == (setup == "snapshots")
