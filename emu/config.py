"""Scenario configuration: migration capabilities and parameters (QEMU names), the link, the
guest, the workload and the emulator itself.

A scenario is a TOML file with one table per section, plus `--set section.key=value`
overrides. Everything is parsed and checked here, so a bad scenario fails with one clear line
before any process starts. Values are plain numbers afterwards: sizes in bytes, rates in
bytes/s, durations in seconds.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emu.migration.ram import TARGET_PAGE
from emu.units import (
    TooLarge,
    clip,
    format_duration,
    format_rate,
    format_size,
    parse_duration,
    parse_rate,
    parse_size,
    quote,
)

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "assets" / "scenarios"
FAULTS = "faults"  # top-level [[faults]] array, stored raw and checked by its own module
PATH_SHOWN = 300  # characters of a file name an error shows (a value: units.ECHO_LIMIT)


class ConfigError(ValueError):
    """A scenario that can not run; str(err) is one line naming the key and what is allowed.
    key: the setting it is about, when there is one (to find it in the scenario file)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _show_raw(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return quote(value)


def _parse_bool(value: object) -> bool:
    # not str() of anything: an array nested 300 deep would end in a RecursionError
    text = str(value).strip().lower() if isinstance(value, str | int | float) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"must be true or false (got {_show_raw(value)})")


def _parse_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise ValueError(f"must be a whole number (got {_show_raw(value)})")


def _parse_float(value: object) -> float:
    number = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or not math.isfinite(number):
        raise ValueError(f"must be a number (got {_show_raw(value)})")
    return number


AUTO = "auto"  # emulator.time-scale: chosen per run (emu/figures/timescale.py)


def _parse_scale(value: object) -> float | str:
    """A number, or auto."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    return _parse_float(value)


def _parse_str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string (got {_show_raw(value)})")
    return value.strip()


def _parse_version(value: object) -> str:
    """A release number such as "8.0": a string, or the number TOML reads from design = 8.0."""
    if isinstance(value, float):
        return repr(value)
    return _parse_str(value)


def _show_float(value: float) -> str:
    return repr(value).removesuffix(".0")  # "1", "0.1", "1e-06": all valid TOML


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "bool": _parse_bool,
    "int": _parse_int,
    "float": _parse_float,
    "str": _parse_str,
    "version": _parse_version,
    "scale": _parse_scale,
    "size": parse_size,
    "rate": parse_rate,
    "duration": parse_duration,
}
_FORMATTERS: dict[str, Callable[[Any], str]] = {
    "bool": lambda v: str(v).lower(),
    "int": str,
    "float": _show_float,
    "str": str,
    "version": str,
    "scale": lambda v: v if v == AUTO else _show_float(v),
    "size": format_size,
    "rate": format_rate,
    "duration": format_duration,
}
# Shown when a value falls below a bound of 0: often a unit left out or a stray minus sign.
_EXAMPLES = {
    "size": "e.g. 256MiB or 1GiB",
    "rate": "e.g. 10Gbit or 1.25GB/s",
    "duration": "e.g. 200us or 1.5s",
}


@dataclass(frozen=True)
class Key:
    """One configuration key: its kind, its default (parsed) and the values it allows.

    kind is one of bool, int, float, str, size (bytes), rate (bytes/s), duration (seconds),
    scale (a float, or AUTO).
    low/high bound the value (low exclusive when low_open; high only with low), multiple is a
    required divisor.
    """

    kind: str
    default: Any
    help: str
    low: Any = None
    low_open: bool = False
    high: Any = None
    choices: tuple[Any, ...] = ()
    multiple: int | None = None

    def parse(self, value: object) -> Any:
        """Parse a TOML value or --set text; ValueError says what is allowed."""
        try:
            parsed = _PARSERS[self.kind](value)
        except TooLarge:
            raise ValueError(f"must be {self.allowed()} (got {_show_raw(value)})") from None
        except ValueError:
            if self.kind != "scale":
                raise
            raise ValueError(f"must be {self.allowed()} (got {_show_raw(value)})") from None
        if parsed == AUTO:
            return parsed
        if not self._allows(parsed):
            got = quote(parsed) if self.kind in ("str", "version") else clip(self.show(parsed))
            raise ValueError(f"must be {self.allowed()}{self._example(parsed)} (got {got})")
        return parsed

    def show(self, value: Any) -> str:
        """The value as a person would write it: "true", "64MiB", "10Gbit/s", "200us"."""
        return _FORMATTERS[self.kind](value)

    def allowed(self) -> str:
        """The allowed values in words, e.g. "one of 4KiB, 2MiB, 1GiB" or "between 1 and 64"."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "scale":
            return f"a number in ({self.show(self.low)}, {self.show(self.high)}] or {AUTO}"
        parts = []
        if self.choices:
            parts.append("one of " + ", ".join(self.show(c) for c in self.choices))
        if self.low is not None:
            parts.append(self._range())
        if self.multiple:
            parts.append(f"a multiple of {self.show(self.multiple)}")
        return ", ".join(parts)

    def _example(self, value: Any) -> str:
        if self.kind in _EXAMPLES and self.low == 0 and not self._above_low(value):
            return f", {_EXAMPLES[self.kind]}"
        return ""

    def _range(self) -> str:
        low = self.show(self.low)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        high = self.show(self.high)
        return f"> {low} and <= {high}" if self.low_open else f"between {low} and {high}"

    def _above_low(self, value: Any) -> bool:
        if self.low is None:
            return True
        return value > self.low if self.low_open else value >= self.low

    def _allows(self, value: Any) -> bool:
        if self.choices and value not in self.choices:
            return False
        if not self._above_low(value):
            return False
        if self.high is not None and value > self.high:
            return False
        return not (self.multiple and value % self.multiple)


