"""Tests for qblock.util.notify (QEMU's util/notify.c)."""
from __future__ import annotations

import errno

from qblock.util.notify import (
    Notifier, NotifierList, NotifierWithReturn, notifier_list_add, notifier_list_empty,
    notifier_list_init, notifier_list_notify, notifier_remove, notifier_with_return_list_add,
    notifier_with_return_list_init, notifier_with_return_list_notify, notifier_with_return_remove,
)


def recorder(log, name, ret=None):
    """A notify callback that logs (name, data) and returns ``ret``."""
    def notify(notifier, data):
        log.append((name, data))
        return ret
    return notify


def test_notifier_list_init_empty():
    """A new or re-initialised list is empty, and adding a notifier makes it non-empty."""
    lst = notifier_list_init()
    assert isinstance(lst, NotifierList)
    assert notifier_list_empty(lst)
    n = Notifier(recorder([], "a"))
    notifier_list_add(lst, n)
    assert not notifier_list_empty(lst)
    assert n.list is lst
    assert notifier_list_init(lst) is lst
    assert notifier_list_empty(lst)


def test_notifier_list_notify_order():
    """Notifiers added later are called first, each with the data passed to notify."""
    log = []
    lst = notifier_list_init()
    for name in "abc":
        notifier_list_add(lst, Notifier(recorder(log, name)))
    notifier_list_notify(lst, 42)
    assert log == [("c", 42), ("b", 42), ("a", 42)]


def test_notifier_receives_itself():
    """Each callback receives its own Notifier as the first argument."""
    seen = []
    lst = notifier_list_init()
    n1 = Notifier(lambda n, data: seen.append(n))
    n2 = Notifier(lambda n, data: seen.append(n))
    notifier_list_add(lst, n1)
    notifier_list_add(lst, n2)
    notifier_list_notify(lst, None)
    assert seen[0] is n2 and seen[1] is n1


def test_notifier_remove():
    """A removed notifier is no longer called, and removing it twice is harmless."""
    log = []
    lst = notifier_list_init()
    a = Notifier(recorder(log, "a"))
    b = Notifier(recorder(log, "b"))
    notifier_list_add(lst, a)
    notifier_list_add(lst, b)
    notifier_remove(a)
    assert a.list is None
    notifier_remove(a)
    notifier_list_notify(lst, 1)
    assert log == [("b", 1)]
    notifier_remove(b)
    assert notifier_list_empty(lst)


def test_notifier_remove_self_during_notify():
    """A notifier may remove itself while being notified; the rest still run, and it is gone next time."""
    log = []
    lst = notifier_list_init()

    def once(notifier, data):
        log.append(("once", data))
        notifier_remove(notifier)

    notifier_list_add(lst, Notifier(recorder(log, "a")))
    notifier_list_add(lst, Notifier(once))
    notifier_list_add(lst, Notifier(recorder(log, "c")))
    notifier_list_notify(lst, 1)
    assert log == [("c", 1), ("once", 1), ("a", 1)]
    log.clear()
    notifier_list_notify(lst, 2)
    assert log == [("c", 2), ("a", 2)]


def test_notifier_remove_other_during_notify():
    """A notifier removed by an earlier one in the same pass is not called."""
    log = []
    lst = notifier_list_init()
    victim = Notifier(recorder(log, "victim"))

    def killer(notifier, data):
        log.append(("killer", data))
        notifier_remove(victim)

    notifier_list_add(lst, Notifier(recorder(log, "a")))
    notifier_list_add(lst, victim)
    notifier_list_add(lst, Notifier(killer))
    notifier_list_notify(lst, 1)
    assert log == [("killer", 1), ("a", 1)]


def test_notifier_add_during_notify():
    """A notifier added during a notification goes to the head, so it first runs on the next pass."""
    log = []
    lst = notifier_list_init()
    late = Notifier(recorder(log, "late"))

    def adder(notifier, data):
        log.append(("adder", data))
        if late.list is None:
            notifier_list_add(lst, late)

    notifier_list_add(lst, Notifier(adder))
    notifier_list_notify(lst, 1)
    assert log == [("adder", 1)]
    log.clear()
    notifier_list_notify(lst, 2)
    assert log == [("late", 2), ("adder", 2)]


def test_notifier_with_return_all_zero():
    """notifier_with_return_list_notify calls every notifier, newest first, and returns 0 when all return 0."""
    log = []
    lst = notifier_with_return_list_init()
    assert notifier_with_return_list_notify(lst, "x") == 0
    for name in "abc":
        notifier_with_return_list_add(lst, NotifierWithReturn(recorder(log, name, 0)))
    assert notifier_with_return_list_notify(lst, "x") == 0
    assert log == [("c", "x"), ("b", "x"), ("a", "x")]


def test_notifier_with_return_stops_at_first_error():
    """notifier_with_return_list_notify stops at the first non-zero return and returns that value."""
    log = []
    lst = notifier_with_return_list_init()
    notifier_with_return_list_add(lst, NotifierWithReturn(recorder(log, "a", -errno.EPERM)))
    notifier_with_return_list_add(lst, NotifierWithReturn(recorder(log, "b", -errno.EIO)))
    notifier_with_return_list_add(lst, NotifierWithReturn(recorder(log, "c", 0)))
    assert notifier_with_return_list_notify(lst, 7) == -errno.EIO
    assert log == [("c", 7), ("b", 7)]


def test_notifier_with_return_remove():
    """Removing the failing notifier lets the next notification reach the older ones."""
    log = []
    lst = notifier_with_return_list_init()
    notifier_with_return_list_add(lst, NotifierWithReturn(recorder(log, "a", 0)))
    failing = NotifierWithReturn(recorder(log, "bad", -errno.EIO))
    notifier_with_return_list_add(lst, failing)
    assert notifier_with_return_list_notify(lst, 1) == -errno.EIO
    notifier_with_return_remove(failing)
    assert failing.list is None
    log.clear()
    assert notifier_with_return_list_notify(lst, 2) == 0
    assert log == [("a", 2)]


def test_notifier_with_return_remove_during_notify():
    """A notifier with return may remove itself, or an older one, while being notified."""
    log = []
    lst = notifier_with_return_list_init()
    older = NotifierWithReturn(recorder(log, "older", -errno.EIO))

    def once(notifier, data):
        log.append(("once", data))
        notifier_with_return_remove(notifier)
        notifier_with_return_remove(older)
        return 0

    notifier_with_return_list_add(lst, older)
    notifier_with_return_list_add(lst, NotifierWithReturn(once))
    assert notifier_with_return_list_notify(lst, 1) == 0
    assert log == [("once", 1)]
    assert notifier_with_return_list_notify(lst, 2) == 0
    assert lst.notifiers == []
