"""An NBD load generator: many clients, each writing and verifying its own region, from other processes.

:func:`run_load` starts ``processes`` worker processes (``python -m
qblock.testing.nbd_load``: fresh interpreters that inherit nothing of the
server's process and report as JSON on stdout); together they open
``clients`` connections to an NBD server on a UNIX socket.
Each client owns the region ``[id * region, (id + 1) * region)`` and, until
the time is up, writes a block with a fresh pattern and reads it back,
checking every byte; at the end it reads its whole region once more and
checks it against what it wrote (the result also carries a SHA-256 of what
each region should hold, to check the image itself).  Each worker drives its connections from
one ``selectors`` loop with one request in flight per connection (simple
replies, no structured replies), and times every request.

The caller keeps its own event loop running while it waits (the server may
live in the caller's process): ``pump`` is called until every worker has
reported.  The result holds requests/s, latency percentiles, errors (NBD
error replies or broken connections) and mismatches (bytes that read back
wrong).
"""
from __future__ import annotations

import hashlib
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import tempfile
from typing import Callable

import attrs

from qblock.util.timer import QEMU_CLOCK_REALTIME, qemu_clock_get_ns

__all__ = ["LoadResult", "run_load", "load_worker"]

_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
_REQUEST_MAGIC = 0x25609513
_SIMPLE_REPLY_MAGIC = 0x67446698
_CMD_READ, _CMD_WRITE = 0, 1


@attrs.define
class LoadResult:
    requests: int = 0
    seconds: float = 0.0
    errors: int = 0
    mismatches: int = 0
    verified_bytes: int = 0
    latencies_ns: list[int] = attrs.field(factory=list, repr=False)
    messages: list[str] = attrs.field(factory=list)
    digests: dict[int, str] = attrs.field(factory=dict)   # client id -> sha256 of what its region should hold

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile_us(self, p: float) -> float:
        if not self.latencies_ns:
            return 0.0
        lat = sorted(self.latencies_ns)
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] / 1000


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


def _handshake(path: str, name: str) -> socket.socket:
    """Fixed newstyle handshake and NBD_OPT_GO (no structured replies), blocking."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    _recv_exact(s, 18)
    s.sendall(struct.pack(">I", 3))
    raw = name.encode()
    payload = struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(payload)) + payload)
    while True:
        _, _, rtype, length = struct.unpack(">QIII", _recv_exact(s, 20))
        _recv_exact(s, length)
        if rtype == 1:
            return s
        if rtype & 0x80000000:
            raise ConnectionError(f"NBD_OPT_GO failed with reply type {rtype:#x}")


class _Conn:
    """One client's state machine: WRITE a block, READ it back, repeat; then verify the whole region."""

    def __init__(self, cid: int, sock: socket.socket, region: int, block: int, seed: int):
        self.cid = cid
        self.sock = sock
        self.base = cid * region
        self.nblocks = region // block
        self.block = block
        self.model = bytearray(region)           # what the region should hold
        self.i = seed % self.nblocks
        self.n = seed
        self.out = memoryview(b"")
        self.want = 0
        self.inbuf = bytearray(_REPLY.size + max(block, region))
        self.have = 0
        self.handle = 0
        self.kind = None      # "write" | "read" | "verify"
        self.offset = 0
        self.length = 0
        self.t0 = 0
        self.done = False

    def start_write(self) -> None:
        self.i = (self.i + 7) % self.nblocks        # wander through the region
        self.n += 1
        self.offset = self.base + self.i * self.block
        pattern = bytes([(self.cid * 37 + self.n) & 0xFF]) * self.block
        rel = self.offset - self.base
        self.model[rel:rel + self.block] = pattern
        self._send(_CMD_WRITE, self.offset, self.block, pattern, "write", 0)

    def start_read(self, offset: int, length: int, kind: str) -> None:
        self._send(_CMD_READ, offset, length, b"", kind, length)

    def _send(self, cmd: int, offset: int, length: int, data: bytes, kind: str, payload: int) -> None:
        self.handle += 1
        self.kind = kind
        self.offset, self.length = offset, length
        self.want = _REPLY.size + payload
        self.have = 0
        self.out = memoryview(_REQUEST.pack(_REQUEST_MAGIC, 0, cmd, self.handle, offset, length) + data)
        self.t0 = qemu_clock_get_ns(QEMU_CLOCK_REALTIME)
        self.flush_out()

    def flush_out(self) -> None:
        while self.out:
            try:
                n = self.sock.send(self.out)
            except BlockingIOError:
                return
            self.out = self.out[n:]