def _key(kind: str, default: object, help: str, **limits: Any) -> Key:
    """A Key whose default and limits are written as text ("64KiB") and parsed here."""
    parse = _PARSERS[kind]
    for name in ("low", "high", "multiple"):
        if name in limits:
            limits[name] = parse(limits[name])
    if "choices" in limits:
        limits["choices"] = tuple(parse(c) for c in limits["choices"])
    return Key(kind, parse(default), help, **limits)


# Upper bounds, far above any real use, so that a value like 1e30 is refused here, with its
# key and range, rather than overflowing later in the middle of a run. Whether a guest fits
# this machine is checked when a run starts (engines.check_room).
RAM_MAX = "16TiB"
SOCKET_BUFFER_MAX = "1GiB"  # Linux keeps a socket's buffer sizes in an int, doubled
RATE_MAX = "10Tbit/s"
TIME_MAX = "3600s"  # emulated
CPU_MAX = "100ms"  # a thread's time per unit of work (emulated)
CPU_BYTE_MAX = "100ns"  # and per byte: 100 s per GiB

PREEMPT_CHANNELS_MAX = 8  # migration.x-preempt-channels: each a connection and a thread
# a thread per vCPU in the source and in the destination, on a machine of few cores: the
# auto time scale pays for the threads' own cost (docs/config.md, guest.vcpus)
VCPUS_MAX = 256

# migration.design: the QEMU releases whose postcopy source the emulator can behave as
DESIGNS = ("7.1", "8.0", "10.1")
# designs whose migrate_caps_check() refuses multifd together with postcopy-ram
MULTIFD_NO_POSTCOPY = ("7.1", "8.0")

