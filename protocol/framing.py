"""Length-prefixed frames over raw TCP: a sans-IO decoder plus socket helpers.

On the wire, one frame is a 16-byte header followed by its payload::

    +--------+---------+----------+-------------+----------------+---------+
    | "PPRL" | version | msg type | flags (= 0) | payload length | payload |
    | 4 B    | uint8   | uint8    | uint16      | uint64         | length B|
    +--------+---------+----------+-------------+----------------+---------+

All integers are big-endian (``struct`` format ``"!4sBBHQ"``). Nothing else
crosses the wire: no padding, no trailer, no checksum (TCP already has one, and
integrity against an active attacker is the transport's job, not ours).

Why a per-type cap, checked before allocation: the length field is 64 bits and
comes from the peer. A decoder that trusted it could be told to reserve 2**63
bytes, or to keep buffering a "ciphertext" until memory runs out. Each message
type therefore has its own ceiling (a handshake message is a few hundred bytes,
a batch of CKKS ciphertexts may be hundreds of megabytes), and the claimed
length is compared with that ceiling as soon as the header is complete, before
a single payload byte is kept. Even a length under the cap is never allocated
up front: the buffer grows only with bytes that have really arrived.

Payloads are either compact UTF-8 JSON (control messages, see
:func:`encode_json`) or SEAL's own serialisation of a key or ciphertext (see
:mod:`protocol.he`). Nothing is ever pickled: unpickling peer bytes would run
the peer's code.

Every peer misbehaviour raises :class:`ProtocolError`, whose message names the
refused header field but never echoes payload bytes, so it is safe to send back
to the peer or to log. After one error the decoder refuses further use, since
the stream position is lost and anything after it would be misread.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import struct
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

MAGIC = b"PPRL"
VERSION = 1
_HEADER = struct.Struct("!4sBBHQ")
HEADER_SIZE: int = _HEADER.size

_MAX_MSG_TYPE = 255

# Below this size the header and payload are joined before sending: a header
# sent alone followed by a small payload is the write-write-read pattern where
# Nagle's algorithm and delayed ACKs stall for tens of milliseconds. Above it,
# the payload fills whole segments anyway and the copy would cost more.
_JOIN_BELOW = 64 * 1024

_UNUSABLE = "decoder is unusable after an error"


class ProtocolError(Exception):
    """The peer sent something we refuse.

    The message is safe to show the peer: it never contains payload bytes.
    """


class ConnectionClosed(ProtocolError):
    """The peer closed the connection.

    ``clean`` is True when it closed between frames (an orderly end) and
    False when it closed mid-frame (a truncated message).
    """

    def __init__(self, message: str | None = None, *, clean: bool) -> None:
        if message is None:
            where = "between frames" if clean else "in the middle of a frame"
            message = f"peer closed the connection {where}"
        super().__init__(message)
        self.clean = clean


@dataclass(frozen=True, repr=False)
class Frame:
    """One decoded message: its type and its payload, still unparsed."""

    msg_type: int
    payload: bytes

    def __repr__(self) -> str:
        # The payload may be ciphertext or personal data: show only its size,
        # so that a frame which ends up in a log or traceback leaks nothing.
        return f"Frame(msg_type={self.msg_type}, len(payload)={len(self.payload)})"


@dataclass
class ByteCounter:
    """Running totals of bytes on one connection, headers included."""

    sent: int = 0
    received: int = 0


def _check_msg_type(msg_type: int) -> None:
    if isinstance(msg_type, bool) or not isinstance(msg_type, int):
        raise TypeError(f"msg_type must be an int, not {type(msg_type).__name__}")
    if not 0 <= msg_type <= _MAX_MSG_TYPE:
        raise ValueError(f"msg_type must be in 0..{_MAX_MSG_TYPE}, got {msg_type}")


def _pack_header(msg_type: int, payload: bytes) -> bytes:
    _check_msg_type(msg_type)
    if not isinstance(payload, bytes):
        raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
    return _HEADER.pack(MAGIC, VERSION, msg_type, 0, len(payload))


def encode_frame(msg_type: int, payload: bytes) -> bytes:
    """Return the header and payload of one frame, ready to write."""
    return _pack_header(msg_type, payload) + payload


def _check_caps(caps: Mapping[int, int]) -> dict[int, int]:
    if not isinstance(caps, Mapping):
        raise TypeError(f"caps must be a mapping, not {type(caps).__name__}")
    for msg_type, cap in caps.items():
        _check_msg_type(msg_type)
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
            raise ValueError(
                f"cap for message type {msg_type} must be an int >= 0, got {cap!r}"
            )
    return dict(caps)


class FrameDecoder:
    """Sans-IO: bytes in, frames out.

    ``caps`` maps each message type this side accepts to the largest payload
    length it accepts for it (inclusive). A type absent from ``caps`` is
    unknown and refused.

    Headers are checked in :meth:`feed`, the moment they are complete, so an
    oversized or malformed frame is never buffered; the error is raised by
    :meth:`next_frame` once the good frames before it have been returned, so
    errors surface in stream order.
    """

    def __init__(self, caps: Mapping[int, int]) -> None:
        self._caps = _check_caps(caps)
        # Bytes of frames not yet returned; always starts at a frame header.
        self._buf = bytearray()
        # (msg_type, length) of every header in _buf that passed the checks.
        self._checked: deque[tuple[int, int]] = deque()
        # Offset in _buf where the next unchecked header starts (may lie past
        # the end while a checked frame's payload is still arriving).
        self._scan = 0
        self._pending: ProtocolError | None = None
        self._broken = False

    def feed(self, data: bytes) -> None:
        """Add bytes received from the peer (any amount, any split)."""
        if self._broken:
            raise ProtocolError(_UNUSABLE)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, not {type(data).__name__}")
        if self._pending is not None:
            return  # the stream is already refused: drop what follows
        self._buf += data
        self._check_headers()

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or None if more bytes are needed.

        Raises ProtocolError if the next frame in the stream was refused.
        """
        if self._broken:
            raise ProtocolError(_UNUSABLE)
        if self._checked:
            return self._pop_frame_if_complete()
        if self._pending is not None:
            self._broken = True
            raise self._pending
        return None

    def at_frame_boundary(self) -> bool:
        """True when no partial frame is buffered (complete ones may be)."""
        if self._broken or self._pending is not None:
            return False
        return self._scan == len(self._buf)

    def _check_headers(self) -> None:
        while len(self._buf) - self._scan >= HEADER_SIZE:
            try:
                msg_type, length = self._parse_header(self._scan)
            except ProtocolError as exc:
                logger.debug("refused frame header: %s", exc)
                self._pending = exc
                del self._buf[self._scan :]
                return
            self._checked.append((msg_type, length))
            self._scan += HEADER_SIZE + length

    def _parse_header(self, offset: int) -> tuple[int, int]:
        """Check one header of unverified peer bytes; return type and length."""
        magic, version, msg_type, flags, length = _HEADER.unpack_from(self._buf, offset)
        if magic != MAGIC:
            raise ProtocolError("bad magic: not a PPRL frame")
        if version != VERSION:
            raise ProtocolError(
                f"unsupported protocol version {version} (expected {VERSION})"
            )
        if flags != 0:
            raise ProtocolError(f"reserved flags must be 0, got {flags:#06x}")
        cap = self._caps.get(msg_type)
        if cap is None:
            raise ProtocolError(f"unknown message type {msg_type}")
        if length > cap:
            raise ProtocolError(
                f"message type {msg_type}: payload length {length} "
                f"exceeds the limit of {cap}"
            )
        return msg_type, length

    def _pop_frame_if_complete(self) -> Frame | None:
        msg_type, length = self._checked[0]
        end = HEADER_SIZE + length
        if len(self._buf) < end:
            return None

        self._checked.popleft()
        # One copy out of the buffer (a bytearray slice would make two).
        with memoryview(self._buf) as view:
            payload = view[HEADER_SIZE:end].tobytes()
        # Deleting from the front of a bytearray only moves its start pointer,
        # so many large frames in a row stay linear, not quadratic.
        del self._buf[:end]
        self._scan -= end
        logger.debug("received frame type=%d length=%d", msg_type, length)
        return Frame(msg_type, payload)


