"""Tests for protocol.he: parameters, keys, and the checked loading of peer bytes.

Every refusal must be a ProtocolError: the bytes come from the peer, and the
server answers anything else with an internal error.
"""

from __future__ import annotations

import struct
import threading

import numpy as np
import pytest
import tenseal.sealapi as sa

from protocol.framing import ProtocolError
from protocol.he import (
    MAX_CIPHERTEXT_BYTES,
    MAX_PUBLIC_KEY_BYTES,
    Ckks,
    PublicKeyHolder,
    SecretKeyHolder,
    rotation_steps,
)

TOLERANCE = 1e-6
# Each of rotate_sum's twelve key switchings adds noise of about 1e-6 at scale 2^40.
ROTATION_TOLERANCE = 1e-4
SEAL_HEADER = struct.Struct("<HBBBBHQ")


@pytest.fixture(scope="module")
def values(ckks: Ckks) -> np.ndarray:
    return np.random.default_rng(11).uniform(-1.0, 1.0, ckks.slots)


@pytest.fixture(scope="module")
def fresh(secret: SecretKeyHolder, values: np.ndarray) -> bytes:
    """A fresh, seed-compressed client ciphertext, as it crosses the wire."""
    return secret.encrypt_to_bytes(values)


@pytest.fixture(scope="module")
def small_holder(ckks: Ckks) -> SecretKeyHolder:
    """Keys whose Galois keys cover rotations by 1 and 2 only."""
    return SecretKeyHolder(ckks, [1, 2])


def with_declared_size(data: bytes, size: int) -> bytes:
    """``data`` with the size field of its SEAL header replaced."""
    fields = list(SEAL_HEADER.unpack_from(data))
    fields[-1] = size
    return SEAL_HEADER.pack(*fields) + data[SEAL_HEADER.size :]


def two_products(ckks: Ckks, ciphertext: sa.Ciphertext) -> sa.Ciphertext:
    """Multiply by a plaintext of ones and rescale, twice: level 0 to level 2."""
    out = sa.Ciphertext()
    ckks.evaluator.multiply_plain(ciphertext, ckks.encode(np.ones(ckks.slots)), out)
    ckks.evaluator.rescale_to_next_inplace(out)
    ckks.evaluator.multiply_plain_inplace(out, ckks.encode(np.ones(ckks.slots), 1))
    ckks.evaluator.rescale_to_next_inplace(out)
    return out


# -- parameters -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ckks-4096-40-20-40", "", "CKKS-8192-60-40-40-60"])
def test_parameter_set_not_on_the_allow_list_is_refused(name: str) -> None:
    with pytest.raises(ProtocolError, match="allow-list"):
        Ckks(name)


def test_context_has_4096_slots_and_three_data_levels(ckks: Ckks) -> None:
    assert ckks.slots == 4096
    assert len(ckks.levels) == 3
    assert ckks.scale == 2.0**40


def test_rotation_steps_are_the_powers_of_two_below_half_the_slots() -> None:
    assert rotation_steps(4096) == [1 << i for i in range(12)]
    assert rotation_steps(8) == [1, 2, 4]


def test_final_scale_is_the_scale_after_two_products_and_rescales(
    ckks: Ckks, fresh: bytes
) -> None:
    out = two_products(ckks, ckks.load_ciphertext_untrusted(fresh, 0, ckks.scale))

    assert out.parms_id() == ckks.levels[2]
    assert out.scale == pytest.approx(ckks.final_scale(), rel=1e-12)
    assert ckks.final_scale() != pytest.approx(ckks.scale, rel=1e-9)


# -- round trip -------------------------------------------------------------------


def test_fresh_ciphertext_round_trips_within_tolerance(
    ckks: Ckks, secret: SecretKeyHolder, fresh: bytes, values: np.ndarray
) -> None:
    ciphertext = ckks.load_ciphertext_untrusted(fresh, 0, ckks.scale)

    assert np.max(np.abs(secret.decrypt(ciphertext) - values)) < TOLERANCE


def test_fresh_ciphertext_is_seed_compressed_to_under_half_its_full_size(
    ckks: Ckks, fresh: bytes
) -> None:
    loaded = ckks.load_ciphertext_untrusted(fresh, 0, ckks.scale)
    full = ckks.to_bytes(loaded)

    assert len(fresh) < 0.6 * len(full)


