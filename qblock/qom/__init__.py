"""QOM: the small part of QEMU's object model that devices need (qom/object.c, hw/core/qdev*.c)."""
