"""Phase 2, linkage: scores under encryption, blinded so that only signs can be read.

What crosses the wire, for every blocking pass and every group of its slot
layout (see :mod:`.layout`); the client streams its groups and the server
answers each as it comes:

- C -> S: ceil(dims / 2) QUERY_CT, the client's records of that group, two
  dimensions per ciphertext (real and imaginary part of each slot; fresh, at
  the last level, one 60-bit prime, scale 2^27).
- S -> C: Q_g SCORE_CT, one per server position q, at the same level and
  scale 2^53. Slot s holds 2 r_s (score(s, q) - threshold) + e_s, where
  score(s, q) is the dot product of the client record in slot s with the q-th
  server record of its bucket, r_s = 2^u with u uniform in [-4, 4) drawn
  afresh for every slot of every ciphertext, and e_s is noise far below
  CKKS's precision of a decision.
  The factors are folded into the server's plaintexts (scale 2^26), so
  blinding costs no level, and nothing is rescaled: the products use no level
  at all, which is why the queries travel at the last one, half the bytes and
  half the arithmetic of the top level. The price is precision: the score is
  exact to about 3e-5 (the benchmark counts decisions that differ from the
  plaintext rule's), and 2^53 times the largest blinded value, 2 * 16 * 1.55,
  stays under half the prime, 2^59. The imaginary part (cross terms of the
  two packed dimensions, which would tell the client about the server's
  vectors) is cancelled by adding the complex conjugate; a fresh encryption
  of zero is added last.

Who learns what:

- The server sees only ciphertexts. Their count follows from the public layout
  (the client's padded size and the specification), never from which slots are
  filled, so it learns neither the client's records nor its block sizes.
- The client learns, per own record and per server position in its bucket,
  one sign: match or not. Fresh factors hide the score and keep even the order
  of one record's candidates from it. It learns Q_g: with a server depth in
  the specification, that depth (a function of the server's record count
  rounded up to 1024, see :func:`.layout.server_depth`), else the size of the
  largest server bucket of the group. Nothing names a server record:
  positions are shuffled per session.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import tenseal.sealapi as sa

from .blinding import log_uniform_factors, small_noise
from .framing import ProtocolError
from .he import LAST, Ckks, PublicKeyHolder
from .layout import SLOTS, server_plain_matrix

if TYPE_CHECKING:
    from .executor import Worker

logger = logging.getLogger(__name__)

SCORE_FACTOR_EXPONENTS = (-4.0, 4.0)
SCORE_NOISE = 2.0**-30
QUERY_LEVEL = LAST
QUERY_SCALE = 2.0**27
PLAIN_SCALE = 2.0**26
SCORE_SCALE = QUERY_SCALE * PLAIN_SCALE


def load_query(ckks: Ckks, data: bytes) -> sa.Ciphertext:
    """A client's query ciphertext, checked (see Ckks.load_ciphertext_untrusted)."""
    return ckks.load_ciphertext_untrusted(data, QUERY_LEVEL, QUERY_SCALE)


def load_score(ckks: Ckks, data: bytes) -> sa.Ciphertext:
    """A server's score ciphertext, checked likewise."""
    return ckks.load_ciphertext_untrusted(data, QUERY_LEVEL, SCORE_SCALE)


def score_position(
    ckks: Ckks,
    public: PublicKeyHolder,
    queries: list[sa.Ciphertext],
    plains: np.ndarray,
    threshold: float,
) -> sa.Ciphertext:
    """Blinded 2r(score - threshold) of every slot against one server position.

    ``queries`` are the client's paired ciphertexts; ``plains`` the (dims,
    SLOTS) real matrix of this position. Needs the public side's Galois keys.
    """
    factors = log_uniform_factors(SLOTS, *SCORE_FACTOR_EXPONENTS)
    paired, used = _conjugate_pairs(plains, factors)
    evaluator, acc = ckks.evaluator, None
    try:
        for j in np.flatnonzero(used):
            plain = ckks.encode(paired[j], QUERY_LEVEL, PLAIN_SCALE)
            acc = ckks.multiply_add(acc, queries[j], plain)
    except RuntimeError as exc:
        # SEAL refuses a sum whose random half cancels out: fresh encryptions
        # never do that, one ciphertext sent for several dimensions can.
        raise ProtocolError(f"queries refused: {exc} (a repeated ciphertext?)") from exc
    if acc is None:
        # No server record at this position has a non-zero vector: every score is 0.
        acc = public.encrypt_zero(queries[0])
        acc.scale = SCORE_SCALE
    ckks.add_conjugate(acc, public.galois_keys)
    offset = -2.0 * threshold * factors + small_noise(SLOTS, SCORE_NOISE)
    evaluator.add_plain_inplace(acc, ckks.encode(offset, QUERY_LEVEL, acc.scale))
    public.rerandomise(acc)
    return acc


def _conjugate_pairs(
    plains: np.ndarray, factors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """conj(pair_rows(plains)) * factors, and which rows are not all zero.

    The same as the composition, in one pass over the matrix (this is on the
    server's hot path: once per position).
    """
    real, imag = plains[0::2], plains[1::2]
    paired = np.zeros((len(real), plains.shape[1]), dtype=np.complex128)
    np.multiply(real, factors, out=paired.real)
    np.multiply(imag, -factors, out=paired.imag[: len(imag)])
    used = np.any(real != 0, axis=1)
    used[: len(imag)] |= np.any(imag != 0, axis=1)
    return paired, used


# -- the server's worker processes ----------------------------------------------


def score_rows(
    worker: Worker, query_bytes: list[bytes], rows: np.ndarray
) -> list[bytes]:
    """Worker task: score ciphertexts for several position rows of one group."""
    ckks, public, setup = worker.ckks, worker.public, worker.setup
    queries = [load_query(ckks, b) for b in query_bytes]
    return [
        ckks.to_bytes(
            score_position(
                ckks,
                public,
                queries,
                server_plain_matrix(setup.vectors, row),
                setup.threshold,
            )
        )
        for row in rows
    ]


# -- the client's side ------------------------------------------------------------


def slot_owners(slot: np.ndarray, group: int) -> np.ndarray:
    """Client row in each slot of ``group`` (-1 for padding)."""
    owner = np.full(SLOTS, -1, dtype=np.int64)
    here = np.flatnonzero((slot >= group * SLOTS) & (slot < (group + 1) * SLOTS))
    owner[slot[here] - group * SLOTS] = here
    return owner


def decide(values: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Client rows whose slot decrypted to a match (sign of 2r(score - t) >= 0)."""
    return owner[(owner >= 0) & (np.real(values) >= 0.0)]