def encode_json(msg_type: int, obj: Mapping[str, Any]) -> bytes:
    """Return a frame whose payload is ``obj`` as compact, canonical JSON.

    Keys are sorted and no whitespace is added, so equal objects give equal
    bytes (useful for transcripts and tests). NaN and infinities are refused:
    they are not JSON and other parsers would read them differently.
    """
    if not isinstance(obj, Mapping):
        raise TypeError(f"obj must be a mapping, not {type(obj).__name__}")
    text = json.dumps(
        dict(obj),
        sort_keys=True,
        separators=(",", ":"),
        allow_nan=False,
        ensure_ascii=False,
    )
    return encode_frame(msg_type, text.encode("utf-8"))


class _RefusedJson(ValueError):
    """Raised inside the JSON parser hooks; turned into a ProtocolError."""


def _refuse_constant(name: str) -> Any:
    raise _RefusedJson(f"non-finite number {name} is not allowed")


def _finite_float(text: str) -> float:
    # "1e999" is valid JSON but parses to inf, a non-finite value by another
    # route than the NaN/Infinity constants.
    value = float(text)
    if not math.isfinite(value):
        raise _RefusedJson("number out of range for a finite float")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on which duplicate wins; refusing removes the ambiguity.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _RefusedJson("duplicate key in JSON object")
    return obj


