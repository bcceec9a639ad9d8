"""Thin servicers: protobuf → IR → `Sandbox` → protobuf. Nothing else happens here.

Identity, audit and error mapping are the interceptor's (`interceptors.py`); the
request flow is the Sandbox's (`dataops.service`). Each servicer gets the
interceptor's `CallContext` (the caller, its deadline) and hands the flow's
`Outcome` back to it with `context.record`, for the audit record.
"""

from __future__ import annotations

from dataops import subject_wire, wire
from dataops.audit.log import AuditLog
from dataops.errors import InvalidQuery
from dataops.service import Sandbox
from dataops.subjects import Evaluator
from dataops.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
    subject_pb2,
    subject_pb2_grpc,
)


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    def ListDatasets(self, request, context):  # noqa: N802 (generated name)
        views = self.sandbox.datasets(context.consumer)
        return catalog_pb2.ListDatasetsResponse(datasets=[wire.dataset_to_proto(v.dataset) for v in views])

    def DescribeDataset(self, request, context):  # noqa: N802
        outcome = self.sandbox.describe(context.consumer, request.dataset_id)
        context.record(outcome)
        view = outcome.result
        return catalog_pb2.DescribeDatasetResponse(
            dataset=wire.dataset_to_proto(view.dataset),
            columns=wire.columns_to_proto(view.dataset, view.grant),
            grant=wire.grant_to_proto(view.grant),
            tables=[wire.table_to_proto(t) for t in view.tables],
        )


class QueryServicer(query_pb2_grpc.QueryServiceServicer):
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    def RunQuery(self, request, context):  # noqa: N802
        query = wire.query_from_request(request, self.sandbox.unit_column_for(context.consumer))
        outcome = self.sandbox.run(
            context.consumer,
            query,
            request_id=context.request_id,
            deadline=context.deadline,
            scan_slot=context.scan_slot,
        )
        context.record(outcome)
        result = outcome.result
        return query_pb2.RunQueryResponse(
            result=query_pb2.ArrowTable(
                ipc_stream=wire.table_to_ipc(result.table), row_count=result.table.num_rows
            ),
            rows_suppressed=result.rows_suppressed,
            accuracy=[wire.accuracy_to_proto(a) for a in result.accuracy],
            spend=wire.spend_to_proto(result.spend),
            reused=result.reused,
        )

    def EstimateQuery(self, request, context):  # noqa: N802
        query = wire.query_from_request(request, self.sandbox.unit_column_for(context.consumer))
        outcome = self.sandbox.estimate(context.consumer, query)
        context.record(outcome)
        estimate = outcome.result
        return query_pb2.EstimateQueryResponse(
            spend=wire.spend_to_proto(estimate.spend),
            accuracy=[wire.accuracy_to_proto(a) for a in estimate.accuracy],
            notes=list(estimate.notes),
        )

    def GetBudget(self, request, context):  # noqa: N802
        outcome = self.sandbox.budgets(context.consumer, request.dataset_id or None)
        context.record(outcome)
        return query_pb2.GetBudgetResponse(budgets=[wire.budget_to_proto(b) for b in outcome.result])


class SubjectServicer(subject_pb2_grpc.SubjectServiceServicer):
    """Consented subject evaluations (`dataops.subjects.Evaluator`)."""

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator

    def Evaluate(self, request, context):  # noqa: N802
        outcome = self.evaluator.evaluate(
            context.consumer, subject_wire.subject_item_from_proto(request.item)
        )
        context.record(outcome)
        return subject_pb2.EvaluateResponse(
            evaluation=subject_wire.evaluation_to_proto(outcome.result, outcome.entries[-1])
        )

    def EvaluateBatch(self, request, context):  # noqa: N802
        items = [subject_wire.subject_item_from_proto(item) for item in request.items]
        outcome = self.evaluator.evaluate_batch(context.consumer, items)
        context.record(outcome)
        return subject_pb2.EvaluateBatchResponse(
            results=[
                subject_pb2.BatchResult(
                    index=i, **subject_wire.subject_result_to_proto(result, outcome.entries[i])
                )
                for i, result in enumerate(outcome.result)
            ]
        )

    def Watch(self, request, context):  # noqa: N802
        items = [subject_wire.subject_item_from_proto(item) for item in request.items]
        for index, result, outcome in self.evaluator.watch(context.consumer, items, context.is_active):
            context.record(outcome)  # the audit record of the message about to go out
            update = subject_wire.subject_result_to_proto(result, outcome.entries[0])
            if "error" in update:
                yield subject_pb2.WatchResponse(index=index, ended=update["error"])
            else:
                yield subject_pb2.WatchResponse(index=index, evaluation=update["evaluation"])


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """Checkpoints and consistency proofs, for clients that witness the log."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    def GetCheckpoint(self, request, context):  # noqa: N802
        checkpoint = self.audit.last_checkpoint
        return audit_pb2.GetCheckpointResponse(checkpoint=checkpoint.note if checkpoint else "")

    def GetConsistencyProof(self, request, context):  # noqa: N802
        try:
            proof = self.audit.consistency_proof(request.first_size, request.second_size)
        except ValueError as exc:  # sizes out of order or beyond the signed tree: public facts only
            raise InvalidQuery(
                f"no consistency proof from {request.first_size} to {request.second_size}: {exc}",
                rule="audit.consistency",
            ) from None
        return audit_pb2.GetConsistencyProofResponse(proof=proof)
