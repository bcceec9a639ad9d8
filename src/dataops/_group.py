"""Group commit: many threads, one fsync.

Each caller that needs its write durable calls `GroupSync.wait()` *after* writing.
If no sync is running, it becomes the leader: it syncs once for every write made so
far and wakes the others; callers that arrive during a sync wait for the next one
(their write may have missed the running one). Each caller returns only once a sync
that started after its write has finished, so "returned" means "durable".
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class GroupSync:
    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self._cond = threading.Condition(threading.Lock())
        self._tickets = 0  # writes announced
        self._done = 0  # writes known durable
        self._running = False
        self.syncs = 0  # how many syncs ran (for benchmarks and tests)

    def wait(self) -> None:
        with self._cond:
            self._tickets += 1
            mine = self._tickets
            while self._done < mine:
                if self._running:
                    self._cond.wait()
                    continue
                self._running, target = True, self._tickets
                self._cond.release()
                try:
                    self._sync()
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                self.syncs += 1
                self._done = max(self._done, target)
