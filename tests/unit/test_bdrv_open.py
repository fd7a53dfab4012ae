"""Opening nodes: block.c's bdrv_open (options, filenames, references, inheritance) and the driver registry.

QEMU has no unit test for bdrv_open; the expected error messages below are what
``qemu-io`` 7.2 prints for the same options (e.g.
``qemu-io --image-opts driver=null-co,foo=1 -c 'read 0 1'``), without its
``can't open:`` prefix.  Every failed open must leave the graph as it was.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import sys
import textwrap

import pytest

from qblock.block import driver as _driver
from qblock.block import graph
from qblock.block.block_backend import block_backends
from qblock.block.driver import (
    BDRV_O_NO_FLUSH,
    BDRV_O_NOCACHE,
    BDRV_O_PROTOCOL,
    BDRV_O_RDWR,
    BDRV_O_UNMAP,
    BlockDriver,
    BlockdevDetectZeroesOptions,
    bdrv_find_format,
    bdrv_unregister,
)
from qblock.block.graph import BLK_PERM_ALL, bdrv_find_node, bdrv_getlength, bdrv_open, bdrv_ref, bdrv_unref
from qblock.util.error import Error
from qblock.util.qemu_option import keyval_parse, qdict_crumple, qdict_extract_subqdict, qdict_flatten


@pytest.fixture(autouse=True)
def _no_leaks():
    """Every test (and every failed open) leaves the node lists as they were."""
    nodes = list(graph.all_bdrv_states)
    named = list(graph.graph_bdrv_states)
    blks = list(block_backends)
    yield
    leaked = ([n for n in graph.all_bdrv_states if n not in nodes], [b for b in block_backends if b not in blks])
    graph.all_bdrv_states[:] = nodes
    graph.graph_bdrv_states[:] = named
    block_backends[:] = blks
    assert leaked == ([], [])


def open_fails(options, flags: int = BDRV_O_RDWR, filename: str | None = None) -> str:
    """Open, expect an Error, check that no node was left behind, and return the message."""
    before = (list(graph.all_bdrv_states), list(graph.graph_bdrv_states))
    with pytest.raises(Error) as exc:
        bdrv_open(filename, None, options, flags)
    assert (list(graph.all_bdrv_states), list(graph.graph_bdrv_states)) == before
    return str(exc.value)


# --------------------------------------------------------------------------
# The three ways of writing options


def _check_raw_over_null(bs, size: int) -> None:
    assert bs.drv.format_name == "raw"
    assert bs.file is not None and bs.file.bs.drv.format_name == "null-co"
    assert bdrv_getlength(bs) == size
    assert bs.file.bs.opaque.read_zeroes is True


@pytest.mark.parametrize("options", [
    {"driver": "raw", "file": {"driver": "null-co", "size": 8192, "read-zeroes": True}},
    {"driver": "raw", "file.driver": "null-co", "file.size": "8k", "file.read-zeroes": "on"},
    {"driver": "raw", "file": {"driver": "null-co"}, "file.size": 8192, "file.read-zeroes": "on"},
    'json:{"driver": "raw", "file": {"driver": "null-co", "size": 8192, "read-zeroes": true}}',
    "driver=raw,file.driver=null-co,file.size=8k,file.read-zeroes=on",
], ids=["nested", "dotted", "mixed", "json-options", "keyval"])
def test_open_options_forms(options):
    """Nested dicts, dotted keys, a json: string and a key=value string all open the same raw-over-null graph."""
    bs = bdrv_open(None, None, options, BDRV_O_RDWR)
    _check_raw_over_null(bs, 8192)
    file_bs = bs.file.bs
    bdrv_unref(bs)
    assert file_bs not in graph.all_bdrv_states


def test_open_json_filename():
    """A json:{...} filename carries the options; explicit options win over the filename's."""
    bs = bdrv_open('json:{"driver": "raw", "file": {"driver": "null-co", "size": 4096, "read-zeroes": true}}',
                   None, {"file.size": 8192}, BDRV_O_RDWR)
    _check_raw_over_null(bs, 8192)
    bdrv_unref(bs)


