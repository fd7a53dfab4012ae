"""The driver interface: QEMU's include/block/block_int.h, include/block/block.h and the driver registry of block.c.

A driver is one subclass of :class:`BlockDriver` with QEMU's field and hook
names.  It implements only the hooks it has; every hook it does not define
stays ``None`` on the class, exactly like a NULL function pointer in QEMU's
``BlockDriver`` table, and block/io.c's twin emulates or fails as QEMU does.
Hooks take ``bs`` first, as QEMU's function pointers do::

    class NullDriver(BlockDriver):
        format_name = "null-co"
        protocol_name = "null-co"
        state_class = BDRVNullState        # bs.opaque, created before bdrv_open
        def bdrv_co_pwritev(self, bs, offset, bytes, qiov, flags) -> int: ...

Registration: built-in drivers register by name when :mod:`qblock.drivers`'
modules are imported (lazily, on the first look-up); drivers from other
packages register through the entry-point group ``qblock.drivers`` (the entry
point names a BlockDriver subclass or a module that calls
:func:`bdrv_register`).
"""
from __future__ import annotations

import enum
import importlib
import pkgutil
import sys
import threading
from typing import Any, Callable, ClassVar

import attrs

from qblock.util.qemu_option import QemuOptsList

__all__ = [
    "BDRV_SECTOR_BITS", "BDRV_SECTOR_SIZE", "BDRV_REQUEST_MAX_SECTORS", "BDRV_REQUEST_MAX_BYTES",
    "BDRV_MAX_ALIGNMENT", "BDRV_MAX_LENGTH", "INT_MAX", "IOV_MAX", "NOT_DONE", "MAX_BOUNCE_BUFFER",
    "BDRV_REQ_COPY_ON_READ", "BDRV_REQ_ZERO_WRITE", "BDRV_REQ_MAY_UNMAP", "BDRV_REQ_NO_SERIALISING",
    "BDRV_REQ_FUA", "BDRV_REQ_WRITE_COMPRESSED", "BDRV_REQ_WRITE_UNCHANGED", "BDRV_REQ_SERIALISING",
    "BDRV_REQ_NO_FALLBACK", "BDRV_REQ_PREFETCH", "BDRV_REQ_MASK",
    "BDRV_O_RDWR", "BDRV_O_RESIZE", "BDRV_O_SNAPSHOT", "BDRV_O_TEMPORARY", "BDRV_O_NOCACHE",
    "BDRV_O_NATIVE_AIO", "BDRV_O_NO_BACKING", "BDRV_O_NO_FLUSH", "BDRV_O_COPY_ON_READ",
    "BDRV_O_INACTIVE", "BDRV_O_CHECK", "BDRV_O_ALLOW_RDWR", "BDRV_O_UNMAP", "BDRV_O_PROTOCOL",
    "BDRV_O_NO_IO", "BDRV_O_AUTO_RDONLY", "BDRV_O_CACHE_MASK",
    "BDRV_BLOCK_DATA", "BDRV_BLOCK_ZERO", "BDRV_BLOCK_OFFSET_VALID", "BDRV_BLOCK_RAW",
    "BDRV_BLOCK_ALLOCATED", "BDRV_BLOCK_EOF",
    "BlkdebugEvent", "BlockLimits", "BlockDriverInfo", "BlockDriver", "PreallocMode",
    "BlockdevDetectZeroesOptions", "BdrvTrackedRequestType",
    "bdrv_register", "bdrv_find_format", "bdrv_find_protocol_driver", "bdrv_drivers",
]

# --------------------------------------------------------------------------
# Sizes and limits

BDRV_SECTOR_BITS = 9
BDRV_SECTOR_SIZE = 1 << BDRV_SECTOR_BITS
INT_MAX = (1 << 31) - 1
IOV_MAX = 1024
BDRV_REQUEST_MAX_SECTORS = min(((1 << 64) - 1) >> BDRV_SECTOR_BITS, INT_MAX >> BDRV_SECTOR_BITS)
BDRV_REQUEST_MAX_BYTES = BDRV_REQUEST_MAX_SECTORS << BDRV_SECTOR_BITS
BDRV_MAX_ALIGNMENT = 1 << 30
BDRV_MAX_LENGTH = ((1 << 63) - 1) // BDRV_MAX_ALIGNMENT * BDRV_MAX_ALIGNMENT
NOT_DONE = 0x7FFFFFFF           # "the coroutine has not finished" in sync and AIO emulation
MAX_BOUNCE_BUFFER = 32768 << BDRV_SECTOR_BITS   # 16 MiB: copy-on-read and write-zeroes bounce limit

