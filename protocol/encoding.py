"""Records to hash vectors, and records to blocking buckets.

Each field's value is normalised (lower case, runs of blanks made one space),
padded with ``_`` at both ends and cut into q-grams. Every q-gram is hashed with
BLAKE2b, keyed by the field name, to one of the field's ``dims`` coordinates and
a sign (signed feature hashing, Weinberger et al., ICML 2009: the signs make
collisions cancel on average instead of inflating every similarity). Each
field's block is scaled to unit length, weighted by the square root of its
weight, and the whole vector is scaled to unit length again, so that the dot
product of two vectors is a weighted cosine similarity of their q-gram sets,
and a field missing on one side lowers the score less than a wrong value does.

What the encoding does not hide: these vectors are deterministic functions of
the values. They are never sent in the clear; the client only ever sends them
encrypted, and the server's stay on the server.

Blocking keys are computed on both sides from the same fields; a key is hashed
into one of a number of buckets. A record with an empty key part
takes no part in that pass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .spec import BlockingPass, LinkageSpec

_SOUNDEX_CODES = {
    **dict.fromkeys("bfpv", "1"),
    **dict.fromkeys("cgjkqsxz", "2"),
    **dict.fromkeys("dt", "3"),
    "l": "4",
    **dict.fromkeys("mn", "5"),
    "r": "6",
}


def normalise(value: object) -> str:
    """Lower-case, trim and collapse blanks; missing values become ''."""
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return ""
    return " ".join(str(value).lower().split())


def qgrams(text: str, q: int) -> list[str]:
    """The q-grams of ``text`` padded with '_' (no q-grams for empty text)."""
    if not text:
        return []
    padded = "_" * (q - 1) + text + "_" * (q - 1)
    return [padded[i : i + q] for i in range(len(padded) - q + 1)]


def soundex(text: str) -> str:
    """American Soundex (letter then three digits) of all the letters of ``text``."""
    letters = [c for c in text.lower() if "a" <= c <= "z"]
    if not letters:
        return ""
    code, last = letters[0].upper(), _SOUNDEX_CODES.get(letters[0], "")
    for letter in letters[1:]:
        digit = _SOUNDEX_CODES.get(letter, "")
        if digit and digit != last:
            code += digit
        if letter not in "hw":
            last = digit
    return (code + "000")[:4]


class FieldHasher:
    """Maps one field's q-grams to (coordinate, sign), memoised per q-gram."""

    def __init__(self, field_name: str, dims: int) -> None:
        self._key = hashlib.blake2b(field_name.encode(), digest_size=32).digest()
        self._dims = dims
        self._cache: dict[str, tuple[int, float]] = {}

    def __call__(self, gram: str) -> tuple[int, float]:
        hit = self._cache.get(gram)
        if hit is None:
            digest = hashlib.blake2b(
                gram.encode(), key=self._key, digest_size=8
            ).digest()
            number = int.from_bytes(digest, "big")
            hit = (number % self._dims, 1.0 if number >> 63 else -1.0)
            self._cache[gram] = hit
        return hit


def encode_field(values: Sequence[object], dims: int, name: str, q: int) -> np.ndarray:
    """Unit-length signed q-gram count vectors of one field (zero if empty).

    Each distinct value is encoded once (names, suburbs and postcodes repeat
    across many records) and the counts are added up in one numpy call.
    """
    hasher = FieldHasher(name, dims)
    distinct: dict[str, int] = {}
    index = np.fromiter(
        (distinct.setdefault(normalise(v), len(distinct)) for v in values),
        dtype=np.int64,
        count=len(values),
    )
    rows, columns, signs = [], [], []
    for row, text in enumerate(distinct):
        for gram in qgrams(text, q):
            column, sign = hasher(gram)
            rows.append(row)
            columns.append(column)
            signs.append(sign)
    table = np.zeros((len(distinct), dims), dtype=np.float64)
    np.add.at(
        table,
        (np.array(rows, dtype=np.int64), np.array(columns, dtype=np.int64)),
        signs,
    )
    return _unit_rows(table)[index]


def encode_records(
    columns: dict[str, Sequence[object]], spec: LinkageSpec
) -> np.ndarray:
    """Hash vectors of all records, float32, shape (records, spec.dims)."""
    total = sum(field.weight for field in spec.fields) or 1.0
    blocks = [
        encode_field(columns[f.name], f.dims, f.name, spec.qgram)
        * np.sqrt(f.weight / total)
        for f in spec.fields
    ]
    return _unit_rows(np.hstack(blocks)).astype(np.float32)


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms == 0, 1.0, norms)


def key_strings(
    columns: dict[str, Sequence[object]], blocking: BlockingPass
) -> list[str]:
    """The blocking key of every record ('' when a part is empty)."""
    count = len(next(iter(columns.values())))
    keys = []
    for row in range(count):
        parts = [_key_part(columns[p.field][row], p.transform) for p in blocking.parts]
        keys.append("" if "" in parts else "|".join(parts))
    return keys


def _key_part(value: object, transform: str) -> str:
    text = normalise(value)
    if transform == "soundex":
        return soundex(text)
    if transform == "initial":
        return text[:1]
    return text


@dataclass(frozen=True)
class KeyHashes:
    """One pass's blocking keys, hashed once: 64 bits per record, and which
    records have a key at all."""

    values: np.ndarray  # uint64
    keyed: np.ndarray  # bool

    def buckets(self, count: int) -> np.ndarray:
        """Bucket of every record in [0, count), or -1 for an empty key.

        One 64-bit hash modulo ``count`` (a bias below 2^-40 for any count we
        use), so a key's bucket at 2K buckets refines its bucket at K.
        """
        ids = (self.values % np.uint64(count)).astype(np.int64)
        return np.where(self.keyed, ids, -1)


def key_hashes(keys: Sequence[str], blocking: BlockingPass) -> KeyHashes:
    """Keyed BLAKE2b of every key, salted by the pass's name."""
    salt = hashlib.blake2b(blocking.name.encode(), digest_size=16).digest()
    values = np.zeros(len(keys), dtype=np.uint64)
    keyed = np.zeros(len(keys), dtype=bool)
    for row, key in enumerate(keys):
        if key:
            digest = hashlib.blake2b(key.encode(), key=salt, digest_size=8).digest()
            values[row] = int.from_bytes(digest, "big")
            keyed[row] = True
    return KeyHashes(values, keyed)
