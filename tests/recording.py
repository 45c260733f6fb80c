"""A small run recorded as the window records it, with a copy of every live snapshot: for the
record/replay tests, with and without Qt."""

import time

from gui.session import FINAL, Session
from tests.conftest import PATIENCE

TICK_S = 0.04  # the window's timer


def copy_snapshot(snap, session) -> dict:
    """What a live snapshot shows, kept past the next tick; faults as the window has them by
    then (all so far, not only the new ones)."""
    return {"phase": snap.phase, "now": snap.now, "status": dict(snap.status),
            "dst": snap.dst.copy(), "src": snap.src.copy(), "arrival": snap.arrival.copy(),
            "waiting": snap.waiting.copy(), "urgent": vars(snap.urgent).copy(),
            "boards": {role: dict(b) for role, b in snap.boards.items()},
            "faults": session.faults.records.copy(), "summary": session.faults.summary()}


def record(path, cfg, **session_args) -> tuple[Session, list[tuple[dict, list[str]]]]:
    """Run *cfg* in a Session that records in *path*, ticking as the window does; the session
    and, per frame, the live snapshot and the event-log lines shown by then; session_args as
    Session takes them (faults, recover_after, trace)."""
    session = Session(cfg, record=path, **session_args)
    session.start()
    live, events = [], []
    deadline = time.monotonic() + PATIENCE
    try:
        while session.phase not in FINAL and time.monotonic() < deadline:
            snap = session.tick()
            events += snap.events
            if snap.dst is not None:
                live.append((copy_snapshot(snap, session), list(events)))
            time.sleep(TICK_S)
    finally:
        session.stop()
    assert session.phase == "completed", events
    return session, live