KEYS: dict[str, Key] = {
    "migration.postcopy-ram": _key(
        "bool", True, "capability postcopy-ram: switch over early, then fetch pages on demand"
    ),
    "migration.postcopy-preempt": _key(
        "bool", False, "capability postcopy-preempt: urgent pages on their own channel"
    ),
    "migration.design": _key(
        "version", "7.1", "the generation of QEMU's postcopy code: 7.1 (urgent pages from the "
        "migration thread), 8.0 (preempt-full: from the return-path thread), 10.1 (8.0 and "
        "the locality hint)", choices=DESIGNS,
    ),
    "migration.x-preempt-wait-channel": _key(
        "bool", True, "what-if when false (QEMU always waits): postcopy starts without the "
        "preempt channel; urgent pages go on main until it is up",
    ),
    "migration.x-postcopy-preempt-break-huge": _key(
        "bool", True, "QEMU 7.1 property: stop in the middle of a huge page for an urgent page"
    ),
    # experiments QEMU does not have: the preempt-postcopy series' own TODO items
    # (docs/concepts.md, "What if: the series' TODO items")
    "migration.x-preempt-channels": _key(
        "int", 1, "experiment, not QEMU: preempt connections and destination preempt threads "
        "(\"Multi-channel for preemption threads\")", low=1, high=PREEMPT_CHANNELS_MAX,
    ),
    "migration.x-main-nonblocking": _key(
        "bool", False, "experiment, not QEMU: the migration thread never sleeps in write() on "
        "a full main channel, it serves the request queue meanwhile (7.1 with preempt)"
    ),
    "migration.multifd": _key(
        "bool", False, "capability multifd: precopy pages on multifd-channels connections"
    ),
    "migration.multifd-channels": _key(
        "int", 2, "parameter multifd-channels: multifd connections and sender threads", low=1,
        high=16,
    ),
    "migration.postcopy-blocktime": _key(
        "bool", True, "capability postcopy-blocktime: report postcopy-blocktime"
    ),
    "migration.max-bandwidth": _key(
        "rate", "128MiB/s", "parameter max-bandwidth: precopy rate cap", low=0, low_open=True,
        high=RATE_MAX,
    ),
    "migration.max-postcopy-bandwidth": _key(
        "rate", 0, "parameter max-postcopy-bandwidth: background rate cap, 0 = unlimited", low=0,
        high=RATE_MAX,
    ),
    "migration.downtime-limit": _key(
        "duration", "300ms", "parameter downtime-limit (without postcopy-ram)", low=0,
        high="2000s",  # QEMU's MAX_MIGRATE_DOWNTIME_SECONDS
    ),
    "migration.switchover-after": _key(
        "duration", "0.5s", "precopy time before migrate-start-postcopy (or stop-and-copy)", low=0,
        high=TIME_MAX,
    ),
    "link.bandwidth": _key(
        "rate", "1Gbit/s", "bottleneck bandwidth shared by the connections", low=0, low_open=True,
        high=RATE_MAX,
    ),
    "link.rtt": _key("duration", "200us", "round-trip time; rtt/2 each way", low=0, high="10s"),
    "link.socket-buffer": _key(
        "size", "4MiB", "bytes one connection holds queued (send + receive)", low="64KiB",
        high=SOCKET_BUFFER_MAX,
    ),
    "link.write-wakeup": _key(
        "size", 0, "room a blocked writer waits for beyond its own write", low=0,
        high=SOCKET_BUFFER_MAX,
    ),
    "guest.ram": _key("size", "256MiB", "guest RAM size", low=0, low_open=True, high=RAM_MAX),
    "guest.page-size": _key("size", "4KiB", "host page size", choices=("4KiB", "2MiB", "1GiB")),
    "guest.vcpus": _key("int", 1, "vCPUs running the workload", low=1, high=VCPUS_MAX),
    "guest.populated": _key(
        "float", 1, "share of RAM the guest wrote before the migration (the rest is zero)",
        low=0, high=1,
    ),
    "workload.pattern": _key(
        "str",
        "random",
        "page access pattern",
        choices=("sequential", "random", "stride", "hotset", "ab"),
    ),
    "workload.touch-cost": _key(
        "duration", "2us", "vCPU time per 4KiB page touch", low=0, low_open=True, high="1s"
    ),
    "workload.stride": _key(
        "size", "64MiB", "jump of the stride pattern", low=0, low_open=True, high=RAM_MAX,
        multiple="4KiB",
    ),
    "workload.hot-fraction": _key(
        "float", 0.1, "share of RAM that is hot (hotset)", low=0, low_open=True, high=1
    ),
    "workload.hot-probability": _key(
        "float", 0.9, "share of touches that go to the hot set (hotset)", low=0, high=1
    ),
    "workload.prefault-threads": _key(
        "int", 1, "threads that prefaulted the buffer at once (its guest-physical layout)",
        low=1, high=VCPUS_MAX,
    ),
    # The CPU time of QEMU's threads, charged in emulated time (emu/cpu.py; the defaults'
    # sources are in docs/config.md). All 0: the emulator's own time only, as before.
    "cpu.save-page": _key(
        "duration", "100ns", "migration thread, per 4KiB page found and saved", low=0,
        high=CPU_MAX,
    ),
    "cpu.write": _key(
        "duration", "1us", "migration thread, per writev (one per 32 pages)", low=0, high=CPU_MAX,
    ),
    "cpu.write-byte": _key(
        "duration", "150ps", "migration thread, per byte written", low=0, high=CPU_BYTE_MAX,
    ),
    "cpu.zero-check": _key(
        "duration", "450ns", "migration thread, more per 4KiB zero page (checked whole)", low=0,
        high=CPU_MAX,
    ),
    "cpu.place-page": _key(
        "duration", "500ns", "listen/preempt thread, per host page placed (UFFDIO_COPY)", low=0,
        high=CPU_MAX,
    ),
    "cpu.place-byte": _key(
        "duration", "400ps", "listen/preempt thread, per byte of a host page read and placed",
        low=0, high=CPU_BYTE_MAX,
    ),
    "cpu.place-zero-page": _key(
        "duration", "250ns", "listen/preempt thread, per 4KiB zero page (UFFDIO_ZEROPAGE)",
        low=0, high=CPU_MAX,
    ),
    "cpu.fault-request": _key(
        "duration", "2us", "fault thread, per fault read and requested", low=0, high=CPU_MAX,
    ),
    "cpu.return-path-message": _key(
        "duration", "1500ns", "return-path thread, per message", low=0, high=CPU_MAX,
    ),
    "emulator.time-scale": _key(
        "scale", AUTO, "emulated seconds per real second, or auto: the largest at which the "
        "emulator's own cost stays under 1% of the latencies measured", low=0, low_open=True,
        high=100,
    ),
    "emulator.payload": _key("bool", True, "real page bytes travel (false: headers only)"),
    "emulator.backend": _key(
        "str", "auto", "how a destination vCPU faults: emulated (a page-state lookup), "
        "userfaultfd (the kernel, as QEMU), or auto: userfaultfd where it can serve the run, "
        "else emulated", choices=("auto", "emulated", "userfaultfd"),
    ),
    "emulator.seed": _key("int", 1, "seed of every random choice", low=0, high=str(2**64 - 1)),
    "emulator.chunk": _key(
        "size",
        "128KiB",
        "largest piece the source writes in one record",
        low="4KiB",
        high="4MiB",
        multiple="4KiB",
    ),
    "emulator.duration-limit": _key(
        "duration", 0, "fail a run still going after this long, 0 = none", low=0,
        high=TIME_MAX,
    ),
}
SECTIONS = tuple(dict.fromkeys(name.partition(".")[0] for name in KEYS))


