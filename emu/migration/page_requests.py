"""The source's queue of urgent page requests (QEMU: RAMState.src_page_requests).

The return-path thread puts, the migration thread takes. The queue is also published to a small
shared array so the window can show what waits and for how long: [count, (page, time) x N].
"""

from __future__ import annotations

import collections
import threading

import numpy as np

SHOWN = 64  # entries published; the queue itself is unbounded


class PageRequestQueue:
    def __init__(self, buf: memoryview | None = None) -> None:
        self._q: collections.deque[tuple[int, float]] = collections.deque()
        self._lock = threading.Lock()
        self.nonempty = threading.Event()
        self.on_put = lambda: None  # after each put (x-main-nonblocking wakes its wait)
        self._pub = np.ndarray((1 + 2 * SHOWN,), np.float64, buffer=buf) if buf else None

    @staticmethod
    def nbytes() -> int:
        return 8 * (1 + 2 * SHOWN)

    def put(self, page: int, t: float) -> None:
        with self._lock:
            self._q.append((page, t))
            self.nonempty.set()
            self._publish()
        self.on_put()

    def pop(self) -> tuple[int, float] | None:
        with self._lock:
            if not self._q:
                return None
            item = self._q.popleft()
            if not self._q:
                self.nonempty.clear()
            self._publish()
            return item

    def __len__(self) -> int:
        return len(self._q)

    def clear(self) -> list[tuple[int, float]]:
        with self._lock:
            items = list(self._q)
            self._q.clear()
            self.nonempty.clear()
            self._publish()
            return items

    def _publish(self) -> None:
        if self._pub is None:
            return
        shown = list(self._q)[:SHOWN]
        self._pub[0] = 0  # readers ignore entries past the count while we rewrite them
        for i, (page, t) in enumerate(shown):
            self._pub[1 + 2 * i: 3 + 2 * i] = (page, t)
        self._pub[0] = len(shown)


def read_published(buf: memoryview) -> list[tuple[int, float]]:
    pub = np.ndarray((1 + 2 * SHOWN,), np.float64, buffer=buf)
    n = int(pub[0])
    return [(int(pub[1 + 2 * i]), float(pub[2 + 2 * i])) for i in range(n)]
