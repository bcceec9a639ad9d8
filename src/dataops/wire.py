"""Translation between protobuf messages and the IR / results, both directions.

The servicers and the client both use this module and nothing else touches
generated code, so a change to the contract is a change here.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from dataops import ir
from dataops.arrow_ipc import table_from_ipc, table_to_ipc  # noqa: F401 (results cross the wire as IPC)

if TYPE_CHECKING:  # the server parses SQL; a client install need not carry sqlglot
    from dataops import sql
from dataops.catalog import Classification, Dataset
from dataops.errors import FieldViolation, InvalidQuery
from dataops.policy import Grant, Use
from dataops.v1 import catalog_pb2 as c
from dataops.v1 import query_pb2 as q

FUNCTIONS = {
    q.AGGREGATE_FUNCTION_COUNT: ir.Function.COUNT,
    q.AGGREGATE_FUNCTION_COUNT_UNITS: ir.Function.COUNT_UNITS,
    q.AGGREGATE_FUNCTION_SUM: ir.Function.SUM,
    q.AGGREGATE_FUNCTION_MEAN: ir.Function.MEAN,
    q.AGGREGATE_FUNCTION_QUANTILE: ir.Function.QUANTILE,
}
FUNCTION_TO_PROTO = {v: k for k, v in FUNCTIONS.items()}
MODES = {q.QUERY_MODE_AGGREGATE: ir.Mode.AGGREGATE, q.QUERY_MODE_DP: ir.Mode.DP}
MODE_TO_PROTO = {v: k for k, v in MODES.items()}


def _invalid(field: str, description: str) -> InvalidQuery:
    return InvalidQuery(f"{field}: {description}", field_violations=(FieldViolation(field, description),))


def value_from_proto(value: q.Value, field: str) -> ir.Scalar:
    kind = value.WhichOneof("kind")
    if kind is None:
        raise _invalid(field, "a value is required")
    out = getattr(value, kind)
    if kind == "double_value" and not math.isfinite(out):
        raise _invalid(field, "must be a finite number")
    return out


def value_to_proto(value: Any) -> q.Value:
    if isinstance(value, bool):
        return q.Value(bool_value=value)
    if isinstance(value, int):
        return q.Value(int_value=value)
    if isinstance(value, float):
        return q.Value(double_value=value)
    return q.Value(string_value=value if isinstance(value, str) else value.isoformat())


def filter_from_proto(f: q.Filter, field: str) -> ir.Filter:
    kind = f.WhichOneof("predicate")
    if kind == "equals":
        return ir.Equals(f.column, value_from_proto(f.equals.value, f"{field}.equals.value"))
    if kind == "in_set":
        values = tuple(
            value_from_proto(v, f"{field}.in_set.values[{i}]") for i, v in enumerate(f.in_set.values)
        )
        return ir.InSet(f.column, values)
    if kind == "range":
        low = value_from_proto(f.range.low, f"{field}.range.low") if f.range.HasField("low") else None
        high = value_from_proto(f.range.high, f"{field}.range.high") if f.range.HasField("high") else None
        return ir.Between(f.column, low, high)
    raise _invalid(field, "a filter needs equals, in_set or range")


def filter_to_proto(f: ir.Filter) -> q.Filter:
    if isinstance(f, ir.Equals):
        return q.Filter(column=f.column, equals=q.Equals(value=value_to_proto(f.value)))
    if isinstance(f, ir.InSet):
        return q.Filter(column=f.column, in_set=q.InSet(values=[value_to_proto(v) for v in f.values]))
    rng = q.Range()
    if f.low is not None:
        rng.low.CopyFrom(value_to_proto(f.low))
    if f.high is not None:
        rng.high.CopyFrom(value_to_proto(f.high))
    return q.Filter(column=f.column, range=rng)


def query_from_proto(message: q.Query) -> ir.Query:
    aggregates = []
    for i, a in enumerate(message.aggregates):
        function = FUNCTIONS.get(a.function)
        if function is None:
            raise _invalid(f"query.aggregates[{i}].function", "an aggregate function is required")
        quantile = a.quantile if function is ir.Function.QUANTILE else (a.quantile or None)
        aggregates.append(ir.Aggregate(function, a.column or None, quantile, a.alias, a.weight or None))
    mode = MODES.get(message.mode)
    if mode is None:
        raise _invalid("query.mode", "QUERY_MODE_AGGREGATE or QUERY_MODE_DP is required")
    privacy = _privacy_from_proto(message)
    return ir.Query(
        dataset=message.dataset,
        aggregates=tuple(aggregates),
        filters=tuple(filter_from_proto(f, f"query.filters[{i}]") for i, f in enumerate(message.filters)),
        group_by=tuple(message.group_by),
        mode=mode,
        privacy=privacy,
        purpose=message.purpose,
    )


def _privacy_from_proto(message: q.Query | q.SqlQuery) -> ir.Privacy | None:
    if not message.HasField("privacy"):
        return None
    p = message.privacy
    measures = tuple(
        ir.MeasureTerms(
            column=m.column,
            lower=m.lower if m.HasField("lower") else None,
            upper=m.upper if m.HasField("upper") else None,
            auto_clip_share=m.auto_clip_share,
            auto_clip_quantile=m.auto_clip_quantile or ir.AUTO_CLIP_QUANTILE,
        )
        for m in p.measures
    )
    return ir.Privacy(
        epsilon=p.epsilon or None,
        delta=p.delta,
        target_half_width=p.target_half_width or None,
        max_rows_per_unit=p.max_rows_per_unit or None,
        measures=measures,
        consistent=p.consistent,
    )


def _measure_terms_to_proto(m: ir.MeasureTerms) -> q.MeasureTerms:
    out = q.MeasureTerms(
        column=m.column, auto_clip_share=m.auto_clip_share, auto_clip_quantile=m.auto_clip_quantile
    )
    if m.lower is not None:
        out.lower = m.lower
    if m.upper is not None:
        out.upper = m.upper
    return out


def sql_query_from_proto(message: q.SqlQuery, unit_column: sql.UnitColumn | None = None) -> ir.Query:
    """The IR of a SQL question: the same query its structured twin makes."""
    from dataops import sql

    mode = MODES.get(message.mode)
    if mode is None:
        raise _invalid("sql.mode", "QUERY_MODE_AGGREGATE or QUERY_MODE_DP is required")
    return sql.parse(
        message.text,
        mode=mode,
        privacy=_privacy_from_proto(message),
        purpose=message.purpose,
        unit_column=unit_column,
    )


def query_from_request(
    request: q.RunQueryRequest | q.EstimateQueryRequest, unit_column: sql.UnitColumn | None = None
) -> ir.Query:
    """A RunQuery or EstimateQuery request's question, whichever form it was sent in."""
    if request.HasField("sql"):
        if request.HasField("query"):
            raise _invalid("sql", "set query or sql, not both")
        return sql_query_from_proto(request.sql, unit_column)
    return query_from_proto(request.query)


