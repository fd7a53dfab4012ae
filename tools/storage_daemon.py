"""qblock-storage-daemon: QEMU's storage-daemon/qemu-storage-daemon.c.

Synopsis::

    qblock-storage-daemon [--blockdev OPTS] [--object OPTS] [--nbd-server OPTS] [--export OPTS]
                          [--chardev socket,id=ID,path=PATH,server=on,wait=off --monitor chardev=ID]
                          [--pidfile PATH] [-T/--trace PATTERN] [-h] [-V]

Options are carried out in the order given, as QEMU does; ``--blockdev``,
``--monitor`` and friends take QEMU's keyval syntax (``driver=file,
node-name=f,filename=disk.img``, nested ``file.driver=...``) or, starting
with ``{``, JSON.  A failing option prints one line ``qblock-storage-daemon:
--OPTION ARG: message`` on stderr and exits with status 1.  Then the main
AioContext runs (real clocks, not qtest's) until ``quit`` over QMP or
SIGTERM/SIGINT/SIGHUP (the handler only sets ``exit_requested`` and wakes
the loop, as qemu_system_killed does); on the way out every export is closed,
every request drained, every node flushed and closed, the monitors flushed,
the chardevs and the pid file removed, and the exit status is 0.

Left out: ``--daemonize``, FUSE/vhost-user/VDUSE exports, HMP, object types
other than ``iothread`` and ``throttle-group``.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable

__all__ = ["main", "process_options", "PROG"]

PROG = "qblock-storage-daemon"

USAGE = f"""\
Usage: {PROG} [options]
qblock storage daemon (a qemu-storage-daemon twin)

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         specify tracing options
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         configure a block backend

  --chardev socket,id=<id>,path=<path>|host=<host>,port=<port>[,server=on][,wait=off]
                         configure a character device backend (a socket
                         for a QMP monitor)

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off]
                         export the specified block node over NBD
                         (requires --nbd-server)

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                         start an NBD server for exporting block nodes

  --object help          list object types that can be added
  --object <type>[,<property>=<value>...]
                         create a new object of type <type> (iothread,
                         throttle-group), setting properties in the order
                         they are specified. Note that the 'id' property
                         must be set.

  --pidfile <path>       write process ID to a file after startup
