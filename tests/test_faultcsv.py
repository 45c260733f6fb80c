"""The faults as CSV (issue 14 item 3), without Qt: what each page waited behind, and
`postcopy-emu run --csv FILE`."""

import csv

import numpy as np

from emu import cli
from emu.figures import faultcsv, metrics
from emu.migration import ram as R
from tests.conftest import BASE


def _faults(*rows) -> np.ndarray:
    """(time, vcpu, page, latency, channel) rows as fault records."""
    return np.array(list(rows), metrics.FAULT_DTYPE)


def test_a_page_waits_behind_what_arrived_on_its_channel_meanwhile():
    dst = np.full(20, R.MISSING, np.uint8)
    arrival = np.zeros(20)
    dst[0:5] = R.BACKGROUND  # on main at 1.1 .. 1.5 ms
    arrival[0:5] = np.arange(1, 6) * 1e-4 + 1e-3
    dst[5] = R.URGENT_PREEMPT  # another urgent page, on preempt, at 1.2 ms
    arrival[5] = 1.2e-3
    dst[6], arrival[6] = R.URGENT_MAIN, 1.6e-3  # this fault's page, on main
    dst[7], arrival[7] = R.URGENT_PREEMPT, 1.3e-3  # and this one's, on preempt
    records = _faults((1.0e-3, 0, 6, 0.6e-3, 0), (1.0e-3, 1, 7, 0.3e-3, 1))
    background, urgent = faultcsv.behind(records, dst, arrival)
    assert background.tolist() == [5, 0]  # the background stream is on main only
    assert urgent.tolist() == [0, 1]  # page 5 was ahead on preempt
    rows = faultcsv.rows(records, 4096, (dst, np.zeros(20, np.uint8), arrival))
    assert rows[0][-5:] == ["on demand, on main", 5, 0, 5 * 4096,
                            "5 background pages on main (20 KiB)"]
    assert rows[1][-1] == "1 urgent page on preempt (4 KiB)"


def test_without_pages_the_columns_stay_and_what_it_waited_behind_is_empty():
    text = faultcsv.text(_faults((0.5, 0, 3, 1e-3, 0)), 4096)
    header, row = list(csv.reader(text.splitlines()))
    assert tuple(header) == faultcsv.COLUMNS
    assert row[:6] == ["0.500000", "0", "3", "0x3000", "1000.0", "main"] and row[6:] == [""] * 5


def test_run_csv_writes_one_row_per_fault(tmp_path, capsys):
    path = tmp_path / "faults.csv"
    sets = [f"{k}={v}" for k, v in {**BASE, "guest.ram": "16MiB"}.items()]
    argv = ["run", "--json", "--csv", str(path), *(a for s in sets for a in ("--set", s))]
    assert cli.main(argv) == 0
    result = __import__("json").loads(capsys.readouterr().out)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == faultcsv.COLUMNS
    assert len(rows) == result["latency"]["count"] > 0
    assert {r["channel"] for r in rows} == {"main"}  # vanilla postcopy
    assert all(r["page_came"] in faultcsv.CAME.values() for r in rows)
    assert sum(int(r["behind_background"]) for r in rows) > 0  # the lesson: the queue on main
