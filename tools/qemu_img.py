"""``qblock-img``: QEMU's qemu-img (qemu-img.c, with block.c's bdrv_img_create and block/qapi.c's
image info, as of QEMU 7.2) over qblock's graph.

Commands: amend, bench, bitmap, check, commit, compare, convert, create, dd, info, map, measure,
snapshot, rebase, resize — with qemu-img's options (``--object``, ``--image-opts``, ``-f``, ``-U``
wherever qemu-img takes them), messages, human and JSON outputs and exit statuses.  Messages
carry qemu-img's name (``qemu-img: Could not open ...``) so that golden outputs match.

What a format driver plugs in (hooks looked up on the driver, all optional; without one the
command fails the way QEMU does for a driver without the function pointer):

* ``create_opts`` (QemuOptsList, in QEMU's declaration order: ``Formatting ...`` prints that
  order, ``-o help`` sorts it) and ``bdrv_co_create_opts(filename, options)``;
  ``amend_opts`` and ``bdrv_amend_options(bs, options, status_cb)``;
* ``bdrv_co_check(bs, result, fix)`` (see qblock.block.check);
* ``bdrv_get_specific_info(bs) -> {"type": fmt, "data": {...}}`` (ImageInfoSpecific, data
  keys in QAPI order with QAPI names such as ``lazy-refcounts``);
* ``bdrv_has_zero_init(bs)``, ``bdrv_make_empty(bs)``,
  ``bdrv_change_backing_file(bs, backing_file, backing_fmt)``,
  ``bdrv_measure(opts: dict, in_bs) -> (required, fully_allocated[, bitmaps or None])``,
  ``bdrv_snapshot_list(bs) -> [QEMUSnapshotInfo-like objects]`` (id_str, name, vm_state_size,
  date_sec, date_nsec, vm_clock_nsec, icount), ``bdrv_snapshot_create/goto/delete``.

Differences from qemu-img 7.2:

* ``raw`` images are created through the protocol driver (QEMU's raw_co_create_opts does the
  same) while qblock's raw driver has no create hook; the file's first block is allocated as
  file-posix's allocate_first_block does, so ``map`` of a new image matches QEMU's.
* ``commit`` copies the allocated data of the top image into its backing file with plain
  reads and writes instead of running a commit block job; the result is the same.
* ``convert -C`` (copy offloading) falls back to reads and writes, as qemu-img does when
  copy_range fails; ``--bitmaps`` and ``-l`` (internal snapshots) are refused.
* ``bitmap`` checks its arguments and then fails: qblock has no persistent bitmaps.
"""
from __future__ import annotations

import errno
import os
import sys
import time
from typing import Any

import attrs

from qblock.block.block_backend import (
    BlockBackend,
    blk_aio_flush,
    blk_aio_preadv,
    blk_aio_pwritev,
    blk_bs,
    blk_co_preadv,
    blk_co_pwrite_zeroes,
    blk_co_pwritev,
    blk_flush,
    blk_getlength,
    blk_new,
    blk_insert_bs,
    blk_new_open,
    blk_pread,
    blk_pwrite,
    blk_pwrite_zeroes,
    blk_set_enable_write_cache,
    blk_truncate,
    blk_unref,
)
from qblock.block.driver import (
    BDRV_BLOCK_ALLOCATED,
    BDRV_BLOCK_DATA,
    BDRV_BLOCK_OFFSET_VALID,
    BDRV_BLOCK_ZERO,
    BDRV_O_CHECK,
    BDRV_O_NATIVE_AIO,
    BDRV_O_NO_BACKING,
    BDRV_O_NO_IO,
    BDRV_O_RDWR,
    BDRV_O_RESIZE,
    BDRV_O_UNMAP,
    BDRV_REQ_MAY_UNMAP,
    BDRV_REQ_NO_FALLBACK,
    BDRV_REQ_WRITE_COMPRESSED,
    BDRV_REQUEST_MAX_BYTES,
    BDRV_REQUEST_MAX_SECTORS,
    BDRV_SECTOR_SIZE,
    NOT_DONE,
    BlockDriver,
    PreallocMode,
    bdrv_drivers,
    bdrv_find_format,
)
from qblock.block.graph import (
    BLK_PERM_ALL,
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_GRAPH_MOD,
    BLK_PERM_RESIZE,
    BLK_PERM_WRITE,
    BLK_PERM_WRITE_UNCHANGED,
    BDRV_CHILD_DATA,
    BDRV_CHILD_FILTERED,
    BDRV_CHILD_METADATA,
    BlockDriverState,
    backing_bs,
    bdrv_find_protocol,
    bdrv_get_full_backing_filename,
    bdrv_getlength,
    bdrv_is_read_only,
    bdrv_open,
    bdrv_primary_bs,
    bdrv_skip_filters,
    bdrv_unref,
    path_has_protocol,
)
from qblock.block.reopen import bdrv_reopen_set_read_only
from qblock.block.check import BDRV_FIX_ERRORS, BDRV_FIX_LEAKS, BdrvCheckResult, bdrv_check
from qblock.qmp.qjson import qobject_to_json, qobject_to_json_pretty
from qblock.util.aio import aio_poll, qemu_get_aio_context
from qblock.util.error import Error
from qblock.util.iov import QEMUIOVector
from qblock.util.qemu_option import (
    QEMU_OPT_BOOL,
    QEMU_OPT_NUMBER,
    QEMU_OPT_SIZE,
    QEMU_OPT_STRING,
    QemuOptDesc,
    QemuOptsList,
)

from qblock.tools import qemu_tool_util as util
from qblock.tools.qemu_io import (
    bdrv_image_info_specific_dump,
    check_force_share,
    tool_bdrv_get_info,
)
from qblock.tools.qemu_tool_util import Getopt, ToolExit, strerror

PROG = "qemu-img"
QEMU_IMG_VERSION = "qemu-img version 7.2.22 (qblock)\nCopyright (c) 2003-2022 Fabrice Bellard and the QEMU Project " \
                   "developers\n"
BDRV_DEFAULT_CACHE = "writeback"
IO_BUF_SIZE = 2 << 20
MAX_BUF_SECTORS = 32768
MAX_COROUTINES = 16
INT64_MAX = util.INT64_MAX
INT_MAX = util.INT_MAX

report = util.Reporter(PROG)

BLOCK_OPT_SIZE = "size"
BLOCK_OPT_BACKING_FILE = "backing_file"
BLOCK_OPT_BACKING_FMT = "backing_fmt"
BLOCK_OPT_CLUSTER_SIZE = "cluster_size"
BLOCK_OPT_PREALLOC = "preallocation"
BLOCK_OPT_ENCRYPT = "encryption"
BLOCK_OPT_ENCRYPT_FORMAT = "encrypt.format"

# raw-format.c's raw_create_opts, used while qblock's raw driver declares none.
RAW_CREATE_OPTS = QemuOptsList("raw-create-opts", [QemuOptDesc("size", QEMU_OPT_SIZE, "Virtual disk size")])


# --------------------------------------------------------------------------
# Exits and messages


def error_exit(msg: str) -> None:
    """qemu-img's error_exit: the message, the --help hint, exit status 1."""
    report.error(msg)
    sys.stderr.write(f"Try '{PROG} --help' for more information\n")
    raise ToolExit(1)


def missing_argument(option: str) -> None:
    error_exit(f"missing argument for option '{option}'")


def unrecognized_option(option: str) -> None:
    error_exit(f"unrecognized option '{option}'")


def qprintf(quiet: bool, text: str) -> None:
    if not quiet:
        sys.stdout.write(text)


