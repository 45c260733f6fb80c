"""emulator.backend=auto, the default (issue 15): userfaultfd where the probe says it can serve
the run, else emulated with the reason, chosen before any process starts; the run's report,
--json, summary, recording and event log say which ran. Explicit values stay as they were."""

import json
import multiprocessing
import os

import pytest

from emu import backend, cli
from emu import uffd as U
from emu.backend import Backend
from emu.config import KEYS
from emu.controller import migrate
from gui.record import Recording
from tests.conftest import BASE, config
from tests.test_qmp_migration import where  # noqa: F401  (the fixture)

REASON = U.probe()
needs_uffd = pytest.mark.skipif(REASON is not None, reason=REASON or "")
AUTO = {"emulator__backend": "auto"}  # whatever pytest --backend forces
SETS = [a for key, value in BASE.items() for a in ("--set", f"{key}={value}")]
REFUSED = ("Userfaultfd not available: Operation not permitted (uid 1000, "
           "vm.unprivileged_userfaultfd=0; ...): run as root, or `sysctl -w "
           "vm.unprivileged_userfaultfd=1`, ...; or set emulator.backend=emulated")
HUGE = 2 << 20


def test_auto_is_the_default():
    assert KEYS["emulator.backend"].default == "auto"


def test_an_explicit_backend_is_kept_and_nothing_is_probed(monkeypatch):
    def probe(huge_page=0):
        raise AssertionError("probed")
    monkeypatch.setattr(U, "probe", probe)
    for name in ("emulated", "userfaultfd"):
        cfg = config(emulator__backend=name)
        assert backend.resolve(cfg) == (cfg, Backend(name))
        assert Backend(name).describe() == name


def test_without_payload_auto_is_emulated_and_says_why(monkeypatch):
    monkeypatch.setattr(U, "probe", lambda huge_page=0: None)  # the kernel would permit it
    cfg, chosen = backend.resolve(config(emulator__payload="false", **AUTO))
    assert cfg["emulator.backend"] == "emulated"
    assert chosen == Backend("emulated", True, "emulator.payload=false")
    assert chosen.describe() == "emulated (auto: emulator.payload=false)"


def test_without_postcopy_auto_is_emulated_and_says_why(monkeypatch):
    # QEMU opens a userfaultfd for postcopy-ram only; a precopy gains nothing from one
    monkeypatch.setattr(U, "probe", lambda huge_page=0: None)  # the kernel would permit it
    cfg, chosen = backend.resolve(config(migration__postcopy_ram="false", **AUTO))
    assert cfg["emulator.backend"] == "emulated"
    assert chosen.describe() == "emulated (auto: migration.postcopy-ram=false)"


@needs_uffd
def test_where_the_probe_passes_auto_runs_userfaultfd(capsys):
    code = cli.main(["run", "--json", *SETS, "--set", "emulator.backend=auto"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["status"] == "completed" and result["integrity"]["ok"]
    assert result["emulator"]["backend"] == "userfaultfd"
    assert result["emulator"]["backend-auto"] == {"chose": "userfaultfd", "why": None}
    assert result["config"]["emulator"]["backend"] == "userfaultfd"  # what ran
    assert result["latency"]["count"] > 0
    assert "  emulator.backend: userfaultfd (auto)" in cli.summary(result, config()).splitlines()


@pytest.mark.skipif(U.huge_pages_free(HUGE) >= 16,
                    reason="this machine has 32 MiB of free 2 MiB huge pages")
def test_2mib_pages_without_free_huge_pages_run_emulated_and_say_how_many():
    """nr_hugepages is the machine owner's: auto does not reserve any, it falls back."""
    result = migrate(config(guest__page_size="2MiB", **AUTO))
    assert result["status"] == "completed" and result["integrity"]["ok"]
    why = result["emulator"]["backend-auto"]["why"]
    assert result["emulator"]["backend"] == "emulated"
    if REASON is None:  # else the kernel's refusal comes first
        assert why.startswith("guest RAM of 32 MiB on 2048 KiB huge pages needs 16 free, "), why
    assert "echo" not in why and "\n" not in why  # the reason, not the advice


def test_a_refused_probe_makes_auto_emulated_with_the_reason(monkeypatch, tmp_path, capsys):
    """The run goes on (exit 0), emulated; the report, its configuration, the recording and
    the window's event log say so and why, in a few words."""
    monkeypatch.setattr(U, "probe", lambda huge_page=0: REFUSED)
    path = tmp_path / "auto.pcr"
    code = cli.main(["run", "--json", *SETS, "--set", "emulator.backend=auto",
                     "--record", str(path)])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["status"] == "completed"
    why = "Userfaultfd not available: Operation not permitted"
    assert result["emulator"]["backend"] == "emulated"
    assert result["emulator"]["backend-auto"] == {"chose": "emulated", "why": why}
    assert result["config"]["emulator"]["backend"] == "emulated"
    rec = Recording.open(path)
    assert rec.header["config"]["emulator"]["backend"] == "emulated"
    assert rec.header["report"]["emulator"]["backend-auto"]["why"] == why
    assert any(line.endswith(f"] emulator.backend: emulated (auto: {why})")
               for line in rec.events), rec.events[:5]
    assert not multiprocessing.active_children()


def test_explicit_userfaultfd_is_still_refused_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(U, "probe", lambda huge_page=0: REFUSED)
    mine = f"pce_{os.getpid()}_"  # this run's segments (others' runs may share the machine)
    code = cli.main(["run", "--json", *SETS, "--set", "emulator.backend=userfaultfd"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"postcopy-emu: emulator.backend=userfaultfd: {REFUSED}"]
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(mine)]


def test_short_keeps_the_reason_and_drops_the_advice():
    assert backend.short(REFUSED) == "Userfaultfd not available: Operation not permitted"
    assert backend.short(U._no_huge_pages(32 << 20, HUGE, 0)) == \
        "guest RAM of 32 MiB on 2048 KiB huge pages needs 16 free, 0 are"
    assert backend.short("Missing userfault map features: 0x4") == \
        "Missing userfault map features: 0x4"


def test_a_standalone_destination_says_which_backend_it_chose(where):  # noqa: F811
    """`postcopy-emu destination` chooses before its engine starts, and says so once."""
    from tests.test_qmp_migration import finish, start

    dst = start(where, "dst", "destination", "--incoming", "defer",
                "--set", "emulator.backend=auto", "--set", "emulator.payload=false",
                env={"TMPDIR": where[0]})
    dst.connect()
    finish(where, where[1])
    said = [line for line in dst.log().splitlines() if "emulator.backend" in line]
    assert said == ["postcopy-emu destination: emulator.backend: emulated (auto: "
                    "emulator.payload=false)"]
