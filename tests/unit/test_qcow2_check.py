"""qcow2 check and repair against the real ``qemu-img check`` (as qemu-iotests 060, 061, 138 and 039 damage images).

Each damaged image is made by writing bytes into an image qemu-img and qemu-io made.  On two copies of it,
``qemu-img check [-r leaks|all] --output=json`` and qblock's ``bdrv_check`` (run as qemu-img runs it: a
repair pass, then a second pass if anything was fixed) must agree on every count — corruptions, leaks, check
errors, fixed counts, image end offset, fragmentation statistics — and on every line the check writes to
stderr.  After a repair each tool checks the other's repaired image: same verdict, clean wherever QEMU's own
repair made it clean.  ``qblock-img check`` is then held to ``qemu-img check``'s human output and exit code,
byte for byte.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import struct
import subprocess

import pytest

from qblock.block.block_backend import blk_bs, blk_unref
from qblock.block.check import BDRV_FIX_ERRORS, BDRV_FIX_LEAKS, BdrvCheckResult, bdrv_check
from qblock.block.driver import BDRV_O_CHECK, BDRV_O_RDWR

from .qcow2_util import fast_tmp, header, open_blk, peek, poke  # noqa: F401 - fast_tmp is a fixture

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="needs qemu-img and qemu-io (Debian's qemu-utils; .ci/run installs them)")

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63


def run(*args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout}{r.stderr}")
    return r


def be64(path, offset: int) -> int:
    return struct.unpack(">Q", peek(path, offset, 8))[0]


def image(path, size="64M", opts=None, cmds=("write -P 0x11 0 256k", "write -P 0x22 1M 64k")) -> dict:
    """A qemu-img image written by qemu-io; its layout: cluster size, L1, first L2, reftable, first refblock."""
    run("qemu-img", "create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), path, size)
    args = ["qemu-io"]
    for c in cmds:
        args += ["-c", c]
    r = run(*args, path, check=False)
    assert r.returncode == 0 or "abort" in cmds, r.stdout + r.stderr
    h = header(path)
    return {"cs": 1 << h["cluster_bits"], "l1": h["l1_table_offset"], "l2": be64(path, h["l1_table_offset"]) &
            L1E_OFFSET_MASK, "rt": h["refcount_table_offset"], "rb": be64(path, h["refcount_table_offset"])}


def set_rc16(path, lay, cluster: int, value: int) -> None:
    poke(path, lay["rb"] + 2 * cluster, struct.pack(">H", value))


def set_l2(path, lay, index: int, entry: int) -> None:
    poke(path, lay["l2"] + 8 * index, struct.pack(">Q", entry))


def truncate(path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


# The default image: header 0, reftable 0x10000, refblock 0x20000, L1 0x30000, L2 0x40000, data from 0x50000.
def _leak(p):
    lay = image(p)
    truncate(p, 0xB0000)
    set_rc16(p, lay, 10, 1)


def _compressed(p, damage):
    lay = image(p, cmds=("write -c -P 0x11 0 64k", "write -c -P 0x22 64k 64k", "write -P 0x33 128k 64k"))
    damage(p, lay)


def _snapshot(p, damage=None):
    lay = image(p, cmds=("write -P 1 0 128k",))
    run("qemu-img", "snapshot", "-c", "s1", p)
    run("qemu-io", "-c", "write -P 2 64k 64k", "-c", "write -P 3 2M 64k", p)
    if damage:
        damage(p, lay)


def _bigleak(p):
    lay = image(p, cmds=("write -P 1 0 4M", "discard 0 2M"))
    for i in range(5, 80):
        set_rc16(p, lay, i, 1)


CASES = {
    "clean": lambda p: image(p),
    "leak": _leak,
    "refcount-zero": lambda p: set_rc16(p, image(p), 5, 0),
    "refcount-two": lambda p: set_rc16(p, image(p), 5, 2),
    "header-refcount-zero": lambda p: set_rc16(p, image(p), 0, 0),
    "l2-entry-past-end": lambda p: set_l2(p, image(p), 1, COPIED | 0x1000000),
    "l2-entry-unaligned": lambda p: set_l2(p, image(p), 1, COPIED | 0x60200),
    "l2-zero-entry-unaligned": lambda p: set_l2(p, image(p), 1, COPIED | 0x60200 | 1),
    "l2-entry-reserved-bits": lambda p: set_l2(p, image(p), 1, COPIED | 0x60000 | 2),
    "l2-entry-on-l1-table": lambda p: set_l2(p, image(p), 1, COPIED | 0x30000),
    "oflag-copied-data": lambda p: set_l2(p, image(p), 1, 0x60000),
    "oflag-copied-l2": lambda p: poke(p, image(p)["l1"], struct.pack(">Q", 0x40000)),
    "l1-entry-unaligned": lambda p: poke(p, image(p)["l1"], struct.pack(">Q", COPIED | 0x40200)),
    "l1-entry-reserved-bits": lambda p: poke(p, image(p)["l1"], struct.pack(">Q", COPIED | 0x40000 | 1 << 60)),
    "l1-table-past-end": lambda p: (image(p), poke(p, 40, struct.pack(">Q", 0x100000))),
    "l2-table-shared": lambda p: poke(p, image(p, size="2G", cmds=("write 0 64k",))["l1"] + 8,
                                      struct.pack(">Q", COPIED | 0x40000)),
    "reftable-entry-unaligned": lambda p: poke(p, image(p)["rt"], struct.pack(">Q", 0x20200)),
    "reftable-entry-outside": lambda p: poke(p, image(p)["rt"] + 8, struct.pack(">Q", 0x1000000)),
    "reftable-entry-reserved": lambda p: poke(p, image(p)["rt"], struct.pack(">Q", 0x20000 | 1)),
    "compressed-copied": lambda p: _compressed(p, lambda p, lay: set_l2(p, lay, 0, be64(p, lay["l2"]) | COPIED)),
    "compressed-leak": lambda p: _compressed(p, lambda p, lay: set_l2(p, lay, 1, 0)),
    "refcount-bits-1-overflow": lambda p: set_l2(p, lay := image(p, opts="refcount_bits=1", cmds=("write 0 128k",)),
                                                 1, be64(p, lay["l2"])),
    "refcount-bits-8": lambda p: poke(p, image(p, opts="refcount_bits=8", cmds=("write 0 128k",))["rb"] + 5, b"\0"),
    "refcount-bits-64-leak": lambda p: poke(p, image(p, opts="refcount_bits=64", cmds=("write 0 128k",))["rb"] + 40,
                                            struct.pack(">Q", 3)),
    "clusters-512": lambda p: (set_rc16(p, lay := image(p, "8M", "cluster_size=512",
                                                        ("write -P 1 0 300k", "write -P 2 4M 100k")), 20, 0),
                               set_rc16(p, lay, 40, 3)),
    "clusters-512-refblock-lost": lambda p: poke(p, image(p, "8M", "cluster_size=512",
                                                          ("write -P 1 0 300k", "write -P 2 4M 100k"))["rt"] + 8,
                                                 bytes(8)),
    "grown-reftable": lambda p: set_rc16(p, image(p, "64M", "cluster_size=512",
                                                  ("write -P 1 0 1M", "write -P 2 60M 1M")), 4, 0),
    "v2": lambda p: set_rc16(p, image(p, opts="compat=0.10"), 5, 2),
    "snapshot": _snapshot,
    "snapshot-shared-cluster-refcount-one": lambda p: _snapshot(p, lambda p, lay: set_rc16(p, lay, 5, 1)),
    "corrupt-bit": lambda p: (image(p), poke(p, 72, struct.pack(">Q", 2))),
    "corrupt-bit-and-leak": lambda p: (_leak(p), poke(p, 72, struct.pack(">Q", 2))),
    "dirty-lazy-refcounts": lambda p: image(p, opts="lazy_refcounts=on",
                                            cmds=("write -P 0x5a 0 512", "write -P 0x5b 1M 128k", "abort")),
    "many-leaks": _bigleak,
    "snapshot-table-too-large": lambda p: (image(p), poke(p, 60, struct.pack(">I", 70000))),
    "snapshot-entry-incomplete": lambda p: (image(p), poke(p, 60, struct.pack(">IQ", 1, 0x10000))),
}
# QEMU's -r all on a table of 70000 entries discards the overhanging ones and then fails on its own
# (it marks the image corrupt while rebuilding refcounts); qblock reports them without discarding.
NOT_REPAIRED = {("snapshot-table-too-large", "all")}

MODES = {"": 0, "leaks": BDRV_FIX_LEAKS, "all": BDRV_FIX_LEAKS | BDRV_FIX_ERRORS}
JSON_KEYS = {"corruptions": "corruptions", "leaks": "leaks", "check-errors": "check_errors",
             "corruptions-fixed": "corruptions_fixed", "leaks-fixed": "leaks_fixed",
             "image-end-offset": "image_end_offset"}
BFI_KEYS = {"total-clusters": "total_clusters", "allocated-clusters": "allocated_clusters",
            "fragmented-clusters": "fragmented_clusters", "compressed-clusters": "compressed_clusters"}


def qemu_check(path, mode: str, output="json") -> subprocess.CompletedProcess:
    return run("qemu-img", "check", *(["-r", mode] if mode else []), f"--output={output}", path, check=False)


def qblock_check(path, fix: int) -> tuple[int, BdrvCheckResult]:
    """What qemu-img check does with the driver: check (repairing), and check again when anything was fixed."""
    blk = open_blk(path, BDRV_O_CHECK | (BDRV_O_RDWR if fix else 0))
    try:
        bs = blk_bs(blk)
        res = BdrvCheckResult()
        ret = bdrv_check(bs, res, fix)
        if ret == 0 and (res.corruptions_fixed or res.leaks_fixed):
            fixed = (res.corruptions_fixed, res.leaks_fixed)
            ret = bdrv_check(bs, res, 0)
            res.corruptions_fixed, res.leaks_fixed = fixed
        return ret, res
    finally:
        blk_unref(blk)


def nonzero(d: dict) -> dict:
    return {k: v for k, v in d.items() if (k in JSON_KEYS or k in BFI_KEYS) and v}


def as_json(res: BdrvCheckResult) -> dict:
    """The counts qemu-img check --output=json prints (it leaves out zeroes)."""
    d = {k: getattr(res, a) for k, a in JSON_KEYS.items()}
    d.update({k: getattr(res.bfi, a) for k, a in BFI_KEYS.items()})
    return {k: v for k, v in d.items() if v}


def stderr_lines(text: str) -> list[str]:
    """A check's stderr without the tool's own closing line, program names made alike."""
    lines = [re.sub(r"^(qemu-img|qblock-img|qblock): ", "PROG: ", ln) for ln in text.splitlines()]
    return [ln for ln in lines if not ln.startswith("PROG: Check failed")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Every damaged image, made once."""
    d = tmp_path_factory.mktemp("corpus")
    for name, make in CASES.items():
        make(str(d / f"{name}.qcow2"))
    return d


