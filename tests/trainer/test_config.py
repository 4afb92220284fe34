"""Typed configuration from flags and YAML: precedence, unknown keys, wrong types."""

from __future__ import annotations

import pytest

from convstack.common.configs import ConfigValueError, build_config
from convstack.trainer.cli import build_parser
from convstack.trainer.config import TrainConfig


def parse(argv: list[str]) -> TrainConfig:
    namespace = build_parser().parse_args(argv)
    return build_config(TrainConfig, namespace, namespace.config)


def test_defaults_and_flags():
    config = parse(["--epochs", "3", "--replicas", "2", "--no-export", "--learning-rate", "0.01"])
    assert (config.epochs, config.replicas, config.export) == (3, 2, False)
    assert config.learning_rate == 0.01
    assert config.data == "digits" and config.batch_size == 64


def test_yaml_supplies_keys_and_flags_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 7\nbatch_size: 32\nbatch_norm: true\nlearning_rate: 1\n")
    config = parse(["--config", str(path), "--epochs", "2"])
    assert (config.epochs, config.batch_size, config.batch_norm) == (2, 32, True)
    assert config.learning_rate == 1.0  # an int is a valid float


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("epoch: 3\n", "unknown key 'epoch'"),
        ("epochs: five\n", "epochs (--epochs): Input should be a valid integer, got 'five'"),
        ("epochs: 2.5\n", "epochs (--epochs)"),
        ("batch_norm: 'yes'\n", "batch_norm (--batch-norm)"),
        ("epochs: 0\n", "greater than or equal to 1"),
        ("progress: fancy\n", "progress (--progress)"),
        ("validation_fraction: 0.6\ntest_fraction: 0.5\n", "must be below 1"),
        ("- epochs\n", "expected a mapping"),
        ("epochs: [\n", "not valid YAML"),
    ],
)
def test_bad_yaml_is_one_line_naming_the_key(tmp_path, yaml_text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigValueError) as caught:
        parse(["--config", str(path)])
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message
    assert str(path) in message


def test_missing_config_file_names_it(tmp_path):
    with pytest.raises(ConfigValueError, match=r"missing\.yaml: cannot read config file"):
        parse(["--config", str(tmp_path / "missing.yaml")])


def test_model_part_holds_only_architecture():
    config = TrainConfig(filters=8, conv_blocks=2, epochs=9)
    model = config.model_part()
    assert (model.filters, model.conv_blocks) == (8, 2)
    assert not hasattr(model, "epochs")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], None),
        (["--tflite"], "float32"),  # alone: float32
        (["--tflite", "--epochs", "2"], "float32"),
        (["--tflite", "int8"], "int8"),
        (["--tflite", "float16"], "float16"),
    ],
)
def test_tflite_flag_alone_means_float32(argv, expected):
    assert parse(argv).tflite == expected


def test_tflite_in_yaml_and_an_unknown_kind(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("tflite: float16\n")
    assert parse(["--config", str(path)]).tflite == "float16"
    path.write_text("tflite: true\n")  # the former boolean
    with pytest.raises(ConfigValueError, match=r"tflite \(--tflite\)"):
        parse(["--config", str(path)])
    with pytest.raises(SystemExit):
        parse(["--tflite", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err
