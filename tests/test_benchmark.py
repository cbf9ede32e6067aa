"""Tests for the benchmark's arithmetic (the measurements themselves are not tested)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

import benchmark


def test_per_doubling_is_the_growth_per_doubling_of_both_sides() -> None:
    table = pd.DataFrame({
        "clients": [1000, 4000, 10000, 8000],
        "servers": [1000, 4000, 1000000, 8000],
        "seconds": [2.0, 8.0, 500.0, 20.0],
    })

    growth = benchmark.per_doubling(table)

    assert math.isnan(growth[0])  # nothing before the first balanced row
    assert growth[1] == pytest.approx(2.0)  # 4x for two doublings
    assert math.isnan(growth[2])  # unbalanced
    assert growth[3] == pytest.approx(2.5)  # from 4000, skipping the unbalanced row


def test_sweep_defaults_to_the_generated_data_spec_and_the_demo_to_febrl4s() -> None:
    assert benchmark.parse_args([]).spec == benchmark.DEMO_SPEC
    assert benchmark.parse_args(["--sweep"]).spec == benchmark.SWEEP_SPEC
    assert benchmark.parse_args(["--sweep", "--spec", "x.json"]).spec == "x.json"
