"""Command-line programs (QEMU's qemu-io.c, qemu-img.c, scripts/): installed as ``qblock.tools``."""
