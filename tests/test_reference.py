"""Tests for protocol.reference: the plaintext linkage rule on demo data."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from protocol.layout import bucket_members, padded_count
from protocol.reference import (
    PreparedRecords,
    first_pass_links,
    link_quality,
    pass_shapes,
    prepare,
    reference_candidates,
    reference_links,
    server_depths,
)
from protocol.spec import LinkageSpec, load_spec, spec_from_obj

DATA = Path(__file__).resolve().parent.parent / "data"
SLICE = 300


def read(name: str) -> pd.DataFrame:
    return pd.read_csv(DATA / name, dtype=str, keep_default_na=False, na_values=[""])


def columns(frame: pd.DataFrame, spec: LinkageSpec) -> dict[str, list]:
    return {name: frame[name].tolist() for name in spec.field_names}


@pytest.fixture(scope="module")
def spec() -> LinkageSpec:
    return load_spec(DATA / "spec_default.json")


@pytest.fixture(scope="module")
def demo_slice() -> tuple[pd.DataFrame, pd.DataFrame, set[tuple[int, int]]]:
    """The first client records, their true partners and as many strangers.

    The server side is shuffled so that its row order tells nothing.
    """
    client = read("client.csv").iloc[:SLICE].reset_index(drop=True)
    server = read("server.csv")
    ids = client["rec_id"].str.removesuffix("-org")
    partner = server["rec_id"].str.removesuffix("-dup-0")
    partners = server[partner.isin(ids)]
    strangers = server[~partner.isin(ids)].iloc[:SLICE]
    mixed = pd.concat([partners, strangers]).sample(frac=1.0, random_state=5)
    mixed = mixed.reset_index(drop=True)
    server_row = {key: i for i, key in enumerate(mixed["rec_id"])}
    truth = {(i, server_row[f"{key}-dup-0"]) for i, key in enumerate(ids)}
    return client, mixed, truth


@pytest.fixture(scope="module")
def prepared(
    spec: LinkageSpec, demo_slice: tuple[pd.DataFrame, pd.DataFrame, set]
) -> tuple[PreparedRecords, PreparedRecords]:
    client, server, _ = demo_slice
    return prepare(columns(client, spec), spec), prepare(columns(server, spec), spec)


def test_demo_slice_has_one_true_partner_per_client_record(
    demo_slice: tuple[pd.DataFrame, pd.DataFrame, set],
) -> None:
    client, server, truth = demo_slice

    assert len(truth) == len(client) == SLICE
    assert len(server) == 2 * SLICE


def test_reference_links_find_the_true_pairs_of_the_demo_slice(
    spec: LinkageSpec,
    demo_slice: tuple[pd.DataFrame, pd.DataFrame, set],
    prepared: tuple[PreparedRecords, PreparedRecords],
) -> None:
    quality = link_quality(reference_links(spec, *prepared), demo_slice[2])

    assert quality["f1"] > 0.95
    assert quality["precision"] > 0.95 and quality["recall"] > 0.95


def test_candidates_share_a_bucket_and_pass_the_threshold(
    spec: LinkageSpec, prepared: tuple[PreparedRecords, PreparedRecords]
) -> None:
    client, server = prepared
    shapes = pass_shapes(spec, padded_count(len(client)))
    c_buckets, s_buckets = client.buckets(shapes), server.buckets(shapes)

    candidates = reference_candidates(spec, client, server)

    assert len(candidates) == len(spec.passes)
    for per_pass, c_bucket, s_bucket in zip(candidates, c_buckets, s_buckets):
        for row, hits in per_pass.items():
            assert c_bucket[row] >= 0
            assert (s_bucket[hits] == c_bucket[row]).all()
            scores = server.vectors[hits].astype(np.float64) @ client.vectors[row]
            assert (scores >= spec.threshold).all()


def test_candidates_miss_no_pair_above_threshold_in_a_shared_bucket(
    spec: LinkageSpec, prepared: tuple[PreparedRecords, PreparedRecords]
) -> None:
    # Few records per bucket in this slice, so no client record sits out.
    assert spec.inclusive
    client, server = prepared
    shapes = pass_shapes(spec, padded_count(len(client)))
    scores = client.vectors.astype(np.float64) @ server.vectors.T.astype(np.float64)

    candidates = reference_candidates(spec, client, server)

    c_buckets, s_buckets = client.buckets(shapes), server.buckets(shapes)
    depths = server_depths(spec, s_buckets, shapes)

    for per_pass, blocking, c_bucket, s_bucket, depth, shape in zip(
        candidates, spec.passes, c_buckets, s_buckets, depths, shapes
    ):
        assert np.bincount(c_bucket[c_bucket >= 0]).max() <= blocking.slots_per_bucket
        kept = np.zeros(len(s_bucket), dtype=bool)
        for rows in bucket_members(s_bucket, shape.buckets, depth):
            kept[rows] = True
        same = (c_bucket[:, None] == s_bucket[None, :]) & (c_bucket[:, None] >= 0)
        passing = same & kept[None, :] & (scores >= spec.threshold)
        want = {(int(c), int(s)) for c, s in zip(*np.nonzero(passing))}
        got = {(c, s) for c, hits in per_pass.items() for s in hits}
        assert got == want


def _one_field_spec(
    slots_per_bucket: int, threshold: float, inclusive: bool, dims: int = 64,
    **extra: float,
) -> LinkageSpec:
    return spec_from_obj({
        "version": 1, "name": "one-field", "qgram": 2,
        "fields": [{"name": "surname", "dims": dims, "weight": 1.0}],
        "threshold": threshold, "inclusive": inclusive, "capacity_factor": 1.0,
        "blocking": [{"name": "exact", "slots_per_bucket": slots_per_bucket,
                      "key": [{"field": "surname", "transform": "exact"}]}],
        **extra,
    })


def test_server_record_beyond_the_depth_in_file_order_finds_nothing() -> None:
    # 1024 keyed records rounded up to 1024, 256 buckets: mean 4, depth 1 * 4 + 2.
    spec = _one_field_spec(16, threshold=0.9, inclusive=True, server_depth_factor=1.0)
    strangers = [f"x{i:04d}" for i in range(1024 - 8)]
    server = prepare({"surname": ["neumann"] * 8 + strangers}, spec)
    client = prepare({"surname": ["neumann"]}, spec)
    (shape,) = pass_shapes(spec, padded_count(1))

    assert server_depths(spec, server.buckets([shape]), [shape]) == [6]
    assert reference_candidates(spec, client, server) == [{0: [0, 1, 2, 3, 4, 5]}]


def test_without_a_depth_factor_every_server_record_of_the_bucket_is_compared() -> None:
    spec = _one_field_spec(16, threshold=0.9, inclusive=True)
    server = prepare({"surname": ["neumann"] * 8}, spec)
    client = prepare({"surname": ["neumann"]}, spec)

    assert spec.depth_factor is None
    assert reference_candidates(spec, client, server) == [{0: list(range(8))}]


def test_client_record_beyond_the_bucket_capacity_finds_nothing() -> None:
    spec = _one_field_spec(slots_per_bucket=1, threshold=0.9, inclusive=True)
    client = prepare({"surname": ["neumann", "neumann"]}, spec)
    server = prepare({"surname": ["neumann"]}, spec)

    assert reference_candidates(spec, client, server) == [{0: [0]}]


def test_exclusive_threshold_drops_a_pair_scoring_exactly_the_threshold() -> None:
    # One coordinate and five bigrams (an odd count): the vector is exactly +1 or
    # -1, so two equal records score exactly 1.0, the threshold.
    inclusive = _one_field_spec(16, threshold=1.0, inclusive=True, dims=1)
    exclusive = _one_field_spec(16, threshold=1.0, inclusive=False, dims=1)
    client = prepare({"surname": ["anna"]}, inclusive)
    server = prepare({"surname": ["anna"]}, inclusive)

    assert reference_links(inclusive, client, server) == [(0, 0)]
    assert reference_links(exclusive, client, server) == []


def test_record_with_an_empty_key_takes_no_part() -> None:
    # The key is the given name's initial; the vector is the surname. The first
    # records would score 1.0, but the client's has no given name.
    spec = spec_from_obj({
        "version": 1, "name": "keyed-apart", "qgram": 2,
        "fields": [{"name": "surname", "dims": 64, "weight": 1.0}],
        "threshold": 0.5, "inclusive": True, "capacity_factor": 1.0,
        "blocking": [{"name": "initial", "slots_per_bucket": 16,
                      "key": [{"field": "given_name", "transform": "initial"}]}],
    })
    client = prepare({"surname": ["lee", "kim"], "given_name": [None, "jo"]}, spec)
    server = prepare({"surname": ["lee", "kim"], "given_name": ["al", "jo"]}, spec)

    assert reference_links(spec, client, server) == [(1, 1)]


def test_each_client_row_keeps_only_its_first_pass_with_candidates() -> None:
    candidates = [
        {2: [5], 0: [1, 3]},
        {0: [9], 1: [4]},
        {1: [7], 3: [8], 2: [5]},
    ]

    links = first_pass_links(candidates)

    assert len(links) == len(set(links))
    assert set(links) == {(0, 1), (0, 3), (2, 5), (1, 4), (3, 8)}


def test_first_pass_links_of_no_candidates_are_none() -> None:
    assert first_pass_links([{}, {}]) == []


def test_link_quality_of_a_hand_made_example() -> None:
    links = [(0, 0), (1, 1), (2, 5), (2, 5)]
    truth = {(0, 0), (1, 1), (3, 3), (4, 4)}

    quality = link_quality(links, truth)

    # 3 distinct links, 2 true: precision 2/3, recall 2/4, F1 = 2PR/(P+R) = 4/7.
    assert quality["links"] == 3
    assert quality["precision"] == pytest.approx(2 / 3)
    assert quality["recall"] == pytest.approx(1 / 2)
    assert quality["f1"] == pytest.approx(4 / 7)


def test_link_quality_without_true_links_is_zero() -> None:
    assert link_quality([(0, 1)], {(0, 0)})["f1"] == 0.0
    assert link_quality([], {(0, 0)}) == {
        "precision": 0.0, "recall": 0.0, "f1": 0.0, "links": 0
    }


def test_changing_the_threshold_changes_the_links_monotonically(
    spec: LinkageSpec, prepared: tuple[PreparedRecords, PreparedRecords]
) -> None:
    strict_obj = copy.deepcopy(dict(spec.raw))
    strict_obj["threshold"] = 0.8
    strict = spec_from_obj(strict_obj)

    loose_links = reference_candidates(spec, *prepared)
    strict_links = reference_candidates(strict, *prepared)

    for loose, tight in zip(loose_links, strict_links):
        assert set(tight) <= set(loose)
        assert all(set(tight[row]) <= set(loose[row]) for row in tight)
    assert sum(map(len, strict_links)) < sum(map(len, loose_links))
