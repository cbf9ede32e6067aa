"""The client's side of one session: it holds the only secret key."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from . import crosstab, linkage, threshold
from .framing import Frame, ProtocolError, decode_json_payload
from .handshake import Query, ServerOffer, check_server_hello, client_hello
from .he import LAST, Ckks, SecretKeyHolder
from .layout import SLOTS, client_group_matrix, client_slots, padded_count, pair_rows
from .messages import Channel, Msg
from .reference import PreparedRecords, pass_shapes
from .spec import LinkageSpec
from .table import TableShape

logger = logging.getLogger(__name__)


class QueryRefused(Exception):
    """The server's size check refused the query; the message says why."""


@dataclass
class ClientResult:
    shape: TableShape
    averages: np.ndarray
    counts: np.ndarray | None
    matched: np.ndarray
    candidates: list[dict[int, list[tuple[int, int]]]]
    seconds: dict[str, float] = field(default_factory=dict)


def make_query(
    group_by: tuple[str, ...], value: str, records: int, parameters: str
) -> Query:
    return Query(tuple(group_by), value, padded_count(records), parameters)


def run_client(
    channel: Channel,
    spec: LinkageSpec,
    query: Query,
    records: PreparedRecords | Callable[[], PreparedRecords],
    progress: bool = True,
) -> ClientResult:
    """Run every phase; raises QueryRefused, ProtocolError or OSError.

    ``records`` may be a function that encodes them: it is called once the
    keys are sent, so that the encoding overlaps the server's setup.
    """
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    shapes = pass_shapes(spec, query.size_class)
    channel.send_json(Msg.CLIENT_HELLO, client_hello(spec, query))
    ckks = Ckks(query.parameters)
    try:
        # Keys are made while the server lays out its records for this query.
        keys = SecretKeyHolder(ckks)
        offer = check_server_hello(
            channel.recv_json(Msg.SERVER_HELLO), query, [s.groups for s in shapes]
        )
        public_key, galois = keys.public_bytes()
        channel.send(Msg.PUBLIC_KEY, public_key)
        channel.send(Msg.GALOIS_KEYS, galois)
        seconds["handshake"], clock = time.perf_counter() - clock, time.perf_counter()
        if callable(records):
            records = records()
        candidates, matched = _linkage(
            channel, keys, spec, shapes, offer, records, progress
        )
        seconds["linkage and selection"] = time.perf_counter() - clock
        clock = time.perf_counter()
        averages, counts = _size_check_and_table(channel, keys, offer)
        seconds["size check and table"] = time.perf_counter() - clock
    finally:
        ckks.close()
    return ClientResult(offer.shape, averages, counts, matched, candidates, seconds)


def _linkage(channel, keys, spec, shapes, offer, records, progress):
    """Send every group, and each pass's selection, while a second thread
    reads the signs back.

    The server answers a group while the next one is on its way, so the
    client's encryption overlaps the server's arithmetic. A pass's selection
    goes out after the next pass's queries, by which time its signs are all
    back, so the server sums it while the next pass is scored. Returns
    candidates[pass][row] = [(group, position)] and which rows matched.
    """
    slots = [client_slots(b, s) for b, s in zip(records.buckets(shapes), shapes)]
    reader = _ScoreReader(channel, keys, slots, offer.positions, progress)
    reader.start()
    matched = np.zeros(len(records), dtype=bool)
    bar = tqdm(
        total=sum(s.groups for s in shapes),
        desc="client: encrypt and link",
        unit="group",
        disable=not progress,
    )
    try:
        for p, (slot, counts) in enumerate(zip(slots, offer.positions)):
            for g in range(len(counts)):
                for row in pair_rows(client_group_matrix(records.vectors, slot, g)):
                    channel.send(
                        Msg.QUERY_CT,
                        keys.encrypt_to_bytes(
                            row, linkage.QUERY_LEVEL, linkage.QUERY_SCALE
                        ),
                    )
                bar.update()
            if p > 0:
                _send_selection(channel, keys, reader, p - 1, matched)
        _send_selection(channel, keys, reader, len(slots) - 1, matched)
    except OSError:
        reader.join()
        reader.raise_failure()
        raise
    finally:
        bar.close()
    reader.join()
    reader.raise_failure()
    return reader.candidates, matched


