"""The qcow2 driver (drivers/qcow2): creation, the header, reads and writes against a byte model, allocation,
caches and their write ordering, lazy refcounts, corruption handling, error injection and the conformance kit.

Interop with the real qemu-img/qemu-io is in test_qcow2_interop.py.  QBLOCK_LONG=1 runs more model steps.
"""
from __future__ import annotations

import errno
import os
import random
import struct

import pytest

from qblock.block.block_backend import (
    blk_aio_pwritev,
    blk_bs,
    blk_flush,
    blk_getlength,
    blk_pdiscard,
    blk_pread,
    blk_pwrite,
    blk_pwrite_zeroes,
    blk_truncate,
    blk_unref,
)
from qblock.block.driver import (
    BDRV_BLOCK_ALLOCATED,
    BDRV_BLOCK_DATA,
    BDRV_BLOCK_OFFSET_VALID,
    BDRV_BLOCK_ZERO,
    BDRV_O_CHECK,
    BDRV_O_RDWR,
    BDRV_O_RESIZE,
    BDRV_REQ_FUA,
    BDRV_REQ_MAY_UNMAP,
    BDRV_REQ_WRITE_COMPRESSED,
    BlockDriverInfo,
)
from qblock.block.graph import bdrv_get_info
from qblock.block.io import bdrv_block_status
from qblock.testing.conformance import CHECKS, DriverUnderTest, run_check
from qblock.trace.control import trace_add_sink, trace_enable_events, trace_remove_sink
from qblock.util.aio import aio_poll, qemu_get_aio_context
from qblock.util.error import Error
from qblock.util.iov import QEMU_IOVEC_INIT_BUF
from qblock.util.qapi_event import qapi_event_add_listener, qapi_event_remove_listener

from .qcow2_util import check_blk, check_image, create, header, open_blk, peek, poke

LONG = os.environ.get("QBLOCK_LONG") == "1"
MiB = 1 << 20


# --------------------------------------------------------------------------
# Creation and the header


def test_create_lays_out_the_image_as_qemu_img_does(tmp_path):
    """A default image: v3, 64 KiB clusters, refcount table @1, refblock @2, L1 @3, 16-bit refcounts, feature table."""
    p = create(tmp_path / "a.qcow2", 64 * MiB)
    h = header(p)
    assert (h["magic"], h["version"], h["cluster_bits"], h["size"]) == (0x514649FB, 3, 16, 64 * MiB)
    assert (h["refcount_table_offset"], h["refcount_table_clusters"]) == (0x10000, 1)
    assert (h["l1_table_offset"], h["l1_size"], h["refcount_order"], h["header_length"]) == (0x30000, 1, 4, 112)
    assert peek(p, 0x10000, 8) == struct.pack(">Q", 0x20000)
    assert peek(p, 0x20000, 10) == b"\x00\x01" * 4 + b"\x00\x00"       # clusters 0-3 in use
    assert peek(p, 112, 4) == struct.pack(">I", 0x6803F857)             # the feature name table
    assert b"lazy refcounts" in peek(p, 112, 512)
    assert os.path.getsize(p) == 0x30008


def test_create_small_clusters_v2_lazy_and_refcount_widths(tmp_path):
    """512-byte clusters have no feature table; compat=0.10 writes the 72-byte v2 header; options land in the header."""
    p = create(tmp_path / "small.qcow2", 64 * MiB, cluster_size=512)
    assert header(p)["cluster_bits"] == 9 and peek(p, 112, 8) == bytes(8)
    p = create(tmp_path / "v2.qcow2", MiB, compat="0.10")
    assert header(p)["version"] == 2 and peek(p, 72, 48) == bytes(48)
    p = create(tmp_path / "lazy.qcow2", MiB, lazy_refcounts="on", refcount_bits=64)
    h = header(p)
    assert h["compatible_features"] == 1 and h["refcount_order"] == 6


@pytest.mark.parametrize("opts,msg", [
    ({"cluster_size": 1000}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"cluster_size": 4 * MiB}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"compat": "2.0"}, "Invalid compatibility level: '2.0'"),
    ({"compat": "0.10", "lazy_refcounts": "on"}, "Lazy refcounts only supported with compatibility level 1.1"),
    ({"refcount_bits": 3}, "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"compat": "0.10", "refcount_bits": 8}, "Different refcount widths than 16 bits require compatibility level 1.1"),
    ({"backing_fmt": "raw"}, "Backing format cannot be used without backing file"),
    ({"backing_file": "x", "preallocation": "metadata"}, "Backing file and preallocation can only be used"),
])
def test_create_refuses_bad_options_with_qemus_messages(tmp_path, opts, msg):
    """Invalid creation options are refused with QEMU's wording."""
    with pytest.raises(Error) as e:
        create(tmp_path / "bad.qcow2", MiB, **opts)
    assert msg in str(e.value)


