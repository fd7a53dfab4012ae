"""qblock-storage-daemon as a process: start-up errors, a QMP session with QEMU's client library, quit and signals.

When qemu-storage-daemon is installed, the same command sequence goes to
both daemons and their replies are compared (member names, error classes
and messages).
"""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

qmp_legacy = pytest.importorskip("qemu.qmp.legacy", reason="the qemu.qmp client library is not installed")

DAEMON = [sys.executable, "-m", "qblock.tools.storage_daemon"]
TIMEOUT = 20


def start(cmd, tmp_path, *extra, name="qmp.sock"):
    """Start a daemon with a monitor on tmp_path/name; wait (bounded) until the socket is there."""
    path = str(tmp_path / name)
    proc = subprocess.Popen([*cmd, "--chardev", f"socket,id=c0,path={path},server=on,wait=off",
                             "--monitor", "chardev=c0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, errout = proc.communicate(timeout=TIMEOUT)
            raise AssertionError(f"daemon did not start: {errout.decode()}")
        time.sleep(0.01)
    return proc, path


def stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=TIMEOUT)


def connect(path):
    qmp = qmp_legacy.QEMUMonitorProtocol(path)
    qmp.settimeout(TIMEOUT)
    qmp.connect()
    return qmp


@pytest.mark.parametrize("args, line", [
    (["--blockdev", "driver=nope,node-name=x"],
     "--blockdev driver=nope,node-name=x: Parameter 'driver' does not accept value 'nope'"),
    (["--blockdev", "driver=null-co,node-name=n,size=abc"],
     "--blockdev driver=null-co,node-name=n,size=abc: Parameter 'size' expects integer"),
    (["--bogus"], "unrecognized option '--bogus'"),
    (["--nbd-server", "addr.type=unix"], "--nbd-server addr.type=unix: Parameter 'addr.path' is missing"),
    (["--blockdev", "null-co,node-name=n", "--blockdev", "null-co,node-name=n"],
     "--blockdev null-co,node-name=n: Duplicate nodes with node-name='n'"),
])
def test_startup_errors_print_one_line(args, line):
    """A bad option: exit status 1 and one line 'qblock-storage-daemon: ...' (QEMU's wording), no traceback."""
    proc = subprocess.run([*DAEMON, *args], capture_output=True, timeout=TIMEOUT)
    assert proc.returncode == 1
    assert proc.stderr.decode() == f"qblock-storage-daemon: {line}\n"


def test_qmp_session_with_qemu_client(tmp_path):
    """blockdev-add over QMP, queries, throttling through a throttle-group, a raw socket's bad input, quit."""
    img = tmp_path / "disk.raw"
    img.write_bytes(b"\0" * (1 << 20))
    pidfile = tmp_path / "pid"
    proc, path = start(DAEMON, tmp_path, "--object", "throttle-group,id=tg0,x-bps-total=1048576",
                       "--blockdev", f"driver=file,node-name=f,filename={img}", "--pidfile", str(pidfile))
    try:
        qmp = connect(path)
        assert qmp.cmd("query-version")["qemu"] == {"major": 7, "minor": 2, "micro": 0}
        qmp.cmd("blockdev-add", **{"driver": "raw", "node-name": "r", "file": "f"})
        qmp.cmd("blockdev-add", **{"driver": "throttle", "node-name": "t", "throttle-group": "tg0",
                                   "file": {"driver": "null-co", "size": 4096}})
        nodes = {n["node-name"]: n for n in qmp.cmd("query-named-block-nodes")}
        assert set(nodes) >= {"f", "r", "t"}
        assert nodes["r"]["image"]["virtual-size"] == 1 << 20 and nodes["r"]["drv"] == "raw"
        rsp = qmp.cmd_raw("blockdev-del", {"node-name": "f"})
        assert rsp["error"] == {"class": "GenericError", "desc": "Block device f is in use"}
        qmp.cmd("block-set-write-threshold", **{"node-name": "r", "write-threshold": 4096})
        assert int(pidfile.read_text()) == proc.pid
        qmp.close()

        # A raw client: malformed JSON gets an error and the monitor keeps serving.
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(TIMEOUT)
        s.connect(path)
        f = s.makefile("rwb")
        f.readline()
        f.write(b'{"execute": "qmp_capabilities"}\n{"a": }\n[1]\n{"execute": "quit", "id": 9}\n')
        f.flush()
        replies = [f.readline() for _ in range(4)]
        assert replies == [b'{"return": {}}\r\n',
                           b'{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}\r\n',
                           b'{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}\r\n',
                           b'{"return": {}, "id": 9}\r\n']
        s.close()
        assert proc.wait(TIMEOUT) == 0
        assert not os.path.exists(path) and not pidfile.exists()
    finally:
        stop(proc)


def test_sigterm_exits_cleanly(tmp_path):
    """SIGTERM: the daemon closes its nodes and monitors and exits with status 0."""
    proc, path = start(DAEMON, tmp_path, "--blockdev", "driver=null-co,node-name=n")
    try:
        qmp = connect(path)
        qmp.cmd("query-named-block-nodes")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        qmp.close()
        assert proc.stderr.read() == b""
    finally:
        stop(proc)


def test_write_threshold_event_over_nbd(tmp_path):
    """A qemu-io write through the NBD export crosses the threshold: BLOCK_WRITE_THRESHOLD reaches the monitor."""
    pytest.importorskip("qblock.nbd.blockdev_nbd", reason="the NBD server (qblock/nbd) is not there yet")
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io is not installed")
    nbd = str(tmp_path / "nbd.sock")
    proc, path = start(DAEMON, tmp_path, "--blockdev", "driver=null-co,node-name=n,size=1048576",
                       "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                       "--export", "type=nbd,id=e0,node-name=n,name=disk,writable=on")
    try:
        qmp = connect(path)
        qmp.cmd("block-set-write-threshold", **{"node-name": "n", "write-threshold": 65536})
        io = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 61440 8192",
                             f"nbd+unix:///disk?socket={nbd}"], capture_output=True, timeout=TIMEOUT)
        assert io.returncode == 0, io.stderr
        event = qmp.pull_event(wait=TIMEOUT)
        assert event["event"] == "BLOCK_WRITE_THRESHOLD"
        assert event["data"] == {"node-name": "n", "amount-exceeded": 4096, "write-threshold": 65536}
        qmp.cmd("quit")
        assert proc.wait(TIMEOUT) == 0
        with contextlib.suppress(EOFError):  # the daemon is gone: the client finds EOF while closing
            qmp.close()
    finally:
        stop(proc)


