"""Tests for protocol.encoding: normalising, q-grams, Soundex, vectors and buckets."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from protocol.encoding import (
    encode_field,
    encode_records,
    key_hashes,
    key_strings,
    normalise,
    qgrams,
    soundex,
)
from protocol.spec import BlockingPass, KeyPart, LinkageSpec, load_spec, spec_from_obj

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="module")
def names_spec() -> LinkageSpec:
    return load_spec(DATA / "spec_names.json")


def two_field_spec(given_weight: float, surname_weight: float) -> LinkageSpec:
    return spec_from_obj({
        "version": 1, "name": "two-fields", "qgram": 2,
        "fields": [
            {"name": "given_name", "dims": 64, "weight": given_weight},
            {"name": "surname", "dims": 64, "weight": surname_weight},
        ],
        "threshold": 0.8, "inclusive": True, "capacity_factor": 3.0,
        "blocking": [{"name": "p", "slots_per_bucket": 16,
                      "key": [{"field": "surname", "transform": "exact"}]}],
    })


def encode_people(people: list[tuple[Any, Any]], spec: LinkageSpec) -> np.ndarray:
    columns = {
        "given_name": [given for given, _ in people],
        "surname": [surname for _, surname in people],
    }
    return encode_records(columns, spec).astype(np.float64)


# normalise and qgrams


@pytest.mark.parametrize(
    "value, expected",
    [
        ("  Michaela   NEUMANN ", "michaela neumann"),
        ("a\tb\nc", "a b c"),
        ("", ""),
        ("   ", ""),
        (None, ""),
        (float("nan"), ""),
        (np.nan, ""),
        (4129, "4129"),
    ],
)
def test_normalise_lowers_trims_and_blanks_missing(value: Any, expected: str) -> None:
    assert normalise(value) == expected


def test_pandas_na_is_a_missing_value() -> None:
    # The docstring promises '' for missing values; pd.NA is pandas' own marker
    # for a missing value in "string" columns (as table.py itself uses).
    found = normalise(pd.NA)

    assert found == "", f"protocol bug: normalise(pd.NA) gave {found!r}, not ''"


def test_qgrams_of_empty_text_are_none() -> None:
    assert qgrams("", 2) == []


def test_bigrams_are_padded_at_both_ends() -> None:
    assert qgrams("ab", 2) == ["_a", "ab", "b_"]


def test_unigrams_are_the_characters_without_padding() -> None:
    assert qgrams("a b", 1) == ["a", " ", "b"]


def test_trigrams_of_one_letter_are_all_padded() -> None:
    assert qgrams("a", 3) == ["__a", "_a_", "a__"]


@pytest.mark.parametrize("q", [1, 2, 3, 4])
def test_text_of_n_characters_has_n_plus_q_minus_1_qgrams(q: int) -> None:
    grams = qgrams("neumann", q)

    assert len(grams) == len("neumann") + q - 1
    assert all(len(g) == q for g in grams)


# soundex


@pytest.mark.parametrize(
    "name, code",
    [
        ("Robert", "R163"),
        ("Rupert", "R163"),
        ("Rubin", "R150"),
        ("Ashcraft", "A261"),
        ("Tymczak", "T522"),
        ("Pfister", "P236"),
        ("Honeyman", "H555"),
    ],
)
def test_soundex_of_textbook_names(name: str, code: str) -> None:
    assert soundex(name) == code


def test_soundex_is_case_blind() -> None:
    assert soundex("ROBERT") == soundex("robert") == "R163"


def test_soundex_of_a_short_name_is_padded_with_zeros() -> None:
    assert soundex("Lee") == "L000"


@pytest.mark.parametrize("text", ["", "1234", "--"])
def test_soundex_of_text_without_letters_is_empty(text: str) -> None:
    assert soundex(text) == ""


def test_soundex_codes_every_letter_of_a_multi_word_value() -> None:
    # Blanks are skipped, not word boundaries: "mary ann" codes as "maryann".
    assert soundex("mary ann") == soundex("maryann") == "M650"


# encode_records and encode_field


PEOPLE = [
    ("michaela", "neumann"),
    ("robert", "tymczak"),
    (None, "pfister"),
    (None, None),
    ("Michaela ", " NEUMANN"),
]


def test_encoding_the_same_records_twice_is_identical(
    names_spec: LinkageSpec,
) -> None:
    first = encode_people(PEOPLE, names_spec)
    second = encode_people(list(PEOPLE), names_spec)

    assert np.array_equal(first, second)


def test_a_record_encodes_the_same_alone_and_among_others(
    names_spec: LinkageSpec,
) -> None:
    together = encode_people(PEOPLE, names_spec)
    alone = encode_people([PEOPLE[1]], names_spec)

    assert np.array_equal(together[1], alone[0])


def test_encoded_records_are_float32_of_spec_dims(names_spec: LinkageSpec) -> None:
    columns = {"given_name": ["anna"], "surname": ["lee"]}

    vectors = encode_records(columns, names_spec)

    assert vectors.dtype == np.float32
    assert vectors.shape == (1, names_spec.dims)


def test_records_have_unit_norm_and_empty_record_is_zero(
    names_spec: LinkageSpec,
) -> None:
    norms = np.linalg.norm(encode_people(PEOPLE, names_spec), axis=1)

    assert np.allclose(norms[[0, 1, 2, 4]], 1.0, atol=1e-6)
    assert norms[3] == 0.0


def test_case_and_blanks_do_not_change_the_vector(names_spec: LinkageSpec) -> None:
    vectors = encode_people(PEOPLE, names_spec)

    assert np.array_equal(vectors[0], vectors[4])


def test_one_letter_typo_scores_high_and_far_above_a_stranger(
    names_spec: LinkageSpec,
) -> None:
    # Surname bigrams share 6 of 8 with the typo, given name all: about
    # (1 + 0.75) / 2 = 0.875 before hash collisions; a stranger shares none.
    original, typo, stranger = encode_people(
        [("michaela", "neumann"), ("michaela", "neumahn"), ("robert", "tymczak")],
        names_spec,
    )

    assert original @ typo >= names_spec.threshold
    assert original @ stranger < 0.3
    assert original @ typo - original @ stranger > 0.5


def test_missing_field_lowers_the_score_less_than_a_wrong_value(
    names_spec: LinkageSpec,
) -> None:
    full, missing, wrong = encode_people(
        [("michaela", "neumann"), ("michaela", None), ("michaela", "tymczak")],
        names_spec,
    )

    assert full @ missing > full @ wrong


@pytest.mark.parametrize("given_weight, surname_weight", [(1.0, 1.0), (3.0, 1.0)])
def test_missing_field_score_is_root_of_the_other_fields_weight_share(
    given_weight: float, surname_weight: float
) -> None:
    # Full (g*a, n*b) against (g, 0) renormalised: the dot is a = sqrt(share).
    spec = two_field_spec(given_weight, surname_weight)
    full, missing = encode_people([("anna", "lee"), ("anna", None)], spec)
    share = given_weight / (given_weight + surname_weight)

    assert full @ missing == pytest.approx(math.sqrt(share), abs=1e-6)


def test_field_vectors_of_one_value_are_unit_and_of_empty_are_zero() -> None:
    vectors = encode_field(["anna", "", None], 32, "given_name", 2)

    assert np.linalg.norm(vectors[0]) == pytest.approx(1.0)
    assert not vectors[1].any() and not vectors[2].any()


def test_same_value_hashes_differently_in_another_field() -> None:
    as_given = encode_field(["anna maria"], 64, "given_name", 2)
    as_surname = encode_field(["anna maria"], 64, "surname", 2)

    assert not np.array_equal(as_given, as_surname)


def test_odd_number_of_qgrams_in_one_coordinate_cannot_cancel() -> None:
    # With one coordinate all five bigrams of "abcd" add +1 or -1 there: an odd
    # sum is never zero, so the unit vector is exactly +1 or -1.
    vector = encode_field(["abcd"], 1, "f", 2)

    assert abs(vector[0, 0]) == 1.0


# key_strings and key_hashes


SURNAME_INITIAL = BlockingPass(
    name="surname-soundex+initial",
    parts=(KeyPart("surname", "soundex"), KeyPart("given_name", "initial")),
    slots_per_bucket=16,
)


def test_key_joins_soundex_and_initial() -> None:
    columns = {"given_name": ["Michaela"], "surname": ["Neumann"]}

    assert key_strings(columns, SURNAME_INITIAL) == ["N550|m"]


@pytest.mark.parametrize(
    "given, surname",
    [(None, "neumann"), ("michaela", None), ("michaela", float("nan")),
     ("  ", "neumann"), ("michaela", "1234")],
)
def test_key_is_empty_when_a_part_is_missing(given: Any, surname: Any) -> None:
    columns = {"given_name": [given], "surname": [surname]}

    assert key_strings(columns, SURNAME_INITIAL) == [""]


def test_exact_key_is_the_normalised_value() -> None:
    blocking = BlockingPass("pc", (KeyPart("postcode", "exact"),), 16)

    assert key_strings({"postcode": [" 4129 ", "2152"]}, blocking) == ["4129", "2152"]


def _many_keys(count: int) -> list[str]:
    rng = np.random.default_rng(7)
    return ["".join(rng.choice(list("abcdefgh"), size=5)) for _ in range(count)]


@pytest.mark.parametrize("buckets", [1, 2, 64, 4096, 37 * 512])
def test_buckets_lie_in_range(buckets: int) -> None:
    ids = key_hashes(_many_keys(500), SURNAME_INITIAL).buckets(buckets)

    assert ids.min() >= 0 and ids.max() < buckets


def test_many_keys_spread_over_many_buckets() -> None:
    ids = key_hashes(_many_keys(500), SURNAME_INITIAL).buckets(64)

    assert len(set(ids.tolist())) > 48


def test_empty_key_has_bucket_minus_one() -> None:
    ids = key_hashes(["", "n550|m", ""], SURNAME_INITIAL).buckets(256)

    assert ids[0] == -1 and ids[2] == -1
    assert 0 <= ids[1] < 256


def test_equal_keys_share_a_bucket() -> None:
    ids = key_hashes(["n550|m", "r163|a", "n550|m"], SURNAME_INITIAL).buckets(1024)

    assert ids[0] == ids[2]


@pytest.mark.parametrize("buckets", [1, 8, 256, 2048])
def test_bucket_at_twice_the_count_refines_the_bucket(buckets: int) -> None:
    keys = _many_keys(500) + [""]

    coarse = key_hashes(keys, SURNAME_INITIAL).buckets(buckets)
    fine = key_hashes(keys, SURNAME_INITIAL).buckets(2 * buckets)

    assert np.array_equal(fine[:-1] % buckets, coarse[:-1])
    assert fine[-1] == coarse[-1] == -1


def test_pass_name_salts_the_buckets() -> None:
    other = BlockingPass("another-pass", SURNAME_INITIAL.parts, 16)
    keys = _many_keys(200)

    ours = key_hashes(keys, SURNAME_INITIAL).buckets(1024)
    theirs = key_hashes(keys, other).buckets(1024)

    assert (ours != theirs).mean() > 0.9
