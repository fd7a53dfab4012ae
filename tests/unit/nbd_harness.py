"""Shared by the NBD tests: an in-process qblock NBD server harness, and protocol scenarios with QEMU 7.2's answers.

:class:`QblockNBDServer` opens a node, starts qblock's NBD server on a UNIX
socket and exports the node; the test process is the server, so everything
that waits (the raw test client, a qemu-io or nbdinfo subprocess) keeps the
main AioContext turning with :func:`aio_pump`, and every wait has a deadline.

Each scenario drives one fresh connection with the raw test client and
returns what came back; :func:`run_scenario` adds whether the connection
is still open afterwards.  ``EXPECTED`` is what qemu-nbd 7.2 answers (the
interop test checks that it still does, against the real qemu-nbd); the
server tests check qblock's server against the same table.

The export: name ``disk``, description ``the desc``, 4 MiB, writable (the
``RO_`` scenarios use a read-only export of the same name), raw over a file,
more than one connection allowed (so CAN_MULTI_CONN is set).
"""
from __future__ import annotations

import os
import struct
import subprocess
import tempfile
from typing import Any

from qblock.nbd.nbd import (
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_NAME,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_LIST,
    NBD_OPT_STARTTLS,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_OPTS_MAGIC,
)
from qblock.testing.nbd_client import ConnectionClosed, NBDOptReply, NBDTestClient, NBDTestReply, aio_pump
from qblock.util.aio import aio_poll, qemu_get_aio_context
from qblock.util.timer import QEMU_CLOCK_REALTIME, qemu_clock_get_ns

import qblock.nbd  # noqa: F401  (registers the nbd export type)
from qblock.block.driver import BDRV_O_RDWR
from qblock.block.export import blk_exp_add, block_exports, blk_exp_close_all
from qblock.block.graph import bdrv_open, bdrv_unref
from qblock.nbd import blockdev_nbd
from qblock.nbd.blockdev_nbd import nbd_server_start, nbd_server_stop


SIZE = 4 << 20
EINVAL = 22
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_UNKNOWN = 0x80000006
ERROR_CHUNK = 0x8001
# HAS_FLAGS SEND_FLUSH SEND_FUA SEND_TRIM SEND_WRITE_ZEROES CAN_MULTI_CONN SEND_CACHE SEND_FAST_ZERO
RW_FLAGS = 0xD6D
RO_FLAGS = 0x50F        # HAS_FLAGS READ_ONLY SEND_FLUSH SEND_FUA CAN_MULTI_CONN SEND_CACHE
DF = 0x80


def norm(result):
    """A comparable, printable form of whatever a scenario returned."""
    if isinstance(result, NBDTestReply):
        return {"error": result.error, "structured": result.structured, "message": result.message,
                "data_len": None if result.data is None else len(result.data),
                "chunks": [t for t, _, _ in result.chunks]}
    if isinstance(result, NBDOptReply):
        return {"option": result.option, "type": result.type, "data": result.data.decode(errors="replace")}
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], NBDOptReply):
        return {"contexts": result[0], "final": norm(result[1])}
    if isinstance(result, bytes):
        return result.hex()
    return result


def run_scenario(c: NBDTestClient, fn) -> tuple:
    """(normalised result, connection state afterwards); ("closed", ...) if the server hung up first."""
    try:
        result = fn(c)
    except ConnectionClosed:
        return ("closed", "closed")
    return (norm(result), c.probe_state())


def go(c: NBDTestClient, structured: bool = True) -> None:
    c.connect_export("disk", structured=structured)


def _then(*steps):
    return steps[-1]


def _reply(error=0, structured=False, message="", data_len=None, chunks=()):
    return {"error": error, "structured": structured, "message": message, "data_len": data_len,
            "chunks": list(chunks)}


def _einval(message: str, structured: bool = True):
    if structured:
        return _reply(EINVAL, True, message, None, [ERROR_CHUNK])
    return _reply(EINVAL)


