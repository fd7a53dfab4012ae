"""qblock-io against QEMU 7.2's qemu-io: the same command lines on copies of the same images must print
the same lines (after qemu-iotests' timing filter), exit with the same status and leave the same bytes.

Also qemu-iotests 001, 002, 003 and 005 ported against qblock-io/qblock-img with their expected
outputs (docs: ../shared/reference/oracles.md section 10), which need no QEMU at all.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from qblock.block.driver import bdrv_find_format

from .qemu_compat import HAVE_QEMU, NO_QEMU_REASON, filter_img_create, tools  # noqa: F401 - the module-scoped fixture

needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason=NO_QEMU_REASON)
FORMATS = ["raw", pytest.param("qcow2", marks=pytest.mark.skipif(
    bdrv_find_format("qcow2") is None, reason="qblock has no qcow2 driver yet (drivers/qcow2 is being written)"))]


def _image(tools, fmt: str, size: str = "1M", name: str = "t.img", setup: list[str] | None = None) -> str:
    """An image made by QEMU's own tools (so both sides start from identical bytes)."""
    d = os.path.join(tools.tmp, f"src-{fmt}-{name}-{size}-{len(setup or [])}")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, name)
    if not os.path.exists(path):
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, size], check=True)
        if setup:
            args = ["qemu-io", "-f", fmt]
            for c in setup:
                args += ["-c", c]
            subprocess.run(args + [path], check=True, capture_output=True)
    return path


def assert_same(tools, argv: list[str], files=(), stdin: str = "", compare_files=True):
    """Run ``argv`` through both tools and check output, status and resulting files are identical."""
    q, b, dq, db = tools.both("io", argv, files, stdin)
    assert b.out == q.out
    assert b.err == q.err
    assert b.rc == q.rc
    if compare_files:
        for name in sorted(os.listdir(dq)):
            with open(os.path.join(dq, name), "rb") as fq, open(os.path.join(db, name), "rb") as fb:
                assert fb.read() == fq.read(), f"{name} differs"
    return q, b


def _c(*cmds: str) -> list[str]:
    out = []
    for c in cmds:
        out += ["-c", c]
    return out


# --------------------------------------------------------------------------
# Commands and flags


@needs_qemu
@pytest.mark.parametrize("fmt", FORMATS)
def test_io_commands(tools, fmt):
    """Every I/O command (read, readv, write, writev, aio_*, flush, discard, truncate, length, map, alloc) matches."""
    img = _image(tools, fmt)
    assert_same(tools, ["-f", fmt] + _c(
        "write -P 0x41 0 4k", "read -P 0x41 0 4k", "read -v 0 40", "readv -P 0x41 0 1k 3k",
        "writev -P 3 8k 512 1536", "readv -v 8k 100 412", "aio_write -P 4 64k 4k 4k", "aio_flush",
        "aio_read -P 4 64k 8k", "aio_flush", "write -z 128k 64k", "write -zu 192k 64k", "flush", "f",
        "discard 256k 64k", "read -P 0 256k 64k", "length", "map", "alloc 0 1M", "alloc 4k", "alloc 1M",
        "alloc 0 5M", "w 512k 1k", "r -P 0xcd 512k 1k", "truncate 2M", "length", "t 1M", "l") + ["t.img"], [img])


