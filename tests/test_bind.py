"""The bind step: filter values checked against the catalog types and typed, once, in planning."""

from __future__ import annotations

import datetime as dt
from types import MappingProxyType

import pytest

from dataops.bind import bind_filters
from dataops.catalog import Classification, Column, ColumnType, Dataset, typed_value
from dataops.errors import InvalidQuery
from dataops.ir import Between, Equals, InSet
from dataops.values import PrivacyLoss


def _dataset() -> Dataset:
    columns = {
        "uid": Column("uid", ColumnType.STRING, Classification.IDENTIFIER),
        "district": Column("district", ColumnType.STRING, Classification.PUBLIC),
        "amount": Column("amount", ColumnType.FLOAT, Classification.SENSITIVE, bounds=(0.0, 10.0)),
        "year": Column("year", ColumnType.INT, Classification.PUBLIC),
        "opened": Column("opened", ColumnType.DATE, Classification.PUBLIC),
        "active": Column("active", ColumnType.BOOL, Classification.PUBLIC),
    }
    return Dataset(
        id="d", zone="z", title="d", description="", provider="tests", location="d.parquet",
        path=None, unit_column="uid", max_rows_per_unit=1, budget=PrivacyLoss(1.0, 0.0),
        columns=MappingProxyType(columns), source=None,
    )  # fmt: skip


def test_values_are_typed_as_their_columns():
    bound = bind_filters(
        _dataset(),
        (
            Equals("opened", "2024-03-01"),
            InSet("amount", (1, 2.5)),
            Between("year", 1990, None),
            Equals("active", True),
        ),
    )
    assert bound == (
        Equals("opened", dt.date(2024, 3, 1)),
        InSet("amount", (1.0, 2.5)),
        Between("year", 1990, None),
        Equals("active", True),
    )
    assert [type(v) for v in bound[1].values] == [float, float]  # one Python type per column


@pytest.mark.parametrize(
    ("filter_", "field"),
    [
        (Equals("year", "1990"), "query.filters[0].equals"),
        (Equals("year", True), "query.filters[0].equals"),  # a bool is never a number
        (InSet("district", ("a", 3)), "query.filters[0].in_set"),
        (Between("opened", "yesterday", None), "query.filters[0].range.low"),
        (Between("amount", None, False), "query.filters[0].range.high"),
    ],
)
def test_a_value_of_the_wrong_type_is_the_consumers_error_naming_the_field(filter_, field):
    with pytest.raises(InvalidQuery) as err:
        bind_filters(_dataset(), (filter_,))
    assert err.value.rule == "query.value" and err.value.column == filter_.column
    assert [v.field for v in err.value.field_violations] == [field]


def test_the_catalog_and_the_bind_step_share_one_type_check():
    assert typed_value(3, ColumnType.FLOAT) == 3.0 and typed_value(float("nan"), ColumnType.FLOAT) is None
    assert typed_value(dt.date(2024, 1, 1), ColumnType.DATE) == dt.date(2024, 1, 1)
    assert typed_value("2024-13-01", ColumnType.DATE) is None