def test_level_2_ciphertext_round_trips_at_the_final_scale(
    ckks: Ckks, secret: SecretKeyHolder, fresh: bytes, values: np.ndarray
) -> None:
    out = two_products(ckks, ckks.load_ciphertext_untrusted(fresh, 0, ckks.scale))
    loaded = ckks.load_ciphertext_untrusted(ckks.to_bytes(out), 2, ckks.final_scale())

    assert np.max(np.abs(secret.decrypt(loaded) - values)) < TOLERANCE


def test_encrypting_while_another_thread_decrypts_keeps_every_value(
    ckks: Ckks, secret: SecretKeyHolder, values: np.ndarray
) -> None:
    # The client decrypts scores in a second thread while it encrypts queries.
    blobs = [secret.encrypt_to_bytes(k * values) for k in range(1, 9)]
    errors: list[float] = []

    def read() -> None:
        for k, data in enumerate(blobs, 1):
            loaded = ckks.load_ciphertext_untrusted(data, 0, ckks.scale)
            errors.append(float(np.max(np.abs(secret.decrypt(loaded) - k * values))))

    reader = threading.Thread(target=read)
    reader.start()
    written = [secret.encrypt_to_bytes(-k * values) for k in range(1, 9)]
    reader.join()

    assert len(errors) == len(blobs) and max(errors) < TOLERANCE
    for k, data in enumerate(written, 1):
        loaded = ckks.load_ciphertext_untrusted(data, 0, ckks.scale)
        assert np.max(np.abs(secret.decrypt(loaded) + k * values)) < TOLERANCE


# -- ciphertexts the server must refuse ---------------------------------------------


def test_empty_bytes_are_refused_as_a_ciphertext(ckks: Ckks) -> None:
    with pytest.raises(ProtocolError):
        ckks.load_ciphertext_untrusted(b"", 0, ckks.scale)


@pytest.mark.parametrize("length", [1, 15, 16, 17, 1000, 200_000])
def test_random_bytes_are_refused_as_a_ciphertext(ckks: Ckks, length: int) -> None:
    data = np.random.default_rng(length).bytes(length)

    with pytest.raises(ProtocolError):
        ckks.load_ciphertext_untrusted(data, 0, ckks.scale)


@pytest.mark.parametrize("seed", range(4))
def test_random_body_behind_a_valid_header_is_refused(
    ckks: Ckks, fresh: bytes, seed: int
) -> None:
    body = np.random.default_rng(seed).bytes(len(fresh) - SEAL_HEADER.size)

    with pytest.raises(ProtocolError):
        ckks.load_ciphertext_untrusted(fresh[: SEAL_HEADER.size] + body, 0, ckks.scale)


def test_ciphertext_that_is_not_bytes_is_refused(ckks: Ckks, fresh: bytes) -> None:
    with pytest.raises(ProtocolError):
        ckks.load_ciphertext_untrusted(bytearray(fresh), 0, ckks.scale)


@pytest.mark.parametrize("keep", [0.99, 0.5, 0.01])
def test_truncated_ciphertext_is_refused(ckks: Ckks, fresh: bytes, keep: float) -> None:
    cut = fresh[: int(len(fresh) * keep)]

    with pytest.raises(ProtocolError, match="stated size"):
        ckks.load_ciphertext_untrusted(cut, 0, ckks.scale)


@pytest.mark.parametrize("keep", [0.99, 0.5, 0.01])
def test_truncated_ciphertext_with_a_matching_header_is_refused_by_seal(
    ckks: Ckks, fresh: bytes, keep: float
) -> None:
    cut = fresh[: int(len(fresh) * keep)]

    with pytest.raises(ProtocolError, match="could not load"):
        ckks.load_ciphertext_untrusted(with_declared_size(cut, len(cut)), 0, ckks.scale)


@pytest.mark.parametrize("delta", [-1, 1, 1 << 40])
def test_header_declaring_a_different_size_is_refused(
    ckks: Ckks, fresh: bytes, delta: int
) -> None:
    data = with_declared_size(fresh, len(fresh) + delta)

    with pytest.raises(ProtocolError, match="stated size"):
        ckks.load_ciphertext_untrusted(data, 0, ckks.scale)


