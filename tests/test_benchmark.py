"""Tests for the benchmark's arithmetic and flags (the measurements themselves are not tested)."""

from __future__ import annotations

import math
from pathlib import Path

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


def test_default_files_are_found_beside_the_script_from_another_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    here = Path(benchmark.__file__).resolve().parent

    demo = benchmark.parse_args([])
    sweep = benchmark.parse_args(["--sweep"])
    given = benchmark.parse_args(["--spec", "mine.json", "--client-data", "c.csv"])

    assert Path(demo.spec) == here / benchmark.DEMO_SPEC and Path(demo.spec).is_file()
    assert Path(demo.server_data) == here / "data" / "server.csv"
    assert Path(sweep.spec) == here / benchmark.SWEEP_SPEC and Path(sweep.spec).is_file()
    assert (given.spec, given.client_data) == ("mine.json", "c.csv")


def test_a_missing_specification_is_a_usage_error_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "absent.json"

    assert benchmark.main(["--spec", str(missing)]) == 2
    assert f"benchmark: {missing}" in capsys.readouterr().err


@pytest.mark.parametrize("sizes", ["abc", "1000", "1000x", "0x1000", "1x2x3", ""])
def test_bad_sizes_are_refused_naming_the_flag(
    sizes: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(["--sweep", "--sizes", sizes])

    assert exit_info.value.code == 2
    assert "--sizes" in capsys.readouterr().err


def test_sizes_are_parsed_into_client_server_pairs() -> None:
    args = benchmark.parse_args(["--sizes", "1000x2000,30x4"])

    assert args.sizes == [(1000, 2000), (30, 4)]