@needs_qemu
def test_io_read_write_flags(tools, tmp_path):
    """read -bCqvpPsl, write -bcCfnpPqsuz and friends print what qemu-io prints, errors included."""
    img = _image(tools, "raw")
    src = tmp_path / "pattern.bin"
    src.write_bytes(b"Hello, World!\x01\x7f")
    assert_same(tools, ["-f", "raw"] + _c(
        f"write -s {src} 0 40", "read -v 0 48", "read -C 0 512", "read -q -P 0 4k 4k", "read -p 0 1",
        "read -P 0x48 -s 0 -l 1 0 16", "read -P 0 -s 1 0 1", "read -s 1 0 1", "read -P 0 -l 2k 0 1k",
        "read -P 300 0 1", "read -P 0x1g 0 1", "write -c 0 64k", "write -b 0 512", "read -b 0 512",
        "read -b 1 512", "write -b 0 511", "write -f 4k 4k", "write -f -c 0 512", "write -z -n 8k 4k",
        "write -n 0 512", "write -u 0 512", "write -z -P 1 0 1", "write -b -z 0 512", "write -s nonexist 0 1",
        "write -s /dev/null 0 1", "write -C -q 0 1", "write -C 1k 1", "writev -C -f -q 0 512",
        "writev -f 0 512", "readv -C 0 512", "readv -q -v 0 512", "aio_read -C -q -v 0 512", "aio_read -i 0 1",
        "aio_write -i 0 1", "aio_write -z -P 1 0 512", "aio_write -u 0 512", "aio_write -z 0 512 512",
        "aio_write -f -q 0 1", "aio_flush", "discard -C 0 512", "discard -q 0 512") + ["t.img"], [img])


@needs_qemu
def test_io_sizes_and_parsing(tools):
    """Sizes with suffixes, hex, fractions and bad suffixes parse (or fail) exactly as in qemu-io."""
    img = _image(tools, "raw")
    assert_same(tools, ["-f", "raw"] + _c(
        "read 0x10 0x10", "read 1.5k 512", "read 1.5 1", "read 1.k 1", " read   0   1 ", "", "read 0 5x",
        "read 0 1Q", "read -1 1", "read 0 99999999999999999999", "read 0 8E", "read 0 3G", "write 0 3G",
        "write -z 0 3G", "write -zn 0 3G", "discard 0 3G", "readv 0 3G", "readv 0 1G 1G 1G", "read 1k", "read",
        "write 0", "readv 0", "alloc", "alloc x", "alloc 0 y", "truncate 1x", "truncate", "sleep x",
        "sleep -1", "sleep 1", "length x", "map x", "discard 0", "bogus", "break x", "resume", "r 0 1") + ["t.img"], [img])


@needs_qemu
def test_io_out_of_range_and_errors(tools):
    """Requests beyond the end fail with qemu-io's 'read failed: Input/output error' lines and exit 1."""
    img = _image(tools, "raw")
    q, _ = assert_same(tools, ["-f", "raw"] + _c(
        "write 1M 512", "read 1M 1", "readv 1023k 1k 1k", "writev 1M 1", "aio_read 2M 512", "aio_flush", "aio_write 2M 512",
        "aio_flush", "discard 2M 512", "write -z 2M 512", "alloc 2M 1", "read -P 1 0 512",
        "readv -P 1 0 512") + ["t.img"], [img])
    assert q.rc == 1


@needs_qemu
def test_io_read_only(tools):
    """Writes on a read-only image fail with 'Block node is read-only' from the permission system."""
    img = _image(tools, "raw")
    assert_same(tools, ["-r", "-f", "raw"] + _c("write 0 512", "writev 0 512", "aio_write 0 512",
                                                 "discard 0 512", "truncate 2M", "read 0 512", "info") + ["t.img"], [img])


@needs_qemu
def test_io_info_null_co(tools):
    """info, map, alloc and the 0xab read fill on null-co through --image-opts."""
    assert_same(tools, _c("info", "map", "length", "alloc 0 1M", "read -v 0 16", "write 0 4k", "flush")
                + ["--image-opts", "driver=null-co,size=1M"])


