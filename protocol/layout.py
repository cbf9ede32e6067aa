"""Block-aligned slot layout: where each record sits in the CKKS slots. Plain numpy.

For one blocking pass with K buckets of P slots, bucket b owns the P
consecutive slots starting at b * P, and the slots are cut into groups of
``SLOTS`` (one ciphertext per dimension per group). The layout is public: it
follows from K and P alone, so the server learns nothing about which bucket a
client record is in, and every bucket looks full.

- Client: the records of bucket b fill its P slots in file order; a record
  beyond the P-th of its bucket takes no part in this pass. For group g and
  dimension k the client encrypts the vector whose slot s holds component k of
  the record in slot s (zero for an empty slot).
- Server: the records of bucket b, shuffled per session, are its positions
  0, 1, ...; group g has Q_g positions, the size of its largest bucket. For
  position q and dimension k the server's plaintext holds, in every slot of
  bucket b, component k of the q-th record of b (zero if b has fewer).
  With a depth D (see :func:`server_depth`) every group has exactly D
  positions, and a server record beyond the D-th of its bucket, in file order,
  sits the pass out: the mirror of the client's rule. Then the work of a pass
  no longer follows its most common key, and Q_g tells the client only D.

Then sum over k of ciphertext(g, k) * plaintext(g, q, k) holds, in slot s, the
score of the client record in s against the q-th server record of its own
bucket: every bucket at once, and no rotation.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

SLOTS = 4096
SIZE_QUANTUM = 1024


def padded_count(records: int) -> int:
    """The client's record count rounded up to a multiple of 1024.

    This is all the server learns of the client's size.
    """
    return max(SIZE_QUANTUM, -(-records // SIZE_QUANTUM) * SIZE_QUANTUM)


def bucket_count(
    client_records: int, slots_per_bucket: int, capacity_factor: float
) -> int:
    """The smallest K of whole slot groups that gives ``capacity_factor`` slots
    per client record: a multiple of SLOTS / slots_per_bucket, at least one.
    """
    per_group = SLOTS // slots_per_bucket
    wanted = math.ceil(max(client_records, 1) * capacity_factor / slots_per_bucket)
    return per_group * max(1, -(-wanted // per_group))


@dataclass(frozen=True)
class PassShape:
    """What both sides agree on for one pass: K buckets of P slots."""

    buckets: int
    slots_per_bucket: int

    @property
    def groups(self) -> int:
        return self.buckets * self.slots_per_bucket // SLOTS

    @property
    def buckets_per_group(self) -> int:
        return SLOTS // self.slots_per_bucket


def client_slots(bucket_of: np.ndarray, shape: PassShape) -> np.ndarray:
    """Global slot of every client record in this pass, or -1 if it sits out."""
    slot = np.full(len(bucket_of), -1, dtype=np.int64)
    filled = np.zeros(shape.buckets, dtype=np.int64)
    for row, bucket in enumerate(bucket_of):
        if bucket >= 0 and filled[bucket] < shape.slots_per_bucket:
            slot[row] = bucket * shape.slots_per_bucket + filled[bucket]
            filled[bucket] += 1
    return slot


def client_group_matrix(
    vectors: np.ndarray, slot: np.ndarray, group: int
) -> np.ndarray:
    """(dims, SLOTS) matrix of group ``group``: column s is the record in slot s."""
    out = np.zeros((vectors.shape[1], SLOTS), dtype=np.float64)
    here = (slot >= group * SLOTS) & (slot < (group + 1) * SLOTS)
    out[:, slot[here] - group * SLOTS] = vectors[here].T
    return out


def server_depth(keyed_records: int, buckets: int, factor: float) -> int:
    """Positions per group: ``factor`` times the mean bucket depth, plus 2.

    The mean is taken over the server's count of records with a key in this
    pass rounded up to a multiple of 1024, so that the depth, which the client
    sees, says no more about the server's size than the client's padded count
    says about the client's. The 2 keeps shallow buckets from being cut by
    chance.
    """
    return math.ceil(factor * padded_count(keyed_records) / buckets) + 2


def server_positions(
    bucket_of: np.ndarray,
    shape: PassShape,
    depth: int | None = None,
    shuffle: bool = True,
) -> list[np.ndarray]:
    """For each group, a (Q_g, SLOTS) array of server record indices, -1 = none.

    Q_g is ``depth`` if given (members beyond it sit out, see
    :func:`bucket_members`), else the group's largest bucket. Members of each
    bucket are shuffled with a cryptographic source, so a position names no
    server record outside this session.
    """
    rows, bucket = _sorted_members(bucket_of, depth)
    if shuffle:
        # Sorting by a 64-bit key from the OS's cryptographic source within
        # each bucket draws a uniform permutation of its members.
        keys = np.frombuffer(secrets.token_bytes(8 * len(rows)), dtype=np.uint64)
        order = np.lexsort((keys, bucket))
        rows, bucket = rows[order], bucket[order]
    per_group = shape.buckets_per_group
    groups = []
    for g in range(shape.groups):
        lo, hi = np.searchsorted(bucket, [g * per_group, (g + 1) * per_group])
        local = bucket[lo:hi] - g * per_group
        rank_here = np.arange(hi - lo) - np.searchsorted(local, local)
        if depth is not None:
            rows_here = depth
        else:
            rows_here = int(rank_here.max()) + 1 if hi > lo else 0
        table = np.full((rows_here, per_group), -1, dtype=np.int64)
        table[rank_here, local] = rows[lo:hi]
        groups.append(np.repeat(table, shape.slots_per_bucket, axis=1))
    return groups


def bucket_members(
    bucket_of: np.ndarray, buckets: int, depth: int | None = None
) -> list[np.ndarray]:
    """Server rows of every bucket in file order, the first ``depth`` of each."""
    rows, bucket = _sorted_members(bucket_of, depth)
    edges = np.searchsorted(bucket, np.arange(buckets + 1))
    return [rows[edges[b] : edges[b + 1]] for b in range(buckets)]


def _sorted_members(
    bucket_of: np.ndarray, depth: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Rows with a bucket, sorted by bucket then file order, and their buckets;
    only the first ``depth`` of each bucket when it is given."""
    bucket_of = np.asarray(bucket_of, dtype=np.int64)
    rows = np.flatnonzero(bucket_of >= 0)
    order = np.argsort(bucket_of[rows], kind="stable")
    rows = rows[order]
    bucket = bucket_of[rows]
    rank = np.arange(len(rows)) - np.searchsorted(bucket, bucket)
    if depth is not None:
        keep = rank < depth
        rows, bucket = rows[keep], bucket[keep]
    return rows, bucket


def server_plain_matrix(vectors: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(dims, SLOTS) plaintext values for one position row (zeros where -1)."""
    out = vectors[np.maximum(positions, 0)].T.astype(np.float64)
    out[:, positions < 0] = 0.0
    return out


def server_value_row(
    values: np.ndarray, positions: np.ndarray, fill: float = 0.0
) -> np.ndarray:
    """Per-slot value of the server record at each slot of one position row.

    Slots with no record (-1) get ``fill``; the dtype of ``values`` is kept.
    """
    out = values[np.maximum(positions, 0)]
    out[positions < 0] = fill
    return out


def query_count(dims: int) -> int:
    """Query ciphertexts per group: two dimensions per ciphertext."""
    return (dims + 1) // 2


def pair_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows 2j and 2j+1 as the real and imaginary parts of complex row j.

    A CKKS slot is a complex number. The client packs two dimensions per slot,
    a + ib; the server multiplies by c - id, whose product has real part
    ac + bd: two dimensions of the dot product per multiplication. The
    imaginary part, bc - ad, is removed before anything leaves the server.
    """
    if len(matrix) % 2:
        matrix = np.vstack([matrix, np.zeros((1, matrix.shape[1]))])
    return matrix[0::2] + 1j * matrix[1::2]
