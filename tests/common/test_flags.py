"""convstack.common.flags: the argparse types every command line shares."""

from __future__ import annotations

import argparse

import pytest

from convstack.common.flags import fraction, positive_int, positive_number, whole_number


@pytest.mark.parametrize(
    ("parse", "text", "value"),
    [
        (positive_int, "3", 3),
        (positive_number, "0.5", 0.5),
        (fraction, "0.2", 0.2),
        (whole_number(0), "0", 0),
    ],
)
def test_a_good_value_parses(parse, text, value):
    assert parse(text) == value


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (positive_int, "0", "must be at least 1, got 0"),
        (positive_int, "1.5", "not a whole number: '1.5'"),
        (positive_int, "many", "not a whole number: 'many'"),
        (positive_number, "0", "must be positive, got 0"),
        (positive_number, "-2", "must be positive, got -2"),
        (positive_number, "nan", "must be positive, got nan"),
        (positive_number, "soon", "not a number: 'soon'"),
        (fraction, "1", "must be between 0 and 1, got 1.0"),
        (fraction, "0", "must be between 0 and 1, got 0.0"),
        (whole_number(0, "must be 0 (auto) or more"), "-1", "must be 0 (auto) or more, got -1"),
    ],
)
def test_a_bad_value_is_refused_in_one_line(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        parse(text)

    assert str(refused.value) == message


def test_argparse_names_the_flag_and_the_problem(capsys):
    parser = argparse.ArgumentParser(prog="convstack x")
    parser.add_argument("--count", type=positive_int)

    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--count", "0"])

    assert exited.value.code == 2
    assert "argument --count: must be at least 1, got 0" in capsys.readouterr().err