@needs_qemu
def test_io_open_close(tools):
    """open (with -o, -r, -t, -d, -i, -U, -C, -n) and close, with their errors, match qemu-io."""
    img = _image(tools, "raw")
    assert_same(tools, _c("open", "read 0 1", "open -o driver=raw -o file.filename=t.img", "length",
                          "open t.img", "close", "length", "open -r -f raw t.img", "open -t bogus t.img",
                          "open -d bogus t.img", "open -i bogus t.img", "open -U -o force-share=off,driver=raw t.img",
                          "open -U -o driver=raw t.img", "open -r -U -o driver=raw t.img", "read 0 1", "c",
                          "open -n -C -d unmap -t writeback -o driver=raw t.img", "write 0 4k", "close",
                          "o -k -i threads -t none -o driver=raw t.img", "read -P 0xcd 0 4k", "close",
                          "open -o driver=raw nonexist", "open -o driver=qcow2 t.img", "open x y z"), [img])


@needs_qemu
def test_io_reopen(tools):
    """reopen -r/-w/-c/-o changes permissions and cache modes, with qemu-io's errors."""
    img = _image(tools, "raw")
    assert_same(tools, ["-f", "raw"] + _c(
        "reopen -r", "write 0 1", "reopen -w", "write 0 1", "reopen -r -w", "reopen -c bogus", "reopen -c none",
        "reopen -o read-only=on -r", "reopen -o bogus=1", "reopen x", "reopen -c writethrough -o cache.direct=on",
        "reopen -o read-only=on", "write 0 1", "reopen -o read-only=off", "write 0 1") + ["t.img"], [img])


@needs_qemu
def test_io_breakpoints(tools):
    """break/wait_break/resume/remove_break through blkdebug, and their errors without it."""
    img = _image(tools, "raw")
    assert_same(tools, _c("open -o driver=raw,file.driver=blkdebug,file.image.driver=file,"
                          "file.image.filename=t.img", "break write_aio A", "aio_write 0 512", "wait_break A",
                          "resume A", "aio_flush", "resume A", "remove_break A", "break bogus_event B",
                          "break pwritev B", "remove_break B"), [img])
    assert_same(tools, _c("open -o driver=raw,file.driver=blkdebug,file.align=512,file.image.driver=file,"
                          "file.image.filename=t.img", "break pwritev_rmw_head C", "aio_write -P 7 1 1",
                          "wait_break C", "resume C", "aio_flush", "read -P 7 1 1", "read -P 0 2 510"), [img])
    assert_same(tools, ["-f", "raw"] + _c("break write_aio A", "resume A", "remove_break A") + ["t.img"], [img])


@needs_qemu
def test_io_help(tools):
    """help for every command, and for unknown ones, is qemu-io's text."""
    cmds = ["help", "help help", "help ?", "help bogus", "?"] + [
        f"help {c}" for c in ("abort", "aio_flush", "aio_read", "aio_write", "alloc", "break", "close", "discard",
                              "flush", "info", "length", "map", "open", "quit", "read", "readv", "remove_break",
                              "reopen", "resume", "sigraise", "sleep", "truncate", "wait_break", "write", "writev",
                              "r", "w", "q", "o")]
    assert_same(tools, _c(*cmds))


@needs_qemu
def test_io_invocation_errors(tools):
    """Bad invocations: missing file, wrong format, unknown driver/option, bad modes, extra arguments."""
    img = _image(tools, "raw")
    for argv in (["-f", "raw", "nonexist", "-c", "read 0 1"], ["-f", "qcow2", "t.img", "-c", "read 0 1"],
                 ["-f", "bogus", "t.img"], ["-Z"], ["a", "b"], ["-t", "bogus", "t.img"], ["-d", "bogus", "t.img"],
                 ["-i", "bogus", "t.img"], ["--bogus"], ["-c"], ["--format"], ["--image-opts", "-f", "raw", "x"],
                 ["--help=x"], ["-h"], ["-c", "read 0 1"], ["--cach=none", "-f", "raw", "t.img", "-c", "read 0 1"],
                 ["--image-opts", "driver=raw,file.filename=nonexist"], ["--object", "bogus,id=x"],
                 ["-U", "-f", "raw", "t.img"], ["-f", "raw", "-c", "quit", "-c", "read 0 1", "t.img"]):
        assert_same(tools, argv, [img])


