"""QtCounters: the run's figures under QEMU's query-migrate names, refreshed a few times a
second, and the report's own figures once the run has ended."""

from __future__ import annotations

from PySide6 import QtCore, QtWidgets

from emu.config import Config
from emu.figures import report
from gui._qt import style
from gui.session import CHECKING, FaultLog, Snapshot

# (label, how to read it from (query-migrate reply, snapshot)); labels are QEMU's names.
ROWS = (
    ("status", lambda q, s: f"{s.status['source']} → {s.status['destination']}"),
    ("total-time", lambda q, s: f"{q['total-time']:,} ms"),
    ("setup-time", lambda q, s: f"{q['setup-time']:,} ms"),
    ("downtime", lambda q, s: f"{q['downtime']:,} ms"),
    ("ram transferred", lambda q, s: style.size(q["ram"]["transferred"])),
    ("ram remaining", lambda q, s: style.size(q["ram"]["remaining"])),
    ("ram precopy-bytes", lambda q, s: style.size(q["ram"]["precopy-bytes"])),
    ("ram postcopy-bytes", lambda q, s: style.size(q["ram"]["postcopy-bytes"])),
    ("ram mbps", lambda q, s: f"{q['ram']['mbps']:,.0f}"),
    ("ram dirty-sync-count", lambda q, s: f"{q['ram']['dirty-sync-count']}"),
    ("ram postcopy-requests", lambda q, s: f"{q['ram']['postcopy-requests']:,}"),
    ("urgent pages sent", lambda q, s: _urgent_sent(s)),
    # the gap between postcopy-requests and urgent pages sent: requests for pages the source
    # had sent already (in the background stream), which it drops as QEMU does
    ("requests dropped", lambda q, s: f"{int(s.boards['source']['dropped-requests']):,} "
                                      "(page already sent)"),
    ("postcopy-blocktime", lambda q, s: _blocktime(q)),
    # what the vCPUs got done meanwhile: blocktime alone does not tell a guest whose faults
    # are served fast (more of them, as much time blocked) from one that waits long
    ("guest progress", lambda q, s: _progress(s.progress)),
    ("postcopy-latency", lambda q, s: style.duration(q["postcopy-latency"] * 1e-9)),
    ("emulator lag", lambda q, s: _lag(s)),
)
PROGRESS_TIP = ("Touches (4 KiB page writes) the destination's vCPUs did per emulated second, "
                "from the guest's resume there until the run completed")


class QtCounters(QtWidgets.QWidget):
    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        title = QtWidgets.QLabel("Counters (query-migrate)")
        title.setObjectName("title")
        form = QtWidgets.QFormLayout()
        form.setVerticalSpacing(1)
        form.setLabelAlignment(QtCore.Qt.AlignmentFlag.AlignLeft)
        self._values: dict[str, QtWidgets.QLabel] = {}
        for name, _ in (*ROWS, ("memory check", None)):
            self._values[name] = QtWidgets.QLabel("–")
            self._values[name].setWordWrap(True)  # a narrow window: two lines, never cut
            form.addRow(name, self._values[name])
        self._values["guest progress"].setToolTip(PROGRESS_TIP)
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(title)
        layout.addLayout(form)
        layout.addStretch(1)
        self._turn = style.Turn("counters")
        self._final_shown = False

    def reset(self) -> None:
        for label in self._values.values():
            label.setText("–")
        self._final_shown = False

    def update_from(self, snap: Snapshot, cfg: Config, log: FaultLog,
                    final: dict | None, integrity: dict | None = None) -> None:
        """Live figures from the boards while running; the report's once it exists. The
        memory check shows from the moment the run has ended: "checking" while it runs, its
        result as soon as it has one (the rest of the report takes longer)."""
        turn = self._turn.due() or final is not None or snap.phase == CHECKING
        if self._final_shown or "source" not in snap.boards or not turn:
            return
        qm = final["query-migrate"] if final else _live_query_migrate(snap, cfg, log)
        for name, read in ROWS:
            self.value(name, read(qm, snap))
        integrity = final["integrity"] if final else integrity
        if integrity is not None:
            self.value("memory check", report.integrity_text(integrity))
        elif snap.phase == CHECKING:
            self.value("memory check", "checking the guest's memory…")
        self._final_shown = final is not None

    def value(self, name: str, text: str | None = None) -> str:
        """Set (when text is given) and return the shown value of one row."""
        if text is not None and self._values[name].text() != text:
            self._values[name].setText(text)
        return self._values[name].text()


def _live_query_migrate(snap: Snapshot, cfg: Config, log: FaultLog) -> dict:
    board = dict(snap.boards["source"])
    if not board["total-time"]:  # the source sets it at the end: show the time so far
        board["total-time"] = snap.now
    return report.query_migrate(cfg, snap.status["source"], board, log.records)


def _urgent_sent(snap: Snapshot) -> str:
    src = snap.boards["source"]
    return f"on main {int(src['urgent-main']):,} · on preempt {int(src['urgent-preempt']):,}"


def _blocktime(qm: dict) -> str:
    if "postcopy-blocktime" not in qm:
        return "off (capability postcopy-blocktime)"
    text = f"{qm['postcopy-blocktime']:,} ms"
    per_vcpu = qm["postcopy-vcpu-blocktime"]
    if len(per_vcpu) > 1:  # with one vCPU the two are the same figure
        text += " (per vCPU: " + ", ".join(f"{ms:,}" for ms in per_vcpu[:4]) + " ms)"
    return text


def _progress(progress: dict | None) -> str:
    """Touches per emulated second on the destination (emu/figures/progress.py), so far while
    the run goes on."""
    if progress is None:
        return "– (the guest runs on the source)"
    window = progress["window"]
    so_far = " so far" if window["until"] == "run ended" else ""
    text = (f"{progress['total']:,.0f} touches/s ({progress['touches']['total']:,} in "
            f"{style.duration(window['seconds'])}{so_far})")
    per_vcpu = progress["per-vcpu"]
    if len(per_vcpu) > 1:
        text += " (per vCPU: " + ", ".join(f"{r:,.0f}" for r in per_vcpu[:4]) + ")"
    return text


def _lag(snap: Snapshot) -> str:
    """How late the destination got the link's frames (emu.figures.report.emulator_health)."""
    dst = snap.boards["destination"]
    avg = dst["rx-lag-sum"] / max(dst["rx-frames"], 1)
    return f"avg {style.duration(avg)}, max {style.duration(dst['rx-lag-max'])} late"