# Request flags (BdrvRequestFlags)
BDRV_REQ_COPY_ON_READ = 0x1
BDRV_REQ_ZERO_WRITE = 0x2
BDRV_REQ_MAY_UNMAP = 0x4
BDRV_REQ_NO_SERIALISING = 0x8
BDRV_REQ_FUA = 0x10
BDRV_REQ_WRITE_COMPRESSED = 0x20
BDRV_REQ_WRITE_UNCHANGED = 0x40
BDRV_REQ_SERIALISING = 0x80
BDRV_REQ_NO_FALLBACK = 0x100
BDRV_REQ_PREFETCH = 0x200
BDRV_REQ_MASK = 0x3FF

# Open flags (BDRV_O_*)
BDRV_O_RDWR = 0x0002
BDRV_O_RESIZE = 0x0004
BDRV_O_SNAPSHOT = 0x0008
BDRV_O_TEMPORARY = 0x0010
BDRV_O_NOCACHE = 0x0020
BDRV_O_NATIVE_AIO = 0x0080
BDRV_O_NO_BACKING = 0x0100
BDRV_O_NO_FLUSH = 0x0200
BDRV_O_COPY_ON_READ = 0x0400
BDRV_O_INACTIVE = 0x0800
BDRV_O_CHECK = 0x1000
BDRV_O_ALLOW_RDWR = 0x2000
BDRV_O_UNMAP = 0x4000
BDRV_O_PROTOCOL = 0x8000
BDRV_O_NO_IO = 0x10000
BDRV_O_AUTO_RDONLY = 0x20000
BDRV_O_CACHE_MASK = BDRV_O_NOCACHE | BDRV_O_NO_FLUSH

# Block status (bdrv_co_block_status)
BDRV_BLOCK_DATA = 0x01
BDRV_BLOCK_ZERO = 0x02
BDRV_BLOCK_OFFSET_VALID = 0x04
BDRV_BLOCK_RAW = 0x08
BDRV_BLOCK_ALLOCATED = 0x10
BDRV_BLOCK_EOF = 0x20


class BdrvTrackedRequestType(enum.IntEnum):
    BDRV_TRACKED_READ = 0
    BDRV_TRACKED_WRITE = 1
    BDRV_TRACKED_DISCARD = 2
    BDRV_TRACKED_TRUNCATE = 3


class PreallocMode(enum.Enum):
    PREALLOC_MODE_OFF = "off"
    PREALLOC_MODE_METADATA = "metadata"
    PREALLOC_MODE_FALLOC = "falloc"
    PREALLOC_MODE_FULL = "full"


class BlockdevDetectZeroesOptions(enum.Enum):
    BLOCKDEV_DETECT_ZEROES_OPTIONS_OFF = "off"
    BLOCKDEV_DETECT_ZEROES_OPTIONS_ON = "on"
    BLOCKDEV_DETECT_ZEROES_OPTIONS_UNMAP = "unmap"


