"""Trace event control: QEMU's trace/control.c, trace/event-internal.h and the log backend.

Events are declared in QEMU's ``trace-events`` syntax (see :mod:`qblock.trace.events`)::

    blk_co_pwritev(void *blk, void *bs, int64_t offset, int64_t bytes, int flags) "blk %p bs %p offset %"PRId64" bytes %" PRId64 " flags 0x%x"

Each declaration becomes a :class:`TraceEvent` and a function ``trace_<name>(...)``
with the same parameters.  A disabled event costs one function call and one
attribute test; nothing is formatted or allocated.

Enabling follows QEMU's ``--trace`` option: a glob pattern (``blk_*``; a
leading ``-`` disables), ``enable=PATTERN``, ``events=FILE`` (one pattern per
line, ``#`` comments) and ``file=FILE``.  Records go to sinks: the log
backend's text line (what ``-trace`` prints with the log backend), JSON
lines, or any callable.

Each record carries the event name and fields, the virtual and realtime
clocks, the current coroutine's id, the AioContext, and the id of the request
being served.  Those come from hooks the runtime installs
(:func:`trace_set_context_hook`, :func:`trace_set_clock_hook`), so this module
imports nothing of qblock.

Differences from QEMU: no dtrace/ust/simple backends; ``%p`` prints the
object's ``trace_name`` (a stable, readable name such as ``co12`` or
``drive0``) instead of a host address, so traces are reproducible.
"""
from __future__ import annotations

import fnmatch
import json
import keyword
import os
import re
import sys
import threading
from typing import Any, Callable, Iterable, TextIO

import attrs

__all__ = [
    "TraceEvent", "TraceRecord", "LogSink", "JsonSink",
    "trace_events_declare", "trace_event_find", "trace_event_iter",
    "trace_event_get_state", "trace_event_set_state", "trace_enable_events",
    "trace_init_events", "trace_init_file", "trace_opt_parse",
    "trace_add_sink", "trace_remove_sink", "trace_disable_all",
    "trace_set_context_hook", "trace_set_clock_hook", "trace_fmt_ptr",
]


# --------------------------------------------------------------------------
# Events


@attrs.define(eq=False)
class TraceEvent:
    """One declared event (QEMU's TraceEvent): its name, fields and format."""

    id: int
    name: str
    arg_types: tuple[str, ...]
    arg_names: tuple[str, ...]
    fmt: str              # the C format, as written in trace-events
    group: str = ""       # the source file the declaration was listed under
    enabled: bool = False
    _pyfmt: str = ""
    _ptr_args: tuple[int, ...] = ()

    def format_fields(self, values: tuple) -> str:
        """Render ``values`` with the event's printf format, as the log backend does."""
        vals = list(values)
        for i in self._ptr_args:
            vals[i] = trace_fmt_ptr(vals[i])
        try:
            return self._pyfmt % tuple(vals)
        except (TypeError, ValueError):
            return " ".join(f"{n}={v!r}" for n, v in zip(self.arg_names, values))

    def emit(self, values: tuple) -> None:
        """Build a record for ``values`` and hand it to every sink."""
        co, ctx, req = _context_hook()
        vns, rns = _clock_hook()
        rec = TraceRecord(self, values, vns, rns, co, ctx, req)
        for sink in tuple(_sinks):
            sink(rec)


@attrs.define(frozen=True, eq=False)
class TraceRecord:
    """What one firing of an event carries to the sinks."""

    event: TraceEvent
    values: tuple
    ts_virtual_ns: int
    ts_realtime_ns: int
    co: int | None        # id of the coroutine that fired it, None outside coroutines
    ctx: str | None       # trace name of the current AioContext
    req: int | None       # id of the request being served, when there is one

    @property
    def name(self) -> str:
        return self.event.name

    @property
    def fields(self) -> dict[str, Any]:
        return dict(zip(self.event.arg_names, self.values))

    def text(self) -> str:
        """The log backend's line without its timestamp prefix: ``name fields``."""
        return f"{self.event.name} {self.event.format_fields(self.values)}"

    def as_json(self) -> dict[str, Any]:
        fields = {}
        for name, typ, val in zip(self.event.arg_names, self.event.arg_types, self.values):
            if typ.endswith("*") and not typ.startswith("const char"):
                val = trace_fmt_ptr(val)
            elif not isinstance(val, (int, float, str, bool, type(None))):
                val = str(val)
            fields[name] = val
        return {
            "name": self.event.name,
            "fields": fields,
            "ts_virtual_ns": self.ts_virtual_ns,
            "ts_realtime_ns": self.ts_realtime_ns,
            "co": self.co,
            "ctx": self.ctx,
            "req": self.req,
        }


_events: dict[str, TraceEvent] = {}
_lock = threading.Lock()

# True while at least one event is enabled; the runtime checks it before doing
# bookkeeping that only tracing needs (request ids carried into coroutines/BHs).
trace_active = False


