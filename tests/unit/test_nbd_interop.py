"""qblock's NBD server against QEMU's and libnbd's real tools, and beside the real qemu-nbd.

The qblock server runs in the test process (QblockNBDServer turns the main
loop while a tool runs, with a timeout); qemu-nbd serves a copy of the same
image in a subprocess.  What the tools report must be the same for both,
except where a difference has a named reason (the socket path in URIs).
Each test is skipped when its tool is not installed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest

from qblock.testing.nbd_client import NBDTestClient
from qblock.util.timer import QEMU_CLOCK_REALTIME, qemu_clock_get_ns
from tests.unit.nbd_harness import EXPECTED, RO_SCENARIOS, SCENARIOS, SIZE, QblockNBDServer, run_scenario

MiB = 1 << 20


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")


class QemuNbd:
    """A real qemu-nbd serving ``image`` as ``disk`` (description "the desc") on a UNIX socket."""

    def __init__(self, tmp_path, image: str, fmt: str = "raw", extra: tuple[str, ...] = (), tag: str = "q"):
        need("qemu-nbd")
        self.sock = os.path.join(str(tmp_path), f"{tag}.sock")
        self.proc = subprocess.Popen(["qemu-nbd", "-t", "-e", "4", "-k", self.sock, "-f", fmt, "-x", "disk",
                                      "-D", "the desc", *extra, image],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 10_000_000_000
        while not os.path.exists(self.sock):
            if qemu_clock_get_ns(QEMU_CLOCK_REALTIME) > deadline:
                self.close()
                pytest.fail("qemu-nbd did not start")
            try:
                self.proc.wait(timeout=0.01)    # a short real-time wait: qemu-nbd is another process
                pytest.fail(f"qemu-nbd exited with {self.proc.returncode}")
            except subprocess.TimeoutExpired:
                pass

    def uri(self) -> str:
        return f"nbd+unix:///disk?socket={self.sock}"

    def run(self, args: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def servers(tmp_path):
    """Start a qblock server and/or a qemu-nbd on files the test prepared; both always stopped."""
    made: list = []

    def qblock(**kw):
        s = QblockNBDServer(tmp_path, **kw)
        made.append(s)
        return s

    def qemu(image, fmt="raw", extra=(), tag="q"):
        q = QemuNbd(tmp_path, image, fmt, extra, tag)
        made.append(q)
        return q

    yield qblock, qemu
    for s in made:
        s.close()


def make_image(path: str, size: int = SIZE) -> str:
    """A sparse raw image with a few data ranges (one of them all zeroes) and holes between them."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(64 * 1024)
        f.write(b"\x5a" * 64 * 1024)
        f.seek(MiB)
        f.write(bytes(4096))                    # data that happens to be zero
        f.seek(2 * MiB + 100)
        f.write(b"partial")
        f.seek(size - 4096)
        f.write(b"\xee" * 4096)
    return path


_TIMING = re.compile(r"^.*ops; .* sec.*\n?", re.M)


def qemu_io_filter(out: str) -> str:
    """Drop qemu-io's timing lines, as qemu-iotests' _filter_qemu_io does."""
    return _TIMING.sub("", out)


# --------------------------------------------------------------------------
# The protocol table against the real qemu-nbd


@pytest.fixture(scope="module")
def qemu_nbd_table(tmp_path_factory):
    """Two qemu-nbd processes (writable and read-only) for the whole protocol table."""
    need("qemu-nbd")
    d = tmp_path_factory.mktemp("table")
    procs = {}
    for ro in (False, True):
        image = str(d / f"t{int(ro)}.raw")
        with open(image, "wb") as f:
            f.truncate(SIZE)
        procs[ro] = QemuNbd(d, image, "raw", ("-r",) if ro else (), tag=f"t{int(ro)}")
    yield procs
    for p in procs.values():
        p.close()


@pytest.mark.parametrize("name", sorted(SCENARIOS) + sorted(RO_SCENARIOS))
def test_protocol_table_is_qemu_nbds(qemu_nbd_table, name):
    """qemu-nbd 7.2 still answers each scenario as the table (which qblock's server is tested against) says."""
    ro = name in RO_SCENARIOS
    c = NBDTestClient.connect_unix(qemu_nbd_table[ro].sock, None, timeout=5)
    try:
        got = run_scenario(c, RO_SCENARIOS[name] if ro else SCENARIOS[name])
    finally:
        c.close()
    assert got == EXPECTED[name]


