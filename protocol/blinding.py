"""Blinding factors and signs from the operating system's cryptographic source.

Every factor is a power of two raised to a uniform exponent, so it is never
zero, spans many octaves (the magnitude of a blinded value says little about
the value), and stays inside the range CKKS can carry.
"""

from __future__ import annotations

import secrets

import numpy as np


def _uniform(count: int) -> np.ndarray:
    """Floats uniform in [0, 1) with 53 random bits each, from ``secrets``."""
    raw = np.frombuffer(secrets.token_bytes(8 * count), dtype=np.uint64)
    return (raw >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def log_uniform_factors(count: int, low_exp: float, high_exp: float) -> np.ndarray:
    """Positive factors 2**u with u uniform in [low_exp, high_exp)."""
    return np.exp2(low_exp + (high_exp - low_exp) * _uniform(count))


def random_signs(count: int) -> np.ndarray:
    """+1.0 or -1.0, each with probability one half."""
    bits = np.frombuffer(secrets.token_bytes(count), dtype=np.uint8) & 1
    return np.where(bits == 1, 1.0, -1.0)


def small_noise(count: int, magnitude: float) -> np.ndarray:
    """Uniform in [-magnitude, magnitude)."""
    return (2.0 * _uniform(count) - 1.0) * magnitude