# ---------------------------------------------------------------------------
# Against qemu-storage-daemon

SEQUENCE = [
    '{"execute": "query-version"}',
    '{"execute": "qmp_capabilities", "id": 1}',
    '{"execute": "qmp_capabilities"}',
    '{"execute": "nosuch", "id": "x"}',
    '{"foo": 1}',
    '{"a": }',
    '{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f", "filename": "@IMG@"}}',
    '{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r", "file": "f"}}',
    '{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r2", "file": {"driver": "file"}}}',
    '{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n", "size": 1.5}}',
    '{"execute": "query-named-block-nodes"}',
    '{"execute": "query-named-block-nodes", "arguments": {"flat": true}}',
    '{"execute": "query-block"}',
    '{"execute": "query-blockstats"}',
    '{"execute": "query-blockstats", "arguments": {"query-nodes": true}}',
    '{"execute": "block-set-write-threshold", "arguments": {"node-name": "r", "write-threshold": 4096}}',
    '{"execute": "block-set-write-threshold", "arguments": {"node-name": "zz", "write-threshold": 4096}}',
    '{"execute": "x-debug-query-block-graph"}',
    '{"execute": "blockdev-del", "arguments": {"node-name": "f"}}',
    '{"execute": "blockdev-del", "arguments": {"node-name": "zz"}}',
    '{"execute": "object-add", "arguments": {"qom-type": "iothread", "id": "io0"}}',
    '{"execute": "object-add", "arguments": {"qom-type": "throttle-group", "id": "io0"}}',
    '{"execute": "object-add", "arguments": {"qom-type": "throttle-group", "id": "tg", "limits": {"bps-total": 5}}}',
    '{"execute": "object-del", "arguments": {"id": "io0"}}',
    '{"execute": "object-del", "arguments": {"id": "nope"}}',
    '{"execute": "blockdev-del", "arguments": {"node-name": "r"}}',
    '{"execute": "quit"}',
]

# Members only QEMU reports, from driver hooks qblock's drivers do not have (see docs/storage-daemon.md).
DRIVER_ONLY = {"driver-specific", "dirty-flag", "format-specific"}


def _shape(value):
    """The value with numbers and strings blanked: member names, nesting and error texts remain."""
    if isinstance(value, dict):
        if set(value) == {"class", "desc"}:
            return value
        return {k: _shape(v) for k, v in value.items() if k not in DRIVER_ONLY}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return type(value).__name__


def _session(cmd, tmp_path, name, img):
    proc, path = start(cmd, tmp_path, name=name)
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(TIMEOUT)
        s.connect(path)
        f = s.makefile("rwb")
        replies = [json.loads(f.readline())]
        for line in SEQUENCE:
            f.write(line.replace("@IMG@", str(img)).encode() + b"\n")
            f.flush()
            replies.append(json.loads(f.readline()))
        s.close()
        assert proc.wait(TIMEOUT) == 0
        return replies
    finally:
        stop(proc)


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="qemu-storage-daemon is not installed")
def test_same_replies_as_qemu_storage_daemon(tmp_path):
    """The same commands to both daemons: same members, same error classes and messages."""
    img = tmp_path / "disk.raw"
    img.write_bytes(b"\0" * (1 << 20))
    theirs = _session(["qemu-storage-daemon"], tmp_path, "qemu.sock", img)
    mine = _session(DAEMON, tmp_path, "qblock.sock", img)
    for request, a, b in zip(["(greeting)"] + SEQUENCE, theirs, mine):
        assert _shape(b) == _shape(a), request
