"""The log as an RFC 6962 Merkle tree (as Certificate Transparency keeps it).

    leaf hash  = SHA-256(0x00 || leaf bytes)        (the record's canonical line)
    node hash  = SHA-256(0x01 || left || right)
    MTH(D[0:n]) splits at k, the largest power of two below n (RFC 6962 §2.1)

`Tree` holds every perfect subtree's hash, so roots, inclusion proofs and
consistency proofs at any size up to the current one cost O(log n) lookups; a
suffix cache makes the right edge cheap too. The verifiers are RFC 9162 §2.1.3.2 and
§2.1.4.2, written as there, with no knowledge of `Tree`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

__all__ = [
    "EMPTY_ROOT",
    "CompactRange",
    "ProofError",
    "Tree",
    "leaf_hash",
    "node_hash",
    "root_from_inclusion",
    "verify_consistency",
    "verify_inclusion",
]

EMPTY_ROOT = hashlib.sha256(b"").digest()


class ProofError(ValueError):
    """A proof that does not verify, or asks for sizes the tree does not have."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class Tree:
    """An append-only Merkle tree over leaf hashes, kept in memory.

    `levels[h]` holds the hashes of the complete subtrees of 2**h leaves, 32 bytes
    each, in one bytearray (a list of bytes objects would cost three times the memory).
    """

    def __init__(self) -> None:
        self.levels: list[bytearray] = [bytearray()]
        self._cache: dict[tuple[int, int], bytes] = {}

    def __len__(self) -> int:
        return len(self.levels[0]) // 32

    def append(self, leaf: bytes) -> None:
        self.levels[0] += leaf
        index, height, node = len(self) - 1, 0, leaf
        while index & 1:  # this leaf completes subtrees: hash them upwards
            left = self._node(height, index - 1)
            node = node_hash(left, node)
            index >>= 1
            height += 1
            if len(self.levels) == height:
                self.levels.append(bytearray())
            self.levels[height] += node

    def truncate(self, size: int) -> None:
        """Forget leaves from `size` on (a batch whose fsync failed)."""
        for height, level in enumerate(self.levels):
            del level[(size >> height) * 32 :]
        self._cache = {k: v for k, v in self._cache.items() if k[1] <= size}

    def _node(self, height: int, index: int) -> bytes:
        return bytes(self.levels[height][index * 32 : (index + 1) * 32])

    def leaf(self, index: int) -> bytes:
        return self._node(0, index)

    def hash(self, lo: int, hi: int) -> bytes:
        """MTH of leaves [lo, hi); the ranges RFC 6962's recursion visits are aligned."""
        n = hi - lo
        if n == 0:
            return EMPTY_ROOT
        if n & (n - 1) == 0 and lo % n == 0:
            return self._node(n.bit_length() - 1, lo // n)
        cached = self._cache.get((lo, hi))
        if cached is None:
            k = _split(n)
            cached = node_hash(self.hash(lo, lo + k), self.hash(lo + k, hi))
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[(lo, hi)] = cached
        return cached

    def root(self, size: int | None = None) -> bytes:
        size = len(self) if size is None else size
        self._check(size)
        return self.hash(0, size)

    def _check(self, *sizes: int) -> None:
        for size in sizes:
            if not 0 <= size <= len(self):
                raise ProofError(f"tree size {size} is beyond the log's {len(self)} records")

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """PATH(index, D[0:size]) of RFC 6962 §2.1.1."""
        self._check(size)
        if not 0 <= index < size:
            raise ProofError(f"leaf {index} is not in a tree of size {size}")
        path: list[bytes] = []
        lo, hi = 0, size
        while hi - lo > 1:
            k = _split(hi - lo)
            if index < lo + k:
                path.append(self.hash(lo + k, hi))
                hi = lo + k
            else:
                path.append(self.hash(lo, lo + k))
                lo += k
        path.reverse()
        return path

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """PROOF(first, D[0:second]) of RFC 6962 §2.1.2."""
        self._check(first, second)
        if not 0 < first <= second:
            if first == 0:
                return []
            raise ProofError(f"no consistency proof from size {first} to the smaller size {second}")
        return self._subproof(first, 0, second, True)

    def _subproof(self, m: int, lo: int, hi: int, complete: bool) -> list[bytes]:
        n = hi - lo
        if m == n:
            return [] if complete else [self.hash(lo, hi)]
        k = _split(n)
        if m <= k:
            return self._subproof(m, lo, lo + k, complete) + [self.hash(lo + k, hi)]
        return self._subproof(m - k, lo + k, hi, False) + [self.hash(lo, lo + k)]


class CompactRange:
    """The root of a growing tree in O(log n) memory, for one pass over a log."""

    def __init__(self) -> None:
        self.size = 0
        self._stack: list[tuple[int, bytes]] = []  # (height, hash) of perfect subtrees, left to right

    def append(self, leaf: bytes) -> None:
        height, node = 0, leaf
        while self._stack and self._stack[-1][0] == height:
            node = node_hash(self._stack.pop()[1], node)
            height += 1
        self._stack.append((height, node))
        self.size += 1

    @classmethod
    def resume(cls, size: int, hashes: Sequence[bytes]) -> CompactRange:
        """Continue from the perfect subtrees of the first `size` leaves (left to right)."""
        heights = [h for h in range(size.bit_length() - 1, -1, -1) if size >> h & 1]
        if len(heights) != len(hashes):
            raise ProofError(f"{len(hashes)} subtree hashes cannot summarise {size} leaves")
        cr = cls()
        cr.size, cr._stack = size, list(zip(heights, hashes))
        return cr

    def hashes(self) -> list[bytes]:
        return [h for _, h in self._stack]

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        node = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            node = node_hash(left, node)
        return node


def root_from_inclusion(index: int, size: int, leaf: bytes, path: Sequence[bytes]) -> bytes:
    """The root `path` proves for `leaf` at `index` in a tree of `size` (RFC 9162 §2.1.3.2)."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not below tree size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            raise ProofError("the inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the inclusion proof is too short")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, path: Sequence[bytes], root: bytes) -> None:
    if root_from_inclusion(index, size, leaf, path) != root:
        raise ProofError(f"leaf {index} is not in the tree of size {size} with that root")


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> None:
    """Raise ProofError unless the tree (second, second_root) extends (first, first_root).

    RFC 9162 §2.1.4.2.
    """
    if first > second:
        raise ProofError(
            f"a tree of size {second} cannot extend one of size {first}: the log was rolled back"
        )
    if first == second:
        if proof:
            raise ProofError("a proof between equal sizes must be empty")
        if first_root != second_root:
            raise ProofError(f"two different roots for the same size {first}: the log was rewritten (a fork)")
        return
    if first == 0:
        if proof:
            raise ProofError("a proof from the empty tree must be empty")
        return
    proof = list(proof)
    if first & (first - 1) == 0:  # a power of two: the first tree is a node of the second
        proof.insert(0, first_root)
    if not proof:
        raise ProofError("empty consistency proof")
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            raise ProofError("the consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the consistency proof is too short")
    if fr != first_root:
        raise ProofError(
            f"the tree of size {second} does not contain the tree of size {first} that was "
            "signed: the log was rewritten"
        )
    if sr != second_root:
        raise ProofError(f"the consistency proof does not lead to the root of size {second}")


def reference_root(leaves: Iterable[bytes]) -> bytes:
    """MTH by the definition, for tests: hashes of the leaves given."""
    leaves = list(leaves)
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return node_hash(reference_root(leaves[:k]), reference_root(leaves[k:]))
