"""What crosses the wire in a whole session, recorded frame by frame.

Both sides run in this process over a socket pair (the server side in a
thread), with a channel that records every frame. These tests check the rows of
the README's privacy contract that are about traffic: the server's view depends
only on the client's padded size, never on its records or matches; the client
receives no server identifier or value outside the table's labels; the size
check's answer is one bit per asked value.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from protocol.client import QueryRefused, make_query, run_client
from protocol.framing import ProtocolError
from protocol.handshake import ServerPolicy, client_hello
from protocol.he import DEFAULT_PARAMETERS, Ckks, SecretKeyHolder
from protocol.linkage import QUERY_LEVEL, QUERY_SCALE
from protocol.messages import Channel, Msg, PeerError
from protocol.records import linkage_columns
from protocol.reference import pass_shapes, prepare
from protocol.layout import query_count, server_depth
from protocol.server import SessionOptions, load_server_data, run_session, session_layout
from protocol.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
SPEC = load_spec(ROOT / "data" / "spec_default.json")
JSON_TYPES = {Msg.CLIENT_HELLO, Msg.SERVER_HELLO, Msg.SIZE_CHECK, Msg.SIZE_CHECK_SIGNS,
              Msg.TABLE, Msg.REFUSED, Msg.ERROR}


class RecordingChannel(Channel):
    """A channel that keeps (direction, type, payload) of every frame."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.frames: list[tuple[str, Msg, bytes]] = []

    def send(self, msg: Msg, payload: bytes) -> None:
        self.frames.append(("sent", msg, payload))
        super().send(msg, payload)

    def _recv_frame(self):
        frame = super()._recv_frame()
        self.frames.append(("received", Msg(frame.msg_type), frame.payload))
        return frame


@pytest.fixture(scope="module")
def demo() -> tuple[pd.DataFrame, pd.DataFrame]:
    client = pd.read_csv(ROOT / "data" / "client.csv", dtype=str)
    server = pd.read_csv(ROOT / "data" / "server.csv", dtype=str)
    return client, server


def server_sample(demo, tmp_path_factory) -> Path:
    _, server = demo
    path = tmp_path_factory.mktemp("server") / "server.csv"
    server.iloc[:400].to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def server_data(demo, tmp_path_factory):
    policy = ServerPolicy(("state",), ("age",), 2, False)
    return load_server_data(server_sample(demo, tmp_path_factory), SPEC, {}, policy)


def run_pair(server_data, client_frame: pd.DataFrame, workers: int = 1):
    """One whole session; returns (server channel, client channel, client result)."""
    ours, theirs = socket.socketpair()
    for end in (ours, theirs):
        end.settimeout(120.0)  # a deadlock fails the test instead of hanging it
    server_channel, client_channel = RecordingChannel(ours), RecordingChannel(theirs)
    outcome: dict = {}

    def serve() -> None:
        try:
            outcome["server"] = run_session(server_channel, server_data,
                                            SessionOptions(workers=workers,
                                                           progress=False))
        except Exception as exc:  # reported by the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    records = prepare(linkage_columns(client_frame, SPEC, {}, "client"), SPEC)
    query = make_query(("state",), "age", len(records), DEFAULT_PARAMETERS)
    try:
        result = run_client(client_channel, SPEC, query, records, progress=False)
    except QueryRefused as exc:
        result = exc
    finally:
        thread.join(timeout=300)
        ours.close()
        theirs.close()
    assert "error" not in outcome, outcome.get("error")
    return server_channel, client_channel, result


def shape_of_traffic(channel: RecordingChannel) -> list[tuple[str, str, int]]:
    """What an observer of the server's socket sees: direction, type and size."""
    return [(d, msg.name, len(payload)) for d, msg, payload in channel.frames]


def same_shape(a: list[tuple[str, str, int]], b: list[tuple[str, str, int]]) -> bool:
    """Same frames in the same order; sizes equal, or within 5% for SEAL objects.

    SEAL compresses what it saves (zstd), so a ciphertext's size wanders by a
    few percent from one encryption to the next. What is compressed is
    uniformly random modulo each prime whatever the message, so the wander
    carries no information about it.
    """
    if [(d, m) for d, m, _ in a] != [(d, m) for d, m, _ in b]:
        return False
    for (_, name, x), (_, _, y) in zip(a, b):
        exact = Msg[name] in JSON_TYPES and name != "CLIENT_HELLO"
        if (x != y) if exact else abs(x - y) > 0.05 * max(x, y):
            return False
    return True


