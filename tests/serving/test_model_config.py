"""models.config: parsing, formatting, atomic writes, validation and edits."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from convstack.serving import model_config as mc

CONFIG_TEXT = """
model_config_list {
  config {
    name: "digits"
    base_path: "/models/digits"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 versions: 2 } }
    version_labels { key: "stable" value: 1 }
    version_labels { key: "canary" value: 2 }
  }
  config {
    name: "other"
    base_path: "/models/other"
    model_platform: "tensorflow"
  }
}
"""


def test_parse_reads_models_policies_and_labels():
    config = mc.parse_model_config(CONFIG_TEXT)

    digits, other = config.model_config_list.config
    assert (digits.name, digits.base_path) == ("digits", "/models/digits")
    assert list(digits.model_version_policy.specific.versions) == [1, 2]
    assert dict(digits.version_labels) == {"stable": 1, "canary": 2}
    assert other.model_version_policy.WhichOneof("policy_choice") is None
    mc.validate_model_config(config)


def test_parse_error_names_source_line_and_problem():
    text = 'model_config_list {\n  config {\n    name: "a"\n    base_pth: "/x"\n  }\n}\n'

    with pytest.raises(mc.ModelConfigError) as caught:
        mc.parse_model_config(text, source="/etc/models.config")

    message = str(caught.value)
    assert message.startswith("/etc/models.config: line 4, column")
    # testBadModelConfig greps TF Serving's stderr for this phrase.
    assert "Error parsing text-format tensorflow.serving.ModelServerConfig: " in message
    assert "base_pth" in message
    assert "\n" not in message
    assert isinstance(caught.value, ValueError)


def test_format_is_stable_and_round_trips():
    config = mc.parse_model_config(CONFIG_TEXT)

    text = mc.format_model_config(config)

    assert mc.parse_model_config(text) == config
    assert mc.format_model_config(mc.parse_model_config(text)) == text
    # Labels come out sorted, whatever order they were written in.
    assert text.index('key: "canary"') < text.index('key: "stable"')


def test_write_replaces_atomically_and_keeps_the_file_mode(tmp_path):
    path = tmp_path / "models.config"
    path.write_text("garbage")
    os.chmod(path, 0o640)
    config = mc.parse_model_config(CONFIG_TEXT)

    mc.write_model_config(path, config)

    assert mc.load_model_config(path) == config
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["models.config"]  # no temp file left


def test_write_new_file_is_world_readable(tmp_path):
    path = tmp_path / "models.config"

    mc.write_model_config(path, mc.single_model_config("digits", "/models/digits"))

    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_concurrent_reader_never_sees_a_partial_file(tmp_path):
    path = tmp_path / "models.config"
    small = mc.single_model_config("a", "/m/a")
    large = small
    for index in range(200):
        large = mc.add_model(large, f"model{index}", f"/m/{index}")
    mc.write_model_config(path, small)
    seen, failures, stop = set(), [], threading.Event()

    def read_forever():
        while True:  # at least one read, then until the writer is done
            try:
                seen.add(len(mc.load_model_config(path).model_config_list.config))
            except mc.ModelConfigError as exc:
                failures.append(exc)
            if stop.is_set():
                return

    reader = threading.Thread(target=read_forever)
    reader.start()
    try:
        for index in range(30):
            mc.write_model_config(path, large if index % 2 == 0 else small)
    finally:
        stop.set()
        reader.join()
    assert failures == []  # a half-written file would fail to parse or validate
    assert seen and seen <= {1, 201}


def test_write_refuses_an_invalid_config_and_leaves_the_file(tmp_path):
    path = tmp_path / "models.config"
    mc.write_model_config(path, mc.single_model_config("a", "/m/a"))
    before = path.read_text()
    invalid = mc.single_model_config("a", "relative/path")

    with pytest.raises(mc.ModelConfigError, match="absolute"):
        mc.write_model_config(path, invalid)

    assert path.read_text() == before
    assert len(list(tmp_path.iterdir())) == 1


def test_load_names_a_missing_file(tmp_path):
    with pytest.raises(mc.ModelConfigError, match=r"missing\.config"):
        mc.load_model_config(tmp_path / "missing.config")


def test_load_names_the_file_of_an_invalid_config(tmp_path):
    path = tmp_path / "models.config"
    path.write_text('model_config_list { config { name: "a" base_path: "/m/a" } }')

    with pytest.raises(mc.ModelConfigError, match=r"models\.config: .*model_platform"):
        mc.load_model_config(path)


def test_single_model_config_serves_the_latest_version():
    config = mc.single_model_config("digits", "/models/digits")

    (model,) = config.model_config_list.config
    assert model.model_platform == "tensorflow"
    assert model.model_version_policy.latest.num_versions == 1
    mc.validate_model_config(config)


def _with(text: str) -> mc.ModelServerConfig:
    return mc.parse_model_config(f"model_config_list {{ {text} }}")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('config { base_path: "/m" model_platform: "tensorflow" }', "empty name"),
        (
            'config { name: "a" base_path: "/m" model_platform: "tensorflow" }'
            'config { name: "a" base_path: "/n" model_platform: "tensorflow" }',
            "Illegal to list model a multiple times",
        ),
        ('config { name: "a" model_platform: "tensorflow" }', "'a' has no base_path"),
        (
            'config { name: "a" base_path: "models/a" model_platform: "tensorflow" }',
            "Expected model a to have an absolute path or URI",
        ),
        ('config { name: "a" base_path: "/m" }', "model 'a': model_platform must be"),
        ('config { name: "a" base_path: "/m" model_platform: "onnx" }', "'onnx'"),
        (
            'config { name: "a" base_path: "/m" model_platform: "tensorflow" '
            "model_version_policy { specific { } } }",
            "specific version policy lists no versions",
        ),
        (
            'config { name: "a" base_path: "/m" model_platform: "tensorflow" '
            "model_version_policy { specific { versions: 1 } } "
            'version_labels { key: "canary" value: 2 } }',
            "label 'canary' points at version 2, which is not among the specific versions",
        ),
    ],
)
def test_validation_names_the_model_and_the_problem(text, problem):
    with pytest.raises(mc.ModelConfigError, match=problem):
        mc.validate_model_config(_with(text))


def test_custom_model_config_is_unsupported():
    config = mc.parse_model_config("custom_model_config { }")

    with pytest.raises(mc.ModelConfigError, match="custom_model_config is not supported"):
        mc.validate_model_config(config)


# Each edge case TF Serving accepts, next to its nearest variant that it refuses: a validator
# that accepted everything (or refused the edge) fails one side of the pair.
EDGE_CASES = [
    (
        'config { name: "a" base_path: "gs://bucket/a" model_platform: "tensorflow" }',
        'config { name: "a" base_path: "bucket/a" model_platform: "tensorflow" }',
        "absolute path or URI",
    ),
    (
        'config { name: "b" base_path: "/m/b" model_type: TENSORFLOW }',
        'config { name: "b" base_path: "/m/b" model_type: TENSORFLOW '
        'model_platform: "tensorflow" }',
        "sets both model_type (deprecated) and model_platform",
    ),
    (
        # Under `latest` a label may point at any version: only loading can tell.
        'config { name: "c" base_path: "/m/c" model_platform: "tensorflow" '
        'model_version_policy { latest { } } version_labels { key: "stable" value: 9 } }',
        'config { name: "c" base_path: "/m/c" model_platform: "tensorflow" '
        "model_version_policy { specific { versions: 1 } } "
        'version_labels { key: "stable" value: 9 } }',
        "label 'stable' points at version 9, which is not among the specific versions [1]",
    ),
]


@pytest.mark.parametrize(("accepted", "refused", "reason"), EDGE_CASES)
def test_valid_edge_cases_pass_and_their_near_misses_do_not(accepted, refused, reason):
    mc.validate_model_config(_with(accepted))
    with pytest.raises(mc.ModelConfigError) as caught:
        mc.validate_model_config(_with(refused))
    assert reason in str(caught.value)


def test_an_empty_config_is_valid_and_serves_nothing():
    config = mc.ModelServerConfig()
    mc.validate_model_config(config)
    assert list(config.model_config_list.config) == []


def test_latest_without_a_count_serves_one_version():
    """`latest {}` has num_versions 0, which TF Serving reads as 1."""
    from convstack.serving.version_policy import aspired_versions

    config = _with(
        'config { name: "a" base_path: "/m/a" model_platform: "tensorflow" '
        "model_version_policy { latest { } } }"
    )
    mc.validate_model_config(config)
    policy = config.model_config_list.config[0].model_version_policy
    assert aspired_versions([1, 3, 2], policy) == {3}


def test_set_version_policy_returns_a_modified_copy():
    original = mc.single_model_config("digits", "/models/digits")

    specific = mc.set_version_policy(original, "digits", specific=[3, 2, 3])
    every = mc.set_version_policy(specific, "digits", all=True)
    latest = mc.set_version_policy(every, "digits", latest=2)

    assert original.model_config_list.config[0].model_version_policy.latest.num_versions == 1
    assert list(specific.model_config_list.config[0].model_version_policy.specific.versions) == [
        2,
        3,
    ]
    assert every.model_config_list.config[0].model_version_policy.WhichOneof("policy_choice") == (
        "all"
    )
    assert latest.model_config_list.config[0].model_version_policy.latest.num_versions == 2


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"latest": 1, "all": True}, {"latest": 0}, {"specific": []}, {"specific": [0]}],
)
def test_set_version_policy_rejects_ambiguous_or_empty_policies(kwargs):
    config = mc.single_model_config("digits", "/models/digits")

    with pytest.raises(mc.ModelConfigError, match="digits"):
        mc.set_version_policy(config, "digits", **kwargs)


def test_set_version_labels_replaces_all_labels():
    config = mc.add_model(mc.ModelServerConfig(), "d", "/m/d", all=True, labels={"old": 1})

    labelled = mc.set_version_labels(config, "d", {"stable": 1, "canary": 2})

    assert dict(labelled.model_config_list.config[0].version_labels) == {"stable": 1, "canary": 2}
    assert dict(config.model_config_list.config[0].version_labels) == {"old": 1}


def test_add_and_remove_models():
    config = mc.single_model_config("a", "/m/a")

    both = mc.add_model(config, "b", "/m/b", specific=[4])
    only_b = mc.remove_model(both, "a")

    assert [m.name for m in both.model_config_list.config] == ["a", "b"]
    assert [m.name for m in only_b.model_config_list.config] == ["b"]
    assert [m.name for m in config.model_config_list.config] == ["a"]
    mc.validate_model_config(only_b)
    with pytest.raises(mc.ModelConfigError, match="'a' is already in the config"):
        mc.add_model(config, "a", "/m/other")
    with pytest.raises(mc.ModelConfigError, match="'zzz' is not in the config"):
        mc.remove_model(config, "zzz")
    with pytest.raises(mc.ModelConfigError, match="'zzz' is not in the config"):
        mc.set_version_labels(config, "zzz", {})
