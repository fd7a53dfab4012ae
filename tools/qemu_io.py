"""``qblock-io``: QEMU's qemu-io (qemu-io.c and qemu-io-cmds.c, as of QEMU 7.2) over qblock's graph.

The invocation, the commands, their flags and every line they print are qemu-io's, so that
qemu-iotests scripts and a user's habits carry over::

    qblock-io [-f FMT] [--image-opts] [--object OBJDEF]... [-r] [-n] [-t CACHE] [-d DISCARD]
              [-i AIO] [-U] [-C] [-m] [-T TRACE] [-c CMD]... [FILE]

Without ``-c`` it reads commands at a ``qemu-io> `` prompt (with readline history on a
terminal).  The exit status is 1 when a command failed (qemu-io's ``last_error``), else 0.  The
messages carry qemu-io's name (``qemu-io: can't open device ...``) so that golden outputs of
qemu-iotests match.  ``reopen`` runs qblock's reopen transaction (``bdrv_reopen``, see
qblock/block/reopen.py) as qemu-io's reopen_f does.

Differences from qemu-io 7.2:

* ``open -s``/``-s`` (temporary snapshot overlay) is refused: qblock cannot create the
  temporary qcow2 overlay.
* ``read -b``/``write -b`` (VM state) use the ``bdrv_load_vmstate``/``bdrv_save_vmstate`` hooks
  of the first driver in the filter chain that has them, else fail with -ENOTSUP as QEMU does.
* ``info`` treats the ``file`` protocol as QEMU's file-posix does (bdrv_get_info succeeds with
  an empty BlockDriverInfo): qblock's file driver has no bdrv_get_info hook yet.
* ``wait_break`` on a tag nobody will ever reach fails with an error instead of hanging.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
from typing import Any, Callable

import attrs

from qblock.block import accounting as _acct
from qblock.block.accounting import BlockAcctCookie, BlockAcctType
from qblock.block.block_backend import (
    BlockBackend,
    blk_aio_preadv,
    blk_aio_pwrite_zeroes,
    blk_aio_pwritev,
    blk_bs,
    blk_drain_all,
    blk_enable_write_cache,
    blk_flush,
    blk_get_aio_context,
    blk_get_perm,
    blk_get_stats,
    blk_getlength,
    blk_is_available,
    blk_new_open,
    blk_pdiscard,
    blk_pread,
    blk_pwrite,
    blk_pwrite_zeroes,
    blk_set_enable_write_cache,
    blk_set_perm,
    blk_truncate,
    blk_unref,
)
from qblock.block.driver import (
    BDRV_BLOCK_ALLOCATED,
    BDRV_O_AUTO_RDONLY,
    BDRV_O_CACHE_MASK,
    BDRV_O_COPY_ON_READ,
    BDRV_O_NATIVE_AIO,
    BDRV_O_NO_FLUSH,
    BDRV_O_NOCACHE,
    BDRV_O_RDWR,
    BDRV_O_SNAPSHOT,
    BDRV_O_UNMAP,
    BDRV_REQ_FUA,
    BDRV_REQ_MAY_UNMAP,
    BDRV_REQ_NO_FALLBACK,
    BDRV_REQ_WRITE_COMPRESSED,
    BDRV_REQUEST_MAX_BYTES,
    BDRV_SECTOR_SIZE,
    NOT_DONE,
    PreallocMode,
)
from qblock.block.graph import (
    BLK_PERM_RESIZE,
    BLK_PERM_WRITE,
    BLK_PERM_WRITE_UNCHANGED,
    BlockDriverState,
    bdrv_debug_breakpoint,
    bdrv_debug_is_suspended,
    bdrv_debug_remove_breakpoint,
    bdrv_debug_resume,
    bdrv_drain,
    bdrv_drain_all,
    bdrv_primary_bs,
)
from qblock.block.reopen import bdrv_reopen
from qblock.qmp.qjson import qdict_keys
from qblock.util.aio import aio_poll, qemu_get_aio_context
from qblock.util.error import Error
from qblock.util.iov import QEMUIOVector
from qblock.util.timer import QEMU_CLOCK_REALTIME, qemu_clock_get_ns

from qblock.tools import qemu_tool_util as util
from qblock.tools.qemu_tool_util import Getopt, cvtnum, cvtstr, strerror

PROG = "qemu-io"
QEMU_VERSION = "7.2.22 (qblock)"

CMD_FLAG_GLOBAL = 0x01   # don't iterate "args"
CMD_NOFILE_OK = 0x01
MISALIGN_OFFSET = 16


# --------------------------------------------------------------------------
# Block-layer helpers that qemu-io reaches through block.c


def _vmstate(bs: BlockDriverState, qiov: QEMUIOVector, pos: int, is_read: bool) -> int:
    """bdrv_co_readv_vmstate/bdrv_co_writev_vmstate: the driver's hook, else the primary child's."""
    hook = "bdrv_load_vmstate" if is_read else "bdrv_save_vmstate"
    while bs is not None and bs.drv is not None:
        fn = getattr(bs.drv, hook, None)
        if fn is not None:
            from qblock.block.io import bdrv_run_co
            return bdrv_run_co(bs, fn, bs, qiov, pos)
        bs = bdrv_primary_bs(bs)
    return -errno.ENOTSUP if bs is None or bs.drv is not None else -errno.ENOMEDIUM


def tool_bdrv_get_info(bs: BlockDriverState):
    """bdrv_get_info, with file-posix's raw_get_info (which succeeds with nothing) for the file protocol."""
    from qblock.block.driver import BlockDriverInfo
    from qblock.block.graph import bdrv_get_info
    bdi = BlockDriverInfo()
    ret = bdrv_get_info(bs, bdi)
    if ret == -errno.ENOTSUP:
        n = bs
        while n is not None and n.drv is not None:
            if n.drv.format_name == "file":
                return 0, BlockDriverInfo()
            if n.drv.format_name == "raw" or n.drv.is_filter:
                n = bdrv_primary_bs(n)
                continue
            break
    return ret, bdi


def check_force_share(opts: dict, flags: int) -> None:
    """bdrv_open_common's check, which qblock's core does not make yet: force-share needs read-only."""
    def on(v: Any) -> bool:
        return v is True or v in ("on", "true", "yes", "y")

    ro = "read-only" in opts and on(opts["read-only"])
    if on(opts.get("force-share", False)) and flags & BDRV_O_RDWR and not ro:
        raise Error("force-share=on can only be used with read-only images", errno=errno.EINVAL)


def bdrv_get_specific_info(bs: BlockDriverState) -> dict | None:
    """ImageInfoSpecific as a dict ``{"type": fmt, "data": {...}}`` from the driver's hook, if any."""
    fn = getattr(bs.drv, "bdrv_get_specific_info", None) if bs.drv is not None else None
    if fn is None:
        return None
    return fn(bs)


def dump_qobject(indentation: int, obj: Any, out: list[str]) -> None:
    """block/qapi.c dump_qobject: nested ImageInfoSpecific data as ``key: value`` lines."""
    if isinstance(obj, dict):
        for key in qdict_keys(obj):
            val = obj[key]
            composite = isinstance(val, (dict, list))
            out.append("%*s%s:%s" % (indentation * 4, "", key.replace("-", " "), "\n" if composite else " "))
            dump_qobject(indentation + 1, val, out)
    elif isinstance(obj, list):
        for i, val in enumerate(obj):
            composite = isinstance(val, (dict, list))
            out.append("%*s[%i]:%s" % (indentation * 4, "", i, "\n" if composite else " "))
            dump_qobject(indentation + 1, val, out)
    elif isinstance(obj, bool):
        out.append("true\n" if obj else "false\n")
    else:
        out.append(f"{obj}\n")


def bdrv_image_info_specific_dump(spec: dict) -> str:
    out: list[str] = []
    dump_qobject(1, spec.get("data", {}), out)
    return "".join(out)


# --------------------------------------------------------------------------
# Accounting (block/accounting.c as qemu-io calls it: start returns the cookie)

BLOCK_ACCT_READ = BlockAcctType.BLOCK_ACCT_READ
BLOCK_ACCT_WRITE = BlockAcctType.BLOCK_ACCT_WRITE
BLOCK_ACCT_FLUSH = BlockAcctType.BLOCK_ACCT_FLUSH


