"""Shared CKKS fixtures: one context and one key pair for the whole session.

Generating the keys (with Galois keys for all twelve rotations) takes about
0.2 s, so the tests share them. The server's view is built only from the bytes
the client would send, through the same checked loaders the server uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
import tenseal.sealapi as sa

from protocol.he import Ckks, PublicKeyHolder, SecretKeyHolder, rotation_steps


@pytest.fixture(scope="session")
def ckks() -> Iterator[Ckks]:
    context = Ckks()
    yield context
    context.close()


@pytest.fixture(scope="session")
def secret(ckks: Ckks) -> SecretKeyHolder:
    """The client's keys, with Galois keys for every rotation the server uses."""
    return SecretKeyHolder(ckks, rotation_steps(ckks.slots))


@pytest.fixture(scope="session")
def public(ckks: Ckks, secret: SecretKeyHolder) -> PublicKeyHolder:
    """The server's keys, loaded from the client's public bytes."""
    key_bytes, galois_bytes = secret.public_bytes()
    key = ckks.load_public_key_untrusted(key_bytes)
    galois = ckks.load_galois_keys_untrusted(galois_bytes, rotation_steps(ckks.slots))
    return PublicKeyHolder(ckks, key, galois)


@pytest.fixture(scope="session")
def encrypt(
    ckks: Ckks, secret: SecretKeyHolder
) -> Callable[[np.ndarray], sa.Ciphertext]:
    """A fresh client ciphertext of some values, as the server loads it."""

    def run(values: np.ndarray) -> sa.Ciphertext:
        data = secret.encrypt_to_bytes(values)
        return ckks.load_ciphertext_untrusted(data, 0, ckks.scale)

    return run


@pytest.fixture(scope="session")
def decrypt_reply(
    ckks: Ckks, secret: SecretKeyHolder
) -> Callable[[sa.Ciphertext], np.ndarray]:
    """What the client reads from a server reply: bytes, level-2 check, decrypt."""

    def run(ciphertext: sa.Ciphertext) -> np.ndarray:
        data = ckks.to_bytes(ciphertext)
        loaded = ckks.load_ciphertext_untrusted(data, 2, ckks.final_scale())
        return secret.decrypt(loaded)

    return run
