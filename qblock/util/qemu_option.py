"""Declared options: QEMU's util/qemu-option.c, util/keyval.c and qobject/block-qdict.c.

A driver declares its options once, as QEMU's ``QemuOptsList`` does::

    runtime_opts = QemuOptsList("null", [
        QemuOptDesc("size", QEMU_OPT_SIZE, "size of the null block"),
        QemuOptDesc("latency-ns", QEMU_OPT_NUMBER, "nanoseconds of latency"),
    ])

and takes its values out of the options dict with
:func:`qemu_opts_absorb_qdict`, which converts each value to the declared
type with QEMU's error messages ("Parameter 'size' expects a non-negative
number below 2^64") and removes it from the dict.  What is left over after
every layer took its share is an unknown option, which the block layer
reports with QEMU's wording.  Parsing is separate from applying, so open and
reopen share it.

Option dicts are flat with dotted keys (``file.filename``), as QEMU's QDicts
are after ``qdict_flatten``.  :func:`keyval_parse` reads the
``driver=qcow2,file.filename=a.qcow2`` form (``,,`` escapes a comma) and
:func:`qdict_flatten` turns nested dicts (``json:{...}``) into dotted keys.
"""
from __future__ import annotations

import enum
import errno
import json
from typing import Any, Iterable

import attrs

from qblock.util.cutils import qemu_strtosz, qemu_strtou64
from qblock.util.error import Error

__all__ = [
    "QEMU_OPT_STRING", "QEMU_OPT_BOOL", "QEMU_OPT_NUMBER", "QEMU_OPT_SIZE",
    "QemuOptDesc", "QemuOptsList", "QemuOpts", "qemu_opts_absorb_qdict", "qemu_opt_get",
    "qemu_opt_get_bool", "qemu_opt_get_number", "qemu_opt_get_size", "parse_option_bool",
    "parse_option_number", "parse_option_size", "qapi_enum_parse", "keyval_parse", "qdict_flatten",
    "qdict_crumple", "qdict_extract_subqdict", "parse_json_filename",
]

QEMU_OPT_STRING = "string"
QEMU_OPT_BOOL = "bool"
QEMU_OPT_NUMBER = "number"
QEMU_OPT_SIZE = "size"

UINT64_MAX = (1 << 64) - 1
_SIZE_HINT = ("Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
              "and exabytes, respectively.")


@attrs.define(frozen=True)
class QemuOptDesc:
    """One declared option: name, type, help text and default (QEMU's QemuOptDesc)."""

    name: str
    type: str = QEMU_OPT_STRING
    help: str = ""
    def_value_str: str | None = None


@attrs.define(frozen=True)
class QemuOptsList:
    """A named list of option declarations (QEMU's QemuOptsList)."""

    name: str
    desc: tuple = attrs.field(converter=tuple)
    implied_opt_name: str | None = None

    def find_desc(self, name: str) -> QemuOptDesc | None:
        for d in self.desc:
            if d.name == name:
                return d
        return None

    def names(self) -> list[str]:
        return [d.name for d in self.desc]


def parse_option_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise Error(f"Parameter '{name}' expects 'on' or 'off'")


