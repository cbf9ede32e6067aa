"""The linkage specification: which fields, how they are encoded, how records block.

Both parties load the same small JSON file. It is not secret: the client sends
it in its hello and the server refuses, naming the first difference, when its
own copy differs. The file says nothing about either party's columns; each
side maps the specification's field names to its own CSV columns.

A pair of records matches when the dot product of their hash vectors is at
least ``threshold`` (inclusive) or strictly above it (``"inclusive": false``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRANSFORMS = ("exact", "soundex", "initial")
SPEC_VERSION = 1
MAX_FIELDS = 32
MAX_DIMS = 1024
MAX_PASSES = 8


class SpecError(ValueError):
    """A specification file or object is not one we can use."""


@dataclass(frozen=True)
class Field:
    name: str
    dims: int
    weight: float


@dataclass(frozen=True)
class KeyPart:
    field: str
    transform: str


@dataclass(frozen=True)
class BlockingPass:
    """One blocking pass: records compare only within a bucket of this key.

    ``slots_per_bucket`` client slots are reserved for every bucket; a client
    record beyond that many in its bucket sits this pass out. The number of
    buckets is chosen per query from the client's padded record count as the
    smallest number of whole slot groups that gives ``capacity_factor`` slots
    per record.
    """

    name: str
    parts: tuple[KeyPart, ...]
    slots_per_bucket: int


@dataclass(frozen=True)
class LinkageSpec:
    name: str
    qgram: int
    fields: tuple[Field, ...]
    threshold: float
    inclusive: bool
    passes: tuple[BlockingPass, ...]
    capacity_factor: float
    raw: Mapping[str, Any]
    # Positions per group as a multiple of the mean server bucket depth
    # (layout.server_depth); None: as deep as the deepest bucket of the group.
    depth_factor: float | None = None

    @property
    def dims(self) -> int:
        return sum(field.dims for field in self.fields)

    @property
    def field_names(self) -> tuple[str, ...]:
        names = [field.name for field in self.fields]
        for blocking in self.passes:
            names += [part.field for part in blocking.parts]
        return tuple(dict.fromkeys(names))

    def digest(self) -> str:
        """SHA-256 of the canonical JSON form: equal digests, equal rules."""
        return hashlib.sha256(canonical_json(self.raw).encode()).hexdigest()

    def is_match(self, score: float) -> bool:
        if self.inclusive:
            return score >= self.threshold
        return score > self.threshold


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def load_spec(path: str | Path) -> LinkageSpec:
    """Read and check a specification file; errors name the file."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"{path}: cannot read a JSON specification: {exc}") from exc
    try:
        return spec_from_obj(obj)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from exc


def spec_from_obj(obj: Any) -> LinkageSpec:
    """Build a specification from parsed JSON, checking every value."""
    _require(isinstance(obj, dict), "the specification must be a JSON object")
    version = obj.get("version")
    _require(
        type(version) is int and version == SPEC_VERSION,
        f"'version' must be {SPEC_VERSION}",
    )
    fields = tuple(_field(item, i) for i, item in enumerate(_list(obj, "fields")))
    _require(0 < len(fields) <= MAX_FIELDS, f"'fields' needs 1 to {MAX_FIELDS} entries")
    _require(len({f.name for f in fields}) == len(fields), "field names must differ")
    passes = tuple(_pass(item, i) for i, item in enumerate(_list(obj, "blocking")))
    _require(
        0 < len(passes) <= MAX_PASSES, f"'blocking' needs 1 to {MAX_PASSES} passes"
    )
    spec = LinkageSpec(
        name=_str(obj, "name"),
        qgram=_int(obj, "qgram", 1, 4),
        fields=fields,
        threshold=_number(obj, "threshold", 0.0, 1.0),
        inclusive=_bool(obj, "inclusive"),
        passes=passes,
        capacity_factor=_number(obj, "capacity_factor", 1.0, 16.0),
        raw=obj,
        depth_factor=(
            _number(obj, "server_depth_factor", 1.0, 64.0)
            if "server_depth_factor" in obj
            else None
        ),
    )
    # Empty slots and positions score exactly 0: a threshold of 0 would match them.
    _require(spec.threshold > 0.0, "'threshold' must be above 0")
    _require(spec.dims <= MAX_DIMS, f"total dims {spec.dims} is over {MAX_DIMS}")
    return spec


def differences(ours: Mapping[str, Any], theirs: Any, path: str = "") -> list[str]:
    """Name where two specification objects differ, as JSON paths."""
    if isinstance(ours, Mapping) and isinstance(theirs, Mapping):
        found: list[str] = []
        for key in sorted(set(ours) | set(theirs)):
            where = f"{path}.{key}" if path else key
            if key not in ours or key not in theirs:
                found.append(f"{where} is present on one side only")
            else:
                found += differences(ours[key], theirs[key], where)
        return found
    if isinstance(ours, list) and isinstance(theirs, list):
        if len(ours) != len(theirs):
            return [f"{path} has {len(ours)} entries here and {len(theirs)} there"]
        found = []
        for i, (a, b) in enumerate(zip(ours, theirs)):
            found += differences(a, b, f"{path}[{i}]")
        return found
    if ours != theirs or type(ours) is not type(theirs):
        return [f"{path} is {ours!r} here and {theirs!r} there"]
    return []


def _field(item: Any, index: int) -> Field:
    _require(isinstance(item, dict), f"fields[{index}] must be an object")
    return Field(
        name=_str(item, "name"),
        dims=_int(item, "dims", 1, MAX_DIMS),
        weight=_number(item, "weight", 0.0, 100.0),
    )


def _pass(item: Any, index: int) -> BlockingPass:
    _require(isinstance(item, dict), f"blocking[{index}] must be an object")
    parts = tuple(_part(p, index) for p in _list(item, "key"))
    _require(len(parts) > 0, f"blocking[{index}].key needs at least one part")
    slots = _int(item, "slots_per_bucket", 1, 4096)
    _require(
        slots & (slots - 1) == 0,
        f"blocking[{index}].slots_per_bucket must be a power of two",
    )
    return BlockingPass(name=_str(item, "name"), parts=parts, slots_per_bucket=slots)


def _part(item: Any, index: int) -> KeyPart:
    _require(isinstance(item, dict), f"blocking[{index}].key entries must be objects")
    transform = _str(item, "transform")
    _require(
        transform in TRANSFORMS, f"transform {transform!r} is not one of {TRANSFORMS}"
    )
    return KeyPart(field=_str(item, "field"), transform=transform)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SpecError(message)


def _list(obj: dict, key: str) -> list:
    _require(isinstance(obj.get(key), list), f"'{key}' must be a list")
    return obj[key]


def _str(obj: dict, key: str) -> str:
    value = obj.get(key)
    _require(
        isinstance(value, str) and 0 < len(value) <= 64,
        f"'{key}' must be a short string",
    )
    return value


def _bool(obj: dict, key: str) -> bool:
    _require(isinstance(obj.get(key), bool), f"'{key}' must be true or false")
    return obj[key]


def _int(obj: dict, key: str, low: int, high: int) -> int:
    value = obj.get(key)
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    _require(ok, f"'{key}' must be an integer from {low} to {high}, found {value!r}")
    return value


def _number(obj: dict, key: str, low: float, high: float) -> float:
    value = obj.get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    _require(
        ok and low <= value <= high,
        f"'{key}' must be a number from {low} to {high}, found {value!r}",
    )
    return float(value)
