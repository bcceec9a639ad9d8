"""Protobuf ↔ domain for SubjectService (kept apart from `wire` so each contract has its module)."""

from __future__ import annotations

from typing import Any

from dataops.engines.subject import Evaluation
from dataops.errors import RequestError
from dataops.server.status import status_code
from dataops.subjects import Item
from dataops.v1 import subject_pb2 as s

_MAX_TEXT = 256


def subject_item_from_proto(item: s.SubjectItem) -> Item:
    return Item(product_id=item.product_id, subject_id=item.subject_id, consent=bytes(item.consent))


def subject_item_to_proto(item: Item) -> s.SubjectItem:
    return s.SubjectItem(product_id=item.product_id, subject_id=item.subject_id, consent=item.consent)


def output_to_proto(name: str, value: Any) -> s.SubjectOutput:
    output = s.SubjectOutput(name=name)
    if isinstance(value, bool):  # before int: a bool is an int in Python
        output.bool_value = value
    elif isinstance(value, int):
        output.int_value = value
    elif isinstance(value, float):
        output.double_value = value
    elif isinstance(value, str):
        output.band = value
    return output  # None: no value (the maximum of no rows)


def output_from_proto(output: s.SubjectOutput) -> Any:
    kind = output.WhichOneof("value")
    return None if kind is None else getattr(output, kind)


def evaluation_to_proto(evaluation: Evaluation, entry: dict) -> s.Evaluation:
    """`entry` is the evaluation's audit entry: the consent id it was released under."""
    return s.Evaluation(
        product_id=evaluation.product,
        consent_id=entry.get("consent_id", ""),
        data_version=evaluation.data_version[:16],
        evaluation_date=evaluation.evaluation_date.isoformat(),
        outputs=[output_to_proto(name, value) for name, value in evaluation.outputs],
        outputs_hash=evaluation.digest(),
    )


def item_error_to_proto(error: RequestError) -> s.ItemError:
    def bounded(text: str) -> str:
        return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 3] + "..."

    return s.ItemError(
        code=status_code(error).value[0],
        reason=error.reason,
        message=bounded(error.message),
        metadata={k: bounded(v) for k, v in error.metadata.items()},
    )


def subject_result_to_proto(result: Evaluation | RequestError, entry: dict) -> dict[str, Any]:
    """The oneof of a batch result or watch update, as keyword arguments."""
    if isinstance(result, RequestError):
        return {"error": item_error_to_proto(result)}
    return {"evaluation": evaluation_to_proto(result, entry)}
