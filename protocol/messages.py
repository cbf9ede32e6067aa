"""Message types, their size caps, and the one table of allowed transitions.

Rules of the conversation, in order (C = client, S = server):

    C CLIENT_HELLO        spec, parameter set name, query, client size class
    S SERVER_HELLO        table shape, positions per group   (or S ERROR)
    C PUBLIC_KEY, C GALOIS_KEYS
    linkage, per group:   C QUERY_CT x dims/2, S SCORE_CT x positions (the
                          client streams its groups; the server answers each)
    selection, per pass:  C SELECTION_CT x (positions of the pass), sent
                          after the next pass's queries (the last pass's
                          after its own), so the linkage of one pass and the
                          cross-tab of the one before it overlap
    S SIZE_CHECK + S SIZE_CHECK_CT x m, C SIZE_CHECK_SIGNS
    S TABLE + S TABLE_CT x cells (x 2 if counts are revealed), or S REFUSED
    (also right after the last selections, or after the queries when there
    is no position at all, when no server record of any cell sits at any
    position)
    ERROR may come from either side at any point; it ends the session.

Every frame sent or received goes through :class:`Channel`, which refuses a
message that the table does not allow in the current state. Counting the
repeated messages (how many ciphertexts per group) is the phase code's job.
"""

from __future__ import annotations

import enum
import socket

from .framing import (
    HEADER_SIZE,
    ByteCounter,
    Frame,
    FrameDecoder,
    ProtocolError,
    decode_json_payload,
    encode_json,
    recv_frame,
    send_frame,
)
from .he import MAX_CIPHERTEXT_BYTES, MAX_GALOIS_KEYS_BYTES, MAX_PUBLIC_KEY_BYTES


class Msg(enum.IntEnum):
    CLIENT_HELLO = 1
    SERVER_HELLO = 2
    PUBLIC_KEY = 3
    GALOIS_KEYS = 4
    QUERY_CT = 5
    SCORE_CT = 6
    SELECTION_CT = 7
    SIZE_CHECK = 8
    SIZE_CHECK_CT = 9
    SIZE_CHECK_SIGNS = 10
    TABLE = 11
    TABLE_CT = 12
    REFUSED = 13
    ERROR = 14


JSON_CAP = 64 * 1024
CAPS = {
    Msg.CLIENT_HELLO: JSON_CAP,
    Msg.SERVER_HELLO: 4 * 1024 * 1024,
    Msg.PUBLIC_KEY: MAX_PUBLIC_KEY_BYTES,
    Msg.GALOIS_KEYS: MAX_GALOIS_KEYS_BYTES,
    Msg.QUERY_CT: MAX_CIPHERTEXT_BYTES,
    Msg.SCORE_CT: MAX_CIPHERTEXT_BYTES,
    Msg.SELECTION_CT: MAX_CIPHERTEXT_BYTES,
    Msg.SIZE_CHECK: JSON_CAP,
    Msg.SIZE_CHECK_CT: MAX_CIPHERTEXT_BYTES,
    Msg.SIZE_CHECK_SIGNS: JSON_CAP,
    Msg.TABLE: JSON_CAP,
    Msg.TABLE_CT: MAX_CIPHERTEXT_BYTES,
    Msg.REFUSED: JSON_CAP,
    Msg.ERROR: 4096,
}


class State(enum.Enum):
    HELLO = "hello"
    AWAIT_SERVER_HELLO = "await server hello"
    AWAIT_PUBLIC_KEY = "await public key"
    AWAIT_GALOIS_KEYS = "await Galois keys"
    LINKAGE = "linkage"
    SIZE_CHECK = "size check"
    AWAIT_SIGNS = "await signs"
    AWAIT_RESULT = "await result"
    AWAIT_TABLE_CT = "await table ciphertext"
    TABLE_CT = "table ciphertexts"
    DONE = "done"