_DECL_RE = re.compile(r"^(?P<props>(?:disable|tcg|vcpu)\s+)*(?P<name>\w+)\((?P<args>[^)]*)\)\s*(?P<fmt>.*)$")
_CFMT_RE = re.compile(r"%([-#0 +]*\d*(?:\.\d+)?)(hh|h|ll|l|z|j|t|L)?([diouxXcsp%])")
_FMT_TOKEN_RE = re.compile(r'"((?:[^"\\]|\\.)*)"|PRI([diux])(?:8|16|32|64|PTR|MAX)|(\S)')


def _c_to_python_format(cfmt: str) -> tuple[str, tuple[int, ...]]:
    """Turn a C printf format into a Python %-format; return it and the %p argument positions."""
    ptrs = []
    out = []
    pos = 0
    argi = 0
    for m in _CFMT_RE.finditer(cfmt):
        out.append(cfmt[pos:m.start()])
        flags, conv = m.group(1), m.group(3)
        if conv == "%":
            out.append("%%")
        elif conv == "p":
            out.append("%" + flags + "s")
            ptrs.append(argi)
            argi += 1
        elif conv in "diu":
            out.append("%" + flags + "d")
            argi += 1
        else:
            out.append("%" + flags + conv)
            argi += 1
        pos = m.end()
    out.append(cfmt[pos:])
    return "".join(out), tuple(ptrs)


def _parse_c_string(text: str) -> str:
    """Join the adjacent C string literals of a trace-events format, expanding PRId64 and friends."""
    out = []
    for m in _FMT_TOKEN_RE.finditer(text):
        if m.group(3) is not None:
            raise ValueError(f"format must be C string literals and PRI macros: {text}")
        out.append(m.group(1).replace('\\"', '"') if m.group(1) is not None else m.group(2))
    if not out:
        raise ValueError("missing format string")
    return "".join(out)


