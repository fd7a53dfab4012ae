"""The request path (qblock/block/io.py) held against a plain byte-array model.

Batches of concurrent requests — reads, writes (mostly unaligned), zero
writes, discards and flushes — run on a test-mem node with request_alignment
512 or 4096, a small max_transfer and virtual-clock latency, so that they
overlap.  The oracle is exact:

* within a batch, a read shares no byte with any modifying request of the
  batch, so it must return the bytes the model held before the batch;
* two modifying requests of a batch may share bytes only when one of them is
  unaligned, i.e. serialising: block/io.c then runs them one after the other,
  so applying the batch's modifying requests to the model in completion order
  must give exactly the node's bytes.

Requests that share only an aligned block (not bytes) are allowed freely:
that is where a missing serialisation would lose an update in the
read-modify-write, and ``test_model_catches_missing_serialisation`` checks
that this harness notices when it does.

Set QBLOCK_LONG=1 for a long run.
"""
from __future__ import annotations

import os

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qblock.block import io
from qblock.block.block_backend import (
    blk_bs,
    blk_co_flush,
    blk_co_pdiscard,
    blk_co_preadv,
    blk_co_pwrite_zeroes,
    blk_co_pwritev,
    blk_new_open,
    blk_pread,
    blk_unref,
)
from qblock.block.driver import BDRV_O_RDWR, BDRV_REQ_FUA, BDRV_REQ_MAY_UNMAP
from qblock.testing.memdrv import memdrv_options
from qblock.util.aio import AIO_WAIT_WHILE
from qblock.util.coroutine import qemu_coroutine_create, qemu_coroutine_enter
from qblock.util.coroutine_lock import qemu_co_sleep_ns
from qblock.util.iov import QEMUIOVector
from qblock.util.timer import QEMU_CLOCK_VIRTUAL

LONG = os.environ.get("QBLOCK_LONG") == "1"
LAT = 1000
MODIFYING = ("write", "zero", "discard")
_BASE = bytes(range(1, 252))


class ModelMismatch(AssertionError):
    """The node's bytes (or a read) differ from the model."""


@attrs.frozen
class Config:
    style: str
    align: int
    max_transfer: int
    zeroes: str          # "fallback" (no driver hook), "hook" or "notsup"
    discard: str         # "none" (no hook), "unmap" or "ignore"
    zero_limits: bool    # pwrite-zeroes-alignment/max-pwrite-zeroes and pdiscard ones set

    @property
    def size(self) -> int:
        return 16 * self.align

    def options(self) -> dict:
        a = self.align
        opts = memdrv_options(self.style, self.zeroes != "fallback", self.discard != "none",
                              align=a, size=self.size, max_transfer=self.max_transfer, latency_ns=LAT,
                              write_zeroes_notsup=self.zeroes == "notsup")
        if self.zero_limits:
            opts.update({"pwrite-zeroes-alignment": 2 * a, "max-pwrite-zeroes": 4 * a,
                         "pdiscard-alignment": 2 * a, "max-pdiscard": 4 * a})
        if self.discard != "none":
            opts["discard"] = self.discard
        return opts


@attrs.frozen
class Op:
    kind: str            # read, write, zero, discard, flush
    offset: int = 0
    bytes: int = 0
    delay: int = 0       # virtual ns before the request is issued
    seed: int = 0        # which data a write carries
    flags: int = 0

    def overlaps(self, other: "Op") -> bool:
        return self.offset < other.offset + other.bytes and other.offset < self.offset + self.bytes

    def serialising(self, align: int) -> bool:
        """Unaligned writes and zero writes are padded, hence serialising, in block/io.c."""
        return self.kind in ("write", "zero") and bool((self.offset | (self.offset + self.bytes)) % align)


