"""Counts on the command line: a negative or non-numeric one is a usage error (exit 2)."""

from __future__ import annotations

import argparse

import pytest

from common.exits import EXIT_USAGE, count_argument


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chorus-test")
    parser.add_argument("--rounds", type=count_argument)
    return parser


@pytest.mark.parametrize(
    ("given", "says"), [("-1", "must be 0 or more, got -1"), ("two", "'two' is not a whole")]
)
def test_a_count_that_is_not_one_exits_2_naming_the_option(
    given: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parser().parse_args(["--rounds", given])
    assert exited.value.code == EXIT_USAGE
    error = capsys.readouterr().err
    assert "--rounds" in error and says in error


def test_zero_and_positive_counts_pass() -> None:
    assert parser().parse_args(["--rounds", "0"]).rounds == 0
    assert parser().parse_args(["--rounds", "3"]).rounds == 3
