"""Admission lanes: cheap calls and scans wait in separate queues.

Most calls are cheap: metadata (ListDatasets, DescribeDataset), estimates, budgets,
audit reads, subject evaluations and exact answers (a lookup in a protected table).
A DP RunQuery is a scan of the dataset's serving copy, which can take seconds on a
large dataset. Were both admitted by one count, a few huge scans would hold the slots
and every cheap call would wait (or be shed) behind them.

So a DP RunQuery (`is_scan`: decided from the method and the request's mode) waits
in the scan lane, and everything else is admitted by `ratelimit.Admission` as before
([limits] max_in_flight, max_in_flight_per_consumer). Only the engine run itself
waits: the interceptor counts a DP request against its consumer's cap when it
arrives (`ScanLane.join`) and hands the servicer a guard (`ScanLane.slot`) that the
request flow (`Sandbox.run`) holds around the engine alone. A request refused by its
grant, mode or budget, or answered again from the release store, never runs an
engine and never waits for a slot; were they to wait, a quarter of the DP traffic
would queue behind scans it does not need.

The lane admits by estimated cost, not by count alone: each scan weighs the rows of
its dataset (`ScanCosts`, from the Parquet footer, read once per data version), the
rows in flight are capped ([server] scan_rows_in_flight), so several small scans run
together while a huge one runs alone; at most [server] scan_slots run at once. A scan
that does not fit waits in a bounded FIFO queue ([server] scan_queue) for at most
[server] scan_queue_seconds or its client's deadline; beyond that it is refused
RESOURCE_EXHAUSTED (or DEADLINE_EXCEEDED) and audited like any other refusal. Its
budget was reserved before it waited, and is refunded: nothing was released.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow.parquet as pq

from dataops.catalog import Dataset
from dataops.errors import DeadlineExceeded, LimitExceeded, QuotaViolation
from dataops.v1 import query_pb2
from dataops.versions import inside_sandbox, stat_signature

# How often a queued scan looks whether its client is still there (a cancelled call
# must not hold its thread and queue place until the wait runs out).
_POLL_SECONDS = 0.2


def is_scan(method: str, request: Any) -> bool:
    """Whether the request scans data: a RunQuery in DP mode. Everything else is a
    lookup or reads no data (an estimate, exact answers from the protected tables)."""
    if method != "RunQuery" or request is None:
        return False
    mode = request.sql.mode if request.HasField("sql") else request.query.mode
    return bool(mode == query_pb2.QUERY_MODE_DP)


def scan_dataset(request: Any) -> str | None:
    """The dataset a structured query names; None for SQL (the name is in the text, and
    parsing it here would do the servicer's work twice)."""
    return None if request.HasField("sql") else request.query.dataset


class ScanCosts:
    """Estimated cost of a scan: its dataset's rows, from the Parquet footer.

    Read once per data version: the count is kept with the file's stat signature and
    read again only when the file changed. Only datasets the consumer may see count
    (`visible`), so a query naming another zone's dataset weighs as little as one
    naming none: admission says nothing about data the consumer cannot see. A SQL
    query weighs as the largest dataset the consumer may see (an upper bound).
    """

    def __init__(self, visible: Callable[[str], list[Dataset]]) -> None:
        self._visible = visible
        self._lock = threading.Lock()
        self._rows: dict[str, tuple[tuple[int, ...], int]] = {}  # dataset id -> (stat signature, rows)

    def __call__(self, consumer: str, request: Any) -> int:
        try:
            datasets = self._visible(consumer)
        except Exception:  # an unknown consumer, an invalid policy: the request is refused later
            return 1
        wanted = scan_dataset(request)
        if wanted is not None:
            datasets = [d for d in datasets if d.id == wanted]
        return max((self.rows(d) for d in datasets), default=1)

    def rows(self, dataset: Dataset) -> int:
        try:
            real = inside_sandbox(dataset)
            signature = stat_signature(os.stat(real))
        except Exception:  # unusable file: the request gets its real error from the engine
            return 1
        with self._lock:
            known = self._rows.get(dataset.id)
        if known is not None and known[0] == signature:
            return known[1]
        try:
            rows = max(1, pq.read_metadata(real).num_rows)
        except Exception:
            return 1
        with self._lock:
            self._rows[dataset.id] = (signature, rows)
        return rows


class ScanLane:
    """Scans admitted by estimated cost; see the module docstring.

    A DP request holds two things, taken at different times:

    * its consumer's place (`join`, given back with `part`), from the moment the
      interceptor parses it to its end: at most `per_consumer` DP requests per consumer
      are in flight, whether planning, waiting or running, so one consumer's flood of
      DP queries cannot take the threads another's need;
    * a slot (`take`, given back with `give`; `slot` is both as a context manager),
      only around the engine run itself. The cheap steps before it (plan, grant
      checks, the release store's lookup, the ledger's reservation) need none, so a
      refusal or a re-served release is answered while the lane is full.

    `enter`/`leave` take and give back both at once (a request that is all scan).
    A refusal raises what the interceptor answers and audits (LimitExceeded,
    DeadlineExceeded). Waiting scans are served in arrival order: a huge scan at the
    head is not overtaken forever by small ones.
    """

    def __init__(
        self,
        slots: int,
        rows_in_flight: int,
        queue: int,
        queue_seconds: float,
        per_consumer: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slots = slots
        self.rows_in_flight = rows_in_flight
        self.queue = queue
        self.queue_seconds = queue_seconds
        self.per_consumer = per_consumer
        self._clock = clock
        self._cond = threading.Condition()
        self._running = 0
        self._rows = 0
        self._waiting: deque[object] = deque()
        self._by_consumer: dict[str, int] = {}  # DP requests in flight, per consumer

    def weight(self, rows: int) -> int:
        # A scan heavier than the whole lane runs alone rather than never.
        return max(1, min(rows, self.rows_in_flight))

    def _fits(self, weight: int) -> bool:
        return self._running < self.slots and (
            self._running == 0 or self._rows + weight <= self.rows_in_flight
        )

    def join(self, consumer: str) -> None:
        """Count a DP request of `consumer` in flight, or refuse it (limits.concurrency)."""
        with self._cond:
            held = self._by_consumer.get(consumer, 0)
            if held >= self.per_consumer:
                raise LimitExceeded(
                    f"consumer {consumer!r} already has {self.per_consumer} DP queries in flight; "
                    "retry when one has finished",
                    rule="limits.concurrency",
                    quota_violations=(
                        QuotaViolation(f"consumer:{consumer}", "concurrent scans per consumer"),
                    ),
                )
            self._by_consumer[consumer] = held + 1

    def part(self, consumer: str) -> None:
        """The DP request `join` counted has ended."""
        with self._cond:
            held = self._by_consumer[consumer] - 1
            if held:
                self._by_consumer[consumer] = held
            else:
                del self._by_consumer[consumer]

    def take(
        self,
        rows: int,
        deadline: float | None = None,
        active: Callable[[], bool] = lambda: True,
    ) -> None:
        """Return once a scan of `rows` may run (a slot and its rows taken), or raise the refusal."""
        weight = self.weight(rows)
        with self._cond:
            if not self._waiting and self._fits(weight):
                self._admit(weight)
                return
            if len(self._waiting) >= self.queue:
                raise LimitExceeded(
                    f"the scan lane is full ({self.slots} DP queries running, {self.queue} waiting); retry later",
                    rule="limits.scan_lane",
                    quota_violations=(QuotaViolation("server", "DP queries queued"),),
                )
            ticket = object()
            self._waiting.append(ticket)
            give_up = self._clock() + self.queue_seconds
            try:
                while not (self._waiting[0] is ticket and self._fits(weight)):
                    now = self._clock()
                    # gRPC ends the call at its deadline (or when the client cancels):
                    # either way the client stopped waiting, and the place is given up.
                    if (deadline is not None and now >= deadline) or not active():
                        raise DeadlineExceeded(
                            "the client's deadline passed while the query waited for the scan lane; "
                            "nothing was run",
                            rule="deadline.scan_lane",
                        )
                    if now >= give_up:
                        raise LimitExceeded(
                            f"the query waited {self.queue_seconds:g} s for the scan lane; retry later",
                            rule="limits.scan_lane",
                            quota_violations=(QuotaViolation("server", "DP queries running"),),
                        )
                    until = give_up if deadline is None else min(give_up, deadline)
                    self._cond.wait(min(_POLL_SECONDS, max(0.0, until - now)))
            except BaseException:
                self._waiting.remove(ticket)
                self._cond.notify_all()  # the next in line may fit now
                raise
            self._waiting.popleft()
            self._admit(weight)
            self._cond.notify_all()  # the one behind may fit beside it

    def _admit(self, weight: int) -> None:
        self._running += 1
        self._rows += weight

    def give(self, rows: int) -> None:
        """The scan `take` admitted has finished: its slot and rows are free."""
        with self._cond:
            self._running -= 1
            self._rows -= self.weight(rows)
            self._cond.notify_all()

    @contextmanager
    def slot(
        self,
        rows: int,
        deadline: float | None = None,
        active: Callable[[], bool] = lambda: True,
    ) -> Iterator[None]:
        """A slot held while the body (the engine run) runs."""
        self.take(rows, deadline, active)
        try:
            yield
        finally:
            self.give(rows)

    def enter(
        self,
        consumer: str,
        rows: int,
        deadline: float | None = None,
        active: Callable[[], bool] = lambda: True,
    ) -> None:
        """`join` and `take` at once; an admitted scan must `leave` with the same consumer and rows."""
        self.join(consumer)
        try:
            self.take(rows, deadline, active)
        except BaseException:
            self.part(consumer)
            raise

    def leave(self, consumer: str, rows: int) -> None:
        self.give(rows)
        self.part(consumer)

    def state(self) -> tuple[int, int, int]:
        """(scans running, rows in flight, scans waiting): for tests and benchmarks."""
        with self._cond:
            return self._running, self._rows, len(self._waiting)