def parse_option_number(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise Error(f"Parameter '{name}' expects a number")
    if isinstance(value, int):
        if value < 0:
            # A QDict int is taken as the uint64 it would be in C.
            return value & UINT64_MAX
        ret, n = (-errno.ERANGE, 0) if value > UINT64_MAX else (0, value)
    else:
        ret, n = qemu_strtou64(str(value), 0)
    if ret == -errno.ERANGE:
        raise Error(f"Value '{value}' is too large for parameter '{name}'")
    if ret < 0:
        raise Error(f"Parameter '{name}' expects a number")
    return n


def parse_option_size(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise Error(f"Parameter '{name}' expects a non-negative number below 2^64", hint=_SIZE_HINT)
    if isinstance(value, int):
        ret, n = (-errno.EINVAL, 0) if value < 0 else (-errno.ERANGE, 0) if value > UINT64_MAX else (0, value)
    else:
        ret, n = qemu_strtosz(str(value))
    if ret == -errno.ERANGE:
        raise Error(f"Value '{value}' is out of range for parameter '{name}'")
    if ret < 0:
        raise Error(f"Parameter '{name}' expects a non-negative number below 2^64", hint=_SIZE_HINT)
    return n


_PARSERS = {
    QEMU_OPT_BOOL: parse_option_bool,
    QEMU_OPT_NUMBER: parse_option_number,
    QEMU_OPT_SIZE: parse_option_size,
}


class QemuOpts:
    """The parsed values of one QemuOptsList (QEMU's QemuOpts)."""

    def __init__(self, lst: QemuOptsList, values: dict[str, Any] | None = None):
        self.list = lst
        self.values: dict[str, Any] = values or {}

    def get(self, name: str, default: Any = None) -> Any:
        if name in self.values:
            return self.values[name]
        desc = self.list.find_desc(name)
        if desc is not None and desc.def_value_str is not None:
            parse = _PARSERS.get(desc.type)
            return parse(name, desc.def_value_str) if parse else desc.def_value_str
        return default

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def __repr__(self) -> str:
        return f"<QemuOpts {self.list.name} {self.values}>"


def qemu_opts_absorb_qdict(lst: QemuOptsList, qdict: dict[str, Any]) -> QemuOpts:
    """Move every declared option out of ``qdict`` into a QemuOpts, converting its type."""
    values = {}
    for desc in lst.desc:
        if desc.name in qdict:
            raw = qdict.pop(desc.name)
            parse = _PARSERS.get(desc.type)
            if parse is not None:
                values[desc.name] = parse(desc.name, raw)
            else:
                values[desc.name] = raw if isinstance(raw, str) else _qobject_to_str(raw)
    return QemuOpts(lst, values)


def _qobject_to_str(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def qemu_opt_get(opts: QemuOpts, name: str, default: Any = None) -> Any:
    return opts.get(name, default)


def qemu_opt_get_bool(opts: QemuOpts, name: str, default: bool) -> bool:
    return bool(opts.get(name, default))


def qemu_opt_get_number(opts: QemuOpts, name: str, default: int) -> int:
    return int(opts.get(name, default))


def qemu_opt_get_size(opts: QemuOpts, name: str, default: int) -> int:
    return int(opts.get(name, default))


def qapi_enum_parse(enum_cls: type[enum.Enum], value: Any, default: enum.Enum | None = None,
                    name: str | None = None) -> enum.Enum:
    """Look ``value`` up among an enum's values; QEMU's 'invalid parameter value' otherwise.

    The error's hint lists the valid values.
    """
    if value is None:
        if default is None:
            raise Error(f"Parameter '{name}' is missing" if name else "missing parameter value")
        return default
    if isinstance(value, enum_cls):
        return value
    for member in enum_cls:
        if member.value == value:
            return member
    valid = ", ".join(str(m.value) for m in enum_cls)
    raise Error(f"invalid parameter value: {value}", hint=f"Valid values: {valid}")


# ---------------------------------------------------------------------------
# Strings and dicts


def keyval_parse(params: str, implied_key: str | None = None) -> dict[str, str]:
    """Parse ``key=value,key2=value2`` (``,,`` is a literal comma) into a flat dict.

    A first element without ``=`` is the value of ``implied_key`` when given;
    any other element without ``=`` is QEMU's short-form boolean (``key`` means
    ``key=on``).
    """
    out: dict[str, str] = {}
    i = 0
    n = len(params)
    first = True
    while i < n:
        # read one element up to an unescaped comma
        buf = []
        while i < n:
            c = params[i]
            if c == ",":
                if i + 1 < n and params[i + 1] == ",":
                    buf.append(",")
                    i += 2
                    continue
                break
            buf.append(c)
            i += 1
        i += 1  # skip the separator
        elem = "".join(buf)
        if elem == "" and i >= n and not first:
            break
        if "=" in elem:
            key, val = elem.split("=", 1)
        elif first and implied_key:
            key, val = implied_key, elem
        else:
            key, val = elem, "on"
        if not key:
            raise Error(f"Invalid parameter '{elem}'")
        out[key] = val  # a repeated key: the last one wins, as with QEMU's QemuOpts
        first = False
    return out


def qdict_flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts (and lists) to dotted keys: {"file": {"driver": "x"}} → {"file.driver": "x"}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(qdict_flatten(v, key + "."))
        elif isinstance(v, list):
            for i, item in enumerate(v):
                if isinstance(item, dict):
                    out.update(qdict_flatten(item, f"{key}.{i}."))
                else:
                    out[f"{key}.{i}"] = item
        else:
            out[key] = v
    return out


def qdict_crumple(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys to nested dicts (the inverse of qdict_flatten for dict-only trees)."""
    out: dict[str, Any] = {}
    for key, v in flat.items():
        parts = key.split(".")
        cur = out
        for p in parts[:-1]:
            nxt = cur.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise Error(f"Cannot mix scalar and non-scalar keys: '{key}'")
            cur = nxt
        if parts[-1] in cur and isinstance(cur[parts[-1]], dict):
            raise Error(f"Cannot mix scalar and non-scalar keys: '{key}'")
        cur[parts[-1]] = v
    return out


def qdict_extract_subqdict(src: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Move every ``prefix``-led key out of ``src``; return them without the prefix."""
    sub = {}
    for k in [k for k in src if k.startswith(prefix)]:
        sub[k[len(prefix):]] = src.pop(k)
    return sub


def qdict_array_split(src: dict[str, Any], prefix: str) -> Iterable[dict[str, Any]]:
    i = 0
    while True:
        sub = qdict_extract_subqdict(src, f"{prefix}{i}.")
        if not sub:
            return
        yield sub
        i += 1


def parse_json_filename(filename: str) -> dict[str, Any]:
    """The options of a ``json:{...}`` pseudo-filename, flattened (QEMU's parse_json_filename)."""
    body = filename[len("json:"):]
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise Error(f"Could not parse the JSON options: {e.msg}") from None
    if not isinstance(obj, dict):
        raise Error("Invalid JSON object given")
    return qdict_flatten(obj)
