"""What block devices share: QEMU's hw/block/block.c and the block properties of hw/core/qdev-properties-system.c.

:class:`BlockConf` holds a device's drive and its block configuration; the
``DEFINE_BLOCK_*`` lists give a device the ``drive``, block size, cache and
error-policy properties, and ``blkconf_*`` validate and apply them at
realize.

Differences from QEMU: ``drive`` accepts a BlockBackend's name (or the
BlockBackend itself), not a node name; block sizes are not probed from the
host (unset sizes become 512); the geometry guess skips reading a partition
table (QEMU's ``guess_disk_lchs``) and uses the size-based guess.
"""
from __future__ import annotations

import attrs

from qblock.block.block_backend import (
    BDRV_SECTOR_SIZE,
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_GRAPH_MOD,
    BLK_PERM_RESIZE,
    BLK_PERM_WRITE,
    BLK_PERM_WRITE_UNCHANGED,
    BlockBackend,
    BlockdevOnError,
    blk_attach_dev,
    blk_by_name,
    blk_detach_dev,
    blk_enable_write_cache,
    blk_get_geometry,
    blk_get_on_error,
    blk_name,
    blk_set_enable_write_cache,
    blk_set_on_error,
    blk_set_perm,
)
from qblock.qom.object import (
    QERR_INVALID_PARAMETER_TYPE,
    QERR_PROPERTY_VALUE_OUT_OF_RANGE,
    DEFINE_PROP_BOOL,
    DEFINE_PROP_ENUM,
    DEFINE_PROP_ON_OFF_AUTO,
    DEFINE_PROP_UINT32,
    OnOffAuto,
    Property,
    PropertyInfo,
    PropertyInfoEnum,
    PropertyInfoUint,
    object_get_typename,
    qdev_prop_set_field,
    qdev_prop_size,
)
from qblock.util.error import Error

__all__ = ["BlockConf", "DEFINE_BLOCK_PROPERTIES", "DEFINE_BLOCK_ERROR_PROPERTIES", "DEFINE_BLOCK_CHS_PROPERTIES",
           "DEFINE_PROP_DRIVE", "DEFINE_PROP_BLOCKSIZE", "DEFINE_PROP_BLOCKDEV_ON_ERROR",
           "blkconf_apply_backend_options", "blkconf_blocksizes", "blkconf_geometry",
           "get_physical_block_exp"]


@attrs.define(eq=False)
class BlockConf:
    """A block device's drive and configuration (QEMU's BlockConf)."""

    blk: BlockBackend | None = None
    physical_block_size: int = 0
    logical_block_size: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    discard_granularity: int = 0xFFFFFFFF     # -1: the device decides
    cyls: int = 0
    heads: int = 0
    secs: int = 0
    wce: OnOffAuto = OnOffAuto.ON_OFF_AUTO_AUTO
    share_rw: bool = False
    rerror: BlockdevOnError = BlockdevOnError.BLOCKDEV_ON_ERROR_AUTO
    werror: BlockdevOnError = BlockdevOnError.BLOCKDEV_ON_ERROR_AUTO


# ---------------------------------------------------------------------------
# Properties


class PropertyInfoDrive(PropertyInfo):
    """``drive``: a BlockBackend by name (or the object); setting it attaches the device to it."""

    name = "str"
    takes_strings = True

    def set(self, dev, prop, value):
        if isinstance(value, str):
            if value == "":
                return
            blk = blk_by_name(value)
            label = value
            if blk is None:
                raise Error(f"Property '{object_get_typename(dev)}.{prop.name}' can't find value '{value}'")
        elif isinstance(value, BlockBackend):
            blk = value
            label = blk_name(blk) or blk.trace_name
        else:
            raise Error(QERR_INVALID_PARAMETER_TYPE % (prop.name, "string"))
        old = self.get(dev, prop)
        if old is blk:
            return
        if blk_attach_dev(blk, dev) < 0:
            raise Error(f"Drive '{label}' is already in use by another device")
        if old is not None:
            blk_detach_dev(old, dev)
        qdev_prop_set_field(dev, prop, blk)

    def release(self, dev, prop):
        blk = self.get(dev, prop)
        if blk is not None:
            qdev_prop_set_field(dev, prop, None)
            blk_detach_dev(blk, dev)


class PropertyInfoBlocksize(PropertyInfoUint):
    """A block size: 0 (unset) or a power of two from 512 to 2 MiB (later QEMU; 4.x allowed up to 32 KiB)."""

    MIN = 512
    MAX = 2 * 1024 * 1024

    def __init__(self):
        super().__init__(32)
        self.name = "size"   # QEMU 5.1+ takes sizes here ("4k")

    def check(self, dev, prop, value):
        value = super().check(dev, prop, value)
        if value and (value < self.MIN or value > self.MAX):
            raise Error(QERR_PROPERTY_VALUE_OUT_OF_RANGE % (dev.id or "", prop.name, value, self.MIN, self.MAX))
        if value & (value - 1):
            raise Error(f"Property {dev.id or ''}.{prop.name} doesn't take value '{value}', "
                        f"it's not a power of 2")
        return value

    def parse(self, dev, prop, string):
        return self.check(dev, prop, qdev_prop_size.parse(dev, prop, string))


qdev_prop_drive = PropertyInfoDrive()
qdev_prop_blocksize = PropertyInfoBlocksize()
qdev_prop_blockdev_on_error = PropertyInfoEnum("BlockdevOnError", BlockdevOnError)


def DEFINE_PROP_DRIVE(name: str, field: str) -> Property:
    return Property(name, qdev_prop_drive, field, None)


def DEFINE_PROP_BLOCKSIZE(name: str, field: str) -> Property:
    return Property(name, qdev_prop_blocksize, field, 0)


