"""Tests for protocol.messages: the transition table and Channel over a socket pair."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from protocol.framing import ProtocolError, encode_frame, send_frame
from protocol.messages import (
    CAPS,
    TRANSITIONS,
    Channel,
    Msg,
    PeerError,
    State,
)

# One whole session in the order of the module docstring: (sender, message).
# Two passes of one group of two query ciphertexts, one position each; the
# first pass's selection comes after the second pass's queries; three
# size-check values; three cells.
SESSION = [
    ("client", Msg.CLIENT_HELLO), ("server", Msg.SERVER_HELLO),
    ("client", Msg.PUBLIC_KEY), ("client", Msg.GALOIS_KEYS),
    ("client", Msg.QUERY_CT), ("client", Msg.QUERY_CT),
    ("client", Msg.QUERY_CT), ("client", Msg.QUERY_CT), ("server", Msg.SCORE_CT),
    ("client", Msg.SELECTION_CT), ("server", Msg.SCORE_CT),
    ("client", Msg.SELECTION_CT),
    ("server", Msg.SIZE_CHECK), ("server", Msg.SIZE_CHECK_CT),
    ("server", Msg.SIZE_CHECK_CT), ("server", Msg.SIZE_CHECK_CT),
    ("client", Msg.SIZE_CHECK_SIGNS), ("server", Msg.TABLE), ("server", Msg.TABLE_CT),
    ("server", Msg.TABLE_CT), ("server", Msg.TABLE_CT),
]
# A session with a table ends by count: the client reads cells (or 2 * cells)
# TABLE_CT and closes. These states cannot reach DONE but by an ERROR.
TABLE_STATES = {State.AWAIT_TABLE_CT, State.TABLE_CT}


def until(msg: Msg) -> list[tuple[str, Msg]]:
    """The session up to, not including, the first ``msg``."""
    return SESSION[: [m for _, m in SESSION].index(msg)]


def reachable(start: State) -> set[State]:
    seen, todo = {start}, [start]
    while todo:
        for target in TRANSITIONS[todo.pop()].values():
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


@pytest.fixture
def pair() -> Iterator[tuple[Channel, Channel]]:
    """(client, server) channels on the two ends of a socket pair."""
    left, right = socket.socketpair()
    left.settimeout(5.0)
    right.settimeout(5.0)
    try:
        yield Channel(left), Channel(right)
    finally:
        left.close()
        right.close()


def walk(client: Channel, server: Channel, steps: list[tuple[str, Msg]]) -> None:
    """Send and receive each step in turn, as the two sides would."""
    for sender, msg in steps:
        out, into = (client, server) if sender == "client" else (server, client)
        out.send(msg, b"{}")
        assert into.recv(msg) == b"{}"


# -- the table ----------------------------------------------------------------------


def test_every_state_is_reachable_from_hello() -> None:
    assert reachable(State.HELLO) == set(State)


def test_done_has_no_exits() -> None:
    assert TRANSITIONS[State.DONE] == {}


def test_done_is_reachable_from_every_state_but_the_table_ciphertexts() -> None:
    for start in set(State) - TABLE_STATES:
        assert State.DONE in reachable(start), start


def test_table_ciphertext_states_accept_only_more_table_ciphertexts() -> None:
    for state in TABLE_STATES:
        assert TRANSITIONS[state] == {Msg.TABLE_CT: State.TABLE_CT}, state
    assert reachable(State.AWAIT_TABLE_CT) == TABLE_STATES


def test_repeated_messages_loop_only_on_their_own_states() -> None:
    loops = {(state, msg) for state, exits in TRANSITIONS.items()
             for msg, target in exits.items() if target is state}

    assert loops == {
        (State.LINKAGE, Msg.QUERY_CT), (State.LINKAGE, Msg.SCORE_CT),
        (State.LINKAGE, Msg.SELECTION_CT), (State.AWAIT_SIGNS, Msg.SIZE_CHECK_CT),
        (State.TABLE_CT, Msg.TABLE_CT),
    }


def test_table_names_every_state_and_never_error() -> None:
    assert set(TRANSITIONS) == set(State)
    assert all(Msg.ERROR not in exits for exits in TRANSITIONS.values())


def test_every_message_has_a_cap() -> None:
    assert set(CAPS) == set(Msg)
    assert all(cap > 0 for cap in CAPS.values())


# -- the channel ----------------------------------------------------------------------


def test_json_message_round_trips_and_both_sides_advance(
    pair: tuple[Channel, Channel],
) -> None:
    client, server = pair
    hello = {"protocol": 1, "query": {"group_by": ["state"], "value": "age"}}

    client.send_json(Msg.CLIENT_HELLO, hello)

    assert server.recv_json(Msg.CLIENT_HELLO) == hello
    assert client.state is server.state is State.AWAIT_SERVER_HELLO


def test_whole_session_in_order_leaves_both_sides_reading_table_ciphertexts(
    pair: tuple[Channel, Channel],
) -> None:
    client, server = pair

    walk(client, server, SESSION)

    assert client.state is server.state is State.TABLE_CT


@pytest.mark.parametrize("msg", [m for m in Msg if m not in (Msg.TABLE_CT, Msg.ERROR)])
def test_after_the_table_nothing_but_table_ciphertexts_may_be_sent(
    pair: tuple[Channel, Channel], msg: Msg,
) -> None:
    client, server = pair
    walk(client, server, SESSION)

    for side in (client, server):
        with pytest.raises(ProtocolError, match="out of order"):
            side.send(msg, b"{}")
    assert client.state is server.state is State.TABLE_CT


def test_error_after_the_table_ends_the_session(pair: tuple[Channel, Channel]) -> None:
    client, server = pair
    walk(client, server, SESSION)

    client.send_error("closing")

    with pytest.raises(PeerError, match="closing"):
        server.recv(Msg.TABLE_CT)
    assert client.state is State.DONE


def test_size_check_ciphertexts_repeat_until_the_signs(
    pair: tuple[Channel, Channel],
) -> None:
    client, server = pair
    walk(client, server, until(Msg.SIZE_CHECK) + [("server", Msg.SIZE_CHECK)])

    walk(client, server, [("server", Msg.SIZE_CHECK_CT)] * 35)

    assert client.state is server.state is State.AWAIT_SIGNS
    walk(client, server, [("client", Msg.SIZE_CHECK_SIGNS)])
    assert client.state is server.state is State.AWAIT_RESULT


def test_signs_before_any_size_check_ciphertext_are_refused(
    pair: tuple[Channel, Channel],
) -> None:
    client, server = pair
    walk(client, server, until(Msg.SIZE_CHECK) + [("server", Msg.SIZE_CHECK)])

    with pytest.raises(ProtocolError, match="out of order in state 'size check'"):
        client.send(Msg.SIZE_CHECK_SIGNS, b"{}")


def test_size_check_ciphertext_after_the_signs_is_refused(
    pair: tuple[Channel, Channel],
) -> None:
    client, server = pair
    walk(client, server, until(Msg.TABLE))
    send_frame(server.sock, int(Msg.SIZE_CHECK_CT), b"\0" * 32)

    with pytest.raises(ProtocolError, match="expected TABLE or REFUSED"):
        client.recv_any(Msg.TABLE, Msg.REFUSED)


def test_server_may_refuse_after_the_signs(pair: tuple[Channel, Channel]) -> None:
    client, server = pair
    walk(client, server, until(Msg.TABLE))

    server.send_json(Msg.REFUSED, {"reason": "query refused"})

    assert client.recv_any(Msg.TABLE, Msg.REFUSED)[0] is Msg.REFUSED
    assert client.state is server.state is State.DONE


def test_table_ciphertext_before_the_table_header_is_refused(
    pair: tuple[Channel, Channel],
) -> None:
    client, server = pair
    walk(client, server, until(Msg.TABLE))

    with pytest.raises(ProtocolError, match="out of order in state 'await result'"):
        server.send(Msg.TABLE_CT, b"")


def test_table_header_needs_at_least_one_table_ciphertext(
    pair: tuple[Channel, Channel],
) -> None:
    client, server = pair
    walk(client, server, until(Msg.TABLE_CT))

    assert client.state is server.state is State.AWAIT_TABLE_CT
    with pytest.raises(ProtocolError, match="out of order"):
        server.send(Msg.REFUSED, b"{}")


def test_byte_counters_agree_on_both_sides(pair: tuple[Channel, Channel]) -> None:
    client, server = pair

    walk(client, server, SESSION[:4])

    assert client.bytes.sent == server.bytes.received > 0
    assert server.bytes.sent == client.bytes.received > 0


def test_query_ciphertext_before_the_hello_is_refused_by_the_server(
    pair: tuple[Channel, Channel],
) -> None:
    client, server = pair
    send_frame(client.sock, int(Msg.QUERY_CT), b"\0" * 32)

    with pytest.raises(ProtocolError, match="expected CLIENT_HELLO, received QUERY_CT"):
        server.recv_json(Msg.CLIENT_HELLO)
    assert server.state is State.HELLO


def test_receiving_a_message_the_state_does_not_allow_is_refused(
    pair: tuple[Channel, Channel],
) -> None:
    client, server = pair
    send_frame(client.sock, int(Msg.QUERY_CT), b"\0" * 32)

    with pytest.raises(ProtocolError, match="out of order in state 'hello'"):
        server.recv(Msg.QUERY_CT)


def test_recv_any_refuses_a_message_it_was_not_told_to_expect(
    pair: tuple[Channel, Channel],
) -> None:
    client, server = pair
    walk(client, server, until(Msg.SELECTION_CT))
    server.send(Msg.SCORE_CT, b"")

    with pytest.raises(ProtocolError, match="expected SIZE_CHECK or REFUSED"):
        client.recv_any(Msg.SIZE_CHECK, Msg.REFUSED)


def test_sending_a_message_out_of_order_is_refused_before_it_is_sent(
    pair: tuple[Channel, Channel],
) -> None:
    client, _ = pair

    with pytest.raises(ProtocolError, match="out of order"):
        client.send(Msg.SELECTION_CT, b"")
    assert client.bytes.sent == 0
    assert client.state is State.HELLO


def test_peer_error_frame_raises_peer_error_with_its_text(
    pair: tuple[Channel, Channel],
) -> None:
    client, server = pair
    client.send_json(Msg.CLIENT_HELLO, {})
    server.recv_json(Msg.CLIENT_HELLO)

    server.send_error("grouping by 'postcode' is not allowed")

    with pytest.raises(PeerError) as caught:
        client.recv_json(Msg.SERVER_HELLO)
    assert caught.value.args[0] == "grouping by 'postcode' is not allowed"
    assert server.state is State.DONE


def test_peer_error_is_raised_from_recv_any_too(pair: tuple[Channel, Channel]) -> None:
    client, server = pair
    server.send_error("internal server error")

    with pytest.raises(PeerError, match="internal server error"):
        client.recv_any(Msg.SIZE_CHECK, Msg.REFUSED)


def test_unreadable_error_frame_still_raises_peer_error(
    pair: tuple[Channel, Channel],
) -> None:
    client, server = pair
    server.sock.sendall(encode_frame(int(Msg.ERROR), b"\xff not json"))

    with pytest.raises(PeerError, match="unreadable"):
        client.recv(Msg.SERVER_HELLO)


def test_long_error_text_is_cut_to_fit_the_error_cap(
    pair: tuple[Channel, Channel],
) -> None:
    client, server = pair

    server.send_error("\u00e9" * 5000)

    with pytest.raises(PeerError) as caught:
        client.recv(Msg.SERVER_HELLO)
    assert caught.value.args[0] == "\u00e9" * 1000


def test_frame_longer_than_its_type_allows_is_refused_from_its_header(
    pair: tuple[Channel, Channel],
) -> None:
    client, server = pair
    length = CAPS[Msg.CLIENT_HELLO] + 1
    client.sock.sendall(struct.pack("!4sBBHQ", b"PPRL", 1, Msg.CLIENT_HELLO, 0, length))

    with pytest.raises(ProtocolError, match="exceeds the limit"):
        server.recv(Msg.CLIENT_HELLO)


def test_server_without_positions_can_refuse_right_after_the_linkage(
    pair: tuple[Channel, Channel],
) -> None:
    # When no server record has a blocking key, every group has zero positions:
    # no SCORE_CT and no SELECTION_CT cross, and server._size_check_and_table
    # sends REFUSED (every count is None) straight after the query ciphertexts.
    client, server = pair
    walk(client, server, SESSION[:4] + [("client", Msg.QUERY_CT)])

    error = None
    try:
        server.send_json(Msg.REFUSED, {"reason": "query refused"})
        client.recv_any(Msg.SIZE_CHECK, Msg.REFUSED)
    except ProtocolError as exc:
        error = exc

    assert error is None, (
        "protocol bug: messages.TRANSITIONS[State.LINKAGE] has no REFUSED exit, "
        "so a session whose layout has zero positions in every group ends with "
        f"ProtocolError({error}) on the server and an ERROR for the client "
        "instead of a clean refusal"
    )
