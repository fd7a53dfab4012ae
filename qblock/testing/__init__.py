"""Tools for testing drivers and the block layer: a configurable in-memory driver and (later) a conformance kit.

Importable from a driver author's own test suite.
"""
