"""The linkage rule in plaintext, for tests and benchmarks only.

The same encoding, blocking, slot capacity and threshold as the encrypted run,
so that the two can be compared decision by decision. The rule:

1. In each pass, a client record with a slot is compared with every server
   record in its bucket (the first D of them, in file order, when the
   specification sets a server depth); a pair is a candidate when its score
   passes the threshold (inclusive or not, as the specification says).
2. A client record links to all of its candidates in the first pass, in
   specification order, in which it has any; later passes are not used for it,
   so that one pair found by two passes counts once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .encoding import KeyHashes, encode_records, key_hashes, key_strings
from .layout import (
    PassShape,
    bucket_count,
    bucket_members,
    client_slots,
    padded_count,
    server_depth,
)
from .spec import LinkageSpec


@dataclass(frozen=True)
class PreparedRecords:
    """One side's hash vectors and hashed blocking keys (one per pass)."""

    vectors: np.ndarray
    keys: tuple[KeyHashes, ...]

    def __len__(self) -> int:
        return len(self.vectors)

    def buckets(self, shapes: list[PassShape]) -> list[np.ndarray]:
        return [keys.buckets(shape.buckets) for keys, shape in zip(self.keys, shapes)]


def prepare(columns: dict[str, list], spec: LinkageSpec) -> PreparedRecords:
    """Encode records given as {spec field name: list of values}."""
    vectors = encode_records(columns, spec)
    keys = tuple(
        key_hashes(key_strings(columns, blocking), blocking) for blocking in spec.passes
    )
    return PreparedRecords(vectors=vectors, keys=keys)


def pass_shapes(spec: LinkageSpec, size_class: int) -> list[PassShape]:
    """The pass shapes both sides derive from the client's padded record count."""
    return [
        PassShape(
            bucket_count(size_class, p.slots_per_bucket, spec.capacity_factor),
            p.slots_per_bucket,
        )
        for p in spec.passes
    ]


def server_depths(
    spec: LinkageSpec, server_buckets: list[np.ndarray], shapes: list[PassShape]
) -> list[int | None]:
    """Positions per group of each pass (None: the deepest bucket of each group)."""
    if spec.depth_factor is None:
        return [None] * len(shapes)
    return [
        server_depth(int(np.count_nonzero(b >= 0)), shape.buckets, spec.depth_factor)
        for b, shape in zip(server_buckets, shapes)
    ]


def reference_candidates(
    spec: LinkageSpec, client: PreparedRecords, server: PreparedRecords
) -> list[dict[int, list[int]]]:
    """Per pass: client row -> server rows whose score passes the threshold."""
    shapes = pass_shapes(spec, padded_count(len(client)))
    server_buckets = server.buckets(shapes)
    found = []
    for shape, c_bucket, s_bucket, depth in zip(
        shapes,
        client.buckets(shapes),
        server_buckets,
        server_depths(spec, server_buckets, shapes),
    ):
        slot = client_slots(c_bucket, shape)
        members = {
            b: rows
            for b, rows in enumerate(bucket_members(s_bucket, shape.buckets, depth))
            if len(rows)
        }
        found.append(_pass_candidates(spec, client, server, c_bucket, slot, members))
    return found


def _pass_candidates(
    spec, client, server, c_bucket, slot, members
) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for row in np.flatnonzero(slot >= 0):
        rows = members.get(int(c_bucket[row]))
        if rows is None:
            continue
        scores = server.vectors[rows].astype(np.float64) @ client.vectors[row].astype(
            np.float64
        )
        hits = [int(r) for r, s in zip(rows, scores) if spec.is_match(float(s))]
        if hits:
            out[int(row)] = hits
    return out


def first_pass_links(candidates: list[dict[int, list[int]]]) -> list[tuple[int, int]]:
    """Apply step 2 of the rule: each client row keeps its first pass's candidates."""
    links: list[tuple[int, int]] = []
    done: set[int] = set()
    for per_pass in candidates:
        for row in sorted(per_pass):
            if row not in done:
                done.add(row)
                links += [(row, s) for s in per_pass[row]]
    return links


def first_pass_decisions(
    candidates: list[dict[int, list]], records: int
) -> list[list[int]]:
    """Per client row: [first pass with a candidate or -1, its candidates there].

    Works on the plaintext rule's candidates (server rows) and on the encrypted
    run's (server positions) alike, so the two can be compared row by row.
    """
    out = [[-1, 0] for _ in range(records)]
    for index, found in enumerate(candidates):
        for row, hits in found.items():
            if out[row][0] < 0:
                out[row] = [index, len(hits)]
    return out


def reference_links(
    spec: LinkageSpec, client: PreparedRecords, server: PreparedRecords
) -> list[tuple[int, int]]:
    return first_pass_links(reference_candidates(spec, client, server))


def link_quality(links: list[tuple[int, int]], truth: set[tuple[int, int]]) -> dict:
    """Precision, recall and F1 of a set of (client row, server row) links."""
    found = set(links)
    true_positives = len(found & truth)
    precision = true_positives / len(found) if found else 0.0
    recall = true_positives / len(truth) if truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if true_positives else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "links": len(found)}
