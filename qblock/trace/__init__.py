"""Tracing: QEMU's trace-events, trace/control.c and the log backend.

See :mod:`qblock.trace.control` for enabling events and sinks, and
:mod:`qblock.trace.events` for the table of events.
"""
from qblock.trace.control import *  # noqa: F401,F403
from qblock.trace.control import __all__  # noqa: F401
