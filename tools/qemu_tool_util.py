"""What qemu-io and qemu-img share: glibc's getopt, QEMU's size parsing and printing, error reporting,
cache/discard/aio mode parsing, the progress meter, and the console-script entry point.

Mirrors, in QEMU 7.2: glibc ``getopt_long`` (as both tools call it, with permutation and glibc's
messages), ``qemu_strtosz`` (util/cutils.c), ``cvtstr`` (qemu-io-cmds.c), ``error_report``
(util/qemu-error.c), ``bdrv_parse_cache_mode``/``bdrv_parse_discard_flags``/``bdrv_parse_aio``
(block.c), and util/qemu-progress.c.  JSON output in QDict order (which is why qemu-img's JSON
lists ``virtual-size`` before ``filename``) is :mod:`qblock.qmp.qjson`'s, as QMP's is.
"""
from __future__ import annotations

import errno
import math
import sys
from typing import Any, Callable, Iterable

from qblock.block.driver import (
    BDRV_O_CACHE_MASK,
    BDRV_O_NATIVE_AIO,
    BDRV_O_NO_FLUSH,
    BDRV_O_NOCACHE,
    BDRV_O_UNMAP,
)

UINT64_MAX = (1 << 64) - 1
INT64_MAX = (1 << 63) - 1
INT_MAX = (1 << 31) - 1


# --------------------------------------------------------------------------
# Messages


class ToolExit(Exception):
    """Leave the tool with ``status`` (QEMU's exit() calls deep inside a command)."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class Reporter:
    """error_report / warn_report with the tool's name as prefix (QEMU prints g_get_prgname())."""

    def __init__(self, prog: str):
        self.prog = prog

    def error(self, msg: str) -> None:
        sys.stdout.flush()
        sys.stderr.write(f"{self.prog}: {msg}\n")
        sys.stderr.flush()

    def warn(self, msg: str) -> None:
        sys.stdout.flush()
        sys.stderr.write(f"{self.prog}: warning: {msg}\n")
        sys.stderr.flush()

    def error_err(self, err: BaseException, prefix: str = "") -> None:
        """error_report_err / error_reportf_err: the message, then the hint lines QEMU appends."""
        msg = getattr(err, "msg", None) or str(err)
        self.error(prefix + msg)
        hint = getattr(err, "hint", None)
        if hint:
            # A hint ending in NUL is printed as is (QEMU's hints carry their own newlines or none).
            if hint.endswith("\0"):
                sys.stderr.write(hint[:-1])
            else:
                sys.stderr.write(hint if hint.endswith("\n") else hint + "\n")
            sys.stderr.flush()


def strerror(err: int) -> str:
    """The C library's strerror for a positive or negative errno."""
    from qblock.util.error import strerror as _strerror
    return _strerror(abs(err))


def trace_opt_parse(report: Reporter, optarg: str) -> bool:
    """The tools' ``-T``/``--trace`` option (trace/control.c); False after reporting an error."""
    from qblock.trace.control import trace_opt_parse as _trace_opt_parse
    from qblock.util.error import Error
    try:
        _trace_opt_parse(optarg)
    except Error as e:
        report.error_err(e)
        return False
    return True


def user_creatable_add_objects(report: Reporter, objects: list[str]) -> bool:
    """user_creatable_process_cmdline for every ``--object``; False after reporting the first error."""
    from qblock.block.throttle_groups import user_creatable_process_cmdline
    from qblock.util.error import Error
    for obj in objects:
        try:
            user_creatable_process_cmdline(obj)
        except Error as e:
            report.error_err(e)
            return False
    return True


def tool_main(prog: str, tool_main_fn: Callable[[list[str]], int], argv: list[str] | None) -> int:
    """A tool's console-script entry point: run its main over ``argv`` (default: the command line)
    and return the exit status, with a stray exception reported as one error line, never a traceback."""
    from qblock.util.error import Error, error_set_progname
    error_set_progname(prog)
    report = Reporter(prog)
    argv = sys.argv[1:] if argv is None else argv
    try:
        status = tool_main_fn(argv)
    except ToolExit as e:
        status = e.status
    except KeyboardInterrupt:
        status = 130
    except BrokenPipeError:
        status = 1
    except Error as e:
        report.error_err(e)
        status = 1
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        report.error(f"internal error: {type(e).__name__}: {e}")
        status = 1
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    return status


# --------------------------------------------------------------------------
# glibc getopt_long, with permutation

no_argument = 0
required_argument = 1
optional_argument = 2


