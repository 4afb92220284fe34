"""`convstack VERB`: a verb whose extra is not installed exits 2 with one line naming it."""

from __future__ import annotations

import importlib.util

import pytest

from convstack import cli


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["serve", "--help"], "serving"),
        (["train", "--help"], "training"),
        (["bench", "train"], "training"),
        (["k8s", "render", "--all"], "k8s"),
    ],
)
def test_a_verb_without_its_extra_exits_2_with_one_line(monkeypatch, capsys, argv, extra):
    real = importlib.util.find_spec
    absent = set(cli.EXTRA_PROBES.values())
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name, *a)
    )

    assert cli.main(argv) == 2

    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert f"pip install 'convstack[{extra}]'" in lines[0]


@pytest.mark.parametrize(
    ("verb", "module", "extra"),
    [
        ("predict", "PIL", "images"),
        ("predict", "tensorflow", "training"),
        ("serve", "tensorflow.python", "serving"),
        ("status", "not_an_extra", None),
    ],
)
def test_a_missing_module_names_the_verbs_extra_or_the_modules(verb, module, extra):
    assert cli.missing_extra(verb, ModuleNotFoundError(name=module)) == extra


def test_the_client_verbs_need_no_extra():
    for verb in ("predict", "status", "metadata", "bench client", "loadgen", "bench footprint"):
        assert cli.verb_extra(verb) is None
