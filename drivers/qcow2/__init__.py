"""The qcow2 format (QEMU's block/qcow2*.c), split the way QEMU splits it.

========================  ==========================================
module                    QEMU file
========================  ==========================================
``qcow2``                 block/qcow2.c: the driver, reads, writes
``qcow2_header``          block/qcow2.c: header, open, corruption
``qcow2_create``          block/qcow2.c: image creation
``qcow2_info``            block/qcow2.c: specific info, measure, zero init, make empty
``qcow2_amend``           block/qcow2.c: amend, upgrade, downgrade
``qcow2_cluster``         block/qcow2-cluster.c: mapping, L1/L2, discard, zeroes, zero expansion
``qcow2_cluster_alloc``   block/qcow2-cluster.c: allocating writes, COW
``qcow2_refcount``        block/qcow2-refcount.c: refcounts, allocation
``qcow2_refcount_order``  block/qcow2-refcount.c: qcow2_change_refcount_order (amend)
``qcow2_overlap``         block/qcow2-refcount.c: metadata overlap checks
``qcow2_check``           block/qcow2-refcount.c: qcow2_check_refcounts; check and repair
``qcow2_cache``           block/qcow2-cache.c
``qcow2_snapshot``        block/qcow2-snapshot.c (reading and writing the table)
``qcow2_threads``         block/qcow2-threads.c (zlib)
``qcow2_h``               block/qcow2.h
========================  ==========================================

Importing the package registers the driver as ``qcow2``.
"""
from qblock.block.driver import bdrv_register

from .qcow2 import Qcow2Driver

bdrv_qcow2 = bdrv_register(Qcow2Driver)

__all__ = ["Qcow2Driver", "bdrv_qcow2"]