class BlkdebugEvent(enum.IntEnum):
    """QEMU's BlkdebugEvent (qapi/block-core.json), in QEMU's order; names are the blkdebug config names."""

    BLKDBG_L1_UPDATE = 0
    BLKDBG_L1_GROW_ALLOC_TABLE = enum.auto()
    BLKDBG_L1_GROW_WRITE_TABLE = enum.auto()
    BLKDBG_L1_GROW_ACTIVATE_TABLE = enum.auto()
    BLKDBG_L2_LOAD = enum.auto()
    BLKDBG_L2_UPDATE = enum.auto()
    BLKDBG_L2_UPDATE_COMPRESSED = enum.auto()
    BLKDBG_L2_ALLOC_COW_READ = enum.auto()
    BLKDBG_L2_ALLOC_WRITE = enum.auto()
    BLKDBG_READ_AIO = enum.auto()
    BLKDBG_READ_BACKING_AIO = enum.auto()
    BLKDBG_READ_COMPRESSED = enum.auto()
    BLKDBG_WRITE_AIO = enum.auto()
    BLKDBG_WRITE_COMPRESSED = enum.auto()
    BLKDBG_VMSTATE_LOAD = enum.auto()
    BLKDBG_VMSTATE_SAVE = enum.auto()
    BLKDBG_COW_READ = enum.auto()
    BLKDBG_COW_WRITE = enum.auto()
    BLKDBG_REFTABLE_LOAD = enum.auto()
    BLKDBG_REFTABLE_GROW = enum.auto()
    BLKDBG_REFTABLE_UPDATE = enum.auto()
    BLKDBG_REFBLOCK_LOAD = enum.auto()
    BLKDBG_REFBLOCK_UPDATE = enum.auto()
    BLKDBG_REFBLOCK_UPDATE_PART = enum.auto()
    BLKDBG_REFBLOCK_ALLOC = enum.auto()
    BLKDBG_REFBLOCK_ALLOC_HOOKUP = enum.auto()
    BLKDBG_REFBLOCK_ALLOC_WRITE = enum.auto()
    BLKDBG_REFBLOCK_ALLOC_WRITE_BLOCKS = enum.auto()
    BLKDBG_REFBLOCK_ALLOC_WRITE_TABLE = enum.auto()
    BLKDBG_REFBLOCK_ALLOC_SWITCH_TABLE = enum.auto()
    BLKDBG_CLUSTER_ALLOC = enum.auto()
    BLKDBG_CLUSTER_ALLOC_BYTES = enum.auto()
    BLKDBG_CLUSTER_FREE = enum.auto()
    BLKDBG_FLUSH_TO_OS = enum.auto()
    BLKDBG_FLUSH_TO_DISK = enum.auto()
    BLKDBG_PWRITEV_RMW_HEAD = enum.auto()
    BLKDBG_PWRITEV_RMW_AFTER_HEAD = enum.auto()
    BLKDBG_PWRITEV_RMW_TAIL = enum.auto()
    BLKDBG_PWRITEV_RMW_AFTER_TAIL = enum.auto()
    BLKDBG_PWRITEV = enum.auto()
    BLKDBG_PWRITEV_ZERO = enum.auto()
    BLKDBG_PWRITEV_DONE = enum.auto()
    BLKDBG_EMPTY_IMAGE_PREPARE = enum.auto()
    BLKDBG_L1_SHRINK_WRITE_TABLE = enum.auto()
    BLKDBG_L1_SHRINK_FREE_L2_CLUSTERS = enum.auto()
    BLKDBG_COR_WRITE = enum.auto()
    BLKDBG_CLUSTER_ALLOC_SPACE = enum.auto()
    BLKDBG_NONE = enum.auto()

    @property
    def config_name(self) -> str:
        """The name blkdebug's config and qemu-io's ``break`` use (``pwritev_rmw_head``)."""
        return self.name[len("BLKDBG_"):].lower()


@attrs.define
class BlockLimits:
    """A node's I/O limits (QEMU's BlockLimits); 0 means "no limit" / "no preference"."""

    request_alignment: int = 0
    max_pdiscard: int = 0
    pdiscard_alignment: int = 0
    max_pwrite_zeroes: int = 0
    pwrite_zeroes_alignment: int = 0
    opt_transfer: int = 0
    max_transfer: int = 0
    min_mem_alignment: int = 0
    opt_mem_alignment: int = 0
    max_iov: int = 0


@attrs.define
class BlockDriverInfo:
    """What bdrv_get_info reports (QEMU's BlockDriverInfo)."""

    cluster_size: int = 0
    vm_state_offset: int = 0
    is_dirty: bool = False
    unallocated_blocks_are_zero: bool = False
    needs_compressed_writes: bool = False