def _parse_args(args: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    args = args.strip()
    if args in ("", "void"):
        return (), ()
    types, names = [], []
    for a in args.split(","):
        a = a.strip()
        m = re.match(r"^(.*?[\s*])(\w+)$", a)
        if not m:
            raise ValueError(f"cannot parse trace argument '{a}'")
        types.append(" ".join(m.group(1).split()))
        names.append(m.group(2))
    return tuple(types), tuple(names)


def _make_trace_function(ev: TraceEvent) -> Callable:
    """Generate ``trace_<name>(args...)``: test the flag, emit only when enabled."""
    params = ", ".join(n + "_" if keyword.iskeyword(n) else n for n in ev.arg_names)
    tup = f"({params},)" if ev.arg_names else "()"
    src = (f"def trace_{ev.name}({params}):\n"
           f"    if _ev.enabled:\n"
           f"        _ev.emit({tup})\n")
    ns: dict[str, Any] = {"_ev": ev}
    exec(compile(src, f"<trace-events:{ev.group or ev.name}>", "exec"), ns)
    fn = ns[f"trace_{ev.name}"]
    fn.event = ev
    fn.__doc__ = f"Trace event {ev.name}: {ev.fmt}"
    return fn


def trace_events_declare(text: str, group: str = "") -> dict[str, Callable]:
    """Declare events written in QEMU's trace-events syntax; return ``{"trace_<name>": function}``.

    ``# path/to/file.c`` comment lines set the group of the declarations that follow,
    as QEMU's trace-events files are organised.  Drivers from other packages call this
    to declare their own events.
    """
    fns: dict[str, Callable] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            group = line[1:].strip()
            continue
        m = _DECL_RE.match(line)
        if not m:
            raise ValueError(f"bad trace-events line: {raw}")
        name = m.group("name")
        types, names = _parse_args(m.group("args"))
        cfmt = _parse_c_string(m.group("fmt"))
        pyfmt, ptrs = _c_to_python_format(cfmt)
        with _lock:
            if name in _events:
                raise ValueError(f"trace event '{name}' declared twice")
            ev = TraceEvent(len(_events), name, types, names, cfmt, group)
            ev._pyfmt = pyfmt
            ev._ptr_args = ptrs
            _events[name] = ev
        fns[f"trace_{name}"] = _make_trace_function(ev)
    return fns


def trace_event_find(name: str) -> TraceEvent | None:
    return _events.get(name)


def trace_event_iter(pattern: str = "*") -> Iterable[TraceEvent]:
    """Every declared event whose name matches the glob ``pattern`` (trace_event_iter_init_pattern)."""
    return [ev for name, ev in _events.items() if fnmatch.fnmatchcase(name, pattern)]


def trace_event_get_state(ev: TraceEvent | str) -> bool:
    if isinstance(ev, str):
        ev = _events[ev]
    return ev.enabled


def _update_active() -> None:
    global trace_active
    trace_active = any(ev.enabled for ev in _events.values())


def trace_event_set_state(ev: TraceEvent | str, state: bool) -> None:
    if isinstance(ev, str):
        ev = _events[ev]
    ev.enabled = bool(state)
    _update_active()


def trace_enable_events(line_buf: str) -> int:
    """Enable (or, with a leading ``-``, disable) the events matching a glob; returns how many matched."""
    pattern = line_buf.strip()
    state = True
    if pattern.startswith("-"):
        state, pattern = False, pattern[1:]
    n = 0
    for ev in trace_event_iter(pattern):
        ev.enabled = state
        n += 1
    _update_active()
    return n


def trace_disable_all() -> None:
    for ev in _events.values():
        ev.enabled = False
    _update_active()


def trace_init_events(fname: str) -> None:
    """Read an events file: one pattern per line, ``#`` starts a comment (trace_init_events)."""
    with open(fname, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                trace_enable_events(line)


# --------------------------------------------------------------------------
# Context and clocks, supplied by the runtime


def _no_context() -> tuple[int | None, str | None, int | None]:
    return None, None, None


def _no_clock() -> tuple[int, int]:
    return 0, 0


_context_hook: Callable[[], tuple[int | None, str | None, int | None]] = _no_context
_clock_hook: Callable[[], tuple[int, int]] = _no_clock


def trace_set_context_hook(fn: Callable[[], tuple[int | None, str | None, int | None]]) -> None:
    """Install the function that says (coroutine id, AioContext name, request id) for a record."""
    global _context_hook
    _context_hook = fn


def trace_set_clock_hook(fn: Callable[[], tuple[int, int]]) -> None:
    """Install the function that returns (virtual ns, realtime ns) for a record."""
    global _clock_hook
    _clock_hook = fn


def trace_fmt_ptr(obj: Any) -> str:
    """How a ``%p`` argument prints: ``(nil)``, the object's ``trace_name``, or its id."""
    if obj is None:
        return "(nil)"
    name = getattr(obj, "trace_name", None)
    if name is not None:
        return name() if callable(name) else str(name)
    if isinstance(obj, (str, int)):
        return str(obj)
    qualname = getattr(obj, "__qualname__", None)
    if qualname is not None and callable(obj):
        return qualname
    return f"{type(obj).__name__}@{id(obj):#x}"


# --------------------------------------------------------------------------
# Sinks

_sinks: list[Callable[[TraceRecord], None]] = []


class LogSink:
    """QEMU's log backend: one ``name fields`` line per event, optionally ``pid@sec.usec:``-prefixed."""

    def __init__(self, file: TextIO | None = None, timestamps: bool = False):
        self.file = file
        self.timestamps = timestamps

    def __call__(self, rec: TraceRecord) -> None:
        f = self.file or sys.stderr
        if self.timestamps:
            sec, nsec = divmod(rec.ts_realtime_ns, 1_000_000_000)
            f.write(f"{os.getpid()}@{sec}.{nsec // 1000:06d}:{rec.text()}\n")
        else:
            f.write(rec.text() + "\n")


class JsonSink:
    """One JSON object per line (TraceRecord.as_json)."""

    def __init__(self, file: TextIO):
        self.file = file

    def __call__(self, rec: TraceRecord) -> None:
        self.file.write(json.dumps(rec.as_json()) + "\n")


def trace_add_sink(sink: Callable[[TraceRecord], None]) -> Callable[[TraceRecord], None]:
    _sinks.append(sink)
    return sink


def trace_remove_sink(sink: Callable[[TraceRecord], None]) -> None:
    if sink in _sinks:
        _sinks.remove(sink)


_file_sink: LogSink | None = None


def trace_init_file(fname: str | None) -> None:
    """Send log-backend lines to ``fname`` (``None``: stderr), replacing an earlier file choice."""
    global _file_sink
    if _file_sink is not None:
        trace_remove_sink(_file_sink)
        if _file_sink.file not in (None, sys.stderr):
            _file_sink.file.close()
    f = open(fname, "a", encoding="utf-8", buffering=1) if fname else None
    _file_sink = trace_add_sink(LogSink(f))


def trace_opt_parse(optarg: str) -> None:
    """Apply one ``--trace`` argument: ``PATTERN`` or ``[enable=PATTERN][,events=FILE][,file=FILE]``."""
    opts: dict[str, str] = {}
    parts = optarg.split(",")
    for i, part in enumerate(parts):
        if "=" in part:
            key, val = part.split("=", 1)
            if key not in ("enable", "events", "file"):
                from qblock.util.error import Error  # util is below trace's callers; import lazily
                raise Error(f"Invalid parameter '{key}'")
            opts[key] = val
        elif i == 0:
            opts["enable"] = part
        else:
            from qblock.util.error import Error
            raise Error(f"Invalid parameter '{part}'")
    if "enable" in opts:
        trace_enable_events(opts["enable"])
    if "events" in opts:
        trace_init_events(opts["events"])
    if "file" in opts or _file_sink is None:
        trace_init_file(opts.get("file"))
