"""QMP in process: QEMU's JSON streamer and parser, qmp_dispatch, argument checking, the block commands, a monitor.

Expected texts are what QEMU 7.2's qemu-storage-daemon answers to the same
input (recorded from it); tests/unit/test_storage_daemon.py compares the two
daemons live when qemu-storage-daemon is installed.
"""
import json
import shutil
import socket
import subprocess

import pytest

import qblock.drivers  # noqa: F401 - registers the built-in drivers
from qblock.block import throttle_groups
from qblock.block.accounting import BlockAcctCookie, BlockAcctType, block_acct_done, block_acct_start
from qblock.block.block_backend import (
    blk_insert_bs,
    blk_iostatus_enable,
    blk_new,
    blk_pwrite,
    blk_set_perm,
    blk_unref,
    monitor_add_blk,
    monitor_remove_blk,
)
from qblock.block.graph import BLK_PERM_ALL, BLK_PERM_CONSISTENT_READ, BLK_PERM_WRITE, bdrv_find_node, graph_bdrv_states
from qblock.qmp import qmp_cmds
from qblock.qmp.blockdev import blockdev_close_all_bdrv_states, monitor_bdrv_states
from qblock.qmp.char_socket import qemu_chr_cleanup, qemu_chr_new_from_opts, qemu_chr_parse_opts
from qblock.qmp.dispatch import qmp_dispatch
from qblock.qmp.monitor import monitor_cleanup, monitor_init, monitor_init_globals, qmp_commands
from qblock.qmp.qapi_schema import COMMANDS, SCHEMA, QAPIAlternate, QAPIEnum, QAPIStruct, QAPIUnion
from qblock.qmp.qjson import JSONMessageParser, qobject_from_json, qobject_to_json, qobject_to_json_pretty
from qblock.qmp.qmp_marshal import monitor_init_qmp_commands
from qblock.qmp.qom_cmds import user_creatable_cleanup
from qblock.util.aio import aio_poll, qemu_get_aio_context
from qblock.util.qapi_event import qapi_event_add_listener, qapi_event_remove_listener


@pytest.fixture(autouse=True)
def qmp_state():
    """Commands registered; afterwards every monitor, chardev, node, object and BlockBackend is gone."""
    monitor_init_qmp_commands()
    yield
    monitor_cleanup()
    qemu_chr_cleanup()
    user_creatable_cleanup()
    for id in list(throttle_groups._objects_root):
        throttle_groups.user_creatable_del(id)
    blockdev_close_all_bdrv_states()
    qmp_cmds.qemu_exit_request_reset()
    assert not graph_bdrv_states


def qmp(execute, **arguments):
    req = {"execute": execute}
    if arguments:
        req["arguments"] = {k.replace("_", "-") if k not in _UNDERSCORE_ARGS else k: v for k, v in arguments.items()}
    return qmp_dispatch(qmp_commands, req)


_UNDERSCORE_ARGS = {"bps_rd", "bps_wr", "iops_rd", "iops_wr", "bps_max", "iops_max", "bps_rd_max", "bps_wr_max",
                    "iops_rd_max", "iops_wr_max", "bps_max_length", "iops_size"}


def ok(rsp):
    assert "error" not in rsp, rsp
    return rsp["return"]


def err(rsp, cls="GenericError"):
    assert rsp.get("error", {}).get("class") == cls, rsp
    return rsp["error"]["desc"]


def parse_stream(data: bytes) -> list[str]:
    out = []
    p = JSONMessageParser(lambda o, e: out.append(f"ERR {e.msg}" if e else qobject_to_json(o)))
    p.feed(data)
    return out


# ---------------------------------------------------------------------------
# JSON (qobject/json-*.c)

# input -> what QEMU's streamer and parser make of it (values as QEMU writes them back)
JSON_CASES = [
    (b'{"a" 1}', ["ERR JSON parse error, missing : in object pair"]),
    (b'{"a": 1 "b": 2}', ["ERR JSON parse error, expected separator in dict"]),
    (b'{1: 2}', ["ERR JSON parse error, key is not a string in object"]),
    (b'[1 2]', ["ERR JSON parse error, expected separator in list"]),
    (b'[1,]', ["ERR JSON parse error, expecting value"]),
    (b'{"a":1,}', ["ERR JSON parse error, expecting value"]),
    (b'{"a": tru}', ["ERR JSON parse error, invalid keyword 'tru'"]),
    (b'"\\x"', ["ERR JSON parse error, invalid escape sequence in string"]),
    (b'"\\u12"', ['ERR JSON parse error, \\u12" is not a valid Unicode character']),
    (b'"\\ud800\\u0041"', ["ERR JSON parse error, \\ud800 is not a valid Unicode character"]),
    (b'"\xc3\x28"', ["ERR JSON parse error, invalid UTF-8 sequence in string"]),
    (b'"\xed\xa0\x80"', ["ERR JSON parse error, invalid UTF-8 sequence in string"]),
    (b'@', ["ERR JSON parse error, stray '@'"]),
    (b'{"a": @}', ["ERR JSON parse error, stray '@'", "ERR JSON parse error, expecting value"]),
    (b'01', ["ERR JSON parse error, stray '01'"]),
    (b'-\n', ["ERR JSON parse error, stray '-\n'"]),
    (b'"abc\n', ["ERR JSON parse error, stray '\"abc\n'"]),
    (b'{"id": 1, "id": 2}', ["ERR JSON parse error, duplicate key"]),
    (b'%d', ["ERR JSON parse error, stray '%'"]),
    (b'}', ["ERR JSON parse error, expecting value"]),
    (b'{bad json\n', []),                                  # braces still open: QEMU waits for more
    (b"{'single': 'quotes\\''}", ['{"single": "quotes\'"}']),
    (b'"\\u0000" "\xc0\x80"', ['"\\u0000"', '"\\u0000"']),
    (b'18446744073709551615 -9223372036854775808 1e400\n', ["18446744073709551615", "-9223372036854775808", "inf"]),
    (b'{"a":[1,{"b":null}]}{"c":true}', ['{"a": [1, {"b": null}]}', '{"c": true}']),
]


