"""Number and size parsing and printing: QEMU's util/cutils.c (and qemu-io's cvtstr).

``qemu_strtosz`` accepts what QEMU accepts for sizes: a decimal (or ``0x``
hex) number with an optional fraction and one of the suffixes B, K, M, G, T,
P, E (either case, powers of 1024).  It returns ``(errno, value)`` like the C
function's return code and out-parameter, so callers keep QEMU's error
paths.
"""
from __future__ import annotations

import errno as _errno
import re

__all__ = ["qemu_strtosz", "qemu_strtosz_MiB", "qemu_strtosz_metric", "qemu_strtoi64", "qemu_strtou64",
           "size_to_str", "cvtstr", "freq_to_str", "is_power_of_2", "QEMU_ALIGN_DOWN", "QEMU_ALIGN_UP",
           "ROUND_UP", "DIV_ROUND_UP", "MIN_NON_ZERO", "QEMU_IS_ALIGNED", "pow2floor"]

_SUFFIXES = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
_SIZE_RE = re.compile(r"^\s*(0[xX][0-9a-fA-F]+|\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]?)\s*$")
UINT64_MAX = (1 << 64) - 1


def _do_strtosz(text: str, default_suffix: str, unit: int) -> tuple[int, int]:
    if not isinstance(text, str):
        return -_errno.EINVAL, 0
    m = _SIZE_RE.match(text)
    if not m:
        return -_errno.EINVAL, 0
    num, suffix = m.group(1), m.group(2)
    is_hex = num.lower().startswith("0x")
    if is_hex:
        if suffix.upper() in ("B", "E") and not suffix:  # pragma: no cover - unreachable
            pass
        value: float | int = int(num, 16)
    elif "." in num:
        value = float(num)
    else:
        value = int(num)
    suffix = suffix.upper() if suffix else default_suffix
    if suffix not in _SUFFIXES:
        return -_errno.EINVAL, 0
    if is_hex and m.group(2):
        return -_errno.EINVAL, 0  # QEMU rejects hex with a suffix
    mul = unit ** _SUFFIXES[suffix]
    if isinstance(value, float):
        if suffix == "B" and value != int(value):
            return -_errno.EINVAL, 0  # fractions of a byte
        result = int(value * mul)
    else:
        result = value * mul
    if result > UINT64_MAX:
        return -_errno.ERANGE, 0
    return 0, result


def qemu_strtosz(text: str) -> tuple[int, int]:
    """Parse a size in bytes with binary suffixes; returns (0, value) or (-errno, 0)."""
    return _do_strtosz(text, "B", 1024)


def qemu_strtosz_MiB(text: str) -> tuple[int, int]:
    """Like qemu_strtosz, but a number without suffix means MiB (qemu-img's old sizes)."""
    return _do_strtosz(text, "M", 1024)


def qemu_strtosz_metric(text: str) -> tuple[int, int]:
    """Like qemu_strtosz with powers of 1000."""
    return _do_strtosz(text, "B", 1000)


def qemu_strtoi64(text: str, base: int = 10) -> tuple[int, int]:
    """Parse a signed 64-bit integer; (0, value) or (-EINVAL/-ERANGE, 0)."""
    try:
        value = int(str(text).strip(), base if base else 0)
    except ValueError:
        return -_errno.EINVAL, 0
    if not -(1 << 63) <= value < (1 << 63):
        return -_errno.ERANGE, 0
    return 0, value


def qemu_strtou64(text: str, base: int = 10) -> tuple[int, int]:
    """Parse an unsigned 64-bit integer; like strtoull, a leading '-' negates modulo 2**64."""
    s = str(text).strip()
    neg = s.startswith("-")
    if neg:
        s = s[1:]
    try:
        value = int(s, base if base else 0)
    except ValueError:
        return -_errno.EINVAL, 0
    if value > UINT64_MAX:
        return -_errno.ERANGE, 0
    return 0, (-value) & UINT64_MAX if neg else value


def size_to_str(val: int) -> str:
    """QEMU's size_to_str: ``1 GiB``, ``1.5 MiB``, ``512 B`` (used by qemu-img info)."""
    suffixes = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    i = 0
    v = float(val)
    while v >= 1024 and i < len(suffixes) - 1:
        v /= 1024
        i += 1
    # QEMU prints "%0.3g" and strips nothing else.
    return f"{_fmt_g3(v)} {suffixes[i]}"


def _fmt_g3(v: float) -> str:
    s = "%0.3g" % v
    return s


def cvtstr(value: float) -> str:
    """qemu-io's cvtstr: ``128 MiB``, ``63.453 KiB``, ``42 bytes``."""
    units = [(1 << 60, " EiB"), (1 << 50, " PiB"), (1 << 40, " TiB"), (1 << 30, " GiB"),
             (1 << 20, " MiB"), (1 << 10, " KiB")]
    for size, suffix in units:
        if value >= size:
            s = "%.3f" % (value / size)
            if s.endswith(".000"):
                s = s[:-4]
            return s + suffix
    s = "%f" % value
    if s.endswith(".000000"):
        s = s[:-7]
    return s + " bytes"


def freq_to_str(freq_hz: int) -> str:
    return f"{freq_hz} Hz"


def is_power_of_2(value: int) -> bool:
    return value > 0 and (value & (value - 1)) == 0


def pow2floor(value: int) -> int:
    return 1 << (value.bit_length() - 1) if value > 0 else 0


def QEMU_ALIGN_DOWN(n: int, m: int) -> int:
    return n // m * m


def QEMU_ALIGN_UP(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def ROUND_UP(n: int, d: int) -> int:
    return (n + d - 1) // d * d


def DIV_ROUND_UP(n: int, d: int) -> int:
    return (n + d - 1) // d


def QEMU_IS_ALIGNED(n: int, m: int) -> bool:
    return n % m == 0


def MIN_NON_ZERO(a: int, b: int) -> int:
    """The smaller of two values, ignoring a zero (QEMU's MIN_NON_ZERO)."""
    if a == 0:
        return b
    if b == 0:
        return a
    return min(a, b)
