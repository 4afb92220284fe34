"""The run directory's export record (trainer/export_record.py) and the export id a version
carries (trainer/export.py: export_origin, find_export): what lets a rerun tell that it already
published its training. The crash-at-every-step test is tests/trainer/test_export_crashes.py."""

from __future__ import annotations

import json

import pytest

from convstack.trainer import export, export_record
from tests.trainer import export_helpers as helpers


def test_no_record_means_a_fresh_id_each_time(tmp_path):
    assert export_record.read_record(tmp_path) is None
    first = export_record.export_id_for(None, 10)
    assert first != export_record.export_id_for(None, 10)


def test_an_unfinished_record_of_this_step_keeps_its_id(tmp_path):
    intent = export_record.record_intent(tmp_path, 10, "abc")

    record = export_record.read_record(tmp_path)

    assert record == intent and not record.published
    assert export_record.export_id_for(record, 10) == "abc"
    assert export_record.export_id_for(record, 20) != "abc"  # training went on: a new export


def test_a_published_record_names_the_version(tmp_path):
    intent = export_record.record_intent(tmp_path, 10, "abc")
    export_record.record_published(tmp_path, intent, 3, tmp_path / "models" / "3")

    record = export_record.read_record(tmp_path)

    assert record.published and (record.version, record.export_id) == (3, "abc")
    assert json.loads((tmp_path / "export.json").read_text()) == {
        "export_id": "abc",
        "global_step": 10,
        "path": str(tmp_path / "models" / "3"),
        "version": 3,
    }


def test_a_record_from_before_export_ids_still_counts_as_published(tmp_path):
    (tmp_path / "export.json").write_text('{"version": 1, "path": "/m/1", "global_step": 7}')

    record = export_record.read_record(tmp_path)

    assert record.published and record.global_step == 7 and record.export_id is None


@pytest.mark.parametrize("text", ["", "{", "[]", '{"version": 1}'])
def test_an_unreadable_record_is_no_record(tmp_path, text):
    (tmp_path / "export.json").write_text(text)
    assert export_record.read_record(tmp_path) is None


def test_a_version_published_with_an_export_id_is_found_by_it(tmp_path):
    model = helpers.trained_model()
    export.export_version(model, **helpers.export_kwargs(tmp_path))
    mine = export.export_version(model, **helpers.export_kwargs(tmp_path), export_id="mine")
    model_dir = tmp_path / "tiny"

    found = export.find_export(model_dir, "mine")

    assert (found.version, found.path) == (2, mine.path)
    assert found.model_card == mine.model_card
    assert export.export_origin(model_dir / "1") is None
    assert export.find_export(model_dir, "other") is None
