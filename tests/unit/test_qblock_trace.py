"""``qblock trace`` and ``qblock graph``: golden walks, output formats, stepping, and bad input.

Golden files live in tests/golden/.  A walk on the virtual clock is
byte-identical from run to run, so a change in behaviour shows as a readable
diff of a golden file.  Regenerate them with ``QBLOCK_UPDATE_GOLDEN=1``
after checking the diff is the intended one.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

GOLDEN = pathlib.Path(__file__).resolve().parent.parent / "golden"
UPDATE = os.environ.get("QBLOCK_UPDATE_GOLDEN") == "1"


def run_qblock(*args, stdin=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "qblock.tools.qblock_cmd", *args], capture_output=True,
                          text=True, input=stdin, cwd=cwd, timeout=120)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE or not path.exists():
        if not UPDATE:
            pytest.fail(f"golden file {path} is missing: run with QBLOCK_UPDATE_GOLDEN=1 to create it")
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return
    assert text == path.read_text(), f"walk differs from {path} (QBLOCK_UPDATE_GOLDEN=1 to accept)"


NULL = "driver=null-co,node-name=disk,size=1M,read-zeroes=on"
RMW = ["--blockdev", "driver=null-co,node-name=null0,size=1M,read-zeroes=on",
       "--blockdev", "driver=blkdebug,node-name=disk4k,align=4096,image=null0"]

CASES = {
    "default": [],
    "aligned_write": ["--blockdev", NULL, "--write", "0:4k:0x11"],
    "unaligned_write_rmw": RMW + ["--write", "512:512:0x22"],
    "write_cache_on": ["--blockdev", NULL, "--device", "virtio-blk,write-cache=on", "--write", "0:4k"],
    "write_cache_off_fua_passed": ["--blockdev", NULL, "--device", "virtio-blk,write-cache=off", "--write", "0:4k"],
    "throttled_write_waits": ["--object", "throttle-group,id=tg0,x-bps-write=1048576",
                              "--blockdev", NULL,
                              "--blockdev", "driver=throttle,node-name=thr,throttle-group=tg0,file=disk",
                              "--write", "0:512k", "--write", "512k:256k", "--kick-each"],
    "merged_writes": ["--blockdev", NULL, "--write", "0:4k", "--write", "4k:4k", "--write", "8k:4k"],
    "read": ["--blockdev", NULL, "--read", "4k:8k"],
    "flush": ["--blockdev", NULL, "--write", "0:4k", "--flush"],
    "werror_report": ["--blockdev", "driver=null-co,node-name=null0,size=1M",
                      "--blockdev", "driver=blkdebug,node-name=dbg,inject-error.0.event=pwritev,"
                                    "inject-error.0.once=on,image=null0",
                      "--device", "virtio-blk,werror=report", "--write", "0:4k"],
    # Old data is copied to the target before the first write to a cluster, not before the second.
    "copy_before_write": ["--blockdev", "driver=null-co,node-name=src,size=1M,read-zeroes=on",
                          "--blockdev", "driver=null-co,node-name=tgt,size=1M,read-zeroes=on",
                          "--blockdev", "driver=copy-before-write,node-name=cbw,file=src,target=tgt",
                          "--write", "0:4k", "--write", "8k:4k", "--kick-each"],
    "werror_stop_resumed": ["--blockdev", "driver=null-co,node-name=null0,size=1M",
                            "--blockdev", "driver=blkdebug,node-name=dbg,inject-error.0.event=pwritev,"
                                          "inject-error.0.once=on,image=null0",
                            "--device", "virtio-blk,werror=stop", "--write", "0:4k"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_text(case):
    """Each scenario's text walk equals its golden file."""
    r = run_qblock("trace", *CASES[case])
    assert r.returncode == 0, r.stderr
    check_golden(f"trace_{case}.txt", r.stdout)


@pytest.mark.parametrize("case", ["default", "unaligned_write_rmw", "werror_stop_resumed"])
def test_golden_json(case):
    """The JSON walk (one object per step) equals its golden file, and every line has the documented keys."""
    r = run_qblock("trace", "--format", "json", *CASES[case])
    assert r.returncode == 0, r.stderr
    for line in r.stdout.splitlines():
        obj = json.loads(line)
        assert {"name", "kind", "ts_ns", "ctx", "co", "depth", "fields"} <= obj.keys()
        assert obj["kind"] in ("enter", "exit", "event", "yield", "resume", "bh", "timer", "irq", "qmp")
    check_golden(f"trace_{case}.jsonl", r.stdout)


def test_virtual_clock_runs_are_byte_identical():
    """Two runs of the default scenario print exactly the same bytes."""
    a = run_qblock("trace")
    b = run_qblock("trace")
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout and len(a.stdout.splitlines()) > 100


def test_default_walk_shows_every_stage_of_the_seed():
    """The default walk names the seed's stages, in order, from the kick to the guest's interrupt."""
    out = run_qblock("trace").stdout
    order = ["virtio_queue_notify", "virtio_blk_handle_vq", "virtio_blk_handle_request",
             "virtio_blk_submit_multireq", "submit_requests", "blk_aio_pwritev", "blk_aio_prwv",
             "bdrv_coroutine_enter", "blk_aio_write_entry", "blk_co_do_pwritev", "blk_check_byte_request",
             "bdrv_co_pwritev_part", "bdrv_aligned_pwritev", "bdrv_driver_pwritev", "virtio_blk_rw_complete",
             "virtio_blk_req_complete", "guest.interrupt"]
    pos = 0
    for stage in order:
        found = out.find(stage, pos)
        assert found >= 0, f"{stage} missing (or out of order) in the default walk"
        pos = found
    for decision in ("blk_add_fua", "bdrv_pad_head", "bdrv_pad_tail", "bdrv_padding_rmw_read",
                     "bdrv_fua_emulate", "num_reqs=2", "yield co", "throttle_group_co_io_limits_intercept"):
        assert decision in out, f"the default walk does not show {decision}"