def query_to_proto(query: ir.Query) -> q.Query:
    message = q.Query(
        dataset=query.dataset,
        filters=[filter_to_proto(f) for f in query.filters],
        group_by=list(query.group_by),
        aggregates=[
            q.Aggregate(
                function=FUNCTION_TO_PROTO[a.function],
                column=a.column or "",
                quantile=a.quantile or 0.0,
                alias=a.alias,
                weight=a.weight or 0.0,
            )
            for a in query.aggregates
        ],
        mode=MODE_TO_PROTO[query.mode],
        purpose=query.purpose,
    )
    if query.privacy is not None:
        message.privacy.CopyFrom(
            q.PrivacyParameters(
                epsilon=query.privacy.epsilon or 0.0,
                delta=query.privacy.delta,
                target_half_width=query.privacy.target_half_width or 0.0,
                max_rows_per_unit=query.privacy.max_rows_per_unit or 0,
                measures=[_measure_terms_to_proto(m) for m in query.privacy.measures],
                consistent=query.privacy.consistent,
            )
        )
    return message


# --- catalog ---------------------------------------------------------------


CLASSIFICATIONS = {
    Classification.IDENTIFIER: c.CLASSIFICATION_IDENTIFIER,
    Classification.QUASI_IDENTIFIER: c.CLASSIFICATION_QUASI_IDENTIFIER,
    Classification.PUBLIC: c.CLASSIFICATION_PUBLIC,
    Classification.SENSITIVE: c.CLASSIFICATION_SENSITIVE,
    Classification.UNCLASSIFIED: c.CLASSIFICATION_UNCLASSIFIED,
}
USES = {
    Use.DIMENSION: c.COLUMN_USE_DIMENSION,
    Use.FILTER: c.COLUMN_USE_FILTER,
    Use.MEASURE: c.COLUMN_USE_MEASURE,
}