PAST_EOF = f"operation past EOF; From: {SIZE}, Len: 512, Size: {SIZE}"
TOO_LONG = "len (33554433 ) is larger than max len (33554432)"

SCENARIOS = {
    # transmission: malformed or invalid requests
    "bad_magic": lambda c: _then(go(c), c.send_request(NBD_CMD_READ, 0, 512, magic=0x12345678), c.receive_reply()),
    "read_oversize": lambda c: _then(go(c), c.read(0, 33554433)),
    "read_oversize_simple": lambda c: _then(go(c, False), c.read(0, 33554433)),
    "write_oversize": lambda c: _then(go(c), c.send_request(NBD_CMD_WRITE, 0, 33554433), c.receive_reply()),
    "read_past_end": lambda c: _then(go(c), c.read(SIZE, 512)),
    "read_past_end_simple": lambda c: _then(go(c, False), c.read(SIZE, 512)),
    "write_past_end": lambda c: _then(go(c), c.write(SIZE - 256, b"x" * 512)),
    "write_past_end_simple": lambda c: _then(go(c, False), c.write(SIZE - 256, b"x" * 512)),
    "zero_past_end": lambda c: _then(go(c), c.command(NBD_CMD_WRITE_ZEROES, SIZE, 512)),
    "unknown_cmd": lambda c: _then(go(c), c.command(42, 0, 512)),
    "unknown_flag": lambda c: _then(go(c), c.read(0, 512, flags=0x40)),
    "df_without_structured": lambda c: _then(go(c, False), c.read(0, 512, flags=NBD_CMD_FLAG_DF)),
    "block_status_not_negotiated": lambda c: _then(go(c), c.command(NBD_CMD_BLOCK_STATUS, 0, 512)),
    "block_status_zero_length": lambda c: _then(go(c), c.command(NBD_CMD_BLOCK_STATUS, 0, 0)),
    "disc": lambda c: _then(go(c), c.send_request(NBD_CMD_DISC, 0, 0), c.receive_reply()),
    # transmission: valid requests
    "flush": lambda c: _then(go(c), c.command(NBD_CMD_FLUSH)),
    "flush_simple": lambda c: _then(go(c, False), c.command(NBD_CMD_FLUSH)),
    "cache": lambda c: _then(go(c), c.command(NBD_CMD_CACHE, 0, 4096)),
    "trim_fua": lambda c: _then(go(c), c.command(NBD_CMD_TRIM, 0, 4096, NBD_CMD_FLAG_FUA)),
    "read_zero_length": lambda c: _then(go(c), c.read(0, 0)),
    "read_zero_length_simple": lambda c: _then(go(c, False), c.read(0, 0)),
    "read_df": lambda c: _then(go(c), c.read(0, 8192, flags=NBD_CMD_FLAG_DF)),
    "read_hole": lambda c: _then(go(c), c.read(SIZE - 8192, 8192)),
    "read_simple": lambda c: _then(go(c, False), c.read(0, 8192)),
    # negotiation
    "opt_unknown": lambda c: _then(c.handshake(), c.send_opt(99, b"abc"), c.opt_reply()),
    "opt_info_unknown_export": lambda c: _then(c.handshake(), c.opt_info("nope")),
    "opt_go_unknown_export": lambda c: _then(c.handshake(), c.opt_go("nope")),
    "opt_info": lambda c: _then(c.handshake(), c.opt_info("disk", ())),
    "opt_info_name": lambda c: _then(c.handshake(), c.opt_info("disk", (NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE, 77))),
    "opt_go_structured": lambda c: _then(c.handshake(), c.opt_structured_reply(), c.opt_go("disk")),
    "opt_export_name_unknown": lambda c: _then(c.handshake(), c.send_opt(NBD_OPT_EXPORT_NAME, b"nope"),
                                               c.recv_exact(10)),
    "opt_export_name": lambda c: _then(c.handshake(), c.send_opt(NBD_OPT_EXPORT_NAME, b"disk"), c.recv_exact(10)),
    "opt_export_name_zeroes": lambda c: _then(c.handshake(NBD_FLAG_C_FIXED_NEWSTYLE),
                                              c.send_opt(NBD_OPT_EXPORT_NAME, b"disk"), c.recv_exact(134)),
    "opt_list": lambda c: _then(c.handshake(), c.opt_list()),
    "opt_list_with_payload": lambda c: _then(c.handshake(), c.send_opt(NBD_OPT_LIST, b"xx"), c.opt_reply()),
    "opt_starttls": lambda c: _then(c.handshake(), c.send_opt(NBD_OPT_STARTTLS), c.opt_reply()),
    "opt_structured_twice": lambda c: _then(c.handshake(), c.opt_structured_reply(), c.opt_structured_reply()),
    "opt_structured_with_payload": lambda c: _then(c.handshake(), c.send_opt(NBD_OPT_STRUCTURED_REPLY, b"x"),
                                                   c.opt_reply()),
    "opt_set_meta_without_structured": lambda c: _then(c.handshake(),
                                                       c.opt_set_meta_context("disk", ["base:allocation"])),
    "opt_list_meta_all": lambda c: _then(c.handshake(), c.opt_list_meta_context("disk", [])),
    "opt_list_meta_queries": lambda c: _then(c.handshake(),
                                             c.opt_list_meta_context("disk", ["base:", "qemu:", "foo:bar"])),
    "opt_set_meta_unknown_export": lambda c: _then(c.handshake(), c.opt_structured_reply(),
                                                   c.opt_set_meta_context("nope", ["base:allocation"])),
    "opt_set_meta": lambda c: _then(c.handshake(), c.opt_structured_reply(),
                                    c.opt_set_meta_context("disk", ["base:allocation", "base:",
                                                                    "qemu:allocation-depth", "x"])),
    "opt_bad_magic": lambda c: _then(c.handshake(), c.send(struct.pack(">QII", 0x1234, NBD_OPT_LIST, 0)),
                                     c.opt_reply()),
    "opt_too_long": lambda c: _then(c.handshake(), c.send(struct.pack(">QII", NBD_OPTS_MAGIC, NBD_OPT_LIST,
                                                                      33554433)), c.opt_reply()),
    "bad_client_flags": lambda c: _then(c.handshake(0x8), c.send_opt(NBD_OPT_LIST), c.opt_reply()),
    "abort": lambda c: _then(c.handshake(), c.opt_abort(), c.opt_reply()),
    "old_newstyle_list": lambda c: _then(c.handshake(0), c.send_opt(NBD_OPT_LIST), c.opt_reply()),
    "name_with_nul": lambda c: _then(c.handshake(), c.send_opt(NBD_OPT_GO, struct.pack(">I", 4) + b"di\0k"
                                                                + struct.pack(">H", 0)), c.opt_reply()),
    "name_longer_than_option": lambda c: _then(c.handshake(), c.send_opt(NBD_OPT_GO, struct.pack(">I", 40) + b"disk"),
                                               c.opt_reply()),
    "go_trailing_bytes": lambda c: _then(c.handshake(), c.send_opt(NBD_OPT_GO, NBDTestClient.info_payload("disk")
                                                                    + b"zz"), c.opt_reply()),
}

