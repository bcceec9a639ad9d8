"""The subject engine: one subject's declared outputs from a layout keyed by subject.

A scan of 10M claim rows for one person's rows takes tens of milliseconds even in
polars; a consented evaluation must take about a millisecond. So once per data
version each dataset that subject products read is laid out by subject:

    state/subjects/<dataset>-<fingerprint[:16]>-<columns[:8]>/rows.arrow    the columns the
        products read, sorted by subject, encoded for numpy (categories as int16 codes
        of the catalog key set, dates as int32 days, numbers as float64; no nulls)
    state/subjects/<...>/index.arrow    each subject once (fixed-width, sorted) with the
        first row it owns; the next subject's first row ends its range

Both are Arrow IPC files (a maintained, language-neutral format) read through a
memory map, so opening a layout costs nothing and the page cache holds the hot part;
a lookup is a binary search over the index (`numpy.searchsorted`) and a slice of a few
rows.

Bounded memory at any size: the build sorts at most about `PIECE_ROWS` rows at a time.
Past that, the subjects are split into ranges at quantiles of a sample of their ids
(the rows written to their ranges on disk in one pass, under the layouts' directory,
and removed after). Each range is sorted alone and written as one record batch of both
files (batch k of the index holds the subjects of batch k of the rows, `start` counted
within it). A subject's rows never span two ranges, and the ranges are in id order, so
a lookup first picks the batch by its first id, then searches within it.

`benchmarks/bench_subject.py` compares it with a polars filter scan of the same
Parquet and with sorted Parquet read by row group.

A layout is built into a temporary directory and renamed into place, under a
per-dataset lock (concurrent first evaluations wait for one build); its metadata says
which dataset, fingerprint and columns it holds and is checked before use.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc

from dataops._fs import remove_stale
from dataops.catalog import ColumnType, Dataset
from dataops.engines._base import AggregateAccuracy, EngineEstimate, PrivacyLoss
from dataops.engines.children import (
    ALLOCATOR_LAZY,
    DEFAULT_MEMORY_LIMIT_BYTES,
    Children,
    entry_request,
    rows_if_reloadable,
)
from dataops.engines.prepared import Fingerprints
from dataops.errors import InternalError
from dataops.products.subject import Output, OutputFunction, SubjectProduct

log = logging.getLogger(__name__)

LAYOUT_VERSION = "2"  # 2: one record batch per range of subjects
# Rows sorted at once when laying out: 10M claim rows with their string ids sort in
# about 1.5 GiB; more would grow with the dataset.
PIECE_ROWS = 4_000_000
# Past this many rows a layout is built in a memory-capped child (`subject_build`), where it is
# cut into ranges anyway; the cap is the serving copies' ([server] copy_memory_limit_mib).
CHILD_ROWS = PIECE_ROWS
_SAMPLE_ROWS = 200_000  # ids sampled to place the ranges' bounds
_NO_DATE = np.iinfo(np.int32).min  # a null date: outside every window
_NO_CODE = -1  # a null or unknown category: matches no key set

Value = int | float | bool | str | None


@dataclass(frozen=True)
class Evaluation:
    """One subject's outputs, and what they were computed on."""

    product: str
    data_version: str  # the dataset fingerprint
    evaluation_date: dt.date
    outputs: tuple[tuple[str, Value], ...]

    def digest(self) -> str:
        """SHA-256 of the outputs and their context: what the audit log keeps instead of values."""
        material = {
            "product": self.product,
            "data_version": self.data_version,
            "evaluation_date": self.evaluation_date.isoformat(),
            "outputs": list(self.outputs),
        }
        return hashlib.sha256(
            json.dumps(material, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()


def months_before(day: dt.date, months: int) -> dt.date:
    """The same day `months` calendar months earlier (clamped to the month's end)."""
    total = day.year * 12 + (day.month - 1) - months
    year, month = divmod(total, 12)
    month += 1
    for d in (day.day, 30, 29, 28):
        try:
            return dt.date(year, month, min(d, day.day))
        except ValueError:
            continue
    raise InternalError(f"no day in {year}-{month}")  # unreachable: every month has 28 days


_EPOCH = dt.date(1970, 1, 1)


def _days(day: dt.date) -> int:
    return (day - _EPOCH).days


class SubjectLayout:
    """A dataset's rows grouped by subject, memory-mapped; see the module docstring."""

    def __init__(self, directory: Path, dataset: Dataset, fingerprint: str) -> None:
        self.directory = directory
        self.dataset = dataset
        self.fingerprint = fingerprint
        rows = ipc.open_file(pa.memory_map(str(directory / "rows.arrow")))
        index = ipc.open_file(pa.memory_map(str(directory / "index.arrow")))
        meta = {k.decode(): v.decode() for k, v in (rows.schema.metadata or {}).items()}
        if (
            meta.get("dataops.subjects.fingerprint") != fingerprint
            or meta.get("dataops.subjects.dataset") != dataset.id
            or rows.num_record_batches != index.num_record_batches
        ):
            raise InternalError(f"{directory} is not the layout of {dataset.id} at {fingerprint[:16]}")
        self.width = index.schema.field("subject").type.byte_width
        # Per range of subjects: its ids, each one's first row, and its rows' columns,
        # all zero-copy views of the memory map.
        self.pieces: list[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], int]] = []
        for k in range(rows.num_record_batches):
            batch, ids_batch = rows.get_batch(k), index.get_batch(k)
            ids = ids_batch.column(0)
            if not len(ids):
                continue
            view = np.frombuffer(
                ids.buffers()[1], dtype=f"S{self.width}", count=len(ids), offset=ids.offset * self.width
            )
            columns = {
                name: batch.column(i).to_numpy(zero_copy_only=True)
                for i, name in enumerate(batch.schema.names)
            }
            starts = ids_batch.column(1).to_numpy(zero_copy_only=True)
            self.pieces.append((view, starts, columns, batch.num_rows))
        self.firsts = np.array([piece[0][0] for piece in self.pieces], dtype=f"S{self.width}")
        self.row_count = sum(piece[3] for piece in self.pieces)
        self._none = (
            {name: np.empty(0, rows.schema.field(name).type.to_pandas_dtype()) for name in rows.schema.names},
            0,
        )

    def rows_of(self, subject: str) -> tuple[dict[str, np.ndarray], int]:
        """The subject's rows, column by column, and how many (none: empty columns, 0)."""
        key = subject.encode()
        if len(key) > self.width or key.endswith(b"\0"):
            return self._none  # cannot be stored: no rows (and the same answer as any absent subject)
        k = int(np.searchsorted(self.firsts, key, side="right")) - 1
        if k < 0:
            return self._none
        ids, starts, columns, count = self.pieces[k]
        i = int(np.searchsorted(ids, key))
        if i >= len(ids) or ids[i] != key:
            return self._none
        start = int(starts[i])
        end = int(starts[i + 1]) if i + 1 < len(starts) else count
        return {name: values[start:end] for name, values in columns.items()}, end - start

    def evaluate(self, product: SubjectProduct, subject: str, today: dt.date) -> Evaluation:
        rows, count = self.rows_of(subject)
        values: list[tuple[str, Value]] = []
        for output in product.outputs:
            values.append((output.name, self._output(output, rows, count, today)))
        if product.scorecard is not None:
            card = product.scorecard
            by_name = dict(values)
            points = card.base
            for name, table in card.points:
                output = next(o for o in product.outputs if o.name == name)
                value = by_name[name]
                if value is None:
                    continue  # no rows: the band is unknown and scores nothing
                if output.function is OutputFunction.ANY_IN:
                    points += table[1 if value else 0]
                else:
                    points += table[output.band_labels.index(value)]
            values.append((f"{card.name}_points", float(points)))
            values.append((card.name, card.grading.label(points)))
        return Evaluation(product.id, self.fingerprint, today, tuple(values))

    def _output(self, output: Output, rows: dict[str, np.ndarray], count: int, today: dt.date) -> Value:
        mask = np.ones(count, dtype=bool)
        for column, codes in self._codes(output.where):
            mask &= _among(rows[column], codes)
        if output.window is not None:
            dates = rows[output.window.column]
            cutoff = _days(months_before(today, output.window.months))
            mask &= (dates > cutoff) & (dates <= _days(today)) & (dates != _NO_DATE)
        function = output.function
        value: Value
        if function is OutputFunction.COUNT:
            value = int(mask.sum())
        elif function is OutputFunction.SUM:
            chosen = rows[output.measured_column][mask]
            total = float(np.nansum(chosen)) if chosen.size else 0.0
            integer = self.dataset.columns[output.measured_column].type is ColumnType.INT
            value = int(round(total)) if integer else total
        elif function is OutputFunction.MAX:
            chosen = rows[output.measured_column][mask]
            chosen = chosen[~np.isnan(chosen)]
            if not chosen.size:
                return None  # no rows: no maximum (and no band)
            top = float(chosen.max())
            integer = self.dataset.columns[output.measured_column].type is ColumnType.INT
            value = int(top) if integer else top
        elif function is OutputFunction.ANY_IN:
            codes = self._key_codes(output.measured_column, output.values)
            return bool(_among(rows[output.measured_column][mask], codes).any())
        elif function is OutputFunction.MONTHS_WITH:
            days = rows[output.measured_column][mask]
            days = days[days != _NO_DATE]
            months = days.astype("datetime64[D]").astype("datetime64[M]")
            value = int(np.unique(months).size)
        else:  # pragma: no cover - the loader admits only the functions above
            raise InternalError(f"unknown output function {function}")
        if output.banding is not None:
            return output.banding.label(value)
        return value

    def _key_codes(self, column: str, values: tuple[str, ...]) -> tuple[int, ...]:
        keys = self.dataset.columns[column].key_set
        return tuple(keys.index(v) for v in values)

    def _codes(self, where: tuple[tuple[str, tuple[str, ...]], ...]) -> Iterable[tuple[str, tuple[int, ...]]]:
        for column, values in where:
            yield column, self._key_codes(column, values)