def dataset_to_proto(dataset: Dataset) -> c.Dataset:
    return c.Dataset(
        id=dataset.id,
        zone=dataset.zone,
        title=dataset.title,
        description=dataset.description,
        provider=dataset.provider,
        privacy_unit=dataset.unit_column,
        max_rows_per_unit=dataset.max_rows_per_unit or 0,  # 0: not set by the operator, DP is off
    )


def columns_to_proto(dataset: Dataset, grant: Grant) -> list[c.Column]:
    out = []
    for column in dataset.columns.values():
        message = c.Column(
            name=column.name,
            type=column.type.value,
            classification=CLASSIFICATIONS[column.classification],
            description=column.description,
            allowed_uses=sorted(USES[u] for u in grant.uses(column.name)),
            public_keys=[str(k) for k in column.keys or ()],
            bins=list(column.bins or ()),
        )
        if column.bounds is not None:
            message.lower_bound, message.upper_bound = column.bounds
        out.append(message)
    return out


def grant_to_proto(grant: Grant) -> c.Grant:
    return c.Grant(
        purpose=grant.purpose,
        expires=grant.expires.isoformat(),
        modes=sorted(MODE_TO_PROTO[m] for m in grant.modes),
        functions=sorted(FUNCTION_TO_PROTO[f] for f in grant.functions),
        epsilon=grant.budget.epsilon,
        delta=grant.budget.delta,
        tables=list(grant.tables),
    )


def table_to_proto(product: Any) -> c.PublishedTable:
    """A table product (`dataops.products.table.TableProduct`) as the consumer sees it."""
    rules = product.rules
    message = c.PublishedTable(
        id=product.id,
        title=product.title,
        description=product.description,
        dimensions=[
            c.TableDimension(column=d, keys=[str(k) for k in keys])
            for d, keys in zip(product.dimensions, product.keys)
        ],
        measures=[
            c.TableMeasure(name=m.name, function=FUNCTION_TO_PROTO[m.function], column=m.column or "")
            for m in product.measures
        ],
        rules=c.TableRules(
            min_units=rules.min_units,
            dominance_n=rules.dominance_n,
            dominance_percent=rules.dominance_percent,
            sensitive_dimensions=list(rules.sensitive_dimensions),
            group_attribute_percent=rules.group_attribute_percent,
            structural_zeros=[
                c.StructuralZero(
                    dimensions=[
                        c.TableDimension(
                            column=product.dimensions[j],
                            keys=[str(product.keys[j][i]) for i in sorted(positions)],
                        )
                        for j, positions in entry
                    ]
                )
                for entry in product.structural_zeros
            ],
        ),
    )
    if rules.p_percent is not None:
        message.rules.p_percent = rules.p_percent
    return message


# --- results ---------------------------------------------------------------


def accuracy_to_proto(accuracy: Any) -> q.AggregateAccuracy:
    return q.AggregateAccuracy(
        column=accuracy.column,
        noise_scale=accuracy.noise_scale,
        half_width_95=accuracy.half_width_95,
        mechanism=accuracy.mechanism,
    )


def spend_to_proto(spend: Any) -> q.Spend | None:
    if spend is None:
        return None
    return q.Spend(
        epsilon=spend.epsilon,
        delta=spend.delta,
        remaining_epsilon=spend.remaining_epsilon,
        remaining_delta=spend.remaining_delta,
    )


def budget_to_proto(budget: Any) -> q.DatasetBudget:
    return q.DatasetBudget(
        dataset_id=budget.dataset,
        epsilon_total=budget.epsilon_total,
        delta_total=budget.delta_total,
        epsilon_spent=budget.epsilon_spent,
        delta_spent=budget.delta_spent,
    )
