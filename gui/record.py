"""A recording of everything the window shows of one run, and the file it is kept in.

The Recorder sits where the live Session turns what the Run publishes into a Snapshot: each
tick it takes the Snapshot (with the page arrays as it copied them, so that the recording holds
exactly what the window drew) and keeps only what changed. Recording.open() reads the file
back, checking it as untrusted input, and state_at(i) rebuilds the page arrays of frame i.
The format is in docs/record.md. Plain Python and numpy, no Qt: `postcopy-emu run --record`
records without a window.

A file is a zip archive (zlib-deflated members): header.json (format, version, the
configuration, the marks, the report), events.json (the event-log lines), and one .npy array
per column, as numpy writes them (never pickles).
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emu.config import FAULTS, Config, ConfigError
from emu.figures import metrics
from emu.migration import ram as R

FORMAT = "postcopy-emu recording"
VERSION = 1
PHASES = ("idle", "starting", "running", "checking", "completed", "failed")
URGENT_KINDS = ("queued", "main", "preempt", "background", "asking")  # Urgent's lists
ZIP_MAGIC = b"PK\x03\x04"
# Bounds on what a reader accepts, so that a hostile or broken file cannot make it allocate
# without limit: the header, the event log, and any one array.
MAX_HEADER = 16 << 20
MAX_EVENTS = 256 << 20
MAX_ARRAY = 2 << 30
MAX_PAGES = 1 << 28  # a 1 TiB guest of 4 KiB pages
KEYFRAME_BYTES = 64 << 20  # memory the replay spends on full page arrays for seeking back


class RecordingError(ValueError):
    """A file that is not a recording this program reads; str() is one line."""


# ---- writing ----

class Recorder:
    """Collects the frames of one run and writes them to *path* when closed."""

    def __init__(self, path: str | os.PathLike[str], cfg: Config) -> None:
        self.path = Path(path)
        self.cfg = cfg
        n = cfg.npages
        self._dst = np.full(n, R.MISSING, np.uint8)  # the state of the last frame
        self._src = np.full(n, R.UNSENT, np.uint8)
        self._arrival = np.zeros(n)
        self._cols: dict[str, list] = {name: [] for name in _FRAME_COLUMNS}
        self._runs: list[tuple[np.ndarray, ...]] = []
        self._arrivals: list[tuple[np.ndarray, np.ndarray]] = []
        self._urgent: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._boards: dict[str, list[list[float]]] = {}
        self._fields: dict[str, list[str]] = {}
        self._events: list[str] = []
        self._fidelity: list[list[float]] = []  # per frame: the distortion now, the worst
        self._statuses: list[str] = []
        self._counts = {"runs": 0, "arrivals": 0, "urgent": 0}
        self.integrity_frame: int | None = None
        self.closed = False
        self.written: Path | None = None  # the file, once close() wrote it

    @property
    def frames(self) -> int:
        return len(self._cols["t"])

    def copy_pages(self, pages) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The run's page arrays, copied once: the Snapshot shows these copies, so the frame
        recorded is the frame drawn, whatever the engines change meanwhile."""
        return tuple(np.array(a, copy=True) for a in pages)

    def add(self, snap, session) -> None:
        """Record one tick's Snapshot of *session* (a frame only once there are pages)."""
        if self.closed:
            return
        self._events.extend(snap.events)
        if snap.dst is None:
            return  # starting: its lines go with the first frame
        self._pages(snap.dst, snap.src, snap.arrival)
        self._urgent_lists(snap.urgent)
        self._board_row(snap.boards)
        self._fidelity.append(distortion_row(session.fidelity.now)
                              + distortion_row(session.distorted))
        switchover = session.switchover
        for name, value in (("t", snap.now), ("phase", PHASES.index(snap.phase)),
                            ("paused", session.paused), ("scale", session.scale),
                            ("switchover", math.nan if switchover is None else switchover),
                            ("source", self._status(snap.status["source"])),
                            ("destination", self._status(snap.status["destination"])),
                            ("faults", session.faults.count), ("events", len(self._events)),
                            ("runs", self._counts["runs"]),
                            ("arrivals", self._counts["arrivals"]),
                            ("urgent", self._counts["urgent"])):
            self._cols[name].append(value)
        if self.integrity_frame is None and session.integrity is not None:
            self.integrity_frame = self.frames - 1

    def _status(self, status: str) -> int:
        if status not in self._statuses:
            self._statuses.append(status)
        return self._statuses.index(status)

    def _pages(self, dst: np.ndarray, src: np.ndarray, arrival: np.ndarray) -> None:
        """What changed since the last frame, as runs of consecutive pages in one state."""
        changed = np.flatnonzero((dst != self._dst) | (src != self._src))
        if len(changed):
            d, s = dst[changed], src[changed]
            cut = np.flatnonzero((np.diff(changed) != 1) | (np.diff(d) != 0) | (np.diff(s) != 0))
            first = np.concatenate([[0], cut + 1])
            lengths = np.diff(np.concatenate([first, [len(changed)]]))
            self._runs.append((changed[first].astype(np.int64), lengths.astype(np.int64),
                               d[first], s[first]))
            self._counts["runs"] += len(first)
            self._dst[changed], self._src[changed] = d, s
        moved = np.flatnonzero(arrival != self._arrival)
        if len(moved):
            self._arrivals.append((moved.astype(np.int64), arrival[moved]))
            self._counts["arrivals"] += len(moved)
            self._arrival[moved] = arrival[moved]

    def _urgent_lists(self, urgent) -> None:
        entries = [(kind, page, age) for kind, name in enumerate(URGENT_KINDS)
                   for page, age in getattr(urgent, name)]
        if entries:
            kinds, pages, ages = zip(*entries, strict=True)
            self._urgent.append((np.array(kinds, np.uint8), np.array(pages, np.int64),
                                 np.array(ages, np.float64)))
            self._counts["urgent"] += len(entries)

    def _board_row(self, boards: dict[str, dict[str, float]]) -> None:
        for role, board in boards.items():
            fields = self._fields.setdefault(role, list(board))
            self._boards.setdefault(role, []).append([float(board[f]) for f in fields])

    def close(self, session) -> Path | None:
        """Write the file (once); None if no frame was recorded. Written next to the target
        and renamed, so a reader never sees half a file."""
        if self.closed:
            return None
        self.closed = True
        if not self.frames:
            return None
        part = self.path.with_name(self.path.name + ".part")
        try:
            with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
                zf.writestr("header.json", json.dumps(self._header(session)))
                zf.writestr("events.json", json.dumps(self._events))
                for name, array in self._arrays(session).items():
                    buf = io.BytesIO()
                    np.save(buf, array, allow_pickle=False)
                    zf.writestr(f"{name}.npy", buf.getvalue())
            os.replace(part, self.path)
        except BaseException:
            part.unlink(missing_ok=True)  # only the part file this wrote
            raise
        self.written = self.path
        return self.path

    def _header(self, session) -> dict:
        report = session.report
        cfg = self.cfg  # with the backend the run used (emulator.backend=auto chosen)
        if session.run is not None:
            cfg = cfg.with_overrides([f"emulator.backend={session.run.cfg['emulator.backend']}"])
        return {"format": FORMAT, "version": VERSION, "config": cfg.to_json(),
                "npages": self.cfg.npages, "frames": self.frames, "statuses": self._statuses,
                "boards": self._fields, "marks": marks(session.run),
                "report": report, "integrity": session.integrity,
                "integrity-frame": self.integrity_frame}

    def _arrays(self, session) -> dict[str, np.ndarray]:
        out = {f"frame-{name}": np.array(values, dtype)
               for name, (values, dtype) in ((n, (self._cols[n], _FRAME_COLUMNS[n]))
                                             for n in _FRAME_COLUMNS)}
        for name, parts, dtypes in (("run", self._runs, _RUN_DTYPES),
                                    ("arrival", self._arrivals, _ARRIVAL_DTYPES),
                                    ("urgent", self._urgent, _URGENT_DTYPES)):
            for column, dtype in dtypes.items():
                i = list(dtypes).index(column)
                out[f"{name}-{column}"] = (np.concatenate([p[i] for p in parts]).astype(dtype)
                                           if parts else np.zeros(0, dtype))
        for role, rows in self._boards.items():
            out[f"board-{role}"] = np.array(rows, np.float64)
        out["faults"] = session.faults.records.copy()
        out["fidelity"] = np.array(self._fidelity, np.float64).reshape(-1, 2 * DISTORTION)
        return out


