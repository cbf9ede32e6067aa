"""Tests for protocol.he: parameters, keys, and the checked loading of peer bytes.

Every refusal must be a ProtocolError: the bytes come from the peer, and the
server answers anything else with an internal error.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

import numpy as np
import pytest
import tenseal.sealapi as sa

from protocol.framing import ProtocolError
from protocol.he import (
    DEFAULT_PARAMETERS,
    LAST,
    MAX_CIPHERTEXT_BYTES,
    MAX_PUBLIC_KEY_BYTES,
    PARAMETER_SETS,
    TOP,
    Ckks,
    PublicKeyHolder,
    SecretKeyHolder,
    rotation_steps,
)

TOLERANCE = 1e-6
# A key switching (a rotation or the conjugation) adds noise of up to about 1e-6
# at scale 2^40; rotate_sum does twelve of them.
ROTATION_TOLERANCE = 1e-4
SEAL_HEADER = struct.Struct("<HBBBBHQ")
CONJUGATION = 2 * 8192 - 1  # SEAL's Galois element for conjugation at N = 8192

Encrypt = Callable[[np.ndarray], sa.Ciphertext]
Decrypt = Callable[[sa.Ciphertext], np.ndarray]


@pytest.fixture(scope="module")
def values(ckks: Ckks) -> np.ndarray:
    return np.random.default_rng(11).uniform(-1.0, 1.0, ckks.slots)


@pytest.fixture(scope="module")
def complex_values(ckks: Ckks) -> np.ndarray:
    rng = np.random.default_rng(12)
    return rng.uniform(-1.0, 1.0, ckks.slots) + 1j * rng.uniform(-1.0, 1.0, ckks.slots)


@pytest.fixture(scope="module")
def fresh(secret: SecretKeyHolder, values: np.ndarray) -> bytes:
    """A fresh, seed-compressed client ciphertext, as it crosses the wire."""
    return secret.encrypt_to_bytes(values)


@pytest.fixture(scope="module")
def rotations_only(ckks: Ckks) -> SecretKeyHolder:
    """Keys whose Galois keys cover the slot-sum rotations but not conjugation."""
    steps = rotation_steps(ckks.slots)
    return SecretKeyHolder(ckks, [ckks.galois_element(s) for s in steps])


def with_declared_size(data: bytes, size: int) -> bytes:
    """``data`` with the size field of its SEAL header replaced."""
    fields = list(SEAL_HEADER.unpack_from(data))
    fields[-1] = size
    return SEAL_HEADER.pack(*fields) + data[SEAL_HEADER.size :]


def one_product(ckks: Ckks, ciphertext: sa.Ciphertext) -> sa.Ciphertext:
    """Multiply by a plaintext of ones and rescale: level TOP to level LAST."""
    out = sa.Ciphertext()
    ckks.evaluator.multiply_plain(ciphertext, ckks.encode(np.ones(ckks.slots)), out)
    ckks.evaluator.rescale_to_next_inplace(out)
    return out


# -- parameters -------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "ckks-4096-40-20-40", "", "CKKS-8192-60-40-60", "ckks-8192-60-40-40-60",
])
def test_parameter_set_not_on_the_allow_list_is_refused(name: str) -> None:
    # The last one is the retired two-level set: a peer may no longer ask for it.
    with pytest.raises(ProtocolError, match="allow-list"):
        Ckks(name)


def test_allow_list_holds_only_the_one_level_default_set() -> None:
    assert DEFAULT_PARAMETERS == "ckks-8192-60-40-60"
    assert set(PARAMETER_SETS) == {DEFAULT_PARAMETERS}
    params = PARAMETER_SETS[DEFAULT_PARAMETERS]
    assert params.poly_modulus_degree == 8192
    assert params.coeff_bits == (60, 40, 60)
    # 128-bit security at N = 8192 allows at most 218 bits of modulus.
    assert sum(params.coeff_bits) <= 218


def test_context_has_4096_slots_and_two_data_levels(ckks: Ckks) -> None:
    assert ckks.slots == 4096
    assert len(ckks.levels) == 2
    assert (TOP, LAST) == (0, 1)
    assert ckks.levels[TOP] != ckks.levels[LAST]
    assert ckks.scale == 2.0**40


def test_rotation_steps_are_the_powers_of_two_below_half_the_slots() -> None:
    assert rotation_steps(4096) == [1 << i for i in range(12)]
    assert rotation_steps(8) == [1, 2, 4]


def test_final_scale_is_the_scale_after_one_product_and_rescale(
    ckks: Ckks, fresh: bytes
) -> None:
    out = one_product(ckks, ckks.load_ciphertext_untrusted(fresh, TOP, ckks.scale))

    assert out.parms_id() == ckks.levels[LAST]
    assert out.scale == pytest.approx(ckks.final_scale(), rel=1e-12)
    assert ckks.final_scale() != pytest.approx(ckks.scale, rel=1e-9)
    # The dropped prime is a 40-bit prime close to the scale: precision is kept.
    assert ckks.final_scale() == pytest.approx(ckks.scale, rel=1e-4)


def test_last_level_ciphertext_cannot_be_rescaled_again(
    ckks: Ckks, fresh: bytes
) -> None:
    # One multiplicative level: a second product would have nowhere to go.
    out = one_product(ckks, ckks.load_ciphertext_untrusted(fresh, TOP, ckks.scale))

    with pytest.raises(ValueError, match="end of modulus switching chain"):
        ckks.evaluator.rescale_to_next_inplace(out)


# -- encoding and round trips -------------------------------------------------------


def test_encode_then_decode_keeps_complex_values(
    ckks: Ckks, complex_values: np.ndarray
) -> None:
    decoded = ckks.decode(ckks.encode(complex_values))

    assert np.iscomplexobj(decoded)
    assert np.max(np.abs(decoded - complex_values)) < TOLERANCE


def test_encode_at_the_last_level_gives_a_last_level_plaintext(
    ckks: Ckks, values: np.ndarray
) -> None:
    plain = ckks.encode(values, LAST, ckks.final_scale())

    assert plain.parms_id() == ckks.levels[LAST]
    assert plain.scale == ckks.final_scale()
    assert np.max(np.abs(ckks.decode(plain) - values)) < TOLERANCE


def test_fresh_ciphertext_round_trips_within_tolerance(
    ckks: Ckks, secret: SecretKeyHolder, fresh: bytes, values: np.ndarray
) -> None:
    ciphertext = ckks.load_ciphertext_untrusted(fresh, TOP, ckks.scale)
    decrypted = secret.decrypt(ciphertext)

    assert np.iscomplexobj(decrypted)
    assert np.max(np.abs(decrypted.real - values)) < TOLERANCE
    assert np.max(np.abs(decrypted.imag)) < TOLERANCE


def test_complex_ciphertext_keeps_real_and_imaginary_parts_apart(
    ckks: Ckks, secret: SecretKeyHolder, complex_values: np.ndarray
) -> None:
    data = secret.encrypt_to_bytes(complex_values)
    decrypted = secret.decrypt(ckks.load_ciphertext_untrusted(data, TOP, ckks.scale))

    assert np.max(np.abs(decrypted.real - complex_values.real)) < TOLERANCE
    assert np.max(np.abs(decrypted.imag - complex_values.imag)) < TOLERANCE


def test_fresh_ciphertext_is_seed_compressed_to_under_half_its_full_size(
    ckks: Ckks, fresh: bytes
) -> None:
    loaded = ckks.load_ciphertext_untrusted(fresh, TOP, ckks.scale)
    full = ckks.to_bytes(loaded)

    assert len(fresh) < 0.6 * len(full)


def test_last_level_ciphertext_round_trips_at_the_final_scale(
    ckks: Ckks, secret: SecretKeyHolder, fresh: bytes, values: np.ndarray
) -> None:
    out = one_product(ckks, ckks.load_ciphertext_untrusted(fresh, TOP, ckks.scale))
    data = ckks.to_bytes(out)
    loaded = ckks.load_ciphertext_untrusted(data, LAST, ckks.final_scale())

    assert np.max(np.abs(secret.decrypt(loaded) - values)) < TOLERANCE


def test_encrypting_while_another_thread_decrypts_keeps_every_value(
    ckks: Ckks, secret: SecretKeyHolder, values: np.ndarray
) -> None:
    # The client decrypts scores in a second thread while it encrypts queries.
    blobs = [secret.encrypt_to_bytes(k * values) for k in range(1, 9)]
    errors: list[float] = []

    def read() -> None:
        for k, data in enumerate(blobs, 1):
            loaded = ckks.load_ciphertext_untrusted(data, TOP, ckks.scale)
            errors.append(float(np.max(np.abs(secret.decrypt(loaded) - k * values))))

    reader = threading.Thread(target=read)
    reader.start()
    written = [secret.encrypt_to_bytes(-k * values) for k in range(1, 9)]
    reader.join()

    assert len(errors) == len(blobs) and max(errors) < TOLERANCE
    for k, data in enumerate(written, 1):
        loaded = ckks.load_ciphertext_untrusted(data, TOP, ckks.scale)
        assert np.max(np.abs(secret.decrypt(loaded) + k * values)) < TOLERANCE


# -- ciphertexts the server must refuse ---------------------------------------------


def test_empty_bytes_are_refused_as_a_ciphertext(ckks: Ckks) -> None:
    with pytest.raises(ProtocolError):
        ckks.load_ciphertext_untrusted(b"", TOP, ckks.scale)


@pytest.mark.parametrize("length", [1, 15, 16, 17, 1000, 200_000])
def test_random_bytes_are_refused_as_a_ciphertext(ckks: Ckks, length: int) -> None:
    data = np.random.default_rng(length).bytes(length)

    with pytest.raises(ProtocolError):
        ckks.load_ciphertext_untrusted(data, TOP, ckks.scale)


@pytest.mark.parametrize("seed", range(4))
def test_random_body_behind_a_valid_header_is_refused(
    ckks: Ckks, fresh: bytes, seed: int
) -> None:
    body = np.random.default_rng(seed).bytes(len(fresh) - SEAL_HEADER.size)

    with pytest.raises(ProtocolError):
        ckks.load_ciphertext_untrusted(fresh[: SEAL_HEADER.size] + body, TOP,
                                       ckks.scale)


def test_ciphertext_that_is_not_bytes_is_refused(ckks: Ckks, fresh: bytes) -> None:
    with pytest.raises(ProtocolError):
        ckks.load_ciphertext_untrusted(bytearray(fresh), TOP, ckks.scale)


@pytest.mark.parametrize("keep", [0.99, 0.5, 0.01])
def test_truncated_ciphertext_is_refused(ckks: Ckks, fresh: bytes, keep: float) -> None:
    cut = fresh[: int(len(fresh) * keep)]

    with pytest.raises(ProtocolError, match="stated size"):
        ckks.load_ciphertext_untrusted(cut, TOP, ckks.scale)


@pytest.mark.parametrize("keep", [0.99, 0.5, 0.01])
def test_truncated_ciphertext_with_a_matching_header_is_refused_by_seal(
    ckks: Ckks, fresh: bytes, keep: float
) -> None:
    cut = with_declared_size(fresh[: int(len(fresh) * keep)], int(len(fresh) * keep))

    with pytest.raises(ProtocolError, match="could not load"):
        ckks.load_ciphertext_untrusted(cut, TOP, ckks.scale)


@pytest.mark.parametrize("delta", [-1, 1, 1 << 40])
def test_header_declaring_a_different_size_is_refused(
    ckks: Ckks, fresh: bytes, delta: int
) -> None:
    data = with_declared_size(fresh, len(fresh) + delta)

    with pytest.raises(ProtocolError, match="stated size"):
        ckks.load_ciphertext_untrusted(data, TOP, ckks.scale)


def test_ciphertext_with_trailing_bytes_is_refused(ckks: Ckks, fresh: bytes) -> None:
    with pytest.raises(ProtocolError, match="stated size"):
        ckks.load_ciphertext_untrusted(fresh + b"\0", TOP, ckks.scale)


def test_ciphertext_over_the_cap_is_refused_before_seal_sees_it(
    ckks: Ckks, fresh: bytes
) -> None:
    size = MAX_CIPHERTEXT_BYTES + 1
    data = with_declared_size(fresh, size)
    data += bytes(size - len(data))

    with pytest.raises(ProtocolError, match="bad length"):
        ckks.load_ciphertext_untrusted(data, TOP, ckks.scale)


@pytest.mark.parametrize("scale", [None, 2.0**40])
def test_fresh_ciphertext_expected_at_the_last_level_is_refused(
    ckks: Ckks, fresh: bytes, scale: float | None
) -> None:
    with pytest.raises(ProtocolError, match="level"):
        ckks.load_ciphertext_untrusted(fresh, LAST, scale or ckks.final_scale())


def test_last_level_ciphertext_expected_fresh_is_refused(
    ckks: Ckks, fresh: bytes
) -> None:
    out = one_product(ckks, ckks.load_ciphertext_untrusted(fresh, TOP, ckks.scale))

    with pytest.raises(ProtocolError):
        ckks.load_ciphertext_untrusted(ckks.to_bytes(out), TOP, ckks.final_scale())


def test_last_level_ciphertext_expected_at_the_fresh_scale_is_refused(
    ckks: Ckks, fresh: bytes
) -> None:
    # Level right, scale wrong: a product that skipped its rescale looks like this.
    out = one_product(ckks, ckks.load_ciphertext_untrusted(fresh, TOP, ckks.scale))

    with pytest.raises(ProtocolError, match="scale"):
        ckks.load_ciphertext_untrusted(ckks.to_bytes(out), LAST, ckks.scale)


@pytest.mark.parametrize("scale", [2.0**30, 2.0**40 * (1 + 1e-6), 2.0**80])
def test_fresh_ciphertext_expected_at_another_scale_is_refused(
    ckks: Ckks, fresh: bytes, scale: float
) -> None:
    with pytest.raises(ProtocolError, match="scale"):
        ckks.load_ciphertext_untrusted(fresh, TOP, scale)


def test_ciphertext_encrypted_at_the_wrong_scale_is_refused(
    ckks: Ckks, public: PublicKeyHolder, values: np.ndarray
) -> None:
    odd = public.encrypt(ckks.encode(values, TOP, 2.0**30))

    with pytest.raises(ProtocolError, match="scale"):
        ckks.load_ciphertext_untrusted(ckks.to_bytes(odd), TOP, ckks.scale)


def test_three_part_ciphertext_is_refused(ckks: Ckks, fresh: bytes) -> None:
    # A product of two ciphertexts before relinearisation has three parts.
    loaded = ckks.load_ciphertext_untrusted(fresh, TOP, ckks.scale)
    square = sa.Ciphertext()
    ckks.evaluator.multiply(loaded, loaded, square)
    assert square.size() == 3

    with pytest.raises(ProtocolError, match="size"):
        ckks.load_ciphertext_untrusted(ckks.to_bytes(square), TOP, square.scale)


# -- keys -------------------------------------------------------------------------


def test_public_bytes_load_as_a_public_key_that_encrypts_to_the_secret(
    ckks: Ckks, secret: SecretKeyHolder, complex_values: np.ndarray
) -> None:
    key_bytes, _ = secret.public_bytes()
    server = PublicKeyHolder(ckks, ckks.load_public_key_untrusted(key_bytes))

    decrypted = secret.decrypt(server.encrypt(ckks.encode(complex_values)))

    assert np.max(np.abs(decrypted - complex_values)) < TOLERANCE


def test_galois_elements_are_the_slot_sum_rotations_and_the_conjugation(
    ckks: Ckks,
) -> None:
    elements = ckks.galois_elements()

    rotations = [pow(3, 1 << i, 2 * 8192) for i in range(12)]
    assert elements == rotations + [CONJUGATION]
    assert len(set(elements)) == 13


def test_public_bytes_load_as_exactly_the_galois_keys_the_server_uses(
    ckks: Ckks, secret: SecretKeyHolder
) -> None:
    _, galois_bytes = secret.public_bytes()
    galois = ckks.load_galois_keys_untrusted(galois_bytes)

    assert galois.size() == 13
    assert all(galois.has_key(e) for e in ckks.galois_elements())
    assert galois.has_key(CONJUGATION)


def test_galois_element_rotates_left_by_its_step(
    ckks: Ckks, secret: SecretKeyHolder, public: PublicKeyHolder, fresh: bytes,
    values: np.ndarray,
) -> None:
    loaded = ckks.load_ciphertext_untrusted(fresh, TOP, ckks.scale)
    rotated = sa.Ciphertext()
    ckks.evaluator.rotate_vector(loaded, 4, public.galois_keys, rotated)

    shifted = np.roll(values, -4)
    assert np.max(np.abs(secret.decrypt(rotated) - shifted)) < ROTATION_TOLERANCE


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
    _, one_step = SecretKeyHolder(ckks, [ckks.galois_element(1)]).public_bytes()
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
        ckks.load_galois_keys_untrusted(key_bytes)


def test_galois_keys_for_the_used_elements_in_any_order_are_accepted(
    ckks: Ckks,
) -> None:
    holder = SecretKeyHolder(ckks, ckks.galois_elements()[::-1])
    _, galois_bytes = holder.public_bytes()

    assert ckks.load_galois_keys_untrusted(galois_bytes).size() == 13


def test_galois_keys_with_elements_beyond_those_used_are_refused(
    ckks: Ckks,
) -> None:
    extra = ckks.galois_element(3)  # a rotation by 3 slots, which no step uses
    holder = SecretKeyHolder(ckks, ckks.galois_elements() + [extra])
    _, galois_bytes = holder.public_bytes()

    with pytest.raises(ProtocolError, match="beyond"):
        ckks.load_galois_keys_untrusted(galois_bytes)


def test_galois_keys_without_the_conjugation_are_refused(
    ckks: Ckks, rotations_only: SecretKeyHolder
) -> None:
    _, galois_bytes = rotations_only.public_bytes()

    with pytest.raises(ProtocolError, match="missing"):
        ckks.load_galois_keys_untrusted(galois_bytes)


def test_galois_keys_missing_one_rotation_are_refused(ckks: Ckks) -> None:
    without_2048 = [e for e in ckks.galois_elements() if e != ckks.galois_element(2048)]
    _, galois_bytes = SecretKeyHolder(ckks, without_2048).public_bytes()

    with pytest.raises(ProtocolError, match="missing"):
        ckks.load_galois_keys_untrusted(galois_bytes)


def test_truncated_galois_keys_are_refused(
    ckks: Ckks, rotations_only: SecretKeyHolder
) -> None:
    _, galois_bytes = rotations_only.public_bytes()
    cut = galois_bytes[: len(galois_bytes) // 2]

    with pytest.raises(ProtocolError):
        ckks.load_galois_keys_untrusted(with_declared_size(cut, len(cut)))


# -- rotations, conjugation, re-randomisation ---------------------------------------


def test_rotate_sum_puts_the_total_in_every_slot(
    ckks: Ckks, secret: SecretKeyHolder, public: PublicKeyHolder, fresh: bytes,
    values: np.ndarray,
) -> None:
    loaded = ckks.load_ciphertext_untrusted(fresh, TOP, ckks.scale)
    ckks.rotate_sum(loaded, public.galois_keys)

    total = secret.decrypt(loaded)

    assert np.max(np.abs(total - values.sum())) < ROTATION_TOLERANCE


def test_rotate_sum_of_one_hot_is_one_everywhere(
    ckks: Ckks, secret: SecretKeyHolder, public: PublicKeyHolder
) -> None:
    one_hot = np.zeros(ckks.slots)
    one_hot[4095] = 1.0
    data = secret.encrypt_to_bytes(one_hot)
    loaded = ckks.load_ciphertext_untrusted(data, TOP, ckks.scale)
    ckks.rotate_sum(loaded, public.galois_keys)

    assert np.max(np.abs(secret.decrypt(loaded) - 1.0)) < ROTATION_TOLERANCE


def test_add_conjugate_leaves_twice_the_real_part_and_no_imaginary_part(
    ckks: Ckks, secret: SecretKeyHolder, public: PublicKeyHolder,
    encrypt: Encrypt, complex_values: np.ndarray,
) -> None:
    ciphertext = encrypt(complex_values)
    assert np.max(np.abs(secret.decrypt(ciphertext).imag)) > 0.9  # before

    ckks.add_conjugate(ciphertext, public.galois_keys)
    after = secret.decrypt(ciphertext)

    assert np.max(np.abs(after.real - 2 * complex_values.real)) < ROTATION_TOLERANCE
    assert np.max(np.abs(after.imag)) < ROTATION_TOLERANCE


def test_add_conjugate_works_at_the_last_level(
    ckks: Ckks, public: PublicKeyHolder, encrypt: Encrypt, complex_values: np.ndarray,
    decrypt_reply: Decrypt,
) -> None:
    ciphertext = one_product(ckks, encrypt(complex_values))

    ckks.add_conjugate(ciphertext, public.galois_keys)
    after = decrypt_reply(ciphertext)  # refused unless LAST at the final scale

    assert np.max(np.abs(after - 2 * complex_values.real)) < ROTATION_TOLERANCE


def test_add_conjugate_needs_the_conjugation_key(
    ckks: Ckks, rotations_only: SecretKeyHolder, encrypt: Encrypt,
    complex_values: np.ndarray,
) -> None:
    with pytest.raises(ValueError):
        ckks.add_conjugate(encrypt(complex_values), rotations_only.galois_keys)


def test_rerandomise_keeps_the_values_and_changes_the_bytes(
    ckks: Ckks, public: PublicKeyHolder, encrypt: Encrypt, values: np.ndarray,
    decrypt_reply: Decrypt,
) -> None:
    ciphertext = one_product(ckks, encrypt(values))
    before = ckks.to_bytes(ciphertext)

    public.rerandomise(ciphertext)
    after = ckks.to_bytes(ciphertext)

    assert len(after) == len(before) and after != before
    assert np.max(np.abs(decrypt_reply(ciphertext) - values)) < TOLERANCE


def test_encrypt_zero_matches_the_level_and_scale_of_its_model(
    ckks: Ckks, public: PublicKeyHolder, encrypt: Encrypt, values: np.ndarray,
    decrypt_reply: Decrypt,
) -> None:
    model = one_product(ckks, encrypt(values))

    zero = public.encrypt_zero(model)

    assert zero.parms_id() == ckks.levels[LAST]
    assert zero.scale == model.scale
    assert np.max(np.abs(decrypt_reply(zero))) < TOLERANCE
