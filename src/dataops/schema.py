"""JSON Schemas of the operator's TOML files, for editors (`dataops policy schema`).

Editors with TOML support (e.g. Taplo / Even Better TOML) validate and complete a
file against a JSON Schema. The schemas are built from the same enums the loaders
use; the loaders stay the authority (they also check the file against the catalog).
"""

from __future__ import annotations

from typing import Any

from dataops.catalog import COLUMN_PATTERN, ID_PATTERN, ZONE_PATTERN, Classification, ColumnType
from dataops.ir import Function, Mode
from dataops.policy import CONSUMER_PATTERN, Use

DRAFT = "https://json-schema.org/draft/2020-12/schema"


def _obj(
    properties: dict[str, Any], required: list[str], description: str = "", **extra: Any
) -> dict[str, Any]:
    out = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    if description:
        out["description"] = description
    out.update(extra)
    return out


def _enum_list(enum: Any, description: str) -> dict[str, Any]:
    return {
        "type": "array",
        "items": {"enum": [e.value for e in enum]},
        "minItems": 1,
        "uniqueItems": True,
        "description": description,
    }


def _budget(description: str) -> dict[str, Any]:
    return _obj(
        {
            "epsilon": {"type": "number", "minimum": 0},
            "delta": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0},
        },
        ["epsilon"],
        description,
    )


def policy_schema() -> dict[str, Any]:
    grant = _obj(
        {
            "dataset": {"type": "string", "description": "a catalog id in the consumer's zone"},
            "purpose": {"type": "string", "minLength": 1},
            "expires": {"type": "string", "format": "date", "description": "a TOML date, e.g. 2027-12-31"},
            "modes": _enum_list(Mode, "query modes the grant allows"),
            "functions": _enum_list(Function, "aggregate functions DP queries may compute"),
            "tables": {
                "type": "array",
                "items": {"type": "string"},
                "uniqueItems": True,
                "description": "aggregate mode: the table products (products/<id>.toml) this grant "
                "may read; exact answers are lookups in them",
            },
            "budget": _budget("the grant's DP budget; at most the dataset's cap"),
            "columns": {
                "type": "object",
                "description": "DP mode: column -> uses",
                "additionalProperties": _enum_list(Use, "how the column may be used"),
            },
        },
        ["dataset", "purpose", "expires", "modes", "functions", "budget"],
    )
    return {
        "$schema": DRAFT,
        "$id": "https://dataops.example/schema/policy.json",
        "title": "dataops consumer policy",
        **_obj(
            {
                "consumer": {
                    "type": "string",
                    "pattern": f"^{CONSUMER_PATTERN.pattern}$",
                    "description": "equals the file name stem and the certificate's name",
                },
                "zone": {"type": "string"},
                "description": {"type": "string"},
                "revoked": {"type": "boolean", "default": False},
                "grants": {"type": "array", "items": grant},
            },
            ["consumer", "zone"],
        ),
    }


def catalog_schema() -> dict[str, Any]:
    column = _obj(
        {
            "type": {"enum": [t.value for t in ColumnType]},
            "classification": {"enum": [c.value for c in Classification]},
            "description": {"type": "string"},
            "bounds": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
            "keys": {"type": "array", "minItems": 1, "uniqueItems": True},
            "bins": {"type": "array", "items": {"type": "number"}, "minItems": 2},
        },
        ["type", "classification"],
    )
    return {
        "$schema": DRAFT,
        "$id": "https://dataops.example/schema/catalog.json",
        "title": "dataops catalog entry",
        **_obj(
            {
                "id": {
                    "type": "string",
                    "pattern": f"^{ID_PATTERN.pattern}$",
                    "description": "equals the file stem",
                },
                "zone": {"type": "string", "pattern": f"^{ZONE_PATTERN.pattern}$"},
                "title": {"type": "string", "minLength": 1},
                "description": {"type": "string"},
                "provider": {"type": "string", "minLength": 1},
                "location": {
                    "type": "string",
                    "pattern": r"\.parquet$",
                    "description": "relative to sandbox/",
                },
                "privacy_unit": _obj(
                    {"column": {"type": "string"}, "max_rows": {"type": "integer", "minimum": 1}},
                    ["column", "max_rows"],
                ),
                "budget": _budget("the dataset's DP cap over all consumers"),
                "columns": {
                    "type": "object",
                    "minProperties": 1,
                    "propertyNames": {"pattern": f"^{COLUMN_PATTERN.pattern}$"},
                    "additionalProperties": column,
                },
            },
            ["id", "zone", "title", "provider", "location", "privacy_unit", "budget", "columns"],
        ),
    }


SCHEMAS = {"policy": policy_schema, "catalog": catalog_schema}