def test_ciphertext_with_trailing_bytes_is_refused(ckks: Ckks, fresh: bytes) -> None:
    with pytest.raises(ProtocolError, match="stated size"):
        ckks.load_ciphertext_untrusted(fresh + b"\0", 0, ckks.scale)


def test_ciphertext_over_the_cap_is_refused_before_seal_sees_it(
    ckks: Ckks, fresh: bytes
) -> None:
    size = MAX_CIPHERTEXT_BYTES + 1
    data = with_declared_size(fresh, size)
    data += bytes(size - len(data))

    with pytest.raises(ProtocolError, match="bad length"):
        ckks.load_ciphertext_untrusted(data, 0, ckks.scale)


@pytest.mark.parametrize("level", [1, 2])
def test_fresh_ciphertext_expected_at_a_lower_level_is_refused(
    ckks: Ckks, fresh: bytes, level: int
) -> None:
    with pytest.raises(ProtocolError, match="level"):
        ckks.load_ciphertext_untrusted(fresh, level, ckks.scale)


def test_level_2_ciphertext_expected_fresh_is_refused(ckks: Ckks, fresh: bytes) -> None:
    out = two_products(ckks, ckks.load_ciphertext_untrusted(fresh, 0, ckks.scale))

    with pytest.raises(ProtocolError):
        ckks.load_ciphertext_untrusted(ckks.to_bytes(out), 0, ckks.final_scale())


@pytest.mark.parametrize("scale", [2.0**30, 2.0**40 * (1 + 1e-6), 2.0**80])
def test_fresh_ciphertext_expected_at_another_scale_is_refused(
    ckks: Ckks, fresh: bytes, scale: float
) -> None:
    with pytest.raises(ProtocolError, match="scale"):
        ckks.load_ciphertext_untrusted(fresh, 0, scale)


def test_ciphertext_encrypted_at_the_wrong_scale_is_refused(
    ckks: Ckks, public: PublicKeyHolder, values: np.ndarray
) -> None:
    odd = public.encrypt(ckks.encode(values, 0, 2.0**30))

    with pytest.raises(ProtocolError, match="scale"):
        ckks.load_ciphertext_untrusted(ckks.to_bytes(odd), 0, ckks.scale)


def test_three_part_ciphertext_is_refused(ckks: Ckks, fresh: bytes) -> None:
    # A product of two ciphertexts before relinearisation has three parts.
    loaded = ckks.load_ciphertext_untrusted(fresh, 0, ckks.scale)
    square = sa.Ciphertext()
    ckks.evaluator.multiply(loaded, loaded, square)
    assert square.size() == 3

    with pytest.raises(ProtocolError, match="size"):
        ckks.load_ciphertext_untrusted(ckks.to_bytes(square), 0, square.scale)


# -- keys -------------------------------------------------------------------------


def test_public_bytes_load_as_a_public_key_that_encrypts_to_the_secret(
    ckks: Ckks, secret: SecretKeyHolder, values: np.ndarray
) -> None:
    key_bytes, _ = secret.public_bytes()
    server = PublicKeyHolder(ckks, ckks.load_public_key_untrusted(key_bytes))

    decrypted = secret.decrypt(server.encrypt(ckks.encode(values)))

    assert np.max(np.abs(decrypted - values)) < TOLERANCE


def test_public_bytes_load_as_exactly_the_galois_keys_of_all_rotations(
    ckks: Ckks, secret: SecretKeyHolder
) -> None:
    _, galois_bytes = secret.public_bytes()
    galois = ckks.load_galois_keys_untrusted(galois_bytes, rotation_steps(ckks.slots))

    assert galois.size() == len(rotation_steps(ckks.slots))
    assert all(galois.has_key(ckks.galois_element(s)) for s in rotation_steps(4096))


def test_galois_element_rotates_left_by_its_step(
    ckks: Ckks, secret: SecretKeyHolder, public: PublicKeyHolder, fresh: bytes,
    values: np.ndarray,
) -> None:
    loaded = ckks.load_ciphertext_untrusted(fresh, 0, ckks.scale)
    rotated = sa.Ciphertext()
    ckks.evaluator.rotate_vector(loaded, 4, public.galois_keys, rotated)

    assert np.max(np.abs(secret.decrypt(rotated) - np.roll(values, -4))) < TOLERANCE