class Getopt:
    """One getopt scan over ``argv`` (glibc's _getopt_internal_r, state in the object).

    ``argv[0]`` is the program (or qemu-io command) name used in glibc's messages.  ``argv`` is
    permuted in place, as glibc does, so that after the scan ``argv[optind:]`` are the operands.
    """

    def __init__(self, argv: list[str], optstring: str, longopts: Iterable[tuple[str, int, Any]] = ()):
        self.argv = argv
        self.longopts = list(longopts)
        self.optind = 1
        self.optarg: str | None = None
        self.optopt: Any = None
        self.nextchar = ""
        self.first_nonopt = self.last_nonopt = 1
        self.ordering = "permute"
        if optstring.startswith("-"):
            self.ordering, optstring = "return_in_order", optstring[1:]
        elif optstring.startswith("+"):
            self.ordering, optstring = "require_order", optstring[1:]
        self.optstring = optstring
        self.print_errors = not optstring.startswith(":")

    def _err(self, msg: str) -> None:
        if self.print_errors:
            sys.stdout.flush()
            sys.stderr.write(f"{self.argv[0]}: {msg}\n")
            sys.stderr.flush()

    def _exchange(self) -> None:
        a, b, c = self.first_nonopt, self.last_nonopt, self.optind
        self.argv[a:c] = self.argv[b:c] + self.argv[a:b]
        self.first_nonopt += c - b
        self.last_nonopt = c

    def _nonoption(self, i: int) -> bool:
        s = self.argv[i]
        return not s.startswith("-") or s == "-"

    def __iter__(self):
        return self

    def __next__(self) -> Any:
        c = self.getopt()
        if c == -1:
            raise StopIteration
        return c

    def getopt(self) -> Any:
        """The next option character (or long option value), '?' or ':' on errors, -1 at the end."""
        argv = self.argv
        argc = len(argv)
        self.optarg = None
        if not self.nextchar:
            if self.last_nonopt > self.optind:
                self.last_nonopt = self.optind
            if self.first_nonopt > self.optind:
                self.first_nonopt = self.optind
            if self.ordering == "permute":
                if self.first_nonopt != self.last_nonopt and self.last_nonopt != self.optind:
                    self._exchange()
                elif self.last_nonopt != self.optind:
                    self.first_nonopt = self.optind
                while self.optind < argc and self._nonoption(self.optind):
                    self.optind += 1
                self.last_nonopt = self.optind
            if self.optind != argc and argv[self.optind] == "--":
                self.optind += 1
                if self.first_nonopt != self.last_nonopt and self.last_nonopt != self.optind:
                    self._exchange()
                elif self.first_nonopt == self.last_nonopt:
                    self.first_nonopt = self.optind
                self.last_nonopt = argc
                self.optind = argc
            if self.optind == argc:
                if self.first_nonopt != self.last_nonopt:
                    self.optind = self.first_nonopt
                return -1
            if self._nonoption(self.optind):
                if self.ordering == "require_order":
                    return -1
                self.optarg = argv[self.optind]
                self.optind += 1
                return 1
            if self.longopts and argv[self.optind].startswith("--"):
                self.nextchar = argv[self.optind][2:]
                return self._long_option()
            self.nextchar = argv[self.optind][1:]
        c = self.nextchar[0]
        self.nextchar = self.nextchar[1:]
        pos = self.optstring.find(c)
        if not self.nextchar:
            self.optind += 1
        if pos < 0 or c in ":;":
            self._err(f"invalid option -- '{c}'")
            self.optopt = c
            return "?"
        spec = self.optstring[pos + 1:pos + 3]
        if spec.startswith(":"):
            if spec == "::":
                if self.nextchar:
                    self.optarg = self.nextchar
                    self.optind += 1
                self.nextchar = ""
            else:
                if self.nextchar:
                    self.optarg = self.nextchar
                    self.optind += 1
                elif self.optind == argc:
                    self._err(f"option requires an argument -- '{c}'")
                    self.optopt = c
                    c = ":" if self.optstring.startswith(":") else "?"
                else:
                    self.optarg = argv[self.optind]
                    self.optind += 1
                self.nextchar = ""
        return c

    def _long_option(self) -> Any:
        argv = self.argv
        name, eq, value = self.nextchar.partition("=")
        found = None
        for lo in self.longopts:
            if lo[0] == name:
                found = lo
                break
        if found is None:
            matches = [lo for lo in self.longopts if lo[0].startswith(name)]
            if len(matches) == 1 or (matches and all(m[1:] == matches[0][1:] for m in matches)):
                found = matches[0]
            elif len(matches) > 1:
                if self.print_errors:
                    poss = "".join(f" '--{m[0]}'" for m in matches)
                    self._err(f"option '--{name}' is ambiguous; possibilities:{poss}")
                self.nextchar = ""
                self.optind += 1
                self.optopt = 0
                return "?"
        if found is None:
            self._err(f"unrecognized option '--{self.nextchar}'")
            self.nextchar = ""
            self.optind += 1
            self.optopt = 0
            return "?"
        self.optind += 1
        self.nextchar = ""
        lname, has_arg, val = found
        if eq:
            if has_arg:
                self.optarg = value
            else:
                self._err(f"option '--{lname}' doesn't allow an argument")
                self.optopt = val
                return "?"
        elif has_arg == required_argument:
            if self.optind < len(argv):
                self.optarg = argv[self.optind]
                self.optind += 1
            else:
                self._err(f"option '--{lname}' requires an argument")
                self.optopt = val
                return ":" if self.optstring.startswith(":") else "?"
        return val


