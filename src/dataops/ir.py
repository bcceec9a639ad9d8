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
from typing import Any

from dataops.errors import FieldViolation, InternalError, InvalidQuery

Scalar = str | int | float | bool | dt.date

# Shape limits that hold whatever the server's configuration says (its `[limits]` cap
# list lengths). Hostile input is refused here, before any name or value is echoed in
# an error message, stored in the audit log, or reaches an engine.
MAX_NAME_LENGTH = 128  # a dataset id, column name or alias
MAX_STRING_LENGTH = 1024  # a string filter value
# The most one query may spend. Beyond it DP noise protects nothing, and OpenDP's
# privacy maps overflow (they compute exp(epsilon)); a grant's budget is far smaller.
MAX_EPSILON = 100.0
# An aggregate's budget weight is relative; this keeps the ratio of two weights sane.
MAX_WEIGHT = 1e6
# The most rows per unit a query may state (catalog caps are far smaller).
MAX_ROWS_PER_UNIT = 2**31 - 1
# Automatic clipping's default quantile: money is heavy-tailed (in the demo claims the top
# 1% of claims carry a fifth of the total), so a lower one clips away too much.
AUTO_CLIP_QUANTILE = 0.999
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


Filter = Equals | InSet | Between


@dataclass(frozen=True)
class Aggregate:
    function: Function
    column: str | None = None
    quantile: float | None = None
    alias: str = ""
    # DP only: this aggregate's share of the query's epsilon, relative to the others'
    # (None: the default by kind, see dataops.engines.dp.default_weight).
    weight: float | None = None

    @property
    def name(self) -> str:
        """The output column name."""
        if self.alias:
            return self.alias
        if self.function is Function.QUANTILE:
            return f"q{round((self.quantile or 0) * 100):02d}_{self.column}"
        return f"{self.function.value}_{self.column}" if self.column else self.function.value

    @property
    def measured_column(self) -> str:
        """The column of a function that needs one (validation refuses such an aggregate without)."""
        if self.column is None:
            raise InternalError(f"{self.function.value} has no column")
        return self.column

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
        if self.weight is not None and not (
            isinstance(self.weight, (int, float))
            and math.isfinite(self.weight)
            and 0 < self.weight <= MAX_WEIGHT
        ):
            raise _invalid(f"{path}.weight", f"must be a number > 0 and at most {MAX_WEIGHT:g}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"function": self.function.value, "name": self.name}
        if self.column:
            out["column"] = self.column
        if self.function is Function.QUANTILE:
            out["quantile"] = self.quantile
        if self.weight is not None:
            out["weight"] = self.weight
        return out


@dataclass(frozen=True)
class MeasureTerms:
    """A DP query's own clipping terms for one measure, inside the catalog's.

    lower/upper None: the catalog's. auto_clip_share > 0: spend that share of the
    query's epsilon on a DP quantile (auto_clip_quantile) of the measure, and clip
    at it instead of `upper` (which must then be None). The terms are public: they
    are part of the canonical query. Whether they lie inside the catalog's bounds is
    checked against the catalog by the DP engine.
    """

    column: str
    lower: float | None = None
    upper: float | None = None
    auto_clip_share: float = 0.0
    auto_clip_quantile: float = AUTO_CLIP_QUANTILE

    def validate(self, path: str) -> None:
        _check_name(self.column, f"{path}.column")
        for end in ("lower", "upper"):
            value = getattr(self, end)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise _invalid(f"{path}.{end}", "must be a finite number")
        if self.lower is not None and self.upper is not None and self.lower > self.upper:
            raise _invalid(f"{path}.lower", "must not exceed upper")
        share, q = self.auto_clip_share, self.auto_clip_quantile
        if not (isinstance(share, (int, float)) and math.isfinite(share) and 0 <= share < 1):
            raise _invalid(f"{path}.auto_clip_share", "must lie in [0, 1)")
        if share and self.upper is not None:
            raise _invalid(f"{path}.upper", "automatic clipping chooses the upper bound; leave it unset")
        if not (isinstance(q, (int, float)) and math.isfinite(q) and 0 < q < 1):
            raise _invalid(f"{path}.auto_clip_quantile", "must lie strictly between 0 and 1")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"column": self.column}
        if self.lower is not None:
            out["lower"] = self.lower
        if self.upper is not None:
            out["upper"] = self.upper
        if self.auto_clip_share:
            out["auto_clip"] = {"share": self.auto_clip_share, "quantile": self.auto_clip_quantile}
        return out


