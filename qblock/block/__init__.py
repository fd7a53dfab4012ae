"""The block layer (QEMU's block.c, block/io.c, block/block-backend.c ...): the graph, the request path, the BlockBackend.

Drivers are found through the registry in :mod:`qblock.block.driver`; this
package never imports a driver.
"""
