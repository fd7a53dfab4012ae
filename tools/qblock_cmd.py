"""``qblock``: follow guest writes through the block layer (``qblock trace``) and draw the graph (``qblock graph``).

``qblock trace`` builds a graph from QEMU-style options (``--blockdev``,
``--object``, ``--device virtio-blk,...``), puts a virtio-blk device and a
small guest driver on top, queues the requested operations into one kick (or
one kick each with ``--kick-each``) and prints every stage each request walks
through, by the QEMU function it mirrors — from the guest's kick through
virtio-blk, the BlockBackend, throttling, block/io.c and the drivers, and back
to the guest's interrupt.  Without arguments it runs the default scenario.

On the virtual clock (the default) the same command prints the same bytes on
every run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Any

from qblock.util import timer
from qblock.util.cutils import cvtstr, qemu_strtosz
from qblock.util.error import Error

DEFAULT_SCENARIO = """\
default scenario: a new 1 MiB qcow2 image (64 KiB clusters) in a file, seen through a
4 KiB-sector layer (blkdebug align=4096), under a throttle filter (group tg0, 10 MiB/s
writes), a virtio-blk device with its write cache off; the guest queues three writes and
kicks once:
  write 0 4k       and  write 4k 4k   sequential: merged into one request
  write 8.5k 512   unaligned to the 4 KiB sectors below: read-modify-write
qcow2 allocates the first cluster (refcounts, an L2 table, COW of the untouched part) on
the first write; every write carries FUA (cache off) and qcow2 cannot honour it: FUA is
emulated by a flush"""


class _Quit(Exception):
    pass


# --------------------------------------------------------------------------
# Parsing


class _OpAction(argparse.Action):
    """Collect --write/--read/... in command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        ops = getattr(namespace, "ops", None) or []
        ops.append((option_string.lstrip("-"), values))
        namespace.ops = ops


def _size(text: str, what: str) -> int:
    ret, value = qemu_strtosz(text)
    if ret < 0:
        raise Error(f"{what}: invalid size '{text}'")
    return value


def parse_op(kind: str, spec: str | None, sector_size: int) -> dict[str, Any]:
    """``OFFSET:LEN[:PATTERN]`` with qemu-io's size suffixes."""
    if kind == "flush":
        return {"kind": "flush"}
    parts = (spec or "").split(":")
    if len(parts) < 2 or len(parts) > (3 if kind == "write" else 2):
        form = "OFFSET:LEN[:PATTERN]" if kind == "write" else "OFFSET:LEN"
        raise Error(f"--{kind} {spec}: expected {form}")
    offset = _size(parts[0], f"--{kind} {spec}")
    length = _size(parts[1], f"--{kind} {spec}")
    if length == 0:
        raise Error(f"--{kind} {spec}: the length must not be zero")
    for value, name in ((offset, "offset"), (length, "length")):
        if value % sector_size:
            raise Error(f"--{kind} {spec}: {name} {value} is not a multiple of the {sector_size}-byte sector")
    op = {"kind": kind, "offset": offset, "length": length}
    if kind == "write":
        pattern = 0xCD
        if len(parts) == 3:
            try:
                pattern = int(parts[2], 0)
            except ValueError:
                raise Error(f"--write {spec}: invalid pattern '{parts[2]}'") from None
            if not 0 <= pattern <= 255:
                raise Error(f"--write {spec}: the pattern must be a byte (0..255)")
        op["pattern"] = pattern
    return op


def _parse_device(spec: str) -> dict[str, str]:
    from qblock.util.qemu_option import keyval_parse
    opts = keyval_parse(spec, "driver")
    if opts.get("driver") not in ("virtio-blk", "virtio-blk-device"):
        raise Error(f"--device {spec}: only virtio-blk is supported")
    return opts


def _parse_blockdev(spec: str) -> dict[str, Any]:
    from qblock.util.qemu_option import keyval_parse, parse_json_filename
    text = spec.strip()
    if text.startswith("{"):
        text = "json:" + text
    if text.startswith("json:"):
        return parse_json_filename(text)
    return dict(keyval_parse(text))


# --------------------------------------------------------------------------
# The scenario


