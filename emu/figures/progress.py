"""Guest progress: the work the destination's vCPUs got done while pages were still missing.

Blocktime says how long the vCPUs waited; it does not say what they did in between. A run whose
faults are served faster takes more faults in the same time, so its blocktime can match a slow
run's while its guest got much further. Progress counts that: the touches the destination's
vCPUs did during postcopy, per emulated second, per vCPU and in all, over a stated window:

- the run's own (`progress`): from the guest's resume on the destination (POSTCOPY_RUN; QEMU's
  RESUME event) until the destination completed (its last page had arrived) or, for a run that
  did not complete, until the run ended;
- QEMU's (`progress["until-last-fault"]`, what `bench qemu` compares): from the resume to the
  last fault of any vCPU, the window emu/qemu/harness.py's _progress() measures real QEMU over
  (its guest's touches are known exactly only at its faults). A vCPU is counted up to that
  moment: its touches until its own last fault, then one per touch-cost from its wake-up on.
"""

from __future__ import annotations

from emu.config import KEYS

MAX_VCPUS = int(KEYS["guest.vcpus"].high)
# The destination's board: when the guest resumed there, and each vCPU's touches since
# (one writer per field: the vCPU's own thread).
RESUMED = "resumed-at"
BOARD_FIELDS = (RESUMED,) + tuple(f"touches-{v}" for v in range(MAX_VCPUS))


def board_field(vcpu: int) -> str:
    return BOARD_FIELDS[1 + vcpu]


def measure(touches: list[int], start: float, end: float, until: str) -> dict | None:
    """Touches per vCPU over [start, end] (emulated s) as the report gives them; None for an
    empty window."""
    seconds = end - start
    if seconds <= 0:
        return None
    return {"total": round(sum(touches) / seconds, 1),
            "per-vcpu": [round(n / seconds, 1) for n in touches],
            "touches": {"total": sum(touches), "per-vcpu": list(touches)},
            "window": {"from": round(start, 6), "to": round(end, 6),
                       "seconds": round(seconds, 6), "until": until}}


def from_vcpus(vcpus: list[dict], end: float, until: str, cost: float) -> dict | None:
    """The report's progress from the destination's own count (Destination._report's
    `touches`: per vCPU `from`, `touches` by `end`, and its last fault: `faulted`, `fault-at`,
    `fault-touches`, `woken`), with QEMU's window too."""
    if not vcpus:
        return None  # the guest never ran here (no postcopy)
    start = min(v["from"] for v in vcpus)
    out = measure([v["touches"] for v in vcpus], start, end, until)
    if out is not None:
        out["until-last-fault"] = until_last_fault(vcpus, start, cost)
    return out


def until_last_fault(vcpus: list[dict], start: float, cost: float) -> dict | None:
    """Progress from the resume to the last fault of any vCPU (None if none faulted)."""
    faults = [v["fault-at"] for v in vcpus if v["faulted"]]
    if not faults:
        return None
    last = max(faults)
    return measure([_touches_by(v, last, cost) for v in vcpus], start, last, "last fault")


def _touches_by(vcpu: dict, t: float, cost: float) -> int:
    """A vCPU's touches by time t, t at or after its last fault: none while it waited, then
    one per `cost`, never more than it did by the end of the run."""
    if vcpu["woken"] is None or t <= vcpu["woken"]:
        return vcpu["fault-touches"]
    free = int((t - vcpu["woken"]) / cost)
    return min(vcpu["fault-touches"] + free, vcpu["touches"])


def from_board(board: dict, nvcpus: int, now: float, until: str = "run ended") -> dict | None:
    """Progress from what the destination publishes, up to `now`: the window's live figure,
    and the report's for a run that ended without the destination's own report."""
    start = board.get(RESUMED, 0.0)
    if not start:
        return None  # the guest has not resumed on the destination
    return measure([int(board[board_field(v)]) for v in range(nvcpus)], start, now, until)


UNTIL = {"completed": "from resume to completion", "run ended": "from resume so far",
         "last fault": "from resume to the last fault"}


def text(progress: dict | None) -> str:
    """One phrase: "12,345 touches/s (3,086 touches in 250.0 ms from resume to completion)",
    with the per-vCPU rates when there are several."""
    if progress is None:
        return "none (the guest did not run on the destination)"
    window = progress["window"]
    per_vcpu = ""
    if len(progress["per-vcpu"]) > 1:
        per_vcpu = "; per vCPU " + ", ".join(f"{r:,.0f}" for r in progress["per-vcpu"])
    return (f"{progress['total']:,.0f} touches/s ({progress['touches']['total']:,} touches "
            f"in {window['seconds'] * 1e3:,.1f} ms {UNTIL[window['until']]}{per_vcpu})")


def ratio_text(this: float | None, other: float | None, label: str) -> str | None:
    """"postcopy-preempt: 2.1x more guest progress" (or less), None without both figures."""
    if not this or not other:
        return None
    factor = this / other
    if factor >= 1:
        return f"{label}: {factor:.1f}x more guest progress"
    return f"{label}: {1 / factor:.1f}x less guest progress"
