"""qblock: QEMU's block layer re-built in Python, to be read, run, traced and extended."""
__version__ = "0.1.0"