def test_preallocation_metadata_maps_every_cluster(tmp_path):
    """preallocation=metadata allocates L2 tables and data clusters: block status shows data with offsets."""
    p = create(tmp_path / "pre.qcow2", 4 * MiB, cluster_size=4096, preallocation="metadata")
    blk = open_blk(p)
    ret, pnum, _, _ = bdrv_block_status(blk_bs(blk), 0, 4 * MiB)
    assert ret & BDRV_BLOCK_OFFSET_VALID and pnum > 0
    buf = bytearray(4 * MiB)
    assert blk_pread(blk, 0, buf) == 4 * MiB and not any(buf)
    assert check_blk(blk).corruptions == 0
    blk_unref(blk)
    assert os.path.getsize(p) >= 4 * MiB


# --------------------------------------------------------------------------
# Opening


def _bad_open(p, flags=BDRV_O_RDWR) -> str:
    with pytest.raises(Error) as e:
        blk_unref(open_blk(p, flags))
    return str(e.value)


def test_open_refuses_bad_headers_with_qemus_messages(tmp_path):
    """Bad magic, version, cluster size, header length, L1 size are refused as QEMU refuses them."""
    p = create(tmp_path / "h.qcow2", MiB)
    good = peek(p, 0, 112)

    def variant(offset, data):
        poke(p, 0, good)
        poke(p, offset, data)
        return _bad_open(p)

    assert variant(0, b"QFI\x00") == "Image is not in qcow2 format"
    assert variant(4, struct.pack(">I", 4)) == "Unsupported qcow2 version 4"
    assert variant(20, struct.pack(">I", 22)) == "Unsupported cluster size: 2^22"
    assert variant(100, struct.pack(">I", 100)) == "qcow2 header too short"
    assert variant(36, struct.pack(">I", 0)) == "L1 table is too small"
    assert variant(56, struct.pack(">I", 0)) == "Image does not contain a reference count table"
    assert variant(40, struct.pack(">Q", 0x30001)) == "Active L1 table offset invalid"


def test_unknown_incompatible_features_are_refused(tmp_path):
    """An unknown incompatible bit is refused, named from the image's feature table when it has the name."""
    p = create(tmp_path / "f.qcow2", MiB)
    poke(p, 72, struct.pack(">Q", 1 << 10))
    assert _bad_open(p) == "Unsupported qcow2 feature(s): Unknown incompatible feature: 400"
    poke(p, 72, struct.pack(">Q", 1 << 4))      # extended L2 entries: QEMU's table names it
    assert _bad_open(p, 0) == "Unsupported qcow2 feature(s): extended L2 entries"


def test_encrypted_images_are_refused(tmp_path):
    """qblock has no crypto: AES images get QEMU's message, LUKS ones are an unsupported method."""
    p = create(tmp_path / "e.qcow2", MiB)
    poke(p, 32, struct.pack(">I", 1))
    assert "Use of AES-CBC encrypted qcow2 images is no longer supported" in _bad_open(p, 0)
    poke(p, 32, struct.pack(">I", 2))
    assert _bad_open(p, 0) == "Unsupported encryption method 2"


def test_corrupt_bit_refuses_read_write_but_allows_read_only(tmp_path):
    """An image marked corrupt opens read-only only (QEMU's message for read/write)."""
    p = create(tmp_path / "c.qcow2", MiB)
    poke(p, 72, struct.pack(">Q", 2))
    assert _bad_open(p) == "qcow2: Image is corrupt; cannot be opened read/write"
    blk = open_blk(p, 0)
    assert blk_pread(blk, 0, bytearray(512)) == 512
    blk_unref(blk)


def test_autoclear_cleared_on_writable_open_and_unknown_extensions_kept(tmp_path):
    """Unknown autoclear bits are cleared by a writable open only; unknown header extensions survive byte for byte."""
    p = create(tmp_path / "a.qcow2", MiB)
    ext = struct.pack(">II", 0x12345678, 5) + b"hello\0\0\0"
    raw = bytearray(peek(p, 0, 65536))
    end = 112
    while raw[end:end + 4] != bytes(4):                  # walk to the end-of-extensions marker
        end += 8 + (struct.unpack_from(">I", raw, end + 4)[0] + 7) // 8 * 8
    raw[end:end] = ext
    poke(p, 0, bytes(raw[:65536]))
    poke(p, 88, struct.pack(">Q", 3))
    blk_unref(open_blk(p, 0))
    assert header(p)["autoclear_features"] == 3
    blk_unref(open_blk(p))
    assert header(p)["autoclear_features"] == 0
    assert ext in peek(p, 0, 4096)


