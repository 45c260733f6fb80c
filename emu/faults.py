"""Fault injection: what to break, and when.

A fault is an action on a channel at an emulated time counted from the start of postcopy
(the destination entering postcopy-active: from then on the guest runs there), or at the
moment the source enters a state (e.g. at = "postcopy-recover": during the recovery
handshake, QEMU's double failure):
- cut: break the connection in the link (both ends see it fail; what was in flight is lost);
  the return path is the main connection's reverse direction, so cutting it cuts main too;
- corrupt: flip a byte of the next frame the link delivers on that channel;
- pause: migrate-pause on the source (channel is ignored).
Scenario files give [[faults]] tables with at, action and channel; the command line gives
"cut main at 0.3s", "corrupt preempt at 50ms", "pause at 0.2s".
"""

from __future__ import annotations

from dataclasses import dataclass

from emu.config import ConfigError
from emu.units import parse_duration

ACTIONS = ("cut", "corrupt", "pause")
CHANNELS = ("main", "preempt", "return")
STATE_TRIGGERS = ("postcopy-recover-setup", "postcopy-recover")


@dataclass(frozen=True)
class Fault:
    at: float | str  # seconds after postcopy started, or a source state to strike in
    action: str
    channel: str = "main"

    def describe(self) -> str:
        when = self.at if isinstance(self.at, str) else f"{self.at:g}s"
        target = "" if self.action == "pause" else f" {self.channel}"
        return f"{self.action}{target} at {when}"


def parse(text: str) -> Fault:
    """'cut main at 0.3s' -> Fault(0.3, 'cut', 'main')."""
    words = text.split()
    if len(words) in (3, 4) and words[-2] == "at":
        channel = words[1] if len(words) == 4 else "main"
        return check({"action": words[0], "channel": channel, "at": words[-1]}, text)
    raise ConfigError(f"--fault {text!r}: expected ACTION CHANNEL at TIME, e.g. 'cut main at "
                      f"0.3s' (actions: {', '.join(ACTIONS)}; channels: {', '.join(CHANNELS)})")


def check(entry: dict, where: str = "faults") -> Fault:
    unknown = set(entry) - {"at", "action", "channel"}
    if unknown:
        raise ConfigError(f"{where}: unknown field {sorted(unknown)[0]!r} (allowed: at, action, "
                          "channel)")
    action = entry.get("action")
    if action not in ACTIONS:
        raise ConfigError(f"{where}: action must be one of {', '.join(ACTIONS)} (got {action!r})")
    channel = entry.get("channel", "main")
    if channel not in CHANNELS:
        raise ConfigError(f"{where}: channel must be one of {', '.join(CHANNELS)} "
                          f"(got {channel!r})")
    return Fault(_when(entry.get("at"), where), action, channel)


def _when(at, where: str) -> float | str:
    if at in STATE_TRIGGERS:
        return at
    try:
        seconds = parse_duration(at)
    except (ValueError, TypeError):
        seconds = -1.0
    if seconds < 0:
        raise ConfigError(f"{where}: at must be a time after the start of postcopy like 0.3s, "
                          f"or one of {', '.join(STATE_TRIGGERS)} (got {at!r})")
    return seconds


def from_config(cfg, extra: list[str] = ()) -> list[Fault]:
    faults = [check(entry, f"faults[{i}]") for i, entry in enumerate(cfg["faults"])]
    return faults + [parse(text) for text in extra]
