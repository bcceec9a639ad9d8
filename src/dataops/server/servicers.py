"""Thin servicers: protobuf → IR → `Sandbox` → protobuf. Nothing else happens here.

Identity, audit and error mapping are the interceptor's (`interceptors.py`); the
request flow is the Sandbox's (`dataops.service`).
"""

from __future__ import annotations

from dataops import subject_wire, wire
from dataops.audit.log import AuditLog
from dataops.audit.record import current_call
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
        views = self.sandbox.datasets(current_call().caller)
        return catalog_pb2.ListDatasetsResponse(datasets=[wire.dataset_to_proto(v.dataset) for v in views])

    def DescribeDataset(self, request, context):  # noqa: N802
        view = self.sandbox.describe(current_call().caller, request.dataset_id, current_call())
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
        call = current_call()
        query = wire.query_from_request(request, self.sandbox.unit_column_for(call.caller))
        result = self.sandbox.run(call.caller, query, call)
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
        call = current_call()
        query = wire.query_from_request(request, self.sandbox.unit_column_for(call.caller))
        estimate = self.sandbox.estimate(call.caller, query, call)
        return query_pb2.EstimateQueryResponse(
            spend=wire.spend_to_proto(estimate.spend),
            accuracy=[wire.accuracy_to_proto(a) for a in estimate.accuracy],
            notes=list(estimate.notes),
        )

    def GetBudget(self, request, context):  # noqa: N802
        call = current_call()
        budgets = self.sandbox.budgets(call.caller, request.dataset_id or None, call)
        return query_pb2.GetBudgetResponse(budgets=[wire.budget_to_proto(b) for b in budgets])


class SubjectServicer(subject_pb2_grpc.SubjectServiceServicer):
    """Consented subject evaluations (`dataops.subjects.Evaluator`)."""

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator

    def Evaluate(self, request, context):  # noqa: N802
        call = current_call()
        evaluation = self.evaluator.evaluate(
            call.caller, subject_wire.subject_item_from_proto(request.item), call
        )
        return subject_pb2.EvaluateResponse(evaluation=subject_wire.evaluation_to_proto(evaluation, call))

    def EvaluateBatch(self, request, context):  # noqa: N802
        call = current_call()
        items = [subject_wire.subject_item_from_proto(item) for item in request.items]
        results = self.evaluator.evaluate_batch(call.caller, items, call)
        return subject_pb2.EvaluateBatchResponse(
            results=[
                subject_pb2.BatchResult(
                    index=i, **subject_wire.subject_result_to_proto(result, call.evaluation_entries[i])
                )
                for i, result in enumerate(results)
            ]
        )

    def Watch(self, request, context):  # noqa: N802
        call = current_call()
        items = [subject_wire.subject_item_from_proto(item) for item in request.items]
        for index, result in self.evaluator.watch(call.caller, items, call, context.is_active):
            update = subject_wire.subject_result_to_proto(result, call.evaluation_entries[0])
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
