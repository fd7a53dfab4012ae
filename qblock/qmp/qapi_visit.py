"""Checking a value against a QAPI type: QEMU's qapi/qobject-input-visitor.c and qapi/qapi-visit-core.c.

:func:`visit_type` walks a parsed JSON value (QMP) or a keyval tree (the
command line's ``key=value,...``, where every scalar is a string) along a
type of :mod:`qblock.qmp.qapi_schema` and returns the checked value: ints for
integer members (uint64 wraps negative inputs as QEMU does), floats for
``number``, lists for keyval's ``x.0=...,x.1=...``.  Errors carry QEMU
7.2's wording, including its quirks: a member's path (``file.filename``,
``inject-error[0].errno``) in "is missing" / "Invalid parameter type" /
"is unexpected" messages, but the bare member name (``'null'`` inside a list)
for enum values, sized integers and alternates.

QEMU reports the first unexpected member in GHashTable order; qblock reports
the first in the order they were given.
"""
from __future__ import annotations

import re
from typing import Any

from qblock.qmp.qapi_schema import SCHEMA, QAPIAlternate, QAPIEnum, QAPIStruct, QAPIUnion
from qblock.util.cutils import qemu_strtosz
from qblock.util.error import Error

__all__ = ["visit_type", "qapi_enum_values"]

_INT_RANGES = {
    "int8": (-(1 << 7), (1 << 7) - 1), "int16": (-(1 << 15), (1 << 15) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1), "uint8": (0, (1 << 8) - 1), "uint16": (0, (1 << 16) - 1),
    "uint32": (0, (1 << 32) - 1),
}
_INT64_MIN, _INT64_MAX, _UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1
_STRTOLL = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def _full(prefix: str, name: str | None) -> str:
    if name is None:
        return prefix or "null"
    return f"{prefix}.{name}" if prefix else name


def _type_error(full: str, expected: str) -> Error:
    return Error(f"Invalid parameter type for '{full}', expected: {expected}")


def _strtoll(text: str) -> int | None:
    m = _STRTOLL.fullmatch(text)
    if m is None:
        return None
    digits = m.group(2)
    value = int(digits[2:], 16) if digits[:2] in ("0x", "0X") else int(digits, 8) if digits.startswith("0") \
        else int(digits)
    return -value if m.group(1) == "-" else value


def qapi_enum_values(name: str) -> tuple[str, ...]:
    """The values of enum ``name``; BlockdevDriver also has qblock's own drivers (a qblock extension)."""
    values = SCHEMA[name].values
    if name == "BlockdevDriver":
        from qblock.block.driver import bdrv_drivers
        extra = tuple(d.format_name for d in bdrv_drivers() if d.format_name not in values)
        values = values + extra
    return values


def _visit_int(typ: str, value: Any, name: str | None, full: str, keyval: bool) -> int:
    if keyval:
        if not isinstance(value, str):
            raise _type_error(full, "string")
        if typ == "size":
            ret, n = qemu_strtosz(value)
            if ret < 0:
                raise Error(f"Parameter '{full}' expects size")
            return n
        n = _strtoll(value)
        if typ in ("uint64",) or typ.startswith("uint"):
            if n is None or not -_UINT64_MAX <= n <= _UINT64_MAX:
                raise Error(f"Parameter '{full}' expects integer")
            n &= _UINT64_MAX
        elif n is None or not _INT64_MIN <= n <= _INT64_MAX:
            raise Error(f"Parameter '{full}' expects integer")
    elif typ in ("uint64", "size") or typ.startswith("uint"):
        if isinstance(value, bool) or not isinstance(value, int) or not _INT64_MIN <= value <= _UINT64_MAX:
            raise Error(f"Parameter '{full}' expects uint64")
        n = value & _UINT64_MAX  # negative values are accepted for backward compatibility
    else:
        if isinstance(value, bool) or not isinstance(value, int) or not _INT64_MIN <= value <= _INT64_MAX:
            raise _type_error(full, "integer")
        n = value
    if typ in _INT_RANGES:
        lo, hi = _INT_RANGES[typ]
        if not lo <= n <= hi:
            raise Error(f"Parameter '{name if name is not None else 'null'}' expects {typ}_t")
    return n


