"""Tests for protocol.framing: the decoder in memory, then over a socketpair."""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from protocol.framing import (
    HEADER_SIZE,
    MAGIC,
    VERSION,
    ByteCounter,
    ConnectionClosed,
    Frame,
    FrameDecoder,
    ProtocolError,
    decode_json_payload,
    encode_frame,
    encode_json,
    recv_frame,
    send_frame,
)

SMALL, BIG, EMPTY = 1, 2, 3
CAPS = {SMALL: 1024, BIG: 8 << 20, EMPTY: 0}


def header(
    magic: bytes = MAGIC,
    version: int = VERSION,
    msg_type: int = SMALL,
    flags: int = 0,
    length: int = 0,
) -> bytes:
    """Build a header by hand, so tests can forge what encode_frame refuses."""
    return struct.pack("!4sBBHQ", magic, version, msg_type, flags, length)


def frames_in(decoder: FrameDecoder) -> list[Frame]:
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


def refuse(data: bytes) -> ProtocolError:
    decoder = FrameDecoder(CAPS)
    decoder.feed(data)
    with pytest.raises(ProtocolError) as info:
        decoder.next_frame()
    return info.value


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    try:
        yield left, right
    finally:
        left.close()
        right.close()


SAMPLE = [
    Frame(SMALL, b"hello"),
    Frame(EMPTY, b""),
    Frame(BIG, bytes(range(256)) * 40),
    Frame(SMALL, b"\x00" * 1024),
]
SAMPLE_BYTES = b"".join(encode_frame(f.msg_type, f.payload) for f in SAMPLE)


# Round trips in memory


def test_header_is_sixteen_bytes() -> None:
    assert HEADER_SIZE == 16
    assert encode_frame(SMALL, b"ab") == header(length=2) + b"ab"


def test_frames_fed_byte_by_byte_round_trip() -> None:
    decoder = FrameDecoder(CAPS)
    received = []
    for i in range(len(SAMPLE_BYTES)):
        decoder.feed(SAMPLE_BYTES[i : i + 1])
        received.extend(frames_in(decoder))

    assert received == SAMPLE
    assert decoder.at_frame_boundary()


def test_frames_fed_all_at_once_round_trip() -> None:
    decoder = FrameDecoder(CAPS)
    decoder.feed(SAMPLE_BYTES)

    assert decoder.at_frame_boundary()
    assert frames_in(decoder) == SAMPLE
    assert decoder.next_frame() is None


def test_length_equal_to_cap_is_accepted() -> None:
    decoder = FrameDecoder(CAPS)
    decoder.feed(encode_frame(SMALL, b"x" * CAPS[SMALL]))

    assert decoder.next_frame() == Frame(SMALL, b"x" * CAPS[SMALL])


def test_json_round_trip() -> None:
    obj = {"phase": "hello", "n": 3, "ratio": 0.25, "names": ["Zoë", "Ali"],
           "nested": {"ok": True, "none": None}}
    decoder = FrameDecoder(CAPS)
    decoder.feed(encode_json(SMALL, obj))
    frame = decoder.next_frame()

    assert frame is not None and frame.msg_type == SMALL
    assert decode_json_payload(frame) == obj


def test_encode_json_is_compact_sorted_utf8() -> None:
    frame = encode_json(SMALL, {"b": 1, "a": "é"})

    assert frame[HEADER_SIZE:] == '{"a":"é","b":1}'.encode("utf-8")


# Malformed headers


def test_bad_magic_is_refused() -> None:
    assert "magic" in str(refuse(header(magic=b"HTTP")))


def test_wrong_version_is_refused() -> None:
    assert "version" in str(refuse(header(version=VERSION + 1)))


def test_nonzero_flags_is_refused() -> None:
    assert "flags" in str(refuse(header(flags=1)))


def test_unknown_type_is_refused() -> None:
    assert "unknown message type 99" in str(refuse(header(msg_type=99)))


