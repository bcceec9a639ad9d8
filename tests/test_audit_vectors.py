"""The audit encoding other languages reproduce: RFC 8785 records, RFC 6962 tree, C2SP checkpoints.

docs/audit-test-vectors.json is checked against the code here, and recomputed in
plain Node.js (crypto module only) the way docs/audit.md tells a JS developer to.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import rfc8785

from dataops.audit.canonical import CanonicalError, canonical
from dataops.audit.merkle import (
    CompactRange,
    ProofError,
    Tree,
    leaf_hash,
    reference_root,
    verify_consistency,
    verify_inclusion,
)
from dataops.audit.note import parse_checkpoint
from dataops.audit.signing import load_public_key

REPO = Path(__file__).resolve().parent.parent
VECTORS = REPO / "docs" / "audit-test-vectors.json"
NODE = shutil.which("node")
sys.path.insert(0, str(REPO / "scripts"))
import gen_audit_vectors  # noqa: E402


def test_the_vector_file_is_what_the_code_computes():
    assert json.loads(VECTORS.read_text(encoding="utf-8")) == json.loads(gen_audit_vectors.render())


def test_the_vector_records_canonicalise_as_the_reference_rfc8785_library_does():
    for vector in json.loads(VECTORS.read_text(encoding="utf-8"))["records"]:
        assert canonical(vector["record"]) == rfc8785.dumps(vector["record"]) == vector["canonical"].encode()


def test_numbers_print_as_ecmascript_prints_them():
    assert (
        canonical([0.0, -0.0, 1.0, 0.1, 1e-7, 1.5e-5, 1e21, 1e20, 123.0, 2**53 - 1])
        == b"[0,0,1,0.1,1e-7,0.000015,1e+21,100000000000000000000,123,9007199254740991]"
    )
    rng = random.Random(9)
    for _ in range(20_000):
        value = struct.unpack("<d", rng.randbytes(8))[0]
        if math.isfinite(value):
            assert canonical(value) == rfc8785.dumps(value), value
        value = rng.random() * 10 ** rng.randint(-12, 24)
        assert canonical(value) == rfc8785.dumps(value), value
        record = {
            "x": value,
            "n": float(rng.randint(-(10**6), 10**6)),
            "s": "\u2028\x01é",
            "b": True,
            "z": None,
        }
        assert canonical(record) == rfc8785.dumps(record), record  # the flat-record fast path


def test_keys_sort_by_utf16_code_units_and_strings_escape_only_what_json_requires():
    value = {"\U0001f600": 1, "\ufffd": 2, "é": 3, "a": '\u2028\x01"\\\t\x7f'}
    assert canonical(value) == rfc8785.dumps(value)
    assert canonical(value).startswith('{"a":"\u2028\\u0001\\"\\\\\\t\x7f","é":3,"\U0001f600":1'.encode())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 2**53, {1: "x"}, b"bytes"])
def test_values_json_cannot_carry_exactly_are_refused(bad):
    with pytest.raises(CanonicalError):
        canonical({"v": bad})


def test_proofs_verify_and_a_wrong_leaf_or_root_does_not():
    leaves = [leaf_hash(b"%d" % i) for i in range(37)]
    tree, compact = Tree(), CompactRange()
    for i, leaf in enumerate(leaves):
        tree.append(leaf)
        compact.append(leaf)
        assert tree.root() == compact.root() == reference_root(leaves[: i + 1])
    for size in (1, 2, 5, 16, 37):
        for index in range(size):
            verify_inclusion(index, size, leaves[index], tree.inclusion_proof(index, size), tree.root(size))
        with pytest.raises(ProofError):
            verify_inclusion(0, size, leaf_hash(b"x"), tree.inclusion_proof(0, size), tree.root(size))
        for first in range(1, size + 1):
            verify_consistency(
                first, size, tree.root(first), tree.root(size), tree.consistency_proof(first, size)
            )
    with pytest.raises(ProofError, match="rewritten"):
        verify_consistency(5, 37, leaf_hash(b"x"), tree.root(37), tree.consistency_proof(5, 37))
    with pytest.raises(ProofError, match="rolled back"):
        verify_consistency(37, 5, tree.root(37), tree.root(5), [])


def test_the_vector_checkpoint_verifies_and_pins_the_root(tmp_path):
    vectors = json.loads(VECTORS.read_text(encoding="utf-8"))
    key_file = tmp_path / "test.pub"
    key_file.write_text(vectors["checkpoint"]["public_key_pem"])
    cp = parse_checkpoint(vectors["checkpoint"]["note"], load_public_key(key_file))
    assert cp.root.hex() == vectors["tree"]["roots"][str(cp.size)]
    assert cp.ledger == vectors["ledger"]["digest"]


def test_plain_node_recomputes_every_vector():
    run = subprocess.run(
        [NODE, str(REPO / "tests" / "js" / "audit_vectors.mjs"), str(VECTORS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("OK 7 records")


def test_with_pythons_json_dumps_as_the_encoding_node_disagrees(tmp_path, monkeypatch):
    # Issue 10's failure, with the control switched off: json.dumps writes 0.0 where JS writes 0.
    def python_json(value):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    monkeypatch.setattr(gen_audit_vectors, "canonical", python_json)
    monkeypatch.setattr("dataops.audit.log.canonical", python_json)
    vectors = tmp_path / "vectors.json"
    vectors.write_text(gen_audit_vectors.render(), encoding="utf-8")
    run = subprocess.run(
        [NODE, str(REPO / "tests" / "js" / "audit_vectors.mjs"), str(vectors)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1 and "record 1: canonical" in run.stdout
