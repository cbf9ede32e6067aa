"""Phase 1, the handshake: agree on the rule, the query and the keys.

What crosses the wire:

- C -> S CLIENT_HELLO (JSON): protocol version, the name of a parameter set
  from the allow-list in :mod:`.he`, the linkage specification itself, the
  query (one or two group-by columns, one value column) and the client's
  record count rounded up to a multiple of 1024.
- S -> C SERVER_HELLO (JSON): the table's shape (group-by columns and their
  category labels), the number of server positions in every group of every
  pass, the minimum cell size k and whether counts will be revealed; or ERROR
  naming what was refused (a specification that differs, a column the policy
  does not allow).
- C -> S PUBLIC_KEY and GALOIS_KEYS (SEAL bytes): Galois keys only for the
  rotations the server uses, checked on arrival to be exactly those.

Who learns what: the server learns the specification, the query, the padded
record count and the public keys; the client learns the table's labels, the
server's policy and the number of positions per group: the server depth of
the pass (:func:`.layout.server_depth`), or, for a specification without
one, the largest server bucket of the group.
"""

from __future__ import annotations

from dataclasses import dataclass

from .framing import ProtocolError
from .he import PARAMETER_SETS
from .spec import LinkageSpec, differences
from .table import MAX_CELLS, TableShape

PROTOCOL_VERSION = 1
MAX_SIZE_CLASS = 1 << 20
MAX_POSITIONS = 200_000


class Refused(ProtocolError):
    """The peer is well-behaved but asks for something we will not do."""


@dataclass(frozen=True)
class ServerPolicy:
    group_columns: tuple[str, ...]
    value_columns: tuple[str, ...]
    min_cell_size: int
    reveal_counts: bool


@dataclass(frozen=True)
class Query:
    group_by: tuple[str, ...]
    value: str
    size_class: int
    parameters: str


def client_hello(spec: LinkageSpec, query: Query) -> dict:
    return {
        "protocol": PROTOCOL_VERSION,
        "parameters": query.parameters,
        "spec": dict(spec.raw),
        "query": {"group_by": list(query.group_by), "value": query.value},
        "size_class": query.size_class,
    }


def check_client_hello(obj: dict, spec: LinkageSpec, policy: ServerPolicy) -> Query:
    """The server's check of a hello; Refused says exactly what is wrong."""
    version, parameters = obj.get("protocol"), obj.get("parameters")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise Refused(f"protocol version {version!r} is not {PROTOCOL_VERSION}")
    if not isinstance(parameters, str) or parameters not in PARAMETER_SETS:
        raise Refused(
            f"parameter set is not on the allow-list: {', '.join(PARAMETER_SETS)}"
        )
    diff = differences(spec.raw, obj.get("spec"))
    if diff:
        raise Refused("linkage specifications differ: " + "; ".join(diff[:3]))
    return Query(
        _group_by(obj.get("query"), policy),
        _value(obj.get("query"), policy),
        _size_class(obj.get("size_class")),
        obj["parameters"],
    )


def _group_by(query: object, policy: ServerPolicy) -> tuple[str, ...]:
    columns = query.get("group_by") if isinstance(query, dict) else None
    if (
        not isinstance(columns, list)
        or not 1 <= len(columns) <= 2
        or len(set(map(str, columns))) != len(columns)
    ):
        raise Refused("group_by must be one column or two different columns")
    for column in columns:
        if column not in policy.group_columns:
            raise Refused(
                f"grouping by {column!r} is not allowed; allowed: "
                f"{', '.join(policy.group_columns)}"
            )
    return tuple(columns)


def _value(query: object, policy: ServerPolicy) -> str:
    value = query.get("value") if isinstance(query, dict) else None
    if value not in policy.value_columns:
        raise Refused(
            f"averaging {value!r} is not allowed; allowed: "
            f"{', '.join(policy.value_columns)}"
        )
    return value


def _size_class(size: object) -> int:
    ok = isinstance(size, int) and not isinstance(size, bool)
    if not ok or not 1024 <= size <= MAX_SIZE_CLASS or size % 1024:
        raise Refused(f"size_class must be a multiple of 1024 up to {MAX_SIZE_CLASS}")
    return size


def server_hello(
    shape: TableShape, positions: list[list[int]], policy: ServerPolicy
) -> dict:
    return {
        "group_by": list(shape.group_by),
        "categories": [list(c) for c in shape.categories],
        "positions": positions,
        "min_cell_size": policy.min_cell_size,
        "reveal_counts": policy.reveal_counts,
    }


@dataclass(frozen=True)
class ServerOffer:
    shape: TableShape
    positions: list[list[int]]
    min_cell_size: int
    reveal_counts: bool


def check_server_hello(
    obj: dict, query: Query, groups_per_pass: list[int]
) -> ServerOffer:
    """The client's check: shape and position counts are consistent and bounded."""
    categories = obj.get("categories")
    if (
        obj.get("group_by") != list(query.group_by)
        or not isinstance(categories, list)
        or len(categories) != len(query.group_by)
        or not all(
            isinstance(c, list) and all(isinstance(x, str) for x in c)
            for c in categories
        )
    ):
        raise ProtocolError("server hello: table shape does not match the query")
    shape = TableShape(tuple(query.group_by), tuple(tuple(c) for c in categories))
    if not 1 <= shape.cells <= MAX_CELLS:
        raise ProtocolError(
            f"server hello: {shape.cells} cells is outside 1..{MAX_CELLS}"
        )
    positions = obj.get("positions")
    if (
        not isinstance(positions, list)
        or [len(p) if isinstance(p, list) else -1 for p in positions] != groups_per_pass
    ):
        raise ProtocolError("server hello: position counts do not fit the layout")
    flat = [q for p in positions for q in p]
    if (
        not all(isinstance(q, int) and not isinstance(q, bool) and q >= 0 for q in flat)
        or sum(flat) > MAX_POSITIONS
    ):
        raise ProtocolError("server hello: bad position counts")
    k, reveal = obj.get("min_cell_size"), obj.get("reveal_counts")
    if (
        not isinstance(k, int)
        or isinstance(k, bool)
        or k < 1
        or not isinstance(reveal, bool)
    ):
        raise ProtocolError("server hello: bad policy fields")
    return ServerOffer(shape, positions, k, reveal)
