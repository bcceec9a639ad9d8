// A dataops.v1 client in Node.js, written from proto/ and docs/api.md alone.
//
//   node client.mjs --proto DIR --target HOST:PORT --ca ca.crt --cert me.crt --key me.key
//                   [--server-name NAME] [--dataset ID] [--other-dataset ID] [--subjects FILE]
//
// Calls every RPC of CatalogService, QueryService, SubjectService and AuditService
// WITHOUT a deadline (grpc-js sends none unless asked); --subjects names a JSON file
// of subject items ({evaluate, refused, batch, watch}: each item's consent artefact as
// base64) the caller obtained from the consent service. It decodes refusals from the grpc-status-details-bin trailer with
// protobufjs and the vendored google/rpc protos, reads Arrow results with apache-arrow,
// and prints one JSON document of what it saw (tests/test_node_client.py checks it).

import fs from "node:fs";
import path from "node:path";
import { parseArgs } from "node:util";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { tableFromIPC } from "apache-arrow";
import protobuf from "protobufjs";

const { values: args } = parseArgs({
  options: {
    proto: { type: "string" },
    target: { type: "string" },
    ca: { type: "string" },
    cert: { type: "string" },
    key: { type: "string" },
    "server-name": { type: "string" },
    dataset: { type: "string", default: "enterprise_credit" },
    "other-dataset": { type: "string", default: "medical_claims" },
    subjects: { type: "string" },
  },
});

// --- the contract -------------------------------------------------------------------

const ourFiles = fs
  .readdirSync(path.join(args.proto, "dataops/v1"))
  .filter((f) => f.endsWith(".proto"))
  .map((f) => `dataops/v1/${f}`);