def cvtnum_full(name: str, value: str, lo: int, hi: int) -> int:
    """qemu-img's cvtnum_full: the size, or a negative errno after QEMU's two-line message."""
    err, res = util.qemu_strtosz(value)
    if err < 0 and err != -errno.ERANGE:
        report.error(f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for")
        report.error("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
        return err
    if err == -errno.ERANGE or res > hi or res < lo:
        report.error(f"Invalid {name} specified. Must be between {lo} and {hi}.")
        return -errno.ERANGE
    return res


def cvtnum(name: str, value: str) -> int:
    return cvtnum_full(name, value, 0, INT64_MAX)


def parse_output(output: str | None) -> str | None:
    """human/json, or None after "--output must be used with human or json as argument."."""
    if output is None or output == "human":
        return "human"
    if output == "json":
        return "json"
    report.error("--output must be used with human or json as argument.")
    return None


class Opts:
    """Run a command's getopt_long the way every qemu-img command does (':' prefix, error_exit)."""

    def __init__(self, argv: list[str], shortopts: str, longopts: list[tuple[str, int, Any]]):
        self.g = Getopt(argv, shortopts, longopts)

    def __iter__(self):
        g = self.g
        while True:
            c = g.getopt()
            if c == -1:
                return
            if c == ":":
                missing_argument(g.argv[g.optind - 1])
            elif c == "?":
                unrecognized_option(g.argv[g.optind - 1])
            elif c == "h":
                help_()
            else:
                yield c, g.optarg

    @property
    def rest(self) -> list[str]:
        return self.g.argv[self.g.optind:]


@attrs.define
class CommonOpts:
    """What the options most commands share set: ``-f``, ``--object``, ``--image-opts``, ``-U``, ``-q``.

    Each command's getopt string still decides which of them it accepts; :meth:`parse` only
    records the ones getopt hands over.
    """

    fmt: str | None = None
    objects: list[str] = attrs.Factory(list)
    image_opts: bool = False
    force_share: bool = False
    quiet: bool = False

    def parse(self, c: str, arg: str | None) -> bool:
        """Record option ``c``; True when it is one of the shared options, False for the caller's."""
        if c == "f":
            self.fmt = arg
        elif c == "object":
            self.objects.append(arg)
        elif c == "image-opts":
            self.image_opts = True
        elif c == "U":
            self.force_share = True
        elif c == "q":
            self.quiet = True
        else:
            return False
        return True


def one_image_file_name(rest: list[str], msg: str = "Expecting one image file name") -> str:
    """The single operand a command takes, or error_exit with ``msg``."""
    if len(rest) != 1:
        error_exit(msg)
    return rest[0]


def add_objects(objects: list[str]) -> bool:
    """user_creatable_process_cmdline for every --object; False after reporting an error."""
    return util.user_creatable_add_objects(report, objects)


def accumulate_options(options: str | None, optarg: str) -> str | None:
    """qemu-img.c's accumulate_options: ``-o`` lists joined with ','; None after reporting an invalid one."""
    if not is_valid_option_list(optarg):
        report.error(f"Invalid option list: {optarg}")
        return None
    return optarg if options is None else f"{options},{optarg}"


# --------------------------------------------------------------------------
# Opening images (qemu-img.c: img_open and friends)


def img_open_opts(optstr: str, options: dict, flags: int, writethrough: bool, quiet: bool,
                  force_share: bool) -> BlockBackend | None:
    options = dict(options)
    if force_share:
        if "force-share" in options and options["force-share"] not in ("on", True):
            report.error("--force-share/-U conflicts with image options")
            return None
        options["force-share"] = "on"
    return _blk_new_open(None, optstr, options, flags, writethrough)


def img_open_file(filename: str, options: dict | None, fmt: str | None, flags: int, writethrough: bool,
                  quiet: bool, force_share: bool) -> BlockBackend | None:
    options = dict(options or {})
    if fmt:
        options["driver"] = fmt
    if force_share:
        options["force-share"] = "on"
    return _blk_new_open(filename, filename, options, flags, writethrough)


def _blk_new_open(filename: str | None, optstr: str, options: dict, flags: int,
                  writethrough: bool) -> BlockBackend | None:
    """blk_new_open with the cache flags as options; "Could not open '<optstr>'" on failure."""
    options.update({k: v for k, v in util.cache_options(flags).items() if k not in options})
    try:
        check_force_share(options, flags)
        blk = blk_new_open(filename, None, options, flags)
    except Error as e:
        report.error_err(e, f"Could not open '{optstr}': ")
        return None
    blk_set_enable_write_cache(blk, not writethrough)
    return blk


def img_open(image_opts: bool, filename: str, fmt: str | None, flags: int, writethrough: bool, quiet: bool,
             force_share: bool) -> BlockBackend | None:
    from qblock.util.qemu_option import keyval_parse
    if image_opts:
        if fmt:
            report.error("--image-opts and --format are mutually exclusive")
            return None
        try:
            opts = keyval_parse(filename, "file")
        except Error as e:
            report.error_err(e)
            return None
        return img_open_opts(filename, opts, flags, writethrough, quiet, force_share)
    return img_open_file(filename, None, fmt, flags, writethrough, quiet, force_share)


def parse_cache(mode: str, flags: int, what: str = "cache") -> tuple[int, bool] | None:
    """bdrv_parse_cache_mode: (flags, writethrough), or None after "Invalid <what> option: <mode>"."""
    r, flags, writethrough = util.bdrv_parse_cache_mode(mode, flags)
    if r < 0:
        report.error(f"Invalid {what} option: {mode}")
        return None
    return flags, writethrough


# --------------------------------------------------------------------------
# Block-layer functions qemu-img reaches through block.c (emulated where qblock's core lacks them)


def bdrv_get_allocated_file_size(bs: BlockDriverState) -> int:
    drv = bs.drv
    if drv is None:
        return -errno.ENOMEDIUM
    hook = drv.bdrv_get_allocated_file_size
    if hook is not None:
        return hook(bs)
    if drv.format_name in ("null-co", "null-aio"):
        return 0  # null.c: null_allocated_file_size
    if drv.bdrv_file_open is not None:
        return -errno.ENOTSUP
    if drv.is_filter:
        child = bdrv_primary_bs(bs)
        return bdrv_get_allocated_file_size(child) if child is not None else -errno.ENOTSUP
    total = 0
    for c in bs.children:
        if c.role & (BDRV_CHILD_DATA | BDRV_CHILD_METADATA | BDRV_CHILD_FILTERED):
            n = bdrv_get_allocated_file_size(c.bs)
            if n < 0:
                return n
            total += n
    return total


def bdrv_has_zero_init(bs: BlockDriverState) -> bool:
    drv = bs.drv
    if drv is None:
        return False
    if bs.backing is not None and not drv.is_filter:
        return False
    hook = getattr(drv, "bdrv_has_zero_init", None)
    if hook is not None:
        return bool(hook(bs))
    if drv.format_name == "file":
        return True  # bdrv_has_zero_init_1 for regular files
    if drv.format_name == "raw" or drv.is_filter:
        child = bdrv_primary_bs(bs)
        return bdrv_has_zero_init(child) if child is not None else False
    return False


def bdrv_can_write_zeroes_with_unmap(bs: BlockDriverState) -> bool:
    return bool(bs.open_flags & BDRV_O_UNMAP) and bool(bs.supported_zero_flags & BDRV_REQ_MAY_UNMAP)


_STRONG_OPTS = {
    "raw": ("offset", "size"),
    "null-co": ("size", "read-zeroes"),
    "null-aio": ("size", "read-zeroes"),
    "blkdebug": ("config", "inject-error.", "set-state.", "align", "max-transfer", "opt-write-zero",
                 "max-write-zero", "opt-discard", "max-discard"),
    "throttle": ("throttle-group",),
}


def bdrv_refresh_filename(bs: BlockDriverState) -> tuple[str, str, dict]:
    """block.c's bdrv_refresh_filename: (exact_filename, filename, full_open_options) of ``bs``."""
    drv = bs.drv
    kids = {}
    for c in reversed(bs.children):
        kids[c.name] = bdrv_refresh_filename(c.bs)
    opts: dict[str, Any] = {}
    for c in reversed(bs.children):
        if c is bs.backing and not drv.is_filter:
            continue
        opts[c.name] = kids[c.name][2]
    strong_found = False
    for key in ("driver", "filename"):
        if key in bs.options:
            opts[key] = bs.options[key]
    for key, value in bs.options.items():
        for strong in _STRONG_OPTS.get(drv.format_name, ()):
            if key == strong or (strong.endswith(".") and key.startswith(strong)):
                opts[key] = value
                strong_found = True
    if "driver" not in opts:
        opts["driver"] = drv.format_name
    exact = ""
    primary = bdrv_primary_bs(bs)
    if drv.format_name == "file":
        exact = bs.options.get("filename", bs.exact_filename or bs.filename)
        opts.setdefault("filename", exact)
    elif drv.format_name in ("null-co", "null-aio"):
        if all(k in ("filename", "driver", "latency-ns") for k in opts):
            exact = f"{drv.format_name}://"
    elif drv.format_name == "blkdebug":
        child = bs.file.bs if bs.file is not None else None
        if child is not None and kids.get(bs.file.name, ("",))[0] and \
                all(k in ("config", "image", "x-image", "driver") for k in opts):
            exact = f"blkdebug:{bs.opaque.config_file or ''}:{kids[bs.file.name][0]}"
    elif primary is not None:
        pname = next((c.name for c in bs.children if c.bs is primary), None)
        pexact = kids.get(pname, ("",))[0]
        if pexact and primary.drv is not None and primary.drv.bdrv_file_open is not None and \
                not drv.is_filter and not strong_found:
            exact = pexact
    filename = exact if exact else "json:" + qobject_to_json(_json_options(opts))
    return exact, filename, opts


def _json_options(obj: Any) -> Any:
    """Options as the QDict behind a ``json:`` filename holds them: values other than numbers,
    booleans and null as strings."""
    if isinstance(obj, dict):
        return {k: _json_options(v) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int)):
        return obj
    return str(obj)


def bdrv_filename(bs: BlockDriverState) -> str:
    return bdrv_refresh_filename(bs)[1]


def bdrv_find_backing_image(bs: BlockDriverState, backing_file: str) -> BlockDriverState | None:
    """The node of ``bs``'s backing chain named ``backing_file`` (relative names resolved like QEMU)."""
    cur = bs
    while cur is not None and cur.backing is not None:
        nxt = cur.backing.bs
        full = bdrv_get_full_backing_filename(cur)
        candidates = {cur.backing_file, full, nxt.filename, bdrv_filename(nxt)}
        if backing_file in candidates:
            return nxt
        if not path_has_protocol(backing_file):
            want = backing_file if os.path.isabs(backing_file) else \
                os.path.join(os.path.dirname(bdrv_filename(cur)), backing_file)
            try:
                if full and os.path.realpath(want) == os.path.realpath(full):
                    return nxt
            except OSError:
                pass
        cur = nxt
    return None


def bdrv_change_backing_file(bs: BlockDriverState, backing_file: str | None, backing_fmt: str | None,
                             require: bool) -> int:
    drv = bs.drv
    if drv is None:
        return -errno.ENOMEDIUM
    if backing_fmt and not backing_file:
        return -errno.EINVAL
    if require and backing_file and not backing_fmt:
        return -errno.EINVAL
    hook = getattr(drv, "bdrv_change_backing_file", None)
    if hook is None and drv.format_name == "qcow2":
        try:  # the qcow2 driver has the function but does not register it as a hook yet
            from qblock.drivers.qcow2.qcow2_header import qcow2_change_backing_file

            def hook(bs_, file_, fmt_):
                return qcow2_change_backing_file(bs_, file_, fmt_)
        except ImportError:
            hook = None
    if hook is None:
        return -errno.ENOTSUP
    from qblock.block.io import bdrv_run_co
    ret = bdrv_run_co(bs, hook, bs, backing_file, backing_fmt)
    if ret == 0:
        bs.backing_file = backing_file or ""
        bs.backing_format = backing_fmt or ""
    return ret


def bdrv_snapshot_list(bs: BlockDriverState) -> tuple[int, list]:
    """(count or -errno, snapshots): the driver's hook, qcow2's snapshot table, else the primary child's."""
    while bs is not None and bs.drv is not None:
        hook = getattr(bs.drv, "bdrv_snapshot_list", None)
        if hook is not None:
            sns = hook(bs)
            return (sns if isinstance(sns, int) else len(sns)), ([] if isinstance(sns, int) else list(sns))
        if bs.drv.format_name == "qcow2" and hasattr(bs.opaque, "snapshots"):
            return len(bs.opaque.snapshots), list(bs.opaque.snapshots)
        if bs.drv.format_name == "raw" or bs.drv.is_filter:
            bs = bdrv_primary_bs(bs)
            continue
        break
    return -errno.ENOTSUP, []


def _sn_attr(sn: Any, name: str, default: Any = 0) -> Any:
    return getattr(sn, name, default) if not isinstance(sn, dict) else sn.get(name, default)


def bdrv_snapshot_dump(sn: Any | None) -> str:
    """block/qapi.c bdrv_snapshot_dump: the header line (``sn`` None) or one snapshot's line."""
    if sn is None:
        return "%-10s%-17s%8s%20s%13s%11s" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(_sn_attr(sn, "date_sec")))
    nsec = _sn_attr(sn, "vm_clock_nsec")
    secs = nsec // 1_000_000_000
    clock = "%02d:%02d:%02d.%03d" % (secs // 3600, (secs // 60) % 60, secs % 60, (nsec // 1_000_000) % 1000)
    icount = _sn_attr(sn, "icount", -1)
    icount_buf = "" if icount in (-1, (1 << 64) - 1, None) else str(icount)
    return "%-9s %-16s %8s%20s%13s%11s" % (_sn_attr(sn, "id_str", ""), _sn_attr(sn, "name", ""),
                                           util.size_to_str(_sn_attr(sn, "vm_state_size")), date, clock, icount_buf)


def snapshot_load_tmp_error(bs: BlockDriverState) -> str:
    """bdrv_snapshot_load_tmp without a driver hook (qblock has none yet): QEMU's -ENOTSUP message."""
    return (f"Failed to load snapshot: Block format '{bs.drv.format_name}' used by device '' does not support "
            "temporarily loading internal snapshots")


def _snapshot_info_json(sn: Any) -> dict:
    d = {"id": _sn_attr(sn, "id_str", ""), "name": _sn_attr(sn, "name", ""),
         "vm-state-size": _sn_attr(sn, "vm_state_size"), "date-sec": _sn_attr(sn, "date_sec"),
         "date-nsec": _sn_attr(sn, "date_nsec"), "vm-clock-sec": _sn_attr(sn, "vm_clock_nsec") // 1_000_000_000,
         "vm-clock-nsec": _sn_attr(sn, "vm_clock_nsec") % 1_000_000_000}
    icount = _sn_attr(sn, "icount", -1)
    if icount not in (-1, (1 << 64) - 1, None):
        d["icount"] = icount
    return d


# --------------------------------------------------------------------------
# Image info (block/qapi.c)


def bdrv_query_image_info(bs: BlockDriverState) -> dict:
    """ImageInfo as a dict in QAPI order (json keys); raises Error like bdrv_query_image_info."""
    size = bdrv_getlength(bs)
    if size < 0:
        raise Error(f"Can't get image size '{bs.exact_filename}': {strerror(size)}", errno=-size)
    info: dict[str, Any] = {"filename": bdrv_filename(bs), "format": bs.drv.format_name}
    ret, bdi = tool_bdrv_get_info(bs)
    if ret >= 0:
        info["dirty-flag"] = bool(bdi.is_dirty)
    actual = bdrv_get_allocated_file_size(bs)
    if actual >= 0:
        info["actual-size"] = actual
    info["virtual-size"] = size
    if ret >= 0 and bdi.cluster_size:
        info["cluster-size"] = bdi.cluster_size
    if bs.encrypted:
        info["encrypted"] = True
    if bs.backing_file:
        info["backing-filename"] = bs.backing_file
        full = bdrv_get_full_backing_filename(bs)
        if full:
            info["full-backing-filename"] = full
        if bs.backing_format:
            info["backing-filename-format"] = bs.backing_format
    n, sns = bdrv_snapshot_list(bs)
    if n > 0:
        info["snapshots"] = [_snapshot_info_json(sn) for sn in sns]
    fn = getattr(bs.drv, "bdrv_get_specific_info", None)
    if fn is not None:
        spec = fn(bs)
        if spec:
            info["format-specific"] = spec
    return info


def bdrv_image_info_dump(info: dict) -> str:
    out = []
    dsize = util.size_to_str(info["actual-size"]) if "actual-size" in info else "unavailable"
    out.append(f"image: {info['filename']}\n"
               f"file format: {info['format']}\n"
               f"virtual size: {util.size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)\n"
               f"disk size: {dsize}\n")
    if info.get("encrypted"):
        out.append("encrypted: yes\n")
    if "cluster-size" in info:
        out.append(f"cluster_size: {info['cluster-size']}\n")
    if info.get("dirty-flag"):
        out.append("cleanly shut down: no\n")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        if "full-backing-filename" not in info:
            line += " (cannot determine actual path)"
        elif info["backing-filename"] != info["full-backing-filename"]:
            line += f" (actual path: {info['full-backing-filename']})"
        out.append(line + "\n")
        if "backing-filename-format" in info:
            out.append(f"backing file format: {info['backing-filename-format']}\n")
    if info.get("snapshots"):
        out.append("Snapshot list:\n" + bdrv_snapshot_dump(None) + "\n")
        for sn in info["snapshots"]:
            obj = {"id_str": sn["id"], "name": sn["name"], "vm_state_size": sn["vm-state-size"],
                   "date_sec": sn["date-sec"], "date_nsec": sn["date-nsec"],
                   "vm_clock_nsec": sn["vm-clock-sec"] * 1_000_000_000 + sn["vm-clock-nsec"],
                   "icount": sn.get("icount", -1)}
            out.append(bdrv_snapshot_dump(obj) + "\n")
    if "format-specific" in info:
        out.append("Format specific information:\n" + bdrv_image_info_specific_dump(info["format-specific"]))
    return "".join(out)


# --------------------------------------------------------------------------
# Creation options (util/qemu-option.c as qemu-img uses it)


def driver_create_opts(drv: BlockDriver) -> QemuOptsList | None:
    if drv.create_opts is not None:
        return drv.create_opts
    if drv.format_name == "raw":
        return RAW_CREATE_OPTS
    return None


def qemu_opts_append(*lists: QemuOptsList | None) -> list[QemuOptDesc]:
    """Merge option lists; a name already present keeps its first declaration."""
    out: list[QemuOptDesc] = []
    seen = set()
    for lst in lists:
        if lst is None:
            continue
        for d in lst.desc:
            if d.name not in seen:
                seen.add(d.name)
                out.append(d)
    return out


_TYPE_NAMES = {QEMU_OPT_STRING: "str", QEMU_OPT_BOOL: "bool (on/off)", QEMU_OPT_NUMBER: "num", QEMU_OPT_SIZE: "size"}


def qemu_opts_print_help(descs: list[QemuOptDesc]) -> str:
    lines = []
    for d in descs:
        s = f"  {d.name}=<{_TYPE_NAMES.get(d.type, d.type)}>"
        if d.help:
            if len(s) < 24:
                s += " " * (24 - len(s))
            s += f" - {d.help}"
        lines.append(s)
    lines.sort(key=lambda x: x.encode())
    return "".join(line + "\n" for line in lines)


def is_valid_option_list(optarg: str) -> bool:
    if not optarg or optarg[0] == ",":
        return False
    i = len(optarg)
    while i > 0 and optarg[i - 1] == ",":
        i -= 1
    return (len(optarg) - i) % 2 == 0


def _split_opt_list(params: str) -> list[str]:
    """get_opt_value: elements separated by ',' with ',,' standing for a literal comma."""
    out = []
    buf = []
    i = 0
    while i < len(params):
        c = params[i]
        if c == ",":
            if i + 1 < len(params) and params[i + 1] == ",":
                buf.append(",")
                i += 2
                continue
            out.append("".join(buf))
            buf = []
            i += 1
            continue
        buf.append(c)
        i += 1
    out.append("".join(buf))
    return out


def has_help_option(params: str) -> bool:
    return any(e in ("help", "?") for e in _split_opt_list(params))


def parse_size_value(name: str, value: str) -> int:
    ret, n = util.qemu_strtosz(value)
    if ret == -errno.ERANGE:
        raise Error(f"Value '{value}' is out of range for parameter '{name}'")
    if ret < 0:
        raise Error(f"Parameter '{name}' expects a non-negative number below 2^64",
                    hint="Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                         "and exabytes, respectively.")
    return n


class CreateOpts:
    """A QemuOpts over a merged list of descriptions, keeping each value's string as QEMU does."""

    def __init__(self, descs: list[QemuOptDesc]):
        self.descs = descs
        self.values: dict[str, tuple[str, Any]] = {}

    def find(self, name: str) -> QemuOptDesc | None:
        for d in self.descs:
            if d.name == name:
                return d
        return None

    def set(self, name: str, value: str) -> None:
        d = self.find(name)
        if d is None:
            raise Error(f"Invalid parameter '{name}'")
        if d.type == QEMU_OPT_BOOL:
            if value in ("on", "yes", "true", "y"):
                parsed: Any = True
            elif value in ("off", "no", "false", "n"):
                parsed = False
            else:
                raise Error(f"Parameter '{name}' expects 'on' or 'off'")
        elif d.type == QEMU_OPT_NUMBER:
            r, n = util.qemu_strtol(value, 0)
            if r < 0 or n < 0:
                raise Error(f"Parameter '{name}' expects a number")
            if n > util.UINT64_MAX:
                raise Error(f"Value '{value}' is too large for parameter '{name}'")
            parsed = n
        elif d.type == QEMU_OPT_SIZE:
            parsed = parse_size_value(name, value)
        else:
            parsed = value
        self.values[name] = (value, parsed)

    def set_number(self, name: str, value: int) -> None:
        self.values[name] = (str(value), value)

    def do_parse(self, params: str) -> None:
        for elem in _split_opt_list(params):
            if not elem:
                continue
            if "=" in elem:
                key, val = elem.split("=", 1)
            elif elem.startswith("no") and self.find(elem[2:]) is not None and \
                    self.find(elem[2:]).type == QEMU_OPT_BOOL:
                key, val = elem[2:], "off"
            else:
                key, val = elem, "on"
            self.set(key, val)

    def get(self, name: str, default: Any = None) -> Any:
        if name in self.values:
            return self.values[name][1]
        d = self.find(name)
        if d is not None and d.def_value_str is not None:
            return d.def_value_str
        return default

    def get_str(self, name: str) -> str | None:
        return self.values[name][0] if name in self.values else None

    def to_dict(self) -> dict[str, Any]:
        """The options for a driver's bdrv_co_create_opts: sizes and numbers as ints, the rest as strings."""
        out: dict[str, Any] = {}
        for d in self.descs:
            if d.name in self.values:
                s, v = self.values[d.name]
                out[d.name] = v if d.type in (QEMU_OPT_SIZE, QEMU_OPT_NUMBER) else s
        return out

    def print(self, sep: str = " ") -> str:
        """qemu_opts_print: every option with a value or a default, in declaration order."""
        parts = []
        for d in self.descs:
            if d.name in self.values:
                s, v = self.values[d.name]
                if d.type in (QEMU_OPT_SIZE, QEMU_OPT_NUMBER):
                    parts.append(f"{d.name}={v}")
                elif d.type == QEMU_OPT_STRING:
                    parts.append(f"{d.name}={s.replace(',', ',,')}")
                else:
                    parts.append(f"{d.name}={s}")
            elif d.def_value_str is not None:
                if d.type == QEMU_OPT_STRING:
                    parts.append(f"{d.name}={d.def_value_str.replace(',', ',,')}")
                else:
                    parts.append(f"{d.name}={d.def_value_str}")
        return sep.join(parts)


def print_block_option_help(filename: str | None, fmt: str) -> int:
    drv = bdrv_find_format(fmt)
    if drv is None:
        report.error(f"Unknown file format '{fmt}'")
        return 1
    fmt_opts = driver_create_opts(drv)
    if fmt_opts is None:
        report.error(f"Format driver '{fmt}' does not support image creation")
        return 1
    lists = [fmt_opts]
    if filename:
        try:
            proto = bdrv_find_protocol(filename, True)
        except Error as e:
            report.error_err(e)
            return 1
        if proto.create_opts is None:
            report.error(f"Protocol driver '{proto.format_name}' does not support image creation")
            return 1
        lists.append(proto.create_opts)
        sys.stdout.write("Supported options:\n")
    else:
        sys.stdout.write(f"Supported {fmt} options:\n")
    sys.stdout.write(qemu_opts_print_help(qemu_opts_append(*lists)))
    if not filename:
        sys.stdout.write("\nThe protocol level may support further options.\n"
                         "Specify the target filename to include those options.\n")
    return 0


def allocate_first_block(filename: str, size: int) -> None:
    """file-posix's allocate_first_block after creating a file: write zeroes over its first block."""
    write_size = BDRV_SECTOR_SIZE if size < 4096 else 4096
    try:
        fd = os.open(filename, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.pwrite(fd, bytes(write_size), 0)
    except OSError:
        pass
    finally:
        os.close(fd)


def bdrv_create(drv: BlockDriver, filename: str, opts: CreateOpts) -> None:
    """Create ``filename`` with ``drv`` (raw through its protocol, as raw_co_create_opts does); raises Error."""
    from qblock.block import create as _create
    options = opts.to_dict()
    if drv.bdrv_co_create_opts is None and drv.format_name == "raw":
        _create.bdrv_create_file(filename, options)
        proto = bdrv_find_protocol(filename, True)
        size = options.get("size", 0)
        if proto.format_name == "file" and size > 0 and opts.get(BLOCK_OPT_PREALLOC, "off") == "off":
            allocate_first_block(filename[len("file:"):] if filename.startswith("file:") else filename, size)
        return
    _create.bdrv_create(drv, filename, options)


def img_create_opts(drv: BlockDriver, filename: str) -> CreateOpts:
    """The creation options of format ``drv`` over the protocol of ``filename``; raises Error."""
    proto = bdrv_find_protocol(filename, True)
    fmt_opts = driver_create_opts(drv)
    if fmt_opts is None:
        raise Error(f"Format driver '{drv.format_name}' does not support image creation")
    if proto.create_opts is None:
        raise Error(f"Protocol driver '{proto.format_name}' does not support image creation")
    return CreateOpts(qemu_opts_append(fmt_opts, proto.create_opts))


def set_backing_opts(opts: CreateOpts, fmt: str, backing_file: str | None, backing_fmt: str | None) -> None:
    """Set backing_file and backing_fmt when given; raises Error when format ``fmt`` has no such option."""
    if backing_file:
        if opts.find(BLOCK_OPT_BACKING_FILE) is None:
            raise Error(f"Backing file not supported for file format '{fmt}'")
        opts.set(BLOCK_OPT_BACKING_FILE, backing_file)
    if backing_fmt:
        if opts.find(BLOCK_OPT_BACKING_FMT) is None:
            raise Error(f"Backing file format not supported for file format '{fmt}'")
        opts.set(BLOCK_OPT_BACKING_FMT, backing_fmt)


def bdrv_img_create(filename: str, fmt: str, base_filename: str | None, base_fmt: str | None,
                    options: str | None, img_size: int, flags: int, quiet: bool) -> None:
    """block.c bdrv_img_create: parse options, check the backing file, print Formatting, create. Raises Error."""
    drv = bdrv_find_format(fmt)
    if drv is None:
        raise Error(f"Unknown file format '{fmt}'")
    opts = img_create_opts(drv, filename)
    if options:
        opts.do_parse(options)
    if opts.get_str(BLOCK_OPT_SIZE) is None:
        opts.set_number(BLOCK_OPT_SIZE, img_size)
    elif img_size != -1:
        raise Error("The image size must be specified only once")
    set_backing_opts(opts, fmt, base_filename, base_fmt)
    backing_file = opts.get_str(BLOCK_OPT_BACKING_FILE)
    if backing_file is not None:
        if filename == backing_file:
            raise Error("Error: Trying to create an image with the same filename as the backing file")
        if backing_file == "":
            raise Error("Expected backing file name, got empty string")
    backing_fmt = opts.get_str(BLOCK_OPT_BACKING_FMT)
    size = opts.get(BLOCK_OPT_SIZE, img_size)
    if size is None:
        size = -1
    if backing_file and not flags & BDRV_O_NO_BACKING:
        if path_has_protocol(backing_file) or os.path.isabs(backing_file) or backing_file.startswith("json:") \
                or path_has_protocol(filename):
            full = backing_file
        else:
            full = os.path.join(os.path.dirname(filename), backing_file)
        back_opts: dict[str, Any] = {"force-share": "on"}
        if backing_fmt:
            back_opts["driver"] = backing_fmt
        try:
            bs = bdrv_open(full, None, back_opts, BDRV_O_NO_IO | (flags & ~(BDRV_O_RDWR | BDRV_O_NO_BACKING)))
        except Error as e:
            raise Error(e.msg, errno=e.errno, hint="Could not open backing image.\n") from None
        try:
            if not backing_fmt:
                raise Error("Backing file specified without backing format",
                            hint=f"Detected format of {bs.drv.format_name}.\0")
            if size == -1:
                size = bdrv_getlength(bs)
                if size < 0:
                    raise Error(f"Could not get size of '{backing_file}': {strerror(size)}")
                opts.set_number(BLOCK_OPT_SIZE, size)
        finally:
            bdrv_unref(bs)
    elif backing_file and not backing_fmt:
        raise Error("Backing file specified without backing format")
    if size == -1:
        raise Error("Image creation needs a size parameter")
    if not quiet:
        sys.stdout.write(f"Formatting '{filename}', fmt={fmt} {opts.print(' ')}\n")
        sys.stdout.flush()
    try:
        bdrv_create(drv, filename, opts)
    except Error as e:
        if e.errno == errno.EFBIG:
            hint = " (try using a larger cluster size)" if opts.get_str(BLOCK_OPT_CLUSTER_SIZE) else ""
            raise Error(f"The image size is too large for file format '{fmt}'{hint}") from None
        raise


# --------------------------------------------------------------------------
# help


def help_() -> None:
    formats = " ".join(d.format_name for d in bdrv_drivers())
    sys.stdout.write(
        QEMU_IMG_VERSION +
        "usage: qemu-img [standard options] command [command options]\n"
        "QEMU disk image utility\n"
        "\n"
        "    '-h', '--help'       display this help and exit\n"
        "    '-V', '--version'    output version information and exit\n"
        "    '-T', '--trace'      [[enable=]<pattern>][,events=<file>][,file=<file>]\n"
        "                         specify tracing options\n"
        "\n"
        "Command syntax:\n"
        "  amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename\n"
        "  bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n] [--no-drain] "
        "[-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename\n"
        "  bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file "
        "[-F source_fmt]] [-g granularity] [--object objectdef] [--image-opts | -f fmt] filename bitmap\n"
        "  check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] "
        "[-T src_cache] [-U] filename\n"
        "  commit [--object objectdef] [--image-opts] [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] "
        "[-d] [-p] filename\n"
        "  compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] "
        "filename1 filename2\n"
        "  convert [--object objectdef] [--image-opts] [--target-image-opts] [--target-is-zero] [--bitmaps] "
        "[-U] [-C] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] [-B backing_file "
        "[-F backing_fmt]] [-o options] [-l snapshot_param] [-S sparse_size] [-r rate_limit] "
        "[-m num_coroutines] [-W] [--salvage] filename [filename2 [...]] output_filename\n"
        "  create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] "
        "filename [size]\n"
        "  dd [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] "
        "if=input of=output\n"
        "  info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename\n"
        "  map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] [--max-length=len] "
        "[--output=ofmt] [-U] filename\n"
        "  measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [--object objectdef] "
        "[--image-opts] [-f fmt] [-l snapshot_param] filename]\n"
        "  snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot | "
        "-d snapshot] filename\n"
        "  rebase [--object objectdef] [--image-opts] [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] "
        "-b backing_file [-F backing_fmt] filename\n"
        "  resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] "
        "filename [+ | -]size\n"
        "\n"
        "Command parameters:\n"
        "  'filename' is a disk image filename\n"
        "  'objectdef' is a QEMU user creatable object definition. See the qemu(1)\n"
        "    manual page for a description of the object properties. The most common\n"
        "    object type is a 'secret', which is used to supply passwords and/or\n"
        "    encryption keys.\n"
        "  'fmt' is the disk image format. It is guessed automatically in most cases\n"
        "  'cache' is the cache mode used to write the output disk image, the valid\n"
        "    options are: 'none', 'writeback' (default, except for convert), 'writethrough',\n"
        "    'directsync' and 'unsafe' (default for convert)\n"
        "  'src_cache' is the cache mode used to read input disk images, the valid\n"
        "    options are the same as for the 'cache' option\n"
        "  'size' is the disk image size in bytes. Optional suffixes\n"
        "    'k' or 'K' (kilobyte, 1024), 'M' (megabyte, 1024k), 'G' (gigabyte, 1024M),\n"
        "    'T' (terabyte, 1024G), 'P' (petabyte, 1024T) and 'E' (exabyte, 1024P)  are\n"
        "    supported. 'b' is ignored.\n"
        "  'output_filename' is the destination disk image filename\n"
        "  'output_fmt' is the destination format\n"
        "  'options' is a comma separated list of format specific options in a\n"
        "    name=value format. Use -o help for an overview of the options supported by\n"
        "    the used format\n"
        "  'snapshot_param' is param used for internal snapshot, format\n"
        "    is 'snapshot.id=[ID],snapshot.name=[NAME]', or\n"
        "    '[ID_OR_NAME]'\n"
        "  '-c' indicates that target image must be compressed (qcow format only)\n"
        "  '-u' allows unsafe backing chains. For rebasing, it is assumed that old and\n"
        "       new backing file match exactly. The image doesn't need a working\n"
        "       backing file before rebasing in this case (useful for renaming the\n"
        "       backing file). For image creation, allow creating without attempting\n"
        "       to open the backing file.\n"
        "  '-h' with or without a command shows this help and lists the supported formats\n"
        "  '-p' show progress of command (only certain commands)\n"
        "  '-q' use Quiet mode - do not print any output (except errors)\n"
        "  '-S' indicates the consecutive number of bytes (defaults to 4k) that must\n"
        "       contain only zeros for qemu-img to create a sparse image during\n"
        "       conversion. If the number of bytes is 0, the source will not be scanned for\n"
        "       unallocated or zero sectors, and the destination image will always be\n"
        "       fully allocated\n"
        "  '--output' takes the format in which the output must be done (human or json)\n"
        "  '-n' skips the target volume creation (useful if the volume is created\n"
        "       prior to running qemu-img)\n"
        "\n"
        "Parameters to bitmap subcommand:\n"
        "  'bitmap' is the name of the bitmap to manipulate, through one or more\n"
        "       actions from '--add', '--remove', '--clear', '--enable', '--disable',\n"
        "       or '--merge source'\n"
        "  '-g granularity' sets the granularity for '--add' actions\n"
        "  '-b source' and '-F src_fmt' tell '--merge' actions to find the source\n"
        "       bitmaps from an alternative file\n"
        "\n"
        "Parameters to check subcommand:\n"
        "  '-r' tries to repair any inconsistencies that are found during the check.\n"
        "       '-r leaks' repairs only cluster leaks, whereas '-r all' fixes all\n"
        "       kinds of errors, with a higher risk of choosing the wrong fix or\n"
        "       hiding corruption that has already occurred.\n"
        "\n"
        "Parameters to convert subcommand:\n"
        "  '--bitmaps' copies all top-level persistent bitmaps to destination\n"
        "  '-m' specifies how many coroutines work in parallel during the convert\n"
        "       process (defaults to 8)\n"
        "  '-W' allow to write to the target out of order rather than sequential\n"
        "\n"
        "Parameters to snapshot subcommand:\n"
        "  'snapshot' is the name of the snapshot to create, apply or delete\n"
        "  '-a' applies a snapshot (revert disk to saved state)\n"
        "  '-c' creates a snapshot\n"
        "  '-d' deletes a snapshot\n"
        "  '-l' lists all snapshots in the given image\n"
        "\n"
        "Parameters to compare subcommand:\n"
        "  '-f' first image format\n"
        "  '-F' second image format\n"
        "  '-s' run in Strict mode - fail on different image size or sector allocation\n"
        "\n"
        "Parameters to dd subcommand:\n"
        "  'bs=BYTES' read and write up to BYTES bytes at a time (default: 512)\n"
        "  'count=N' copy only N input blocks\n"
        "  'if=FILE' read from FILE\n"
        "  'of=FILE' write to FILE\n"
        "  'skip=N' skip N bs-sized blocks at the start of input\n"
        f"\nSupported formats: {formats}\n"
        "\n"
        "See <https://qemu.org/contribute/report-a-bug> for how to report bugs.\n"
        "More information on the QEMU project at <https://qemu.org>.\n")
    raise ToolExit(0)


N = util.no_argument
R = util.required_argument
OBJECT = ("object", R, "object")
IMAGE_OPTS = ("image-opts", N, "image-opts")
FORCE_SHARE = ("force-share", N, "U")
HELP = ("help", N, "h")


# --------------------------------------------------------------------------
# create


def img_create(argv: list[str]) -> int:
    base_fmt = base_filename = None
    options: str | None = None
    flags = 0
    common = CommonOpts(fmt="raw")
    o = Opts(argv, ":F:b:f:ho:qu", [HELP, OBJECT])
    for c, arg in o:
        if common.parse(c, arg):
            continue
        if c == "F":
            base_fmt = arg
        elif c == "b":
            base_filename = arg
        elif c == "o":
            options = accumulate_options(options, arg)
            if options is None:
                return 1
        elif c == "u":
            flags |= BDRV_O_NO_BACKING
    fmt = common.fmt
    rest = o.rest
    filename = rest[0] if rest else None
    if options and has_help_option(options):
        return print_block_option_help(filename, fmt)
    if not rest:
        error_exit("Expecting image file name")
    if not add_objects(common.objects):
        return 1
    img_size = -1
    if len(rest) > 1:
        sval = cvtnum("image size", rest[1])
        if sval < 0:
            return 1
        img_size = sval
    if len(rest) > 2:
        error_exit(f"Unexpected argument: {rest[2]}")
    try:
        bdrv_img_create(filename, fmt, base_filename, base_fmt, options, img_size, flags, common.quiet)
    except Error as e:
        report.error_err(e, f"{filename}: ")
        return 1
    return 0


# --------------------------------------------------------------------------
# check


def collect_image_check(bs: BlockDriverState, filename: str, fix: int) -> tuple[int, dict]:
    res = BdrvCheckResult()
    ret = bdrv_check(bs, res, fix)
    if ret < 0:
        return ret, {}
    check = {"filename": filename, "format": bs.drv.format_name, "check-errors": res.check_errors}
    if res.image_end_offset:
        check["image-end-offset"] = res.image_end_offset
    if res.corruptions:
        check["corruptions"] = res.corruptions
    if res.leaks:
        check["leaks"] = res.leaks
    if res.corruptions_fixed:
        check["corruptions-fixed"] = res.corruptions_fixed
    if res.leaks_fixed:
        check["leaks-fixed"] = res.leaks_fixed
    for key, val in (("total-clusters", res.bfi.total_clusters), ("allocated-clusters", res.bfi.allocated_clusters),
                     ("fragmented-clusters", res.bfi.fragmented_clusters),
                     ("compressed-clusters", res.bfi.compressed_clusters)):
        if val:
            check[key] = val
    check["_fixed"] = (res.corruptions_fixed, res.leaks_fixed)
    return 0, check


def dump_human_image_check(check: dict, quiet: bool) -> None:
    corr, leaks, errs = check.get("corruptions", 0), check.get("leaks", 0), check.get("check-errors", 0)
    if not (corr or leaks or errs):
        qprintf(quiet, "No errors were found on the image.\n")
    else:
        if corr:
            qprintf(quiet, f"\n{corr} errors were found on the image.\n"
                           "Data may be corrupted, or further writes to the image may corrupt it.\n")
        if leaks:
            qprintf(quiet, f"\n{leaks} leaked clusters were found on the image.\n"
                           "This means waste of disk space, but no harm to data.\n")
        if errs:
            qprintf(quiet, f"\n{errs} internal errors have occurred during the check.\n")
    total, alloc = check.get("total-clusters", 0), check.get("allocated-clusters", 0)
    if total and alloc:
        qprintf(quiet, "%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n" % (
            alloc, total, alloc * 100.0 / total, check.get("fragmented-clusters", 0) * 100.0 / alloc,
            check.get("compressed-clusters", 0) * 100.0 / alloc))
    if check.get("image-end-offset"):
        qprintf(quiet, f"Image end offset: {check['image-end-offset']}\n")


def img_check(argv: list[str]) -> int:
    output = None
    cache = BDRV_DEFAULT_CACHE
    fix = 0
    flags = BDRV_O_CHECK
    common = CommonOpts()
    o = Opts(argv, ":hf:r:T:qU", [HELP, ("format", R, "f"), ("repair", R, "r"), ("output", R, "output"),
                                   OBJECT, IMAGE_OPTS, FORCE_SHARE])
    for c, arg in o:
        if common.parse(c, arg):
            continue
        if c == "r":
            flags |= BDRV_O_RDWR
            if arg == "leaks":
                fix = BDRV_FIX_LEAKS
            elif arg == "all":
                fix = BDRV_FIX_LEAKS | BDRV_FIX_ERRORS
            else:
                error_exit(f"Unknown option value for -r (expecting 'leaks' or 'all'): {arg}")
        elif c == "output":
            output = arg
        elif c == "T":
            cache = arg
    filename = one_image_file_name(o.rest)
    ofmt = parse_output(output)
    if ofmt is None:
        return 1
    if not add_objects(common.objects):
        return 1
    parsed = parse_cache(cache, flags, "source cache")
    if parsed is None:
        return 1
    flags, writethrough = parsed
    quiet = common.quiet
    blk = img_open(common.image_opts, filename, common.fmt, flags, writethrough, quiet, common.force_share)
    if blk is None:
        return 1
    try:
        bs = blk_bs(blk)
        ret, check = collect_image_check(bs, filename, fix)
        if ret == -errno.ENOTSUP:
            report.error("This image format does not support checks")
            return 63
        if ret == 0 and (check["_fixed"][0] or check["_fixed"][1]):
            corruptions_fixed, leaks_fixed = check["_fixed"]
            if ofmt == "human":
                qprintf(quiet, "The following inconsistencies were found and repaired:\n\n"
                               f"    {leaks_fixed} leaked clusters\n"
                               f"    {corruptions_fixed} corruptions\n\n"
                               "Double checking the fixed image now...\n")
            # QEMU 7.2 copies the counts back but not their has_ flags: JSON does not show them.
            ret, check = collect_image_check(bs, filename, 0)
        if ret == 0:
            check.pop("_fixed", None)
            if ofmt == "human":
                dump_human_image_check(check, quiet)
            else:
                qprintf(quiet, qobject_to_json_pretty(check, True) + "\n")
        if ret or check.get("check-errors"):
            if ret:
                report.error(f"Check failed: {strerror(ret)}")
            else:
                report.error("Check failed")
            return 1
        if check.get("corruptions"):
            return 2
        if check.get("leaks"):
            return 3
        return 0
    finally:
        blk_unref(blk)


# --------------------------------------------------------------------------
# commit


def img_commit(argv: list[str]) -> int:
    base = None
    cache = BDRV_DEFAULT_CACHE
    progress = drop = False
    common = CommonOpts()
    o = Opts(argv, ":f:ht:b:dpqr:", [HELP, OBJECT, IMAGE_OPTS])
    for c, arg in o:
        if common.parse(c, arg):
            continue
        if c == "t":
            cache = arg
        elif c == "b":
            base = arg
            drop = True
        elif c == "d":
            drop = True
        elif c == "p":
            progress = True
        elif c == "r":
            rate = cvtnum("rate limit", arg)
            if rate < 0:
                return 1
    quiet = common.quiet
    if quiet:
        progress = False
    filename = one_image_file_name(o.rest)
    if not add_objects(common.objects):
        return 1
    parsed = parse_cache(cache, BDRV_O_RDWR | BDRV_O_UNMAP)
    if parsed is None:
        return 1
    flags, writethrough = parsed
    blk = img_open(common.image_opts, filename, common.fmt, flags, writethrough, quiet, False)
    if blk is None:
        return 1
    prog = util.Progress(progress, 1.0)
    prog.print(0.0, 100)
    err: Error | None = None
    try:
        bs = blk_bs(blk)
        if base:
            base_bs = bdrv_find_backing_image(bs, base)
            if base_bs is None:
                err = Error(f"Did not find '{base}' in the backing chain of '{filename}'")
        else:
            base_bs = backing_bs(bs)
            if base_bs is None:
                err = Error("Image does not have a backing file")
        if err is None:
            err = _commit(bs, base_bs, prog)
        if err is None and not drop:
            hook = getattr(bs.drv, "bdrv_make_empty", None)
            if hook is not None:
                ret = hook(bs)
                if ret:
                    err = Error(f"Could not empty {filename}: {strerror(ret)}")
    finally:
        prog.end()
        blk_unref(blk)
    if err is not None:
        report.error_err(err)
        return 1
    qprintf(quiet, "Image committed.\n")
    return 0


def _commit(top: BlockDriverState, base: BlockDriverState, prog: util.Progress) -> Error | None:
    """Copy what lies above ``base`` in ``top``'s chain into ``base`` (the commit job's copy loop).

    As QEMU's commit job does, the base is reopened read-write (bdrv_reopen_set_read_only) for
    the copy, written through a BlockBackend of its own that shares only reading, and reopened
    read-only again at the end.  Only ranges allocated above the base are copied.
    """
    from qblock.block.io import bdrv_is_allocated_above
    length = bdrv_getlength(top)
    if length < 0:
        return Error(f"Block job failed: {strerror(length)}")
    base_read_only = bdrv_is_read_only(base)
    if base_read_only:
        try:
            bdrv_reopen_set_read_only(base, False)
        except Error as e:
            return e
    base_blk = blk_new(qemu_get_aio_context(), BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE | BLK_PERM_RESIZE,
                       BLK_PERM_CONSISTENT_READ | BLK_PERM_GRAPH_MOD | BLK_PERM_WRITE_UNCHANGED)
    try:
        blk_insert_bs(base_blk, base)
    except Error as e:
        blk_unref(base_blk)
        _commit_base_read_only(base, base_read_only)
        return e
    top_blk = blk_new(qemu_get_aio_context(), BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
    try:
        blk_insert_bs(top_blk, top)
        base_len = blk_getlength(base_blk)
        if 0 <= base_len < length:
            errp: list = []
            ret = blk_truncate(base_blk, length, False, PreallocMode.PREALLOC_MODE_OFF, errp)
            if ret < 0:
                return errp[0] if errp else Error(f"Block job failed: {strerror(ret)}")
        offset = 0
        buf = bytearray(IO_BUF_SIZE)
        while offset < length:
            n = min(IO_BUF_SIZE, length - offset)
            ret, n = bdrv_is_allocated_above(top, base, offset, n)
            if ret < 0:
                return Error(f"Block job failed: {strerror(ret)}")
            if ret:
                r = blk_pread(top_blk, offset, buf, n)
                if r < 0:
                    return Error(f"Block job failed: {strerror(r)}")
                r = blk_pwrite(base_blk, offset, memoryview(buf)[:n], n)
                if r < 0:
                    return Error(f"Block job failed: {strerror(r)}")
            offset += n
            prog.print(offset * 100.0 / length, 0)
        r = blk_flush(base_blk)
        if r < 0:
            return Error(f"Block job failed: {strerror(r)}")
    finally:
        blk_unref(top_blk)
        blk_unref(base_blk)
        _commit_base_read_only(base, base_read_only)
    prog.print(100.0, 0)
    return None


def _commit_base_read_only(base: BlockDriverState, base_read_only: bool) -> None:
    """Give the base back its read-only state (commit_clean); a failure here is not the job's."""
    if base_read_only:
        try:
            bdrv_reopen_set_read_only(base, True)
        except Error:
            pass


# --------------------------------------------------------------------------
# compare


def find_nonzero(buf: memoryview, n: int) -> int:
    end = n // BDRV_SECTOR_SIZE * BDRV_SECTOR_SIZE
    zero = bytes(BDRV_SECTOR_SIZE)
    i = 0
    while i < end:
        if buf[i:i + BDRV_SECTOR_SIZE] != zero:
            return i
        i += BDRV_SECTOR_SIZE
    if i < n and bytes(buf[i:n]).count(0) != n - i:
        return i
    return -1


def compare_buffers(buf1: memoryview, buf2: memoryview, nbytes: int) -> tuple[int, int]:
    """(1 if the first sectors differ else 0, length of the prefix with the same status), as QEMU's."""
    i = min(nbytes, BDRV_SECTOR_SIZE)
    res = buf1[:i] != buf2[:i]
    if buf1[:nbytes] == buf2[:nbytes] and not res:
        return 0, nbytes
    while i < nbytes:
        ln = min(nbytes - i, BDRV_SECTOR_SIZE)
        if (buf1[i:i + ln] != buf2[i:i + ln]) != res:
            break
        i += ln
    return int(res), i


def check_empty_sectors(blk: BlockBackend, offset: int, nbytes: int, filename: str, buf: memoryview,
                        quiet: bool) -> int:
    ret = blk_pread(blk, offset, buf, nbytes)
    if ret < 0:
        report.error(f"Error while reading offset {offset} of {filename}: {strerror(ret)}")
        return 4
    idx = find_nonzero(buf, nbytes)
    if idx >= 0:
        qprintf(quiet, f"Content mismatch at offset {offset + idx}!\n")
        return 1
    return 0


def img_compare(argv: list[str]) -> int:
    from qblock.block.io import bdrv_block_status_above
    fmt2 = None
    cache = BDRV_DEFAULT_CACHE
    progress = strict = False
    common = CommonOpts()
    o = Opts(argv, ":hf:F:T:pqsU", [HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE])
    for c, arg in o:
        if common.parse(c, arg):
            continue
        if c == "F":
            fmt2 = arg
        elif c == "T":
            cache = arg
        elif c == "p":
            progress = True
        elif c == "s":
            strict = True
    quiet, image_opts, force_share = common.quiet, common.image_opts, common.force_share
    if quiet:
        progress = False
    rest = o.rest
    if len(rest) != 2:
        error_exit("Expecting two image file names")
    filename1, filename2 = rest
    if not add_objects(common.objects):
        return 2
    prog = util.Progress(progress, 2.0)
    try:
        parsed = parse_cache(cache, 0, "source cache")
        if parsed is None:
            return 2
        flags, writethrough = parsed
        blk1 = img_open(image_opts, filename1, common.fmt, flags, writethrough, quiet, force_share)
        if blk1 is None:
            return 2
        try:
            blk2 = img_open(image_opts, filename2, fmt2, flags, writethrough, quiet, force_share)
            if blk2 is None:
                return 2
            try:
                return _compare(blk1, blk2, filename1, filename2, strict, quiet, prog, bdrv_block_status_above)
            finally:
                blk_unref(blk2)
        finally:
            blk_unref(blk1)
    finally:
        prog.end()


def _compare(blk1, blk2, filename1, filename2, strict, quiet, prog, block_status) -> int:
    bs1, bs2 = blk_bs(blk1), blk_bs(blk2)
    buf1 = memoryview(bytearray(IO_BUF_SIZE))
    buf2 = memoryview(bytearray(IO_BUF_SIZE))
    total_size1 = blk_getlength(blk1)
    if total_size1 < 0:
        report.error(f"Can't get size of {filename1}: {strerror(total_size1)}")
        return 4
    total_size2 = blk_getlength(blk2)
    if total_size2 < 0:
        report.error(f"Can't get size of {filename2}: {strerror(total_size2)}")
        return 4
    total_size = min(total_size1, total_size2)
    progress_base = max(total_size1, total_size2)
    prog.print(0, 100)
    if strict and total_size1 != total_size2:
        qprintf(quiet, "Strict mode: Image size mismatch!\n")
        return 1
    offset = 0
    while offset < total_size:
        status1, pnum1, _, _ = block_status(bs1, None, offset, total_size1 - offset)
        if status1 < 0:
            report.error(f"Sector allocation test failed for {filename1}")
            return 3
        allocated1 = status1 & BDRV_BLOCK_ALLOCATED
        status2, pnum2, _, _ = block_status(bs2, None, offset, total_size2 - offset)
        if status2 < 0:
            report.error(f"Sector allocation test failed for {filename2}")
            return 3
        allocated2 = status2 & BDRV_BLOCK_ALLOCATED
        chunk = min(pnum1, pnum2)
        if strict and status1 != status2:
            qprintf(quiet, f"Strict mode: Offset {offset} block status mismatch!\n")
            return 1
        if status1 & BDRV_BLOCK_ZERO and status2 & BDRV_BLOCK_ZERO:
            pass
        elif bool(allocated1) == bool(allocated2):
            if allocated1:
                chunk = min(chunk, IO_BUF_SIZE)
                ret = blk_pread(blk1, offset, buf1, chunk)
                if ret < 0:
                    report.error(f"Error while reading offset {offset} of {filename1}: {strerror(ret)}")
                    return 4
                ret = blk_pread(blk2, offset, buf2, chunk)
                if ret < 0:
                    report.error(f"Error while reading offset {offset} of {filename2}: {strerror(ret)}")
                    return 4
                ret, pnum = compare_buffers(buf1, buf2, chunk)
                if ret or pnum != chunk:
                    qprintf(quiet, f"Content mismatch at offset {offset + (0 if ret else pnum)}!\n")
                    return 1
        else:
            chunk = min(chunk, IO_BUF_SIZE)
            if allocated1:
                ret = check_empty_sectors(blk1, offset, chunk, filename1, buf1, quiet)
            else:
                ret = check_empty_sectors(blk2, offset, chunk, filename2, buf1, quiet)
            if ret:
                return ret
        offset += chunk
        prog.print(chunk / progress_base * 100, 100)
    if total_size1 != total_size2:
        qprintf(quiet, "Warning: Image size mismatch!\n")
        if total_size1 > total_size2:
            blk_over, filename_over = blk1, filename1
        else:
            blk_over, filename_over = blk2, filename2
        while offset < progress_base:
            ret, chunk, _, _ = block_status(blk_bs(blk_over), None, offset, progress_base - offset)
            if ret < 0:
                report.error(f"Sector allocation test failed for {filename_over}")
                return 3
            if ret & BDRV_BLOCK_ALLOCATED and not ret & BDRV_BLOCK_ZERO:
                chunk = min(chunk, IO_BUF_SIZE)
                ret = check_empty_sectors(blk_over, offset, chunk, filename_over, buf1, quiet)
                if ret:
                    return ret
            offset += chunk
            prog.print(chunk / progress_base * 100, 100)
    qprintf(quiet, "Images are identical.\n")
    return 0


# --------------------------------------------------------------------------
# convert

BLK_DATA, BLK_ZERO, BLK_BACKING_FILE = range(3)


def _is_zero(view: memoryview) -> bool:
    return not any(view) if len(view) < 64 else view == bytes(len(view))


def is_allocated_sectors(buf: memoryview, n: int, sector_num: int, alignment: int) -> tuple[int, int]:
    """(1 if the first sector holds data else 0, sectors with the same status), aligned as QEMU aligns them."""
    if n <= 0:
        return 0, 0
    zero = bytes(BDRV_SECTOR_SIZE)
    is_zero = buf[:BDRV_SECTOR_SIZE] == zero
    # Fast path: the whole rest has the first sector's status.
    whole = buf[:n * BDRV_SECTOR_SIZE]
    if is_zero and whole == bytes(len(whole)):
        i = n
    else:
        i = 1
        while i < n:
            if (buf[i * BDRV_SECTOR_SIZE:(i + 1) * BDRV_SECTOR_SIZE] == zero) != is_zero:
                break
            i += 1
    tail = (sector_num + i) & (alignment - 1)
    if tail:
        if is_zero and i <= tail:
            is_zero = False
        if not is_zero:
            i += alignment - tail
            i = min(i, n)
        else:
            i -= tail
    return (0 if is_zero else 1), i


def is_allocated_sectors_min(buf: memoryview, n: int, min_: int, sector_num: int, alignment: int) -> tuple[int, int]:
    if n < min_:
        min_ = n
    ret, pnum = is_allocated_sectors(buf, n, sector_num, alignment)
    if not ret:
        return ret, pnum
    num_used = pnum
    pos = pnum
    n -= pnum
    sector_num += pnum
    num_checked = num_used
    while n > 0:
        ret, pnum = is_allocated_sectors(buf[pos * BDRV_SECTOR_SIZE:], n, sector_num, alignment)
        pos += pnum
        n -= pnum
        sector_num += pnum
        num_checked += pnum
        if ret:
            num_used = num_checked
        elif pnum >= min_:
            break
    return 1, num_used


@attrs.define(eq=False)
class ImgConvertState:
    src: list = attrs.field(factory=list)
    src_sectors: list = attrs.field(factory=list)
    src_num: int = 0
    total_sectors: int = 0
    allocated_sectors: int = 0
    allocated_done: int = 0
    sector_num: int = 0
    wr_offs: int = 0
    status: int = BLK_DATA
    sector_next_status: int = 0
    target: Any = None
    has_zero_init: bool = False
    compressed: bool = False
    target_is_new: bool = True
    target_has_backing: bool = False
    target_backing_sectors: int = -1
    wr_in_order: bool = True
    copy_range: bool = False
    salvage: bool = False
    quiet: bool = False
    min_sparse: int = 8
    alignment: int = 1
    cluster_sectors: int = 0
    buf_sectors: int = IO_BUF_SIZE // BDRV_SECTOR_SIZE
    num_coroutines: int = 8
    running_coroutines: int = 0
    co: list = attrs.field(factory=lambda: [None] * MAX_COROUTINES)
    wait_sector_num: list = attrs.field(factory=lambda: [-1] * MAX_COROUTINES)
    lock: Any = None
    ret: int = -errno.EINPROGRESS
    progress: Any = None


def convert_select_part(s: ImgConvertState, sector_num: int) -> tuple[int, int]:
    src_cur = 0
    src_cur_offset = 0
    while sector_num - src_cur_offset >= s.src_sectors[src_cur]:
        src_cur_offset += s.src_sectors[src_cur]
        src_cur += 1
    return src_cur, src_cur_offset


def convert_iteration_sectors(s: ImgConvertState, sector_num: int) -> int:
    from qblock.block.io import bdrv_block_status, bdrv_block_status_above
    src_cur, src_cur_offset = convert_select_part(s, sector_num)
    n = min(s.total_sectors - sector_num, BDRV_REQUEST_MAX_SECTORS)
    post_backing_zero = False
    if s.target_backing_sectors >= 0:
        if sector_num >= s.target_backing_sectors:
            post_backing_zero = True
        elif sector_num + n > s.target_backing_sectors:
            n = s.target_backing_sectors - sector_num
    if s.sector_next_status <= sector_num:
        offset = (sector_num - src_cur_offset) * BDRV_SECTOR_SIZE
        while True:
            count = n * BDRV_SECTOR_SIZE
            bs = blk_bs(s.src[src_cur])
            if s.target_has_backing:
                ret, count, _, _ = bdrv_block_status(bs, offset, count)
            else:
                ret, count, _, _ = bdrv_block_status_above(bs, None, offset, count)
            if ret < 0:
                if s.salvage:
                    if n == 1:
                        if not s.quiet:
                            report.warn(f"error while reading block status at offset {offset}: {strerror(ret)}")
                        ret = BDRV_BLOCK_DATA
                        count = BDRV_SECTOR_SIZE
                    else:
                        n = -(-n // 4)
                        continue
                else:
                    report.error(f"error while reading block status at offset {offset}: {strerror(ret)}")
                    return ret
            break
        n = -(-count // BDRV_SECTOR_SIZE)
        if ret & BDRV_BLOCK_ZERO:
            s.status = BLK_BACKING_FILE if post_backing_zero else BLK_ZERO
        elif ret & BDRV_BLOCK_DATA:
            s.status = BLK_DATA
        else:
            s.status = BLK_BACKING_FILE if s.target_has_backing else BLK_DATA
        s.sector_next_status = sector_num + n
    n = min(n, s.sector_next_status - sector_num)
    if s.status == BLK_DATA:
        n = min(n, s.buf_sectors)
    if s.compressed:
        if n < s.cluster_sectors:
            n = min(s.cluster_sectors, s.total_sectors - sector_num)
            s.status = BLK_DATA
        else:
            n = n // s.cluster_sectors * s.cluster_sectors
    return n


def convert_co_read(s: ImgConvertState, sector_num: int, nb_sectors: int, buf: memoryview) -> int:
    single_read_until = 0
    pos = 0
    while nb_sectors > 0:
        src_cur, src_cur_offset = convert_select_part(s, sector_num)
        blk = s.src[src_cur]
        bs_sectors = s.src_sectors[src_cur]
        offset = (sector_num - src_cur_offset) << 9
        n = min(nb_sectors, bs_sectors - (sector_num - src_cur_offset))
        if single_read_until > offset:
            n = 1
        view = buf[pos:pos + n * BDRV_SECTOR_SIZE]
        ret = blk_co_preadv(blk, offset, n << 9, QEMUIOVector([view], -1), 0)
        if ret < 0:
            if s.salvage:
                if n > 1:
                    single_read_until = offset + (n << 9)
                    continue
                if not s.quiet:
                    report.warn(f"error while reading offset {offset}: {strerror(ret)}")
                view[:BDRV_SECTOR_SIZE] = bytes(BDRV_SECTOR_SIZE)
            else:
                return ret
        sector_num += n
        nb_sectors -= n
        pos += n * BDRV_SECTOR_SIZE
    return 0


def convert_co_write(s: ImgConvertState, sector_num: int, nb_sectors: int, buf: memoryview, status: int) -> int:
    pos = 0
    while nb_sectors > 0:
        n = nb_sectors
        flags = BDRV_REQ_WRITE_COMPRESSED if s.compressed else 0
        if status == BLK_BACKING_FILE:
            pass
        else:
            write_data = False
            if status == BLK_DATA:
                view = buf[pos:pos + n * BDRV_SECTOR_SIZE]
                if not s.min_sparse:
                    write_data = True
                elif not s.compressed:
                    used, n = is_allocated_sectors_min(view, n, s.min_sparse, sector_num, s.alignment)
                    write_data = bool(used)
                else:
                    write_data = not _is_zero(view)
            if write_data:
                view = buf[pos:pos + n * BDRV_SECTOR_SIZE]
                ret = blk_co_pwritev(s.target, sector_num << 9, n << 9, QEMUIOVector([view], -1), flags)
                if ret < 0:
                    return ret
            elif not s.has_zero_init:
                ret = blk_co_pwrite_zeroes(s.target, sector_num << 9, n << 9, BDRV_REQ_MAY_UNMAP)
                if ret < 0:
                    return ret
        sector_num += n
        nb_sectors -= n
        pos += n * BDRV_SECTOR_SIZE
    return 0


def convert_co_do_copy(s: ImgConvertState) -> None:
    from qblock.util.coroutine import qemu_coroutine_enter, qemu_coroutine_self, qemu_coroutine_yield
    from qblock.util.coroutine_lock import qemu_co_mutex_lock, qemu_co_mutex_unlock
    me = qemu_coroutine_self()
    index = next(i for i in range(s.num_coroutines) if s.co[i] is me)
    s.running_coroutines += 1
    buf = memoryview(bytearray(s.buf_sectors * BDRV_SECTOR_SIZE))
    while True:
        qemu_co_mutex_lock(s.lock)
        if s.ret != -errno.EINPROGRESS or s.sector_num >= s.total_sectors:
            qemu_co_mutex_unlock(s.lock)
            break
        n = convert_iteration_sectors(s, s.sector_num)
        if n < 0:
            qemu_co_mutex_unlock(s.lock)
            s.ret = n
            break
        sector_num = s.sector_num
        status = s.status
        if not s.min_sparse and s.status == BLK_ZERO:
            n = min(n, s.buf_sectors)
        s.sector_num += n
        qemu_co_mutex_unlock(s.lock)
        if status == BLK_DATA or (not s.min_sparse and status == BLK_ZERO):
            s.allocated_done += n
            s.progress.print(100.0 * s.allocated_done / s.allocated_sectors, 0)
        if status == BLK_DATA:
            ret = convert_co_read(s, sector_num, n, buf)
            if ret < 0:
                report.error(f"error while reading at byte {sector_num * BDRV_SECTOR_SIZE}: {strerror(ret)}")
                s.ret = ret
        elif not s.min_sparse and status == BLK_ZERO:
            status = BLK_DATA
            buf[:n * BDRV_SECTOR_SIZE] = bytes(n * BDRV_SECTOR_SIZE)
        if s.wr_in_order:
            while s.wr_offs != sector_num and s.ret == -errno.EINPROGRESS:
                s.wait_sector_num[index] = sector_num
                me.waiting_on = f"convert: write of sector {sector_num} waits for sector {s.wr_offs}"
                qemu_coroutine_yield()
            s.wait_sector_num[index] = -1
        if s.ret == -errno.EINPROGRESS:
            ret = convert_co_write(s, sector_num, n, buf, status)
            if ret < 0:
                report.error(f"error while writing at byte {sector_num * BDRV_SECTOR_SIZE}: {strerror(ret)}")
                s.ret = ret
        if s.wr_in_order:
            s.wr_offs = sector_num + n
            for i in range(s.num_coroutines):
                if s.co[i] is not None and s.wait_sector_num[i] == s.wr_offs:
                    qemu_coroutine_enter(s.co[i])
                    break
    s.co[index] = None
    s.running_coroutines -= 1
    if not s.running_coroutines and s.ret == -errno.EINPROGRESS:
        s.ret = 0


def convert_do_copy(s: ImgConvertState) -> int:
    from qblock.block.io import bdrv_make_zero
    from qblock.util.coroutine import qemu_coroutine_create, qemu_coroutine_enter
    from qblock.util.coroutine_lock import qemu_co_mutex_init
    target_bs = blk_bs(s.target)
    if not s.has_zero_init and s.target_is_new and s.min_sparse and not s.target_has_backing:
        s.has_zero_init = bdrv_has_zero_init(target_bs)
    if not s.has_zero_init and not s.target_has_backing and bdrv_can_write_zeroes_with_unmap(target_bs):
        if bdrv_make_zero(s.target.root, BDRV_REQ_MAY_UNMAP | BDRV_REQ_NO_FALLBACK) == 0:
            s.has_zero_init = True
    if s.compressed:
        if s.cluster_sectors <= 0 or s.cluster_sectors > s.buf_sectors:
            report.error("invalid cluster size")
            return -errno.EINVAL
        s.buf_sectors = s.cluster_sectors
    sector_num = 0
    while sector_num < s.total_sectors:
        n = convert_iteration_sectors(s, sector_num)
        if n < 0:
            return n
        if s.status == BLK_DATA or (not s.min_sparse and s.status == BLK_ZERO):
            s.allocated_sectors += n
        sector_num += n
    s.sector_next_status = 0
    s.ret = -errno.EINPROGRESS
    s.lock = qemu_co_mutex_init(name="convert")
    ctx = qemu_get_aio_context()
    for i in range(s.num_coroutines):
        s.co[i] = qemu_coroutine_create(convert_co_do_copy, s)
        s.wait_sector_num[i] = -1
    for i in range(s.num_coroutines):
        if s.co[i] is not None:
            qemu_coroutine_enter(s.co[i])
    while s.running_coroutines:
        aio_poll(ctx, True)
    return s.ret


def img_convert(argv: list[str]) -> int:
    out_fmt = out_baseimg = backing_fmt = None
    cache = "unsafe"
    src_cache = BDRV_DEFAULT_CACHE
    options: str | None = None
    skip_create = progress = tgt_image_opts = explicit_min_sparse = False
    bitmaps = False
    snapshot = None
    common = CommonOpts()
    s = ImgConvertState()
    o = Opts(argv, ":hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:",
             [HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE, ("target-image-opts", N, "target-image-opts"),
              ("salvage", N, "salvage"), ("target-is-zero", N, "target-is-zero"), ("bitmaps", N, "bitmaps"),
              ("skip-broken-bitmaps", N, "skip-broken-bitmaps")])
    target_is_zero = False
    for c, arg in o:
        if common.parse(c, arg):
            continue
        if c == "F":
            backing_fmt = arg
        elif c == "O":
            out_fmt = arg
        elif c == "B":
            out_baseimg = arg
        elif c == "C":
            s.copy_range = True
        elif c == "c":
            s.compressed = True
        elif c == "o":
            options = accumulate_options(options, arg)
            if options is None:
                return 1
        elif c == "l":
            snapshot = arg
        elif c == "S":
            sval = cvtnum("buffer size for sparse output", arg)
            if sval < 0:
                return 1
            if sval & (BDRV_SECTOR_SIZE - 1) or sval // BDRV_SECTOR_SIZE > MAX_BUF_SECTORS:
                report.error("Invalid buffer size for sparse output specified. Valid sizes are multiples of "
                             f"{BDRV_SECTOR_SIZE} up to {MAX_BUF_SECTORS * BDRV_SECTOR_SIZE}. Select 0 to disable "
                             "sparse detection (fully allocates output).")
                return 1
            s.min_sparse = sval // BDRV_SECTOR_SIZE
            explicit_min_sparse = True
        elif c == "p":
            progress = True
        elif c == "t":
            cache = arg
        elif c == "T":
            src_cache = arg
        elif c == "n":
            skip_create = True
        elif c == "m":
            r, val = util.qemu_strtol(arg, 0)
            if r < 0 or val < 1 or val > MAX_COROUTINES:
                report.error("Invalid number of coroutines. Allowed number of coroutines is between 1 and "
                             f"{MAX_COROUTINES}")
                return 1
            s.num_coroutines = val
        elif c == "W":
            s.wr_in_order = False
        elif c == "r":
            rate = cvtnum("rate limit", arg)
            if rate < 0:
                return 1
        elif c == "salvage":
            s.salvage = True
        elif c == "target-image-opts":
            tgt_image_opts = True
        elif c == "target-is-zero":
            target_is_zero = True
        elif c in ("bitmaps", "skip-broken-bitmaps"):
            bitmaps = True
    s.quiet = common.quiet
    if not out_fmt and not tgt_image_opts:
        out_fmt = "raw"
    if not add_objects(common.objects):
        return 1
    if s.compressed and s.copy_range:
        report.error("Cannot enable copy offloading when -c is used")
        return 1
    if explicit_min_sparse and s.copy_range:
        report.error("Cannot enable copy offloading when -S is used")
        return 1
    if s.copy_range and s.salvage:
        report.error("Cannot use copy offloading in salvaging mode")
        return 1
    if tgt_image_opts and not skip_create:
        report.error("--target-image-opts requires use of -n flag")
        return 1
    if skip_create and options:
        report.error("-o has no effect when skipping image creation")
        report.error("This will become an error in future QEMU versions.")
    if backing_fmt and not out_baseimg:
        report.error("Use of -F backing_fmt requires -B backing_file")
        return 1
    s.src_num = len(o.rest) - 1
    out_filename = o.rest[-1] if s.src_num >= 1 else None
    if options and has_help_option(options):
        if out_fmt:
            return print_block_option_help(out_filename, out_fmt)
        report.error("Option help requires a format be specified")
        return 1
    if s.src_num < 1:
        report.error("Must specify image file name")
        return 1
    if target_is_zero and not skip_create:
        report.error("--target-is-zero requires use of -n flag")
        return 1
    parsed = parse_cache(src_cache, 0, "source cache")
    if parsed is None:
        return 1
    src_flags, src_writethrough = parsed
    if s.quiet:
        progress = False
    s.progress = util.Progress(progress, 1.0)
    s.progress.print(0, 100)
    ret = -1
    try:
        ret = _convert(s, o.rest, common.image_opts, common.fmt, src_flags, src_writethrough, common.force_share,
                       snapshot, bitmaps, skip_create, out_fmt, out_filename, out_baseimg, backing_fmt, options,
                       cache, tgt_image_opts, target_is_zero)
    finally:
        if ret == 0:
            s.progress.print(100, 0)
        s.progress.end()
        if s.target is not None:
            blk_unref(s.target)
        for blk in s.src:
            blk_unref(blk)
    return 1 if ret else 0


def _convert(s: ImgConvertState, files: list[str], image_opts, fmt, src_flags, src_writethrough, force_share,
             snapshot, bitmaps, skip_create, out_fmt, out_filename, out_baseimg, backing_fmt, options, cache,
             tgt_image_opts, target_is_zero) -> int:
    for name in files[:-1]:
        blk = img_open(image_opts, name, fmt, src_flags, src_writethrough, s.quiet, force_share)
        if blk is None:
            return -1
        s.src.append(blk)
        length = blk_getlength(blk)
        if length < 0:
            report.error(f"Could not get size of {name}: {strerror(length)}")
            return -1
        s.src_sectors.append(-(-length // BDRV_SECTOR_SIZE))
        s.total_sectors += s.src_sectors[-1]
    if snapshot is not None:
        if s.src_num > 1:
            report.error("No support for concatenating multiple snapshot")
            return -1
        report.error(snapshot_load_tmp_error(blk_bs(s.src[0])))
        return -1
    opts = None
    drv = None
    if not skip_create:
        drv = bdrv_find_format(out_fmt)
        if drv is None:
            report.error(f"Unknown file format '{out_fmt}'")
            return -1
        try:
            opts = img_create_opts(drv, out_filename)
            if options:
                opts.do_parse(options)
            opts.set_number(BLOCK_OPT_SIZE, s.total_sectors * 512)
            set_backing_opts(opts, out_fmt, out_baseimg, backing_fmt)
        except Error as e:
            report.error_err(e)
            return -1
    if opts is not None and opts.get_str(BLOCK_OPT_BACKING_FILE):
        if not opts.get_str(BLOCK_OPT_BACKING_FMT):
            report.error("Use of backing file requires explicit backing format")
            return -1
        out_baseimg = opts.get_str(BLOCK_OPT_BACKING_FILE)
    s.target_has_backing = bool(out_baseimg)
    if s.src_num > 1 and out_baseimg:
        report.error("Having a backing file for the target makes no sense when concatenating multiple input "
                     "images")
        return -1
    if s.compressed and opts is not None:
        if drv is not None and drv.bdrv_co_pwritev_compressed is None:
            report.error("Compression not supported for this file format")
            return -1
        if opts.get(BLOCK_OPT_ENCRYPT) in (True, "on") or opts.get_str(BLOCK_OPT_ENCRYPT_FORMAT):
            report.error("Compression and encryption not supported at the same time")
            return -1
        prealloc = opts.get_str(BLOCK_OPT_PREALLOC)
        if prealloc and prealloc != "off":
            report.error("Compression and preallocation not supported at the same time")
            return -1
    if bitmaps:
        report.error("Source lacks bitmap support")
        return -1
    if not skip_create:
        try:
            bdrv_create(drv, out_filename, opts)
        except Error as e:
            report.error_err(e, f"{out_filename}: error while converting {out_fmt}: ")
            return -1
    parsed = parse_cache(cache, (BDRV_O_RDWR | BDRV_O_UNMAP) if s.min_sparse else BDRV_O_RDWR)
    if parsed is None:
        return -1
    flags, writethrough = parsed
    if skip_create:
        s.target = img_open(tgt_image_opts, out_filename, out_fmt, flags, writethrough, s.quiet, False)
    else:
        s.target = img_open_file(out_filename, None, out_fmt, flags, writethrough, s.quiet, False)
    if s.target is None:
        return -1
    s.target_is_new = not skip_create
    out_bs = blk_bs(s.target)
    if s.compressed and out_bs.drv.bdrv_co_pwritev_compressed is None:
        report.error("Compression not supported for this file format")
        return -1
    s.buf_sectors = min(MAX_BUF_SECTORS, max(s.buf_sectors, max(out_bs.bl.opt_transfer >> 9,
                                                               out_bs.bl.pdiscard_alignment >> 9)))
    pow2floor = (1 << (s.min_sparse.bit_length() - 1)) if s.min_sparse > 0 else 0
    s.alignment = max(pow2floor, -(-max(out_bs.bl.request_alignment, 1) // BDRV_SECTOR_SIZE))
    if skip_create:
        output_length = blk_getlength(s.target)
        if output_length < 0:
            report.error(f"unable to get output image length: {strerror(output_length)}")
            return -1
        if output_length < s.total_sectors * 512:
            report.error("output file is smaller than input file")
            return -1
    if s.target_has_backing and out_bs.backing is not None:
        blen = bdrv_getlength(out_bs.backing.bs)
        s.target_backing_sectors = blen >> 9 if blen >= 0 else -1
    else:
        s.target_backing_sectors = -1
    ret, bdi = tool_bdrv_get_info(out_bs)
    if ret < 0:
        if s.compressed:
            report.error("could not get block driver info")
            return -1
    else:
        s.compressed = s.compressed or bdi.needs_compressed_writes
        s.cluster_sectors = bdi.cluster_size // BDRV_SECTOR_SIZE
    if target_is_zero:
        s.has_zero_init = True
    ret = convert_do_copy(s)
    if s.compressed and not ret:
        pass  # qblock's compressed writes need no end-of-stream marker
    return ret



# --------------------------------------------------------------------------
# info


def collect_image_info_list(image_opts: bool, filename: str, fmt: str | None, chain: bool,
                            force_share: bool) -> list[dict] | None:
    infos: list[dict] = []
    seen: set[str] = set()
    while filename:
        if filename in seen:
            report.error(f"Backing file '{filename}' creates an infinite loop.")
            return None
        seen.add(filename)
        blk = img_open(image_opts, filename, fmt, BDRV_O_NO_BACKING | BDRV_O_NO_IO, False, False, force_share)
        if blk is None:
            return None
        try:
            info = bdrv_query_image_info(blk_bs(blk))
        except Error as e:
            report.error_err(e)
            blk_unref(blk)
            return None
        infos.append(info)
        blk_unref(blk)
        filename = fmt = None
        image_opts = False
        if chain:
            if "full-backing-filename" in info:
                filename = info["full-backing-filename"]
            elif "backing-filename" in info:
                report.error("Could not determine absolute backing filename, but backing filename "
                             f"'{info['backing-filename']}' present")
                return None
            fmt = info.get("backing-filename-format")
    return infos


def img_info(argv: list[str]) -> int:
    output = None
    chain = False
    common = CommonOpts()
    o = Opts(argv, ":f:hU", [HELP, ("format", R, "f"), ("output", R, "output"),
                             ("backing-chain", N, "backing-chain"), OBJECT, IMAGE_OPTS, FORCE_SHARE])
    for c, arg in o:
        if common.parse(c, arg):
            continue
        if c == "output":
            output = arg
        elif c == "backing-chain":
            chain = True
    filename = one_image_file_name(o.rest)
    ofmt = parse_output(output)
    if ofmt is None:
        return 1
    if not add_objects(common.objects):
        return 1
    infos = collect_image_info_list(common.image_opts, filename, common.fmt, chain, common.force_share)
    if infos is None:
        return 1
    if ofmt == "human":
        sys.stdout.write("\n".join(bdrv_image_info_dump(i) for i in infos))
    elif chain:
        sys.stdout.write(qobject_to_json_pretty(infos, True) + "\n")
    else:
        sys.stdout.write(qobject_to_json_pretty(infos[0], True) + "\n")
    return 0


# --------------------------------------------------------------------------
# map


@attrs.define
class MapEntry:
    start: int = 0
    length: int = 0
    data: bool = False
    zero: bool = False
    present: bool = False
    depth: int = 0
    offset: int = 0
    has_offset: bool = False
    filename: str | None = None


def get_block_status(bs: BlockDriverState, offset: int, nbytes: int) -> tuple[int, MapEntry | None]:
    from qblock.block.io import bdrv_block_status
    depth = 0
    while True:
        bs = bdrv_skip_filters(bs)
        ret, nbytes, map_, file = bdrv_block_status(bs, offset, nbytes)
        if ret < 0:
            return ret, None
        if ret & (BDRV_BLOCK_ZERO | BDRV_BLOCK_DATA):
            break
        bs = backing_bs(bs)
        if bs is None:
            ret = 0
            break
        depth += 1
    has_offset = bool(ret & BDRV_BLOCK_OFFSET_VALID)
    filename = bdrv_filename(file) if file is not None and has_offset else None
    return 0, MapEntry(start=offset, length=nbytes, data=bool(ret & BDRV_BLOCK_DATA),
                       zero=bool(ret & BDRV_BLOCK_ZERO), present=bool(ret & BDRV_BLOCK_ALLOCATED), depth=depth,
                       offset=map_, has_offset=has_offset, filename=filename)


def entry_mergeable(curr: MapEntry, nxt: MapEntry) -> bool:
    if curr.length == 0:
        return False
    if (curr.zero != nxt.zero or curr.data != nxt.data or curr.depth != nxt.depth or curr.present != nxt.present
            or (curr.filename is None) != (nxt.filename is None) or curr.has_offset != nxt.has_offset):
        return False
    if curr.filename is not None and curr.filename != nxt.filename:
        return False
    if curr.has_offset and curr.offset + curr.length != nxt.offset:
        return False
    return True


def dump_map_entry(ofmt: str, e: MapEntry, nxt: MapEntry | None, out: list[str]) -> int:
    if ofmt == "human":
        if e.data and not e.has_offset:
            sys.stdout.write("".join(out))
            out.clear()
            report.error("File contains external, encrypted or compressed clusters.")
            return -1
        if e.data and not e.zero:
            out.append("%-16s%-16s%-16s%s\n" % (_hex(e.start), _hex(e.length), _hex(e.offset if e.has_offset else 0),
                                                e.filename or ""))
        if nxt is not None and (not nxt.data or nxt.zero):
            nxt.data = False
            nxt.zero = True
    else:
        line = ('{ "start": %d, "length": %d, "depth": %d, "present": %s, "zero": %s, "data": %s'
                % (e.start, e.length, e.depth, _b(e.present), _b(e.zero), _b(e.data)))
        if e.has_offset:
            line += ', "offset": %d' % e.offset
        line += "}"
        if nxt is not None:
            line += ",\n"
        out.append(line)
    return 0


def _hex(v: int) -> str:
    return "%#x" % v if v else "0"


def _b(v: bool) -> str:
    return "true" if v else "false"


def img_map(argv: list[str]) -> int:
    output = None
    start_offset = 0
    max_length = -1
    common = CommonOpts()
    o = Opts(argv, ":f:s:l:hU", [HELP, ("format", R, "f"), ("output", R, "output"), OBJECT, IMAGE_OPTS,
                                 FORCE_SHARE, ("start-offset", R, "s"), ("max-length", R, "l")])
    for c, arg in o:
        if common.parse(c, arg):
            continue
        if c == "output":
            output = arg
        elif c == "s":
            start_offset = cvtnum("start offset", arg)
            if start_offset < 0:
                return 1
        elif c == "l":
            max_length = cvtnum("max length", arg)
            if max_length < 0:
                return 1
    filename = one_image_file_name(o.rest)
    ofmt = parse_output(output)
    if ofmt is None:
        return 1
    if not add_objects(common.objects):
        return 1
    blk = img_open(common.image_opts, filename, common.fmt, 0, False, False, common.force_share)
    if blk is None:
        return 1
    out: list[str] = []
    ret = 0
    try:
        bs = blk_bs(blk)
        if ofmt == "human":
            out.append("%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File"))
        else:
            out.append("[")
        length = blk_getlength(blk)
        if length < 0:
            sys.stdout.write("".join(out))
            report.error(f"Failed to get size for '{filename}'")
            return 1
        if max_length != -1:
            length = min(start_offset + max_length, length)
        curr = MapEntry(start=start_offset)
        while curr.start + curr.length < length:
            offset = curr.start + curr.length
            ret, nxt = get_block_status(bs, offset, length - offset)
            if ret < 0:
                sys.stdout.write("".join(out))
                out.clear()
                report.error(f"Could not read file metadata: {strerror(ret)}")
                return 1
            if entry_mergeable(curr, nxt):
                curr.length += nxt.length
                continue
            if curr.length > 0:
                ret = dump_map_entry(ofmt, curr, nxt, out)
                if ret < 0:
                    return 1
            curr = nxt
        ret = dump_map_entry(ofmt, curr, None, out)
        if ofmt == "json":
            out.append("]\n")
        return 1 if ret < 0 else 0
    finally:
        sys.stdout.write("".join(out))
        blk_unref(blk)


# --------------------------------------------------------------------------
# snapshot


def img_snapshot(argv: list[str]) -> int:
    action = None
    name = None
    oflags = BDRV_O_RDWR
    common = CommonOpts()
    o = Opts(argv, ":la:c:d:hqU", [HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE])
    for c, arg in o:
        if common.parse(c, arg):
            continue
        if c in "lacd" and len(c) == 1:
            if action:
                error_exit("Cannot mix '-l', '-a', '-c', '-d'")
            action = c
            if c == "l":
                oflags &= ~BDRV_O_RDWR
            else:
                name = arg
    filename = one_image_file_name(o.rest)
    if not add_objects(common.objects):
        return 1
    blk = img_open(common.image_opts, filename, None, oflags, False, common.quiet, common.force_share)
    if blk is None:
        return 1
    ret = 0
    try:
        bs = blk_bs(blk)
        if action == "l":
            n, sns = bdrv_snapshot_list(bs)
            if n > 0:
                lines = ["Snapshot list:\n", bdrv_snapshot_dump(None) + "\n"]
                lines += [bdrv_snapshot_dump(sn) + "\n" for sn in sns]
                sys.stdout.write("".join(lines))
        elif action == "c":
            ret = _snapshot_call(bs, "bdrv_snapshot_create", name)
            if ret:
                report.error(f"Could not create snapshot '{name}': {ret} ({strerror(ret)})")
        elif action == "a":
            ret = _snapshot_call(bs, "bdrv_snapshot_goto", name)
            if ret:
                msg = "Block driver does not support snapshots" if ret == -errno.ENOTSUP else strerror(ret)
                report.error(f"Could not apply snapshot '{name}': {msg}")
        elif action == "d":
            n, sns = bdrv_snapshot_list(bs)
            if not any(_sn_attr(sn, "id_str", None) == name or _sn_attr(sn, "name", None) == name for sn in sns):
                report.error(f"Could not delete snapshot '{name}': snapshot not found")
                ret = 1
            else:
                ret = _snapshot_call(bs, "bdrv_snapshot_delete", name)
                if ret < 0:
                    report.error(f"Could not delete snapshot '{name}': {strerror(ret)}")
                    ret = 1
    finally:
        blk_unref(blk)
    return 1 if ret else 0


def _snapshot_call(bs: BlockDriverState, hook: str, name: str) -> int:
    n = bs
    while n is not None and n.drv is not None:
        fn = getattr(n.drv, hook, None)
        if fn is not None:
            try:
                return fn(n, name)
            except Error as e:
                return -(e.errno or errno.EINVAL)
        if n.drv.format_name == "raw" or n.drv.is_filter:
            if hook == "bdrv_snapshot_goto" and n.drv.format_name == "raw" and n.probed and not n.read_only:
                # QEMU's fallback closes and reopens the raw node around the child's goto, and
                # raw_open prints its probing warning a second time.
                fbs = n.file.bs if n.file is not None else n
                sys.stderr.write(
                    f"WARNING: Image format was not specified for '{fbs.filename}' and probing guessed raw.\n"
                    "         Automatically detecting the format is dangerous for raw images, write operations "
                    "on block 0 will be restricted.\n"
                    "         Specify the 'raw' format explicitly to remove the restrictions.\n")
            n = bdrv_primary_bs(n)
            continue
        break
    return -errno.ENOTSUP


# --------------------------------------------------------------------------
# rebase


def img_rebase(argv: list[str]) -> int:
    from qblock.block.io import bdrv_is_allocated, bdrv_is_allocated_above
    out_basefmt = out_baseimg = None
    cache = src_cache = BDRV_DEFAULT_CACHE
    unsafe = progress = False
    common = CommonOpts()
    o = Opts(argv, ":hf:F:b:upt:T:qU", [HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE])
    for c, arg in o:
        if common.parse(c, arg):
            continue
        if c == "F":
            out_basefmt = arg
        elif c == "b":
            out_baseimg = arg
        elif c == "u":
            unsafe = True
        elif c == "p":
            progress = True
        elif c == "t":
            cache = arg
        elif c == "T":
            src_cache = arg
    quiet, force_share = common.quiet, common.force_share
    if quiet:
        progress = False
    filename = one_image_file_name(o.rest)
    if not unsafe and out_baseimg is None:
        error_exit("Must specify backing file (-b) or use unsafe mode (-u)")
    if not add_objects(common.objects):
        return 1
    prog = util.Progress(progress, 2.0)
    prog.print(0, 100)
    blk = blk_old = blk_new_backing = None
    ret = 0
    try:
        parsed = parse_cache(cache, BDRV_O_RDWR | (BDRV_O_NO_BACKING if unsafe else 0))
        if parsed is None:
            return 1
        flags, writethrough = parsed
        parsed = parse_cache(src_cache, 0, "source cache")
        if parsed is None:
            return 1
        src_flags = parsed[0]
        blk = img_open(common.image_opts, filename, common.fmt, flags, writethrough, quiet, False)
        if blk is None:
            return 1
        bs = blk_bs(blk)
        unfiltered = bdrv_skip_filters(bs)
        if out_basefmt is not None and bdrv_find_format(out_basefmt) is None:
            report.error(f"Invalid format name: '{out_basefmt}'")
            return 1
        prefix_chain_bs = None
        if not unsafe:
            base_bs = backing_bs(unfiltered)
            if base_bs is not None:
                blk_old = blk_new(qemu_get_aio_context(), BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
                try:
                    blk_insert_bs(blk_old, base_bs)
                except Error as e:
                    report.error_err(e, f"Could not reuse old backing file '{base_bs.filename}': ")
                    return 1
            if out_baseimg:
                options: dict[str, Any] = {}
                if out_basefmt:
                    options["driver"] = out_basefmt
                if force_share:
                    options["force-share"] = "on"
                overlay = bdrv_filename(bs)
                if path_has_protocol(out_baseimg) or os.path.isabs(out_baseimg) or overlay.startswith("json:"):
                    real = out_baseimg
                else:
                    real = os.path.join(os.path.dirname(overlay), out_baseimg)
                prefix_chain_bs = bdrv_find_backing_image(bs, real)
                if prefix_chain_bs is not None:
                    blk_new_backing = blk_new(qemu_get_aio_context(), BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
                    try:
                        blk_insert_bs(blk_new_backing, prefix_chain_bs)
                    except Error as e:
                        report.error_err(e, f"Could not reuse backing file '{out_baseimg}': ")
                        return 1
                else:
                    try:
                        blk_new_backing = blk_new_open(real, None, options, src_flags)
                    except Error as e:
                        report.error_err(e, f"Could not open new backing file '{out_baseimg}': ")
                        return 1
            size = blk_getlength(blk)
            if size < 0:
                report.error(f"Could not get size of '{filename}': {strerror(size)}")
                return 1
            old_size = new_size = 0
            if blk_old is not None:
                old_size = blk_getlength(blk_old)
                if old_size < 0:
                    report.error(f"Could not get size of '{bs.backing_file}': {strerror(old_size)}")
                    return 1
            if blk_new_backing is not None:
                new_size = blk_getlength(blk_new_backing)
                if new_size < 0:
                    report.error(f"Could not get size of '{out_baseimg}': {strerror(new_size)}")
                    return 1
            local_progress = 100.0 / (size // min(size, IO_BUF_SIZE)) if size else 0.0
            buf_old = memoryview(bytearray(IO_BUF_SIZE))
            buf_new = memoryview(bytearray(IO_BUF_SIZE))
            offset = 0
            while offset < size:
                n = min(IO_BUF_SIZE, size - offset)
                r, n = bdrv_is_allocated(unfiltered, offset, n)
                if r < 0:
                    report.error(f"error while reading image metadata: {strerror(r)}")
                    return 1
                if r:
                    offset += n
                    continue
                if prefix_chain_bs is not None:
                    r, n = bdrv_is_allocated_above(backing_bs(unfiltered), prefix_chain_bs, offset, n)
                    if r < 0:
                        report.error(f"error while reading image metadata: {strerror(r)}")
                        return 1
                    if not r:
                        offset += n
                        continue
                old_is_zero = False
                if offset >= old_size:
                    buf_old[:n] = bytes(n)
                    old_is_zero = True
                else:
                    if offset + n > old_size:
                        n = old_size - offset
                    if blk_pread(blk_old, offset, buf_old, n) < 0:
                        report.error("error while reading from old backing file")
                        return 1
                if offset >= new_size or blk_new_backing is None:
                    buf_new[:n] = bytes(n)
                else:
                    if offset + n > new_size:
                        n = new_size - offset
                    if blk_pread(blk_new_backing, offset, buf_new, n) < 0:
                        report.error("error while reading from new backing file")
                        return 1
                written = 0
                while written < n:
                    differ, pnum = compare_buffers(buf_old[written:n], buf_new[written:n], n - written)
                    if differ:
                        if old_is_zero:
                            r = blk_pwrite_zeroes(blk, offset + written, pnum, 0)
                        else:
                            r = blk_pwrite(blk, offset + written, buf_old[written:written + pnum], pnum)
                        if r < 0:
                            report.error(f"Error while writing to COW image: {strerror(r)}")
                            return 1
                    written += pnum
                prog.print(local_progress, 100)
                offset += n
        if out_baseimg:
            ret = bdrv_change_backing_file(unfiltered, out_baseimg, out_basefmt, True)
        else:
            ret = bdrv_change_backing_file(unfiltered, None, None, False)
        if ret == -errno.ENOSPC:
            report.error(f"Could not change the backing file to '{out_baseimg}': No space left in the file header")
        elif ret == -errno.EINVAL and out_baseimg and not out_basefmt:
            report.error(f"Could not change the backing file to '{out_baseimg}': backing format must be specified")
        elif ret < 0:
            report.error(f"Could not change the backing file to '{out_baseimg}': {strerror(ret)}")
        prog.print(100, 0)
        return 1 if ret else 0
    finally:
        prog.end()
        blk_unref(blk_old)
        blk_unref(blk_new_backing)
        blk_unref(blk)


# --------------------------------------------------------------------------
# resize


def img_resize(argv: list[str]) -> int:
    if len(argv) < 3:
        error_exit("Not enough arguments")
    size = argv[-1]
    argv = argv[:-1]
    shrink = False
    prealloc = PreallocMode.PREALLOC_MODE_OFF
    common = CommonOpts()
    o = Opts(argv, ":f:hq", [HELP, OBJECT, IMAGE_OPTS, ("preallocation", R, "preallocation"),
                             ("shrink", N, "shrink")])
    for c, arg in o:
        if common.parse(c, arg):
            continue
        if c == "preallocation":
            try:
                prealloc = PreallocMode(arg)
            except ValueError:
                report.error(f"Invalid preallocation mode '{arg}'")
                return 1
        elif c == "shrink":
            shrink = True
    filename = one_image_file_name(o.rest, "Expecting image file name and size")
    if not add_objects(common.objects):
        return 1
    quiet = common.quiet
    relative = 0
    if size.startswith("+"):
        relative, size = 1, size[1:]
    elif size.startswith("-"):
        relative, size = -1, size[1:]
    try:
        n = parse_size_value("size", size)
    except Error as e:
        report.error_err(e)
        return 1
    blk = img_open(common.image_opts, filename, common.fmt, BDRV_O_RDWR | BDRV_O_RESIZE, False, quiet, False)
    if blk is None:
        return 1
    try:
        current = blk_getlength(blk)
        if current < 0:
            report.error(f"Failed to inquire current image length: {strerror(current)}")
            return 1
        total = current + n * relative if relative else n
        if total <= 0:
            report.error("New image size must be positive")
            return 1
        if total <= current and prealloc is not PreallocMode.PREALLOC_MODE_OFF:
            report.error("Preallocation can only be used for growing images")
            return 1
        if total < current and not shrink:
            report.error("Use the --shrink option to perform a shrink operation.")
            report.warn("Shrinking an image will delete all data beyond the shrunken image's end. Before performing "
                        "such an operation, make sure there is no important data there.")
            return 1
        errp: list = []
        ret = blk_truncate(blk, total, True, prealloc, errp)
        if ret < 0:
            if errp:
                report.error_err(errp[0])
            else:
                report.error(strerror(ret))
            return 1
        qprintf(quiet, "Image resized.\n")
        return 0
    finally:
        blk_unref(blk)


# --------------------------------------------------------------------------
# amend


def print_amend_option_help(fmt: str) -> int:
    drv = bdrv_find_format(fmt)
    if drv is None:
        report.error(f"Unknown file format '{fmt}'")
        return 1
    if getattr(drv, "bdrv_amend_options", None) is None:
        report.error(f"Format driver '{fmt}' does not support option amendment")
        return 1
    sys.stdout.write(f"Amend options for '{fmt}':\n")
    sys.stdout.write(qemu_opts_print_help(qemu_opts_append(getattr(drv, "amend_opts", None))))
    return 0


def img_amend(argv: list[str]) -> int:
    options: str | None = None
    cache = BDRV_DEFAULT_CACHE
    progress = force = False
    common = CommonOpts()
    o = Opts(argv, ":ho:f:t:pq", [HELP, OBJECT, IMAGE_OPTS, ("force", N, "force")])
    for c, arg in o:
        if common.parse(c, arg):
            continue
        if c == "o":
            options = accumulate_options(options, arg)
            if options is None:
                return 1
        elif c == "t":
            cache = arg
        elif c == "p":
            progress = True
        elif c == "force":
            force = True
    if not options:
        error_exit("Must specify options (-o)")
    if not add_objects(common.objects):
        return 1
    fmt, quiet = common.fmt, common.quiet
    if quiet:
        progress = False
    prog = util.Progress(progress, 1.0)
    rest = o.rest
    blk = None
    try:
        filename = rest[0] if len(rest) == 1 else None
        if fmt and has_help_option(options):
            return print_amend_option_help(fmt)
        if len(rest) != 1:
            report.error("Expecting one image file name")
            return 1
        parsed = parse_cache(cache, BDRV_O_RDWR)
        if parsed is None:
            return 1
        flags, writethrough = parsed
        blk = img_open(common.image_opts, filename, fmt, flags, writethrough, quiet, False)
        if blk is None:
            return 1
        bs = blk_bs(blk)
        fmt = bs.drv.format_name
        if has_help_option(options):
            return print_amend_option_help(fmt)
        hook = getattr(bs.drv, "bdrv_amend_options", None)
        if hook is None:
            report.error(f"Format driver '{fmt}' does not support option amendment")
            return 1
        opts = CreateOpts(qemu_opts_append(getattr(bs.drv, "amend_opts", None)))
        try:
            opts.do_parse(options)
        except Error as e:
            try:
                CreateOpts(qemu_opts_append(getattr(bs.drv, "amend_opts", None), bs.drv.create_opts)).do_parse(options)
                e.hint = "This option is only supported for image creation\n"
            except Error:
                pass
            report.error_err(e)
            return 1
        prog.print(0.0, 0)
        try:
            hook(bs, opts.to_dict(), lambda done, total: prog.print(100.0 * done / total if total else 0, 0), force)
        except Error as e:
            prog.print(100.0, 0)
            report.error_err(e)
            return 1
        prog.print(100.0, 0)
        return 0
    finally:
        prog.end()
        blk_unref(blk)


# --------------------------------------------------------------------------
# bench


@attrs.define(eq=False)
class BenchData:
    blk: Any
    image_size: int
    write: bool
    bufsize: int
    step: int
    nrreq: int
    n: int
    flush_interval: int
    drain_on_flush: bool
    offset: int
    qiov: list = attrs.field(factory=list)
    in_flight: int = 0
    in_flush: bool = False
    next_qiov: int = 0
    failed: bool = False    # QEMU exit()s from the callback; here the main loop stops and exits 1


def bench_undrained_flush_cb(b: BenchData, ret: int) -> None:
    if ret < 0 and not b.failed:
        report.error(f"Failed flush request: {strerror(ret)}")
        b.failed = True


def bench_cb(b: BenchData, ret: int) -> None:
    if b.failed:
        return
    if ret < 0:
        report.error(f"Failed request: {strerror(ret)}")
        b.failed = True
        return
    if b.in_flush:
        b.in_flush = False
    elif b.in_flight > 0:
        remaining = b.n - b.in_flight
        b.n -= 1
        b.in_flight -= 1
        if b.flush_interval and remaining % b.flush_interval == 0:
            if not b.in_flight or not b.drain_on_flush:
                if b.drain_on_flush:
                    b.in_flush = True
                    blk_aio_flush(b.blk, bench_cb, b)
                else:
                    blk_aio_flush(b.blk, bench_undrained_flush_cb, b)
            if b.drain_on_flush:
                return
    while b.n > b.in_flight and b.in_flight < b.nrreq:
        offset = b.offset
        b.in_flight += 1
        b.offset += b.step
        b.offset %= b.image_size
        qiov = b.qiov[b.next_qiov]
        b.next_qiov = (b.next_qiov + 1) % len(b.qiov)
        if b.write:
            blk_aio_pwritev(b.blk, offset, qiov, 0, bench_cb, b)
        else:
            blk_aio_preadv(b.blk, offset, qiov, 0, bench_cb, b)


def img_bench(argv: list[str]) -> int:
    is_write = False
    count, depth, offset, bufsize, pattern, step, flush_interval = 75000, 64, 0, 4096, 0, 0, 0
    drain_on_flush = True
    flags = 0
    writethrough = False
    o = Opts(argv, ":hc:d:f:ni:o:qs:S:t:wU", [HELP, ("flush-interval", R, "flush-interval"), IMAGE_OPTS,
                                                ("pattern", R, "pattern"), ("no-drain", N, "no-drain"),
                                                FORCE_SHARE])
    common = CommonOpts()
    for c, arg in o:
        if common.parse(c, arg):
            continue
        if c in ("c", "d"):
            r, val = util.qemu_strtol(arg, 0)
            if r < 0 or val < 0 or val > INT_MAX:
                report.error("Invalid request count specified" if c == "c" else "Invalid queue depth specified")
                return 1
            if c == "c":
                count = val
            else:
                depth = val
        elif c == "n":
            flags |= BDRV_O_NATIVE_AIO
        elif c == "i":
            r, flags = util.bdrv_parse_aio(arg, flags)
            if r < 0:
                report.error(f"Invalid aio option: {arg}")
                return 1
        elif c == "o":
            offset = cvtnum("offset", arg)
            if offset < 0:
                return 1
        elif c == "s":
            bufsize = cvtnum_full("buffer size", arg, 0, INT_MAX)
            if bufsize < 0:
                return 1
        elif c == "S":
            step = cvtnum_full("step_size", arg, 0, INT_MAX)
            if step < 0:
                return 1
        elif c == "t":
            r, flags, writethrough = util.bdrv_parse_cache_mode(arg, flags)
            if r < 0:
                report.error("Invalid cache mode")
                return 1
        elif c == "w":
            flags |= BDRV_O_RDWR
            is_write = True
        elif c == "pattern":
            r, val = util.qemu_strtol(arg, 0)
            if r < 0 or val < 0 or val > 0xFF:
                report.error("Invalid pattern byte specified")
                return 1
            pattern = val
        elif c == "flush-interval":
            r, val = util.qemu_strtol(arg, 0)
            if r < 0 or val < 0 or val > INT_MAX:
                report.error("Invalid flush interval specified")
                return 1
            flush_interval = val
        elif c == "no-drain":
            drain_on_flush = False
    filename = one_image_file_name(o.rest)
    if not is_write and flush_interval:
        report.error("--flush-interval is only available in write tests")
        return 1
    if flush_interval and flush_interval < depth:
        report.error("Flush interval can't be smaller than depth")
        return 1
    blk = img_open(common.image_opts, filename, common.fmt, flags, writethrough, common.quiet, common.force_share)
    if blk is None:
        return 1
    try:
        image_size = blk_getlength(blk)
        if image_size < 0:
            return 1
        b = BenchData(blk, image_size, is_write, bufsize, step or bufsize, depth, count, flush_interval,
                      drain_on_flush, offset)
        print(f"Sending {b.n} {'write' if b.write else 'read'} requests, {b.bufsize} bytes each, {b.nrreq} in "
              f"parallel (starting at offset {b.offset}, step size {b.step})")
        if flush_interval:
            print(f"Sending flush every {flush_interval} requests")
        sys.stdout.flush()
        buf = bytearray([pattern]) * (b.nrreq * b.bufsize)
        mv = memoryview(buf)
        b.qiov = [QEMUIOVector([mv[i * b.bufsize:(i + 1) * b.bufsize]], -1) for i in range(max(b.nrreq, 1))]
        from qblock.util.timer import QEMU_CLOCK_REALTIME, qemu_clock_get_ns
        ctx = qemu_get_aio_context()
        t1 = qemu_clock_get_ns(QEMU_CLOCK_REALTIME)
        bench_cb(b, 0)
        while b.n > 0 and not b.failed:
            aio_poll(ctx, True)
        if b.failed:
            return 1
        t2 = qemu_clock_get_ns(QEMU_CLOCK_REALTIME)
        print("Run completed in %3.3f seconds." % ((t2 - t1) / 1e9))
        return 0
    finally:
        blk_unref(blk)


# --------------------------------------------------------------------------
# dd


def img_dd(argv: list[str]) -> int:
    from qblock.util.qemu_option import keyval_parse  # noqa: F401 - image-opts parsing lives in img_open
    out_fmt = "raw"
    common = CommonOpts()
    o = Opts(argv, ":hf:O:U", [HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE])
    for c, arg in o:
        if common.parse(c, arg):
            continue
        if c == "O":
            out_fmt = arg
    bsz = 512
    count = 0
    in_offset = 0
    seen: set[str] = set()
    in_filename = out_filename = None
    for arg in o.rest:
        key, eq, val = arg.partition("=")
        if not eq or key not in ("bs", "count", "if", "of", "skip"):
            report.error(f"unrecognized operand {key if eq else arg}")
            return 1
        if key == "bs":
            res = cvtnum_full("bs", val, 1, INT_MAX)
            if res < 0:
                return 1
            bsz = res
        elif key == "count":
            count = cvtnum("count", val)
            if count < 0:
                return 1
        elif key == "if":
            in_filename = val
        elif key == "of":
            out_filename = val
        elif key == "skip":
            in_offset = cvtnum("skip", val)
            if in_offset < 0:
                return 1
        seen.add(key)
    if not ("if" in seen and "of" in seen):
        report.error("Must specify both input and output files")
        return 1
    if not add_objects(common.objects):
        return 1
    blk1 = img_open(common.image_opts, in_filename, common.fmt, 0, False, False, common.force_share)
    if blk1 is None:
        return 1
    blk2 = None
    try:
        drv = bdrv_find_format(out_fmt)
        if drv is None:
            report.error("Unknown file format")
            return 1
        try:
            opts = img_create_opts(drv, out_filename)
        except Error as e:
            report.error_err(e)
            return 1
        size = blk_getlength(blk1)
        if size < 0:
            report.error(f"Failed to get size for '{in_filename}'")
            return 1
        if "count" in seen and count <= INT64_MAX // bsz and count * bsz < size:
            size = count * bsz
        skip_beyond = "skip" in seen and (in_offset > INT64_MAX // bsz or size < bsz * in_offset)
        opts.set_number(BLOCK_OPT_SIZE, 0 if skip_beyond else size - bsz * in_offset)
        try:
            bdrv_create(drv, out_filename, opts)
        except Error as e:
            report.error_err(e, f"{out_filename}: error while creating output image: ")
            return 1
        blk2 = img_open_file(out_filename, None, out_fmt, BDRV_O_RDWR, False, False, False)
        if blk2 is None:
            return 1
        if skip_beyond:
            report.error(f"{in_filename}: cannot skip to specified offset")
            in_pos = size
        else:
            in_pos = in_offset * bsz
        buf = bytearray(bsz)
        out_pos = 0
        while in_pos < size:
            n = min(bsz, size - in_pos)
            r = blk_pread(blk1, in_pos, buf, n)
            if r < 0:
                report.error(f"error while reading from input image file: {strerror(r)}")
                return 1
            in_pos += n
            r = blk_pwrite(blk2, out_pos, memoryview(buf)[:n], n)
            if r < 0:
                report.error(f"error while writing to output image file: {strerror(r)}")
                return 1
            out_pos += n
        return 0
    finally:
        blk_unref(blk1)
        blk_unref(blk2)


# --------------------------------------------------------------------------
# measure


def bdrv_measure(drv: BlockDriver, opts: CreateOpts, in_bs: BlockDriverState | None) -> tuple[int, int, int | None]:
    """BlockMeasureInfo as (required, fully-allocated, bitmaps or None when absent)."""
    hook = getattr(drv, "bdrv_measure", None)
    if hook is not None:
        info = tuple(hook(opts.to_dict(), in_bs))
        return (info + (None,))[:3]
    if drv.format_name == "raw":
        if in_bs is not None:
            required = bdrv_getlength(in_bs)
            if required < 0:
                raise Error(f"Unable to get image size: {strerror(required)}")
        else:
            size = opts.get(BLOCK_OPT_SIZE, 0)
            required = -(-int(size) // BDRV_SECTOR_SIZE) * BDRV_SECTOR_SIZE
        return required, required, None
    raise Error(f"Block driver '{drv.format_name}' does not support size measurement")


def img_measure(argv: list[str]) -> int:
    ofmt = "human"
    out_fmt = "raw"
    options: str | None = None
    snapshot = None
    img_size = -1
    common = CommonOpts()
    g = Getopt(argv, "hf:O:o:l:U", [HELP, IMAGE_OPTS, OBJECT, ("output", R, "output"), ("size", R, "size"),
                                    FORCE_SHARE])
    while True:
        c = g.getopt()
        if c == -1:
            break
        arg = g.optarg
        if c in ("?", "h"):
            help_()
        elif common.parse(c, arg):
            pass
        elif c == "O":
            out_fmt = arg
        elif c == "o":
            options = accumulate_options(options, arg)
            if options is None:
                return 1
        elif c == "l":
            snapshot = arg
        elif c == "output":
            if arg == "json":
                ofmt = "json"
            elif arg == "human":
                ofmt = "human"
            else:
                report.error("--output must be used with human or json as argument.")
                return 1
        elif c == "size":
            sval = cvtnum("image size", arg)
            if sval < 0:
                return 1
            img_size = sval
    fmt, image_opts = common.fmt, common.image_opts
    if not add_objects(common.objects):
        return 1
    rest = g.argv[g.optind:]
    filename = None
    if len(rest) > 1:
        report.error("At most one filename argument is allowed.")
        return 1
    if len(rest) == 1:
        filename = rest[0]
    if not filename and (image_opts or fmt or snapshot):
        report.error("--image-opts, -f, and -l require a filename argument.")
        return 1
    if filename and img_size != -1:
        report.error("--size N cannot be used together with a filename.")
        return 1
    if not filename and img_size == -1:
        report.error("Either --size N or one filename must be specified.")
        return 1
    in_blk = None
    try:
        if filename:
            in_blk = img_open(image_opts, filename, fmt, 0, False, False, common.force_share)
            if in_blk is None:
                return 1
            if snapshot is not None:
                report.error(snapshot_load_tmp_error(blk_bs(in_blk)))
                return 1
        drv = bdrv_find_format(out_fmt)
        if drv is None:
            report.error(f"Unknown file format '{out_fmt}'")
            return 1
        fmt_opts = driver_create_opts(drv)
        if fmt_opts is None:
            report.error(f"Format driver '{drv.format_name}' does not support image creation")
            return 1
        file_drv = bdrv_find_format("file")
        opts = CreateOpts(qemu_opts_append(fmt_opts, file_drv.create_opts if file_drv else None))
        if options:
            try:
                opts.do_parse(options)
            except Error as e:
                report.error_err(e)
                report.error(f"Invalid options for file format '{out_fmt}'")
                return 1
        if img_size != -1:
            opts.set_number(BLOCK_OPT_SIZE, img_size)
        try:
            required, fully, bitmaps = bdrv_measure(drv, opts, blk_bs(in_blk) if in_blk is not None else None)
        except Error as e:
            report.error_err(e)
            return 1
        if ofmt == "human":
            sys.stdout.write(f"required size: {required}\nfully allocated size: {fully}\n")
            if bitmaps is not None:
                sys.stdout.write(f"bitmaps size: {bitmaps}\n")
        else:
            info = {"required": required, "fully-allocated": fully}
            if bitmaps is not None:
                info["bitmaps"] = bitmaps
            sys.stdout.write(qobject_to_json_pretty(info, True) + "\n")
        return 0
    finally:
        blk_unref(in_blk)


# --------------------------------------------------------------------------
# bitmap (argument checks only: qblock has no persistent dirty bitmaps)


def img_bitmap(argv: list[str]) -> int:
    actions: list[tuple[str, str | None]] = []
    src_filename = src_fmt = None
    granularity = 0
    common = CommonOpts()
    o = Opts(argv, ":b:hf:F:g:", [HELP, OBJECT, IMAGE_OPTS, ("add", N, "add"), ("remove", N, "remove"),
                                  ("clear", N, "clear"), ("enable", N, "enable"), ("disable", N, "disable"),
                                  ("merge", R, "merge"), ("granularity", R, "g"), ("source-file", R, "b"),
                                  ("source-format", R, "F")])
    for c, arg in o:
        if common.parse(c, arg):
            continue
        if c == "b":
            src_filename = arg
        elif c == "F":
            src_fmt = arg
        elif c == "g":
            granularity = cvtnum("granularity", arg)
            if granularity < 0:
                return 1
        elif c in ("add", "remove", "clear", "enable", "disable", "merge"):
            actions.append((c, arg))
    if not add_objects(common.objects):
        return 1
    if not actions:
        report.error("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
        return 1
    if granularity and not any(a == "add" for a, _ in actions):
        report.error("granularity only supported with --add")
        return 1
    if src_fmt and not src_filename:
        report.error("-F only supported with -b")
        return 1
    if src_filename and not any(a == "merge" for a, _ in actions):
        report.error("Merge bitmap source file only supported with --merge")
        return 1
    rest = o.rest
    if len(rest) != 2:
        report.error("Expecting filename and bitmap name")
        return 1
    filename, bitmap = rest
    blk = img_open(common.image_opts, filename, common.fmt, BDRV_O_RDWR, False, False, False)
    if blk is None:
        return 1
    try:
        op = actions[0][0]
        report.error(f"Operation {op} on bitmap {bitmap} failed: Can't store persistent bitmaps to "
                     f"{blk_bs(blk).node_name}: Operation not supported")
        return 1
    finally:
        blk_unref(blk)


# --------------------------------------------------------------------------
# main

IMG_CMDS = {
    "amend": img_amend, "bench": img_bench, "bitmap": img_bitmap, "check": img_check, "commit": img_commit,
    "compare": img_compare, "convert": img_convert, "create": img_create, "dd": img_dd, "info": img_info,
    "map": img_map, "measure": img_measure, "snapshot": img_snapshot, "rebase": img_rebase, "resize": img_resize,
}


def _main(argv: list[str]) -> int:
    if len(argv) < 1:
        error_exit("Not enough arguments")
    o = Opts([PROG] + argv, "+:hVT:", [HELP, ("version", N, "V"), ("trace", R, "T")])
    for c, arg in o:
        if c == "V":
            sys.stdout.write(QEMU_IMG_VERSION)
            return 0
        if c == "T" and not util.trace_opt_parse(report, arg):
            return 1
    rest = o.rest
    if not rest:
        return 0
    cmdname = rest[0]
    handler = IMG_CMDS.get(cmdname)
    if handler is None:
        error_exit(f"Command not found: {cmdname}")
    return handler(rest)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: qemu-img's main, with stray exceptions as one error line."""
    return util.tool_main(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