DISTORTION = 4  # a Distortion's fields in a row: lag, latency, scale, faithful (NaN: none)


def distortion_row(d) -> list[float]:
    return [math.nan] * DISTORTION if d is None else [d.lag, d.latency, d.scale, d.faithful]


# Per-frame columns and their types; runs/arrivals/urgent/faults/events count what the frame
# and every earlier one hold.
_FRAME_COLUMNS = {"t": np.float64, "phase": np.uint8, "paused": np.bool_, "scale": np.float64,
                  "switchover": np.float64, "source": np.uint8, "destination": np.uint8,
                  "faults": np.int64, "events": np.int64, "runs": np.int64,
                  "arrivals": np.int64, "urgent": np.int64}
_RUN_DTYPES = {"start": np.int64, "length": np.int64, "dst": np.uint8, "src": np.uint8}
_ARRIVAL_DTYPES = {"page": np.int64, "time": np.float64}
_URGENT_DTYPES = {"kind": np.uint8, "page": np.int64, "age": np.float64}


def marks(run) -> list[dict]:
    """The moments the timeline marks: switchover, each postcopy pause and each recovery
    (the source's states, as QEMU names them), and each fault injected."""
    if run is None:
        return []
    found = []
    what = {"device": "switchover", "postcopy-paused": "pause", "postcopy-recover": "recovery"}
    for status, t in run.states["source"]:
        if status in what:
            found.append({"t": t, "kind": what[status], "text": f"source {status}"})
    for fault in run.injected:
        text = fault["action"] + ("" if fault["action"] == "pause" else f" {fault['channel']}")
        found.append({"t": fault["time"], "kind": "fault", "text": f"fault: {text}"})
    return sorted(found, key=lambda mark: mark["t"])