def test_backing_file_name_and_format_come_from_the_header(tmp_path):
    """backing_file/backing_fmt are recorded; the core opens the chain from bs.backing_file and bs.backing_format."""
    base = create(tmp_path / "base.qcow2", MiB)
    top = create(tmp_path / "top.qcow2", 2 * MiB, backing_file="base.qcow2", backing_fmt="qcow2")
    blk = open_blk(top)
    bs = blk_bs(blk)
    assert (bs.backing_file, bs.backing_format) == ("base.qcow2", "qcow2")
    assert bs.backing is not None and bs.backing.bs.filename == base
    blk_unref(blk)


# --------------------------------------------------------------------------
# Reads and writes against a byte model


def _fill(rng: random.Random, n: int) -> bytes:
    return bytes([rng.randrange(1, 256)]) * n


def _run_model(blk, model: bytearray, rng: random.Random, steps: int, cs: int, v3: bool, backing: bool):
    size = len(model)
    for _ in range(steps):
        op = rng.choice(("write", "write", "write", "zero", "zero_unmap", "discard", "flush", "fua"))
        off = rng.randrange(size)
        n = min(rng.randrange(1, 3 * cs + 700), size - off)
        if op in ("write", "fua"):
            data = _fill(rng, n)
            assert blk_pwrite(blk, off, data, flags=BDRV_REQ_FUA if op == "fua" else 0) == n
            model[off:off + n] = data
        elif op in ("zero", "zero_unmap"):
            assert blk_pwrite_zeroes(blk, off, n, BDRV_REQ_MAY_UNMAP if op == "zero_unmap" else 0) == 0
            model[off:off + n] = bytes(n)
        elif op == "discard":
            assert blk_pdiscard(blk, off, n) == 0
            if v3 or not backing:
                # Whole clusters (and a partial last cluster at the end of the image) read as zeroes.
                start = -(-off // cs) * cs
                end = (off + n) // cs * cs if off + n < size else size
                if end > start:
                    model[start:end] = bytes(end - start)
        else:
            assert blk_flush(blk) == 0
        roff = rng.randrange(size)
        rn = min(rng.randrange(1, 2 * cs + 300), size - roff)
        buf = bytearray(rn)
        assert blk_pread(blk, roff, buf) == rn
        assert buf == model[roff:roff + rn], f"read [{roff}, +{rn}) after {op} [{off}, +{n})"


@pytest.mark.parametrize("backing", [False, True], ids=["alone", "backed"])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cs", [512, 4096, 65536])
def test_reads_and_writes_follow_a_byte_model(tmp_path, cs, compat, backing):
    """Writes, zero writes, discards and flushes read back as a plain byte array predicts, across close and open."""
    size = 2 * MiB + 3 * 512 if cs < 65536 else 5 * MiB + 512
    rng = random.Random(cs * 7 + len(compat) + backing)
    model = bytearray(size)
    opts = {}
    if backing:
        base = create(tmp_path / "base.qcow2", size * 2 // 3, cluster_size=4096)
        bblk = open_blk(base)
        base_data = bytes(range(256)) * (size * 2 // 3 // 256)
        assert blk_pwrite(bblk, 0, base_data) == len(base_data)
        blk_unref(bblk)
        model[:len(base_data)] = base_data
        opts = dict(backing_file=base, backing_fmt="qcow2")
    p = create(tmp_path / "img.qcow2", size, cluster_size=cs, compat=compat, **opts)
    blk = open_blk(p, discard="unmap")
    _run_model(blk, model, rng, 150 if LONG else 45, cs, compat == "1.1", backing)
    blk_unref(blk)
    blk = open_blk(p)
    buf = bytearray(size)
    assert blk_pread(blk, 0, buf) == size and buf == model
    res = check_blk(blk)
    assert (res.corruptions, res.leaks, res.check_errors) == (0, 0, 0)
    blk_unref(blk)


def test_partial_write_copies_the_rest_of_the_cluster_from_the_backing_file(tmp_path):
    """A small write to an unallocated cluster keeps the backing file's bytes around it (COW)."""
    base = create(tmp_path / "b.qcow2", MiB)
    b = open_blk(base)
    blk_pwrite(b, 0, b"\x11" * MiB)
    blk_unref(b)
    top = create(tmp_path / "t.qcow2", 2 * MiB, backing_file=base, backing_fmt="qcow2")
    blk = open_blk(top)
    assert blk_pwrite(blk, 70000, b"\x22" * 10) == 10
    buf = bytearray(2 * MiB)
    blk_pread(blk, 0, buf)
    assert buf[65536:70000] == b"\x11" * 4464 and buf[70000:70010] == b"\x22" * 10
    assert buf[70010:131072] == b"\x11" * (131072 - 70010)
    assert buf[MiB:] == bytes(MiB)      # past the backing file's end: zeroes
    ret, pnum, _, _ = bdrv_block_status(blk_bs(blk), 65536, 65536)
    assert ret & BDRV_BLOCK_DATA and pnum == 65536
    blk_unref(blk)


def test_a_discard_never_punches_a_cluster_it_reuses(tmp_path):
    """A long discard frees data clusters, then needs new L2 tables: they must not land in the freed clusters'
    pending hole (regression: the collected discards were issued after the reuse and wiped the new L2 table)."""
    base = create(tmp_path / "b.qcow2", 8 * MiB)
    b = open_blk(base)
    blk_pwrite(b, 0, b"\x99" * (8 * MiB))
    blk_unref(b)
    p = create(tmp_path / "t.qcow2", 8 * MiB, cluster_size=512, backing_file=base, backing_fmt="qcow2")
    blk = open_blk(p, discard="unmap")
    blk_pwrite(blk, 2 * MiB, b"\x33" * MiB)
    assert blk_pdiscard(blk, MiB, 4 * MiB) == 0        # frees 2M..3M, then allocates L2 tables for 3M..5M
    blk_unref(blk)
    blk = open_blk(p)
    buf = bytearray(8 * MiB)
    blk_pread(blk, 0, buf)
    assert buf == b"\x99" * MiB + bytes(4 * MiB) + b"\x99" * (3 * MiB)
    blk_unref(blk)


@pytest.mark.parametrize("free", ["discard", "zero-unmap"])
def test_a_freed_cluster_is_not_reused_before_its_l2_entry_is_on_disk(tmp_path, monkeypatch, free):
    """Regression (crash test): a cluster a discard freed is handed to another write only after the L2 table
    that stopped pointing at it was written back, so a crash never shows one offset's data at another."""
    from qblock.drivers.qcow2 import qcow2 as qcow2_mod
    p = create(tmp_path / "r.qcow2", 4 * MiB)
    crashed = tmp_path / "crashed.qcow2"
    link = qcow2_mod.qcow2_alloc_cluster_link_l2

    def crash_before_linking(bs, m):
        # The data of the reusing write is in the file, its L2 entry not yet: a SIGKILL now leaves this.
        crashed.write_bytes(open(p, "rb").read())
        return link(bs, m)
    blk = open_blk(p, discard="unmap")
    assert blk_pwrite(blk, 0, b"\x11" * 65536) == 65536
    assert blk_flush(blk) == 0
    if free == "discard":
        assert blk_pdiscard(blk, 0, 65536) == 0
    else:
        assert blk_pwrite_zeroes(blk, 0, 65536, BDRV_REQ_MAY_UNMAP) == 0
    monkeypatch.setattr(qcow2_mod, "qcow2_alloc_cluster_link_l2", crash_before_linking)
    assert blk_pwrite(blk, MiB, b"\x22" * 65536) == 65536      # takes the freed cluster
    monkeypatch.undo()
    blk_unref(blk)
    blk = open_blk(crashed, 0)
    buf = bytearray(65536)
    assert blk_pread(blk, 0, buf) == 65536
    blk_unref(blk)
    assert buf in (b"\x11" * 65536, bytes(65536))             # old or discarded, never offset 1 MiB's data


def test_concurrent_writes_to_one_cluster_wait_for_the_allocation(tmp_path):
    """Writes in flight together into the same new clusters: later ones wait (handle_dependencies); none is lost."""
    base = create(tmp_path / "b.qcow2", MiB)
    b = open_blk(base)
    blk_pwrite(b, 0, b"\x77" * MiB)
    blk_unref(b)
    top = create(tmp_path / "t.qcow2", MiB, backing_file=base, backing_fmt="qcow2")
    blk = open_blk(top)
    waits = []
    sink = trace_add_sink(lambda rec: waits.append(rec.name) if rec.name.startswith("qcow2_handle_dep") else None)
    trace_enable_events("qcow2_handle_dependencies_wait")
    done = []
    bufs = []
    for i in range(16):
        buf = bytearray([i + 1]) * 3000
        bufs.append(buf)
        blk_aio_pwritev(blk, 4096 + i * 8000, QEMU_IOVEC_INIT_BUF(buf), 0, lambda o, r: done.append(r), None)
    while len(done) < 16:
        aio_poll(qemu_get_aio_context(), True)
    trace_remove_sink(sink)
    assert done == [0] * 16
    assert waits, "no write waited for an in-flight allocation"
    out = bytearray(MiB)
    blk_pread(blk, 0, out)
    expect = bytearray(b"\x77" * MiB)
    for i in range(16):
        expect[4096 + i * 8000:4096 + i * 8000 + 3000] = bytes([i + 1]) * 3000
    assert out == expect
    res = check_blk(blk)
    assert (res.corruptions, res.leaks) == (0, 0)
    blk_unref(blk)


def test_a_python_error_in_the_driver_leaves_no_lock_or_allocation_behind(tmp_path, monkeypatch, capfd):
    """A bug that raises inside an allocating write fails it with -EIO; later writes to the cluster still work."""
    from qblock.drivers.qcow2 import qcow2_cluster_alloc
    p = create(tmp_path / "b.qcow2", MiB)
    blk = open_blk(p)
    real = qcow2_cluster_alloc.perform_cow
    calls = []

    def broken(bs, m):
        calls.append(m)
        if len(calls) == 1:
            raise RuntimeError("a bug in the COW")
        return real(bs, m)
    monkeypatch.setattr(qcow2_cluster_alloc, "perform_cow", broken)
    assert blk_pwrite(blk, 100, b"\x01" * 100) == -errno.EIO
    assert "a bug in the COW" in capfd.readouterr().err
    assert blk_pwrite(blk, 300, b"\x02" * 100) == 100
    buf = bytearray(400)
    blk_pread(blk, 0, buf)
    assert buf == bytes(300) + b"\x02" * 100
    blk_unref(blk)
    assert check_image(p)[0] == 0


def test_zero_writes_set_the_zero_flag_and_unmap_frees(tmp_path):
    """v3 zero writes become zero clusters (block status ZERO); MAY_UNMAP gives the host clusters back."""
    from qblock.drivers.qcow2.qcow2 import _run_locked
    from qblock.drivers.qcow2.qcow2_refcount import qcow2_get_refcount
    p = create(tmp_path / "z.qcow2", 4 * MiB)
    blk = open_blk(p, discard="unmap")
    bs = blk_bs(blk)
    blk_pwrite(blk, 0, b"\x55" * (4 * MiB))
    assert blk_pwrite_zeroes(blk, MiB, MiB, 0) == 0
    ret, pnum, _, _ = bdrv_block_status(bs, MiB, MiB)
    assert ret & BDRV_BLOCK_ZERO and ret & BDRV_BLOCK_OFFSET_VALID and pnum == MiB     # ZERO_ALLOC keeps it
    _, _, host, _ = bdrv_block_status(bs, 2 * MiB, 65536)
    assert _run_locked(bs, qcow2_get_refcount, bs, host >> 16) == (0, 1)
    assert blk_pwrite_zeroes(blk, 2 * MiB, MiB, BDRV_REQ_MAY_UNMAP) == 0
    ret, pnum, _, _ = bdrv_block_status(bs, 2 * MiB, MiB)
    assert ret & BDRV_BLOCK_ZERO and not ret & BDRV_BLOCK_OFFSET_VALID
    assert _run_locked(bs, qcow2_get_refcount, bs, host >> 16) == (0, 0)
    buf = bytearray(4 * MiB)
    blk_pread(blk, 0, buf)
    assert buf == b"\x55" * MiB + bytes(2 * MiB) + b"\x55" * MiB
    res = check_blk(blk)
    assert (res.corruptions, res.leaks) == (0, 0)
    blk_unref(blk)


def test_compressed_writes_read_back_and_overwrite_by_cow(tmp_path):
    """Compressed clusters read back; a partial overwrite turns one into a normal cluster; refcounts stay right."""
    p = create(tmp_path / "c.qcow2", MiB)
    blk = open_blk(p)
    text = (b"qblock compresses this cluster " * 3000)[:65536]
    assert blk_pwrite(blk, 0, text, flags=BDRV_REQ_WRITE_COMPRESSED) == 65536
    assert blk_pwrite(blk, 65536, text[::-1], flags=BDRV_REQ_WRITE_COMPRESSED) == 65536
    assert blk_pwrite(blk, 131072, os.urandom(65536), flags=BDRV_REQ_WRITE_COMPRESSED) == 65536  # stored plain
    ret, _, _, _ = bdrv_block_status(blk_bs(blk), 0, 65536)
    assert ret & BDRV_BLOCK_DATA and not ret & BDRV_BLOCK_OFFSET_VALID
    assert blk_pwrite(blk, 100, b"X" * 100) == 100
    buf = bytearray(131072)
    blk_pread(blk, 0, buf)
    assert buf[:65536] == text[:100] + b"X" * 100 + text[200:] and buf[65536:] == text[::-1]
    assert blk_pwrite(blk, 1000, b"Y" * 10, flags=BDRV_REQ_WRITE_COMPRESSED) == -errno.EINVAL
    res = check_blk(blk)
    assert (res.corruptions, res.leaks) == (0, 0)
    blk_unref(blk)


def test_refcount_table_grows_when_the_image_outgrows_it(tmp_path):
    """512-byte clusters, 64-bit refcounts: enough allocations to need more refcount blocks than one table cluster
    holds (64 blocks of 64 refcounts: 2 MiB of file)."""
    p = create(tmp_path / "g.qcow2", 64 * MiB, cluster_size=512, refcount_bits=64)
    blk = open_blk(p)
    before = header(p)["refcount_table_offset"]
    data = b"\xee" * (3 * MiB)
    assert blk_pwrite(blk, 0, data) == len(data)
    blk_flush(blk)
    h = header(p)
    assert h["refcount_table_offset"] != before and h["refcount_table_clusters"] > 1
    buf = bytearray(len(data))
    blk_pread(blk, 0, buf)
    assert buf == data
    res = check_blk(blk)
    assert (res.corruptions, res.leaks) == (0, 0)
    blk_unref(blk)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32, 64])
def test_other_refcount_widths_read_and_write(tmp_path, bits):
    """Images with 1- to 64-bit refcounts take writes, compressed clusters and frees with consistent refcounts."""
    p = create(tmp_path / "r.qcow2", 4 * MiB, refcount_bits=bits)
    blk = open_blk(p, discard="unmap")
    blk_pwrite(blk, 1000, b"\x21" * 300000)
    blk_pwrite(blk, 2 * MiB, b"\x22" * 65536, flags=BDRV_REQ_WRITE_COMPRESSED)
    blk_pwrite(blk, 2 * MiB + 65536, b"\x23" * 65536, flags=BDRV_REQ_WRITE_COMPRESSED)
    assert blk_pwrite_zeroes(blk, 65536, 65536, BDRV_REQ_MAY_UNMAP) == 0
    buf = bytearray(2 * 65536)
    blk_pread(blk, 2 * MiB, buf)
    assert buf == b"\x22" * 65536 + b"\x23" * 65536
    res = check_blk(blk)
    assert (res.corruptions, res.leaks) == (0, 0)
    blk_unref(blk)


def test_refblock_reaches_the_disk_before_the_l2_entry(tmp_path):
    """After an allocating write and a flush, the refcount block is written (and the file flushed) first, then
    the L2 table."""
    p = create(tmp_path / "o.qcow2", 64 * MiB)
    blk = open_blk(p)
    blk_pwrite(blk, 0, b"\x01" * 512)
    blk_flush(blk)
    events = []

    def sink(rec):
        if rec.name == "bdrv_co_pwritev" and rec.values[0] is blk_bs(blk).file.bs:
            events.append(("write", rec.values[1]))
        elif rec.name == "bdrv_co_flush" and rec.values[0] is blk_bs(blk).file.bs:
            events.append(("flush", None))
    trace_add_sink(sink)
    trace_enable_events("bdrv_co_pwritev")
    trace_enable_events("bdrv_co_flush")
    blk_pwrite(blk, 65536, b"\x02" * 512)     # a new data cluster in the existing L2 table
    blk_flush(blk)
    trace_remove_sink(sink)
    writes = [e for e in events if e[0] == "write"]
    refblock = writes.index(("write", 0x20000))
    l2 = writes.index(("write", 0x40000))
    assert refblock < l2
    assert ("flush", None) in events[events.index(("write", 0x20000)):events.index(("write", 0x40000))]
    blk_unref(blk)


def test_fua_write_puts_data_and_metadata_on_disk(tmp_path):
    """A FUA write returns only once its data, L2 entry and refcounts are in the file (the block layer's flush)."""
    p = create(tmp_path / "f.qcow2", 64 * MiB)
    blk = open_blk(p)
    assert blk_pwrite(blk, 0, b"\x77" * 512) == 512
    assert peek(p, 0x40000, 8) == bytes(8)                 # the L2 entry is still only in the cache
    assert blk_pwrite(blk, 65536, b"\x78" * 512, flags=BDRV_REQ_FUA) == 512
    assert struct.unpack(">QQ", peek(p, 0x40000, 16)) == (0x8000000000050000, 0x8000000000060000)
    assert peek(p, 0x20000 + 5 * 2, 4) == b"\x00\x01\x00\x01"   # clusters 5 and 6 counted
    assert peek(p, 0x60000, 512) == b"\x78" * 512
    blk_unref(blk)


def test_lazy_refcounts_dirty_bit_and_repair(tmp_path):
    """With lazy refcounts a write sets the dirty bit; a clean close clears it; an image left dirty is repaired."""
    p = create(tmp_path / "l.qcow2", 8 * MiB, lazy_refcounts="on")
    blk = open_blk(p)
    blk_pwrite(blk, 0, b"\x5a" * 512)
    blk_pwrite(blk, 3 * MiB, b"\x5b" * 70000)
    blk_flush(blk)
    assert header(p)["incompatible_features"] == 1
    with open(p, "rb") as f:
        crashed = f.read()          # what the disk holds if the process died now
    info = BlockDriverInfo()
    bdrv_get_info(blk_bs(blk), info)
    assert info.is_dirty
    blk_unref(blk)
    assert header(p)["incompatible_features"] == 0
    assert check_image(p) == (0, 0, 0)
    c = tmp_path / "crashed.qcow2"
    c.write_bytes(crashed)
    assert check_image(c)[0] > 0            # refcounts lag behind: reported read-only, not repaired
    assert header(c)["incompatible_features"] == 1
    blk = open_blk(c)                       # a writable open repairs
    buf = bytearray(70000)
    blk_pread(blk, 3 * MiB, buf)
    assert buf == b"\x5b" * 70000
    blk_unref(blk)
    assert header(c)["incompatible_features"] == 0 and check_image(c) == (0, 0, 0)


def test_check_hook_finds_and_repairs_refcount_errors(tmp_path):
    """bdrv_check on qcow2: a lazy-refcounts crash shows as corruptions, a repair fixes them and clears the dirty bit."""
    check = pytest.importorskip("qblock.block.check")
    p = create(tmp_path / "k.qcow2", 8 * MiB, lazy_refcounts="on")
    blk = open_blk(p)
    blk_pwrite(blk, 0, b"\x5a" * 70000)
    blk_flush(blk)
    crashed = (tmp_path / "k.qcow2").read_bytes()
    blk_unref(blk)
    c = tmp_path / "c.qcow2"
    c.write_bytes(crashed)
    blk = open_blk(c, BDRV_O_RDWR | BDRV_O_CHECK)       # BDRV_O_CHECK: no automatic repair at open
    res = check.BdrvCheckResult()
    assert check.bdrv_check(blk_bs(blk), res, 0) == 0
    assert res.corruptions == 4 and res.leaks == 0          # as iotest 039: refcount=0 and OFLAG_COPIED, twice
    assert check.bdrv_check(blk_bs(blk), res, check.BDRV_FIX_LEAKS | check.BDRV_FIX_ERRORS) == 0
    assert (res.corruptions, res.corruptions_fixed) == (0, 2)
    assert check.bdrv_check(blk_bs(blk), res, 0) == 0 and (res.corruptions, res.leaks) == (0, 0)
    blk_unref(blk)
    assert header(c)["incompatible_features"] == 0


def test_truncate_grows_and_shrinks_only_an_unused_tail(tmp_path):
    """Growing reads zeroes; shrinking works when no host cluster is mapped past the new end, else QEMU's error."""
    p = create(tmp_path / "t.qcow2", MiB)
    blk = open_blk(p, BDRV_O_RDWR | BDRV_O_RESIZE, discard="unmap")
    GiB = 1024 * MiB
    blk_pwrite(blk, 0, b"\x33" * 4096)
    assert blk_truncate(blk, 3 * GiB) == 0          # the L1 table grows
    assert blk_getlength(blk) == 3 * GiB and header(p)["size"] == 3 * GiB
    buf = bytearray(4096)
    blk_pread(blk, 2 * GiB, buf)
    assert not any(buf)
    assert blk_pwrite(blk, 2 * GiB, b"\x44" * 512) == 512
    errp = []
    assert blk_truncate(blk, MiB, errp=errp) == -errno.ENOTSUP
    assert str(errp[0]) == "qcow2 doesn't support shrinking images yet"
    assert blk_pwrite_zeroes(blk, 2 * GiB, 65536, BDRV_REQ_MAY_UNMAP) == 0     # now a zero cluster, no host cluster
    assert blk_truncate(blk, MiB) == 0
    assert blk_getlength(blk) == MiB and header(p)["size"] == MiB
    blk_pread(blk, 0, buf)
    assert buf == b"\x33" * 4096
    blk_unref(blk)
    assert check_image(p) == (0, 0, 0)


def test_block_status_and_get_info(tmp_path):
    """Block status tells data, zero and unallocated ranges apart; get_info reports the cluster size."""
    p = create(tmp_path / "s.qcow2", 4 * MiB, cluster_size=4096)
    blk = open_blk(p)
    blk_pwrite(blk, 0, b"\x01" * 8192)
    blk_pwrite_zeroes(blk, 8192, 4096, 0)
    bs = blk_bs(blk)
    ret, pnum, map_, file = bdrv_block_status(bs, 0, MiB)
    assert ret & (BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID | BDRV_BLOCK_ALLOCATED) and pnum == 8192
    assert file is bs.file.bs and map_ % 4096 == 0
    ret, pnum, _, _ = bdrv_block_status(bs, 8192, MiB)
    assert ret & BDRV_BLOCK_ZERO and ret & BDRV_BLOCK_ALLOCATED and pnum == 4096
    ret, pnum, _, _ = bdrv_block_status(bs, 12288, MiB)
    assert ret & BDRV_BLOCK_ZERO and not ret & BDRV_BLOCK_ALLOCATED
    info = BlockDriverInfo()
    assert bdrv_get_info(bs, info) == 0 and info.cluster_size == 4096
    assert (bs.bl.pwrite_zeroes_alignment, bs.bl.pdiscard_alignment) == (4096, 4096)
    blk_unref(blk)


# --------------------------------------------------------------------------
# Corruption found at run time


def test_write_overlapping_metadata_marks_the_image_corrupt(tmp_path, capfd):
    """iotest 060: an L1 entry pointing at the L1 table; the write is refused, the image marked corrupt."""
    p = create(tmp_path / "x.qcow2", 64 * MiB)
    poke(p, 0x30000, struct.pack(">Q", 0x8000000000030000))
    events = []
    listener = lambda name, data, ts: events.append((name, data))  # noqa: E731
    qapi_event_add_listener(listener)
    blk = open_blk(p)
    assert blk_pwrite(blk, 0, b"\x2a" * 512) == -errno.EIO
    assert blk_pwrite(blk, 4 * MiB, b"\x2a" * 512) == -errno.EIO       # further writes: refused
    assert blk_pread(blk, 4 * MiB, bytearray(512)) == 512              # reads still work
    blk_unref(blk)
    qapi_event_remove_listener(listener)
    err = capfd.readouterr().err
    assert ("qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps with active L1 table); "
            "further corruption events will be suppressed") in err
    assert events and events[0][0] == "BLOCK_IMAGE_CORRUPTED" and events[0][1]["fatal"]
    assert header(p)["incompatible_features"] == 2
    assert _bad_open(p) == "qcow2: Image is corrupt; cannot be opened read/write"


def test_l2_table_beyond_the_end_of_the_file_is_corruption(tmp_path, capfd):
    """An L1 entry pointing past the end of the file: the read fails with -EIO and the image is marked corrupt."""
    p = create(tmp_path / "y.qcow2", 64 * MiB)
    poke(p, 0x30000, struct.pack(">Q", 0x8000000010000000))
    blk = open_blk(p)
    assert blk_pread(blk, 0, bytearray(512)) == -errno.EIO
    blk_unref(blk)
    assert "L2 table offset 0x10000000 beyond the end of the image file" in capfd.readouterr().err
    assert header(p)["incompatible_features"] == 2


# --------------------------------------------------------------------------
# Errors injected under the driver (blkdebug)

INJECT_EVENTS = ["l1_update", "l2_update", "l2_alloc_write", "write_aio", "cow_read", "cow_write",
                 "refblock_update_part", "refblock_alloc", "refblock_alloc_hookup", "refblock_alloc_write",
                 "cluster_alloc", "refblock_load"]


@pytest.mark.parametrize("event", INJECT_EVENTS)
def test_injected_errors_fail_the_request_and_leave_no_corruption(tmp_path, event):
    """An error at a qcow2 debug event fails the request with its errno; the image gets leaks at worst."""
    p = create(tmp_path / "e.qcow2", 64 * MiB, cluster_size=512)
    blk = open_blk(None, **{"file.driver": "blkdebug", "file.image.driver": "file", "file.image.filename": p,
                            "file.inject-error.0.event": event, "file.inject-error.0.errno": "28"})
    rets = [blk_pwrite(blk, 0, b"\x11" * 4096), blk_pwrite(blk, 1000, b"\x12" * 200000),
            blk_pwrite_zeroes(blk, 5120, 2048, 0), blk_pwrite(blk, 40 * MiB, b"\x13" * 100), blk_flush(blk)]
    blk_unref(blk)
    assert -errno.ENOSPC in rets
    assert set(rets) <= {0, 4096, 200000, 100, -errno.ENOSPC}
    corruptions, _leaks, errors = check_image(p)
    assert (corruptions, errors) == (0, 0)


# --------------------------------------------------------------------------
# Tracing and the conformance kit


def test_a_write_shows_the_drivers_steps_in_the_trace(tmp_path):
    """An allocating write traces QEMU's qcow2 events in QEMU's order."""
    p = create(tmp_path / "t.qcow2", MiB)
    blk = open_blk(p)
    names = []
    sink = trace_add_sink(lambda rec: names.append(rec.name))
    trace_enable_events("qcow2_*")
    blk_pwrite(blk, 4096, b"\x01" * 512)
    blk_flush(blk)
    trace_remove_sink(sink)
    blk_unref(blk)
    for ev in ("qcow2_writev_start_req", "qcow2_alloc_clusters_offset", "qcow2_handle_copied", "qcow2_handle_alloc",
               "qcow2_l2_allocate", "qcow2_cache_get", "qcow2_cluster_link_l2", "qcow2_perform_cow",
               "qcow2_writev_done_req", "qcow2_cache_flush", "qcow2_cache_entry_flush"):
        assert ev in names, ev
    assert names.index("qcow2_l2_allocate") < names.index("qcow2_handle_alloc") < names.index("qcow2_cluster_link_l2")


def _conformance_options(tmp_path):
    path = tmp_path / "conf.qcow2"

    def opts():
        if path.exists():
            path.unlink()
        create(path, MiB, cluster_size=4096)
        return {"driver": "qcow2", "file.driver": "file", "file.filename": str(path)}
    return opts


@pytest.mark.parametrize("check", CHECKS, ids=[c[0] for c in CHECKS])
def test_conformance_qcow2_over_file(tmp_path, check):
    """qcow2 over file keeps every contract of the conformance kit."""
    result = run_check(DriverUnderTest(_conformance_options(tmp_path), persistent=True, discard_zeroes=True), check)
    assert result.passed, f"qcow2 breaks '{result.contract}': {result.detail}"
