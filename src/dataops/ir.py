"""The query IR: frozen, validated descriptions of one question about one dataset.

Built from protobuf by the servicers (`dataops.wire`), by the Python client and by
the CLI. Construction validates shape only (a SUM needs a column, a quantile lies in
(0, 1), numbers are finite, names and strings are bounded, one query spends at most
`MAX_EPSILON`); whether the consumer may ask it is `dataops.authorize`'s business,
and whether the columns exist is checked against the catalog there too. Whatever a
request holds, a bad query becomes an `InvalidQuery` with a field violation here.

`Query.canonical()` is the one textual form of a query: it goes into the audit log
and keys DP release reuse, so two queries that mean the same thing share it.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Union

from dataops.errors import FieldViolation, InvalidQuery

Scalar = Union[str, int, float, bool, dt.date]

# Shape limits that hold whatever the server's configuration says (its `[limits]` cap
# list lengths). Hostile input is refused here, before any name or value is echoed in
# an error message, stored in the audit log, or reaches an engine.
MAX_NAME_LENGTH = 128  # a dataset id, column name or alias
MAX_STRING_LENGTH = 1024  # a string filter value
# The most one query may spend. Beyond it DP noise protects nothing, and OpenDP's
# privacy maps overflow (they compute exp(epsilon)); a grant's budget is far smaller.
MAX_EPSILON = 100.0
# Output names starting with these are the engines' own working columns.
RESERVED_PREFIXES = ("_", "#")


class Function(str, Enum):
    COUNT = "count"
    COUNT_UNITS = "count_units"
    SUM = "sum"
    MEAN = "mean"
    QUANTILE = "quantile"

    @property
    def needs_column(self) -> bool:
        return self in (Function.SUM, Function.MEAN, Function.QUANTILE)


class Mode(str, Enum):
    AGGREGATE = "aggregate"
    DP = "dp"


def _invalid(field_path: str, description: str) -> InvalidQuery:
    return InvalidQuery(
        f"{field_path}: {description}",
        field_violations=(FieldViolation(field_path, description),),
    )


def _check_scalar(value: Any, field_path: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise _invalid(field_path, "must be a finite number")
    if not isinstance(value, (str, int, float, bool, dt.date)):
        raise _invalid(field_path, f"unsupported value type {type(value).__name__}")
    if isinstance(value, str) and len(value) > MAX_STRING_LENGTH:
        raise _invalid(field_path, f"is longer than {MAX_STRING_LENGTH} characters")


def _check_name(name: Any, field_path: str, missing: str = "must name a column") -> None:
    """A dataset, column or alias name: a non-empty, printable string of bounded length.

    The message never repeats an oversized or unprintable name: it would only bloat
    the error (gRPC trailers are limited) and the audit record.
    """
    if not isinstance(name, str) or not name:
        raise _invalid(field_path, missing)
    if len(name) > MAX_NAME_LENGTH:
        raise _invalid(field_path, f"is longer than {MAX_NAME_LENGTH} characters")
    if not name.isprintable():
        raise _invalid(field_path, "must not contain control characters")


def _scalar_json(value: Scalar) -> Any:
    return value.isoformat() if isinstance(value, dt.date) else value


@dataclass(frozen=True)
class Equals:
    column: str
    value: Scalar

    def validate(self, path: str) -> None:
        _check_scalar(self.value, f"{path}.equals")

    def to_json(self) -> dict[str, Any]:
        return {"column": self.column, "equals": _scalar_json(self.value)}


@dataclass(frozen=True)
class InSet:
    column: str
    values: tuple[Scalar, ...]

    def validate(self, path: str) -> None:
        if not self.values:
            raise _invalid(f"{path}.in_set", "needs at least one value")
        for i, value in enumerate(self.values):
            _check_scalar(value, f"{path}.in_set.values[{i}]")

    def to_json(self) -> dict[str, Any]:
        # Set semantics: order and repeats do not change the meaning.
        values = sorted({_scalar_json(v) for v in self.values}, key=lambda v: (type(v).__name__, v))
        return {"column": self.column, "in": values}


@dataclass(frozen=True)
class Between:
    """low <= column <= high; a missing end is open."""

    column: str
    low: Scalar | None = None
    high: Scalar | None = None

    def validate(self, path: str) -> None:
        if self.low is None and self.high is None:
            raise _invalid(f"{path}.range", "needs a low or a high end")
        for end in ("low", "high"):
            value = getattr(self, end)
            if value is not None:
                _check_scalar(value, f"{path}.range.{end}")
        if self.low is not None and self.high is not None:
            try:
                reversed_ = self.low > self.high  # type: ignore[operator]
            except TypeError:
                raise _invalid(f"{path}.range", "low and high must be of the same type") from None
            if reversed_:
                raise _invalid(f"{path}.range", "low must not exceed high")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"column": self.column}
        if self.low is not None:
            out["low"] = _scalar_json(self.low)
        if self.high is not None:
            out["high"] = _scalar_json(self.high)
        return out


Filter = Union[Equals, InSet, Between]


@dataclass(frozen=True)
class Aggregate:
    function: Function
    column: str | None = None
    quantile: float | None = None
    alias: str = ""

    @property
    def name(self) -> str:
        """The output column name."""
        if self.alias:
            return self.alias
        if self.function is Function.QUANTILE:
            return f"q{round((self.quantile or 0) * 100):02d}_{self.column}"
        return f"{self.function.value}_{self.column}" if self.column else self.function.value

    def validate(self, path: str) -> None:
        if not isinstance(self.function, Function):
            raise _invalid(f"{path}.function", "an aggregate function is required")
        if self.column:
            _check_name(self.column, f"{path}.column")
        if self.alias:
            _check_name(self.alias, f"{path}.alias")
            if self.alias.startswith(RESERVED_PREFIXES):
                raise _invalid(f"{path}.alias", f"must not start with {' or '.join(RESERVED_PREFIXES)}")
        if self.function.needs_column and not self.column:
            raise _invalid(f"{path}.column", f"{self.function.value} needs a measure column")
        if not self.function.needs_column and self.column:
            raise _invalid(f"{path}.column", f"{self.function.value} takes no column")
        if self.function is Function.QUANTILE:
            q = self.quantile
            if q is None or not math.isfinite(q) or not 0 < q < 1:
                raise _invalid(f"{path}.quantile", "must lie strictly between 0 and 1")
        elif self.quantile:
            raise _invalid(f"{path}.quantile", "only a quantile aggregate takes a quantile")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"function": self.function.value, "name": self.name}
        if self.column:
            out["column"] = self.column
        if self.function is Function.QUANTILE:
            out["quantile"] = self.quantile
        return out


@dataclass(frozen=True)
class Privacy:
    """How much a DP query may spend: an epsilon, or a target 95% half-width."""

    epsilon: float | None = None
    delta: float = 0.0
    target_half_width: float | None = None

    def validate(self, path: str) -> None:
        if self.epsilon is not None and self.target_half_width is not None:
            raise _invalid(path, "give epsilon or target_half_width, not both")
        if self.epsilon is None and self.target_half_width is None:
            raise _invalid(f"{path}.epsilon", "a DP query needs epsilon or target_half_width")
        if self.epsilon is not None and not (
            isinstance(self.epsilon, (int, float)) and math.isfinite(self.epsilon) and 0 < self.epsilon <= MAX_EPSILON
        ):
            raise _invalid(f"{path}.epsilon", f"must be a number > 0 and at most {MAX_EPSILON:g}")
        if not (isinstance(self.delta, (int, float)) and math.isfinite(self.delta) and 0 <= self.delta < 1):
            raise _invalid(f"{path}.delta", "must lie in [0, 1)")
        if self.target_half_width is not None and not (
            isinstance(self.target_half_width, (int, float))
            and math.isfinite(self.target_half_width)
            and self.target_half_width > 0
        ):
            raise _invalid(f"{path}.target_half_width", "must be a finite number > 0")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"delta": self.delta}
        if self.epsilon is not None:
            out["epsilon"] = self.epsilon
        if self.target_half_width is not None:
            out["target_half_width"] = self.target_half_width
        return out


@dataclass(frozen=True)
class Query:
    dataset: str
    aggregates: tuple[Aggregate, ...]
    filters: tuple[Filter, ...] = ()
    group_by: tuple[str, ...] = ()
    mode: Mode = Mode.AGGREGATE
    privacy: Privacy | None = None
    # Not part of the canonical form: the purpose does not change the answer.
    purpose: str = ""
    _canonical: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_name(self.dataset, "query.dataset", missing="is required")
        if self.purpose:
            _check_name(self.purpose, "query.purpose")
        if not isinstance(self.mode, Mode):
            raise _invalid("query.mode", "QUERY_MODE_AGGREGATE or QUERY_MODE_DP is required")
        if not self.aggregates:
            raise _invalid("query.aggregates", "a query needs at least one aggregate")
        for i, aggregate in enumerate(self.aggregates):
            aggregate.validate(f"query.aggregates[{i}]")
        for i, filter_ in enumerate(self.filters):
            if not isinstance(filter_, (Equals, InSet, Between)):
                raise _invalid(f"query.filters[{i}]", "a filter needs equals, in_set or range")
            _check_name(filter_.column, f"query.filters[{i}].column", missing="is required")
            filter_.validate(f"query.filters[{i}]")
        for i, column in enumerate(self.group_by):
            _check_name(column, f"query.group_by[{i}]")
        if len(set(self.group_by)) != len(self.group_by):
            raise _invalid("query.group_by", "names a column twice")
        # Counted, not names.count(n) per name: that is quadratic, and a request may
        # carry hundreds of thousands of aggregates before the configured limits apply.
        names = Counter(a.name for a in self.aggregates)
        clash = sorted(set(names) & set(self.group_by) | {n for n, times in names.items() if times > 1})
        if clash:
            raise _invalid("query.aggregates", f"output column {clash[0]!r} is produced twice; set an alias")
        if self.mode is Mode.DP:
            if self.privacy is None:
                raise _invalid("query.privacy", "a DP query needs privacy parameters")
            self.privacy.validate("query.privacy")
        elif self.privacy is not None:
            raise _invalid("query.privacy", "privacy parameters apply to DP queries only")
        object.__setattr__(self, "_canonical", json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")))

    @property
    def columns(self) -> set[str]:
        used = set(self.group_by) | {f.column for f in self.filters}
        return used | {a.column for a in self.aggregates if a.column}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataset": self.dataset,
            "mode": self.mode.value,
            # Filters combine with AND, so their order carries no meaning.
            "filters": sorted((f.to_json() for f in self.filters), key=lambda f: json.dumps(f, sort_keys=True)),
            "group_by": list(self.group_by),
            "aggregates": [a.to_json() for a in self.aggregates],
        }
        if self.privacy is not None:
            out["privacy"] = self.privacy.to_json()
        return out

    def canonical(self) -> str:
        return self._canonical