def partners_and_strangers(demo) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Client records whose duplicate is in the server sample, and the rest."""
    client, server = demo
    partners = client[client["rec_id"].str.replace("org", "dup-0").isin(server["rec_id"].iloc[:400])]
    strangers = client[~client["rec_id"].isin(partners["rec_id"])]
    return partners, strangers


@pytest.fixture(scope="module")
def sessions(demo, server_data):
    partners, strangers = partners_and_strangers(demo)
    matching = run_pair(server_data, partners.iloc[:300])
    unrelated = run_pair(server_data, strangers.iloc[:700])
    return matching, unrelated


def test_more_workers_than_groups_per_pass_give_the_same_result(
    demo, server_data, sessions
) -> None:
    # 300 records: one group per pass. With three workers, three groups are in
    # flight and the last two are split over the workers, so a pass's
    # selections are due while groups of later passes are still being scored:
    # the server must send that pass's scores first, or both sides wait.
    (_, _, alone), _ = sessions
    partners, _ = partners_and_strangers(demo)

    server, _, three = run_pair(server_data, partners.iloc[:300], workers=3)

    assert [len(g) for g in session_layout(server_data, 1024).positions] == [1] * 4
    assert np.array_equal(three.matched, alone.matched) and alone.matched.any()
    assert np.allclose(three.averages, alone.averages, atol=1e-6, equal_nan=True)
    assert sum(1 for _, m, _ in server.frames if m == Msg.SCORE_CT) == sum(
        sum(c) for c in session_layout(server_data, 1024).counts()
    )


def test_server_receives_the_same_traffic_from_matching_and_unrelated_clients(
    sessions,
) -> None:
    (server_a, _, result_a), (server_b, _, result_b) = sessions

    assert result_a.matched.sum() > 250
    assert isinstance(result_b, QueryRefused)
    received_a = [t for t in shape_of_traffic(server_a) if t[0] == "received"]
    received_b = [t for t in shape_of_traffic(server_b) if t[0] == "received"]
    assert same_shape(received_a, received_b)


def test_selection_count_does_not_depend_on_matches(sessions) -> None:
    (server_a, _, result_a), (server_b, _, _) = sessions

    def selections(channel):
        return sum(1 for _, m, _ in channel.frames if m == Msg.SELECTION_CT)

    hello = next(p for d, m, p in server_a.frames if m == Msg.SERVER_HELLO)
    positions = sum(sum(groups) for groups in json.loads(hello)["positions"])
    assert selections(server_a) == selections(server_b) == positions > 0


def test_client_receives_no_server_identifier_or_name(demo, sessions) -> None:
    _, server = demo
    (_, client_channel, _), _ = sessions
    received = b"".join(p for d, m, p in client_channel.frames
                        if d == "received" and m in JSON_TYPES)
    text = received.decode()

    for value in server["rec_id"].iloc[:400].tolist() + server["surname"].dropna().iloc[:400].tolist():
        assert f'"{value}"' not in text
    header = json.loads(next(p for d, m, p in client_channel.frames if m == Msg.SERVER_HELLO))
    assert set(header) == {"group_by", "categories", "positions", "min_cell_size",
                           "reveal_counts"}


def test_size_check_answer_is_one_bit_per_asked_value(sessions) -> None:
    (server_channel, _, _), _ = sessions
    asked = next(json.loads(p)["values"] for d, m, p in server_channel.frames
                 if m == Msg.SIZE_CHECK)
    answer = next(json.loads(p) for d, m, p in server_channel.frames
                  if m == Msg.SIZE_CHECK_SIGNS)

    assert list(answer) == ["signs"]
    assert len(answer["signs"]) == asked and set(answer["signs"]) <= {"0", "1"}


def test_keys_sent_are_public_key_and_galois_keys_only(sessions) -> None:
    (server_channel, _, _), _ = sessions
    kinds = [m for d, m, _ in server_channel.frames
             if d == "received" and m in (Msg.PUBLIC_KEY, Msg.GALOIS_KEYS)]

    assert kinds == [Msg.PUBLIC_KEY, Msg.GALOIS_KEYS]


def test_matching_client_gets_the_table_of_its_links(sessions) -> None:
    (_, _, result), _ = sessions

    assert np.all(np.isfinite(result.averages))
    assert result.counts is None


def test_positions_announced_depend_only_on_the_server_depth(demo, tmp_path) -> None:
    # Two servers with different records, and buckets of different depths,
    # but the same record count class: the client is told the same numbers.
    _, server = demo
    policy = ServerPolicy(("state",), ("age",), 2, False)
    announced = []
    for part, rows in (("a", slice(0, 900)), ("b", slice(2000, 2600))):
        path = tmp_path / f"{part}.csv"
        server.iloc[rows].to_csv(path, index=False)
        data = load_server_data(path, SPEC, {}, policy)
        layout = session_layout(data, 1024)
        shapes = pass_shapes(SPEC, 1024)
        depths = [server_depth(1024, s.buckets, SPEC.depth_factor) for s in shapes]
        assert layout.counts() == [[d] * s.groups for d, s in zip(depths, shapes)]
        deepest = [max(np.bincount(b[b >= 0])) for b in data.records.buckets(shapes)]
        announced.append((layout.counts(), deepest))

    (counts_a, deepest_a), (counts_b, deepest_b) = announced
    assert counts_a == counts_b
    assert deepest_a != deepest_b


@contextlib.contextmanager
def hand_made_client(server_data) -> Iterator[tuple[Channel, SecretKeyHolder, dict, dict]]:
    """A server session in a thread and a client channel past the handshake
    (10 records: one group per pass), for tests that then misbehave. Yields
    (client channel, keys, server hello, outcome); outcome["error"] is what
    ended the session, which, as serve_one does, reports it and closes."""
    ours, theirs = socket.socketpair()
    theirs.settimeout(120.0)
    server_channel, client_channel = Channel(ours), Channel(theirs)
    outcome: dict = {}

    def serve() -> None:
        try:
            run_session(server_channel, server_data,
                        SessionOptions(workers=1, progress=False))
        except Exception as exc:  # inspected by the test
            outcome["error"] = exc
            server_channel.send_error(str(exc))
        finally:
            ours.close()

    thread = threading.Thread(target=serve)
    thread.start()
    ckks = Ckks(DEFAULT_PARAMETERS)
    try:
        query = make_query(("state",), "age", 10, DEFAULT_PARAMETERS)
        client_channel.send_json(Msg.CLIENT_HELLO, client_hello(SPEC, query))
        hello = client_channel.recv_json(Msg.SERVER_HELLO)
        keys = SecretKeyHolder(ckks)
        for msg, blob in zip((Msg.PUBLIC_KEY, Msg.GALOIS_KEYS), keys.public_bytes()):
            client_channel.send(msg, blob)
        yield client_channel, keys, hello, outcome
        thread.join(timeout=120)
        assert not thread.is_alive()
    finally:
        ckks.close()
        theirs.close()


def test_a_query_at_the_wrong_level_ends_the_session_with_a_protocol_error(
    server_data,
) -> None:
    # The session process checks only the SEAL header; the worker that would
    # use the ciphertext checks its level and refuses it before any product.
    with hand_made_client(server_data) as (channel, keys, hello, outcome):
        groups = sum(len(counts) for counts in hello["positions"])
        top_level = keys.encrypt_to_bytes(np.zeros(keys.ckks.slots))  # queries go at LAST
        with pytest.raises(OSError):  # the server stops reading and closes
            for _ in range(groups * query_count(SPEC.dims)):  # as a client streams
                channel.send(Msg.QUERY_CT, top_level)

    assert isinstance(outcome.get("error"), ProtocolError)
    assert "ciphertext refused" in str(outcome["error"])


def test_a_selection_before_the_next_pass_s_queries_ends_the_session(
    server_data,
) -> None:
    # A pass's selections are due only after the next pass's queries; one sent
    # early is refused by type, and the server says so instead of waiting.
    with hand_made_client(server_data) as (channel, keys, hello, outcome):
        slots = keys.ckks.slots
        assert [len(c) for c in hello["positions"]] == [1, 1, 1, 1]
        for _ in range(query_count(SPEC.dims)):  # pass 0, its one group, empty
            channel.send(Msg.QUERY_CT, keys.encrypt_to_bytes(
                np.zeros(slots), QUERY_LEVEL, QUERY_SCALE))
        channel.send(Msg.SELECTION_CT, keys.encrypt_to_bytes(np.zeros(slots)))
        with pytest.raises(PeerError, match="expected QUERY_CT, received SELECTION_CT"):
            while True:
                channel.recv(Msg.SCORE_CT)

    assert isinstance(outcome.get("error"), ProtocolError)
