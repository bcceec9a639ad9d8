// Recompute docs/audit-test-vectors.json in plain Node.js (the crypto module only, no npm),
// as a JavaScript developer following docs/audit.md would. Exit 0 when every value matches.
//   node tests/js/audit_vectors.mjs docs/audit-test-vectors.json
import { createHash, createPublicKey, verify } from "node:crypto";
import { readFileSync } from "node:fs";

const vectors = JSON.parse(readFileSync(process.argv[2], "utf8"));
const sha256 = (...parts) => { const h = createHash("sha256"); for (const p of parts) h.update(p); return h.digest(); };
const hex = (b) => Buffer.from(b).toString("hex");

// RFC 8785 for the values JSON.parse gives: JSON.stringify already prints numbers as
// ECMAScript does and escapes strings as JCS does; only key order needs sorting
// (Array.prototype.sort compares UTF-16 code units, as JCS requires).
function canonical(value) {
  if (value === null || typeof value !== "object") return JSON.stringify(value);
  if (Array.isArray(value)) return "[" + value.map(canonical).join(",") + "]";
  return "{" + Object.keys(value).sort().map((k) => JSON.stringify(k) + ":" + canonical(value[k])).join(",") + "}";
}

const leafHash = (bytes) => sha256(Buffer.from([0]), bytes);
const nodeHash = (l, r) => sha256(Buffer.from([1]), l, r);
const split = (n) => { let k = 1; while (k * 2 < n) k *= 2; return k; };
function mth(leaves) {  // RFC 6962 section 2.1
  if (leaves.length === 0) return sha256(Buffer.alloc(0));
  if (leaves.length === 1) return leaves[0];
  const k = split(leaves.length);
  return nodeHash(mth(leaves.slice(0, k)), mth(leaves.slice(k)));
}
function rootFromInclusion(index, size, leaf, path) {  // RFC 9162 section 2.1.3.2
  let fn = index, sn = size - 1, r = leaf;
  for (const p of path) {
    if (sn === 0) throw new Error("proof too long");
    if (fn % 2 === 1 || fn === sn) {
      r = nodeHash(p, r);
      if (fn % 2 === 0) while (fn !== 0 && fn % 2 === 0) { fn = Math.floor(fn / 2); sn = Math.floor(sn / 2); }
    } else r = nodeHash(r, p);
    fn = Math.floor(fn / 2); sn = Math.floor(sn / 2);
  }
  if (sn !== 0) throw new Error("proof too short");
  return r;
}
function verifyConsistency(first, second, firstRoot, secondRoot, proof) {  // RFC 9162 section 2.1.4.2
  if (first === second) return proof.length === 0 && firstRoot.equals(secondRoot);
  if ((first & (first - 1)) === 0) proof = [firstRoot, ...proof];
  let fn = first - 1, sn = second - 1;
  while (fn % 2 === 1) { fn = Math.floor(fn / 2); sn = Math.floor(sn / 2); }
  let fr = proof[0], sr = proof[0];
  for (const c of proof.slice(1)) {
    if (sn === 0) return false;
    if (fn % 2 === 1 || fn === sn) {
      fr = nodeHash(c, fr); sr = nodeHash(c, sr);
      if (fn % 2 === 0) while (fn !== 0 && fn % 2 === 0) { fn = Math.floor(fn / 2); sn = Math.floor(sn / 2); }
    } else sr = nodeHash(sr, c);
    fn = Math.floor(fn / 2); sn = Math.floor(sn / 2);
  }
  return sn === 0 && fr.equals(firstRoot) && sr.equals(secondRoot);
}

const failures = [];
const check = (ok, what) => { if (!ok) failures.push(what); };
const leaves = [];
vectors.records.forEach((v, i) => {
  const { hash, ...withoutHash } = v.record;
  const bodyText = canonical(withoutHash);
  check(bodyText === v.canonical_without_hash, `record ${i + 1}: canonical without hash\n  js: ${bodyText}\n  py: ${v.canonical_without_hash}`);
  check(hex(sha256(Buffer.from(bodyText, "utf8"))) === v.record_hash && hash === v.record_hash, `record ${i + 1}: record hash`);
  const line = Buffer.from(canonical(v.record), "utf8");
  check(line.toString("utf8") === v.canonical, `record ${i + 1}: canonical\n  js: ${line}\n  py: ${v.canonical}`);
  check(hex(leafHash(line)) === v.leaf_hash, `record ${i + 1}: leaf hash`);
  leaves.push(leafHash(line));
});
for (const [size, root] of Object.entries(vectors.tree.roots)) {
  check(hex(mth(leaves.slice(0, Number(size)))) === root, `root of size ${size}`);
}
for (const p of vectors.tree.inclusion) {
  const root = rootFromInclusion(p.index, p.size, leaves[p.index], p.path.map((h) => Buffer.from(h, "hex")));
  check(hex(root) === vectors.tree.roots[p.size], `inclusion of ${p.index} in ${p.size}`);
}
for (const p of vectors.tree.consistency) {
  const ok = verifyConsistency(p.first, p.second, mth(leaves.slice(0, p.first)), mth(leaves.slice(0, p.second)),
    p.proof.map((h) => Buffer.from(h, "hex")));
  check(ok, `consistency ${p.first} -> ${p.second}`);
}
check(hex(sha256(Buffer.from(canonical(vectors.ledger.totals), "utf8"))) === vectors.ledger.digest, "ledger digest");

// The checkpoint: a C2SP signed note. Text up to the blank line; "— name base64(keyhash4 || sig)".
const note = vectors.checkpoint.note;
const [text, sigs] = note.split("\n\n");
const [origin, size, rootB64, ...ext] = text.split("\n");
check(Buffer.from(rootB64, "base64").toString("hex") === vectors.tree.roots[size], "checkpoint root");
check(ext.includes(`ledger ${vectors.ledger.digest}`), "checkpoint ledger line");
const key = createPublicKey(vectors.checkpoint.public_key_pem);
const raw = key.export({ format: "der", type: "spki" }).subarray(-32);
const sigLine = sigs.trim().split("\n")[0];
check(sigLine.startsWith("\u2014 " + origin + " "), "signature line names the origin");
const blob = Buffer.from(sigLine.split(" ").pop(), "base64");
check(blob.subarray(0, 4).equals(sha256(Buffer.from(origin + "\n"), Buffer.from([1]), raw).subarray(0, 4)), "key hash");
check(verify(null, Buffer.from(text + "\n", "utf8"), key, blob.subarray(4)), "Ed25519 signature");
const tampered = Buffer.from(text.replace(`\n${size}\n`, `\n${Number(size) - 1}\n`) + "\n", "utf8");
check(!verify(null, tampered, key, blob.subarray(4)), "a tampered checkpoint must not verify");

if (failures.length) { console.log("FAIL\n" + failures.join("\n")); process.exit(1); }
console.log(`OK ${vectors.records.length} records, ${vectors.tree.inclusion.length} inclusion and ${vectors.tree.consistency.length} consistency proofs, checkpoint signature`);