def _suggest(name: str) -> str | None:
    if len(name) > 100:  # no key is that long, and difflib would take seconds over it
        return None
    section, dot, leaf = name.partition(".")
    if not dot:  # a key at the top of the file, outside any section
        section, leaf = "", name
    close = difflib.get_close_matches(section, SECTIONS, n=1)
    section = close[0] if close else section
    in_section = [full.partition(".")[2] for full in KEYS if full.startswith(section + ".")]
    match = difflib.get_close_matches(leaf, in_section, n=1)
    if match:
        return f"{section}.{match[0]}"
    # The right key in the wrong section: match on the key alone, strictly.
    by_leaf = {full.partition(".")[2]: full for full in KEYS}
    match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.8)
    return by_leaf[match[0]] if match else None


def _unknown(name: str) -> str:
    section, dot, _ = name.partition(".")
    if section == FAULTS:
        return f"unknown key {quote(name)} (faults come as [[faults]] tables in the scenario file)"
    hint = _suggest(name)
    if dot and section in SECTIONS:
        what = f"key {quote(name)}"
        known = "keys: " + ", ".join(k for k in KEYS if k.startswith(section + "."))
    else:
        what = f"section {quote(section)}" if dot else f"key {quote(name)}"
        known = "sections: " + ", ".join((*SECTIONS, FAULTS))
    return f"unknown {what} (did you mean {hint}?)" if hint else f"unknown {what} ({known})"


