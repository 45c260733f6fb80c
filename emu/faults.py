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
"cut main at 0.3s", "corrupt preempt at 50ms", "pause at 0.2s". The return path may be called
as QEMU calls it, "return path" or "return-path", as well as "return".

One fault is no event but a slow network from the start: "delay preempt-connect 50ms" (a table
{action = "delay", channel = "preempt", delay = "50ms"}) sets up every connection of that
channel (main or preempt; recoveries' too) that much emulated time late, as a slow TCP
handshake would: the preempt channel, connected in the background, is then late for
postcopy_start() (QEMU waits there), or a late main lets the preempt channel reach the
destination first.
"""

from __future__ import annotations

from dataclasses import dataclass

from emu.config import Config, ConfigError
from emu.migration import versions
from emu.units import parse_duration, quote

ACTIONS = ("cut", "corrupt", "pause", "delay")
CONNECTS = ("main", "preempt")  # what a delay may slow down: a channel's connection
CHANNELS = ("main", "preempt", "return")
ALIASES = {"return-path": "return", "return path": "return"}  # QEMU's word for the channel
STATE_TRIGGERS = ("postcopy-recover-setup", "postcopy-recover")


_CHANNEL_WORDS = ", ".join(CHANNELS) + " (or return path)"


@dataclass(frozen=True)
class Fault:
    at: float | str  # seconds after postcopy started, or a source state to strike in
    action: str
    channel: str = "main"
    delay: float = 0.0  # a delay fault's, in emulated seconds

    def describe(self) -> str:
        if self.action == "delay":
            return f"delay {self.channel}-connect {self.delay * 1000:g}ms"
        when = self.at if isinstance(self.at, str) else f"{self.at:g}s"
        target = "" if self.action == "pause" else f" {self.channel}"
        return f"{self.action}{target} at {when}"


def parse(text: str) -> Fault:
    """'cut main at 0.3s' -> Fault(0.3, 'cut', 'main')."""
    words = text.split()
    if len(words) == 3 and words[0] == "delay" and words[1].endswith("-connect"):
        return check({"action": "delay", "channel": words[1].removesuffix("-connect"),
                      "delay": words[2]}, f"--fault {quote(text)}")
    if words[1:3] == ["return", "path"]:  # two words for one channel
        words[1:3] = ["return path"]
    if len(words) in (3, 4) and words[-2] == "at":
        channel = words[1] if len(words) == 4 else "main"
        return check({"action": words[0], "channel": channel, "at": words[-1]},
                     f"--fault {quote(text)}")
    raise ConfigError(f"--fault {quote(text)}: expected ACTION CHANNEL at TIME, e.g. 'cut main "
                      f"at 0.3s' (actions: {', '.join(ACTIONS[:-1])}; channels: "
                      f"{_CHANNEL_WORDS}), or delay CHANNEL-connect TIME")


def check(entry: dict, where: str = "faults") -> Fault:
    if entry.get("action") == "delay":
        return _check_delay(entry, where)
    _only(entry, ("at", "action", "channel"), where, "allowed")
    action = entry.get("action")
    if action not in ACTIONS:
        raise ConfigError(f"{where}: action must be one of {', '.join(ACTIONS)} "
                          f"(got {quote(action)})")
    channel = entry.get("channel", "main")
    channel = ALIASES.get(channel, channel) if isinstance(channel, str) else channel
    if channel not in CHANNELS:
        raise ConfigError(f"{where}: channel must be one of {_CHANNEL_WORDS} "
                          f"(got {quote(channel)})")
    return Fault(_when(entry.get("at"), where), action, channel)


def _only(entry: dict, fields: tuple[str, ...], where: str, allowed: str) -> None:
    """A fault's table holds these fields and no other."""
    unknown = set(entry) - set(fields)
    if unknown:
        raise ConfigError(f"{where}: unknown field {quote(sorted(unknown)[0])} ({allowed}: "
                          f"{', '.join(fields)})")


def _check_delay(entry: dict, where: str) -> Fault:
    _only(entry, ("action", "channel", "delay"), where, "a delay allows")
    channel = entry.get("channel")
    if channel not in CONNECTS:
        raise ConfigError(f"{where}: a delay's channel must be one of {', '.join(CONNECTS)} "
                          f"(got {quote(channel)})")
    try:
        seconds = parse_duration(entry.get("delay"))
    except (ValueError, TypeError):
        seconds = -1.0
    if not 0 <= seconds <= 60:
        raise ConfigError(f"{where}: delay must be a duration between 0 and 60s like 50ms "
                          f"(got {quote(entry.get('delay'))})")
    return Fault(0.0, "delay", channel, seconds)


def _when(at, where: str) -> float | str:
    if at in STATE_TRIGGERS:
        return at
    try:
        seconds = parse_duration(at)
    except (ValueError, TypeError):
        seconds = -1.0
    if seconds < 0:
        raise ConfigError(f"{where}: at must be a time after the start of postcopy like 0.3s, "
                          f"or one of {', '.join(STATE_TRIGGERS)} (got {quote(at)})")
    return seconds


def from_config(cfg: Config, extra: list[str] = ()) -> list[Fault]:
    faults = [check(entry, f"faults[{i}]") for i, entry in enumerate(cfg["faults"])]
    faults += [parse(text) for text in extra]
    if not versions.recover_setup(cfg):
        for fault in faults:
            if fault.at == "postcopy-recover-setup":  # it would never strike
                raise ConfigError(f"fault '{fault.describe()}': migration.design "
                                  f"{cfg['migration.design']} has no postcopy-recover-setup "
                                  "status (QEMU 9.1 added it: migration.design=10.1)")
    return faults