def test_throttled_write_waits_for_a_timer():
    """A throttled second write yields, a timer fires after the time QEMU's algorithm gives, and it resumes."""
    out = run_qblock("trace", *CASES["throttled_write_waits"]).stdout
    assert "⏱ timer_fire" in out and "must_wait=1" in out
    last = [l for l in out.splitlines() if "guest.interrupt" in l][-1]
    # The first 512 KiB pass at once; the bucket then holds 512 KiB of a 102.4 KiB allowance (avg/10),
    # so the second write waits (524288 - 104857.6) / 1048576 s = 0.4 s.
    assert float(last.split()[0]) == pytest.approx(400.0, abs=0.001)


def test_trace_pattern_narrows_the_walk():
    """--trace keeps only the steps whose QEMU function or event matches."""
    r = run_qblock("trace", "--blockdev", NULL, "--write", "0:4k", "--trace", "bdrv_*,blk_aio_pwritev")
    steps = [l for l in r.stdout.splitlines() if not l.startswith("#") and "time(ms)" not in l]
    assert steps and all("bdrv_" in l or "blk_aio_pwritev" in l for l in steps)


def test_perfetto_output_is_well_formed(tmp_path):
    """The Perfetto file is valid JSON; every B has its E on the same track; time never goes back per track."""
    out = tmp_path / "walk.json"
    r = run_qblock("trace", "--format", "perfetto", "-o", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    stacks: dict = {}
    last_ts: dict = {}
    names = set()
    for ev in doc["traceEvents"]:
        if ev["ph"] == "M":
            names.add(ev["args"]["name"])
            continue
        track = (ev["pid"], ev["tid"])
        assert ev["ts"] >= last_ts.get(track, float("-inf"))
        last_ts[track] = ev["ts"]
        if ev["ph"] == "B":
            stacks.setdefault(track, []).append(ev["name"])
        elif ev["ph"] == "E":
            assert stacks.get(track) and stacks[track].pop() == ev["name"]
    assert all(not s for s in stacks.values())
    assert "AioContext main" in names and any(n.startswith("co") for n in names)


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz dot is not installed")
def test_graph_dot_parses_and_names_every_node_and_edge(tmp_path):
    """qblock graph writes DOT that dot accepts, naming every node, driver and child edge."""
    dotfile = tmp_path / "g.dot"
    r = run_qblock("graph", *RMW, "-o", str(dotfile))
    assert r.returncode == 0, r.stderr
    text = dotfile.read_text()
    for needle in ("null0 [null-co]", "disk4k [blkdebug]", "drive0", "image\\l", "root\\l"):
        assert needle in text
    svg = subprocess.run(["dot", "-Tsvg", str(dotfile)], capture_output=True, text=True)
    assert svg.returncode == 0 and "<svg" in svg.stdout
    r = run_qblock("trace", *RMW, "--write", "0:4k", "--graph", str(tmp_path / "g.svg"))
    assert r.returncode == 0 and (tmp_path / "g.svg").read_text().lstrip().startswith("<")


def test_step_mode_stops_at_each_step_and_quits_cleanly(tmp_path):
    """--step shows one step per Enter and 'q' leaves at once, exit status 0, nothing left behind."""
    r = run_qblock("trace", "--blockdev", NULL, "--write", "0:4k", "--step", stdin="\n\n\nq\n")
    assert r.returncode == 0, r.stderr
    steps = [l for l in r.stdout.splitlines() if not l.startswith("#") and "time(ms)" not in l]
    assert len(steps) == 4
    assert r.stderr.count("-- Enter: next") == 4


def test_step_mode_graph_command(tmp_path):
    """In --step mode 'g' draws the graph with live request state."""
    r = run_qblock("trace", *RMW, "--write", "512:512", "--step", "--graph", "live.dot",
                   stdin="\n" * 40 + "g\nc\n", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    drawn = sorted(tmp_path.glob("live-*.dot"))
    assert drawn and "disk4k [blkdebug]" in drawn[0].read_text()


@pytest.mark.parametrize("args,msg", [
    (["--blockdev", "driver=nosuch"], "Unknown driver 'nosuch'"),
    (["--blockdev", "driver=null-co,size=abc"], "expects a non-negative number"),
    (["--blockdev", NULL, "--write", "2M:4k"], "beyond the end of the device"),
    (["--blockdev", NULL, "--write", "100:512"], "is not a multiple of the 512-byte sector"),
    (["--blockdev", NULL, "--write", "0"], "expected OFFSET:LEN[:PATTERN]"),
    (["--blockdev", NULL, "--device", "virtio-scsi"], "only virtio-blk is supported"),
    (["--object", "throttle-group,id=tg0,x-bps-write=-1"], "--object"),
])
def test_bad_input_is_one_clear_line(args, msg):
    """Bad input gives one line on stderr naming the problem, a non-zero exit status and no traceback."""
    r = run_qblock("trace", *args)
    assert r.returncode != 0
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
