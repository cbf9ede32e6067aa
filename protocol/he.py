"""CKKS through TenSEAL's ``sealapi``: parameters, keys, and checked (de)serialisation.

We use SEAL's own encoder and evaluator rather than TenSEAL's high-level
vectors: encoding a plaintext once and accumulating products before one rescale
is about ten times cheaper than a high-level multiply, which encodes and
rescales on every call.

What crosses the wire is SEAL's own serialisation of exactly three kinds of
object: a public key, Galois keys and ciphertexts. The encryption parameters
never cross: both sides build them from a name on a fixed allow-list, so a
peer cannot pick insecure or enormous ones, and a secret key cannot ride along
because nothing we parse could hold one. Received bytes are checked in this
order before SEAL sees them: length against a cap, SEAL's header (magic,
declared size equal to the bytes we got), then SEAL's own validity check on
load, then the object's parameters, level, size and scale against what this
step of the protocol expects.

This version of TenSEAL exposes SEAL's ``save``/``load`` only to file paths,
so bytes pass through a private temporary file.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tenseal.sealapi as sa

from .framing import ProtocolError


@dataclass(frozen=True)
class Parameters:
    poly_modulus_degree: int
    coeff_bits: tuple[int, ...]
    scale_bits: int


# 128-bit security per the HE standard (homomorphicencryption.org, 2018): at
# N = 8192 the total modulus may be 218 bits; ours is 160. One level is all the
# protocol needs: every blinding factor and mask is folded into the plaintext
# of the one product, and sums of slots use rotations, which use no level. The
# linkage does without even that one (see linkage.py) and works at the last.
PARAMETER_SETS = {
    "ckks-8192-60-40-60": Parameters(8192, (60, 40, 60), 40),
}
DEFAULT_PARAMETERS = "ckks-8192-60-40-60"
TOP, LAST = 0, 1

SEAL_MAGIC = 0xA15E
_SEAL_HEADER = struct.Struct("<HBBBBHQ")
MAX_CIPHERTEXT_BYTES = 1 << 20
MAX_PUBLIC_KEY_BYTES = 1 << 21
MAX_GALOIS_KEYS_BYTES = 1 << 26


def _scratch_dir() -> str:
    return (
        "/dev/shm"
        if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)
        else tempfile.gettempdir()
    )


class _Scratch:
    """A private temporary file for SEAL's path-only save and load."""

    def __init__(self) -> None:
        handle, name = tempfile.mkstemp(prefix="pprl-", dir=_scratch_dir())
        os.close(handle)
        self.path = name

    def dump(self, obj) -> bytes:
        obj.save(self.path)
        return Path(self.path).read_bytes()

    def load(self, obj, context: sa.SEALContext, data: bytes):
        Path(self.path).write_bytes(data)
        obj.load(context, self.path)
        return obj

    def close(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class Ckks:
    """One party's SEAL context, encoder and evaluator for a named parameter set."""

    def __init__(self, name: str = DEFAULT_PARAMETERS) -> None:
        if name not in PARAMETER_SETS:
            raise ProtocolError(f"parameter set {name!r} is not on the allow-list")
        self.name = name
        self.params = PARAMETER_SETS[name]
        parms = sa.EncryptionParameters(sa.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(self.params.poly_modulus_degree)
        parms.set_coeff_modulus(
            sa.CoeffModulus.Create(
                self.params.poly_modulus_degree, list(self.params.coeff_bits)
            )
        )
        self.context = sa.SEALContext(parms, True, sa.SEC_LEVEL_TYPE.TC128)
        self.encoder = sa.CKKSEncoder(self.context)
        self.evaluator = sa.Evaluator(self.context)
        self.scale = float(2**self.params.scale_bits)
        self.levels = self._level_ids()
        self._local = threading.local()
        self._scratches: list[_Scratch] = []

    @property
    def _scratch(self) -> _Scratch:
        """One scratch file per thread: the client decrypts while it encrypts."""
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = _Scratch()
            self._scratches.append(scratch)
        return scratch

    @property
    def slots(self) -> int:
        return self.encoder.slot_count()

    def _level_ids(self) -> list[list[int]]:
        ids, data = [], self.context.first_context_data()
        while data is not None:
            ids.append(data.parms_id())
            data = data.next_context_data()
        return ids

    def close(self) -> None:
        for scratch in self._scratches:
            scratch.close()

    def encode(
        self, values, level: int = TOP, scale: float | None = None
    ) -> sa.Plaintext:
        """Encode real or complex slot values (a list converts faster than an array)."""
        plain = sa.Plaintext()
        values = np.asarray(values)
        kind = np.complex128 if np.iscomplexobj(values) else np.float64
        self.encoder.encode(
            values.astype(kind, copy=False).tolist(),
            self.levels[level],
            scale or self.scale,
            plain,
        )
        return plain

    def decode(self, plain: sa.Plaintext) -> np.ndarray:
        """Complex slot values."""
        return np.asarray(self.encoder.decode_complex(plain))

    def to_bytes(self, obj) -> bytes:
        return self._scratch.dump(obj)

    def final_scale(self) -> float:
        """Scale of a product of two scale-2^40 operands after its rescale."""
        primes = self.context.first_context_data().parms().coeff_modulus()
        return self.scale * self.scale / primes[-1].value()

    def rotate_sum(self, ciphertext: sa.Ciphertext, galois: sa.GaloisKeys) -> None:
        """Replace every slot by the sum of all slots (log2(slots) rotations)."""
        rotated = sa.Ciphertext()
        for step in rotation_steps(self.slots):
            self.evaluator.rotate_vector(ciphertext, step, galois, rotated)
            self.evaluator.add_inplace(ciphertext, rotated)

    def multiply_add(
        self, acc: sa.Ciphertext | None, ciphertext: sa.Ciphertext, plain: sa.Plaintext
    ) -> sa.Ciphertext:
        """acc + ciphertext * plain, left unrescaled; a new sum when acc is None."""
        product = sa.Ciphertext()
        self.evaluator.multiply_plain(ciphertext, plain, product)
        if acc is None:
            return product
        self.evaluator.add_inplace(acc, product)
        return acc

    def add_conjugate(self, ciphertext: sa.Ciphertext, galois: sa.GaloisKeys) -> None:
        """z + conj(z) in every slot: twice the real part, the imaginary part gone."""
        conjugate = sa.Ciphertext()
        self.evaluator.complex_conjugate(ciphertext, galois, conjugate)
        self.evaluator.add_inplace(ciphertext, conjugate)

    def galois_elements(self) -> list[int]:
        """The automorphisms the server uses: slot-sum rotations and conjugation."""
        rotations = [self.galois_element(step) for step in rotation_steps(self.slots)]
        return rotations + [2 * self.params.poly_modulus_degree - 1]

    # -- untrusted bytes ---------------------------------------------------

    def check_ciphertext_header(self, data: bytes) -> None:
        """The cheap first step of :meth:`load_ciphertext_untrusted`: a length
        within the cap and a SEAL header that states exactly that length. For
        bytes passed on to a worker, which runs the whole check before use."""
        self._check_seal_header(data, MAX_CIPHERTEXT_BYTES, "ciphertext")

    def load_ciphertext_untrusted(
        self, data: bytes, level: int, scale: float
    ) -> sa.Ciphertext:
        """A ciphertext from the peer, refused unless it is exactly what we expect."""
        self._check_seal_header(data, MAX_CIPHERTEXT_BYTES, "ciphertext")
        ciphertext = self._load(sa.Ciphertext(self.context), data, "ciphertext")
        ok = (
            ciphertext.size() == 2
            and ciphertext.is_ntt_form()
            and ciphertext.parms_id() == self.levels[level]
            and math.isclose(ciphertext.scale, scale, rel_tol=1e-9)
            and sa.is_valid_for(ciphertext, self.context)
        )
        if not ok:
            raise ProtocolError("ciphertext refused: wrong size, level or scale")
        return ciphertext

    def load_public_key_untrusted(self, data: bytes) -> sa.PublicKey:
        self._check_seal_header(data, MAX_PUBLIC_KEY_BYTES, "public key")
        key = self._load(sa.PublicKey(), data, "public key")
        if key.parms_id() != self.context.key_parms_id():
            raise ProtocolError("public key refused: not for these parameters")
        return key

    def load_galois_keys_untrusted(self, data: bytes) -> sa.GaloisKeys:
        """Galois keys for exactly the automorphisms of :meth:`galois_elements`."""
        self._check_seal_header(data, MAX_GALOIS_KEYS_BYTES, "Galois keys")
        keys = self._load(sa.GaloisKeys(), data, "Galois keys")
        wanted = self.galois_elements()
        if keys.parms_id() != self.context.key_parms_id() or not all(
            keys.has_key(element) for element in wanted
        ):
            raise ProtocolError("Galois keys refused: a needed rotation is missing")
        if keys.size() != len(wanted):
            raise ProtocolError("Galois keys refused: keys beyond the rotations used")
        return keys

    def galois_element(self, step: int) -> int:
        """SEAL's Galois element for a left rotation by ``step``: 3^step mod 2N."""
        return pow(3, step, 2 * self.params.poly_modulus_degree)

    def _check_seal_header(self, data: bytes, cap: int, what: str) -> None:
        if not isinstance(data, bytes) or not _SEAL_HEADER.size <= len(data) <= cap:
            raise ProtocolError(f"{what} refused: bad length")
        magic, header_size, _major, _minor, _compr, reserved, size = (
            _SEAL_HEADER.unpack_from(data)
        )
        if magic != SEAL_MAGIC or header_size != _SEAL_HEADER.size or size != len(data):
            raise ProtocolError(f"{what} refused: not a SEAL object of the stated size")
        if reserved != 0:
            raise ProtocolError(f"{what} refused: bad header")

    def _load(self, obj, data: bytes, what: str):
        try:
            return self._scratch.load(obj, self.context, data)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ProtocolError(f"{what} refused: SEAL could not load it") from exc


def rotation_steps(slots: int) -> list[int]:
    """Steps for summing all slots by halving: 1, 2, 4, ..., slots / 2."""
    return [1 << i for i in range(int(math.log2(slots)))]


class SecretKeyHolder:
    """The client's keys. The secret key never leaves this object."""

    def __init__(self, ckks: Ckks, galois_elements: list[int] | None = None) -> None:
        self.ckks = ckks
        generator = sa.KeyGenerator(ckks.context)
        self._secret = generator.secret_key()
        self.public_key = sa.PublicKey()
        generator.create_public_key(self.public_key)
        self.galois_keys = sa.GaloisKeys()
        elements = (
            ckks.galois_elements() if galois_elements is None else galois_elements
        )
        generator.create_galois_keys(elements, self.galois_keys)
        self._encryptor = sa.Encryptor(ckks.context, self._secret)
        self._decryptor = sa.Decryptor(ckks.context, self._secret)

    def public_bytes(self) -> tuple[bytes, bytes]:
        """(public key, Galois keys): the only key material that may be sent."""
        return self.ckks.to_bytes(self.public_key), self.ckks.to_bytes(self.galois_keys)

    def encrypt_to_bytes(
        self, values, level: int = TOP, scale: float | None = None
    ) -> bytes:
        """Symmetric encryption, serialised with SEAL's seed compression.

        Under the secret key the random half of a ciphertext is replaced by
        the seed that generated it, which halves what crosses the wire.
        """
        plain = self.ckks.encode(values, level, scale)
        return self.ckks.to_bytes(self._encryptor.encrypt_symmetric(plain))

    def decrypt(self, ciphertext: sa.Ciphertext) -> np.ndarray:
        plain = sa.Plaintext()
        self._decryptor.decrypt(ciphertext, plain)
        return self.ckks.decode(plain)


class PublicKeyHolder:
    """The server's view: it can encrypt (to re-randomise) and rotate, not decrypt."""

    def __init__(
        self,
        ckks: Ckks,
        public_key: sa.PublicKey,
        galois_keys: sa.GaloisKeys | None = None,
    ) -> None:
        self.ckks = ckks
        self.galois_keys = galois_keys
        self._encryptor = sa.Encryptor(ckks.context, public_key)

    def encrypt_zero(self, like: sa.Ciphertext) -> sa.Ciphertext:
        """A fresh encryption of zero at the level and scale of ``like``."""
        zero = sa.Ciphertext()
        self._encryptor.encrypt_zero(like.parms_id(), zero)
        zero.scale = like.scale
        return zero

    def rerandomise(self, ciphertext: sa.Ciphertext) -> None:
        """Add a fresh encryption of zero, so the result's randomness is new."""
        self.ckks.evaluator.add_inplace(ciphertext, self.encrypt_zero(ciphertext))

    def encrypt(self, plain: sa.Plaintext) -> sa.Ciphertext:
        out = sa.Ciphertext()
        self._encryptor.encrypt(plain, out)
        return out