def _parse_faults(value: object) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"faults: must be an array of tables, [[faults]] (got {quote(value)})",
                          FAULTS)
    return copy.deepcopy(value)


def _parse_value(name: str, value: object) -> Any:
    if name == FAULTS:
        return _parse_faults(value)
    if name not in KEYS:
        raise ConfigError(_unknown(name), name)
    try:
        return KEYS[name].parse(value)
    except ValueError as err:
        raise ConfigError(f"{name}: {err}", name) from None


def parse_value(name: str, value: object) -> Any:
    """One key's value (TOML value or --set text), parsed and checked alone: its type and
    range, none of the checks across keys (a sweep's --vary values, each point then whole)."""
    return _parse_value(name, value)


def _check_together(values: Mapping[str, Any]) -> None:
    """Checks that involve more than one key."""
    if values["migration.postcopy-preempt"] and not values["migration.postcopy-ram"]:
        raise ConfigError("migration.postcopy-preempt: requires migration.postcopy-ram=true")
    if values["migration.multifd"] and values["migration.postcopy-ram"] \
            and values["migration.design"] in MULTIFD_NO_POSTCOPY:
        # migrate_caps_check() before QEMU 10.1 (commit "migration: enable multifd and
        # postcopy together" removed it)
        raise ConfigError("migration.multifd: Postcopy is not yet compatible with multifd "
                          f"(migration.design {values['migration.design']}; 10.1 allows both)",
                          "migration.multifd")
    _check_experiments(values)
    ram, page = values["guest.ram"], values["guest.page-size"]
    if ram < page:
        raise ConfigError(
            f"guest.ram: must be at least guest.page-size {format_size(page)} "
            f"(got {format_size(ram)})"
        )
    if ram % page:
        raise ConfigError(
            f"guest.ram: must be a multiple of guest.page-size {format_size(page)} "
            f"(got {format_size(ram)})"
        )
    _check_backend(values)
    # Each vCPU works on its own share of the target pages, so it needs at least one.
    if values["guest.vcpus"] > ram // TARGET_PAGE:
        raise ConfigError(
            f"guest.vcpus: must be at most guest.ram / 4KiB = {ram // TARGET_PAGE} "
            f"(got {values['guest.vcpus']})"
        )
    if values["workload.prefault-threads"] > ram // TARGET_PAGE:
        raise ConfigError(
            f"workload.prefault-threads: must be at most guest.ram / 4KiB = {ram // TARGET_PAGE} "
            f"(got {values['workload.prefault-threads']})"
        )


def _check_experiments(values: Mapping[str, Any]) -> None:
    """The what-if keys only where they change something: several preempt channels need the
    preempt channel; a non-blocking main helps only where the migration thread sends urgent
    pages on preempt (7.1: from 8.0 on the return-path thread sends them)."""
    if values["migration.x-preempt-channels"] > 1 and not values["migration.postcopy-preempt"]:
        raise ConfigError("migration.x-preempt-channels: more than 1 requires "
                          "migration.postcopy-preempt=true", "migration.x-preempt-channels")
    if values["migration.x-main-nonblocking"] and not (
            values["migration.postcopy-preempt"] and values["migration.design"] == "7.1"):
        raise ConfigError("migration.x-main-nonblocking: requires migration.postcopy-preempt="
                          "true and migration.design=7.1 (from 8.0 on the return-path thread "
                          "sends urgent pages, and a full main holds none up)",
                          "migration.x-main-nonblocking")


