"""Shared CKKS fixtures: one context and one key pair for the whole session.

Generating the keys (Galois keys for the twelve slot-sum rotations and the
conjugation) takes well under a second, so the tests share them. The server's
view is built only from the bytes the client would send, through the same
checked loaders the server uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
import tenseal.sealapi as sa

from protocol import linkage
from protocol.he import LAST, TOP, Ckks, PublicKeyHolder, SecretKeyHolder


@pytest.fixture(scope="session")
def ckks() -> Iterator[Ckks]:
    context = Ckks()
    yield context
    context.close()


@pytest.fixture(scope="session")
def secret(ckks: Ckks) -> SecretKeyHolder:
    """The client's keys, with Galois keys for every automorphism the server uses."""
    return SecretKeyHolder(ckks)


@pytest.fixture(scope="session")
def public(ckks: Ckks, secret: SecretKeyHolder) -> PublicKeyHolder:
    """The server's keys, loaded from the client's public bytes."""
    key_bytes, galois_bytes = secret.public_bytes()
    key = ckks.load_public_key_untrusted(key_bytes)
    galois = ckks.load_galois_keys_untrusted(galois_bytes)
    return PublicKeyHolder(ckks, key, galois)


@pytest.fixture(scope="session")
def encrypt(
    ckks: Ckks, secret: SecretKeyHolder
) -> Callable[[np.ndarray], sa.Ciphertext]:
    """A fresh client ciphertext of some (real or complex) values, as loaded."""

    def run(values: np.ndarray) -> sa.Ciphertext:
        data = secret.encrypt_to_bytes(values)
        return ckks.load_ciphertext_untrusted(data, TOP, ckks.scale)

    return run


@pytest.fixture(scope="session")
def decrypt_score(
    ckks: Ckks, secret: SecretKeyHolder
) -> Callable[[sa.Ciphertext], np.ndarray]:
    """What the client reads from a linkage reply: bytes, checked as a score, decrypt."""

    def run(ciphertext: sa.Ciphertext) -> np.ndarray:
        return secret.decrypt(linkage.load_score(ckks, ckks.to_bytes(ciphertext)))

    return run


@pytest.fixture(scope="session")
def decrypt_reply(
    ckks: Ckks, secret: SecretKeyHolder
) -> Callable[[sa.Ciphertext], np.ndarray]:
    """What the client reads from a server reply: bytes, LAST-level check, decrypt.

    The result is complex, as the client's decryption is.
    """

    def run(ciphertext: sa.Ciphertext) -> np.ndarray:
        data = ckks.to_bytes(ciphertext)
        loaded = ckks.load_ciphertext_untrusted(data, LAST, ckks.final_scale())
        return secret.decrypt(loaded)

    return run
