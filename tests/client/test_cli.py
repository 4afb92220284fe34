"""`convstack predict | status | metadata`: output, exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from convstack.client import PredictionClient
from convstack.client.cli import metadata_main, predict_main, status_main
from convstack.common.ports import free_ports
from tests.client.conftest import MODEL, images

pytestmark = pytest.mark.slow

SHAPE = [-1, 28, 28, 1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two PNGs at the model's size and one large colour JPEG."""
    directory = tmp_path_factory.mktemp("images")
    pixels = (images(3, seed=41)[..., 0] * 255).astype(np.uint8)
    paths = [directory / "zero.png", directory / "one.png", directory / "big.jpg"]
    Image.fromarray(pixels[0]).save(paths[0])
    Image.fromarray(pixels[1]).save(paths[1])
    big = Image.fromarray(pixels[2]).resize((280, 280), Image.Resampling.NEAREST).convert("RGB")
    big.save(paths[2], quality=98)
    return [str(path) for path in paths]


def _server_flags(server, *extra: str) -> list[str]:
    return ["--target", server.target, "--model", MODEL, *extra]


def _table(out: str) -> list[list[str]]:
    header, *rows = out.strip().splitlines()
    assert header.split() == ["FILE", "CLASS", "PROBABILITY"]
    return [row.split() for row in rows]


def _expected(server, paths, **choice):
    """What the trained model answers for the files, with the images prepared by TensorFlow's
    own decoders and the model called in-process: no client code on this path. Every version
    the test server holds is a copy of that one export."""
    import tensorflow as tf

    from tests.trainer import export_helpers

    batch = []
    for path in paths:
        image = tf.io.decode_image(tf.io.read_file(path), channels=1, expand_animations=False)
        image = tf.image.convert_image_dtype(image, tf.float32)
        batch.append(tf.image.resize(image, SHAPE[1:3], antialias=True))
    logits = export_helpers.trained_model()(tf.stack(batch), training=False)
    probabilities = tf.nn.softmax(logits).numpy()
    return {"classes": probabilities.argmax(axis=1), "probabilities": probabilities}


def test_predict_prints_a_table_of_files_classes_and_probabilities(server, files, capsys):
    assert predict_main(_server_flags(server, *files)) == 0

    rows = _table(capsys.readouterr().out)
    expected = _expected(server, files)
    assert [row[0] for row in rows] == files
    assert [int(row[1]) for row in rows] == expected["classes"].tolist()
    best = expected["probabilities"].max(axis=1)
    # The PNGs are the model's size (no resizing); the JPEG is resized by two different
    # resamplers, so its probability is only close.
    assert [float(row[2]) for row in rows][:2] == pytest.approx(best[:2].tolist(), abs=5e-5)
    assert float(rows[2][2]) == pytest.approx(float(best[2]), abs=0.05)


@pytest.mark.parametrize(
    ("choice", "flags", "version"),
    [
        ({"version_label": "stable"}, ["--label", "stable"], 1),
        ({"version": 2}, ["--version", "2"], 2),
        ({}, [], 2),
    ],
)
def test_predict_json_reports_version_and_label(server, files, capsys, choice, flags, version):
    assert predict_main(_server_flags(server, "--json", *flags, *files)) == 0

    document = json.loads(capsys.readouterr().out)
    predictions = document["predictions"]
    expected = _expected(server, files, **choice)
    assert [p["file"] for p in predictions] == files
    assert [p["class"] for p in predictions] == expected["classes"].tolist()
    assert {p["version"] for p in predictions} == {version}
    assert {p["label"] for p in predictions} == {choice.get("version_label")}


def test_predict_npy_rows_and_a_single_example(server, tmp_path, capsys):
    batch, single = tmp_path / "batch.npy", tmp_path / "single.npy"
    rows = images(5, seed=42)
    np.save(batch, rows.astype(np.float64))  # float64 on disk is cast to the model's float32
    np.save(single, rows[0])

    assert predict_main(_server_flags(server, "--npy", str(batch))) == 0
    table = _table(capsys.readouterr().out)
    assert predict_main(_server_flags(server, "--npy", str(single))) == 0
    one = _table(capsys.readouterr().out)

    with PredictionClient(server.target, MODEL) as client:
        expected = client.predict(rows)["classes"].tolist()
    assert [row[0] for row in table] == [f"{batch}[{i}]" for i in range(5)]
    assert [int(row[1]) for row in table] == expected
    assert one == [[f"{single}[0]", str(expected[0]), table[0][2]]]


def test_saved_model_prints_the_same_table_without_a_server(server, files, capsys):
    assert predict_main(_server_flags(server, "--version", "1", *files)) == 0
    served = _table(capsys.readouterr().out)
    version_dir = server.base_path / "1"

    assert predict_main(["--saved-model", str(version_dir), *files]) == 0
    local = _table(capsys.readouterr().out)

    assert [row[:2] for row in local] == [row[:2] for row in served]
    assert [float(r[2]) for r in local] == pytest.approx([float(r[2]) for r in served], abs=2e-4)


def test_keras_file_prints_the_saved_model_table(server, files, capsys):
    """`--keras` runs the exported assets.extra/model.keras in-process: the same classes as
    the version's SavedModel, probabilities within the export's 1e-5."""
    version_dir = server.base_path / "1"
    assert predict_main(["--saved-model", str(version_dir), *files]) == 0
    saved = _table(capsys.readouterr().out)

    keras_file = version_dir / "assets.extra" / "model.keras"
    assert predict_main(["--json", "--keras", str(keras_file), *files]) == 0
    document = json.loads(capsys.readouterr().out)

    assert document["keras"] == str(keras_file)
    rows = document["predictions"]
    assert [row["version"] for row in rows] == [1] * len(files)
    assert [[row["file"], str(row["class"])] for row in rows] == [r[:2] for r in saved]
    assert [row["probability"] for row in rows] == pytest.approx(
        [float(r[2]) for r in saved], abs=1e-4
    )  # the table rounds to 4 digits