# --------------------------------------------------------------------------
# Numbers (util/cutils.c as of QEMU 7.2)


def _strtou64_prefix(s: str, base: int) -> tuple[int, int, int]:
    """strtoull on a prefix of ``s``: (errno or 0, value, index after the number)."""
    i = 0
    n = len(s)
    while i < n and s[i] in " \t\n\v\f\r":
        i += 1
    neg = False
    if i < n and s[i] in "+-":
        neg = s[i] == "-"
        i += 1
    if base == 16 and s[i:i + 2].lower() == "0x" and i + 2 < n and s[i + 2] in "0123456789abcdefABCDEF":
        i += 2
    digits = "0123456789" if base == 10 else "0123456789abcdefABCDEF"
    start = i
    while i < n and s[i] in digits:
        i += 1
    if i == start:
        return -errno.EINVAL, 0, 0
    value = int(s[start:i], base)
    if value > UINT64_MAX:
        return -errno.ERANGE, UINT64_MAX, i
    if neg:
        value = (-value) & UINT64_MAX
    return 0, value, i


def _strtod_prefix(s: str) -> tuple[float | None, int]:
    """strtod on a prefix of ``s`` (decimal only, which is all a size fraction can be)."""
    import re
    m = re.match(r"[ \t\n\v\f\r]*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", s)
    if not m:
        return None, 0
    return float(m.group(0)), m.end()


_SUFFIX_POW = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


def _suffix_mul(c: str, unit: int) -> int:
    p = _SUFFIX_POW.get(c.lower()) if c else None
    return 0 if p is None else unit ** p


def qemu_strtosz(text: str, unit: int = 1024, default_suffix: str = "B") -> tuple[int, int]:
    """QEMU 7.2's qemu_strtosz (do_strtosz) on the whole string: (0, value) or (-EINVAL/-ERANGE, 0)."""
    ret, val, end = _strtou64_prefix(text, 10)
    if ret == -errno.EINVAL:
        return ret, 0
    if ret == -errno.ERANGE:
        return ret, 0
    if "-" in text[:end]:
        return -errno.EINVAL, 0
    valf = 0
    if val == 0 and end < len(text) and text[end] in "xX":
        ret, val, end = _strtou64_prefix(text, 16)
        if ret:
            return ret, 0
        c = text[end] if end < len(text) else ""
        if c == "." or _suffix_mul(c, unit):
            return -errno.EINVAL, 0
    elif end < len(text) and text[end] == ".":
        fraction, flen = _strtod_prefix(text[end:])
        if fraction is None or math.isinf(fraction) or math.isnan(fraction):
            end += 1
        else:
            part = text[end:end + flen]
            if "e" in part or "E" in part:
                return -errno.EINVAL, 0
            end += flen
            valf = int(fraction * 2.0 ** 64)
    c = text[end] if end < len(text) else ""
    mul = _suffix_mul(c, unit)
    if mul > 0:
        end += 1
    else:
        mul = _suffix_mul(default_suffix, unit)
    if mul == 1:
        if valf:
            return -errno.EINVAL, 0
        result = val
    else:
        low = valf * mul
        result = val * mul + (low >> 64) + ((low & UINT64_MAX) >> 63)
        if result > UINT64_MAX:
            return -errno.ERANGE, 0
    if end != len(text):
        return -errno.EINVAL, 0
    return 0, result


def cvtnum(text: str) -> int:
    """qemu-io's cvtnum: a size as an int64, or -EINVAL/-ERANGE."""
    ret, value = qemu_strtosz(text)
    if ret < 0:
        return ret
    if value > INT64_MAX:
        return -errno.ERANGE
    return value


def qemu_strtol(text: str, base: int = 10) -> tuple[int, int]:
    """QEMU's qemu_strtol/qemu_strtoi on the whole string (strtol semantics, base 0 allowed)."""
    s = text
    i = 0
    while i < len(s) and s[i] in " \t\n\v\f\r":
        i += 1
    sign = 1
    if i < len(s) and s[i] in "+-":
        sign = -1 if s[i] == "-" else 1
        i += 1
    rest = s[i:]
    b = base
    if b in (0, 16) and rest[:2].lower() == "0x" and len(rest) > 2 and rest[2] in "0123456789abcdefABCDEF":
        rest = rest[2:]
        b = 16
    elif b == 0 and rest.startswith("0") and len(rest) > 1:
        b = 8
    elif b == 0:
        b = 10
    valid = "0123456789abcdefghijklmnopqrstuvwxyz"[:b]
    j = 0
    while j < len(rest) and rest[j].lower() in valid:
        j += 1
    if j == 0:
        if b == 8 and rest == "0":
            return 0, 0
        return -errno.EINVAL, 0
    if j != len(rest):
        return -errno.EINVAL, 0
    return 0, sign * int(rest[:j], b)