# --------------------------------------------------------------------------
# QEMU's tools as clients


def test_qemu_io_over_nbd(servers, tmp_path):
    """qemu-io writes, reads, zeroes, discards and flushes over qblock's NBD server, and prints what it prints
    against qemu-nbd."""
    need("qemu-io")
    qblock, qemu = servers
    cmds = ["-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M", "-c", "write -z 1M 64k",
            "-c", "discard 2M 64k", "-c", "flush", "-c", "read -P 0 1M 64k"]
    s = qblock()
    ours = s.run(["qemu-io", "-f", "raw", s.uri(), *cmds])
    assert ours.returncode == 0, ours.stderr
    empty = str(tmp_path / "q.raw")
    with open(empty, "wb") as f:
        f.truncate(SIZE)
    q = qemu(empty)
    theirs = q.run(["qemu-io", "-f", "raw", q.uri(), *cmds])
    assert qemu_io_filter(ours.stdout) == qemu_io_filter(theirs.stdout)
    assert "read 65536/65536 bytes at offset 1048576" in ours.stdout
    with open(s.image, "rb") as f:
        data = f.read()
    assert data[:MiB] == b"\xab" * MiB and data[MiB:MiB + 65536] == bytes(65536)


def test_qemu_img_convert_copies_the_export(servers, tmp_path):
    """qemu-img convert from the export produces the exported bytes."""
    need("qemu-img")
    qblock, _ = servers
    s = qblock()
    make_image(s.image)
    out = str(tmp_path / "out.raw")
    r = s.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", s.uri(), out])
    assert r.returncode == 0, r.stderr
    with open(out, "rb") as a, open(s.image, "rb") as b:
        assert a.read() == b.read()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_qemu_img_map_matches_qemu_nbd(servers, tmp_path, fmt):
    """qemu-img map --output=json over qblock's server shows the data and holes it shows over qemu-nbd."""
    need("qemu-img")
    qblock, qemu = servers
    image = str(tmp_path / f"img.{fmt}")
    if fmt == "raw":
        make_image(image)
        node = {"driver": "raw", "file.driver": "file", "file.filename": image}
    else:
        node = _qcow2_node(image)
    s = qblock(node=node, writable=False)
    q = qemu(image, fmt, ("-r",))
    ours = s.run(["qemu-img", "map", "--output=json", "-f", "raw", s.uri()])
    theirs = q.run(["qemu-img", "map", "--output=json", "-f", "raw", q.uri()])
    assert ours.returncode == 0, ours.stderr
    assert json.loads(ours.stdout) == json.loads(theirs.stdout)
    assert any(not e["data"] for e in json.loads(ours.stdout))   # the holes are there


def _qcow2_node(image: str) -> dict:
    """A qcow2 image (data, zeroed and unallocated clusters) and the qblock options to open it.

    Only whole clusters are written: in a cluster written in part, qblock's block/io.c twin asks the
    file below qcow2 for holes (QEMU before 4.2 did so), where QEMU 7.2 reports the whole cluster as
    data (it recurses only for BDRV_BLOCK_RECURSE, which qcow2 sets with metadata preallocation).
    """
    need("qemu-img")
    need("qemu-io")
    pytest.importorskip("qblock.drivers.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, str(SIZE)], check=True, timeout=30)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 64k 64k", "-c", "write -z 1M 64k",
                    "-c", "write -P 0x22 3M 64k", image], check=True, capture_output=True, timeout=30)
    return {"driver": "qcow2", "file.driver": "file", "file.filename": image}


# --------------------------------------------------------------------------
# libnbd's tools as clients


def _nbdinfo_json(run, uri: str) -> dict:
    r = run(["nbdinfo", "--json", uri])
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    for exp in info["exports"]:
        exp.pop("uri")   # names the socket path, which differs by construction
    return info


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_nbdinfo_matches_qemu_nbd(servers, tmp_path, fmt):
    """nbdinfo --json and --map (base:allocation and qemu:allocation-depth) report the same as for qemu-nbd."""
    need("nbdinfo")
    qblock, qemu = servers
    # Both servers write-enable their image, so each gets its own (built the same way): the image
    # locks keep two read-write users off one qcow2 file, in QEMU as in qblock.
    image, qemu_image = str(tmp_path / f"img.{fmt}"), str(tmp_path / f"img-q.{fmt}")
    if fmt == "raw":
        make_image(image)
        make_image(qemu_image)
        node = {"driver": "raw", "file.driver": "file", "file.filename": image}
    else:
        node = _qcow2_node(image)
        _qcow2_node(qemu_image)
    s = qblock(node=node, export={"allocation-depth": True})
    q = qemu(qemu_image, fmt, ("-A",))
    assert _nbdinfo_json(s.run, s.uri()) == _nbdinfo_json(q.run, q.uri())
    for ctx in ("base:allocation", "qemu:allocation-depth"):
        ours = s.run(["nbdinfo", f"--map={ctx}", "--json", s.uri()])
        theirs = q.run(["nbdinfo", f"--map={ctx}", "--json", q.uri()])
        assert ours.returncode == 0, ours.stderr
        assert json.loads(ours.stdout) == json.loads(theirs.stdout)