def load_worker(path: str, name: str, cids: list[int], region: int, block: int, seconds: float) -> dict:
    """Body of one worker process: drive the clients ``cids``; returns a LoadResult-like dict."""
    res = {"requests": 0, "errors": 0, "mismatches": 0, "verified": 0, "lat": [], "messages": [], "seconds": 0.0,
           "digests": {}}
    conns: list[_Conn] = []
    try:
        for cid in cids:
            conns.append(_Conn(cid, _handshake(path, name), region, block, cid * 1009))
    except OSError as e:
        res["errors"] += 1
        res["messages"].append(f"connect: {e}")
        return res
    sel = selectors.DefaultSelector()
    for c in conns:
        c.sock.setblocking(False)
        sel.register(c.sock, selectors.EVENT_READ, c)
    start = qemu_clock_get_ns(QEMU_CLOCK_REALTIME)
    end = start + int(seconds * 1e9)
    for c in conns:
        c.start_write()
        if c.out:
            sel.modify(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
    active = len(conns)
    lat = res["lat"]
    while active:
        for key, mask in sel.select(timeout=30):
            c: _Conn = key.data
            if mask & selectors.EVENT_WRITE:
                c.flush_out()
                if not c.out:
                    sel.modify(c.sock, selectors.EVENT_READ, c)
                continue
            try:
                n = c.sock.recv_into(memoryview(c.inbuf)[c.have:c.want])
            except BlockingIOError:
                continue
            except OSError as e:
                n = 0
                res["messages"].append(f"client {c.cid}: {e}")
            if n == 0:
                res["errors"] += 1
                res["messages"].append(f"client {c.cid}: connection closed")
                sel.unregister(c.sock)
                active -= 1
                continue
            c.have += n
            if c.have < _REPLY.size:
                continue
            magic, error, handle = _REPLY.unpack_from(c.inbuf)
            if magic != _SIMPLE_REPLY_MAGIC or handle != c.handle:
                res["errors"] += 1
                res["messages"].append(f"client {c.cid}: bad reply magic {magic:#x} handle {handle}")
                sel.unregister(c.sock)
                active -= 1
                continue
            if error:
                c.want = _REPLY.size    # an error reply carries no data
            if c.have < c.want:
                continue
            now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME)
            if error:
                res["errors"] += 1
                res["messages"].append(f"client {c.cid}: {c.kind} at {c.offset} failed with NBD error {error}")
            if c.kind != "verify":
                lat.append(now - c.t0)
                res["requests"] += 1
            if c.kind == "read" and not error:
                rel = c.offset - c.base
                if c.inbuf[_REPLY.size:_REPLY.size + c.length] != c.model[rel:rel + c.length]:
                    res["mismatches"] += 1
                    res["messages"].append(f"client {c.cid}: read at {c.offset} returned other bytes")
                res["verified"] += c.length
            if c.kind == "verify":
                got = c.inbuf[_REPLY.size:_REPLY.size + c.length]
                if error or got != c.model:
                    res["mismatches"] += 1
                    res["messages"].append(f"client {c.cid}: final check of its region failed")
                res["verified"] += c.length
                sel.unregister(c.sock)
                active -= 1
                continue
            if c.kind == "write":
                c.start_read(c.offset, c.block, "read")
            elif now < end:
                c.start_write()
            else:
                c.start_read(c.base, len(c.model), "verify")
            if c.out:   # the socket buffer is full: finish sending when it drains
                sel.modify(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
    res["seconds"] = (qemu_clock_get_ns(QEMU_CLOCK_REALTIME) - start) / 1e9
    for c in conns:
        c.sock.close()
        res["digests"][c.cid] = hashlib.sha256(c.model).hexdigest()
    return res


def run_load(path: str, name: str = "disk", clients: int = 16, processes: int = 2, seconds: float = 2.0,
             region: int = 1 << 20, block: int = 4096, pump: Callable[[], object] | None = None,
             timeout: float = 120.0) -> LoadResult:
    """Run the load from ``processes`` worker processes; call ``pump`` while waiting (else just wait)."""
    groups = [g for g in (list(range(clients))[i::processes] for i in range(processes)) if g]
    procs = []
    outs = []
    try:
        for g in groups:
            out = tempfile.TemporaryFile()
            outs.append(out)
            arg = json.dumps({"path": path, "name": name, "cids": g, "region": region, "block": block,
                              "seconds": seconds})
            procs.append(subprocess.Popen([sys.executable, "-m", "qblock.testing.nbd_load", arg], stdout=out,
                                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}))
        deadline = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + int(timeout * 1e9)
        while any(p.poll() is None for p in procs):
            if qemu_clock_get_ns(QEMU_CLOCK_REALTIME) > deadline:
                raise TimeoutError("NBD load workers did not finish")
            if pump is not None:
                pump()
            else:
                try:
                    procs[0].wait(timeout=0.05) if procs[0].poll() is None else None
                except subprocess.TimeoutExpired:
                    pass
        result = LoadResult()
        for p, out in zip(procs, outs):
            out.seek(0)
            text = out.read().decode()
            if p.returncode != 0 or not text.strip():
                raise RuntimeError(f"an NBD load worker failed (exit {p.returncode})")
            r = json.loads(text)
            result.requests += r["requests"]
            result.errors += r["errors"]
            result.mismatches += r["mismatches"]
            result.verified_bytes += r["verified"]
            result.latencies_ns.extend(r["lat"])
            result.messages.extend(r["messages"])
            result.seconds = max(result.seconds, r["seconds"])
            result.digests.update({int(k): v for k, v in r["digests"].items()})
        return result
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for out in outs:
            out.close()


def main(argv: list[str] | None = None) -> int:
    args = json.loads((argv if argv is not None else sys.argv[1:])[0])
    res = load_worker(args["path"], args["name"], args["cids"], args["region"], args["block"], args["seconds"])
    sys.stdout.write(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