def test_open_protocol_filename():
    """A "null-co://" filename picks the protocol; the format over it is probed (raw)."""
    bs = bdrv_open("null-co://", None, {"file.read-zeroes": "on", "driver": "raw"}, BDRV_O_RDWR)
    _check_raw_over_null(bs, 1 << 30)
    bdrv_unref(bs)


def test_keyval_comma_escape(tmp_path):
    """In a key=value string ",," is a literal comma: a file name with a comma opens that file."""
    path = tmp_path / "a,b.img"
    path.write_bytes(bytes(4096))
    escaped = str(path).replace(",", ",,")
    bs = bdrv_open(None, None, f"driver=raw,file.driver=file,file.filename={escaped}", BDRV_O_RDWR)
    assert bs.file.bs.filename == str(path)
    assert bdrv_getlength(bs) == 4096
    bdrv_unref(bs)
    assert open_fails("driver=null-co,node-name=a,,b") == "Invalid node-name: 'a,b'"


# --------------------------------------------------------------------------
# Error messages (qemu-io 7.2's)


@pytest.mark.parametrize("options,message", [
    ("driver=foo", "Unknown driver 'foo'"),
    ("driver=null-co,foo=1", "Block protocol 'null-co' doesn't support the option 'foo'"),
    ("driver=raw,foo=1,file.driver=null-co", "Block format 'raw' does not support the option 'foo'"),
    ("driver=raw,file.driver=null-co,file.foo=1", "Block protocol 'null-co' doesn't support the option 'foo'"),
    ("driver=null-co,filename=null-co://", "Block protocol 'null-co' doesn't support the option 'filename'"),
    ("driver=raw", 'A block device must be specified for "file"'),
    ("driver=null-co,latency-ns=abc", "Parameter 'latency-ns' expects a number"),
    ("driver=null-co,size=abc", "Parameter 'size' expects a non-negative number below 2^64"),
    ("driver=null-co,size=-1", "Parameter 'size' expects a non-negative number below 2^64"),
    ("driver=null-co,latency-ns=1e3", "Parameter 'latency-ns' expects a number"),
    ("driver=null-co,latency-ns=18446744073709551616",
     "Value '18446744073709551616' is too large for parameter 'latency-ns'"),
    ("driver=null-co,size=16E", "Value '16E' is out of range for parameter 'size'"),
    ("driver=null-co,size=18446744073709551616", "Value '18446744073709551616' is out of range for parameter 'size'"),
    ("driver=null-co,read-zeroes=maybe", "Parameter 'read-zeroes' expects 'on' or 'off'"),
    ("driver=null-co,read-only=maybe", "Parameter 'read-only' expects 'on' or 'off'"),
    ("driver=null-co,cache.direct=maybe", "Parameter 'cache.direct' expects 'on' or 'off'"),
    ("driver=null-co,node-name=1abc", "Invalid node-name: '1abc'"),
    ("driver=null-co,node-name=", "Invalid node-name: ''"),
    ("driver=null-co,node-name=" + "a" * 32, "Node name too long"),
    ("driver=raw,file.driver=null-co,file.node-name=x,node-name=x", "Duplicate nodes with node-name='x'"),
    ("read-only=on", "Must specify either driver or file"),
    ("driver=null-co,latency-ns=-1", "latency-ns is invalid"),
    ("driver=null-co,detect-zeroes=bogus", "invalid parameter value: bogus"),
    ("driver=null-co,discard=bogus", "Invalid discard option"),
    ("driver=null-co,detect-zeroes=unmap,discard=ignore",
     "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"),
    ("driver=raw,file=nonexist", "Cannot find device='nonexist' nor node-name='nonexist'"),
    ("driver=raw,file.driver=null-co,file.size=4k,offset=8k",
     "Offset (8192) cannot be greater than size of the containing file (4096)"),
    ("driver=raw,file.driver=null-co,size=1000", "Specified size is not multiple of 512"),
    ('json:{"driver": "null-co", "foo": 1}', "Block protocol 'null-co' doesn't support the option 'foo'"),
    ('json:{"driver": "null-co", "read-zeroes": 1}', "Parameter 'read-zeroes' expects 'on' or 'off'"),
    ('json:{"driver": "null-co", "size": -1}', "Parameter 'size' expects a non-negative number below 2^64"),
    ('json:{"driver": "raw", "file": {"driver": "null-co", "node-name": "1x"}}', "Invalid node-name: '1x'"),
    ("json:[1]", "Invalid JSON object given"),
])
def test_open_error_messages(options, message):
    """A bad option fails with qemu-io's message and leaves no node behind."""
    assert open_fails(options) == message


