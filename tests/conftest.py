import os
import signal

import pytest

from emu.config import load_config
from emu.controller import migrate
from emu.migration import wire

# Small, fast migrations: what matters is emulated time, which the link keeps exact.
BASE = {
    "guest.ram": "32MiB",
    "link.bandwidth": "1Gbit",
    "link.socket-buffer": "1MiB",
    "migration.switchover-after": "100ms",
    "emulator.time-scale": "0.25",
    "emulator.duration-limit": "20s",
}


# pytest --backend: emulator.backend of the tests' migrations (those made with config()).
# auto, the default, leaves the product's default to choose, as a user's run does; emulated
# forces the page-state lookup; userfaultfd forces the kernel where it can serve the guest.
BACKEND = "auto"


def pytest_addoption(parser):
    parser.addoption("--backend", default="auto", choices=("auto", "emulated", "userfaultfd"),
                     help="emulator.backend of the tests' migrations: auto (the default, as "
                          "the product's: userfaultfd where it can serve the run, else "
                          "emulated), emulated, or userfaultfd (those whose guest it can "
                          "serve: with payload, on 4 KiB pages; skipped where the kernel "
                          "refuses userfaultfd)")


def pytest_configure(config):
    global BACKEND
    BACKEND = config.getoption("--backend")


def config(**sets):
    return with_backend(BASE, sets)


def with_backend(base: dict, sets: dict):
    """*base* with overrides given as section__key="value" (dashes as underscores), and the
    emulator.backend pytest --backend asks for, unless the test sets one."""
    merged = {**base, **{k.replace("__", ".").replace("_", "-"): v for k, v in sets.items()}}
    if "emulator.backend" not in merged and BACKEND != "auto" and (
            BACKEND == "emulated" or _kernel_can(merged)):
        merged["emulator.backend"] = BACKEND
    return load_config(None, [f"{k}={v}" for k, v in merged.items()])


def backend_sets() -> list[str]:
    """The --set a test's standalone programs (`postcopy-emu destination`) take for pytest
    --backend: none for auto (the programs choose, as a user's do); userfaultfd only where the
    kernel permits it (else they run auto, which is then emulated)."""
    if BACKEND == "auto" or BACKEND == "userfaultfd" and probe_refusal() is not None:
        return []
    return [f"emulator.backend={BACKEND}"]


def probe_refusal() -> str | None:
    from emu import uffd

    return uffd.probe()


def _kernel_can(sets: dict) -> bool:
    """Whether emulator.backend=userfaultfd can serve this guest; skips the test with the
    probe's reason if the kernel refuses it."""
    if str(sets.get("guest.page-size", "4KiB")) not in ("4KiB", "4096") or \
            str(sets.get("emulator.payload", "true")).lower() != "true":
        return False
    if (why := probe_refusal()) is not None:
        pytest.skip(why)
    return True


def one_write(frames: list) -> tuple[list, int]:
    """A write of several RAM records (Endpoint.send_write's frames, (parts, virt) each) as
    one frame of one record of all its pages, for fake endpoints that look at what the
    migration thread writes, not how the wire cuts it: each record must be the next
    contiguous piece of at most wire.READ_PAGES pages (a write of 4 KiB pages)."""
    records = [wire.decode_main(b"".join(bytes(p) for p in parts), payload=not virt)
               for parts, virt in frames]
    first = records[0]
    at = first.offset
    for rec in records:
        assert rec.offset == at and rec.npages <= wire.READ_PAGES, (rec.offset, rec.npages)
        at += rec.npages * wire.TARGET_PAGE
    npages = sum(rec.npages for rec in records)
    header = wire.ram_header(first.offset, npages, wire.RAM_SAVE_FLAG_PAGE
                             | wire.RAM_SAVE_FLAG_CONTINUE)
    payload = [parts[1] for parts, _ in frames if len(parts) > 1]
    return [header, *payload], sum(virt for _, virt in frames)


def recorded(patterns: tuple[str, ...] = (), into: list | None = None):
    """A fixture's body (`yield from recorded(...)`): what the trace points say while the
    test runs, in order, as (name, fields) in `into` (a new list by default); the points
    `patterns` names are switched on first, and all of them off afterwards."""
    from emu import trace

    seen = [] if into is None else into
    trace.set_sink(lambda name, fields: seen.append((name, fields)))
    if patterns:
        trace.enable(list(patterns))
    yield seen
    trace.enable([])
    trace.set_sink(lambda name, fields: None)


# Real seconds a test waits for something that is bound to happen: generous, because the
# machine may be loaded (2 cores shared by many runs); a test never asserts on how long it took.
PATIENCE = 60.0

# The signals a test sends to a program it starts (Ctrl-C, closing the terminal, kill).
TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)


def as_from_a_terminal() -> None:
    """preexec_fn for a program a test signals: default dispositions and no blocked signals,
    as a program started from an interactive shell has them. A script's background job starts
    with SIGINT ignored (and Python then installs no KeyboardInterrupt handler), nohup with
    SIGHUP ignored; a test must not depend on the shell pytest was started from."""
    for sig in TERMINAL_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


@pytest.fixture
def run_migration():
    def run(**sets):
        return migrate(config(**sets))
    return run


@pytest.fixture(autouse=True)
def no_leftovers():
    """Every test leaves /dev/shm and the process table as it found them."""
    mine = f"pce_{os.getpid()}_"  # segments are named after the controller's pid
    yield
    leaked = [n for n in os.listdir("/dev/shm") if n.startswith(mine)]
    assert not leaked, f"leaked shared memory: {leaked}"
    import multiprocessing
    assert not multiprocessing.active_children()
