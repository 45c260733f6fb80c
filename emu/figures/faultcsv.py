"""The faults of one run as CSV, one row per resolved fault, without Qt: `postcopy-emu run
--csv FILE` and the window's File > Export write the same columns.

What a page waited behind comes from the pages' final states and arrival times: every page
that reached the destination on the same channel while the vCPU was blocked was ahead of it on
that connection (a channel is one byte stream, first in first out). On main, in vanilla
postcopy, that is the background stream; on preempt, other urgent pages only.
"""

from __future__ import annotations

import csv
import io
import os

import numpy as np

from emu.figures import metrics
from emu.migration import ram as R

COLUMNS = ("time_s", "vcpu", "page", "guest_address", "latency_us", "channel", "page_came",
           "behind_background", "behind_urgent", "behind_bytes", "waited_behind")
# How a page in each final destination state came (the fault's own page).
CAME = {R.BACKGROUND: "in the background stream", R.URGENT_MAIN: "on demand, on main",
        R.URGENT_PREEMPT: "on demand, on preempt", R.PRECOPY: "in precopy"}
# The channel each final state arrived on (0 main, 1 preempt), and whether it was urgent.
CHANNEL_OF = {R.PRECOPY: 0, R.BACKGROUND: 0, R.URGENT_MAIN: 0, R.URGENT_PREEMPT: 1}
URGENT = (R.URGENT_MAIN, R.URGENT_PREEMPT)


def _arrivals(dst: np.ndarray, arrival: np.ndarray, channel: int, urgent: bool) -> np.ndarray:
    """Sorted arrival times of the pages that came on *channel*, urgent ones or the others."""
    states = [s for s, ch in CHANNEL_OF.items() if ch == channel and (s in URGENT) == urgent]
    return np.sort(arrival[np.isin(dst, states)])


def _between(times: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """How many of the sorted *times* fall in (start, end), per row."""
    return np.maximum(np.searchsorted(times, end, "left")
                      - np.searchsorted(times, start, "right"), 0)


def behind(records: np.ndarray, dst: np.ndarray, arrival: np.ndarray) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """Per fault: background pages and other urgent pages that arrived on its channel while
    its vCPU waited."""
    # up to the page's own arrival (exactly: the page itself is not ahead of itself)
    start, end = records["time"], records["time"] + records["latency"]
    placed = dst[records["page"]] >= R.PRESENT
    end = np.where(placed, arrival[records["page"]], end)
    background = np.zeros(len(records), np.int64)
    urgent = np.zeros(len(records), np.int64)
    for channel in range(len(metrics.CHANNELS)):
        mine = records["channel"] == channel
        background[mine] = _between(_arrivals(dst, arrival, channel, False), start[mine],
                                    end[mine])
        urgent[mine] = _between(_arrivals(dst, arrival, channel, True), start[mine],
                                end[mine])
    return background, urgent


def _words(channel: str, background: int, urgent: int, nbytes: int) -> str:
    if not background and not urgent:
        return f"nothing: {channel} was free"
    parts = [f"{n} {what} page{'s' if n != 1 else ''}" for n, what in
             ((background, "background"), (urgent, "urgent")) if n]
    return f"{' and '.join(parts)} on {channel} ({nbytes / 1024:.0f} KiB)"


def rows(records: np.ndarray, page_size: int, pages=None) -> list[list]:
    """The CSV's rows after COLUMNS. *pages*: (dst, src, arrival) once the run has ended,
    or None (a run not started): then what the page waited behind is left empty."""
    out = []
    if pages is not None:
        dst, _, arrival = pages
        background, urgent = behind(records, dst, arrival)
    for i, rec in enumerate(records):
        channel = metrics.CHANNELS[rec["channel"]]
        row = [f"{rec['time']:.6f}", int(rec["vcpu"]), int(rec["page"]),
               f"0x{int(rec['page']) * page_size:x}", f"{rec['latency'] * 1e6:.1f}", channel]
        if pages is None:
            row += ["", "", "", "", ""]
        else:
            nbytes = int(background[i] + urgent[i]) * page_size
            row += [CAME.get(int(dst[rec["page"]]), "not placed"), int(background[i]),
                    int(urgent[i]), nbytes, _words(channel, background[i], urgent[i], nbytes)]
        out.append(row)
    return out


def text(records: np.ndarray, page_size: int, pages=None) -> str:
    """The whole CSV: a header line, then one line per fault in the order they resolved."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(rows(records, page_size, pages))
    return buf.getvalue()


def write(path: str | os.PathLike, records: np.ndarray, page_size: int, pages=None) -> int:
    """Write the CSV to *path*; returns the number of faults written."""
    with open(path, "w", newline="") as out:
        out.write(text(records, page_size, pages))
    return len(records)
