"""Pictures of the node graph: QEMU's scripts/render_block_graph.py, with live request state.

:func:`render_dot` draws what ``x-debug-query-block-graph`` describes the way
render_block_graph.py draws it: BlockBackends as boxes, nodes as ellipses
labelled ``node-name [driver]`` (and the file name for ``file`` nodes), edges
labelled with the child name, the permissions taken and the permissions
shared (``w`` write, ``r`` consistent-read, ``u`` write-unchanged, ``g``
graph-mod, ``s`` resize).  With ``live=True`` each node also shows its
requests in flight, its tracked requests (and which ones serialise or wait),
and, for BlockBackends, requests queued by throttling.
:func:`render` writes ``.dot`` itself and anything else through Graphviz's
``dot``.
"""
from __future__ import annotations

import os
import shutil
import subprocess

from qblock.block.block_backend import block_backends
from qblock.block.graph import all_bdrv_states, bdrv_get_xdbg_block_graph
from qblock.util.error import Error


def _perm(arr: list[str]) -> str:
    return ("w" if "write" in arr else "_") + ("r" if "consistent-read" in arr else "_") + \
        ("u" if "write-unchanged" in arr else "_") + ("g" if "graph-mod" in arr else "_") + \
        ("s" if "resize" in arr else "_")


def _q(s: str) -> str:
    # The labels carry dot escapes (\\n, \\l) on purpose: only quotes are escaped.
    return '"' + s.replace('"', '\\"') + '"'


def _live_node(bs) -> list[str]:
    lines = []
    if bs.in_flight:
        lines.append(f"in flight: {bs.in_flight}")
    for req in bs.tracked_requests:
        state = " serialising" if req.serialising else ""
        if req.waiting_for is not None:
            state += f", waits for {req.waiting_for.trace_name}"
        lines.append(f"tracked {req.trace_name}{state}")
    if bs.quiesce_counter:
        lines.append(f"drained x{bs.quiesce_counter}")
    return lines


def _live_blk(blk) -> list[str]:
    lines = []
    if blk.in_flight:
        lines.append(f"in flight: {blk.in_flight}")
    tgm = blk.public.throttle_group_member
    queued = [len(q.entries) for q in tgm.throttled_reqs]
    if any(queued):
        lines.append(f"throttled: {queued[0]} reads, {queued[1]} writes queued")
    if blk.queued_requests.entries:
        lines.append(f"queued while drained: {len(blk.queued_requests.entries)}")
    return lines


def render_dot(live: bool = False) -> str:
    """The graph in Graphviz's dot language."""
    g = bdrv_get_xdbg_block_graph()
    by_name_bs = {bs.node_name: bs for bs in all_bdrv_states}
    blks = {blk.name or "": blk for blk in block_backends}
    out = ["digraph {", "  // Block Nodes Graph",
           '  legend [label="permission symbols:\\l  w - Write\\l  r - consistent-Read\\l  u - write - Unchanged\\l'
           '  g - Graph-mod\\l  s - reSize\\ledge label scheme:\\l  <child type>\\l  <perm>\\l  <shared_perm>\\l" '
           'shape=none]']
    for n in g["nodes"]:
        extra: list[str] = []
        if n["type"] == "block-driver":
            bs = by_name_bs.get(n["name"])
            drv = bs.drv.format_name if bs is not None and bs.drv is not None else "?"
            label = f"{n['name']} [{drv}]"
            if drv == "file" and bs is not None and bs.filename:
                label += "\\n" + os.path.basename(bs.filename)
            shape = "ellipse"
            if live and bs is not None:
                extra = _live_node(bs)
        else:
            label = n["name"] or "unnamed blk"
            shape = "box"
            if live and n["name"] in blks:
                extra = _live_blk(blks[n["name"]])
        if extra:
            label += "\\n" + "\\n".join(extra)
        out.append(f"  {n['id']} [label={_q(label)} shape={shape}]")
    for e in g["edges"]:
        label = f"{e['name']}\\l{_perm(e['perm'])}\\l{_perm(e['shared-perm'])}\\l"
        out.append(f"  {e['parent']} -> {e['child']} [label={_q(label)}]")
    out.append("}")
    return "\n".join(out) + "\n"


def render(filename: str, live: bool = False) -> None:
    """Write the graph to ``filename``: dot source for ``.dot``, else rendered by Graphviz."""
    dot = render_dot(live)
    ext = os.path.splitext(filename)[1].lstrip(".").lower()
    if ext in ("dot", "gv", ""):
        with open(filename, "w", encoding="utf-8") as f:
            f.write(dot)
        return
    if shutil.which("dot") is None:
        raise Error(f"cannot write '{filename}': Graphviz's dot is not installed (write a .dot file instead)")
    r = subprocess.run(["dot", f"-T{ext}", "-o", filename], input=dot, text=True, capture_output=True)
    if r.returncode != 0:
        raise Error(f"dot failed to render '{filename}': {r.stderr.strip()}")
