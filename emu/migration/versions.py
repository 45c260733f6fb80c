"""What each migration.design (a generation of QEMU's postcopy code) has, in one place: the
engine asks these helpers, never compares versions itself (docs/concepts.md, "Designs")."""

from __future__ import annotations

from emu.config import Config


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def since(cfg: Config, version: str) -> bool:
    """The design is QEMU `version`'s or later (versions compare as numbers: 10.1 > 8.0)."""
    return _version(cfg["migration.design"]) >= _version(version)


def preempt_after_main(cfg: Config) -> bool:
    """QEMU 8.0 (5655aab079, "migration: Postpone postcopy preempt channel to be after
    main"): the preempt channel connects in postcopy_start(), once the first PONG said the
    main channel is up, and in a recovery once the bitmaps went both ways. Before, 7.1
    (d0edb8a173, "Create the postcopy preempt channel asynchronously") connects it in
    migrate_fd_connect(), right behind main, and the two may reach the destination in
    either order."""
    return since(cfg, "8.0")


def recover_setup(cfg: Config) -> bool:
    """The source's postcopy-recover-setup status (QEMU 9.1, 4146b77ec7, "migration/postcopy:
    Add postcopy-recover-setup phase"): a recovery connects in it and goes back to
    postcopy-paused if that fails, so each attempt is told (a MIGRATION event). Before 9.1 the
    source stays postcopy-paused until connected (then postcopy-recover), and a failed
    connection changes nothing. The destination's states are the same in all designs."""
    return since(cfg, "9.1")


def postcopy_device(cfg: Config) -> bool:
    """The postcopy-device status (QEMU 10.2, 7b842fe354, "migration: Introduce
    POSTCOPY_DEVICE state"): from the device state's sending until the destination says it
    loaded it, a failure fails the migration and the source's guest runs on, instead of
    pausing in postcopy-active. The 10.1 design, the newest here, carries it."""
    return since(cfg, "10.1")



def preempt_full(cfg: Config) -> bool:
    """QEMU 8.0's preempt-full (93589827443e, "migration: Send requested page directly in
    rp-return thread"): with postcopy-preempt, the return-path thread sends a requested page
    itself, and break-huge is gone with the old preempt code."""
    return since(cfg, "8.0")


def page_hint(cfg: Config) -> bool:
    """QEMU 10.1's locality hint (20d82622812d): after a page sent on preempt, the background
    scan goes on just past it, if the previous hint was consumed."""
    return since(cfg, "10.1")
