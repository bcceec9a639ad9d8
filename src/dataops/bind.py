"""Bind: a query's filters checked and typed once against the catalog, for every engine.

The IR (`dataops.ir`) holds values as the request sent them: a date may be an ISO
string, a float column's value an int. Planning binds the authorized query to its
dataset here, once: every filter value is checked against its column's catalog type
(a mismatch is the consumer's error, naming the field) and converted to that type.
Engines read the bound filters (`Plan.filters`) and never check a value again.

The message of a refusal is built from the request and the catalog only.
"""

from __future__ import annotations

from dataops.catalog import Dataset, typed_value
from dataops.errors import FieldViolation, InvalidQuery
from dataops.ir import Between, Equals, Filter, InSet, Scalar


def _typed(dataset: Dataset, column: str, value: Scalar, field_path: str) -> Scalar:
    ctype = dataset.columns[column].type
    typed = typed_value(value, ctype)
    if typed is None:
        description = f"{value!r} is not a {ctype.value} like column {column!r}"
        raise InvalidQuery(
            f"{field_path}: {description}",
            rule="query.value",
            column=column,
            field_violations=(FieldViolation(field_path, description),),
        )
    return typed


def bind_filters(dataset: Dataset, filters: tuple[Filter, ...]) -> tuple[Filter, ...]:
    """The filters with every value in its column's type; the first mismatch is refused."""
    bound: list[Filter] = []
    for i, f in enumerate(filters):
        path = f"query.filters[{i}]"
        if isinstance(f, Equals):
            bound.append(Equals(f.column, _typed(dataset, f.column, f.value, f"{path}.equals")))
        elif isinstance(f, InSet):
            values = tuple(_typed(dataset, f.column, v, f"{path}.in_set") for v in f.values)
            bound.append(InSet(f.column, values))
        elif isinstance(f, Between):
            low = None if f.low is None else _typed(dataset, f.column, f.low, f"{path}.range.low")
            high = None if f.high is None else _typed(dataset, f.column, f.high, f"{path}.range.high")
            bound.append(Between(f.column, low, high))
        else:  # the IR admits no other kind
            raise TypeError(f"not a filter: {f!r}")
    return tuple(bound)