@pytest.mark.parametrize("mode", list(MODES), ids=["check", "r-leaks", "r-all"])
@pytest.mark.parametrize("case", list(CASES))
def test_check_counts_and_messages_equal_qemu_img(corpus, fast_tmp, capfd, case, mode):
    """Same counts as qemu-img check --output=json and the same stderr lines; each tool accepts the other's repair."""
    if (case, mode) in NOT_REPAIRED:
        pytest.skip("QEMU discards overhanging snapshots here and then fails its own repair; qblock does not discard")
    a, b = os.path.join(fast_tmp, "qemu.qcow2"), os.path.join(fast_tmp, "qblock.qcow2")
    shutil.copy(corpus / f"{case}.qcow2", a)
    shutil.copy(corpus / f"{case}.qcow2", b)
    q = qemu_check(a, mode)
    capfd.readouterr()
    ret, res = qblock_check(b, MODES[mode])
    err = capfd.readouterr().err
    if q.stdout.strip():
        assert ret == 0, err
        assert as_json(res) == nonzero(json.loads(q.stdout))
    else:
        assert ret < 0 and q.returncode == 1 and "Check failed" in q.stderr
    assert stderr_lines(err) == stderr_lines(q.stderr)
    if mode and ret == 0:
        # Each tool checks the image the other one repaired.
        q_then_qblock = qblock_check(a, 0)[1]
        qblock_then_q = qemu_check(b, "")
        capfd.readouterr()
        assert as_json(q_then_qblock) == nonzero(json.loads(qblock_then_q.stdout))
        if q.returncode == 0:
            assert qblock_then_q.returncode == 0 and not q_then_qblock.corruptions and not q_then_qblock.leaks
            assert header(b)["incompatible_features"] & 3 == 0      # dirty and corrupt bits cleared


