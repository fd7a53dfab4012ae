"""The writer side of test_qcow2_crash: a fork server that runs one crash round per forked child.

Run as a script, it imports qblock once and then reads commands on stdin (raw fd reads, no buffering,
since each forked child reads the same fd):

``ROUND <json>``  fork a child for one round and, once the child is gone (the test kills it with
                  SIGKILL), print ``DONE <wait status>``;
``QUIT``          exit.

The child prints ``PID <pid>``, opens the image read/write with qblock (a dirty lazy-refcounts image is
repaired here), reads the whole disk into ``<image>.read``, prints ``R`` and waits for a line: ``X`` closes
the image and exits, ``C`` (answered by ``G``) starts random requests, up to ``qd`` in flight, never two overlapping ones at
once, and flushes now and then, printing every step as it happens::

    S <id> <w|z|zu|d> <offset> <bytes>   submitted (before it is issued)
    A <id> <ret>                          acknowledged
    B <fid>                               flush submitted
    F <fid> <ret>                         flush completed

until it is killed.  Write data is ``pattern(id, offset, bytes)``, unique to the request and the byte's
position, so that any byte read back names the request that wrote it.
"""
from __future__ import annotations

import json
import os
import random
import struct

_M64 = (1 << 64) - 1
_positions = b""


def _position_words(end: int) -> bytes:
    """The position-dependent half of every pattern, for [0, end): word i is i * an odd constant."""
    global _positions
    if len(_positions) < end:
        n = max(end, 8 << 20) + 7 >> 3
        _positions = struct.pack(f">{n}Q", *[(i * 0xC2B2AE3D27D4EB4F) & _M64 for i in range(n)])
    return _positions


def pattern(op_id: int, offset: int, nbytes: int) -> bytes:
    """The bytes request ``op_id`` writes at [offset, offset + nbytes): a hash of the request and the position
    (8-byte word i of the disk holds ``i * C1 ^ op_id * C2``), so a byte read back names its writer."""
    w0 = offset & ~7
    w1 = (offset + nbytes + 7) & ~7
    span = _position_words(w1)[w0:w1]
    key = struct.pack(">Q", (op_id * 0x9E3779B97F4A7C15) & _M64) * ((w1 - w0) >> 3)
    mixed = (int.from_bytes(span, "big") ^ int.from_bytes(key, "big")).to_bytes(w1 - w0, "big")
    return mixed[offset - w0:offset - w0 + nbytes]


def _out(line: str) -> None:
    os.write(1, (line + "\n").encode())


class _Lines:
    """Unbuffered line reads from fd 0: a forked child must not inherit read-ahead."""

    def __init__(self) -> None:
        self.buf = b""

    def readline(self) -> str:
        while b"\n" not in self.buf:
            chunk = os.read(0, 1)
            if not chunk:
                return ""
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


def _round(cfg: dict, lines: _Lines) -> None:
    from qblock.block.block_backend import (
        blk_aio_flush,
        blk_aio_pdiscard,
        blk_aio_pwrite_zeroes,
        blk_aio_pwritev,
        blk_new_open,
        blk_pread,
        blk_unref,
    )
    from qblock.block.driver import BDRV_O_RDWR, BDRV_REQ_MAY_UNMAP
    from qblock.util.aio import aio_poll, qemu_get_aio_context
    from qblock.util.error import Error
    from qblock.util.iov import QEMUIOVector

    _out(f"PID {os.getpid()}")
    rng = random.Random(cfg["seed"])
    path, size, cs = cfg["path"], cfg["size"], cfg["cluster_size"]
    try:
        blk = blk_new_open(path, None, {"driver": "qcow2", "discard": "unmap"}, BDRV_O_RDWR)
    except Error as e:
        _out(f"E open: {e}")
        return
    buf = bytearray(size)
    ret = blk_pread(blk, 0, buf)
    if ret < 0:
        _out(f"E read: {ret}")
        return
    with open(path + ".read", "wb") as f:
        f.write(buf)
    _out("R")
    if lines.readline() != "C":
        blk_unref(blk)
        return
    _out("G")       # "C" is consumed: a kill from now on cannot leave half a command in the pipe

    ctx = qemu_get_aio_context()
    inflight: dict[int, tuple[int, int]] = {}
    flushing = [False]
    op_id = cfg["first_id"]
    fid = 0
    keep = []                 # buffers of requests in flight

    def done(opaque, ret):
        i = opaque
        inflight.pop(i, None)
        _out(f"A {i} {ret}")

    def flushed(opaque, ret):
        flushing[0] = False
        _out(f"F {opaque} {ret}")

    def free(off: int, n: int) -> bool:
        return all(off + n <= o or o + m <= off for o, m in inflight.values())

    while True:
        if len(inflight) < cfg["qd"] and rng.random() < 0.8:
            r = rng.random()
            if r < cfg["p_flush"] and not flushing[0]:
                fid += 1
                flushing[0] = True
                _out(f"B {fid}")
                blk_aio_flush(blk, flushed, fid)
                continue
            kind = "w" if r < 0.7 else "z" if r < 0.8 else "zu" if r < 0.9 else "d"
            if kind == "d" and not cfg["discard"]:
                kind = "w"
            if kind == "d":     # whole clusters only: partial ones are ignored by qcow2
                n = rng.randint(1, 4) * cs
                off = rng.randrange(0, size // cs) * cs
            else:
                n = rng.choice((512, 4096, 65536, rng.randint(1, 300000)))
                off = rng.randrange(0, size) & (~511 if rng.random() < 0.7 else ~0)
            n = min(n, size - off)
            if n <= 0 or not free(off, n):
                continue
            op_id += 1
            inflight[op_id] = (off, n)
            _out(f"S {op_id} {kind} {off} {n}")
            if kind == "w":
                data = bytearray(pattern(op_id, off, n))
                keep.append(data)
                if len(keep) > 64:
                    del keep[:32]
                blk_aio_pwritev(blk, off, QEMUIOVector([memoryview(data)], -1), 0, done, op_id)
            elif kind == "d":
                blk_aio_pdiscard(blk, off, n, done, op_id)
            else:
                blk_aio_pwrite_zeroes(blk, off, n, BDRV_REQ_MAY_UNMAP if kind == "zu" else 0, done, op_id)
        elif inflight or flushing[0]:
            aio_poll(ctx, True)


def main() -> None:
    # Import everything a round needs before the first fork, so that no child pays for it.
    import qblock.block.block_backend  # noqa: F401
    import qblock.block.check  # noqa: F401
    import qblock.drivers  # noqa: F401
    from qblock.block.driver import bdrv_find_format
    bdrv_find_format("qcow2")
    bdrv_find_format("file")
    import qblock.drivers.qcow2.qcow2_check  # noqa: F401 - imported on first use otherwise
    import qblock.drivers.qcow2.qcow2_snapshot  # noqa: F401
    _position_words(8 << 20)
    lines = _Lines()
    _out("READY")
    while True:
        line = lines.readline()
        if not line or line == "QUIT":
            return
        cfg = json.loads(line.split(" ", 1)[1])
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                _round(cfg, lines)
            except BaseException as e:      # noqa: BLE001 - reported to the test, which fails
                _out(f"E {type(e).__name__}: {e}")
                status = 1
            os._exit(status)
        _, status = os.waitpid(pid, 0)
        _out(f"DONE {status}")


if __name__ == "__main__":
    main()
