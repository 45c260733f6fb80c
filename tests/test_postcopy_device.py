"""The postcopy-device status (QEMU 10.2, 7b842fe354), carried by migration.design=10.1: from
the device state's sending until the destination's PONG says it loaded it, a failure fails the
migration and the guest runs on at the source, instead of the source pausing in postcopy (7.1
and 8.0, as QEMU before 10.2).
"""

import time

import pytest

from emu.controller import Run, migrate
from emu.faults import parse
from emu.migration.states import FINAL
from tests.conftest import PATIENCE, config
from tests.test_migration import assert_completed
from tests.test_qmp_migration import free_port, start, statuses, where  # noqa: F401

QMP_EVENTS = [{"capability": "events", "state": True}]


@pytest.mark.parametrize("design, source, destination", [
    ("7.1", ["setup", "active", "device", "postcopy-active", "completed"],
     ["setup", "active", "postcopy-active", "completed"]),
    ("10.1", ["setup", "active", "device", "postcopy-device", "postcopy-active", "completed"],
     ["setup", "active", "postcopy-device", "postcopy-active", "completed"]),
])
def test_the_states_of_a_postcopy_migration_by_design(design, source, destination):
    result = migrate(config(workload__pattern="ab", migration__design=design),
                     trace=("source_return_path_thread_postcopy_package_loaded",))
    assert_completed(result)
    assert [s["status"] for s in result["states"]["source"]] == source
    assert [s["status"] for s in result["states"]["destination"]] == destination
    loaded = [e for e in result["events"]
              if e.get("trace") == "source_return_path_thread_postcopy_package_loaded"]
    assert len(loaded) == (design == "10.1")


def migrate_to_a_refusing_destination(where, design: str):  # noqa: F811
    """Over QMP, a destination configured for 2 vCPUs, a source that has 1: the destination
    refuses the device state ("load of migration failed") and closes the channels."""
    path = where[0]
    incoming, relay = f"tcp:127.0.0.1:{free_port()}", f"unix:{path}/link.sock"
    sets = ["--set", f"migration.design={design}"]
    link = start(where, "link", "link", "--listen", relay, "--connect", incoming)
    dst = start(where, "dst", "destination", "--incoming", "defer", *sets,
                "--set", "guest.vcpus=2")
    src = start(where, "src", "source", *sets)
    s, d = src.connect(), dst.connect()
    link.connect()
    for side in (s, d):
        side.cmd("migrate-set-capabilities", capabilities=QMP_EVENTS)
    d.cmd("migrate-incoming", uri=incoming)
    s.cmd("migrate", uri=relay)
    assert statuses(s, "active") == ["setup", "active"]
    s.cmd("migrate-start-postcopy")
    s.wait_event("STOP", PATIENCE)
    assert statuses(d, "failed")[-1] == "failed"
    return s, d


def test_with_10_1_a_destination_that_fails_on_the_device_state_lets_the_source_run_on(
        where):  # noqa: F811
    s, d = migrate_to_a_refusing_destination(where, "10.1")
    assert statuses(s, "failed") == ["device", "postcopy-device", "failed"]
    s.wait_event("RESUME", PATIENCE)
    assert s.cmd("query-status") == {"status": "running", "running": True}
    assert s.cmd("query-migrate")["status"] == "failed"
    assert d.cmd("query-migrate")["status"] == "failed"


def test_with_7_1_the_source_sits_in_postcopy_as_before(where):  # noqa: F811
    s, d = migrate_to_a_refusing_destination(where, "7.1")
    assert statuses(s, "postcopy-paused") == ["device", "postcopy-active", "postcopy-paused"]
    assert s.cmd("query-status") == {"status": "finish-migrate", "running": False}
    assert s.cmd("query-migrate")["status"] == "postcopy-paused"


def test_a_cut_before_the_source_leaves_postcopy_device_fails_the_migration():
    """QEMU 10.2's window: the destination runs the guest from POSTCOPY_RUN on, but the source
    leaves postcopy-device only once the PONG before it came, between two iterations (up to
    50 ms of streaming). A cut then fails the migration instead of pausing it, and the
    destination's guest is left paused without its missing pages: no recovery can follow.
    (If the PONG came, the source leaves its guest stopped: QEMU's migration_block_activate()
    fails; if not, it restarts it, which QEMU's drive locks would refuse.)"""
    run = Run(config(workload__pattern="ab", migration__design="10.1"),
              [parse("cut main at 0s")], recover_after=None)
    deadline = time.monotonic() + PATIENCE
    try:
        run.start()
        while run.status["source"] not in FINAL or run.status["destination"] != "postcopy-paused":
            run.poll()
            assert time.monotonic() < deadline, run.states
        assert [s for s, _ in run.states["source"]][-3:] == ["device", "postcopy-device", "failed"]
    finally:
        run.stop()


def test_a_fault_at_postcopy_recover_setup_needs_a_design_that_has_it():
    from emu import faults
    from emu.config import ConfigError

    with pytest.raises(ConfigError, match="migration.design 7.1 has no postcopy-recover-setup"):
        faults.from_config(config(), ["cut main at postcopy-recover-setup"])
    assert faults.from_config(config(migration__design="10.1"),
                              ["cut main at postcopy-recover-setup"])[0].at == \
        "postcopy-recover-setup"
