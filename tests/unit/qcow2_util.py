"""Helpers shared by the qcow2 tests: create, open, read the header, poke bytes, check refcounts."""
from __future__ import annotations

import os
import shutil
import struct
import tempfile

import pytest

from qblock.block.block_backend import blk_bs, blk_new_open, blk_unref
from qblock.block.create import bdrv_create
from qblock.block.driver import BDRV_O_RDWR, bdrv_find_format

HEADER_FIELDS = ("magic", "version", "backing_file_offset", "backing_file_size", "cluster_bits", "size",
                 "crypt_method", "l1_size", "l1_table_offset", "refcount_table_offset", "refcount_table_clusters",
                 "nb_snapshots", "snapshots_offset", "incompatible_features", "compatible_features",
                 "autoclear_features", "refcount_order", "header_length", "compression_type")


def qcow2_driver():
    return bdrv_find_format("qcow2")


def create(path, size: int, **opts) -> str:
    """Create a qcow2 image at ``path`` through qblock; options as qemu-img's -o names."""
    opts["size"] = size
    bdrv_create(qcow2_driver(), str(path), opts)
    return str(path)


def open_blk(path, flags: int = BDRV_O_RDWR, **opts):
    options = {"driver": "qcow2"}
    options.update(opts)
    return blk_new_open(None if path is None else str(path), None, options, flags)


def header(path) -> dict:
    with open(path, "rb") as f:
        raw = f.read(112)
    return dict(zip(HEADER_FIELDS, struct.unpack(">IIQIIQIIQQIIQQQQIIB7x", raw)))


def poke(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def peek(path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def check_blk(blk):
    """bdrv_check (no repair) on an open node, as qemu-img check runs it."""
    from qblock.block.check import BdrvCheckResult, bdrv_check
    res = BdrvCheckResult()
    assert bdrv_check(blk_bs(blk), res) == 0
    return res


def check_image(path):
    """The refcount check of a closed image: (corruptions, leaks, check_errors)."""
    blk = open_blk(path, 0)
    try:
        res = check_blk(blk)
    finally:
        blk_unref(blk)
    return res.corruptions, res.leaks, res.check_errors



@pytest.fixture
def fast_tmp(tmp_path):
    """A scratch directory on tmpfs when there is one (flushes cost nothing there), else ``tmp_path``."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        d = tempfile.mkdtemp(prefix="qblock-test-", dir="/dev/shm")
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield str(tmp_path)