"""

# option name -> takes an argument
_LONG_OPTS = {"help": False, "version": False, "trace": True, "blockdev": True, "chardev": True,
              "daemonize": False, "export": True, "monitor": True, "nbd-server": True, "object": True,
              "pidfile": True}
_SHORT_OPTS = {"h": "help", "V": "version", "T": "trace"}


class UsageError(Exception):
    """A command-line error without an option location (getopt's messages)."""


def _getopt(argv: list[str]) -> list[tuple[str, str | None]]:
    """getopt_long as qemu-storage-daemon uses it: (option, argument) in order; extra words are errors."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            if name not in _LONG_OPTS:
                raise UsageError(f"unrecognized option '{arg}'")
            if _LONG_OPTS[name]:
                if not eq:
                    if i >= len(argv):
                        raise UsageError(f"option '--{name}' requires an argument")
                    value = argv[i]
                    i += 1
                out.append((name, value))
            else:
                if eq:
                    raise UsageError(f"option '--{name}' doesn't allow an argument")
                out.append((name, None))
        elif arg.startswith("-") and len(arg) > 1:
            letter = arg[1]
            if letter not in _SHORT_OPTS:
                raise UsageError(f"invalid option -- '{letter}'")
            name = _SHORT_OPTS[letter]
            if _LONG_OPTS[name]:
                value = arg[2:]
                if not value:
                    if i >= len(argv):
                        raise UsageError(f"option requires an argument -- '{letter}'")
                    value = argv[i]
                    i += 1
                out.append((name, value))
            else:
                out.append((name, None))
        else:
            out.append(("", arg))  # a non-option argument
    return out


def _parse_str(optarg: str, implied_key: str, typ: str) -> dict[str, Any]:
    """qobject_input_visitor_new_str + visit: JSON when it starts with '{', else keyval."""
    from qblock.qmp.qapi_visit import visit_type
    from qblock.qmp.qjson import qobject_from_json
    from qblock.util.qemu_option import keyval_parse, qdict_crumple
    if optarg.lstrip().startswith("{"):
        obj = qobject_from_json(optarg)
        if not isinstance(obj, dict):
            from qblock.util.error import Error
            raise Error("JSON options must be an object")
        return visit_type(typ, obj)
    return visit_type(typ, qdict_crumple(keyval_parse(optarg, implied_key)), keyval=True)


def _opt_blockdev(optarg: str) -> None:
    from qblock.qmp.blockdev import qmp_blockdev_add
    qmp_blockdev_add(_parse_str(optarg, "driver", "BlockdevOptions"))


def _opt_chardev(optarg: str) -> None:
    from qblock.qmp.char_socket import qemu_chr_new_from_opts, qemu_chr_parse_opts
    qemu_chr_new_from_opts(qemu_chr_parse_opts(optarg))


def _opt_export(optarg: str) -> None:
    from qblock.qmp.block_export_cmds import qmp_block_export_add
    qmp_block_export_add(_parse_str(optarg, "type", "BlockExportOptions"))


def _opt_monitor(optarg: str) -> None:
    from qblock.qmp.monitor import monitor_init
    monitor_init(_parse_str(optarg, "chardev", "MonitorOptions"))


def _opt_nbd_server(optarg: str) -> None:
    from qblock.qmp.block_export_cmds import nbd_server_start_options
    nbd_server_start_options(_parse_str(optarg, "", "NbdServerOptions"))


def _opt_object(optarg: str) -> None:
    from qblock.qmp.qom_cmds import user_creatable_process_cmdline
    if not user_creatable_process_cmdline(optarg):
        raise SystemExit(0)  # only help was asked for, as QEMU exits after printing it


def _opt_trace(optarg: str) -> None:
    from qblock.trace.control import trace_opt_parse
    trace_opt_parse(optarg)


_HANDLERS: dict[str, Callable[[str], None]] = {
    "blockdev": _opt_blockdev, "chardev": _opt_chardev, "export": _opt_export, "monitor": _opt_monitor,
    "nbd-server": _opt_nbd_server, "object": _opt_object,
}


def process_options(opts: list[tuple[str, str | None]], pre_init: bool) -> str | None:
    """Carry out the options in order (QEMU's process_options, in two passes).

    The first pass (``pre_init``) handles --help, --version, --trace and
    --pidfile; the second everything else.  Returns the pid file path.
    Raises :class:`qblock.util.error.Error` with ``location`` set for a
    failing option.
    """
    from qblock.util.error import Error
    pidfile = None
    for name, optarg in opts:
        if name == "":
            if not pre_init:
                err = Error("Unexpected argument")
                err.location = optarg
                raise err
            continue
        if pre_init:
            if name == "help":
                sys.stdout.write(USAGE)
                raise SystemExit(0)
            if name == "version":
                from qblock import __version__
                from qblock.qmp.monitor import QBLOCK_QEMU_VERSION
                sys.stdout.write(f"{PROG} version {__version__} (QMP of QEMU "
                                 f"{'.'.join(map(str, QBLOCK_QEMU_VERSION))})\n")
                raise SystemExit(0)
            if name == "pidfile":
                pidfile = optarg
            elif name == "daemonize":
                raise UsageError("--daemonize is not supported")
            elif name == "trace":
                _run(f"--trace {optarg}", _opt_trace, optarg)
            continue
        handler = _HANDLERS.get(name)
        if handler is not None:
            _run(f"--{name} {optarg}", handler, optarg)
    return pidfile


def _run(location: str, handler: Callable[[str], None], optarg: str) -> None:
    from qblock.util.error import Error
    try:
        handler(optarg)
    except Error as err:
        err.location = location
        raise


_killed = False


def qemu_system_killed(signum: int, frame: Any) -> None:
    """The signal handler: ask the main loop to stop, and wake it (nothing else happens here)."""
    global _killed
    _killed = True
    from qblock.util.aio import aio_notify, qemu_get_aio_context
    aio_notify(qemu_get_aio_context())


def _sigfd_handler(fd: int) -> None:
    """The main loop's signal fd became readable: empty it (the handler already ran)."""
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _report(msg: str) -> None:
    sys.stderr.write(f"{PROG}: {msg}\n")
    sys.stderr.flush()


def _shutdown() -> None:
    """Close exports, drain, flush and close every node, then the monitors and chardevs."""
    from qblock.block.graph import bdrv_drain_all
    from qblock.qmp.block_export_cmds import blk_exp_close_all
    from qblock.qmp.blockdev import blockdev_close_all_bdrv_states
    from qblock.qmp.char_socket import qemu_chr_cleanup
    from qblock.qmp.monitor import monitor_cleanup
    from qblock.qmp.qom_cmds import user_creatable_cleanup
    blk_exp_close_all()
    bdrv_drain_all()
    blockdev_close_all_bdrv_states()
    monitor_cleanup()
    qemu_chr_cleanup()
    user_creatable_cleanup()


def main(argv: list[str] | None = None) -> int:
    from qblock.util.error import Error, error_set_progname
    error_set_progname(PROG)
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts = _getopt(argv)
    except UsageError as e:
        _report(str(e))
        return 1

    from qblock.util import timer
    timer.qtest_set_enabled(False)
    from qblock import drivers as _drivers  # registers the built-in drivers
    del _drivers
    from qblock.qmp import qmp_cmds
    from qblock.qmp.monitor import monitor_init_globals
    from qblock.util.aio import aio_poll, qemu_get_aio_context

    # Signals wake the main loop through a pipe it watches, as QEMU's signalfd in the main loop:
    # the handler itself only sets the flag (qemu_system_killed).
    from qblock.util.aio import aio_set_fd_handler
    rfd, wfd = os.pipe()
    os.set_blocking(rfd, False)
    os.set_blocking(wfd, False)
    signal.set_wakeup_fd(wfd)
    aio_set_fd_handler(qemu_get_aio_context(), rfd, _sigfd_handler, None, rfd)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, qemu_system_killed)

    pidfile = None
    try:
        pidfile = process_options(opts, True)
        monitor_init_globals()
        process_options(opts, False)
        if pidfile is not None:
            try:
                with open(pidfile, "w") as f:
                    f.write(f"{os.getpid()}\n")
            except OSError as e:
                raise Error(f"Cannot write pid file: {e.strerror}") from None
    except (UsageError, Error) as e:
        if isinstance(e, Error):
            location = getattr(e, "location", None)
            _report(f"{location}: {e.msg}" if location else e.msg)
        else:
            _report(str(e))
        from qblock.qmp.char_socket import qemu_chr_cleanup
        qemu_chr_cleanup()  # no socket file is left behind
        return 1

    ctx = qemu_get_aio_context()
    # The main loop: run the main AioContext until quit or a signal.
    while not qmp_cmds.exit_requested and not _killed:
        aio_poll(ctx, True)

    _shutdown()
    if pidfile is not None:
        try:
            os.unlink(pidfile)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
