"""Named numbers in shared memory: the counters each process publishes for the others to read.

One writer per field (the process that owns the block); readers may see a value a moment old,
never a torn one (float64 stores are atomic on the machines we run on).
"""

from __future__ import annotations


class Board:
    def __init__(self, fields: tuple[str, ...], buf: memoryview | None = None) -> None:
        self.fields = fields
        self._index = {name: i for i, name in enumerate(fields)}
        # a memoryview of doubles, not a numpy array: a field is read or written every few
        # microseconds, and numpy's scalar access costs ten times as much
        size = self.nbytes(fields)
        self._v = memoryview(buf if buf is not None else bytearray(size))[:size].cast("d")

    @staticmethod
    def nbytes(fields: tuple[str, ...]) -> int:
        return 8 * len(fields)

    def __getitem__(self, name: str) -> float:
        return self._v[self._index[name]]

    def __setitem__(self, name: str, value: float) -> None:
        self._v[self._index[name]] = value

    def add(self, name: str, value: float) -> None:
        self._v[self._index[name]] += value

    def snapshot(self) -> dict[str, float]:
        return dict(zip(self.fields, self._v.tolist(), strict=True))


LAG_FIELDS = ("rx-lag-sum", "rx-lag-max", "rx-frames")


def lag_meter(board: Board, now, ready=lambda: 0.0):
    """Callback for Endpoint(on_arrival=...): how late this process reads each frame, against
    the time the link scheduled its arrival, or the time the reading thread was free to read
    it (ready(): a thread busy with its charged CPU time, emu/cpu.py, reads late on purpose).
    Lateness here is the emulator not keeping up: the relay, or this process, fell behind the
    scaled clock."""
    def note(arrival: float) -> None:
        lag = now() - max(arrival, ready())
        board.add("rx-lag-sum", lag)
        board.add("rx-frames", 1)
        if lag > board["rx-lag-max"]:
            board["rx-lag-max"] = lag
    return note
