"""qblock-img against QEMU 7.2's qemu-img: the same command lines on copies of the same images must print
the same lines, exit with the same status and leave images with the same contents.

Also cross-checks (qemu-img compare accepts what qblock-img convert writes, and the other way
round; map --output=json agrees; check agrees on clean, leaky and corrupt qcow2 images) and
qemu-iotests 025 ported against qblock-io/qblock-img.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest

from qblock.block.driver import bdrv_find_format

from .qemu_compat import HAVE_QEMU, NO_QEMU_REASON, filter_img_create, tools  # noqa: F401 - the module-scoped fixture

needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason=NO_QEMU_REASON)
HAVE_QCOW2 = bdrv_find_format("qcow2") is not None
needs_qcow2 = pytest.mark.skipif(not HAVE_QCOW2, reason="qblock has no qcow2 driver yet (drivers/qcow2 is being written)")
FORMATS = ["raw", pytest.param("qcow2", marks=needs_qcow2)]


def _qemu(*args: str, cwd: str | None = None) -> None:
    subprocess.run(list(args), check=True, capture_output=True, cwd=cwd)


def _dir(tools, name: str) -> str:
    d = os.path.join(tools.tmp, name)
    os.makedirs(d, exist_ok=True)
    return d


def raw_set(tools) -> list[str]:
    """a.img: 1 MiB raw with data at 64k; b.img: a.img plus one byte at 200k; c.img: empty 2 MiB."""
    d = _dir(tools, "raw-set")
    a, b, c = (os.path.join(d, n) for n in ("a.img", "b.img", "c.img"))
    if not os.path.exists(c):
        _qemu("qemu-img", "create", "-q", "-f", "raw", a, "1M")
        _qemu("qemu-io", "-f", "raw", "-c", "write -P 1 64k 64k", a)
        shutil.copy(a, b)
        _qemu("qemu-io", "-f", "raw", "-c", "write -P 2 200k 1", b)
        _qemu("qemu-img", "create", "-q", "-f", "raw", c, "2M")
    return [a, b, c]


def qcow2_set(tools) -> list[str]:
    """base.qcow2 (data at 0 and 512k) and top.qcow2 over it (data at 64k, zeroes at 512k)."""
    d = _dir(tools, "qcow2-set")
    base, top = os.path.join(d, "base.qcow2"), os.path.join(d, "top.qcow2")
    if not os.path.exists(top):
        _qemu("qemu-img", "create", "-q", "-f", "qcow2", base, "1M")
        _qemu("qemu-io", "-c", "write -P 1 0 64k", "-c", "write -P 2 512k 64k", base)
        _qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, cwd=d)
        _qemu("qemu-io", "-c", "write -P 3 64k 64k", "-c", "write -z 512k 4k", top)
    return [base, top]


def assert_same(tools, argv: list[str], files=(), compare_files=True, stdin: str = ""):
    """Run ``argv`` through qemu-img and qblock-img and check output, status and file contents."""
    q, b, dq, db = tools.both("img", argv, files, stdin)
    assert b.out == q.out
    assert b.err == q.err
    assert b.rc == q.rc
    if compare_files:
        for name in sorted(os.listdir(dq)):
            with open(os.path.join(dq, name), "rb") as fq, open(os.path.join(db, name), "rb") as fb:
                assert fb.read() == fq.read(), f"{name} differs"
    return q, b, dq, db


# --------------------------------------------------------------------------
# create


@needs_qemu
@pytest.mark.parametrize("argv", [
    ["create", "-f", "raw", "x.img", "1M"], ["create", "x.img", "1M", "-o", "preallocation=falloc"],
    ["create", "-f", "raw", "-o", "?"], ["create", "-f", "raw", "-o", "help", "x.img"],
    ["create", "-f", "raw", "-o", "size=2M", "f.img"], ["create", "-q", "-f", "raw", "h.img", "1M"],
    ["create", "-f", "raw", "-o", "preallocation=full,nocow=on", "r.img", "100k"], ["create", "-f", "raw", "z.img", "0"],
    ["create", "-f", "raw", "s.img", "1000"], ["create", "-f", "raw", "x.img", "1.5M"],
    ["create", "-f", "raw", "b2.img", "1Q"], ["create", "-f", "raw"], ["create", "-f", "raw", "c2.img", "1M", "extra"],
    ["create", "-f", "bogus", "d.img", "1M"], ["create", "-f", "raw", "e.img"], ["create", "-f", "raw", "-o", "bogus=1",
                                                                                 "g.img", "1M"],
    ["create", "-f", "raw", "-b", "a.img", "i.img", "1M"], ["create", "-f", "raw", "y.img", "-1"],
    ["create", "-f", "raw", "y.img", "1E"], ["create", "-f", "raw", "y.img", "16E"],
    ["create", "-f", "raw", "-o", ",,", "y.img", "1M"], ["create", "-f", "raw", "-o", "size=x", "y.img"],
    ["create", "-f", "raw", "-o", "size=1M", "y.img", "1M"], ["create", "-f", "raw", "-o", "nocow=maybe", "y.img", "1M"],
    ["create", "-f", "null-co", "y.img", "1M"], ["create", "-Z"], ["create", "-f"], ["create", "-f", "raw", "bogus:y", "1M"],
    ["create", "-f", "raw", "/nonexistent-dir/y.img", "1M"],
])
def test_img_create(tools, argv):
    """qemu-img create for raw: the Formatting line, option help, sizes and every error message."""
    assert_same(tools, argv, raw_set(tools))


@needs_qemu
@needs_qcow2
@pytest.mark.parametrize("argv", [
    ["create", "-f", "qcow2", "n.qcow2", "1M"], ["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "n.qcow2"],
    ["create", "-f", "qcow2", "-o", "cluster_size=4k,lazy_refcounts=on", "n.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", "compat=0.10", "n.qcow2", "1M"],
    ["create", "-f", "qcow2", "-b", "base.qcow2", "n.qcow2", "1M"],
    ["create", "-f", "qcow2", "-u", "-b", "nonexist.qcow2", "-F", "qcow2", "n.qcow2", "1M"],
    ["create", "-f", "qcow2", "-b", "nonexist.qcow2", "-F", "qcow2", "n.qcow2"],
    ["create", "-f", "qcow2", "-b", "n.qcow2", "-F", "qcow2", "n.qcow2", "1M"],
])
def test_img_create_qcow2(tools, argv):
    """qemu-img create for qcow2, with and without backing files."""
    assert_same(tools, argv, qcow2_set(tools), compare_files=False)


# --------------------------------------------------------------------------
# info, map, check


@needs_qemu
@pytest.mark.parametrize("argv", [
    ["info", "a.img"], ["info", "-f", "raw", "--output=json", "a.img"], ["info", "--backing-chain", "--output=json",
                                                                         "-f", "raw", "a.img"],
    ["info", "--backing-chain", "-f", "raw", "a.img"], ["info", "-U", "--output=human", "c.img"],
    ["info", "--image-opts", "driver=null-co,size=1M"], ["info", "--image-opts", "driver=null-co"],
    ["info", "--output=json", "--image-opts", "driver=null-co,size=1M"],
    ["info", "--image-opts", "driver=raw,file.filename=a.img"],
    ["info", "--image-opts", "driver=raw,offset=512,file.filename=a.img"],
    ["info", 'json:{"driver":"raw","file":{"driver":"file","filename":"a.img"}}'],
    ["info"], ["info", "-f"], ["info", "--output=xml", "a.img"], ["info", "--output"], ["info", "-Z", "a.img"],
    ["info", "a.img", "b.img"], ["info", "nonexist"], ["info", "-f", "qcow2", "a.img"],
    ["info", "--image-opts", "-f", "raw", "a.img"], ["info", "--object", "bogus", "a.img"],
])
def test_img_info_raw(tools, argv):
    """qemu-img info human and JSON output (keys in QEMU's order), and its errors."""
    assert_same(tools, argv, raw_set(tools))


@needs_qemu
@needs_qcow2
@pytest.mark.parametrize("argv", [["info", "top.qcow2"], ["info", "--backing-chain", "top.qcow2"],
                                  ["info", "--output=json", "top.qcow2"],
                                  ["info", "--output=json", "--backing-chain", "top.qcow2"]])
def test_img_info_qcow2(tools, argv):
    """qemu-img info of a qcow2 overlay and its backing chain."""
    assert_same(tools, argv, qcow2_set(tools))


@needs_qemu
@pytest.mark.parametrize("argv", [
    ["map", "-f", "raw", "a.img"], ["map", "-f", "raw", "--output=json", "a.img"],
    ["map", "-f", "raw", "--output=json", "--start-offset", "100k", "--max-length", "200k", "a.img"],
    ["map", "-f", "raw", "--start-offset=1k", "a.img"], ["map", "-f", "raw", "-s", "1k", "-l", "4k", "b.img"],
    ["map", "--output=json", "--image-opts", "driver=null-co,size=1M"],
    ["map", "--image-opts", "driver=null-co,size=1M,read-zeroes=on"],
    ["map", "--image-opts", "driver=raw,offset=4096,file.filename=a.img"],
    ["map", "--start-offset=x", "a.img"], ["map", "--max-length=-1", "a.img"], ["map", "--output=xml", "a.img"],
    ["map"], ["map", "-f", "raw", "--start-offset", "2M", "a.img"],
])
def test_img_map_raw(tools, argv):
    """qemu-img map human and JSON output for raw images with holes, windows and null-co."""
    assert_same(tools, argv, raw_set(tools))


@needs_qemu
@needs_qcow2
@pytest.mark.parametrize("argv", [["map", "top.qcow2"], ["map", "--output=json", "top.qcow2"],
                                  ["map", "--output=json", "base.qcow2"], ["map", "-s", "60k", "-l", "500k",
                                                                          "--output=json", "top.qcow2"]])
def test_img_map_qcow2(tools, argv):
    """qemu-img map through a qcow2 backing chain (depth, zero clusters, offsets)."""
    assert_same(tools, argv, qcow2_set(tools))


@needs_qemu
@pytest.mark.parametrize("argv", [
    ["check", "-f", "raw", "a.img"], ["check", "--output=json", "-f", "raw", "a.img"], ["check", "a.img"],
    ["check", "-r", "bogus", "a.img"], ["check"], ["check", "-f", "raw", "--output=xml", "a.img"],
    ["check", "-T", "bogus", "-f", "raw", "a.img"], ["check", "nonexist"],
])
def test_img_check_raw(tools, argv):
    """qemu-img check on raw: "does not support checks" with exit status 63, and option errors."""
    assert_same(tools, argv, raw_set(tools))


def _qcow2_header(path: str) -> dict:
    with open(path, "rb") as f:
        h = f.read(104)
    (magic, version, _bfo, _bfs, cluster_bits, size, _crypt, l1_size, l1_off, rt_off, rt_clusters, _nb_sn,
     _sn_off) = struct.unpack(">IIQIIQIIQQIIQ", h[:72])
    return {"cluster_bits": cluster_bits, "l1_off": l1_off, "rt_off": rt_off}


def _set_refcount(path: str, cluster: int, value: int) -> None:
    """Poke a 16-bit refcount in the first refcount block (qemu-iotests do the same with qcow2.py)."""
    h = _qcow2_header(path)
    with open(path, "r+b") as f:
        f.seek(h["rt_off"])
        rb_off = struct.unpack(">Q", f.read(8))[0]
        f.seek(rb_off + 2 * cluster)
        f.write(struct.pack(">H", value))
        cs = 1 << h["cluster_bits"]
        if os.path.getsize(path) < (cluster + 1) * cs:
            f.truncate((cluster + 1) * cs)


def check_images(tools) -> list[str]:
    """clean.qcow2, leaky.qcow2 (one cluster with refcount 1 and no reference) and corrupt.qcow2."""
    d = _dir(tools, "check-set")
    clean, leaky, corrupt = (os.path.join(d, n) for n in ("clean.qcow2", "leaky.qcow2", "corrupt.qcow2"))
    if not os.path.exists(corrupt):
        _qemu("qemu-img", "create", "-q", "-f", "qcow2", clean, "1M")
        _qemu("qemu-io", "-c", "write -P 1 0 64k", clean)
        shutil.copy(clean, leaky)
        size = os.path.getsize(leaky)
        _set_refcount(leaky, size // 65536 + 1, 1)
        shutil.copy(clean, corrupt)
        _set_refcount(corrupt, size // 65536 - 1, 0)
    return [clean, leaky, corrupt]


@needs_qemu
@needs_qcow2
@pytest.mark.parametrize("name", ["clean.qcow2", "leaky.qcow2", "corrupt.qcow2"])
def test_img_check_qcow2_counts(tools, name):
    """check agrees with qemu-img on clean, leaky and corrupt images: messages, counts and exit codes."""
    files = check_images(tools)
    q, b, _, _ = tools.both("img", ["check", "--output=json", name], files)
    strip = ("total-clusters", "allocated-clusters", "fragmented-clusters", "compressed-clusters")
    import json
    jq, jb = json.loads(q.out or "{}"), json.loads(b.out or "{}")
    for k in strip:
        jq.pop(k, None)
        jb.pop(k, None)
    assert (jb, b.rc, b.err) == (jq, q.rc, q.err)
    assert q.rc == {"clean.qcow2": 0, "leaky.qcow2": 3, "corrupt.qcow2": 2}[name]


@needs_qemu
@needs_qcow2
def test_img_check_repair(tools):
    """check -r leaks repairs the leak and reports the repair the way qemu-img does."""
    files = check_images(tools)
    q, b, dq, db = tools.both("img", ["check", "-r", "leaks", "leaky.qcow2"], files)
    assert (b.rc, b.err) == (q.rc, q.err)
    keep = [ln for ln in q.out.splitlines() if "allocated" not in ln]
    assert [ln for ln in b.out.splitlines() if "allocated" not in ln] == keep
    q2 = tools.qemu("img", ["check", "leaky.qcow2"], db)
    assert q2.rc == 0


# --------------------------------------------------------------------------
# compare and convert


@needs_qemu
@pytest.mark.parametrize("argv", [
    ["compare", "a.img", "b.img"], ["compare", "-f", "raw", "-F", "raw", "a.img", "b.img"],
    ["compare", "-f", "raw", "-F", "raw", "a.img", "c.img"], ["compare", "-s", "-f", "raw", "-F", "raw", "a.img",
                                                               "c.img"],
    ["compare", "-f", "raw", "-F", "raw", "a.img", "a.img"], ["compare", "-p", "-f", "raw", "-F", "raw", "a.img",
                                                               "b.img"],
    ["compare", "-f", "raw", "-F", "raw", "a.img", "nonexist"], ["compare", "a.img"],
    ["compare", "-q", "-f", "raw", "-F", "raw", "a.img", "b.img"], ["compare", "-U", "-f", "raw", "-F", "raw",
                                                                     "c.img", "a.img"],
    ["compare", "-T", "bogus", "a.img", "b.img"],
])
def test_img_compare(tools, argv):
    """qemu-img compare: identical, mismatch offset, size mismatch, strict mode, exit codes 0/1/2."""
    assert_same(tools, argv, raw_set(tools))


@needs_qemu
@pytest.mark.parametrize("argv", [
    ["convert", "-f", "raw", "-O", "raw", "a.img", "d.img"], ["convert", "-p", "-f", "raw", "-O", "raw", "a.img",
                                                              "e.img"],
    ["convert", "-f", "raw", "-O", "raw", "-S", "0", "a.img", "f.img"], ["convert", "-W", "-m", "1", "b.img",
                                                                         "j.img"],
    ["convert", "-m", "16", "-S", "64k", "-f", "raw", "b.img", "j.img"],
    ["convert", "-p", "-S", "512", "-f", "raw", "-O", "raw", "c.img", "b.img", "k.img"],
    ["convert", "-n", "-f", "raw", "-O", "raw", "a.img", "c.img"], ["convert", "-n", "c.img", "a.img"],
    ["convert", "-o", "preallocation=falloc", "-f", "raw", "a.img", "p.img"], ["convert", "-C", "a.img", "q.img"],
    ["convert", "-t", "none", "-T", "writeback", "-f", "raw", "a.img", "q.img"],
    ["convert", "-m", "17", "a.img", "g.img"], ["convert", "-S", "1000", "a.img", "g.img"], ["convert"],
    ["convert", "a.img"], ["convert", "-O", "bogus", "a.img", "x.img"], ["convert", "-S", "x", "a.img", "x.img"],
    ["convert", "-o", "help"], ["convert", "-O", "raw", "-o", "help"], ["convert", "-c", "a.img", "i.img"],
    ["convert", "-C", "-c", "a.img", "i.img"], ["convert", "-B", "a.img", "a.img", "i.img"],
    ["convert", "--target-image-opts", "a.img", "i.img"], ["convert", "-f", "raw", "nonexist", "i.img"],
    ["convert", "-l", "snap", "a.img", "i.img"],
])
def test_img_convert_raw(tools, argv):
    """qemu-img convert to raw: contents, progress lines, sparse detection flags and every error."""
    assert_same(tools, argv, raw_set(tools))


@needs_qemu
def test_img_convert_sparse(tools):
    """convert writes no zeroes: the target's allocation map equals QEMU's (sparse output, -S 0 fully allocated)."""
    for extra in ([], ["-S", "0"], ["-S", "8k"]):
        _, _, dq, db = assert_same(tools, ["convert", "-f", "raw", "-O", "raw"] + extra + ["b.img", "out.img"],
                                   raw_set(tools))
        mq = tools.qemu("img", ["map", "--output=json", "-f", "raw", "out.img"], dq)
        mb = tools.qemu("img", ["map", "--output=json", "-f", "raw", "out.img"], db)
        assert mb.out == mq.out


@needs_qemu
@needs_qcow2
@pytest.mark.parametrize("argv", [
    ["convert", "-O", "raw", "top.qcow2", "out.raw"], ["convert", "-p", "-O", "raw", "top.qcow2", "out.raw"],
    ["convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "out.qcow2"],
    ["convert", "-O", "qcow2", "-B", "base.qcow2", "top.qcow2", "out.qcow2"],
])
def test_img_convert_qcow2(tools, argv):
    """qemu-img convert from a qcow2 chain (to raw, and to a qcow2 overlay with -B)."""
    assert_same(tools, argv, qcow2_set(tools), compare_files=False)


@needs_qemu
@pytest.mark.parametrize("fmt", FORMATS)
def test_cross_convert_compare(tools, fmt):
    """qemu-img compare accepts what qblock-img convert writes, qblock-img compare what qemu-img writes."""
    files = raw_set(tools) + (qcow2_set(tools) if fmt == "qcow2" else [])
    src = "top.qcow2" if fmt == "qcow2" else "b.img"
    for extra in ([], ["-c"] if fmt == "qcow2" else ["-S", "0"]):
        dq, db = tools.pair(files)
        rb = tools.qblock("img", ["convert", "-O", fmt] + extra + [src, "out"], db)
        rq = tools.qemu("img", ["convert", "-O", fmt] + extra + [src, "out"], dq)
        assert rb.rc == rq.rc == 0
        assert tools.qemu("img", ["compare", src, "out"], db).out == "Images are identical.\n"
        assert tools.qblock("img", ["compare", src, "out"], dq).out == "Images are identical.\n"
        assert tools.qemu("img", ["check", "out"], db).rc in (0, 63)


@needs_qemu
@pytest.mark.parametrize("fmt", FORMATS)
def test_cross_map_json(tools, fmt):
    """qblock-img map --output=json equals qemu-img map on the same image (including images qblock wrote)."""
    files = qcow2_set(tools) if fmt == "qcow2" else raw_set(tools)
    names = ["top.qcow2", "base.qcow2"] if fmt == "qcow2" else ["a.img", "b.img", "c.img"]
    dq, _ = tools.pair(files)
    for name in names:
        assert tools.qblock("img", ["map", "--output=json", name], dq).out == \
            tools.qemu("img", ["map", "--output=json", name], dq).out
    tools.qblock("img", ["create", "-q", "-f", fmt, "new", "1M"], dq)
    tools.qblock("io", ["-c", "write -P 1 64k 64k", "-c", "write -z 256k 64k", "new"], dq)
    assert tools.qblock("img", ["map", "--output=json", "new"], dq).out == \
        tools.qemu("img", ["map", "--output=json", "new"], dq).out


# --------------------------------------------------------------------------
# resize, measure, bench, dd


@needs_qemu
@pytest.mark.parametrize("argv", [
    ["resize", "-f", "raw", "a.img", "2M"], ["resize", "-f", "raw", "a.img", "+1M"],
    ["resize", "-f", "raw", "a.img", "--", "-512k"], ["resize", "--shrink", "-f", "raw", "a.img", "512k"],
    ["resize", "--shrink", "-f", "raw", "a.img", "-512k"], ["resize", "-f", "raw", "a.img", "1X"],
    ["resize", "-f", "raw", "a.img", "-2M"], ["resize", "a.img"], ["resize", "-f", "raw", "--preallocation=full",
                                                                    "a.img", "2M"],
    ["resize", "-f", "raw", "--preallocation=falloc", "a.img", "512k"], ["resize", "-f", "raw", "nonexist", "2M"],
    ["resize", "-q", "-f", "raw", "a.img", "4M"], ["resize", "--preallocation=bogus", "a.img", "2M"],
    ["resize", "-f", "raw", "a.img", "b.img", "2M"],
])
def test_img_resize(tools, argv):
    """qemu-img resize: absolute and relative sizes, --shrink, preallocation and the errors."""
    assert_same(tools, argv, raw_set(tools))


@needs_qemu
@pytest.mark.parametrize("argv", [
    ["measure", "-O", "raw", "--size", "1G"], ["measure", "-f", "raw", "-O", "raw", "a.img", "--output=json"],
    ["measure", "a.img", "--size", "1G"], ["measure"], ["measure", "-O", "bogus", "--size", "1G"],
    ["measure", "--size", "x"], ["measure", "--output=xml", "--size", "1G"], ["measure", "-o", "bogus=1", "--size",
                                                                              "1G"],
    ["measure", "a.img", "b.img"], ["measure", "-f", "raw", "--size", "1G"], ["measure", "-O", "null-co",
                                                                              "--size", "1G"],
])
def test_img_measure(tools, argv):
    """qemu-img measure for raw output and its argument errors."""
    assert_same(tools, argv, raw_set(tools))


@needs_qemu
@needs_qcow2
@pytest.mark.parametrize("argv", [["measure", "-O", "qcow2", "--size", "1G"],
                                  ["measure", "-O", "qcow2", "top.qcow2", "--output=json"]])
def test_img_measure_qcow2(tools, argv):
    """qemu-img measure for qcow2 output."""
    assert_same(tools, argv, qcow2_set(tools))


@needs_qemu
@pytest.mark.parametrize("argv", [
    ["bench", "-c", "1000", "-d", "8", "-f", "raw", "a.img"],
    ["bench", "-w", "-c", "100", "-s", "512", "-S", "1024", "-o", "1k", "--pattern=3", "-f", "raw", "a.img"],
    ["bench", "-w", "-c", "100", "--flush-interval=10", "-d", "4", "-f", "raw", "a.img"],
    ["bench", "-w", "-c", "100", "--flush-interval=10", "--no-drain", "-d", "4", "-f", "raw", "a.img"],
    ["bench", "-c", "100", "--flush-interval=10", "-f", "raw", "a.img"],
    ["bench", "-w", "-c", "100", "--flush-interval=2", "-d", "4", "-f", "raw", "a.img"],
    ["bench", "-c", "x", "a.img"], ["bench", "-q", "-c", "10", "-f", "raw", "a.img"],
    ["bench", "-t", "none", "-i", "threads", "-c", "10", "-f", "raw", "a.img"],
    ["bench", "-w", "-c", "2000", "-d", "64", "--image-opts", "driver=null-co,size=1G"],
    ["bench", "-w", "-c", "10", "-o", "1M", "-f", "raw", "a.img"], ["bench", "-d", "x", "a.img"],
    ["bench", "-s", "x", "a.img"], ["bench", "-S", "-1", "a.img"], ["bench", "-o", "x", "a.img"],
    ["bench", "--pattern=300", "a.img"], ["bench", "-t", "bogus", "a.img"], ["bench", "-i", "bogus", "a.img"],
    ["bench", "--flush-interval=x", "-w", "a.img"], ["bench"], ["bench", "-w", "-U", "-f", "raw", "a.img"],
])
def test_img_bench(tools, argv):
    """qemu-img bench prints the same lines (run time filtered) and the same errors."""
    assert_same(tools, argv, raw_set(tools))


@needs_qemu
@pytest.mark.parametrize("argv", [
    ["dd", "-f", "raw", "-O", "raw", "if=a.img", "of=o1.img", "bs=64k", "count=3", "skip=1"],
    ["dd", "if=a.img", "of=o2.img", "bs=0"], ["dd", "if=a.img"], ["dd", "if=a.img", "of=o3.img", "foo=1"],
    ["dd", "if=a.img", "of=o3.img", "bad"], ["dd", "-f", "raw", "if=a.img", "of=o4.img", "skip=100000"],
    ["dd", "-f", "raw", "if=a.img", "of=o5.img", "bs=1000"], ["dd"], ["dd", "if=a.img", "of=x", "bs=1x"],
    ["dd", "if=a.img", "of=x", "count=x"], ["dd", "if=a.img", "of=x", "skip=x"],
    ["dd", "-O", "bogus", "if=a.img", "of=x"], ["dd", "-f", "raw", "if=nonexist", "of=x"],
])
def test_img_dd(tools, argv):
    """qemu-img dd: bs/count/skip/if/of operands, the output image and the errors."""
    assert_same(tools, argv, raw_set(tools))


# --------------------------------------------------------------------------
# rebase, commit, snapshot, amend, bitmap


@needs_qemu
@pytest.mark.parametrize("argv", [
    ["rebase", "-f", "raw", "-b", "a.img", "b.img"], ["rebase", "-f", "raw", "-u", "-b", "", "b.img"],
    ["rebase", "-f", "raw", "b.img"], ["rebase", "a.img"], ["rebase", "-b", "x"], ["commit", "-f", "raw", "b.img"],
    ["commit"], ["commit", "-b", "x", "-f", "raw", "a.img"], ["snapshot", "-l", "a.img"],
    ["snapshot", "-l", "-f", "raw", "a.img"], ["snapshot", "-c", "s1", "a.img"], ["snapshot", "a.img"],
    ["snapshot", "-d", "s1", "a.img"], ["snapshot", "-a", "s1", "a.img"], ["snapshot", "-l"], ["snapshot", "-l", "-c", "x", "a.img"],
    ["amend", "-o", "size=2M", "-f", "raw", "a.img"], ["amend", "-f", "raw", "a.img"],
    ["amend", "-o", "help", "-f", "raw", "a.img"], ["amend", "a.img"], ["amend", "-o", "x", "a.img"],
    ["bitmap", "-f", "raw", "a.img", "b0"],
])
def test_img_rebase_commit_snapshot_amend_raw(tools, argv):
    """rebase, commit, snapshot, amend and bitmap on raw fail with qemu-img's messages."""
    assert_same(tools, argv, raw_set(tools))


@needs_qemu
@needs_qcow2
@pytest.mark.parametrize("argv", [
    ["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"], ["rebase", "-u", "-b", "", "top.qcow2"],
    ["rebase", "-b", "", "top.qcow2"], ["rebase", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
    ["rebase", "-p", "-b", "", "top.qcow2"], ["rebase", "-b", "nonexist", "-F", "qcow2", "top.qcow2"],
    ["rebase", "-b", "base.qcow2", "-F", "bogus", "top.qcow2"],
    ["commit", "-d", "top.qcow2"], ["commit", "-b", "nonexist", "top.qcow2"], ["commit", "base.qcow2"],
    ["snapshot", "-l", "base.qcow2"], ["snapshot", "-d", "nonexist", "base.qcow2"],
])
def test_img_rebase_commit_qcow2(tools, argv):
    """rebase (safe and -u), commit -d and snapshot -l on a qcow2 chain: output and resulting contents."""
    q, b, dq, db = assert_same(tools, argv, qcow2_set(tools), compare_files=False)
    for name in ("base.qcow2", "top.qcow2"):
        assert tools.qemu("img", ["compare", "-f", "qcow2", "-F", "qcow2", os.path.join(dq, name),
                                  os.path.join(db, name)], dq).rc == 0


@needs_qemu
@needs_qcow2
def test_img_snapshot_list(tools):
    """snapshot -l lists internal snapshots made by qemu-img as qemu-img lists them."""
    d = _dir(tools, "snap-set")
    img = os.path.join(d, "s.qcow2")
    if not os.path.exists(img):
        _qemu("qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
        _qemu("qemu-img", "snapshot", "-c", "snap1", img)
        _qemu("qemu-img", "snapshot", "-c", "second", img)
    assert_same(tools, ["snapshot", "-l", "s.qcow2"], [img])


@needs_qemu
@needs_qcow2
@pytest.mark.parametrize("argv", [["amend", "-o", "compat=0.10", "base.qcow2"], ["amend", "-o", "help", "base.qcow2"],
                                  ["amend", "-f", "qcow2", "-o", "help"], ["amend", "-o", "cluster_size=4k",
                                                                           "base.qcow2"]])
def test_img_amend_qcow2(tools, argv):
    """amend -o compat=... on qcow2, its option help and the creation-only option hint."""
    assert_same(tools, argv, qcow2_set(tools), compare_files=False)


# --------------------------------------------------------------------------
# Bad input everywhere


@needs_qemu
@pytest.mark.parametrize("argv", [
    [], ["bogus"], ["--bogus"], ["-T"], ["info", "--bogus"], ["map", "-x", "a.img"], ["check", "-f"],
    ["compare", "-Z", "a.img", "b.img"], ["convert", "--bogus", "a.img", "x"], ["resize", "-Z", "a.img", "1M"],
    ["amend", "--bogus"], ["bench", "-Z", "a.img"], ["dd", "-Z"], ["snapshot", "-Z", "a.img"], ["rebase", "-Z"],
    ["commit", "-Z", "a.img"], ["create", "--object"], ["measure", "-Z"], ["info", "--out=json", "a.img"],
    ["info", "--ou", "json", "a.img"], ["info", "--o=json", "a.img"],
])
def test_img_bad_input(tools, argv):
    """Unknown commands and options, missing arguments: qemu-img's one-line messages and exit status."""
    q, b, _, _ = assert_same(tools, argv, raw_set(tools))
    assert "Traceback" not in b.err


def test_img_console_script(tmp_path):
    """The qblock-img console script runs and reports errors on one line, never a traceback."""
    import sys
    exe = shutil.which("qblock-img") or os.path.join(os.path.dirname(sys.executable), "qblock-img")
    if not os.path.exists(exe):
        pytest.skip("qblock-img console script not installed (pip install -e .)")
    p = subprocess.run([exe, "create", "-f", "raw", str(tmp_path / "x.img"), "1Q"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1
    assert p.stderr == ("qemu-img: Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
                        "qemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n")
    p = subprocess.run([exe, "check", "-f", "raw", str(tmp_path / "nonexist")], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


# --------------------------------------------------------------------------
# qemu-iotests 025 ported (expected output from oracles.md; no QEMU needed)


@pytest.mark.parametrize("fmt", FORMATS)
def test_iotest_025(tools, fmt):
    """qemu-iotests 025: grow a 128 MiB image to 384 MiB; old data stays, the new area reads as zeroes."""
    d = _dir(tools, f"iotest-025-{fmt}")
    img = os.path.join(d, f"t.{fmt}")
    out = ["QA output created by 025\n", "=== Creating image\n", "\n"]

    def flt(text: str) -> str:
        from .qemu_compat import filter_qemu_io
        return filter_qemu_io(text.replace(d, "TEST_DIR"))

    def check() -> None:
        r = tools.qblock("img", ["check", "-f", fmt, img], d)
        text = (r.out + r.err).replace("qemu-img: This image format does not support checks",
                                       "No errors were found on the image.")
        out.append("".join(ln for ln in text.splitlines(keepends=True)
                           if not ln.startswith("Image end offset: ") and not ("allocated" in ln and
                                                                               "clusters" in ln)))

    def io_pattern(op: str, start: int, size: int, pattern: str) -> None:
        out.append(f"=== IO: pattern {pattern}\n")
        r = tools.qblock("io", ["--cache", "writeback", "-f", fmt, img], d, stdin=f"{op} -P {pattern} {start} {size}\n")
        out.append(flt(r.out) + flt(r.err))

    r = tools.qblock("img", ["create", "-f", fmt, img, str(128 << 20)], d)
    out.append(filter_img_create(r.out, d, fmt) + r.err)
    out.append("\n=== Writing whole image\n")
    io_pattern("write", 0, 128 << 20, "0xc5")
    check()
    out.append("\n=== Resizing image\n")
    r = tools.qblock("io", ["--cache", "writeback", "-f", fmt, img], d, stdin=f"length\ntruncate {384 << 20}\nlength\n")
    out.append(flt(r.out) + flt(r.err))
    check()
    out.append("\n=== Verifying image size after reopen\n")
    r = tools.qblock("io", ["--cache", "writeback", "-f", fmt, "-c", "length", img], d)
    out.append(r.out + r.err)
    out.append("\n=== Verifying resized image\n")
    io_pattern("read", 0, 128 << 20, "0xc5")
    io_pattern("read", 128 << 20, 256 << 20, "0")
    out.append("*** done\n")
    io = "X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)\n"
    assert "".join(out) == (
        "QA output created by 025\n=== Creating image\n\n"
        "Formatting 'TEST_DIR/t.IMGFMT', fmt=IMGFMT size=134217728\n"
        "\n=== Writing whole image\n=== IO: pattern 0xc5\n"
        "wrote 134217728/134217728 bytes at offset 0\n128 MiB, " + io +
        "No errors were found on the image.\n"
        "\n=== Resizing image\n128 MiB\n384 MiB\nNo errors were found on the image.\n"
        "\n=== Verifying image size after reopen\n384 MiB\n"
        "\n=== Verifying resized image\n=== IO: pattern 0xc5\n"
        "read 134217728/134217728 bytes at offset 0\n128 MiB, " + io +
        "=== IO: pattern 0\n"
        "read 268435456/268435456 bytes at offset 134217728\n256 MiB, " + io + "*** done\n")
