"""Real QEMU beside the emulator: the bench's own guest, and a harness that migrates it
between two qemu-system-x86_64 over loopback and reads QEMU's own trace events.

Qt-free, like the rest of emu/. available() says in one line why it cannot run here.
"""

from emu.qemu.env import INSTALL, QEMU, available, qemu_version

__all__ = ["INSTALL", "QEMU", "available", "qemu_version"]