def _qblock_img(*args) -> tuple[int, str, str]:
    main = pytest.importorskip("qblock.tools.qemu_img").main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("case", ["clean", "leak", "refcount-zero", "l2-entry-past-end", "l2-zero-entry-unaligned",
                                  "reftable-entry-unaligned", "reftable-entry-outside", "corrupt-bit-and-leak",
                                  "dirty-lazy-refcounts", "compressed-copied", "snapshot"])
def test_qblock_img_check_prints_what_qemu_img_check_prints(corpus, fast_tmp, case):
    """qblock-img check: qemu-img check's human output, stderr and exit code (0, 1, 2, 3), with and without -r."""
    for mode in ("", "leaks", "all"):
        a, b = os.path.join(fast_tmp, "x.qcow2"), os.path.join(fast_tmp, "y.qcow2")
        shutil.copy(corpus / f"{case}.qcow2", a)
        shutil.copy(corpus / f"{case}.qcow2", b)
        q = qemu_check(a, mode, output="human")
        rc, out, err = _qblock_img("check", *(["-r", mode] if mode else []), b)
        assert (rc, out, stderr_lines(err)) == (q.returncode, q.stdout, stderr_lines(q.stderr)), mode


def test_dirty_image_is_repaired_on_a_writable_open(corpus, tmp_path, capfd):
    """An image left dirty by a lazy-refcounts crash: qblock's writable open repairs it as QEMU's does."""
    a, b = tmp_path / "qemu.qcow2", tmp_path / "qblock.qcow2"
    shutil.copy(corpus / "dirty-lazy-refcounts.qcow2", a)
    shutil.copy(corpus / "dirty-lazy-refcounts.qcow2", b)
    assert header(a)["incompatible_features"] & 1
    q = run("qemu-io", "-c", "read -P 0x5b 1M 128k", a)
    capfd.readouterr()
    blk = open_blk(b)
    blk_unref(blk)
    err = capfd.readouterr().err
    assert stderr_lines(err) == stderr_lines(q.stderr)
    assert header(b)["incompatible_features"] == 0
    assert qemu_check(b, "").returncode == 0
    assert peek(a, 0, 1 << 20) == peek(b, 0, 1 << 20)   # the same repair, byte for byte