@needs_qemu
def test_io_interactive(tools):
    """Commands read from stdin at the 'qemu-io> ' prompt behave as with -c, including the exit status."""
    img = _image(tools, "raw")
    assert_same(tools, ["-f", "raw", "t.img"], [img],
                stdin="write 0 1\nlength\nbogus\n\nread -P 0xcd 0 1\naio_write 4k 4k\nquit\nlength\n")


@needs_qemu
@pytest.mark.parametrize("fmt", FORMATS)
def test_io_options(tools, fmt):
    """-n, -t, -C, -U, -k, -m and --object throttle-group all leave the same output and bytes."""
    img = _image(tools, fmt)
    assert_same(tools, ["-f", fmt, "-n", "-C", "-k", "-m"] + _c("write 0 4k", "read -P 0xcd 0 4k") + ["t.img"],
                [img])
    assert_same(tools, ["-f", fmt, "-t", "none", "-i", "threads", "-d", "ignore"] +
                _c("write -P 2 4k 4k", "read -P 2 4k 4k", "discard 0 64k") + ["t.img"], [img])
    assert_same(tools, ["--object", "throttle-group,id=tg0,x-bps-total=1000000000", "--image-opts"] +
                _c("write -P 3 0 4k", "read -P 3 0 4k") +
                [f"driver=throttle,throttle-group=tg0,file.driver={fmt},file.file.filename=t.img"], [img])


@needs_qemu
@pytest.mark.skipif(bdrv_find_format("qcow2") is None, reason="qblock has no qcow2 driver yet")
def test_io_qcow2_backing_chain(tools):
    """Reads, map and alloc through a qcow2 overlay over its backing file match qemu-io."""
    base = _image(tools, "qcow2", name="base.qcow2", setup=["write -P 1 0 64k", "write -P 2 512k 64k"])
    d = os.path.dirname(base)
    top = os.path.join(d, "top.qcow2")
    if not os.path.exists(top):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top],
                       check=True, cwd=d)
        subprocess.run(["qemu-io", "-c", "write -P 3 64k 64k", "-c", "write -z 512k 4k", top], check=True,
                       capture_output=True)
    assert_same(tools, _c("map", "alloc 0 1M", "alloc 64k 64k", "read -P 1 0 64k", "read -P 3 64k 64k",
                          "read -P 0 512k 4k", "read -P 2 516k 60k", "write -P 9 600k 1k", "map") + ["top.qcow2"],
                [base, top])