def block_acct_start(stats, nbytes: int, type_) -> BlockAcctCookie:
    cookie = BlockAcctCookie()
    _acct.block_acct_start(stats, cookie, nbytes, type_)
    return cookie


block_acct_done = _acct.block_acct_done
block_acct_failed = _acct.block_acct_failed
block_acct_invalid = _acct.block_acct_invalid


# --------------------------------------------------------------------------
# Output helpers (qemu-io-cmds.c)


def _now() -> int:
    return qemu_clock_get_ns(QEMU_CLOCK_REALTIME)


def tdiv(value: float, t_ns: int) -> float:
    secs = t_ns / 1e9
    if secs == 0:
        return float("inf") if value > 0 else float("nan")
    return value / secs


def timestr(t_ns: int, verbose: bool) -> str:
    """qemu-io's timestr: ``00.00 sec``, or ``0:00:00.00`` for -C and runs of a second or more."""
    sec, nsec = divmod(t_ns, 1_000_000_000)
    frac = nsec / 1e9
    hours, rem = divmod(sec, 3600)
    minutes, seconds = divmod(rem, 60)
    if verbose or sec:
        return "%u:%02u:%05.2f" % (hours, minutes, seconds + frac)
    return "%05.2f sec" % frac


def print_report(op: str, t_ns: int, offset: int, count: int, total: int, cnt: int, Cflag: bool) -> None:
    ts = timestr(t_ns, Cflag)
    if not Cflag:
        s1 = cvtstr(float(total))
        s2 = cvtstr(tdiv(float(total), t_ns))
        print(f"{op} {total}/{count} bytes at offset {offset}")
        print("%s, %d ops; %s (%s/sec and %.4f ops/sec)" % (s1, cnt, ts, s2, tdiv(float(cnt), t_ns)))
    else:
        print("%d,%d,%s,%.3f,%.3f" % (total, cnt, ts, tdiv(float(total), t_ns), tdiv(float(cnt), t_ns)))


def dump_buffer(buf, offset: int, length: int) -> None:
    lines = []
    for i in range(0, length, 16):
        chunk = bytes(buf[i:min(i + 16, length)])
        hexpart = "".join("%02x " % b for b in chunk)
        text = "".join(chr(b) if (0x30 <= b <= 0x39 or 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A) else "."
                       for b in chunk)
        lines.append("%08x:  %s %s\n" % (offset + i, hexpart, text))
    sys.stdout.write("".join(lines))


def pattern_ok(view: memoryview, pattern: int) -> bool:
    """True when every byte of ``view`` is ``pattern`` (memcmp against a memset buffer, in 1 MiB steps)."""
    step = 1 << 20
    block = bytes([pattern]) * min(step, len(view))
    for pos in range(0, len(view), step):
        part = view[pos:pos + step]
        if part != block[:len(part)]:
            return False
    return True


def print_cvtnum_err(rc: int, arg: str) -> None:
    if rc == -errno.EINVAL:
        print(f"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}")
    elif rc == -errno.ERANGE:
        print(f"Parsing error: argument too large -- {arg}")
    else:
        print(f"Parsing error: {arg}")


def cvtnum_arg(arg: str) -> int:
    """cvtnum of a command argument, with the parsing error printed when it fails (negative errno)."""
    value = cvtnum(arg)
    if value < 0:
        print_cvtnum_err(value, arg)
    return value


def parse_offset_len(argv: list[str], optind: int) -> tuple[int, int, int]:
    """(0, offset, length) from ``argv[optind]`` and ``argv[optind + 1]``, or (negative errno, 0, 0)
    after the parsing error of the first bad one."""
    offset = cvtnum_arg(argv[optind])
    if offset < 0:
        return offset, 0, 0
    length = cvtnum_arg(argv[optind + 1])
    if length < 0:
        return length, 0, 0
    return 0, offset, length


def check_sector_aligned(offset: int, count: int) -> int:
    """0, or -EINVAL after naming the first of ``offset``/``count`` that is not a multiple of 512."""
    for value, name in ((offset, "offset"), (count, "count")):
        if value % BDRV_SECTOR_SIZE:
            print(f"{value} is not a sector-aligned value for '{name}'")
            return -errno.EINVAL
    return 0


def print_read_report(t_ns: int, buf, offset: int, count: int, qflag: bool, vflag: bool, Cflag: bool) -> None:
    """What a read command prints once its data is in: nothing with -q, the dump with -v, the report."""
    if qflag:
        return
    if vflag:
        dump_buffer(buf, offset, count)
    print_report("read", t_ns, offset, count, count, 1, Cflag)


def parse_pattern(arg: str) -> int:
    ret, value = util.qemu_strtol(arg, 0)
    if ret < 0 or value < 0 or value > 0xFF:
        print(f"{arg} is not a valid pattern byte")
        return -1
    return value


# --------------------------------------------------------------------------
# Commands


@attrs.define
class CmdInfo:
    """One qemu-io command (qemu-io.h: cmdinfo_t)."""

    name: str
    cfunc: Callable[..., int]
    altname: str | None = None
    argmin: int = 0
    argmax: int = 0
    flags: int = 0
    args: str | None = None
    oneline: str = ""
    help: Callable[[], None] | None = None
    perm: int = 0


@attrs.define
class OpenOpts:
    """What the options qemu-io's command line and its ``open`` command share set:
    ``-s -n -C -r -k -i -t -d -U``."""

    flags: int = BDRV_O_UNMAP
    writethrough: bool = True
    readonly: bool = False
    force_share: bool = False

    def parse(self, report: util.Reporter, c: str, optarg: str | None) -> bool | None:
        """Take option ``c``: True when taken, False after reporting an invalid mode, None for the caller's."""
        if c == "s":
            self.flags |= BDRV_O_SNAPSHOT
        elif c == "n":
            self.flags |= BDRV_O_NOCACHE
            self.writethrough = False
        elif c == "C":
            self.flags |= BDRV_O_COPY_ON_READ
        elif c == "r":
            self.readonly = True
        elif c == "k":
            self.flags |= BDRV_O_NATIVE_AIO
        elif c == "t":
            r, self.flags, self.writethrough = util.bdrv_parse_cache_mode(optarg, self.flags)
            if r < 0:
                report.error(f"Invalid cache option: {optarg}")
                return False
        elif c == "d":
            r, self.flags = util.bdrv_parse_discard_flags(optarg, self.flags)
            if r < 0:
                report.error(f"Invalid discard option: {optarg}")
                return False
        elif c == "i":
            r, self.flags = util.bdrv_parse_aio(optarg, self.flags)
            if r < 0:
                report.error(f"Invalid aio option: {optarg}")
                return False
        elif c == "U":
            self.force_share = True
        else:
            return None
        return True

    def open_flags(self) -> int:
        """The flags to open with: read-write unless -r."""
        return self.flags if self.readonly else self.flags | BDRV_O_RDWR