TRANSITIONS: dict[State, dict[Msg, State]] = {
    State.HELLO: {Msg.CLIENT_HELLO: State.AWAIT_SERVER_HELLO},
    State.AWAIT_SERVER_HELLO: {Msg.SERVER_HELLO: State.AWAIT_PUBLIC_KEY},
    State.AWAIT_PUBLIC_KEY: {Msg.PUBLIC_KEY: State.AWAIT_GALOIS_KEYS},
    State.AWAIT_GALOIS_KEYS: {Msg.GALOIS_KEYS: State.LINKAGE},
    State.LINKAGE: {
        Msg.QUERY_CT: State.LINKAGE,
        Msg.SCORE_CT: State.LINKAGE,
        Msg.SELECTION_CT: State.LINKAGE,
        Msg.SIZE_CHECK: State.SIZE_CHECK,
        Msg.REFUSED: State.DONE,
    },
    State.SIZE_CHECK: {Msg.SIZE_CHECK_CT: State.AWAIT_SIGNS},
    State.AWAIT_SIGNS: {
        Msg.SIZE_CHECK_CT: State.AWAIT_SIGNS,
        Msg.SIZE_CHECK_SIGNS: State.AWAIT_RESULT,
    },
    State.AWAIT_RESULT: {Msg.TABLE: State.AWAIT_TABLE_CT, Msg.REFUSED: State.DONE},
    State.AWAIT_TABLE_CT: {Msg.TABLE_CT: State.TABLE_CT},
    State.TABLE_CT: {Msg.TABLE_CT: State.TABLE_CT},
    State.DONE: {},
}


class PeerError(ProtocolError):
    """The peer sent ERROR; its message is in ``args[0]``."""


class Channel:
    """A socket plus the conversation's state: every frame is checked against it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.state = State.HELLO
        self.bytes = ByteCounter()
        self._decoder = FrameDecoder({int(t): cap for t, cap in CAPS.items()})

    def _advance(self, msg: Msg) -> None:
        allowed = TRANSITIONS[self.state]
        if msg not in allowed:
            raise ProtocolError(
                f"{msg.name} is out of order in state '{self.state.value}'"
            )
        self.state = allowed[msg]

    def send(self, msg: Msg, payload: bytes) -> None:
        self._advance(msg)
        send_frame(self.sock, int(msg), payload, counter=self.bytes)

    def send_json(self, msg: Msg, obj: dict) -> None:
        self.send(msg, encode_json(int(msg), obj)[HEADER_SIZE:])

    def recv(self, expected: Msg) -> bytes:
        frame = self._recv_frame()
        if frame.msg_type == Msg.ERROR:
            raise PeerError(_error_text(frame))
        if frame.msg_type != expected:
            raise ProtocolError(
                f"expected {expected.name}, received {Msg(frame.msg_type).name}"
            )
        self._advance(expected)
        return frame.payload

    def recv_json(self, expected: Msg) -> dict:
        payload = self.recv(expected)
        return decode_json_payload(Frame(int(expected), payload))

    def recv_any(self, *expected: Msg) -> tuple[Msg, bytes]:
        frame = self._recv_frame()
        if frame.msg_type == Msg.ERROR:
            raise PeerError(_error_text(frame))
        if frame.msg_type not in expected:
            names = " or ".join(m.name for m in expected)
            raise ProtocolError(
                f"expected {names}, received {Msg(frame.msg_type).name}"
            )
        msg = Msg(frame.msg_type)
        self._advance(msg)
        return msg, frame.payload

    def send_error(self, text: str) -> None:
        """Best effort: tell the peer why we close, then stop using the channel."""
        try:
            payload = encode_json(int(Msg.ERROR), {"error": text[:1000]})[HEADER_SIZE:]
            send_frame(self.sock, int(Msg.ERROR), payload, counter=self.bytes)
        except (OSError, ValueError):
            pass
        self.state = State.DONE

    def _recv_frame(self) -> Frame:
        return recv_frame(self.sock, self._decoder, counter=self.bytes)


def _error_text(frame: Frame) -> str:
    try:
        text = decode_json_payload(frame).get("error")
    except ProtocolError:
        return "peer reported an error (unreadable)"
    return text if isinstance(text, str) else "peer reported an error"