def test_console_script_no_traceback(tmp_path):
    """The qblock-io console script reports errors in one line on stderr, never a traceback."""
    exe = shutil.which("qblock-io") or os.path.join(os.path.dirname(sys.executable), "qblock-io")
    if not os.path.exists(exe):
        pytest.skip("qblock-io console script not installed (pip install -e .)")
    p = subprocess.run([exe, "-f", "raw", str(tmp_path / "nonexist"), "-c", "read 0 1"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1
    assert p.stdout == ""
    assert p.stderr == (f"qemu-io: can't open device {tmp_path}/nonexist: Could not open "
                        f"'{tmp_path}/nonexist': No such file or directory\n")


# --------------------------------------------------------------------------
# qemu-iotests ported (expected outputs from oracles.md; no QEMU needed)

DONE = "*** done\n"
IOLINE = "{size}, X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)\n"


def _rep(op: str, n: int, off: int, size: str) -> str:
    return f"{op} {n}/{n} bytes at offset {off}\n" + IOLINE.format(size=size)


class IOTest:
    """A small qemu-iotests harness: TEST_DIR, _make_test_img, $QEMU_IO with qblock's tools."""

    def __init__(self, tools, fmt: str, seq: str):
        self.tools = tools
        self.fmt = fmt
        self.dir = os.path.join(tools.tmp, f"iotest-{seq}-{fmt}")
        os.makedirs(self.dir)
        self.img = os.path.join(self.dir, f"t.{fmt}")
        self.out = [f"QA output created by {seq}\n"]

    def echo(self, text: str = "") -> None:
        self.out.append(text + "\n")

    def _filter(self, text: str) -> str:
        from .qemu_compat import filter_qemu_io
        return filter_qemu_io(text.replace(self.dir, "TEST_DIR"))

    def make_test_img(self, size: str) -> None:
        r = self.tools.qblock("img", ["create", "-f", self.fmt, self.img, size], self.dir)
        self.out.append(filter_img_create(r.out, self.dir, self.fmt) + r.err)

    def qemu_io(self, *cmds: str, stdin: str = "") -> None:
        argv = ["--cache", "writeback", "-f", self.fmt]
        for c in cmds:
            argv += ["-c", c]
        r = self.tools.qblock("io", argv + [self.img], self.dir, stdin)
        self.out.append(self._filter(r.out) + self._filter(r.err))

    def check_test_img(self) -> None:
        r = self.tools.qblock("img", ["check", "-f", self.fmt, self.img], self.dir)
        text = r.out + r.err
        text = text.replace("qemu-img: This image format does not support checks",
                            "No errors were found on the image.")
        lines = [ln for ln in text.splitlines(keepends=True)
                 if "allocated" not in ln or "clusters" not in ln]
        lines = [ln for ln in lines if not ln.startswith("Image end offset: ")]
        self.out.append("".join(lines))

    def text(self) -> str:
        return "".join(self.out)


@pytest.mark.parametrize("fmt", FORMATS)
def test_iotest_001(tools, fmt):
    """qemu-iotests 001: read, rewrite with a pattern and verify a whole 128 MiB image."""
    t = IOTest(tools, fmt, "001")
    t.make_test_img("128M")
    for head, cmd in (("== reading whole image ==", "read 0 128M"), ("== rewriting whole image ==",
                                                                      "write -P 0xa 0 128M"),
                      ("== verify pattern ==", "read -P 0xa 0 128M")):
        t.echo()
        t.echo(head)
        t.qemu_io(cmd)
    t.echo("*** done")
    assert t.text() == (
        "QA output created by 001\n"
        "Formatting 'TEST_DIR/t.IMGFMT', fmt=IMGFMT size=134217728\n"
        "\n== reading whole image ==\n" + _rep("read", 134217728, 0, "128 MiB") +
        "\n== rewriting whole image ==\n" + _rep("wrote", 134217728, 0, "128 MiB") +
        "\n== verify pattern ==\n" + _rep("read", 134217728, 0, "128 MiB") + DONE)


@pytest.mark.parametrize("fmt", FORMATS)
def test_iotest_002(tools, fmt):
    """qemu-iotests 002: unaligned (sub-sector) writes and reads keep every neighbouring byte."""
    t = IOTest(tools, fmt, "002")
    t.make_test_img("128M")
    for head, cmd in (("== reading whole image ==", "read 0 128M"), ("== rewriting whole image ==",
                                                                      "write -P 0xa 0 128M"),
                      ("== verify pattern ==", "read -P 0xa 0 128M")):
        t.echo()
        t.echo(head)
        t.qemu_io(cmd)
    writes = [("0xab", 66, 42), ("0xac", 512, 288), ("0xad", 800, 224), ("0xae", 66000, 131072),
              ("0xaf", 262144, 42)]
    reads = [("0xa", 0, 66), ("0xab", 66, 42), ("0xa", 108, 404), ("0xac", 512, 288), ("0xad", 800, 224),
             ("0xa", 1024, 64976), ("0xae", 66000, 131072), ("0xa", 197072, 65072), ("0xaf", 262144, 42),
             ("0xa", 262186, 470)]
    t.echo()
    t.echo("unaligned pwrite")
    for p, off, n in writes:
        t.qemu_io(f"write -P {p} {off} {n}")
    t.echo()
    t.echo("verify pattern")
    for p, off, n in reads:
        t.qemu_io(f"read -P {p} {off} {n}")
    t.echo("*** done")
    sizes = {42: "42 bytes", 288: "288 bytes", 224: "224 bytes", 131072: "128 KiB", 66: "66 bytes",
             404: "404 bytes", 64976: "63.453 KiB", 65072: "63.547 KiB", 470: "470 bytes"}
    expected = ("QA output created by 002\n"
                "Formatting 'TEST_DIR/t.IMGFMT', fmt=IMGFMT size=134217728\n"
                "\n== reading whole image ==\n" + _rep("read", 134217728, 0, "128 MiB") +
                "\n== rewriting whole image ==\n" + _rep("wrote", 134217728, 0, "128 MiB") +
                "\n== verify pattern ==\n" + _rep("read", 134217728, 0, "128 MiB") +
                "\nunaligned pwrite\n" + "".join(_rep("wrote", n, off, sizes[n]) for _, off, n in writes) +
                "\nverify pattern\n" + "".join(_rep("read", n, off, sizes[n]) for _, off, n in reads) + DONE)
    assert t.text() == expected


@pytest.mark.parametrize("fmt", FORMATS)
def test_iotest_003(tools, fmt):
    """qemu-iotests 003: vectored reads and writes of the whole image and of seven 8 KiB chunks."""
    t = IOTest(tools, fmt, "003")
    t.make_test_img("128M")
    chunks = " ".join(["8k"] * 7)
    for head, cmd in (("== reading whole image ==", "readv 0 128M"),
                      ("== rewriting whole image ==", "writev -P 0xa 0 128M"),
                      ("== verify pattern ==", "readv -P 0xa 0 128M"),
                      ("== vectored write ==", f"writev -P 0xb 67M {chunks}"),
                      ("== verify pattern ==", f"readv -P 0xb 67M {chunks}")):
        t.echo()
        t.echo(head)
        t.qemu_io(cmd)
    t.echo("*** done")
    assert t.text() == (
        "QA output created by 003\n"
        "Formatting 'TEST_DIR/t.IMGFMT', fmt=IMGFMT size=134217728\n"
        "\n== reading whole image ==\n" + _rep("read", 134217728, 0, "128 MiB") +
        "\n== rewriting whole image ==\n" + _rep("wrote", 134217728, 0, "128 MiB") +
        "\n== verify pattern ==\n" + _rep("read", 134217728, 0, "128 MiB") +
        "\n== vectored write ==\n" + _rep("wrote", 57344, 70254592, "56 KiB") +
        "\n== verify pattern ==\n" + _rep("read", 57344, 70254592, "56 KiB") + DONE)


@pytest.mark.parametrize("fmt", FORMATS)
def test_iotest_005(tools, fmt):
    """qemu-iotests 005: a 5000 GiB sparse image can be created, read and written."""
    t = IOTest(tools, fmt, "005")
    if fmt == "raw":
        try:
            with open(t.img, "wb") as f:
                f.truncate(5000 << 30)
            os.unlink(t.img)
        except OSError:
            pytest.skip("the file system cannot hold a 5000 GiB sparse file")
    t.echo()
    t.echo("creating large image")
    t.make_test_img("5000G")
    t.echo()
    t.echo("small read")
    t.qemu_io("read 1024 4096")
    t.echo()
    t.echo("small write")
    t.qemu_io("write 8192 4096")
    t.echo("*** done")
    assert t.text() == (
        "QA output created by 005\n\ncreating large image\n"
        "Formatting 'TEST_DIR/t.IMGFMT', fmt=IMGFMT size=5368709120000\n"
        "\nsmall read\n" + _rep("read", 4096, 1024, "4 KiB") +
        "\nsmall write\n" + _rep("wrote", 4096, 8192, "4 KiB") + DONE)
