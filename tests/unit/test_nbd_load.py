"""qblock's NBD server under load: 16 clients in other processes, each writing and verifying its own region.

The short run (about 2 s) is for CI; ``QBLOCK_LONG=1`` adds a 30-second run
with 32 clients.  Every read is checked byte for byte by the clients, each
client re-reads its whole region at the end, and the test compares the image
file itself with what every client says it wrote.
"""
from __future__ import annotations

import hashlib
import os

import pytest

from qblock.testing.nbd_load import run_load
from qblock.util import timer
from tests.unit.nbd_harness import QblockNBDServer

MiB = 1 << 20


def _run(tmp_path, clients: int, seconds: float):
    # Real time: the clients are other processes, so the virtual clock means nothing to them.
    timer.qtest_set_enabled(False)
    s = QblockNBDServer(tmp_path, size=clients * MiB)
    try:
        result = run_load(s.sock, "disk", clients=clients, processes=2, seconds=seconds, region=MiB,
                          pump=s.pump, timeout=seconds + 120)
        with open(s.image, "rb") as f:
            image = f.read()
    finally:
        s.close()
    assert result.errors == 0 and result.mismatches == 0, result.messages[:10]
    assert result.requests > clients * 2
    assert result.verified_bytes >= clients * MiB
    assert sorted(result.digests) == list(range(clients))
    for cid, digest in result.digests.items():
        assert hashlib.sha256(image[cid * MiB:(cid + 1) * MiB]).hexdigest() == digest, f"client {cid}'s region"
    return result


def test_sixteen_clients_write_and_verify(tmp_path):
    """16 clients writing and reading back 4 KiB blocks for 2 s: no error, every byte as written, on disk too."""
    _run(tmp_path, 16, 2.0)


@pytest.mark.skipif(os.environ.get("QBLOCK_LONG") != "1", reason="long load run: set QBLOCK_LONG=1")
def test_long_load(tmp_path):
    """The same with 32 clients for 30 s."""
    _run(tmp_path, 32, 30.0)