class QemuIO:
    """The state qemu-io keeps in globals: the open BlockBackend, the quit flag, the command table."""

    def __init__(self) -> None:
        self.blk: BlockBackend | None = None
        self.quit = False
        self.image_opts = False
        self.misalign = False
        self.report = util.Reporter(PROG)
        self.cmdtab: list[CmdInfo] = []
        for ci in _command_table(self):
            self.add_command(ci)

    # -- the command table ------------------------------------------------

    def add_command(self, ci: CmdInfo) -> None:
        self.cmdtab.append(ci)
        self.cmdtab.sort(key=lambda c: c.name.encode())

    def find_command(self, cmd: str) -> CmdInfo | None:
        for ct in self.cmdtab:
            if ct.name == cmd or (ct.altname and ct.altname == cmd):
                return ct
        return None

    def usage(self, ci: CmdInfo) -> None:
        print(f"{ci.name} {ci.args} -- {ci.oneline}")

    def bad_usage(self, ci: CmdInfo) -> int:
        """qemuio_command_usage for a command given wrong arguments: the usage line, then -EINVAL."""
        self.usage(ci)
        return -errno.EINVAL

    def command(self, ct: CmdInfo, argv: list[str]) -> int:
        cmd = argv[0]
        if not (ct.flags & CMD_FLAG_GLOBAL) and not (ct.flags & CMD_NOFILE_OK) and self.blk is None:
            sys.stdout.flush()
            sys.stderr.write("no file open, try 'help open'\n")
            sys.stderr.flush()
            return -errno.EINVAL
        argc = len(argv)
        if argc - 1 < ct.argmin or (ct.argmax != -1 and argc - 1 > ct.argmax):
            if ct.argmax == -1:
                msg = f"bad argument count {argc - 1} to {cmd}, expected at least {ct.argmin} arguments"
            elif ct.argmin == ct.argmax:
                msg = f"bad argument count {argc - 1} to {cmd}, expected {ct.argmin} arguments"
            else:
                msg = (f"bad argument count {argc - 1} to {cmd}, expected between {ct.argmin} and "
                       f"{ct.argmax} arguments")
            sys.stdout.flush()
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()
            return -errno.EINVAL
        if ct.perm and self.blk is not None and blk_is_available(self.blk):
            perm, shared = blk_get_perm(self.blk)
            if ct.perm & ~perm:
                try:
                    blk_set_perm(self.blk, perm | ct.perm, shared)
                except Error as e:
                    self.report.error_err(e)
                    return -(e.errno or errno.EPERM)
        return ct.cfunc(self.blk, argv)

    def qemuio_command(self, line: str) -> int:
        v = [p for p in line.split(" ") if p]
        if not v:
            return 0
        ct = self.find_command(v[0])
        if ct is None:
            sys.stdout.flush()
            sys.stderr.write(f'command "{v[0]}" not found\n')
            sys.stderr.flush()
            return -errno.EINVAL
        try:
            return self.command(ct, v)
        finally:
            sys.stdout.flush()

    # -- buffers --------------------------------------------------------------

    def alloc(self, length: int, pattern: int) -> memoryview:
        """qemu_io_alloc: a buffer filled with ``pattern`` (misaligned by 16 bytes with -m)."""
        extra = MISALIGN_OFFSET if self.misalign else 0
        buf = bytearray([pattern]) * (length + extra)
        return memoryview(buf)[extra:]

    def alloc_from_file(self, length: int, file_name: str) -> memoryview | None:
        """qemu_io_alloc_from_file: the file's bytes, repeated to fill ``length``."""
        try:
            with open(file_name, "rb") as f:
                data = f.read(length)
        except OSError as e:
            sys.stdout.flush()
            sys.stderr.write(f"{file_name}: {os.strerror(e.errno or errno.EIO)}\n")
            sys.stderr.flush()
            return None
        if not data:
            sys.stdout.flush()
            sys.stderr.write(f"{file_name}: file is empty\n")
            sys.stderr.flush()
            return None
        reps = -(-length // len(data))
        extra = MISALIGN_OFFSET if self.misalign else 0
        buf = bytearray(extra) + (data * reps)[:length]
        return memoryview(buf)[extra:]

    def create_iovec(self, args: list[str], pattern: int) -> tuple[QEMUIOVector, memoryview] | None:
        sizes = []
        count = 0
        for arg in args:
            n = cvtnum_arg(arg)
            if n < 0:
                return None
            if n > BDRV_REQUEST_MAX_BYTES:
                print(f"Argument '{arg}' exceeds maximum size {BDRV_REQUEST_MAX_BYTES}")
                return None
            if count > BDRV_REQUEST_MAX_BYTES - n:
                print(f"The total number of bytes exceed the maximum size {BDRV_REQUEST_MAX_BYTES}")
                return None
            sizes.append(n)
            count += n
        buf = self.alloc(count, pattern)
        views = []
        pos = 0
        for n in sizes:
            views.append(buf[pos:pos + n])
            pos += n
        return QEMUIOVector(views, len(views)), buf

    # -- waiting for requests -----------------------------------------------

    def main_loop_wait(self) -> None:
        aio_poll(qemu_get_aio_context(), True)

    def do_aio(self, submit: Callable[[Callable[[Any, int], None]], Any]) -> int:
        box = [NOT_DONE]

        def done(_opaque, ret):
            box[0] = ret

        submit(done)
        while box[0] == NOT_DONE:
            self.main_loop_wait()
        return box[0]

    # -- opening ----------------------------------------------------------------

    def openfile(self, name: str | None, flags: int, writethrough: bool, force_share: bool,
                 opts: dict | None) -> int:
        if self.blk is not None:
            self.report.error("file open already, try 'help close'")
            return 1
        if force_share:
            opts = dict(opts or {})
            if "force-share" in opts and opts["force-share"] != "on":
                self.report.error("-U conflicts with image options")
                return 1
            opts["force-share"] = "on"
        where = f" device {name}" if name else ""
        if flags & BDRV_O_SNAPSHOT:
            self.report.error(f"can't open{where}: temporary snapshots (-s) are not supported by qblock")
            return 1
        opts = dict(opts or {})
        opts.update({k: v for k, v in util.cache_options(flags).items() if k not in opts})
        try:
            check_force_share(opts, flags)
            self.blk = blk_new_open(name, None, opts, flags)
        except Error as e:
            self.report.error_err(e, f"can't open{where}: ")
            return 1
        blk_set_enable_write_cache(self.blk, not writethrough)
        return 0


# --------------------------------------------------------------------------
# The commands themselves (qemu-io-cmds.c order)


def _command_table(io: QemuIO) -> list[CmdInfo]:
    p = print

    def read_help() -> None:
        p("\n"
          " reads a range of bytes from the given offset\n"
          "\n"
          " Example:\n"
          " 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file\n"
          "\n"
          " Reads a segment of the currently open file, optionally dumping it to the\n"
          " standard output stream (with -v option) for subsequent inspection.\n"
          " -b, -- read from the VM state rather than the virtual disk\n"
          " -C, -- report statistics in a machine parsable format\n"
          " -l, -- length for pattern verification (only with -P)\n"
          " -p, -- ignored for backwards compatibility\n"
          " -P, -- use a pattern to verify read data\n"
          " -q, -- quiet mode, do not show I/O statistics\n"
          " -s, -- start offset for pattern verification (only with -P)\n"
          " -v, -- dump buffer to standard output\n")

    def read_f(blk, argv) -> int:
        Cflag = qflag = vflag = Pflag = sflag = lflag = bflag = False
        pattern = 0
        pattern_offset = pattern_count = 0
        g = Getopt(argv, "bCl:pP:qs:v")
        for c in g:
            if c == "b":
                bflag = True
            elif c == "C":
                Cflag = True
            elif c == "l":
                lflag = True
                pattern_count = cvtnum_arg(g.optarg)
                if pattern_count < 0:
                    return pattern_count
            elif c == "p":
                pass
            elif c == "P":
                Pflag = True
                pattern = parse_pattern(g.optarg)
                if pattern < 0:
                    return -errno.EINVAL
            elif c == "q":
                qflag = True
            elif c == "s":
                sflag = True
                pattern_offset = cvtnum_arg(g.optarg)
                if pattern_offset < 0:
                    return pattern_offset
            elif c == "v":
                vflag = True
            else:
                return io.bad_usage(read_cmd)
        optind = g.optind
        argv = g.argv
        if optind != len(argv) - 2:
            return io.bad_usage(read_cmd)
        ret, offset, count = parse_offset_len(argv, optind)
        if ret < 0:
            return ret
        if count > BDRV_REQUEST_MAX_BYTES:
            p(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES}, given {argv[optind + 1]}")
            return -errno.EINVAL
        if not Pflag and (lflag or sflag):
            return io.bad_usage(read_cmd)
        if not lflag:
            pattern_count = count - pattern_offset
        if pattern_count < 0 or pattern_count + pattern_offset > count:
            p("pattern verification range exceeds end of read data")
            return -errno.EINVAL
        if bflag:
            ret = check_sector_aligned(offset, count)
            if ret < 0:
                return ret
        buf = io.alloc(count, 0xAB)
        t1 = _now()
        if bflag:
            ret = _vmstate(blk_bs(blk), QEMUIOVector([buf], -1), offset, True) if count <= util.INT_MAX \
                else -errno.ERANGE
        else:
            ret = blk_pread(blk, offset, buf, count) if count <= util.INT_MAX else -errno.ERANGE
        t2 = _now()
        if ret < 0:
            p(f"read failed: {strerror(ret)}")
            return ret
        ret = 0
        if Pflag:
            if not pattern_ok(buf[pattern_offset:pattern_offset + pattern_count], pattern):
                p(f"Pattern verification failed at offset {offset + pattern_offset}, {pattern_count} bytes")
                ret = -errno.EINVAL
        print_read_report(t2 - t1, buf, offset, count, qflag, vflag, Cflag)
        return ret

    read_cmd = CmdInfo("read", read_f, altname="r", argmin=2, argmax=-1,
                       args="[-abCqv] [-P pattern [-s off] [-l len]] off len",
                       oneline="reads a number of bytes at a specified offset", help=read_help)

    def readv_help() -> None:
        p("\n"
          " reads a range of bytes from the given offset into multiple buffers\n"
          "\n"
          " Example:\n"
          " 'readv -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file\n"
          "\n"
          " Reads a segment of the currently open file, optionally dumping it to the\n"
          " standard output stream (with -v option) for subsequent inspection.\n"
          " Uses multiple iovec buffers if more than one byte range is specified.\n"
          " -C, -- report statistics in a machine parsable format\n"
          " -P, -- use a pattern to verify read data\n"
          " -v, -- dump buffer to standard output\n"
          " -q, -- quiet mode, do not show I/O statistics\n")

    def readv_f(blk, argv) -> int:
        Cflag = qflag = vflag = Pflag = False
        pattern = 0
        g = Getopt(argv, "CP:qv")
        for c in g:
            if c == "C":
                Cflag = True
            elif c == "P":
                Pflag = True
                pattern = parse_pattern(g.optarg)
                if pattern < 0:
                    return -errno.EINVAL
            elif c == "q":
                qflag = True
            elif c == "v":
                vflag = True
            else:
                return io.bad_usage(readv_cmd)
        argv = g.argv
        optind = g.optind
        if optind > len(argv) - 2:
            return io.bad_usage(readv_cmd)
        offset = cvtnum_arg(argv[optind])
        if offset < 0:
            return offset
        optind += 1
        made = io.create_iovec(argv[optind:], 0xAB)
        if made is None:
            return -errno.EINVAL
        qiov, buf = made
        t1 = _now()
        ret = io.do_aio(lambda cb: blk_aio_preadv(blk, offset, qiov, 0, cb, None))
        t2 = _now()
        if ret < 0:
            p(f"readv failed: {strerror(ret)}")
            return ret
        ret = 0
        if Pflag and not pattern_ok(buf, pattern):
            p(f"Pattern verification failed at offset {offset}, {qiov.size} bytes")
            ret = -errno.EINVAL
        print_read_report(t2 - t1, buf, offset, qiov.size, qflag, vflag, Cflag)
        return ret

    readv_cmd = CmdInfo("readv", readv_f, argmin=2, argmax=-1, args="[-Cqv] [-P pattern] off len [len..]",
                        oneline="reads a number of bytes at a specified offset", help=readv_help)

    def write_help() -> None:
        p("\n"
          " writes a range of bytes from the given offset\n"
          "\n"
          " Example:\n"
          " 'write 512 1k' - writes 1 kilobyte at 512 bytes into the open file\n"
          "\n"
          " Writes into a segment of the currently open file, using a buffer\n"
          " filled with a set pattern (0xcdcdcdcd).\n"
          " -b, -- write to the VM state rather than the virtual disk\n"
          " -c, -- write compressed data with blk_write_compressed\n"
          " -f, -- use Force Unit Access semantics\n"
          " -n, -- with -z, don't allow slow fallback\n"
          " -p, -- ignored for backwards compatibility\n"
          " -P, -- use different pattern to fill file\n"
          " -s, -- use a pattern file to fill the write buffer\n"
          " -C, -- report statistics in a machine parsable format\n"
          " -q, -- quiet mode, do not show I/O statistics\n"
          " -u, -- with -z, allow unmapping\n"
          " -z, -- write zeroes using blk_co_pwrite_zeroes\n")

    def write_f(blk, argv) -> int:
        Cflag = qflag = bflag = Pflag = zflag = cflag = sflag = False
        flags = 0
        pattern = 0xCD
        file_name = None
        g = Getopt(argv, "bcCfnpP:qs:uz")
        for c in g:
            if c == "b":
                bflag = True
            elif c == "c":
                cflag = True
            elif c == "C":
                Cflag = True
            elif c == "f":
                flags |= BDRV_REQ_FUA
            elif c == "n":
                flags |= BDRV_REQ_NO_FALLBACK
            elif c == "p":
                pass
            elif c == "P":
                Pflag = True
                pattern = parse_pattern(g.optarg)
                if pattern < 0:
                    return -errno.EINVAL
            elif c == "q":
                qflag = True
            elif c == "s":
                sflag = True
                file_name = g.optarg
            elif c == "u":
                flags |= BDRV_REQ_MAY_UNMAP
            elif c == "z":
                zflag = True
            else:
                return io.bad_usage(write_cmd)
        argv = g.argv
        optind = g.optind
        if optind != len(argv) - 2:
            return io.bad_usage(write_cmd)
        if bflag and zflag:
            p("-b and -z cannot be specified at the same time")
            return -errno.EINVAL
        if flags & BDRV_REQ_FUA and (bflag or cflag):
            p("-f and -b or -c cannot be specified at the same time")
            return -errno.EINVAL
        if flags & BDRV_REQ_NO_FALLBACK and not zflag:
            p("-n requires -z to be specified")
            return -errno.EINVAL
        if flags & BDRV_REQ_MAY_UNMAP and not zflag:
            p("-u requires -z to be specified")
            return -errno.EINVAL
        if zflag + Pflag + sflag > 1:
            p("Only one of -z, -P, and -s can be specified at the same time")
            return -errno.EINVAL
        ret, offset, count = parse_offset_len(argv, optind)
        if ret < 0:
            return ret
        if count > BDRV_REQUEST_MAX_BYTES and not flags & BDRV_REQ_NO_FALLBACK:
            p(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES} without -n, given {argv[optind + 1]}")
            return -errno.EINVAL
        if bflag or cflag:
            ret = check_sector_aligned(offset, count)
            if ret < 0:
                return ret
        buf = None
        if not zflag:
            if sflag:
                buf = io.alloc_from_file(count, file_name)
                if buf is None:
                    return -errno.EINVAL
            else:
                buf = io.alloc(count, pattern)
        t1 = _now()
        if bflag:
            ret = _vmstate(blk_bs(blk), QEMUIOVector([buf], -1), offset, False) if count <= util.INT_MAX \
                else -errno.ERANGE
        elif zflag:
            ret = blk_pwrite_zeroes(blk, offset, count, flags)
        elif cflag:
            ret = blk_pwrite(blk, offset, buf, count, BDRV_REQ_WRITE_COMPRESSED) \
                if count <= BDRV_REQUEST_MAX_BYTES else -errno.ERANGE
        else:
            ret = blk_pwrite(blk, offset, buf, count, flags) if count <= util.INT_MAX else -errno.ERANGE
        t2 = _now()
        if ret < 0:
            p(f"write failed: {strerror(ret)}")
            return ret
        if qflag:
            return 0
        print_report("wrote", t2 - t1, offset, count, count, 1, Cflag)
        return 0

    write_cmd = CmdInfo("write", write_f, altname="w", argmin=2, argmax=-1, perm=BLK_PERM_WRITE,
                        args="[-bcCfnquz] [-P pattern | -s source_file] off len",
                        oneline="writes a number of bytes at a specified offset", help=write_help)

    def writev_help() -> None:
        p("\n"
          " writes a range of bytes from the given offset source from multiple buffers\n"
          "\n"
          " Example:\n"
          " 'writev 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file\n"
          "\n"
          " Writes into a segment of the currently open file, using a buffer\n"
          " filled with a set pattern (0xcdcdcdcd).\n"
          " -P, -- use different pattern to fill file\n"
          " -C, -- report statistics in a machine parsable format\n"
          " -f, -- use Force Unit Access semantics\n"
          " -q, -- quiet mode, do not show I/O statistics\n")

    def writev_f(blk, argv) -> int:
        Cflag = qflag = False
        flags = 0
        pattern = 0xCD
        g = Getopt(argv, "CfqP:")
        for c in g:
            if c == "C":
                Cflag = True
            elif c == "f":
                flags |= BDRV_REQ_FUA
            elif c == "q":
                qflag = True
            elif c == "P":
                pattern = parse_pattern(g.optarg)
                if pattern < 0:
                    return -errno.EINVAL
            else:
                return io.bad_usage(writev_cmd)
        argv = g.argv
        optind = g.optind
        if optind > len(argv) - 2:
            return io.bad_usage(writev_cmd)
        offset = cvtnum_arg(argv[optind])
        if offset < 0:
            return offset
        optind += 1
        made = io.create_iovec(argv[optind:], pattern)
        if made is None:
            return -errno.EINVAL
        qiov, _buf = made
        t1 = _now()
        ret = io.do_aio(lambda cb: blk_aio_pwritev(blk, offset, qiov, flags, cb, None))
        t2 = _now()
        if ret < 0:
            p(f"writev failed: {strerror(ret)}")
            return ret
        if qflag:
            return 0
        print_report("wrote", t2 - t1, offset, qiov.size, qiov.size, 1, Cflag)
        return 0

    writev_cmd = CmdInfo("writev", writev_f, argmin=2, argmax=-1, perm=BLK_PERM_WRITE,
                         args="[-Cfq] [-P pattern] off len [len..]",
                         oneline="writes a number of bytes at a specified offset", help=writev_help)

    @attrs.define(eq=False)
    class AioCtx:
        blk: Any
        qiov: QEMUIOVector | None = None
        size: int = 0
        offset: int = 0
        buf: Any = None
        qflag: bool = False
        vflag: bool = False
        Cflag: bool = False
        Pflag: bool = False
        zflag: bool = False
        pattern: int = 0
        t1: int = 0
        acct: Any = None

    def aio_write_done(ctx: AioCtx, ret: int) -> None:
        t2 = _now()
        if ret < 0:
            p(f"aio_write failed: {strerror(ret)}")
            if ctx.acct is not None:
                block_acct_failed(blk_get_stats(ctx.blk), ctx.acct)
            return
        if ctx.acct is not None:
            block_acct_done(blk_get_stats(ctx.blk), ctx.acct)
        if ctx.qflag:
            return
        print_report("wrote", t2 - ctx.t1, ctx.offset, ctx.size, ctx.size, 1, ctx.Cflag)

    def aio_read_done(ctx: AioCtx, ret: int) -> None:
        t2 = _now()
        if ret < 0:
            p(f"readv failed: {strerror(ret)}")
            block_acct_failed(blk_get_stats(ctx.blk), ctx.acct)
            return
        if ctx.Pflag and not pattern_ok(ctx.buf, ctx.pattern):
            p(f"Pattern verification failed at offset {ctx.offset}, {ctx.size} bytes")
        block_acct_done(blk_get_stats(ctx.blk), ctx.acct)
        print_read_report(t2 - ctx.t1, ctx.buf, ctx.offset, ctx.size, ctx.qflag, ctx.vflag, ctx.Cflag)

    def aio_read_help() -> None:
        p("\n"
          " asynchronously reads a range of bytes from the given offset\n"
          "\n"
          " Example:\n"
          " 'aio_read -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file\n"
          "\n"
          " Reads a segment of the currently open file, optionally dumping it to the\n"
          " standard output stream (with -v option) for subsequent inspection.\n"
          " The read is performed asynchronously and the aio_flush command must be\n"
          " used to ensure all outstanding aio requests have been completed.\n"
          " Note that due to its asynchronous nature, this command will be\n"
          " considered successful once the request is submitted, independently\n"
          " of potential I/O errors or pattern mismatches.\n"
          " -C, -- report statistics in a machine parsable format\n"
          " -P, -- use a pattern to verify read data\n"
          " -i, -- treat request as invalid, for exercising stats\n"
          " -v, -- dump buffer to standard output\n"
          " -q, -- quiet mode, do not show I/O statistics\n")

    def aio_read_f(blk, argv) -> int:
        ctx = AioCtx(blk)
        g = Getopt(argv, "CP:iqv")
        for c in g:
            if c == "C":
                ctx.Cflag = True
            elif c == "P":
                ctx.Pflag = True
                ctx.pattern = parse_pattern(g.optarg)
                if ctx.pattern < 0:
                    return -errno.EINVAL
            elif c == "i":
                p("injecting invalid read request")
                block_acct_invalid(blk_get_stats(blk), BLOCK_ACCT_READ)
                return 0
            elif c == "q":
                ctx.qflag = True
            elif c == "v":
                ctx.vflag = True
            else:
                return io.bad_usage(aio_read_cmd)
        argv = g.argv
        optind = g.optind
        if optind > len(argv) - 2:
            return io.bad_usage(aio_read_cmd)
        ctx.offset = cvtnum_arg(argv[optind])
        if ctx.offset < 0:
            return ctx.offset
        optind += 1
        made = io.create_iovec(argv[optind:], 0xAB)
        if made is None:
            block_acct_invalid(blk_get_stats(blk), BLOCK_ACCT_READ)
            return -errno.EINVAL
        ctx.qiov, ctx.buf = made
        ctx.size = ctx.qiov.size
        ctx.t1 = _now()
        ctx.acct = block_acct_start(blk_get_stats(blk), ctx.size, BLOCK_ACCT_READ)
        blk_aio_preadv(blk, ctx.offset, ctx.qiov, 0, aio_read_done, ctx)
        return 0

    aio_read_cmd = CmdInfo("aio_read", aio_read_f, argmin=2, argmax=-1, args="[-Ciqv] [-P pattern] off len [len..]",
                           oneline="asynchronously reads a number of bytes", help=aio_read_help)

    def aio_write_help() -> None:
        p("\n"
          " asynchronously writes a range of bytes from the given offset source\n"
          " from multiple buffers\n"
          "\n"
          " Example:\n"
          " 'aio_write 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file\n"
          "\n"
          " Writes into a segment of the currently open file, using a buffer\n"
          " filled with a set pattern (0xcdcdcdcd).\n"
          " The write is performed asynchronously and the aio_flush command must be\n"
          " used to ensure all outstanding aio requests have been completed.\n"
          " Note that due to its asynchronous nature, this command will be\n"
          " considered successful once the request is submitted, independently\n"
          " of potential I/O errors or pattern mismatches.\n"
          " -P, -- use different pattern to fill file\n"
          " -C, -- report statistics in a machine parsable format\n"
          " -f, -- use Force Unit Access semantics\n"
          " -i, -- treat request as invalid, for exercising stats\n"
          " -q, -- quiet mode, do not show I/O statistics\n"
          " -u, -- with -z, allow unmapping\n"
          " -z, -- write zeroes using blk_aio_pwrite_zeroes\n")

    def aio_write_f(blk, argv) -> int:
        ctx = AioCtx(blk)
        pattern = 0xCD
        flags = 0
        g = Getopt(argv, "CfiqP:uz")
        for c in g:
            if c == "C":
                ctx.Cflag = True
            elif c == "f":
                flags |= BDRV_REQ_FUA
            elif c == "q":
                ctx.qflag = True
            elif c == "u":
                flags |= BDRV_REQ_MAY_UNMAP
            elif c == "P":
                pattern = parse_pattern(g.optarg)
                if pattern < 0:
                    return -errno.EINVAL
            elif c == "i":
                p("injecting invalid write request")
                block_acct_invalid(blk_get_stats(blk), BLOCK_ACCT_WRITE)
                return 0
            elif c == "z":
                ctx.zflag = True
            else:
                return io.bad_usage(aio_write_cmd)
        argv = g.argv
        optind = g.optind
        if optind > len(argv) - 2:
            return io.bad_usage(aio_write_cmd)
        if ctx.zflag and optind != len(argv) - 2:
            p("-z supports only a single length parameter")
            return -errno.EINVAL
        if flags & BDRV_REQ_MAY_UNMAP and not ctx.zflag:
            p("-u requires -z to be specified")
            return -errno.EINVAL
        if ctx.zflag and ctx.Pflag:
            p("-z and -P cannot be specified at the same time")
            return -errno.EINVAL
        ctx.offset = cvtnum_arg(argv[optind])
        if ctx.offset < 0:
            return ctx.offset
        optind += 1
        if ctx.zflag:
            count = cvtnum_arg(argv[optind])
            if count < 0:
                return count
            ctx.size = count
            # qemu-io 7.2 starts neither the clock nor the accounting here (t1 stays 0).
            blk_aio_pwrite_zeroes(blk, ctx.offset, count, flags, aio_write_done, ctx)
        else:
            made = io.create_iovec(argv[optind:], pattern)
            if made is None:
                block_acct_invalid(blk_get_stats(blk), BLOCK_ACCT_WRITE)
                return -errno.EINVAL
            ctx.qiov, ctx.buf = made
            ctx.size = ctx.qiov.size
            ctx.t1 = _now()
            ctx.acct = block_acct_start(blk_get_stats(blk), ctx.size, BLOCK_ACCT_WRITE)
            blk_aio_pwritev(blk, ctx.offset, ctx.qiov, flags, aio_write_done, ctx)
        return 0

    aio_write_cmd = CmdInfo("aio_write", aio_write_f, argmin=2, argmax=-1, perm=BLK_PERM_WRITE,
                            args="[-Cfiquz] [-P pattern] off len [len..]",
                            oneline="asynchronously writes a number of bytes", help=aio_write_help)

    def aio_flush_f(blk, argv) -> int:
        cookie = block_acct_start(blk_get_stats(blk), 0, BLOCK_ACCT_FLUSH)
        blk_drain_all()
        block_acct_done(blk_get_stats(blk), cookie)
        return 0

    aio_flush_cmd = CmdInfo("aio_flush", aio_flush_f, oneline="completes all outstanding aio requests")

    def flush_f(blk, argv) -> int:
        return blk_flush(blk)

    flush_cmd = CmdInfo("flush", flush_f, altname="f", oneline="flush all in-core file state to disk")

    def truncate_f(blk, argv) -> int:
        prealloc = PreallocMode.PREALLOC_MODE_OFF
        g = Getopt(argv, "m:")
        for c in g:
            if c == "m":
                try:
                    prealloc = PreallocMode(g.optarg)
                except ValueError:
                    io.report.error(f"Invalid preallocation mode '{g.optarg}'")
                    return -errno.EINVAL
            else:
                return io.bad_usage(truncate_cmd)
        argv = g.argv
        if g.optind >= len(argv):
            return io.bad_usage(truncate_cmd)
        offset = cvtnum(argv[g.optind])
        if offset < 0:
            print_cvtnum_err(offset, argv[1])
            return offset
        errp: list = []
        ret = blk_truncate(blk, offset, False, prealloc, errp)
        if ret < 0:
            if errp:
                io.report.error_err(errp[0])
            else:
                io.report.error(strerror(ret))
            return ret
        return 0

    truncate_cmd = CmdInfo("truncate", truncate_f, altname="t", argmin=1, argmax=3,
                           perm=BLK_PERM_WRITE | BLK_PERM_RESIZE, args="[-m prealloc_mode] off",
                           oneline="truncates the current file at the given offset")

    def length_f(blk, argv) -> int:
        size = blk_getlength(blk)
        if size < 0:
            p(f"getlength: {strerror(size)}")
            return size
        p(cvtstr(float(size)))
        return 0

    length_cmd = CmdInfo("length", length_f, altname="l", oneline="gets the length of the current file")

    def info_f(blk, argv) -> int:
        bs = blk_bs(blk)
        if bs.drv is not None and bs.drv.format_name:
            p(f"format name: {bs.drv.format_name}")
        if bs.drv is not None and bs.drv.protocol_name:
            p(f"format name: {bs.drv.protocol_name}")
        ret, bdi = tool_bdrv_get_info(bs)
        if ret:
            return ret
        p(f"cluster size: {cvtstr(float(bdi.cluster_size))}")
        p(f"vm state offset: {cvtstr(float(bdi.vm_state_offset))}")
        try:
            spec = bdrv_get_specific_info(bs)
        except Error as e:
            io.report.error_err(e)
            return -errno.EIO
        if spec:
            sys.stdout.write("Format specific information:\n" + bdrv_image_info_specific_dump(spec))
        return 0

    info_cmd = CmdInfo("info", info_f, altname="i", oneline="prints information about the current file")

    def discard_help() -> None:
        p("\n"
          " discards a range of bytes from the given offset\n"
          "\n"
          " Example:\n"
          " 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file\n"
          "\n"
          " Discards a segment of the currently open file.\n"
          " -C, -- report statistics in a machine parsable format\n"
          " -q, -- quiet mode, do not show I/O statistics\n")

    def discard_f(blk, argv) -> int:
        Cflag = qflag = False
        g = Getopt(argv, "Cq")
        for c in g:
            if c == "C":
                Cflag = True
            elif c == "q":
                qflag = True
            else:
                return io.bad_usage(discard_cmd)
        argv = g.argv
        optind = g.optind
        if optind != len(argv) - 2:
            return io.bad_usage(discard_cmd)
        ret, offset, nbytes = parse_offset_len(argv, optind)
        if ret < 0:
            return ret
        if nbytes > BDRV_REQUEST_MAX_BYTES:
            p(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES}, given {argv[optind + 1]}")
            return -errno.EINVAL
        t1 = _now()
        ret = blk_pdiscard(blk, offset, nbytes)
        t2 = _now()
        if ret < 0:
            p(f"discard failed: {strerror(ret)}")
            return ret
        if not qflag:
            print_report("discard", t2 - t1, offset, nbytes, nbytes, 1, Cflag)
        return 0

    discard_cmd = CmdInfo("discard", discard_f, altname="d", argmin=2, argmax=-1, perm=BLK_PERM_WRITE,
                          args="[-Cq] off len", oneline="discards a number of bytes at a specified offset",
                          help=discard_help)

    def alloc_f(blk, argv) -> int:
        from qblock.block.io import bdrv_is_allocated
        bs = blk_bs(blk)
        start = offset = cvtnum_arg(argv[1])
        if offset < 0:
            return offset
        if len(argv) == 3:
            count = cvtnum_arg(argv[2])
            if count < 0:
                return count
        else:
            count = BDRV_SECTOR_SIZE
        remaining = count
        sum_alloc = 0
        while remaining:
            ret, num = bdrv_is_allocated(bs, offset, remaining)
            if ret < 0:
                p(f"is_allocated failed: {strerror(ret)}")
                return ret
            offset += num
            remaining -= num
            if ret:
                sum_alloc += num
            if num == 0:
                count -= remaining
                remaining = 0
        p(f"{sum_alloc}/{count} bytes allocated at offset {cvtstr(float(start))}")
        return 0

    alloc_cmd = CmdInfo("alloc", alloc_f, altname="a", argmin=1, argmax=2, args="offset [count]",
                        oneline="checks if offset is allocated in the file")

    def map_is_allocated(bs, offset: int, nbytes: int) -> tuple[int, int]:
        from qblock.block.io import bdrv_is_allocated
        ret, num = bdrv_is_allocated(bs, offset, nbytes)
        if ret < 0:
            return ret, 0
        firstret = ret
        pnum = num
        while nbytes > 0 and ret == firstret:
            offset += num
            nbytes -= num
            ret, num = bdrv_is_allocated(bs, offset, nbytes)
            if ret == firstret and num:
                pnum += num
            else:
                break
        return firstret, pnum

    def map_f(blk, argv) -> int:
        offset = 0
        nbytes = blk_getlength(blk)
        if nbytes < 0:
            io.report.error(f"Failed to query image length: {strerror(nbytes)}")
            return nbytes
        while nbytes:
            ret, num = map_is_allocated(blk_bs(blk), offset, nbytes)
            if ret < 0:
                io.report.error(f"Failed to get allocation status: {strerror(ret)}")
                return ret
            if not num:
                io.report.error("Unexpected end of image")
                return -errno.EIO
            retstr = "    allocated" if ret else "not allocated"
            p("%s (0x%x) bytes %s at offset %s (0x%x)" % (cvtstr(float(num)), num, retstr,
                                                           cvtstr(float(offset)), offset))
            offset += num
            nbytes -= num
        return 0

    map_cmd = CmdInfo("map", map_f, argmin=0, argmax=0, args="", oneline="prints the allocated areas of a file")

    def reopen_help() -> None:
        p("\n"
          " Changes the open options of an already opened image\n"
          "\n"
          " Example:\n"
          " 'reopen -o lazy-refcounts=on' - activates lazy refcount writeback on a qcow2 image\n"
          "\n"
          " -r, -- Reopen the image read-only\n"
          " -w, -- Reopen the image read-write\n"
          " -c, -- Change the cache mode to the given value\n"
          " -o, -- Changes block driver options (cf. 'open' command)\n")

    def reopen_f(blk, argv) -> int:
        from qblock.util.qemu_option import keyval_parse
        bs = blk_bs(blk)
        flags = bs.open_flags
        writethrough = not blk_enable_write_cache(blk)
        has_rw_option = has_cache_option = False
        opts: dict[str, str] = {}
        g = Getopt(argv, "c:o:rw")
        for c in g:
            if c == "c":
                r, flags, writethrough = util.bdrv_parse_cache_mode(g.optarg, flags)
                if r < 0:
                    io.report.error(f"Invalid cache option: {g.optarg}")
                    return -errno.EINVAL
                has_cache_option = True
            elif c == "o":
                try:
                    opts.update(keyval_parse(g.optarg))
                except Error as e:
                    io.report.error_err(e)
                    return -errno.EINVAL
            elif c == "r":
                if has_rw_option:
                    io.report.error("Only one -r/-w option may be given")
                    return -errno.EINVAL
                flags &= ~BDRV_O_RDWR
                has_rw_option = True
            elif c == "w":
                if has_rw_option:
                    io.report.error("Only one -r/-w option may be given")
                    return -errno.EINVAL
                flags |= BDRV_O_RDWR
                has_rw_option = True
            else:
                return io.bad_usage(reopen_cmd)
        if g.optind != len(g.argv):
            return io.bad_usage(reopen_cmd)
        if not flags & BDRV_O_RDWR:
            # The BlockBackend gives up writing before the options are even checked (as
            # qemu-io's reopen_f), and does not get it back when the reopen fails.
            bdrv_drain(bs)
            orig_perm, orig_shared_perm = blk_get_perm(blk)
            blk_set_perm(blk, orig_perm & ~(BLK_PERM_WRITE | BLK_PERM_WRITE_UNCHANGED), orig_shared_perm)
        if "read-only" in opts:
            if has_rw_option:
                io.report.error("Cannot set both -r/-w and 'read-only'")
                return -errno.EINVAL
        else:
            opts["read-only"] = "off" if flags & BDRV_O_RDWR else "on"
        if "cache.direct" in opts or "cache.no-flush" in opts:
            if has_cache_option:
                io.report.error("Cannot set both -c and the cache options")
                return -errno.EINVAL
        else:
            opts["cache.direct"] = "on" if flags & BDRV_O_NOCACHE else "off"
            opts["cache.no-flush"] = "on" if flags & BDRV_O_NO_FLUSH else "off"
        try:
            bdrv_reopen(bs, opts, True)
        except Error as e:
            io.report.error_err(e)
            return -errno.EINVAL
        blk_set_enable_write_cache(blk, not writethrough)
        return 0

    reopen_cmd = CmdInfo("reopen", reopen_f, argmin=0, argmax=-1, args="[(-r|-w)] [-c cache] [-o options]",
                         oneline="reopens an image with new options", help=reopen_help)

    def break_f(blk, argv) -> int:
        ret = bdrv_debug_breakpoint(blk_bs(blk), argv[1], argv[2])
        if ret < 0:
            p(f"Could not set breakpoint: {strerror(ret)}")
            return ret
        return 0

    def remove_break_f(blk, argv) -> int:
        ret = bdrv_debug_remove_breakpoint(blk_bs(blk), argv[1])
        if ret < 0:
            p(f"Could not remove breakpoint {argv[1]}: {strerror(ret)}")
            return ret
        return 0

    break_cmd = CmdInfo("break", break_f, argmin=2, argmax=2, args="event tag",
                        oneline="sets a breakpoint on event and tags the stopped request as tag")
    remove_break_cmd = CmdInfo("remove_break", remove_break_f, argmin=1, argmax=1, args="tag",
                               oneline="remove a breakpoint by tag")

    def resume_f(blk, argv) -> int:
        ret = bdrv_debug_resume(blk_bs(blk), argv[1])
        if ret < 0:
            p(f"Could not resume request: {strerror(ret)}")
            return ret
        return 0

    resume_cmd = CmdInfo("resume", resume_f, argmin=1, argmax=1, args="tag",
                         oneline="resumes the request tagged as tag")

    def wait_break_f(blk, argv) -> int:
        from qblock.util.aio import AioPollDeadlock
        while not bdrv_debug_is_suspended(blk_bs(blk), argv[1]):
            try:
                aio_poll(blk_get_aio_context(blk), True)
            except AioPollDeadlock:
                io.report.error(f"wait_break: no request can reach the breakpoint '{argv[1]}'")
                return -errno.EDEADLK
        return 0

    wait_break_cmd = CmdInfo("wait_break", wait_break_f, argmin=1, argmax=1, args="tag",
                             oneline="waits for the suspension of a request")

    def abort_f(blk, argv) -> int:
        sys.stdout.flush()
        os.abort()

    abort_cmd = CmdInfo("abort", abort_f, flags=CMD_NOFILE_OK, oneline="simulate a program crash using abort(3)")

    def sigraise_help() -> None:
        p("\n"
          " raises the given signal\n"
          "\n"
          " Example:\n"
          f" 'sigraise {int(signal.SIGTERM)}' - raises SIGTERM\n"
          "\n"
          " Invokes raise(signal), where \"signal\" is the mandatory integer argument\n"
          " given to sigraise.\n")

    def sigraise_f(blk, argv) -> int:
        sig = cvtnum_arg(argv[1])
        if sig < 0:
            return sig
        if sig > signal.NSIG:
            p(f"signal argument '{argv[1]}' is too large to be a valid signal")
            return -errno.EINVAL
        sys.stdout.flush()
        sys.stderr.flush()
        signal.raise_signal(sig)
        return 0

    sigraise_cmd = CmdInfo("sigraise", sigraise_f, argmin=1, argmax=1, flags=CMD_NOFILE_OK, args="signal",
                           oneline="raises a signal", help=sigraise_help)

    def sleep_f(blk, argv) -> int:
        from qblock.util.timer import QEMU_CLOCK_HOST, SCALE_MS, timer_del
        from qblock.util.aio import aio_timer_new
        ret, ms = util.qemu_strtol(argv[1], 0)
        if ret < 0 or ms < 0:
            p(f"{argv[1]} is not a valid number")
            return -errno.EINVAL
        expired = []
        ctx = qemu_get_aio_context()
        t = aio_timer_new(ctx, QEMU_CLOCK_HOST, SCALE_MS, lambda _: expired.append(True), None)
        from qblock.util.timer import timer_mod
        timer_mod(t, qemu_clock_get_ns(QEMU_CLOCK_HOST) // SCALE_MS + ms)
        while not expired:
            aio_poll(ctx, True)
        timer_del(t)
        return 0

    sleep_cmd = CmdInfo("sleep", sleep_f, argmin=1, argmax=1, flags=CMD_NOFILE_OK,
                        oneline="waits for the given value in milliseconds")

    def help_oneline(cmd: str, ct: CmdInfo) -> None:
        line = f"{cmd} "
        if ct.args is not None:
            line += f"{ct.args} "
        p(f"{line}-- {ct.oneline}")

    def help_f(blk, argv) -> int:
        if len(argv) < 2:
            for ct in io.cmdtab:
                help_oneline(ct.name, ct)
            p("\nUse 'help commandname' for extended help.")
            return 0
        ct = io.find_command(argv[1])
        if ct is None:
            p(f"command {argv[1]} not found")
            return -errno.EINVAL
        help_oneline(argv[1], ct)
        if ct.help is not None:
            ct.help()
        return 0

    help_cmd = CmdInfo("help", help_f, altname="?", argmin=0, argmax=1, flags=CMD_FLAG_GLOBAL, args="[command]",
                       oneline="help for one or all commands")

    # qemu-io.c's own commands

    def close_f(blk, argv) -> int:
        blk_unref(io.blk)
        io.blk = None
        return 0

    close_cmd = CmdInfo("close", close_f, altname="c", oneline="close the current open file")

    def open_help() -> None:
        sys.stdout.write(
            "\n"
            " opens a new file in the requested mode\n"
            "\n"
            " Example:\n"
            " 'open -n -o driver=raw /tmp/data' - opens raw data file read-write, uncached\n"
            "\n"
            " Opens a file for subsequent use by all of the other qemu-io commands.\n"
            " -r, -- open file read-only\n"
            " -s, -- use snapshot file\n"
            " -C, -- use copy-on-read\n"
            " -n, -- disable host cache, short for -t none\n"
            " -U, -- force shared permissions\n"
            " -k, -- use kernel AIO implementation (Linux only, prefer use of -i)\n"
            " -i, -- use AIO mode (threads, native or io_uring)\n"
            " -t, -- use the given cache mode for the image\n"
            " -d, -- use the given discard mode for the image\n"
            " -o, -- options to be given to the block driver"
            "\n")

    def open_f(blk, argv) -> int:
        from qblock.util.qemu_option import keyval_parse
        oo = OpenOpts()
        opts: dict[str, str] | None = None
        g = Getopt(argv, "snCro:ki:t:d:U")
        for c in g:
            taken = oo.parse(io.report, c, g.optarg)
            if taken is False:
                return -errno.EINVAL
            if taken:
                continue
            if c == "o":
                if io.image_opts:
                    p("--image-opts and 'open -o' are mutually exclusive")
                    return -errno.EINVAL
                try:
                    opts = {**(opts or {}), **keyval_parse(g.optarg)}
                except Error as e:
                    io.report.error_err(e)
                    return -errno.EINVAL
            else:
                return io.bad_usage(open_cmd)
        flags, writethrough, force_share = oo.open_flags(), oo.writethrough, oo.force_share
        argv = g.argv
        optind = g.optind
        if io.image_opts and optind == len(argv) - 1:
            try:
                opts = {**(opts or {}), **keyval_parse(argv[optind])}
            except Error as e:
                io.report.error_err(e)
                return -errno.EINVAL
            optind += 1
        if optind == len(argv) - 1:
            ret = io.openfile(argv[optind], flags, writethrough, force_share, opts)
        elif optind == len(argv):
            ret = io.openfile(None, flags, writethrough, force_share, opts)
        else:
            return io.bad_usage(open_cmd)
        return -errno.EINVAL if ret else 0

    open_cmd = CmdInfo("open", open_f, altname="o", argmin=1, argmax=-1, flags=CMD_NOFILE_OK,
                       args="[-rsCnkU] [-t cache] [-d discard] [-o options] [path]",
                       oneline="open the file specified by path", help=open_help)

    def quit_f(blk, argv) -> int:
        io.quit = True
        return 0

    quit_cmd = CmdInfo("quit", quit_f, altname="q", argmin=-1, argmax=-1, flags=CMD_FLAG_GLOBAL,
                       oneline="exit the program")

    return [help_cmd, read_cmd, readv_cmd, write_cmd, writev_cmd, aio_read_cmd, aio_write_cmd, aio_flush_cmd,
            flush_cmd, truncate_cmd, length_cmd, info_cmd, discard_cmd, alloc_cmd, map_cmd, reopen_cmd,
            break_cmd, remove_break_cmd, resume_cmd, wait_break_cmd, abort_cmd, sleep_cmd, sigraise_cmd,
            quit_cmd, open_cmd, close_cmd]


# --------------------------------------------------------------------------
# main (qemu-io.c)


def usage(name: str) -> None:
    sys.stdout.write(
        f"Usage: {name} [OPTIONS]... [-c STRING]... [file]\n"
        "QEMU Disk exerciser\n"
        "\n"
        "  --object OBJECTDEF   define an object such as 'secret' for\n"
        "                       passwords and/or encryption keys\n"
        "  --image-opts         treat file as option string\n"
        "  -c, --cmd STRING     execute command with its arguments\n"
        "                       from the given string\n"
        "  -f, --format FMT     specifies the block driver to use\n"
        "  -r, --read-only      export read-only\n"
        "  -s, --snapshot       use snapshot file\n"
        "  -n, --nocache        disable host cache, short for -t none\n"
        "  -C, --copy-on-read   enable copy-on-read\n"
        "  -m, --misalign       misalign allocations for O_DIRECT\n"
        "  -k, --native-aio     use kernel AIO implementation\n"
        "                       (Linux only, prefer use of -i)\n"
        "  -i, --aio=MODE       use AIO mode (threads, native or io_uring)\n"
        "  -t, --cache=MODE     use the given cache mode for the image\n"
        "  -d, --discard=MODE   use the given discard mode for the image\n"
        "  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]\n"
        "                       specify tracing options\n"
        "                       see qemu-img(1) man page for full description\n"
        "  -U, --force-share    force shared permissions\n"
        "  -h, --help           display this help and exit\n"
        "  -V, --version        output version information and exit\n"
        "\n"
        f"See '{name} -c help' for information on available commands.\n"
        "\n"
        "See <https://qemu.org/contribute/report-a-bug> for how to report bugs.\n"
        "More information on the QEMU project at <https://qemu.org>.\n")


def command_loop(io: QemuIO, cmdline: list[str]) -> int:
    last_error = 0
    if cmdline:
        for cmd in cmdline:
            if io.quit:
                break
            ret = io.qemuio_command(cmd)
            if ret < 0:
                last_error = ret
        return last_error
    interactive = sys.stdin.isatty()
    rl = None
    if interactive:
        try:
            import readline as rl  # noqa: F401 - enables history and line editing for input()
        except ImportError:
            rl = None
    prompt = f"{PROG}> "
    ctx = qemu_get_aio_context()
    while not io.quit:
        while aio_poll(ctx, False):
            pass  # let finished aio requests report before the prompt, as qemu-io's main loop does
        if interactive:
            try:
                line = input(prompt)
            except EOFError:
                sys.stdout.write("\n")
                break
        else:
            sys.stdout.write(prompt)
            sys.stdout.flush()
            line = sys.stdin.readline()
            if not line:
                break
            if line.endswith("\n"):
                line = line[:-1]
        ret = io.qemuio_command(line)
        if ret < 0:
            last_error = ret
    return last_error


LONGOPTS = [
    ("help", util.no_argument, "h"),
    ("version", util.no_argument, "V"),
    ("cmd", util.required_argument, "c"),
    ("format", util.required_argument, "f"),
    ("read-only", util.no_argument, "r"),
    ("snapshot", util.no_argument, "s"),
    ("nocache", util.no_argument, "n"),
    ("copy-on-read", util.no_argument, "C"),
    ("misalign", util.no_argument, "m"),
    ("native-aio", util.no_argument, "k"),
    ("aio", util.required_argument, "i"),
    ("discard", util.required_argument, "d"),
    ("cache", util.required_argument, "t"),
    ("trace", util.required_argument, "T"),
    ("object", util.required_argument, "object"),
    ("image-opts", util.no_argument, "image-opts"),
    ("force-share", util.no_argument, "U"),
]


def _main(argv: list[str]) -> int:
    from qblock.util.qemu_option import keyval_parse
    io = QemuIO()
    report = io.report
    oo = OpenOpts()
    fmt = None
    objects: list[str] = []
    cmdline: list[str] = []
    g = Getopt([PROG] + argv, "hVc:d:f:rsnCmki:t:T:U", LONGOPTS)
    for c in g:
        taken = oo.parse(report, c, g.optarg)
        if taken is False:
            return 1
        if taken:
            continue
        if c == "f":
            fmt = g.optarg
        elif c == "c":
            cmdline.append(g.optarg)
        elif c == "m":
            io.misalign = True
        elif c == "T":
            if not util.trace_opt_parse(report, g.optarg):
                return 1
        elif c == "V":
            print(f"{PROG} version {QEMU_VERSION}\nCopyright (c) 2003-2022 Fabrice Bellard and the QEMU Project "
                  "developers")
            return 0
        elif c == "h":
            usage(PROG)
            return 0
        elif c == "object":
            objects.append(g.optarg)
        elif c == "image-opts":
            io.image_opts = True
        else:
            usage(PROG)
            return 1
    args = g.argv[g.optind:]
    if len(args) > 1:
        usage(PROG)
        return 1
    if fmt and io.image_opts:
        report.error("--image-opts and -f are mutually exclusive")
        return 1
    if not util.user_creatable_add_objects(report, objects):
        return 1
    flags, writethrough, force_share = oo.open_flags(), oo.writethrough, oo.force_share
    if args:
        if io.image_opts:
            try:
                opts = keyval_parse(args[0], "file")
            except Error as e:
                report.error_err(e)
                return 1
            if io.openfile(None, flags, writethrough, force_share, opts):
                return 1
        else:
            opts = {"driver": fmt} if fmt else None
            if io.openfile(args[0], flags, writethrough, force_share, opts):
                return 1
    ret = command_loop(io, cmdline)
    bdrv_drain_all()
    if io.blk is not None:
        blk_unref(io.blk)
        io.blk = None
    return 1 if ret < 0 else 0


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run qemu-io's main and turn stray exceptions into one error line."""
    return util.tool_main(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