def test_length_over_cap_is_refused_with_only_header_fed() -> None:
    error = refuse(header(msg_type=SMALL, length=CAPS[SMALL] + 1))

    assert "exceeds" in str(error)


def test_length_two_to_the_63_is_refused_not_memory_error() -> None:
    try:
        error = refuse(header(msg_type=BIG, length=2**63))
    except MemoryError:  # pragma: no cover - the failure this test guards
        pytest.fail("decoder tried to allocate the claimed length")

    assert str(2**63) in str(error)


def test_oversized_payload_is_not_buffered() -> None:
    decoder = FrameDecoder(CAPS)
    decoder.feed(header(msg_type=SMALL, length=CAPS[SMALL] + 1))
    decoder.feed(b"\x00" * 4096)

    assert len(decoder._buf) == 0
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.next_frame()


def test_frames_before_a_refused_header_are_still_returned() -> None:
    decoder = FrameDecoder(CAPS)
    decoder.feed(encode_frame(SMALL, b"first") + header(msg_type=99))

    assert decoder.next_frame() == Frame(SMALL, b"first")
    with pytest.raises(ProtocolError, match="unknown"):
        decoder.next_frame()


def test_refusal_message_does_not_echo_peer_bytes() -> None:
    secret = b"SECRET-CIPHERTEXT"
    error = refuse(secret + header() + secret)

    assert "SECRET" not in str(error)


# Truncation and closing


def test_truncated_header_gives_no_frame_and_not_at_boundary() -> None:
    decoder = FrameDecoder(CAPS)
    decoder.feed(encode_frame(SMALL, b"hello")[: HEADER_SIZE - 1])

    assert decoder.next_frame() is None
    assert not decoder.at_frame_boundary()


def test_truncated_payload_gives_no_frame_and_not_at_boundary() -> None:
    decoder = FrameDecoder(CAPS)
    decoder.feed(encode_frame(SMALL, b"hello")[:-1])

    assert decoder.next_frame() is None
    assert not decoder.at_frame_boundary()


def test_fresh_decoder_is_at_boundary() -> None:
    assert FrameDecoder(CAPS).at_frame_boundary()


def test_recv_frame_close_mid_frame_is_unclean(pair) -> None:
    left, right = pair
    left.sendall(encode_frame(SMALL, b"hello")[:-2])
    left.close()

    with pytest.raises(ConnectionClosed) as info:
        recv_frame(right, FrameDecoder(CAPS))
    assert info.value.clean is False


def test_recv_frame_close_at_boundary_is_clean(pair) -> None:
    left, right = pair
    send_frame(left, SMALL, b"last")
    left.close()
    decoder = FrameDecoder(CAPS)

    assert recv_frame(right, decoder) == Frame(SMALL, b"last")
    with pytest.raises(ConnectionClosed) as info:
        recv_frame(right, decoder)
    assert info.value.clean is True
    assert isinstance(info.value, ProtocolError)


def test_recv_frame_lets_timeout_through(pair) -> None:
    left, right = pair
    right.settimeout(0.05)

    with pytest.raises(socket.timeout):
        recv_frame(right, FrameDecoder(CAPS))


def test_recv_frame_raises_on_refused_header(pair) -> None:
    left, right = pair
    left.sendall(header(msg_type=99))

    with pytest.raises(ProtocolError, match="unknown"):
        recv_frame(right, FrameDecoder(CAPS))


# Malformed JSON payloads


def refuse_json(payload: bytes, max_depth: int = 8) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_json_payload(Frame(SMALL, payload), max_depth=max_depth)
    return info.value


def test_non_json_payload_is_refused() -> None:
    error = refuse_json(b"{not json: SECRET}")

    assert "SECRET" not in str(error)


def test_json_array_at_top_level_is_refused() -> None:
    assert "not an object" in str(refuse_json(b"[1, 2, 3]"))


def test_json_deeper_than_max_depth_is_refused() -> None:
    payload = {"a": {"b": {"c": [1]}}}  # four containers deep

    refuse_json(json.dumps(payload).encode(), max_depth=3)