def test_nbdinfo_read_only_export(servers, tmp_path):
    """A read-only export looks to nbdinfo as qemu-nbd -r's does."""
    need("nbdinfo")
    qblock, qemu = servers
    image = make_image(str(tmp_path / "ro.raw"))
    s = qblock(node={"driver": "raw", "file.driver": "file", "file.filename": image}, writable=False)
    q = qemu(image, "raw", ("-r",))
    ours = _nbdinfo_json(s.run, s.uri())
    assert ours == _nbdinfo_json(q.run, q.uri())
    assert ours["exports"][0]["is_read_only"] is True


def test_nbdcopy_with_several_connections(servers, tmp_path):
    """nbdcopy (multi-conn: several connections, many requests in flight) copies the export exactly, both ways."""
    need("nbdcopy")
    qblock, _ = servers
    s = qblock()
    make_image(s.image)
    out = str(tmp_path / "copy.raw")
    r = s.run(["nbdcopy", "--connections=4", "--requests=16", s.uri(), out])
    assert r.returncode == 0, r.stderr
    with open(out, "rb") as a, open(s.image, "rb") as b:
        assert a.read() == b.read()
    src = str(tmp_path / "src.raw")
    with open(src, "wb") as f:
        f.write(os.urandom(SIZE))
    r = s.run(["nbdcopy", "--connections=4", src, s.uri()])
    assert r.returncode == 0, r.stderr
    with open(src, "rb") as a, open(s.image, "rb") as b:
        assert a.read() == b.read()


# --------------------------------------------------------------------------
# Several clients, some of them misbehaving


def test_concurrent_qemu_io_clients_with_misbehaving_ones(servers):
    """Four qemu-io processes write and verify their own MiB at once while other clients send garbage,
    hang up mid-request and never read their replies; every qemu-io succeeds."""
    need("qemu-io")
    qblock, _ = servers
    s = qblock()
    garbage = s.connect()
    garbage.connect_export("disk")
    garbage.send(os.urandom(4096))
    vanisher = s.connect()
    vanisher.connect_export("disk")
    vanisher.send(b"\x25\x60\x95\x13\x00\x00\x00\x01" + bytes(8) + bytes(8) + (65536).to_bytes(4, "big") + b"x" * 100)
    vanisher.sock.close()
    s.clients.remove(vanisher)
    deaf = s.connect()
    deaf.connect_export("disk")
    for i in range(32):
        deaf.send_request(0, 0, MiB)   # NBD_CMD_READ, replies never read
    procs = []
    outs = []
    for i in range(4):
        out = tempfile.TemporaryFile()
        outs.append(out)
        procs.append(subprocess.Popen(
            ["qemu-io", "-f", "raw", s.uri(), "-c", f"write -P {0x10 + i} {i}M 1M",
             "-c", f"read -P {0x10 + i} {i}M 1M", "-c", f"write -z {i}M 64k", "-c", f"read -P 0 {i}M 64k"],
            stdout=out, stderr=subprocess.STDOUT))
    deadline = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 60_000_000_000
    try:
        while any(p.poll() is None for p in procs):
            assert qemu_clock_get_ns(QEMU_CLOCK_REALTIME) < deadline, "qemu-io clients did not finish"
            s.pump()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs):
        out.seek(0)
        text = out.read().decode()
        out.close()
        assert p.returncode == 0 and "Pattern verification failed" not in text, text
    with open(s.image, "rb") as f:
        data = f.read()
    for i in range(4):
        assert data[i * MiB:i * MiB + 65536] == bytes(65536)
        assert data[i * MiB + 65536:(i + 1) * MiB] == bytes([0x10 + i]) * (MiB - 65536)
    assert garbage.wait_closed()
