"""Arrow tables ↔ Arrow IPC stream bytes: the form a result crosses the wire and rests in the ledger.

Its own module so the domain (the ledger's stored releases, `service`) can store a
table without importing the protobuf translation in `wire`.
"""

from __future__ import annotations

import io

import pyarrow as pa


def table_to_ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def table_from_ipc(data: bytes) -> pa.Table:
    with pa.ipc.open_stream(data) as reader:
        return reader.read_all()
