// Recompute a real audit log in plain Node.js, as docs/audit.md describes: every record's
// hash, its Merkle leaf, and the root of the last kept checkpoint.
//   node tests/js/audit_log.mjs STATE/audit/audit.jsonl STATE/audit/checkpoints.jsonl
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";

const sha256 = (...parts) => { const h = createHash("sha256"); for (const p of parts) h.update(p); return h.digest(); };
const canonical = (v) => v === null || typeof v !== "object" ? JSON.stringify(v)
  : Array.isArray(v) ? "[" + v.map(canonical).join(",") + "]"
  : "{" + Object.keys(v).sort().map((k) => JSON.stringify(k) + ":" + canonical(v[k])).join(",") + "}";
const node = (l, r) => sha256(Buffer.from([1]), l, r);
function mth(leaves) {
  if (leaves.length === 1) return leaves[0];
  let k = 1; while (k * 2 < leaves.length) k *= 2;
  return node(mth(leaves.slice(0, k)), mth(leaves.slice(k)));
}

const lines = readFileSync(process.argv[2], "utf8").split("\n").filter((l) => l);
let bad = 0;
const leaves = lines.map((line, i) => {
  const record = JSON.parse(line);
  const { hash, ...rest } = record;
  if (createHash("sha256").update(canonical(rest)).digest("hex") !== hash) bad++;
  if (canonical(record) !== line) { bad++; console.log(`line ${i + 1}: canonical form differs`); }
  return sha256(Buffer.from([0]), Buffer.from(canonical(record), "utf8"));
});
const kept = readFileSync(process.argv[3], "utf8").split("\n").filter((l) => l).map((l) => JSON.parse(l));
const last = kept[kept.length - 1].note.split("\n");
const size = Number(last[1]);
const rootOk = Buffer.from(last[2], "base64").equals(mth(leaves.slice(0, size)));
if (bad || !rootOk) { console.log(`FAIL ${bad} of ${lines.length} records, root ${rootOk ? "ok" : "differs"}`); process.exit(1); }
console.log(`OK ${lines.length} records, root of ${size} matches`);