def test_keras_file_that_is_missing_or_not_one_is_exit_1(tmp_path, files, capsys):
    assert predict_main(["--keras", str(tmp_path / "none.keras"), files[0]]) == 1
    _one_error_line(capsys, "none.keras", "no such file")
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a zip")
    assert predict_main(["--keras", str(bad), files[0]]) == 1
    _one_error_line(capsys, str(bad), "cannot load the Keras model")


def test_saved_model_json_names_the_version(server, files, capsys):
    assert predict_main(["--json", "--saved-model", str(server.base_path / "2"), files[0]]) == 0

    document = json.loads(capsys.readouterr().out)
    assert document["saved_model"] == str(server.base_path / "2")
    assert document["predictions"][0]["version"] == 2


def test_image_bytes_signature_gets_the_files_themselves(server, files, capsys):
    assert predict_main(_server_flags(server, *files)) == 0
    decoded_here = _table(capsys.readouterr().out)

    flags = _server_flags(server, "--signature", "predict_image_bytes", *files)
    assert predict_main(flags) == 0
    decoded_in_graph = _table(capsys.readouterr().out)

    assert [row[1] for row in decoded_in_graph] == [row[1] for row in decoded_here]


def _one_error_line(capsys, *words: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert captured.out == ""
    for word in words:
        assert word in lines[0]
    return lines[0]


def test_missing_file_is_one_line_and_exit_1(server, files, tmp_path, capsys):
    missing = str(tmp_path / "missing.png")

    assert predict_main(_server_flags(server, files[0], missing)) == 1
    _one_error_line(capsys, "convstack predict: error:", missing)


def test_unreadable_image_is_one_line_and_exit_1(server, tmp_path, capsys):
    text = tmp_path / "notes.png"
    text.write_text("not an image")

    assert predict_main(_server_flags(server, str(text))) == 1
    _one_error_line(capsys, str(text), "not a PNG or JPEG")


def test_server_error_is_one_line_and_exit_1(server, files, capsys):
    assert predict_main(["--target", server.target, "--model", "nope", files[0]]) == 1
    _one_error_line(capsys, "NOT_FOUND", "nope")
    assert predict_main(_server_flags(server, "--version", "9", files[0])) == 1
    _one_error_line(capsys, "NOT_FOUND", "9")


def test_unreachable_server_is_one_line_on_stderr_and_exit_1(files):
    """In a fresh process, so that whatever TensorFlow and gRPC write to stderr counts too."""
    (port,) = free_ports(1)
    code = "import sys; from client.cli import predict_main; sys.exit(predict_main(sys.argv[1:]))"
    argv = ["--target", f"127.0.0.1:{port}", "--model", MODEL, files[0]]

    result = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"convstack predict: error: 127.0.0.1:{port}: UNAVAILABLE")


@pytest.mark.parametrize(
    "argv",
    [
        ["--model", MODEL],  # no images
        ["--model", MODEL, "--npy", "x.npy", "a.png"],  # both kinds of input
        ["--model", MODEL, "--version", "1", "--label", "stable", "a.png"],
        ["a.png"],  # no model, no saved model
        ["--saved-model", "models/tiny/1", "--target", "localhost:8500", "a.png"],
        ["--keras", "m.keras", "--model", MODEL, "a.png"],
        ["--keras", "m.keras", "--saved-model", "models/tiny/1", "a.png"],
        ["--keras", "m.keras", "--signature", "predict_image_bytes", "a.png"],
        ["--model", MODEL, "--version", "one", "a.png"],
        ["--model", MODEL, "--timeout", "0", "a.png"],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    assert predict_main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_unreadable_certificate_is_one_line_and_exit_1(tmp_path, capsys):
    missing = str(tmp_path / "ca.pem")

    assert status_main(["--target", "127.0.0.1:1", "--model", MODEL, "--tls-ca", missing]) == 1
    _one_error_line(capsys, "convstack status: error:", missing)


def test_saved_model_that_is_not_one_is_exit_1(tmp_path, files, capsys):
    assert predict_main(["--saved-model", str(tmp_path), files[0]]) == 1
    _one_error_line(capsys, str(tmp_path), "not a SavedModel")


def test_status_table_and_json(server, capsys):
    assert status_main(_server_flags(server)) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.strip().splitlines()]
    assert lines == [
        ["model", MODEL],
        ["VERSION", "STATE", "STATUS"],
        ["2", "AVAILABLE", "OK"],
        ["1", "AVAILABLE", "OK"],
    ]

    assert status_main(_server_flags(server, "--json", "--version", "1")) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["versions"] == [
        {"version": 1, "state": "AVAILABLE", "error_code": "OK", "error_message": ""}
    ]


def test_status_of_an_unknown_model_is_exit_1(server, capsys):
    assert status_main(["--target", server.target, "--model", "nope"]) == 1
    _one_error_line(capsys, "NOT_FOUND", "nope")
    assert status_main(["--target", server.target]) == 2


def test_metadata_readable_and_json(server, capsys):
    assert metadata_main(_server_flags(server, "--label", "stable")) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"model {MODEL}, version 1"
    assert "signature serving_default (tensorflow/serving/predict)" in out
    assert any(line.split() == ["inputs", "images", "float32", "[-1,", "28,", "28,", "1]"]
               for line in out.splitlines())  # fmt: skip

    assert metadata_main(_server_flags(server, "--json")) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["version"] == 2
    assert document["signatures"]["serving_default"]["outputs"]["probabilities"] == {
        "dtype": "float32",
        "shape": [-1, 10],
    }
