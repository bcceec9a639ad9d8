"""Authorization: a pure function of (policy set, consumer, query, catalog, date).

It returns the grant that allows the query, or raises the RequestError that names
the deciding rule and column. `dataops policy explain` calls the same function, so
what an operator is told is exactly what the server does.

Rules, in the order they are checked (the first that fails decides):

    consumer.unknown, consumer.policy_invalid, consumer.revoked
                                          the certificate's consumer has a valid, live policy
    dataset.unknown                       the dataset exists in the consumer's zone
    default-deny                          the consumer holds a grant on it
    grant.expires                         the grant is not past its expiry date
    grant.purpose                         a stated purpose is the grant's purpose
    grant.modes                           the grant allows the query's mode
    query.column                          every column named exists
    identifier                            identifier / unclassified columns are never used
    grant.columns                         (DP) each column is granted for its use
    grant.functions                       (DP) the grant allows each aggregate function
    aggregate-mode.quantile               exact quantiles are not released (one unit's value)
    query.alias                           no output is labelled like a column of the dataset
    table.coverage, table.key             (aggregate) a table the grant names covers the query
                                          (`dataops.engines.table.cover`): exact answers are
                                          lookups in published, protected tables only
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dataops.catalog import Catalog, Classification, Dataset
from dataops.errors import FieldViolation, InvalidQuery, PolicyDenied, UnknownConsumer, UnknownDataset
from dataops.ir import MAX_NAME_LENGTH, Function, Mode, Query
from dataops.policy import ConsumerPolicy, Grant, PolicySet, Use


def _shown(name: str) -> str:
    """A consumer-supplied name as quoted in a message: bounded, whatever was sent."""
    return repr(name if len(name) <= MAX_NAME_LENGTH else name[:MAX_NAME_LENGTH] + "...")


@dataclass(frozen=True)
class Decision:
    """What allowed a query: the consumer's policy, the dataset and the grant."""

    policy: ConsumerPolicy
    dataset: Dataset
    grant: Grant
    # Aggregate mode: the table lookup that answers the query (`engines.table.Coverage`).
    coverage: Any = None


def consumer_policy(policies: PolicySet, consumer: str) -> ConsumerPolicy:
    policy = policies.get(consumer)
    if policy is None:
        raise UnknownConsumer(f"no policy for consumer {consumer!r}", rule="consumer.unknown")
    if policy.invalid is not None:
        # Not the operator's error text: it quotes files and keys, none of the consumer's business.
        raise UnknownConsumer(
            f"the policy of consumer {consumer!r} is invalid; refused until the operator fixes it",
            rule="consumer.policy_invalid",
        )
    if policy.revoked:
        raise UnknownConsumer(f"consumer {consumer!r} is revoked", rule="consumer.revoked")
    return policy


def visible_dataset(policy: ConsumerPolicy, catalog: Catalog, dataset_id: str) -> Dataset:
    """The dataset if it is in the consumer's zone; otherwise it does not exist for them.

    Datasets of another zone get the same answer as ids that exist nowhere, so a
    consumer cannot even learn what another zone holds.
    """
    dataset = catalog.get(dataset_id)
    if dataset is None or dataset.zone != policy.zone:
        raise UnknownDataset(
            f"no dataset {_shown(dataset_id)} in zone {policy.zone!r}", rule="dataset.unknown"
        )
    return dataset


def live_grant(policy: ConsumerPolicy, dataset: Dataset, today: dt.date) -> Grant:
    grant = policy.grants.get(dataset.id)
    if grant is None:
        raise PolicyDenied(
            f"consumer {policy.consumer!r} holds no grant on {dataset.id!r}", rule="default-deny"
        )
    if grant.expired(today):
        raise PolicyDenied(
            f"the grant on {dataset.id!r} expired on {grant.expires.isoformat()}", rule="grant.expires"
        )
    return grant


_USE_FIELDS = {Use.DIMENSION: "group_by", Use.FILTER: "filters", Use.MEASURE: "aggregates"}


def _check_column(dataset: Dataset, grant: Grant | None, column: str, use: Use, field: str) -> None:
    """The column exists and is usable; for DP (`grant` given) granted for this use."""
    spec = dataset.column(column)
    if spec is None:
        raise InvalidQuery(
            f"{dataset.id!r} has no column {column!r}",
            rule="query.column",
            column=column,
            field_violations=(FieldViolation(field, f"unknown column {column!r}"),),
        )
    if not spec.classification.usable:
        kind = "an identifier" if spec.classification is Classification.IDENTIFIER else "unclassified"
        raise PolicyDenied(
            f"column {column!r} is {kind} and can never be grouped, filtered or output",
            rule="identifier",
            column=column,
        )
    if grant is not None and use not in grant.uses(column):
        raise PolicyDenied(
            f"the grant on {dataset.id!r} does not allow {column!r} as a {use.value}",
            rule=f"grant.columns.{column}",
            column=column,
        )


def authorize(
    policies: PolicySet,
    catalog: Catalog,
    consumer: str,
    query: Query,
    today: dt.date,
    tables: Mapping[str, Any] | None = None,
) -> Decision:
    """`tables`: the table products by id (`Products.tables`); exact queries need them."""
    policy = consumer_policy(policies, consumer)
    dataset = visible_dataset(policy, catalog, query.dataset)
    grant = live_grant(policy, dataset, today)
    if query.purpose and query.purpose != grant.purpose:
        raise PolicyDenied(
            f"the grant on {dataset.id!r} is for the purpose {grant.purpose!r}, not the one stated",
            rule="grant.purpose",
        )
    if query.mode not in grant.modes:
        raise PolicyDenied(
            f"the grant on {dataset.id!r} does not allow {query.mode.value} queries", rule="grant.modes"
        )
    # Exact answers are not free-form: the column grants are DP's; tables decide below.
    dp = query.mode is Mode.DP
    column_grant = grant if dp else None
    for i, column in enumerate(query.group_by):
        _check_column(dataset, column_grant, column, Use.DIMENSION, f"query.group_by[{i}]")
    for i, filter_ in enumerate(query.filters):
        _check_column(dataset, column_grant, filter_.column, Use.FILTER, f"query.filters[{i}].column")
    for i, aggregate in enumerate(query.aggregates):
        if aggregate.column:
            _check_column(
                dataset, column_grant, aggregate.column, Use.MEASURE, f"query.aggregates[{i}].column"
            )
        if dp and aggregate.function not in grant.functions:
            raise PolicyDenied(
                f"the grant on {dataset.id!r} does not allow {aggregate.function.value}",
                rule="grant.functions",
                column=aggregate.column,
            )
        if aggregate.function is Function.QUANTILE and query.mode is Mode.AGGREGATE:
            raise PolicyDenied(
                "an exact quantile is one privacy unit's value; ask for it in DP mode",
                rule="aggregate-mode.quantile",
                column=aggregate.column,
            )
        if aggregate.name in dataset.columns:
            # An aggregate labelled like a column (say "enterprise_id") would pass off a
            # number as that column's values in the consumer's table.
            raise InvalidQuery(
                f"the output name {aggregate.name!r} is a column of {dataset.id!r}; choose another alias",
                rule="query.alias",
                column=aggregate.name,
                field_violations=(
                    FieldViolation(f"query.aggregates[{i}].alias", f"{aggregate.name!r} names a column"),
                ),
            )
    coverage = None
    if query.mode is Mode.AGGREGATE:
        from dataops.engines.table import cover

        coverage = cover(query, grant, tables or {})
    return Decision(policy=policy, dataset=dataset, grant=grant, coverage=coverage)