class _ScoreReader(threading.Thread):
    """Receives and decrypts the score ciphertexts, group after group."""

    def __init__(self, channel, keys, slots, positions, progress: bool) -> None:
        super().__init__(daemon=True)
        self.channel, self.keys, self.slots, self.positions = (
            channel,
            keys,
            slots,
            positions,
        )
        self.bar = tqdm(
            total=sum(map(sum, positions)),
            desc="client: decrypt scores",
            unit="ct",
            position=1,
            disable=not progress,
        )
        self.candidates: list[dict[int, list[tuple[int, int]]]] = []
        self.failure: BaseException | None = None
        self._passes = threading.Condition()

    def run(self) -> None:
        try:
            for slot, counts in zip(self.slots, self.positions):
                found = self._one_pass(slot, counts)
                with self._passes:
                    self.candidates.append(found)
                    self._passes.notify_all()
        except BaseException as exc:  # handed to the main thread
            with self._passes:
                self.failure = exc
                self._passes.notify_all()
        finally:
            self.bar.close()

    def wait_pass(self, p: int) -> dict[int, list[tuple[int, int]]]:
        """Pass p's candidates, once all its signs are in; re-raises a failure."""
        with self._passes:
            self._passes.wait_for(
                lambda: len(self.candidates) > p or self.failure is not None
            )
        self.raise_failure()
        return self.candidates[p]

    def _one_pass(self, slot, counts) -> dict[int, list[tuple[int, int]]]:
        found: dict[int, list[tuple[int, int]]] = {}
        for g, depth in enumerate(counts):
            owner = linkage.slot_owners(slot, g)
            for q in range(depth):
                blob = self.channel.recv(Msg.SCORE_CT)
                values = self.keys.decrypt(linkage.load_score(self.keys.ckks, blob))
                for r in linkage.decide(values, owner):
                    found.setdefault(int(r), []).append((g, q))
                self.bar.update()
        return found

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure


def _send_selection(channel, keys, reader: _ScoreReader, p: int, matched) -> None:
    """Encrypt pass p's links under the rule's step 2 (each row keeps the
    candidates of its first pass that has any): one ciphertext per position.
    Marks the rows it links in ``matched``."""
    by_group = _links_by_group(reader.wait_pass(p), reader.slots[p], matched)
    for g, depth in enumerate(reader.positions[p]):
        selection = np.zeros((depth, SLOTS))
        for q, local in by_group.get(g, []):
            selection[q, local] = 1.0
        for q in range(depth):
            channel.send(Msg.SELECTION_CT, keys.encrypt_to_bytes(selection[q]))


def _links_by_group(found, slot, matched: np.ndarray) -> dict[int, list]:
    """This pass's links of rows not linked in an earlier pass, as
    group -> [(position, slot in group)]; marks those rows matched."""
    by_group: dict[int, list] = {}
    for row, hits in found.items():
        if matched[row]:
            continue
        matched[row] = True
        for g, q in hits:
            by_group.setdefault(g, []).append((q, slot[row] - g * SLOTS))
    return by_group


def _size_check_and_table(channel, keys, offer: ServerOffer):
    msg, payload = channel.recv_any(Msg.SIZE_CHECK, Msg.REFUSED)
    if msg == Msg.REFUSED:
        raise QueryRefused(_reason(payload))
    asked = _json_int(payload, "values")
    cells = offer.shape.cells
    threshold.check_asked(asked, cells)
    values = [_decrypt_first(channel, keys, Msg.SIZE_CHECK_CT) for _ in range(asked)]
    channel.send_json(
        Msg.SIZE_CHECK_SIGNS, {"signs": threshold.answer_check(values, asked, cells)}
    )
    msg, payload = channel.recv_any(Msg.TABLE, Msg.REFUSED)
    if msg == Msg.REFUSED:
        raise QueryRefused(_reason(payload))
    header = _json(payload, Msg.TABLE)
    scales = crosstab.TableScales(
        _positive(header, "value_scale"), _positive(header, "count_scale")
    )
    entries = cells * (2 if offer.reveal_counts else 1)
    table = [
        _decrypt_first(channel, keys, Msg.TABLE_CT, whole=True) for _ in range(entries)
    ]
    return crosstab.read_table(table, cells, scales, offer.reveal_counts)


def _decrypt_first(channel, keys, msg: Msg, whole: bool = False):
    """Receive one last-level ciphertext and decrypt it (slot 0, or every slot)."""
    ciphertext = keys.ckks.load_ciphertext_untrusted(
        channel.recv(msg), LAST, keys.ckks.final_scale()
    )
    values = keys.decrypt(ciphertext)
    return values if whole else values[0]


def _json(payload: bytes, msg: Msg) -> dict:
    return decode_json_payload(Frame(int(msg), payload))


def _json_int(payload: bytes, key: str) -> int:
    value = _json(payload, Msg.SIZE_CHECK).get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ProtocolError(f"size check: {key!r} must be a positive integer")
    return value


def _positive(header: dict, key: str) -> float:
    value = header.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ProtocolError(f"table header: {key!r} must be a positive number")
    return float(value)


def _reason(payload: bytes) -> str:
    reason = _json(payload, Msg.REFUSED).get("reason")
    return reason if isinstance(reason, str) else "query refused by the server"