def test_json_at_exactly_max_depth_is_accepted() -> None:
    payload = {"a": {"b": {"c": [1]}}}

    assert decode_json_payload(
        Frame(SMALL, json.dumps(payload).encode()), max_depth=4
    ) == payload


def test_pathologically_nested_json_is_refused_not_recursion_error() -> None:
    refuse_json(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}")


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_number_in_json_is_refused(constant: bytes) -> None:
    refuse_json(b'{"x":' + constant + b"}")


def test_invalid_utf8_json_is_refused() -> None:
    refuse_json(b'{"name":"\xff\xfe"}')


def test_json_with_duplicate_keys_is_refused() -> None:
    assert "duplicate" in str(refuse_json(b'{"a":1,"a":2}'))


def test_encode_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        encode_json(SMALL, {"x": float("nan")})


# Misuse by the caller


def test_decoder_is_unusable_after_an_error() -> None:
    decoder = FrameDecoder(CAPS)
    decoder.feed(header(magic=b"XXXX"))
    with pytest.raises(ProtocolError, match="magic"):
        decoder.next_frame()

    with pytest.raises(ProtocolError, match="unusable after an error"):
        decoder.feed(encode_frame(SMALL, b"ok"))
    with pytest.raises(ProtocolError, match="unusable after an error"):
        decoder.next_frame()
    assert not decoder.at_frame_boundary()


@pytest.mark.parametrize("msg_type", [-1, 256, 2**40])
def test_encode_frame_refuses_type_out_of_range(msg_type: int) -> None:
    with pytest.raises(ValueError):
        encode_frame(msg_type, b"")


@pytest.mark.parametrize("msg_type", ["1", 1.0, None, True])
def test_encode_frame_refuses_type_that_is_not_int(msg_type: object) -> None:
    with pytest.raises(TypeError):
        encode_frame(msg_type, b"")  # type: ignore[arg-type]


@pytest.mark.parametrize("payload", ["text", None, [1, 2]])
def test_encode_frame_refuses_payload_that_is_not_bytes(payload: object) -> None:
    with pytest.raises(TypeError):
        encode_frame(SMALL, payload)  # type: ignore[arg-type]


def test_decoder_refuses_cap_for_type_out_of_range() -> None:
    with pytest.raises(ValueError):
        FrameDecoder({300: 10})


def test_decoder_refuses_negative_cap() -> None:
    with pytest.raises(ValueError):
        FrameDecoder({SMALL: -1})


def test_frame_repr_hides_payload() -> None:
    assert "secret" not in repr(Frame(SMALL, b"secret"))


# Over a real socket pair


def test_five_megabyte_payload_over_socketpair_counts_match(pair) -> None:
    left, right = pair
    payload = bytes(range(256)) * (5 * 4096 + 7)
    sent_counter, recv_counter = ByteCounter(), ByteCounter()
    results: dict[str, object] = {}

    def sender() -> None:
        try:
            results["written"] = send_frame(left, BIG, payload, counter=sent_counter)
        except BaseException as exc:  # pragma: no cover - reported below
            results["error"] = exc

    thread = threading.Thread(target=sender)
    thread.start()
    try:
        frame = recv_frame(right, FrameDecoder(CAPS), counter=recv_counter)
    finally:
        thread.join(timeout=10)

    assert "error" not in results
    assert frame == Frame(BIG, payload)
    assert results["written"] == HEADER_SIZE + len(payload)
    assert sent_counter.sent == recv_counter.received == HEADER_SIZE + len(payload)


def test_several_frames_in_one_recv_are_returned_in_order(pair) -> None:
    left, right = pair
    left.sendall(SAMPLE_BYTES)
    left.close()
    decoder = FrameDecoder(CAPS)

    assert [recv_frame(right, decoder) for _ in SAMPLE] == SAMPLE
    with pytest.raises(ConnectionClosed):
        recv_frame(right, decoder)
