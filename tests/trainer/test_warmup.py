"""Warmup requests for TF Serving: trainer/warmup.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

from convstack.trainer import warmup
from convstack.trainer.errors import ExportError
from tests.trainer import export_helpers as helpers


def test_records_round_trip_through_the_tfrecord_file(tmp_path):
    images, _ = helpers.synthetic_data(5, seed=0)
    records = warmup.build_warmup_records("digits", images)
    path = tmp_path / warmup.WARMUP_FILE

    warmup.write_warmup_records(path, records)
    read = warmup.read_warmup_records(path)

    assert read == records
    sizes = [
        (r.predict_log.request.model_spec.signature_name, tf.make_ndarray(t).shape)
        for r in read
        for t in r.predict_log.request.inputs.values()
    ]
    # Batch 8 is capped at the 5 images available.
    assert sizes == [
        ("serving_default", (1, 28, 28, 1)),
        ("serving_default", (5, 28, 28, 1)),
        ("predict_image_bytes", (1,)),
    ]
    np.testing.assert_array_equal(
        tf.make_ndarray(read[1].predict_log.request.inputs["images"]), images
    )
    png = tf.make_ndarray(read[2].predict_log.request.inputs["image_bytes"])[0]
    assert png.startswith(b"\x89PNG")


def test_more_than_1000_records_are_refused(tmp_path):
    images, _ = helpers.synthetic_data(1, seed=0)
    (record,) = warmup.build_warmup_records("digits", images, images_batch_sizes=())[:1]

    with pytest.raises(ExportError, match="1001 warmup records"):
        warmup.write_warmup_records(tmp_path / "w", [record] * 1001)
    assert not (tmp_path / "w").exists()


def test_replay_names_a_record_for_an_unknown_signature():
    images, _ = helpers.synthetic_data(1, seed=0)
    records = warmup.build_warmup_records("digits", images)

    with pytest.raises(ExportError, match="record 0: unknown signature 'serving_default'"):
        warmup.replay_warmup_records(SimpleNamespace(signatures={}), records)
