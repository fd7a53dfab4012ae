"""The QAPI schema of qblock's QMP commands: the part of QEMU 7.2's qapi/*.json they use.

Declarations read like the .json files: ``struct("BlockdevCacheOptions",
{"*direct": "bool", "*no-flush": "bool"})`` — a ``*`` marks an optional
member, ``["T"]`` a list of T; builtin types are QAPI's (``str``, ``int``,
``int8`` ... ``uint64``, ``size``, ``bool``, ``number``, ``any``, ``null``).
Flat unions name their base and discriminator; alternates map a JSON type to
a branch.  :mod:`qblock.qmp.qapi_visit` checks command arguments against
these types with QEMU's messages, and ``query-commands`` lists the commands.

Which file each part comes from: control.json (qmp_capabilities,
query-version, query-commands, quit), block-core.json (BlockdevOptions and
the query/throttle/threshold/histogram commands), block-export.json (NBD
server and exports), sockets.json (SocketAddress, SocketAddressLegacy),
qom.json (object-add/object-del).

Left out: the BlockdevOptions branches of drivers qblock does not have (their
``driver`` values are still accepted, and opening them fails: "Unknown
driver"), every ObjectOptions branch but ``iothread`` and
``throttle-group``, and QAPI features/``if`` conditions.  qblock extension:
``driver`` also accepts the names of qblock's own registered drivers that
QEMU does not have (``log``); their options are passed through unchecked.
"""
from __future__ import annotations

from typing import Any

import attrs

__all__ = ["SCHEMA", "COMMANDS", "QAPIEnum", "QAPIStruct", "QAPIUnion", "QAPIAlternate", "QAPICommand",
           "QAPIMember", "BUILTIN_TYPES", "BLOCKDEV_DRIVERS"]