@pytest.mark.parametrize("data, expected", JSON_CASES, ids=[repr(c[0])[:30] for c in JSON_CASES])
def test_json_streamer_and_parser_match_qemu(data, expected):
    """Each input gives QEMU's values and QEMU's 'JSON parse error, ...' messages."""
    assert parse_stream(data) == expected


def test_json_nesting_limit():
    """More than 1024 open brackets is an error; the rest of the input is read afresh."""
    out = parse_stream(b"[" * 1025 + b"]" * 2)
    assert out == ["ERR JSON nesting depth limit exceeded"] + ["ERR JSON parse error, expecting value"] * 2


def test_json_output_uses_qdict_order_and_upper_case_escapes():
    """Dict members come out in QEMU's hash-bucket order; non-ASCII as \\uXXXX with upper-case hex."""
    assert qobject_to_json({"major": 7, "minor": 2, "micro": 0}) == '{"micro": 0, "minor": 2, "major": 7}'
    assert qobject_to_json({"return": {}, "id": 1}) == '{"return": {}, "id": 1}'
    assert qobject_to_json({"error": {"class": "C", "desc": "d"}, "id": 1}) == \
        '{"id": 1, "error": {"class": "C", "desc": "d"}}'
    assert qobject_to_json({"timestamp": 0, "event": "E", "data": 1}) == '{"timestamp": 0, "event": "E", "data": 1}'
    assert qobject_to_json("\x01é\U0001F600\"\\\n") == '"\\u0001\\u00E9\\uD83D\\uDE00\\"\\\\\\n"'


def test_json_pretty_output_is_qemus():
    """pretty=on indents by four spaces and writes empty containers over two lines."""
    assert qobject_to_json_pretty({"return": {}}, True) == '{\n    "return": {\n    }\n}'
    assert qobject_to_json_pretty([1, []], True) == "[\n    1,\n    [\n    ]\n]"


def test_qobject_from_json_errors():
    """A truncated JSON option is 'premature EOI', as in qemu-storage-daemon --blockdev '{...'."""
    with pytest.raises(Exception, match="JSON parse error, premature EOI"):
        qobject_from_json('{"driver": "null-co"')
    assert qobject_from_json('{"a": [1, 2.5]}') == {"a": [1, 2.5]}


# ---------------------------------------------------------------------------
# qmp_dispatch (qapi/qmp-dispatch.c)

