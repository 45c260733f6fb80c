"""Trace points named after QEMU's trace-events, switched on with QEMU's -trace patterns.

Every decision that makes a latency has a trace point with QEMU's name for it (a request queued:
ram_save_queue_pages; a page placed: postcopy_place_page; ...). A module declares its points
once and calls them where the decision is made; a point that is off costs the caller one
boolean test, so the hot path writes

    if TRACE_PLACE.enabled:
        TRACE_PLACE(page=page, channel="preempt")

enable() takes QEMU's -trace pattern syntax: a name, or a pattern with * and ? wildcards
('postcopy_preempt_*'); a pattern starting with '-' switches matching points off again. What a
point records goes to the sink set with set_sink(): a child process sends it to its controller,
which prints each with its emulated time.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

Sink = Callable[[str, dict], None]

_points: dict[str, TracePoint] = {}
_patterns: list[str] = []
_sink: Sink = lambda name, fields: None  # noqa: E731
_PATTERN = re.compile(r"-?[A-Za-z0-9_*?\[\]!]+")  # fnmatch's wildcards, on trace-event names


class TracePoint:
    """One of QEMU's trace events. Call it with the event's fields, when `enabled`."""

    __slots__ = ("name", "enabled")

    def __init__(self, name: str) -> None:
        self.name = name
        self.enabled = _matches(name, _patterns)

    def __call__(self, **fields: object) -> None:
        _sink(self.name, fields)

    def __repr__(self) -> str:
        return f"TracePoint({self.name!r}, enabled={self.enabled})"


def point(name: str) -> TracePoint:
    """The trace point `name`, made once per process (modules declare theirs at import)."""
    if name not in _points:
        _points[name] = TracePoint(name)
    return _points[name]


def enable(patterns: Iterable[str]) -> list[str]:
    """Switch on the points matching QEMU-style `patterns`, now and for points made later;
    the names switched on among the points known so far."""
    _patterns[:] = [p for p in patterns if p]
    for tp in _points.values():
        tp.enabled = _matches(tp.name, _patterns)
    return sorted(name for name, tp in _points.items() if tp.enabled)


def patterns(words: Iterable[str]) -> tuple[str, ...]:
    """The patterns of -trace arguments as QEMU takes them: each may list several, comma-
    separated, with or without QEMU's "enable=" ('enable=postcopy_*,migrate_set_state').
    ValueError for a word that cannot be a pattern (trace points are named [a-z0-9_])."""
    found = []
    for word in words:
        for item in word.split(","):
            pattern = item.strip().removeprefix("enable=")
            if not pattern:
                continue
            if not _PATTERN.fullmatch(pattern):
                raise ValueError(f"{pattern!r} is not a trace pattern (a trace point's name, "
                                 f"* and ? as wildcards, '-' first to switch points off)")
            found.append(pattern)
    return tuple(found)


def unmatched(patterns: Iterable[str]) -> list[str]:
    """The patterns (not the '-' ones) that match none of the points known so far: a typo,
    most likely, which QEMU warns about too."""
    return [p for p in patterns
            if not p.startswith("-") and not any(fnmatch.fnmatchcase(n, p) for n in _points)]


def set_sink(sink: Sink) -> None:
    """Where enabled points send (name, fields)."""
    global _sink
    _sink = sink


def known() -> list[str]:
    """Every trace point made in this process so far."""
    return sorted(_points)


def _matches(name: str, patterns: list[str]) -> bool:
    """QEMU's rule: patterns apply in order, a '-' pattern switches a match off again."""
    on = False
    for pattern in patterns:
        if pattern.startswith("-"):
            if fnmatch.fnmatchcase(name, pattern[1:]):
                on = False
        elif fnmatch.fnmatchcase(name, pattern):
            on = True
    return on
