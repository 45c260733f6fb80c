"""emulator.backend: how a destination vCPU faults, and `auto` (the default) chosen per run.

`userfaultfd` is QEMU's mechanism (emu/migration/uffd_backend.py on emu/uffd.py), `emulated` a
page-state lookup. `auto` takes userfaultfd wherever it can serve the scenario at hand on this
machine, and emulated otherwise, so that a default never stops a run that can go:

- the scenario: a postcopy (QEMU opens a userfaultfd only for postcopy-ram; without it a
  precopy would only lose the destination's pre-mapped RAM, a page fault per first write),
  real bytes to place (emulator.payload = true), and huge pages only from a hugetlbfs pool
  with guest.ram's worth free (the program never changes the pool);
- the machine: what the kernel permits this process (uffd.probe(), as QEMU's
  postcopy_ram_supported_by_host() at migrate-incoming: root, vm.unprivileged_userfaultfd,
  /dev/userfaultfd, a seccomp filter), on that page size.

resolve() makes the choice before any process starts and gives the Config with the backend the
run will use, and a Backend saying which and, for auto falling back, why in a few words; an
explicit userfaultfd that cannot work is refused (check(), exit 2 with one line), as before.
Every program resolves before it makes shared memory (emu/controller.py's Run, a standalone
destination in emu/qmp/programs.py); an engine that were handed auto anyway would run emulated
(emu/migration/destination.py takes the kernel path for userfaultfd only).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from emu.config import Config, ConfigError

AUTO = "auto"
EMULATED = "emulated"
USERFAULTFD = "userfaultfd"
TARGET_PAGE = 4096
# where a refusal's line stops being its reason and starts being the details and what to do
_DETAILS = re.compile(r" \(|; |: as root")


class Backend(NamedTuple):
    """The backend a run's destination uses; auto: emulator.backend=auto chose it; why: for
    auto falling back to emulated, the reason in a few words."""

    name: str
    auto: bool = False
    why: str | None = None

    def describe(self) -> str:
        """ "userfaultfd", "userfaultfd (auto)", "emulated (auto: emulator.payload=false)"."""
        if not self.auto:
            return self.name
        return f"{self.name} (auto: {self.why})" if self.why else f"{self.name} (auto)"

    def to_json(self) -> dict:
        return {"chose": self.name, "why": self.why}

    @classmethod
    def of_report(cls, emulator: dict) -> Backend:
        """The Backend a run's report says it used (its "emulator" part)."""
        auto = emulator.get("backend-auto")
        return cls(emulator["backend"], auto is not None, auto and auto["why"])


def huge_page(cfg: Config) -> int:
    """The huge page userfaultfd would fault and place whole for this scenario, 0 for 4 KiB."""
    return cfg.page_size if cfg.page_size > TARGET_PAGE else 0


def refusal(cfg: Config) -> str | None:
    """None if userfaultfd can serve this scenario on this machine, else one line saying why
    and what to change."""
    if not cfg["emulator.payload"]:
        return ("emulator.payload=false (headers only: no page bytes to place); set "
                "emulator.payload=true or emulator.backend=emulated")
    from emu import uffd

    why = uffd.probe()
    if why is None and (size := huge_page(cfg)):
        try:
            uffd.check_huge_pages(cfg["guest.ram"], size)
        except uffd.HugePagesUnavailable as err:
            why = str(err)
        else:
            why = uffd.probe(size)
    return why


def short(why: str) -> str:
    """A refusal's reason without its details and advice: "Userfaultfd not available:
    Operation not permitted", "guest RAM of 32 MiB on 2048 KiB huge pages needs 16 free, 0 are"."""
    return _DETAILS.split(why, maxsplit=1)[0]


def resolve(cfg: Config) -> tuple[Config, Backend]:
    """*cfg* with the backend the run uses, and the Backend: an explicit one as it is, auto's
    choice otherwise (never an error: a scenario userfaultfd cannot serve runs emulated)."""
    if cfg["emulator.backend"] != AUTO:
        return cfg, Backend(cfg["emulator.backend"])
    why = None if cfg["migration.postcopy-ram"] else "migration.postcopy-ram=false"
    why = why or refusal(cfg)
    chosen = Backend(EMULATED, True, short(why)) if why else Backend(USERFAULTFD, True)
    return cfg.with_overrides([f"emulator.backend={chosen.name}"]), chosen


def check(cfg: Config) -> None:
    """A ConfigError, one line saying why and what to change, if emulator.backend=userfaultfd
    was asked for and cannot work here (the pool of huge pages is the machine owner's to set)."""
    if cfg["emulator.backend"] != USERFAULTFD:
        return
    if (why := refusal(cfg)) is not None:
        raise ConfigError(f"emulator.backend=userfaultfd: {why}")
