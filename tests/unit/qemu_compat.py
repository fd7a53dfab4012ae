"""Helpers for the qemu-io / qemu-img compatibility suites (not a test module).

``Tools`` runs the real QEMU tools (``qemu-io``, ``qemu-img`` from Debian's qemu-utils) and qblock's
twins on copies of the same files and returns what each printed.  qblock's tools run in a small
fork server: one Python process imports qblock once, then forks a fresh child per command line,
so every run starts from a clean block layer (as a new ``qblock-io`` process would) without paying
Python's start-up time for each of the suite's few hundred command lines.  The child calls the
same ``main()`` the ``qblock-io``/``qblock-img`` console scripts call, with stdin, stdout and
stderr on files.

Filters are qemu-iotests' (tests/qemu-iotests/common.filter): ``filter_qemu_io`` for the timing
line and the prompt, ``filter_testdir``, ``filter_img_create``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Iterable

import attrs
import pytest

QEMU_IO = shutil.which("qemu-io")
QEMU_IMG = shutil.which("qemu-img")
HAVE_QEMU = QEMU_IO is not None and QEMU_IMG is not None
NO_QEMU_REASON = "QEMU's qemu-io/qemu-img are not installed (Debian: apt-get install qemu-utils)"

_SERVER = r"""
import io, json, os, sys
import qblock.tools.qemu_io as qio
import qblock.tools.qemu_img as qimg
from qblock.block.driver import bdrv_drivers
bdrv_drivers()                      # load every driver before forking
proto = os.fdopen(os.dup(1), "w")
for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.chdir(req["cwd"])
            for fd, name, mode in ((0, req["stdin"], os.O_RDONLY),
                                   (1, req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                   (2, req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
                f = os.open(name, mode, 0o600)
                os.dup2(f, fd)
                os.close(f)
            sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False))
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
            st = (qio if req["tool"] == "io" else qimg).main(req["argv"])
            sys.stdout.flush(); sys.stderr.flush()
        except BaseException as e:
            try:
                sys.stderr.write("fork server: %r\n" % (e,)); sys.stderr.flush()
            finally:
                os._exit(99)
        os._exit(st)
    _, status = os.waitpid(pid, 0)
    proto.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")
    proto.flush()
"""


@attrs.define
class Result:
    """What one tool run printed, and its exit status."""

    rc: int
    out: str
    err: str

    def filtered(self) -> "Result":
        return Result(self.rc, filter_qemu_io(self.out), filter_qemu_io(self.err))


class Tools:
    """Runs QEMU's tools and qblock's twins in scratch directories (one per side, same files in each)."""

    def __init__(self, tmp: str):
        self.tmp = tmp
        self.server: subprocess.Popen | None = None
        self._n = 0

    def close(self) -> None:
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=30)
            self.server = None

    # -- qblock ----------------------------------------------------------

    def _start(self) -> subprocess.Popen:
        if self.server is None:
            env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
            self.server = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True, env=env)
        return self.server

    def qblock(self, tool: str, argv: list[str], cwd: str, stdin: str = "") -> Result:
        """Run qblock-io (``tool`` "io") or qblock-img ("img") with ``argv`` in ``cwd``."""
        srv = self._start()
        self._n += 1
        base = os.path.join(self.tmp, f".run{self._n}")
        with open(base + ".in", "w") as f:
            f.write(stdin)
        req = {"tool": tool, "argv": argv, "cwd": cwd, "stdin": base + ".in", "out": base + ".out",
               "err": base + ".err"}
        srv.stdin.write(json.dumps(req) + "\n")
        srv.stdin.flush()
        reply = json.loads(srv.stdout.readline())
        with open(base + ".out", encoding="utf-8", errors="replace") as f:
            out = f.read()
        with open(base + ".err", encoding="utf-8", errors="replace") as f:
            err = f.read()
        for ext in (".in", ".out", ".err"):
            os.unlink(base + ext)
        return Result(reply["status"], out, err)

    # -- QEMU --------------------------------------------------------------

    def qemu(self, tool: str, argv: list[str], cwd: str, stdin: str = "") -> Result:
        prog = "qemu-io" if tool == "io" else "qemu-img"   # found on PATH: argv[0] as users type it
        p = subprocess.run([prog] + argv, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=120)
        return Result(p.returncode, p.stdout, p.stderr)

    # -- both --------------------------------------------------------------

    def pair(self, files: Iterable[str] = ()) -> tuple[str, str]:
        """Two fresh directories holding copies of ``files`` (paths): one for QEMU, one for qblock."""
        self._n += 1
        dq = os.path.join(self.tmp, f"q{self._n}")
        db = os.path.join(self.tmp, f"b{self._n}")
        os.mkdir(dq)
        os.mkdir(db)
        for f in files:
            shutil.copy2(f, dq)
            shutil.copy2(f, db)
        return dq, db

    def both(self, tool: str, argv: list[str], files: Iterable[str] = (), stdin: str = "",
             sub: dict[str, str] | None = None) -> tuple[Result, Result, str, str]:
        """Run the same command line through QEMU's tool and qblock's on copies of ``files``.

        ``argv`` may use ``{dir}``, replaced by each side's directory.  Returns both filtered
        results (directories replaced by ``TEST_DIR``) and the two directories.
        """
        dq, db = self.pair(files)
        rq = self.qemu(tool, [a.replace("{dir}", dq) for a in argv], dq, stdin)
        rb = self.qblock(tool, [a.replace("{dir}", db) for a in argv], db, stdin)
        return norm(rq, dq), norm(rb, db), dq, db


def norm(r: Result, d: str) -> Result:
    """Timing figures, prompts and the scratch directory filtered out; -C lines' figures too."""
    def f(text: str) -> str:
        text = filter_qemu_io(text.replace(d, "TEST_DIR"))
        text = re.sub(r"^(\d+),(\d+),[0-9:.]+,[0-9.inf]+,[0-9.inf]+$", r"\1,\2,TIME,RATE,OPS", text, flags=re.M)
        text = re.sub(r"Run completed in [0-9.]+ seconds", "Run completed in X seconds", text)
        text = re.sub(r"#block\d+", "NODE", text)
        text = re.sub(r"^(qemu-(img|io) version) .*$", r"\1 VERSION", text, flags=re.M)
        text = re.sub(r"^Supported formats: .*$", "Supported formats: FORMATS", text, flags=re.M)
        return text
    return Result(r.rc, f(r.out), f(r.err))


_IO_RE = re.compile(r"[0-9]* ops; [0-9/:. sec]* \([0-9/.inf]* [EPTGMKiBbytes]*/sec and [0-9/.inf]* ops/sec\)")


def filter_qemu_io(text: str) -> str:
    """common.filter's _filter_qemu_io: timing figures become X/XX, prompts disappear."""
    text = _IO_RE.sub("X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)", text)
    return text.replace("qemu-io> ", "")


def filter_img_create(text: str, test_dir: str, fmt: str) -> str:
    """common.filter's _filter_img_create: keep fmt, size, backing and preallocation options, names generic."""
    out = []
    for line in text.splitlines(keepends=True):
        m = re.match(r"^Formatting '(.*)', fmt=(\S+)(.*)$", line.rstrip("\n"))
        if not m:
            out.append(line)
            continue
        name = m.group(1).replace(test_dir, "TEST_DIR").replace(fmt, "IMGFMT")
        opts = re.findall(r" ([a-z0-9_.-]+)=(\S*)", m.group(3))
        keep = [f"{k}={v}" for k, v in opts if k in ("size", "backing_file", "backing_fmt", "preallocation",
                                                      "encryption", "data_file")]
        out.append(f"Formatting '{name}', fmt=IMGFMT " + " ".join(keep) + "\n")
    return "".join(out)


def make_tools() -> Tools:
    return Tools(tempfile.mkdtemp(prefix="qblock-compat-"))


@pytest.fixture(scope="module")
def tools():
    """QEMU's and qblock's tools for one test module (import it there), removed afterwards."""
    t = make_tools()
    yield t
    t.close()
    shutil.rmtree(t.tmp, ignore_errors=True)