DISPATCH_CASES = [
    ({"foo": 1}, {"error": {"class": "GenericError", "desc": "QMP input member 'foo' is unexpected"}}),
    ([1, 2], {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}),
    ({"execute": 1, "id": 7}, {"id": 7, "error": {"class": "GenericError",
                                                  "desc": "QMP input member 'execute' must be a string"}}),
    ({"id": 7}, {"id": 7, "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}),
    ({"execute": "query-version", "arguments": 1},
     {"error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}),
    ({"execute": "nosuch", "id": "x"},
     {"error": {"class": "CommandNotFound", "desc": "The command nosuch has not been found"}, "id": "x"}),
    ({"execute": "query-version", "arguments": {"a": 1}},
     {"error": {"class": "GenericError", "desc": "Parameter 'a' is unexpected"}}),
    ({"exec-oob": "query-version"}, {"error": {"class": "GenericError",
                                               "desc": "QMP input member 'exec-oob' is unexpected"}}),
    ({"execute": "query-named-block-nodes", "arguments": {"flat": 1}},
     {"error": {"class": "GenericError", "desc": "Invalid parameter type for 'flat', expected: boolean"}}),
    ({"execute": "qmp_capabilities", "id": {"a": [1]}},
     {"error": {"class": "CommandNotFound",
                "desc": "Capabilities negotiation is already complete, command ignored"}, "id": {"a": [1]}}),
]


@pytest.mark.parametrize("request_, reply", DISPATCH_CASES, ids=[str(c[0])[:40] for c in DISPATCH_CASES])
def test_qmp_dispatch_checks_requests_as_qemu(request_, reply):
    """Malformed requests get QEMU's class and message, and the id comes back whenever there was one."""
    assert qmp_dispatch(qmp_commands, request_) == reply


def test_oob_checks():
    """With OOB allowed, exec-oob is taken but a command without allow-oob refuses it; two exec keys clash."""
    assert qmp_dispatch(qmp_commands, {"exec-oob": "blockdev-del", "id": 3}, allow_oob=True) == \
        {"error": {"class": "GenericError", "desc": "The command blockdev-del does not support OOB"}, "id": 3}
    assert err(qmp_dispatch(qmp_commands, {"execute": "quit", "exec-oob": "quit"}, allow_oob=True)) == \
        "QMP input member 'exec-oob' clashes with 'execute'"
    assert "qemu" in ok(qmp_dispatch(qmp_commands, {"exec-oob": "query-version"}, allow_oob=True))


def test_query_version_and_commands():
    """query-version reports QEMU 7.2.0 with package 'qblock ...'; query-commands lists every command."""
    v = ok(qmp("query-version"))
    assert v["qemu"] == {"major": 7, "minor": 2, "micro": 0} and v["package"].startswith("qblock ")
    names = {c["name"] for c in ok(qmp("query-commands"))}
    assert names == set(COMMANDS)


def test_quit_sets_exit_requested():
    """quit only asks the main loop to stop."""
    assert ok(qmp("quit")) == {}
    assert qmp_cmds.qemu_exit_requested()


# Argument checking as QAPI's input visitor (messages recorded from qemu-storage-daemon 7.2)
ARG_CASES = [
    ({"driver": "null-co"}, "'node-name' must be specified for the root node"),
    ({"node-name": "n"}, "Parameter 'driver' is missing"),
    ({"node-name": "n", "driver": "nope"}, "Parameter 'driver' does not accept value 'nope'"),
    ({"node-name": "n", "driver": "null-co", "size": "x"}, "Invalid parameter type for 'size', expected: integer"),
    ({"node-name": "n", "driver": "null-co", "size": 1.5}, "Invalid parameter type for 'size', expected: integer"),
    ({"node-name": "n", "driver": "null-co", "size": 1 << 64 - 1},
     "Invalid parameter type for 'size', expected: integer"),
    ({"node-name": "n", "driver": "null-co", "bogus": 1}, "Parameter 'bogus' is unexpected"),
    ({"node-name": "n", "driver": "null-co", "read-zeroes": "yes"},
     "Invalid parameter type for 'read-zeroes', expected: boolean"),
    ({"node-name": "n", "driver": "null-co", "cache": {"direct": 1}},
     "Invalid parameter type for 'cache.direct', expected: boolean"),
    ({"node-name": "n", "driver": "null-co", "cache": 1}, "Invalid parameter type for 'cache', expected: object"),
    ({"node-name": "n", "driver": "null-co", "detect-zeroes": "x"},
     "Parameter 'detect-zeroes' does not accept value 'x'"),
    ({"node-name": "n", "driver": "null-co", "discard": "x"}, "Parameter 'discard' does not accept value 'x'"),
    ({"node-name": 5, "driver": "null-co"}, "Invalid parameter type for 'node-name', expected: string"),
    ({"node-name": "1n", "driver": "null-co"}, "Invalid node-name: '1n'"),
    ({"driver": "raw", "node-name": "r", "file": {"driver": "file"}}, "Parameter 'file.filename' is missing"),
    ({"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": 5}},
     "Invalid parameter type for 'file.filename', expected: string"),
    ({"driver": "raw", "node-name": "r", "file": {"driver": "nope"}}, "Parameter 'driver' does not accept value 'nope'"),
    ({"driver": "raw", "node-name": "r", "file": 5}, "Invalid parameter type for 'file', expected: BlockdevRef"),
    ({"driver": "raw", "node-name": "r", "file": None}, "Invalid parameter type for 'file', expected: BlockdevRef"),
    ({"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": "/x", "x": 1}},
     "Parameter 'file.x' is unexpected"),
    ({"driver": "raw", "node-name": "r", "file": "nonode"}, "Cannot find device='nonode' nor node-name='nonode'"),
    ({"driver": "file", "node-name": "f", "filename": "/nonexistent"},
     "Could not open '/nonexistent': No such file or directory"),
    ({"driver": "blkdebug", "node-name": "b", "image": "n", "inject-error": [{"event": "read_aio", "errno": "x"}]},
     "Invalid parameter type for 'inject-error[0].errno', expected: integer"),
    ({"driver": "blkdebug", "node-name": "b", "image": "n", "inject-error": [{"event": "nope"}]},
     "Parameter 'event' does not accept value 'nope'"),
    ({"driver": "blkdebug", "node-name": "b", "image": "n", "inject-error": [{"event": "read_aio"}, 3]},
     "Invalid parameter type for 'inject-error[1]', expected: object"),
    ({"driver": "blkdebug", "node-name": "b", "image": "n", "take-child-perms": ["nope"]},
     "Parameter 'null' does not accept value 'nope'"),
    ({"driver": "blkdebug", "node-name": "b", "image": "n", "take-child-perms": "write"},
     "Invalid parameter type for 'take-child-perms', expected: array"),
]


@pytest.mark.parametrize("args, desc", ARG_CASES, ids=[str(c[0])[:50] for c in ARG_CASES])
def test_blockdev_add_argument_errors(args, desc):
    """blockdev-add rejects bad BlockdevOptions with qemu-storage-daemon's exact GenericError message."""
    assert err(qmp_dispatch(qmp_commands, {"execute": "blockdev-add", "arguments": args})) == desc


def test_sized_and_unsigned_integers():
    """uint32 range errors name the bare member; uint64 takes negative numbers and wraps them."""
    nbd = {"addr": {"type": "unix", "data": {"path": "/nonexistent/x"}}}
    assert err(qmp("nbd-server-start", **nbd, max_connections=1 << 32)) == \
        "Parameter 'max-connections' expects uint32_t"
    assert err(qmp("nbd-server-start", **nbd, max_connections="x")) == "Parameter 'max-connections' expects uint64"
    assert err(qmp("nbd-server-start", addr={"type": "unix"})) == "Parameter 'addr.data' is missing"
    assert err(qmp("nbd-server-start", addr={"type": "inet", "data": {"host": "h", "port": 5}})) == \
        "Invalid parameter type for 'addr.data.port', expected: string"
    ok(qmp("blockdev-add", driver="null-co", node_name="n"))
    assert err(qmp("block-set-write-threshold", node_name="n", write_threshold=1.5)) == \
        "Parameter 'write-threshold' expects uint64"
    ok(qmp("block-set-write-threshold", node_name="n", write_threshold=-5))
    assert ok(qmp("query-named-block-nodes"))[0]["write_threshold"] == -5


# ---------------------------------------------------------------------------
# Schema

def _required_keys(type_name):
    t = SCHEMA[type_name]
    members = []
    while t is not None:
        members = list(t.members) + members
        t = SCHEMA[t.base] if t.base else None
    return {m.name for m in members if not m.optional}, {m.name for m in members}


def _check_shape(value, type_name):
    """``value`` has every mandatory member of ``type_name`` and nothing it does not declare (one level)."""
    required, allowed = _required_keys(type_name)
    assert required <= set(value) <= allowed, (type_name, set(value) ^ required)


def test_schema_types_are_all_declared():
    """Every type a declaration names exists (a typo would otherwise pass arguments through unchecked)."""
    builtin = {"str", "int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "size",
               "bool", "number", "any", "null"}

    def check(t):
        t = t[0] if isinstance(t, list) else t
        assert t in builtin or t in SCHEMA, t

    for t in SCHEMA.values():
        if isinstance(t, QAPIStruct):
            for m in t.members:
                check(m.type)
        elif isinstance(t, QAPIUnion):
            assert isinstance(SCHEMA[t.base], QAPIStruct)
            for v in t.variants.values():
                check(v)
            assert isinstance(SCHEMA[[m for m in SCHEMA[t.base].members if m.name == t.discriminator][0].type],
                              QAPIEnum)
        elif isinstance(t, QAPIAlternate):
            for v in t.branches.values():
                check(v)
    for c in COMMANDS.values():
        if c.data:
            check(c.data)


# ---------------------------------------------------------------------------
# Block commands

def test_blockdev_add_query_and_del(tmp_path):
    """A file node and a raw node on it: BlockDeviceInfo as QEMU's, newest first; deletion in QEMU's order of checks."""
    img = tmp_path / "img.raw"
    img.write_bytes(b"\0" * 1048576)
    ok(qmp("blockdev-add", driver="file", node_name="f", filename=str(img)))
    ok(qmp("blockdev-add", driver="raw", node_name="r", file="f"))
    nodes = ok(qmp("query-named-block-nodes"))
    assert [n["node-name"] for n in nodes] == ["r", "f"]
    for n in nodes:
        _check_shape(n, "BlockDeviceInfo")
        _check_shape(n["image"], "ImageInfo")
        _check_shape(n["cache"], "BlockdevCacheInfo")
    r = nodes[0]
    assert (r["drv"], r["ro"], r["file"], r["backing_file_depth"], r["write_threshold"]) == \
        ("raw", False, str(img), 0, 0)
    assert r["image"]["virtual-size"] == 1048576 and r["image"]["format"] == "raw"
    assert r["cache"] == {"writeback": True, "direct": False, "no-flush": False}
    assert "actual-size" in nodes[1]["image"]
    assert err(qmp("blockdev-add", driver="null-co", node_name="f")) == "Duplicate nodes with node-name='f'"
    assert err(qmp("blockdev-del", node_name="f")) == "Block device f is in use"
    assert err(qmp("blockdev-del", node_name="zz")) == "Failed to find node with node-name='zz'"
    ok(qmp("blockdev-del", node_name="r"))
    ok(qmp("blockdev-del", node_name="f"))
    assert ok(qmp("query-named-block-nodes")) == []


def test_blockdev_add_options_reach_the_node():
    """read-only, cache, detect-zeroes and nested file options arrive at bdrv_open; a filter chain has depth."""
    ok(qmp("blockdev-add", driver="raw", node_name="r", read_only=True,
           cache={"direct": False, "no-flush": True}, detect_zeroes="on",
           file={"driver": "null-co", "size": 4096, "read-zeroes": True}))
    ok(qmp("blockdev-add", driver="copy-on-read", node_name="cor",
           file={"driver": "null-co", "node-name": "n2", "size": 8192}))
    info = {n["node-name"]: n for n in ok(qmp("query-named-block-nodes"))}
    r = info["r"]
    assert r["ro"] is True and r["detect_zeroes"] == "on" and r["cache"]["no-flush"] is True
    assert r["image"]["virtual-size"] == 4096
    cor = info["cor"]
    assert cor["backing_file_depth"] == 1 and cor["image"]["backing-image"]["format"] == "null-co"
    flat = {n["node-name"]: n for n in ok(qmp("query-named-block-nodes", flat=True))}
    assert "backing-image" not in flat["cor"]["image"]
    assert len(monitor_bdrv_states) == 2


def test_blockdev_del_refuses_a_node_with_a_blockbackend():
    """'Node %s is in use' while a BlockBackend (an export, a device) sits on the node."""
    ok(qmp("blockdev-add", driver="null-co", node_name="n"))
    blk = blk_new(qemu_get_aio_context(), 0, BLK_PERM_ALL)
    blk_insert_bs(blk, bdrv_find_node("n"))
    try:
        assert err(qmp("blockdev-del", node_name="n")) == "Node n is in use"
    finally:
        blk_unref(blk)


class _Device:
    """A stand-in device model: what query-block and qmp_get_blk read of one (its id)."""

    def __init__(self, id):
        self.id = id


@pytest.fixture
def named_blk():
    """A BlockBackend 'drive0' on node 'n' with a device 'dev0' attached, as -drive/-device make."""
    ok(qmp("blockdev-add", driver="null-co", node_name="n", size=1 << 20))
    blk = blk_new(qemu_get_aio_context(), BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, BLK_PERM_ALL)
    blk_insert_bs(blk, bdrv_find_node("n"))
    monitor_add_blk(blk, "drive0")
    dev = _Device("dev0")
    blk.dev = dev
    yield blk
    blk.dev = None
    if blk.public.throttle_group_member.throttle_state is not None:
        throttle_groups.blk_io_limits_disable(blk)
    monitor_remove_blk(blk)
    blk_unref(blk)


def test_query_block_and_blockstats(named_blk):
    """query-block and query-blockstats show named BlockBackends, their accounting and the node chain."""
    blk_iostatus_enable(named_blk)
    (info,) = ok(qmp("query-block"))
    _check_shape(info, "BlockInfo")
    assert (info["device"], info["qdev"], info["type"], info["removable"], info["locked"]) == \
        ("drive0", "dev0", "unknown", False, False)
    assert info["io-status"] == "ok" and info["inserted"]["node-name"] == "n"
    cookie = BlockAcctCookie()
    block_acct_start(named_blk.stats, cookie, 4096, BlockAcctType.BLOCK_ACCT_WRITE)
    assert blk_pwrite(named_blk, 8192, bytearray(4096)) == 4096
    block_acct_done(named_blk.stats, cookie)
    (s,) = ok(qmp("query-blockstats"))
    _check_shape(s, "BlockStats")
    _check_shape(s["stats"], "BlockDeviceStats")
    assert (s["device"], s["qdev"], s["node-name"]) == ("drive0", "dev0", "n")
    assert s["stats"]["wr_bytes"] == 4096 and s["stats"]["wr_operations"] == 1
    assert s["stats"]["wr_highest_offset"] == 12288 and s["stats"]["account_invalid"] is True
    nodes = ok(qmp("query-blockstats", query_nodes=True))
    assert [n["node-name"] for n in nodes] == ["n"]
    assert nodes[0]["stats"]["account_failed"] is False and "device" not in nodes[0]


def test_block_set_io_throttle(named_blk):
    """Limits show up in query-block with the group; QEMU's validation and DeviceNotFound errors."""
    limits = dict(bps=1 << 20, bps_rd=0, bps_wr=0, iops=0, iops_rd=0, iops_wr=0)
    ok(qmp("block_set_io_throttle", device="drive0", bps_max=2 << 20, **limits))
    inserted = ok(qmp("query-block"))[0]["inserted"]
    assert (inserted["bps"], inserted["bps_max"], inserted["group"]) == (1 << 20, 2 << 20, "drive0")
    assert inserted["bps_max_length"] == 1
    assert err(qmp("block_set_io_throttle", device="drive0", bps_max=10, **limits)) == \
        "bps_max/iops_max cannot be lower than bps/iops"
    assert err(qmp("block_set_io_throttle", device="nope", **limits), "DeviceNotFound") == "Device 'nope' not found"
    assert err(qmp("block_set_io_throttle", id="nodev", **limits), "DeviceNotFound") == "Device 'nodev' not found"
    assert err(qmp("block_set_io_throttle", **limits)) == "Need exactly one of 'device' and 'id'"
    assert err(qmp("block_set_io_throttle", device="drive0", bps=1)) == "Parameter 'bps_rd' is missing"
    ok(qmp("block_set_io_throttle", id="dev0", **dict(limits, bps=0)))
    assert "group" not in ok(qmp("query-block"))[0]["inserted"]


def test_block_latency_histogram_set(named_blk):
    """Boundaries per type appear in query-blockstats; bad boundaries and unknown devices fail as in QEMU."""
    ok(qmp("block-latency-histogram-set", id="dev0", boundaries=[10, 1000], boundaries_write=[5]))
    stats = ok(qmp("query-blockstats"))[0]["stats"]
    assert stats["rd_latency_histogram"] == {"boundaries": [10, 1000], "bins": [0, 0, 0]}
    assert stats["wr_latency_histogram"] == {"boundaries": [5], "bins": [0, 0]}
    assert stats["flush_latency_histogram"]["boundaries"] == [10, 1000]
    assert err(qmp("block-latency-histogram-set", id="dev0", boundaries_read=[5, 5])) == \
        "Device 'dev0' set read boundaries fail"
    assert err(qmp("block-latency-histogram-set", id="zz"), "DeviceNotFound") == "Device 'zz' not found"
    ok(qmp("block-latency-histogram-set", id="dev0"))
    assert "rd_latency_histogram" not in ok(qmp("query-blockstats"))[0]["stats"]


def test_write_threshold_event():
    """block-set-write-threshold: the first write past it sends BLOCK_WRITE_THRESHOLD once."""
    events = []

    def listener(name, data, stamp):
        events.append((name, data))

    qapi_event_add_listener(listener)
    blk = None
    try:
        ok(qmp("blockdev-add", driver="null-co", node_name="n", size=1 << 20))
        assert err(qmp("block-set-write-threshold", node_name="zz", write_threshold=5)) == "Device 'zz' not found"
        ok(qmp("block-set-write-threshold", node_name="n", write_threshold=65536))
        assert ok(qmp("query-named-block-nodes"))[0]["write_threshold"] == 65536
        blk = blk_new(qemu_get_aio_context(), 0, BLK_PERM_ALL)
        blk_insert_bs(blk, bdrv_find_node("n"))
        blk_set_perm(blk, BLK_PERM_WRITE | BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
        assert blk_pwrite(blk, 0, bytearray(4096)) == 4096
        assert events == []
        assert blk_pwrite(blk, 65536 - 512, bytearray(4096)) == 4096
        assert events == [("BLOCK_WRITE_THRESHOLD",
                           {"node-name": "n", "amount-exceeded": 4096 - 512, "write-threshold": 65536})]
        assert ok(qmp("query-named-block-nodes"))[0]["write_threshold"] == 0
    finally:
        qapi_event_remove_listener(listener)
        if blk is not None:
            blk_unref(blk)


def test_x_debug_query_block_graph():
    """Nodes and edges in XDbgBlockGraph's shape, permission names highest bit first and without graph-mod."""
    ok(qmp("blockdev-add", driver="raw", node_name="r", file={"driver": "null-co", "node-name": "n"}))
    graph = ok(qmp("x-debug-query-block-graph"))
    ids = {n["name"]: n["id"] for n in graph["nodes"]}
    assert sorted(ids) == ["n", "r"] and all(n["type"] == "block-driver" for n in graph["nodes"])
    (edge,) = graph["edges"]
    assert (edge["parent"], edge["child"], edge["name"]) == (ids["r"], ids["n"], "file")
    assert edge["perm"] == []
    assert edge["shared-perm"] == ["resize", "write-unchanged", "write", "consistent-read"]


def test_object_add_and_del():
    """throttle-group and iothread objects share /objects; errors as QEMU's."""
    ok(qmp("object-add", qom_type="iothread", id="io0", poll_max_ns=0))
    assert err(qmp("object-add", qom_type="throttle-group", id="io0")) == \
        "attempt to add duplicate property 'io0' to object (type 'container')"
    assert err(qmp("object-add", qom_type="iothread", id="io1", poll_max_ns="x")) == \
        "Invalid parameter type for 'poll-max-ns', expected: integer"
    assert err(qmp("object-add", qom_type="iothread", id="io1", bogus=1)) == "Parameter 'bogus' is unexpected"
    assert err(qmp("object-add", qom_type="nope", id="x")) == "Parameter 'qom-type' does not accept value 'nope'"
    assert err(qmp("object-add", id="x")) == "Parameter 'qom-type' is missing"
    assert err(qmp("object-add", qom_type="throttle-group", id="tg1", x_bps_total=-1)) == \
        "Property values cannot be negative"
    assert err(qmp("object-add", qom_type="throttle-group", id="tg1",
                   limits={"bps-total": 1000, "bps-total-max": 10})) == \
        "bps_max/iops_max cannot be lower than bps/iops"
    ok(qmp("object-add", qom_type="throttle-group", id="tg0", limits={"bps-total": 1000}))
    ok(qmp("blockdev-add", driver="throttle", node_name="t", throttle_group="tg0", file={"driver": "null-co"}))
    assert err(qmp("object-del", id="tg0")) == "object 'tg0' is in use, can not be deleted"
    ok(qmp("blockdev-del", node_name="t"))
    ok(qmp("object-del", id="tg0"))
    ok(qmp("object-del", id="io0"))
    assert err(qmp("object-del", id="io0")) == "object 'io0' not found"


def test_nbd_server_and_exports(tmp_path):
    """nbd-server-start (legacy address), block-export-add/del, query-block-exports, as QEMU."""
    pytest.importorskip("qblock.nbd.blockdev_nbd", reason="the NBD server (qblock/nbd) is not there yet")
    assert err(qmp("nbd-server-stop")) == "NBD server not running"
    sock = str(tmp_path / "nbd.sock")
    ok(qmp("nbd-server-start", addr={"type": "unix", "data": {"path": sock}}))
    try:
        assert err(qmp("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})) == \
            "NBD server already running"
        ok(qmp("blockdev-add", driver="null-co", node_name="n"))
        ok(qmp("block-export-add", type="nbd", id="e0", node_name="n", writable=True))
        assert err(qmp("block-export-add", type="nbd", id="e0", node_name="n")) == \
            "Block export id 'e0' is already in use"
        assert err(qmp("block-export-add", type="nbd", id="e1", node_name="nn")) == \
            "Cannot find device='' nor node-name='nn'"
        assert ok(qmp("query-block-exports")) == \
            [{"id": "e0", "type": "nbd", "node-name": "n", "shutting-down": False}]
        assert err(qmp("blockdev-del", node_name="n")) == "Node n is in use"
        assert err(qmp("block-export-del", id="zz")) == "Export 'zz' is not found"
        ok(qmp("block-export-del", id="e0"))
        for _ in range(10):
            aio_poll(qemu_get_aio_context(), False)
        assert ok(qmp("query-block-exports")) == []
    finally:
        ok(qmp("nbd-server-stop"))


# ---------------------------------------------------------------------------
# A monitor on a socket (monitor/qmp.c, chardev/char-socket.c), driven by the main loop


class Client:
    """A QMP client socket; ``read(n)`` turns the main loop until n lines came (no sleeping)."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.buf = b""

    def send(self, data: bytes):
        self.sock.sendall(data)

    def read(self, n=1, turns=2000):
        ctx = qemu_get_aio_context()
        out = []
        for _ in range(turns):
            while b"\r\n" in self.buf and len(out) < n:
                line, _, self.buf = self.buf.partition(b"\r\n")
                out.append(line.decode())
            if len(out) == n:
                return out
            aio_poll(ctx, False)
            try:
                self.buf += self.sock.recv(65536)
            except BlockingIOError:
                pass
        raise AssertionError(f"expected {n} lines, got {out}")

    def read_json(self, n=1):
        return [json.loads(line) for line in self.read(n)]

    def close(self):
        self.sock.close()
        for _ in range(20):
            aio_poll(qemu_get_aio_context(), False)


@pytest.fixture
def monitor(tmp_path):
    """A monitor on chardev c0 listening at tmp_path/qmp.sock, as --chardev/--monitor make it."""
    monitor_init_globals()
    path = str(tmp_path / "qmp.sock")
    qemu_chr_new_from_opts(qemu_chr_parse_opts(f"socket,id=c0,path={path},server=on,wait=off"))
    mon = monitor_init({"chardev": "c0"})
    yield path, mon


def test_monitor_session(monitor):
    """Greeting, negotiation mode, pipelined commands in order, a parse error that leaves the monitor serving."""
    path, _ = monitor
    c = Client(path)
    (greeting,) = c.read()
    assert greeting == ('{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
                        f'"package": "{ok(qmp("query-version"))["package"]}"}}, "capabilities": ["oob"]}}}}')
    c.send(b'{"execute": "query-version", "id": 1}\n')
    assert c.read() == ['{"id": 1, "error": {"class": "CommandNotFound", '
                        '"desc": "Expecting capabilities negotiation with \'qmp_capabilities\'"}}']
    c.send(b'{"execute": "qmp_capabilities"}{"execute": "qmp_capabilities"}\n{"a": }\n'
           b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n"}}\n'
           b'"string"\n{"execute": "query-named-block-nodes", "id": "q"}')
    lines = c.read_json(6)
    assert lines[0] == {"return": {}}
    assert lines[1]["error"]["desc"] == "Capabilities negotiation is already complete, command ignored"
    assert lines[2] == {"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}
    assert lines[3] == {"return": {}}
    assert lines[4] == {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}
    assert lines[5]["id"] == "q" and lines[5]["return"][0]["node-name"] == "n"
    c.close()


def test_monitor_serves_one_client_at_a_time_and_renegotiates(monitor):
    """A second client waits for the first to leave; then it gets the greeting and starts in negotiation mode."""
    path, _ = monitor
    a = Client(path)
    a.read()
    a.send(b'{"execute": "qmp_capabilities"}\n')
    assert a.read_json() == [{"return": {}}]
    b = Client(path)
    with pytest.raises(AssertionError):
        b.read(turns=50)
    a.close()
    assert json.loads(b.read()[0])["QMP"]["capabilities"] == ["oob"]
    b.send(b'{"execute": "query-commands"}\n')
    assert b.read_json()[0]["error"]["class"] == "CommandNotFound"
    b.close()


def test_monitor_events_reach_command_mode_monitors(monitor):
    """BLOCK_WRITE_THRESHOLD arrives with a timestamp, only once the client left negotiation mode."""
    path, _ = monitor
    c = Client(path)
    c.read()
    ok(qmp("blockdev-add", driver="null-co", node_name="n", size=1 << 20))
    ok(qmp("block-set-write-threshold", node_name="n", write_threshold=512))
    blk = blk_new(qemu_get_aio_context(), BLK_PERM_WRITE | BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
    blk_insert_bs(blk, bdrv_find_node("n"))
    try:
        assert blk_pwrite(blk, 0, bytearray(1024)) == 1024  # negotiation mode: no event
        c.send(b'{"execute": "qmp_capabilities"}\n')
        assert c.read_json() == [{"return": {}}]
        ok(qmp("block-set-write-threshold", node_name="n", write_threshold=2048))
        assert blk_pwrite(blk, 2048, bytearray(1024)) == 1024
        (event,) = c.read_json()
        assert list(event) == ["timestamp", "event", "data"]
        assert set(event["timestamp"]) == {"seconds", "microseconds"}
        assert event["event"] == "BLOCK_WRITE_THRESHOLD"
        assert event["data"] == {"node-name": "n", "write-threshold": 2048, "amount-exceeded": 1024}
    finally:
        blk_unref(blk)
        c.close()


def test_monitor_pretty(tmp_path):
    """--monitor pretty=on: QEMU's indentation, lines ending in \\r\\n."""
    monitor_init_globals()
    path = str(tmp_path / "p.sock")
    qemu_chr_new_from_opts(qemu_chr_parse_opts(f"socket,id=p0,path={path},server=on,wait=off"))
    monitor_init({"chardev": "p0", "pretty": True})
    c = Client(path)
    while c.read()[0] != "}":   # the greeting, over several lines
        pass
    c.send(b'{"execute": "qmp_capabilities"}\n')
    assert c.read(3) == ["{", '    "return": {', "    }"]
    c.close()


def test_chardev_errors(tmp_path):
    """--chardev and --monitor errors as qemu-storage-daemon's."""
    with pytest.raises(Exception, match="'nope' is not a valid char driver name"):
        qemu_chr_new_from_opts(qemu_chr_parse_opts("nope,id=c"))
    with pytest.raises(Exception, match="Unable to parse FD number"):
        qemu_chr_new_from_opts(qemu_chr_parse_opts("socket,id=c"))
    with pytest.raises(Exception, match='chardev "zz" not found'):
        monitor_init({"chardev": "zz"})


# ---------------------------------------------------------------------------
# The schema against QEMU's own (query-qmp-schema of qemu-storage-daemon 7.2)


def _qsd_schema(tmp_path):
    path = str(tmp_path / "s.sock")
    proc = subprocess.Popen(["qemu-storage-daemon", "--chardev", f"socket,id=c,path={path},server=on,wait=off",
                             "--monitor", "chardev=c"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        for _ in range(500):
            try:
                s.connect(path)
                break
            except OSError:
                proc.wait(0.01) if proc.poll() is not None else None
                import time
                time.sleep(0.01)
        f = s.makefile("rwb")
        f.readline()
        f.write(b'{"execute": "qmp_capabilities"}\n{"execute": "query-qmp-schema"}\n')
        f.flush()
        f.readline()
        schema = json.loads(f.readline())["return"]
        s.close()
        return {e["name"]: e for e in schema}
    finally:
        proc.terminate()
        proc.wait(10)


_JSON_TYPE = {"str": "string", "bool": "boolean", "number": "number", "any": "value", "null": "null"}


def _compare(qs, theirs_name, mine, path, problems, depth=0):
    """Members (names, optional, JSON type) of my type ``mine`` against introspected type ``theirs_name``."""
    theirs = qs[theirs_name]
    if isinstance(mine, list):
        if theirs["meta-type"] != "array":
            problems.append(f"{path}: not an array")
            return
        _compare(qs, theirs["element-type"], mine[0], path + "[]", problems, depth)
        return
    if mine in _JSON_TYPE or mine not in SCHEMA:
        want = _JSON_TYPE.get(mine, "int")
        if theirs.get("json-type") != want:
            problems.append(f"{path}: {mine} vs {theirs}")
        return
    t = SCHEMA[mine]
    if isinstance(t, QAPIEnum):
        if theirs["meta-type"] != "enum" or list(t.values) != theirs["values"]:
            problems.append(f"{path}: enum {t.name} differs")
        return
    if isinstance(t, QAPIAlternate) or depth > 6:
        return
    members = {m["name"]: m for m in theirs.get("members", [])}
    struct = SCHEMA[t.base] if isinstance(t, QAPIUnion) else t
    mine_members = []
    while struct is not None:
        mine_members = list(struct.members) + mine_members
        struct = SCHEMA[struct.base] if struct.base else None
    for m in mine_members:
        if m.name not in members:
            problems.append(f"{path}.{m.name}: not in QEMU")
            continue
        if ("default" in members[m.name]) != m.optional:
            problems.append(f"{path}.{m.name}: optional differs")
        _compare(qs, members[m.name]["type"], m.type, f"{path}.{m.name}", problems, depth + 1)
    if not isinstance(t, QAPIUnion):
        extra = set(members) - {m.name for m in mine_members}
        if extra:
            problems.append(f"{path}: QEMU has more members {sorted(extra)}")
        return
    for v in theirs.get("variants", []):
        if v["case"] in t.variants:
            _compare(qs, v["type"], t.variants[v["case"]], f"{path}<{v['case']}>", problems, depth + 1)


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="qemu-storage-daemon is not installed")
def test_schema_matches_qemu_storage_daemon(tmp_path):
    """Every command both daemons have takes the same members (names, optional, JSON types, enum values)."""
    qs = _qsd_schema(tmp_path)
    problems = []
    compared = 0
    for name, cmd in COMMANDS.items():
        if name not in qs or cmd.data is None:
            continue
        compared += 1
        _compare(qs, qs[name]["arg-type"], cmd.data, name, problems)
    assert compared >= 10
    assert problems == []