def cvtstr(value: float) -> str:
    """qemu-io's cvtstr: ``128 MiB``, ``63.453 KiB``, ``42 bytes`` (the first '.000' becomes the suffix)."""
    units = ((1 << 60, " EiB"), (1 << 50, " PiB"), (1 << 40, " TiB"), (1 << 30, " GiB"),
             (1 << 20, " MiB"), (1 << 10, " KiB"))
    for size, suffix in units:
        if value >= size:
            s = "%.3f" % (value / size)
            break
    else:
        suffix = " bytes"
        s = "%f" % value
    i = s.find(".000")
    return s[:i] + suffix if i >= 0 else s + suffix


def size_to_str(val: int) -> str:
    """util/cutils.c size_to_str: ``68 KiB``, ``1.5 MiB``, ``512 B`` (%0.3g of the largest unit)."""
    suffixes = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    # frexp(val / (1000 / 1024)): switch to the next unit once the integer part reaches 1000.
    _, e = math.frexp(val / (1000.0 / 1024.0))
    i = int((e - 1) / 10)  # C division truncates toward zero
    div = 1 << (i * 10)
    return "%0.3g %s" % (val / div, suffixes[i])


# --------------------------------------------------------------------------
# Modes (block.c)


def bdrv_parse_cache_mode(mode: str, flags: int) -> tuple[int, int, bool]:
    """(0 or -1, flags, writethrough) for a cache mode name (block.c: bdrv_parse_cache_mode)."""
    flags &= ~BDRV_O_CACHE_MASK
    if mode in ("off", "none"):
        return 0, flags | BDRV_O_NOCACHE, False
    if mode == "directsync":
        return 0, flags | BDRV_O_NOCACHE, True
    if mode == "writeback":
        return 0, flags, False
    if mode == "unsafe":
        return 0, flags | BDRV_O_NO_FLUSH, False
    if mode == "writethrough":
        return 0, flags, True
    return -1, flags, False


def bdrv_parse_discard_flags(mode: str, flags: int) -> tuple[int, int]:
    flags &= ~BDRV_O_UNMAP
    if mode in ("off", "ignore"):
        return 0, flags
    if mode in ("on", "unmap"):
        return 0, flags | BDRV_O_UNMAP
    return -1, flags


def bdrv_parse_aio(mode: str, flags: int) -> tuple[int, int]:
    """``threads``/``native`` (``io_uring`` is refused: qblock has no io_uring backend)."""
    if mode == "native":
        return 0, flags | BDRV_O_NATIVE_AIO
    if mode == "threads":
        return 0, flags & ~BDRV_O_NATIVE_AIO
    return -1, flags


def cache_options(flags: int) -> dict[str, str]:
    """The options QEMU's blk_new_open derives from BDRV_O_NOCACHE/BDRV_O_NO_FLUSH (as explicit keys)."""
    opts: dict[str, str] = {}
    if flags & BDRV_O_NOCACHE:
        opts["cache.direct"] = "on"
    if flags & BDRV_O_NO_FLUSH:
        opts["cache.no-flush"] = "on"
    return opts


# --------------------------------------------------------------------------
# Progress meter (util/qemu-progress.c)


class Progress:
    """qemu_progress_init/print/end: ``    (12.50/100%)\\r`` lines on stdout, when enabled."""

    def __init__(self, enabled: bool, min_skip: float):
        self.enabled = enabled
        self.min_skip = min_skip
        self.current = 0.0
        self.last_print = 0.0

    def _print(self) -> None:
        if self.enabled:
            sys.stdout.write("    (%3.2f/100%%)\r" % self.current)
            sys.stdout.flush()

    def print(self, delta: float, max_: int) -> None:
        """qemu_progress_print: ``max_`` 0 sets the position to ``delta``, else adds ``delta`` / 100 * ``max_``."""
        import ctypes
        if max_ == 0:
            current = delta
        else:
            current = self.current + delta / 100 * max_
        current = ctypes.c_float(current).value  # QEMU keeps the state in a float
        if current > 100:
            current = 100.0
        self.current = current
        if (current > (self.last_print + self.min_skip) or current < (self.last_print - self.min_skip)
                or current == 0 or current == 100):
            self.last_print = self.current
            self._print()

    def end(self) -> None:
        if self.enabled:
            sys.stdout.write("\n")
            sys.stdout.flush()
