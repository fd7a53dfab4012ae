"""Tracing: declarations in trace-events syntax, QEMU's --trace patterns, sinks, and runtime events."""
import io
import json

import pytest

from qblock.trace import control
from qblock.trace.control import (
    JsonSink,
    LogSink,
    trace_add_sink,
    trace_enable_events,
    trace_event_find,
    trace_event_get_state,
    trace_events_declare,
    trace_opt_parse,
    trace_remove_sink,
)
from qblock.util.aio import aio_bh_schedule_oneshot, aio_poll, qemu_get_aio_context
from qblock.util.coroutine import (
    qemu_coroutine_create,
    qemu_coroutine_enter,
    qemu_coroutine_yield,
    request_id_set,
)
from qblock.util.error import Error

EVENTS = trace_events_declare('''
# tests/unit/test_trace.py
test_trace_ev(void *blk, int64_t offset, unsigned int bytes, int flags) "blk %p offset %" PRId64 " bytes %u flags 0x%x"
test_trace_str(const char *name, int ret) "name %s ret %d"
''')
trace_test_trace_ev = EVENTS["trace_test_trace_ev"]
trace_test_trace_str = EVENTS["trace_test_trace_str"]


class Named:
    trace_name = "drive0"


@pytest.fixture
def records():
    got = []
    sink = trace_add_sink(got.append)
    yield got
    trace_remove_sink(sink)


def test_disabled_event_records_nothing(records):
    """A disabled event produces no record."""
    trace_test_trace_ev(Named(), 0, 512, 0)
    assert records == []


def test_log_line_uses_qemu_format(records):
    """An enabled event formats its fields with the declared printf format, %p as the object's trace name."""
    trace_enable_events("test_trace_ev")
    trace_test_trace_ev(Named(), 4096, 512, 0x10)
    assert [r.text() for r in records] == ["test_trace_ev blk drive0 offset 4096 bytes 512 flags 0x10"]


def test_glob_and_disable_patterns():
    """A glob enables every matching event; a leading '-' disables them again."""
    assert trace_enable_events("test_trace_*") == 2
    assert trace_event_get_state("test_trace_ev") and trace_event_get_state("test_trace_str")
    trace_enable_events("-test_trace_str")
    assert trace_event_get_state("test_trace_ev") and not trace_event_get_state("test_trace_str")
    assert control.trace_active


def test_opt_parse_forms(tmp_path):
    """--trace takes a bare pattern or enable=/events=/file= keys, as QEMU's does."""
    events = tmp_path / "events"
    events.write_text("# comment\ntest_trace_str\n")
    out = tmp_path / "trace.log"
    trace_opt_parse(f"events={events},file={out}")
    assert trace_event_get_state("test_trace_str") and not trace_event_get_state("test_trace_ev")
    trace_test_trace_str("x", -5)
    control.trace_init_file(None)
    assert out.read_text() == "test_trace_str name x ret -5\n"
    with pytest.raises(Error, match="Invalid parameter 'bogus'"):
        trace_opt_parse("enable=x,bogus=1")


def test_json_sink_fields():
    """The JSON sink writes the name, fields, clocks, coroutine, context and request id."""
    buf = io.StringIO()
    sink = trace_add_sink(JsonSink(buf))
    try:
        trace_enable_events("test_trace_ev")
        trace_test_trace_ev(Named(), 1, 2, 3)
    finally:
        trace_remove_sink(sink)
    rec = json.loads(buf.getvalue())
    assert rec["name"] == "test_trace_ev"
    assert rec["fields"] == {"blk": "drive0", "offset": 1, "bytes": 2, "flags": 3}
    assert rec["co"] is None and rec["ctx"] == "main" and rec["req"] is None
    assert isinstance(rec["ts_virtual_ns"], int) and isinstance(rec["ts_realtime_ns"], int)


def test_log_sink_timestamp_prefix():
    """With timestamps, the log sink prefixes pid@sec.usec: as QEMU's log backend does."""
    buf = io.StringIO()
    sink = trace_add_sink(LogSink(buf, timestamps=True))
    try:
        trace_enable_events("test_trace_str")
        trace_test_trace_str("a", 0)
    finally:
        trace_remove_sink(sink)
    prefix, rest = buf.getvalue().split(":", 1)
    assert "@" in prefix and rest == "test_trace_str name a ret 0\n"


def test_request_id_and_coroutine_follow_the_request(records):
    """The request id set by the caller follows it into a coroutine it creates and a BH it schedules."""
    trace_enable_events("test_trace_str")
    old = request_id_set(7)
    try:
        def body(_):
            trace_test_trace_str("in-co", 0)
            qemu_coroutine_yield()
            trace_test_trace_str("resumed", 0)

        co = qemu_coroutine_create(body)
        aio_bh_schedule_oneshot(qemu_get_aio_context(), lambda _: trace_test_trace_str("bh", 0))
    finally:
        request_id_set(old)
    qemu_coroutine_enter(co)
    trace_test_trace_str("main", 0)
    qemu_coroutine_enter(co)
    aio_poll(qemu_get_aio_context(), False)
    got = [(r.values[0], r.co is not None, r.req) for r in records]
    assert got == [("in-co", True, 7), ("main", False, None), ("resumed", True, 7), ("bh", False, 7)]


def test_runtime_events_trace_coroutine_lifecycle(records):
    """Coroutine create, enter, yield and terminate are traced under QEMU's event names."""
    trace_enable_events("qemu_*coroutine*")
    co = qemu_coroutine_create(lambda _: qemu_coroutine_yield())
    qemu_coroutine_enter(co)
    qemu_coroutine_enter(co)
    names = [r.name for r in records]
    assert names == ["qemu_coroutine_create", "qemu_aio_coroutine_enter", "qemu_coroutine_yield",
                     "qemu_aio_coroutine_enter", "qemu_coroutine_terminate"]
    assert records[0].text().startswith(f"qemu_coroutine_create co {co.trace_name} entry ")


def test_declaring_twice_is_an_error():
    """An event name can be declared only once."""
    with pytest.raises(ValueError, match="declared twice"):
        trace_events_declare('test_trace_ev(int x) "x %d"')


def test_bad_declaration_is_an_error():
    """A line that is not trace-events syntax is rejected with the line."""
    with pytest.raises(ValueError, match="bad trace-events line"):
        trace_events_declare("not an event")
    assert trace_event_find("not") is None