@pytest.mark.parametrize("length", [0, 16, 5000])
def test_garbage_is_refused_as_a_public_key(ckks: Ckks, length: int) -> None:
    with pytest.raises(ProtocolError):
        ckks.load_public_key_untrusted(np.random.default_rng(length).bytes(length))


def test_galois_key_bytes_are_refused_as_a_public_key(
    ckks: Ckks, secret: SecretKeyHolder
) -> None:
    _, galois_bytes = secret.public_bytes()

    with pytest.raises(ProtocolError):
        ckks.load_public_key_untrusted(galois_bytes)


def test_galois_keys_under_the_public_key_cap_are_refused_as_a_public_key(
    ckks: Ckks,
) -> None:
    _, one_step = SecretKeyHolder(ckks, [1]).public_bytes()
    assert len(one_step) <= MAX_PUBLIC_KEY_BYTES

    with pytest.raises(ProtocolError, match="could not load"):
        ckks.load_public_key_untrusted(one_step)


def test_ciphertext_bytes_are_refused_as_a_public_key(ckks: Ckks, fresh: bytes) -> None:
    with pytest.raises(ProtocolError):
        ckks.load_public_key_untrusted(fresh)


def test_public_key_bytes_are_refused_as_galois_keys(
    ckks: Ckks, secret: SecretKeyHolder
) -> None:
    key_bytes, _ = secret.public_bytes()

    with pytest.raises(ProtocolError):
        ckks.load_galois_keys_untrusted(key_bytes, [1])


def test_galois_keys_for_exactly_the_asked_steps_are_accepted(
    ckks: Ckks, small_holder: SecretKeyHolder
) -> None:
    _, galois_bytes = small_holder.public_bytes()

    assert ckks.load_galois_keys_untrusted(galois_bytes, [2, 1]).size() == 2


def test_galois_keys_with_steps_beyond_those_used_are_refused(
    ckks: Ckks, small_holder: SecretKeyHolder
) -> None:
    _, galois_bytes = small_holder.public_bytes()

    with pytest.raises(ProtocolError, match="beyond"):
        ckks.load_galois_keys_untrusted(galois_bytes, [1])


def test_galois_keys_missing_a_needed_step_are_refused(
    ckks: Ckks, small_holder: SecretKeyHolder
) -> None:
    _, galois_bytes = small_holder.public_bytes()

    with pytest.raises(ProtocolError, match="missing"):
        ckks.load_galois_keys_untrusted(galois_bytes, [1, 2, 4])


def test_truncated_galois_keys_are_refused(
    ckks: Ckks, small_holder: SecretKeyHolder
) -> None:
    _, galois_bytes = small_holder.public_bytes()
    cut = galois_bytes[: len(galois_bytes) // 2]

    with pytest.raises(ProtocolError):
        ckks.load_galois_keys_untrusted(with_declared_size(cut, len(cut)), [1, 2])


# -- rotations --------------------------------------------------------------------


def test_rotate_sum_puts_the_total_in_every_slot(
    ckks: Ckks, secret: SecretKeyHolder, public: PublicKeyHolder, fresh: bytes,
    values: np.ndarray,
) -> None:
    loaded = ckks.load_ciphertext_untrusted(fresh, 0, ckks.scale)
    ckks.rotate_sum(loaded, public.galois_keys)

    total = secret.decrypt(loaded)

    assert np.max(np.abs(total - values.sum())) < ROTATION_TOLERANCE


def test_rotate_sum_of_one_hot_is_one_everywhere(
    ckks: Ckks, secret: SecretKeyHolder, public: PublicKeyHolder
) -> None:
    one_hot = np.zeros(ckks.slots)
    one_hot[4095] = 1.0
    data = secret.encrypt_to_bytes(one_hot)
    loaded = ckks.load_ciphertext_untrusted(data, 0, ckks.scale)
    ckks.rotate_sum(loaded, public.galois_keys)

    assert np.max(np.abs(secret.decrypt(loaded) - 1.0)) < ROTATION_TOLERANCE
