"""Shared test set-up: deterministic timing (qtest mode) and a clean event loop between tests."""
import pytest

from qblock.trace.control import trace_disable_all
from qblock.util import timer
from qblock.util.aio import aio_poll, qemu_get_aio_context


@pytest.fixture(autouse=True)
def _qtest_mode():
    """Every test runs on the virtual clock, with tracing off, and leaves no work in the main loop."""
    timer.qtest_set_enabled(True)
    yield
    ctx = qemu_get_aio_context()
    for _ in range(100):
        if not aio_poll(ctx, False):
            break
    trace_disable_all()
