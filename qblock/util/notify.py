"""Notifier lists: QEMU's util/notify.c and include/qemu/notify.h.

A notifier added later is called first (QEMU inserts at the list head).
``notifier_with_return_list_notify`` stops at the first notifier that returns
non-zero and returns that value: the seed's ``bdrv_aligned_pwritev`` fails a
write with it.
"""
from __future__ import annotations

from typing import Any, Callable

import attrs

__all__ = ["Notifier", "NotifierList", "NotifierWithReturn", "NotifierWithReturnList",
           "notifier_list_init", "notifier_list_add", "notifier_remove", "notifier_list_notify",
           "notifier_list_empty", "notifier_with_return_list_init", "notifier_with_return_list_add",
           "notifier_with_return_remove", "notifier_with_return_list_notify"]


@attrs.define(eq=False)
class Notifier:
    """``notify(notifier, data)`` is called on every notification."""

    notify: Callable[["Notifier", Any], None]
    list: "NotifierList | None" = None


@attrs.define(eq=False)
class NotifierList:
    notifiers: list = attrs.field(factory=list)


@attrs.define(eq=False)
class NotifierWithReturn:
    """``notify(notifier, data)`` returns 0 to let the next one run, anything else to stop."""

    notify: Callable[["NotifierWithReturn", Any], int]
    list: "NotifierWithReturnList | None" = None


@attrs.define(eq=False)
class NotifierWithReturnList:
    notifiers: list = attrs.field(factory=list)


def notifier_list_init(lst: NotifierList | None = None) -> NotifierList:
    if lst is None:
        return NotifierList()
    lst.notifiers.clear()
    return lst


def notifier_list_add(lst: NotifierList, notifier: Notifier) -> None:
    lst.notifiers.insert(0, notifier)
    notifier.list = lst


def notifier_remove(notifier: Notifier) -> None:
    if notifier.list is not None and notifier in notifier.list.notifiers:
        notifier.list.notifiers.remove(notifier)
    notifier.list = None


def notifier_list_notify(lst: NotifierList, data: Any) -> None:
    for n in list(lst.notifiers):  # a notifier may remove itself
        if n.list is not lst:
            continue  # removed by an earlier notifier in this pass
        n.notify(n, data)


def notifier_list_empty(lst: NotifierList) -> bool:
    return not lst.notifiers


def notifier_with_return_list_init(lst: NotifierWithReturnList | None = None) -> NotifierWithReturnList:
    if lst is None:
        return NotifierWithReturnList()
    lst.notifiers.clear()
    return lst


def notifier_with_return_list_add(lst: NotifierWithReturnList, notifier: NotifierWithReturn) -> None:
    lst.notifiers.insert(0, notifier)
    notifier.list = lst


def notifier_with_return_remove(notifier: NotifierWithReturn) -> None:
    if notifier.list is not None and notifier in notifier.list.notifiers:
        notifier.list.notifiers.remove(notifier)
    notifier.list = None


def notifier_with_return_list_notify(lst: NotifierWithReturnList, data: Any) -> int:
    """Call each notifier until one returns non-zero; return that value (0 when all passed)."""
    for n in list(lst.notifiers):  # a notifier may remove itself
        if n.list is not lst:
            continue  # removed by an earlier notifier in this pass
        ret = n.notify(n, data)
        if ret != 0:
            return ret
    return 0