// keepCase: field names as in the .proto (snake_case); longs: String, so int64/uint64
// arrive as decimal strings rather than lossy numbers; enums: String, so enum values
// arrive as their names; defaults: unset scalars arrive as zero values; oneofs: the
// oneof's name holds which member is set.
const definition = protoLoader.loadSync(ourFiles, {
  includeDirs: [args.proto],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const v1 = grpc.loadPackageDefinition(definition).dataops.v1;

// The error model: google.rpc.Status and its detail types, from the vendored protos.
// protobufjs ships google/protobuf/{any,duration}.proto itself.
const rpcRoot = new protobuf.Root();
rpcRoot.resolvePath = (_origin, target) => path.join(args.proto, target);
rpcRoot.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"]);
const Status = rpcRoot.lookupType("google.rpc.Status");

function decodeError(err) {
  const out = { code: grpc.status[err.code], message: err.details };
  const [raw] = err.metadata?.get("grpc-status-details-bin") ?? [];
  if (!raw) return out;
  const status = Status.decode(raw);
  out.details = status.details.map((any) => {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf("/") + 1);
    const message = rpcRoot.lookupType(typeName).decode(any.value);
    return { type: typeName, ...rpcRoot.lookupType(typeName).toObject(message, { longs: String, enums: String }) };
  });
  const info = out.details.find((d) => d.type === "google.rpc.ErrorInfo");
  if (info) {
    out.reason = info.reason;
    out.domain = info.domain;
    out.metadata = info.metadata;
  }
  const bad = out.details.find((d) => d.type === "google.rpc.BadRequest");
  if (bad) out.field_violations = bad.fieldViolations;
  return out;
}

// --- the connection -----------------------------------------------------------------

const credentials = grpc.credentials.createSsl(
  fs.readFileSync(args.ca),
  fs.readFileSync(args.key),
  fs.readFileSync(args.cert),
);
// An IP target (or any host the server certificate does not name) needs the name the
// certificate does carry, as the TLS target-name override.
const options = args["server-name"] ? { "grpc.ssl_target_name_override": args["server-name"] } : {};
const stubs = {
  CatalogService: new v1.CatalogService(args.target, credentials, options),
  QueryService: new v1.QueryService(args.target, credentials, options),
  SubjectService: new v1.SubjectService(args.target, credentials, options),
  AuditService: new v1.AuditService(args.target, credentials, options),
};

const called = new Set();

// No deadline: the call options are left empty on purpose.
function call(service, method, request) {
  called.add(`${service}/${method}`);
  return new Promise((resolve) => {
    stubs[service][method](request, (err, response) => {
      resolve(err ? { error: decodeError(err) } : { response });
    });
  });
}

// --- Arrow ----------------------------------------------------------------------------

function readArrow(result) {
  const table = tableFromIPC(result.ipc_stream);
  const rows = table.toArray().map((row) => row.toJSON());
  const first = rows[0] ?? {};
  return {
    row_count: result.row_count, // a string: longs: String
    num_rows: table.numRows,
    schema: table.schema.fields.map((f) => ({ name: f.name, type: String(f.type) })),
    // Int64 columns arrive as BigInt; the JSON below carries them as strings.
    js_types: Object.fromEntries(Object.entries(first).map(([k, v]) => [k, typeof v])),
    rows,
  };
}

// --- every RPC ----------------------------------------------------------------------

const report = { rpcs: [], called: [] };
for (const [name, ctor] of Object.entries(v1)) {
  if (typeof ctor === "function" && ctor.service) {
    for (const method of Object.keys(ctor.service)) report.rpcs.push(`${name}/${method}`);
  }
}

const list = await call("CatalogService", "ListDatasets", {});
report.list_datasets = list.error ?? {
  ids: list.response.datasets.map((d) => d.id),
  receipt: list.response.receipt,
};

const described = await call("CatalogService", "DescribeDataset", { dataset_id: args.dataset });
report.describe = described.error ?? {
  privacy_unit: described.response.dataset.privacy_unit,
  max_rows_per_unit: described.response.dataset.max_rows_per_unit,
  columns: described.response.columns.map((c) => ({
    name: c.name, type: c.type, classification: c.classification, allowed_uses: c.allowed_uses,
  })),
  grant: described.response.grant,
  tables: described.response.tables,
};

report.describe_other_zone = await call("CatalogService", "DescribeDataset", { dataset_id: args["other-dataset"] });

const dpQuery = {
  dataset: args.dataset,
  mode: "QUERY_MODE_DP",
  group_by: ["district"],
  aggregates: [{ function: "AGGREGATE_FUNCTION_COUNT" }, { function: "AGGREGATE_FUNCTION_MEAN", column: "tax_paid" }],
  privacy: { epsilon: 0.5 },
};

const estimate = await call("QueryService", "EstimateQuery", { query: dpQuery });
report.estimate = estimate.error ?? { spend: estimate.response.spend, accuracy: estimate.response.accuracy };

const run = await call("QueryService", "RunQuery", { query: dpQuery });
report.run = run.error ?? {
  table: readArrow(run.response.result),
  accuracy: run.response.accuracy,
  spend: run.response.spend,
  reused: run.response.reused,
  receipt: run.response.receipt,
};

const sqlText = `SELECT district, COUNT(*), AVG(tax_paid) FROM ${args.dataset} GROUP BY district`;
const sql = await call("QueryService", "RunQuery", {
  sql: { text: sqlText, mode: "QUERY_MODE_DP", privacy: { epsilon: 0.5 } },
});
report.run_sql = sql.error ?? { table: readArrow(sql.response.result), reused: sql.response.reused };

const exact = await call("QueryService", "RunQuery", {
  query: {
    dataset: args.dataset,
    mode: "QUERY_MODE_AGGREGATE",
    group_by: ["size_band"],
    aggregates: [{ function: "AGGREGATE_FUNCTION_COUNT_UNITS" }],
    filters: [{ column: "district", in_set: { values: [{ string_value: "Dongcheng" }, { string_value: "Xicheng" }] } }],
  },
});
report.run_exact = exact.error ?? { table: readArrow(exact.response.result), rows_suppressed: exact.response.rows_suppressed };

report.run_denied = await call("QueryService", "RunQuery", {
  query: {
    dataset: args.dataset, mode: "QUERY_MODE_AGGREGATE", group_by: ["enterprise_id"],
    aggregates: [{ function: "AGGREGATE_FUNCTION_COUNT" }],
  },
});

report.run_bad_sql = await call("QueryService", "RunQuery", {
  sql: { text: `SELECT COUNT(*)\nFROM ${args.dataset}\nWHERE district = 'A' OR size_band = 'small'`, mode: "QUERY_MODE_AGGREGATE" },
});

const budget = await call("QueryService", "GetBudget", {});
report.budget = budget.error ?? { budgets: budget.response.budgets };

// --- SubjectService -----------------------------------------------------------------

// A `bytes` field takes a Buffer; the consent artefact is passed through untouched.
function item(spec) {
  return { product_id: spec.product_id, subject_id: spec.subject_id, consent: Buffer.from(spec.consent, "base64") };
}

function evaluation(e) {
  return { product_id: e.product_id, consent_id: e.consent_id, data_version: e.data_version,
           outputs: e.outputs, outputs_hash: e.outputs_hash };
}

// Read the stream's first message, then cancel: a watch otherwise runs until every
// subject's consent ends. No deadline here either.
function watchFirst(request) {
  called.add("SubjectService/Watch");
  return new Promise((resolve) => {
    const out = {};
    const stream = stubs.SubjectService.Watch(request);
    stream.on("data", (message) => {
      if (out.first) return;
      out.first = { index: message.index, update: message.update, receipt: message.receipt,
                    evaluation: message.evaluation && evaluation(message.evaluation), ended: message.ended };
      stream.cancel();
    });
    stream.on("error", (err) => { out.closed = grpc.status[err.code]; resolve(out); });
    stream.on("end", () => { out.closed ??= "END"; resolve(out); });
  });
}

if (args.subjects) {
  const subjects = JSON.parse(fs.readFileSync(args.subjects, "utf8"));
  const evaluated = await call("SubjectService", "Evaluate", { item: item(subjects.evaluate) });
  report.evaluate = evaluated.error ?? {
    evaluation: evaluation(evaluated.response.evaluation), receipt: evaluated.response.receipt };
  report.evaluate_refused = await call("SubjectService", "Evaluate", { item: item(subjects.refused) });
  const batch = await call("SubjectService", "EvaluateBatch", { items: subjects.batch.map(item) });
  report.evaluate_batch = batch.error ?? {
    results: batch.response.results.map((r) => ({
      index: r.index, result: r.result, evaluation: r.evaluation && evaluation(r.evaluation), error: r.error })),
    receipt: batch.response.receipt,
  };
  report.watch = await watchFirst({ items: subjects.watch.map(item) });
}

// --- AuditService -------------------------------------------------------------------

const checkpoint = async () => {
  const got = await call("AuditService", "GetCheckpoint", {});
  return got.error ?? { checkpoint: got.response.checkpoint, receipt: got.response.receipt };
};
report.checkpoints = [await checkpoint()];
await call("CatalogService", "ListDatasets", {});
report.checkpoints.push(await checkpoint());
const sizeOf = (c) => c.checkpoint?.split("\n")[1];
const proof = await call("AuditService", "GetConsistencyProof", {
  first_size: sizeOf(report.checkpoints[0]), second_size: sizeOf(report.checkpoints[1]) });
report.consistency = proof.error ?? {
  proof: proof.response.proof.map((p) => Buffer.from(p).toString("base64")), receipt: proof.response.receipt };

report.called = [...called].sort();
for (const stub of Object.values(stubs)) stub.close();
process.stdout.write(JSON.stringify(report, (_k, v) => (typeof v === "bigint" ? v.toString() : v), 2) + "\n");
