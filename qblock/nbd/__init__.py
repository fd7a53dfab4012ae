"""The NBD server: QEMU's nbd/server.c, nbd/common.c, include/block/nbd.h, nbd/nbd-internal.h and blockdev-nbd.c.

``import qblock.nbd`` registers the ``nbd`` block export type with
:mod:`qblock.block.export` (which never imports this package), so::

    import qblock.nbd
    from qblock.nbd.blockdev_nbd import nbd_server_start
    from qblock.block.export import blk_exp_add

    nbd_server_start({"type": "unix", "path": "/tmp/nbd.sock"})
    blk_exp_add({"type": "nbd", "id": "exp0", "node-name": "fmt0", "writable": True})
    # then run the main loop: aio_poll(qemu_get_aio_context(), True)

Modules: :mod:`~qblock.nbd.nbd` (protocol constants and name look-ups),
:mod:`~qblock.nbd.server` (negotiation, transmission, the export driver),
:mod:`~qblock.nbd.blockdev_nbd` (nbd-server-start/stop), :mod:`~qblock.nbd.trace`
(the trace events of nbd/trace-events).  The sockets are
:mod:`qblock.util.qio_channel` (io/channel*.c, io/net-listener.c).

Left out: the NBD client (nbd/client.c, block/nbd.c), TLS, exporting dirty
bitmaps, the kernel NBD device (qemu-nbd -c), and later QEMU's extended
headers.
"""
from qblock.nbd import server as _server  # noqa: F401  (registers the "nbd" export driver)