def _ranges(dataset: Dataset, scan: pl.LazyFrame, rows: int, scratch: Path) -> Iterable[pl.LazyFrame]:
    """`scan` cut into ranges of subjects of about `PIECE_ROWS` rows each, in id order
    (one range, the whole scan, when it is no bigger; always at least one, for the schema).
    The bounds are quantiles of a sample of the ids, so no subject spans two ranges. The
    dataset's rows are first split into the ranges on disk under `scratch` in one pass
    (the serving copies' bounded partitioner), each range then read back alone."""
    from dataops.engines.build import partition

    unit = dataset.unit_column
    pieces = -(-rows // PIECE_ROWS)
    if pieces <= 1:
        yield scan
        return
    sample = (
        scan.select(unit)
        .gather_every(max(1, rows // _SAMPLE_ROWS))
        .unique()
        .sort(unit)
        .collect(engine="streaming")[unit]
    )
    bounds = np.array(
        sorted(set(sample.gather([len(sample) * k // pieces for k in range(1, pieces)]).to_list()))
    )

    def assign(units: pl.Series) -> pl.Series:
        # A missing id sorts first; the bucket's scan drops it, as the layout does.
        ids = units.cast(pl.String).fill_null("").to_numpy().astype(str)
        return pl.Series(np.searchsorted(bounds, ids, side="right").astype(np.int64))

    directory = Path(tempfile.mkdtemp(dir=scratch, prefix=".ranges."))
    try:
        columns = sorted(set(scan.collect_schema().names()) - {unit})
        for files in partition(dataset.path, unit, columns, len(bounds) + 1, directory, 0, assign):
            yield _layout_scan(dataset, pl.scan_parquet(files), columns)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _layout_scan(dataset: Dataset, source: pl.LazyFrame, columns) -> pl.LazyFrame:
    """The rows as a layout stores them: the subject id, then each column encoded."""
    unit = dataset.unit_column
    return source.select(
        pl.col(unit).cast(pl.String), *[_encoded(dataset, c).alias(c) for c in columns]
    ).filter(pl.col(unit).is_not_null())


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    """A table as one record batch (its columns contiguous, as the reader's views need)."""
    if not table.num_rows:
        return pa.RecordBatch.from_pylist([], schema=table.schema)
    return table.combine_chunks().to_batches(max_chunksize=table.num_rows)[0]


def _among(values: np.ndarray, codes: tuple[int, ...]) -> np.ndarray:
    """values ∈ codes, for the few codes of a key set (np.isin costs more than the rows)."""
    mask = values == codes[0]
    for code in codes[1:]:
        mask |= values == code
    return mask


def _encoded(dataset: Dataset, name: str) -> pl.Expr:
    """A column as the layout stores it (see the module docstring)."""
    spec = dataset.columns[name]
    col = pl.col(name)
    if spec.keys:
        mapping = {key: i for i, key in enumerate(spec.keys)}
        return (
            col.cast(pl.String)
            .replace_strict(mapping, default=_NO_CODE, return_dtype=pl.Int16)
            .fill_null(_NO_CODE)
        )
    if spec.type is ColumnType.DATE:
        return col.cast(pl.Date).cast(pl.Int32).fill_null(_NO_DATE)
    if spec.type.numeric or spec.type is ColumnType.BOOL:
        return col.cast(pl.Float64).fill_null(float("nan"))
    raise InternalError(
        f"column {name!r} of {dataset.id} cannot be laid out ({spec.type.value} without keys)"
    )


class SubjectLayouts:
    """Layouts of every dataset subject products read, one per data version."""

    def __init__(
        self,
        state_dir: Path,
        products: Iterable[SubjectProduct],
        fingerprints: Fingerprints,
        memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
        child_rows: int | None = None,
    ) -> None:
        self.directory = Path(state_dir) / "subjects"
        self.fingerprints = fingerprints
        self.memory_limit_bytes = memory_limit_bytes
        self.child_rows = CHILD_ROWS if child_rows is None else child_rows
        self._children = Children()
        self.last_build: dict | None = None  # the last child's stats (seconds, peak_rss_bytes)
        self.columns: dict[str, tuple[str, ...]] = {}
        self.datasets: dict[str, Dataset] = {}
        for product in products:
            used = set(self.columns.get(product.dataset.id, ())) | product.columns
            self.columns[product.dataset.id] = tuple(sorted(used))
            self.datasets[product.dataset.id] = product.dataset
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._ready: dict[str, SubjectLayout] = {}

    def current(self, dataset: Dataset) -> SubjectLayout:
        """The layout of the dataset's current version, built first if there is none."""
        fingerprint = self.fingerprints.of(dataset)
        with self._guard:
            ready = self._ready.get(dataset.id)
        if ready is not None and ready.fingerprint == fingerprint:
            return ready
        with self._guard:
            lock = self._locks.setdefault(dataset.id, threading.Lock())
        with lock:
            with self._guard:
                ready = self._ready.get(dataset.id)
            if ready is not None and ready.fingerprint == fingerprint:
                return ready
            directory = self._path(dataset, fingerprint)
            if not self._valid(directory, dataset, fingerprint):
                self._build(dataset, fingerprint, directory)
            layout = SubjectLayout(directory, dataset, fingerprint)
            with self._guard:
                self._ready[dataset.id] = layout
            self._remove_old(dataset, keep=directory)
            return layout

    def warm(self) -> threading.Thread:
        """Build every layout in the background, so the first evaluation need not wait."""

        def build_all() -> None:
            for dataset in self.datasets.values():
                try:
                    self.current(dataset)
                except Exception:  # the first evaluation builds again and reports the error
                    log.exception("could not lay out %s by subject", dataset.id)

        thread = threading.Thread(target=build_all, name="dataops-subjects", daemon=True)
        thread.start()
        return thread

    def _path(self, dataset: Dataset, fingerprint: str) -> Path:
        columns = hashlib.sha256(json.dumps(self.columns[dataset.id]).encode()).hexdigest()[:8]
        return self.directory / f"{dataset.id}-{fingerprint[:16]}-{columns}"

    def _metadata(self, dataset: Dataset, fingerprint: str) -> dict[str, str]:
        return {
            "dataops.subjects.layout": LAYOUT_VERSION,
            "dataops.subjects.dataset": dataset.id,
            "dataops.subjects.fingerprint": fingerprint,
            "dataops.subjects.columns": json.dumps(self.columns[dataset.id]),
        }

    def _valid(self, directory: Path, dataset: Dataset, fingerprint: str) -> bool:
        try:
            with pa.memory_map(str(directory / "rows.arrow")) as source:
                schema = ipc.open_file(source).schema
            found = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
            return (directory / "index.arrow").exists() and all(
                found.get(k) == v for k, v in self._metadata(dataset, fingerprint).items()
            )
        except (OSError, pa.ArrowInvalid):
            return False

    def _build(self, dataset: Dataset, fingerprint: str, directory: Path) -> None:
        """Lay the dataset out: in a memory-capped child past `CHILD_ROWS` rows
        (`dataops.engines.subject_build`: the build's pages go when it exits), else here."""
        self.directory.mkdir(parents=True, exist_ok=True)
        # What a crashed build of any dataset left: its ranges (raw rows) and its output.
        for pattern in (".ranges.*", f".{dataset.id}-*.tmp"):
            remove_stale(self.directory, pattern)
        if not self._in_child(dataset):
            self._lay_out(dataset, fingerprint, directory)
            return
        request = {
            **entry_request(dataset),
            "columns": list(self.columns[dataset.id]),
            "fingerprint": fingerprint,
            "state": str(self.directory.parent),
            "directory": str(directory),
            "memory_limit_bytes": self.memory_limit_bytes,
        }
        self.last_build = self._children.run(
            "dataops.engines.subject_build",
            request,
            f"the {dataset.id} layout",
            self.memory_limit_bytes,
            ALLOCATOR_LAZY,
        )
        log.info(
            "laid out %s by subject in a child: %.1f s, peak %.2f GiB",
            dataset.id,
            self.last_build["seconds"],
            self.last_build["peak_rss_bytes"] / 2**30,
        )

    def _in_child(self, dataset: Dataset) -> bool:
        """Large enough to be worth a child, and loaded from a catalog entry a child can load again."""
        rows = rows_if_reloadable(dataset)
        return rows is not None and rows > self.child_rows

    def close(self, timeout: float = 30.0) -> None:
        """Kill a layout build running in a child (the server is stopping)."""
        self._children.kill(timeout)

    def _lay_out(self, dataset: Dataset, fingerprint: str, directory: Path) -> None:
        unit = dataset.unit_column
        temporary = self.directory / f".{directory.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp"
        temporary.mkdir()
        try:
            columns = self.columns[dataset.id]
            scan = _layout_scan(dataset, pl.scan_parquet(dataset.path), columns)
            # One pass for both: how many rows (to cut them into ranges) and the longest id.
            rows, longest = (
                scan.select(pl.len(), pl.col(unit).str.len_bytes().max()).collect(engine="streaming").row(0)
            )
            width = max(1, longest if isinstance(longest, int) else 1)  # None: no subjects
            metadata = self._metadata(dataset, fingerprint)
            rows_schema = index_schema = None
            subjects = rows_written = 0
            with (
                pa.OSFile(str(temporary / "rows.arrow"), "wb") as rows_sink,
                pa.OSFile(str(temporary / "index.arrow"), "wb") as index_sink,
            ):
                rows_writer = index_writer = None
                for piece in _ranges(dataset, scan, int(rows), self.directory):
                    frame = piece.sort(unit, maintain_order=True).collect(engine="streaming")
                    index = (
                        frame.select(unit)
                        .with_row_index("start")
                        .group_by(unit, maintain_order=True)
                        .agg(pl.col("start").first())
                    )
                    ids = index[unit]
                    # numpy "S" pads with NULs, which no stored id ends with (`rows_of` refuses such ids).
                    packed = np.array(ids.to_list(), dtype=f"S{width}").tobytes()
                    fixed = pa.FixedSizeBinaryArray.from_buffers(
                        pa.binary(width), len(ids), [None, pa.py_buffer(packed)]
                    )
                    rows = frame.drop(unit).to_arrow().replace_schema_metadata(metadata)
                    index_table = pa.table(
                        {"subject": fixed, "start": pa.array(index["start"].cast(pl.Int64).to_numpy())},
                        metadata=metadata,
                    )
                    if rows_writer is None or index_writer is None:
                        rows_schema, index_schema = rows.schema, index_table.schema
                        rows_writer = ipc.new_file(rows_sink, rows_schema)
                        index_writer = ipc.new_file(index_sink, index_schema)
                    # One record batch per range: a subject's rows are contiguous in one batch.
                    rows_writer.write_batch(_one_batch(rows.cast(rows_schema)))
                    index_writer.write_batch(_one_batch(index_table.cast(index_schema)))
                    subjects += len(ids)
                    rows_written += frame.height
                    del frame, index, rows, index_table
                assert rows_writer is not None and index_writer is not None
                rows_writer.close()
                index_writer.close()
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(temporary, directory)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        log.info("laid out %s by subject: %d rows, %d subjects", dataset.id, rows_written, subjects)

    def _remove_old(self, dataset: Dataset, keep: Path) -> None:
        pattern = re.compile(rf"{re.escape(dataset.id)}-[0-9a-f]{{16}}-[0-9a-f]{{8}}")
        for old in self.directory.glob(f"{dataset.id}-*"):
            if old != keep and old.is_dir() and pattern.fullmatch(old.name):
                shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class SubjectPlan:
    """One consented evaluation: the product, the subject, and the day it is evaluated on.

    Made only once the consent has been verified (`dataops.subjects.Evaluator`)."""

    product: SubjectProduct
    subject: str
    day: dt.date


class SubjectEngine:
    """The `Engine` protocol over subject layouts: estimate → cost and accuracy, release → outputs.

    An evaluation spends no privacy budget: it is released under the subject's consent
    (whose uses the consent store counts), not under differential privacy, and its
    outputs are exact.
    """

    spends = False

    def __init__(self, layouts: SubjectLayouts) -> None:
        self.layouts = layouts

    def estimate(self, plan: SubjectPlan) -> EngineEstimate:
        return EngineEstimate(
            PrivacyLoss.zero(),
            tuple(AggregateAccuracy(o.name, mechanism="exact") for o in plan.product.outputs),
        )

    def release(
        self, plan: SubjectPlan, estimate: EngineEstimate | None = None, deadline: float | None = None
    ) -> Evaluation:
        return self.layouts.current(plan.product.dataset).evaluate(plan.product, plan.subject, plan.day)