def test_open_error_bad_json():
    """Malformed JSON fails with QEMU's prefix (the parser's own detail differs from QEMU's)."""
    assert open_fails('json:{"driver": "null-co"').startswith("Could not parse the JSON options: ")


def test_open_error_null_filename():
    """null-co accepts only "null-co://" as its filename."""
    msg = "The only allowed filename for this driver is 'null-co://'"
    assert open_fails(None, filename="null-co://x") == msg
    assert open_fails({"driver": "null-co"}, BDRV_O_RDWR | BDRV_O_PROTOCOL, "null-co://x") == msg


def test_open_error_unknown_protocol():
    """A filename with an unknown "proto:" prefix names the protocol."""
    assert open_fails(None, filename="nosuch://x") == "Unknown protocol 'nosuch'"


def test_failed_open_drops_opened_children():
    """When the format fails after its file child opened, the child is deleted too (its name is free again)."""
    assert open_fails("driver=raw,foo=1,file.driver=null-co,file.node-name=f,node-name=r") == \
        "Block format 'raw' does not support the option 'foo'"
    assert bdrv_find_node("f") is None and bdrv_find_node("r") is None
    bs = bdrv_open(None, None, "driver=raw,file.driver=null-co,file.node-name=f,node-name=r", BDRV_O_RDWR)
    assert bdrv_find_node("f") is bs.file.bs
    bdrv_unref(bs)


# --------------------------------------------------------------------------
# References, read-only, runtime options


def test_open_file_by_reference():
    """"file": "<node-name>" uses an existing node (one more reference), which outlives the format node."""
    proto = bdrv_open(None, None, {"driver": "null-co", "node-name": "proto", "size": 4096},
                      BDRV_O_RDWR | BDRV_O_PROTOCOL)
    assert proto.refcnt == 1
    bs = bdrv_open(None, None, {"driver": "raw", "file": "proto"}, BDRV_O_RDWR)
    assert bs.file.bs is proto and proto.refcnt == 2
    assert bdrv_getlength(bs) == 4096
    bdrv_unref(bs)
    assert proto.refcnt == 1 and bdrv_find_node("proto") is proto
    bdrv_unref(proto)


def test_open_reference_with_options_fails():
    """A reference cannot be combined with options for the referenced node or a filename."""
    proto = bdrv_open(None, None, {"driver": "null-co", "node-name": "proto"}, BDRV_O_RDWR | BDRV_O_PROTOCOL)
    msg = "Cannot reference an existing block device with additional options or a new filename"
    with pytest.raises(Error, match=f"^{msg}$"):
        bdrv_open(None, "proto", {"driver": "null-co"}, 0)
    assert open_fails({"driver": "raw", "file": "proto", "file.size": 4096}) == msg
    assert open_fails({"driver": "raw", "file": "proto"}, filename="null-co://") == msg
    assert proto.refcnt == 1 and proto.parents == []
    bs = bdrv_open(None, "proto", None, 0)  # a plain reference: the node itself, one more reference
    assert bs is proto and proto.refcnt == 2
    bdrv_unref(bs)
    bdrv_unref(proto)


@pytest.mark.parametrize("flags,options,read_only", [
    (BDRV_O_RDWR, {}, False),
    (0, {}, True),
    (BDRV_O_RDWR, {"read-only": "on"}, True),
    (0, {"read-only": "off"}, False),
])
def test_read_only_inherited_by_file_child(flags, options, read_only):
    """The file child opened for a format is read-only exactly when the format node is."""
    bs = bdrv_open(None, None, {"driver": "raw", "file": {"driver": "null-co"}, **options}, flags)
    assert bs.read_only is read_only
    assert bs.file.bs.read_only is read_only
    bdrv_unref(bs)