def DEFINE_PROP_BLOCKDEV_ON_ERROR(name: str, field: str, default: BlockdevOnError) -> Property:
    return DEFINE_PROP_ENUM(name, field, qdev_prop_blockdev_on_error, default)


def DEFINE_BLOCK_PROPERTIES(conf: str) -> list[Property]:
    """``drive``, block sizes, I/O hints, ``write-cache`` and ``share-rw`` stored in the BlockConf at ``conf``."""
    return [
        DEFINE_PROP_DRIVE("drive", f"{conf}.blk"),
        DEFINE_PROP_BLOCKSIZE("logical_block_size", f"{conf}.logical_block_size"),
        DEFINE_PROP_BLOCKSIZE("physical_block_size", f"{conf}.physical_block_size"),
        DEFINE_PROP_UINT32("min_io_size", f"{conf}.min_io_size", 0),
        DEFINE_PROP_UINT32("opt_io_size", f"{conf}.opt_io_size", 0),
        DEFINE_PROP_UINT32("discard_granularity", f"{conf}.discard_granularity", 0xFFFFFFFF),
        DEFINE_PROP_ON_OFF_AUTO("write-cache", f"{conf}.wce", OnOffAuto.ON_OFF_AUTO_AUTO),
        DEFINE_PROP_BOOL("share-rw", f"{conf}.share_rw", False),
    ]


def DEFINE_BLOCK_ERROR_PROPERTIES(conf: str) -> list[Property]:
    return [
        DEFINE_PROP_BLOCKDEV_ON_ERROR("rerror", f"{conf}.rerror", BlockdevOnError.BLOCKDEV_ON_ERROR_AUTO),
        DEFINE_PROP_BLOCKDEV_ON_ERROR("werror", f"{conf}.werror", BlockdevOnError.BLOCKDEV_ON_ERROR_AUTO),
    ]


def DEFINE_BLOCK_CHS_PROPERTIES(conf: str) -> list[Property]:
    return [
        DEFINE_PROP_UINT32("cyls", f"{conf}.cyls", 0),
        DEFINE_PROP_UINT32("heads", f"{conf}.heads", 0),
        DEFINE_PROP_UINT32("secs", f"{conf}.secs", 0),
    ]


# ---------------------------------------------------------------------------
# Realize-time checks (hw/block/block.c)


def blkconf_blocksizes(conf: BlockConf) -> None:
    """Fill unset block sizes (512 here; QEMU probes the host) and check they agree."""
    if not conf.physical_block_size:
        conf.physical_block_size = conf.logical_block_size or BDRV_SECTOR_SIZE
    if not conf.logical_block_size:
        conf.logical_block_size = BDRV_SECTOR_SIZE
    if conf.logical_block_size > conf.physical_block_size:
        raise Error("logical_block_size > physical_block_size not supported")
    if conf.min_io_size % conf.logical_block_size:
        raise Error("min_io_size must be a multiple of logical_block_size")
    if conf.opt_io_size % conf.logical_block_size:
        raise Error("opt_io_size must be a multiple of logical_block_size")
    if conf.discard_granularity != 0xFFFFFFFF and conf.discard_granularity % conf.logical_block_size:
        raise Error("discard_granularity must be a multiple of logical_block_size")


def blkconf_apply_backend_options(conf: BlockConf, readonly: bool, resizable: bool) -> None:
    """Take the permissions the device needs and apply write-cache and the error policies to the drive."""
    blk = conf.blk
    perm = BLK_PERM_CONSISTENT_READ
    if not readonly:
        perm |= BLK_PERM_WRITE
    shared_perm = BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE_UNCHANGED | BLK_PERM_GRAPH_MOD
    if resizable:
        shared_perm |= BLK_PERM_RESIZE
    if conf.share_rw:
        shared_perm |= BLK_PERM_WRITE
    blk_set_perm(blk, perm, shared_perm)
    if conf.wce is OnOffAuto.ON_OFF_AUTO_ON:
        wce = True
    elif conf.wce is OnOffAuto.ON_OFF_AUTO_OFF:
        wce = False
    else:
        wce = blk_enable_write_cache(blk)
    rerror = conf.rerror
    werror = conf.werror
    if rerror is BlockdevOnError.BLOCKDEV_ON_ERROR_AUTO:
        rerror = blk_get_on_error(blk, True)
    if werror is BlockdevOnError.BLOCKDEV_ON_ERROR_AUTO:
        werror = blk_get_on_error(blk, False)
    blk_set_enable_write_cache(blk, wce)
    blk_set_on_error(blk, rerror, werror)


def blkconf_geometry(conf: BlockConf, cyls_max: int, heads_max: int, secs_max: int) -> None:
    """Check a given geometry, or guess one from the size (16 heads, 63 sectors)."""
    if not conf.cyls and not conf.heads and not conf.secs:
        cyls = blk_get_geometry(conf.blk) // (16 * 63)
        conf.cyls = min(max(cyls, 2), 16383)
        conf.heads = 16
        conf.secs = 63
    if conf.cyls or conf.heads or conf.secs:
        if conf.cyls < 1 or conf.cyls > cyls_max:
            raise Error(f"cyls must be between 1 and {cyls_max}")
        if conf.heads < 1 or conf.heads > heads_max:
            raise Error(f"heads must be between 1 and {heads_max}")
        if conf.secs < 1 or conf.secs > secs_max:
            raise Error(f"secs must be between 1 and {secs_max}")


def get_physical_block_exp(conf: BlockConf) -> int:
    """log2(physical / logical block size), for the config space's topology field."""
    exp = 0
    size = conf.physical_block_size
    while size > conf.logical_block_size:
        size >>= 1
        exp += 1
    return exp