def _depth_exceeds(value: Any, max_depth: int) -> bool:
    """True if containers nest deeper than ``max_depth`` (top level is 1)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend(
            (child, depth + 1) for child in children if isinstance(child, (dict, list))
        )
    return False


def decode_json_payload(frame: Frame, max_depth: int = 8) -> dict[str, Any]:
    """Parse the unverified JSON payload of ``frame`` into a dict.

    Refuses invalid UTF-8, invalid JSON, a top level that is not an object,
    nesting deeper than ``max_depth`` containers (the top-level object counts
    as 1, so ``max_depth`` itself is allowed), NaN and infinities, and
    duplicate keys.
    """
    if max_depth < 1:
        raise ValueError(f"max_depth must be >= 1, got {max_depth}")
    try:
        text = frame.payload.decode("utf-8")
        obj = json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            object_pairs_hook=_no_duplicate_keys,
        )
    except _RefusedJson as exc:
        raise ProtocolError(f"message type {frame.msg_type}: {exc}") from None
    except (ValueError, RecursionError):
        # UnicodeDecodeError and JSONDecodeError are ValueErrors; their text
        # quotes the payload, so it is replaced, not passed on.
        raise ProtocolError(
            f"message type {frame.msg_type}: payload is not valid UTF-8 JSON"
        ) from None
    return _check_json_shape(frame.msg_type, obj, max_depth)


def _check_json_shape(msg_type: int, obj: Any, max_depth: int) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ProtocolError(f"message type {msg_type}: JSON payload is not an object")
    if _depth_exceeds(obj, max_depth):
        raise ProtocolError(
            f"message type {msg_type}: JSON nests deeper than {max_depth} levels"
        )
    return obj


def send_frame(
    sock: socket.socket,
    msg_type: int,
    payload: bytes,
    *,
    counter: ByteCounter | None = None,
) -> int:
    """Write one frame to a blocking socket; return the bytes written."""
    header = _pack_header(msg_type, payload)
    if len(payload) < _JOIN_BELOW:
        sock.sendall(header + payload)
    else:
        sock.sendall(header)
        sock.sendall(payload)

    written = len(header) + len(payload)
    if counter is not None:
        counter.sent += written
    logger.debug("sent frame type=%d length=%d", msg_type, len(payload))
    return written


def recv_frame(
    sock: socket.socket,
    decoder: FrameDecoder,
    bufsize: int = 1 << 20,
    *,
    counter: ByteCounter | None = None,
) -> Frame:
    """Read from a blocking socket until ``decoder`` yields a frame.

    Bytes read past the frame stay in ``decoder`` for the next call, so use
    one decoder per connection. ``counter.received`` counts bytes as they are
    read from the socket. Raises ConnectionClosed when the peer closes and
    ProtocolError when it sends a refused frame; ``socket.timeout`` passes
    through unchanged, leaving the decoder consistent.
    """
    if bufsize < 1:
        raise ValueError(f"bufsize must be >= 1, got {bufsize}")
    while True:
        frame = decoder.next_frame()
        if frame is not None:
            return frame
        data = sock.recv(bufsize)
        if not data:
            raise ConnectionClosed(clean=decoder.at_frame_boundary())
        if counter is not None:
            counter.received += len(data)
        decoder.feed(data)
