"""Shared-memory segments of one run: created (and unlinked) by the controller only.

Children attach without registering the segment with the resource tracker: on Python < 3.13 an
attaching process registers it, and the tracker then unlinks it when that process exits, pulling
the guest's RAM from under everybody else.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import sys
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

PREFIX = "pce"  # visible in /dev/shm, so leaks are easy to spot
MADV_POPULATE_WRITE = 23  # Linux 5.14; the mmap module does not name it on Python 3.11


def create(size: int) -> SharedMemory:
    name = f"{PREFIX}_{os.getpid()}_{secrets.token_hex(4)}"
    return SharedMemory(name, create=True, size=max(size, 1))


def map_in(buf: memoryview) -> None:
    """Map a segment's pages into this process now: page tables are per process, so without
    this the first write here to each 4 KiB page takes a fault, in the middle of a migration.
    Kernels before 5.14 refuse the advice, and the pages map in as they are first written."""
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    ctypes.CDLL(None).madvise(ctypes.c_void_p(addr), ctypes.c_size_t(len(buf)),
                              MADV_POPULATE_WRITE)


def attach(name: str) -> SharedMemory:
    if sys.version_info >= (3, 13):
        return SharedMemory(name, track=False)
    register = resource_tracker.register
    resource_tracker.register = lambda *args: None
    try:
        return SharedMemory(name)
    finally:
        resource_tracker.register = register


class Segments:
    """The controller's segments by role; names go to the children, who attach()."""

    def __init__(self) -> None:
        self._shm: dict[str, SharedMemory] = {}

    def create(self, role: str, size: int, populate: bool = False) -> memoryview:
        """A new segment; populate=True allocates its pages now, so that the first write to
        each page (a page fault that allocates it) is not paid during the migration."""
        shm = self._shm[role] = create(size)
        if populate:
            try:
                shm._mmap.madvise(MADV_POPULATE_WRITE)
            except (OSError, AttributeError):
                shm.buf[:] = bytes(len(shm.buf))  # older kernels: touch every page
        return shm.buf

    def names(self) -> dict[str, str]:
        return {role: shm.name for role, shm in self._shm.items()}

    def buf(self, role: str) -> memoryview:
        return self._shm[role].buf

    def close(self) -> None:
        """Unlink everything; safe to call twice and with views still alive elsewhere."""
        for shm in self._shm.values():
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
            try:
                shm.close()
            except BufferError:
                # a numpy view still points into it: the mapping goes when the last view does
                shm.close = lambda: None
        self._shm.clear()


def attach_all(names: dict[str, str]) -> dict[str, SharedMemory]:
    return {role: attach(name) for role, name in names.items()}