def test_child_read_only_option_wins():
    """An explicit read-only for the child overrides what it would inherit."""
    bs = bdrv_open(None, None, {"driver": "raw", "read-only": "on",
                                "file": {"driver": "null-co", "read-only": "off"}}, 0)
    assert bs.read_only and not bs.file.bs.read_only
    bdrv_unref(bs)


def test_common_runtime_options():
    """cache.*, discard and detect-zeroes set the node's flags and mode; the file child inherits the cache mode."""
    bs = bdrv_open(None, None, {"driver": "raw", "cache.direct": "on", "cache.no-flush": "on", "discard": "unmap",
                                "detect-zeroes": "unmap", "file": {"driver": "null-co"}}, BDRV_O_RDWR)
    assert bs.open_flags & BDRV_O_NOCACHE and bs.open_flags & BDRV_O_NO_FLUSH and bs.open_flags & BDRV_O_UNMAP
    assert bs.detect_zeroes is BlockdevDetectZeroesOptions.BLOCKDEV_DETECT_ZEROES_OPTIONS_UNMAP
    assert bs.file.bs.open_flags & BDRV_O_NOCACHE and bs.file.bs.open_flags & BDRV_O_NO_FLUSH
    bdrv_unref(bs)


# --------------------------------------------------------------------------
# The entry-point group qblock.drivers


EP_MODULE = "qblock_test_ep_drivers"


@pytest.fixture
def ep_dist(tmp_path, monkeypatch):
    """A temporary installed distribution (a .dist-info on sys.path) whose entry points name test drivers."""
    (tmp_path / f"{EP_MODULE}.py").write_text(textwrap.dedent('''
        from qblock.block.driver import BlockDriver, bdrv_register

        class EpClassDriver(BlockDriver):
            """A protocol with nothing but a length."""
            format_name = "ep-class"
            protocol_name = "ep-class"
            def bdrv_parse_filename(self, filename, options):
                pass  # any "ep-class:..." name will do
            def bdrv_file_open(self, bs, options, flags):
                return 0
            def bdrv_getlength(self, bs):
                return 65536

        class EpModuleDriver(EpClassDriver):
            format_name = "ep-module"
            protocol_name = "ep-module"

        bdrv_register(EpModuleDriver)   # importing the module registers it
    '''))
    info = tmp_path / "qblock_test_ep_drivers-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qblock-test-ep-drivers\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[qblock.drivers]\n"
        f"ep-class = {EP_MODULE}:EpClassDriver\n"
        f"ep-module = {EP_MODULE}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield
    for name in ("ep-class", "ep-module"):
        drv = bdrv_find_format(name)
        if drv is not None:
            bdrv_unregister(drv)
    sys.modules.pop(EP_MODULE, None)


def test_entry_point_drivers(ep_dist):
    """A package's entry points in group qblock.drivers register a BlockDriver class, or a module that registers one."""
    assert {ep.name for ep in importlib.metadata.entry_points(group="qblock.drivers")} >= {"ep-class", "ep-module"}
    _driver._load_entry_points()
    for name in ("ep-class", "ep-module"):
        drv = bdrv_find_format(name)
        assert isinstance(drv, BlockDriver) and drv.format_name == name
        bs = bdrv_open(None, None, {"driver": name}, BDRV_O_RDWR)
        assert bs.drv is drv and bdrv_getlength(bs) == 65536
        bdrv_unref(bs)
        bs = bdrv_open(f"{name}:whatever", None, {"driver": "raw"}, BDRV_O_RDWR)  # found as a protocol too
        assert bs.file.bs.drv is drv
        bdrv_unref(bs)


def test_a_broken_driver_module_does_not_hide_the_others(ep_dist, tmp_path, capsys):
    """A driver package that fails to import is reported once on stderr; the drivers after it still load."""
    info = tmp_path / "qblock_test_ep_drivers-1.0.dist-info"
    (info / "entry_points.txt").write_text(
        "[qblock.drivers]\n"
        "aa-broken = qblock_no_such_module_here\n"
        f"ep-class = {EP_MODULE}:EpClassDriver\n")
    importlib.invalidate_caches()
    _driver._load_entry_points()
    assert "qblock: could not load block driver aa-broken (qblock_no_such_module_here): ModuleNotFoundError" \
        in capsys.readouterr().err
    assert bdrv_find_format("ep-class").format_name == "ep-class"
    assert bdrv_find_format("raw").format_name == "raw"