class BlockDriver:
    """Base of every driver: QEMU's BlockDriver function table, with unimplemented hooks left None.

    ``state_class`` is the attrs class whose instance the core stores in
    ``bs.opaque`` before calling ``bdrv_open`` (QEMU's ``instance_size``).
    ``runtime_opts`` declares the options ``bdrv_open`` takes.
    """

    format_name: ClassVar[str] = ""
    protocol_name: ClassVar[str | None] = None
    state_class: ClassVar[type | None] = None
    runtime_opts: ClassVar[QemuOptsList | None] = None
    create_opts: ClassVar[QemuOptsList | None] = None
    is_filter: ClassVar[bool] = False
    is_format: ClassVar[bool] = False             # an image format (raw, qcow2): its children are never probed
    filtered_child_is_backing: ClassVar[bool] = False   # a filter whose filtered child is "backing", not "file"
    supports_backing: ClassVar[bool] = False
    bdrv_needs_filename: ClassVar[bool] = False
    has_variable_length: ClassVar[bool] = False
    # strong_runtime_opts etc. exist in QEMU; qblock does not need them yet.

    # Opening and closing
    bdrv_probe = None                 # (buf, buf_size, filename) -> score
    bdrv_parse_filename = None        # (filename, options) -> None
    bdrv_open = None                  # (bs, options, flags) -> int; raise Error on failure
    bdrv_file_open = None             # protocols may use this name instead, as in QEMU
    bdrv_close = None                 # (bs) -> None
    bdrv_reopen_prepare = None        # (state, queue) -> 0; raise Error to refuse (block/reopen.py)
    bdrv_reopen_commit = None         # (state) -> None: make what prepare staged in state.opaque the node's
    bdrv_reopen_abort = None          # (state) -> None: drop what prepare staged
    bdrv_co_create_opts = None        # (drv, filename, opts) -> int
    bdrv_co_create = None

    # I/O (byte based, coroutine)
    bdrv_co_preadv = None             # (bs, offset, bytes, qiov, flags) -> int
    bdrv_co_preadv_part = None        # (bs, offset, bytes, qiov, qiov_offset, flags) -> int
    bdrv_co_pwritev = None            # (bs, offset, bytes, qiov, flags) -> int
    bdrv_co_pwritev_part = None       # (bs, offset, bytes, qiov, qiov_offset, flags) -> int
    bdrv_co_pwritev_compressed = None
    # I/O (sector based, coroutine: the seed's era)
    bdrv_co_readv = None              # (bs, sector_num, nb_sectors, qiov) -> int
    bdrv_co_writev = None             # (bs, sector_num, nb_sectors, qiov) -> int
    bdrv_co_writev_flags = None       # (bs, sector_num, nb_sectors, qiov, flags) -> int
    # I/O (callback style): return an AIOCB (anything but None) and later call cb(opaque, ret)
    bdrv_aio_preadv = None            # (bs, offset, bytes, qiov, flags, cb, opaque)
    bdrv_aio_pwritev = None           # (bs, offset, bytes, qiov, flags, cb, opaque)
    bdrv_aio_readv = None             # (bs, sector_num, qiov, nb_sectors, cb, opaque)
    bdrv_aio_writev = None            # (bs, sector_num, qiov, nb_sectors, cb, opaque)
    bdrv_aio_flush = None             # (bs, cb, opaque)
    bdrv_aio_pdiscard = None          # (bs, offset, bytes, cb, opaque)

    bdrv_co_flush = None              # (bs) -> int: flushes every layer itself
    bdrv_co_flush_to_os = None        # (bs) -> int
    bdrv_co_flush_to_disk = None      # (bs) -> int
    bdrv_co_pwrite_zeroes = None      # (bs, offset, bytes, flags) -> int
    bdrv_co_pdiscard = None           # (bs, offset, bytes) -> int
    bdrv_co_block_status = None       # (bs, want_zero, offset, bytes) -> (ret, pnum, map, file)
    bdrv_co_truncate = None           # (bs, offset, prealloc) -> int; raise Error for messages
    bdrv_co_check = None
    bdrv_co_copy_range_from = None
    bdrv_co_copy_range_to = None

    # Metadata and limits
    bdrv_getlength = None             # (bs) -> int
    bdrv_is_inserted = None           # (bs) -> bool (removable media; None: inserted when the children are)
    bdrv_get_allocated_file_size = None
    bdrv_get_info = None              # (bs, bdi) -> int
    bdrv_refresh_limits = None        # (bs) -> None; raise Error on failure
    bdrv_refresh_filename = None
    bdrv_child_perm = None            # (bs, c, role, reopen_queue, perm, shared) -> (nperm, nshared)
    bdrv_check_perm = None            # (bs, perm, shared) -> 0; raise Error to refuse the node's new cumulative perms
    bdrv_set_perm = None              # (bs, perm, shared) -> None: commit what bdrv_check_perm accepted
    bdrv_abort_perm_update = None     # (bs) -> None: forget what bdrv_check_perm accepted

    # Events, draining, batching
    bdrv_debug_event = None           # (bs, event)
    bdrv_debug_breakpoint = None
    bdrv_debug_remove_breakpoint = None
    bdrv_debug_resume = None
    bdrv_debug_is_suspended = None
    bdrv_co_drain_begin = None        # (bs) -> None, runs in a coroutine (the seed's era)
    bdrv_co_drain_end = None
    bdrv_drain_begin = None           # (bs) -> None, plain function (later QEMU)
    bdrv_drain_end = None
    bdrv_io_plug = None               # (bs)
    bdrv_io_unplug = None             # (bs)
    bdrv_attach_aio_context = None
    bdrv_detach_aio_context = None

    supported_write_flags_default: ClassVar[int] = 0   # convenience for drivers; QEMU sets bs fields in open

    @property
    def trace_name(self) -> str:
        return self.format_name

    def __repr__(self) -> str:
        return f"<BlockDriver {self.format_name}>"


