"""Tools for testing drivers and the block layer, importable from a driver author's own test suite.

``memdrv``       test-mem-* drivers: an in-memory disk whose callback style and limits a test chooses
``faultdrv``     test-fault: a filter that fails the requests a test's function picks
``conformance``  the driver conformance kit (every contract of block/io.c, against a byte model)
``nbd_client``   a small raw NBD client, for protocol tests
``nbd_load``     a multi-process NBD load generator (tests and ``bench nbd``)
"""
