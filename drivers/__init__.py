"""Block drivers (QEMU's block/*.c drivers): one module per driver, found through the registry.

Installed as ``qblock.drivers`` (setup.cfg maps this folder with package_dir).
A driver imports util, trace and block only — never another driver: drivers
stack through the graph, as child nodes.
"""