class Scenario:
    """The graph, the device and the guest a walk runs on."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmpdir: str | None = None
        self.nodes: list = []
        self.objects: list[str] = []
        self.blk = None
        self.dev = None
        self.guest = None
        self.iothread = None
        self.header: list[str] = []

    # -- build ------------------------------------------------------------------

    def _default_specs(self) -> tuple[list[str], list[str], str, list[tuple[str, str]]]:
        from qblock.block.create import bdrv_create
        from qblock.block.driver import bdrv_find_format
        self.tmpdir = tempfile.mkdtemp(prefix="qblock-trace-")
        path = os.path.join(self.tmpdir, "disk.qcow2")
        bdrv_create(bdrv_find_format("qcow2"), path, {"size": str(1 << 20), "cluster_size": str(64 << 10)})
        objects = ["throttle-group,id=tg0,x-bps-write=10485760"]
        blockdevs = [f"driver=file,node-name=disk-file,filename={path}",
                     "driver=qcow2,node-name=disk,file=disk-file",
                     "driver=blkdebug,node-name=disk-4k,align=4096,image=disk",
                     "driver=throttle,node-name=throttle0,throttle-group=tg0,file=disk-4k"]
        device = "virtio-blk,write-cache=off"
        ops = [("write", "0:4k:0xaa"), ("write", "4k:4k:0xbb"), ("write", "8704:512:0xcc")]
        return objects, blockdevs, device, ops

    def build(self) -> None:
        from qblock.block.block_backend import blk_insert_bs, blk_new, monitor_add_blk
        from qblock.block.driver import BDRV_O_RDWR
        from qblock.block.graph import bdrv_open
        from qblock.block.throttle_groups import user_creatable_process_cmdline
        import qblock.hw.virtio_blk  # noqa: F401 - registers the virtio-blk-device type
        from qblock.hw.guest import VirtioBlkGuest
        from qblock.hw.memory import AddressSpace
        from qblock.qom.object import qdev_device_add
        from qblock.util.aio import iothread_create

        a = self.args
        if not a.blockdev:
            objects, blockdevs, device, ops = self._default_specs()
            self.header = ["# " + line for line in DEFAULT_SCENARIO.splitlines()]
            a.object = objects + list(a.object or [])
            a.blockdev = blockdevs
            a.device = a.device or device
            a.ops = a.ops or ops
        for spec in a.object or []:
            try:
                tg = user_creatable_process_cmdline(spec)
            except Error as e:
                raise Error(f"--object {spec}: {e}") from None
            self.objects.append(tg.name if hasattr(tg, "name") else spec)
        for spec in a.blockdev:
            opts = _parse_blockdev(spec)
            try:
                self.nodes.append(bdrv_open(None, None, opts, BDRV_O_RDWR))
            except Error as e:
                raise Error(f"--blockdev {spec}: {e}") from None
        dev_opts = _parse_device(a.device or "virtio-blk")
        dev_opts.pop("driver")
        root_name = dev_opts.pop("drive", None)
        root = self.nodes[-1]
        if root_name is not None:
            match = [bs for bs in self.nodes if bs.node_name == root_name]
            if not match:
                raise Error(f"--device {a.device}: no --blockdev node named '{root_name}'")
            root = match[0]
        self.blk = blk_new()
        monitor_add_blk(self.blk, "drive0")
        blk_insert_bs(self.blk, root)
        props: dict[str, Any] = {"driver": "virtio-blk-device", "drive": self.blk,
                                 "memory": AddressSpace(16 << 20)}
        if dev_opts.pop("iothread", "off") in ("on", "yes", "true"):
            self.iothread = iothread_create("iothread0")
            props["iothread"] = self.iothread
        props.update(dev_opts)
        try:
            self.dev = qdev_device_add(props)
        except Error as e:
            raise Error(f"--device {a.device}: {e}") from None
        self.guest = VirtioBlkGuest(self.dev)
        sector = 512
        capacity = self.guest.config.get("capacity", 0) * 512
        self.ops = [parse_op(kind, spec, sector) for kind, spec in (a.ops or [])]
        for op in self.ops:
            if op["kind"] != "flush" and op["offset"] + op["length"] > capacity:
                raise Error(f"--{op['kind']} at {op['offset']}: beyond the end of the device ({cvtstr(capacity)})")
        self.capacity = capacity

    def describe(self) -> list[str]:
        """The graph and operations as header lines (no host paths, so output is stable)."""
        lines = list(self.header)
        chain = []
        bs = self.blk.root.bs if self.blk is not None and self.blk.root else None
        while bs is not None:
            chain.append(f"{bs.node_name} [{bs.drv.format_name}]")
            bs = bs.file.bs if bs.file is not None else None
        lines.append("# graph: drive0 -> " + " -> ".join(chain))
        wce = "on" if self.blk.enable_write_cache else "off"
        lines.append(f"# device: virtio-blk, write cache {wce}, {cvtstr(self.capacity)}, "
                     f"{'IOThread iothread0' if self.iothread else 'main loop'}")
        ops = []
        for op in self.ops:
            if op["kind"] == "flush":
                ops.append("flush")
            else:
                ops.append(f"{op['kind']} {op['offset']} {op['length']}"
                           + (f" pattern {op['pattern']:#04x}" if "pattern" in op else ""))
        how = "one kick each" if self.args.kick_each else "one kick"
        lines.append(f"# guest: {'; '.join(ops) or 'no operations'} ({how})")
        return lines

    # -- run -----------------------------------------------------------------

    def _queue(self, op: dict) -> Any:
        g = self.guest
        kind = op["kind"]
        if kind == "write":
            return g.queue_write(op["offset"] // 512, bytes([op["pattern"]]) * op["length"])
        if kind == "read":
            return g.queue_read(op["offset"] // 512, op["length"])
        if kind == "flush":
            return g.queue_flush()
        if kind == "discard":
            return g.queue_discard(op["offset"] // 512, op["length"] // 512)
        if kind == "write-zeroes":
            return g.queue_write_zeroes(op["offset"] // 512, op["length"] // 512)
        raise Error(f"unknown operation {kind}")

    def _wait(self, done) -> None:
        """Poll until ``done()``; a VM stopped by an error policy is resumed, as QMP ``cont`` would."""
        from qblock.util.aio import aio_poll, qemu_get_aio_context
        from qblock.util.runstate import runstate_is_running, vm_start
        ctx = qemu_get_aio_context()
        while not done():
            if not runstate_is_running():
                vm_start()
                continue
            self.guest.poll_until(lambda: done() or not runstate_is_running())
            aio_poll(ctx, False)

    def run(self) -> list:
        reqs = []
        if self.args.kick_each:
            for op in self.ops:
                req = self._queue(op)
                self.guest.kick()
                self._wait(lambda: req.done)
                reqs.append(req)
        elif self.ops:
            reqs = [self._queue(op) for op in self.ops]
            self.guest.kick()
            self._wait(lambda: self.guest.inflight() == 0)
        return reqs

    def close(self) -> None:
        from qblock.block.block_backend import blk_unref, monitor_remove_blk
        from qblock.block.graph import bdrv_unref
        from qblock.block.throttle_groups import user_creatable_del
        from qblock.qom.object import object_unparent
        from qblock.util.aio import iothread_destroy
        if self.guest is not None:
            self.guest.shutdown()
        if self.dev is not None:
            object_unparent(self.dev)
        if self.blk is not None:
            monitor_remove_blk(self.blk)
            blk_unref(self.blk)
        for bs in reversed(self.nodes):
            bdrv_unref(bs)
        for obj in self.objects:
            try:
                user_creatable_del(obj)
            except Error:
                pass
        if self.iothread is not None:
            iothread_destroy(self.iothread)
        from qblock.util.runstate import runstate_is_running, vm_start
        if not runstate_is_running():
            vm_start()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


# --------------------------------------------------------------------------
# Output and stepping


class Printer:
    def __init__(self, args: argparse.Namespace, out):
        from qblock.tools.walk import format_step_json, format_step_text
        self.args = args
        self.out = out
        self.fmt = format_step_text if args.format == "text" else format_step_json
        self.patterns = args.trace_patterns
        self.step_mode = args.step
        self.skip_depth: int | None = None
        self.quiet = False
        self.graph_n = 0

    def __call__(self, step) -> None:
        from qblock.tools.walk import step_matches
        if self.quiet or not step_matches(step, self.patterns):
            return
        if self.args.format == "perfetto":
            return
        self.out.write(self.fmt(step) + "\n")
        if not self.step_mode:
            return
        if self.skip_depth is not None:
            if step.depth > self.skip_depth:
                return
            self.skip_depth = None
        self.out.flush()
        while True:
            sys.stderr.write("-- Enter: next, c: continue, n: next at this depth, g: graph, q: quit -- ")
            sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:           # no more input: run to the end
                self.step_mode = False
                return
            cmd = line.strip().lower()
            if cmd == "":
                return
            if cmd == "c":
                self.step_mode = False
                return
            if cmd == "n":
                self.skip_depth = step.depth
                return
            if cmd == "q":
                self.quiet = True
                raise _Quit()
            if cmd == "g":
                from qblock.tools.blockgraph import render
                self.graph_n += 1
                name = self.args.graph or "qblock-step.dot"
                root, ext = os.path.splitext(name)
                path = f"{root}-{self.graph_n}{ext or '.dot'}"
                render(path, live=True)
                sys.stderr.write(f"graph with live state written to {path}\n")
                continue
            sys.stderr.write(f"unknown command '{cmd}'\n")


def cmd_trace(args: argparse.Namespace) -> int:
    from qblock.tools.walk import StageTracer, format_perfetto, step_matches
    from qblock.util.timer import QEMU_CLOCK_REALTIME, QEMU_CLOCK_VIRTUAL

    from qblock.util.thread_pool import thread_pool_set_inline
    virtual = args.clock == "virtual"
    timer.qtest_set_enabled(virtual)
    thread_pool_set_inline(virtual)   # file I/O in submission order: the same walk on every run
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    args.trace_patterns = [p for p in (args.trace or "").split(",") if p]
    scenario = Scenario(args)
    printer = Printer(args, out)
    quit_early = False
    try:
        scenario.build()
        if args.format == "text":
            for line in scenario.describe():
                out.write(line + "\n")
            from qblock.tools.walk import TEXT_HEADER
            out.write(TEXT_HEADER + "\n")
        tracer = StageTracer(QEMU_CLOCK_VIRTUAL if virtual else QEMU_CLOCK_REALTIME, on_step=printer)
        tracer.start()
        try:
            reqs = scenario.run()
        except _Quit:
            quit_early = True
            reqs = []
        finally:
            tracer.stop()
        if args.format == "perfetto":
            out.write(format_perfetto([s for s in tracer.steps if step_matches(s, args.trace_patterns)]))
        if args.format == "text" and not quit_early:
            out.write(_summary(reqs) + "\n")
        if args.graph:
            from qblock.tools.blockgraph import render
            render(args.graph)
        return 0 if not quit_early else 0
    finally:
        try:
            scenario.close()
        finally:
            if out is not sys.stdout:
                out.close()


_STATUS = {0: "OK", 1: "IOERR", 2: "UNSUPP"}


def _summary(reqs: list) -> str:
    parts = []
    for r in reqs:
        parts.append(f"{r.kind}: {_STATUS.get(r.status, r.status)}")
    return "# guest completions: " + (", ".join(parts) if parts else "none")


def cmd_graph(args: argparse.Namespace) -> int:
    from qblock.tools.blockgraph import render, render_dot
    args.ops = []
    args.kick_each = False
    timer.qtest_set_enabled(True)
    scenario = Scenario(args)
    try:
        scenario.build()
        if args.output in (None, "-"):
            sys.stdout.write(render_dot())
        else:
            render(args.output)
        return 0
    finally:
        scenario.close()


def _add_graph_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--blockdev", action="append", metavar="SPEC",
                   help="a node, as QEMU's -blockdev (dotted keys or json:{...}); the last one is the device's "
                        "root unless --device says drive=NODE")
    p.add_argument("--object", action="append", metavar="SPEC", help="throttle-group,id=ID,x-bps-write=... "
                                                                     "(QEMU's --object)")
    p.add_argument("--device", metavar="SPEC",
                   help="virtio-blk[,write-cache=on|off][,num-queues=N][,iothread=on][,werror=...][,rerror=...]"
                        "[,drive=NODE]")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qblock", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    t = sub.add_parser("trace", help="follow guest requests through every stage of the block layer",
                       description=__doc__.split("\n\n")[1])
    _add_graph_options(t)
    for flag, meta, hlp in (("--write", "OFFSET:LEN[:PATTERN]", "a guest write (pattern byte, default 0xcd)"),
                            ("--read", "OFFSET:LEN", "a guest read"),
                            ("--discard", "OFFSET:LEN", "a guest discard"),
                            ("--write-zeroes", "OFFSET:LEN", "a guest write-zeroes")):
        t.add_argument(flag, action=_OpAction, metavar=meta, help=hlp)
    t.add_argument("--flush", action=_OpAction, nargs=0, help="a guest flush")
    t.add_argument("--kick-each", action="store_true", help="one kick per operation instead of one for all")
    t.add_argument("--trace", metavar="PATTERN", help="show only steps whose QEMU function or event matches "
                                                      "(globs, comma-separated)")
    t.add_argument("--clock", choices=("virtual", "realtime"), default="virtual",
                   help="virtual (default: reproducible output) or realtime")
    t.add_argument("--format", choices=("text", "json", "perfetto"), default="text")
    t.add_argument("-o", dest="output", metavar="FILE", help="write the walk to FILE")
    t.add_argument("--step", action="store_true", help="pause after each step (Enter, c, n, g, q)")
    t.add_argument("--graph", metavar="FILE", help="draw the node graph (.dot, or .svg/.png through dot)")
    g = sub.add_parser("graph", help="draw the node graph of a configuration, as scripts/render_block_graph.py")
    _add_graph_options(g)
    g.add_argument("-o", dest="output", metavar="FILE", help=".dot, .svg or .png (default: dot on stdout)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd is None:
        args = parser.parse_args(["trace"] + (argv or []))
    if not hasattr(args, "ops"):
        args.ops = None
    try:
        if args.cmd == "trace":
            return cmd_trace(args)
        return cmd_graph(args)
    except Error as e:
        sys.stderr.write(f"qblock {args.cmd}: {e}\n")
        return 1
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