RO_SCENARIOS = {
    "RO_write": lambda c: _then(go(c), c.write(0, b"x" * 512)),
    "RO_write_zeroes": lambda c: _then(go(c), c.command(NBD_CMD_WRITE_ZEROES, 0, 512)),
    "RO_trim": lambda c: _then(go(c), c.command(NBD_CMD_TRIM, 0, 512)),
    "RO_info": lambda c: _then(c.handshake(), c.opt_info("disk", ())),
    "RO_read": lambda c: _then(go(c), c.read(0, 4096)),
}


def _opt(option, type_, data=""):
    return {"option": option, "type": type_, "data": data}


_INFO = {"description": "the desc", "infos": [2, 3, 0], "block_size": (1, 4096, 33554432), "size": SIZE,
         "flags": RW_FLAGS}

EXPECTED = {
    "bad_magic": (_einval("invalid magic (got 0x12345678)"), "closed"),
    "read_oversize": (_einval(TOO_LONG), "open"),
    "read_oversize_simple": (_einval(TOO_LONG, False), "open"),
    "write_oversize": (_einval(TOO_LONG), "closed"),
    "read_past_end": (_einval(PAST_EOF), "open"),
    "read_past_end_simple": (_einval(PAST_EOF, False), "open"),
    "write_past_end": (_einval(f"operation past EOF; From: {SIZE - 256}, Len: 512, Size: {SIZE}"), "open"),
    "write_past_end_simple": (_einval("", False), "open"),
    "zero_past_end": (_einval(PAST_EOF), "open"),
    "unknown_cmd": (_einval("invalid request type (42) received"), "open"),
    "unknown_flag": (_einval("unsupported flags for command read (got 0x40)"), "open"),
    "df_without_structured": (_einval("", False), "open"),
    "block_status_not_negotiated": (_einval("CMD_BLOCK_STATUS not negotiated"), "open"),
    "block_status_zero_length": (_einval("need non-zero length"), "open"),
    "disc": ("closed", "closed"),
    "flush": (_reply(), "open"),
    "flush_simple": (_reply(), "open"),
    "cache": (_reply(), "open"),
    "trim_fua": (_reply(), "open"),
    "read_zero_length": (_reply(0, True, "", 0, [0]), "open"),
    "read_zero_length_simple": (_reply(0, False, "", 0), "open"),
    "read_df": (_reply(0, True, "", 8192, [1]), "open"),
    "read_hole": (_reply(0, True, "", 8192, [2]), "open"),
    "read_simple": (_reply(0, False, "", 8192), "open"),
    "opt_unknown": (_opt(99, REP_ERR_UNSUP, "Unsupported option 99 (<unknown>)"), "open"),
    "opt_info_unknown_export": ({"error": (REP_ERR_UNKNOWN, "export 'nope' not present")}, "open"),
    "opt_go_unknown_export": ({"error": (REP_ERR_UNKNOWN, "export 'nope' not present")}, "open"),
    "opt_info": (_INFO, "open"),
    "opt_info_name": ({**_INFO, "name": "disk", "infos": [1, 2, 3, 0]}, "open"),
    "opt_go_structured": ({**_INFO, "flags": RW_FLAGS | DF}, "open"),
    "opt_export_name_unknown": ("closed", "closed"),
    "opt_export_name": ((SIZE.to_bytes(8, "big") + RW_FLAGS.to_bytes(2, "big")).hex(), "open"),
    "opt_export_name_zeroes": ((SIZE.to_bytes(8, "big") + RW_FLAGS.to_bytes(2, "big") + bytes(124)).hex(), "open"),
    "opt_list": ([("disk", "the desc")], "open"),
    "opt_list_with_payload": (_opt(3, REP_ERR_INVALID, "option 'list' has unexpected length"), "open"),
    "opt_starttls": (_opt(5, REP_ERR_POLICY, "TLS not configured"), "open"),
    "opt_structured_twice": (_opt(8, REP_ERR_INVALID, "structured reply already negotiated"), "open"),
    "opt_structured_with_payload": (_opt(8, REP_ERR_INVALID, "option 'structured reply' has unexpected length"),
                                    "open"),
    "opt_set_meta_without_structured": ({"contexts": {}, "final": _opt(
        10, REP_ERR_INVALID, "request option 'set meta context' when structured reply is not negotiated")}, "open"),
    "opt_list_meta_all": ({"contexts": {0: "base:allocation"}, "final": _opt(9, 1)}, "open"),
    "opt_list_meta_queries": ({"contexts": {0: "base:allocation"}, "final": _opt(9, 1)}, "open"),
    "opt_set_meta_unknown_export": ({"contexts": {}, "final": _opt(10, REP_ERR_UNKNOWN,
                                                                   "export 'nope' not present")}, "open"),
    "opt_set_meta": ({"contexts": {0: "base:allocation"}, "final": _opt(10, 1)}, "open"),
    "opt_bad_magic": ("closed", "closed"),
    "opt_too_long": ("closed", "closed"),
    "bad_client_flags": ("closed", "closed"),
    "abort": (_opt(2, 1), "closed"),
    "old_newstyle_list": ("closed", "closed"),
    "name_with_nul": (_opt(7, REP_ERR_INVALID, "Unexpected embedded NUL in option go"), "open"),
    "name_longer_than_option": (_opt(7, REP_ERR_INVALID, "Inconsistent lengths in option go"), "open"),
    "go_trailing_bytes": (_opt(7, REP_ERR_INVALID, "option 'go' has unexpected length"), "open"),
    "RO_write": (_einval("Export is read-only"), "open"),
    "RO_write_zeroes": (_einval("Export is read-only"), "open"),
    "RO_trim": (_einval("Export is read-only"), "open"),
    "RO_info": ({**_INFO, "flags": RO_FLAGS}, "open"),
    "RO_read": (_reply(0, True, "", 4096, [2]), "open"),
}
assert set(EXPECTED) == set(SCENARIOS) | set(RO_SCENARIOS)