@dataclass(frozen=True)
class Privacy:
    """How much a DP query may spend (an epsilon, or a target 95% half-width), and on what terms.

    max_rows_per_unit and measures tighten the catalog's contribution bound and clipping
    bounds for this query (None / empty: the catalog's). consistent asks for a table of
    non-negative integer counts and sums whose rows add up to a released total.
    """

    epsilon: float | None = None
    delta: float = 0.0
    target_half_width: float | None = None
    max_rows_per_unit: int | None = None
    measures: tuple[MeasureTerms, ...] = ()
    consistent: bool = False

    def terms_for(self, column: str) -> MeasureTerms | None:
        return next((m for m in self.measures if m.column == column), None)

    @property
    def auto_clipped(self) -> tuple[MeasureTerms, ...]:
        return tuple(m for m in self.measures if m.auto_clip_share)

    def validate(self, path: str) -> None:
        if self.epsilon is not None and self.target_half_width is not None:
            raise _invalid(path, "give epsilon or target_half_width, not both")
        if self.epsilon is None and self.target_half_width is None:
            raise _invalid(f"{path}.epsilon", "a DP query needs epsilon or target_half_width")
        if self.epsilon is not None and not (
            isinstance(self.epsilon, (int, float))
            and math.isfinite(self.epsilon)
            and 0 < self.epsilon <= MAX_EPSILON
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
        k = self.max_rows_per_unit
        if k is not None and not (
            isinstance(k, int) and not isinstance(k, bool) and 0 < k <= MAX_ROWS_PER_UNIT
        ):
            raise _invalid(
                f"{path}.max_rows_per_unit", f"must be a whole number > 0 and at most {MAX_ROWS_PER_UNIT}"
            )
        seen: set[str] = set()
        for i, terms in enumerate(self.measures):
            if not isinstance(terms, MeasureTerms):
                raise _invalid(f"{path}.measures[{i}]", "must be measure terms")
            terms.validate(f"{path}.measures[{i}]")
            if terms.column in seen:
                raise _invalid(f"{path}.measures[{i}].column", "states terms for a column twice")
            seen.add(terms.column)
        share = sum(m.auto_clip_share for m in self.measures)
        if share >= 1:
            raise _invalid(f"{path}.measures", "the automatic clipping shares add up to 1 or more")
        if share and self.target_half_width is not None:
            raise _invalid(f"{path}.target_half_width", "automatic clipping needs epsilon")
        if not isinstance(self.consistent, bool):
            raise _invalid(f"{path}.consistent", "must be true or false")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"delta": self.delta}
        if self.epsilon is not None:
            out["epsilon"] = self.epsilon
        if self.target_half_width is not None:
            out["target_half_width"] = self.target_half_width
        # Public terms of the release: another row bound or clip is another question.
        if self.max_rows_per_unit is not None:
            out["max_rows_per_unit"] = self.max_rows_per_unit
        if self.measures:
            out["measures"] = sorted((m.to_json() for m in self.measures), key=lambda m: m["column"])
        if self.consistent:
            out["consistent"] = True
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

    @property
    def dp_privacy(self) -> Privacy:
        """The privacy parameters of a DP query (validation refuses a DP query without them)."""
        if self.privacy is None:
            raise InternalError(f"a {self.mode.value} query has no privacy parameters")
        return self.privacy

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
            for i, terms in enumerate(self.privacy.measures):
                if not any(a.column == terms.column for a in self.aggregates):
                    raise _invalid(f"query.privacy.measures[{i}].column", "is not a measure of this query")
        elif self.privacy is not None:
            raise _invalid("query.privacy", "privacy parameters apply to DP queries only")
        if self.mode is not Mode.DP and any(a.weight is not None for a in self.aggregates):
            raise _invalid("query.aggregates", "budget weights apply to DP queries only")
        object.__setattr__(
            self, "_canonical", json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        )

    @property
    def columns(self) -> set[str]:
        used = set(self.group_by) | {f.column for f in self.filters}
        return used | {a.column for a in self.aggregates if a.column}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataset": self.dataset,
            "mode": self.mode.value,
            # Filters combine with AND, so their order carries no meaning.
            "filters": sorted(
                (f.to_json() for f in self.filters), key=lambda f: json.dumps(f, sort_keys=True)
            ),
            "group_by": list(self.group_by),
            "aggregates": [a.to_json() for a in self.aggregates],
        }
        if self.privacy is not None:
            out["privacy"] = self.privacy.to_json()
        return out

    def canonical(self) -> str:
        return self._canonical