def test_registry_finds_builtin_drivers():
    """bdrv_find_format knows the built-in drivers by name, and nothing by an unknown name."""
    for name in ("null-co", "null-aio", "raw", "file"):
        assert bdrv_find_format(name).format_name == name
    assert bdrv_find_format("no-such-driver") is None
    assert [d.format_name for d in _driver.bdrv_drivers()] == sorted(d.format_name for d in _driver.bdrv_drivers())


def test_node_ref_keeps_open_node():
    """A node opened by bdrv_open lives until its last reference is dropped."""
    bs = bdrv_open(None, None, {"driver": "null-co", "node-name": "n"}, BDRV_O_PROTOCOL)
    bdrv_ref(bs)
    bdrv_unref(bs)
    assert bdrv_find_node("n") is bs
    bdrv_unref(bs)
    assert bdrv_find_node("n") is None


# --------------------------------------------------------------------------
# Option values and the option helpers (util/qemu-option.c, util/keyval.c, qobject/block-qdict.c)


def test_option_value_forms():
    """Hex numbers, fractional sizes with suffixes, repeated keys (last wins) and short-form booleans are accepted."""
    bs = bdrv_open(None, None, "driver=null-co,size=1k,size=1.5k,latency-ns=0x10,read-zeroes", BDRV_O_RDWR)
    assert (bdrv_getlength(bs), bs.opaque.latency_ns, bs.opaque.read_zeroes) == (1536, 16, True)
    bdrv_unref(bs)
    bs = bdrv_open(None, None, {"driver": "null-co", "size": "0x1000", "latency-ns": -1 & 0xFF}, BDRV_O_RDWR)
    assert (bdrv_getlength(bs), bs.opaque.latency_ns) == (4096, 255)
    bdrv_unref(bs)


def test_keyval_parse():
    """key=value pairs, ",," as a comma, "key" alone as key=on, and an implied first key."""
    assert keyval_parse("a=1,b=x,,y,c") == {"a": "1", "b": "x,y", "c": "on"}
    assert keyval_parse("file.driver=null-co,file.size=1k,") == {"file.driver": "null-co", "file.size": "1k"}
    assert keyval_parse("qcow2,file=x", implied_key="driver") == {"driver": "qcow2", "file": "x"}
    assert keyval_parse("a=b=c") == {"a": "b=c"}
    assert keyval_parse("") == {}


def test_qdict_flatten_and_crumple():
    """Nested dicts flatten to dotted keys (lists to .0, .1) and dotted keys crumple back."""
    nested = {"driver": "raw", "file": {"driver": "null-co", "size": 4096}}
    flat = qdict_flatten(nested)
    assert flat == {"driver": "raw", "file.driver": "null-co", "file.size": 4096}
    assert qdict_crumple(flat) == nested
    assert qdict_flatten({"a": [1, {"b": 2}]}) == {"a.0": 1, "a.1.b": 2}
    sub = qdict_extract_subqdict(flat, "file.")
    assert sub == {"driver": "null-co", "size": 4096} and flat == {"driver": "raw"}
    with pytest.raises(Error, match="^Cannot mix scalar and non-scalar keys"):
        qdict_crumple({"file": "x", "file.driver": "null-co"})


def test_force_share_needs_read_only_and_shares_everything():
    """force-share=on is refused on a read-write node; on a read-only one, writers elsewhere are accepted."""
    with pytest.raises(Error, match="force-share=on can only be used with read-only images"):
        bdrv_open(None, None, {"driver": "null-co", "force-share": "on"}, BDRV_O_RDWR)
    bs = bdrv_open(None, None, {"driver": "raw", "force-share": "on", "read-only": "on",
                                "file": {"driver": "null-co", "node-name": "fs-file"}}, 0)
    assert bs.force_share and bs.file.bs.force_share
    assert bs.file.shared_perm == BLK_PERM_ALL
    bdrv_unref(bs)
