"""What an engine child tells the program that started it, one frozen dataclass per message.

A child sends them on its control connection (emu/child.py, Control.emit); each receiver (the
run's controller, a standalone program's monitor, the link program) reads them with one
`match` on their types. Fields have names, so a reader says `event.status`, not `event[2]`;
an error carries its one-line message apart from its traceback.

Events are QEMU's words where QEMU has them: a state change is its migrate_set_state(), a
refused change the compare-and-set that failed, a trace a trace-events line.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Ready:
    """The child has started and takes commands."""

    role: str


@dataclass(frozen=True)
class StateChanged:
    """migrate_set_state(): `side`'s MigrationStatus is `status` since emulated time t."""

    side: str
    status: str
    t: float


@dataclass(frozen=True)
class StateRefused:
    """migrate_set_state(old -> new) found the state `actual`, left meanwhile by another thread:
    nothing changed."""

    side: str
    old: str
    new: str
    actual: str
    t: float

    def __str__(self) -> str:
        return (f"{self.side}: migrate_set_state {self.old} -> {self.new} refused: "
                f"the state is {self.actual}")


@dataclass(frozen=True)
class Refused:
    """A command refused, in QEMU's words (migrate-recover before the pause, ...)."""

    command: str
    message: str


@dataclass(frozen=True)
class Paused:
    """postcopy_pause(): `side` lost its channels in postcopy and waits for a recovery."""

    side: str
    reason: str


@dataclass(frozen=True)
class Error:
    """`role` failed: `message` is one line (QEMU's error text where it has one); `traceback`
    is the Python traceback of a failure nobody expected, "" otherwise."""

    role: str
    message: str
    traceback: str = ""

    def __str__(self) -> str:
        return f"{self.role}: {self.message}"

    @classmethod
    def of(cls, role: str, text: str) -> Error:
        """The error a text says: a traceback's last line is its message."""
        text = text.strip()
        lines = text.splitlines() or [""]
        if len(lines) > 1:
            return cls(role, lines[-1], text)
        return cls(role, text)


@dataclass(frozen=True)
class Report:
    """A side's final figures (its board, states, faults), sent once it has completed."""

    side: str
    report: dict


@dataclass(frozen=True)
class Listening:
    """The destination listens at `uri` (migrate-incoming, migrate-recover)."""

    uri: str


@dataclass(frozen=True)
class Bound:
    """`role` bound a unix socket file: the program removes it at its end."""

    role: str
    file: str


@dataclass(frozen=True)
class Link:
    """The network process saw a connection of `channel` (main, preempt) get `what`
    (connected, broken) at emulated time t."""

    what: str
    channel: str
    t: float


@dataclass(frozen=True)
class Exit:
    """The child's body has returned: it exits now."""

    role: str


@dataclass(frozen=True)
class Died:
    """The child went away unasked; the program that started it says so (emu/engines.py)."""

    role: str
    why: str


@dataclass(frozen=True)
class Trace:
    """A trace point that fired in `role` (emu/trace.py): QEMU's trace-event `name`, the
    child's emulated time t, and the event's fields."""

    role: str
    name: str
    t: float
    fields: dict = field(default_factory=dict)

    def __str__(self) -> str:
        args = " ".join(f"{key}={value}" for key, value in self.fields.items())
        return f"{self.role}: {self.name} {args}".rstrip()


Event = (Ready | StateChanged | StateRefused | Refused | Paused | Error | Report | Listening
         | Bound | Link | Exit | Died | Trace)