def data_for(op: Op) -> bytes:
    start = op.seed % len(_BASE)
    return (_BASE[start:] + _BASE * (op.bytes // len(_BASE) + 1))[:op.bytes]


def compatible(op: Op, kept: list[Op], align: int) -> bool:
    """Whether ``op`` may run concurrently with ``kept`` under the exact oracle (see the module docstring)."""
    for k in kept:
        if "flush" in (op.kind, k.kind) or not op.overlaps(k):
            continue
        if op.kind == "read" and k.kind == "read":
            continue
        if "read" in (op.kind, k.kind):
            return False
        if not (op.serialising(align) or k.serialising(align)):
            return False
    return True


def issue(blk, op: Op, buffers: dict):
    """The coroutine body of one request."""
    if op.kind == "read":
        buf = buffers[op] = bytearray(op.bytes)
        return blk_co_preadv(blk, op.offset, op.bytes, QEMUIOVector([memoryview(buf)]), 0)
    if op.kind == "write":
        return blk_co_pwritev(blk, op.offset, op.bytes, QEMUIOVector([memoryview(bytearray(data_for(op)))]),
                              op.flags)
    if op.kind == "zero":
        return blk_co_pwrite_zeroes(blk, op.offset, op.bytes, op.flags)
    if op.kind == "discard":
        return blk_co_pdiscard(blk, op.offset, op.bytes)
    return blk_co_flush(blk)


def apply(model: bytearray, op: Op, cfg: Config) -> None:
    if op.kind == "write":
        model[op.offset:op.offset + op.bytes] = data_for(op)
    elif op.kind == "zero" or (op.kind == "discard" and cfg.discard == "unmap"):
        # test-mem zeroes exactly what it is asked to discard; discard=ignore (or no hook) does nothing.
        model[op.offset:op.offset + op.bytes] = bytes(op.bytes)


def run_batch(blk, cfg: Config, model: bytearray, batch: list[Op]) -> None:
    """Run ``batch`` concurrently and check every read and the node's bytes against ``model`` (updated)."""
    bs = blk_bs(blk)
    before = bytes(model)
    buffers: dict = {}
    results: dict = {}
    order: list[int] = []
    for i, op in enumerate(batch):
        def entry(_, i=i, op=op):
            if op.delay:
                qemu_co_sleep_ns(QEMU_CLOCK_VIRTUAL, op.delay)
            results[i] = issue(blk, op, buffers)
            order.append(i)
        qemu_coroutine_enter(qemu_coroutine_create(entry, None))
    AIO_WAIT_WHILE(None, lambda: len(order) < len(batch))
    assert results == {i: 0 for i in range(len(batch))}, (results, batch)
    assert bs.tracked_requests == [] and bs.in_flight == 0 and bs.serialising_in_flight == 0
    for op, buf in buffers.items():
        if buf != before[op.offset:op.offset + op.bytes]:
            raise ModelMismatch(f"{op} read bytes that were never there")
    for i in order:
        apply(model, batch[i], cfg)
    if bs.opaque.data != model:
        first = next(i for i in range(len(model)) if bs.opaque.data[i] != model[i])
        raise ModelMismatch(f"node differs from the model at byte {first} after batch {batch} "
                            f"(completion order {order})")


def run_model(cfg: Config, batches: list[list[Op]]) -> None:
    blk = blk_new_open(None, None, cfg.options(), BDRV_O_RDWR)
    try:
        bs = blk_bs(blk)
        model = bytearray(cfg.size)
        bs.opaque.data[:] = model
        for batch in batches:
            kept: list[Op] = []
            for op in batch:
                if compatible(op, kept, cfg.align):
                    kept.append(op)
            run_batch(blk, cfg, model, kept)
        whole = bytearray(cfg.size)
        assert blk_pread(blk, 0, whole) == cfg.size
        if whole != model:
            raise ModelMismatch("a whole-node read differs from the model")
    finally:
        blk_unref(blk)


# --------------------------------------------------------------------------
# Strategies


@st.composite
def configs(draw) -> Config:
    align = draw(st.sampled_from([512, 4096]))
    return Config(
        style=draw(st.sampled_from(["co", "part", "aio", "sector", "aio-sector"])),
        align=align,
        max_transfer=align * draw(st.sampled_from([1, 2, 3])),
        zeroes=draw(st.sampled_from(["fallback", "hook", "notsup"])),
        discard=draw(st.sampled_from(["none", "unmap", "ignore"])),
        zero_limits=draw(st.booleans()),
    )


def ops_for(cfg: Config):
    size, align = cfg.size, cfg.align
    offsets = st.one_of(st.integers(0, size - 1), st.integers(0, size // align - 1).map(lambda b: b * align))

    @st.composite
    def one(draw) -> Op:
        kind = draw(st.sampled_from(["write", "write", "write", "read", "read", "zero", "zero", "discard", "flush"]))
        delay = draw(st.sampled_from([0, 0, LAT // 3, LAT, 2 * LAT + 7]))
        if kind == "flush":
            return Op("flush", delay=delay)
        offset = draw(offsets)
        limit = min(size - offset, 3 * cfg.max_transfer + align)
        length = draw(st.one_of(st.integers(1, limit),
                                st.integers(1, max(1, limit // align)).map(lambda b: b * align)))
        length = min(length, size - offset)
        flags = 0
        if kind in ("write", "zero") and draw(st.booleans()):
            flags |= BDRV_REQ_FUA
        if kind == "zero" and draw(st.booleans()):
            flags |= BDRV_REQ_MAY_UNMAP
        return Op(kind, offset, length, delay, draw(st.integers(0, 250)), flags)

    return st.lists(st.lists(one(), min_size=1, max_size=6), min_size=1, max_size=4)


@settings(max_examples=1000 if LONG else 50, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_concurrent_requests_match_the_model(data):
    """Concurrent reads, writes, zero writes, discards and flushes give exactly the bytes of a serial model."""
    cfg = data.draw(configs(), label="config")
    batches = data.draw(ops_for(cfg), label="batches")
    run_model(cfg, batches)


# --------------------------------------------------------------------------
# The oracle is not vacuous


SAME_BLOCK = [[Op("write", 100, 100, seed=1), Op("write", 300, 100, seed=2), Op("zero", 420, 50)]]


def test_model_accepts_serialised_rmw():
    """Byte-disjoint unaligned requests sharing one block, issued together, match the model."""
    run_model(Config("co", 512, 1024, "hook", "none", False), SAME_BLOCK)


def test_model_catches_missing_serialisation(monkeypatch):
    """Without wait_serialising_requests the same batch loses an RMW update and the harness says so."""
    monkeypatch.setattr(io, "wait_serialising_requests", lambda req: False)
    with pytest.raises(ModelMismatch):
        run_model(Config("co", 512, 1024, "hook", "none", False), SAME_BLOCK)


def test_model_catches_a_read_of_wrong_bytes(monkeypatch):
    """A driver read that returns stale bytes is caught by the per-read check."""
    cfg = Config("co", 512, 1024, "fallback", "none", False)
    real = io.bdrv_driver_preadv

    def stale(bs, offset, bytes, qiov, qiov_offset, flags):
        ret = real(bs, offset, bytes, qiov, qiov_offset, flags)
        from qblock.util.iov import qemu_iovec_memset
        qemu_iovec_memset(qiov, qiov_offset, 0x42, 1)
        return ret

    monkeypatch.setattr(io, "bdrv_driver_preadv", stale)
    with pytest.raises(ModelMismatch):
        run_model(cfg, [[Op("read", 0, 512)]])
