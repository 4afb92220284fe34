"""Version directories and version policies."""

from __future__ import annotations

import pytest

from convstack.serving.version_policy import (
    ServableVersionPolicy,
    aspired_versions,
    numeric_version_dirs,
)


def _policy(text: str = "") -> ServableVersionPolicy:
    from google.protobuf import text_format

    return text_format.Parse(text, ServableVersionPolicy())


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("", {7}),  # unset: latest 1
        ("latest { }", {7}),  # num_versions 0 is read as 1
        ("latest { num_versions: 1 }", {7}),
        ("latest { num_versions: 2 }", {3, 7}),
        ("latest { num_versions: 10 }", {1, 3, 7}),
        ("all { }", {1, 3, 7}),
        ("specific { versions: 3 versions: 5 }", {3}),  # only the present ones
        ("specific { versions: 5 }", set()),
    ],
)
def test_aspired_versions(policy, expected):
    assert aspired_versions([3, 1, 7], _policy(policy)) == expected


def test_no_versions_aspires_nothing():
    assert aspired_versions([], _policy("latest { num_versions: 2 }")) == set()
    assert aspired_versions([], _policy("all { }")) == set()


def test_numeric_version_dirs_ignores_files_and_other_names(tmp_path):
    for name in ("1", "007", "12", ".export-3-abc", "3a", "tmp", "-4", "٣"):
        (tmp_path / name).mkdir()
    (tmp_path / "5").write_text("a file, not a version")

    found = numeric_version_dirs(tmp_path)

    assert found == {1: tmp_path / "1", 7: tmp_path / "007", 12: tmp_path / "12"}


def test_duplicate_versions_take_the_name_that_sorts_last(tmp_path):
    # TF Serving walks the names in sorted order and the last one wins.
    for name in ("7", "007", "07", "0010"):
        (tmp_path / name).mkdir()

    found = numeric_version_dirs(tmp_path)

    assert found == {7: tmp_path / "7", 10: tmp_path / "0010"}


def test_missing_base_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        numeric_version_dirs(tmp_path / "missing")