# --------------------------------------------------------------------------
# Registry

BUILTIN_DRIVERS_PACKAGE = "qblock.drivers"
_drivers: dict[str, BlockDriver] = {}
_protocols: dict[str, BlockDriver] = {}
_loaded = False
_load_lock = threading.RLock()


def bdrv_register(drv: BlockDriver | type[BlockDriver]) -> BlockDriver:
    """Register a driver (an instance, or a class which is instantiated once) by its format_name."""
    if isinstance(drv, type):
        drv = drv()
    if not drv.format_name:
        raise ValueError(f"{type(drv).__name__} has no format_name")
    _drivers[drv.format_name] = drv
    if drv.protocol_name:
        _protocols[drv.protocol_name] = drv
    return drv


def bdrv_unregister(drv: BlockDriver) -> None:
    if _drivers.get(drv.format_name) is drv:
        del _drivers[drv.format_name]
    if drv.protocol_name and _protocols.get(drv.protocol_name) is drv:
        del _protocols[drv.protocol_name]


def _load_builtin_drivers() -> None:
    global _loaded
    with _load_lock:
        if _loaded:
            return
        _loaded = True
        # Discovered by name, not imported statically: the core knows no driver.  One module that
        # fails to import must not hide the others: each is loaded on its own, and a failure is
        # reported once on stderr (its drivers are then unknown, with the usual error).
        pkg = importlib.import_module(BUILTIN_DRIVERS_PACKAGE)
        for info in pkgutil.iter_modules(pkg.__path__):
            _load_driver_module(f"{BUILTIN_DRIVERS_PACKAGE}.{info.name}",
                                lambda name=info.name: importlib.import_module(f"{BUILTIN_DRIVERS_PACKAGE}.{name}"))
        _load_entry_points()


def _load_driver_module(what: str, load: Callable[[], Any]) -> Any:
    try:
        return load()
    except Exception as e:  # noqa: BLE001 - reported, and the other drivers still load
        sys.stderr.write(f"qblock: could not load block driver {what}: {type(e).__name__}: {e}\n")
        return None


def _load_entry_points() -> None:
    from importlib import metadata
    try:
        eps = metadata.entry_points(group="qblock.drivers")
    except TypeError:  # pragma: no cover - Python < 3.10
        eps = metadata.entry_points().get("qblock.drivers", [])
    for ep in eps:
        obj = _load_driver_module(f"{ep.name} ({ep.value})", ep.load)
        if isinstance(obj, type) and issubclass(obj, BlockDriver):
            bdrv_register(obj)
        elif isinstance(obj, BlockDriver):
            bdrv_register(obj)
        # a module: importing it ran its bdrv_register() calls


def bdrv_find_format(format_name: str) -> BlockDriver | None:
    """The driver registered as ``format_name``, loading built-in and entry-point drivers first."""
    drv = _drivers.get(format_name)
    if drv is None and not _loaded:
        _load_builtin_drivers()
        drv = _drivers.get(format_name)
    return drv


def bdrv_find_protocol_driver(protocol: str) -> BlockDriver | None:
    if not _loaded:
        _load_builtin_drivers()
    return _protocols.get(protocol)


def bdrv_drivers() -> list[BlockDriver]:
    """Every registered driver, sorted by name."""
    if not _loaded:
        _load_builtin_drivers()
    return [_drivers[k] for k in sorted(_drivers)]


def driver_state(drv: BlockDriver) -> Any:
    """A fresh per-node state object for ``drv`` (what QEMU allocates with instance_size)."""
    cls = drv.state_class
    return cls() if cls is not None else None