def numbered(path: str | os.PathLike[str], n: int) -> Path:
    """The file the n-th run of one window records to: PATH, then PATH-2.ext, PATH-3.ext."""
    path = Path(path)
    return path if n <= 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")


# ---- reading ----

@dataclass
class Recording:
    """A recording, read and checked: the header's fields and every column."""

    path: Path
    header: dict
    cfg: Config
    events: list[str]
    arrays: dict[str, np.ndarray]

    @property
    def frames(self) -> int:
        return self.header["frames"]

    @property
    def times(self) -> np.ndarray:
        return self.arrays["frame-t"]

    def column(self, name: str) -> np.ndarray:
        return self.arrays[f"frame-{name}"]

    def span(self, kind: str, i: int) -> slice:
        """The entries of run/arrival/urgent that frame *i* adds."""
        ends = self.column(kind)
        return slice(int(ends[i - 1]) if i else 0, int(ends[i]))

    def apply(self, i: int, dst: np.ndarray, src: np.ndarray, arrival: np.ndarray) -> None:
        """Bring the page arrays from frame i-1 to frame i."""
        a = self.arrays
        runs = self.span("runs", i)
        lengths = a["run-length"][runs]
        if len(lengths):
            offsets = np.cumsum(lengths) - lengths
            pages = np.repeat(a["run-start"][runs] - offsets, lengths) + np.arange(lengths.sum())
            dst[pages] = np.repeat(a["run-dst"][runs], lengths)
            src[pages] = np.repeat(a["run-src"][runs], lengths)
        moved = self.span("arrivals", i)
        arrival[a["arrival-page"][moved]] = a["arrival-time"][moved]

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Recording:
        """Read *path*; RecordingError (one line) if it is not a recording this reads."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as err:
            raise RecordingError(f"{path}: {err.strerror or err}") from None
        if magic != ZIP_MAGIC:
            raise RecordingError(f"{path}: not a postcopy-emu recording "
                                 "(make one with `postcopy-emu run --record FILE`)")
        try:
            with zipfile.ZipFile(path) as zf:
                return cls._read(path, zf)
        except RecordingError:
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError) as err:
            raise RecordingError(f"{path}: truncated or damaged recording ({err})") from None

    @classmethod
    def _read(cls, path: Path, zf: zipfile.ZipFile) -> Recording:
        header = _json_member(path, zf, "header.json", MAX_HEADER)
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise RecordingError(f"{path}: not a postcopy-emu recording (no {FORMAT!r} header)")
        if header.get("version") != VERSION:
            raise RecordingError(f"{path}: recording format version {header.get('version')!r}; "
                                 f"this postcopy-emu reads version {VERSION}")
        cfg = _config(path, header.get("config"))
        if header.get("npages") != cfg.npages or cfg.npages > MAX_PAGES:
            raise RecordingError(f"{path}: damaged recording (page count)")
        events = _json_member(path, zf, "events.json", MAX_EVENTS)
        arrays = {name[:-4]: _array_member(path, zf, name)
                  for name in zf.namelist() if name.endswith(".npy")}
        recording = cls(path, header, cfg, events, arrays)
        _check(recording)
        return recording


def _json_member(path: Path, zf: zipfile.ZipFile, name: str, limit: int):
    info = zf.getinfo(name)
    if info.file_size > limit:
        raise RecordingError(f"{path}: {name} is {info.file_size} bytes, over the {limit} "
                             "a recording may have")
    try:
        return json.loads(zf.read(info))
    except (ValueError, UnicodeDecodeError) as err:
        raise RecordingError(f"{path}: damaged recording ({name}: {err})") from None


def _array_member(path: Path, zf: zipfile.ZipFile, name: str) -> np.ndarray:
    info = zf.getinfo(name)
    if info.file_size > MAX_ARRAY:
        raise RecordingError(f"{path}: {name} is {info.file_size} bytes, over the "
                             f"{MAX_ARRAY} a recording may have")
    with zf.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
        except ValueError as err:
            raise RecordingError(f"{path}: damaged recording ({name}: {err})") from None
        if dtype.hasobject or fortran or len(shape) > 2:
            raise RecordingError(f"{path}: damaged recording ({name}: not a plain array)")
        nbytes = math.prod(shape) * dtype.itemsize
        data = f.read(nbytes + 1)
    if len(data) != nbytes:
        raise RecordingError(f"{path}: truncated or damaged recording ({name})")
    return np.frombuffer(data, dtype).reshape(shape)


def _config(path: Path, nested) -> Config:
    try:
        flat = {f"{section}.{key}": value for section, keys in nested.items()
                if section != FAULTS for key, value in keys.items()}
        flat[FAULTS] = nested.get(FAULTS, [])
        return Config(flat)
    except (ConfigError, AttributeError, TypeError) as err:
        raise RecordingError(f"{path}: damaged recording (configuration: {err})") from None


def _check(rec: Recording) -> None:
    """Every column there, of the right type and length, and every index in range: a replay
    then never indexes out of bounds, whatever the file says."""
    f, a = rec.frames, rec.arrays

    def bad(what: str) -> RecordingError:
        return RecordingError(f"{rec.path}: damaged recording ({what})")

    if not isinstance(f, int) or f < 1 or not isinstance(rec.events, list):
        raise bad("frame count")
    expect = {f"frame-{n}": (d, (f,)) for n, d in _FRAME_COLUMNS.items()}
    for name, dtypes, count in (("run", _RUN_DTYPES, "runs"), ("arrival", _ARRIVAL_DTYPES,
                                                             "arrivals"),
                                ("urgent", _URGENT_DTYPES, "urgent")):
        total = int(a["frame-" + count][-1]) if "frame-" + count in a else -1
        expect.update({f"{name}-{c}": (d, (total,)) for c, d in dtypes.items()})
    boards = rec.header.get("boards")
    if not isinstance(boards, dict):
        raise bad("boards")
    expect.update({f"board-{role}": (np.float64, (f, len(fields)))
                   for role, fields in boards.items()})
    faults = int(a["frame-faults"][-1]) if "frame-faults" in a else -1
    expect["faults"] = (metrics.FAULT_DTYPE, (faults,))
    expect["fidelity"] = (np.float64, (f, 2 * DISTORTION))
    for name, (dtype, shape) in expect.items():
        if name not in a or a[name].dtype != np.dtype(dtype) or a[name].shape != shape:
            raise bad(name)
    for count, limit in (("runs", None), ("arrivals", None), ("urgent", None),
                         ("faults", None), ("events", len(rec.events))):
        ends = a["frame-" + count]
        if np.any(np.diff(ends) < 0) or ends[0] < 0 or (limit is not None and ends[-1] > limit):
            raise bad(f"{count} counts")
    n = rec.cfg.npages
    starts, lengths = a["run-start"], a["run-length"]
    runs_ok = (np.all((lengths > 0) & (lengths <= n)) and np.all((starts >= 0) & (starts < n))
               and np.all(starts + lengths <= n))
    if not runs_ok or np.any((a["arrival-page"] < 0) | (a["arrival-page"] >= n)):
        raise bad("page numbers")
    # a frame changes each page once at most: its runs cover no more than the guest
    covered = np.concatenate([[0], np.cumsum(lengths)])[a["frame-runs"]]
    if np.any(np.diff(covered, prepend=0) > n):
        raise bad("page runs")
    faults = a["faults"]
    if np.any(faults["channel"] >= len(metrics.CHANNELS)) or not np.all(
            np.isfinite(faults["latency"]) & (faults["latency"] >= 0)
            & np.isfinite(faults["time"])):
        raise bad("faults")
    if np.any(a["run-dst"] >= len(R.DEST_STATE_NAMES)) or np.any(a["run-src"] > R.SENT_PREEMPT):
        raise bad("page states")
    if np.any(a["urgent-kind"] >= len(URGENT_KINDS)) or np.any(a["frame-phase"] >= len(PHASES)):
        raise bad("codes")
    statuses = rec.header.get("statuses")
    if not isinstance(statuses, list) or any(
            np.any(a[f"frame-{side}"] >= len(statuses)) for side in ("source", "destination")):
        raise bad("statuses")
    if not np.all(np.isfinite(a["frame-t"])) or np.any(np.diff(a["frame-t"]) < 0):
        raise bad("frame times")
    _check_boards(rec, bad)
    _check_texts(rec, bad)


def _check_boards(rec: Recording, bad) -> None:
    """Every counter the window reads is there (a recording from a version whose boards had
    other counters is refused, not shown with made-up zeros), and every value is a number."""
    from emu.migration import destination, source
    from emu.net import link

    fields = rec.header["boards"]
    for role, names in (("source", source.FIELDS), ("destination", destination.FIELDS),
                        ("network", link.FIELDS)):
        missing = [name for name in names if name not in fields.get(role, [])]
        if missing:
            raise RecordingError(f"{rec.path}: recorded without the {role} counters "
                                 f"{', '.join(missing)} this postcopy-emu shows (made by "
                                 "another version)")
        if not np.all(np.isfinite(rec.arrays[f"board-{role}"])):
            raise bad(f"{role} counters")


def _check_texts(rec: Recording, bad) -> None:
    """Event lines, marks and the report have the shapes the window reads."""
    if not all(isinstance(line, str) for line in rec.events):
        raise bad("event log")
    marks = rec.header.get("marks")
    if not isinstance(marks, list) or not all(
            isinstance(m, dict) and isinstance(m.get("t"), int | float)
            and isinstance(m.get("kind"), str) and isinstance(m.get("text"), str)
            for m in marks):
        raise bad("marks")
    report = rec.header.get("report")
    if report is not None and not (isinstance(report, dict) and isinstance(
            report.get("query-migrate"), dict) and isinstance(report.get("integrity"), dict)):
        raise bad("report")