class QblockNBDServer:
    """qblock's NBD server in this process, exporting one node as ``disk`` over ``<tmp>/nbd.sock``."""

    def __init__(self, tmp_path, node: dict[str, Any] | None = None, writable: bool = True,
                 export: dict[str, Any] | None = None, max_connections: int = 0, size: int = SIZE,
                 start: bool = True):
        self.ctx = qemu_get_aio_context()
        self.tmp = str(tmp_path)
        self.sock = os.path.join(self.tmp, "nbd.sock")
        self.image = os.path.join(self.tmp, "disk.raw")
        self.clients: list[NBDTestClient] = []
        if node is None:
            with open(self.image, "wb") as f:
                f.truncate(size)
            node = {"driver": "raw", "file.driver": "file", "file.filename": self.image}
        self.bs = bdrv_open(None, None, {"node-name": "fmt0", **node}, BDRV_O_RDWR if writable else 0)
        self.exp = None
        if start:
            try:
                nbd_server_start({"type": "unix", "path": self.sock}, max_connections=max_connections)
                self.exp = blk_exp_add({"type": "nbd", "id": "exp0", "node-name": "fmt0", "writable": writable,
                                        "name": "disk", "description": "the desc", **(export or {})})
            except BaseException:
                self.close()
                raise

    def pump(self) -> None:
        aio_pump(self.ctx, 20_000_000)

    def connect(self, timeout: float = 10.0) -> NBDTestClient:
        c = NBDTestClient.connect_unix(self.sock, self.pump, timeout)
        self.clients.append(c)
        return c

    def uri(self, name: str = "disk") -> str:
        return f"nbd+unix:///{name}?socket={self.sock}"

    def settle(self, seconds: float = 0.05) -> None:
        """Turn the loop for a while (lets the server notice closed connections)."""
        deadline = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + int(seconds * 1e9)
        while qemu_clock_get_ns(QEMU_CLOCK_REALTIME) < deadline:
            aio_pump(self.ctx, 5_000_000)

    def run(self, args: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run a program against the server, turning the loop until it exits (killed after ``timeout``)."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(args, stdout=out, stderr=err)
            deadline = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + int(timeout * 1e9)
            while proc.poll() is None:
                if qemu_clock_get_ns(QEMU_CLOCK_REALTIME) > deadline:
                    proc.kill()
                    proc.wait()
                    raise TimeoutError(f"{args[0]} did not finish in {timeout} s")
                aio_pump(self.ctx, 5_000_000)
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(args, proc.returncode, out.read().decode(), err.read().decode())

    def close(self) -> None:
        for c in self.clients:
            c.close()
        if blockdev_nbd.nbd_server is not None:
            nbd_server_stop()
        if block_exports:
            blk_exp_close_all()
        for _ in range(50):
            if not aio_poll(self.ctx, False):
                break
        if self.bs is not None:
            bdrv_unref(self.bs)
            self.bs = None