BUILTIN_TYPES = {"str", "int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                 "size", "bool", "number", "any", "null"}


@attrs.define(frozen=True)
class QAPIMember:
    name: str
    type: Any            # a type name, or a one-element list [type name] for a list
    optional: bool = False


@attrs.define(frozen=True)
class QAPIEnum:
    name: str
    values: tuple[str, ...]


@attrs.define(frozen=True)
class QAPIStruct:
    name: str
    members: tuple[QAPIMember, ...]
    base: str | None = None


@attrs.define(frozen=True)
class QAPIUnion:
    """A flat union: the base's members, then the members of the branch the discriminator picks."""

    name: str
    base: str
    discriminator: str
    variants: dict[str, str]


@attrs.define(frozen=True)
class QAPIAlternate:
    """One of several types, chosen by the JSON type of the value (``object``, ``string``, ``null`` ...)."""

    name: str
    branches: dict[str, str]


@attrs.define(frozen=True)
class QAPICommand:
    name: str
    data: str | None = None          # the argument type (a struct or, boxed, a union)
    returns: Any = None
    boxed: bool = False
    allow_oob: bool = False
    coroutine: bool = False


SCHEMA: dict[str, Any] = {}
COMMANDS: dict[str, QAPICommand] = {}
_anon = iter(range(1, 1 << 30))


def _members(data: dict[str, Any]) -> tuple[QAPIMember, ...]:
    return tuple(QAPIMember(k.lstrip("*"), v, k.startswith("*")) for k, v in data.items())


def enum(name: str, values: list[str]) -> None:
    SCHEMA[name] = QAPIEnum(name, tuple(values))


def struct(name: str, data: dict[str, Any], base: str | None = None) -> None:
    SCHEMA[name] = QAPIStruct(name, _members(data), base)


def union(name: str, base: str | dict[str, Any], discriminator: str, data: dict[str, str]) -> None:
    if isinstance(base, dict):
        base_name = f"q_obj_{name}-base"
        struct(base_name, base)
        base = base_name
    SCHEMA[name] = QAPIUnion(name, base, discriminator, dict(data))


def alternate(name: str, data: dict[str, str]) -> None:
    SCHEMA[name] = QAPIAlternate(name, dict(data))


def command(name: str, data: dict[str, Any] | str | None = None, returns: Any = None, boxed: bool = False,
            allow_oob: bool = False, coroutine: bool = False) -> None:
    if isinstance(data, dict):
        arg_name = f"q_obj_{name}-arg"
        struct(arg_name, data)
        data = arg_name
    COMMANDS[name] = QAPICommand(name, data, returns, boxed, allow_oob, coroutine)


# ---------------------------------------------------------------------------
# control.json

enum("QMPCapability", ["oob"])
command("qmp_capabilities", {"*enable": ["QMPCapability"]}, allow_oob=True)
struct("VersionTriple", {"major": "int", "minor": "int", "micro": "int"})
struct("VersionInfo", {"qemu": "VersionTriple", "package": "str"})
command("query-version", returns="VersionInfo", allow_oob=True)
struct("CommandInfo", {"name": "str"})
command("query-commands", returns=["CommandInfo"], allow_oob=True)
command("quit")

# ---------------------------------------------------------------------------
# block-core.json: BlockdevOptions

# QEMU 7.2's BlockdevDriver, in the schema's order.
BLOCKDEV_DRIVERS = [
    "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress", "copy-before-write",
    "copy-on-read", "dmg", "file", "snapshot-access", "ftp", "ftps", "gluster", "host_cdrom", "host_device",
    "http", "https", "iscsi", "luks", "nbd", "nfs", "null-aio", "null-co", "nvme", "parallels", "preallocate",
    "qcow", "qcow2", "qed", "quorum", "raw", "rbd", "replication", "ssh", "throttle", "vdi", "vhdx", "vmdk",
    "vpc", "vvfat",
]
enum("BlockdevDriver", BLOCKDEV_DRIVERS)
enum("BlockdevDiscardOptions", ["ignore", "unmap"])
enum("BlockdevDetectZeroesOptions", ["off", "on", "unmap"])
enum("OnOffAuto", ["auto", "on", "off"])
enum("BlockdevAioOptions", ["threads", "native", "io_uring"])
enum("BlockPermission", ["consistent-read", "write", "write-unchanged", "resize"])
struct("BlockdevCacheOptions", {"*direct": "bool", "*no-flush": "bool"})
alternate("BlockdevRef", {"object": "BlockdevOptions", "string": "str"})
alternate("BlockdevRefOrNull", {"object": "BlockdevOptions", "string": "str", "null": "null"})
struct("BlockdevOptionsBase", {
    "driver": "BlockdevDriver", "*node-name": "str", "*discard": "BlockdevDiscardOptions",
    "*cache": "BlockdevCacheOptions", "*read-only": "bool", "*auto-read-only": "bool",
    "*force-share": "bool", "*detect-zeroes": "BlockdevDetectZeroesOptions"})
struct("BlockdevOptionsFile", {
    "filename": "str", "*pr-manager": "str", "*locking": "OnOffAuto", "*aio": "BlockdevAioOptions",
    "*aio-max-batch": "int", "*drop-cache": "bool", "*x-check-cache-dropped": "bool"})
struct("BlockdevOptionsNull", {"*size": "int", "*latency-ns": "uint64", "*read-zeroes": "bool"})
struct("BlockdevOptionsGenericFormat", {"file": "BlockdevRef"})
struct("BlockdevOptionsGenericCOWFormat", {"*backing": "BlockdevRefOrNull"}, base="BlockdevOptionsGenericFormat")
struct("BlockdevOptionsRaw", {"*offset": "int", "*size": "int"}, base="BlockdevOptionsGenericFormat")
enum("Qcow2OverlapCheckMode", ["none", "constant", "cached", "all"])
struct("Qcow2OverlapCheckFlags", {
    "*template": "Qcow2OverlapCheckMode", "*main-header": "bool", "*active-l1": "bool", "*active-l2": "bool",
    "*refcount-table": "bool", "*refcount-block": "bool", "*snapshot-table": "bool", "*inactive-l1": "bool",
    "*inactive-l2": "bool", "*bitmap-directory": "bool"})
alternate("Qcow2OverlapChecks", {"object": "Qcow2OverlapCheckFlags", "string": "Qcow2OverlapCheckMode"})
enum("BlockdevQcow2EncryptionFormat", ["aes", "luks"])
struct("QCryptoBlockOptionsQCow", {"*key-secret": "str"})
struct("QCryptoBlockOptionsLUKS", {"*key-secret": "str"})
union("BlockdevQcow2Encryption", {"format": "BlockdevQcow2EncryptionFormat"}, "format",
      {"aes": "QCryptoBlockOptionsQCow", "luks": "QCryptoBlockOptionsLUKS"})
struct("BlockdevOptionsQcow2", {
    "*lazy-refcounts": "bool", "*pass-discard-request": "bool", "*pass-discard-snapshot": "bool",
    "*pass-discard-other": "bool", "*overlap-check": "Qcow2OverlapChecks", "*cache-size": "int",
    "*l2-cache-size": "int", "*l2-cache-entry-size": "int", "*refcount-cache-size": "int",
    "*cache-clean-interval": "int", "*encrypt": "BlockdevQcow2Encryption", "*data-file": "BlockdevRef"},
    base="BlockdevOptionsGenericCOWFormat")
enum("BlkdebugEvent", [
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table", "l2_load",
    "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write", "read_aio",
    "read_backing_aio", "read_compressed", "write_aio", "write_compressed", "vmstate_load", "vmstate_save",
    "cow_read", "cow_write", "reftable_load", "reftable_grow", "reftable_update", "refblock_load",
    "refblock_update", "refblock_update_part", "refblock_alloc", "refblock_alloc_hookup",
    "refblock_alloc_write", "refblock_alloc_write_blocks", "refblock_alloc_write_table",
    "refblock_alloc_switch_table", "cluster_alloc", "cluster_alloc_bytes", "cluster_free", "flush_to_os",
    "flush_to_disk", "pwritev_rmw_head", "pwritev_rmw_after_head", "pwritev_rmw_tail",
    "pwritev_rmw_after_tail", "pwritev", "pwritev_zero", "pwritev_done", "empty_image_prepare",
    "l1_shrink_write_table", "l1_shrink_free_l2_clusters", "cor_write", "cluster_alloc_space", "none"])
enum("BlkdebugIOType", ["read", "write", "write-zeroes", "discard", "flush", "block-status"])
struct("BlkdebugInjectErrorOptions", {
    "event": "BlkdebugEvent", "*state": "int", "*iotype": "BlkdebugIOType", "*errno": "int",
    "*sector": "int", "*once": "bool", "*immediately": "bool"})
struct("BlkdebugSetStateOptions", {"event": "BlkdebugEvent", "*state": "int", "new_state": "int"})
struct("BlockdevOptionsBlkdebug", {
    "image": "BlockdevRef", "*config": "str", "*align": "int", "*max-transfer": "int32",
    "*opt-write-zero": "int32", "*max-write-zero": "int32", "*opt-discard": "int32", "*max-discard": "int32",
    "*inject-error": ["BlkdebugInjectErrorOptions"], "*set-state": ["BlkdebugSetStateOptions"],
    "*take-child-perms": ["BlockPermission"], "*unshare-child-perms": ["BlockPermission"]})
struct("BlockdevOptionsBlkverify", {"test": "BlockdevRef", "raw": "BlockdevRef"})
struct("BlockdevOptionsThrottle", {"throttle-group": "str", "file": "BlockdevRef"})
struct("BlockdevOptionsCor", {"*bottom": "str"}, base="BlockdevOptionsGenericFormat")
struct("BlockDirtyBitmap", {"node": "str", "name": "str"})
enum("OnCbwError", ["break-guest-write", "break-snapshot"])
struct("BlockdevOptionsCbw", {"target": "BlockdevRef", "*bitmap": "BlockDirtyBitmap",
                              "*on-cbw-error": "OnCbwError", "*cbw-timeout": "uint32"},
       base="BlockdevOptionsGenericFormat")
union("BlockdevOptions", "BlockdevOptionsBase", "driver", {
    "blkdebug": "BlockdevOptionsBlkdebug",
    "blkverify": "BlockdevOptionsBlkverify",
    "copy-before-write": "BlockdevOptionsCbw",
    "copy-on-read": "BlockdevOptionsCor",
    "file": "BlockdevOptionsFile",
    "host_device": "BlockdevOptionsFile",
    "host_cdrom": "BlockdevOptionsFile",
    "null-aio": "BlockdevOptionsNull",
    "null-co": "BlockdevOptionsNull",
    "qcow2": "BlockdevOptionsQcow2",
    "raw": "BlockdevOptionsRaw",
    "throttle": "BlockdevOptionsThrottle",
})
command("blockdev-add", "BlockdevOptions", boxed=True)
command("blockdev-del", {"node-name": "str"})

# Queries (block-core.json)
struct("BlockdevCacheInfo", {"writeback": "bool", "direct": "bool", "no-flush": "bool"})
struct("ImageInfo", {
    "filename": "str", "format": "str", "*dirty-flag": "bool", "*actual-size": "int", "virtual-size": "int",
    "*cluster-size": "int", "*encrypted": "bool", "*compressed": "bool", "*backing-filename": "str",
    "*full-backing-filename": "str", "*backing-filename-format": "str", "*snapshots": ["any"],
    "*backing-image": "ImageInfo", "*format-specific": "any"})
struct("BlockDeviceInfo", {
    "file": "str", "*node-name": "str", "ro": "bool", "drv": "str", "*backing_file": "str",
    "backing_file_depth": "int", "encrypted": "bool", "detect_zeroes": "BlockdevDetectZeroesOptions",
    "bps": "int", "bps_rd": "int", "bps_wr": "int", "iops": "int", "iops_rd": "int", "iops_wr": "int",
    "image": "ImageInfo", "*bps_max": "int", "*bps_rd_max": "int", "*bps_wr_max": "int", "*iops_max": "int",
    "*iops_rd_max": "int", "*iops_wr_max": "int", "*bps_max_length": "int", "*bps_rd_max_length": "int",
    "*bps_wr_max_length": "int", "*iops_max_length": "int", "*iops_rd_max_length": "int",
    "*iops_wr_max_length": "int", "*iops_size": "int", "*group": "str", "cache": "BlockdevCacheInfo",
    "write_threshold": "int", "*dirty-bitmaps": ["any"]})
enum("BlockDeviceIoStatus", ["ok", "failed", "nospace"])
struct("BlockInfo", {
    "device": "str", "*qdev": "str", "type": "str", "removable": "bool", "locked": "bool",
    "*inserted": "BlockDeviceInfo", "*tray_open": "bool", "*io-status": "BlockDeviceIoStatus"})
command("query-block", returns=["BlockInfo"], allow_oob=False)
command("query-named-block-nodes", {"*flat": "bool"}, returns=["BlockDeviceInfo"])
struct("BlockLatencyHistogramInfo", {"boundaries": ["uint64"], "bins": ["uint64"]})
struct("BlockDeviceStats", {
    "rd_bytes": "int", "wr_bytes": "int", "unmap_bytes": "int", "rd_operations": "int",
    "wr_operations": "int", "flush_operations": "int", "unmap_operations": "int", "rd_total_time_ns": "int",
    "wr_total_time_ns": "int", "flush_total_time_ns": "int", "unmap_total_time_ns": "int",
    "wr_highest_offset": "int", "rd_merged": "int", "wr_merged": "int", "unmap_merged": "int",
    "*idle_time_ns": "int", "failed_rd_operations": "int", "failed_wr_operations": "int",
    "failed_flush_operations": "int", "failed_unmap_operations": "int", "invalid_rd_operations": "int",
    "invalid_wr_operations": "int", "invalid_flush_operations": "int", "invalid_unmap_operations": "int",
    "account_invalid": "bool", "account_failed": "bool", "timed_stats": ["any"],
    "*rd_latency_histogram": "BlockLatencyHistogramInfo", "*wr_latency_histogram": "BlockLatencyHistogramInfo",
    "*flush_latency_histogram": "BlockLatencyHistogramInfo"})
struct("BlockStats", {
    "*device": "str", "*qdev": "str", "*node-name": "str", "stats": "BlockDeviceStats",
    "*driver-specific": "any", "*parent": "BlockStats", "*backing": "BlockStats"})
command("query-blockstats", {"*query-nodes": "bool"}, returns=["BlockStats"])

struct("BlockIOThrottle", {
    "*device": "str", "*id": "str", "bps": "int", "bps_rd": "int", "bps_wr": "int", "iops": "int",
    "iops_rd": "int", "iops_wr": "int", "*bps_max": "int", "*bps_rd_max": "int", "*bps_wr_max": "int",
    "*iops_max": "int", "*iops_rd_max": "int", "*iops_wr_max": "int", "*bps_max_length": "int",
    "*bps_rd_max_length": "int", "*bps_wr_max_length": "int", "*iops_max_length": "int",
    "*iops_rd_max_length": "int", "*iops_wr_max_length": "int", "*iops_size": "int", "*group": "str"})
command("block_set_io_throttle", "BlockIOThrottle", boxed=True)
command("block-set-write-threshold", {"node-name": "str", "write-threshold": "uint64"})
command("block-latency-histogram-set", {
    "id": "str", "*boundaries": ["uint64"], "*boundaries-read": ["uint64"], "*boundaries-write": ["uint64"],
    "*boundaries-flush": ["uint64"]})

enum("XDbgBlockGraphNodeType", ["block-backend", "block-job", "block-driver"])
struct("XDbgBlockGraphNode", {"id": "uint64", "type": "XDbgBlockGraphNodeType", "name": "str"})
struct("XDbgBlockGraphEdge", {"parent": "uint64", "child": "uint64", "name": "str",
                              "perm": ["BlockPermission"], "shared-perm": ["BlockPermission"]})
struct("XDbgBlockGraph", {"nodes": ["XDbgBlockGraphNode"], "edges": ["XDbgBlockGraphEdge"]})
command("x-debug-query-block-graph", returns="XDbgBlockGraph")

# ---------------------------------------------------------------------------
# sockets.json

enum("SocketAddressType", ["inet", "unix", "vsock", "fd"])
struct("InetSocketAddressBase", {"host": "str", "port": "str"})
struct("InetSocketAddress", {"*numeric": "bool", "*to": "uint16", "*ipv4": "bool", "*ipv6": "bool",
                             "*keep-alive": "bool", "*mptcp": "bool"}, base="InetSocketAddressBase")
struct("UnixSocketAddress", {"path": "str", "*abstract": "bool", "*tight": "bool"})
struct("VsockSocketAddress", {"cid": "str", "port": "str"})
struct("String", {"str": "str"})
struct("InetSocketAddressWrapper", {"data": "InetSocketAddress"})
struct("UnixSocketAddressWrapper", {"data": "UnixSocketAddress"})
struct("VsockSocketAddressWrapper", {"data": "VsockSocketAddress"})
struct("StringWrapper", {"data": "String"})
union("SocketAddressLegacy", {"type": "SocketAddressType"}, "type", {
    "inet": "InetSocketAddressWrapper", "unix": "UnixSocketAddressWrapper",
    "vsock": "VsockSocketAddressWrapper", "fd": "StringWrapper"})
union("SocketAddress", {"type": "SocketAddressType"}, "type", {
    "inet": "InetSocketAddress", "unix": "UnixSocketAddress", "vsock": "VsockSocketAddress", "fd": "String"})

# ---------------------------------------------------------------------------
# block-export.json

struct("NbdServerOptions", {"addr": "SocketAddress", "*tls-creds": "str", "*tls-authz": "str",
                            "*max-connections": "uint32"})
command("nbd-server-start", {"addr": "SocketAddressLegacy", "*tls-creds": "str", "*tls-authz": "str",
                             "*max-connections": "uint32"}, allow_oob=False)
command("nbd-server-stop")
enum("BlockExportType", ["nbd", "vhost-user-blk", "fuse", "vduse-blk"])
alternate("BlockDirtyBitmapOrStr", {"string": "str", "object": "BlockDirtyBitmap"})
struct("BlockExportOptionsNbdBase", {"*name": "str", "*description": "str"})
struct("BlockExportOptionsNbd", {"*bitmaps": ["BlockDirtyBitmapOrStr"], "*allocation-depth": "bool"},
       base="BlockExportOptionsNbdBase")
union("BlockExportOptions", {
    "type": "BlockExportType", "id": "str", "*fixed-iothread": "bool", "*iothread": "str",
    "node-name": "str", "*writable": "bool", "*writethrough": "bool"}, "type", {
    "nbd": "BlockExportOptionsNbd"})
command("block-export-add", "BlockExportOptions", boxed=True)
enum("BlockExportRemoveMode", ["safe", "hard"])
command("block-export-del", {"id": "str", "*mode": "BlockExportRemoveMode"})
struct("BlockExportInfo", {"id": "str", "type": "BlockExportType", "node-name": "str",
                           "shutting-down": "bool"})
command("query-block-exports", returns=["BlockExportInfo"])

# ---------------------------------------------------------------------------
# qom.json

# QEMU 7.2's ObjectType, in the schema's order.
OBJECT_TYPES = [
    "authz-list", "authz-listfile", "authz-pam", "authz-simple", "can-bus", "can-host-socketcan",
    "colo-compare", "cryptodev-backend", "cryptodev-backend-builtin", "cryptodev-backend-lkcf",
    "cryptodev-vhost-user", "dbus-vmstate", "filter-buffer", "filter-dump", "filter-mirror",
    "filter-redirector", "filter-replay", "filter-rewriter", "input-barrier", "input-linux", "iothread",
    "main-loop", "memory-backend-epc", "memory-backend-file", "memory-backend-memfd", "memory-backend-ram",
    "pef-guest", "pr-manager-helper", "qtest", "rng-builtin", "rng-egd", "rng-random", "secret",
    "secret_keyring", "sev-guest", "thread-context", "s390-pv-guest", "throttle-group", "tls-creds-anon",
    "tls-creds-psk", "tls-creds-x509", "tls-cipher-suites", "x-remote-object", "x-vfio-user-server",
]
enum("ObjectType", OBJECT_TYPES)
struct("EventLoopBaseProperties", {"*aio-max-batch": "int", "*thread-pool-min": "int",
                                   "*thread-pool-max": "int"})
struct("IothreadProperties", {"*poll-max-ns": "int", "*poll-grow": "int", "*poll-shrink": "int"},
       base="EventLoopBaseProperties")
_LIMIT_NAMES = [f"{unit}-{d}{s}" for unit in ("iops", "bps") for d in ("total", "read", "write")
                for s in ("", "-max", "-max-length")] + ["iops-size"]
struct("ThrottleLimits", {f"*{n}": "int" for n in _LIMIT_NAMES})
struct("ThrottleGroupProperties", {"*limits": "ThrottleLimits", **{f"*x-{n}": "int" for n in _LIMIT_NAMES}})
union("ObjectOptions", {"qom-type": "ObjectType", "id": "str"}, "qom-type", {
    "iothread": "IothreadProperties", "throttle-group": "ThrottleGroupProperties"})
command("object-add", "ObjectOptions", boxed=True)
command("object-del", {"id": "str"})

# ---------------------------------------------------------------------------
# control.json: the --monitor option of qemu-storage-daemon

enum("MonitorMode", ["readline", "control"])
struct("MonitorOptions", {"*id": "str", "*mode": "MonitorMode", "*pretty": "bool", "chardev": "str"})