def _visit_builtin(typ: str, value: Any, name: str | None, full: str, keyval: bool) -> Any:
    if typ == "any":
        return value
    if typ == "str":
        if not isinstance(value, str):
            raise _type_error(full, "string")
        return value
    if typ == "bool":
        if keyval:
            if not isinstance(value, str):
                raise _type_error(full, "string")
            if value in ("on", "yes", "true", "y"):
                return True
            if value in ("off", "no", "false", "n"):
                return False
            raise Error(f"Parameter '{full}' expects 'on' or 'off'")
        if not isinstance(value, bool):
            raise _type_error(full, "boolean")
        return value
    if typ == "number":
        if keyval:
            try:
                return float(value)
            except (TypeError, ValueError):
                raise Error(f"Parameter '{full}' expects number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(full, "number")
        return float(value)
    if typ == "null":
        if value is not None:
            raise _type_error(full, "null")
        return None
    return _visit_int(typ, value, name, full, keyval)


def _keyval_list(value: Any) -> Any:
    """keyval's ``x.0=a,x.1=b`` arrives as {"0": a, "1": b}: make it the list it stands for."""
    if isinstance(value, dict) and value and all(k.isdigit() for k in value):
        return [value[str(i)] for i in range(len(value)) if str(i) in value]
    return value


def _struct_members(st: QAPIStruct) -> list:
    members = []
    if st.base is not None:
        members.extend(_struct_members(SCHEMA[st.base]))
    members.extend(st.members)
    return members


def _visit_members(st: QAPIStruct, value: dict, prefix: str, keyval: bool, out: dict, seen: set) -> None:
    for m in _struct_members(st):
        seen.add(m.name)
        if m.name not in value:
            if not m.optional:
                raise Error(f"Parameter '{_full(prefix, m.name)}' is missing")
            continue
        out[m.name] = visit_type(m.type, value[m.name], m.name, prefix, keyval)


def _check_unexpected(value: dict, seen: set, prefix: str) -> None:
    for key in value:
        if key not in seen:
            raise Error(f"Parameter '{_full(prefix, key)}' is unexpected")


def visit_type(typ: Any, value: Any, name: str | None = None, prefix: str = "", keyval: bool = False) -> Any:
    """Check ``value`` against ``typ`` (a type name or ``[type]``); the checked value, or Error.

    ``name`` is the member's name (None for the root and for list elements),
    ``prefix`` the path of the object holding it.
    """
    full = _full(prefix, name) if name is not None else (prefix or "null")
    if isinstance(typ, list):
        if keyval:
            value = _keyval_list(value)
        if not isinstance(value, list):
            raise _type_error(full, "array")
        return [visit_type(typ[0], item, None, f"{full}[{i}]", keyval) for i, item in enumerate(value)]
    t = SCHEMA.get(typ)
    if t is None:
        return _visit_builtin(typ, value, name, full, keyval)
    if isinstance(t, QAPIEnum):
        if not isinstance(value, str):
            raise _type_error(full, "string")
        if value not in qapi_enum_values(typ):
            raise Error(f"Parameter '{name if name is not None else 'null'}' does not accept value '{value}'")
        return value
    if isinstance(t, QAPIAlternate):
        if value is None:
            kind = "null"
        elif isinstance(value, dict):
            kind = "object"
        elif isinstance(value, str):
            kind = "string"
        elif isinstance(value, bool):
            kind = "boolean"
        elif isinstance(value, (int, float)):
            kind = "number"
        else:
            kind = "array"
        branch = t.branches.get(kind)
        if branch is None:
            raise Error(f"Invalid parameter type for '{name if name is not None else 'null'}', "
                        f"expected: {t.name}")
        return visit_type(branch, value, name, prefix, keyval)
    # Structs and unions are objects whose members are visited with this object's path.
    if not isinstance(value, dict):
        raise _type_error(full, "object")
    inner = full if (name is not None or prefix) else ""
    out: dict[str, Any] = {}
    seen: set[str] = set()
    if isinstance(t, QAPIStruct):
        _visit_members(t, value, inner, keyval, out, seen)
    else:
        assert isinstance(t, QAPIUnion)
        _visit_members(SCHEMA[t.base], value, inner, keyval, out, seen)
        variant = t.variants.get(out[t.discriminator])
        if variant is None:
            # A branch qblock does not declare: pass its members through unchecked.
            for key, v in value.items():
                out.setdefault(key, v)
            return out
        _visit_members(SCHEMA[variant], value, inner, keyval, out, seen)
    _check_unexpected(value, seen, inner)
    return out