# Keys that are properties QEMU removed, by migration.design: setting one is refused with QEMU's
# error for an unknown property (object_property_find_err(), as -global reports it)
BREAK_HUGE = "migration.x-postcopy-preempt-break-huge"
REMOVED = {"8.0": (BREAK_HUGE,), "10.1": (BREAK_HUGE,)}


def _check_design(values: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    """A key the chosen design no longer has, set anyway: QEMU 8.0 dropped break-huge with the
    old preempt code ("migration: Remove old preempt code around state maintainance")."""
    design = values["migration.design"]
    for name in REMOVED.get(design, ()):
        if name in given:
            raise ConfigError(f"{name}: Property '{name}' not found (QEMU {design} has no "
                              f"such property: migration.design={design})", name)


def _check_backend(values: Mapping[str, Any]) -> None:
    """What emulator.backend=userfaultfd can place: real bytes (in 4 KiB pages of /dev/shm,
    or in huge pages of a hugetlb memfd, whose count the machine is asked for when a run
    starts: engines.check_backend)."""
    if values["emulator.backend"] != "userfaultfd":
        return
    if not values["emulator.payload"]:
        raise ConfigError("emulator.backend: userfaultfd places real pages, it requires "
                          "emulator.payload=true")


class Config(Mapping[str, Any]):
    """An immutable, checked scenario: "section.key" -> parsed value, and "faults".

    Sizes are bytes, rates bytes/s, durations seconds.
    """

    __slots__ = ("_values", "_given")

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        """Parse and check *values* (TOML values or --set text) on top of the defaults."""
        parsed: dict[str, Any] = {name: key.default for name, key in KEYS.items()}
        parsed[FAULTS] = []
        for name, value in (values or {}).items():
            parsed[name] = _parse_value(name, value)
        _check_together(parsed)
        _check_design(parsed, values or {})
        self._values = parsed
        self._given = frozenset(values or ())  # what was set, not defaulted: kept by overrides

    def __getitem__(self, name: str) -> Any:
        if name not in self._values:
            raise KeyError(_unknown(name))
        value = self._values[name]
        # The faults list is the one mutable value: hand out copies to keep Config immutable.
        return copy.deepcopy(value) if name == FAULTS else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Config({self._values!r})"

    def with_overrides(self, sets: Sequence[str]) -> Config:
        """A new Config with `section.key=value` overrides applied (later ones win)."""
        given = {name: self._values[name] for name in self._given}
        return Config({**given, **_parse_sets(sets)})

    def to_json(self) -> dict[str, Any]:
        """Nested {"section": {"key": value}} with plain numbers, for json.dumps."""
        out: dict[str, Any] = {section: {} for section in SECTIONS}
        for name in KEYS:
            if name in REMOVED.get(self._values["migration.design"], ()):
                continue  # not a property of that QEMU: a dump read back must not set it
            section, _, key = name.partition(".")
            out[section][key] = self._values[name]
        out[FAULTS] = self[FAULTS]
        return out

    @property
    def page_size(self) -> int:
        """Host page size in bytes (guest.page-size): the placement unit."""
        return self._values["guest.page-size"]

    @property
    def npages(self) -> int:
        """Number of host pages in guest RAM."""
        return self._values["guest.ram"] // self.page_size

    @property
    def target_pages_per_host_page(self) -> int:
        """How many 4 KiB target pages (wire records) make one host page."""
        return self.page_size // TARGET_PAGE


def _parse_sets(sets: Sequence[str]) -> dict[str, str]:
    values = {}
    for text in sets:
        name, sep, value = text.partition("=")
        name = name.strip()
        if not sep or "." not in name:
            raise ConfigError(
                f"--set {quote(text)}: expected section.key=value, e.g. link.bandwidth=10Gbit"
            )
        values[name] = value.strip()
    return values


def scenario_names() -> list[str]:
    """Names of the preset scenarios in assets/scenarios, for load_config(name)."""
    return sorted(path.stem for path in SCENARIO_DIR.glob("*.toml"))


def _resolve(path: str | os.PathLike[str]) -> Path:
    text = os.fspath(path)
    resolved = Path(text)
    bare = "/" not in text and os.sep not in text and not text.endswith(".toml")
    if bare and not _is_file(resolved):
        resolved = SCENARIO_DIR / f"{text}.toml"
    if not _is_file(resolved):
        presets = ", ".join(scenario_names()) or "none"
        shown = clip(str(resolved), PATH_SHOWN)
        raise ConfigError(f"scenario file not found: {shown} (presets: {presets})")
    return resolved


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte: no such file
        return False


def _flatten(data: dict[str, Any]) -> dict[str, Any]:
    """{"link": {"rtt": ...}} -> {"link.rtt": ...}; unknown names are left for Config."""
    flat = {}
    for section, table in data.items():
        if section == FAULTS or not isinstance(table, dict):
            flat[section] = table
            continue
        for key, value in table.items():
            flat[f"{section}.{key}"] = value
    return flat


def _read_scenario(path: Path) -> tuple[dict[str, Any], str]:
    """The file's TOML, and its text (to find a setting's line in)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: can not read: {err.strerror}") from None
    text = _decode(path, raw)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:  # its message ends "(at line L, column C)"
        raise ConfigError(f"{path}: invalid TOML: {clip(str(err), 200)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML: arrays or tables nested too deeply") from None
    except ValueError:  # int() of more digits than Python converts (tomllib takes the rest)
        raise ConfigError(f"{path}: invalid TOML: a number of more than "
                          f"{sys.get_int_max_str_digits()} digits") from None
    return data, text


def _check_sections(data: dict[str, Any]) -> None:
    for section in SECTIONS:
        if section in data and not isinstance(data[section], dict):
            raise ConfigError(f"{section}: must be a table, [{section}]", section)


def _decode(path: Path, raw: bytes) -> str:
    """TOML is UTF-8: say where a file is not, as tomllib says where it does not parse."""
    try:
        return raw.decode()
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - raw.rfind(b"\n", 0, err.start)
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 text, byte 0x{raw[err.start]:02x} "
                          f"(at line {line}, column {column})") from None


# A table header, [guest] or [[faults]], and a key, ram = or "ram" = or guest.ram =
_HEADER = re.compile(r"\s*\[\[?\s*([\w.-]+)\s*\]")
_ASSIGNMENT = re.compile(r'\s*("?)([\w.-]+)\1\s*=')


def _key_lines(text: str) -> dict[str, int]:
    """Line numbers of the settings a TOML text sets, by section.key (and by section):
    a plain scan for the messages, which tomllib's parse does not give."""
    lines: dict[str, int] = {}
    table = ""
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        match = header or _ASSIGNMENT.match(line)
        if match is None:
            continue
        name = match[1] if header else ".".join(filter(None, (table, match[2])))
        if header:
            table = name
        parts = name.split(".")
        for end in range(1, len(parts) + 1):  # a.b.c also finds a.b and a
            lines.setdefault(".".join(parts[:end]), number)
    return lines


def load_config(path: str | os.PathLike[str] | None = None, sets: Sequence[str] = ()) -> Config:
    """Read, parse and check a scenario: defaults, then the file, then the --set overrides.

    *path* is a TOML file, or the name of a preset in assets/scenarios ("default"). An error
    about a setting the file made names the file and the line: "FILE:LINE: message".
    """
    if path is None:
        return Config(_parse_sets(sets))
    resolved = _resolve(path)
    data, text = _read_scenario(resolved)
    overrides = _parse_sets(sets)
    try:
        _check_sections(data)
        return Config({**_flatten(data), **overrides})
    except ConfigError as err:
        if err.key is None or err.key in overrides:
            raise
        line = _key_lines(text).get(err.key)
        where = f"{resolved}:{line}" if line else f"{resolved}"
        raise ConfigError(f"{where}: {err}", err.key) from None
