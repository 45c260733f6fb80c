"""A guard against a reference-counting bug in PySide6 6.12.0 on CPython 3.11.

That build returns None from every void method (setText, setEnabled, ...) without taking a
reference, and emits bool signals without one to True or False. CPython 3.12 made those three
objects immortal, so the bug only bites on 3.11: each call takes one reference away, and after
a few thousand frames the interpreter aborts with "none_dealloc: deallocating None" (or
bool_dealloc), often at exit. PySide6 6.11.3 does not have the bug.

The guard checks whether the running PySide6 leaks, and if it does gives the three objects a
reference count no program can use up, which is what 3.12 does for them.
"""

from __future__ import annotations

import ctypes
import sys

CUSHION = 1 << 40  # a trillion calls: ten years of frames at any rate the window runs
_guarded = False


def leaks_none() -> bool:
    """True when a void Qt method call takes a reference to None away."""
    from PySide6 import QtCore

    probe = QtCore.QObject()
    before = sys.getrefcount(None)
    for _ in range(16):
        probe.setObjectName("probe")
    return sys.getrefcount(None) < before - 8


def guard_singletons() -> bool:
    """Make None, True and False immortal in practice if this PySide6 leaks them; True if
    it had to. Safe to call more than once."""
    global _guarded
    if _guarded or sys.version_info >= (3, 12) or not leaks_none():
        return _guarded
    for obj in (None, True, False):
        # ob_refcnt is the first field of every object (Py_ssize_t) on CPython
        ctypes.c_ssize_t.from_address(id(obj)).value += CUSHION
    _guarded = True
    return True
